"""The Hugging Face Hub token for 8A: the Airflow connection `hf_hub` (its password) -> the env var the job
reads (serving.hf_token_env, default HF_TOKEN). A token already in the worker's env wins; no connection and
no env var means 8A writes the release and its upload plan without uploading (the demo). Only names are
logged.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook

from forge.config import PipelineConfig
from forge.phases import Phase

HUB_CONN_ID = "hf_hub"
UPLOAD_PHASE = "8A"


class HubTokenHook(BaseHook):
    conn_name_attr = "conn_id"
    conn_type = "generic"
    hook_name = "Forge Hugging Face Hub token"

    def __init__(self, cfg: PipelineConfig, phase: Phase, conn_id: str = HUB_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg, self.phase, self.conn_id = cfg, phase, conn_id

    def token_env(self) -> dict[str, str]:
        var = self.cfg.serving.hf_token_env
        if self.phase.id != UPLOAD_PHASE or not self.cfg.serving.hub_repo or os.environ.get(var):
            return {}
        from airflow.exceptions import AirflowNotFoundException

        try:
            password = self.get_connection(self.conn_id).password
        except AirflowNotFoundException:
            self.log.info("no Airflow connection %r: 8A writes the release without uploading", self.conn_id)
            return {}
        return {var: password} if password else {}
