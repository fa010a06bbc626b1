"""Tests that run Axolotl need its own runtime (.venv-axolotl, built by `make setup-axolotl`, which
`make test` runs first): without it they are skipped with the reason, never silently passed."""

from __future__ import annotations

import pytest

from forge.modifiers.axolotl_runner import AxolotlError, axolotl_bin_dir


def axolotl_missing() -> str | None:
    try:
        axolotl_bin_dir()
    except AxolotlError as e:
        return str(e)
    return None


MISSING = axolotl_missing()
needs_axolotl = pytest.mark.skipif(MISSING is not None, reason=f"Axolotl's runtime is missing ({MISSING}); "
                                   "`make setup-axolotl` creates it")
