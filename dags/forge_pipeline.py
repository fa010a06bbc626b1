"""forge_pipeline: base LLM -> trained, analysed, compressed base model, one Airflow task per plan phase.

Built from the phase registry (forge/phases.py) by operators/pipeline_dag.py, which
forge_pipeline_scheduled shares. The jobs live in forge/; this file only names the DAG, and
imports nothing heavier than pydantic/yaml so the DAG processor parses it fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The project root holds `forge` and `operators`; Airflow puts only dags/ on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from operators.pipeline_dag import build_pipeline_dag  # noqa: E402

DOC_MD = """
### Forge pipeline

Turns a base LLM into a trained, analysed and compressed base model, one task per phase of the
master table (`python -m forge phases` lists them). Fill the trigger form: **profile** (`demo`
runs on CPU in minutes), **base model**, **domains**, **datasets**, and free **overrides** (JSON
deep-merged onto `config/pipeline.yaml`). A bad config fails the first task, naming the field.

* Outputs are content-addressed in the artifact store: clear a failed task and only it and what
  depends on it run again; finished upstream outputs are reused (cache hit).
* **0B vocab trimming** is skipped by default, as the plan says (`vocab.trim_enabled: false`);
  later tasks run anyway (trigger rule `none_failed`).
* Every task has an **MLflow run** button (nested run under the DAG run's parent run).
* GPU phases take slots of the `gpu` pool and go to the `gpu` queue.
* Past dates and failed scheduled runs: see `forge_pipeline_scheduled` (same tasks, for backfills).
"""

dag = build_pipeline_dag("forge_pipeline", doc_md=DOC_MD, schedule=None)
