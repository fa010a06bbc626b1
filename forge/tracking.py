"""MLflow tracking: one parent run per pipeline run, one nested run per phase, a model registry.

Uses MlflowClient only (no global active-run state), so parallel tasks in one process are safe.
Large artifacts stay in the artifact store; MLflow gets their URIs as tags and small files.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from forge.config import TrackingConfig

SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credential)", re.I)
RUN_TAG = "forge.run_id"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a credential: secrets never reach MLflow."""
    return {k: ("***" if SECRET_KEY.search(k) else v) for k, v in params.items()}


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_id: str):
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = exp.experiment_id if exp else self._create_experiment()

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(self.cfg.experiment,
                                                 artifact_location=self.cfg.artifact_location)
        except Exception:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id  # created by a parallel task in the meantime

    def _find_parents(self) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_TAG}` = '{self.run_id}' and tags.`forge.kind` = 'pipeline'",
            order_by=["attributes.start_time ASC"],
        )

    def parent_run_id(self) -> str:
        runs = self._find_parents()
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_id,
                                     tags={RUN_TAG: self.run_id, "forge.kind": "pipeline"})
        # two tasks may race to create the parent: keep the oldest, drop ours if it lost
        runs = self._find_parents()
        if runs[0].info.run_id != run.info.run_id:
            self.client.delete_run(run.info.run_id)
        return runs[0].info.run_id

    def start_phase(self, phase_id: str, task_id: str, params: dict[str, Any]) -> PhaseRun:
        parent = self.parent_run_id()
        run = self.client.create_run(
            self.experiment_id, run_name=task_id,
            tags={RUN_TAG: self.run_id, "forge.kind": "phase", "forge.phase": phase_id,
                  "mlflow.parentRunId": parent},
        )
        pr = PhaseRun(self, run.info.run_id)
        pr.log_params(params)
        return pr

    def ui_link(self, mlflow_run_id: str) -> str | None:
        base = self.cfg.ui_url
        if not base:
            return None
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{mlflow_run_id}"

    def register_model(self, name: str, source_uri: str, mlflow_run_id: str,
                       alias: str = "challenger", tags: dict[str, str] | None = None,
                       extra_aliases: tuple[str, ...] = ()) -> str:
        """Register a store URI as a new model version and point `alias` (and extra_aliases) at it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already exists
        mv = self.client.create_model_version(name, source=source_uri, run_id=mlflow_run_id,
                                              tags=tags or {})
        for a in (alias, *extra_aliases):
            self.client.set_registered_model_alias(name, a, mv.version)
        return str(mv.version)


class PhaseRun:
    def __init__(self, tracker: Tracker, mlflow_run_id: str):
        self.tracker = tracker
        self.client = tracker.client
        self.id = mlflow_run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = redact(flatten(params))
        items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, int | float) and v == v]
        if items:
            self.client.log_batch(self.id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in redact(tags).items():
            self.client.set_tag(self.id, k, str(v)[:5000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.id, status=status)
