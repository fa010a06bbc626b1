"""Recovery drill on the live stack: a compression step fails, is cleared / backfilled, and only it and
what depends on it run again; the artifacts end up identical to those of an uninterrupted run.

One stack (scripts/stack.sh, temp FORGE_HOME, free ports) serves every scenario, in order:
  (a) forge_pipeline with faults {PHASE: once} fails at PHASE; downstream upstream_failed, upstream success
  (b) clearing PHASE (+ downstream) through the REST API recovers the run; upstream untouched
  (c) an uninterrupted run that recomputes PHASE and its downstream (cache.force) gives the same sha256,
      phase by phase; what it reuses from upstream is what the recovered run reused
  (d) `airflow backfill create` of forge_pipeline_scheduled with the fault fails; `--reprocess-behavior
      failed` on the same date reprocesses that run to success, every task a cache hit
  (e) store level, no stack: a job SIGKILLed while committing leaves no manifest; nothing reads its
      half-written files and the retry replaces them
  (f) `airflow backfill create` of forge_router_retraining over two past weeks of feedback: one run per
      week, each reading its own week, the second starting once the first has decided (the backfill
      itself would run both at once); the first promotes, the second (lying feedback) does not
Each scenario prints its wall time (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from forge.artifacts import Manifest
from forge.config import PipelineConfig, deep_merge, load_config
from forge.modifiers.local_teachers import free_port
from forge.phases import Phase, get_phase, pipeline_phases, wait_task_id
from tests.celery_env import PG_HOST, PG_PORT, PG_USER, create_database, drop_database, require_services
from tests.conftest import REPO, TINY_OVERRIDES, write_config_with_domains

pytestmark = pytest.mark.services

PHASE = "2C"  # the compression step the drill breaks
MANUAL_DAG = "forge_pipeline"
SCHEDULED_DAG = "forge_pipeline_scheduled"
RUN_TIMEOUT_S = 900.0
POLL_S = 1.0
TERMINAL = {"success", "failed"}


# ---- the phase graph -----------------------------------------------------------------------------
def task_id(phase_id: str) -> str:
    p = get_phase(phase_id)
    return f"{p.group}.{p.task_id}"


def ancestors(phase_id: str) -> set[str]:
    out: set[str] = set()
    todo = list(get_phase(phase_id).inputs)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(get_phase(p).inputs)
    return out


def descendants(phase_id: str) -> set[str]:
    return {p.id for p in pipeline_phases() if phase_id in ancestors(p.id)}


def recomputed() -> list[str]:
    """What clearing PHASE runs again: the phases (c) computes afresh instead of taking from the cache."""
    return sorted({PHASE} | descendants(PHASE))


def skipped_by_default(cfg: PipelineConfig) -> set[str]:
    return {p.id for p in pipeline_phases() if p.skip and p.skip(cfg)}


# ---- the stack -----------------------------------------------------------------------------------
@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    airflow_url: str
    mlflow_url: str
    cfg: PipelineConfig  # the drill's config as the test reads it (store, tracking)
    client: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    def airflow_cli(self, *args: str) -> subprocess.CompletedProcess:
        """The airflow CLI against this stack (its env.sh), as an operator would type it."""
        cmd = 'source "$FORGE_HOME/env.sh" && airflow "$@"'
        return subprocess.run(["bash", "-c", cmd, "airflow", *args], env=self.env, capture_output=True,
                              text=True, timeout=300)

    def store(self):
        from forge.runner import make_store

        return make_store(self.cfg)


def stack_env(home: Path, airflow_port: int, mlflow_port: int, config: Path,
              airflow_db: str) -> dict[str, str]:
    # nothing of a developer's Airflow/Forge settings (or of other test modules) leaks into the stack
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "FORGE_", "MLFLOW_")) and k != "PYTHONPATH"}
    env.update(FORGE_HOME=str(home), FORGE_AIRFLOW_PORT=str(airflow_port), FORGE_MLFLOW_PORT=str(mlflow_port),
               FORGE_ADMIN_PASSWORD="admin", FORGE_CONFIG=str(config), FORGE_AIRFLOW_DB=airflow_db,
               # one BLAS thread per task: parallel tasks share 2 cores, and every run computes
               # with the same thread count (reductions split by thread count round differently)
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from scripts.airflow_client import AirflowClient

    home = tmp_path_factory.mktemp("drill_home")
    airflow_port, mlflow_port = free_port(), free_port()
    # the drill is about compression: no modifier domains in the catalog (tests/e2e runs them), so no
    # TaskGroups of tasks that would only skip
    config = write_config_with_domains(home / "pipeline.yaml", ())
    # the metadata DB on PostgreSQL, as deployed: on SQLite `airflow backfill create` beside a busy scheduler
    # can fail with "database is locked" (an upgraded read transaction does not wait for the lock)
    require_services()
    db = create_database("forge_drill")
    env = stack_env(home, airflow_port, mlflow_port, config,
                    f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}")
    script = str(REPO / "scripts" / "stack.sh")
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(home))  # the test reads the same store as the tasks
        mp.setenv("FORGE_CONFIG", str(config))  # ... and the same phase graph
        try:
            up = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=420)
            if up.returncode != 0:
                pytest.fail(f"the stack did not start:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
            s = Stack(home, env, f"http://127.0.0.1:{airflow_port}", f"http://127.0.0.1:{mlflow_port}",
                      load_config(profile="demo", overrides=deep_merge(TINY_OVERRIDES, DRILL_SCOPE)))
            s.client = AirflowClient(s.airflow_url, password="admin")
            for dag_id in (MANUAL_DAG, SCHEDULED_DAG):
                s.client.wait_for_dag(dag_id, timeout_s=180, poll_s=POLL_S)
            s.timings["stack start"] = time.monotonic() - started
            yield s
        finally:
            subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=180)
            drop_database(db)
    print("\nrecovery drill wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s.timings.items()))


# ---- runs ----------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    dag_id: str
    run_id: str
    state: str
    tis: dict[str, dict[str, Any]]  # task id -> the REST task instance
    manifests: dict[str, Manifest]  # phase id -> this run's manifest (complete or skipped)

    def state_of(self, phase_id: str) -> str | None:
        return self.tis[task_id(phase_id)].get("state")


# the drill is about compression: 1C and the modifiers (tested end to end elsewhere) skip, saying why
DRILL_SCOPE = {"distill": {"enabled": False}, "modifiers": {"enabled": []}}


def drill_conf(**extra: Any) -> dict[str, Any]:
    return {"profile": "demo", "overrides": deep_merge(deep_merge(TINY_OVERRIDES, DRILL_SCOPE), extra)}


def wait_for_run(stack: Stack, dag_id: str, run_id: str, restarted: bool = False) -> RunRecord:
    """Poll until the run ends. restarted: it was just cleared, so first wait for it to leave its old end."""
    client = stack.client
    deadline = time.monotonic() + RUN_TIMEOUT_S
    leave_by = time.monotonic() + 60
    while True:
        run = client.dag_run(dag_id, run_id)
        if restarted and run["state"] in TERMINAL and time.monotonic() < leave_by:
            time.sleep(POLL_S / 2)
            continue
        restarted = False
        if run["state"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            states = {t["task_id"]: t["state"] for t in client.task_instances(dag_id, run_id)}
            raise TimeoutError(f"{dag_id} run {run_id} still {run['state']} after {RUN_TIMEOUT_S:.0f}s: "
                               f"{states}")
        time.sleep(POLL_S)
    tis = {t["task_id"]: t for t in client.task_instances(dag_id, run_id)}
    store = stack.store()
    manifests = {p.id: m for p in pipeline_phases() if (m := store.run_manifest(run_id, p.id)) is not None}
    return RunRecord(dag_id, run_id, run["state"], tis, manifests)


def failure_logs(stack: Stack, rec: RunRecord) -> str:
    """The log tails of the run's failed tasks, for assertion messages."""
    parts = []
    for tid, ti in rec.tis.items():
        if ti.get("state") == "failed":
            try:
                log = stack.client.task_log(rec.dag_id, rec.run_id, tid, int(ti.get("try_number") or 1))
            except Exception as exc:  # the message must still say which task failed
                log = f"(no log: {exc})"
            parts.append(f"--- {tid} (try {ti.get('try_number')}):\n" + "\n".join(log.splitlines()[-30:]))
    return "\n".join(parts)


def file_digests(m: Manifest) -> dict[str, str]:
    return {rel: f.sha256 for rel, f in m.files.items()}


def ledger(stack: Stack, run_id: str) -> dict[str, dict[str, Any]]:
    from forge.ledger import read_rows

    return {r["phase"]: r for r in read_rows(stack.store(), run_id)}


def mlflow_phase_statuses(stack: Stack, run_id: str) -> dict[str, list[str]]:
    """phase id -> forge.status of each nested MLflow run of this DAG run (one per attempt, oldest first)."""
    from scripts.airflow_client import MlflowClientREST

    mlflow = MlflowClientREST(stack.mlflow_url)
    exp_id = mlflow.experiment_id(stack.cfg.tracking.experiment)
    assert exp_id is not None, f"no MLflow experiment {stack.cfg.tracking.experiment!r}"
    of_run = f"tags.`forge.run_id` = '{run_id}' and tags.`forge.kind` = 'phase'"
    runs = sorted(mlflow.search_runs(exp_id, of_run), key=lambda r: int(r["info"]["start_time"]))
    out: dict[str, list[str]] = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        out.setdefault(tags["forge.phase"], []).append(tags.get("forge.status", "?"))
    return out


def expected_first_attempt(cfg: PipelineConfig) -> dict[str, str]:
    """Task states of a run whose PHASE failed: downstream blocked, everything else done."""
    skipped = skipped_by_default(cfg)
    out = {}
    for p in pipeline_phases():
        if p.id == PHASE:
            out[task_id(p.id)] = "failed"
        elif p.id in descendants(PHASE):
            out[task_id(p.id)] = "upstream_failed"
        else:
            out[task_id(p.id)] = "skipped" if p.id in skipped else "success"
    # 9B's wait for ratings (a sensor, not a phase): blocked with its phase, else skipped with the study
    out.update({wait_id(p): "upstream_failed" if p.id in descendants(PHASE) else "skipped" for p in waits()})
    return out


def expected_success(cfg: PipelineConfig) -> dict[str, str]:
    skipped = skipped_by_default(cfg)
    out = {task_id(p.id): "skipped" if p.id in skipped else "success" for p in pipeline_phases()}
    return out | {wait_id(p): "skipped" for p in waits()}


def waits() -> list[Phase]:
    return [p for p in pipeline_phases() if p.waits_for_ratings]


def wait_id(phase: Phase) -> str:
    return f"{phase.group}.{wait_task_id(phase)}"


# ---- (a) a fault fails the run at PHASE ---------------------------------------------------------
@pytest.fixture(scope="module")
def failed_run(stack: Stack) -> RunRecord:
    started = time.monotonic()
    stack.client.set_paused(MANUAL_DAG, False)
    run_id = stack.client.trigger(MANUAL_DAG, drill_conf(faults={PHASE: "once"}))["dag_run_id"]
    rec = wait_for_run(stack, MANUAL_DAG, run_id)
    stack.timings["(a) faulted run"] = time.monotonic() - started
    return rec


def test_a_fault_fails_the_phase_and_blocks_only_its_downstream(stack: Stack, failed_run: RunRecord) -> None:
    rec = failed_run
    states = {tid: ti.get("state") for tid, ti in rec.tis.items()}
    assert states == expected_first_attempt(stack.cfg), failure_logs(stack, rec)
    assert rec.state == "failed"
    log = stack.client.task_log(MANUAL_DAG, rec.run_id, task_id(PHASE), 1)
    assert f"faults.{PHASE}=once" in log
    # the failed attempt committed nothing: no manifest, no ledger row
    assert PHASE not in rec.manifests
    assert PHASE not in ledger(stack, rec.run_id)
    assert not set(rec.manifests) & descendants(PHASE)
    assert all(rec.manifests[p].status in ("complete", "skipped") for p in ancestors(PHASE))


# ---- (b) clear PHASE and its downstream -> the run recovers -------------------------------------
@dataclass
class Recovery:
    before: RunRecord
    after: RunRecord
    cleared: set[str]


@pytest.fixture(scope="module")
def recovered_run(stack: Stack, failed_run: RunRecord) -> Recovery:
    started = time.monotonic()
    before = failed_run
    cleared = stack.client.clear_tasks(MANUAL_DAG, before.run_id, [task_id(PHASE)], downstream=True)
    after = wait_for_run(stack, MANUAL_DAG, before.run_id, restarted=True)
    stack.timings["(b) clear + rerun"] = time.monotonic() - started
    return Recovery(before, after, {ti["task_id"] for ti in cleared})


def test_b_clearing_reruns_the_phase_and_its_downstream_only(stack: Stack, recovered_run: Recovery) -> None:
    before, after = recovered_run.before, recovered_run.after
    rerun = set(recomputed())
    sensors = {wait_id(p) for p in waits() if p.id in rerun}  # downstream too: cleared with their phases
    assert recovered_run.cleared == {task_id(p) for p in rerun} | sensors
    assert {tid: ti.get("state") for tid, ti in after.tis.items()} == expected_success(stack.cfg), \
        failure_logs(stack, after)
    assert after.state == "success"
    assert after.tis[task_id(PHASE)]["try_number"] == 2
    for p in pipeline_phases():
        if p.id in rerun:
            continue
        tid = task_id(p.id)
        # not run again: same attempt, same start
        assert after.tis[tid]["try_number"] == 1, tid
        assert after.tis[tid]["start_date"] == before.tis[tid]["start_date"], tid
        # outputs untouched: the same manifest, files still matching their sha256
        assert after.manifests[p.id] == before.manifests[p.id], p.id
        assert stack.store().verify(after.manifests[p.id], deep=True), p.id
    rows = ledger(stack, after.run_id)
    for p in rerun - skipped_by_default(stack.cfg):  # computed by this run's second attempt (none cached)
        assert after.manifests[p].run_id == after.run_id, p
        assert rows[p]["cached"] is False, p


# ---- (c) an uninterrupted run recomputing what the recovery recomputed: identical artifacts -------
@pytest.fixture(scope="module")
def fresh_run(stack: Stack, recovered_run: Recovery) -> RunRecord:
    started = time.monotonic()
    # cache.force is in no cache key: the keys match the recovered run's, yet those phases compute
    run_id = stack.client.trigger(MANUAL_DAG, drill_conf(cache={"force": recomputed()}))["dag_run_id"]
    rec = wait_for_run(stack, MANUAL_DAG, run_id)
    stack.timings["(c) uninterrupted run, PHASE and downstream recomputed"] = time.monotonic() - started
    return rec


def test_c_uninterrupted_run_recomputes_to_identical_artifacts(stack: Stack, recovered_run: Recovery,
                                                               fresh_run: RunRecord) -> None:
    recovered, fresh = recovered_run.after, fresh_run
    assert fresh.state == "success", failure_logs(stack, fresh)
    skipped = skipped_by_default(stack.cfg)
    rows = ledger(stack, fresh.run_id)
    rerun = set(recomputed())
    differing = {}
    for p in pipeline_phases():
        a, b = recovered.manifests[p.id], fresh.manifests[p.id]
        assert a.cache_key == b.cache_key, p.id
        if p.id in skipped:
            assert a.status == b.status == "skipped"
            continue
        if p.id not in rerun:  # upstream of PHASE: the very outputs the recovered run kept
            assert rows[p.id]["cached"] is True and b == a, f"{p.id} was not reused"
            continue
        assert b.run_id == fresh.run_id and rows[p.id]["cached"] is False, f"{p.id} was not recomputed"
        da, db = file_digests(a), file_digests(b)
        if da != db:
            differing[p.id] = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
    assert not differing, f"outputs of the recovered and the uninterrupted run differ: {differing}"


# ---- (d) backfill of the scheduled variant, then --reprocess-behavior failed --------------------
@dataclass
class Backfill:
    logical_date: str
    failed: RunRecord
    reprocessed: RunRecord
    first_ledger: dict[str, dict[str, Any]]
    first_mlflow: dict[str, list[str]]
    run_types: list[str]  # of every run of the scheduled DAG at the end


def wait_backfills_done(stack: Stack) -> None:
    """Only one backfill per DAG may be active: the next waits until the scheduler completes this one."""
    deadline = time.monotonic() + 120
    while True:
        body = stack.client._json("GET", "/api/v2/backfills", params={"dag_id": SCHEDULED_DAG})
        if all(b["completed_at"] for b in body["backfills"]):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"backfills of {SCHEDULED_DAG} not completed: {body}")
        time.sleep(POLL_S)


def scheduled_runs(stack: Stack) -> list[dict[str, Any]]:
    return stack.client._json("GET", f"/api/v2/dags/{SCHEDULED_DAG}/dagRuns")["dag_runs"]


def backfill(stack: Stack, logical_date: str, *extra: str) -> None:
    out = stack.airflow_cli("backfill", "create", "--dag-id", SCHEDULED_DAG, "--from-date", logical_date,
                            "--to-date", logical_date, *extra)
    assert out.returncode == 0, f"airflow backfill create failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def backfilled(stack: Stack, fresh_run: RunRecord) -> Iterator[Backfill]:
    client = stack.client
    started = time.monotonic()
    dag = client.get_dag(SCHEDULED_DAG)
    assert dag["is_paused"] is True  # paused on creation
    # The date the scheduler would run next (catchup off: the latest weekly slot). Backfilling it
    # means unpausing the DAG (backfill runs start only then) schedules no extra run of its own.
    logical_date = dag["next_dagrun_logical_date"]
    backfill(stack, logical_date, "--dag-run-conf", json.dumps(drill_conf(faults={PHASE: "once"})))
    client.set_paused(SCHEDULED_DAG, False)
    try:
        runs = scheduled_runs(stack)
        assert [r["run_type"] for r in runs] == ["backfill"], runs
        run_id = runs[0]["dag_run_id"]
        failed = wait_for_run(stack, SCHEDULED_DAG, run_id)
        first_ledger, first_mlflow = ledger(stack, run_id), mlflow_phase_statuses(stack, run_id)
        stack.timings["(d) backfill, faulted"] = time.monotonic() - started
        wait_backfills_done(stack)
        started = time.monotonic()
        backfill(stack, logical_date, "--reprocess-behavior", "failed")
        reprocessed = wait_for_run(stack, SCHEDULED_DAG, run_id, restarted=True)
        stack.timings["(d) backfill --reprocess-behavior failed"] = time.monotonic() - started
        run_types = [r["run_type"] for r in scheduled_runs(stack)]
        yield Backfill(logical_date, failed, reprocessed, first_ledger, first_mlflow, run_types)
    finally:
        client.set_paused(SCHEDULED_DAG, True)


def test_d_backfill_reprocesses_the_failed_run_from_the_cache(stack: Stack, backfilled: Backfill,
                                                              fresh_run: RunRecord) -> None:
    failed, done = backfilled.failed, backfilled.reprocessed
    assert {tid: ti.get("state") for tid, ti in failed.tis.items()} == expected_first_attempt(stack.cfg), \
        failure_logs(stack, failed)
    upstream = ancestors(PHASE) - skipped_by_default(stack.cfg)
    # the faulted run already reused every upstream output: ledger and MLflow say cache hit
    for p in upstream:
        assert backfilled.first_ledger[p]["cached"] is True, p
        assert backfilled.first_mlflow[p] == ["cache_hit"], p
    assert backfilled.first_mlflow[PHASE] == ["failed"]

    # --reprocess-behavior failed cleared that run (same run id, same date) and it succeeded; unpausing
    # the DAG for the backfill scheduled no run of its own
    assert done.run_id == failed.run_id
    assert backfilled.run_types == ["backfill"]
    assert {tid: ti.get("state") for tid, ti in done.tis.items()} == expected_success(stack.cfg), \
        failure_logs(stack, done)
    assert done.state == "success"
    assert done.tis[task_id(PHASE)]["try_number"] == 2
    rows, statuses = ledger(stack, done.run_id), mlflow_phase_statuses(stack, done.run_id)
    for p in pipeline_phases():
        if p.id in skipped_by_default(stack.cfg):
            continue
        # nothing computed again: every task (PHASE too, done by (b)/(c)) reused its outputs
        assert rows[p.id]["cached"] is True, p.id
        assert statuses[p.id][-1:] == ["cache_hit"] and set(statuses[p.id]) <= {"cache_hit", "failed"}, p.id
        assert file_digests(done.manifests[p.id]) == file_digests(fresh_run.manifests[p.id]), p.id


# ---- (e) a job killed while committing ----------------------------------------------------------
KILLED_COMMIT = textwrap.dedent("""
    import shutil, sys, time
    import forge.phases
    from forge.config import load_config
    from forge.runner import run_phase
    from tests.fake_jobs import FAKE_PHASES

    forge.phases.BY_ID = {p.id: p for p in FAKE_PHASES}
    copy = shutil.copyfile

    def half_then_hang(src, dst, **kw):  # half of the first output file lands, then the job hangs
        data = open(src, "rb").read()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
        print("WROTE", dst, flush=True)
        time.sleep(600)

    cfg = load_config(profile="demo")
    run_phase("fa", cfg, "killed", track=False)
    shutil.copyfile = half_then_hang
    run_phase("fb", cfg, "killed", track=False)
""")


def test_e_a_job_killed_mid_commit_leaves_nothing_a_retry_reads(forge_home: Path, monkeypatch) -> None:
    import forge.phases
    from forge.artifacts import ArtifactError
    from forge.runner import make_store, run_phase
    from tests.fake_jobs import FAKE_PHASES, calls

    env = {**os.environ, "FORGE_HOME": str(forge_home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COMMIT], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("WROTE"):
            line = proc.stdout.readline()
        assert line.startswith("WROTE"), f"the job never wrote its output: {proc.stdout.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    monkeypatch.setattr(forge.phases, "BY_ID", {p.id: p for p in FAKE_PHASES})
    cfg = load_config(profile="demo")
    store = make_store(cfg)
    half = Path(line.split(maxsplit=1)[1].strip())
    assert half.is_file() and half.parent.name == "fb"  # the killed attempt's half-written output
    assert store.run_manifest("killed", "fb") is None  # ... but no manifest: not a result
    assert not list((forge_home / "artifacts" / "cache").glob("fb/*.json"))  # nor a cache entry
    # a reader that needs fb refuses the half-written directory
    fake_reader = forge.phases.Phase("fz", "fz_reader", "fake", "Reader", "tests.fake_jobs:consume",
                                     ("fb",), ())
    monkeypatch.setattr(forge.phases, "BY_ID", {**forge.phases.BY_ID, "fz": fake_reader})
    with pytest.raises(ArtifactError, match="no complete manifest"):
        run_phase("fz", cfg, "killed", track=False)

    # the retry computes again (no cache hit on the leftovers) and commits a clean, verified output
    half.write_text("garbage the retry must not keep")
    m = run_phase("fb", cfg, "killed", track=False)
    assert calls("consume") == 2
    assert store.verify(m, deep=True)
    assert half.read_text() == str(sum(range(cfg.data.seed % 50)))


# ---- (f) backfill of the weekly router retraining over two past weeks ---------------------------
RETRAINING_DAG = "forge_router_retraining"
# Sundays: @weekly's intervals [11-01, 11-08) and [11-08, 11-15). Not the latest weeks: with catchup off,
# the scheduler runs the latest complete week of an unpaused DAG on its own as soon as the stack is up.
RETRAIN_WEEK1 = "2026-11-01"
RETRAIN_WEEK2 = "2026-11-08"


@dataclass
class RetrainingBackfill:
    runs: list[dict[str, Any]]  # the backfill's dag runs, oldest first
    tis: dict[str, dict[str, str]]  # run id -> task id -> state
    spans: dict[str, dict[str, tuple[str, str]]]  # run id -> task id -> (start, end), ISO UTC
    decisions: dict[str, dict[str, Any]]  # run id -> decision.json
    champion_before: str
    champion_after: str


@pytest.fixture(scope="module")
def retraining_backfill(stack: Stack, backfilled: Backfill) -> RetrainingBackfill:
    """A champion registered in the stack's MLflow, truthful feedback in week 1 and lying feedback in week 2,
    then `airflow backfill create` over both weeks."""
    from datetime import UTC, datetime

    from mlflow.tracking import MlflowClient

    from tests.routing_fixtures import build_champion, week_feedback, write_feedback

    started = time.monotonic()
    cfg, store = stack.cfg, stack.store()
    champion = build_champion(cfg, store, stack.home / "scratch")
    w1, w2 = (datetime.fromisoformat(d).replace(tzinfo=UTC) for d in (RETRAIN_WEEK1, RETRAIN_WEEK2))
    for week, start, n, mode in (("w1", w1, 90, "truthful"), ("w2", w2, 200, "inverted")):
        events = week_feedback(champion["records"], start, n, mode, seed=int(week[1]))
        write_feedback(store, store.uri("feedback"), events, week)
    name = cfg.routing.router.registered_model
    registry = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    before = str(registry.get_model_version_by_alias(name, "champion").version)
    conf = {"profile": "demo", "overrides": {"routing": {"retraining": {"epochs": 25}}}}
    out = stack.airflow_cli("backfill", "create", "--dag-id", RETRAINING_DAG, "--from-date", RETRAIN_WEEK1,
                            "--to-date", RETRAIN_WEEK2, "--reprocess-behavior", "failed",
                            "--dag-run-conf", json.dumps(conf))
    assert out.returncode == 0, f"airflow backfill create failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    stack.client.set_paused(RETRAINING_DAG, False)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs = [r for r in stack.client._json("GET", f"/api/v2/dags/{RETRAINING_DAG}/dagRuns")["dag_runs"]
                if r["run_type"] == "backfill"]
        if len(runs) == 2 and all(r["state"] in TERMINAL for r in runs):
            break
        assert time.monotonic() < deadline, f"retraining backfill not done: {runs}"
        time.sleep(POLL_S)
    runs.sort(key=lambda r: r["logical_date"])
    listed = {r["dag_run_id"]: stack.client.task_instances(RETRAINING_DAG, r["dag_run_id"]) for r in runs}
    tis = {run: {t["task_id"].split(".")[-1]: t["state"] for t in ts} for run, ts in listed.items()}
    spans = {run: {t["task_id"].split(".")[-1]: (t["start_date"], t["end_date"]) for t in ts}
             for run, ts in listed.items()}
    decisions = {}
    for r in runs:
        m = store.run_manifest(r["dag_run_id"], "13A.promote")
        if m is not None and m.status == "complete":
            decisions[r["dag_run_id"]] = json.loads((store.materialize(m) / "decision.json").read_text())
    after = str(registry.get_model_version_by_alias(name, "champion").version)
    stack.timings["(f) retraining backfill, 2 weeks"] = time.monotonic() - started
    return RetrainingBackfill(runs, tis, spans, decisions, before, after)


def test_f_backfill_retrains_the_router_week_by_week(retraining_backfill: RetrainingBackfill) -> None:
    from datetime import datetime

    rb = retraining_backfill
    assert [r["state"] for r in rb.runs] == ["success", "success"], rb.tis
    week1, week2 = rb.runs
    # each run read its own week
    assert week1["data_interval_start"].startswith(RETRAIN_WEEK1)
    assert week2["data_interval_start"].startswith(RETRAIN_WEEK2)
    assert all(set(states.values()) == {"success"} for states in rb.tis.values()), rb.tis
    # the backfill may start both runs at once (its own max_active_runs): week 2 still waits for week 1
    s1, s2 = rb.spans[week1["dag_run_id"]], rb.spans[week2["dag_run_id"]]
    week1_decided = datetime.fromisoformat(s1["13a_evaluate_and_promote"][1])
    assert datetime.fromisoformat(s2["13a_collect_feedback"][0]) >= week1_decided, rb.spans
    d1, d2 = rb.decisions[week1["dag_run_id"]], rb.decisions[week2["dag_run_id"]]
    assert d1["promote"] is True and d1["champion_version"] == rb.champion_before
    assert d2["promote"] is False and d2["champion_version"] != rb.champion_before  # built on week 1's
    assert rb.champion_after == d2["champion_version"]
