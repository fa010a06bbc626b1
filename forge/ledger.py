"""The run's quality ledger: one row per phase (size, time, quality), JSON rows + a Markdown table.

Rows are separate objects (runs/<run>/ledger/<phase>.json) so parallel tasks never race on
one file; ledger.md is re-rendered from all rows after each write.
"""

from __future__ import annotations

import json
from typing import Any

from forge.artifacts import ArtifactStore, safe_run_id

COLUMNS = ("phase", "title", "status", "cached", "seconds", "output_mb", "quality", "notes")


def _dir(store: ArtifactStore, run_id: str) -> str:
    return store.uri("runs", safe_run_id(run_id), "ledger")


def write_row(store: ArtifactStore, run_id: str, row: dict[str, Any]) -> None:
    store.write_text(f"{_dir(store, run_id)}/{row['phase']}.json", json.dumps(row, sort_keys=True))
    store.write_text(store.uri("runs", safe_run_id(run_id), "ledger.md"), render(read_rows(store, run_id)))


def read_rows(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    base = store._to_path(_dir(store, run_id))
    if not store.fs.exists(base):
        return []
    rows = []
    for path in sorted(store.fs.ls(base, detail=False)):
        if path.endswith(".json"):
            with store.fs.open(path, "r") as f:
                rows.append(json.load(f))
    from forge.phases import pipeline_phases  # registry order reads like the master table

    order = {p.id: i for i, p in enumerate(pipeline_phases())}
    return sorted(rows, key=lambda r: order.get(r["phase"], 999))


def with_deltas(after: dict[str, Any], before: dict[str, Any],
                keys: tuple[str, ...] = ("acc", "logprob")) -> dict[str, float]:
    """A step's quality row: its own numbers, plus <key>_before and delta_<key> against the step
    before it (measured on the same suite) for each key both have."""
    quality = {k: float(v) for k, v in after.items()}
    for key in keys:
        if key in after and before.get(key) is not None:
            quality[f"{key}_before"] = float(before[key])
            quality[f"delta_{key}"] = float(after[key]) - float(before[key])
    return quality


def _fmt_quality(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in q.items())


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            r.get("phase", ""), r.get("title", ""), r.get("status", ""),
            "yes" if r.get("cached") else "no", f"{r.get('seconds', 0):.1f}",
            f"{r.get('output_bytes', 0) / 1e6:.2f}", _fmt_quality(r.get("quality")),
            str(r.get("notes", "")).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
