"""Forge's Airflow plugin: the "MLflow run" button on Forge tasks and an MLflow menu entry.

The link class lives in operators/links/ (the operator declares it, so the worker computes the
URL when the task ends); registering it here lets the API server resolve it by name too.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The project root holds `forge` and `operators`; Airflow puts only plugins/ on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from airflow.plugins_manager import AirflowPlugin  # noqa: E402

from operators.hooks.mlflow import mlflow_ui_url  # noqa: E402
from operators.links.mlflow import MlflowRunLink  # noqa: E402


class ForgePlugin(AirflowPlugin):
    name = "forge"
    operator_extra_links = [MlflowRunLink()]
    # Airflow 3 UI: a navigation entry opening MLflow (FORGE_MLFLOW_UI_URL); no url_route = a
    # plain external link, not an iframe
    external_views = [
        {"name": "MLflow", "href": mlflow_ui_url(), "destination": "nav"},
    ]
