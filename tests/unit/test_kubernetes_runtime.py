"""The Kubernetes backend: the pod a GPU/CPU phase renders to, secrets by reference only, the backend chosen
by config, and the pod run through the provider's KubernetesPodOperator (faked at the API: no cluster here).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.airflow_env import configure

configure()

from airflow.sdk.exceptions import AirflowFailException  # noqa: E402
from kubernetes.client import models as k8s  # noqa: E402

import forge.phases  # noqa: E402
from forge.config import PipelineConfig, load_config  # noqa: E402
from forge.phases import Phase  # noqa: E402
from forge.runner import JobContext, JobResult, make_store  # noqa: E402
from forge.runtime_config import KubernetesConfig, RuntimeConfig  # noqa: E402
from operators.forge_job import ForgeJobOperator  # noqa: E402
from operators.gpu_job import ForgeGPUJobOperator  # noqa: E402
from operators.hooks.storage import ArtifactStoreHook  # noqa: E402
from operators.runtimes import JobRequest  # noqa: E402
from operators.runtimes import kubernetes as kube_rt  # noqa: E402
from operators.runtimes.inprocess import InProcessRuntime, patched_environ  # noqa: E402
from operators.runtimes.kubernetes import KubernetesRuntime, pod_dict, render_pod  # noqa: E402
from operators.runtimes.venv import RuntimeSetupError, VenvRuntime  # noqa: E402

FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEY0123456",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-value-xyz",
    "OPENAI_API_KEY": "sk-fake-openai-key-000",
    "DASHSCOPE_API_KEY": "sk-fake-dashscope-111",
    "DEEPSEEK_API_KEY": "sk-fake-deepseek-222",
    "HF_TOKEN": "hf_fakeTokenValue333",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-444",
}
SECRETS = {"store": "forge-store", "mlflow": "forge-mlflow", "teachers": "forge-teachers", "hub": "forge-hub"}
KUBE = {"image": "registry.example/forge-trainer:0.1.0", "namespace": "ml", "service_account": "forge-runner",
        "node_selector": {"pool": "ml"}, "gpu_node_selector": {"gpu.example/type": "h100"},
        "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "image_pull_secrets": ["regcred"], "secrets": SECRETS,
        "resources": {"cpu": "2", "memory": "8Gi"}, "gpu_resources": {"cpu": "16", "memory": "128Gi"}}
REMOTE = {"storage": {"root": "s3://forge-artifacts/forge", "endpoint_url": "http://minio:9000"},
          "tracking": {"tracking_uri": "http://mlflow:5000"}}


class WithRuntime(PipelineConfig):
    """PipelineConfig with the `runtime` section, whether or not forge/config.py carries it yet."""

    runtime: RuntimeConfig = RuntimeConfig()


def with_runtime(cfg: PipelineConfig, runtime: dict[str, Any]) -> PipelineConfig:
    cls = PipelineConfig if "runtime" in PipelineConfig.model_fields else WithRuntime
    return cls.model_validate({**cfg.model_dump(), "runtime": runtime})


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)


def request_for(phase_id: str, cfg: PipelineConfig, env: dict[str, str] | None = None,
                overrides: dict | None = None) -> JobRequest:
    # the store's credentials as the operator resolves them: from the env (so the secret values are in it)
    storage = ArtifactStoreHook(cfg.storage).get_credentials()
    return JobRequest(phase_id=phase_id, run_id="manual__2026-05-01T00:00:00+00:00", config=cfg,
                      overrides=overrides or {"train": {"max_steps": 5}}, storage=storage, env=env or {})


def production(runtime: dict[str, Any] | None = None) -> PipelineConfig:
    cfg = load_config(profile="production", overrides=REMOTE)
    return with_runtime(cfg, runtime or {"backend": "kubernetes", "kubernetes": KUBE})


def env_of(pod: k8s.V1Pod) -> dict[str, k8s.V1EnvVar]:
    return {e.name: e for e in pod.spec.containers[0].env}


def assert_no_secret_anywhere(pod: k8s.V1Pod) -> None:
    text = json.dumps(pod_dict(pod))
    for name, value in FAKE_SECRETS.items():
        assert value not in text, f"the value of {name} is in the pod spec"


# ---- the rendered pod ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("phase_id", "gpus"), [("1A", 1), ("3G", 4)])
def test_gpu_phase_renders_image_command_gpu_limit_placement_and_secret_refs(
        secrets_in_env: None, phase_id: str, gpus: int) -> None:
    cfg = production()
    pod = render_pod(request_for(phase_id, cfg, env={"CUDA_VISIBLE_DEVICES": "0"}), gpus=gpus)
    (c,) = pod.spec.containers
    assert (c.name, c.image) == ("base", KUBE["image"])
    assert c.command is None  # the image's ENTRYPOINT (tini + config writer) stays
    assert c.args[:9] == ["python", "-m", "forge", "run", phase_id, "--run-id",
                          "manual__2026-05-01T00:00:00+00:00", "--profile", "production"]
    conf = json.loads(c.args[c.args.index("--conf") + 1])
    assert conf["train"] == {"max_steps": 5}  # the run's overrides travel
    assert conf["storage"]["root"] == "s3://forge-artifacts/forge" and conf["storage"]["conn_id"] is None
    assert conf["tracking"]["tracking_uri"] == "http://mlflow:5000"
    assert c.resources.limits == {"nvidia.com/gpu": str(gpus)}
    assert c.resources.requests == {"cpu": "16", "memory": "128Gi"}
    assert pod.spec.node_selector == {"pool": "ml", "gpu.example/type": "h100"}
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert (pod.metadata.namespace, pod.spec.service_account_name) == ("ml", "forge-runner")
    assert [s.name for s in pod.spec.image_pull_secrets] == ["regcred"]
    assert pod.spec.restart_policy == "Never"
    assert {m.mount_path for m in c.volume_mounts} == {"/dev/shm"}  # NCCL / DataLoader shared memory

    env = env_of(pod)
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin chooses the pod's GPUs
    assert (env["FORGE_GPUS"].value, env["FORGE_LAUNCHER"].value) == (str(gpus), "accelerate")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[var].value_from.secret_key_ref
        assert (env[var].value, ref.name, ref.key) == (None, "forge-store", var)
    assert env["HF_TOKEN"].value_from.secret_key_ref.name == "forge-hub"
    assert [s.secret_ref.name for s in c.env_from] == ["forge-mlflow"]
    # every credential-named variable is a reference; the plain ones are settings
    for e in c.env:
        if e.value is not None:
            assert e.name in {"FORGE_GPUS", "FORGE_LAUNCHER", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"}
        else:
            assert e.value_from.secret_key_ref is not None
    assert_no_secret_anywhere(pod)


def test_cpu_phase_gets_no_gpu_and_only_its_own_teacher_keys(secrets_in_env: None) -> None:
    cfg = production()
    pod = render_pod(request_for("3B", cfg))  # code's tier 1: qwen-coder on dashscope
    (c,) = pod.spec.containers
    assert c.resources.limits is None and c.resources.requests == {"cpu": "2", "memory": "8Gi"}
    assert pod.spec.node_selector == {"pool": "ml"} and pod.spec.tolerations is None
    assert not c.volume_mounts
    env = env_of(pod)
    assert "FORGE_GPUS" not in env
    from operators.hooks.teachers import phase_teachers

    wanted = {t.key_env for t in phase_teachers(cfg, forge.phases.get_phase("3B", cfg)) if not t.is_local}
    teacher_refs = {n for n, e in env.items()
                    if e.value_from and e.value_from.secret_key_ref.name == "forge-teachers"}
    assert "DASHSCOPE_API_KEY" in teacher_refs and teacher_refs == wanted
    assert all(env[n].value_from.secret_key_ref.key == n for n in teacher_refs)
    plain = render_pod(request_for("prep_data", cfg))
    assert not {n for n, e in env_of(plain).items() if e.value_from
                and e.value_from.secret_key_ref.name == "forge-teachers"}  # no teachers, no teacher keys
    assert plain.spec.containers[0].resources.limits is None
    assert_no_secret_anywhere(pod)
    assert_no_secret_anywhere(plain)


def test_a_secret_value_never_reaches_the_spec(secrets_in_env: None) -> None:
    cfg = production()
    with pytest.raises(RuntimeSetupError, match="look like credentials"):  # by name
        render_pod(request_for("1A", cfg, env={"OPENAI_API_KEY": FAKE_SECRETS["OPENAI_API_KEY"]}), gpus=1)
    with pytest.raises(RuntimeSetupError, match=r"value of \['AWS_SECRET_ACCESS_KEY'"):  # by value
        render_pod(request_for("1A", cfg, env={"NOTE": FAKE_SECRETS["AWS_SECRET_ACCESS_KEY"]}), gpus=1)
    leaky = with_runtime(load_config(profile="production", overrides={
        **REMOTE, "tracking": {"tracking_uri": "http://forge:pw-in-url@mlflow:5000"}}),
        {"backend": "kubernetes"})
    with pytest.raises(RuntimeSetupError, match="tracking.tracking_uri carries a password"):
        render_pod(request_for("1A", leaky), gpus=1)
    with pytest.raises(ValueError, match="HF_TOKEN looks like a credential"):
        KubernetesConfig(env={"HF_TOKEN": "x"})


def test_pod_needs_a_shared_store_and_tracking_server() -> None:
    local = with_runtime(load_config(profile="demo"), {"backend": "kubernetes"})
    with pytest.raises(RuntimeSetupError, match="storage.root s3://"):
        render_pod(request_for("prep_data", local))


def test_the_provider_builds_the_same_pod(secrets_in_env: None) -> None:
    """KubernetesPodOperator's own request builder (dry run: no API) keeps our spec and adds only labels."""
    cfg = production()
    runtime = KubernetesRuntime(cfg.runtime, gpus=4)
    ours = render_pod(request_for("3G", cfg), cfg.runtime, gpus=4)
    built = runtime.pod_operator(ours).build_pod_request_obj(None, dry_run=True)
    (c,) = built.spec.containers
    assert (c.name, c.image, c.args) == ("base", ours.spec.containers[0].image, ours.spec.containers[0].args)
    assert c.resources.limits == {"nvidia.com/gpu": "4"}
    assert [e.to_dict() for e in c.env] == [e.to_dict() for e in ours.spec.containers[0].env]
    assert built.spec.node_selector == ours.spec.node_selector
    assert built.metadata.name.startswith("forge-3g-") and built.metadata.namespace == "ml"
    assert built.metadata.labels["forge/phase"] == "3G"
    assert_no_secret_anywhere(built)


# ---- the backend is chosen by config ---------------------------------------------------------------------
def test_backend_is_picked_by_config() -> None:
    local = with_runtime(load_config(profile="demo"), {"backend": "local"})
    on_k8s = production()
    cpu, gpu = ForgeJobOperator(phase_id="prep_data"), ForgeGPUJobOperator(phase_id="3G", gpus=2)
    venv = ForgeJobOperator(phase_id="prep_data", task_id="v", runtime="venv:axolotl")
    assert isinstance(cpu.select_runtime(local, {}), InProcessRuntime)
    assert isinstance(venv.select_runtime(local, {}), VenvRuntime)
    picked = gpu.select_runtime(on_k8s, {"ti": "ctx"})
    assert isinstance(picked, KubernetesRuntime)
    assert (picked.gpus, picked.context, gpu.pool_slots) == (2, {"ti": "ctx"}, 2)  # GPU limit = pool slots
    assert isinstance(venv.select_runtime(on_k8s, {}), KubernetesRuntime)  # config wins over local runtimes
    assert cpu.select_runtime(on_k8s, {}).gpus == 0


def test_gpu_count_comes_from_the_deployment_profile_and_is_the_pool_slots(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import operators.gpu_job as gpu_job

    monkeypatch.setattr(gpu_job, "deployment_runtime", lambda: RuntimeConfig(gpus={"G": 4, "1A": 2}))
    g, base = ForgeGPUJobOperator(phase_id="3G"), ForgeGPUJobOperator(phase_id="1A")
    assert (g.gpus, g.pool_slots, g.pool, g.queue) == (4, 4, "gpu", "gpu")
    assert (base.gpus, base.pool_slots) == (2, 2)
    assert g.runtime_env(RuntimeConfig(gpus={"G": 4}, launcher="torchrun")) == {
        "FORGE_GPUS": "4", "FORGE_LAUNCHER": "torchrun"}
    assert ForgeGPUJobOperator(phase_id="2A").runtime_env(RuntimeConfig()) == {}  # 1 GPU: nothing to launch
    with pytest.raises(ValueError, match="pool_slots=1 must equal"):
        ForgeGPUJobOperator(phase_id="3G", task_id="x", pool_slots=1)
    # on Kubernetes the task only launches a pod: the pool (GPU budget) stays, the gpu queue goes
    monkeypatch.setattr(gpu_job, "deployment_runtime", lambda: RuntimeConfig(backend="kubernetes"))
    k = ForgeGPUJobOperator(phase_id="3G", task_id="k")
    assert (k.pool, k.pool_slots) == ("gpu", 1) and k.queue != "gpu"


def test_the_deployment_runtime_is_read_again_when_the_config_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import yaml

    from forge.config import DEFAULT_CONFIG_PATH
    from operators.runtimes import deployment_runtime

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    path = tmp_path / "pipeline.yaml"

    def write(gpus: int, mtime_ns: int) -> None:
        raw["profiles"]["production"]["runtime"]["gpus"] = {"G": gpus}
        path.write_text(yaml.safe_dump(raw))
        os.utime(path, ns=(mtime_ns, mtime_ns))  # distinct stamps, however coarse the file system's clock

    monkeypatch.setenv("FORGE_CONFIG", str(path))
    monkeypatch.setenv("FORGE_PROFILE", "production")
    write(4, 1_000_000_000)
    assert deployment_runtime().gpus_for("G") == 4
    write(8, 2_000_000_000)
    assert deployment_runtime().gpus_for("G") == 8


# ---- the operator end to end, the pod faked at the Kubernetes API ------------------------------------
def _write(ctx: JobContext) -> JobResult:
    (ctx.out_dir / "out.json").write_text(json.dumps({"steps": ctx.config.train.max_steps}))
    return JobResult(metrics={"steps": float(ctx.config.train.max_steps)})


class FakePodOperator:
    """Stands in for KubernetesPodOperator: 'runs' the container by calling forge's CLI with its args and
    plain env (what the image's entrypoint would exec), and reports a failure as the provider does."""

    pods: list[k8s.V1Pod] = []

    def __init__(self, pod: k8s.V1Pod) -> None:
        self.pod, self.remote_pod = pod, None
        FakePodOperator.pods.append(pod)

    def execute_sync(self, context: Any) -> None:
        from forge.__main__ import main

        (c,) = self.pod.spec.containers
        assert c.args[:3] == ["python", "-m", "forge"]
        with patched_environ({e.name: e.value for e in c.env if e.value is not None}):
            rc = main(c.args[3:])
        if rc:
            term = k8s.V1ContainerStateTerminated(exit_code=rc)
            status = k8s.V1ContainerStatus(name="base", image=c.image, image_id="", ready=False,
                                           restart_count=0, state=k8s.V1ContainerState(terminated=term))
            self.remote_pod = k8s.V1Pod(status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]))
            raise RuntimeError(f"Pod {self.pod.metadata.name} returned a failure.")

    def on_kill(self) -> None:
        pass


def test_operator_runs_the_phase_as_a_pod_and_reads_its_manifest(
        forge_home: Path, monkeypatch: pytest.MonkeyPatch, secrets_in_env: None) -> None:
    fake = Phase("XK", "xk_gpu", "fake", "GPU", f"{__name__}:_write", (), ("train",), gpu=True)
    monkeypatch.setattr(forge.phases, "BY_ID", {**forge.phases.BY_ID, "XK": fake})
    monkeypatch.setattr(kube_rt, "_check_remote", lambda request: None)  # a local store stands in for S3
    monkeypatch.setattr(KubernetesRuntime, "pod_operator", lambda self, pod: FakePodOperator(pod))
    FakePodOperator.pods.clear()
    cfg = with_runtime(load_config(profile="demo"), {"backend": "kubernetes", "kubernetes": KUBE})
    op = ForgeGPUJobOperator(phase_id="XK", gpus=2, track=False)
    monkeypatch.setattr(op, "build_config", lambda context: (cfg, {"train": {"max_steps": 3}}))
    context = {"run_id": "manual__k8s", "params": {}, "dag_run": SimpleNamespace(conf={})}
    summary = op.execute(context)
    assert summary["status"] == "complete" and summary["uri"].endswith("/runs/manual__k8s/XK")
    manifest = make_store(load_config(profile="demo")).run_manifest("manual__k8s", "XK")
    assert manifest is not None and manifest.cache_key == summary["cache_key"]
    (pod,) = FakePodOperator.pods
    assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "2"}
    assert "--no-track" in pod.spec.containers[0].args
    assert_no_secret_anywhere(pod)
    # the CLI in the pod rejects the config (exit code 2): the task fails without retry, like the venv runtime
    monkeypatch.setattr(op, "build_config", lambda context: (cfg, {"train": {"max_stepz": 3}}))
    with pytest.raises(AirflowFailException, match="exit code 2"):
        op.execute({**context, "run_id": "manual__k8s2"})
