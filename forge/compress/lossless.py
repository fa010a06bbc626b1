"""Phase 2D: lossless compression of what ships, measured and verified: 2A's pruned HF model (the
GPU/vLLM path's source) and 2C's GGUF (the CPU path), side by side under `pruned/` and `gguf/`.

Weights (*.safetensors, *.gguf) are compressed with every configured scheme (plain zstd, byte planes +
zstd, zipnn); each is timed on one thread and checked bit-exact, and the best ratio is stored.
Small files (configs, tokenizer, chat template) share a zstd dictionary trained on them.
The output folder is self-describing (index.json) and `restore` rebuilds the exact originals.

    python -m forge.compress.lossless restore OUT_DIR DEST_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forge.artifacts import sha256_file
from forge.compress.codecs import LosslessError, decompress_blob, get_codec
from forge.compress.lossless_config import LosslessConfig

log = logging.getLogger("forge.compress")

INDEX = "index.json"
REPORT = "lossless_report.json"
DICT_FILE = "zstd.dict"
STORED_DIR = "files"
SUFFIX = ".fgz"
SAMPLE_CHUNK = 4096  # small files are cut into chunks so zstd has enough samples to train on
DECOMPRESS_REPEATS = 3
REPEAT_BELOW = 256 << 20


@dataclass
class SchemeResult:
    """One codec measured over a group of files (throughputs on one thread, in MB/s = 1e6 B/s)."""

    scheme: str
    bytes_in: int = 0
    bytes_out: int = 0
    compress_s: float = 0.0
    decompress_s: float = 0.0
    files: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0

    @property
    def saved_pct(self) -> float:
        return 100.0 * (1 - self.bytes_out / self.bytes_in) if self.bytes_in else 0.0

    def summary(self) -> dict[str, float | int | str]:
        mb = self.bytes_in / 1e6
        return {
            "scheme": self.scheme, "files": self.files,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "ratio": round(self.ratio, 5), "saved_pct": round(self.saved_pct, 3),
            "compress_mbps": round(mb / self.compress_s, 2) if self.compress_s else 0.0,
            "decompress_mbps": round(mb / self.decompress_s, 2) if self.decompress_s else 0.0,
        }


@dataclass
class StoredFile:
    path: str  # relative to the model folder, posix
    stored: str  # relative to the output folder
    codec: str
    size: int
    sha256: str
    stored_size: int


@dataclass
class FolderResult:
    weights: dict[str, SchemeResult]
    best: str | None
    small: SchemeResult
    small_no_dict: SchemeResult
    dictionary_bytes: int
    dictionary_note: str
    files: list[StoredFile] = field(default_factory=list)


WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# the folders 2D packs: name in the output -> the phase whose output it is
SOURCES = {"pruned": "2A", "gguf": "2C"}


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES


def gather_sources(folders: dict[str, Path], dest: Path) -> Path:
    """One folder holding each source under its name (hard links: no copy of multi-GB weights).
    A local store's run folder also holds its manifest.json, the store's record of that run (run id,
    URIs, times): no part of the phase's output (a job may not write one), so it is left out."""
    import os

    from forge.artifacts import MANIFEST

    shutil.rmtree(dest, ignore_errors=True)
    for name, folder in folders.items():
        for p in sorted(q for q in folder.rglob("*") if q.is_file() and q != folder / MANIFEST):
            target = dest / name / p.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:  # another filesystem (or no hard links there): copy instead
                shutil.copy2(p, target)
    return dest


def train_dictionary(samples: list[bytes], dict_size: int) -> tuple[bytes | None, str]:
    """A zstd dictionary trained on chunks of the small files; None (and why) if zstd cannot train one."""
    import zstandard

    chunks = [s[i : i + SAMPLE_CHUNK] for s in samples for i in range(0, len(s), SAMPLE_CHUNK)]
    chunks = [c for c in chunks if c]
    if not chunks:
        return None, "no small files to train on"
    try:
        zdict = zstandard.train_dictionary(dict_size, chunks)
    except zstandard.ZstdError as e:  # too little sample data: zstd says "Src size is incorrect"
        return None, f"zstd could not train a dictionary on {sum(map(len, chunks))} bytes: {e}"
    data = zdict.as_bytes()
    return data, f"trained on {len(chunks)} chunks ({sum(map(len, chunks))} bytes), {len(data)} bytes"


def measure(scheme: str, data: bytes, level: int, dictionary: bytes | None, result: SchemeResult) -> bytes:
    """Compress and decompress once, timing both; raise unless the round trip is bit-exact."""
    codec = get_codec(scheme, level=level, dictionary=dictionary)
    t0 = time.perf_counter()
    blob = codec.compress(data)
    compress_s = time.perf_counter() - t0
    # Decompression is fast and noisy on a shared machine: best of a few runs unless the file is big.
    decompress_s = float("inf")
    for _ in range(DECOMPRESS_REPEATS if len(data) < REPEAT_BELOW else 1):
        t1 = time.perf_counter()
        back = codec.decompress(blob)
        decompress_s = min(decompress_s, time.perf_counter() - t1)
        if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            raise LosslessError(f"codec {scheme!r} did not round-trip bit-exactly")
    result.bytes_in += len(data)
    result.bytes_out += len(blob)
    result.compress_s += compress_s
    result.decompress_s += decompress_s
    result.files += 1
    return blob


def compress_folder(src: Path, dest: Path, cfg: LosslessConfig, scratch: Path) -> FolderResult:
    """Compress every file of `src` into `dest` (+ index.json, zstd.dict); `scratch` holds the losers."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"lossless input folder {src} does not exist")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise LosslessError(f"lossless input folder {src} has no files")
    weights = [p for p in files if is_weight_file(p)]
    small = [p for p in files if not is_weight_file(p)]
    dest.mkdir(parents=True, exist_ok=True)

    dictionary, note = train_dictionary([p.read_bytes() for p in small], cfg.dict_size)
    log.info("zstd dictionary: %s", note)
    if dictionary:
        (dest / DICT_FILE).write_bytes(dictionary)

    stored: list[StoredFile] = []
    small_res, plain_res = SchemeResult("small:zstd+dict"), SchemeResult("small:zstd")
    for p in small:
        data = p.read_bytes()
        measure("zstd", data, cfg.level, None, plain_res)  # the no-dictionary baseline, for the report
        blob = measure("zstd", data, cfg.level, dictionary, small_res)
        stored.append(_write(dest, src, p, data, blob, "zstd"))

    results = {s: SchemeResult(s) for s in cfg.schemes}
    candidates: dict[str, list[tuple[Path, Path]]] = {s: [] for s in cfg.schemes}
    for p in weights:
        data = p.read_bytes()
        for scheme in cfg.schemes:
            blob = measure(scheme, data, cfg.level, None, results[scheme])
            out = scratch / scheme / (p.relative_to(src).as_posix() + SUFFIX)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(blob)
            candidates[scheme].append((p, out))
            log.info("%s %s: %d -> %d bytes", scheme, p.name, len(data), len(blob))
    best = min(results, key=lambda s: results[s].bytes_out) if weights else None
    for p, blob_path in candidates[best] if best else []:
        target = dest / STORED_DIR / (p.relative_to(src).as_posix() + SUFFIX)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(blob_path, target)
        stored.append(StoredFile(p.relative_to(src).as_posix(), target.relative_to(dest).as_posix(), best,
                                 p.stat().st_size, sha256_file(p), target.stat().st_size))
    index = {"version": 1, "dictionary": DICT_FILE if dictionary else None,
             "dict_sha256": hashlib.sha256(dictionary).hexdigest() if dictionary else None,
             "files": [asdict(f) for f in stored]}
    (dest / INDEX).write_text(json.dumps(index, indent=2))
    return FolderResult(results, best, small_res, plain_res, len(dictionary or b""), note, stored)


def _write(dest: Path, src: Path, p: Path, data: bytes, blob: bytes, codec: str) -> StoredFile:
    rel = p.relative_to(src).as_posix()
    target = dest / STORED_DIR / (rel + SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(blob)
    return StoredFile(rel, target.relative_to(dest).as_posix(), codec, len(data),
                      hashlib.sha256(data).hexdigest(), len(blob))


def restore(src: str | Path, dest: str | Path) -> list[Path]:
    """Rebuild the original files of a 2D output folder into `dest`, each checked against its sha256."""
    src, dest = Path(src), Path(dest)
    index_path = src / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: {src} is not a lossless (2D) output folder")
    index = json.loads(index_path.read_text())
    dictionary = None
    if index.get("dictionary"):
        dictionary = (src / index["dictionary"]).read_bytes()
        if hashlib.sha256(dictionary).hexdigest() != index["dict_sha256"]:
            raise LosslessError(f"{src / index['dictionary']} does not match the sha256 in {index_path}")
    written = []
    for entry in index["files"]:
        blob_path = src / entry["stored"]
        try:
            data = decompress_blob(blob_path.read_bytes(), dictionary)
        except LosslessError as e:
            raise LosslessError(f"{blob_path}: {e}") from e
        if hashlib.sha256(data).hexdigest() != entry["sha256"] or len(data) != entry["size"]:
            raise LosslessError(f"{blob_path} decodes to bytes whose sha256 differs from {entry['path']}'s")
        out = dest / entry["path"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        written.append(out)
    return written


def verify_restore(src_model: Path, compressed: Path, scratch: Path) -> int:
    """Restore from disk and compare every file's sha256 with the original; returns files checked."""
    if scratch.exists():
        shutil.rmtree(scratch)
    restored = restore(compressed, scratch)
    originals = sorted(p.relative_to(src_model).as_posix() for p in src_model.rglob("*") if p.is_file())
    got = sorted(p.relative_to(scratch).as_posix() for p in restored)
    if got != originals:
        raise LosslessError(f"restore produced {got}, expected the files {originals}")
    for rel in originals:
        if sha256_file(src_model / rel) != sha256_file(scratch / rel):
            raise LosslessError(f"restored {rel} differs from the original (sha256 mismatch)")
    return len(originals)


def per_file(res: FolderResult) -> list[dict[str, Any]]:
    """What each stored file became: size before/after and the codec that stored it."""
    return [{"path": f.path, "codec": f.codec, "bytes_in": f.size, "bytes_out": f.stored_size,
             "saved_pct": round(100 * (1 - f.stored_size / f.size), 3) if f.size else 0.0} for f in res.files]


def build_report(res: FolderResult, cfg: LosslessConfig) -> dict[str, Any]:
    stored_in = sum(f.size for f in res.files)
    stored_out = sum(f.stored_size for f in res.files) + res.dictionary_bytes
    return {
        "config": cfg.model_dump(),
        "weights": {s: r.summary() for s, r in res.weights.items()},
        "best_scheme": res.best,
        "small_files": {"with_dictionary": res.small.summary(),
                        "without_dictionary": res.small_no_dict.summary(),
                        "dictionary_bytes": res.dictionary_bytes, "dictionary": res.dictionary_note},
        "total": {"bytes_in": stored_in, "bytes_out": stored_out,
                  "ratio": round(stored_in / stored_out, 5) if stored_out else 0.0,
                  "saved_pct": round(100 * (1 - stored_out / stored_in), 3) if stored_in else 0.0},
    }


def without_throughputs(report: Any) -> Any:
    """The report minus its MB/s figures (they differ between two runs of the same inputs)."""
    if isinstance(report, dict):
        return {k: without_throughputs(v) for k, v in report.items() if not k.endswith("_mbps")}
    if isinstance(report, list):
        return [without_throughputs(v) for v in report]
    return report


def run(ctx: Any):
    """Job of 2D: 2A's pruned model + 2C's GGUF -> compressed files, dictionary, report in ctx.out_dir."""
    from forge.runner import JobResult

    cfg: LosslessConfig = ctx.config.lossless
    folders = {name: ctx.input_dir(phase) for name, phase in SOURCES.items()}
    for name, suffix in (("pruned", ".safetensors"), ("gguf", ".gguf")):
        if not any(folders[name].glob(f"*{suffix}")):
            raise FileNotFoundError(f"phase {SOURCES[name]} output has no {suffix} model at {folders[name]}")
    model_dir = gather_sources(folders, ctx.work_dir / "sources")
    res = compress_folder(model_dir, ctx.out_dir, cfg, ctx.work_dir / "candidates")
    checked = verify_restore(model_dir, ctx.out_dir, ctx.work_dir / "restored")  # before we return success
    report = build_report(res, cfg)
    report["verified_files"] = checked
    report["per_file"] = per_file(res)
    # throughputs are wall-clock measurements: metrics only, so a re-run writes the same report bytes
    (ctx.out_dir / REPORT).write_text(json.dumps(without_throughputs(report), indent=2))
    ctx.log_artifact(ctx.out_dir / REPORT)

    metrics: dict[str, float] = {}
    for scheme, r in report["weights"].items():
        for k in ("ratio", "saved_pct", "compress_mbps", "decompress_mbps"):
            metrics[f"{scheme}.{k}"] = float(r[k])
    for label, key in (("small", "with_dictionary"), ("small_nodict", "without_dictionary")):
        metrics[f"{label}.saved_pct"] = float(report["small_files"][key]["saved_pct"])
    metrics["total.saved_pct"] = float(report["total"]["saved_pct"])
    best = res.best
    quality = {"saved_pct": float(report["total"]["saved_pct"]), "ratio": float(report["total"]["ratio"])}
    if best:
        quality["scheme"] = float(cfg.schemes.index(best))
        quality["weights_saved_pct"] = float(report["weights"][best]["saved_pct"])
    notes = (f"weights stored with {best} ({report['weights'][best]['saved_pct']:.2f}% saved); " if best else
             "no weight files; ") + f"{checked} files restored bit-exact; dictionary: {res.dictionary_note}"
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"scheme": best, "files": checked, "dictionary": bool(res.dictionary_bytes),
                           "index": INDEX, "report": REPORT})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forge.compress.lossless")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("restore", help="rebuild the original files of a 2D output folder (sha256-checked)")
    r.add_argument("src")
    r.add_argument("dest")
    args = parser.parse_args(argv)
    paths = restore(args.src, args.dest)
    print(f"restored {len(paths)} files into {args.dest}, all sha256-verified")


if __name__ == "__main__":
    main()
