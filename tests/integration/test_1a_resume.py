"""A 1A run killed with SIGKILL after its first checkpoint resumes from it and finishes; the killed
attempt leaves nothing that looks committed.

The prep phases run in-process (run_phase, the function the CLI calls); 1A runs as
`python -m forge run 1A ...` in a subprocess so it can really be killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge.config import deep_merge, load_config
from forge.runner import make_store, run_phase
from tests.conftest import REPO, TINY_OVERRIDES

pytest.importorskip("torch")
pytest.importorskip("peft")

RUN_ID = "resume-test"
MAX_STEPS = 16
OVERRIDES = deep_merge(TINY_OVERRIDES, {
    "model": {"demo": {"pretrain_steps": 5, "pretrain_batch_size": 4, "pretrain_seq_len": 64}},
    "data": {"suites": {"train": 12, "dev": 2, "heldout": 2, "pretrain": 40}},
    "train": {"max_steps": MAX_STEPS, "batch_size": 4, "checkpoint_every": 3, "eval_every": 8,
              "eval_batches": 1, "log_every": 2, "max_seq_len": 96, "lora_r": 4, "lora_alpha": 8,
              "device": "cpu"},
    "eval": {"max_new_tokens": 8, "batch_size": 8},
})


def as_sets(tree: dict, prefix: str = "") -> list[str]:
    """{"a": {"b": 1}} -> ["--set", "a.b=1"]: the same overrides, spelled for the CLI."""
    out: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += as_sets(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return out


def test_killed_1a_resumes_from_its_checkpoint(forge_home: Path, tmp_path: Path) -> None:
    cfg = load_config(profile="demo", overrides=OVERRIDES)
    for phase in ("prep_data", "prep_model", "0A", "0B"):
        run_phase(phase, cfg, RUN_ID, track=False)

    # one BLAS thread: on a busy 2-core box two spinning threads are several times slower
    env = {**os.environ, "FORGE_HOME": str(forge_home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "forge", "run", "1A", "--run-id", RUN_ID, "--no-track",
           "--profile", "demo", *as_sets(OVERRIDES)]
    store = make_store(cfg)
    ckpt_root = forge_home / "artifacts" / "work" / "1A"

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        latest: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            latest = list(ckpt_root.glob("*/latest.json"))
            if latest:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    log1 = first_log.read_text()
    assert latest, f"no checkpoint appeared (exit {proc.returncode}):\n{log1[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, f"1A ended before the kill:\n{log1[-3000:]}"
    killed_at = json.loads(latest[0].read_text())["step"]
    assert 0 < killed_at < MAX_STEPS

    # Nothing of the killed attempt is visible as a result.
    assert store.run_manifest(RUN_ID, "1A") is None
    assert not list((forge_home / "artifacts" / "cache").glob("1A/*.json"))

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-3000:]
    resumed = re.search(r"resumed from checkpoint at step (\d+)", log2)
    assert resumed, log2[-3000:]
    n = int(resumed.group(1))
    assert killed_at <= n < MAX_STEPS and n % 3 == 0
    assert f"step {MAX_STEPS}/{MAX_STEPS}" in log2
    assert "step 2/16" not in log2  # the steps before the checkpoint were not trained again

    manifest = store.run_manifest(RUN_ID, "1A")
    assert manifest is not None and manifest.status == "complete"
    assert manifest.metrics["steps"] == MAX_STEPS
    assert manifest.metrics["resumed_from_step"] == n
    assert manifest.info["steps"] == MAX_STEPS and manifest.info["quantization"] == "none"
    assert {"adapter/adapter_model.safetensors", "merged/model.safetensors", "merged/tokenizer.json",
            "train_log.jsonl", "loss_curve.png"} <= set(manifest.files)
    out_dir = store.materialize(manifest)
    history = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    # the log carries over the killed attempt's steps: one train entry every 2 steps, 1..16
    assert [e["step"] for e in history if "loss" in e] == list(range(2, MAX_STEPS + 1, 2))
    assert "acc" in manifest.info["quality"] and "delta_acc" in manifest.info["quality"]
    assert not list(ckpt_root.glob("*/latest.json"))  # the finished output superseded the checkpoints
