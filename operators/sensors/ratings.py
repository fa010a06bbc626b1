"""HumanRatingsSensor: 9B's wait for people. Checks once, then defers to the triggerer (no worker slot held
for the days a study takes) until the campaign that 9B.prepare published has enough ratings.

Thin: the campaign and the ratings needed come from the prepare task's XCom (ForgeJobOperator's summary,
its manifest info under "info"); the database, poll interval and timeout from the run's validated config,
built as ForgeJobOperator builds it. If 9B.prepare was skipped (study disabled) this task is skipped by the
default trigger rule, before it runs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from forge.config import ConfigError, load_config
from forge.evaluate.human_ratings import RatingError, progress, resolve_url
from forge.evaluate.validation_config import HumanEvalStudyConfig
from operators.trigger_form import config_request
from operators.triggers.ratings import RatingsTrigger


class HumanRatingsSensor(BaseSensorOperator):
    """Waits until the 9B campaign has `needed` ratings; returns its progress (XCom).

    :param prepare_task_id: the full task id of the 9B.prepare ForgeJobOperator (with its TaskGroup prefix).
    :param config_path: pipeline.yaml to read (default: FORGE_CONFIG or config/pipeline.yaml), as the
        ForgeJobOperators of the DAG read it.
    """

    template_fields = ("prepare_task_id", "config_path")
    ui_color = "#fdf1e6"

    def __init__(self, *, prepare_task_id: str, config_path: str | None = None, retries: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(retries=retries, **kwargs)
        self.prepare_task_id = prepare_task_id
        self.config_path = config_path

    # ---- plain values from the run -----------------------------------------------------------
    def study(self, context: Context) -> HumanEvalStudyConfig:
        dag_run = context.get("dag_run")
        try:
            profile, overrides = config_request(context.get("params"), getattr(dag_run, "conf", None) or {})
            h = load_config(self.config_path, profile, overrides).validation.human
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from exc
        if not h.enabled:  # upstream skipped then; reached only if someone changed the trigger rule
            raise AirflowSkipException(h.skip_reason)
        return h

    def campaign(self, context: Context) -> tuple[str, int]:
        summary = context["ti"].xcom_pull(task_ids=self.prepare_task_id)
        info = summary.get("info") if isinstance(summary, dict) else None
        campaign = info.get("campaign") if isinstance(info, dict) else None
        needed = info.get("needed") if isinstance(info, dict) else None
        if not isinstance(campaign, str) or not isinstance(needed, int) or isinstance(needed, bool):
            raise AirflowFailException(
                f"{self.task_id}: the XCom of {self.prepare_task_id!r} has no info.campaign / info.needed "
                f"(got {summary!r}): point prepare_task_id at the 9B.prepare task")
        return campaign, needed

    @staticmethod
    def trigger_url(h: HumanEvalStudyConfig) -> str:
        """env:NAME stays a reference (resolved where it is used: no password in the trigger table); the
        default sqlite file is fixed here, so the triggerer polls the file this worker's FORGE_HOME names."""
        if h.db_url and h.db_url.startswith("env:"):
            return h.db_url
        return resolve_url(h.db_url)

    # ---- sensing -----------------------------------------------------------------------------
    def check(self, context: Context) -> tuple[HumanEvalStudyConfig, str, int, dict[str, Any]]:
        """(study config, campaign, ratings needed, progress now)."""
        h, (campaign, needed) = self.study(context), self.campaign(context)
        try:
            prog = progress(h.db_url, campaign)
        except RatingError as exc:  # unknown campaign, unset env var, bad URL: waiting will not fix it
            raise AirflowFailException(f"{self.task_id}: {exc}") from exc
        self.log.info("campaign %s: %d of %d ratings (%d of %d raters finished)", campaign, prog["ratings"],
                      needed, prog["raters_finished"], prog["raters"])
        return h, campaign, needed, prog

    def poke(self, context: Context) -> PokeReturnValue:
        _, _, needed, prog = self.check(context)
        return PokeReturnValue(prog["ratings"] >= needed, prog)

    def execute(self, context: Context) -> dict[str, Any]:
        h, campaign, needed, prog = self.check(context)
        if prog["ratings"] >= needed:
            return prog
        self.defer(
            trigger=RatingsTrigger(db_url=self.trigger_url(h), campaign=campaign, needed=needed,
                                   poke_interval_s=h.poke_interval_s),
            method_name="execute_complete",
            timeout=timedelta(hours=h.timeout_h),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not isinstance(event, dict) or event.get("status") != "ready":
            why = event.get("message") if isinstance(event, dict) else None
            raise AirflowFailException(f"{self.task_id}: the ratings trigger did not report ready: "
                                       f"{why or event!r}")
        campaign, needed = self.campaign(context)
        if event.get("campaign") != campaign or int(event.get("ratings", -1)) < needed:
            raise AirflowFailException(f"{self.task_id}: the trigger's event {event!r} is not for campaign "
                                       f"{campaign} with {needed} ratings")
        self.log.info("campaign %s ready: %d ratings", campaign, event["ratings"])
        return event
