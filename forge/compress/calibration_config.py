"""2F: confidence calibration settings (the `calibration` section of the pipeline config).

Cheap to import (pydantic only): the phase registry and the DAG may read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forge.config_base import Strict


class CalibrationConfig(Strict):
    # the calib split is cut once, deterministically: this fraction fits, the rest measures
    fit_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    n_bins: int = Field(10, ge=2, le=50)  # equal-width confidence bins for ECE and the diagram
    # temperature scaling searches this range (log-spaced grid, then the best point is kept)
    t_min: float = Field(0.25, gt=0)
    t_max: float = Field(8.0, gt=0)
    t_points: int = Field(41, ge=3)
    method: Literal["platt", "temperature"] = "platt"  # what the router applies
    seed: int = 1234  # salts the row-id hash that cuts fit / held-out
    # each side of the split needs at least this many rows, or ECE/Brier (and the fits) are noise
    min_split_rows: int = Field(8, ge=2)
    # L2 penalty on the Platt slope: keeps the fit finite when the fit split is perfectly separable
    platt_l2: float = Field(1e-3, ge=0)

    @model_validator(mode="after")
    def _range(self) -> CalibrationConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
        return self
