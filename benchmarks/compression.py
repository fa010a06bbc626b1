"""Phase 2 (compression) benchmark: what each step costs and what it buys, on this machine.

  .venv/bin/python benchmarks/compression.py                # the demo profile
  .venv/bin/python benchmarks/compression.py --tiny         # the test suite's smallest demo (fast)
  .venv/bin/python benchmarks/compression.py --home DIR     # keep the run's store and MLflow in DIR

Runs prep..1B once (not measured beyond their wall time), then every phase-2 step, each in its own
`python -m forge run` process so its peak RSS is its own. Per step: input and output bytes, wall time,
peak RAM (the process or its biggest child, e.g. llama.cpp's converter), and the quality delta the
step's ledger row records. Then 2D's three lossless schemes side by side, and the issue's targets
(phase 2 under 10 minutes, 2D's default >= zipnn and >= 200 MB/s decompression, 2C's greedy match).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PYTHON = sys.executable
RUN_ID = "bench-compression"
UPSTREAM = ("prep_data", "prep_model", "0A", "0B", "1A", "1B")
STEPS = ("2A", "2B", "2C", "2D", "2E", "2F")
# what each step takes in (the bytes it transforms) for the in/out column
MAIN_INPUTS = {"2A": ("1A",), "2B": ("2A",), "2C": ("2A",), "2D": ("2A", "2C"), "2E": ("2C",),
               "2F": ("2C", "2E")}
# the ledger quality keys worth a column, in order of preference
QUALITY_KEYS = ("acc", "delta_acc", "delta_logprob", "greedy_match", "saved_pct", "acc_after",
                "delta_logprob_adapter", "ece_before", "ece_after", "brier_before", "brier_after")

# Runs a phase in this process and reports the peak RSS of it and of its children (KiB on Linux).
PEAK_WRAPPER = """
import resource, runpy, sys
sys.argv = ["forge"] + sys.argv[1:]
try:
    runpy.run_module("forge", run_name="__main__")
finally:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"FORGE_PEAK_RSS_KB {own} {kids}", flush=True)
"""


def run_step(phase: str, conf: dict[str, Any], profile: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [PYTHON, "-c", PEAK_WRAPPER, "run", phase, "--run-id", RUN_ID, "--profile", profile,
           "--conf", json.dumps(conf)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("FORGE_PEAK_RSS_KB")]
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"phase {phase} failed (rc {proc.returncode}):\n{tail}")
    own, kids = (int(x) for x in peak[-1]) if peak else (0, 0)
    return {"wall_s": wall, "peak_rss_mb": own / 1024, "peak_child_rss_mb": kids / 1024}


def quality_cell(quality: dict[str, Any]) -> str:
    parts = []
    for key in QUALITY_KEYS:
        if key in quality and isinstance(quality[key], int | float):
            fmt = "+.3f" if key.startswith("delta") else ".3f"
            parts.append(f"{key}={quality[key]:{fmt}}")
    return ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--tiny", action="store_true", help="the test suite's smallest demo (tests/conftest.py)")
    ap.add_argument("--home", help="FORGE_HOME to use (default: a temporary folder, removed at the end)")
    ap.add_argument("--conf", default="{}", help="extra JSON overrides")
    ap.add_argument("--reuse-upstream", action="store_true",
                    help="with --home: keep prep..1B of an earlier run there, re-measure only phase 2")
    args = ap.parse_args()

    conf: dict[str, Any] = {}
    if args.tiny:
        from tests.conftest import TINY_OVERRIDES

        conf = json.loads(json.dumps(TINY_OVERRIDES))
    from forge.config import deep_merge

    conf = deep_merge(conf, json.loads(args.conf))
    conf = deep_merge(conf, {"cache": {"enabled": False}})  # a cache hit would measure nothing

    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        home = Path(args.home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FORGE_HOME": str(home), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        os.environ["FORGE_HOME"] = str(home)

        print(f"FORGE_HOME={home}; profile {args.profile}{' (tiny)' if args.tiny else ''}", flush=True)
        upstream_s = 0.0
        if args.reuse_upstream and not args.home:
            raise SystemExit("--reuse-upstream needs --home (the FORGE_HOME of the earlier run)")
        for phase in () if args.reuse_upstream else UPSTREAM:
            r = run_step(phase, conf, args.profile, env)
            upstream_s += r["wall_s"]
            print(f"  upstream {phase}: {r['wall_s']:.1f} s", flush=True)

        from forge.config import load_config
        from forge.ledger import read_rows
        from forge.runner import make_store

        cfg = load_config(profile=args.profile, overrides=conf)
        store = make_store(cfg)
        results: dict[str, dict[str, Any]] = {}
        for phase in STEPS:
            r = run_step(phase, conf, args.profile, env)
            m = store.run_manifest(RUN_ID, phase)
            r["bytes_in"] = sum(store.run_manifest(RUN_ID, p).total_bytes for p in MAIN_INPUTS[phase])
            r["bytes_out"] = m.total_bytes
            r["job_s"] = m.metrics.get("job_seconds", 0.0)
            results[phase] = r
            print(f"  {phase}: {r['wall_s']:.1f} s", flush=True)
        rows = {row["phase"]: row for row in read_rows(store, RUN_ID)}

        print("\n| step | in MB | out MB | wall s | job s | peak RSS MB (largest child) | quality (ledger) |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for phase, r in results.items():
            q = rows.get(phase, {}).get("quality") or {}
            r["quality"] = q
            child = f" ({r['peak_child_rss_mb']:.0f})" if r["peak_child_rss_mb"] > 1 else ""
            print(f"| {phase} | {r['bytes_in'] / 1e6:.2f} | {r['bytes_out'] / 1e6:.2f} | {r['wall_s']:.1f} | "
                  f"{r['job_s']:.1f} | {r['peak_rss_mb']:.0f}{child} | {quality_cell(q)} |")
        phase2_s = sum(r["wall_s"] for r in results.values())
        print(f"\nphase 2 total: {phase2_s:.1f} s wall ({phase2_s / 60:.1f} min; target < 10 min); "
              f"upstream prep..1B: {upstream_s:.1f} s")

        m2d = store.run_manifest(RUN_ID, "2D")
        report = json.loads((store.materialize(m2d) / "lossless_report.json").read_text())
        for scheme, w in report["weights"].items():  # throughputs are measurements: in metrics, not files
            for k in ("compress_mbps", "decompress_mbps"):
                w[k] = m2d.metrics.get(f"{scheme}.{k}", float("nan"))
        best = report["best_scheme"]
        print("\n2D lossless, weights (pruned safetensors + GGUF), one thread:")
        print("| scheme | in MB | out MB | saved % | compress MB/s | decompress MB/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for scheme, w in report["weights"].items():
            mark = " (stored)" if scheme == best else ""
            print(f"| {scheme}{mark} | {w['bytes_in'] / 1e6:.2f} | {w['bytes_out'] / 1e6:.2f} | "
                  f"{w['saved_pct']:.2f} | {w['compress_mbps']:.0f} | {w['decompress_mbps']:.0f} |")
        small = report["small_files"]
        print(f"small files: {small['without_dictionary']['saved_pct']:.1f}% saved without the dictionary, "
              f"{small['with_dictionary']['saved_pct']:.1f}% with it")
        for f in report.get("per_file", []):
            if f["path"].endswith((".gguf", ".safetensors")):
                print(f"  {f['path']}: {f['bytes_in'] / 1e6:.2f} -> {f['bytes_out'] / 1e6:.2f} MB "
                      f"({f['saved_pct']:.2f}% saved, {f['codec']})")

        zipnn = report["weights"].get("zipnn")
        targets = {
            "phase2_under_10_min": phase2_s < 600,
            "2D_default_saves_at_least_zipnn":
                bool(zipnn) and report["weights"][best]["bytes_out"] <= zipnn["bytes_out"],
            "2D_decompress_ge_200_MBps": report["weights"][best]["decompress_mbps"] >= 200,
            "2C_greedy_match": results["2C"]["quality"].get("greedy_match"),
        }
        print("\ntargets:", ", ".join(f"{k}={v}" for k, v in targets.items()))
        print(json.dumps({"profile": args.profile, "tiny": args.tiny, "phase2_seconds": round(phase2_s, 1),
                          "steps": {p: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                    for p, r in results.items()},
                          "lossless": {s: w for s, w in report["weights"].items()}, "best": best,
                          "targets": targets}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
