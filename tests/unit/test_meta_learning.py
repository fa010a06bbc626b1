"""7A (first-order MAML over LoRA) and 7B (few-shot templates): the jobs on the session's tiny run, the family
split, the template set's retrieval and how serving applies it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forge.data.suites import generate


def test_heldout_families_never_meet_meta_training() -> None:
    from forge.train.maml_config import MAMLConfig
    from forge.train.maml_trainer import families, heldout_families

    cfg = MAMLConfig(rows_per_family=8, query_rows=4, shots=[1, 3])
    fams = families("code", "code", cfg, 1234, "train", cfg.rows_per_family)
    held = heldout_families(sorted(fams), cfg)
    assert len(held) == round(0.3 * len(fams)) and held < set(fams)
    assert heldout_families(sorted(fams)[:1], cfg) == set()  # one family: nothing to hold out
    assert all(len(rows) >= 8 and {r["task"] for r in rows} == {f.split("/")[1]} for f, rows in fams.items())
    again = families("code", "code", cfg, 1234, "train", cfg.rows_per_family)
    assert {f: [r["id"] for r in rows] for f, rows in again.items()} == {
        f: [r["id"] for r in rows] for f, rows in fams.items()
    }


def test_maml_config_rejects_episodes_that_do_not_fit() -> None:
    from pydantic import ValidationError

    from forge.train.maml_config import MAMLConfig

    with pytest.raises(ValidationError, match="rows_per_family"):
        MAMLConfig(shots=[5], query_rows=8, rows_per_family=10)


def test_maml_job_on_the_tiny_run(in_tiny_run) -> None:
    from forge.runner import run_phase

    cfg = in_tiny_run.config()
    m = run_phase("7A", cfg, in_tiny_run.run_id, track=False)
    assert m.status == "complete"
    out = Path(m.base_uri.removeprefix("file://"))
    report = json.loads((out / "maml_report.json").read_text())
    assert not set(report["train_families"]) & set(report["heldout_families"])
    assert set(report["per_shot"]) == {"1", "2"}
    for shot in report["per_shot"].values():
        lo, hi = shot["acc_gain_ci95"]
        assert lo <= shot["acc_gain"] <= hi and shot["episodes"] == cfg.meta.maml.eval_episodes
        assert shot["loss_maml"] > 0 and shot["loss_baseline"] > 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == cfg.meta.maml.rank and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "maml_meta_loss.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory):
    from forge.serve.few_shot import FewShot, build

    pools = {d: generate(d, 40, 7, "train") for d in ("code", "automation")}
    folder = tmp_path_factory.mktemp("few_shot") / "few_shot"
    body = build(folder, pools, k=2, max_demo_chars=2000)
    return FewShot.load(folder), body, pools


def test_template_set_is_versioned_and_retrieves_the_question_s_domain(templates, tmp_path: Path) -> None:
    from forge.serve.few_shot import FewShot, build

    fs, body, pools = templates
    assert fs.version == body["version"] and len(fs.vectors) == len(fs.entries) == 80
    np.testing.assert_allclose(np.linalg.norm(fs.vectors, axis=1), 1.0, atol=1e-5)
    for d in ("code", "automation"):
        question = generate(d, 1, 7, "heldout")[0]["messages"][0]["content"]
        demos = fs.nearest(question)
        assert [x.domain for x in demos] == [d, d], (question, demos)
        assert demos[0].similarity >= demos[1].similarity
    # other pools, another version
    other = build(tmp_path / "other", {"code": pools["code"][:10]}, 2, 2000)
    assert other["version"] != fs.version and FewShot.load(tmp_path / "other").domains == ["code"]


def test_apply_puts_demonstrations_before_the_question(templates) -> None:
    fs = templates[0]
    question = "Write a Python function `add_three(x)` that returns x + 3."
    msgs = fs.apply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.") and "Solved code tasks" in msgs[0]["content"]
    assert msgs[-1]["content"] == question and question not in [m["content"] for m in msgs[1:-1]]
    # a demonstration is never the question itself
    pool_q = templates[2]["code"][0]["messages"][0]["content"]
    assert all(d.prompt != pool_q for d in fs.nearest(pool_q))
    assert fs.apply([{"role": "assistant", "content": "hi"}]) == [{"role": "assistant", "content": "hi"}]


def test_the_router_and_retrieval_embed_a_question_once(templates, monkeypatch: pytest.MonkeyPatch) -> None:
    from forge.routing import minilm
    from forge.routing.features import MiniLMFeatures
    from forge.serve.few_shot import embed

    real, runs = minilm.onnx_session(), []

    class Counting:  # the ONNX session, counting its runs
        def run(self, *args: object) -> object:
            runs.append(1)
            return real.run(*args)

    monkeypatch.setattr(minilm, "onnx_session", Counting)
    minilm.clear_embedding_cache()
    question = "What is 17 times 23? (asked once, embedded for the router and for retrieval)"
    routed = MiniLMFeatures().embed([question])
    retrieved = embed([question])
    assert len(runs) == 1
    np.testing.assert_allclose(retrieved[0], routed[0] / np.linalg.norm(routed[0]), rtol=1e-5, atol=1e-6)
    mine = minilm.embed_texts_int8([question])
    mine[0, :] = 0  # a caller's own copy: the cached row is untouched
    np.testing.assert_array_equal(minilm.embed_texts_int8([question]), routed)
    assert len(runs) == 1
    embed([question, "another question"])  # batches are not cached
    minilm.embed_texts_int8([question], max_len=16)  # nor is one text shared across truncation lengths
    assert len(runs) == 3


def test_a_damaged_template_set_is_a_clear_error(templates, tmp_path: Path) -> None:
    from forge.serve.few_shot import EMBEDDINGS, FewShot, build

    build(tmp_path / "fs", {"code": templates[2]["code"][:6]}, 2, 2000)
    np.save(tmp_path / "fs" / EMBEDDINGS, np.zeros((3, 384), np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        FewShot.load(tmp_path / "fs")


def test_few_shot_job_on_the_tiny_run(in_tiny_run) -> None:
    from forge.runner import run_phase
    from forge.serve.few_shot import FewShot

    cfg = in_tiny_run.config()
    m = run_phase("7B", cfg, in_tiny_run.run_id, track=False)
    assert m.status == "complete"
    out = Path(m.base_uri.removeprefix("file://"))
    report = json.loads((out / "few_shot_report.json").read_text())
    fs = FewShot.load(out / "few_shot")
    assert report["version"] == fs.version == m.info["version"]
    assert set(report["by_domain"]) == set(cfg.meta.few_shot.domains) == set(fs.domains)
    lo, hi = report["gain_ci95"]
    assert lo <= report["gain"] <= hi
    assert report["rows"] == len(cfg.meta.few_shot.domains) * cfg.meta.few_shot.eval_rows
