"""End-to-end benchmark of the demo pipeline on the local stack: where does the time go?

  .venv/bin/python benchmarks/demo_e2e.py [--allow-cache] [--keep-stack] [--conf '{...}']

Starts the stack (or reuses a running one), measures the idle stack's memory (PSS summed over
each service's process tree) and the DAG file's parse cost, triggers the demo run through the
REST API and follows it. Then, per task: wall time (Airflow's task instance start..end), job
time (the job's own `job_seconds` from its artifact manifest) and their difference, the
Airflow overhead (process start, DAG file parse in the worker, config, store and MLflow
bookkeeping). Prints a table, then one JSON line. Outputs of earlier runs are not reused unless
--allow-cache (a cache hit would measure nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from forge.config import forge_home, load_config  # noqa: E402
from forge.phases import pipeline_phases  # noqa: E402
from scripts.airflow_client import (  # noqa: E402
    DEFAULT_AIRFLOW_URL,
    DEFAULT_MLFLOW_URL,
    AirflowClient,
    parse_ts,
    ti_seconds,
)
from scripts.run_demo import demo_conf, follow_run, start_run  # noqa: E402

STACK = REPO / "scripts" / "stack.sh"
PYTHON = REPO / ".venv" / "bin" / "python"
DAG_FILE = REPO / "dags" / "forge_pipeline.py"
SERVICES = ("mlflow", "api-server", "scheduler", "dag-processor", "triggerer")


# ---- the stack ---------------------------------------------------------------------------
def stack_env() -> dict[str, str]:
    """The environment scripts/stack.sh gives every component (from its generated env.sh)."""
    out = subprocess.run([str(STACK), "env"], check=True, capture_output=True, text=True).stdout
    env = dict(os.environ)
    script = f"{out}\nenv -0"
    dump = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    for item in dump.split("\0"):
        if "=" in item:
            k, v = item.split("=", 1)
            env[k] = v
    return env


def stack_running() -> bool:
    return subprocess.run([str(STACK), "status"], capture_output=True).returncode == 0


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # comm may hold spaces and parens
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def stack_pss() -> dict[str, dict[str, float]]:
    """PSS (shared pages split among their users, so the sum is honest) per service tree."""
    children = _children_map()
    out = {}
    for name in SERVICES:
        pid_file = forge_home() / "logs" / f"{name}.pid"
        if not pid_file.exists():
            continue
        pids = _tree(int(pid_file.read_text().strip()), children)
        out[name] = {"gb": sum(_pss_kb(p) for p in pids) / 1024**2, "processes": len(pids)}
    return out


# ---- DAG parse cost ------------------------------------------------------------------------
def time_fresh_import(env: dict[str, str], code: str, reps: int) -> float:
    """Median wall time of a fresh interpreter running `code` (what a cold worker pays)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([str(PYTHON), "-c", code], check=True, env=env, cwd=REPO, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DAGBAG_CODE = f"""
import json, time
from airflow.dag_processing.dagbag import DagBag  # the dag-processor has airflow imported already
t0 = time.perf_counter()
bag = DagBag(dag_folder={str(DAG_FILE)!r})
wall = time.perf_counter() - t0
dag = bag.dags.get("forge_pipeline")
print(json.dumps({{"wall_s": wall, "errors": {{k: v[:500] for k, v in bag.import_errors.items()}},
                  "tasks": len(dag.tasks) if dag else 0}}))
"""


def dag_parse_cost(env: dict[str, str], reps: int) -> dict[str, Any]:
    baseline = time_fresh_import(env, "import airflow.sdk", reps)
    fresh = time_fresh_import(env, f"import runpy; runpy.run_path({str(DAG_FILE)!r})", reps)
    bags = []
    for _ in range(reps):
        out = subprocess.run([str(PYTHON), "-c", DAGBAG_CODE], check=True, env=env, cwd=REPO,
                             capture_output=True, text=True).stdout
        bags.append(json.loads(out.strip().splitlines()[-1]))
    if bags[0]["errors"]:
        raise RuntimeError(f"DagBag import errors: {bags[0]['errors']}")
    return {"fresh_import_s": fresh, "airflow_sdk_import_s": baseline,
            "dag_file_over_sdk_s": fresh - baseline,
            "dagbag_parse_s": statistics.median(b["wall_s"] for b in bags), "tasks": bags[0]["tasks"]}


# ---- the run -------------------------------------------------------------------------------
def busy_seconds(tis: list[dict[str, Any]]) -> float:
    """Length of the union of the tasks' [start, end] intervals (time some task was running)."""
    spans = sorted((parse_ts(t["start_date"]), parse_ts(t["end_date"])) for t in tis
                   if t.get("start_date") and t.get("end_date"))
    total, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += (cur_end - cur_start).total_seconds()
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += (cur_end - cur_start).total_seconds()
    return total


def task_rows(tis: list[dict[str, Any]], cfg, run_id: str) -> list[dict[str, Any]]:
    from forge.ledger import read_rows
    from forge.runner import make_store

    store = make_store(cfg)
    ledger = {r["phase"]: r for r in read_rows(store, run_id)}
    phases = pipeline_phases(cfg)
    by_task = {f"{p.group}.{p.task_id}": p for p in phases}
    rows = []
    for ti in tis:
        phase = by_task.get(ti["task_id"])
        manifest = store.run_manifest(run_id, phase.id) if phase else None
        cached = bool(ledger.get(phase.id, {}).get("cached")) if phase else False
        wall = ti_seconds(ti)
        job = manifest.metrics.get("job_seconds") if manifest and not cached else None
        if manifest is not None and manifest.status == "skipped":
            job = 0.0  # the job decided to skip: no work, all of the task's time is overhead
        rows.append({"task": ti["task_id"], "phase": phase.id if phase else None, "state": ti.get("state"),
                     "cached": cached, "wall_s": wall, "job_s": job,
                     "overhead_s": None if wall is None or job is None else wall - job})
    return sorted(rows, key=lambda r: next((i for i, p in enumerate(phases) if p.id == r["phase"]), 999))


def _f(v: float | None, width: int = 8) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--airflow-url", default=DEFAULT_AIRFLOW_URL)
    ap.add_argument("--mlflow-url", default=DEFAULT_MLFLOW_URL)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--conf", default="{}", help="JSON config overrides for the run")
    ap.add_argument("--allow-cache", action="store_true", help="let phases reuse earlier outputs")
    ap.add_argument("--keep-stack", action="store_true", help="leave a stack this script started running")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds the idle stack settles before PSS")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each parse measurement")
    args = ap.parse_args(argv)

    extra = json.loads(args.conf)
    if not args.allow_cache:
        extra = {**extra, "cache": {**extra.get("cache", {}), "enabled": False}}
    conf = demo_conf(args.profile, args.mlflow_url, extra)
    cfg = load_config(None, args.profile, conf["overrides"])

    started_stack = False
    stack_start_s = None
    if not stack_running():
        t0 = time.perf_counter()
        subprocess.run([str(STACK), "start"], check=True)
        stack_start_s = time.perf_counter() - t0
        started_stack = True
    try:
        client = AirflowClient(args.airflow_url)
        client.wait_for_dag("forge_pipeline")
        time.sleep(args.settle)
        pss = stack_pss()
        parse = dag_parse_cost(stack_env(), args.reps)

        t0 = time.perf_counter()
        run_id = start_run(client, conf, parse_timeout_s=300)
        outcome = follow_run(client, run_id, echo=True)
        e2e = time.perf_counter() - t0
        rows = task_rows(outcome.task_instances, cfg, run_id)
    finally:
        if started_stack and not args.keep_stack:
            subprocess.run([str(STACK), "stop"], check=False)

    run_wall = None
    if outcome.run.get("start_date") and outcome.run.get("end_date"):
        run_wall = (parse_ts(outcome.run["end_date"]) - parse_ts(outcome.run["start_date"])).total_seconds()
    busy = busy_seconds(outcome.task_instances)
    measured = [r for r in rows if r["overhead_s"] is not None]
    overhead = sum(r["overhead_s"] for r in measured)
    job_total = sum(r["job_s"] for r in measured)
    idle_gb = sum(v["gb"] for v in pss.values())

    print(f"\n=== demo_e2e: run {run_id} {outcome.state.upper()} ===")
    print(f"{'task':40s} {'state':10s} {'wall s':>8s} {'job s':>8s} {'airflow s':>9s}")
    for r in rows:
        note = " (cache hit)" if r["cached"] else ""
        print(f"{r['task']:40s} {str(r['state']):10s} {_f(r['wall_s'])} {_f(r['job_s'])} "
              f"{_f(r['overhead_s'], 9)}{note}")
    print(f"{'sum over tasks':40s} {'':10s} {_f(sum(r['wall_s'] or 0 for r in rows))} {_f(job_total)} "
          f"{_f(overhead, 9)}")
    print(f"\nend-to-end (trigger -> run ended, seen by the client): {e2e:.1f} s"
          f"   run start..end (scheduler): {_f(run_wall, 0)} s")
    print(f"time no task was running (scheduling gaps): {(run_wall or e2e) - busy:.1f} s")
    print(f"Airflow overhead: {overhead:.1f} s inside tasks + {(run_wall or e2e) - busy:.1f} s between tasks"
          f" = {overhead + (run_wall or e2e) - busy:.1f} s of {e2e:.1f} s")
    print(f"idle stack PSS: {idle_gb:.2f} GB  (" + ", ".join(
        f"{k} {v['gb']:.2f} GB/{v['processes']} procs" for k, v in pss.items()) + ")")
    print(f"DAG parse: fresh `python` import of the DAG file {parse['fresh_import_s']:.2f} s "
          f"(airflow.sdk alone {parse['airflow_sdk_import_s']:.2f} s); DagBag parse with Airflow "
          f"imported {parse['dagbag_parse_s']:.3f} s ({parse['tasks']} tasks)")
    if stack_start_s is not None:
        print(f"stack start (migrate + 5 services healthy): {stack_start_s:.1f} s")
    print(json.dumps({
        "bench": "demo_e2e", "run_id": run_id, "state": outcome.state, "cache": args.allow_cache,
        "e2e_s": round(e2e, 2), "run_wall_s": run_wall, "busy_s": round(busy, 2),
        "gaps_s": round((run_wall or e2e) - busy, 2), "task_overhead_s": round(overhead, 2),
        "job_s": round(job_total, 2),
        "tasks": {r["task"]: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                              if k != "task"} for r in rows},
        "idle_pss_gb": round(idle_gb, 3), "pss": pss, "parse": parse, "stack_start_s": stack_start_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }, default=str))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
