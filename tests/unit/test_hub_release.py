"""8A on the session's tiny run: the release folder loads (and is refused once a byte changes), the model card
holds the ledger and the lineage, no token -> upload_plan.json, a token + repo -> huggingface_hub's calls (a
fake HfApi) with the token nowhere in the output, logs or manifest, and a 6C policy ships in routing/policy.

Each test runs its own run id: the tiny run's upstream phases are cache hits there (linked, with ledger rows),
2F runs once (a cache hit after), every modifier subphase and 6A-6C skip by config (modifiers.enabled: []),
and 12A is a stand-in phase (its job is not part of this test).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from forge.artifacts import ArtifactError, Manifest
from forge.runner import JobContext, JobResult, PhaseSkipped
from forge.serve.release import BASE_GGUF, CALIBRATION, CRITIC_DIR, MODEL_CARD, POLICY_DIR, Release
from tests.conftest import UPSTREAM_PHASES

TOKEN = "hf_tEsT5ecretT0kenNeverToBeSeen"
REPO = "acme/forge-tiny"


def critic_skipped(ctx: JobContext) -> JobResult:
    raise PhaseSkipped("12A stand-in: no critic in this test")


def critic_standin(ctx: JobContext) -> JobResult:
    (ctx.out_dir / "critic").mkdir()
    (ctx.out_dir / "critic" / "critic.json").write_text(json.dumps({"format": "stand-in"}))
    return JobResult(info={"critic_dir": "critic"})


def config(tiny_run: Any, extra: dict | None = None) -> Any:
    from forge.config import deep_merge

    # 8A and the 12A stand-ins always run (a cached 8A would not upload; two stand-ins share a cache key);
    # a critique seed of their own keeps the stand-ins' outputs out of the real 12A's cache entries
    return tiny_run.config(deep_merge({"modifiers": {"enabled": []}, "cache": {"force": ["8A", "12A"]},
                                       "serving": {"critique": {"seed": 990001}}}, extra or {}))


def prepare(tiny_run: Any, run_id: str, monkeypatch: pytest.MonkeyPatch, extra: dict | None = None,
            critic: str = "critic_skipped") -> tuple[Any, Any]:
    """(config, store) of a run whose 8A inputs are all there (complete or skipped)."""
    import forge.phases
    from forge.phases import modifier_phase_id
    from forge.runner import make_store, run_phase

    cfg = config(tiny_run, extra)
    stand_in = dataclasses.replace(forge.phases.get_phase("12A", cfg),
                                   job=f"tests.unit.test_hub_release:{critic}")
    monkeypatch.setattr(forge.phases, "BY_ID", {**forge.phases.BY_ID, "12A": stand_in})
    for phase in (*UPSTREAM_PHASES, "2F"):  # cache hits of the tiny run (2F: the first test runs it)
        run_phase(phase, cfg, run_id, track=False)
    for spec in cfg.modifiers.domains.values():
        for step in "ABCDEFGH":
            assert run_phase(modifier_phase_id(spec, step), cfg, run_id, track=False).status == "skipped"
    for phase in ("6A", "6B", "6C", "12A", "7B"):
        run_phase(phase, cfg, run_id, track=False)
    return cfg, make_store(cfg)


def release_of(store: Any, manifest: Manifest) -> Path:
    return store.materialize(manifest) / "release"


def test_release_loads_has_card_and_plan_without_token(in_tiny_run: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from forge.runner import run_phase
    from forge.serve.hub_release import UPLOAD_PLAN, hf_model_id

    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg, store = prepare(in_tiny_run, "hub-plan", monkeypatch)
    m = run_phase("8A", cfg, "hub-plan", track=False)
    assert m.status == "complete" and m.info["uploaded"] is False and m.info["options"] == ["base"]
    folder = release_of(store, m)
    release = Release.load(folder)  # every checksum verified
    assert release.adapters["base"] == folder / "adapters/base.gguf"  # 2E's recovery LoRA
    assert release.gguf.stat().st_size == store.run_manifest("hub-plan", "2C").files[
        store.run_manifest("hub-plan", "2C").info["gguf"]].size
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in release.tokenizer_dir.iterdir()}
    assert release.calibration == json.loads((store.materialize(store.run_manifest("hub-plan", "2F"))
                                              / CALIBRATION).read_text())
    assert release.policy_dir is None and release.detector_dir is None and release.critic_dir is None
    assert "routing" not in release.meta and release.meta["lineage"]["profile"] == cfg.profile
    assert "6C skipped" in m.info["notes"]

    # one flipped byte anywhere: refused, naming the file
    for rel in (BASE_GGUF, CALIBRATION):
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(folder, copy)
        data = bytearray((copy / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=rel):
            Release.load(copy)

    # the model card: front matter, how to serve, the ledger's figures, lineage by cache key
    card = (folder / MODEL_CARD).read_text()
    assert card.startswith("---\nlibrary_name: gguf\n") and "base_model" not in card.split("---")[1]
    assert "python -m forge serve --release" in card
    assert "| phase | title | status | output MB | quality |" in card
    figures, lineage = card.split("## Figures of the run")[1].split("## Lineage")
    assert "| 2C | " in figures and "size_mb=" in figures and "| 2F | " in figures
    assert "| 3H | " not in figures and "3H" in figures.split("Skipped in this run:")[1]
    for phase in ("2C", "2E", "2F", "6C"):
        up = store.run_manifest("hub-plan", phase)
        assert f"| {phase} | {up.status} | `{up.cache_key[:16]}` |" in lineage
    assert hf_model_id(cfg) is None
    hub = cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": "Qwen/Qwen2.5-0.5B"})})
    assert hf_model_id(hub) == "Qwen/Qwen2.5-0.5B"

    # no token, no repo: the plan lists every file (release.json too) and says why
    plan = json.loads((store.materialize(m) / UPLOAD_PLAN).read_text())
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert {f["path"]: f["size"] for f in plan["files"]} == files
    assert plan["total_bytes"] == sum(files.values()) and len(files) == plan["n_files"]
    assert plan["repo"] is None and plan["uploaded"] is False
    assert plan["reason"] == "no token in $HF_TOKEN; serving.hub_repo is not set"
    assert "no token in $HF_TOKEN" in m.info["notes"]
    # a repo but still no token
    cfg2 = config(in_tiny_run, {"serving": {"hub_repo": REPO}})
    plan2 = json.loads((store.materialize(run_phase("8A", cfg2, "hub-plan", track=False)) / UPLOAD_PLAN)
                       .read_text())
    assert plan2["repo"] == REPO and plan2["reason"] == "no token in $HF_TOKEN"


class FakeHfApi:
    calls: list[tuple[str, dict[str, Any]]] = []
    fail: str | None = None

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw: Any) -> Any:
        if self.fail:
            raise RuntimeError(self.fail)
        folder = Path(kw["folder_path"])
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {**kw, "files": files}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc123")


def test_upload_with_token_and_repo_keeps_the_token_secret(in_tiny_run: Any,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import huggingface_hub

    from forge.phases import get_phase
    from forge.runner import run_phase
    from forge.serve.hub_release import UPLOAD_PLAN, HubUploadError

    FakeHfApi.calls, FakeHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    cfg, store = prepare(in_tiny_run, "hub-upload", monkeypatch,
                         {"serving": {"hub_repo": REPO, "hub_private": True}})
    m = run_phase("8A", cfg, "hub-upload", track=False)

    assert [c[0] for c in FakeHfApi.calls] == ["init", "create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1]["token"] == TOKEN  # handed to huggingface_hub, and only there
    assert FakeHfApi.calls[1][1] == {"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True}
    up = FakeHfApi.calls[2][1]
    folder = release_of(store, m)
    assert Path(up["folder_path"]).name == "release" and up["repo_id"] == REPO
    assert up["files"] == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "hub-upload" in up["commit_message"] and m.cache_key[:16] in up["commit_message"]
    assert m.info["uploaded"] is True and m.info["hub_url"] == f"https://huggingface.co/{REPO}"
    assert m.info["commit_url"].endswith("/commit/abc123") and UPLOAD_PLAN not in m.files

    # the token: in no file of the run (outputs, manifests, ledger), no log record, not in the manifest
    run_dir = Path(store._to_path(store.uri("runs", "hub-upload")))
    for p in [*run_dir.rglob("*"), *store.materialize(m).rglob("*")]:
        assert not p.is_file() or TOKEN.encode() not in p.read_bytes(), p
    assert TOKEN not in caplog.text and all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in m.to_json()
    params = {s: cfg.section(s) for s in get_phase("8A", cfg).sections}  # what MLflow gets as params
    assert TOKEN not in json.dumps(params)

    # a refused upload: a clear error naming the repo, the token scrubbed even when the server echoes it
    FakeHfApi.fail = f"401 Client Error: Unauthorized (token {TOKEN} is invalid)"
    with pytest.raises(HubUploadError, match=REPO) as err:
        run_phase("8A", cfg, "hub-upload", track=False)
    assert TOKEN not in str(err.value) and "401" in str(err.value)
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert TOKEN not in caplog.text


def test_release_ships_the_router_policy_and_critic(in_tiny_run: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from forge.routing.bundle import RoutingPolicy
    from forge.runner import run_phase
    from tests.routing_fixtures import build_champion

    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg, store = prepare(in_tiny_run, "hub-router", monkeypatch, critic="critic_standin")
    champion = build_champion(cfg, store, tmp_path, register=False)
    store.link_run("hub-router", champion["m6c"])  # this run's 6C: the synthetic champion
    m = run_phase("8A", cfg, "hub-router", track=False)
    release = Release.load(release_of(store, m))
    assert release.policy_dir == release.folder / POLICY_DIR
    assert release.meta["routing"] == {"features": "minilm"}
    policy = RoutingPolicy.load(release.policy_dir)
    original = RoutingPolicy.load(store.materialize(champion["m6c"]))
    assert policy.router.classes == original.router.classes and policy.thresholds == original.thresholds
    assert policy.bundle == original.bundle
    assert "['code', 'reasoning']" in m.info["notes"]  # routed options this release lacks, said so
    assert release.critic_dir == release.folder / CRITIC_DIR
    # 7B's few-shot templates ship too, and load as the server loads them
    from forge.serve.few_shot import FewShot

    assert release.few_shot_dir is not None and FewShot.load(release.few_shot_dir).domains
    assert "few_shot/" in (release.folder / MODEL_CARD).read_text()
    assert json.loads((release.critic_dir / "critic.json").read_text()) == {"format": "stand-in"}
    assert m.info["parts"]["policy"] and m.info["parts"]["critic"]
