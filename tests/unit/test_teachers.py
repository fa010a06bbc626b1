"""Teachers over real loopback HTTP servers: retries and backoff (429 with Retry-After, 500/503, timeouts,
refused connections), cascade routing tier 1 -> 2 -> 3, low confidence, the cost cap, the response cache,
the API key kept out of logs and errors, the reference solver and llama.cpp's server."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forge.artifacts import ArtifactStore
from forge.data.suites import check_answer, generate
from forge.modifiers.cascade import Tier, run_cascade, tiers_from_config
from forge.modifiers.local_teachers import (
    ChatResponse,
    LocalEndpoint,
    LocalServerError,
    chat_completion,
    chat_server,
    error_body,
    free_port,
    last_user_message,
    llama_server,
    reference_server,
    weights_alias,
)
from forge.modifiers.teacher_config import CascadeConfig, TeacherConfig, TeacherConfigError, plan_cascade
from forge.modifiers.teachers import (
    CostTracker,
    RateLimiter,
    ResponseCache,
    TeacherAuthError,
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailable,
    parse_retry_after,
    resolve_key,
    worst_case_cost,
)

SECRET = "sk-test-0123456789abcdefSECRET"


def sum_rows(n: int) -> list[dict[str, Any]]:
    """Numeric-checked rows whose prompts all have the same length (the cost-cap test relies on it)."""
    rows = []
    for i in range(n):
        a, b = 10 + i, 20 + i
        rows.append({"id": f"s{i}", "domain": "reasoning", "check": {"kind": "numeric", "answer": a + b},
                     "messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"Answer: {a + b}"}]})
    return rows


class Scripted:
    """A test teacher's behaviour, per prompt: its first requests get `faults` (status, headers) in order,
    later ones `answer(row)`, after `delay_s`. Counts requests and records the Authorization headers."""

    def __init__(self, rows: list[dict[str, Any]], answer: Callable[[dict[str, Any]], str],
                 faults: tuple[tuple[int, dict[str, str]], ...] = (), delay_s: float = 0.0,
                 usage: tuple[int, int] = (10, 5),
                 logprobs: Callable[[dict[str, Any]], list[float]] | None = None,
                 echo_auth: bool = False) -> None:
        self.rows = {r["messages"][0]["content"]: r for r in rows}
        self.answer, self.faults, self.delay_s, self.usage = answer, faults, delay_s, usage
        self.logprobs, self.echo_auth = logprobs, echo_auth
        self.calls: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __call__(self, body: dict[str, Any], headers: dict[str, str]) -> ChatResponse:
        prompt = last_user_message(body["messages"]) or ""
        with self._lock:
            n = self.calls[prompt]
            self.calls[prompt] += 1
            self.auth.append(headers.get("Authorization"))
        if self.delay_s:
            time.sleep(self.delay_s)
        if n < len(self.faults):
            status, extra = self.faults[n]
            message = f"fault {status}"
            if self.echo_auth:
                message += f"; you sent {headers.get('Authorization')}"
            return ChatResponse(status, error_body(message), extra)
        row = self.rows[prompt]
        lps = self.logprobs(row) if self.logprobs else None
        return ChatResponse(200, chat_completion(body["model"], self.answer(row), *self.usage, logprobs=lps))


def right(row: dict[str, Any]) -> str:
    return row["messages"][-1]["content"]


def right_for(ids: set[str]) -> Callable[[dict[str, Any]], str]:
    return lambda row: right(row) if row["id"] in ids else "Answer: -1"


@pytest.fixture
def serve() -> Iterator[Callable[[Scripted, str], LocalEndpoint]]:
    """Start scripted servers for the test; all stop at its end."""
    import contextlib

    with contextlib.ExitStack() as stack:
        yield lambda script, model="m": stack.enter_context(chat_server(script, (model,)))


def teacher(ep: LocalEndpoint, name: str, **kw: Any) -> TeacherConfig:
    fields = {"timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05, **kw}
    return TeacherConfig(name=name, model=ep.model, base_url=ep.base_url, **fields)


# ---- the cascade -------------------------------------------------------------------------------------

def test_cascade_routes_failures_up_the_tiers(serve) -> None:
    rows = sum_rows(6)
    t1 = Scripted(rows, right_for({"s0", "s1"}))
    # tier 2: a 429 asking for 20 ms (retry-after-ms, as OpenAI sends it) before each answer
    t2 = Scripted(rows, right_for({"s2", "s3"}), faults=((429, {"retry-after-ms": "20"}),))
    with reference_server(rows) as ref:
        tiers = [Tier(teacher(serve(t1), "cheap"), concurrency=3),
                 Tier(teacher(serve(t2), "middle"), concurrency=2),
                 Tier(ref.bind(TeacherConfig(name="reference", kind="reference", model="x")))]
        result = run_cascade(rows, tiers)
    assert [(r.id, r.status, r.tier, r.teacher) for r in result.items] == [
        ("s0", "accepted", 1, "cheap"), ("s1", "accepted", 1, "cheap"),
        ("s2", "accepted", 2, "middle"), ("s3", "accepted", 2, "middle"),
        ("s4", "accepted", 3, "reference"), ("s5", "accepted", 3, "reference")]
    assert all(r.verified and check_answer(row, r.answer).correct
               for r, row in zip(result.items, rows, strict=True))
    s1, s2, s3 = result.tiers
    assert (s1.sent, s1.accepted, s1.rejected, s1.errors) == (6, 2, 4, 0)
    assert (s2.sent, s2.accepted, s2.rejected, s2.errors) == (4, 2, 2, 0)
    assert (s3.sent, s3.accepted, s3.rejected) == (2, 2, 0)
    # only failures went up: tier 2 saw the 4 items tier 1 got wrong, each twice (429, then the answer)
    assert t1.total == 6 and sorted(t2.calls.values()) == [2, 2, 2, 2] and t2.total == 8
    assert (s2.retries, s2.http_attempts) == (4, 8)
    up = result.items[4].attempts[1]
    assert up.outcome == "rejected" and up.detail == "expected 38, got -1"
    q = result.quality()
    assert (q["items"], q["accepted"], q["unsent"], q["tier2.sent"], q["tier3.accepted"]) == (6, 6, 0, 4, 2)
    assert q["tier1.prompt_tokens"] == 60 and q["cost_usd"] == 0
    assert "6/6 items accepted" in result.notes()


def test_429_retry_after_is_honoured(serve) -> None:
    rows = sum_rows(1)
    script = Scripted(rows, right, faults=((429, {"Retry-After": "0.2"}), (429, {"retry-after-ms": "30"})))
    with TeacherClient(teacher(serve(script), "t", backoff_base_s=5.0, backoff_max_s=10.0)) as client:
        reply = client.chat(rows[0]["messages"][:1])
    assert reply.text == "Answer: 30" and reply.attempts == 3
    # the server's waits, not the 5 s exponential backoff
    assert client.stats.waits == [pytest.approx(0.2), pytest.approx(0.03)]
    assert client.stats.http_errors == {429: 2} and client.stats.retries == 2


def test_500_then_503_then_success_backs_off_exponentially(serve) -> None:
    rows = sum_rows(1)
    script = Scripted(rows, right, faults=((500, {}), (503, {})))
    with TeacherClient(teacher(serve(script), "t", backoff_base_s=0.02, backoff_max_s=0.05)) as client:
        reply = client.chat(rows[0]["messages"][:1])
    assert reply.attempts == 3 and script.total == 3
    first, second = client.stats.waits
    assert 0 <= first <= 0.02 and 0 <= second <= 0.04  # full jitter under base * 2**retry
    assert client.stats.http_errors == {500: 1, 503: 1}


def test_retries_exhausted_and_refused_requests(serve) -> None:
    rows = sum_rows(1)
    always = Scripted(rows, right, faults=((503, {}),) * 10)
    with TeacherClient(teacher(serve(always), "t", max_retries=2)) as client:
        with pytest.raises(TeacherUnavailable, match=r"gave up after 3 attempts; last: HTTP 503: .*fault"):
            client.chat(rows[0]["messages"][:1])
    bad = Scripted(rows, right, faults=((400, {}),))
    with TeacherClient(teacher(serve(bad), "t")) as client:
        with pytest.raises(TeacherRequestError, match="HTTP 400"):  # not retried: it would fail again
            client.chat(rows[0]["messages"][:1])
    assert bad.total == 1
    closed = TeacherConfig(name="gone", model="m", base_url=f"http://127.0.0.1:{free_port()}/v1",
                           max_retries=1, backoff_base_s=0.0, backoff_max_s=0.0)
    with TeacherClient(closed) as client:
        with pytest.raises(TeacherUnavailable, match="connection error"):
            client.chat(rows[0]["messages"][:1])
    assert client.stats.connection_errors == 2


def test_a_tier_that_times_out_escalates_to_the_next(serve) -> None:
    rows = sum_rows(3)
    slow = Scripted(rows, right, delay_s=1.5)
    with reference_server(rows) as ref:
        tiers = [Tier(teacher(serve(slow), "slow", timeout_s=0.3, max_retries=1), concurrency=3),
                 Tier(ref.bind(TeacherConfig(name="reference", kind="reference", model="x")))]
        result = run_cascade(rows, tiers)
    s1, s2 = result.tiers
    assert (s1.sent, s1.errors, s1.accepted, s1.timeouts, s1.retries) == (3, 3, 0, 6, 3)
    assert (s2.sent, s2.accepted) == (3, 3)
    assert all(r.tier == 2 and "timed out after 0.3s" in r.attempts[0].detail for r in result.items)


def test_low_confidence_escalates_and_keeps_a_verified_fallback(serve) -> None:
    rows = sum_rows(4)
    confident = {"s0", "s1"}
    t1 = Scripted(rows, right, logprobs=lambda r: [-0.01, -0.02] if r["id"] in confident else [-3.0, -2.0])
    t2 = Scripted(rows, right_for({"s2"}))
    tiers = [Tier(teacher(serve(t1), "t1", logprobs=True), min_confidence=0.5),
             Tier(teacher(serve(t2), "t2"))]
    result = run_cascade(rows, tiers)
    assert [(r.status, r.tier) for r in result.items] == [("accepted", 1), ("accepted", 1), ("accepted", 2),
                                                          ("accepted", 1)]
    assert result.items[0].confidence == pytest.approx(0.985, abs=1e-3)
    assert result.items[3].attempts[0].outcome == "low_confidence" and result.items[3].confidence < 0.1
    s1, s2 = result.tiers
    assert (s1.accepted, s1.low_confidence, s1.fallback_accepted) == (2, 2, 1)
    assert (s2.sent, s2.accepted, s2.rejected) == (2, 1, 1)
    # tier 1 as its own task (subphase B): what it did not accept is handed on, not decided
    alone = run_cascade(rows, tiers[:1], final=False)
    assert [r.status for r in alone.items] == ["accepted", "accepted", "escalate", "escalate"]
    assert alone.items[3].attempts[0].outcome == "low_confidence" and alone.items[3].answer is None


def test_cost_cap_stops_cleanly_and_a_rerun_resumes_from_the_cache(serve, forge_home: Path) -> None:
    rows = sum_rows(6)
    paid = Scripted(rows, right, usage=(10, 5))
    ep = serve(paid)
    priced = teacher(ep, "paid", price_in_per_1k=1.0, price_out_per_1k=1.0, max_tokens=8)
    actual = (10 + 5) / 1000  # USD per call at these prices
    worst = max(worst_case_cost(priced, r["messages"][:1]) for r in rows)
    cap = 2 * actual + worst  # room for exactly 3 calls, one at a time: 2 spent + the 3rd's worst case
    cache = ResponseCache(ArtifactStore(str(forge_home / "store")))
    with reference_server(rows) as ref:
        tiers = [Tier(priced, concurrency=1),
                 Tier(ref.bind(TeacherConfig(name="reference", kind="reference", model="x")))]
        cost = CostTracker(cap)
        first = run_cascade(rows, tiers, cost=cost, cache=cache)
        assert [r.status for r in first.items] == ["accepted"] * 3 + ["unsent"] * 3
        assert first.unsent == ["s3", "s4", "s5"] and "cost cap" in first.stopped
        assert cost.reached and cost.spent_usd == pytest.approx(3 * actual) and cost.spent_usd <= cap
        assert paid.total == 3 and first.tiers[0].unsent == 3 and first.tiers[1].sent == 0
        assert "3 unsent (cost cap)" in first.notes()

        # the retried task, with more budget: the 3 answers it paid for come from the cache at $0
        second = run_cascade(rows, tiers, cost=CostTracker(1.0), cache=cache)
        assert [r.status for r in second.items] == ["accepted"] * 6 and not second.unsent
        assert (second.tiers[0].cached, second.tiers[0].cost_usd) == (3, pytest.approx(3 * actual))
        assert paid.total == 6

        third = run_cascade(rows, tiers, cost=CostTracker(0.0), cache=cache)  # no budget at all: all cached
    assert third.tiers[0].cached == 6 and third.cost_usd == 0 and paid.total == 6
    assert [r.answer for r in third.items] == [r.answer for r in second.items]


# ---- the key -----------------------------------------------------------------------------------------------

def test_api_key_is_sent_but_never_logged_or_raised(serve, caplog: pytest.LogCaptureFixture) -> None:
    rows = sum_rows(2)
    # a 429 (logged as a retry), then a 401 whose body echoes the Authorization header back
    script = Scripted(rows, right, faults=((429, {"retry-after-ms": "1"}), (401, {})), echo_auth=True)
    cfg = teacher(serve(script), "keyed", api_key_env="FORGE_TEST_TEACHER_KEY")
    env = {"FORGE_TEST_TEACHER_KEY": SECRET}
    caplog.set_level(logging.DEBUG)
    with TeacherClient(cfg, env=env) as client:
        with pytest.raises(TeacherAuthError) as err:
            client.chat(rows[0]["messages"][:1])
        shown = [str(err.value), repr(err.value), repr(client), repr(client.cfg), repr(client._key),
                 str(client._key), repr(client.stats), repr(resolve_key(cfg, env))]
    assert script.auth[0] == f"Bearer {SECRET}"  # it did go to the server
    assert "FORGE_TEST_TEACHER_KEY" in str(err.value) and "***" in str(err.value)
    with pytest.raises(TeacherAuthError) as in_cascade:  # the cascade stops on a refused key
        run_cascade(rows, [Tier(cfg)], env=env)
    shown.append(str(in_cascade.value))
    assert any("retry 1/3" in rec.getMessage() for rec in caplog.records)
    for text in [*shown, caplog.text]:
        assert SECRET not in text and SECRET[-10:] not in text
    with pytest.raises(TeacherConfigError, match="FORGE_TEST_TEACHER_KEY is empty or unset"):
        TeacherClient(cfg, env={})
    free = Scripted(rows, right_for(set()))  # a missing key at tier 2 fails the run before tier 1 sends
    with pytest.raises(TeacherConfigError, match="FORGE_TEST_TEACHER_KEY"):
        run_cascade(rows, [Tier(teacher(serve(free), "free")), Tier(cfg)], env={})
    assert free.total == 0


# ---- local teachers ---------------------------------------------------------------------------------

def test_reference_server_answers_with_references_that_pass_the_checks(forge_home: Path) -> None:
    rows = [r for d in ("general", "code", "reasoning", "automation") for r in generate(d, 2, 7, "dev")]
    ref_teacher = TeacherConfig(name="reference", kind="reference", model="x", max_retries=0)
    local = TeacherConfig(name="local", kind="local_model", model="x", max_retries=0)
    cache = ResponseCache(ArtifactStore(str(forge_home / "store")))
    with reference_server(rows) as ep, TeacherClient(ep.bind(ref_teacher), cache=cache) as client:
        for row in rows:
            reply = client.chat(row["messages"][:-1])
            assert check_answer(row, reply.text).correct, row["id"]
            assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.finish_reason == "stop"
        assert not client.chat(rows[0]["messages"][:-1]).cached  # references are never cached
        with pytest.raises(TeacherRequestError, match="HTTP 422: .*no reference answer"):
            client.chat([{"role": "user", "content": "a prompt no suite row has"}])
        with TeacherClient(ep.bind(local), cache=cache) as local_client:
            assert not local_client.chat(rows[0]["messages"][:-1]).cached
    with reference_server(rows) as ep2:
        assert ep2.base_url != ep.base_url
        # a local model's replies are keyed on its alias (its weights), not its loopback port
        with TeacherClient(ep2.bind(local), cache=cache) as local_client:
            assert local_client.chat(rows[0]["messages"][:-1]).cached
        with TeacherClient(ref_teacher.at(ep2.base_url, "gpt-9")) as client:
            with pytest.raises(TeacherRequestError, match="HTTP 404: .*model 'gpt-9' not found"):
                client.chat(rows[0]["messages"][:-1])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette", reason="llama-cpp-python's [server] extra is not installed")
    from forge.compress import llama_cpp_tools as lt
    from tests.tiny_model import save_tiny_model

    try:
        lt.ensure_tools()
    except lt.LlamaCppToolsError as exc:
        pytest.skip(f"llama.cpp converters unavailable: {exc}")
    path = tmp_path_factory.mktemp("teacher_gguf")
    rows = sum_rows(10)
    save_tiny_model(path / "hf", [m["content"] for r in rows for m in r["messages"]], vocab_size=512,
                    max_position_embeddings=128)
    return lt.convert_hf_to_gguf(path / "hf", path / "tiny-f16.gguf", "f16", "gpt-2")


def test_llama_cpp_server_answers_a_chat_request(tiny_gguf: Path, tmp_path: Path) -> None:
    local = TeacherConfig(name="local", kind="local_model", model="placeholder", max_tokens=8, logprobs=True)
    with llama_server(tiny_gguf, n_ctx=128) as ep, TeacherClient(ep.bind(local)) as client:
        # the alias names the weights: the response cache keys local teachers on it
        assert ep.base_url.startswith("http://127.0.0.1:") and ep.model == weights_alias(tiny_gguf)
        assert re.fullmatch(r"tiny-f16-[0-9a-f]{12}", ep.model)
        reply = client.chat([{"role": "user", "content": "What is 10 plus 20?"}])
    assert isinstance(reply.text, str) and reply.finish_reason in ("stop", "length")
    assert 0 < reply.completion_tokens <= 8 and reply.prompt_tokens > 0 and not reply.usage_estimated
    assert reply.confidence is not None and 0 < reply.confidence <= 1
    # the demo cascade: our (untrained) model first, the reference solver for what it gets wrong
    rows = sum_rows(3)
    demo = CascadeConfig()
    with llama_server(tiny_gguf, n_ctx=128) as ep, reference_server(rows) as ref:
        small = TeacherConfig.model_validate({**demo.teachers["compressed"].model_dump(), "max_tokens": 8})
        started = {"compressed": ep.bind(small), "reference": ref.bind(demo.teachers["reference"])}
        # the GGUF tier, then the reference solver (the demo's middle tier needs a recovery LoRA)
        result = run_cascade(rows, tiers_from_config(demo, "reasoning", started)[::2])
    s1, s2 = result.tiers
    assert (s1.teacher, s1.sent, s1.errors, s2.teacher) == ("compressed", 3, 0, "reference")
    assert s1.accepted + s2.accepted == 3 and s2.sent == s1.rejected and result.cost_usd == 0
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(LocalServerError, match=r"(?s)exited with code .*before it was ready.*junk\.gguf"):
        with llama_server(junk, startup_timeout_s=60, log_path=tmp_path / "server.log"):
            pass


# ---- pieces -----------------------------------------------------------------------------------------

def test_rate_limiter_spaces_request_starts() -> None:
    now = [100.0]
    limiter = RateLimiter(120, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert [limiter.acquire() for _ in range(3)] == [0.0, 0.5, 0.5]
    now[0] += 5.0  # idle time does not bank a burst beyond one immediate request
    assert [limiter.acquire() for _ in range(2)] == [0.0, 0.5]
    assert RateLimiter(None).acquire() == 0.0


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None


def test_cost_tracker_reserves_the_worst_case() -> None:
    cost = CostTracker(1.0, spent_usd=0.25)
    held = cost.reserve("a", 0.5)
    with pytest.raises(Exception, match=r"cost cap \$1.0000 reached: spent \$0.2500, \$0.5000 in flight"):
        cost.reserve("b", 0.3)
    assert cost.reached
    cost.settle("a", held, 0.1)
    assert cost.spent_usd == pytest.approx(0.35) and cost.reserved_usd == 0
    assert cost.reserve("free", 0.0) == 0.0  # free teachers still go once the cap is reached
    with pytest.raises(Exception, match="cost cap"):  # paid ones do not, even if they would fit now
        cost.reserve("a", 0.01)


def test_plan_tiers_and_config_validation() -> None:
    plan = plan_cascade()
    assert [t.teacher for t in plan.domains["code"]] == ["qwen-coder", "deepseek", "gpt-5"]
    assert [t.teacher for t in plan.domains["reasoning"]] == ["llama-405b", "gpt-4o", "gpt-5-cot"]
    assert [t.teacher for t in plan.domains["automation"]] == ["claude-3.5", "gpt-4o", "gpt-5"]
    gpt5 = plan.teachers["gpt-5"]
    assert gpt5.max_tokens_param == "max_completion_tokens" and gpt5.temperature is None
    assert plan.teachers["gpt-4o"].key_env == "OPENAI_API_KEY"
    assert TeacherConfig(name="my.vllm", model="m", conn_id="vllm").key_env == "FORGE_TEACHER_KEY_MY_VLLM"
    plan.check_domains(["code", "reasoning", "automation"])
    with pytest.raises(TeacherConfigError, match=r"'fingpt' \(openai\) has no base_url: set teachers\."):
        plan.check_domains(["finance"])
    demo = CascadeConfig()
    assert [t.name for _, t in demo.tiers_for("code")] == ["compressed", "recovered", "reference"]
    assert [t.weights for _, t in demo.tiers_for("code")[:2]] == ["compressed", "recovered"]
    assert set(demo.local_teachers(["code", "reasoning"])) == {"compressed", "recovered", "reference"}
    with pytest.raises(TeacherConfigError, match="has no base_url: the task sets it"):
        TeacherClient(demo.teachers["compressed"])
    started = {"reference": demo.teachers["reference"].at("http://127.0.0.1:9/v1")}
    tiers = tiers_from_config(CascadeConfig(min_confidence=0.3), "code", started)
    assert tiers[2].teacher.base_url == "http://127.0.0.1:9/v1" and tiers[0].min_confidence == 0.3

    def bad(match: str, **data: Any) -> None:
        with pytest.raises(ValueError, match=match):
            CascadeConfig.model_validate(data)

    one = {"a": {"model": "m", "base_url": "https://x.test/v1"}}
    bad(r"domains.code tier 2: teacher 'b' is not defined", teachers=one, domains={"code": ["a", "b"]})
    bad(r"reference teacher 'r' can only be the last tier",
        teachers={**one, "r": {"model": "m", "kind": "reference"}}, domains={"code": ["r", "a"]})
    bad(r"teachers.a.name is 'z'; it must equal its key", teachers={"a": {"name": "z", "model": "m"}})
    bad(r"appears twice", teachers=one, domains={"code": ["a", "a"]})
    bad(r"at least one tier", teachers=one, domains={"code": []})
    four = {n: {"model": "m", "base_url": "https://x.test/v1"} for n in "abcd"}
    bad(r"4 tiers; at most 3", teachers=four, domains={"code": list("abcd")})
    bad(r"is a rubric judge", teachers={**one, "j": {"model": "m", "kind": "rubric"}},
        domains={"code": ["j"]})
    bad(r"weights applies to local_model", teachers={"a": {"model": "m", "weights": "recovered"}})
    bad(r"must be an http\(s\):// URL", teachers={"a": {"model": "m", "base_url": "api.openai.com"}})
    bad(r"environment variable name", teachers={"a": {"model": "m", "api_key_env": "sk-123"}})
    bad(r"takes no key", teachers={"a": {"model": "m", "kind": "local_model", "api_key_env": "K"}})
    bad(r"backoff_max_s", teachers={"a": {"model": "m", "backoff_base_s": 5, "backoff_max_s": 1}})
    bad(r"may not set \['model'\]", teachers={"a": {"model": "m", "extra_body": {"model": "x"}}})
    bad(r"Extra inputs are not permitted", teachers={"a": {"model": "m", "api_key": SECRET}})
