"""llama.cpp's own tooling, pinned to the installed llama-cpp-python: HF -> GGUF conversion, LoRA -> GGUF,
and quantization.

The llama-cpp-python wheel ships the library but not llama.cpp's Python converters. Its sdist (same
version, so the same llama.cpp commit) does: `convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, the
`conversion/` package (one module per architecture) and `gguf-py` (its own, newer gguf). `ensure_tools()`
extracts exactly those once per version; the converters then run as subprocesses through a small
wrapper that lets a locally trained BPE tokenizer, whose pre-tokenizer hash llama.cpp cannot know, use a
configured pre-tokenizer instead of failing (and records that in the GGUF's metadata).

CLI: `python -m forge.compress.llama_cpp_tools install` extracts the tools and installs their gguf-py
into the current venv (transformers' GGUF loading then reads files written by the same gguf).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("forge.compress")

DIST = "llama-cpp-python"
ENV_TOOLS = "FORGE_LLAMA_CPP_TOOLS"  # a folder holding the parts below (overrides the default location)
ENV_SDIST = "FORGE_LLAMA_CPP_SDIST"  # a local sdist tarball to extract instead of downloading one
PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
SDIST_ROOT = "vendor/llama.cpp/"  # where the parts sit inside the sdist, below its top folder
FALLBACK_KEY = "forge.bpe_pre_tokenizer_fallback"  # GGUF metadata written when the fallback was used
STDERR_TAIL_LINES = 40


class LlamaCppToolsError(RuntimeError):
    """The converters could not be fetched or failed; the message says what and where."""


# ---- where the tools live ----------------------------------------------------------------------

def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise LlamaCppToolsError(f"{DIST} is not installed in {sys.prefix}; run scripts/setup.sh "
                                 f"(requirements.txt pins it)") from None


def tools_dir() -> Path:
    """$FORGE_LLAMA_CPP_TOOLS, else <venv>/share/forge/llama.cpp-<installed llama-cpp-python version>."""
    override = os.environ.get(ENV_TOOLS)
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "forge" / f"llama.cpp-{llama_cpp_version()}"


def tools_complete(path: Path) -> bool:
    return all((path / part).exists() for part in PARTS)


def ensure_tools() -> Path:
    """The converter folder, extracted from the pinned sdist the first time (atomically: a temp folder
    beside the target, renamed into place, so a killed extraction is never taken for a complete one)."""
    target = tools_dir()
    if tools_complete(target):
        return target
    if os.environ.get(ENV_TOOLS) and target.exists():
        raise LlamaCppToolsError(f"{ENV_TOOLS}={target} lacks some of {list(PARTS)}")
    version = llama_cpp_version()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        local = os.environ.get(ENV_SDIST)
        sdist = Path(local) if local else download_sdist(version, Path(tmp))
        staged = Path(tmp) / "tools"
        extract_parts(sdist, staged)
        (staged / "SOURCE").write_text(f"{DIST}=={version} sdist {sdist.name}\n")
        try:
            staged.rename(target)
        except OSError:  # another process won the race: fine if what it left is complete
            if not tools_complete(target):
                raise
    log.info("llama.cpp converters for %s %s extracted to %s", DIST, version, target)
    return target


def download_sdist(version: str, dest: Path) -> Path:
    """`pip download` of the pinned sdist (pip's cache makes a repeat cheap)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{DIST}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise LlamaCppToolsError(
            f"could not download the {DIST}=={version} sdist with pip (offline?). Point {ENV_SDIST} at the "
            f"tarball or {ENV_TOOLS} at a folder holding {list(PARTS)}. pip said:\n{tail(proc.stderr)}")
    return found[0]


def extract_parts(sdist: Path, dest: Path) -> None:
    """Only the converter parts, from <top>/vendor/llama.cpp/ of the sdist, into dest."""
    if not sdist.is_file():
        raise LlamaCppToolsError(f"sdist {sdist} does not exist")
    with tarfile.open(sdist) as tar:
        picked = []
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            if not rest.startswith(SDIST_ROOT):
                continue
            rel = rest[len(SDIST_ROOT):]
            if any(rel == p or rel.startswith(p + "/") for p in PARTS):
                picked.append(member.replace(name=rel, deep=False))
        tar.extractall(dest, members=picked, filter="data")
    missing = [p for p in PARTS if not (dest / p).exists()]
    if missing:
        raise LlamaCppToolsError(f"sdist {sdist} has no {[SDIST_ROOT + m for m in missing]}")


def known_pre_tokenizers(tools: Path) -> list[str]:
    """The pre-tokenizer names llama.cpp's converter can write (its hash table's right-hand sides)."""
    src = (tools / "conversion" / "base.py").read_text()
    start, end = src.find("Marker: Start get_vocab_base_pre"), src.find("Marker: End get_vocab_base_pre")
    if start < 0 or end < 0:
        raise LlamaCppToolsError(f"{tools}/conversion/base.py has no get_vocab_base_pre markers "
                                 "(llama.cpp changed its layout)")
    return sorted(set(re.findall(r'res = "([^"]+)"', src[start:end])))


def gguf_py_dir() -> Path:
    """The tools' own gguf-py folder (present once ensure_tools() ran)."""
    return tools_dir() / "gguf-py"


def gguf_module() -> Any:
    """The gguf package: the installed one, else the tools' own gguf-py."""
    try:
        import gguf
    except ImportError:
        ensure_tools()
        sys.path.insert(0, str(gguf_py_dir()))
        import gguf
    return gguf


# ---- running the converters ----------------------------------------------------------------------

# Runs one converter script as __main__ after patching the pre-tokenizer lookup: an unrecognised
# BPE pre-tokenizer uses the fallback ("" = none) and the GGUF records that it did (under `key`).
_WRAPPER = """
import runpy, sys
tools, fallback, key, script, *args = sys.argv[1:]
sys.path.insert(0, tools)
from conversion import base
original = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        if not fallback:
            raise
        print(f"forge: BPE pre-tokenizer not recognized, using fallback {fallback!r}", file=sys.stderr)
        self.gguf_writer.add_string(key, fallback)
        return fallback

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def tail(text: str, n: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_converter(script: str, args: list[str], bpe_fallback: str | None, what: str) -> str:
    """Run a converter in a subprocess; returns its stderr (its log), raises with the log's tail."""
    tools = ensure_tools()
    cmd = [sys.executable, "-c", _WRAPPER, str(tools), bpe_fallback or "", FALLBACK_KEY, str(tools / script),
           *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tools)
    if proc.returncode != 0:
        raise LlamaCppToolsError(f"llama.cpp {script} failed on {what} (exit {proc.returncode}):\n"
                                 f"{tail(proc.stderr + proc.stdout)}")
    log.info("llama.cpp %s: %s in %.1fs", script, what, time.perf_counter() - started)
    return proc.stderr


def _check_outtype(outtype: str, allowed: tuple[str, ...]) -> None:
    if outtype not in allowed:
        raise ValueError(f"outtype {outtype!r} is not one of {list(allowed)}")


def convert_hf_to_gguf(model_dir: str | Path, out_file: str | Path, outtype: str = "f16",
                       bpe_fallback: str | None = None) -> Path:
    """An HF model folder -> one GGUF file. bpe_fallback: the pre-tokenizer to use when llama.cpp does
    not recognise the tokenizer's (a locally trained one); the GGUF then carries FALLBACK_KEY."""
    model_dir, out_file = Path(model_dir).resolve(), Path(out_file).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no HF model to convert at {model_dir} (config.json missing)")
    _check_outtype(outtype, ("f32", "f16", "bf16", "q8_0"))
    tools = ensure_tools()
    if bpe_fallback:
        known = known_pre_tokenizers(tools)
        if bpe_fallback not in known:
            raise ValueError(f"gguf.bpe_pre_tokenizer_fallback={bpe_fallback!r} is not a pre-tokenizer "
                             f"llama.cpp knows; pick one of {known}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out_file), "--outtype", outtype],
                  bpe_fallback, str(model_dir))
    if not out_file.is_file():
        raise LlamaCppToolsError(f"convert_hf_to_gguf.py exited cleanly but wrote no {out_file}")
    return out_file


def convert_lora_to_gguf(adapter_dir: str | Path, base_model_dir: str | Path, out_file: str | Path,
                         outtype: str = "f16") -> Path:
    """A peft LoRA adapter folder -> a GGUF LoRA for llama.cpp (`Llama(lora_path=...)`). The base folder
    gives the architecture (its config.json); its weights are not read."""
    adapter_dir, base_model_dir = Path(adapter_dir).resolve(), Path(base_model_dir).resolve()
    out_file = Path(out_file).resolve()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no peft adapter at {adapter_dir} (adapter_config.json missing)")
    if not any((adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"no adapter weights at {adapter_dir} (adapter_model.safetensors missing)")
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no base model config at {base_model_dir} (config.json missing)")
    _check_outtype(outtype, ("f32", "f16", "bf16", "q8_0"))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    run_converter("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_model_dir),
                                              "--outfile", str(out_file), "--outtype", outtype],
                  None, str(adapter_dir))
    if not out_file.is_file():
        raise LlamaCppToolsError(f"convert_lora_to_gguf.py exited cleanly but wrote no {out_file}")
    return out_file


# ---- quantization -------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Route llama.cpp's log into a list while the block runs, then give it back to llama-cpp-python."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def ftype_for(quant_type: str) -> int:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type.upper()}", None)
    if ftype is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown llama.cpp quant type {quant_type!r}; known: {known}")
    return ftype


def quantize(src_gguf: str | Path, dst_gguf: str | Path, quant_type: str, n_threads: int = 1,
             log_lines: list[str] | None = None) -> Path:
    """llama_model_quantize(src -> dst) as LLAMA_FTYPE_MOSTLY_<quant_type> on n_threads threads.
    llama.cpp's log of it (per-tensor types, fallbacks) is appended to log_lines when given."""
    import ctypes

    import llama_cpp

    src, dst = Path(src_gguf), Path(dst_gguf)
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF to quantize at {src}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant_type)
    params.nthread = n_threads
    dst.parent.mkdir(parents=True, exist_ok=True)
    llama_cpp.llama_backend_init()
    with captured_llama_log() as chunks:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    lines = "".join(chunks).splitlines()
    if log_lines is not None:
        log_lines.extend(lines)
    if rc != 0 or not dst.is_file():
        raise LlamaCppToolsError(f"llama_model_quantize {src} -> {dst} as {quant_type} failed (rc {rc}):\n"
                                 + "\n".join(lines[-STDERR_TAIL_LINES:]))
    return dst


_FALLBACK_RE = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) "
                          r"\(required for type\s+(\S+)\).*-> falling back to\s+(\S+)")


def quant_fallbacks(log_lines: list[str]) -> list[dict[str, Any]]:
    """The tensors llama.cpp quantized with a fallback type because their rows do not fit the block size."""
    out = []
    for line in log_lines:
        m = _FALLBACK_RE.search(line)
        if m:
            out.append({"tensor": m[1], "ncols": int(m[2]), "block": int(m[3]), "wanted": m[4], "used": m[5]})
    return out


# ---- reading GGUF files -----------------------------------------------------------------------

def _scalar_metadata(gguf: Any, reader: Any) -> dict[str, Any]:
    """Every one-value metadata field (strings decoded, numbers as Python numbers); arrays are left out."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.types) != 1 or len(field.data) != 1:
            continue
        part = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            meta[key] = bytes(part).decode("utf-8", errors="replace")
        else:
            meta[key] = part[0].item()
    return meta


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    gguf = gguf_module()
    return _scalar_metadata(gguf, gguf.GGUFReader(str(path)))


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """Tensor types, element count, bits per weight and the scalar metadata of a GGUF file."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    elements = data_bytes = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        elements += int(t.n_elements)
        data_bytes += int(t.n_bytes)
    return {"tensor_types": types, "n_tensors": len(reader.tensors), "n_elements": elements,
            "tensor_bytes": data_bytes, "bits_per_weight": 8 * data_bytes / max(elements, 1),
            "file_bytes": Path(path).stat().st_size, "metadata": _scalar_metadata(gguf, reader)}


# ---- CLI ---------------------------------------------------------------------------------------

def _package_digest(pkg_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(pkg_dir.rglob("*.py")):
        h.update(f.relative_to(pkg_dir).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def install_gguf_py(tools: Path) -> str:
    """pip-install the tools' gguf-py into this venv (--no-deps) unless the installed gguf has the same
    sources (PyPI's gguf can carry the same version number with older code, so compare the files)."""
    import importlib.util

    spec = importlib.util.find_spec("gguf")
    installed = Path(spec.origin).parent if spec and spec.origin else None
    if installed and _package_digest(installed) == _package_digest(tools / "gguf-py" / "gguf"):
        return f"gguf from {tools / 'gguf-py'} already installed"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                           "--disable-pip-version-check", "-q", str(tools / "gguf-py")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlamaCppToolsError(f"pip install {tools / 'gguf-py'} failed:\n{tail(proc.stderr)}")
    return f"gguf installed from {tools / 'gguf-py'} (replacing {installed or 'nothing'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge.compress.llama_cpp_tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="extract the converters (once per version) and install their gguf-py")
    sub.add_parser("where", help="print the converter folder")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "where":
            print(tools_dir())
            return 0
        fresh = not tools_complete(tools_dir())
        tools = ensure_tools()
        done = install_gguf_py(tools)
        if fresh or "already" not in done:
            print(f"llama.cpp tools: {tools}; {done}")
    except LlamaCppToolsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
