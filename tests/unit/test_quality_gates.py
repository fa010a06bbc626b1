"""9A's gates and 9C's speed figures over a real release (the tiny run's GGUF + adapters) through the real
engine: a gate above what the model reaches fails with its domain, value and shortfall, and the report names
the failed examples; HumanEval problems are answered by the release and scored in the sandbox."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest


@pytest.fixture(scope="module")
def release(tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.serve_fixtures import build_release

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny_run.home))
        return build_release(
            tiny_run, tmp_path_factory.mktemp("release") / "release", with_policy=False, options=("code",)
        )


def _service(in_tiny_run: Any, release: Path, gates: dict[str, Any]) -> tuple[Any, Any]:
    from forge.serve.server import build_service

    cfg = in_tiny_run.config(
        {
            "validation": {"gates": gates},
            "routing": {
                "sessions": {"url": f"sqlite:///{release.parent / 'sessions.db'}"},
                "retraining": {"feedback_root": f"file://{release.parent}/feedback"},
            },
        }
    )
    return cfg, build_service(release, cfg)


def test_a_gate_above_the_model_fails_naming_domain_and_shortfall(in_tiny_run: Any, release: Path) -> None:
    from forge.evaluate.quality_gates import evaluate, markdown

    gates = {
        "gates": {"code": {"min": 0.0}, "reasoning": {"min": 1.0}},
        "rows": 4,
        "failed_examples": 2,
        "humaneval": {"enabled": False},
    }
    cfg, service = _service(in_tiny_run, release, gates)
    try:
        report = evaluate(SimpleNamespace(config=cfg), service)
    finally:
        service.close()
    by = {g["domain"]: g for g in report["gates"]}
    assert by["code"]["passed"] and by["code"]["n"] == 4
    r = by["reasoning"]
    assert not report["passed"] and not r["passed"] and r["shortfall"] == pytest.approx(1.0 - r["value"])
    md = markdown(report)
    assert "FAILED: reasoning" in md and f"short by {r['shortfall']:.1%}" in md
    failed = report["failed_examples"]["reasoning"]
    assert 1 <= len(failed) <= 2 and all(f["detail"] and "output" in f for f in failed)
    assert "## Failed examples: reasoning" in md


def test_humaneval_gate_answers_and_scores_real_problems(in_tiny_run: Any, release: Path) -> None:
    from forge.evaluate.quality_gates import evaluate, markdown

    gates = {
        "gates": {"code": {"min": 0.5, "metric": "humaneval"}},
        "rows": 2,
        "humaneval": {"enabled": True, "problems": 3, "max_tokens": 24, "timeout_s": 5.0},
    }
    cfg, service = _service(in_tiny_run, release, gates)
    try:
        report = evaluate(SimpleNamespace(config=cfg), service)
    finally:
        service.close()
    h = report["humaneval"]
    assert h["n"] == 3 and 0.0 <= h["pass@1"] <= 1.0
    gate = report["gates"][0]
    assert gate["metric"] == "humaneval" and gate["value"] == h["pass@1"]
    assert gate["passed"] == (h["pass@1"] >= 0.5)
    assert "HumanEval pass@1" in markdown(report)
    # the tiny model writes no working function: every problem fails, with the sandbox's reason
    assert all(
        f["id"].startswith("HumanEval/") and f["detail"] for f in report["failed_examples"]["humaneval"]
    )


def test_speed_hardware_and_plan_targets() -> None:
    from forge.evaluate.speed_bench import hardware, matching_target

    hw = hardware()
    assert hw["cores"] and hw["cpu"] and isinstance(hw["gpus"], list)
    assert matching_target({**hw, "gpus": ["NVIDIA A100-SXM4-80GB, 81920 MiB"]}) == "NVIDIA A100"
    assert matching_target({"gpus": [], "cpu": "Apple M4 Pro"}) == "Apple M4 Pro"
    assert matching_target({"gpus": [], "cpu": "Intel(R) Xeon(R) Platinum"}) is None


def test_serving_applies_7b_templates_when_asked(in_tiny_run: Any, release: Path, tmp_path: Path) -> None:
    """A release with few_shot/: a request with few_shot=true gets k retrieved demonstrations before its
    question (longer prompt, the set's version in the response); without it, nothing changes."""
    import json
    import shutil

    from forge.data.suites import generate
    from forge.serve.few_shot import build
    from forge.serve.release import FEW_SHOT_DIR, write_release_json
    from forge.serve.service import ChatRequest

    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    body = build(copy / FEW_SHOT_DIR, {"code": generate("code", 20, 3, "train")}, k=2, max_demo_chars=2000)
    meta = json.loads((copy / "release.json").read_text())
    write_release_json(copy, {k: v for k, v in meta.items() if k not in ("files", "format")})
    cfg, service = _service(in_tiny_run, copy, {})
    try:
        text = generate("code", 1, 3, "heldout")[0]["messages"][0]["content"]
        question = [{"role": "user", "content": text}]
        plain = service.complete(ChatRequest(question, mode="fast", max_tokens=4))
        shots = service.complete(ChatRequest(question, mode="fast", max_tokens=4, few_shot=True))
    finally:
        service.close()
    assert "few_shot" not in plain.extras
    assert shots.extras["few_shot"] == {"version": body["version"], "demonstrations": 2, "domains": ["code"]}
    assert shots.usage.prompt_tokens > plain.usage.prompt_tokens + 10
