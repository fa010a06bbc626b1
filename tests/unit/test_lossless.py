"""Phase 2D lossless codecs, dictionary, job and restore: everything must come back bit-exact."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save

from forge.compress import lossless
from forge.compress.byteplanes import from_planes, split_safetensors, to_planes
from forge.compress.codecs import REGISTRY, LosslessError, decompress_blob, get_codec
from forge.compress.lossless_config import KNOWN_SCHEMES, LosslessConfig

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def weights_file(dtype: torch.dtype, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "w": (torch.randn(64, 96, generator=g) * 0.02).to(dtype),
        "odd": torch.randn(333, generator=g).to(dtype),  # odd element count
        "norm": torch.ones(17, dtype=dtype),
        "ids": torch.arange(11, dtype=torch.int64),  # non-float: kept out of the planes
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, dtype=dtype),
    }
    return save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scheme", list(KNOWN_SCHEMES))
def test_codecs_round_trip_safetensors_bit_exact(scheme: str, dtype: str) -> None:
    data = weights_file(DTYPES[dtype])
    codec = get_codec(scheme, level=3)
    blob = codec.compress(data)
    assert codec.decompress(blob) == data
    assert decompress_blob(blob) == data  # the container names its codec


@pytest.mark.parametrize("scheme", list(KNOWN_SCHEMES))
@pytest.mark.parametrize("size", [0, 1, 7, 8, 1001])
def test_codecs_round_trip_arbitrary_bytes(scheme: str, size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert get_codec(scheme, level=3).decompress(get_codec(scheme, level=3).compress(data)) == data


def test_segments_cover_the_file_and_fall_back_on_garbage() -> None:
    data = memoryview(weights_file(torch.bfloat16))
    segs = split_safetensors(data)
    assert segs[0].start == 0 and segs[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(segs, segs[1:], strict=False))
    assert {s.dtype for s in segs} == {None, "BF16"}
    lying = (10**6).to_bytes(8, "little") + b"{}"  # header length past the end of the file
    assert [s.dtype for s in split_safetensors(memoryview(lying))] == [None]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_byte_planes_invert_every_bit_pattern(dtype: str) -> None:
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    raw = np.arange(65536, dtype=np.uint16).tobytes() * (width // 2)  # NaNs, infs, -0, subnormals
    raw += bytes([0xFF, 0x7F, 0x80, 0x00]) * width
    planes = to_planes(memoryview(raw), dtype)
    assert len(planes) == width
    assert from_planes([p.tobytes() for p in planes], dtype) == raw


def test_byte_planes_beat_plain_zstd_on_bf16() -> None:
    t = (torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    data = save({"w": t})
    plain = len(get_codec("zstd", level=3).compress(data))
    planes = len(get_codec("byteplane-zstd", level=3).compress(data))
    assert planes < 0.95 * plain


def small_json_files(n: int) -> list[bytes]:
    rng = random.Random(0)
    return [json.dumps({
        "base_model_name_or_path": "forge/demo", "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": rng.choice([8, 16, 32]), "lora_alpha": rng.choice([16, 32]), "lora_dropout": rng.random(),
        "target_modules": rng.sample(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], 3),
        "domain": f"domain_{i}", "revision": hashlib.sha1(str(i).encode()).hexdigest(),
    }, indent=2).encode() for i in range(n)]


def test_dictionary_helps_small_json_files() -> None:
    files = small_json_files(80)
    dictionary, note = lossless.train_dictionary(files[:60], 131072)
    assert dictionary, note
    held_out = files[60:]  # files the dictionary never saw, as a later adapter's config would be
    plain = sum(len(get_codec("zstd", level=19).compress(f)) for f in held_out)
    with_dict = sum(len(get_codec("zstd", level=19, dictionary=dictionary).compress(f)) for f in held_out)
    assert with_dict < 0.7 * plain
    blob = get_codec("zstd", dictionary=dictionary).compress(held_out[0])
    assert decompress_blob(blob, dictionary) == held_out[0]
    with pytest.raises(LosslessError, match="dictionary"):
        decompress_blob(blob)


def test_dictionary_training_on_too_little_data_says_why() -> None:
    dictionary, note = lossless.train_dictionary([b'{"a": 1}'], 131072)
    assert dictionary is None and "could not train" in note


@pytest.mark.parametrize("scheme", list(KNOWN_SCHEMES))
def test_corrupted_blob_fails_clearly(scheme: str) -> None:
    data = weights_file(torch.bfloat16)
    blob = bytearray(get_codec(scheme, level=3).compress(data))
    flipped = bytearray(blob)
    flipped[-50] ^= 0xFF
    with pytest.raises(LosslessError):
        decompress_blob(bytes(flipped))
    with pytest.raises(LosslessError):
        decompress_blob(bytes(blob[:-10]))
    with pytest.raises(LosslessError, match="magic"):
        decompress_blob(b"XXXX" + bytes(blob[4:]))


def test_config_validates_fields() -> None:
    assert set(KNOWN_SCHEMES) == set(REGISTRY)
    assert LosslessConfig().level == 19 and LosslessConfig().dict_size == 131072
    for bad in ({"level": 0}, {"level": 23}, {"schemes": ["gzip"]}, {"schemes": []}, {"dict_size": 10}):
        with pytest.raises(ValidationError):
            LosslessConfig(**bad)


class FakeContext(SimpleNamespace):
    """What run(ctx) uses of forge.runner.JobContext: 2A's and 2C's output folders, the config."""

    def input_dir(self, phase_id: str) -> Path:
        return {"2A": self.upstream, "2C": self.gguf}[phase_id]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


def make_model_folder(root: Path) -> Path:
    merged = root / "merged"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(weights_file(torch.bfloat16, seed=3))
    (merged / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}, indent=2))
    vocab = {f"tok{i}": i for i in range(3000)}
    (merged / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}, indent=2))
    (merged / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>\n{% endfor %}")
    return merged


def make_gguf_folder(root: Path) -> Path:
    """2C's output shape: a GGUF file (magic + quantized-looking blocks) and the tokenizer beside it."""
    import numpy as np

    folder = root / "gguf"
    folder.mkdir(parents=True)
    blocks = np.random.default_rng(5).integers(0, 16, size=200_000, dtype=np.uint8)  # 4-bit-ish values
    (folder / "model-q5_k_m.gguf").write_bytes(b"GGUF" + blocks.tobytes())
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}, indent=2))
    return folder


def test_job_compresses_measures_and_restores(tmp_path: Path) -> None:
    merged = make_model_folder(tmp_path / "up")
    gguf = make_gguf_folder(tmp_path / "up")
    ctx = FakeContext(upstream=merged, gguf=gguf, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                      config=SimpleNamespace(lossless=LosslessConfig(level=3)), metrics={}, artifacts=[])
    ctx.out_dir.mkdir()
    result = lossless.run(ctx)

    report = json.loads((ctx.out_dir / "lossless_report.json").read_text())
    assert set(report["weights"]) == set(KNOWN_SCHEMES)
    best = report["best_scheme"]
    assert all(report["weights"][best]["bytes_out"] <= r["bytes_out"] for r in report["weights"].values())
    weight_bytes = (merged / "model.safetensors").stat().st_size + (gguf / "model-q5_k_m.gguf").stat().st_size
    for scheme, r in report["weights"].items():
        assert r["bytes_in"] == weight_bytes and r["files"] == 2
        # throughputs are wall-clock: metrics only, the report file stays the same bytes on a re-run
        assert "compress_mbps" not in r and "decompress_mbps" not in r
        assert all(result.metrics[f"{scheme}.{k}"] > 0 for k in ("compress_mbps", "decompress_mbps"))
    assert report["verified_files"] == 6
    assert {f["path"] for f in report["per_file"]} >= {"pruned/model.safetensors", "gguf/model-q5_k_m.gguf"}
    assert (ctx.out_dir / "zstd.dict").is_file()
    assert set(result.quality) >= {"saved_pct", "ratio", "scheme"}
    assert result.quality["scheme"] == float(list(KNOWN_SCHEMES).index(best))
    assert 0 < result.quality["saved_pct"] < 100 and result.quality["ratio"] > 1
    assert f"{best}.ratio" in result.metrics
    assert ctx.metrics == {}  # the runner logs JobResult.metrics; the job does not log them twice
    assert not list(ctx.out_dir.rglob("*.safetensors")) and not list(ctx.out_dir.rglob("*.gguf"))

    restored = lossless.restore(ctx.out_dir, tmp_path / "restored")
    assert len(restored) == 6
    for name, folder in (("pruned", merged), ("gguf", gguf)):
        for p in folder.iterdir():
            assert (tmp_path / "restored" / name / p.name).read_bytes() == p.read_bytes()

    lossless.main(["restore", str(ctx.out_dir), str(tmp_path / "cli")])
    weights = (merged / "model.safetensors").read_bytes()
    assert (tmp_path / "cli" / "pruned" / "model.safetensors").read_bytes() == weights

    stored = ctx.out_dir / "files" / "pruned" / "model.safetensors.fgz"
    damaged = bytearray(stored.read_bytes())
    damaged[-100] ^= 0x01
    stored.write_bytes(bytes(damaged))
    with pytest.raises(LosslessError, match="model.safetensors"):
        lossless.restore(ctx.out_dir, tmp_path / "again")


def test_job_fails_clearly_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    ctx = FakeContext(upstream=tmp_path / "up", gguf=make_gguf_folder(tmp_path), out_dir=tmp_path / "out",
                      work_dir=tmp_path / "work", config=SimpleNamespace(lossless=LosslessConfig()),
                      metrics={}, artifacts=[])
    with pytest.raises(FileNotFoundError, match=r"2A output has no \.safetensors"):
        lossless.run(ctx)
