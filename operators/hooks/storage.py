"""Artifact-store credentials: an Airflow connection (or env vars) -> plain fsspec options + env.

The job (forge/) never sees Airflow: it receives `storage_options` for fsspec in-process, or
env vars (AWS_*) when it runs in another interpreter. Secrets are never logged: the
credentials object prints only where they came from and which keys are set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook

from forge.config import StorageConfig

ENV_KEY, ENV_SECRET, ENV_TOKEN = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"
ENV_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class StorageCredentials:
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec / s3fs kwargs
    env: dict[str, str] = field(default_factory=dict)  # the same, for a job in another process
    source: str = "none"

    def __repr__(self) -> str:  # never print secrets, only which fields are set
        return (f"StorageCredentials(source={self.source!r}, options={sorted(self.storage_options)}, "
                f"env={sorted(self.env)})")

    __str__ = __repr__


class ArtifactStoreHook(BaseHook):
    """Resolves the credentials of `storage.root` (s3://...) for a Forge job.

    Order: the Airflow connection `storage.conn_id` (type aws: login = access key id,
    password = secret key, extra {"endpoint_url": ..., "region_name": ...}), else the
    AWS_* env vars, else nothing (boto's default chain: instance role, ~/.aws).
    The endpoint: `storage.endpoint_url`, else the connection's, else AWS_ENDPOINT_URL[_S3].
    """

    conn_name_attr = "conn_id"
    conn_type = "aws"
    hook_name = "Forge artifact store"

    def __init__(self, storage: StorageConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage = storage

    def get_credentials(self) -> StorageCredentials:
        if not self.storage.root.startswith("s3://"):
            return StorageCredentials(source="local filesystem (no credentials)")
        key = secret = token = region = endpoint = None
        if self.storage.conn_id:
            conn = self.get_connection(self.storage.conn_id)
            extra = conn.extra_dejson or {}
            key, secret = conn.login or None, conn.password or None
            token = extra.get("aws_session_token")
            region = extra.get("region_name")
            endpoint = extra.get("endpoint_url") or (extra.get("service_config", {}).get("s3", {})
                                                     .get("endpoint_url"))
            source = f"connection {self.storage.conn_id!r}"
        else:
            key, secret, token = (os.environ.get(n) or None for n in (ENV_KEY, ENV_SECRET, ENV_TOKEN))
            source = "environment" if key else "default AWS credential chain"
        endpoint = self.storage.endpoint_url or endpoint or next(
            (os.environ[n] for n in ENV_ENDPOINTS if os.environ.get(n)), None)

        options: dict[str, Any] = {}
        env: dict[str, str] = {}
        if key and secret:
            options.update(key=key, secret=secret)
            env.update({ENV_KEY: key, ENV_SECRET: secret})
            if token:
                options["token"] = token
                env[ENV_TOKEN] = token
        client_kwargs = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", region)) if v}
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if endpoint:
            # s3fs/botocore read AWS_ENDPOINT_URL_S3; MLflow's S3 artifact client reads its own var
            env.update(AWS_ENDPOINT_URL_S3=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
        if region:
            env["AWS_DEFAULT_REGION"] = region
        creds = StorageCredentials(options, env, source)
        self.log.info("artifact store %s: credentials from %s", self.storage.root, creds.source)
        return creds
