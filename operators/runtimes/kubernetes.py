"""Run the job as a Kubernetes pod of the trainer image (config `runtime.backend: kubernetes`).

`render_pod` turns a JobRequest into the V1Pod (inspectable without a cluster); the provider's
KubernetesPodOperator machinery runs it: create, wait for scheduling and the image pull, stream the
container's log into the task log, wait, clean up, reattach after a worker loss, delete the pod on kill.
The job's result is read back from the artifact store, where the runner committed it with its manifest.

The pod gets no secret values, only references: credentials come from the Kubernetes Secrets that
`runtime.kubernetes.secrets` names (valueFrom.secretKeyRef / envFrom.secretRef). The config travels as the
CLI's `--profile` + `--conf` overrides (plus the run's storage and tracking sections, so the pod writes where
the task reads), which hold no secrets by design; `render_pod` refuses a URL with credentials in it and, as a
last guard, any spec in which the value of a credential known to this worker appears.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client import models as k8s

from forge.artifacts import Manifest
from forge.config import deep_merge
from forge.phases import get_phase
from forge.runtime_config import KubernetesConfig, PodResources, RuntimeConfig, looks_secret
from operators.runtimes import runtime_settings
from operators.runtimes.base import JobRequest, committed_manifest
from operators.runtimes.venv import JobFailed, RuntimeSetupError

BASE_CONTAINER = "base"  # KubernetesPodOperator's name for the container it follows
GPUS_ENV, LAUNCHER_ENV = "FORGE_GPUS", "FORGE_LAUNCHER"  # read by forge.modifiers.axolotl_runner
STORE_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
# what the storage hook resolves that is not a secret: passed as plain values
PLAIN_STORAGE_ENV = ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")
# the device plugin picks the pod's GPUs; a worker's device ids mean nothing on another node
DROPPED_ENV = ("CUDA_VISIBLE_DEVICES",)
LOCAL_SCHEMES = ("", "file", "sqlite")


# ---------------------------------------------------------------- the pod


def pod_overrides(request: JobRequest) -> dict[str, Any]:
    """The `--conf` of the pod: the run's overrides, and where artifacts and MLflow runs go (the task reads
    the manifest from the same store). The Airflow connection of the store means nothing in a pod."""
    cfg = request.config
    sections: dict[str, Any] = {"storage": cfg.storage.model_dump(mode="json") | {"conn_id": None},
                                "tracking": cfg.tracking.model_dump(mode="json")}
    for section, values in sections.items():
        for field, value in list(values.items()):
            if not isinstance(value, str) or "://" not in value:
                continue
            if urlsplit(value).password:
                raise RuntimeSetupError(f"{section}.{field} carries a password in its URL: on Kubernetes the "
                                        "config travels in the pod spec; put the credentials in a Secret "
                                        "(runtime.kubernetes.secrets)")
            if urlsplit(value).scheme in LOCAL_SCHEMES:  # this worker's path: the image's config decides
                del values[field]
    return deep_merge(request.overrides, sections)


def job_args(request: JobRequest, kube: KubernetesConfig) -> list[str]:
    """`python -m forge run PHASE --run-id RUN --profile P --conf JSON [--config F] [--no-track]`."""
    args = ["python", "-m", "forge", "run", request.phase_id, "--run-id", request.run_id,
            "--profile", request.config.profile, "--conf", json.dumps(pod_overrides(request), sort_keys=True)]
    if kube.config_path:
        args += ["--config", kube.config_path]
    if not request.track:
        args.append("--no-track")
    return args


def _check_remote(request: JobRequest) -> None:
    cfg = request.config
    if urlsplit(cfg.storage.root).scheme in LOCAL_SCHEMES:
        raise RuntimeSetupError(f"runtime.backend kubernetes needs a shared artifact store (storage.root "
                                f"s3://...), not {cfg.storage.root!r}: a pod's files vanish with it")
    if request.track and urlsplit(cfg.tracking.tracking_uri).scheme in LOCAL_SCHEMES:
        raise RuntimeSetupError(f"runtime.backend kubernetes needs an MLflow server (tracking.tracking_uri "
                                f"http(s)://...), not {cfg.tracking.tracking_uri!r}; or run with track=False")


def _secret_env(name: str, secret: str, key: str, optional: bool) -> k8s.V1EnvVar:
    ref = k8s.V1SecretKeySelector(name=secret, key=key, optional=optional or None)
    return k8s.V1EnvVar(name=name, value_from=k8s.V1EnvVarSource(secret_key_ref=ref))


def secret_env(request: JobRequest,
               kube: KubernetesConfig) -> tuple[list[k8s.V1EnvVar], list[k8s.V1EnvFromSource]]:
    """Env from Secrets: the store's keys, the phase's teacher keys, the hub token; mlflow/extra whole."""
    from operators.hooks.teachers import phase_teachers

    cfg, names = request.config, kube.secrets
    env: list[k8s.V1EnvVar] = []
    if names.store:
        env += [_secret_env(var, names.store, var, optional) for var, optional in STORE_KEYS]
    if names.teachers:
        # only the teachers this phase may call (least privilege); optional: a missing key is the job's own
        # error, naming the teacher, instead of a pod stuck in CreateContainerConfigError
        phase = get_phase(request.phase_id, cfg)
        keys = sorted({t.key_env for t in phase_teachers(cfg, phase) if not t.is_local and t.key_env})
        env += [_secret_env(var, names.teachers, var, True) for var in keys]
    if names.hub:  # gated base-model downloads anywhere, 8A's upload; none = no upload, as without a token
        var = cfg.serving.hf_token_env
        env.append(_secret_env(var, names.hub, var, True))
    env_from = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s))
                for s in ([names.mlflow] if names.mlflow else []) + list(names.extra)]
    return env, env_from


def plain_env(request: JobRequest, kube: KubernetesConfig, gpus: int, launcher: str) -> dict[str, str]:
    env = {k: v for k, v in request.storage.env.items() if k in PLAIN_STORAGE_ENV}
    env.update(kube.env)
    env.update({k: v for k, v in request.env.items() if k not in DROPPED_ENV})
    if gpus:
        env.update({GPUS_ENV: str(gpus), LAUNCHER_ENV: launcher})
    leaked = sorted(k for k in env if looks_secret(k))
    if leaked:
        raise RuntimeSetupError(f"env {leaked} look like credentials: on Kubernetes they come from Secrets "
                                "only (runtime.kubernetes.secrets), never as values in the pod spec")
    return env


def _resources(res: PodResources, gpus: int, gpu_resource: str) -> k8s.V1ResourceRequirements:
    requests = {"cpu": res.cpu, "memory": res.memory}
    if res.ephemeral_storage:
        requests["ephemeral-storage"] = res.ephemeral_storage
    limits = {gpu_resource: str(gpus)} if gpus else {}
    if res.memory_limit:
        limits["memory"] = res.memory_limit
    return k8s.V1ResourceRequirements(requests=requests, limits=limits or None)


def _tolerations(kube: KubernetesConfig, gpus: int) -> list[k8s.V1Toleration] | None:
    items = [*kube.tolerations, *(kube.gpu_tolerations if gpus else [])]
    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                             toleration_seconds=t.toleration_seconds) for t in items] or None


def pod_name(phase_id: str) -> str:
    """forge-<phase> (KubernetesPodOperator appends a random suffix)."""
    return "forge-" + re.sub(r"[^a-z0-9]+", "-", phase_id.lower()).strip("-")


def render_pod(request: JobRequest, settings: RuntimeConfig | None = None, *, gpus: int = 0) -> k8s.V1Pod:
    """The pod that runs `request`: gpus > 0 for a GPU phase (its pool slots = `nvidia.com/gpu` limit)."""
    from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value

    settings = settings or runtime_settings(request.config)
    kube = settings.kubernetes
    _check_remote(request)
    env = plain_env(request, kube, gpus, settings.launcher)
    refs, env_from = secret_env(request, kube)
    by_ref = {e.name for e in refs}
    env_vars = [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items()) if k not in by_ref] + refs

    volumes: list[k8s.V1Volume] = []
    mounts: list[k8s.V1VolumeMount] = []
    if gpus and kube.shm_size:
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=kube.shm_size)))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    if kube.scratch_size:
        volumes.append(k8s.V1Volume(name="forge-home", empty_dir=k8s.V1EmptyDirVolumeSource(
            size_limit=kube.scratch_size)))
        mounts.append(k8s.V1VolumeMount(name="forge-home", mount_path=kube.home))

    container = k8s.V1Container(
        name=BASE_CONTAINER, image=kube.image, image_pull_policy=kube.image_pull_policy,
        command=list(kube.command) if kube.command else None, args=job_args(request, kube),
        env=env_vars, env_from=env_from or None,
        resources=_resources(kube.gpu_resources if gpus else kube.resources, gpus, kube.gpu_resource),
        volume_mounts=mounts or None)
    labels = {"app.kubernetes.io/name": "forge", "app.kubernetes.io/component": "job",
              "forge/phase": make_safe_label_value(request.phase_id),
              "forge/run-id": make_safe_label_value(request.run_id), **kube.labels}
    pod = k8s.V1Pod(
        api_version="v1", kind="Pod",
        metadata=k8s.V1ObjectMeta(name=pod_name(request.phase_id), namespace=kube.namespace, labels=labels,
                                  annotations=dict(kube.annotations) or None),
        spec=k8s.V1PodSpec(
            containers=[container], restart_policy="Never",
            service_account_name=kube.service_account,
            node_selector={**kube.node_selector, **(kube.gpu_node_selector if gpus else {})} or None,
            tolerations=_tolerations(kube, gpus),
            image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in kube.image_pull_secrets] or None,
            priority_class_name=kube.priority_class, volumes=volumes or None))
    assert_no_secret_values(pod, request)
    return pod


def pod_dict(pod: k8s.V1Pod) -> dict[str, Any]:
    """The pod as the API server receives it (camelCase JSON)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)


def known_secret_values(request: JobRequest) -> dict[str, str]:
    """Credential values this worker knows (its env, the store's resolved keys, the request's env)."""
    values = {k: v for k, v in os.environ.items() if looks_secret(k)}
    values.update({k: v for k, v in request.storage.env.items() if looks_secret(k)})
    values.update({f"storage_options.{k}": str(v) for k, v in request.storage.storage_options.items()
                   if k in ("key", "secret", "token")})
    values.update({k: v for k, v in request.env.items() if looks_secret(k)})
    return {k: v for k, v in values.items() if v and len(v) >= 6}


def assert_no_secret_values(pod: k8s.V1Pod, request: JobRequest) -> None:
    text = json.dumps(pod_dict(pod))
    found = sorted(k for k, v in known_secret_values(request).items() if v in text)
    if found:
        raise RuntimeSetupError(f"refusing to launch: the pod spec would contain the value of {found}; "
                                "credentials reach pods only through Kubernetes Secrets")


# ---------------------------------------------------------------- running it


def container_exit_code(pod: k8s.V1Pod | None, container: str = BASE_CONTAINER) -> int | None:
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


class KubernetesRuntime:
    name = "kubernetes"
    env_from_cluster = True  # the operator resolves no teacher/hub keys for it: the pod reads Secrets

    def __init__(self, settings: RuntimeConfig, *, gpus: int = 0, context: Any = None,
                 task_id: str = "forge_job") -> None:
        self.settings, self.gpus, self.context, self.task_id = settings, gpus, context, task_id
        self._pod_op: Any = None

    def pod_operator(self, pod: k8s.V1Pod) -> Any:
        """The provider's KubernetesPodOperator around our pod (not part of any DAG: a runner for it)."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        kube = self.settings.kubernetes
        return KubernetesPodOperator(
            task_id=self.task_id, name=pod.metadata.name, namespace=kube.namespace, full_pod_spec=pod,
            kubernetes_conn_id=kube.conn_id, in_cluster=kube.in_cluster,
            startup_timeout_seconds=kube.startup_timeout_s, get_logs=True, do_xcom_push=False,
            base_container_name=BASE_CONTAINER, on_finish_action=kube.on_finish_action,
            log_events_on_failure=True, random_name_suffix=True)

    def run(self, request: JobRequest, log: logging.Logger) -> Manifest:
        if self.context is None:
            raise RuntimeSetupError("the kubernetes runtime runs inside an Airflow task (needs its context)")
        pod = render_pod(request, self.settings, gpus=self.gpus)
        container = pod.spec.containers[0]
        log.info("phase %s as a pod in namespace %s: image %s, %s; env from Secrets: %s", request.phase_id,
                 pod.metadata.namespace, container.image,
                 f"{self.gpus} x {self.settings.kubernetes.gpu_resource}" if self.gpus else "no GPU",
                 sorted({e.name for e in container.env or [] if e.value_from}
                        | {f"<{s.secret_ref.name}>" for s in container.env_from or []}))
        self._pod_op = op = self.pod_operator(pod)
        try:
            op.execute_sync(self.context)  # execute() minus the nested-operator warning; sync, not deferred
        except Exception as exc:
            rc = container_exit_code(getattr(op, "remote_pod", None))
            if rc is None:
                raise
            raise JobFailed(f"phase {request.phase_id} failed in pod {op.pod and op.pod.metadata.name} "
                            f"(exit code {rc}); its log is above", rc) from exc
        finally:
            self._pod_op = None
        return committed_manifest(request, f"the pod of {request.phase_id}")

    def kill(self) -> None:
        if self._pod_op is not None:
            self._pod_op.on_kill()  # deletes the pod
