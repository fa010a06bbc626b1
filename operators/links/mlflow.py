"""The "MLflow run" button of a Forge task: opens the phase's nested MLflow run.

Airflow 3 computes extra links on the worker when the task finishes (get_link gets the very
operator instance that executed, and the task instance) and stores the URL in XCom; the UI only
reads it back. The URL comes from the operator's manifest summary: kept on the operator (so a
skipped task links to its MLflow run too), else read from the task's XCom return value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

RETURN_KEY = "return_value"


def link_from_summary(summary: Any) -> str:
    """The MLflow URL of a manifest summary; '' when the task produced none (skipped, failed)."""
    if not isinstance(summary, dict):
        return ""
    return str(summary.get("mlflow_url") or "")


class MlflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        summary = getattr(operator, "forge_summary", None)
        if summary is None:  # not the executing instance: read what the task pushed
            from airflow.sdk.execution_time.xcom import XCom

            summary = XCom.get_value(ti_key=ti_key, key=RETURN_KEY)
        return link_from_summary(summary)
