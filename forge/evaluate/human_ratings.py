"""9B human evaluation: the ratings store (SQLAlchemy Core; SQLite by default, PostgreSQL in production).

A campaign is a fixed set of blind items (a prompt and the release's answer), published once by 9B.prepare.
Raters r001..rNNN each get `tasks_per_rater` of them (`assignment`: deterministic, balanced over items, in a
per-rater shuffled order) and score each 1-10 in the rating app (forge.evaluate.rating_app). The sensor polls
`progress`; 9B.gate reads `summary`.

Tables: campaigns (the study's shape, so every check needs only the campaign id), items, ratings (one per
campaign, item and rater). Every write is one transaction, validated first: nothing is half-written.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError

from forge.data.records import stable_int

MIN_SCORE, MAX_SCORE = 1, 10
MAX_COMMENT_CHARS = 2000
ITEM_FIELDS = ("item_id", "task_id", "domain", "prompt", "output")
_RATER = re.compile(r"r(\d{3,})")


class RatingError(ValueError):
    """Bad input to the store, said plainly; `status` is what the rating app answers (HTTP)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


metadata = MetaData()
campaigns = Table(
    "campaigns",
    metadata,
    Column("campaign", String(64), primary_key=True),
    Column("raters", Integer, nullable=False),
    Column("tasks_per_rater", Integer, nullable=False),
    Column("needed", Integer, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
)
items = Table(
    "items",
    metadata,
    Column("campaign", String(64), primary_key=True),
    Column("item_id", String(64), primary_key=True),
    Column("task_id", String(200), nullable=False),
    Column("domain", String(64), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("output", Text, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(["campaign"], ["campaigns.campaign"]),
)
ratings = Table(
    "ratings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("campaign", String(64), nullable=False),
    Column("item_id", String(64), nullable=False),
    Column("rater", String(16), nullable=False),
    Column("score", Integer, nullable=False),
    Column("comment", Text, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(["campaign", "item_id"], ["items.campaign", "items.item_id"]),
    UniqueConstraint("campaign", "item_id", "rater", name="uq_ratings_once"),
    CheckConstraint(f"score BETWEEN {MIN_SCORE} AND {MAX_SCORE}", name="ck_ratings_score"),
)


# ---- the database --------------------------------------------------------------------------------------


def default_url() -> str:
    from forge.config import forge_home

    return f"sqlite:///{forge_home() / 'ratings.db'}"


def resolve_url(url: str | None) -> str:
    """The SQLAlchemy URL to connect to: None = sqlite in FORGE_HOME; env:NAME = the URL in that variable
    (a database password stays out of the config); {forge_home} is expanded."""
    if url is None:
        return default_url()
    if url.startswith("env:"):
        name = url[4:]
        value = os.environ.get(name)
        if not value:
            raise RatingError(f"ratings db_url {url!r} names the environment variable {name}, "
                              "which is not set")
        url = value
    if "{forge_home}" in url:
        from forge.config import forge_home

        url = url.replace("{forge_home}", str(forge_home()))
    return url


def mask_url(url: str | None) -> str:
    """The resolved URL with any password hidden: for messages, campaign.json and the app's page."""
    real = resolve_url(url)
    try:
        return make_url(real).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def get_engine(url: str | None) -> Engine:
    """One engine per database (pooled, shared by threads), with the tables created on first use."""
    real = resolve_url(url)
    with _LOCK:
        engine = _ENGINES.get(real)
        if engine is not None:
            return engine
        try:
            parsed = make_url(real)
        except ArgumentError as exc:
            raise RatingError(f"ratings db_url: not a SQLAlchemy URL ({exc})") from exc
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database or ""
            if not path or path == ":memory:":
                # each pooled connection would see its own empty database
                raise RatingError(f"ratings db_url: expected sqlite:///PATH to a file (got {real!r})")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}  # the app, the sensor and the gate may write at once
        try:
            engine = create_engine(parsed, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise RatingError(f"ratings db_url {mask_url(real)}: cannot open it ({exc})") from exc
        metadata.create_all(engine)
        _ENGINES[real] = engine
        return engine


def close_engines() -> None:
    """Close every pooled connection (a server's shutdown; tests that drop their database)."""
    with _LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


# ---- campaigns, raters, assignment ---------------------------------------------------------------------


def campaign_id(cache_key: str) -> str:
    """A campaign per 9B.prepare output: the same release and config publish the same campaign."""
    if not re.fullmatch(r"[0-9a-fA-F]{16,}", cache_key or ""):
        raise RatingError(f"campaign_id: expected a hex cache key of 16+ characters (got {cache_key!r})")
    return f"9b-{cache_key[:16].lower()}"


def needed_ratings(raters: int, tasks_per_rater: int, min_fraction: float) -> int:
    """ceil(min_fraction x raters x tasks_per_rater); rounded first so 0.3 x 100 is 30, not 31."""
    return max(1, math.ceil(round(min_fraction * raters * tasks_per_rater, 9)))


def rater_id(index: int) -> str:
    return f"r{index:03d}"


def rater_key(secret: bytes, campaign: str, rater: str) -> str:
    """The key in a rater's link (/rate/<rater>?key=...): HMAC-SHA256 of campaign and rater under the app's
    secret, so a rater id alone (r001, r002, ... are guessable) rates nothing."""
    return hmac.new(secret, f"{campaign}/{rater}".encode(), hashlib.sha256).hexdigest()[:32]


def rater_index(rater: str) -> int:
    """r001 -> 1; anything else (r1, r0001, R001, 7) is an error, so one rater has one id."""
    m = _RATER.fullmatch(rater) if isinstance(rater, str) else None
    if not m or rater_id(int(m.group(1))) != rater or int(m.group(1)) < 1:
        raise RatingError(f"unknown rater {rater!r}: rater ids are r001, r002, ...", status=404)
    return int(m.group(1))


def check_rater(rater: str, raters: int) -> int:
    i = rater_index(rater)
    if i > raters:
        raise RatingError(f"unknown rater {rater!r}: this study has raters {rater_id(1)}..{rater_id(raters)}",
                          status=404)
    return i


def assignment(campaign: str, rater: str, item_ids: Iterable[str], tasks_per_rater: int) -> list[str]:
    """The items `rater` rates, in the order they see them.

    The items are put in one campaign-wide hashed order; rater i takes the i-th window of `tasks_per_rater`
    of that cycle, so every item gets the same number of raters (+-1) and no rater sees an item twice. The
    window is then shuffled per rater (blind order: position says nothing about domain or task). Depends only
    on the campaign, the rater and the set of items, never on the order they are passed in."""
    i = rater_index(rater)
    ids = sorted(set(item_ids), key=lambda x: (stable_int(f"{campaign}|order|{x}"), x))
    if not 1 <= tasks_per_rater <= len(ids):
        raise RatingError(f"campaign {campaign}: tasks_per_rater must be 1..{len(ids)} (the items), "
                          f"got {tasks_per_rater}")
    start = (i - 1) * tasks_per_rater % len(ids)
    window = [ids[(start + k) % len(ids)] for k in range(tasks_per_rater)]
    return sorted(window, key=lambda x: (stable_int(f"{campaign}|{rater}|{x}"), x))


def _now() -> datetime:
    return datetime.now(UTC)


def _validate_items(campaign: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    if not rows:
        raise RatingError(f"campaign {campaign}: no items to publish")
    out, seen = [], set()
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RatingError(f"campaign {campaign}: item #{n} is a {type(row).__name__}, expected a dict")
        missing = [f for f in ITEM_FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise RatingError(f"campaign {campaign}: item #{n} lacks string field(s) {missing}")
        if not row["item_id"] or len(row["item_id"]) > 64:
            raise RatingError(f"campaign {campaign}: item #{n} item_id must be 1-64 characters")
        if row["item_id"] in seen:
            raise RatingError(f"campaign {campaign}: item_id {row['item_id']!r} appears twice")
        seen.add(row["item_id"])
        out.append({f: row[f] for f in ITEM_FIELDS})
    return out


def publish(url: str | None, campaign: str, rows: Sequence[dict[str, Any]], *, raters: int,
            tasks_per_rater: int, needed: int) -> bool:
    """Store the campaign and its items (fields ITEM_FIELDS). Idempotent: publishing the same campaign again
    changes nothing and returns False; another item set or study shape under the same id is an error."""
    wanted = _validate_items(campaign, rows)
    if raters < 1 or not 1 <= tasks_per_rater <= len(wanted):
        raise RatingError(f"campaign {campaign}: need raters >= 1 and 1 <= tasks_per_rater <= {len(wanted)} "
                          f"(the items); got raters={raters}, tasks_per_rater={tasks_per_rater}")
    if not 1 <= needed <= raters * tasks_per_rater:
        raise RatingError(f"campaign {campaign}: needed ({needed}) must be 1..{raters * tasks_per_rater} "
                          "(raters x tasks_per_rater)")
    shape = {"raters": raters, "tasks_per_rater": tasks_per_rater, "needed": needed}
    engine = get_engine(url)
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                have = conn.execute(select(campaigns).where(campaigns.c.campaign == campaign)
                                    ).mappings().first()
                if have is None:
                    now = _now()
                    conn.execute(campaigns.insert(), [{"campaign": campaign, "created": now, **shape}])
                    conn.execute(items.insert(),
                                 [{"campaign": campaign, "created": now, **r} for r in wanted])
                    return True
                stored = conn.execute(select(*[items.c[f] for f in ITEM_FIELDS])
                                      .where(items.c.campaign == campaign)).mappings().all()
                _same_or_raise(campaign, shape, dict(have), wanted, [dict(r) for r in stored])
                return False
        except IntegrityError:
            if attempt == 2:  # a concurrent publish won the race, then disagreed: reported above
                raise
    raise AssertionError("unreachable")


def _same_or_raise(campaign: str, shape: dict[str, int], have: dict[str, Any], wanted: list[dict[str, str]],
                   stored: list[dict[str, str]]) -> None:
    diff = {k: (have[k], v) for k, v in shape.items() if have[k] != v}
    if diff:
        raise RatingError(f"campaign {campaign} is already published with another shape "
                          f"(stored, new): {diff}; a changed study needs a new campaign id", status=409)
    new = {r["item_id"]: r for r in wanted}
    old = {r["item_id"]: r for r in stored}
    if new != old:
        added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        changed = sorted(k for k in set(new) & set(old) if new[k] != old[k])
        raise RatingError(
            f"campaign {campaign} is already published with a different item set (new ids {added[:5]}, "
            f"missing ids {gone[:5]}, changed items {changed[:5]}): ratings there refer to the old texts, so "
            "they are not replaced; a changed release or config makes a new campaign id", status=409)


def _campaign(conn: Any, campaign: str) -> dict[str, Any]:
    row = conn.execute(select(campaigns).where(campaigns.c.campaign == campaign)).mappings().first()
    if row is None:
        raise RatingError(f"unknown campaign {campaign!r}: it has not been published in this database "
                          "(9B.prepare publishes it)", status=404)
    return dict(row)


def _item_ids(conn: Any, campaign: str) -> list[str]:
    return list(conn.execute(select(items.c.item_id).where(items.c.campaign == campaign)).scalars())


def campaign_info(url: str | None, campaign: str) -> dict[str, Any]:
    """The study's shape: raters, tasks_per_rater, needed, items."""
    with get_engine(url).connect() as conn:
        info = _campaign(conn, campaign)
        info["items"] = len(_item_ids(conn, campaign))
    info.pop("created")
    return info


# ---- rating ----------------------------------------------------------------------------------------------


def rater_view(url: str | None, campaign: str, rater: str) -> dict[str, Any]:
    """What the rating page needs: how far the rater is, and their next unrated item, blind (its id, the
    prompt and the answer only: no task id, domain, model or mode)."""
    with get_engine(url).connect() as conn:
        camp = _campaign(conn, campaign)
        check_rater(rater, camp["raters"])
        queue = assignment(campaign, rater, _item_ids(conn, campaign), camp["tasks_per_rater"])
        done = set(conn.execute(select(ratings.c.item_id).where(
            ratings.c.campaign == campaign, ratings.c.rater == rater)).scalars())
        todo = [i for i in queue if i not in done]
        nxt = None
        if todo:
            row = conn.execute(select(items.c.item_id, items.c.prompt, items.c.output).where(
                items.c.campaign == campaign, items.c.item_id == todo[0])).mappings().one()
            nxt = dict(row)
    return {"rater": rater, "assigned": len(queue), "rated": len(queue) - len(todo), "next": nxt}


def record(url: str | None, campaign: str, rater: str, item_id: str, score: int,
           comment: str | None = "") -> None:
    """Store one rating, after checking everything: the campaign and rater exist, the item is assigned to
    this rater and not yet rated by them, the score is an integer 1-10, the comment is short enough.
    A rating is final (one row, one transaction)."""
    if isinstance(score, bool) or not isinstance(score, int) or not MIN_SCORE <= score <= MAX_SCORE:
        raise RatingError(f"score must be a whole number from {MIN_SCORE} to {MAX_SCORE} (got {score!r})",
                          status=422)
    comment = "" if comment is None else comment
    if not isinstance(comment, str):
        raise RatingError(f"comment must be text (got {type(comment).__name__})", status=422)
    comment = comment.strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise RatingError(f"comment too long: {len(comment)} characters, at most {MAX_COMMENT_CHARS}",
                          status=422)
    if not isinstance(item_id, str) or not item_id:
        raise RatingError("item_id is missing", status=422)
    engine = get_engine(url)
    try:
        with engine.begin() as conn:
            camp = _campaign(conn, campaign)
            check_rater(rater, camp["raters"])
            ids = _item_ids(conn, campaign)
            if item_id not in ids:
                raise RatingError(f"unknown item {item_id!r} in campaign {campaign}", status=404)
            if item_id not in assignment(campaign, rater, ids, camp["tasks_per_rater"]):
                raise RatingError(f"item {item_id!r} is not assigned to rater {rater}", status=403)
            conn.execute(ratings.insert(), [{"campaign": campaign, "item_id": item_id, "rater": rater,
                                             "score": score, "comment": comment, "created": _now()}])
    except IntegrityError as exc:  # the unique (campaign, item, rater): a double submit
        raise RatingError(f"rater {rater} has already rated item {item_id!r}; ratings are final",
                          status=409) from exc


# ---- reading ---------------------------------------------------------------------------------------------


def progress(url: str | None, campaign: str) -> dict[str, Any]:
    """How far the campaign is: ratings so far, the ratings needed, raters who started and finished."""
    with get_engine(url).connect() as conn:
        camp = _campaign(conn, campaign)
        n_items = len(_item_ids(conn, campaign))
        per_rater = dict(conn.execute(select(ratings.c.rater, func.count()).where(
            ratings.c.campaign == campaign).group_by(ratings.c.rater)).tuples().all())
    total = sum(per_rater.values())
    return {
        "campaign": campaign,
        "ratings": total,
        "needed": camp["needed"],
        "ready": total >= camp["needed"],
        "raters": camp["raters"],
        "tasks_per_rater": camp["tasks_per_rater"],
        "items": n_items,
        "raters_started": len(per_rater),
        "raters_finished": sum(c >= camp["tasks_per_rater"] for c in per_rater.values()),
    }


def summary(url: str | None, campaign: str, resamples: int = 2000) -> dict[str, Any]:
    """The campaign's scores: n, mean, std, a 95% CI, per-domain n and mean, per-rater counts, a histogram.

    The CI is a percentile bootstrap that resamples raters (each with all their ratings): ratings by one
    person are not independent (some raters are harsher), and resampling single ratings would claim too much
    precision. With one rater only, a t interval over their ratings. The seed is the campaign: same ratings,
    same numbers."""
    import numpy as np

    with get_engine(url).connect() as conn:
        _campaign(conn, campaign)
        rows = conn.execute(
            select(ratings.c.rater, ratings.c.score, items.c.domain)
            .join(items, (items.c.campaign == ratings.c.campaign) & (items.c.item_id == ratings.c.item_id))
            .where(ratings.c.campaign == campaign)
            .order_by(ratings.c.rater, ratings.c.item_id)
        ).tuples().all()
    if not rows:
        raise RatingError(f"campaign {campaign} has no ratings yet", status=409)
    scores = np.array([s for _, s, _ in rows], float)
    by_rater: dict[str, list[float]] = {}
    by_domain: dict[str, list[float]] = {}
    for r, s, d in rows:
        by_rater.setdefault(r, []).append(s)
        by_domain.setdefault(d, []).append(s)
    mean = float(scores.mean())
    if len(scores) < 2:
        lo, hi, method = mean, mean, "none (a single rating)"
    elif len(by_rater) < 2:
        from scipy import stats

        half = float(stats.t.ppf(0.975, len(scores) - 1) * scores.std(ddof=1) / math.sqrt(len(scores)))
        lo, hi, method = mean - half, mean + half, "t interval (one rater)"
    else:
        sums = np.array([sum(v) for v in by_rater.values()])
        counts = np.array([len(v) for v in by_rater.values()])
        rng = np.random.default_rng(stable_int(f"{campaign}|ci") % 2**32)
        pick = rng.integers(0, len(sums), (resamples, len(sums)))
        means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
        lo, hi = float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
        method = f"bootstrap over raters ({resamples} resamples)"
    return {
        "campaign": campaign,
        "n": len(scores),
        "mean": mean,
        "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
        "ci_low": max(float(MIN_SCORE), lo),
        "ci_high": min(float(MAX_SCORE), hi),
        "ci_method": method,
        "by_domain": {d: {"n": len(v), "mean": float(np.mean(v))} for d, v in sorted(by_domain.items())},
        "by_rater": {r: len(v) for r, v in sorted(by_rater.items())},
        "histogram": {str(k): int((scores == k).sum()) for k in range(MIN_SCORE, MAX_SCORE + 1)},
    }
