"""The trigger form of a Forge DAG (Airflow Params) and its mapping onto the pipeline config.

Form fields: profile, base_model (-> model.base), domains, modifiers (-> modifiers.enabled),
datasets (-> data.datasets) and `overrides`, a free JSON object deep-merged last (so it can set
anything, form fields too).
Keys of a DAG-run conf that are not form fields are config overrides as well, e.g. a REST
trigger with conf {"train": {"max_steps": 20}}. Everything is validated by forge.config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import Param

from forge.config import DEFAULT_CONFIG_PATH, MVP_DOMAINS, ConfigError, DatasetSpec, deep_merge, load_config

FORM_FIELDS = ("profile", "base_model", "domains", "modifiers", "datasets", "overrides")


def profile_names(path: Path = DEFAULT_CONFIG_PATH) -> list[str]:
    """Profiles defined in pipeline.yaml (the form's choices); cheap enough for parse time."""
    raw = yaml.safe_load(path.read_text()) or {}
    return sorted(raw.get("profiles") or {}) or ["demo"]


def _dataset_schema() -> dict[str, Any]:
    # The same schema forge.config validates against, so the form rejects what the job would.
    schema = DatasetSpec.model_json_schema()
    schema.pop("title", None)
    return schema


def trigger_params() -> dict[str, Param]:
    profiles = profile_names()
    modifiers = load_config().modifiers  # the domain catalog: one TaskGroup per entry in the DAG
    return {
        "profile": Param(
            "demo" if "demo" in profiles else profiles[0], type="string", enum=profiles,
            title="Profile",
            description="demo = tiny model on CPU in minutes; production = a real model on GPUs.",
        ),
        "base_model": Param(
            "", type="string", title="Base model",
            description="HF model id or local path; 'demo' builds the tiny model. "
                        "Empty = the profile's model.base.",
        ),
        "domains": Param(
            list(MVP_DOMAINS), type="array", title="Domains", minItems=1, uniqueItems=True,
            items={"type": "string", "enum": list(MVP_DOMAINS)},
            description="Domains whose task suites the base model is trained and evaluated on.",
        ),
        "modifiers": Param(
            list(modifiers.enabled), type="array", title="Modifiers", uniqueItems=True,
            items={"type": "string", "enum": list(modifiers.domains)},
            description="Domain modifiers (LoRA adapters) to build: each runs its TaskGroup A-H; the others "
                        "skip. Post-MVP: " + ", ".join(d for d in modifiers.domains if d not in MVP_DOMAINS)
                        + ".",
        ),
        "datasets": Param(
            [], type="array", title="Datasets", items=_dataset_schema(),
            description='Extra chat datasets, e.g. [{"uri": "s3://bucket/chat.jsonl", '
                        '"format": "jsonl", "domain": "general"}]. Empty = the profile\'s.',
        ),
        "overrides": Param(
            {}, type="object", title="Config overrides",
            description='Free JSON deep-merged onto the profile last, e.g. {"train": {"max_steps": 20}}. '
                        "Unknown fields fail the run up front, naming the field.",
        ),
    }


def config_request(params: dict[str, Any] | None, conf: dict[str, Any] | None) -> tuple[str | None, dict]:
    """(profile, overrides) for forge.config.load_config from the run's params and conf."""
    values = {**(params or {}), **(conf or {})}
    overrides: dict[str, Any] = {}
    if values.get("base_model"):
        overrides["model"] = {"base": values["base_model"]}
    if values.get("domains"):
        overrides["domains"] = list(values["domains"])
    mods = values.get("modifiers")
    if isinstance(mods, list):  # the form field ([] is a choice too: no modifiers this run)
        overrides["modifiers"] = {"enabled": list(mods)}
    elif mods is not None and not isinstance(mods, dict):  # a dict is the config section itself
        raise ConfigError(f"modifiers: a list of domain names (got {type(mods).__name__})")
    if values.get("datasets"):
        overrides.setdefault("data", {})["datasets"] = list(values["datasets"])
    extra = {k: v for k, v in values.items() if k not in FORM_FIELDS}
    if isinstance(mods, dict):  # conf {"modifiers": {"axolotl": {...}}} overrides the section
        extra["modifiers"] = mods
    overrides = deep_merge(overrides, extra)
    free = values.get("overrides") or {}
    if not isinstance(free, dict):
        raise ConfigError(f"overrides: must be a JSON object (got {type(free).__name__})")
    overrides = deep_merge(overrides, free)
    profile = values.get("profile") or None
    return profile, overrides
