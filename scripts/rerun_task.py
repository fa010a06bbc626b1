"""Re-run one task of a forge_pipeline run (and what depends on it), then follow the run to its end.

  .venv/bin/python scripts/rerun_task.py RUN_ID TASK [--no-downstream]

TASK is a full task id (phase1_base.1b_failure_analysis) or its last part (1b_failure_analysis).
This clears exact task ids of that one run through the REST API; the CLI's
`airflow tasks clear -t` matches task ids by substring, across every run. Finished upstream
tasks are not touched: the re-run task reads their outputs from the artifact store.
Exit status as scripts/run_demo.py: 0 success, 1 failed, 2 could not start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from forge.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from scripts.airflow_client import (  # noqa: E402
    DEFAULT_AIRFLOW_URL,
    DEFAULT_MLFLOW_URL,
    TERMINAL_RUN_STATES,
    AirflowClient,
    ApiError,
)
from scripts.run_demo import DAG_ID, follow_and_report, run_cli  # noqa: E402


def resolve_task(task_ids: list[str], wanted: str) -> str:
    matches = [t for t in task_ids if t == wanted or t.split(".")[-1] == wanted]
    if len(matches) != 1:
        raise ValueError(f"task {wanted!r} matches {matches or 'nothing'} in this run; "
                         f"its tasks: {sorted(task_ids)}")
    return matches[0]


def run_config(conf: dict) -> PipelineConfig:
    """The config the run's tasks use (same mapping as the DAG's trigger form)."""
    from operators.trigger_form import config_request

    profile, overrides = config_request(None, conf)
    return load_config(None, profile, overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_id")
    ap.add_argument("task")
    ap.add_argument("--no-downstream", action="store_true", help="clear only this task")
    ap.add_argument("--airflow-url", default=DEFAULT_AIRFLOW_URL)
    ap.add_argument("--mlflow-url", default=DEFAULT_MLFLOW_URL)
    ap.add_argument("--poll", type=float, default=2.0)
    args = ap.parse_args(argv)

    client = AirflowClient(args.airflow_url)
    try:
        run = client.dag_run(DAG_ID, args.run_id)
        tis = client.task_instances(DAG_ID, args.run_id)
        task_id = resolve_task([ti["task_id"] for ti in tis], args.task)
        cfg = run_config(run.get("conf") or {})
        cleared = client.clear_tasks(DAG_ID, args.run_id, [task_id], downstream=not args.no_downstream)
    except (ApiError, ValueError, ConfigError, OSError) as exc:
        print(f"rerun_task: {exc}", file=sys.stderr)
        return 2
    print(f"Cleared in run {args.run_id}: {', '.join(sorted(ti['task_id'] for ti in cleared))}", flush=True)
    deadline = time.monotonic() + 30  # the run leaves its terminal state once the scheduler sees it
    while client.dag_run(DAG_ID, args.run_id)["state"] in TERMINAL_RUN_STATES and time.monotonic() < deadline:
        time.sleep(1)
    return follow_and_report(client, args.run_id, args.airflow_url, args.mlflow_url, cfg,
                             poll_s=args.poll, prog="rerun_task")


if __name__ == "__main__":
    run_cli(main)
