"""Serving benchmark (8B-8D, 10A, 11A, 12B): what Forge's server costs over raw llama-cpp-python, on this box.

  .venv/bin/python benchmarks/serving.py --release DIR            # a release folder (8A's output)
  .venv/bin/python benchmarks/serving.py --run-id RUN             # the release 8A assembled in that run
  python3 benchmarks/serving.py --release DIR --n-gpu-layers -1   # a CUDA build of llama-cpp-python

1. raw       llama-cpp-python alone on the same GGUF + recovery adapter: `Llama.generate` greedy, exactly
             --tokens tokens after a chat-template prompt; time to first token and decode tokens/s
2. engine    the same through Forge's ChatService in-process, per mode (fast / accurate / auto, and fast
             with a hand-off per token): routing, queue, adapter switch, streaming included; raw and the
             modes take turns round by round; the overhead ratio is engine fast / raw tokens/s
   --breakdown: the per-token path from raw to the engine's one step at a time (worker thread, detokenize,
             hand-off per token or per stream interval, model created in the worker thread)
3. switch    one worker alternating options: llama_set_adapters_lora + context reset, --switches times
4. http      the real server (uvicorn + the OpenAI-compatible API) on loopback, the `openai` client per mode,
             then --clients concurrent streaming clients: errors, aggregate tokens/s, TTFT p50/p99
5. quality   (--quality-rows N) 11A's self-consistency and 12B's critique loop on N held-out rows per
             domain: accuracy gain and latency cost (meaningful on a trained release, not a random model)
Targets (the issue): fast mode >= 0.95x raw tokens/s; an adapter switch under 5 ms; 8 concurrent streaming
clients without errors. Ends with one JSON line (and --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

TARGET_OVERHEAD = 0.95
TARGET_SWITCH_MS = 5.0
QUESTION = "Explain, step by step, how a binary search finds a number in a sorted list of a thousand numbers."


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def raw_model(release: Any, n_ctx: int, a: argparse.Namespace) -> Any:
    """llama-cpp-python's Llama over the release's GGUF with its recovery LoRA, nothing of Forge around it."""
    from llama_cpp import Llama

    from forge.evaluate.llama_cpp_params import plain_cpu_buffers

    if a.n_gpu_layers == 0:  # as the engine does
        plain_cpu_buffers()
    lora = release.adapters.get("base")
    return Llama(
        model_path=str(release.gguf),
        lora_path=str(lora) if lora else None,
        n_ctx=n_ctx,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_gpu_layers=a.n_gpu_layers,
        flash_attn=a.flash_attn,
        verbose=a.verbose,
    )


def decode(llm: Any, ids: list[int], tokens: int, on_token: Any = None) -> tuple[float, float]:
    """One greedy generation of exactly `tokens` tokens: (TTFT ms, decode tokens/s)."""
    llm.reset()
    started = time.perf_counter()
    first = last = started
    for i, tok in enumerate(llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, temp=0.0, reset=True)):
        if on_token is not None:
            on_token(tok)
        last = time.perf_counter()
        if i == 0:
            first = last
        if i + 1 >= tokens:
            break
    return (first - started) * 1000, (tokens - 1) / (last - first)


def per_token_path(
    release: Any, ids: list[int], tokens: int, repeats: int, n_ctx: int, a: argparse.Namespace,
    interval_ms: float,
) -> dict[str, Any]:
    """Where an engine's per-token time goes: raw decode, then one step at a time closer to the engine (a
    worker thread, detokenizing, a queue hand-off to a consuming thread per token or per interval, a model
    created in the thread that decodes). Variants take turns round by round; tokens/s medians."""
    import codecs
    import queue
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    pool = ThreadPoolExecutor(1)  # one long-lived worker thread, as the engine's
    llm = raw_model(release, n_ctx, a)
    own = pool.submit(raw_model, release, n_ctx, a).result()  # created (and later used) in the worker thread

    def detokenizing() -> Any:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda tok: dec.decode(llm.detokenize([tok]))

    def handed_over(interval_s: float) -> tuple[float, float]:
        out: queue.Queue = queue.Queue()
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending: list[str] = []
        last = [-interval_s]

        def on_token(tok: int) -> None:
            pending.append(dec.decode(llm.detokenize([tok])))
            now = time.perf_counter()
            if now - last[0] >= interval_s:
                out.put("".join(pending))
                pending.clear()
                last[0] = now

        def run() -> tuple[float, float]:
            try:
                return decode(llm, ids, tokens, on_token)
            finally:
                out.put(done)

        fut = pool.submit(run)
        while out.get() is not done:  # the consumer: this thread, woken per hand-off
            pass
        return fut.result()

    variants = {
        "raw, this thread": lambda: decode(llm, ids, tokens),
        "raw, a worker thread": lambda: pool.submit(decode, llm, ids, tokens).result(),
        "+ detokenize": lambda: pool.submit(decode, llm, ids, tokens, detokenizing()).result(),
        "+ hand-off per token": lambda: handed_over(0.0),
        f"+ hand-off every {interval_ms:g} ms": lambda: handed_over(interval_ms / 1000),
        "model created in the worker thread": lambda: pool.submit(decode, own, ids, tokens).result(),
    }
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 1):
        for name, fn in variants.items():
            tps = fn()[1]
            if r:
                runs[name].append(tps)
    pool.submit(own.close).result()
    pool.shutdown()
    llm.close()
    base = statistics.median(runs["raw, this thread"])
    return {k: {"tokens_per_s": statistics.median(v), "ratio": statistics.median(v) / base,
                "us_per_token_over_raw": (1 / statistics.median(v) - 1 / base) * 1e6}
            for k, v in runs.items()}


# HBM bandwidth (vendor datasheets): a decode step reads every weight once, so bandwidth / weight bytes per
# token bounds single-stream tokens/s from above
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 SXM": 3.35e12}


def weight_bytes_per_token(gguf: Path) -> dict[str, Any]:
    """What one decode step reads from memory: every tensor of the GGUF but the token embedding table (a row
    lookup), plus nothing for the KV cache (small next to the weights at these context lengths)."""
    try:
        from forge.compress.llama_cpp_tools import gguf_module

        reader = gguf_module().GGUFReader(str(gguf))
        total = sum(int(t.n_bytes) for t in reader.tensors)
        embd = sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
        return {"bytes_per_token": total - embd, "tensor_bytes": total, "token_embd_bytes": embd,
                "source": "gguf tensors"}
    except Exception as exc:  # noqa: BLE001 - no gguf-py here: the file size is an upper estimate
        size = gguf.stat().st_size
        return {"bytes_per_token": size, "tensor_bytes": size, "token_embd_bytes": 0,
                "source": f"file size ({type(exc).__name__}: {exc})"}


def bandwidth_bound(gguf: Path, measured: dict[str, float]) -> dict[str, Any]:
    w = weight_bytes_per_token(gguf)
    out: dict[str, Any] = {**w, "gpus": {}}
    for gpu, bps in HBM_BYTES_PER_S.items():
        bound = bps / w["bytes_per_token"]
        out["gpus"][gpu] = {"hbm_bytes_per_s": bps, "bound_tokens_per_s": bound,
                            **{f"{k}_fraction": v / bound for k, v in measured.items()}}
    return out


def engine_modes(
    service: Any, messages: list[dict[str, str]], tokens: int, repeats: int, raw: Any = None
) -> dict[str, Any]:
    """Each mode through the service, and (given `raw`, a Llama) raw llama-cpp-python on the same prompt."""
    from forge.serve.service import ChatRequest

    engine = service.engine
    interval = engine.stream_interval_s
    ids = engine.prompt_ids(messages, tokens)
    variants = [(m, m, interval) for m in ("fast", "accurate", "auto")]
    if interval:  # what the interval buys: the same fast request with a hand-off per token
        variants.append(("fast, per-token hand-off", "fast", 0.0))
    if raw is not None:
        variants.append(("raw", "", 0.0))
    runs: dict[str, list[tuple[float, float, str]]] = {v[0]: [] for v in variants}
    # the variants take turns, round after round: a clock that ramps up (a GPU's) or a neighbour's load then
    # weighs on each alike; round 0 is a warm-up
    try:
        for r in range(repeats + 1):
            for label, mode, stream_interval in variants:
                if label == "raw":
                    run = (*decode(raw, ids, tokens), "")
                else:
                    engine.stream_interval_s = stream_interval
                    for w in engine.workers:  # idle between requests: clear the prompt cache, as raw runs do
                        w.llm.reset()
                    res = service.complete(
                        ChatRequest(messages, mode=mode, max_tokens=tokens, ignore_eos=True,
                                    session_id=f"bench-{mode}-{r}")
                    )
                    run = (res.usage.first_token_ms, res.usage.tokens_per_s, res.route.option)
                if r:
                    runs[label].append(run)
    finally:
        engine.stream_interval_s = interval
    return {
        m: {"ttft_ms": statistics.median(x[0] for x in rs),
            "tokens_per_s": statistics.median(x[1] for x in rs), "option": rs[-1][2]}
        for m, rs in runs.items()
    }


def switches(engine: Any, n: int) -> dict[str, Any]:
    """One worker alternating every option (the worker thread is idle, blocked on the queue)."""
    worker, options = engine.workers[0], engine.options
    if len(options) < 2:
        return {"skipped": "the release has one option: nothing to switch"}
    ms = [worker.use(options[i % len(options)]) for i in range(n)]
    return {"n": n, "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": max(ms)}


def http(service: Any, cfg: Any, messages: list[dict[str, str]], tokens: int, clients: int) -> dict[str, Any]:
    from openai import OpenAI

    from forge.serve.api import create_app
    from forge.serve.server import BackgroundServer

    key = "bench-key"
    name = service.engine.release.name
    out: dict[str, Any] = {}
    with BackgroundServer(create_app(service, cfg.serving, [key])) as srv:

        def stream(mode: str, session: str) -> tuple[float, float, int, int]:
            """TTFT ms, decode tokens/s, tokens, SSE chunks (the engine sends text every stream_interval_ms,
            so a chunk may carry several tokens; the count comes from the usage chunk)."""
            client = OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=600)
            started = time.perf_counter()
            first, chunks, n = None, 0, 0
            for c in client.chat.completions.create(
                model=name,
                messages=messages,
                max_tokens=tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"mode": mode, "ignore_eos": True, "session_id": session},
            ):
                if c.choices and c.choices[0].delta.content:
                    chunks += 1
                    first = first or time.perf_counter()
                if c.usage:
                    n = c.usage.completion_tokens
            end = time.perf_counter()
            tps = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
            return ((first or end) - started) * 1000, tps, n, chunks

        for mode in ("fast", "accurate", "auto"):
            runs = [stream(mode, f"http-{mode}-{i}") for i in range(3)]
            out[mode] = {
                "ttft_ms": statistics.median(r[0] for r in runs[1:]),
                "tokens_per_s": statistics.median(r[1] for r in runs[1:]),
                "chunks": statistics.median(r[3] for r in runs[1:]),
            }
        results: list[tuple[float, float, int, int]] = []
        errors: list[str] = []

        def client_thread(i: int) -> None:
            try:
                results.append(stream("auto", f"conc-{i}"))
            except Exception as e:  # counted: the target is zero
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        out["concurrent"] = {
            "clients": clients,
            "errors": errors,
            "completed": len(results),
            "aggregate_tokens_per_s": sum(r[2] for r in results) / wall,
            "ttft_p50_ms": pct([r[0] for r in results], 50),
            "ttft_p99_ms": pct([r[0] for r in results], 99),
            "wall_s": wall,
        }
    return out


def quality(service: Any, cfg: Any, rows_per_domain: int) -> dict[str, Any]:
    from forge.data.suites import generate
    from forge.serve.phase_jobs import run_requests, summarize
    from forge.serve.service import ChatRequest

    sc, cc, n_tok = cfg.serving.self_consistency, cfg.serving.critique, cfg.eval.max_new_tokens
    out: dict[str, Any] = {}
    rows = [{**r, "domain": d} for d in sc.eval_domains for r in generate(d, rows_per_domain, 7, "heldout")]
    g = summarize(
        run_requests(service, rows, lambda r: ChatRequest([], mode="accurate", max_tokens=n_tok), "greedy")
    )
    v = summarize(
        run_requests(
            service,
            rows,
            lambda r: ChatRequest([], mode="accurate", max_tokens=n_tok, self_consistency=sc.samples),
            "vote",
        )
    )
    out["self_consistency"] = {
        "samples": sc.samples,
        "acc_greedy": g["accuracy"],
        "acc_vote": v["accuracy"],
        "gain": v["accuracy"] - g["accuracy"],
        "latency_ratio": v["latency_ms"]["mean"] / g["latency_ms"]["mean"],
    }
    if service.critic is not None:
        rows = [
            {**r, "domain": d} for d in cc.eval_domains for r in generate(d, rows_per_domain, 7, "heldout")
        ]
        p = summarize(run_requests(service, rows, lambda r: ChatRequest([], max_tokens=n_tok), "plain"))
        c = summarize(
            run_requests(
                service, rows, lambda r: ChatRequest([], max_tokens=n_tok, critique=True), "critique"
            )
        )
        eb, ea = 1 - p["accuracy"], 1 - c["accuracy"]
        out["critique"] = {
            "error_before": eb,
            "error_after": ea,
            "relative_error_reduction": (eb - ea) / eb if eb else 0.0,
            "added_latency_ms": c["latency_ms"]["mean"] - p["latency_ms"]["mean"],
        }
    else:
        out["critique"] = {"skipped": "the release has no critic"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--release")
    src.add_argument("--run-id")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads (CPU); 1 on a shared 2-core box"
    )
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (engine and raw)")
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's log (and a crash's trace) on stderr")
    ap.add_argument("--workers", type=int, default=2, help="engine workers for the concurrent clients")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--switches", type=int, default=200)
    ap.add_argument("--quality-rows", type=int, default=0)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the per-token path step by step (thread, detokenize, hand-off)")
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="the engine's stream interval (default: the config's serving.stream_interval_ms)")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)

    from forge.config import load_config
    from forge.serve.release import Release
    from forge.serve.server import build_service

    cfg = load_config(
        profile=a.profile,
        overrides={
            "serving": {
                "n_ctx": a.n_ctx,
                "allow_no_auth": True,
                **({} if a.stream_interval_ms is None else {"stream_interval_ms": a.stream_interval_ms}),
            },
            "routing": {
                "sessions": {"url": "sqlite:////tmp/forge-bench-sessions.db"},
                "retraining": {"feedback_root": "file:///tmp/forge-bench-feedback"},
            },
        },
    )
    if a.release:
        release_dir = Path(a.release)
    else:
        from forge.runner import make_store
        from forge.serve.server import release_of_run

        release_dir = release_of_run(make_store(cfg), a.run_id)
    release = Release.load(release_dir)
    result: dict[str, Any] = {
        "release": release.name,
        "gguf_bytes": release.gguf.stat().st_size,
        "options": release.options,
        "tokens": a.tokens,
        "threads": a.threads,
        "n_gpu_layers": a.n_gpu_layers,
        "flash_attn": a.flash_attn,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    gpu = {"n_gpu_layers": a.n_gpu_layers, "workers": 1, "n_threads": a.threads, "flash_attn": a.flash_attn,
           "verbose": a.verbose}
    print("loading the engine (1 worker) ...", flush=True)
    service = build_service(release_dir, cfg, **gpu)
    messages = [{"role": "user", "content": QUESTION}]
    ids = service.engine.prompt_ids(messages, a.tokens)
    result["prompt_tokens"] = len(ids)
    print(
        f"release {release.name}: {release.gguf.stat().st_size / 1e6:.1f} MB GGUF, options "
        f"{release.options}, {len(ids)}-token prompt, {a.tokens} tokens per run, {a.threads} thread(s), "
        f"n_gpu_layers {a.n_gpu_layers}"
    )
    n_ctx = service.engine.n_ctx  # the GGUF's trained context caps the configured one: raw runs with it too
    print(f"engine stream interval {service.engine.stream_interval_s * 1000:g} ms; raw llama-cpp-python "
          "loaded beside it, the two taking turns", flush=True)
    raw_llm = raw_model(release, n_ctx, a)
    try:
        modes = engine_modes(service, messages, a.tokens, a.repeats, raw_llm)
        result["switch"] = switches(service.engine, a.switches)
    finally:
        service.close()
        raw_llm.close()
    result["raw"] = modes.pop("raw")
    result["engine"] = modes
    fast = result["engine"]["fast"]["tokens_per_s"]
    result["overhead_ratio"] = fast / result["raw"]["tokens_per_s"]
    raw = result["raw"]
    print(f"raw llama-cpp-python   TTFT {raw['ttft_ms']:8.1f} ms   {raw['tokens_per_s']:8.1f} tok/s")
    for mode, m in result["engine"].items():
        print(
            f"engine {mode:9s}       TTFT {m['ttft_ms']:8.1f} ms   {m['tokens_per_s']:8.1f} tok/s   "
            f"({m['option']})"
        )
    print(f"fast / raw tokens/s: {result['overhead_ratio']:.3f} (target >= {TARGET_OVERHEAD})")
    if a.breakdown:
        print("per-token path (raw llama-cpp-python step by step towards the engine) ...", flush=True)
        result["per_token_path"] = per_token_path(
            release, ids, a.tokens, a.repeats, n_ctx, a, cfg.serving.stream_interval_ms or 20.0
        )
        for name, v in result["per_token_path"].items():
            print(f"  {name:38s} {v['tokens_per_s']:8.1f} tok/s  {v['ratio']:.3f}x  "
                  f"{v['us_per_token_over_raw']:+7.1f} us/token")
    if a.n_gpu_layers != 0:
        measured = {"raw": raw["tokens_per_s"], **{m: v["tokens_per_s"] for m, v in result["engine"].items()}}
        bw = result["bandwidth"] = bandwidth_bound(release.gguf, measured)
        for chip, g in bw["gpus"].items():
            print(
                f"HBM bound on {chip} ({g['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                f"{bw['bytes_per_token'] / 1e6:.1f} MB/token): {g['bound_tokens_per_s']:.0f} tok/s; raw at "
                f"{g['raw_fraction']:.1%}, fast at {g['fast_fraction']:.1%}"
            )
    sw = result["switch"]
    if "p50_ms" in sw:
        print(
            f"adapter switch: p50 {sw['p50_ms']:.3f} ms, p99 {sw['p99_ms']:.3f} ms, "
            f"max {sw['max_ms']:.3f} ms "
            f"(target < {TARGET_SWITCH_MS} ms)"
        )

    if not a.no_http or a.quality_rows:
        service = build_service(release_dir, cfg, **{**gpu, "workers": a.workers})
        try:
            if not a.no_http:
                result["http"] = http(service, cfg, messages, a.tokens, a.clients)
                for mode in ("fast", "accurate", "auto"):
                    h = result["http"][mode]
                    print(
                        f"http {mode:9s}         TTFT {h['ttft_ms']:8.1f} ms   "
                        f"{h['tokens_per_s']:8.1f} tok/s in {h['chunks']:.0f} SSE chunks"
                    )
                c = result["http"]["concurrent"]
                print(
                    f"{c['clients']} concurrent streams ({a.workers} workers): {c['completed']} completed, "
                    f"{len(c['errors'])} errors, {c['aggregate_tokens_per_s']:.1f} tok/s together, "
                    f"TTFT p50 "
                    f"{c['ttft_p50_ms']:.0f} / p99 {c['ttft_p99_ms']:.0f} ms"
                )
            if a.quality_rows:
                result["quality"] = quality(service, cfg, a.quality_rows)
                print("quality:", json.dumps(result["quality"]))
        finally:
            service.close()
    result["targets"] = {
        "overhead_ok": result["overhead_ratio"] >= TARGET_OVERHEAD,
        "switch_ok": sw.get("p99_ms", 0.0) < TARGET_SWITCH_MS,
        "concurrent_ok": "http" not in result or not result["http"]["concurrent"]["errors"],
    }
    line = json.dumps(result)
    if a.json:
        Path(a.json).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
