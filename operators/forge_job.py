"""ForgeJobOperator: run one Forge phase (forge/phases.py) as an Airflow task.

Thin by design: it builds the validated config from the DAG run (trigger form + conf), resolves
the artifact store's credentials, hands plain values to a runtime (operators/runtimes/) and
turns the job's manifest into task state: skipped manifest -> skipped task, summary -> XCom.
Where the job runs is the run's config (`runtime.backend`): local = the operator's `runtime`
(inprocess / venv) on the worker that took the task; kubernetes = a pod of the trainer image.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from forge.config import ConfigError, PipelineConfig, deep_merge, load_config
from forge.phases import get_phase
from forge.runtime_config import RuntimeConfig
from operators.hooks.hub import HubTokenHook
from operators.hooks.mlflow import mlflow_run_url
from operators.hooks.storage import ArtifactStoreHook
from operators.hooks.teachers import TeacherKeysHook
from operators.links.mlflow import MlflowRunLink
from operators.runtimes import RUNTIMES, JobRequest, Runtime, get_runtime, runtime_settings
from operators.trigger_form import config_request


class ForgeJobOperator(BaseOperator):
    """Runs `forge.runner.run_phase(phase_id, ...)` in a runtime.

    :param phase_id: a phase registry id ("prep_data", "1A", ...); task_id defaults to its task id.
    :param runtime: "inprocess" (default), "venv[:NAME]" (another interpreter, see `python`) or
        "kubernetes"; config `runtime.backend: kubernetes` sends every task to Kubernetes.
    :param python: interpreter of the venv runtime; else env FORGE_RUNTIME_<NAME>.
    :param env: extra environment variables for the job (plain values: on Kubernetes, credentials come
        from Secrets only, and a credential-like name is refused).
    :param config_path: pipeline.yaml to read (default: FORGE_CONFIG or config/pipeline.yaml).
    :param track: log to MLflow (parent run per DAG run, nested run per task).
    :param retries: 0 by default: a failed phase is fixed, then its task cleared by a human.
    """

    template_fields = ("env", "config_path")
    ui_color = "#e8f0fe"
    operator_extra_links = (MlflowRunLink(),)

    def __init__(
        self,
        *,
        phase_id: str,
        runtime: str = "inprocess",
        python: str | None = None,
        env: dict[str, str] | None = None,
        config_path: str | None = None,
        track: bool = True,
        retries: int = 0,
        task_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        phase = get_phase(phase_id)  # an unknown id fails at parse time, naming the known ones
        if runtime.partition(":")[0] not in RUNTIMES:
            raise ValueError(f"{phase_id}: unknown runtime {runtime!r}; known: {list(RUNTIMES)}")
        kwargs.setdefault("doc_md", f"**{phase.id}: {phase.title}**  \njob `{phase.job}`, inputs: "
                                    f"{', '.join(phase.inputs) or 'none'}")
        super().__init__(task_id=task_id or phase.task_id, retries=retries, **kwargs)
        self.phase_id = phase_id
        self.runtime = runtime
        self.python = python
        self.env = dict(env or {})
        self.config_path = config_path
        self.track = track
        self._runtime: Runtime | None = None
        self.forge_summary: dict[str, Any] | None = None  # set by execute()

    # ---- config from the DAG run -------------------------------------------------------------
    def build_config(self, context: Context) -> tuple[PipelineConfig, dict[str, Any]]:
        """The validated config of this run; a bad one fails the task before any work."""
        dag_run = context.get("dag_run")
        conf = getattr(dag_run, "conf", None) or {}
        try:
            profile, overrides = config_request(context.get("params"), conf)
            overrides = deep_merge(overrides, self.context_overrides(context))
            cfg = load_config(self.config_path, profile, overrides)
        except ConfigError as exc:
            # AirflowFailException: no retry, a human must fix the trigger form / conf first
            raise AirflowFailException(str(exc)) from exc
        return cfg, overrides

    def context_overrides(self, context: Context) -> dict[str, Any]:
        """Config the task context decides (e.g. 13A's data interval); none by default."""
        return {}

    def job_env(self) -> dict[str, str]:
        """Extra env for the job; the GPU operator adds CUDA_VISIBLE_DEVICES."""
        return {k: str(v) for k, v in self.env.items()}

    # ---- where it runs -----------------------------------------------------------------------
    def requested_gpus(self) -> int:
        """GPUs this task holds (its pool slots); 0 for a CPU phase."""
        return 0

    def runtime_env(self, settings: RuntimeConfig) -> dict[str, str]:
        """Env the execution settings decide (the GPU operator's multi-GPU launcher)."""
        return {}

    def select_runtime(self, cfg: PipelineConfig, context: Context) -> Runtime:
        """Config `runtime.backend: kubernetes` (or runtime="kubernetes"): a pod; local: the operator's."""
        settings = runtime_settings(cfg)
        spec = "kubernetes" if settings.backend == "kubernetes" else self.runtime
        return get_runtime(spec, self.python, settings=settings, gpus=self.requested_gpus(), context=context,
                           task_id=self.task_id)

    # ---- run ---------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        cfg, overrides = self.build_config(context)
        run_id = context["run_id"]
        from operators.runtimes.venv import CONFIG_ERROR_RC, JobFailed, RuntimeSetupError

        # the worker reads the job's manifest back from the store, wherever the job ran
        storage = ArtifactStoreHook(cfg.storage).get_credentials()
        runtime = self.select_runtime(cfg, context)
        try:  # teacher API keys from Airflow connections, exported as the env vars the job reads
            phase = get_phase(self.phase_id, cfg)
            keys = {} if getattr(runtime, "env_from_cluster", False) else {  # a pod reads them from Secrets
                **TeacherKeysHook(cfg, phase).key_env(), **HubTokenHook(cfg, phase).token_env()}
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from exc
        env = {**self.job_env(), **self.runtime_env(runtime_settings(cfg)), **keys}
        request = JobRequest(phase_id=self.phase_id, run_id=run_id, config=cfg, overrides=overrides,
                             storage=storage, env=env, config_path=self.config_path, track=self.track)

        try:
            self._runtime = runtime
            manifest = runtime.run(request, self.log)
        except RuntimeSetupError as exc:
            raise AirflowFailException(str(exc)) from exc
        except JobFailed as exc:
            if exc.returncode == CONFIG_ERROR_RC:  # the other runtime's forge rejected the config
                raise AirflowFailException(str(exc)) from exc
            raise
        finally:
            self._runtime = None
        summary = {
            "phase": manifest.phase,
            "status": manifest.status,
            "skip_reason": manifest.skip_reason,
            "uri": manifest.base_uri or None,
            "cache_key": manifest.cache_key,
            "cached_from_run": manifest.run_id if manifest.run_id != run_id else None,
            "mlflow_run_id": manifest.mlflow_run_id,
            "info": manifest.info,  # what the job tells downstream tasks (9B's campaign, for its sensor)
            "mlflow_url": mlflow_run_url(cfg.tracking, manifest.mlflow_run_id) if self.track else None,
        }
        self.forge_summary = summary  # read by the MLflow link when the task ends, skipped or not
        if manifest.status == "skipped":
            raise AirflowSkipException(f"phase {self.phase_id} skipped: {manifest.skip_reason}")
        self.log.info("phase %s %s: %s", self.phase_id, manifest.status, manifest.base_uri)
        return summary

    def on_kill(self) -> None:
        if self._runtime is not None:
            self._runtime.kill()
