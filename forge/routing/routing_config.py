"""Phase 6 (router, escalation detector, thresholds, session memory) and 13A (weekly router retraining):
the `routing` section of the pipeline config. Cheap to import (pydantic only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forge.config_base import Strict

FeatureKind = Literal["minilm", "base_hidden"]


class RouterConfig(Strict):
    """6A: a 3-layer feed-forward classifier over {base, each enabled modifier}."""

    # routing queries per task suite (the base's domains + every enabled modifier's suite), drawn from the
    # suites' calib buckets with their own seed: no phase trains on those prompts
    queries_per_domain: int = Field(64, ge=4)
    val_fraction: float = Field(0.2, gt=0, lt=0.5)  # temperature, threshold choice
    test_fraction: float = Field(0.2, gt=0, lt=0.5)  # everything reported
    # which features the shipped router uses: "auto" = the better of the measured ones on val
    features: Literal["auto", "minilm", "base_hidden"] = "auto"
    measure: list[FeatureKind] = ["minilm", "base_hidden"]  # feature extractors trained and compared
    max_seq_len: int = Field(128, ge=8)  # MiniLM tokens per query (longer queries are cut)
    # MiniLM in ONNX Runtime with int8 weights: ~3x faster per query on one core than torch fp32 (figures in
    # forge/routing/minilm.py); the router trains and serves on the same int8 features
    minilm_int8: bool = True
    hidden_dim: int = Field(256, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(80, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 1234
    # RouteLLM-style: the threshold at which this share of val queries goes to a modifier
    target_share: float = Field(0.5, ge=0, le=1)
    latency_queries: int = Field(200, ge=10)  # single-query timings behind the p50/p99 figures
    registered_model: str = "forge-router"

    @model_validator(mode="after")
    def _split(self) -> RouterConfig:
        if not self.measure:
            raise ValueError("measure: at least one feature extractor")
        if self.features != "auto" and self.features not in self.measure:
            raise ValueError(f"features={self.features!r} is not among measure={self.measure}")
        return self


class DetectorConfig(Strict):
    """6B: dissatisfaction in a follow-up message. Teacher: MiniLM fine-tuned as a pair classifier;
    student: a small LSTM distilled from it (the one that ships)."""

    train_pairs: int = Field(1600, ge=16)
    val_pairs: int = Field(300, ge=8)
    test_pairs: int = Field(600, ge=8)  # phrasings of its own (templates never seen in training)
    seed: int = 1234
    max_len: int = Field(64, ge=8)  # tokens of (previous message, follow-up) together
    teacher_epochs: int = Field(2, ge=1)
    teacher_lr: float = Field(2e-4, gt=0)  # top layers; the new head learns 20x faster (5e-5 underfits)
    teacher_batch_size: int = Field(32, ge=1)
    teacher_train_layers: int = Field(2, ge=0, le=6)  # top encoder layers fine-tuned (+ the head)
    student_embed_dim: int = Field(64, ge=4)
    student_hidden: int = Field(96, ge=4)
    student_vocab: int = Field(8000, ge=100)  # most frequent MiniLM word pieces of the training pairs
    student_epochs: int = Field(12, ge=1)
    student_lr: float = Field(3e-3, gt=0)
    student_batch_size: int = Field(64, ge=1)
    distill_temperature: float = Field(2.0, gt=0)
    distill_alpha: float = Field(0.5, ge=0, le=1)  # weight of the teacher's soft labels vs the hard ones
    threshold: float = Field(0.5, gt=0, lt=1)  # dissatisfied at or above this probability
    latency_pairs: int = Field(200, ge=10)
    registered_model: str = "forge-escalation-detector"


class ABArm(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    threshold: float | None = Field(None, ge=0, le=1)  # None = the threshold 6C chose
    weight: float = Field(1.0, gt=0)


class ThresholdConfig(Strict):
    """6C: replay thresholds on held-out queries and choose one by a stated objective."""

    candidates: list[float] = [0.75, 0.80, 0.85]  # the plan's A/B
    sweep_step: float = Field(0.01, gt=0, le=0.5)
    # objective: accuracy - share_penalty * modifier share (a modifier must buy share_penalty accuracy
    # points per 100% of traffic it takes); ties go to the higher threshold (fewer modifier calls)
    share_penalty: float = Field(0.02, ge=0)
    # online A/B in serving: sessions hash into arms by weight; empty = every session gets the chosen one
    ab_arms: list[ABArm] = []

    @model_validator(mode="after")
    def _arms(self) -> ThresholdConfig:
        if any(not 0 <= c <= 1 for c in self.candidates):
            raise ValueError(f"candidates must lie in [0, 1]: {self.candidates}")
        names = [a.name for a in self.ab_arms]
        if len(set(names)) != len(names):
            raise ValueError(f"ab_arms: arm names must be unique: {names}")
        return self


class SessionConfig(Strict):
    """6D: per-session conversation state and routing decisions."""

    # sqlite:///path (default, one file), redis://host:port/db (production), or env:NAME to read the URL
    # from that environment variable (a Redis password never sits in the config, or in MLflow params)
    url: str = "sqlite:///{forge_home}/sessions.db"
    max_bytes: int = Field(1_000_000, ge=1024)  # the plan's "<1MB per session": oldest entries go first
    ttl_s: float = Field(7 * 24 * 3600.0, gt=0)  # a session expires this long after its last write
    key_prefix: str = "forge:session:"
    # 6D's replay of multi-turn conversations through router + detector + thresholds + this store
    replay_sessions: int = Field(32, ge=1)
    replay_threads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _scheme(self) -> SessionConfig:
        if not self.url.startswith(("sqlite:///", "redis://", "rediss://", "env:")):
            raise ValueError(f"url: expected sqlite:///PATH, redis://HOST:PORT/DB or env:NAME "
                             f"(got {self.url!r})")
        if "@" in self.url.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("url: credentials in the config: put the URL in an environment variable and set "
                             "url: env:NAME")
        return self


class RetrainingConfig(Strict):
    """13A: the weekly DAG's retraining of the champion router from serving feedback."""

    # the data interval [start, end) of the DAG run, ISO-8601 with a timezone; set by the DAG per run
    interval_start: str | None = None
    interval_end: str | None = None
    # where serving writes feedback; None = <storage.root>/feedback
    feedback_root: str | None = None
    min_feedback_rows: int = Field(10, ge=1)  # fewer valid labelled rows in the week: skip, saying so
    eval_fraction: float = Field(0.3, gt=0, lt=1)  # the week's rows held out to compare the two routers
    epochs: int = Field(30, ge=1)  # warm start from the champion: fewer epochs than 6A
    learning_rate: float = Field(1e-3, gt=0)
    feedback_weight: float = Field(1.0, gt=0)  # a feedback row's weight against one of 6A's rows
    # promotion: the challenger's combined score (mean of fixed held-out routing accuracy and the week's
    # feedback agreement) must beat the champion's by more than this, and held-out accuracy may not drop
    # by more than max_heldout_drop
    # (a challenger trained on misleading feedback stays close to the champion -- its best epoch is picked on
    # 6A's val split -- so a gain smaller than this is noise, not a better router)
    min_improvement: float = Field(0.01, ge=0)
    max_heldout_drop: float = Field(0.02, ge=0)


class RoutingConfig(Strict):
    router: RouterConfig = RouterConfig()
    detector: DetectorConfig = DetectorConfig()
    thresholds: ThresholdConfig = ThresholdConfig()
    sessions: SessionConfig = SessionConfig()
    retraining: RetrainingConfig = RetrainingConfig()
