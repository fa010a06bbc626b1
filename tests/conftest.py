"""Shared fixtures: every test gets its own FORGE_HOME so nothing touches the repo's .forge/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The smallest demo that still exercises every phase (used by integration and e2e tests).
TINY_OVERRIDES = {
    "model": {"demo": {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
                       "vocab_size": 512, "pretrain_steps": 40, "pretrain_batch_size": 8,
                       "pretrain_seq_len": 128}},
    "data": {"suites": {"train": 60, "dev": 8, "heldout": 24, "calib": 32, "pretrain": 100}},
    "train": {"max_steps": 30, "batch_size": 4, "checkpoint_every": 10, "eval_every": 10,
              "eval_batches": 2, "log_every": 5, "max_seq_len": 128},
    "failure_analysis": {"n_clusters": 3, "embedder": "tfidf", "hardest_k": 10},
    "pruning": {"rounds": 1, "finetune_steps_per_round": 5, "calib_samples": 8, "multiple_of": 128,
                "batch_size": 4, "max_seq_len": 128},
    "awq": {"calib_samples": 8, "max_seq_len": 128, "n_grid": 4},
    "lossless": {"level": 3},
    "gguf": {"n_ctx": 512},
    "recovery": {"max_steps": 20, "batch_size": 4, "train_rows": 24, "max_seq_len": 128, "eval_every": 10,
                 "eval_batches": 2, "checkpoint_every": 10, "log_every": 5, "learning_rate": 1e-3},
    "eval": {"max_new_tokens": 24, "batch_size": 8},
}


@pytest.fixture
def forge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "forge_home"
    home.mkdir()
    monkeypatch.setenv("FORGE_HOME", str(home))
    return home


@pytest.fixture
def tiny_overrides() -> dict:
    import copy

    return copy.deepcopy(TINY_OVERRIDES)
