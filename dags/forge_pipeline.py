"""forge_pipeline: base LLM -> trained, analysed base model, one Airflow task per plan phase.

Built from the phase registry (forge/phases.py): one TaskGroup per phase group, task ids from
the registry, dependencies from each phase's inputs. The jobs live in forge/; this file only
wires them, and imports nothing heavier than pydantic/yaml so the DAG processor parses it fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The project root holds `forge` and `operators`; Airflow puts only dags/ on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from airflow.sdk import DAG, TaskGroup, TriggerRule  # noqa: E402

from forge.phases import PHASES  # noqa: E402
from operators.forge_job import ForgeJobOperator  # noqa: E402
from operators.gpu_job import ForgeGPUJobOperator  # noqa: E402
from operators.trigger_form import trigger_params  # noqa: E402

DOC_MD = """
### Forge pipeline

Turns a base LLM into a trained, analysed base model, one task per phase of the master table
(`python -m forge phases` lists them). Fill the trigger form: **profile** (`demo` runs on CPU in
minutes), **base model**, **domains**, **datasets**, and free **overrides** (JSON deep-merged
onto `config/pipeline.yaml`). A bad config fails the first task, naming the field.

* Outputs are content-addressed in the artifact store: clear a failed task and only it and what
  depends on it run again; finished upstream outputs are reused (cache hit).
* **0B vocab trimming** is skipped by default, as the plan says (`vocab.trim_enabled: false`);
  later tasks run anyway (trigger rule `none_failed`).
* Every task has an **MLflow run** button (nested run under the DAG run's parent run).
* GPU phases (1A) take slots of the `gpu` pool and go to the `gpu` queue.
"""

with DAG(
    dag_id="forge_pipeline",
    description="Forge: base model -> vocab analysis -> QLoRA base training -> failure analysis",
    schedule=None,
    catchup=False,
    params=trigger_params(),
    tags=["forge", "llm", "training"],
    doc_md=DOC_MD,
    max_active_runs=1,  # runs of one pipeline compete for the same GPUs; queue them instead
) as dag:
    groups: dict[str, TaskGroup] = {}
    tasks: dict[str, ForgeJobOperator] = {}
    for phase in PHASES:
        if phase.group not in groups:
            groups[phase.group] = TaskGroup(group_id=phase.group)
        operator = ForgeGPUJobOperator if phase.gpu else ForgeJobOperator
        tasks[phase.id] = operator(
            phase_id=phase.id,
            task_group=groups[phase.group],
            # a skipped phase (0B by default) must not skip what follows it
            trigger_rule=TriggerRule.NONE_FAILED,
        )
    for phase in PHASES:
        for upstream in phase.inputs:
            tasks[upstream] >> tasks[phase.id]
