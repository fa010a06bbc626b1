"""The base of every config model (kept apart so per-algorithm config modules import it cheaply)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown fields are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
