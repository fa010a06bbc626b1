"""The artifact store on s3:// against moto's S3 server on loopback (stands in for MinIO)."""

from __future__ import annotations

from pathlib import Path

import pytest

import forge.phases
from forge.artifacts import ArtifactError, ArtifactStore
from forge.config import load_config
from forge.modifiers.local_teachers import free_port
from forge.runner import run_phase
from tests.fake_jobs import FAKE_PHASES, calls


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import boto3

    # credentials come from the environment, never from the config
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "forge-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "forge-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"forge-{free_port()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forge.phases, "BY_ID", {p.id: p for p in FAKE_PHASES})
    monkeypatch.setattr(forge.phases, "PHASES", FAKE_PHASES)
    monkeypatch.setattr(forge.phases, "_default_catalog", dict)  # no modifier TaskGroups


def s3_cfg(bucket: str, endpoint: str, **over):
    return load_config(profile="demo", overrides={
        "storage": {"root": f"s3://{bucket}/forge", "endpoint_url": endpoint}, **over})


def test_run_phase_on_s3_commits_and_caches(forge_home: Path, bucket: str, s3_endpoint: str) -> None:
    import boto3

    cfg = s3_cfg(bucket, s3_endpoint)
    a = run_phase("fa", cfg, "s3run", track=False)
    b = run_phase("fb", cfg, "s3run", track=False)
    assert a.base_uri == f"s3://{bucket}/forge/runs/s3run/fa"
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=bucket)["Contents"]}
    assert {"forge/runs/s3run/fa/manifest.json", "forge/runs/s3run/fa/sub/note.txt",
            "forge/runs/s3run/fb/sum.txt", "forge/runs/s3run/ledger/fb.json"} <= keys
    assert b.metrics["sum"] == sum(range(cfg.data.seed % 50))
    again = run_phase("fa", cfg, "s3run-2", track=False)  # another run: cache hit, no recompute
    assert again.base_uri == a.base_uri and calls("produce") == 1


def test_s3_download_is_verified(forge_home: Path, bucket: str, s3_endpoint: str) -> None:
    import boto3

    cfg = s3_cfg(bucket, s3_endpoint)
    m = run_phase("fa", cfg, "verify", track=False)
    store = ArtifactStore(cfg.storage.root, {"client_kwargs": {"endpoint_url": s3_endpoint}},
                          local_cache=forge_home / "dl")
    local = store.materialize(m)
    assert (local / "sub/note.txt").read_text() == "hello"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key="forge/runs/verify/fa/sub/note.txt", Body=b"HELLO")  # tampered
    fresh = ArtifactStore(cfg.storage.root, {"client_kwargs": {"endpoint_url": s3_endpoint}},
                          local_cache=forge_home / "dl2")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        fresh.materialize(m)


def test_failed_job_on_s3_leaves_no_manifest(forge_home: Path, bucket: str, s3_endpoint: str) -> None:
    cfg = s3_cfg(bucket, s3_endpoint)
    run_phase("fa", cfg, "boom", track=False)
    with pytest.raises(RuntimeError):
        run_phase("fx", cfg, "boom", track=False)
    store = ArtifactStore(cfg.storage.root, {"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert store.run_manifest("boom", "fx") is None
