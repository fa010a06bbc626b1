"""MLflow, as the operators need it: where a human opens a run (for the task's extra link)."""

from __future__ import annotations

import logging
import os

from forge.config import TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_UI_URL = "http://127.0.0.1:5000"


def mlflow_ui_url(tracking: TrackingConfig | None = None) -> str:
    """The MLflow UI humans open: config `tracking.ui_url`, else FORGE_MLFLOW_UI_URL, else local."""
    url = (tracking.ui_url if tracking else None) or os.environ.get("FORGE_MLFLOW_UI_URL") or DEFAULT_UI_URL
    return url.rstrip("/")


def mlflow_run_url(tracking: TrackingConfig, mlflow_run_id: str | None) -> str | None:
    """`<ui>/#/experiments/<exp>/runs/<run>`, or None when the run can't be looked up.

    A missing link must never fail a task whose job succeeded, hence the broad except.
    """
    if not mlflow_run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri)
        experiment_id = client.get_run(mlflow_run_id).info.experiment_id
    except Exception as exc:
        log.warning("could not look up MLflow run %s for its UI link: %s", mlflow_run_id, exc)
        return None
    return f"{mlflow_ui_url(tracking)}/#/experiments/{experiment_id}/runs/{mlflow_run_id}"
