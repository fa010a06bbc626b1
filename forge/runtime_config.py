"""Where the jobs run (`runtime:` in pipeline.yaml): the execution backend and its settings.

  backend: local        the task's worker runs the job (the operator's runtime: inprocess / venv); on Celery
                        that worker is one of queue `gpu` for GPU phases (pool `gpu`, pool_slots = GPUs)
  backend: kubernetes   the task launches the job as a pod of the trainer image (KubernetesPodOperator's
                        machinery); GPU phases get `nvidia.com/gpu: N` limits; secrets come from Kubernetes
                        Secrets only, never from this file
  gpus                  GPUs per GPU phase (default 1), e.g. {"1A": 4, "G": 2}: a phase id, or a modifier
                        step letter for that step of every domain. N = the pool slots the task takes = the
                        pod's GPU limit = the processes Axolotl's launcher starts (accelerate/torchrun)

The operators read `gpus` (and whether the backend is kubernetes, for the queue) from the deployment's
profile when the DAG is parsed: pool slots are fixed then. Nothing here is a secret: only Secret *names*.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from forge.config_base import Strict

# a Kubernetes quantity: 500m, 2, 1.5, 8Gi, 64G ...
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|[KMGTPE]i?|k)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# words that mark an env var as a credential: such a variable may only come from a Secret
SECRET_WORDS = frozenset({"KEY", "KEYS", "TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWD",
                          "PASS", "CREDENTIAL", "CREDENTIALS", "AUTH", "APIKEY"})


def looks_secret(name: str) -> bool:
    """True for env names like AWS_SECRET_ACCESS_KEY, HF_TOKEN, OPENAI_API_KEY, MLFLOW_TRACKING_PASSWORD."""
    return any(word in SECRET_WORDS for word in name.upper().split("_"))


def _quantity(v: str | None) -> str | None:
    if v is not None and not _QUANTITY.match(v):
        raise ValueError(f"not a Kubernetes quantity (e.g. 500m, 4, 16Gi): {v!r}")
    return v


def _dns_name(v: str | None, what: str) -> str | None:
    if v is not None and (len(v) > 253 or not _DNS_NAME.match(v)):
        raise ValueError(f"{what} {v!r} is not a valid Kubernetes name (lower case, digits, '-', '.')")
    return v


class PodResources(Strict):
    """Requests of the job container (GPUs are added from the operator's count, not from here)."""

    cpu: str = "2"
    memory: str = "8Gi"
    memory_limit: str | None = None  # None = no memory limit (the node's allocatable)
    ephemeral_storage: str | None = None  # request for the node's local disk (models, checkpoints)

    @field_validator("cpu", "memory", "memory_limit", "ephemeral_storage")
    @classmethod
    def _quantities(cls, v: str | None) -> str | None:
        return _quantity(v)


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("operator 'Exists' takes no value (use 'Equal')")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("operator 'Equal' needs a key")
        return self


class KubernetesSecrets(Strict):
    """Names of Kubernetes Secrets (in `namespace`) the job's credentials come from; None = not mounted.

    store:    keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ optional AWS_SESSION_TOKEN): the artifact store
    mlflow:   every key becomes an env var (envFrom): MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD,
              or MLFLOW_TRACKING_TOKEN
    teachers: one key per remote teacher a phase calls, named as its env var (TeacherConfig.key_env, e.g.
              OPENAI_API_KEY, FORGE_TEACHER_KEY_<NAME>); only the phase's own teachers are referenced
    hub:      key serving.hf_token_env (HF_TOKEN): gated base-model downloads and 8A's upload
    extra:    more Secrets passed whole (envFrom), e.g. one holding FORGE_SESSIONS_URL
    """

    store: str | None = None
    mlflow: str | None = None
    teachers: str | None = None
    hub: str | None = None
    extra: list[str] = []

    @field_validator("store", "mlflow", "teachers", "hub")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return _dns_name(v, "secret")

    @field_validator("extra")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            _dns_name(name, "secret")
        return v


class KubernetesConfig(Strict):
    image: str = Field("forge-trainer:0.1.0", min_length=1)  # docker/trainer (both venvs, Axolotl on PATH)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    namespace: str = "forge"
    service_account: str | None = None
    # every pod; GPU phases add gpu_node_selector / gpu_tolerations (the usual taint of GPU nodes)
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    gpu_node_selector: dict[str, str] = {}
    gpu_tolerations: list[Toleration] = [Toleration(key="nvidia.com/gpu", operator="Exists",
                                                    effect="NoSchedule")]
    gpu_resource: str = "nvidia.com/gpu"  # the device plugin's resource name
    resources: PodResources = PodResources()  # CPU phases
    gpu_resources: PodResources = PodResources(cpu="8", memory="64Gi")  # GPU phases (the whole pod)
    shm_size: str | None = "16Gi"  # GPU pods: /dev/shm (NCCL, DataLoader workers); None = the runtime's 64M
    scratch_size: str | None = None  # an emptyDir of this size at `home` (FORGE_HOME: work dirs, HF cache)
    home: str = "/opt/forge-home"  # FORGE_HOME inside the image
    secrets: KubernetesSecrets = KubernetesSecrets()
    env: dict[str, str] = {}  # plain, non-secret env for every pod (credential-like names are refused)
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    priority_class: str | None = None
    config_path: str | None = None  # `--config` inside the image; None = the image's FORGE_CONFIG
    # None keeps the image's ENTRYPOINT (tini + the config writer): the job's argv goes in `args`
    command: list[str] | None = None
    # the Airflow connection of the cluster (type kubernetes); in_cluster overrides the connection's
    conn_id: str | None = "kubernetes_default"
    in_cluster: bool | None = None
    startup_timeout_s: int = Field(900, ge=30)  # pending (scheduling + pulling a multi-GB image)
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"] = "delete_succeeded_pod"

    @field_validator("shm_size", "scratch_size")
    @classmethod
    def _quantities(cls, v: str | None) -> str | None:
        return _quantity(v)

    @field_validator("namespace", "service_account", "priority_class")
    @classmethod
    def _k8s_name(cls, v: str | None) -> str | None:
        return _dns_name(v, "name")

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            _dns_name(name, "image pull secret")
        return v

    @field_validator("env")
    @classmethod
    def _plain_env(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if looks_secret(name):
                raise ValueError(f"{name} looks like a credential: put it in a Kubernetes Secret and name "
                                 "the Secret under runtime.kubernetes.secrets (extra: [...] for any other)")
        return v


class RuntimeConfig(Strict):
    backend: Literal["local", "kubernetes"] = "local"
    gpus: dict[str, int] = {}  # phase id or modifier step letter -> GPUs (default 1)
    launcher: Literal["accelerate", "torchrun"] = "accelerate"  # Axolotl's multi-GPU launcher (N > 1)
    kubernetes: KubernetesConfig = KubernetesConfig()

    @field_validator("gpus")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"GPU counts must be >= 1 (got {bad})")
        return v

    def gpus_for(self, phase_id: str, step: str | None = None) -> int:
        """GPUs of a GPU phase: its id's entry, else its modifier step letter's, else 1."""
        return self.gpus.get(phase_id) or (self.gpus.get(step) if step else None) or 1
