"""LocalExecutor whose task processes start with Forge's imports already done.

On Linux an Airflow 3 task process is forked from a LocalExecutor worker, itself forked from the scheduler
when the executor starts. Every Forge task imports MLflow (its tracker), the config models and the
operators before it does anything, ~3 s on a 2-core box even for a phase that only records its skip or a
cache hit. Imported once in the scheduler, before the workers are forked, they are in every task process
from the start (shared copy-on-write). Nothing heavier: torch and friends start thread pools, and stay
with the jobs that need them.
"""

from __future__ import annotations

import importlib
import logging

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

# what every Forge task imports: the DAG's operators (which parse the DAG file), the runner, MLflow
PRELOAD = ("operators.pipeline_dag", "operators.forge_job", "forge.runner", "forge.tracking",
           "mlflow.tracking")


class PreloadedLocalExecutor(LocalExecutor):
    """`AIRFLOW__CORE__EXECUTOR=operators.executors.preloaded_local.PreloadedLocalExecutor`."""

    def start(self) -> None:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError as exc:  # a task that needs it fails with the same error, and says where
                log.warning("could not preload %s for the task processes: %s", name, exc)
        super().start()
