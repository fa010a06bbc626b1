"""9B human evaluation: the ratings store, the rating app, the trigger and sensor, the prepare/gate jobs."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.airflow_env import configure

configure()

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from forge.artifacts import Manifest  # noqa: E402
from forge.config import PipelineConfig, load_config  # noqa: E402
from forge.evaluate import human_ratings as hr  # noqa: E402
from forge.evaluate import human_study  # noqa: E402
from forge.evaluate.human_ratings import RatingError  # noqa: E402
from forge.evaluate.rating_app import create_rating_app  # noqa: E402
from forge.evaluate.validation_config import HumanEvalStudyConfig  # noqa: E402
from forge.phases import Phase  # noqa: E402
from forge.runner import JobContext, PhaseSkipped, make_store  # noqa: E402

CAMPAIGN = "9b-00000000deadbeef"


def make_items(n: int, output: str = "an answer") -> list[dict[str, str]]:
    return [{"item_id": f"it{i:02d}", "task_id": f"t{i}", "domain": ("code", "general")[i % 2],
             "prompt": f"question {i}?", "output": f"{output} {i}"} for i in range(n)]


@pytest.fixture
def url(tmp_path: Path) -> str:
    yield f"sqlite:///{tmp_path}/ratings.db"
    hr.close_engines()


def publish(url: str, n_items: int = 6, raters: int = 3, tpr: int = 2, needed: int | None = None,
            campaign: str = CAMPAIGN, rows: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    rows = rows or make_items(n_items)
    hr.publish(url, campaign, rows, raters=raters, tasks_per_rater=tpr, needed=needed or raters * tpr)
    return rows


def assigned(url: str, rater: str, campaign: str = CAMPAIGN) -> list[str]:
    info = hr.campaign_info(url, campaign)
    with hr.get_engine(url).connect() as conn:
        ids = list(conn.execute(select(hr.items.c.item_id).where(hr.items.c.campaign == campaign)).scalars())
    return hr.assignment(campaign, rater, ids, info["tasks_per_rater"])


def count(url: str, table: Any) -> int:
    with hr.get_engine(url).connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


# ---- the store -----------------------------------------------------------------------------------------


def test_campaign_id_and_needed() -> None:
    assert hr.campaign_id("ABCDEF0123456789ffff") == "9b-abcdef0123456789"
    with pytest.raises(RatingError, match="hex cache key"):
        hr.campaign_id("not-a-key")
    assert hr.needed_ratings(100, 20, 1.0) == 2000
    assert hr.needed_ratings(100, 10, 0.3) == 300  # not 301: 0.3 * 1000 is 300.00000000000006
    assert hr.needed_ratings(3, 2, 0.5) == 3
    assert hr.needed_ratings(3, 3, 0.01) == 1


def test_publish_is_idempotent_and_refuses_another_item_set(url: str) -> None:
    rows = make_items(6)
    assert hr.publish(url, CAMPAIGN, rows, raters=3, tasks_per_rater=2, needed=6) is True
    # the same set again, in another order: nothing changes
    assert hr.publish(url, CAMPAIGN, rows[::-1], raters=3, tasks_per_rater=2, needed=6) is False
    assert (count(url, hr.campaigns), count(url, hr.items)) == (1, 6)
    changed = [dict(r) for r in rows]
    changed[2]["output"] = "another answer"
    with pytest.raises(RatingError, match="different item set") as exc:
        hr.publish(url, CAMPAIGN, changed, raters=3, tasks_per_rater=2, needed=6)
    assert "it02" in str(exc.value)
    with pytest.raises(RatingError, match="different item set"):
        hr.publish(url, CAMPAIGN, rows[:5], raters=3, tasks_per_rater=2, needed=6)
    with pytest.raises(RatingError, match="another shape"):
        hr.publish(url, CAMPAIGN, rows, raters=4, tasks_per_rater=2, needed=6)
    assert count(url, hr.items) == 6
    with hr.get_engine(url).connect() as conn:
        stored = conn.execute(select(hr.items.c.output).where(hr.items.c.item_id == "it02")).scalar_one()
    assert stored == "an answer 2"
    # bad input is refused before anything is written
    with pytest.raises(RatingError, match="appears twice"):
        hr.publish(url, "9b-other", rows + rows[:1], raters=3, tasks_per_rater=2, needed=6)
    with pytest.raises(RatingError, match="lacks string field"):
        hr.publish(url, "9b-other", [{"item_id": "x"}], raters=3, tasks_per_rater=1, needed=1)
    with pytest.raises(RatingError, match="needed"):
        hr.publish(url, "9b-other", rows, raters=3, tasks_per_rater=2, needed=7)
    assert count(url, hr.campaigns) == 1


def test_db_url_resolution(tmp_path: Path, forge_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hr.resolve_url(None) == f"sqlite:///{forge_home / 'ratings.db'}"
    assert hr.resolve_url("sqlite:///{forge_home}/x.db") == f"sqlite:///{forge_home}/x.db"
    with pytest.raises(RatingError, match="RATINGS_DB, which is not set"):
        hr.resolve_url("env:RATINGS_DB")
    monkeypatch.setenv("RATINGS_DB", "postgresql+psycopg2://forge:s3cret@db:5432/ratings")
    assert "s3cret" not in hr.mask_url("env:RATINGS_DB")
    assert hr.mask_url("env:RATINGS_DB") == "postgresql+psycopg2://forge:***@db:5432/ratings"
    with pytest.raises(RatingError, match="to a file"):
        hr.get_engine("sqlite:///:memory:")
    with pytest.raises(ValueError, match="env:NAME"):
        HumanEvalStudyConfig(db_url="postgresql://forge:s3cret@db/ratings")


def test_assignment_is_deterministic_balanced_and_blind(url: str) -> None:
    ids = [f"it{i:02d}" for i in range(10)]
    raters = [hr.rater_id(i) for i in range(1, 26)]
    plans = {r: hr.assignment(CAMPAIGN, r, ids, 4) for r in raters}
    assert plans == {r: hr.assignment(CAMPAIGN, r, ids[::-1], 4) for r in raters}  # order of input: no effect
    assert all(len(set(p)) == 4 and set(p) <= set(ids) for p in plans.values())
    coverage = Counter(i for p in plans.values() for i in p)  # 25 x 4 = 100 ratings over 10 items: 10 each
    assert set(coverage.values()) == {10}
    uneven = Counter(i for r in raters[:7] for i in plans[r])  # 28 over 10: 2 or 3 each
    assert set(uneven.values()) <= {2, 3} and sum(uneven.values()) == 28
    # blind: no shared presentation order (not the ids' order, not one order for all)
    assert any(p != sorted(p) for p in plans.values())
    assert hr.assignment("9b-another", "r001", ids, 4) != plans["r001"]
    for bad in ("r1", "r0001", "R001", "bob", "r000"):
        with pytest.raises(RatingError, match="unknown rater"):
            hr.assignment(CAMPAIGN, bad, ids, 4)
    # what the page gets is the item's id, prompt and answer only
    publish(url)
    view = hr.rater_view(url, CAMPAIGN, "r001")
    assert set(view["next"]) == {"item_id", "prompt", "output"}
    assert view["next"]["item_id"] == assigned(url, "r001")[0]


def test_record_validates_everything_and_writes_nothing_on_error(url: str) -> None:
    publish(url, n_items=6, raters=3, tpr=2)
    mine = assigned(url, "r001")
    other = next(i for i in assigned(url, "r002") if i not in mine)
    bad: list[tuple[dict[str, Any], str, int]] = [
        ({"campaign": "9b-nope"}, "unknown campaign", 404),
        ({"rater": "r004"}, r"raters r001\.\.r003", 404),
        ({"rater": "alice"}, "unknown rater", 404),
        ({"item_id": "it99"}, "unknown item", 404),
        ({"item_id": other}, "not assigned to rater r001", 403),
        ({"score": 0}, "whole number from 1 to 10", 422),
        ({"score": 11}, "whole number from 1 to 10", 422),
        ({"score": 7.5}, "whole number", 422),
        ({"score": "7"}, "whole number", 422),
        ({"score": True}, "whole number", 422),
        ({"comment": "x" * (hr.MAX_COMMENT_CHARS + 1)}, "comment too long", 422),
        ({"comment": 5}, "comment must be text", 422),
        ({"item_id": ""}, "item_id is missing", 422),
    ]
    for change, message, status in bad:
        args = {"campaign": CAMPAIGN, "rater": "r001", "item_id": mine[0], "score": 7, "comment": "",
                **change}
        with pytest.raises(RatingError, match=message) as exc:
            hr.record(url, **args)
        assert exc.value.status == status, change
    assert count(url, hr.ratings) == 0
    hr.record(url, CAMPAIGN, "r001", mine[0], 7, "  fine  ")
    with pytest.raises(RatingError, match="already rated") as exc:
        hr.record(url, CAMPAIGN, "r001", mine[0], 3)
    assert exc.value.status == 409
    with hr.get_engine(url).connect() as conn:
        rows = conn.execute(select(hr.ratings.c.rater, hr.ratings.c.score, hr.ratings.c.comment)).all()
    assert [tuple(r) for r in rows] == [("r001", 7, "fine")]


def test_progress_counts_ratings_and_finished_raters(url: str) -> None:
    publish(url, n_items=6, raters=3, tpr=2, needed=5)
    p = hr.progress(url, CAMPAIGN)
    assert {k: p[k] for k in ("ratings", "needed", "ready", "raters", "raters_started", "raters_finished",
                              "items")} == {"ratings": 0, "needed": 5, "ready": False, "raters": 3,
                                            "raters_started": 0, "raters_finished": 0, "items": 6}
    for item in assigned(url, "r001"):
        hr.record(url, CAMPAIGN, "r001", item, 8)
    hr.record(url, CAMPAIGN, "r002", assigned(url, "r002")[0], 6)
    p = hr.progress(url, CAMPAIGN)
    assert (p["ratings"], p["raters_started"], p["raters_finished"], p["ready"]) == (3, 2, 1, False)
    for rater in ("r002", "r003"):
        for item in assigned(url, rater):
            if rater == "r003" or item != assigned(url, "r002")[0]:
                hr.record(url, CAMPAIGN, rater, item, 5)
    assert hr.progress(url, CAMPAIGN)["ready"] is True
    with pytest.raises(RatingError, match="unknown campaign"):
        hr.progress(url, "9b-nope")


def test_summary_numbers_on_known_scores(url: str) -> None:
    from scipy import stats

    rows = publish(url, n_items=4, raters=2, tpr=2)
    domain = {r["item_id"]: r["domain"] for r in rows}
    with pytest.raises(RatingError, match="no ratings yet"):
        hr.summary(url, CAMPAIGN)
    scores = {"r001": [9, 7], "r002": [4, 6]}
    for rater, values in scores.items():
        for item, s in zip(assigned(url, rater), values, strict=True):
            hr.record(url, CAMPAIGN, rater, item, s)
    s = hr.summary(url, CAMPAIGN)
    assert s["n"] == 4 and s["mean"] == pytest.approx(6.5)
    assert s["std"] == pytest.approx(stats.tstd([9, 7, 4, 6]))
    assert s["by_rater"] == {"r001": 2, "r002": 2}
    want: dict[str, list[int]] = {}
    for rater, values in scores.items():
        for item, v in zip(assigned(url, rater), values, strict=True):
            want.setdefault(domain[item], []).append(v)
    assert s["by_domain"] == {d: {"n": len(v), "mean": pytest.approx(sum(v) / len(v))}
                              for d, v in sorted(want.items())}
    assert s["histogram"] == {str(k): int(k in (4, 6, 7, 9)) for k in range(1, 11)}
    # bootstrap over two raters: the resampled means are 8, 6.5 or 5
    assert s["ci_method"].startswith("bootstrap over raters")
    assert 5.0 <= s["ci_low"] < 6.5 < s["ci_high"] <= 8.0
    assert hr.summary(url, CAMPAIGN) == s  # seeded: the same ratings give the same report


def test_summary_one_rater_is_a_t_interval(url: str) -> None:
    from scipy import stats

    publish(url, n_items=3, raters=1, tpr=3)
    values = [6, 8, 9]
    for item, v in zip(assigned(url, "r001"), values, strict=True):
        hr.record(url, CAMPAIGN, "r001", item, v)
    s = hr.summary(url, CAMPAIGN)
    half = stats.t.ppf(0.975, 2) * stats.tstd(values) / math.sqrt(3)
    assert s["ci_method"].startswith("t interval")
    assert s["mean"] == pytest.approx(23 / 3)
    assert s["ci_low"] == pytest.approx(23 / 3 - half)
    assert s["ci_high"] == pytest.approx(min(10.0, 23 / 3 + half))


@pytest.fixture
def pg_url() -> str:
    """A throwaway database on the loopback PostgreSQL (psycopg 3 if installed, else psycopg2)."""
    try:
        import psycopg  # noqa: F401

        driver = "psycopg"
    except ImportError:
        driver = "psycopg2"
    psycopg2 = pytest.importorskip("psycopg2", reason="neither psycopg nor psycopg2 is installed")
    try:
        admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432/test: {exc}")
    admin.autocommit = True
    name = f"forge_ratings_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+{driver}://postgres@127.0.0.1:5432/{name}"
    hr.close_engines()
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


@pytest.mark.services
def test_store_on_postgresql(pg_url: str) -> None:
    rows = publish(pg_url, n_items=4, raters=2, tpr=2, needed=3)
    assert hr.publish(pg_url, CAMPAIGN, rows, raters=2, tasks_per_rater=2, needed=3) is False
    for rater, s in (("r001", 8), ("r002", 6)):
        for item in assigned(pg_url, rater):
            hr.record(pg_url, CAMPAIGN, rater, item, s, "ok")
    with pytest.raises(RatingError, match="already rated"):
        hr.record(pg_url, CAMPAIGN, "r001", assigned(pg_url, "r001")[0], 5)
    p = hr.progress(pg_url, CAMPAIGN)
    assert (p["ratings"], p["raters_finished"], p["ready"]) == (4, 2, True)
    assert hr.summary(pg_url, CAMPAIGN)["mean"] == pytest.approx(7.0)


# ---- the rating app --------------------------------------------------------------------------------------


SECRET = b"a test secret of 32 bytes, fixed"


def app(url: str, cfg: Any) -> TestClient:
    return TestClient(create_rating_app(url, CAMPAIGN, cfg, SECRET))


def link(rater: str) -> str:
    return f"/rate/{rater}?key={hr.rater_key(SECRET, CAMPAIGN, rater)}"


def item_on(page: str) -> str:
    m = re.search(r'name=item_id value="([^"]+)"', page)
    assert m, page
    return m.group(1)


def test_a_rater_rates_through_the_form_until_done(url: str) -> None:
    publish(url, n_items=4, raters=2, tpr=3, needed=6)
    client = app(url, HumanEvalStudyConfig(raters=2, tasks_per_rater=3, tasks=4))
    home = client.get("/")
    assert home.status_code == 200 and "0 of 6 ratings" in home.text
    seen = []
    for k in range(3):
        page = client.get(link("r001"))
        assert page.status_code == 200 and f"answer {k + 1} of 3" in page.text
        assert "code" not in page.text and "general" not in page.text  # blind: no domain, task or model
        item = item_on(page.text)
        seen.append(item)
        r = client.post(link("r001"), data={"item_id": item, "score": str(5 + k), "comment": "ok"},
                        follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == link("r001").removeprefix("/rate/")
    assert seen == assigned(url, "r001")
    done = client.get(link("r001"))
    assert done.status_code == 200 and "Thank you" in done.text
    # following the redirect lands on the done page too (relative Location, resolved by the client)
    assert client.get("/api/progress").json()["ratings"] == 3
    assert client.get("/api/progress").json()["raters_finished"] == 1
    page = client.get(link("r002"))
    r = client.post(link("r002"), data={"item_id": item_on(page.text), "score": "9"})
    assert r.status_code == 200 and "answer 2 of 3" in r.text


def test_bad_input_is_a_clear_4xx_and_stores_nothing(url: str) -> None:
    publish(url, n_items=4, raters=2, tpr=2)
    client = app(url, HumanEvalStudyConfig())
    item = item_on(client.get(link("r001")).text)
    for data, status, text in (
        ({"item_id": item, "score": "11"}, 422, "whole number from 1 to 10"),
        ({"item_id": item, "score": "abc"}, 422, "whole number"),
        ({"item_id": item, "score": "7.5"}, 422, "whole number"),
        ({"item_id": item}, 422, "got nothing"),
        ({"score": "7"}, 422, "no item_id"),
        ({"item_id": "it99", "score": "7"}, 404, "unknown item"),
        ({"item_id": item, "score": "7", "comment": "x" * 5000}, 422, "comment too long"),
    ):
        r = client.post(link("r001"), data=data)
        assert r.status_code == status and text in r.text, (data, r.status_code, r.text)
    other = next(i for i in assigned(url, "r002") if i not in assigned(url, "r001"))
    assert client.post(link("r001"), data={"item_id": other, "score": "7"}).status_code == 403
    assert client.get(link("r003")).status_code == 404
    assert client.post(link("r003"), data={"item_id": item, "score": "7"}).status_code == 404
    assert client.get(link("nobody")).status_code == 404
    assert count(url, hr.ratings) == 0
    with pytest.raises(RatingError, match="unknown campaign"):
        create_rating_app(url, "9b-nope", HumanEvalStudyConfig(), SECRET)


def test_a_rater_id_without_its_key_rates_nothing(url: str, tmp_path: Path) -> None:
    from forge.evaluate.rating_app import write_links

    publish(url, n_items=4, raters=2, tpr=2)
    client = app(url, HumanEvalStudyConfig())
    item = item_on(client.get(link("r001")).text)
    other_key = hr.rater_key(SECRET, CAMPAIGN, "r002")
    for path in ("/rate/r001", "/rate/r001?key=", f"/rate/r001?key={other_key}", "/rate/r001?key=%C3%A9",
                 f"/rate/r001?key={hr.rater_key(b'another secret, 32 bytes long...', CAMPAIGN, 'r001')}"):
        page = client.get(path)
        assert page.status_code == 403 and "not valid" in page.text and item not in page.text
        assert client.post(path, data={"item_id": item, "score": "7"}).status_code == 403
    assert count(url, hr.ratings) == 0
    assert hr.rater_key(SECRET, "9b-other", "r001") != hr.rater_key(SECRET, CAMPAIGN, "r001")
    with pytest.raises(ValueError, match="16 bytes"):
        create_rating_app(url, CAMPAIGN, HumanEvalStudyConfig(), b"short")
    # the links file: every rater's link, the key it carries opens the page, only this user reads it
    (tmp_path / "links.tmp").write_text("a leftover")
    (tmp_path / "links.tmp").chmod(0o644)
    links = write_links(tmp_path / "links.tsv", CAMPAIGN, SECRET, "http://127.0.0.1:8090", 2)
    rows = [line.split("\t") for line in links.read_text().splitlines()]
    assert [r for r, _ in rows] == ["r001", "r002"] and (links.stat().st_mode & 0o777) == 0o600
    opened = client.get(rows[1][1].removeprefix("http://127.0.0.1:8090"))
    assert opened.status_code == 200 and opened.headers["referrer-policy"] == "no-referrer"


def test_model_text_is_escaped(url: str) -> None:
    rows = make_items(2, output="<script>alert('x')</script> & <b>bold</b>")
    rows[0]["prompt"] = rows[1]["prompt"] = 'say "<img src=x onerror=alert(1)>"'
    publish(url, raters=1, tpr=2, rows=rows)
    client = app(url, HumanEvalStudyConfig())
    page = client.get(link("r001"))
    assert "<script>" not in page.text and "<img" not in page.text and "<b>bold" not in page.text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no scripts
    bad = client.post(link("r001"), data={"item_id": "<script>x</script>", "score": "5"})
    assert bad.status_code == 404 and "<script>x" not in bad.text


# ---- the trigger and the sensor --------------------------------------------------------------------------


def test_trigger_fires_once_enough_ratings_arrive(url: str) -> None:
    from operators.triggers.ratings import RatingsTrigger

    publish(url, n_items=4, raters=2, tpr=2, needed=3)
    trigger = RatingsTrigger(db_url=url, campaign=CAMPAIGN, needed=3, poke_interval_s=0.05)
    path, kwargs = trigger.serialize()
    assert path == "operators.triggers.ratings.RatingsTrigger"
    assert RatingsTrigger(**json.loads(json.dumps(kwargs))).serialize() == (path, kwargs)

    def rate_later() -> None:
        for rater in ("r001", "r002"):
            for item in assigned(url, rater):
                hr.record(url, CAMPAIGN, rater, item, 7)

    async def wait() -> tuple[Any, int]:
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.3)  # several polls with no ratings: nothing fires
        assert not first.done()
        rater = threading.Thread(target=rate_later)
        rater.start()
        event = await asyncio.wait_for(first, timeout=20)
        rater.join()
        await events.aclose()
        return event, hr.progress(url, CAMPAIGN)["ratings"]

    event, final = asyncio.run(wait())
    assert event.payload["status"] == "ready" and event.payload["campaign"] == CAMPAIGN
    assert 3 <= event.payload["ratings"] <= final == 4


def test_trigger_reports_an_unknown_campaign(url: str) -> None:
    from operators.triggers.ratings import RatingsTrigger

    publish(url)

    async def first() -> Any:
        return await asyncio.wait_for(RatingsTrigger(url, "9b-nope", 1, 0.05).run().__anext__(), timeout=10)

    event = asyncio.run(first())
    assert event.payload["status"] == "error" and "unknown campaign" in event.payload["message"]


class FakeTI:
    def __init__(self, value: Any) -> None:
        self.value, self.asked = value, []

    def xcom_pull(self, task_ids: str, **_: Any) -> Any:
        self.asked.append(task_ids)
        return self.value


def sensor_context(url: str, xcom: Any) -> dict[str, Any]:
    human = {"enabled": True, "db_url": url, "raters": 2, "tasks_per_rater": 2, "tasks": 4,
             "poke_interval_s": 30, "timeout_h": 2}
    return {"params": {"profile": "demo"}, "dag_run": SimpleNamespace(conf={"validation": {"human": human}}),
            "ti": FakeTI(xcom), "run_id": "manual__1"}


def test_sensor_checks_once_then_defers_and_validates_the_event(url: str, forge_home: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    from operators.sensors.ratings import HumanRatingsSensor
    from operators.triggers.ratings import RatingsTrigger

    publish(url, n_items=4, raters=2, tpr=2, needed=3)
    sensor = HumanRatingsSensor(task_id="9b_wait", prepare_task_id="validation.9b_prepare")
    ctx = sensor_context(url, {"status": "complete", "info": {"campaign": CAMPAIGN, "needed": 3}})
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(ctx)
    assert ctx["ti"].asked[0] == "validation.9b_prepare"
    trig = deferred.value.trigger
    assert isinstance(trig, RatingsTrigger)
    assert (trig.db_url, trig.campaign, trig.needed, trig.poke_interval_s) == (url, CAMPAIGN, 3, 30.0)
    assert deferred.value.timeout == timedelta(hours=2)
    assert deferred.value.method_name == "execute_complete"
    event = {"status": "ready", "campaign": CAMPAIGN, "ratings": 3, "needed": 3}
    assert sensor.execute_complete(ctx, event) == event
    with pytest.raises(AirflowFailException, match="unknown campaign"):
        sensor.execute_complete(ctx, {"status": "error", "message": "unknown campaign '9b-x'"})
    with pytest.raises(AirflowFailException, match="not for campaign"):
        sensor.execute_complete(ctx, {**event, "campaign": "9b-other"})
    # enough ratings already: no deferral, the progress is the XCom
    for rater in ("r001", "r002"):
        for item in assigned(url, rater):
            hr.record(url, CAMPAIGN, rater, item, 8)
    assert sensor.execute(ctx)["ratings"] == 4
    with pytest.raises(AirflowFailException, match="no info.campaign"):
        sensor.execute(sensor_context(url, {"status": "complete"}))
    # the default database: the triggerer gets this worker's sqlite path; env:NAME stays a reference
    assert HumanRatingsSensor.trigger_url(HumanEvalStudyConfig()) == f"sqlite:///{forge_home / 'ratings.db'}"
    assert HumanRatingsSensor.trigger_url(HumanEvalStudyConfig(db_url="env:RATINGS")) == "env:RATINGS"


# ---- the phase jobs --------------------------------------------------------------------------------------


def job_context(cfg: PipelineConfig, phase_id: str, tmp: Path, inputs: dict[str, Manifest] | None = None,
                cache_key: str = "ab" * 32) -> JobContext:
    job = f"forge.evaluate.human_study:{phase_id.split('.')[1]}"
    phase = Phase(phase_id, phase_id.lower().replace(".", "_"), "validation", phase_id, job,
                  tuple(inputs or ()), ("validation",))
    out, work = tmp / phase_id / "out", tmp / phase_id / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return JobContext(phase, cfg, "run-1", cache_key, make_store(cfg), inputs or {}, out, work)


def study_cfg(url: str, **human: Any) -> PipelineConfig:
    h = {"enabled": True, "db_url": url, "raters": 3, "tasks_per_rater": 2, "tasks": 5,
         "domains": ["general", "code"], "min_mean": 7.0, **human}
    return load_config(profile="demo", overrides={"validation": {"human": h}})


def test_jobs_are_skipped_when_the_study_is_off(tmp_path: Path, forge_home: Path) -> None:
    cfg = load_config(profile="demo")
    assert cfg.validation.human.enabled is False
    for job in (human_study.prepare, human_study.gate):
        with pytest.raises(PhaseSkipped, match="human evaluation needs people"):
            job(job_context(cfg, f"9B.{job.__name__}", tmp_path))


def test_prepare_publishes_the_campaign(url: str, tmp_path: Path, forge_home: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare end to end but the model: the release's answers are stand-ins (a release is a whole run)."""
    cfg = study_cfg(url)
    asked: list[str] = []

    def answers(ctx: JobContext, rows: list[dict[str, Any]]) -> list[str]:
        asked.extend(r["id"] for r in rows)
        return [f"<answer to {r['id']}>" for r in rows]

    monkeypatch.setattr(human_study, "answer_rows", answers)
    assert human_study.split_tasks(5, ["general", "code"]) == {"general": 3, "code": 2}
    ctx = job_context(cfg, "9B.prepare", tmp_path)
    result = human_study.prepare(ctx)
    campaign = hr.campaign_id(ctx.cache_key)
    assert result.info["campaign"] == campaign and result.info["needed"] == 6
    assert "/rate/" in result.notes and "forge rate" in result.notes
    info = json.loads((ctx.out_dir / "campaign.json").read_text())
    assert {k: info[k] for k in ("campaign", "raters", "tasks_per_rater", "needed", "items")} == {
        "campaign": campaign, "raters": 3, "tasks_per_rater": 2, "needed": 6, "items": 5}
    assert info["domains"] == {"general": 3, "code": 2} and info["db_url"] == url
    items = json.loads((ctx.out_dir / "items.json").read_text())
    assert [i["task_id"] for i in items] == asked and len(set(i["item_id"] for i in items)) == 5
    assert all(i["output"] == f"<answer to {i['task_id']}>" for i in items)
    assert all(i["task_id"] not in i["item_id"] for i in items)  # opaque ids
    assert hr.progress(url, campaign)["needed"] == 6
    # a recomputed prepare (same cache key, same answers) publishes nothing new, and writes the same files
    again = job_context(cfg, "9B.prepare", tmp_path / "again")
    human_study.prepare(again)
    assert (again.out_dir / "campaign.json").read_bytes() == (ctx.out_dir / "campaign.json").read_bytes()
    assert count(url, hr.items) == 5
    # a replaced database gets the campaign back from prepare's output
    other = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert human_study.republish(HumanEvalStudyConfig(db_url=other), ctx.out_dir)["campaign"] == campaign
    assert hr.progress(other, campaign)["items"] == 5


def test_campaign_json_hides_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATINGS_URL", "postgresql+psycopg2://forge:s3cret@db.internal:5432/ratings")
    published: list[str] = []
    monkeypatch.setattr(human_study, "publish", lambda url, campaign, *a, **k: published.append(url))
    h = HumanEvalStudyConfig(db_url="env:RATINGS_URL", raters=1, tasks_per_rater=1, tasks=1)
    info = human_study.publish_campaign(h, CAMPAIGN, make_items(1), tmp_path)
    text = (tmp_path / "campaign.json").read_text()
    assert published == ["env:RATINGS_URL"]
    assert "s3cret" not in text and info["db_url_configured"] == "env:RATINGS_URL"
    assert info["db_url"] == "postgresql+psycopg2://forge:***@db.internal:5432/ratings"


def seed_ratings(url: str, campaign: str, scores: dict[str, int]) -> None:
    for rater, score in scores.items():
        for item in assigned(url, rater, campaign):
            hr.record(url, campaign, rater, item, score)


def gate_context(cfg: PipelineConfig, tmp: Path, campaign: str, needed: int) -> JobContext:
    prepared = Manifest(phase="9B.prepare", cache_key="cd" * 32, base_uri="", run_id="run-1",
                        info={"campaign": campaign, "needed": needed})
    return job_context(cfg, "9B.gate", tmp, {"9B.prepare": prepared})


def test_gate_passes_fails_and_waits(url: str, tmp_path: Path, forge_home: Path) -> None:
    cfg = study_cfg(url)
    items = make_items(5)
    hr.publish(url, CAMPAIGN, items, raters=3, tasks_per_rater=2, needed=6)
    seed_ratings(url, CAMPAIGN, {"r001": 9, "r002": 7})
    with pytest.raises(RuntimeError, match="has 4 of the 6 ratings needed"):
        human_study.gate(gate_context(cfg, tmp_path / "early", CAMPAIGN, 6))
    seed_ratings(url, CAMPAIGN, {"r003": 8})
    ctx = gate_context(cfg, tmp_path / "pass", CAMPAIGN, 6)
    result = human_study.gate(ctx)
    assert result.metrics["mean"] == pytest.approx(8.0) and result.metrics["n"] == 6
    assert result.metrics["ci_low"] <= 8.0 <= result.metrics["ci_high"]
    assert result.quality == {"human_mean": pytest.approx(8.0)}
    report = (ctx.out_dir / "human_eval_report.md").read_text()
    assert "PASS" in report and "| code |" in report and "| general |" in report
    data = json.loads((ctx.out_dir / "human_eval_report.json").read_text())
    assert data["passed"] is True and data["summary"]["by_rater"] == {"r001": 2, "r002": 2, "r003": 2}
    # the same ratings against a higher bar: the gate fails, with the report in the error
    strict = study_cfg(url, min_mean=8.5)
    with pytest.raises(human_study.HumanGateFailed, match=r"mean 8\.00 < 8\.5") as exc:
        human_study.gate(gate_context(strict, tmp_path / "fail", CAMPAIGN, 6))
    assert "| domain | ratings | mean |" in str(exc.value)
    # the failed task's output is not committed: its report is kept in the store beside the run
    ctx = gate_context(strict, tmp_path / "fail2", CAMPAIGN, 6)
    with pytest.raises(human_study.HumanGateFailed):
        human_study.gate(ctx)
    kept = ctx.store.read_text(str(exc.value).split("Report: ", 1)[1].split()[0])
    assert kept and kept.startswith("# 9B human evaluation: FAIL")
    with pytest.raises(RuntimeError, match="no campaign/needed"):
        human_study.gate(gate_context(cfg, tmp_path / "bad", "", 6))
