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
    "distill": {"failures": 16, "critiques": 12, "min_rows": 4, "dpo_max_steps": 6,
                "axolotl": {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "sequence_len": 128,
                            "micro_batch_size": 4, "max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 0,
                            "save_steps": 3, "logging_steps": 1}},
    "modifiers": {"sizes": {"prompts": 16, "dev": 4, "heldout": 12}, "min_train_rows": 4,
                  "axolotl": {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "sequence_len": 128,
                              "micro_batch_size": 4, "max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 0,
                              "save_steps": 3, "logging_steps": 1}},
    "routing": {"router": {"queries_per_domain": 16, "epochs": 40, "latency_queries": 40},
                # the smallest config that still learns (about 0.85 on held-out phrasings)
                "detector": {"train_pairs": 300, "val_pairs": 50, "test_pairs": 100, "teacher_epochs": 3,
                             "teacher_batch_size": 16, "teacher_lr": 3e-4, "student_epochs": 10,
                             "latency_pairs": 40},
                "sessions": {"replay_sessions": 8, "replay_threads": 2}},
    "meta": {"maml": {"meta_steps": 4, "meta_batch": 2, "inner_steps": 1, "shots": [1, 2], "query_rows": 3,
                      "rows_per_family": 6, "eval_episodes": 3, "max_len": 128},
             "few_shot": {"domains": ["code", "reasoning", "automation"], "k": 2, "pool_rows": 24,
                          "eval_rows": 4}},
    # gates at 0: the tiny model answers nearly nothing right; tests/e2e raise one to see 9A fail
    "validation": {"gates": {"gates": {"code": {"min": 0.0}, "reasoning": {"min": 0.0},
                                       "automation": {"min": 0.0}},
                             "rows": 3, "humaneval": {"problems": 6, "max_tokens": 32, "timeout_s": 5.0}},
                   "speed": {"max_tokens": 16, "repeats": 1}},
    "serving": {"workers": 2, "default_max_tokens": 16, "modes_eval_rows": 2,
                "self_consistency": {"samples": 3, "eval_rows": 4},
                "critique": {"train_examples": 400, "model_answers": 16, "epochs": 15, "hidden_dim": 64,
                             "eval_rows": 4}},
}
# The phases every teacher, distillation and modifier job builds on: one tiny run shared per test session.
UPSTREAM_PHASES = ("prep_data", "prep_model", "0A", "0B", "1A", "1B", "2A", "2C", "2E")


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


class TinyRun:
    """A real tiny pipeline run through UPSTREAM_PHASES (no MLflow) in its own FORGE_HOME."""

    def __init__(self, home: Path, run_id: str) -> None:
        self.home, self.run_id = home, run_id

    def config(self, extra: dict | None = None):
        """TINY_OVERRIDES (+ extra, deep-merged) on the demo profile. Call it with FORGE_HOME = self.home
        (the `in_tiny_run` fixture sets that): the store root expands {forge_home}."""
        import copy

        from forge.config import deep_merge, load_config

        return load_config(profile="demo", overrides=deep_merge(copy.deepcopy(TINY_OVERRIDES), extra or {}))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Built once per session. Tests run later phases of it with
    `forge.runner.run_phase(phase, cfg, tiny_run.run_id, track=False)` under the `in_tiny_run` fixture;
    upstream outputs are shared, so a test must not rerun an upstream phase with other settings."""
    from forge.runner import run_phase

    run = TinyRun(tmp_path_factory.mktemp("tiny_run_home"), "tiny-upstream")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(run.home))
        cfg = run.config()
        for phase in UPSTREAM_PHASES:
            run_phase(phase, cfg, run.run_id, track=False)
    return run


@pytest.fixture
def in_tiny_run(tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch) -> TinyRun:
    """tiny_run with FORGE_HOME pointed at its home for this test."""
    monkeypatch.setenv("FORGE_HOME", str(tiny_run.home))
    return tiny_run


def write_config_with_domains(dest: Path, keep: tuple[str, ...]) -> Path:
    """config/pipeline.yaml with only `keep` in the modifier catalog (defaults and every profile): a DAG
    whose other domain TaskGroups are absent, for a test about something else (each disabled domain adds
    8 tasks that skip, ~5 s of a worker each on a live stack). Point FORGE_CONFIG at the file."""
    import yaml

    raw = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    for section in [raw["defaults"], *raw.get("profiles", {}).values()]:
        mods = section.get("modifiers") or {}
        if "domains" in mods:
            mods["domains"] = {d: spec for d, spec in mods["domains"].items() if d in keep}
        if "enabled" in mods:
            mods["enabled"] = [d for d in mods["enabled"] if d in keep]
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest
