"""1C + the domain modifiers benchmark: what they add to a demo run, per subphase, and what the teachers did.

  .venv/bin/python benchmarks/modifiers.py                       # demo: 1C + code, reasoning, automation
  .venv/bin/python benchmarks/modifiers.py --tiny                # the test suite's smallest demo (fast)
  .venv/bin/python benchmarks/modifiers.py --domains code,math   # any enabled set (post-MVP included)
  .venv/bin/python benchmarks/modifiers.py --home DIR            # keep the run's store and MLflow in DIR

First runs the phases 1C and the modifiers build on (prep_data .. 2E) one after another, timed but not the
point. Then runs 1C and every enabled domain's subphases A-H the way the local stack's LocalExecutor does:
each phase in its own `python -m forge run` process as soon as its inputs are done, at most --parallel at once
(the stack's core.parallelism, 4) and at most --gpu-slots GPU-pool phases (1C, each G) at once (the `gpu`
pool, 1 slot). Prints each phase's start, end and wall time, the block's wall time (what it adds to a run
after 2E; in the DAG, A starts earlier, beside compression), and per domain and tier the items
sent/accepted and the cost the ledger recorded. Ends with one JSON line.
Target (issue 4): 1C + 3 modifiers add < 15 min.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RUN_ID = "bench-modifiers"
UPSTREAM = ("prep_data", "prep_model", "0A", "0B", "1A", "1B", "2A", "2C", "2E")
TARGET_S = 15 * 60
TIER_KEYS = ("sent", "accepted", "rejected", "errors", "cached", "cost_usd", "seconds")


def forge_run(phase: str, args: argparse.Namespace, conf: dict[str, Any], env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "forge", "run", phase, "--run-id", RUN_ID, "--profile", args.profile,
           "--conf", json.dumps(conf)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"phase {phase} failed (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - started


class Scheduler:
    """Runs phases as their inputs finish: at most `parallel` at once, at most `gpu_slots` GPU phases."""

    def __init__(self, phases: list[Any], parallel: int, gpu_slots: int, run) -> None:
        self.phases = {p.id: p for p in phases}
        self.run = run
        self.slots = threading.Semaphore(parallel)
        self.gpu = threading.Semaphore(gpu_slots)
        self.done: dict[str, threading.Event] = {pid: threading.Event() for pid in self.phases}
        self.timings: dict[str, dict[str, float]] = {}
        self.errors: list[str] = []
        self.t0 = 0.0

    def _one(self, pid: str) -> None:
        phase = self.phases[pid]
        for dep in phase.inputs:
            if dep in self.done:
                self.done[dep].wait()
        if self.errors:
            self.done[pid].set()
            return
        with self.gpu if phase.gpu else _Null(), self.slots:
            start = time.perf_counter() - self.t0
            try:
                wall = self.run(pid)
            except Exception as exc:  # the others stop starting; this one's error is reported
                self.errors.append(str(exc))
                wall = float("nan")
            self.timings[pid] = {"start": start, "end": time.perf_counter() - self.t0, "wall": wall}
            print(f"  {pid:8s} {phase.title[:60]:60s} {wall:7.1f} s  (t={start:6.1f}..{start + wall:6.1f})",
                  flush=True)
        self.done[pid].set()

    def run_all(self) -> float:
        self.t0 = time.perf_counter()
        threads = [threading.Thread(target=self._one, args=(pid,)) for pid in self.phases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - self.t0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def tier_rows(rows: dict[str, dict[str, Any]], cfg: Any, domains: list[str]) -> list[dict[str, Any]]:
    """Per domain and tier: what the ledger says the tier handled and cost (1C: its per-tier quality)."""
    from forge.phases import modifier_phase_id

    out = []
    q1c = (rows.get("1C") or {}).get("quality") or {}
    for i, (_, teacher) in enumerate(cfg.teachers.tiers_for(cfg.distill.cascade), 1):
        if f"tier{i}.sent" in q1c:
            out.append({"domain": "1C", "tier": i, "teacher": teacher.name,
                        **{k: q1c.get(f"tier{i}.{k}") for k in TIER_KEYS}})
    for d in domains:
        for i, step in enumerate("BCD", 1):
            row = rows.get(modifier_phase_id(cfg.modifiers.domains[d], step)) or {}
            q = row.get("quality") or {}
            if row.get("status") != "complete" or not q:
                continue
            teacher = cfg.teachers.tiers_for(d)[i - 1][1].name
            out.append({"domain": d, "tier": i, "teacher": teacher, **{k: q.get(k) for k in TIER_KEYS}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--tiny", action="store_true", help="the test suite's TINY_OVERRIDES (fast)")
    ap.add_argument("--domains", default=None, help="comma-separated; default: modifiers.enabled")
    ap.add_argument("--no-distill", action="store_true", help="modifiers only")
    ap.add_argument("--parallel", type=int, default=4, help="processes at once (the stack's parallelism)")
    ap.add_argument("--gpu-slots", type=int, default=1, help="GPU-pool phases at once (the `gpu` pool)")
    ap.add_argument("--home", default=None, help="FORGE_HOME for the run (default: a temp dir)")
    args = ap.parse_args()

    from forge.config import deep_merge, load_config
    from forge.phases import get_phase, modifier_phases

    conf: dict[str, Any] = {}
    if args.tiny:
        from tests.conftest import TINY_OVERRIDES

        conf = dict(TINY_OVERRIDES)
    if args.domains is not None:
        conf = deep_merge(conf, {"modifiers": {"enabled": [d for d in args.domains.split(",") if d]}})
    if args.no_distill:
        conf = deep_merge(conf, {"distill": {"enabled": False}})
    home = Path(args.home or tempfile.mkdtemp(prefix="forge-bench-modifiers-")).resolve()
    env = {**os.environ, "FORGE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    os.environ["FORGE_HOME"] = str(home)
    cfg = load_config(profile=args.profile, overrides=conf)
    domains = list(cfg.modifiers.enabled)
    print(f"FORGE_HOME={home}  profile={args.profile}{' (tiny)' if args.tiny else ''}  domains={domains}  "
          f"distill={'on' if cfg.distill.enabled else 'off'}  parallel={args.parallel} gpu={args.gpu_slots}",
          flush=True)

    upstream: dict[str, float] = {}
    print("upstream (sequential):", flush=True)
    for phase in UPSTREAM:
        upstream[phase] = forge_run(phase, args, conf, env)
        print(f"  {phase:10s} {upstream[phase]:7.1f} s", flush=True)

    block = ([get_phase("1C", cfg)] if cfg.distill.enabled else []) + [
        p for d in domains for p in modifier_phases(d, cfg.modifiers.domains[d])]
    print(f"1C + modifiers ({len(block)} phases):", flush=True)
    sched = Scheduler(block, args.parallel, args.gpu_slots, lambda pid: forge_run(pid, args, conf, env))
    block_wall = sched.run_all()
    if sched.errors:
        print("FAILED:\n" + "\n".join(sched.errors), file=sys.stderr)
        return 1

    from forge.ledger import read_rows
    from forge.runner import make_store

    rows = {r["phase"]: r for r in read_rows(make_store(cfg), RUN_ID)}
    tiers = tier_rows(rows, cfg, domains)
    print("\nteachers per domain and tier (from the ledger):")
    print(f"  {'domain':10s} tier {'teacher':12s} {'sent':>5s} {'ok':>5s} {'rej':>5s} {'err':>4s} "
          f"{'cached':>6s} {'cost $':>8s} {'sec':>6s}")
    for t in tiers:
        n = {k: t[k] or 0 for k in TIER_KEYS}
        print(f"  {t['domain']:10s} {t['tier']:4d} {t['teacher']:12s} {n['sent']:5.0f} {n['accepted']:5.0f} "
              f"{n['rejected']:5.0f} {n['errors']:4.0f} {n['cached']:6.0f} {n['cost_usd']:8.4f} "
              f"{n['seconds']:6.1f}")
    results = {}
    for d in domains:
        h = next(p for p in modifier_phases(d, cfg.modifiers.domains[d]) if p.step == "H")
        q = rows.get(h.id, {}).get("quality") or {}
        results[d] = {k: q.get(k) for k in ("acc_base", "acc", "delta_acc", "gguf_acc_base", "gguf_acc",
                                            "adapter_mb")}
    if "1C" in rows:
        q = rows["1C"].get("quality") or {}
        results["1C"] = {k: q.get(k) for k in ("acc_before", "acc", "delta_acc")}
    print("\nquality (ledger):")
    for name, q in results.items():
        print(f"  {name:10s} " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in q.items()))
    by_step: dict[str, float] = {}
    for pid, t in sched.timings.items():
        step = get_phase(pid, cfg).step or pid
        by_step[step] = by_step.get(step, 0.0) + t["wall"]
    verdict = "met" if block_wall < TARGET_S else "MISSED"
    print(f"\n1C + {len(domains)} modifiers: {block_wall:.1f} s wall ({block_wall / 60:.1f} min; target < "
          f"{TARGET_S / 60:.0f} min: {verdict}); summed per subphase: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in sorted(by_step.items())))
    print(json.dumps({"profile": args.profile, "tiny": args.tiny, "domains": domains,
                      "upstream_s": upstream, "block_wall_s": block_wall, "target_s": TARGET_S,
                      "phases": sched.timings, "by_subphase_s": by_step, "tiers": tiers, "quality": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
