"""The operators: trigger form -> config, config errors, skip, runtimes, GPU placement, MLflow link.

Phases here are fakes registered in forge.phases for the test; their jobs are below.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.airflow_env import REPO, configure

configure()

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException  # noqa: E402

import forge.phases  # noqa: E402
from forge.config import ConfigError, StorageConfig, load_config  # noqa: E402
from forge.ledger import read_rows  # noqa: E402
from forge.phases import Phase  # noqa: E402
from forge.runner import JobContext, JobResult, make_store  # noqa: E402
from operators.forge_job import ForgeJobOperator  # noqa: E402
from operators.gpu_job import ForgeGPUJobOperator  # noqa: E402
from operators.hooks.storage import ArtifactStoreHook  # noqa: E402
from operators.links import mlflow as mlflow_link  # noqa: E402
from operators.trigger_form import config_request, trigger_params  # noqa: E402

CALLS: list[dict[str, Any]] = []
REAL_BY_ID = dict(forge.phases.BY_ID)


def write_job(ctx: JobContext) -> JobResult:
    CALLS.append({"phase": ctx.phase.id, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "steps": ctx.config.train.max_steps})
    (ctx.out_dir / "out.json").write_text(json.dumps({"steps": ctx.config.train.max_steps}))
    return JobResult(metrics={"steps": float(ctx.config.train.max_steps)}, quality={"acc": 0.5})


def _never_run(cfg) -> str:
    return "nothing to do in this test"


FAKES = (
    Phase("X1", "x1_write", "fake", "Write", f"{__name__}:write_job", (), ("train",)),
    Phase("X2", "x2_skip", "fake", "Skip", f"{__name__}:write_job", ("X1",), ("train",), skip=_never_run),
    Phase("XG", "xg_gpu", "fake", "GPU", f"{__name__}:write_job", (), ("train",), gpu=True),
)


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch: pytest.MonkeyPatch, forge_home: Path) -> None:
    monkeypatch.setattr(forge.phases, "BY_ID", {p.id: p for p in FAKES})
    monkeypatch.setattr(forge.phases, "PHASES", FAKES)
    monkeypatch.setattr(forge.phases, "_default_catalog", dict)  # no modifier TaskGroups
    CALLS.clear()


def context(params: dict | None = None, conf: dict | None = None, run_id: str = "manual__2026-01-01") -> dict:
    form = {"profile": "demo", "base_model": "", "domains": ["general", "code"], "datasets": [],
            "overrides": {}}
    return {"params": {**form, **(params or {})}, "dag_run": SimpleNamespace(conf=conf or {}),
            "run_id": run_id}


# ---- trigger form -> config -------------------------------------------------------------------
def test_form_fields_map_onto_config_and_overrides_win() -> None:
    params = {"profile": "production", "base_model": "my-org/my-model", "domains": ["code"],
              "datasets": [{"uri": "s3://b/chat.jsonl", "domain": "code"}],
              "overrides": {"train": {"max_steps": 7}, "domains": ["reasoning"]}}
    profile, overrides = config_request(params, {"eval": {"max_new_tokens": 9}})
    assert profile == "production"
    assert overrides == {"model": {"base": "my-org/my-model"}, "domains": ["reasoning"],
                         "data": {"datasets": [{"uri": "s3://b/chat.jsonl", "domain": "code"}]},
                         "train": {"max_steps": 7}, "eval": {"max_new_tokens": 9}}
    cfg = load_config(profile=profile, overrides=overrides)
    assert (cfg.model.base, cfg.domains, cfg.train.max_steps) == ("my-org/my-model", ["reasoning"], 7)
    assert cfg.train.lora_r == 64  # the production profile underneath


def test_empty_form_fields_keep_the_profile() -> None:
    profile, overrides = config_request({"profile": "demo", "base_model": "", "datasets": [],
                                         "domains": [], "overrides": {}}, None)
    assert (profile, overrides) == ("demo", {})


def test_trigger_form_defaults_build_a_valid_config() -> None:
    defaults = {name: p.value for name, p in trigger_params().items()}
    profile, overrides = config_request(defaults, None)
    cfg = load_config(profile=profile, overrides=overrides)
    assert cfg.profile == "demo" and cfg.model.base == "demo"


def test_operator_builds_config_from_params_and_conf() -> None:
    op = ForgeJobOperator(phase_id="X1", task_id="t")
    cfg, _ = op.build_config(context({"overrides": {"train": {"max_steps": 3}}}, conf={"data": {"seed": 5}}))
    assert (cfg.train.max_steps, cfg.data.seed, cfg.domains) == (3, 5, ["general", "code"])


@pytest.mark.parametrize(("overrides", "field"), [
    ({"train": {"max_stepz": 3}}, "train.max_stepz"),
    ({"train": {"max_steps": "many"}}, "train.max_steps"),
    ({"model": {"demo": {"hidden_size": 300}}}, "model.demo.hidden_size"),
])
def test_config_error_fails_the_task_naming_the_field_before_any_work(overrides: dict, field: str) -> None:
    op = ForgeJobOperator(phase_id="X1", task_id="t")
    with pytest.raises(AirflowFailException, match=field.replace(".", r"\.")):
        op.execute(context({"overrides": overrides}))
    assert CALLS == []


def test_unknown_profile_and_domain_fail_naming_the_field() -> None:
    op = ForgeJobOperator(phase_id="X1", task_id="t")
    with pytest.raises(AirflowFailException, match="profile"):
        op.execute(context({"profile": "nope"}))
    with pytest.raises(AirflowFailException, match="domains"):
        op.execute(context({"domains": ["poetry"]}))


def test_unknown_phase_or_runtime_fails_at_parse_time() -> None:
    with pytest.raises(KeyError, match="unknown phase"):
        ForgeJobOperator(phase_id="42Z")
    with pytest.raises(ValueError, match="unknown runtime"):
        ForgeJobOperator(phase_id="X1", runtime="docker")


# ---- running, skipping, XCom summary ----------------------------------------------------------
def test_execute_runs_the_job_and_returns_the_manifest_summary(forge_home: Path) -> None:
    op = ForgeJobOperator(phase_id="X1", track=False)
    assert (op.task_id, op.retries) == ("x1_write", 0)
    summary = op.execute(context({"overrides": {"train": {"max_steps": 4}}}))
    assert summary["phase"] == "X1" and summary["status"] == "complete"
    assert summary["uri"].endswith("/runs/manual__2026-01-01/X1")
    assert len(summary["cache_key"]) == 64 and summary["cached_from_run"] is None
    assert CALLS == [{"phase": "X1", "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "steps": 4}]
    json.dumps(summary)  # XCom-able
    # the same inputs in another DAG run: a cache hit pointing at the first run's files
    again = op.execute(context({"overrides": {"train": {"max_steps": 4}}}, run_id="manual__2"))
    assert len(CALLS) == 1
    assert again["uri"] == summary["uri"] and again["cached_from_run"] == "manual__2026-01-01"


def test_skipped_phase_raises_skip_with_the_reason(forge_home: Path) -> None:
    ctx = context()
    ForgeJobOperator(phase_id="X1", track=False).execute(ctx)
    skipper = ForgeJobOperator(phase_id="X2", track=False)
    with pytest.raises(AirflowSkipException, match="X2 skipped: nothing to do in this test"):
        skipper.execute(ctx)
    assert CALLS == [CALLS[0]] and CALLS[0]["phase"] == "X1"  # the skipped job never ran
    assert skipper.forge_summary["status"] == "skipped"
    assert skipper.forge_summary["skip_reason"] == "nothing to do in this test"
    rows = read_rows(make_store(load_config(profile="demo")), ctx["run_id"])
    assert [(r["phase"], r["status"]) for r in rows] == [("X1", "complete"), ("X2", "skipped")]


# ---- GPU operator --------------------------------------------------------------------------------
def test_gpu_operator_takes_pool_slots_and_sets_visible_devices(forge_home: Path) -> None:
    op = ForgeGPUJobOperator(phase_id="XG", devices=[2, 3], track=False)
    assert (op.pool, op.pool_slots, op.queue) == ("gpu", 2, "gpu")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    op.execute(context())
    assert CALLS[-1]["cuda"] == "2,3"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # restored for the task process
    plain = ForgeGPUJobOperator(phase_id="XG", task_id="g1")
    assert (plain.pool_slots, plain.job_env()) == (1, {})  # the worker's devices, untouched
    with pytest.raises(ValueError, match="do not match"):
        ForgeGPUJobOperator(phase_id="XG", task_id="g2", gpus=1, devices="0,1")


# ---- venv runtime ------------------------------------------------------------------------------
def test_venv_runtime_without_interpreter_fails_naming_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_RUNTIME_AXOLOTL", raising=False)
    op = ForgeJobOperator(phase_id="X1", task_id="t", runtime="venv:axolotl", track=False)
    with pytest.raises(AirflowFailException, match="FORGE_RUNTIME_AXOLOTL"):
        op.execute(context())
    monkeypatch.setenv("FORGE_RUNTIME_AXOLOTL", "/nonexistent/bin/python")
    with pytest.raises(AirflowFailException, match="not an executable"):
        op.execute(context())


def test_venv_runtime_runs_forge_cli_in_another_interpreter(forge_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The real CLI in a child interpreter on a real phase (prep_data, tiny sizes); the child
    # sees the real registry, so the parent uses it too.
    monkeypatch.setattr(forge.phases, "BY_ID", REAL_BY_ID)
    monkeypatch.setenv("FORGE_RUNTIME_MAIN", sys.executable)
    op = ForgeJobOperator(phase_id="prep_data", runtime="venv:main", track=False)
    summary = op.execute(context({"overrides": {"data": {"suites": {"train": 8, "dev": 4, "heldout": 4,
                                                                     "pretrain": 8}}}}))
    assert summary["phase"] == "prep_data" and summary["status"] == "complete"
    manifest = make_store(load_config(profile="demo")).run_manifest("manual__2026-01-01", "prep_data")
    assert manifest is not None and "train.jsonl" in manifest.files
    assert summary["cache_key"] == manifest.cache_key


# ---- storage credentials -------------------------------------------------------------------------
def test_storage_hook_reads_the_connection_and_never_prints_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_FORGE_S3", json.dumps({
        "conn_type": "aws", "login": "AKIAEXAMPLE", "password": "s3cr3t-value",
        "extra": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}))
    creds = ArtifactStoreHook(StorageConfig(root="s3://bucket/forge", conn_id="forge_s3")).get_credentials()
    assert creds.storage_options == {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value",
                                     "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                                       "region_name": "eu-west-1"}}
    assert creds.env["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"
    assert creds.env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert creds.env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "s3cr3t" not in repr(creds) and "s3cr3t" not in str(creds)


def test_storage_hook_falls_back_to_env_and_config_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    creds = ArtifactStoreHook(StorageConfig(root="s3://b", endpoint_url="http://minio:9000")).get_credentials()
    assert creds.source == "environment"
    assert creds.storage_options == {"key": "envkey", "secret": "envsecret",
                                     "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    local = ArtifactStoreHook(StorageConfig(root="file:///tmp/x")).get_credentials()
    assert (local.storage_options, local.env) == ({}, {})


# ---- MLflow link ----------------------------------------------------------------------------------
def test_summary_carries_the_mlflow_run_url_and_the_link_returns_it(
        forge_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_MLFLOW_UI_URL", "http://mlflow.example:5000/")
    summary = ForgeJobOperator(phase_id="X1").execute(context())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=load_config(profile="demo").tracking.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert summary["mlflow_url"] == (f"http://mlflow.example:5000/#/experiments/{run.info.experiment_id}"
                                     f"/runs/{run.info.run_id}")
    assert run.data.tags["mlflow.parentRunId"]  # nested under the DAG run's parent run

    seen: dict[str, Any] = {}

    def fake_get_value(*, ti_key: Any, key: str) -> Any:
        seen.update(ti_key=ti_key, key=key)
        return summary

    from airflow.sdk.execution_time import xcom

    monkeypatch.setattr(xcom.XCom, "get_value", fake_get_value)
    link = mlflow_link.MlflowRunLink()
    ti_key = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1)
    assert link.name == "MLflow run"
    assert link.get_link(ForgeJobOperator(phase_id="X1", task_id="t"), ti_key=ti_key) == summary["mlflow_url"]
    assert seen == {"ti_key": ti_key, "key": "return_value"}
    assert mlflow_link.link_from_summary(None) == ""  # failed task: no button target
    # on the worker the link reads the executing operator itself (no XCom round trip)
    executed = ForgeJobOperator(phase_id="X1", task_id="t2")
    executed.forge_summary = {"mlflow_url": "http://mlflow.example:5000/#/experiments/1/runs/abc"}
    seen.clear()
    assert link.get_link(executed, ti_key=ti_key).endswith("/runs/abc") and seen == {}
    assert any(isinstance(x, mlflow_link.MlflowRunLink) for x in ForgeJobOperator.operator_extra_links)


# ---- modifiers form field and teacher keys -----------------------------------------------------------
def test_modifiers_form_field_enables_domains_and_a_conf_dict_overrides_the_section() -> None:
    profile, overrides = config_request({"profile": "demo", "modifiers": ["code", "math"]}, None)
    cfg = load_config(profile=profile, overrides=overrides)
    assert cfg.modifiers.enabled == ["code", "math"]
    _, overrides = config_request({"profile": "demo", "modifiers": []}, None)
    assert load_config(profile="demo", overrides=overrides).modifiers.enabled == []  # none this run
    _, overrides = config_request({"modifiers": ["code"]}, {"modifiers": {"min_train_rows": 3}})
    assert overrides["modifiers"] == {"min_train_rows": 3}  # a REST conf's section wins over the form
    with pytest.raises(ConfigError, match="modifiers: a list"):
        config_request({"modifiers": "code"}, None)
    with pytest.raises(ConfigError, match=r"enabled: unknown domain\(s\) \['poetry'\]"):
        load_config(profile="demo", overrides={"modifiers": {"enabled": ["poetry"]}})


def test_teacher_keys_come_from_connections_and_only_for_the_phase_teachers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from forge.phases import get_phase, modifier_phases
    from operators.hooks.teachers import TeacherKeysHook

    for conn, key in (("DASHSCOPE", "qk-1"), ("DEEPSEEK", "dk-2")):
        conn_json = json.dumps({"conn_type": "generic", "password": key})
        monkeypatch.setenv(f"AIRFLOW_CONN_FORGE_{conn}", conn_json)
    monkeypatch.setenv("OPENAI_API_KEY", "already-set")  # a key in the worker's env wins
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    cfg = load_config(profile="production")
    code = {p.step: p for p in modifier_phases("code", cfg.modifiers.domains["code"])}
    # code's tiers: qwen-coder (dashscope) -> deepseek -> gpt-5 (openai, key already in env)
    assert TeacherKeysHook(cfg, code["B"]).key_env() == {"DASHSCOPE_API_KEY": "qk-1",
                                                         "DEEPSEEK_API_KEY": "dk-2"}
    assert TeacherKeysHook(cfg, code["F"]).key_env() == {}  # rendering YAML calls no teacher
    assert TeacherKeysHook(cfg, get_phase("X1", cfg)).key_env() == {}  # a phase without teachers
    monkeypatch.setenv("AIRFLOW_CONN_FORGE_DASHSCOPE", json.dumps({"conn_type": "generic"}))
    with pytest.raises(ValueError, match="'forge_dashscope' has no password"):
        TeacherKeysHook(cfg, code["B"]).key_env()


PRELOAD_CHECK = """
import sys
from airflow.executors.executor_loader import ExecutorLoader
from operators.executors.preloaded_local import PRELOAD
name = ExecutorLoader.get_executor_names()[0]  # what AIRFLOW__CORE__EXECUTOR (the stack's) names
executor = ExecutorLoader.import_executor_cls(name)[0](parallelism=2)
before = [m for m in PRELOAD if m in sys.modules]
executor.start()
try:
    print("PRELOAD", before, [m for m in PRELOAD if m not in sys.modules], len(executor.workers), flush=True)
finally:
    executor.end()
"""


def test_the_stacks_executor_imports_forges_modules_before_forking_its_workers(tmp_path: Path) -> None:
    import re
    import subprocess

    stack = (REPO / "scripts" / "stack.sh").read_text()
    executor = re.search(r'\[AIRFLOW__CORE__EXECUTOR\]="([^"]+)"', stack).group(1)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__EXECUTOR": executor,
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PRELOAD_CHECK], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # none loaded by the executor's import; all of them loaded when the 2 workers (and their tasks) fork
    assert [line for line in out.stdout.splitlines() if line.startswith("PRELOAD")] == ["PRELOAD [] [] 2"]
