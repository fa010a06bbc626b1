"""8B: the OpenAI-compatible REST API over a ChatService.

    GET  /v1/models             the routed model ("<release>") and each option ("<release>:<option>")
    POST /v1/chat/completions   OpenAI's request and response (SSE when stream=true); extra request fields
                                mode (fast|accurate|auto), session_id, self_consistency, critique, few_shot;
                                every response carries a `forge` object saying how the request was routed
    POST /v1/feedback           thumbs up/down on an answer (the store 13A's weekly retraining reads)
    GET  /health, /metrics      liveness; Prometheus (8D)
    GET  /openapi.json, /docs   the spec

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a malformed or invalid
request (the message names the field), 401 for a missing/wrong key, 404 for an unknown model, 413 for a body
over serving.max_request_bytes, 503 when the queue is full.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from forge.serve.engine import EngineBusy, PromptTooLong
from forge.serve.service import ChatRequest

if TYPE_CHECKING:
    from forge.serve.serve_config import ServingConfig
    from forge.serve.service import ChatService

log = logging.getLogger("forge.serve.access")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id...: accepted, unused
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionBody(BaseModel):
    """What /v1/chat/completions accepts (OpenAI's fields Forge honours, plus Forge's own)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)  # Forge's default is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    tools: list[Any] | None = None
    # Forge's own
    mode: Literal["fast", "accurate", "auto"] | None = None
    session_id: str | None = Field(None, min_length=1, max_length=128)
    self_consistency: int | None = Field(None, ge=1, le=16)
    critique: bool = False
    few_shot: bool | None = None  # 7B's retrieved demonstrations (None: the server's default)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down", 1, -1]
    comment: str | None = Field(None, max_length=4000)


def error_body(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def validation_error(exc: ValidationError, where: str) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(
        400,
        f"{where}: {param}: {first['msg']}" if param else f"{where}: {first['msg']}",
        "invalid_value",
        param,
    )


def create_app(service: ChatService, cfg: ServingConfig, api_keys: list[str]) -> FastAPI:
    name = service.engine.release.name
    metrics = service.metrics
    app = FastAPI(
        title="Forge inference API",
        version="1",
        description="OpenAI-compatible chat completions over a Forge release, with routing between "
        "the base and its modifier adapters.",
    )
    app.state.service = service
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        metrics.http_errors.labels(str(e.status), e.code).inc()
        log.info(
            "rejected %s %s",
            request.method,
            request.url.path,
            extra={
                "fields": {"status": e.status, "code": e.code, "param": e.param, "path": request.url.path}
            },
        )
        return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)

    def authorized(request: Request) -> None:
        if not api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key",
                kind="authentication_error",
            )
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in api_keys):
            raise ApiError(401, "invalid API key", "invalid_api_key", kind="authentication_error")

    async def read_json(request: Request, what: str) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
            raise ApiError(
                413,
                f"request body of {int(length)} bytes exceeds the limit of {cfg.max_request_bytes} bytes",
                "request_too_large",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_request_bytes:
                raise ApiError(
                    413,
                    f"request body exceeds the limit of {cfg.max_request_bytes} bytes",
                    "request_too_large",
                )
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"{what}: the body is not valid JSON ({e})", "invalid_json") from None

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "release": name,
            "options": service.options,
            "workers": len(service.engine.workers),
            "router": service.routing is not None,
            "critic": service.critic is not None,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "forge",
                "forge": {"kind": "routed", "modes": ["fast", "accurate", "auto"]},
            }
        ]
        data += [
            {
                "id": f"{name}:{o}",
                "object": "model",
                "created": started,
                "owned_by": "forge",
                "forge": {"kind": "base" if o == "base" else "modifier", "option": o},
            }
            for o in service.options
        ]
        return {"object": "list", "data": data}

    def to_request(body: ChatCompletionBody, request: Request) -> ChatRequest:
        option = None
        if body.model != name:
            prefix, _, opt = body.model.partition(":")
            if prefix != name or opt not in service.options:
                known = [name, *(f"{name}:{o}" for o in service.options)]
                raise ApiError(
                    404,
                    f"model {body.model!r} does not exist; this server has {known}",
                    "model_not_found",
                    "model",
                )
            option = opt
        if body.n != 1:
            raise ApiError(
                400,
                "n: only n=1 is supported (use self_consistency to sample several paths)",
                "unsupported_value",
                "n",
            )
        if body.tools:
            raise ApiError(
                400, "tools: function calling is not supported by this server", "unsupported_value", "tools"
            )
        if len(body.messages) > cfg.max_messages:
            raise ApiError(
                400,
                f"messages: {len(body.messages)} messages exceed the limit of {cfg.max_messages}",
                "too_many_messages",
                "messages",
            )
        if body.messages[-1].role != "user":
            raise ApiError(
                400,
                "messages: the last message must have role 'user'",
                "invalid_value",
                f"messages.{len(body.messages) - 1}.role",
            )
        max_tokens = body.max_completion_tokens or body.max_tokens or cfg.default_max_tokens
        if max_tokens > cfg.max_tokens:
            raise ApiError(
                400,
                f"max_tokens: {max_tokens} exceeds this server's limit of {cfg.max_tokens}",
                "invalid_value",
                "max_tokens",
            )
        sc = body.self_consistency or 1
        if body.few_shot and service.few_shot is None:
            raise ApiError(400, "few_shot: this release has no few-shot templates (7B did not run)",
                           "invalid_value", "few_shot")
        return ChatRequest(
            [{"role": m.role, "content": m.text()} for m in body.messages],
            mode=body.mode or cfg.default_mode,
            session_id=body.session_id or request.headers.get(cfg.session_header),
            option=option,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(body.stop or ()),
            self_consistency=sc,
            critique=body.critique,
            few_shot=body.few_shot,
            ignore_eos=body.ignore_eos,
        )

    def events(req: ChatRequest) -> Iterator[dict[str, Any]]:
        """service.stream with the engine's refusals as API errors."""
        try:
            yield from service.stream(req)
        except PromptTooLong as e:
            raise ApiError(400, f"messages: {e}", "context_length_exceeded", "messages") from None
        except EngineBusy as e:
            raise ApiError(
                503, str(e), "server_busy", kind="server_error", headers={"Retry-After": "1"}
            ) from None

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Any:
        import anyio

        raw = await read_json(request, "chat.completions")
        try:
            body = ChatCompletionBody.model_validate(raw)
        except ValidationError as e:
            raise validation_error(e, "chat.completions") from None
        req = to_request(body, request)
        it = events(req)
        # the route (and any refusal) before a single byte is sent: errors keep their HTTP status
        first = await anyio.to_thread.run_sync(next, it)
        created = int(time.time())
        cid = f"chatcmpl-{req.request_id}"
        if not body.stream:
            result = await anyio.to_thread.run_sync(_drain, it)
            u = result.usage
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": _finish(u.finish_reason),
                    }
                ],
                "usage": {
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                },
                "forge": result.forge_field(),
            }
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(it, first, cid, created, body.model, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.post("/v1/feedback", dependencies=[Depends(authorized)])
    async def feedback(request: Request) -> dict[str, Any]:
        raw = await read_json(request, "feedback")
        try:
            body = FeedbackBody.model_validate(raw)
        except ValidationError as e:
            raise validation_error(e, "feedback") from None
        rating = 1 if body.rating in ("up", 1) else -1
        try:
            service.rate(body.session_id, body.request_id, rating, body.comment)
        except RuntimeError as e:
            raise ApiError(409, str(e), "no_feedback_store") from None
        return {"ok": True}

    return app


def _drain(it: Iterator[dict[str, Any]]) -> Any:
    for event in it:
        if event["type"] == "done":
            return event["result"]
    raise RuntimeError("the stream ended without a result")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None, **extra: Any
) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


async def _sse(
    it: Iterator[dict[str, Any]],
    first: dict[str, Any],
    cid: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    import anyio

    route = first["route"]
    yield _chunk(
        cid,
        created,
        model,
        {"role": "assistant", "content": ""},
        None,
        forge={
            "request_id": first["request_id"],
            "session_id": first["session_id"],
            "mode": route.mode,
            "routing": route.as_dict(),
        },
    )
    try:
        while True:
            event = await anyio.to_thread.run_sync(next, it, None)
            if event is None:
                break
            if event["type"] == "delta":
                yield _chunk(cid, created, model, {"content": event["text"]}, None)
            elif event["type"] == "done":
                result = event["result"]
                u = result.usage
                usage = {
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                }
                yield _chunk(cid, created, model, {}, _finish(u.finish_reason), forge=result.forge_field())
                if include_usage:
                    tail = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage}
                    yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(error_body(e))}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # the headers are sent: say it in the stream
        logging.getLogger("forge.serve").exception("stream failed")
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': 'generation_failed'}})}\n\n"  # noqa: E501
        yield "data: [DONE]\n\n"
    finally:
        await anyio.to_thread.run_sync(it.close)
