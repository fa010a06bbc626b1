"""Trigger the demo run of forge_pipeline on the running stack, follow it, summarise it.

  .venv/bin/python scripts/run_demo.py [--profile demo] [--conf '{"train": {"max_steps": 20}}']

Needs the stack (scripts/stack.sh start). Everything goes through the Airflow REST API (v2),
as a person's own tooling would; the ledger is read from the artifact store of the run's config.
Exit status: 0 if the run succeeded, 1 if it failed (the failed task and its log tail are
printed), 2 if it could not be started or followed to its end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from forge.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from scripts.airflow_client import (  # noqa: E402
    DEFAULT_AIRFLOW_URL,
    DEFAULT_MLFLOW_URL,
    FAILED_TI_STATES,
    TERMINAL_RUN_STATES,
    AirflowClient,
    ApiError,
    MlflowClientREST,
    ti_seconds,
)

DAG_ID = "forge_pipeline"
LOG_TAIL_LINES = 40


@dataclass
class RunOutcome:
    run_id: str
    state: str
    wall_s: float  # trigger accepted -> run in a terminal state, as seen by this client
    run: dict[str, Any]
    task_instances: list[dict[str, Any]]
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "success"


def demo_conf(profile: str, mlflow_url: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DAG-run conf: the profile, plus the MLflow UI address so task links open it."""
    overrides: dict[str, Any] = {"tracking": {"ui_url": mlflow_url}}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    return {"profile": profile, "overrides": overrides}


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def _ti_order(ti: dict[str, Any]) -> tuple[str, str]:
    return (ti.get("start_date") or "~", ti["task_id"])


def start_run(client: AirflowClient, conf: dict[str, Any], parse_timeout_s: float) -> str:
    client.wait_for_dag(DAG_ID, timeout_s=parse_timeout_s)
    client.set_paused(DAG_ID, False)
    run = client.trigger(DAG_ID, conf)
    return run["dag_run_id"]


def follow_run(client: AirflowClient, run_id: str, poll_s: float = 2.0, timeout_s: float | None = None,
               echo: bool = True) -> RunOutcome:
    """Poll the run until it ends, printing a line whenever a task changes state."""
    started = time.monotonic()
    seen: dict[str, str | None] = {}
    events: list[str] = []
    said_queued = False
    while True:
        run = client.dag_run(DAG_ID, run_id)
        if run["state"] == "queued" and not said_queued:
            said_queued = True
            others = [r["dag_run_id"] for r in client.active_runs(DAG_ID) if r["dag_run_id"] != run_id]
            if others:  # max_active_runs=1: runs of one pipeline queue behind each other
                line = f"queued behind the running run(s) {', '.join(others)}"
                events.append(line)
                if echo:
                    print(line, flush=True)
        tis = client.task_instances(DAG_ID, run_id)
        for ti in sorted(tis, key=_ti_order):
            state = ti.get("state")
            if seen.get(ti["task_id"], "<new>") == state:
                continue
            seen[ti["task_id"]] = state
            if state is None:
                continue
            detail = f"try {ti.get('try_number')}" if state == "running" else _fmt_s(ti_seconds(ti))
            line = f"[{time.monotonic() - started:7.1f}s] {ti['task_id']:40s} {state:16s} {detail}"
            events.append(line)
            if echo:
                print(line, flush=True)
        if run["state"] in TERMINAL_RUN_STATES:
            return RunOutcome(run_id, run["state"], time.monotonic() - started, run, tis, events)
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"run {run_id} still {run['state']} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def ledger_text(cfg: PipelineConfig, run_id: str) -> str:
    from forge.ledger import read_rows, render
    from forge.runner import make_store

    store = make_store(cfg)
    rows = read_rows(store, run_id)
    return render(rows) if rows else f"(no ledger rows for run {run_id} in {store.root})\n"


def mlflow_summary(mlflow: MlflowClientREST, run_id: str, experiment: str,
                   model_names: tuple[str, ...]) -> list[str]:
    lines = [f"MLflow UI:       {mlflow.base_url}"]
    try:
        exp_id = mlflow.experiment_id(experiment)
        if exp_id is None:
            return [*lines, f"  (no experiment {experiment!r} on the server)"]
        of_run = f"tags.`forge.run_id` = '{run_id}'"
        parents = mlflow.search_runs(exp_id, f"{of_run} and tags.`forge.kind` = 'pipeline'")
        phases = mlflow.search_runs(exp_id, f"{of_run} and tags.`forge.kind` = 'phase'")
        if parents:
            lines.append(f"  pipeline run:  {mlflow.run_url(exp_id, parents[0]['info']['run_id'])} "
                         f"({len(phases)} nested phase runs)")
        for model_name in model_names:
            version = mlflow.model_version_by_alias(model_name, "challenger")
            if version is None:
                lines.append(f"  registry:      no version of {model_name} has the alias @challenger")
                continue
            tags = {t["key"]: t["value"] for t in version.get("tags", [])}
            origin = "this run" if tags.get("forge.run_id") == run_id else f"run {tags.get('forge.run_id')}"
            lines.append(f"  registry:      {model_name} v{version['version']} @challenger (from {origin}) "
                         f"{mlflow.model_url(model_name, version['version'])}")
            lines.append(f"                 source {version.get('source')}")
    except Exception as exc:  # the summary must not hide the run's own result
        lines.append(f"  (could not query MLflow: {exc})")
    return lines


def print_summary(outcome: RunOutcome, airflow_url: str, mlflow: MlflowClientREST,
                  cfg: PipelineConfig) -> None:
    print(f"\n=== forge_pipeline run {outcome.run_id}: {outcome.state.upper()} in {outcome.wall_s:.1f}s ===")
    print(f"{'task':56s} {'state':16s} {'seconds':>8s}")
    for ti in sorted(outcome.task_instances, key=_ti_order):
        secs = ti_seconds(ti)
        print(f"{ti['task_id']:56s} {str(ti.get('state')):16s} {'-' if secs is None else f'{secs:8.1f}':>8s}")
    print(f"\nQuality ledger ({cfg.storage.root}):")
    try:
        print(ledger_text(cfg, outcome.run_id), end="")
    except Exception as exc:
        print(f"  (could not read the ledger: {exc})")
    print()
    tracking = cfg.tracking
    routing = (cfg.routing.router.registered_model, cfg.routing.detector.registered_model)
    models = (tracking.registered_model, tracking.compressed_model,
              *(cfg.modifiers.registered_name(d) for d in cfg.modifiers.enabled),
              *(routing if cfg.modifiers.enabled else ()))
    for line in mlflow_summary(mlflow, outcome.run_id, tracking.experiment, models):
        print(line)
    password = "$FORGE_ADMIN_PASSWORD" if os.environ.get("FORGE_ADMIN_PASSWORD") else "admin"
    print(f"Airflow UI:      {airflow_url}/dags/{DAG_ID}/runs/{outcome.run_id}  (login admin / {password})")


def print_failures(client: AirflowClient, outcome: RunOutcome) -> None:
    failed = [ti for ti in outcome.task_instances if ti.get("state") == "failed"]
    blocked = [ti["task_id"] for ti in outcome.task_instances if ti.get("state") == "upstream_failed"]
    for ti in failed:
        print(f"\nFAILED: {ti['task_id']} (try {ti.get('try_number')}); last {LOG_TAIL_LINES} log lines:")
        try:
            log = client.task_log(DAG_ID, outcome.run_id, ti["task_id"], int(ti.get("try_number") or 1))
            print("\n".join("    " + line for line in log.splitlines()[-LOG_TAIL_LINES:]))
        except ApiError as exc:
            print(f"    (could not fetch the log: {exc})")
    if blocked:
        print(f"\nNot run because of it (upstream_failed): {', '.join(blocked)}")
    if failed:
        task = failed[0]["task_id"]
        print(f"\nAfter a fix, re-run only that task and what depends on it (finished upstream outputs are\n"
              f"reused from the artifact store): in the UI select {task} in this run and Clear it, or\n"
              f"  .venv/bin/python scripts/rerun_task.py '{outcome.run_id}' {task.split('.')[-1]}")
    elif not any(ti.get("state") in FAILED_TI_STATES for ti in outcome.task_instances):
        print(f"\nThe run ended {outcome.state} without a failed task; see the scheduler log.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--airflow-url", default=DEFAULT_AIRFLOW_URL)
    ap.add_argument("--mlflow-url", default=DEFAULT_MLFLOW_URL)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--conf", default="{}", help="JSON config overrides, deep-merged onto the profile")
    ap.add_argument("--parse-timeout", type=float, default=300.0,
                    help="seconds to wait for the DAG to appear")
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait for the run to end")
    ap.add_argument("--poll", type=float, default=2.0)
    args = ap.parse_args(argv)

    try:
        conf = demo_conf(args.profile, args.mlflow_url, json.loads(args.conf))
        # validate here too: a typo is reported now, not as a failed first task minutes later
        cfg = load_config(None, args.profile, conf["overrides"])
    except (ConfigError, json.JSONDecodeError) as exc:
        print(f"run_demo: {exc}", file=sys.stderr)
        return 2
    client = AirflowClient(args.airflow_url)
    try:
        run_id = start_run(client, conf, args.parse_timeout)
    except (ApiError, OSError) as exc:
        print(f"run_demo: could not start the run: {exc}", file=sys.stderr)
        return 2
    # make run serves this run's release (8A) once it succeeds
    (Path(os.environ.get("FORGE_HOME", REPO / ".forge")) / "last_run_id").write_text(run_id + "\n")
    print(f"Triggered {DAG_ID} run {run_id} (profile {args.profile}); following it "
          f"(Airflow UI {args.airflow_url}, MLflow UI {args.mlflow_url})", flush=True)
    return follow_and_report(client, run_id, args.airflow_url, args.mlflow_url, cfg,
                             poll_s=args.poll, timeout_s=args.timeout, prog="run_demo")


def follow_and_report(client: AirflowClient, run_id: str, airflow_url: str, mlflow_url: str,
                      cfg: PipelineConfig, poll_s: float, timeout_s: float | None = None,
                      prog: str = "run_demo") -> int:
    """Follow a run to its end, print the summary (and failures): the exit status of the scripts."""
    try:
        outcome = follow_run(client, run_id, poll_s=poll_s, timeout_s=timeout_s)
    except (ApiError, TimeoutError) as exc:
        print(f"{prog}: lost track of run {run_id}: {exc}", file=sys.stderr)
        return 2
    print_summary(outcome, airflow_url, MlflowClientREST(mlflow_url), cfg)
    if not outcome.ok:
        print_failures(client, outcome)
        return 1
    return 0


def run_cli(main_fn: Callable[[], int]) -> None:
    try:
        sys.exit(main_fn())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        # die of SIGINT so a calling shell sees it and runs its own Ctrl-C handling
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    run_cli(main)
