"""The domain modifiers (phases 3-5 and 14A-E): which domains exist, which run, and how they train.

A domain is config, not DAG code: an entry under `modifiers.domains` (its plan id, title, the task suite its
prompts and evaluation come from, an optional judge teacher) gets a TaskGroup of subphases A-H in every
pipeline DAG. `modifiers.enabled` (the trigger form's "Modifiers" field) says which of them run in a given DAG
run; the others' tasks are skipped with that reason. Cheap to import (pydantic only).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from forge.config_base import Strict
from forge.modifiers.axolotl_config import AxolotlConfig

# subphase letter -> (task name, title); B/C/D are cascade tiers 1/2/3
SUBPHASES: dict[str, tuple[str, str]] = {
    "A": ("collect_prompts", "Collect domain prompts (suite + user data + 1B failures)"),
    "B": ("tier1_generation", "Tier-1 teacher generation"),
    "C": ("tier2_generation", "Tier-2 teacher on what tier 1 failed"),
    "D": ("tier3_generation", "Tier-3 teacher on the rest"),
    "E": ("verify_filter_split", "Verify, filter, dedup, split"),
    "F": ("render_axolotl_yaml", "Render the Axolotl YAML (validated by Axolotl)"),
    "G": ("train_qlora_adapter", "Train the QLoRA adapter (Axolotl)"),
    "H": ("evaluate_and_register", "Evaluate vs base, GGUF LoRA, compress, register"),
}
TIER_STEPS = {"B": 1, "C": 2, "D": 3}


class ModifierDomainConfig(Strict):
    """One domain's modifier."""

    plan_id: str = Field(pattern=r"^[0-9]+[A-Z]?$")  # "3" -> tasks 3A..3H; "14A" -> 14A.A..14A.H
    title: str
    # the task suite (forge.data.suites) whose rows are the domain's prompts, references and checks;
    # None = the domain's own name
    suite: str | None = None
    # a teacher that scores answers 0-10 against the row's rubric (domains whose answers are not checkable
    # by a program, e.g. creative); None = the suite's checker decides
    judge: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    min_judge_score: float = Field(7.0, ge=0, le=10)  # an answer passes at or above this score


class ModifierSizes(Strict):
    prompts: int = Field(200, ge=1)  # suite train prompts per domain collected by A (+ user rows, + failures)
    dev: int = Field(16, ge=1)  # validation rows for Axolotl's eval loss (from the suite's dev split)
    heldout: int = Field(48, ge=1)  # H scores base vs adapter on these (the suite's heldout split)


def _default_domains() -> dict[str, ModifierDomainConfig]:
    d = ModifierDomainConfig
    return {
        "code": d(plan_id="3", title="Code modifier"),
        "reasoning": d(plan_id="4", title="Reasoning modifier"),
        "automation": d(plan_id="5", title="Automation modifier"),
        "math": d(plan_id="14A", title="Math modifier"),
        "hard_math": d(plan_id="14B", title="Hard math modifier"),
        "science": d(plan_id="14C", title="Science modifier"),
        "finance": d(plan_id="14D", title="Finance modifier"),
        "creative": d(plan_id="14E", title="Creative modifier", judge="rubric"),
    }


class ModifiersConfig(Strict):
    enabled: list[str] = ["code", "reasoning", "automation"]  # the MVP; post-MVP domains are opt-in
    domains: dict[str, ModifierDomainConfig] = Field(default_factory=_default_domains)
    sizes: ModifierSizes = ModifierSizes()
    val_fraction: float = Field(0.1, ge=0, lt=0.5)  # E: accepted rows held out for Axolotl's eval loss
    min_train_rows: int = Field(8, ge=1)  # E fails (clearly) below this many accepted, deduplicated rows
    max_answer_chars: int = Field(4000, ge=16)  # E drops longer answers (runaway generations)
    axolotl: AxolotlConfig = AxolotlConfig()
    registered_prefix: str = "forge-modifier-"  # registered model = prefix + domain

    @field_validator("domains")
    @classmethod
    def _names(cls, v: dict[str, ModifierDomainConfig]) -> dict[str, ModifierDomainConfig]:
        for name in v:
            if not re.match(r"^[a-z][a-z0-9_]*$", name):
                raise ValueError(f"{name!r}: a domain name is lowercase letters, digits and _")
        plan_ids = [d.plan_id for d in v.values()]
        dupes = sorted({p for p in plan_ids if plan_ids.count(p) > 1})
        if dupes:
            raise ValueError(f"plan_id {dupes} used by more than one domain (task ids would clash)")
        return v

    @model_validator(mode="after")
    def _enabled_known(self) -> ModifiersConfig:
        unknown = [d for d in self.enabled if d not in self.domains]
        if unknown:
            raise ValueError(f"enabled: unknown domain(s) {unknown}; defined under modifiers.domains: "
                             f"{sorted(self.domains)}")
        if len(set(self.enabled)) != len(self.enabled):
            raise ValueError(f"enabled: a domain is listed twice in {self.enabled}")
        return self

    def suite_of(self, domain: str) -> str:
        return self.domains[domain].suite or domain

    def registered_name(self, domain: str) -> str:
        return f"{self.registered_prefix}{domain}"
