"""Serving feedback: what the routed system logs per request, and how 13A reads it back for one week.

Serving (and 6D's replay) writes events as JSON lines, one part file per flush, under
`<feedback root>/dt=YYYY-MM-DD/<ms>-<pid>-<n>.jsonl` (the UTC date of the events). A part file is written
whole (temp + rename locally, one PUT on S3), so a reader never sees half of one. Three kinds of event:

  decision    {kind, ts, session_id, request_id, query, option, confidence, threshold, arm, escalated}
  rating      {kind, ts, session_id, request_id, rating: +1 | -1 ("up"/"down" accepted), comment?}
  escalation  {kind, ts, session_id, request_id (the answer the user rejected), message, score}

`ts` is seconds since the epoch (a number) or an ISO-8601 string with a timezone. `read_interval` keeps the
events of [start, end) and checks every line: a row that is not JSON, lacks a field, has a wrong type, an
unknown kind, or rates / escalates a request that no decision of the interval made ("unknown session",
"unknown request") is counted and skipped, with its file:line in the report: one bad row never stops the
week's retraining, and never reaches training either.

`labelled_examples` turns the valid events into router training signal: a thumbs-up says the routed option was
right for that query (+1), a thumbs-down or a detected escalation says it was not (-1); an explicit rating
outranks a detected escalation.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from forge.artifacts import ArtifactStore
from forge.data.records import stable_unit

KINDS = ("decision", "rating", "escalation")
_STR, _NUM, _BOOL = (str,), (int, float), (bool,)
# field -> accepted types, per kind (ts is checked apart: a number or an ISO string)
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "decision": {"session_id": _STR, "request_id": _STR, "query": _STR, "option": _STR, "confidence": _NUM,
                 "threshold": _NUM, "arm": _STR, "escalated": _BOOL},
    "rating": {"session_id": _STR, "request_id": _STR, "rating": (int, str)},
    "escalation": {"session_id": _STR, "request_id": _STR, "message": _STR, "score": _NUM},
}
RATINGS = {1: 1, -1: -1, "up": 1, "down": -1, "+1": 1, "-1": -1}
MAX_EXAMPLES = 20  # bad rows quoted in the report (all are counted)


class FeedbackError(ValueError):
    """One bad feedback event; the message names the field."""


def aware_datetime(value: str) -> datetime:
    """An ISO-8601 string that carries a timezone ("Z" too); ValueError saying which it lacks."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not ISO-8601") from None
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no timezone")
    return dt


def parse_ts(value: Any) -> float:
    """Seconds since the epoch from a number or an ISO-8601 string that carries a timezone."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FeedbackError(f"ts: expected epoch seconds or an ISO-8601 string, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            return aware_datetime(value).timestamp()
        except ValueError as exc:
            raise FeedbackError(f"ts: {exc}") from None
    if not math.isfinite(value):
        raise FeedbackError(f"ts: {value!r} is not a finite number")
    return float(value)


def validate_event(obj: Any) -> dict[str, Any]:
    """The event with `ts` as epoch seconds (and a rating as +1/-1); FeedbackError names what is wrong."""
    if not isinstance(obj, dict):
        raise FeedbackError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in REQUIRED:
        raise FeedbackError(f"kind: {kind!r} is not one of {list(KINDS)}")
    if "ts" not in obj:
        raise FeedbackError("ts: missing")
    event = dict(obj, ts=parse_ts(obj["ts"]))
    for name, types in REQUIRED[kind].items():
        if name not in obj or obj[name] is None:
            raise FeedbackError(f"{name}: missing ({kind} event)")
        value = obj[name]
        # bool is an int in Python: a JSON true is not a confidence
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise FeedbackError(f"{name}: expected {'/'.join(t.__name__ for t in types)}, got "
                                f"{type(value).__name__} ({kind} event)")
        if isinstance(value, str) and not value.strip() and name != "message":
            raise FeedbackError(f"{name}: empty ({kind} event)")
    if kind == "decision" and not 0.0 <= event["confidence"] <= 1.0:
        raise FeedbackError(f"confidence: {event['confidence']} is outside [0, 1]")
    if kind == "rating":
        if event["rating"] not in RATINGS:
            raise FeedbackError(f"rating: {event['rating']!r} is not +1/-1/'up'/'down'")
        event["rating"] = RATINGS[event["rating"]]
    return event


# ---- writing ---------------------------------------------------------------------------------------------

def partition(ts: float) -> str:
    return "dt=" + datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class FeedbackWriter:
    """Buffers events and writes each flush as new part files (one per UTC date), never appending to one:
    concurrent writers (serving workers, several hosts) cannot interleave, and a reader sees whole files."""

    def __init__(self, store: ArtifactStore, root: str, flush_every: int = 500) -> None:
        self.store, self.root, self.flush_every = store, root.rstrip("/"), flush_every
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._parts = 0

    def log(self, event: Mapping[str, Any]) -> None:
        """Validate (a bad event from serving is a bug there: raise now, not at the weekly read), buffer."""
        checked = validate_event(dict(event))
        with self._lock:
            self._buffer.append({**event, "ts": checked["ts"]})
            full = len(self._buffer) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> list[str]:
        with self._lock:
            events, self._buffer = self._buffer, []
            self._parts += 1
            part = self._parts
        by_day: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_day.setdefault(partition(e["ts"]), []).append(e)
        written = []
        for i, (day, rows) in enumerate(sorted(by_day.items())):
            uri = f"{self.root}/{day}/{int(time.time() * 1000)}-{os.getpid()}-{id(self):x}-{part}.jsonl"
            try:
                self.store.write_text(uri, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            except Exception:  # nothing is lost: the unwritten days go back to the buffer for the next flush
                with self._lock:
                    self._buffer[:0] = [e for _, rs in sorted(by_day.items())[i:] for e in rs]
                raise
            written.append(uri)
        return written

    def __enter__(self) -> FeedbackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


# ---- reading one interval --------------------------------------------------------------------------------

@dataclass
class FeedbackBatch:
    """The valid events of an interval and what was skipped, by reason."""

    events: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    lines: int = 0
    outside: int = 0  # valid events of a neighbouring interval that share a day's partition
    bad: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.bad[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "reason": reason, "detail": detail})

    def report(self) -> dict[str, Any]:
        kinds = Counter(e["kind"] for e in self.events)
        return {"files": len(self.files), "lines": self.lines, "valid": len(self.events),
                "valid_by_kind": dict(sorted(kinds.items())), "outside_interval": self.outside,
                "bad": sum(self.bad.values()), "bad_by_reason": dict(sorted(self.bad.items())),
                "bad_examples": self.examples}


def days(start: datetime, end: datetime) -> list[date]:
    """The UTC dates whose partitions may hold events of [start, end)."""
    first, last = start.astimezone(UTC).date(), (end - timedelta(microseconds=1)).astimezone(UTC).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def read_interval(store: ArtifactStore, root: str, start: datetime, end: datetime) -> FeedbackBatch:
    """Every valid event with start <= ts < end; bad rows counted and skipped (see the module docstring)."""
    batch = FeedbackBatch()
    lo, hi = start.timestamp(), end.timestamp()
    for day in days(start, end):
        folder = store._to_path(f"{root.rstrip('/')}/dt={day.isoformat()}")
        if not store.fs.exists(folder):
            continue
        for path in sorted(store.fs.ls(folder, detail=False)):
            if not path.endswith(".jsonl"):
                continue
            batch.files.append(path)
            with store.fs.open(path, "r") as f:
                text = f.read()
            name = path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1]
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                batch.lines += 1
                where = f"{name}:{n}"
                try:
                    event = validate_event(json.loads(line))
                except json.JSONDecodeError as exc:
                    batch.skip(where, "not_json", exc.msg)
                    continue
                except FeedbackError as exc:
                    reason = str(exc).split(":", 1)
                    batch.skip(where, _reason(str(exc)), reason[-1].strip())
                    continue
                if not lo <= event["ts"] < hi:
                    batch.outside += 1
                    continue
                event["_where"] = where
                batch.events.append(event)
    _drop_unknown_references(batch)
    return batch


def _reason(message: str) -> str:
    """A FeedbackError message -> a short count key: missing_field, wrong_type, bad_value, unknown_kind."""
    if message.startswith("kind:"):
        return "unknown_kind"
    if ": missing" in message:
        return "missing_field"
    if "expected" in message or "not a finite" in message:
        return "wrong_type"
    return "bad_value"


def _drop_unknown_references(batch: FeedbackBatch) -> None:
    """Ratings / escalations must point at a decision of the interval: same session, same request."""
    sessions: dict[str, set[str]] = {}
    for e in batch.events:
        if e["kind"] == "decision":
            sessions.setdefault(e["session_id"], set()).add(e["request_id"])
    kept = []
    for e in batch.events:
        if e["kind"] != "decision":
            if e["session_id"] not in sessions:
                batch.skip(e["_where"], "unknown_session", f"session {e['session_id']!r} made no decision "
                                                           "in this interval")
                continue
            if e["request_id"] not in sessions[e["session_id"]]:
                batch.skip(e["_where"], "unknown_request", f"request {e['request_id']!r} is not a decision "
                                                           f"of session {e['session_id']!r}")
                continue
        kept.append(e)
    batch.events = kept


# ---- training signal -------------------------------------------------------------------------------------

def holdout_unit(request_id: str, seed: int = 0) -> float:
    """A stable number in [0, 1) per request: the same request lands on the same side every run."""
    return stable_unit(f"forge-feedback|{seed}|{request_id}")


def labelled_examples(events: Iterable[Mapping[str, Any]], options: Sequence[str],
                      ) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One example per rated / escalated decision: {request_id, session_id, query, option, target (+1/-1),
    source}. Decisions nobody reacted to carry no label; a decision for an option the router does not have
    (an adapter since removed) is counted and left out."""
    decisions: dict[tuple[str, str], Mapping[str, Any]] = {}
    ratings: dict[tuple[str, str], tuple[float, int]] = {}
    escalated: set[tuple[str, str]] = set()
    for e in events:
        key = (e["session_id"], e["request_id"])
        if e["kind"] == "decision":
            decisions[key] = e
        elif e["kind"] == "rating":
            if key not in ratings or e["ts"] >= ratings[key][0]:  # the user's last word counts
                ratings[key] = (e["ts"], e["rating"])
        else:
            escalated.add(key)
    examples, counts = [], Counter()
    for key, d in sorted(decisions.items(), key=lambda kv: (kv[1]["ts"], kv[0])):
        if key in ratings:
            target, source = ratings[key][1], "rating"
        elif key in escalated:
            target, source = -1, "escalation"
        else:
            counts["unlabelled"] += 1
            continue
        if d["option"] not in options:
            counts["unknown_option"] += 1
            continue
        counts[f"{source}_{'pos' if target > 0 else 'neg'}"] += 1
        examples.append({"request_id": d["request_id"], "session_id": d["session_id"], "query": d["query"],
                         "option": d["option"], "target": target, "source": source})
    return examples, counts
