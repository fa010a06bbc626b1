"""Per-request timings of the routing stack (6A's router, 6B's detector, benchmarks/routing.py), all
measured the same way: one thread, steady state (one untimed pass first: the first call at each new input
length allocates), the garbage collector off while timing, like timeit."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n intra-op torch threads, then restore the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], n: int | None = None) -> np.ndarray:
    """Milliseconds of fn(x), one call at a time, for n inputs (cycled; default: each once)."""
    items = [inputs[i % len(inputs)] for i in range(n or len(inputs))]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch_threads(1):
            for x in items:
                fn(x)
            times = []
            for x in items:
                start = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        if was_enabled:
            gc.enable()
    return np.asarray(times)


def summary(ms: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "n": float(len(ms))}
