"""The DAG folder parses cleanly, fast, without ML libraries, into the registry's tasks.

Two pipeline DAGs, one builder (operators/pipeline_dag.py): forge_pipeline (manual) and
forge_pipeline_scheduled (weekly, for backfills) have the same tasks; only the schedule differs.
forge_router_retraining (13A, weekly) is built from the registry's RETRAINING_PHASES.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.airflow_env import REPO, configure

configure()

from airflow.dag_processing.dagbag import DagBag  # noqa: E402

from forge.phases import RETRAINING_PHASES, pipeline_phases, wait_task_id  # noqa: E402

PHASES = pipeline_phases()  # the fixed phases + A-H per domain of config/pipeline.yaml

DAG_IDS = ("forge_pipeline", "forge_pipeline_scheduled")
RETRAINING_DAG = "forge_router_retraining"
HEAVY = ("torch", "transformers", "peft", "mlflow", "sklearn", "bitsandbytes", "sentence_transformers")
PLAN_ID = re.compile(r"^\d+[A-Z](\.[A-H])?$")


def _dagbag() -> DagBag:
    return DagBag(dag_folder=str(REPO / "dags"))


def test_dag_folder_has_no_import_errors() -> None:
    bag = _dagbag()
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {*DAG_IDS, RETRAINING_DAG}


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_tasks_groups_and_dependencies_follow_the_registry(dag_id: str) -> None:
    dag = _dagbag().dags[dag_id]
    # 9B.gate waits for people: a deferrable sensor sits between it and 9B.prepare
    waits = {p.id: f"{p.group}.{wait_task_id(p)}" for p in PHASES if p.waits_for_ratings}
    assert set(waits) == {"9B.gate"}
    expected = {f"{p.group}.{p.task_id}" for p in PHASES} | set(waits.values())
    assert set(dag.task_ids) == expected
    assert "phase1_base.1a_base_qlora" in expected
    for p in PHASES:
        task = dag.get_task(f"{p.group}.{p.task_id}")
        if PLAN_ID.match(p.id):  # plan phases carry their id: "1A" -> "1a_..."
            assert f"{p.id.lower().replace('.', '_')}_" in task.task_id
        by_id = {q.id: f"{q.group}.{q.task_id}" for q in PHASES}
        assert task.upstream_task_ids == ({waits[p.id]} if p.id in waits else {by_id[i] for i in p.inputs})
        assert task.trigger_rule == "none_failed"
        assert task.retries == 0
        if p.gpu:
            assert (task.pool, task.queue, task.pool_slots) == ("gpu", "gpu", 1)
        else:
            assert task.pool != "gpu"
    assert {"profile", "base_model", "domains", "modifiers", "datasets", "overrides"} <= set(dag.params)
    # one TaskGroup per configured domain, MVP and post-MVP alike (post-MVP ones skip unless enabled)
    groups = {p.group for p in PHASES if p.domain}
    assert {"phase3_code_modifier", "phase4_reasoning_modifier", "phase5_automation_modifier",
            "phase14a_math_modifier", "phase14e_creative_modifier"} <= groups
    assert dag.params.get_param("modifiers").schema["items"]["enum"] == [
        "code", "reasoning", "automation", "math", "hard_math", "science", "finance", "creative"]
    assert dag.params.get_param("profile").schema["enum"] == ["demo", "production"]
    assert dag.catchup is False and dag.max_active_runs == 1
    sensor = dag.get_task(waits["9B.gate"])
    assert sensor.upstream_task_ids == {"phase9_validation.9b_prepare_human_eval"}


def test_manual_dag_is_triggered_only() -> None:
    dag = _dagbag().dags["forge_pipeline"]
    assert dag.schedule is None  # triggered by people (the form) or the REST API


def test_scheduled_dag_is_weekly_paused_and_backfillable() -> None:
    from datetime import UTC, datetime

    dag = _dagbag().dags["forge_pipeline_scheduled"]
    assert dag.schedule == "@weekly"
    assert dag.timetable.expression == "0 0 * * 0"  # a time schedule: `airflow backfill create` needs one
    assert dag.start_date == datetime(2026, 1, 4, tzinfo=UTC)
    assert dag.is_paused_upon_creation is True  # despite DAGS_ARE_PAUSED_AT_CREATION=False here
    assert "airflow backfill create" in dag.doc_md and "--reprocess-behavior failed" in dag.doc_md


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_serializes_with_its_params_and_links(dag_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    # As the API server deserializes (it resolves links through plugins). The flag is class-wide and an
    # earlier dag.test() in this process may have left it at the scheduler's False.
    monkeypatch.setattr(DagSerialization, "_load_operator_extra_links", True)
    dag = _dagbag().dags[dag_id]
    data = DagSerialization.to_dict(dag)
    restored = DagSerialization.from_dict(data)
    task = restored.get_task("phase1_base.1a_base_qlora")
    assert "MLflow run" in task.extra_links


def test_retraining_dag_is_weekly_backfillable_and_skips_downstream_of_a_skip() -> None:
    from datetime import UTC, datetime

    dag = _dagbag().dags[RETRAINING_DAG]
    # weekly with data intervals: the run of the week starting Sunday 11-15 reads [11-15, 11-22)
    interval = dag.timetable.infer_manual_data_interval(run_after=datetime(2026, 11, 25, tzinfo=UTC))
    assert (interval.start, interval.end) == (datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 11, 22,
                                                                                            tzinfo=UTC))
    assert dag.catchup is False and dag.max_active_runs == 1  # weeks in order, each on the last's champion
    by_id = {p.id: f"{p.group}.{p.task_id}" for p in RETRAINING_PHASES}
    assert set(dag.task_ids) == set(by_id.values())
    for p in RETRAINING_PHASES:
        task = dag.get_task(by_id[p.id])
        assert task.upstream_task_ids == {by_id[i] for i in p.inputs}
        assert task.trigger_rule == "all_success"  # no champion / no feedback: the rest skips too
        # a backfill ignores max_active_runs: the week's first step waits for the last week's decision
        assert (task.depends_on_past, task.wait_for_downstream) == ((not p.inputs,) * 2)
    assert set(dag.params) == {"profile", "overrides"}
    assert "airflow backfill create --dag-id forge_router_retraining" in dag.doc_md
    assert "--reprocess-behavior failed" in dag.doc_md  # Airflow refuses the backfill without one


def test_retraining_tasks_read_their_run_data_interval() -> None:
    from datetime import UTC, datetime, timedelta

    from operators.router_retraining import interval_of

    start = datetime(2026, 11, 15, tzinfo=UTC)
    scheduled = {"data_interval_start": start, "data_interval_end": start + timedelta(days=7)}
    assert interval_of(scheduled) == (start, start + timedelta(days=7))
    # a run with an empty interval (a trigger timetable) reads the week before its logical date
    assert interval_of({"data_interval_start": start, "data_interval_end": start, "logical_date": start}) == (
        start - timedelta(days=7), start)
    task = _dagbag().dags[RETRAINING_DAG].get_task("phase13_router_retraining.13a_collect_feedback")
    assert task.context_overrides(scheduled) == {"routing": {"retraining": {
        "interval_start": "2026-11-15T00:00:00+00:00", "interval_end": "2026-11-22T00:00:00+00:00"}}}


@pytest.mark.parametrize("dag_id", [*DAG_IDS, RETRAINING_DAG])
def test_dag_file_parses_fast_and_imports_no_ml_library(dag_id: str, tmp_path) -> None:
    # a fresh interpreter, like the DAG processor: airflow loaded first, then the file timed
    # alone; run from elsewhere so the file must find `forge`/`operators` by itself
    probe = f"""
import json, sys, time, importlib.util
import airflow.sdk
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("forge_pipeline_probe", {str(REPO / "dags" / f"{dag_id}.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
seconds = time.perf_counter() - t
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({list(HEAVY)!r}))
dag = module.dag
print(json.dumps({{"seconds": seconds, "heavy": heavy, "tasks": len(dag.tasks), "dag_id": dag.dag_id}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heavy"] == []
    n_tasks = len(RETRAINING_PHASES) if dag_id == RETRAINING_DAG else len(PHASES) + 1  # + 9B's sensor
    assert result["tasks"] == n_tasks and result["dag_id"] == dag_id
    assert result["seconds"] < 2.0, result
