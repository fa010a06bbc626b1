"""1C distillation (the `distill` section): teachers answer the student's failures and critique its answers.

"Bidirectional" as Forge defines it: (1) the 1B failures go to the teachers, whose verified answers become SFT
rows; (2) a sample of the student's own answers (right and wrong) goes to the teachers for a critique, whose
verified corrections become SFT rows and, where the student was wrong, preference pairs (chosen = the verified
answer, rejected = the student's). Axolotl trains SFT then (preference="dpo") DPO from the SFT adapter.
Cheap to import (pydantic only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forge.config_base import Strict
from forge.modifiers.axolotl_config import AxolotlConfig


class DistillConfig(Strict):
    enabled: bool = True
    skip_reason: str = "distill.enabled is false"
    # the cascade (teachers.domains.<key>) that teaches 1C; the plan's is GPT-5 alone
    cascade: str = "general"
    failures: int = Field(200, ge=0)  # at most this many 1B failure rows go to the teachers
    critiques: int = Field(100, ge=0)  # student answers sent for critique (sampled from train rows)
    preference: Literal["dpo", "none"] = "dpo"  # "none": SFT only
    dpo_beta: float = Field(0.1, gt=0)
    dpo_max_steps: int | None = Field(None, ge=1)  # None: axolotl.max_steps / num_epochs as for SFT
    min_rows: int = Field(8, ge=1)  # fewer verified SFT rows than this fails the task, saying so
    axolotl: AxolotlConfig = AxolotlConfig()
