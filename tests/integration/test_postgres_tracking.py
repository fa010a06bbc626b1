"""Production-like tracking: MLflow's backend on the loopback PostgreSQL (as in docker-compose)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import forge.phases
from forge.config import load_config
from forge.runner import run_phase
from tests.fake_jobs import FAKE_PHASES

PG = "postgresql://postgres@127.0.0.1:5432"
PG_SQLALCHEMY = "postgresql+psycopg2://postgres@127.0.0.1:5432"


@pytest.fixture
def pg_database():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(f"{PG}/postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:  # CI starts PostgreSQL; a laptop may not have it
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    admin.autocommit = True
    name = f"forge_mlflow_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"{PG_SQLALCHEMY}/{name}"
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


@pytest.mark.services
def test_runs_and_registry_on_postgres(forge_home: Path, pg_database: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(forge.phases, "BY_ID", {p.id: p for p in FAKE_PHASES})
    monkeypatch.setattr(forge.phases, "PHASES", FAKE_PHASES)
    monkeypatch.setattr(forge.phases, "_default_catalog", dict)  # no modifier TaskGroups
    cfg = load_config(profile="demo", overrides={"tracking": {"tracking_uri": pg_database}})
    run_phase("fa", cfg, "pg-run", track=True)
    run_phase("fb", cfg, "pg-run", track=True)
    client = MlflowClient(pg_database)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`forge.run_id` = 'pg-run'")
    kinds = sorted(r.data.tags["forge.kind"] for r in runs)
    assert kinds == ["phase", "phase", "pipeline"]
    mv = client.get_model_version_by_alias(cfg.tracking.registered_model, "challenger")
    assert mv.source.endswith("runs/pg-run/fb/sum.txt")
