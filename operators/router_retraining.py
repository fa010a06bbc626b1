"""13A's weekly DAG, forge_router_retraining: collect the week's feedback -> retrain -> evaluate and promote.

Built from the phase registry's RETRAINING_PHASES like the pipeline DAG. Each task's config gets the run's
data interval (routing.retraining.interval_start / interval_end), so a scheduled run, a backfilled week and
a re-run of a week all read exactly that week's feedback. A task skipped for a reason (no champion yet, too
little feedback) skips what follows it: the default all_success trigger rule, unlike the pipeline's.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Context, TaskGroup

from forge.phases import RETRAINING_GROUP, RETRAINING_PHASES
from operators.forge_job import ForgeJobOperator
from operators.trigger_form import trigger_params

WEEK = timedelta(days=7)


def interval_of(context: Context) -> tuple[datetime, datetime]:
    """The week this run retrains on: its data interval (the DAG's timetable gives scheduled, backfilled and
    manual runs one). A run without one (e.g. a trigger timetable put in by hand) takes the week before its
    logical date, else before it was started."""
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is not None and end is not None and start < end:
        return start, end
    dag_run = context.get("dag_run")
    end = (context.get("logical_date") or getattr(dag_run, "run_after", None)
           or getattr(dag_run, "start_date", None))
    if end is None:
        raise ValueError("forge_router_retraining: the run has no data interval, logical date or start time")
    return end - WEEK, end


class RouterRetrainingOperator(ForgeJobOperator):
    """A 13A step: a Forge job whose config carries the run's data interval."""

    ui_color = "#e6f4ea"

    def context_overrides(self, context: Context) -> dict[str, Any]:
        start, end = interval_of(context)
        return {"routing": {"retraining": {"interval_start": start.isoformat(),
                                           "interval_end": end.isoformat()}}}


def weekly_intervals() -> Any:
    """@weekly (Sunday 00:00 UTC) with data intervals: the run of a week starts once the week is over and
    reads [that Sunday, the next); a manual run reads the last complete week. (Airflow 3's plain "@weekly"
    is a trigger timetable: runs get no interval.)"""
    from airflow.timetables.interval import CronDataIntervalTimetable

    return CronDataIntervalTimetable("0 0 * * 0", timezone="UTC")


def build_retraining_dag(dag_id: str, *, doc_md: str, start_date: datetime, schedule: Any = None,
                         **dag_kwargs: Any) -> DAG:
    params = {k: v for k, v in trigger_params().items() if k in ("profile", "overrides")}
    with DAG(dag_id=dag_id, description="Forge 13A: weekly router retraining from serving feedback",
             schedule=schedule or weekly_intervals(), start_date=start_date, catchup=False, params=params,
             doc_md=doc_md,
             tags=["forge", "routing", "13A"], max_active_runs=1,  # weeks in order: each builds on the last
             **dag_kwargs) as dag:
        group = TaskGroup(group_id=RETRAINING_GROUP)
        # A week starts once the week before has decided: its first step reads the champion, so it waits
        # for the previous run's first step and what directly follows it (Airflow's wait_for_downstream).
        # max_active_runs does not hold backfill runs: a backfill has its own (default 10).
        tasks = {p.id: RouterRetrainingOperator(phase_id=p.id, task_group=group,
                                                wait_for_downstream=not p.inputs)
                 for p in RETRAINING_PHASES}
        for p in RETRAINING_PHASES:
            for upstream in p.inputs:
                tasks[upstream] >> tasks[p.id]
    return dag
