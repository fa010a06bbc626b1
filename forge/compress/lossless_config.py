"""Config of phase 2D (lossless compression): zstd level, dictionary size, schemes to measure.

Kept free of heavy imports: the DAG and forge/config.py may import it.
"""

from __future__ import annotations

from pydantic import field_validator

from forge.config_base import Strict

# The weight codecs 2D knows how to measure; forge.compress.codecs.REGISTRY holds their classes.
KNOWN_SCHEMES = ("zstd", "byteplane-zstd", "zipnn")


class LosslessConfig(Strict):
    level: int = 19  # zstd level for every zstd stream (weights' planes and small files)
    dict_size: int = 131072  # trained zstd dictionary for the small files (configs, tokenizer...)
    schemes: list[str] = list(KNOWN_SCHEMES)  # measured on the weights; the best ratio is stored

    @field_validator("level")
    @classmethod
    def _zstd_level(cls, v: int) -> int:
        if not 1 <= v <= 22:
            raise ValueError(f"zstd level must be in 1..22 (got {v})")
        return v

    @field_validator("dict_size")
    @classmethod
    def _dict_size(cls, v: int) -> int:
        if v < 1024:  # zstd cannot train a useful dictionary below this
            raise ValueError(f"dict_size must be >= 1024 bytes (got {v})")
        return v

    @field_validator("schemes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in KNOWN_SCHEMES]
        if unknown:
            raise ValueError(f"unknown lossless scheme(s) {unknown}; known: {list(KNOWN_SCHEMES)}")
        if not v:
            raise ValueError("at least one lossless scheme is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate lossless schemes in {v}")
        return v
