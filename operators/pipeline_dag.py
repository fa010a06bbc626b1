"""The Forge pipeline as a DAG, built from the phase registry: the one builder every pipeline DAG file calls.

One TaskGroup per phase group, task ids from the registry, dependencies from each phase's inputs,
the trigger form as params. `forge_pipeline` (manual) and `forge_pipeline_scheduled` (time
schedule, for backfills) differ only in their schedule and docs, so a backfilled run executes
exactly the tasks, operators and config mapping of a manual one and shares its cached outputs.
Imports nothing heavier than pydantic/yaml: DAG files that call it must parse fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, TaskGroup, TriggerRule

from forge.phases import Phase, pipeline_phases, wait_task_id
from operators.forge_job import ForgeJobOperator
from operators.gpu_job import ForgeGPUJobOperator
from operators.trigger_form import trigger_params

DESCRIPTION = ("Forge: base model -> vocab analysis -> QLoRA base training -> failure analysis "
               "-> compression (pruning, AWQ, GGUF, recovery LoRA, calibration) -> distillation "
               "-> domain modifiers (teacher cascade + Axolotl) -> router -> MAML, few-shot templates -> "
               "release, serving checks, modes, self-consistency, self-critique -> quality gates, human "
               "evaluation, speed")
TAGS = ("forge", "llm", "training")


def add_phase_tasks(phases: Sequence[Phase] | None = None) -> dict[str, ForgeJobOperator]:
    """One task per phase inside the DAG being defined (call it within `with DAG(...)`), wired by inputs.
    Default: every pipeline phase, with a TaskGroup of subphases A-H per domain of the config file's
    modifiers.domains (a domain the run does not enable skips, saying so)."""
    phases = pipeline_phases() if phases is None else phases
    groups: dict[str, TaskGroup] = {}
    tasks: dict[str, ForgeJobOperator] = {}
    for phase in phases:
        if phase.group not in groups:
            groups[phase.group] = TaskGroup(group_id=phase.group)
        operator = ForgeGPUJobOperator if phase.gpu else ForgeJobOperator
        tasks[phase.id] = operator(
            phase_id=phase.id,
            task_group=groups[phase.group],
            # a skipped phase (0B by default) must not skip what follows it
            trigger_rule=TriggerRule.NONE_FAILED,
        )
    for phase in phases:
        if phase.waits_for_ratings:  # people rate between the inputs and this task: a deferrable wait
            from operators.sensors.ratings import HumanRatingsSensor

            (prepare,) = phase.inputs
            wait = HumanRatingsSensor(task_id=wait_task_id(phase), prepare_task_id=tasks[prepare].task_id,
                                      task_group=groups[phase.group])
            tasks[prepare] >> wait >> tasks[phase.id]
            continue
        for upstream in phase.inputs:
            tasks[upstream] >> tasks[phase.id]
    return tasks


def build_pipeline_dag(
    dag_id: str,
    *,
    doc_md: str,
    schedule: str | None = None,
    start_date: datetime | None = None,
    tags: Sequence[str] = (),
    **dag_kwargs: Any,
) -> DAG:
    """The pipeline DAG: every registry phase as a task, config from the run's conf / trigger form.

    catchup is always off: a scheduled pipeline that fell behind must not replay every missed
    interval on its own; past dates are run on purpose, with `airflow backfill create`.
    """
    with DAG(
        dag_id=dag_id,
        description=DESCRIPTION,
        schedule=schedule,
        start_date=start_date,
        catchup=False,
        params=trigger_params(),
        tags=[*TAGS, *tags],
        doc_md=doc_md,
        max_active_runs=1,  # runs of one pipeline compete for the same GPUs; queue them instead
        **dag_kwargs,
    ) as dag:
        add_phase_tasks()
    return dag
