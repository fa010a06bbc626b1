"""7A: first-order MAML over LoRA parameters (the `meta` section's `maml`). Cheap to import."""

from __future__ import annotations

from pydantic import Field, model_validator

from forge.config_base import Strict


class MAMLConfig(Strict):
    """Episodes are task families of the suites (a row's `task`): `shots` support rows adapt the LoRA in
    `inner_steps` SGD steps, the query rows' loss after adapting updates the shared init (first-order MAML).
    Families are split by a stable hash: held-out families are never seen in meta-training."""

    domains: list[str] = ["code", "reasoning", "automation", "math"]
    heldout_fraction: float = Field(0.3, gt=0, lt=1)  # of each domain's task families
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = ["q_proj", "v_proj"]
    meta_steps: int = Field(300, ge=1)
    meta_batch: int = Field(4, ge=1)  # episodes per meta step
    meta_lr: float = Field(1e-3, gt=0)
    inner_lr: float = Field(1e-2, gt=0)
    inner_steps: int = Field(3, ge=1)
    shots: list[int] = [1, 3, 5]  # k support rows per episode (meta-training draws k from this list too)
    query_rows: int = Field(8, ge=1)
    rows_per_family: int = Field(24, ge=4)  # generated train rows per family (support + query pools)
    eval_episodes: int = Field(24, ge=2)  # held-out episodes per shot count
    max_len: int = Field(256, ge=32)
    seed: int = 1234
    registered_model: str = "forge-maml-adapter"

    @model_validator(mode="after")
    def _shots(self) -> MAMLConfig:
        if not self.shots or min(self.shots) < 1:
            raise ValueError("shots: give at least one shot count >= 1 (the plan: 1-5)")
        if max(self.shots) + self.query_rows > self.rows_per_family:
            raise ValueError(
                f"rows_per_family ({self.rows_per_family}) must hold the largest shot count "
                f"({max(self.shots)}) plus query_rows ({self.query_rows})"
            )
        return self
