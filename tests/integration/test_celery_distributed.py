"""A real distributed run: Airflow on the loopback PostgreSQL, CeleryExecutor over the loopback Redis, two
Celery workers (one on the `default` queue, one on `gpu`), running a slice of forge_pipeline to success.

The slice, built by the real builder (operators.pipeline_dag.add_phase_tasks) from the phase registry:
prep_data -> prep_model -> 0A -> 0B (skips by default) -> 1A (ForgeGPUJobOperator: queue `gpu`, pool `gpu`),
triggered with the demo profile on TINY_OVERRIDES through `airflow dags trigger`, as an operator would.
Each worker records its own name as the task instances' hostname (tests.celery_env.worker_hostname), so the
metadata DB says which worker ran what.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
import uuid

import pytest

from tests.celery_env import CeleryStack, redis_keys, require_services
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.services

DAG_ID = "forge_pipeline_slice"
SLICE = ("prep_data", "prep_model", "0A", "0B", "1A")
CPU_WORKER, GPU_WORKER = "forge-cpu-worker", "forge-gpu-worker"
RUN_TIMEOUT_S = 600.0
TERMINAL = {"success", "failed"}

DAG_FILE = textwrap.dedent(f'''
    """{DAG_ID}: a slice of forge_pipeline ({", ".join(SLICE)}), built as forge_pipeline is."""
    from airflow.sdk import DAG

    from forge.phases import get_phase
    from operators.pipeline_dag import add_phase_tasks
    from operators.trigger_form import trigger_params

    with DAG(dag_id={DAG_ID!r}, schedule=None, catchup=False, params=trigger_params(), max_active_runs=1,
             tags=["forge", "test"]):
        add_phase_tasks(phases=[get_phase(p) for p in {SLICE!r}])
''')


def task_id(phase_id: str) -> str:
    from forge.phases import get_phase

    p = get_phase(phase_id)
    return f"{p.group}.{p.task_id}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    require_services()
    # nothing of a developer's Airflow/Forge settings (or of other test modules' airflow_env) leaks in
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AIRFLOW", "FORGE_", "MLFLOW_")) and k != "PYTHONPATH"}
    s = CeleryStack(home=tmp_path_factory.mktemp("celery_home"), dag_file_text=DAG_FILE,
                    workers={CPU_WORKER: "default", GPU_WORKER: "gpu"}, base_env=base_env)
    try:
        try:
            s.start()
        except Exception as exc:
            pytest.fail(f"the Celery stack did not start: {exc}\n{s.diagnostics()}")
        yield s
    finally:
        s.stop()
        print("\ncelery stack wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s.timings.items()))


def wait_for_dag(stack: CeleryStack, timeout_s: float = 180) -> None:
    def parsed() -> bool:
        return bool(stack.query("SELECT 1 FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
                                "WHERE d.dag_id = %s AND NOT d.is_paused AND NOT d.is_stale", DAG_ID))
    stack.wait_for(f"{DAG_ID} parsed and unpaused", parsed, timeout_s)


def task_rows(stack: CeleryStack, run_id: str) -> dict[str, dict]:
    cols = ("task_id", "state", "queue", "pool", "hostname", "try_number")
    rows = stack.query(f"SELECT {', '.join(cols)} FROM task_instance WHERE dag_id = %s AND run_id = %s",
                       DAG_ID, run_id)
    return {r[0]: dict(zip(cols, r, strict=True)) for r in rows}


@pytest.fixture(scope="module")
def finished_run(stack: CeleryStack) -> tuple[str, str, dict[str, dict]]:
    started = time.monotonic()
    wait_for_dag(stack)
    run_id = f"celery-{uuid.uuid4().hex[:8]}"
    conf = {"profile": "demo", "overrides": TINY_OVERRIDES}
    out = stack.cli("dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf))
    assert out.returncode == 0, f"airflow dags trigger failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    last = None
    while True:
        ((state,),) = stack.query("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                                  DAG_ID, run_id)
        tis = task_rows(stack, run_id)
        now = {t: f"{r['state'] or 'none'}@{r['hostname'] or '-'}" for t, r in sorted(tis.items())}
        if (state, now) != last:
            print(f"[{time.monotonic() - started:5.0f}s] run {state}: {now}", flush=True)
            last = (state, now)
        if state in TERMINAL:
            break
        if time.monotonic() > deadline or any(not s.alive() for s in stack.services):
            dead = [s.name for s in stack.services if not s.alive()]
            pytest.fail(f"run {run_id} still {state} after {time.monotonic() - started:.0f}s "
                        f"(exited: {dead or 'none'}): {now}\n{stack.diagnostics()}")
        time.sleep(2)
    stack.timings["run"] = time.monotonic() - started
    return run_id, state, tis


def test_slice_runs_to_success_on_the_right_workers(stack: CeleryStack, finished_run) -> None:
    run_id, state, tis = finished_run
    expected = {task_id(p): ("skipped" if p == "0B" else "success") for p in SLICE}
    states = {t: r["state"] for t, r in tis.items()}
    assert (state, states) == ("success", expected), stack.diagnostics()
    for phase in SLICE:
        ti = tis[task_id(phase)]
        if phase == "1A":  # ForgeGPUJobOperator: the gpu queue and pool, picked up by the gpu worker only
            assert (ti["queue"], ti["pool"], ti["hostname"]) == ("gpu", "gpu", GPU_WORKER), ti
        else:
            assert (ti["queue"], ti["pool"], ti["hostname"]) == ("default", "default_pool", CPU_WORKER), ti
        assert ti["try_number"] == 1, ti
    # each worker's Celery log shows it received work, through this run's broker keys on the loopback Redis
    for name in (CPU_WORKER, GPU_WORKER):
        assert "execute_workload" in stack.service(name).log.read_text(errors="replace"), name
    assert redis_keys(stack.redis_prefix), f"no broker keys under {stack.redis_prefix!r}"


def test_forge_outputs_are_in_the_artifact_store(stack: CeleryStack, finished_run,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from forge.config import load_config
    from forge.runner import make_store

    run_id, _, _ = finished_run
    monkeypatch.setenv("FORGE_HOME", str(stack.home))  # the store root expands {forge_home}
    store = make_store(load_config(profile="demo", overrides=TINY_OVERRIDES))
    assert store.root.startswith(f"file://{stack.home.resolve()}/"), store.root
    for phase in SLICE:
        m = store.run_manifest(run_id, phase)
        assert m is not None, f"no manifest for {phase} under runs/{run_id}"
        assert m.run_id == run_id, (phase, m.run_id)  # computed by this run, not a cache of another
        if phase == "0B":
            assert m.status == "skipped" and m.skip_reason, m
        else:
            assert m.status == "complete" and m.files, (phase, m.status)
            assert store.verify(m, deep=True), phase
    # 1A's output is the trained adapter/checkpoint the GPU worker wrote, readable by everyone on the store
    files_1a = store.run_manifest(run_id, "1A").files
    assert any(rel.endswith((".safetensors", ".pt", ".bin")) for rel in files_1a), sorted(files_1a)


