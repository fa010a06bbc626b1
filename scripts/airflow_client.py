"""A small client for the Airflow 3 REST API (v2) and the MLflow REST API, for the demo scripts.

Airflow: POST /auth/token with the simple auth manager's login, then a Bearer token on every
call (re-issued once on a 401). Only what the demo and the benchmark need.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_AIRFLOW_URL = f"http://127.0.0.1:{os.environ.get('FORGE_AIRFLOW_PORT', '8080')}"
DEFAULT_MLFLOW_URL = f"http://127.0.0.1:{os.environ.get('FORGE_MLFLOW_PORT', '5000')}"
TERMINAL_RUN_STATES = {"success", "failed"}
FAILED_TI_STATES = {"failed", "upstream_failed"}


class ApiError(RuntimeError):
    """An HTTP error from a service, with the method, URL, status and body in the message."""


def _raise_for(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        raise ApiError(f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text[:2000]}")
    return resp


def parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def ti_seconds(ti: dict[str, Any], now: datetime | None = None) -> float | None:
    """A task instance's wall time: its reported duration, or start..now while it runs."""
    if ti.get("duration") is not None:
        return float(ti["duration"])
    start = parse_ts(ti.get("start_date"))
    if start is None:
        return None
    end = parse_ts(ti.get("end_date")) or now or datetime.now(UTC)
    return (end - start).total_seconds()


class AirflowClient:
    def __init__(self, base_url: str = DEFAULT_AIRFLOW_URL, username: str = "admin",
                 password: str | None = None, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password if password is not None else os.environ.get("FORGE_ADMIN_PASSWORD", "admin")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._token: str | None = None

    def login(self) -> None:
        resp = self.http.post("/auth/token", json={"username": self.username, "password": self.password})
        if resp.status_code in (401, 403):
            raise ApiError(f"Airflow at {self.base_url} refused the login of {self.username!r} "
                           "(check FORGE_ADMIN_PASSWORD)")
        self._token = _raise_for(resp).json()["access_token"]

    def request(self, method: str, path: str, retry_s: float = 60.0, **kwargs: Any) -> httpx.Response:
        """One API call; a refused or dropped connection is retried for `retry_s` (a busy or
        restarting api-server), an expired token is renewed once."""
        deadline = time.monotonic() + retry_s
        extra_headers = kwargs.pop("headers", {})
        renewed = False
        while True:
            try:
                if self._token is None:
                    self.login()
                headers = {"Authorization": f"Bearer {self._token}", **extra_headers}
                resp = self.http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise ApiError(f"cannot reach Airflow at {self.base_url}: {exc}") from exc
                time.sleep(2)
                continue
            if resp.status_code == 401 and not renewed:
                renewed = True
                self._token = None
                continue
            return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _raise_for(self.request(method, path, **kwargs)).json()

    # ---- DAGs and runs ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return _raise_for(self.http.get("/api/v2/monitor/health")).json()

    def get_dag(self, dag_id: str) -> dict[str, Any] | None:
        resp = self.request("GET", f"/api/v2/dags/{dag_id}")
        return None if resp.status_code == 404 else _raise_for(resp).json()

    def import_errors(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/v2/importErrors")["import_errors"]

    def wait_for_dag(self, dag_id: str, timeout_s: float = 300.0, poll_s: float = 2.0) -> dict[str, Any]:
        """The DAG once the dag-processor has parsed it; fails early on its file's import error."""
        deadline = time.monotonic() + timeout_s
        while True:
            dag = self.get_dag(dag_id)
            if dag is not None:
                return dag
            errors = [e for e in self.import_errors() if f"{dag_id}.py" in e.get("filename", "")]
            if errors:
                raise ApiError(f"the DAG file of {dag_id} does not import:\n{errors[0].get('stack_trace')}")
            if time.monotonic() > deadline:
                raise ApiError(f"DAG {dag_id} did not appear within {timeout_s:.0f}s "
                               "(is dags/ parsed? see the dag-processor log)")
            time.sleep(poll_s)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
        # logical_date must be present (null = now); an empty body is a 422 in Airflow 3.3
        return self._json("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def active_runs(self, dag_id: str) -> list[dict[str, Any]]:
        body = self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"state": "running", "limit": 100})
        return body["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        body = self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances",
                          params={"limit": 1000})
        return body["task_instances"]

    def clear_tasks(self, dag_id: str, run_id: str, task_ids: list[str], downstream: bool = True,
                    dry_run: bool = False) -> list[dict[str, Any]]:
        """Clear exact task ids of one run (and what depends on them): they run again."""
        body = {"dag_run_id": run_id, "task_ids": task_ids, "include_downstream": downstream,
                "only_failed": False, "reset_dag_runs": True, "dry_run": dry_run}
        return self._json("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", json=body)["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """The task attempt's log as text lines (the API returns structured events)."""
        path = (f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                f"{quote(task_id, safe='')}/logs/{try_number}")
        body = self._json("GET", path, params={"full_content": "true"},
                          headers={"Accept": "application/json"})
        content = body.get("content", [])
        if isinstance(content, str):
            return content
        lines = []
        for event in content:
            if isinstance(event, str):
                lines.append(event)
                continue
            ts = str(event.get("timestamp") or "")[11:19]
            level = event.get("level") or ""
            text = event.get("event", "")
            extra = event.get("error_detail")
            lines.append(f"{ts} {level:7s} {text}" if ts else str(text))
            if extra:
                lines.extend(_format_error_detail(extra))
        return "\n".join(lines)


def _format_error_detail(detail: Any) -> list[str]:
    """Airflow 3 logs exceptions as structured frames; render them like a traceback."""
    out = []
    for exc in detail if isinstance(detail, list) else [detail]:
        if not isinstance(exc, dict):
            out.append(str(exc))
            continue
        for frame in exc.get("frames", []):
            where = f'{frame.get("filename")}", line {frame.get("lineno")}'
            out.append(f'  File "{where}, in {frame.get("name")}')
        out.append(f"{exc.get('exc_type')}: {exc.get('exc_value')}")
    return out


class MlflowClientREST:
    """Read-only look-ups on the MLflow tracking server, the way a person sees it in the UI."""

    def __init__(self, base_url: str = DEFAULT_MLFLOW_URL, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def experiment_id(self, name: str) -> str | None:
        resp = self.http.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        return None if resp.status_code == 404 else _raise_for(resp).json()["experiment"]["experiment_id"]

    def search_runs(self, experiment_id: str, filter_string: str) -> list[dict[str, Any]]:
        body = _raise_for(self.http.post("/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000})).json()
        return body.get("runs", [])

    def model_version_by_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        resp = self.http.get("/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": alias})
        return None if resp.status_code == 404 else _raise_for(resp).json()["model_version"]

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.base_url}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_url(self, name: str, version: str) -> str:
        return f"{self.base_url}/#/models/{name}/versions/{version}"
