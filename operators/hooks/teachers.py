"""Teacher API keys: Airflow connections -> the env vars the job's teacher client reads.

A teacher names `conn_id` (an Airflow connection whose password is the key) and/or `api_key_env`. The job
(forge/) only reads env (TeacherConfig.key_env), so for each remote teacher the phase uses this hook exports
the connection's password under that name. A key already in the worker's env wins (set by the deployment),
and nothing here is logged but the names.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook

from forge.config import PipelineConfig
from forge.modifiers.teacher_config import TeacherConfig
from forge.phases import Phase


def phase_teachers(cfg: PipelineConfig, phase: Phase) -> list[TeacherConfig]:
    """The teachers a phase may call: those of every `teachers:<domain>` section it hashes (tiers + judge)."""
    seen: dict[str, TeacherConfig] = {}
    for section in phase.sections:
        if section.startswith("teachers:"):
            for name in cfg.section(section)["teachers"]:
                seen[name] = cfg.teachers.teachers[name]
    return list(seen.values())


class TeacherKeysHook(BaseHook):
    """Env vars holding the API keys of a phase's remote teachers, read from their Airflow connections."""

    conn_name_attr = "conn_id"
    conn_type = "generic"
    hook_name = "Forge teacher API key"

    def __init__(self, cfg: PipelineConfig, phase: Phase, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg, self.phase = cfg, phase

    def key_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for teacher in phase_teachers(self.cfg, self.phase):
            var = teacher.key_env
            if teacher.is_local or not teacher.conn_id or not var or os.environ.get(var):
                continue
            password = self.get_connection(teacher.conn_id).password
            if not password:
                raise ValueError(f"teacher {teacher.name!r}: Airflow connection {teacher.conn_id!r} has no "
                                 f"password (the API key goes there), and {var} is not set either")
            env[var] = password
        return env
