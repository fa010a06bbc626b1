"""Tiny jobs for testing the runner contract without any ML (they count their own calls)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from forge.phases import Phase
from forge.runner import JobContext, JobResult


def _count(name: str) -> None:
    with open(Path(os.environ["FORGE_HOME"]) / "calls.log", "a") as f:
        f.write(name + "\n")


def calls(name: str) -> int:
    path = Path(os.environ["FORGE_HOME"]) / "calls.log"
    return path.read_text().split().count(name) if path.exists() else 0


def produce(ctx: JobContext) -> JobResult:
    _count("produce")
    (ctx.out_dir / "numbers.json").write_text(json.dumps(list(range(ctx.config.data.seed % 50))))
    (ctx.out_dir / "sub").mkdir()
    (ctx.out_dir / "sub" / "note.txt").write_text("hello")
    n = ctx.config.data.seed % 50
    return JobResult(metrics={"n": n}, quality={"n": float(n)})


def consume(ctx: JobContext) -> JobResult:
    _count("consume")
    numbers = json.loads((ctx.input_dir("fa") / "numbers.json").read_text())
    (ctx.out_dir / "sum.txt").write_text(str(sum(numbers)))
    return JobResult(metrics={"sum": sum(numbers)}, register="sum.txt")


def live_read(ctx: JobContext) -> JobResult:
    """Reads a file outside the store (as 13A reads serving feedback); nothing there: skip, saying so."""
    from forge.runner import PhaseSkipped

    text = (Path(os.environ["FORGE_HOME"]) / "live.txt").read_text()
    if not text:
        raise PhaseSkipped("nothing to read this time")
    (ctx.out_dir / "seen.txt").write_text(text)
    return JobResult()


def after_live(ctx: JobContext) -> JobResult:
    _count("after_live")
    (ctx.out_dir / "upper.txt").write_text((ctx.input_dir("live") / "seen.txt").read_text().upper())
    return JobResult()


def explode_midway(ctx: JobContext) -> JobResult:
    _count("explode")
    (ctx.out_dir / "half.bin").write_bytes(b"x" * 1000)
    raise RuntimeError("killed while writing")


FAKE_PHASES = (
    Phase("fa", "fa_produce", "fake", "Produce", "tests.fake_jobs:produce", (), ("data",)),
    Phase("fb", "fb_consume", "fake", "Consume", "tests.fake_jobs:consume", ("fa",), ("data",)),
    Phase("fx", "fx_explode", "fake", "Explode", "tests.fake_jobs:explode_midway", ("fa",), ()),
    Phase("fs", "fs_skipped", "fake", "Skipped", "tests.fake_jobs:produce", ("fa",), (),
          skip=lambda cfg: None if cfg.vocab.trim_enabled else "off by default"),
)
