"""9C: tokens/s of fast and accurate modes on the machine the task runs on, through the release's real engine,
recorded with the hardware in MLflow and stated next to the plan's targets (M4 Pro 60+, RTX 4090 80+, A100
120+).

The measured figures go to metrics, the manifest's info and the notes; speed_report.json holds what does not
change between runs on one machine (hardware, settings, targets), so a recomputed 9C writes the same bytes.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
from typing import Any

from forge.evaluate.validation_config import PLAN_SPEED_TARGETS
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.evaluate")

QUESTION = "Explain, step by step, how a binary search finds a number in a sorted list of a thousand numbers."


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def hardware() -> dict[str, Any]:
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.system(),
        "memory_gib": mem,
        "gpus": _gpus(),
        "python": platform.python_version(),
    }


def matching_target(hw: dict[str, Any]) -> str | None:
    """The plan's reference machine this one is, if any (by GPU name, else CPU brand)."""
    names = " ".join([*hw["gpus"], hw["cpu"]]).lower()
    for target in PLAN_SPEED_TARGETS:
        if target.lower().replace("nvidia ", "") in names:
            return target
    return None


def measure(service: Any, mode: str, max_tokens: int, repeats: int) -> dict[str, float]:
    from forge.serve.service import ChatRequest

    tps, ttft = [], []
    for i in range(repeats + 1):  # the first is a warm-up
        for w in service.engine.workers:  # no prompt cache between runs
            w.llm.reset()
        res = service.complete(
            ChatRequest(
                [{"role": "user", "content": QUESTION}],
                mode=mode,
                max_tokens=max_tokens,
                ignore_eos=True,
                session_id=f"9c-{mode}-{i}",
            )
        )
        if i:
            tps.append(res.usage.tokens_per_s)
            ttft.append(res.usage.first_token_ms)
    return {"tokens_per_s": statistics.median(tps), "ttft_ms": statistics.median(ttft)}


def run(ctx: JobContext) -> JobResult:
    from forge.serve.phase_jobs import eval_service, write_json

    sp, sc = ctx.config.validation.speed, ctx.config.serving
    hw = hardware()
    service = eval_service(ctx)
    try:
        import llama_cpp

        system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        measured = {m: measure(service, m, sp.max_tokens, sp.repeats) for m in sp.modes}
        options = service.options
    finally:
        service.close()
    target = matching_target(hw)
    settings = {
        "max_tokens": sp.max_tokens,
        "repeats": sp.repeats,
        "n_threads": sc.n_threads,
        "n_gpu_layers": sc.n_gpu_layers,
        "flash_attn": sc.flash_attn,
        "options": options,
    }
    report = {
        "hardware": hw,
        "llama_cpp_system_info": system_info,
        "settings": settings,
        "plan_targets_tokens_per_s": PLAN_SPEED_TARGETS,
        "matching_plan_machine": target,
    }
    write_json(ctx.out_dir / "speed_report.json", report)
    if ctx.mlflow:
        ctx.mlflow.set_tags(
            {f"forge.hw.{k}": v for k, v in hw.items()} | {"forge.hw.llama_cpp": system_info[:500]}
        )
    fast = measured.get("fast", next(iter(measured.values())))["tokens_per_s"]
    versus = (
        f"the plan's {target} target is {PLAN_SPEED_TARGETS[target]:.0f}+ tok/s: "
        f"{'met' if fast >= PLAN_SPEED_TARGETS[target] else 'NOT met'}"
        if target
        else "not one of the plan's reference machines ("
        + ", ".join(f"{k} {v:.0f}+" for k, v in PLAN_SPEED_TARGETS.items())
        + " tok/s)"
    )
    figures = "; ".join(
        f"{m} {v['tokens_per_s']:.1f} tok/s (TTFT {v['ttft_ms']:.1f} ms)" for m, v in measured.items()
    )
    machine = hw["gpus"][0] if hw["gpus"] and sc.n_gpu_layers else f"{hw['cpu']} ({sc.n_threads} thread(s))"
    if sp.min_tokens_per_s is not None and fast < sp.min_tokens_per_s:
        raise RuntimeError(
            f"9C: fast mode ran {fast:.1f} tok/s on {machine}, below "
            f"validation.speed.min_tokens_per_s = {sp.min_tokens_per_s:g}"
        )
    metrics = {f"{m}_{k}": v for m, r in measured.items() for k, v in r.items()}
    return JobResult(
        metrics=metrics,
        quality={f"{m}_tokens_per_s": r["tokens_per_s"] for m, r in measured.items()},
        notes=f"{machine}: {figures}; {versus}",
        info={"report": "speed_report.json", "timing": measured},
    )
