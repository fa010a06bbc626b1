"""forge_router_retraining (13A) through `dag.test()`, two weeks of synthetic serving feedback.

A champion router that never saw reasoning queries (tests/routing_fixtures.py) is registered; week 1's
feedback tells the truth (reasoning queries belong to the reasoning modifier), week 2's lies (every rating
flipped). Week 1 must promote its challenger, week 2 must keep the champion, both saying why; bad feedback
rows are counted and skipped; re-running week 1 registers nothing new (idempotent per interval).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_env import REPO, configure

configure()

pytestmark = pytest.mark.e2e

WEEK1 = datetime(2026, 11, 15, tzinfo=UTC)  # a Sunday: the weekly interval [WEEK1, WEEK1 + 7d)
WEEK2 = WEEK1 + timedelta(days=7)
GROUP = "phase13_router_retraining"
# small and fast: the retrain step's epochs, and few enough feedback rows to need
OVERRIDES = {"routing": {"retraining": {"epochs": 25, "min_feedback_rows": 10, "max_heldout_drop": 0.02}}}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("retrain_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(home))
        mp.chdir(home)
        from airflow.utils import db

        from forge.config import load_config
        from forge.runner import make_store
        from tests.routing_fixtures import build_champion, week_feedback, write_feedback

        db.initdb()
        cfg = load_config(profile="demo", overrides=copy.deepcopy(OVERRIDES))
        store = make_store(cfg)
        champion = build_champion(cfg, store, home / "scratch")
        root = store.uri("feedback")
        write_feedback(store, root, week_feedback(champion["records"], WEEK1, 90, "truthful", seed=1), "w1")
        write_feedback(store, root, week_feedback(champion["records"], WEEK2, 200, "inverted", seed=2), "w2")
        yield {"home": home, "cfg": cfg, "store": store, "champion": champion}


def retraining_dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["forge_router_retraining"]


def run_week(start: datetime) -> Any:
    """The run for the week [start, start + 7d): a manual run reads the last complete week before its
    logical date (the DAG's data-interval timetable)."""
    run = retraining_dag().test(logical_date=start + timedelta(days=7),
                                run_conf={"profile": "demo", "overrides": copy.deepcopy(OVERRIDES)})
    assert (run.data_interval_start, run.data_interval_end) == (start, start + timedelta(days=7))
    return run


def states(dag_run: Any) -> dict[str, str]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        dr = session.query(DagRun).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).one()
        return {ti.task_id.split(".")[-1]: str(ti.state) for ti in dr.get_task_instances(session=session)}


def client(cfg: Any) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)


def versions(cfg: Any) -> list[str]:
    return sorted((str(v.version) for v in client(cfg).search_model_versions(
        f"name='{cfg.routing.router.registered_model}'")), key=int)


def champion_version(cfg: Any) -> str:
    name = cfg.routing.router.registered_model
    return str(client(cfg).get_model_version_by_alias(name, "champion").version)


@pytest.fixture(scope="module")
def weeks(env: dict[str, Any]) -> dict[str, Any]:
    """Week 1, week 2, then week 1 again; states read right away (dag.test replaces a logical date's run)."""
    cfg = env["cfg"]
    out: dict[str, Any] = {"v0": champion_version(cfg)}
    for name, start in (("1", WEEK1), ("2", WEEK2), ("1_again", WEEK1)):
        run = run_week(start)
        out[f"run{name}"], out[f"states{name}"] = run, states(run)
        out[f"v{name}"], out[f"versions{name}"] = champion_version(cfg), versions(cfg)
    return out


def decision(env: dict[str, Any], dag_run: Any) -> dict[str, Any]:
    store = env["store"]
    m = store.run_manifest(dag_run.run_id, "13A.promote")
    return json.loads((store.materialize(m) / "decision.json").read_text())


def test_week_one_truthful_feedback_promotes_the_challenger(env: dict[str, Any],
                                                            weeks: dict[str, Any]) -> None:
    assert weeks["states1"] == {"13a_collect_feedback": "success", "13a_retrain_router": "success",
                                     "13a_evaluate_and_promote": "success"}
    d = decision(env, weeks["run1"])
    assert d["promote"] is True, d["reason"]
    assert d["interval"] == [WEEK1.isoformat(), (WEEK1 + timedelta(days=7)).isoformat()]
    champ, chall = d["scores"]["champion"], d["scores"]["challenger"]
    assert chall["heldout_acc"] > champ["heldout_acc"] and chall["combined"] > champ["combined"]
    assert weeks["v1"] != weeks["v0"] and weeks["v1"] == max(weeks["versions1"], key=int)
    tags = client(env["cfg"]).get_model_version(env["cfg"].routing.router.registered_model, weeks["v1"]).tags
    assert tags["forge.router.baseline_version"] == weeks["v0"]
    assert "combined score" in tags["forge.router.promotion"]


def test_week_two_lying_feedback_keeps_the_champion(env: dict[str, Any], weeks: dict[str, Any]) -> None:
    assert set(weeks["states2"].values()) == {"success"}
    d = decision(env, weeks["run2"])
    assert d["promote"] is False
    assert d["champion_version"] == weeks["v1"]  # week 2 started from week 1's champion
    assert weeks["v2"] == weeks["v1"]  # the alias did not move
    assert len(weeks["versions2"]) == len(weeks["versions1"]) + 1  # the challenger is registered all the same
    assert "held-out routing accuracy would drop" in d["reason"] or "not above min_improvement" in d["reason"]
    from forge.ledger import read_rows

    rows = {r["phase"]: r for r in read_rows(env["store"], weeks["run2"].run_id)}
    assert "kept" in rows["13A.promote"]["notes"] and d["reason"][:40] in rows["13A.promote"]["notes"]


def test_bad_feedback_rows_are_counted_and_skipped(env: dict[str, Any], weeks: dict[str, Any]) -> None:
    store = env["store"]
    m = store.run_manifest(weeks["run1"].run_id, "13A.collect")
    report = json.loads((store.materialize(m) / "feedback_report.json").read_text())
    assert report["bad_by_reason"] == {"missing_field": 1, "not_json": 1, "unknown_kind": 1,
                                       "unknown_session": 1, "wrong_type": 1}
    assert all(e["where"].startswith("dt=") for e in report["bad_examples"])
    assert report["examples"]["train"] > 0 and report["examples"]["eval"] > 0


def test_rerunning_a_week_is_idempotent(env: dict[str, Any], weeks: dict[str, Any]) -> None:
    assert set(weeks["states1_again"].values()) == {"success"}
    assert weeks["versions1_again"] == weeks["versions2"]  # nothing registered again
    assert weeks["v1_again"] == weeks["v2"]  # the champion did not move back to week 1's challenger
    from forge.ledger import read_rows

    rows = {r["phase"]: r for r in read_rows(env["store"], weeks["run1_again"].run_id)}
    assert rows["13A.retrain"]["cached"] and rows["13A.promote"]["cached"]
    assert rows["13A.collect"]["notes"].startswith("same content as")


def test_a_week_without_enough_feedback_skips_saying_why(env: dict[str, Any]) -> None:
    run = run_week(WEEK2 + timedelta(days=7))
    assert states(run) == {"13a_collect_feedback": "skipped", "13a_retrain_router": "skipped",
                           "13a_evaluate_and_promote": "skipped"}
    from forge.ledger import read_rows

    rows = {r["phase"]: r for r in read_rows(env["store"], run.run_id)}
    assert "labelled feedback examples" in rows["13A.collect"]["notes"]
    assert "stays champion" in rows["13A.collect"]["notes"]


def test_policy_of_the_champion_loads_for_serving(env: dict[str, Any], weeks: dict[str, Any],
                                                  tmp_path: Path) -> None:
    from forge.config import load_config
    from forge.routing.runtime import RoutingRuntime

    cfg = load_config(profile="demo", overrides={"routing": {"sessions": {"url": f"sqlite:///{tmp_path}/s.db"}}})
    runtime = RoutingRuntime.from_registry(cfg)
    try:
        reasoning = next(r for r in env["champion"]["records"]
                         if r["domain"] == "reasoning" and r["split"] == "test")
        d = runtime.route("sess-1", reasoning["query"])
        assert d.option in ("base", "code", "reasoning") and 0 <= d.confidence <= 1
        assert runtime.sessions.get("sess-1")["decisions"][0]["option"] == d.option
    finally:
        runtime.close()
