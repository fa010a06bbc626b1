"""Chat-format example rows: the one schema every phase reads and writes (JSONL).

A row: {"id": str, "domain": str, "messages": [{"role": "user"|"system"|"assistant",
"content": str}, ...], "check": {"kind": ..., ...}, "source": str}. The last message is the
reference assistant answer; `check` says how to verify a model's answer (forge.data.suites).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A bad dataset row or file; the message names the file, the row and the field."""


def stable_int(text: str) -> int:
    """A 64-bit number from a string, the same on every machine and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stable_unit(text: str) -> float:
    """A uniform number in [0, 1) from a string: the same row lands on the same side of a split every run."""
    return stable_int(text) / 2**64


def validate_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("id", "domain", "messages"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
    msgs = row["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least 2 messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}}")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's reference answer")
    return row


def read_json_objects(path: str | Path, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """JSONL of objects that are not chat rows (eval records, cascade results): each must carry `required`;
    errors name the file and line."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise DataError(f"{path}:{n}: {what} needs field(s) {missing}")
        out.append(obj)
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            rows.append(validate_row(row, f"{path}:{n}"))
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Everything but the reference answer."""
    return row["messages"][:-1]


def reference(row: dict[str, Any]) -> str:
    return row["messages"][-1]["content"]


def iter_text(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        for m in row["messages"]:
            yield m["content"]
