"""The job contract: manifests committed last, cache hits, skips, faults, checkpoints, tracking."""

from __future__ import annotations

from pathlib import Path

import pytest

import forge.phases
from forge.artifacts import ArtifactError
from forge.config import load_config
from forge.ledger import read_rows
from forge.runner import InjectedFault, make_store, run_phase
from tests.fake_jobs import FAKE_PHASES, calls


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forge.phases, "BY_ID", {p.id: p for p in FAKE_PHASES})
    monkeypatch.setattr(forge.phases, "PHASES", FAKE_PHASES)
    monkeypatch.setattr(forge.phases, "_default_catalog", dict)  # no modifier TaskGroups


def cfg(**over):
    return load_config(profile="demo", overrides=over)


def test_commit_writes_verified_manifest_and_ledger(forge_home: Path) -> None:
    m = run_phase("fa", cfg(), "run-1", track=False)
    assert m.status == "complete"
    assert set(m.files) == {"numbers.json", "sub/note.txt"}
    store = make_store(cfg())
    local = store.materialize(m)
    assert (local / "sub" / "note.txt").read_text() == "hello"
    assert store.run_manifest("run-1", "fa").cache_key == m.cache_key
    rows = read_rows(store, "run-1")
    assert [r["phase"] for r in rows] == ["fa"] and rows[0]["cached"] is False
    assert "| fa | Produce | complete | no |" in (forge_home / "artifacts/runs/run-1/ledger.md").read_text()


def test_same_key_in_another_run_is_a_cache_hit(forge_home: Path) -> None:
    first = run_phase("fa", cfg(), "run-1", track=False)
    second = run_phase("fa", cfg(), "run-2", track=False)
    assert calls("produce") == 1
    assert second.base_uri == first.base_uri  # reuses run-1's files
    store = make_store(cfg())
    assert store.run_manifest("run-2", "fa").base_uri == first.base_uri
    assert read_rows(store, "run-2")[0]["cached"] is True


def test_changed_params_or_force_recompute(forge_home: Path) -> None:
    run_phase("fa", cfg(), "run-1", track=False)
    run_phase("fa", cfg(data={"seed": 7}), "run-2", track=False)
    assert calls("produce") == 2
    run_phase("fa", cfg(cache={"force": ["fa"]}), "run-3", track=False)
    assert calls("produce") == 3


def test_rerunning_downstream_reuses_upstream(forge_home: Path) -> None:
    run_phase("fa", cfg(), "r", track=False)
    run_phase("fb", cfg(), "r", track=False)
    run_phase("fb", cfg(cache={"force": ["fb"]}), "r", track=False)  # like clearing 1B
    assert calls("produce") == 1 and calls("consume") == 2


def test_missing_upstream_is_a_clear_error(forge_home: Path) -> None:
    with pytest.raises(ArtifactError, match="needs the output of fa.*run fa first"):
        run_phase("fb", cfg(), "r", track=False)


def test_failed_job_leaves_nothing_visible(forge_home: Path) -> None:
    run_phase("fa", cfg(), "r", track=False)
    with pytest.raises(RuntimeError, match="killed while writing"):
        run_phase("fx", cfg(), "r", track=False)
    store = make_store(cfg())
    assert store.run_manifest("r", "fx") is None
    assert not list((forge_home / "artifacts" / "cache").glob("fx/*"))
    # a leftover file from the killed attempt is removed before the retry commits
    leftover = forge_home / "artifacts/runs/r/fb/stale.bin"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"old")
    m = run_phase("fb", cfg(), "r", track=False)
    assert "stale.bin" not in m.files and not leftover.exists()


def test_corruption_is_detected(forge_home: Path) -> None:
    m = run_phase("fa", cfg(), "r", track=False)
    target = forge_home / "artifacts/runs/r/fa/numbers.json"
    data = bytearray(target.read_bytes())
    data[1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        make_store(cfg()).materialize(m)
    target.write_bytes(b"[]")  # size changed: no longer a valid cache entry
    run_phase("fa", cfg(), "r2", track=False)
    assert calls("produce") == 2


def test_skip_writes_a_skipped_manifest(forge_home: Path) -> None:
    run_phase("fa", cfg(), "r", track=False)
    m = run_phase("fs", cfg(), "r", track=False)
    assert m.status == "skipped" and m.skip_reason == "off by default"
    assert calls("produce") == 1
    store = make_store(cfg())
    assert store.run_manifest("r", "fs").status == "skipped"
    assert [r["status"] for r in read_rows(store, "r")] == ["complete", "skipped"]
    enabled = run_phase("fs", cfg(vocab={"trim_enabled": True}), "r", track=False)
    assert enabled.status == "complete"


def test_fault_once_fails_first_attempt_only(forge_home: Path) -> None:
    c = cfg(faults={"fa": "once"})
    with pytest.raises(InjectedFault, match="faults.fa=once"):
        run_phase("fa", c, "r", track=False)
    assert make_store(c).run_manifest("r", "fa") is None
    assert run_phase("fa", c, "r", track=False).status == "complete"
    # a cached phase fails its drill too (the fault comes before the cache lookup)
    with pytest.raises(InjectedFault):
        run_phase("fa", c, "r2", track=False)
    assert run_phase("fa", c, "r2", track=False).status == "complete"
    assert calls("produce") == 1


def test_checkpoints_latest_wins_and_are_cleared(forge_home: Path, tmp_path: Path) -> None:
    store = make_store(cfg())
    assert store.latest_checkpoint("fa", "k" * 64) is None
    for step in (10, 20):
        d = tmp_path / f"ck{step}"
        d.mkdir()
        (d / "state.txt").write_text(str(step))
        store.save_checkpoint("fa", "k" * 64, step, d)
    step, local = store.latest_checkpoint("fa", "k" * 64)
    assert step == 20 and (local / "state.txt").read_text() == "20"
    assert len(list((forge_home / "artifacts/work/fa").glob("*/step-*"))) == 1  # old one pruned
    store.clear_checkpoints("fa", "k" * 64)
    assert store.latest_checkpoint("fa", "k" * 64) is None


def test_tracking_parent_nested_runs_and_registry(forge_home: Path) -> None:
    from mlflow.tracking import MlflowClient

    c = cfg()
    run_phase("fa", c, "tracked", track=True)
    run_phase("fb", c, "tracked", track=True)
    run_phase("fb", c, "tracked", track=True)  # cache hit: still a nested run, tagged as such
    client = MlflowClient(c.tracking.tracking_uri)
    exp = client.get_experiment_by_name(c.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("forge.kind") == "pipeline"]
    nested = [r for r in runs if r.data.tags.get("forge.kind") == "phase"]
    assert len(parents) == 1
    assert len(nested) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in nested)
    assert sorted(r.data.tags["forge.status"] for r in nested) == ["cache_hit", "complete", "complete"]
    assert "data.seed" in nested[0].data.params
    produced = next(r for r in nested if r.data.tags["forge.phase"] == "fa")
    n = c.data.seed % 50  # JobResult.metrics and quality reach the nested run (logged by the runner)
    assert produced.data.metrics["n"] == n and produced.data.metrics["quality.n"] == n
    mv = client.get_model_version_by_alias(c.tracking.registered_model, "challenger")
    assert mv.source.endswith("/runs/tracked/fb/sum.txt")
