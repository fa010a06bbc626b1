"""8B against a real server: uvicorn on loopback over a real release (tiny GGUF, recovery + two modifier
LoRAs,
a routing policy), driven by the real `openai` client (and raw httpx where a client would not send it)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

KEY = "sk-forge-test-key-1234"


@pytest.fixture(scope="module")
def server(tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from forge.serve.api import create_app
    from forge.serve.server import BackgroundServer, build_service
    from tests.serve_fixtures import build_release

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny_run.home))
        release = build_release(tiny_run, tmp_path_factory.mktemp("release") / "release")
        cfg = tiny_run.config(
            {
                "serving": {
                    "workers": 2,
                    "default_max_tokens": 16,
                    "max_tokens": 64,
                    "max_request_bytes": 4096,
                    "max_messages": 8,
                },
                "routing": {
                    "sessions": {"url": f"sqlite:///{release.parent / 'sessions.db'}"},
                    "retraining": {"feedback_root": f"file://{release.parent}/feedback"},
                },
            }
        )
        service = build_service(release, cfg)
        srv = BackgroundServer(create_app(service, cfg.serving, [KEY]))
        srv.cfg, srv.service, srv.feedback_root = cfg, service, release.parent / "feedback"
        yield srv
        srv.stop()
        service.close()


def client(server: Any, key: str = KEY) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(server: Any, text: str, **kw: Any) -> Any:
    body = kw.pop("extra_body", {})
    return client(server).chat.completions.create(
        model="forge-tiny", messages=[{"role": "user", "content": text}], extra_body=body, **kw
    )


def forge(obj: Any) -> dict[str, Any]:
    return obj.model_extra["forge"]


def test_models_list_the_routed_model_and_every_option(server: Any) -> None:
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["forge-tiny", "forge-tiny:base", "forge-tiny:code", "forge-tiny:reasoning"]


def test_chat_and_stream_give_the_same_greedy_answer_with_routing_attached(server: Any) -> None:
    whole = ask(server, "What is 12 + 30?", max_tokens=12, extra_body={"mode": "fast"})
    text = whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0 and whole.choices[0].finish_reason in ("stop", "length")
    assert forge(whole)["routing"]["option"] == "base" and forge(whole)["mode"] == "fast"

    chunks = list(
        client(server).chat.completions.create(
            model="forge-tiny",
            messages=[{"role": "user", "content": "What is 12 + 30?"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mode": "fast"},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    assert len(pieces) >= 2  # streamed (the first token at once), not one final write
    assert forge(chunks[0])["routing"]["option"] == "base"  # the route comes first
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_engine_hands_text_over_once_per_stream_interval(server: Any) -> None:
    from forge.serve.engine import GenParams

    engine = server.service.engine
    ids = engine.prompt_ids([{"role": "user", "content": "Count from one to twenty."}], 32)
    params = GenParams(max_tokens=32, ignore_eos=True)
    before = engine.stream_interval_s

    def run(interval_s: float) -> tuple[Any, list[str]]:
        engine.stream_interval_s = interval_s
        for w in engine.workers:  # no prompt cache on either worker: both runs evaluate the same way
            w.llm.reset()
        stream = engine.submit("base", ids, params)
        return stream, list(stream)

    try:
        each, per_token = run(0.0)
        held, batched = run(3600.0)
    finally:
        engine.stream_interval_s = before
    assert each.usage.completion_tokens == held.usage.completion_tokens == 32
    assert "".join(batched) == "".join(per_token)
    # an hour's interval: the first token at once (time to first token), the rest when generation ended;
    # none: a hand-off per token that has text (an end-of-turn token has none, so fewer than 32)
    assert len(batched) == 2 and batched[0] == per_token[0]
    assert all(per_token) and len(per_token) > 2


def test_each_mode_routes_as_it_says(server: Any) -> None:
    fast = forge(ask(server, "Write a python function that adds two numbers.", extra_body={"mode": "fast"}))
    accurate = forge(
        ask(server, "Write a python function that adds two numbers.", extra_body={"mode": "accurate"})
    )
    auto = forge(ask(server, "Write a python function that adds two numbers.", extra_body={"mode": "auto"}))
    assert fast["routing"]["option"] == "base" and fast["routing"]["confidence"] is None
    assert accurate["routing"]["option"] in ("code", "reasoning")  # always a modifier
    assert 0 <= accurate["routing"]["confidence"] <= 1
    assert auto["routing"]["threshold"] is not None
    # auto takes a modifier exactly when its calibrated probability reaches the threshold
    probs = auto["routing"]["probs"]
    best_mod = max((o for o in probs if o != "base"), key=probs.get)
    expected = best_mod if probs[best_mod] >= auto["routing"]["threshold"] else "base"
    assert auto["routing"]["option"] == expected


def test_pinned_options_hot_swap_adapters_without_stale_cache(server: Any) -> None:
    outs = {}
    for option in ("base", "code", "reasoning", "base", "code"):
        r = client(server).chat.completions.create(
            model=f"forge-tiny:{option}",
            max_tokens=12,
            messages=[{"role": "user", "content": "Name a color."}],
        )
        outs.setdefault(option, []).append(r.choices[0].message.content)
        assert forge(r)["routing"]["option"] == option and forge(r)["mode"] == "pinned"
    assert outs["base"][0] == outs["base"][1] and outs["code"][0] == outs["code"][1]
    assert len({outs["base"][0], outs["code"][0], outs["reasoning"][0]}) == 3  # the adapters do differ


def test_session_continuity(server: Any) -> None:
    first = forge(ask(server, "How many legs does a spider have?", extra_body={"session_id": "sess-a"}))
    second = forge(ask(server, "And an ant?", extra_body={"session_id": "sess-a"}))
    other = forge(ask(server, "And an ant?", extra_body={"session_id": "sess-b"}))
    assert (first["session_id"], second["session_id"]) == ("sess-a", "sess-a")
    assert (first["routing"]["turn"], second["routing"]["turn"], other["routing"]["turn"]) == (1, 2, 1)
    stored = server.service.routing.sessions.get("sess-a")
    assert [t["content"] for t in stored["turns"] if t["role"] == "user"] == [
        "How many legs does a spider have?",
        "And an ant?",
    ]
    assert sum(t["role"] == "assistant" for t in stored["turns"]) == 2
    # a client that sends no session id: the conversation's first message keeps it together
    q = [{"role": "user", "content": "Tell me about owls."}]
    a = client(server).chat.completions.create(model="forge-tiny", messages=q, max_tokens=8)
    b = client(server).chat.completions.create(
        model="forge-tiny",
        max_tokens=8,
        messages=[
            *q,
            {"role": "assistant", "content": a.choices[0].message.content},
            {"role": "user", "content": "More."},
        ],
    )
    assert forge(a)["session_id"] == forge(b)["session_id"] and forge(b)["routing"]["turn"] == 2


def test_self_consistency_and_critique_fields(server: Any) -> None:
    r = forge(ask(server, "What is 7 * 6?", extra_body={"mode": "accurate", "self_consistency": 3}))
    sc = r["self_consistency"]
    assert sc["samples"] == 3 and sum(sc["votes"].values()) <= 3 and 0 <= sc["agreement"] <= 1
    crit = forge(ask(server, "What is 7 * 6?", extra_body={"critique": True}))["critique"]
    assert crit == {"skipped": "this release has no critic (12A)"}


def test_auth_failures(server: Any) -> None:
    import httpx
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError) as e:
        client(server, "sk-wrong").models.list()
    assert e.value.status_code == 401 and "invalid API key" in str(e.value)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "forge-tiny", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_bad_requests_get_clear_errors(server: Any) -> None:
    import httpx
    from openai import BadRequestError, NotFoundError

    with pytest.raises(BadRequestError) as e:
        ask(server, "hi", max_tokens=65)
    assert "max_tokens: 65 exceeds this server's limit of 64" in str(e.value)
    with pytest.raises(NotFoundError) as e:
        client(server).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "'gpt-4' does not exist" in str(e.value)
    with pytest.raises(BadRequestError) as e:  # over the context once the template is applied
        ask(server, "word " * 600, max_tokens=8)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(BadRequestError) as e:  # 7B's demonstrations asked of a release without them
        ask(server, "hi", extra_body={"few_shot": True})
    assert "few_shot: this release has no few-shot templates" in str(e.value)

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    big = httpx.post(
        url,
        headers=headers,
        content=json.dumps({"model": "forge-tiny", "messages": [{"role": "user", "content": "x" * 5000}]}),
    )
    assert big.status_code == 413 and "exceeds the limit of 4096 bytes" in big.json()["error"]["message"]
    broken = httpx.post(url, headers=headers, content=b'{"model": "forge-tiny", "messages": [')
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    cases = [
        ({"model": "forge-tiny"}, "messages"),
        ({"model": "forge-tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {"model": "forge-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
            "temperature",
        ),
        (
            {
                "model": "forge-tiny",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            },
            "messages.1.role",
        ),
        ({"model": "forge-tiny", "messages": [{"role": "user", "content": "hi"}] * 9}, "messages"),
        ({"model": "forge-tiny", "messages": [{"role": "user", "content": "hi"}], "mode": "turbo"}, "mode"),
    ]
    for body, param in cases:
        r = httpx.post(url, headers=headers, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, r.text
        assert param.split(".")[0] in r.json()["error"]["message"]


def test_feedback_lands_in_the_store_13a_reads(server: Any) -> None:
    import httpx

    from forge.artifacts import ArtifactStore
    from forge.routing.feedback import read_interval

    r = forge(ask(server, "What is the capital of France?", extra_body={"session_id": "fb-1"}))
    ok = httpx.post(
        f"{server.url}/v1/feedback",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"session_id": "fb-1", "request_id": r["request_id"], "rating": "down", "comment": "wrong city"},
    )
    assert ok.status_code == 200
    bad = httpx.post(
        f"{server.url}/v1/feedback",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"session_id": "fb-1", "request_id": r["request_id"], "rating": 5},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    now = datetime.now(UTC)
    batch = read_interval(
        ArtifactStore(f"file://{server.feedback_root}"),
        f"file://{server.feedback_root}",
        now - timedelta(hours=1),
        now + timedelta(hours=1),
    )
    ratings = [e for e in batch.events if e["kind"] == "rating" and e["request_id"] == r["request_id"]]
    assert len(ratings) == 1 and ratings[0]["rating"] == -1 and ratings[0]["comment"] == "wrong city"
    assert any(e["kind"] == "decision" and e["request_id"] == r["request_id"] for e in batch.events)


def test_concurrent_streams_metrics_and_openapi(server: Any) -> None:
    import httpx

    errors: list[BaseException] = []
    texts: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            stream = client(server).chat.completions.create(
                model="forge-tiny:base",
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=8,
                stream=True,
            )
            texts[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(texts) == 6

    text = httpx.get(f"{server.url}/metrics").text
    assert 'forge_requests_total{mode="pinned",option="base",status="ok"}' in text
    assert "forge_time_to_first_token_seconds_bucket" in text and "forge_http_errors_total" in text
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/feedback"} <= set(spec["paths"])


def test_release_tampering_is_refused(tmp_path: Path, server: Any) -> None:
    import shutil

    from forge.artifacts import ArtifactError
    from forge.serve.release import Release

    src = server.service.engine.release.folder
    copy = tmp_path / "r"
    shutil.copytree(src, copy)
    with open(copy / "adapters" / "code.gguf", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(ArtifactError, match="adapters/code.gguf does not match its sha256"):
        Release.load(copy)
