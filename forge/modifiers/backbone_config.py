"""15A: the shared backbone (the `backbone` section). Cheap to import (pydantic only)."""

from __future__ import annotations

from pydantic import Field, model_validator

from forge.config_base import Strict


class SharedBackboneConfig(Strict):
    """The plan shares a backbone only above 15 domains: below `min_domains` enabled modifiers 15A is skipped,
    unless `force`. The domain adapters' weight deltas are distilled into one shared low-rank adapter (rank
    `shared_rank`) plus a small per-domain head (rank `head_rank`) each."""

    min_domains: int = Field(15, ge=2)
    force: bool = False
    shared_rank: int = Field(16, ge=1)
    head_rank: int = Field(4, ge=1)
    eval_rows: int | None = Field(None, ge=1)  # held-out rows per domain (None: all of A's held-out split)

    @model_validator(mode="after")
    def _ranks(self) -> SharedBackboneConfig:
        if self.head_rank > self.shared_rank:
            raise ValueError(
                f"head_rank ({self.head_rank}) above shared_rank ({self.shared_rank}): the heads "
                "are meant to be the small part"
            )
        return self

    def skip_reason(self, n_domains: int) -> str | None:
        if n_domains >= self.min_domains or self.force:
            return None
        return (
            f"{n_domains} modifier(s) enabled, below backbone.min_domains ({self.min_domains}): the plan "
            "shares a backbone only above 15 domains (backbone.force: true builds it anyway)"
        )
