from __future__ import annotations

from pathlib import Path

import pytest

from forge.__main__ import parse_sets
from forge.config import ConfigError, load_config


def test_demo_profile_loads_and_expands_forge_home(forge_home: Path) -> None:
    cfg = load_config(profile="demo")
    assert cfg.profile == "demo"
    assert cfg.model.is_demo
    assert cfg.storage.root == f"file://{forge_home}/artifacts"
    assert cfg.tracking.tracking_uri == f"sqlite:///{forge_home}/mlflow.db"
    assert cfg.tracking.artifact_location == f"file://{forge_home}/mlflow-artifacts"  # a model default
    assert cfg.vocab.trim_enabled is False  # the plan skips 0B


def test_production_profile_points_at_a_real_model(forge_home: Path) -> None:
    cfg = load_config(profile="production")
    assert not cfg.model.is_demo
    assert cfg.train.quantization == "nf4"


def test_overrides_win_over_profile(forge_home: Path) -> None:
    cfg = load_config(profile="demo", overrides={"train": {"max_steps": 7}, "domains": ["code"]})
    assert cfg.train.max_steps == 7
    assert cfg.domains == ["code"]
    assert cfg.train.batch_size == 8  # untouched profile value survives the deep merge


def test_unknown_field_is_named(forge_home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"train": {"max_stepz": 3}})
    assert "train.max_stepz" in str(err.value)
    assert "unknown field" in str(err.value)


def test_wrong_type_is_named(forge_home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"train": {"learning_rate": "fast"}})
    assert "train.learning_rate" in str(err.value)
    assert "'fast'" in str(err.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"model": {"demo": {"hidden_size": 300}}}, "model.demo.hidden_size"),
        ({"domains": ["cooking"]}, "domains"),
        ({"vocab": {"coverage_target": 1.5}}, "vocab.coverage_target"),
        ({"faults": {"1A": "sometimes"}}, "faults.1A"),
        ({"data": {"datasets": [{"format": "jsonl"}]}}, "data.datasets.0.uri"),
    ],
)
def test_invalid_values_name_their_field(forge_home: Path, override: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    assert field in str(err.value)


def test_unknown_profile_and_bad_file(forge_home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'staging'"):
        load_config(profile="staging")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    stray = tmp_path / "stray.yaml"
    stray.write_text("defaults: {}\nprofiles: {demo: {}}\ntrain: {}\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config(stray)


def test_cli_set_parses_nested_yaml_values() -> None:
    assert parse_sets(["train.max_steps=5", "domains=[code, reasoning]"]) == {
        "train": {"max_steps": 5}, "domains": ["code", "reasoning"]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["train.max_steps"])


# ---- teachers, distillation, modifiers ---------------------------------------------------------------
def test_teacher_preset_and_modifier_catalog() -> None:
    prod = load_config(profile="production")
    assert [t.teacher for t in prod.teachers.domains["code"]] == ["qwen-coder", "deepseek", "gpt-5"]
    assert prod.modifiers.domains["creative"].judge == "gpt-4o"  # the profile overrides one catalog field
    assert prod.modifiers.domains["creative"].plan_id == "14E"  # ... and keeps the rest
    demo = load_config(profile="demo")
    assert demo.modifiers.enabled == ["code", "reasoning", "automation"]
    assert {"math", "hard_math", "science", "finance", "creative"} <= set(demo.modifiers.domains)
    assert [t.teacher for t in demo.teachers.domains["code"]] == ["compressed", "recovered", "reference"]
    with pytest.raises(ConfigError, match=r"teachers: .*unknown preset 'gpt'"):
        load_config(profile="demo", overrides={"teachers": "gpt"})


def test_a_domain_cache_key_section_ignores_other_domains_teachers() -> None:
    base = load_config(profile="demo")
    tiers = {d: [t.model_dump() for t in ts] for d, ts in base.teachers.domains.items()}
    other = load_config(profile="demo",
                        overrides={"teachers": {"domains": {**tiers, "reasoning": ["reference"]}}})
    assert base.section("teachers:code") == other.section("teachers:code")
    assert base.section("teachers:reasoning") != other.section("teachers:reasoning")
    # enabling another domain changes no enabled domain's sections either
    more = load_config(profile="demo", overrides={"modifiers": {"enabled": ["code", "math"]}})
    assert more.section("modifiers.domains.code") == base.section("modifiers.domains.code")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"modifiers": {"enabled": ["poetry"]}}, r"modifiers.*enabled: unknown domain\(s\) \['poetry'\]"),
    ({"modifiers": {"domains": {"code": {"judge": "nobody"}}}}, r"judge: teacher 'nobody' is not defined"),
    ({"modifiers": {"domains": {"code": {"judge": "reference"}}}}, r"'reference' is a reference solver"),
    ({"modifiers": {"domains": {"code": {"suite": "poems"}}}}, r"no task suite 'poems'"),
    ({"distill": {"cascade": "tutoring"}}, r"no tiers for \['tutoring'\]"),
    ({"modifiers": {"domains": {"code": {"plan_id": "4"}}}}, r"plan_id \['4'\] used by more than one"),
])
def test_bad_modifier_and_teacher_config_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(profile="demo", overrides=overrides)


def test_a_remote_teacher_without_endpoint_fails_only_when_its_domain_runs() -> None:
    teachers = {"teachers": {"mine": {"model": "m"}}, "domains": {"code": ["mine"]}}
    # code's modifier and distillation off: nothing calls "mine" in this run
    load_config(profile="demo", overrides={"teachers": teachers, "modifiers": {"enabled": []},
                                           "distill": {"enabled": False}})
    with pytest.raises(ConfigError, match=r"teacher 'mine' \(openai\) has no base_url"):
        load_config(profile="demo", overrides={"teachers": teachers, "modifiers": {"enabled": ["code"]},
                                               "distill": {"enabled": False}})
