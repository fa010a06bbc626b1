"""Typed pipeline configuration: `config/pipeline.yaml` with profiles, validated up front.

Layering (later wins): the file's `defaults`, then `profiles.<name>`, then overrides
(DAG-run conf / Airflow Params / CLI). Every model forbids unknown fields, so a typo
fails at parse time with the field's dotted path in the message.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from forge.compress.awq_config import AWQConfig
from forge.compress.calibration_config import CalibrationConfig
from forge.compress.gguf_config import GGUFConfig
from forge.compress.lossless_config import LosslessConfig
from forge.compress.pruning_config import PruningConfig
from forge.config_base import Strict
from forge.evaluate.validation_config import ValidationConfig
from forge.modifiers.backbone_config import SharedBackboneConfig
from forge.modifiers.modifier_config import ModifiersConfig
from forge.modifiers.teacher_config import PLAN_TEACHERS, PLAN_TIERS, CascadeConfig
from forge.routing.routing_config import RoutingConfig
from forge.runtime_config import RuntimeConfig
from forge.serve.few_shot_config import FewShotConfig
from forge.serve.serve_config import ServingConfig
from forge.train.distill_config import DistillConfig
from forge.train.maml_config import MAMLConfig
from forge.train.recovery_config import RecoveryConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "pipeline.yaml"
MVP_DOMAINS = ("general", "code", "reasoning", "automation")


class ConfigError(ValueError):
    """Raised for any invalid configuration; the message names the offending field."""


class DemoModelConfig(Strict):
    """The built-in tiny Llama, built from a config and briefly pre-trained on our corpus."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 2048
    max_position_embeddings: int = 512
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 256
    pretrain_lr: float = 3e-3

    @field_validator("hidden_size", "intermediate_size")
    @classmethod
    def _multiple_of_256(cls, v: int) -> int:
        # K-quants (Q5_K_M) and AWQ group 128 need these widths in multiples of 256.
        if v % 256:
            raise ValueError(f"must be a multiple of 256 (got {v})")
        return v

    @model_validator(mode="after")
    def _heads_divide(self) -> DemoModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("num_attention_heads must divide hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        return self


class ModelConfig(Strict):
    # "demo" builds the tiny model; anything else is an HF model id or a local path.
    base: str = "demo"
    revision: str | None = None
    trust_remote_code: bool = False
    demo: DemoModelConfig = DemoModelConfig()

    @property
    def is_demo(self) -> bool:
        return self.base == "demo"


class DatasetSpec(Strict):
    """A user dataset in chat format: rows with `messages` [{role, content}, ...]."""

    uri: str  # local path, file://, s3://, or hf://<dataset id>
    format: Literal["jsonl", "parquet", "hf"] = "jsonl"
    split: str = "train"
    messages_field: str = "messages"
    domain: str = "general"
    max_rows: int | None = None


class SuiteSizes(Strict):
    train: int = 200
    dev: int = 16
    heldout: int = 40
    calib: int = 200  # 2F: confidence calibration (fit half, measure half); never trained on
    pretrain: int = 400


class DataConfig(Strict):
    seed: int = 1234
    # Our generated, checkable task suites (one per domain), sized per split.
    suites: SuiteSizes = SuiteSizes()
    datasets: list[DatasetSpec] = []


class VocabConfig(Strict):
    coverage_target: float = Field(0.995, gt=0, le=1)
    trim_enabled: bool = False
    trim_skip_reason: str = "data already English (plan: 0A/0B SKIP)"
    max_ppl_increase: float = 0.03


class TrainConfig(Strict):
    """1A: QLoRA in our own PyTorch loop."""

    quantization: Literal["auto", "nf4", "none"] = "auto"  # auto = nf4 on CUDA, none on CPU
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    log_every: int = 10
    grad_clip: float = 1.0
    compile: bool = False
    # trades ~25% speed for ~half the activation memory: for big models / long sequences
    gradient_checkpointing: bool = False
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _positive(self) -> TrainConfig:
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        return self


class FailureAnalysisConfig(Strict):
    """1B: cluster the failures on the held-out split."""

    n_clusters: int = Field(10, ge=2, le=64)
    embedder: Literal["minilm", "tfidf"] = "minilm"
    hardest_k: int = 100
    top_terms: int = 5


class EvalConfig(Strict):
    max_new_tokens: int = 64
    batch_size: int = 16
    code_timeout_s: float = 5.0


class StorageConfig(Strict):
    # file:///abs/path or s3://bucket/prefix. Credentials never live here: they come from
    # env vars (AWS_*) or the Airflow connection named by conn_id, resolved in operators/.
    root: str = "file://{forge_home}/artifacts"
    endpoint_url: str | None = None
    conn_id: str | None = None


class TrackingConfig(Strict):
    tracking_uri: str = "sqlite:///{forge_home}/mlflow.db"
    # where MLflow keeps small artifacts (plots, reports) of a new experiment; s3:// works too
    artifact_location: str = "file://{forge_home}/mlflow-artifacts"
    experiment: str = "forge_pipeline"
    registered_model: str = "forge-base"
    # 2F registers the shippable compressed base (GGUF + recovery LoRA + calibration) here
    compressed_model: str = "forge-base-compressed"
    ui_url: str | None = None  # where humans open MLflow (used for Airflow extra links)


class CacheConfig(Strict):
    enabled: bool = True
    force: list[str] = []  # phase ids to recompute even on a cache hit


class MetaConfig(Strict):
    maml: MAMLConfig = MAMLConfig()
    few_shot: FewShotConfig = FewShotConfig()


class PipelineConfig(Strict):
    profile: str = "demo"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    domains: list[str] = list(MVP_DOMAINS)
    vocab: VocabConfig = VocabConfig()
    train: TrainConfig = TrainConfig()
    pruning: PruningConfig = PruningConfig()
    awq: AWQConfig = AWQConfig()
    gguf: GGUFConfig = GGUFConfig()
    lossless: LosslessConfig = LosslessConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    failure_analysis: FailureAnalysisConfig = FailureAnalysisConfig()
    # teachers and their per-domain cascades; YAML `teachers: plan` = the plan's hosted table
    teachers: CascadeConfig = CascadeConfig()
    distill: DistillConfig = DistillConfig()
    modifiers: ModifiersConfig = ModifiersConfig()
    # 15A: one shared adapter + per-domain heads (above backbone.min_domains modifiers, or forced)
    backbone: SharedBackboneConfig = SharedBackboneConfig()
    # 6A-6D router, escalation detector, thresholds, session memory; 13A weekly retraining
    routing: RoutingConfig = RoutingConfig()
    # 8A-8D serving, 10A modes, 11A self-consistency, 12A-B self-critique
    serving: ServingConfig = ServingConfig()
    # 7A MAML, 7B few-shot templates
    meta: MetaConfig = MetaConfig()
    # 9A quality gates, 9B human evaluation, 9C speed
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    cache: CacheConfig = CacheConfig()
    # where the jobs run: local (in process / venv; Celery workers route GPU phases to queue `gpu`) or
    # Kubernetes pods; GPUs per phase (= pool slots = the launcher's processes)
    runtime: RuntimeConfig = RuntimeConfig()
    # Fault injection for tests/drills: {"1A": "once"} fails that phase's first attempt.
    faults: dict[str, Literal["once", "always"]] = {}

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: list[str]) -> list[str]:
        unknown = [d for d in v if d not in MVP_DOMAINS]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; known: {list(MVP_DOMAINS)}")
        if not v:
            raise ValueError("at least one domain is required")
        return v

    @model_validator(mode="before")
    @classmethod
    def _teacher_preset(cls, data: Any) -> Any:
        # `teachers: plan` (or {preset: plan, cost_cap_usd: ...}) = the plan's hosted teachers and tiers
        if isinstance(data, dict):
            t = data.get("teachers")
            if t == "plan" or (isinstance(t, dict) and t.get("preset") == "plan"):
                extra = {k: v for k, v in t.items() if k != "preset"} if isinstance(t, dict) else {}
                data = {**data, "teachers": deep_merge({"teachers": PLAN_TEACHERS, "domains": PLAN_TIERS,
                                                        "cost_cap_usd": 200.0}, extra)}
            elif isinstance(t, str):
                raise ValueError(f"teachers: unknown preset {t!r} (known: 'plan'); or write the section out")
        return data

    @model_validator(mode="after")
    def _teachers_cover_what_runs(self) -> PipelineConfig:
        from forge.data.suites import SUITES

        used = list(self.modifiers.enabled) + ([self.distill.cascade] if self.distill.enabled else [])
        missing = [d for d in used if d not in self.teachers.domains]
        if missing:
            raise ValueError(f"teachers.domains has no tiers for {missing} (enabled modifiers / "
                             f"distill.cascade); configured: {sorted(self.teachers.domains)}")
        self.teachers.check_domains(used)
        for d in self.modifiers.enabled:
            spec = self.modifiers.domains[d]
            if self.modifiers.suite_of(d) not in SUITES:
                raise ValueError(f"modifiers.domains.{d}.suite: no task suite {self.modifiers.suite_of(d)!r} "
                                 f"(known: {sorted(SUITES)})")
            if spec.judge is not None:
                judge = self.teachers.teachers.get(spec.judge)
                if judge is None:
                    raise ValueError(f"modifiers.domains.{d}.judge: teacher {spec.judge!r} is not defined "
                                     f"under teachers.teachers ({sorted(self.teachers.teachers)})")
                if judge.kind == "reference":
                    raise ValueError(f"modifiers.domains.{d}.judge: {spec.judge!r} is a reference solver; "
                                     "a judge is an 'openai' model or the 'rubric' judge")
                if not judge.is_local:
                    judge.require_endpoint()
        return self

    def section(self, name: str) -> Any:
        """A plain view of one config section (what a phase hashes into its cache key): a top-level name, a
        dotted path ("modifiers.domains.code"), or "teachers:<domain>" (that domain's tiers, the teachers
        they name, its judge and the cost cap: another domain's teachers changing must not invalidate it)."""
        if name == "domains":
            return {"domains": self.domains}
        if name == "serving.hub_upload":  # 8A: a token or none changes its output (only the bool is hashed)
            sc = self.serving
            return {"hub_repo": sc.hub_repo, "hub_private": sc.hub_private,
                    "token_set": bool(os.environ.get(sc.hf_token_env))}
        if name.startswith("teachers:"):
            domain = name.split(":", 1)[1]
            tiers = self.teachers.domains.get(domain, [])
            names = [t.teacher for t in tiers]
            spec = self.modifiers.domains.get(domain)
            if spec is not None and spec.judge in self.teachers.teachers:
                names.append(spec.judge)
            return {"tiers": [t.model_dump(mode="json") for t in tiers],
                    "teachers": {n: self.teachers.teachers[n].model_dump(mode="json") for n in names},
                    "cost_cap_usd": self.teachers.cost_cap_usd,
                    "min_confidence": self.teachers.min_confidence, "cache": self.teachers.cache}
        value: Any = self
        for part in name.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def forge_home() -> Path:
    return Path(os.environ.get("FORGE_HOME", REPO_ROOT / ".forge")).resolve()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid Forge config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see config/pipeline.yaml)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"  - {loc}: {msg}{got_s}")
    return "\n".join(lines)


def _expand(value: Any, home: str) -> Any:
    if isinstance(value, str):
        return value.replace("{forge_home}", home)
    if isinstance(value, dict):
        return {k: _expand(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, home) for v in value]
    return value


def config_stamp(path: str | Path | None = None) -> tuple[str, tuple[int, int, int] | None]:
    """The config file a load would read (path, FORGE_CONFIG or the default) and its (mtime, size, inode)
    (None: missing, load_config then says so): a cache keyed on both re-reads an edited or replaced file,
    even two writes within one tick of a coarse file-system clock when the size or the file changed."""
    resolved = str(path or os.environ.get("FORGE_CONFIG", DEFAULT_CONFIG_PATH))
    try:
        st = os.stat(resolved)
    except OSError:
        return resolved, None
    return resolved, (st.st_mtime_ns, st.st_size, st.st_ino)


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Read the YAML, apply the profile and overrides, validate. Raises ConfigError."""
    path = Path(path or os.environ.get("FORGE_CONFIG", DEFAULT_CONFIG_PATH))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not set(raw) <= {"defaults", "profiles"}:
        raise ConfigError(f"{path}: top level must have only 'defaults' and 'profiles'")
    overrides = dict(overrides or {})
    profile = profile or overrides.pop("profile", None) or os.environ.get("FORGE_PROFILE", "demo")
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"profile: unknown profile {profile!r}; known: {sorted(profiles)}")
    merged = deep_merge(raw.get("defaults") or {}, profiles[profile] or {})
    merged = deep_merge(merged, overrides)
    merged["profile"] = profile
    try:
        cfg = PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, f"{path}, profile {profile!r}")) from exc
    # expand {forge_home} in model defaults as well as in what the file and overrides set
    return PipelineConfig.model_validate(_expand(cfg.model_dump(), str(forge_home())))
