"""The inference engine: llama.cpp (llama-cpp-python) over one release, a bounded request queue and a pool of
worker threads, each owning one llama.cpp context.

- The Q5_K_M GGUF is mmap'd: every worker's model shares the same pages, so N workers cost N KV caches, not
  N copies of the weights. Each worker loads every option's GGUF LoRA once (llama_adapter_lora_init) and
  switches per request with llama_set_adapters_lora; the context is then reset (STACK.md: the prompt cache
  would otherwise serve stale results). Requests for the option a worker already holds keep its KV prefix,
  which is what makes self-consistency's samples over one prompt cheap.
- Tokens are produced by llama-cpp-python's own `Llama.generate` (the same sampler a raw Llama call uses),
  streamed to the caller through a per-request queue; the caller may cancel (client gone) between tokens.
  Text goes to the queue at most every `stream_interval_ms` (the first piece at once): a hand-off per token
  wakes the consumer thread per token (~35 us each on a 2-core box) and makes every token an SSE chunk.
- Admission: at most `queue_size` requests wait; beyond that `submit` raises EngineBusy (the API's 503).
llama_cpp is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.serve.release import BASE, Release
from forge.serve.stop_strings import StopScanner

log = logging.getLogger("forge.serve")


class EngineBusy(RuntimeError):
    """Every worker is busy and the queue is full."""


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit the context."""


@dataclass(frozen=True)
class EngineSettings:
    workers: int = 1
    queue_size: int = 32
    queue_timeout_s: float = 60.0
    n_threads: int = 1
    n_ctx: int = 2048
    n_batch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = False
    verbose: bool = False  # llama.cpp's log on stderr (quiet also hides a crash's trace in model load)
    stream_interval_ms: float = 0.0  # 0: every token is handed to the caller on its own

    @classmethod
    def from_config(cls, sc: Any) -> EngineSettings:
        return cls(sc.workers, sc.queue_size, sc.queue_timeout_s, sc.n_threads, sc.n_ctx, sc.n_batch,
                   sc.n_gpu_layers, sc.flash_attn, stream_interval_ms=sc.stream_interval_ms)


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens (vLLM's extension of the same name)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # stop | length | cancelled | error
    queue_ms: float = 0.0
    switch_ms: float = 0.0  # the adapter switch (0 when the worker already held the option)
    first_token_ms: float = 0.0  # from submit
    total_ms: float = 0.0  # from submit
    worker: int = -1

    @property
    def tokens_per_s(self) -> float:
        decode_s = (self.total_ms - self.first_token_ms) / 1000
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


@dataclass
class Completion:
    text: str
    usage: Usage


_DONE = object()


@dataclass
class Stream:
    """Text pieces as they are generated; `usage` is set once the iteration ends."""

    option: str
    prompt_tokens: int
    submitted: float
    _out: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    usage: Usage | None = None
    timeout_s: float = 600.0

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                item = self._out.get(timeout=self.timeout_s)
            except queue.Empty:
                self.cancel()
                raise TimeoutError(f"no token in {self.timeout_s:.0f} s") from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Usage):
                self.usage = item
                continue
            yield item

    def cancel(self) -> None:
        self._cancel.set()

    def text(self) -> Completion:
        parts = list(self)
        assert self.usage is not None
        return Completion("".join(parts), self.usage)


@dataclass
class _Job:
    stream: Stream
    ids: list[int]
    params: GenParams


def _adapter_array(handles: Sequence[Any]) -> tuple[Any, Any]:
    import llama_cpp

    n = len(handles)
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*handles)
    scales = (ctypes.c_float * max(n, 1))(*([1.0] * n))
    return arr, scales


class Worker:
    """One llama.cpp context over the release's GGUF, with every option's adapter loaded."""

    def __init__(self, index: int, release: Release, s: EngineSettings) -> None:
        import llama_cpp
        from llama_cpp import Llama

        from forge.evaluate.llama_cpp_params import plain_cpu_buffers

        if s.n_gpu_layers == 0:  # CPU inference: keep Q5_K out of llama.cpp's AMX buffers (llama_cpp_params)
            plain_cpu_buffers()
        self.index = index
        trained = gguf_context_length(release.gguf)  # never past what the model was trained for
        n_ctx = min(s.n_ctx, trained) if trained else s.n_ctx
        self.llm: Any = Llama(
            model_path=str(release.gguf),
            n_ctx=n_ctx,
            n_batch=s.n_batch,
            n_threads=s.n_threads,
            n_threads_batch=s.n_threads,
            n_gpu_layers=s.n_gpu_layers,
            flash_attn=s.flash_attn,
            verbose=s.verbose,
        )
        self.handles: dict[str, list[Any]] = {}
        self._loaded: list[Any] = []
        for option, path in release.adapters.items():
            if path is None:
                self.handles[option] = []
                continue
            handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not handle:
                self.close()
                raise RuntimeError(
                    f"llama.cpp could not load the LoRA of option {option!r} ({path}): not a "
                    "GGUF LoRA of this base model?"
                )
            self._loaded.append(handle)
            self.handles[option] = [handle]
        self.active: str | None = None
        self.switches = 0

    def use(self, option: str) -> float:
        """Apply option's adapters (if not already active); returns the switch's milliseconds."""
        if option == self.active:
            return 0.0
        import llama_cpp

        started = time.perf_counter()
        handles = self.handles[option]
        arr, scales = _adapter_array(handles)
        rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, len(handles), scales)
        if rc != 0:
            self.active = None
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc}) for option {option!r}")
        self.llm.reset()  # the KV cache was computed under the other adapters
        self.active = option
        self.switches += 1
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        import llama_cpp

        for handle in self._loaded:  # before the model: an adapter belongs to it
            llama_cpp.llama_adapter_lora_free(handle)
        self._loaded = []
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()


class Engine:
    def __init__(self, release: Release, settings: EngineSettings | None = None) -> None:
        from forge.serve.chat_template import ChatTemplate, generation_eos_ids

        self.release, self.settings = release, settings or EngineSettings()
        s = self.settings
        self.template = ChatTemplate.load(release.tokenizer_dir)  # no transformers (and no torch) in serving
        started = time.perf_counter()
        self.workers: list[Worker] = []
        try:
            for i in range(s.workers):
                self.workers.append(Worker(i, release, s))
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - started
        llm = self.workers[0].llm
        import llama_cpp

        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_ctx = llm.n_ctx()
        # a token's text bytes never change: detokenized once, then looked up (shared by the workers)
        self._pieces: dict[int, bytes] = {}
        self._stops: dict[int, bool] = {}
        self.stream_interval_s = s.stream_interval_ms / 1000  # adjustable at run time (benchmarks compare)
        self._tok_lock = threading.Lock()
        # the chat's end of turn as the tokenizer config names it, and generation_config's eos ids
        eos = self.tokenize(self.template.eos_token) if self.template.eos_token else []
        self.stop_ids = set(generation_eos_ids(release.tokenizer_dir)) | (set(eos) if len(eos) == 1
                                                                          else set())
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=s.queue_size)
        self._threads = [
            threading.Thread(target=self._loop, args=(w,), name=f"forge-engine-{w.index}", daemon=True)
            for w in self.workers
        ]
        for t in self._threads:
            t.start()
        log.info(
            "engine: %s, %d worker(s) x %d thread(s), options %s, loaded in %.2f s",
            release.gguf.name,
            s.workers,
            s.n_threads,
            release.options,
            self.load_s,
        )

    @property
    def options(self) -> list[str]:
        return self.release.options

    # ---- text -> ids ----------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict[str, str]]) -> str:
        return self.template.render(list(messages))

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids for rendered text: special tokens parsed, no BOS (the template places them)."""
        with self._tok_lock:  # one context's tokenizer, shared by the request threads
            return self.workers[0].llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def prompt_ids(self, messages: Sequence[dict[str, str]], max_tokens: int) -> list[int]:
        ids = self.tokenize(self.render(messages))
        if len(ids) + max_tokens > self.n_ctx:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens and max_tokens {max_tokens}: together more "
                f"than the context of {self.n_ctx} tokens (shorten the conversation or lower "
                "max_tokens)"
            )
        return ids

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, option: str, ids: list[int], params: GenParams) -> Stream:
        if option not in self.release.adapters:
            raise ValueError(f"unknown option {option!r}; this release has {self.options}")
        stream = Stream(option, len(ids), time.perf_counter(), timeout_s=self.settings.queue_timeout_s + 600)
        try:
            self._queue.put_nowait(_Job(stream, ids, params))
        except queue.Full:
            raise EngineBusy(
                f"all {len(self.workers)} workers are busy and {self.settings.queue_size} "
                "requests are waiting: retry shortly"
            ) from None
        return stream

    def generate(
        self, messages: Sequence[dict[str, str]], option: str = BASE, params: GenParams | None = None
    ) -> Completion:
        params = params or GenParams()
        return self.submit(option, self.prompt_ids(messages, params.max_tokens), params).text()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ---- the workers ----------------------------------------------------------------------------------
    def _loop(self, worker: Worker) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            stream = job.stream
            if stream._cancel.is_set():
                stream._out.put(Usage(stream.prompt_tokens, 0, "cancelled"))
                stream._out.put(_DONE)
                continue
            waited = time.perf_counter() - stream.submitted
            if waited > self.settings.queue_timeout_s:
                stream._out.put(
                    EngineBusy(
                        f"waited {waited:.0f} s for a worker (queue_timeout_s "
                        f"{self.settings.queue_timeout_s:.0f})"
                    )
                )
                stream._out.put(_DONE)
                continue
            try:
                usage = self._run(worker, job, waited * 1000)
                stream._out.put(usage)
            except Exception as exc:  # the request fails, the worker lives on (a fresh context state)
                log.exception("engine: worker %d failed a request", worker.index)
                worker.active = None
                stream._out.put(exc)
            stream._out.put(_DONE)

    def is_stop(self, token: int) -> bool:
        stop = self._stops.get(token)
        if stop is None:
            import llama_cpp

            stop = token in self.stop_ids or bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
            self._stops[token] = stop
        return stop

    def _run(self, worker: Worker, job: _Job, queue_ms: float) -> Usage:
        stream, p = job.stream, job.params
        usage = Usage(len(job.ids), 0, "length", queue_ms, worker=worker.index)
        usage.switch_ms = worker.use(stream.option)
        llm = worker.llm
        if p.seed is not None:
            llm.set_seed(p.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces, interval, out = self._pieces, self.stream_interval_s, stream._out
        pending: list[str] = []  # text not yet handed over
        last_put = -interval  # the first piece goes out at once: time to first token
        stops = StopScanner(p.stop) if p.stop else None
        tokens = llm.generate(
            job.ids,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=p.temperature,
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            for token in tokens:
                if stream._cancel.is_set():
                    usage.finish_reason = "cancelled"
                    break
                if not p.ignore_eos and self.is_stop(token):
                    usage.finish_reason = "stop"
                    break
                usage.completion_tokens += 1
                if usage.completion_tokens == 1:
                    usage.first_token_ms = (time.perf_counter() - stream.submitted) * 1000
                raw = pieces.get(token)
                if raw is None:
                    raw = pieces[token] = llm.detokenize([token])
                piece = decoder.decode(raw)
                if stops is not None and piece:
                    piece = stops.feed(piece)  # held back while it could be the start of a stop string
                    if stops.hit:
                        pending.append(piece)
                        usage.finish_reason = "stop"
                        break
                if piece:
                    pending.append(piece)
                    now = time.perf_counter()
                    if now - last_put >= interval:
                        out.put("".join(pending))
                        pending.clear()
                        last_put = now
                if usage.completion_tokens >= p.max_tokens or llm.n_tokens + 1 >= self.n_ctx:
                    break
        finally:
            tokens.close()
            if stops is not None:
                pending.append(stops.flush())  # ended otherwise: what was held back was not a stop
            tail = "".join(pending)
            if tail:
                out.put(tail)
        usage.total_ms = (time.perf_counter() - stream.submitted) * 1000
        return usage

    def close(self) -> None:
        for _ in getattr(self, "_threads", []):
            try:
                self._queue.put(None, timeout=5)
            except queue.Full:
                break
        for t in getattr(self, "_threads", []):
            t.join(timeout=30)
        for w in self.workers:
            w.close()
        self.workers = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_context_length(path: Any) -> int | None:
    """<arch>.context_length from a GGUF header, read in Python (no llama.cpp context, no gguf package): the
    context is sized once, before the model is loaded."""
    import struct

    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:  # an array: skipped item by item (token lists come after the model's scalars)
                item, n = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return None
            return read(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensors
        arch = None
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            v = value(kind)
            if key == "general.architecture":
                arch = v
            elif arch and key == f"{arch}.context_length":
                return int(v)
    return None
