"""Local teachers: OpenAI-compatible servers a task starts on a free loopback port, so the demo and the tests
use the same HTTP client as production (forge.modifiers.teachers) with no keys.

- `llama_server(gguf)`: llama-cpp-python's own server (`llama_cpp.server`, the `[server]` extra; started
  through forge.evaluate.llama_cpp_params.SERVER_MAIN) in a subprocess, serving a GGUF (e.g. the run's 2C
  output) under a model alias.
- `reference_server(rows)`: answers each prompt with the matching suite row's reference answer (looked up by
  the last user message), the demo's top tier. Unknown prompts get HTTP 422: the solver has no answer. It also
  answers 1C's critique requests about a known prompt (`critique_reply`: the checker's verdict + reference).
- `rubric_judge_server(rows)`: the demo's judge: scores the answer in a judge prompt "Score: N" against the
  judged row's rubric constraints (or its checker); unknown tasks and non-judge prompts get HTTP 422.
- `chat_server(respond)`: the small stdlib server both the reference solver and the tests' fault-injecting
  servers are built on (ThreadingHTTPServer in a daemon thread).
Each is a context manager yielding a LocalEndpoint; leaving the block stops the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from forge.evaluate.llama_cpp_params import SERVER_MAIN
from forge.modifiers.teacher_config import TeacherConfig

log = logging.getLogger("forge.teachers")

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 40


class LocalServerError(RuntimeError):
    """A local teacher server did not start (the message carries its log's tail) or was misused."""


@dataclass(frozen=True)
class LocalEndpoint:
    base_url: str  # http://127.0.0.1:<port>/v1
    model: str  # the model id the server answers to
    log_path: Path | None = None

    def bind(self, teacher: TeacherConfig) -> TeacherConfig:
        """The teacher pointed at this server."""
        return teacher.at(self.base_url, self.model)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ---- OpenAI response shapes --------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """The stdlib servers' token count: words and punctuation marks (they have no tokenizer)."""
    return len(_TOKEN.findall(text))


def chat_completion(model: str, text: str, prompt_tokens: int, completion_tokens: int | None = None,
                    logprobs: list[float] | None = None, finish_reason: str = "stop") -> dict[str, Any]:
    """An OpenAI chat.completion object."""
    completion_tokens = count_tokens(text) if completion_tokens is None else completion_tokens
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish_reason, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": f"t{i}", "logprob": lp, "top_logprobs": []}
                                          for i, lp in enumerate(logprobs)]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@dataclass
class ChatResponse:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] | None = None


Responder = Callable[[dict[str, Any], Mapping[str, str]], ChatResponse]


def prompt_tokens_of(messages: Iterable[Mapping[str, Any]]) -> int:
    return sum(count_tokens(str(m.get("content", ""))) + 4 for m in messages)


# ---- the stdlib server -------------------------------------------------------------------------------

def _handler(respond: Responder, models: tuple[str, ...]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # request lines to our logger, not stderr
            log.debug("local teacher: " + format, *args)

        def _send(self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "forge"}
                                                            for m in models]})
            else:
                self._send(404, error_body(f"no route {self.path}"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, error_body(f"no route {self.path}"))
                return
            try:
                body = json.loads(raw)
                if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                    raise ValueError("body must be a JSON object with a 'messages' list")
            except ValueError as exc:
                self._send(400, error_body(f"bad request: {exc}"))
                return
            if body.get("model") not in models:
                self._send(404, error_body(f"model {body.get('model')!r} not found; served: {list(models)}",
                                           "not_found_error"))
                return
            try:
                out = respond(body, dict(self.headers))
            except Exception as exc:  # a responder bug is the server's 500, as a real server would answer
                log.exception("local teacher responder failed")
                self._send(500, error_body(f"server error: {type(exc).__name__}", "server_error"))
                return
            self._send(out.status, out.body, out.headers)

    return Handler


@contextlib.contextmanager
def chat_server(respond: Responder, models: Iterable[str] = ("local",)) -> Iterator[LocalEndpoint]:
    """An OpenAI-compatible /v1/chat/completions (+ /v1/models) on a free loopback port, answered by
    `respond(body, headers)`. Requests are served concurrently (one thread each)."""
    names = tuple(models)
    server = ThreadingHTTPServer((LOOPBACK, 0), _handler(respond, names))
    server.daemon_threads = True  # a handler still sleeping (a timeout test) never blocks shutdown
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="local-teacher", daemon=True)
    thread.start()
    try:
        yield LocalEndpoint(f"http://{LOOPBACK}:{server.server_address[1]}/v1", names[0])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---- the reference solver -------------------------------------------------------------------------------

def _key(text: str) -> str:
    return " ".join(text.split())


def last_user_message(messages: Iterable[Mapping[str, Any]]) -> str | None:
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    return users[-1] if users else None


def reference_responder(rows: Iterable[Mapping[str, Any]], model: str, critiques: bool = True) -> Responder:
    """Answers with the reference of the row whose last user message matches (whitespace-normalized).
    critiques: also answer 1C's critique requests about a known prompt (critique_reply)."""
    from forge.data.records import prompt_messages, reference

    answers: dict[str, str] = {}
    known: dict[str, dict[str, Any]] = {}
    for row in rows:
        prompt = last_user_message(prompt_messages(dict(row)))
        if prompt is None:
            raise LocalServerError(f"row {row.get('id', '?')!r} has no user message to find its reference by")
        answers.setdefault(_key(prompt), reference(dict(row)))
        known.setdefault(_key(prompt), dict(row))

    def respond(body: dict[str, Any], headers: Mapping[str, str]) -> ChatResponse:
        prompt = last_user_message(body["messages"])
        answer = answers.get(_key(prompt)) if prompt is not None else None
        if answer is None and critiques:
            answer = critique_reply(body["messages"], known)
        if answer is None:
            return ChatResponse(422, error_body("the reference solver has no reference answer for this "
                                                "prompt"))
        # a reference is certain: logprob 0 per token when asked
        lps = [0.0] * max(1, count_tokens(answer)) if body.get("logprobs") else None
        usage = prompt_tokens_of(body["messages"])
        return ChatResponse(200, chat_completion(model, answer, usage, logprobs=lps))

    return respond


def critique_reply(messages: Iterable[Mapping[str, Any]],
                   known: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The reference solver's critique mode: a critique request (forge.train.distillation's format: question
    turns, the student's answer, the request) about a known prompt gets the suite checker's verdict on the
    student's answer and the row's reference as the final answer. None for anything else."""
    from forge.data.records import reference
    from forge.data.suites import check_answer
    from forge.train.distillation import format_critique, split_critique

    parts = split_critique(list(messages))
    if parts is None:
        return None
    question, student = parts
    prompt = last_user_message(question)
    row = known.get(_key(prompt)) if prompt is not None else None
    if row is None:
        return None
    check = check_answer({**row, "check": row.get("check") or {"kind": "reference"}}, student)
    return format_critique(check.correct, f"The suite's checker says: {check.detail}.", reference(dict(row)))


@contextlib.contextmanager
def reference_server(rows: Iterable[Mapping[str, Any]], model: str = "reference") -> Iterator[LocalEndpoint]:
    """The suites' reference solvers as an OpenAI-compatible endpoint over `rows` (records schema)."""
    with chat_server(reference_responder(rows, model), (model,)) as endpoint:
        yield endpoint


# ---- the rubric judge ----------------------------------------------------------------------------------

def rubric_judge_responder(rows: Iterable[Mapping[str, Any]], model: str) -> Responder:
    """Scores the answer in a judge prompt (forge.modifiers.judge.judge_messages) against the row whose prompt
    is the judged task: "Score: N", N = rubric_score for rubric rows, 10 or 0 by check_answer for others."""
    from forge.data.records import prompt_messages
    from forge.data.suites.checks import check_answer, rubric_score
    from forge.modifiers.judge import parse_judge_prompt

    by_prompt: dict[str, dict[str, Any]] = {}
    for row in rows:
        prompt = last_user_message(prompt_messages(dict(row)))
        if prompt is None:
            raise LocalServerError(f"row {row.get('id', '?')!r} has no user message to find it by")
        by_prompt.setdefault(_key(prompt), dict(row))

    def respond(body: dict[str, Any], headers: Mapping[str, str]) -> ChatResponse:
        text = last_user_message(body["messages"])
        parsed = parse_judge_prompt(text) if text is not None else None
        if parsed is None:
            return ChatResponse(422, error_body("the rubric judge only grades judge prompts "
                                                "(forge.modifiers.judge.judge_messages); this is not one"))
        task, answer = parsed
        row = by_prompt.get(_key(task))
        if row is None:
            return ChatResponse(422, error_body("the rubric judge has no row for this task, so no rubric to "
                                                "score it by"))
        result = check_answer(row, answer)
        rubric = row["check"]["kind"] == "rubric"
        score = rubric_score(row["check"], answer) if rubric else 10.0 * result.correct
        reply = f"{result.detail}\nScore: {round(score, 1):g}"
        return ChatResponse(200, chat_completion(model, reply, prompt_tokens_of(body["messages"])))

    return respond


@contextlib.contextmanager
def rubric_judge_server(rows: Iterable[Mapping[str, Any]],
                        model: str = "rubric-judge") -> Iterator[LocalEndpoint]:
    """The rubric judge over `rows` (records schema) as an OpenAI-compatible endpoint."""
    with chat_server(rubric_judge_responder(rows, model), (model,)) as endpoint:
        yield endpoint


# ---- llama.cpp's server ------------------------------------------------------------------------------------

def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalServerError(f"llama.cpp server exited with code {proc.returncode} before it was ready "
                                   f"(log {log_path}):\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise LocalServerError(f"llama.cpp server not ready at {url} after {timeout_s:g}s (log {log_path}):\n"
                           f"{_tail(log_path)}")


def weights_alias(model_path: Path, lora_path: Path | None = None) -> str:
    """<file stem>-<sha256 prefix of the weights (+ LoRA)>: the response cache keys a local teacher on its
    model alias, so the alias must change whenever the weights do."""
    from forge.artifacts import sha256_file

    digest = sha256_file(model_path)[:12] + (f"-{sha256_file(lora_path)[:8]}" if lora_path else "")
    return f"{model_path.stem}-{digest}"


@contextlib.contextmanager
def llama_server(model_path: str | Path, alias: str | None = None, *, n_ctx: int = 2048, n_threads: int = 1,
                 n_batch: int = 512, chat_format: str | None = None, lora_path: str | Path | None = None,
                 startup_timeout_s: float = 180.0, log_path: str | Path | None = None,
                 extra_args: Iterable[str] = ()) -> Iterator[LocalEndpoint]:
    """`python -m llama_cpp.server` serving `model_path` as `alias` (default: weights_alias, which is
    content-addressed) on a free loopback port. The chat
    template comes from the GGUF's metadata unless chat_format names one. n_threads pins llama.cpp's threads
    (STACK.md: on a shared 2-core box 2 threads ran 4x slower than 1). Its log goes to log_path (a temp file
    by default, removed after a clean run); a failed start raises LocalServerError with the log's tail."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"no GGUF model to serve at {model_path}")
    if lora_path is not None and not Path(lora_path).is_file():
        raise FileNotFoundError(f"no GGUF LoRA at {lora_path}")
    alias = alias or weights_alias(model_path, Path(lora_path) if lora_path else None)
    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    started = False
    try:
        for _ in range(3):  # another process may take the free port before the server binds it
            port = free_port()
            cmd = [sys.executable, "-c", SERVER_MAIN, "--model", str(model_path),
                   "--model_alias", alias, "--host", LOOPBACK, "--port", str(port), "--n_ctx", str(n_ctx),
                   "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
                   "--n_batch", str(n_batch), "--verbose", "False"]
            if chat_format:
                cmd += ["--chat_format", chat_format]
            if lora_path is not None:
                cmd += ["--lora_path", str(lora_path)]
            cmd += list(extra_args)
            with open(log_path, "wb") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            base_url = f"http://{LOOPBACK}:{port}/v1"
            try:
                _wait_ready(proc, f"{base_url}/models", startup_timeout_s, log_path)
            except LocalServerError:
                _stop(proc)
                if "address already in use" in _tail(log_path).lower():
                    continue
                raise
            except BaseException:
                _stop(proc)
                raise
            started = True
            log.info("llama.cpp server for %s up at %s (pid %d)", model_path.name, base_url, proc.pid)
            try:
                yield LocalEndpoint(base_url, alias, None if own_log else log_path)
            finally:
                _stop(proc)
            return
        raise LocalServerError(f"llama.cpp server could not bind a free port in 3 tries (log {log_path}):\n"
                               f"{_tail(log_path)}")
    finally:
        if own_log and started:  # a failed start keeps its log for a look
            log_path.unlink(missing_ok=True)
