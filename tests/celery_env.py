"""A real distributed Airflow on loopback for tests/integration/test_celery_distributed.py.

PostgreSQL as the metadata DB (a fresh database per run), CeleryExecutor with Redis as the broker (a fresh
key prefix per run) and the DB as result backend, and these processes of the venv's `airflow` CLI, each in
its own session so that stopping it reaches every process it forked (Celery pool children, task runners):
api-server (also the task execution API the workers' tasks talk to), scheduler, dag-processor and one
Celery worker per queue.

Airflow components import `worker_hostname` below (`[core] hostname_callable`), so this module must stay
light: nothing from airflow, forge or pytest at import time.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 0
WORKER_NAME_ENV = "FORGE_WORKER_NAME"


def worker_hostname() -> str:
    """`[core] hostname_callable` of the stack: the hostname a task instance records is the name of the
    worker that ran it (FORGE_WORKER_NAME, set per Celery worker), not the machine's (which both share)."""
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the loopback services ---------------------------------------------------------------------------
def services_unreachable() -> str | None:
    """Why PostgreSQL or Redis cannot be used (None: both answer)."""
    import psycopg2
    import redis

    try:
        pg_admin(connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        return f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}: {exc}".strip()
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis not reachable on {REDIS_HOST}:{REDIS_PORT}: {exc}"
    return None


def require_services() -> None:
    """When PostgreSQL or Redis is down: fail in CI (.ci/run starts both), else skip, saying why."""
    import pytest

    reason = services_unreachable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (in CI)")
        pytest.skip(reason)


def pg_admin(connect_timeout: int = 5):
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                            connect_timeout=connect_timeout)
    conn.autocommit = True
    return conn


def create_database(prefix: str = "forge_celery") -> str:
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = pg_admin()  # not `with conn`: psycopg2 2.9 opens a transaction there, even in autocommit
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return name


def drop_database(name: str) -> None:
    conn = pg_admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


def redis_keys(prefix: str) -> list[bytes]:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=5)
    try:
        return list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()


def drop_redis_prefix(prefix: str) -> int:
    import redis

    keys = redis_keys(prefix)
    if keys:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=5)
        client.unlink(*keys)
        client.close()
    return len(keys)


# ---- processes -----------------------------------------------------------------------------------------
def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (task runners get process groups of their own: a process-group
    kill would miss them; the session holds them all)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text[-lines:])


@dataclass
class CeleryStack:
    """One run's stack. `start()` migrates and launches; `stop()` ends every process and drops the DB and
    the Redis keys, whatever state start() reached."""

    home: Path  # FORGE_HOME; AIRFLOW_HOME, logs and the dags folder live under it
    dag_file_text: str
    workers: dict[str, str]  # worker name -> the Celery queue it listens on
    base_env: dict[str, str]
    db: str | None = None
    redis_prefix: str = field(default_factory=lambda: f"forge-celery-{os.getpid()}-{uuid.uuid4().hex[:8]}:")
    api_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def sql_alchemy_conn(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db}"

    def build_env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.api_port}"
        dags = self.home / "dags"
        env = dict(self.base_env)
        env.update({
            "FORGE_HOME": str(self.home),
            "AIRFLOW_HOME": str(self.airflow_home),
            "PYTHONPATH": str(REPO),  # `forge`, `operators` and this module (the hostname callable)
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            **self.async_conn_env(),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
            # every key (queues, unacked, pidbox, events) of this run's broker under its own prefix
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.celery_env.worker_hostname",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            # every component signs / verifies the task tokens and log requests with the same secrets
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        })
        return env

    @staticmethod
    def async_conn_env() -> dict[str, str]:
        """Airflow 3 also opens an async engine on the metadata DB at import, derived from sql_alchemy_conn:
        postgresql+asyncpg. Without asyncpg every `airflow` command dies at import (ModuleNotFoundError).
        Nothing this stack runs uses that engine in 3.3 (the REST API's async sessions serve multi-team and
        asset-state endpoints only), so where asyncpg is missing an empty sql_alchemy_conn_async turns it
        off; with asyncpg (the apache/airflow image has it) the stack runs as in production."""
        import importlib.util

        if importlib.util.find_spec("asyncpg"):
            return {}
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": ""}

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 300) -> None:
        started = time.monotonic()
        for d in (self.airflow_home, self.logs, self.home / "dags"):
            d.mkdir(parents=True, exist_ok=True)
        (self.home / "dags" / "forge_slice.py").write_text(self.dag_file_text)
        self.db = create_database()
        self.env = self.build_env()
        self.check_celery_executor()
        self.cli("db", "migrate", timeout=600, check=True)
        self.cli("pools", "set", "gpu", "1", "GPU slots", check=True)
        self.timings["migrate"] = time.monotonic() - started
        self.launch("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
                    "--workers", "1")
        self.launch("scheduler", "scheduler")
        self.launch("dag-processor", "dag-processor")
        for name, queue in self.workers.items():
            # serve-logs on a port of its own (the default, 8793, is one per machine)
            self.launch(name, "celery", "worker", "--queues", queue, "--celery-hostname", f"{name}@%h",
                        "--concurrency", "1",
                        env={WORKER_NAME_ENV: name,
                             "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        self.wait_for("the api-server's health report",
                      self.healthy, timeout_s)
        for name in self.workers:
            self.wait_for(f"Celery worker {name} ready",
                          lambda n=name: "ready." in self.service(n).log.read_text(errors="replace"),
                          timeout_s)
        self.timings["start"] = time.monotonic() - started

    def check_celery_executor(self) -> None:
        """Fail first, and plainly, where the installed celery and the Celery provider do not fit together
        (celery 5.7 removed celery.backends.database.retry, which apache-airflow-providers-celery 3.26.0
        imports: every scheduler and worker would die at start with a long traceback)."""
        code = ("from importlib.metadata import version as v; "
                "print(f\"celery {v('celery')}, apache-airflow-providers-celery "
                "{v('apache-airflow-providers-celery')}\", flush=True); "
                "import airflow.providers.celery.executors.celery_executor_utils")
        out = subprocess.run([str(BIN / "python"), "-c", code], cwd=self.home, env=self.env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines() or ["?"]
            raise RuntimeError(f"the CeleryExecutor cannot load: {lines[-1]} ({out.stdout.strip()}); "
                               "requirements.txt must pin a celery that this provider supports")

    def stop(self) -> None:
        # workers first (no new task starts), then the scheduler, the dag-processor, the api-server last
        for service in reversed(self.services):
            self._signal(service, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for service in reversed(self.services):
            while session_pids(service.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if session_pids(service.proc.pid):
                print(f"celery stack: {service.name} did not stop in 30 s; killing it")
                self._signal(service, signal.SIGKILL)
            try:
                service.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.db is not None:
            drop_database(self.db)
        drop_redis_prefix(self.redis_prefix)

    @staticmethod
    def _signal(service: Service, sig: int) -> None:
        for pid in session_pids(service.proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def launch(self, name: str, *args: str, env: dict[str, str] | None = None) -> Service:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([str(BIN / "airflow"), *args], cwd=self.home,
                                    env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def cli(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "airflow"), *args], cwd=self.home, env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({out.returncode}):\n"
                               f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():
                    return
            except Exception:  # not up yet (connection refused, no log yet)
                pass
            dead = [s.name for s in self.services if not s.alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout_s:.0f}s")
            time.sleep(1)

    def healthy(self) -> bool:
        import urllib.request

        url = f"http://127.0.0.1:{self.api_port}/api/v2/monitor/health"
        with urllib.request.urlopen(url, timeout=5) as resp:
            health = json.load(resp)
        return all((health.get(part) or {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "dag_processor"))

    # ---- the metadata DB ------------------------------------------------------------------------------
    def query(self, sql: str, *params: Any) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.db, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def diagnostics(self, lines: int = 60) -> str:
        """The tails of every process's log and of every task log: what a CI failure is read from."""
        parts = []
        for s in self.services:
            status = "running" if s.alive() else f"exit {s.proc.returncode}"
            parts.append(f"---- {s.name} (pid {s.proc.pid}, {status}) {s.log}\n{s.tail(lines)}")
        for task_log in sorted((self.airflow_home / "logs").rglob("*.log")):
            text = task_log.read_text(errors="replace").splitlines()
            name = task_log.relative_to(self.airflow_home)
            parts.append(f"---- task log {name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)
