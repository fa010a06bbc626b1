"""2F confidence calibration: ECE/Brier by hand, temperature and Platt scaling on synthetic data with a
known miscalibration, the deterministic split, HFBackend.answer_logprobs_at on a tiny model, the
features path over the Backend protocol, and the job's files (calibration.json round trip, PNG, bundle)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from forge.artifacts import FileEntry, Manifest, sha256_file
from forge.compress import calibration as C
from forge.compress.calibration_config import CalibrationConfig
from forge.compress.gguf_config import GGUFConfig
from forge.config import EvalConfig, TrackingConfig
from forge.data.records import DataError, prompt_messages, reference, write_jsonl
from forge.data.suites import check_answer
from tests.unit.test_pruning import make_rows

CFG = CalibrationConfig()
GRID = C.temperature_grid(CFG)


# ---- synthetic data: a classifier whose softmax is sharper than the truth ----------------------

def synthetic(n: int, true_t: float, seed: int = 0, k: int = 4) -> C.Features:
    """Per row: logits z; the model answers argmax z; the answer is right with probability
    softmax(z / true_t)[argmax]. Its raw confidence softmax(z)[argmax] is over-confident for true_t > 1,
    and temperature scaling at true_t is exactly calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.5, size=(n, k))
    top = z.argmax(axis=1)

    def top_logprob(t: float) -> np.ndarray:
        s = z / t
        return s[np.arange(n), top] - np.logaddexp.reduce(s, axis=1)

    correct = rng.random(n) < np.exp(top_logprob(true_t))
    logprob_at = np.stack([top_logprob(t) for t in GRID], axis=1)
    ids = [f"s{i}" for i in range(n)]
    return C.Features(ids, ["reasoning"] * n, ["x"] * n, [""] * n, correct, GRID.copy(), logprob_at)


def test_ece_and_brier_match_hand_computed_values() -> None:
    conf = np.array([0.1, 0.4, 0.45, 0.9, 1.0])
    correct = np.array([False, True, False, True, True])
    # 2 bins: [0, .5) holds .1, .4, .45 (mean .31667, acc 1/3); [.5, 1] holds .9 and 1.0 (mean .95, acc 1)
    expected_ece = 3 / 5 * abs(1 / 3 - 0.95 / 3) + 2 / 5 * abs(1 - 0.95)
    assert C.ece(conf, correct, 2) == pytest.approx(expected_ece)
    assert C.ece(conf, correct, 2) == pytest.approx(0.03)
    assert C.brier(conf, correct) == pytest.approx((0.01 + 0.36 + 0.2025 + 0.01 + 0.0) / 5)
    bins = C.bin_stats(conf, correct, 2)
    assert [b["count"] for b in bins] == [3, 2] and bins[1]["accuracy"] == 1.0
    # perfectly calibrated within every bin -> 0; always-wrong certainty -> ECE 1, Brier 1
    assert C.ece(np.array([0.25] * 4), np.array([True, False, False, False]), 10) == pytest.approx(0.0)
    assert C.ece(np.ones(3), np.zeros(3, bool), 10) == 1.0 and C.brier(np.ones(3), np.zeros(3, bool)) == 1.0


def test_temperature_grid_is_log_spaced_and_holds_one_exactly() -> None:
    assert GRID[0] == pytest.approx(0.25) and GRID[-1] == pytest.approx(8.0) and len(GRID) == 41
    assert 1.0 in GRID and np.allclose(np.diff(np.log(GRID)), np.log(32) / 40)
    odd = C.temperature_grid(CalibrationConfig(t_min=0.3, t_max=5.0, t_points=4))  # 1 not on the grid
    assert len(odd) == 5 and 1.0 in odd and np.all(np.diff(odd) > 0)


def test_temperature_scaling_recovers_the_true_temperature() -> None:
    f = synthetic(6000, true_t=2.0)
    fit = C.fit_temperature(f.logprob_at, f.temperatures, f.correct)
    assert abs(math.log(fit.temperature / 2.0)) <= 0.13  # within one grid step (factor 2**0.125)
    assert not fit.at_edge and fit.nll[fit.index] < fit.nll[f.t1]
    under = synthetic(6000, true_t=0.5, seed=1)  # under-confident model: T < 1 sharpens it
    assert abs(math.log(C.fit_temperature(under.logprob_at, under.temperatures, under.correct).temperature
                        / 0.5)) <= 0.13


def test_platt_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-4.0, 0.0, 8000)
    y = rng.random(8000) < C.sigmoid(1.5 * x + 2.0)
    fit = C.fit_platt(x, y, l2=0.0)
    assert fit.a == pytest.approx(1.5, abs=0.15) and fit.b == pytest.approx(2.0, abs=0.2)
    assert not fit.degenerate and fit.iterations < 30
    # perfectly separable: the penalty keeps it finite and it still ranks the classes apart
    sep = C.fit_platt(np.array([-3.0, -2.5, -0.5, -0.2]), np.array([False, False, True, True]), l2=1e-3)
    assert math.isfinite(sep.a) and sep.a > 0
    high, low = C.platt_confidence(sep, np.array([-0.2, -3.0]))
    assert high > 0.9 and low < 0.1


def test_both_methods_lower_ece_on_a_known_miscalibration() -> None:
    cal = C.calibrate(synthetic(4000, true_t=2.5, seed=2), CFG)
    m = cal.metrics
    print("synthetic (T*=2.5, n=4000):", {k: round(v, 4) for k, v in m.items()},
          "T", cal.temperature.temperature, "platt", round(cal.platt.a, 3), round(cal.platt.b, 3))
    assert m["ece_temperature"] < m["ece_raw"] / 3 and m["ece_platt"] < m["ece_raw"] / 3
    assert m["brier_temperature"] < m["brier_raw"] and m["brier_platt"] < m["brier_raw"]
    assert cal.warnings == []
    params = C.calibration_params(cal, CFG)
    assert params["metrics"]["ece_after"] == m["ece_platt"]
    assert params["metrics"]["ece_before"] == m["ece_raw"]
    assert params["n"]["fit"] + params["n"]["heldout"] == 4000


def test_split_is_deterministic_disjoint_and_per_row() -> None:
    ids = [f"general-calib-{i:05d}" for i in range(2000)]
    mask = C.fit_mask(ids, CFG)
    assert np.array_equal(mask, C.fit_mask(ids, CFG))
    assert 0.45 < mask.mean() < 0.55
    fit = {i for i, m in zip(ids, mask, strict=True) if m}
    held = {i for i, m in zip(ids, mask, strict=True) if not m}
    assert fit.isdisjoint(held) and fit | held == set(ids)
    # a row's side depends on its id alone, not on which other rows are there
    assert np.array_equal(C.fit_mask(ids[::7], CFG), mask[::7])
    assert 0.15 < C.fit_mask(ids, CalibrationConfig(fit_fraction=0.2)).mean() < 0.25
    assert not np.array_equal(C.fit_mask(ids, CalibrationConfig(seed=7)), mask)


def test_too_few_rows_names_the_split_and_the_config_field() -> None:
    f = synthetic(12, true_t=2.0)
    with pytest.raises(C.CalibrationError, match=r"split has \d+ rows, below calibration.min_split_rows=8"):
        C.calibrate(f, CFG)
    with pytest.raises(C.CalibrationError, match=r"held-out split .*fit_fraction=0.99"):
        C.calibrate(synthetic(400, true_t=2.0), CalibrationConfig(fit_fraction=0.99))


def test_one_class_fit_split_falls_back_to_the_base_rate_with_a_warning() -> None:
    f = synthetic(200, true_t=2.0)
    f.correct[:] = True
    cal = C.calibrate(f, CFG)
    n_fit = int(cal.fit.sum())
    assert cal.platt.degenerate and cal.platt.a == 0.0
    assert C.sigmoid(cal.platt.b) == pytest.approx((n_fit + 0.5) / (n_fit + 1))
    assert any("all correct" in w and "base rate" in w for w in cal.warnings)
    assert any("edge of the grid" in w for w in cal.warnings)  # all right: T runs to t_min
    assert cal.temperature.temperature == GRID[0]
    assert all(math.isfinite(v) for v in cal.metrics.values())


def test_apply_calibration_and_load_errors(tmp_path: Path) -> None:
    params = {"format": C.FORMAT, "method": "platt", "temperature": 1.5, "platt": {"a": 2.0, "b": 1.0}}
    assert C.apply_calibration(params, -0.5) == pytest.approx(0.5)
    assert C.apply_calibration({**params, "method": "temperature"}, -0.5) == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError, match="unknown method 'isotonic'"):
        C.apply_calibration({**params, "method": "isotonic"}, -1.0)
    with pytest.raises(ValueError, match="must be finite"):
        C.apply_calibration(params, float("nan"))
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({**params, "platt": {"a": "x", "b": 0}}))
    with pytest.raises(ValueError, match=r"calibration.json: platt.a must be a number"):
        C.load_calibration(bad)
    bad.write_text(json.dumps({k: v for k, v in params.items() if k != "method"}))
    with pytest.raises(ValueError, match="missing field 'method'"):
        C.load_calibration(bad)


def test_reliability_png_is_written(tmp_path: Path) -> None:
    f = synthetic(300, true_t=2.0)
    curves = {"raw": (C.confidence(f.logprob), f.correct),
              "T=2": (C.confidence(f.logprob_at[:, 24]), f.correct)}
    path = C.plot_reliability(curves, 10, tmp_path / "r.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---- the tiny model: HFBackend.answer_logprobs_at and the features path ------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import save_tiny_model

    texts = [m["content"] for r in make_rows(40) for m in r["messages"]]
    return save_tiny_model(tmp_path_factory.mktemp("tiny_calib"), texts, vocab_size=512,
                           max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    from forge.evaluate.harness import HFBackend
    from forge.modeling import load_model, load_tokenizer

    model, tok = load_model(tiny_dir, "cpu"), load_tokenizer(tiny_dir)
    return HFBackend(model, tok, "cpu", max_new_tokens=6, batch_size=4)


def test_answer_logprobs_at_is_answer_logprobs_at_t1_and_follows_t(tiny) -> None:
    rows = make_rows(6)
    prompts = [tiny.prompt(prompt_messages(r)) for r in rows]
    answers = [reference(r) for r in rows[:5]] + ["a longer wrong answer"]
    at = tiny.answer_logprobs_at(prompts, answers, [0.5, 1.0, 2.0])
    assert len(at) == 6 and all(len(r) == 3 for r in at)
    assert [r[1] for r in at] == tiny.answer_logprobs(prompts, answers)  # one code path, exactly
    assert all(r[0] != r[1] != r[2] for r in at)

    # one row by hand: full forward, log_softmax(logits / 2) over the answer + EOS tokens
    tok = tiny.tokenizer
    p_ids = tok(prompts[5], add_special_tokens=False)["input_ids"]
    joint = tok(prompts[5] + answers[5], add_special_tokens=False)["input_ids"]
    assert joint[:len(p_ids)] == p_ids
    a_ids = joint[len(p_ids):] + [tok.eos_token_id]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logits = tiny.model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
    by_hand = torch.log_softmax(logits / 2.0, -1).gather(-1, torch.tensor(a_ids)[:, None]).mean().item()
    assert at[5][2] == pytest.approx(by_hand, abs=1e-4)
    with pytest.raises(ValueError, match="temperatures must be"):
        tiny.answer_logprobs_at(prompts, answers, [1.0, 0.0])


class HalfRight:
    """A Backend over the tiny model that answers every other row with its reference (a random tiny
    model is never right): real log-probs of real strings, with both classes present."""

    def __init__(self, inner, refs: dict[str, str]) -> None:
        self.inner, self.refs, self.calls = inner, refs, 0

    def generate(self, prompts: list[str]) -> list[str]:
        outs = self.inner.generate(prompts)
        self.calls += 1
        return [self.refs[p] if i % 2 == 0 else o for i, (p, o) in enumerate(zip(prompts, outs, strict=True))]

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> list[float]:
        return self.inner.answer_logprobs(prompts, answers)

    def answer_logprobs_at(self, prompts, answers, temperatures):
        return self.inner.answer_logprobs_at(prompts, answers, temperatures)


def test_features_through_the_backend_protocol(tiny) -> None:
    rows = make_rows(10)
    temps = np.array([0.5, 1.0, 4.0])
    feats = C.compute_features(tiny, rows, tiny.prompt, temps, EvalConfig(batch_size=4, max_new_tokens=6))
    prompts = [tiny.prompt(prompt_messages(r)) for r in rows]
    assert feats.outputs == tiny.generate(prompts) and feats.logprob_at.shape == (10, 3) and feats.t1 == 1
    np.testing.assert_allclose(feats.logprob, tiny.answer_logprobs(prompts, feats.outputs), rtol=1e-6)
    checks = [check_answer(r, o).correct for r, o in zip(rows, feats.outputs, strict=True)]
    assert list(feats.correct) == checks
    with pytest.raises(ValueError, match="must hold T=1"):
        C.compute_features(tiny, rows, tiny.prompt, np.array([0.5, 2.0]), EvalConfig())

    class Short:  # drops all temperatures but the first
        generate = tiny.generate

        def answer_logprobs_at(self, prompts, answers, temperatures):
            return [r[:1] for r in tiny.answer_logprobs_at(prompts, answers, temperatures)]

    with pytest.raises(RuntimeError, match="Short returned 4 outputs and 4 log-prob rows for 4 prompts x 3"):
        C.compute_features(Short(), rows, tiny.prompt, temps, EvalConfig(batch_size=4))


# ---- the job -----------------------------------------------------------------------------------

def manifest_for(phase: str, folder: Path, info: dict, run: str) -> Manifest:
    files = {p.name: FileEntry(p.stat().st_size, sha256_file(p)) for p in sorted(folder.iterdir())}
    return Manifest(phase=phase, cache_key=f"key-{phase}", base_uri=f"file://{folder}", run_id="r1",
                    files=files, info=info, mlflow_run_id=run)


class FakeContext:
    """What 2F's run() uses of JobContext, over plain folders and real manifests."""

    def __init__(self, root: Path, rows: list[dict], cfg: CalibrationConfig) -> None:
        dirs = {p: root / p for p in ("prep_data", "1A", "2C", "2E")}
        for d in dirs.values():
            d.mkdir(parents=True)
        write_jsonl(dirs["prep_data"] / "calib.jsonl", rows)
        (dirs["1A"] / "adapter_model.safetensors").write_bytes(b"1A")
        (dirs["2C"] / "model-q5_k_m.gguf").write_bytes(b"GGUF" + bytes(60))
        (dirs["2C"] / "tokenizer.json").write_text("{}")
        (dirs["2E"] / "adapter.gguf").write_bytes(b"GGUF-lora")
        info = {"2C": {"gguf": "model-q5_k_m.gguf"}, "2E": {"adapter": "adapter.gguf"}}
        self.dirs = dirs
        self.inputs = {p: manifest_for(p, d, info.get(p, {}), f"mlflow-{p}") for p, d in dirs.items()}
        self.config = SimpleNamespace(calibration=cfg, eval=EvalConfig(max_new_tokens=6, batch_size=8),
                                      gguf=GGUFConfig(n_ctx=512), tracking=TrackingConfig())
        self.cache_key = "key-2F"
        self.out_dir = root / "out"
        self.out_dir.mkdir()
        self.artifacts: list[Path] = []

    def put(self, phase: str, src: Path, name: str | None = None) -> None:
        """Copy a real file into an input phase's folder and re-make its manifest (info kept)."""
        shutil.copy(src, self.dirs[phase] / (name or src.name))
        old = self.inputs[phase]
        self.inputs[phase] = manifest_for(phase, self.dirs[phase], old.info, old.mlflow_run_id)

    def input_dir(self, phase_id: str) -> Path:
        return self.dirs[phase_id]

    def input_skipped(self, phase_id: str) -> bool:
        return self.inputs[phase_id].status == "skipped"

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


def test_job_writes_calibration_bundle_and_registers_the_output(tiny, tmp_path: Path, monkeypatch) -> None:
    rows = make_rows(40, "c")
    refs = {tiny.prompt(prompt_messages(r)): reference(r) for r in rows}
    backend = HalfRight(tiny, refs)
    seen = {}

    @contextlib.contextmanager
    def fake_served(ctx, gguf, adapter):
        seen.update(gguf=gguf, adapter=adapter)
        yield backend, tiny.prompt

    monkeypatch.setattr(C, "served_backend", fake_served)
    cfg = CalibrationConfig(t_points=9, min_split_rows=5)
    ctx = FakeContext(tmp_path, rows, cfg)
    result = C.run(ctx)

    out = ctx.out_dir
    assert {p.name for p in out.iterdir()} == {"calibration.json", "calibration_features.jsonl",
                                               "reliability.png", "bundle.json"}
    assert set(ctx.artifacts) == {out / "reliability.png", out / "calibration.json"}
    assert seen["gguf"].path == ctx.dirs["2C"] / "model-q5_k_m.gguf"
    assert seen["adapter"].path == ctx.dirs["2E"] / "adapter.gguf"
    params = C.load_calibration(out / "calibration.json")
    q = result.quality
    print("tiny model (half reference answers, n=40):", q, params["platt"])
    assert q["ece_before"] == params["metrics"]["ece_raw"]
    assert q["ece_after"] == params["metrics"]["ece_platt"] < q["ece_before"]
    assert q["calib_acc"] == pytest.approx(0.5) and q["method"] == "platt" and q["n"] == 40.0
    assert params["n"]["fit"] + params["n"]["heldout"] == 40 and not params["platt"]["degenerate"]

    # the router's path: apply_calibration on a row's feature gives the job's own numbers
    records = [json.loads(line) for line in (out / "calibration_features.jsonl").read_text().splitlines()]
    assert len(records) == 40 and {r["split"] for r in records} == {"fit", "heldout"}
    for r in records:
        assert C.apply_calibration(params, r["logprob"]) == pytest.approx(r["confidence_platt"], rel=1e-9)
        assert C.apply_calibration({**params, "method": "temperature"}, r["logprob_at_temperature"]) == \
            pytest.approx(r["confidence_temperature"], rel=1e-9)
        assert r["confidence_raw"] == pytest.approx(math.exp(r["logprob"]))

    bundle = json.loads((out / "bundle.json").read_text())
    c = ctx.inputs["2C"]
    # content-addressed: cache keys and sha256s; where each input lives is this run's fact (manifest info)
    assert bundle["gguf"]["cache_key"] == c.cache_key and "uri" not in bundle["gguf"]
    assert bundle["gguf"]["sha256"] == c.files["model-q5_k_m.gguf"].sha256
    assert bundle["adapter"]["sha256"] == sha256_file(ctx.dirs["2E"] / "adapter.gguf")
    assert bundle["tokenizer"]["files"] == {"tokenizer.json": c.files["tokenizer.json"].sha256}
    assert bundle["calibration"]["sha256"] == sha256_file(out / "calibration.json")
    assert bundle["base_training_run"] == {"phase": "1A", "cache_key": "key-1A"}
    assert result.info["locations"]["1A"] == {"mlflow_run_id": "mlflow-1A", "run_id": "r1",
                                              "base_uri": ctx.inputs["1A"].base_uri}
    assert result.register == "" and result.register_model == "forge-base-compressed"


def test_job_input_errors_name_the_manifest_key(tiny, tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path, make_rows(20), CFG)
    ctx.inputs["2C"].info = {}
    with pytest.raises(DataError, match=r"2C manifest .* has no info\['gguf'\].*model-q5_k_m.gguf"):
        C.run(ctx)
    ctx.inputs["2C"].info = {"gguf": "model.gguf"}
    with pytest.raises(DataError, match=r"2C info\['gguf'\] names 'model.gguf', which is not among its"):
        C.run(ctx)
    (ctx.dirs["prep_data"] / "calib.jsonl").unlink()
    with pytest.raises(DataError, match="calib split .*rerun prep_data"):
        C.run(ctx)


# ---- the served model: llama.cpp over a GGUF of the tiny model (+ a GGUF LoRA) ----------------

@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An f32 GGUF of the tiny model and a GGUF LoRA with random (non-zero) weights for it."""
    pytest.importorskip("llama_cpp")
    from peft import LoraConfig, get_peft_model

    from forge.compress.llama_cpp_tools import convert_hf_to_gguf, convert_lora_to_gguf
    from forge.modeling import load_model

    out = tmp_path_factory.mktemp("tiny_gguf")
    gguf = convert_hf_to_gguf(tiny_dir, out / "model-f32.gguf", "f32", bpe_fallback="gpt-2")
    torch.manual_seed(0)
    lora = get_peft_model(load_model(tiny_dir, "cpu"), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(out / "adapter")
    return gguf, convert_lora_to_gguf(out / "adapter", tiny_dir, out / "adapter.gguf", "f32")


def test_features_through_llama_cpp_match_hf(tiny, tiny_dir: Path, tiny_gguf) -> None:
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend

    rows, temps, ev = make_rows(8), np.array([0.5, 1.0, 4.0]), EvalConfig(batch_size=4, max_new_tokens=6)
    with LlamaCppBackend(tiny_gguf[0], tiny_dir, n_ctx=128, max_new_tokens=6) as served:
        via_llama = C.compute_features(served, rows, served.prompt, temps, ev)
    via_hf = C.compute_features(tiny, rows, tiny.prompt, temps, ev)
    assert via_llama.outputs == via_hf.outputs
    np.testing.assert_allclose(via_llama.logprob_at, via_hf.logprob_at, atol=1e-3)


def test_job_serves_the_gguf_with_the_adapter(tiny_dir: Path, tiny_gguf, tmp_path: Path) -> None:
    def job(root: Path, skip_adapter: bool) -> tuple[FakeContext, object]:
        ctx = FakeContext(root, make_rows(24, "c"), CalibrationConfig(t_points=5, min_split_rows=5))
        (ctx.dirs["2C"] / "model-q5_k_m.gguf").unlink()
        ctx.put("2C", tiny_gguf[0])
        for f in tiny_dir.iterdir():  # tokenizer, chat template, config.json ship beside the GGUF
            if f.suffix != ".safetensors":
                ctx.put("2C", f)
        ctx.inputs["2C"].info = {"gguf": "model-f32.gguf"}
        ctx.put("2E", tiny_gguf[1])
        ctx.config.gguf = GGUFConfig(n_ctx=128)
        if skip_adapter:
            ctx.inputs["2E"].status = "skipped"
        return ctx, C.run(ctx)

    ctx, result = job(tmp_path / "a", skip_adapter=False)
    bundle = json.loads((ctx.out_dir / "bundle.json").read_text())
    assert bundle["gguf"]["file"] == "model-f32.gguf" and bundle["runtime"] == "llama.cpp"
    assert bundle["adapter"]["sha256"] == sha256_file(tiny_gguf[1])
    assert "tokenizer_config.json" in bundle["tokenizer"]["files"]
    # a random tiny model answers nothing right: Platt falls back to the base rate, and says so
    assert result.quality["calib_acc"] == 0.0 and "base rate" in result.notes
    plain_ctx, plain = job(tmp_path / "b", skip_adapter=True)
    assert json.loads((plain_ctx.out_dir / "bundle.json").read_text())["adapter"] is None
    lp = lambda c: [json.loads(x)["logprob"] for x in (c.out_dir / "calibration_features.jsonl").open()]  # noqa: E731
    assert max(abs(a - b) for a, b in zip(lp(ctx), lp(plain_ctx), strict=True)) > 1e-3  # the LoRA is applied
