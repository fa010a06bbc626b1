"""Teachers and their cascades (the `teachers` section of the pipeline config).

A teacher is an OpenAI-compatible chat endpoint. Three kinds share one HTTP client (forge.modifiers.teachers):
- "openai":      a remote endpoint (OpenAI, DeepSeek, OpenRouter, self-hosted vLLM...), priced per 1K tokens;
- "local_model": our own model behind a loopback server the task starts (llama.cpp's server on a GGUF);
- "reference":   the task suites' reference solvers behind a loopback server, the demo's top tier;
- "rubric":      a loopback judge that scores answers 0-10 against the suite row's rubric (the demo's judge
                 for domains without program-checkable answers; production names a hosted model as judge).
Local kinds get their base_url when the task starts their server (`TeacherConfig.at(...)`).

Per domain, tiers name teachers cheapest first; the cascade sends everything to tier 1 and only what fails
verification (or answers with low confidence) to the next tier. `CascadeConfig()` is the demo default (local
tiers, no keys, $0); `plan_cascade()` is the plan's production table (code: Qwen -> DeepSeek -> GPT-5, ...).

API keys never appear in config: a teacher names the env var holding its key (`api_key_env`) and/or the
Airflow connection the operator reads it from (`conn_id`); the operator exports the connection's password as
the env var `key_env` names, so the job only ever reads env. Cheap to import (pydantic only).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from forge.config_base import Strict

TeacherKind = Literal["openai", "local_model", "reference", "rubric"]
LOCAL_KINDS = ("local_model", "reference", "rubric")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TeacherConfigError(ValueError):
    """A teacher or cascade that cannot be used as configured; the message names the field."""


class TeacherConfig(Strict):
    """One OpenAI-compatible chat endpoint, its price and how the client treats it."""

    name: str = Field(pattern=NAME_PATTERN)  # the ledger's label; the key of `teachers` inside a cascade
    kind: TeacherKind = "openai"
    # the model id sent in each request; for local_model, a content-addressed alias of the weights (the
    # response cache keys local teachers on it, since their loopback URL changes every run)
    model: str = Field(min_length=1)
    base_url: str | None = None  # ".../v1"; None for local kinds (set when their server starts)
    api_key_env: str | None = None  # env var holding the key
    conn_id: str | None = None  # Airflow connection whose password the operator exports as `key_env`
    price_in_per_1k: float = Field(0.0, ge=0)  # USD per 1K prompt tokens
    price_out_per_1k: float = Field(0.0, ge=0)  # USD per 1K completion tokens (reasoning tokens included)
    max_rpm: int | None = Field(None, ge=1)  # client-side pacing; None = unpaced
    timeout_s: float = Field(60.0, gt=0)  # per HTTP attempt (read timeout)
    max_retries: int = Field(4, ge=0)  # on 429/5xx/timeouts/connection errors, after the first attempt
    backoff_base_s: float = Field(1.0, ge=0)  # exponential: base * 2**retry, full jitter
    backoff_max_s: float = Field(30.0, ge=0)  # cap on one wait, Retry-After included
    temperature: float | None = Field(0.0, ge=0, le=2)  # None = not sent (GPT-5 accepts only its default)
    max_tokens: int = Field(1024, ge=1)
    # reasoning models (o-series, GPT-5) reject max_tokens and want max_completion_tokens
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    logprobs: bool = False  # ask for token logprobs: confidence = exp(mean token logprob)
    system_prompt: str | None = None  # prepended when the item's messages have no system message
    # local_model only: which of the run's weights the loopback server serves: "compressed" = 2C's Q5_K_M
    # GGUF, "recovered" = the same with 2E's recovery LoRA (the compressed base as it ships)
    weights: Literal["compressed", "recovered"] = "compressed"
    extra_body: dict[str, Any] = {}  # provider-specific request fields (e.g. reasoning_effort)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http(s):// URL such as https://api.openai.com/v1 (got {v!r})")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_VAR.match(v):
            raise ValueError(f"must be an environment variable name (letters, digits, _), got {v!r}; "
                             "put the key itself in that variable, never in config")
        return v

    @field_validator("extra_body")
    @classmethod
    def _no_reserved_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = {"model", "messages", "stream"} & set(v)
        if reserved:
            raise ValueError(f"may not set {sorted(reserved)}: the client sends those itself")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TeacherConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be >= "
                             f"backoff_base_s ({self.backoff_base_s})")
        if self.kind != "local_model" and self.weights != "compressed":
            raise ValueError("weights applies to local_model teachers only")
        if self.kind in LOCAL_KINDS and (self.api_key_env or self.conn_id):
            raise ValueError(f"a {self.kind!r} teacher runs on loopback and takes no key; "
                             "drop api_key_env/conn_id")
        return self

    @property
    def key_env(self) -> str | None:
        """The env var the client reads the key from: api_key_env, else FORGE_TEACHER_KEY_<NAME> when only
        a connection is named (the operator exports the connection's password under this name)."""
        if self.api_key_env:
            return self.api_key_env
        if self.conn_id:
            return "FORGE_TEACHER_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", self.name).upper()
        return None

    @property
    def is_local(self) -> bool:
        return self.kind in LOCAL_KINDS

    @property
    def is_free(self) -> bool:
        return self.price_in_per_1k == 0 and self.price_out_per_1k == 0

    def at(self, base_url: str, model: str | None = None) -> TeacherConfig:
        """This teacher pointed at a started server (a local kind's loopback URL), validated."""
        return TeacherConfig.model_validate({**self.model_dump(), "base_url": base_url,
                                             "model": model or self.model})

    def require_endpoint(self, where: str = "teachers") -> str:
        if self.base_url is None:
            hint = ("the task sets it when it starts the local server (TeacherConfig.at)" if self.is_local
                    else f"set {where}.teachers.{self.name}.base_url (e.g. a self-hosted vLLM's "
                         "http://host:8000/v1)")
            raise TeacherConfigError(f"teacher {self.name!r} ({self.kind}) has no base_url: {hint}")
        return self.base_url


class TierConfig(Strict):
    """One step of a domain's cascade. YAML may give just the teacher's name."""

    teacher: str = Field(pattern=NAME_PATTERN)
    concurrency: int = Field(4, ge=1, le=64)  # threads sending this tier's items
    min_confidence: float | None = Field(None, gt=0, le=1)  # overrides the cascade's for this tier


# ---- the demo default: local tiers, no keys --------------------------------------------------------

DEMO_DOMAINS = ("general", "code", "reasoning", "automation", "math", "hard_math", "science", "finance",
                "creative")
MAX_TIERS = 3  # the plan's 3-tier cascade: the modifiers' subphases B, C, D


def _demo_teachers() -> dict[str, TeacherConfig]:
    local = {"kind": "local_model", "timeout_s": 120.0, "max_retries": 2, "backoff_base_s": 0.5,
             "backoff_max_s": 5.0, "max_tokens": 256}
    return {
        # our own model behind llama.cpp's server (one thread, so one request at a time): the Q5_K_M GGUF,
        # then the same with its recovery LoRA, then the suites' reference solvers
        "compressed": TeacherConfig(name="compressed", model="forge-compressed", weights="compressed",
                                    **local),
        "recovered": TeacherConfig(name="recovered", model="forge-recovered", weights="recovered", **local),
        "reference": TeacherConfig(name="reference", kind="reference", model="reference", timeout_s=30.0,
                                   max_retries=2, backoff_base_s=0.2, backoff_max_s=2.0),
        "rubric": TeacherConfig(name="rubric", kind="rubric", model="rubric-judge", timeout_s=30.0,
                                max_retries=2, backoff_base_s=0.2, backoff_max_s=2.0),
    }


def _demo_domains() -> dict[str, list[TierConfig]]:
    return {d: [TierConfig(teacher="compressed", concurrency=1),
                TierConfig(teacher="recovered", concurrency=1),
                TierConfig(teacher="reference", concurrency=4)]
            for d in DEMO_DOMAINS}


class CascadeConfig(Strict):
    """Teachers by name, tiers per domain, and the run's guard rails."""

    teachers: dict[str, TeacherConfig] = Field(default_factory=_demo_teachers)
    domains: dict[str, list[TierConfig]] = Field(default_factory=_demo_domains)
    # USD for one pipeline run; a call that could push spending past it is not sent (the items are
    # reported as unsent). None = no cap. Local and reference teachers cost 0.
    cost_cap_usd: float | None = Field(25.0, ge=0)
    # escalate answers whose confidence (exp mean token logprob, when the endpoint returns logprobs) is below
    min_confidence: float | None = Field(None, gt=0, le=1)
    cache: bool = True  # content-addressed response cache in the artifact store

    @model_validator(mode="before")
    @classmethod
    def _names_and_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        teachers = data.get("teachers")
        if isinstance(teachers, dict):  # the key is the name; a differing explicit name is an error
            named = {}
            for key, t in teachers.items():
                if isinstance(t, dict):
                    if "name" in t and t["name"] != key:
                        raise ValueError(f"teachers.{key}.name is {t['name']!r}; "
                                         f"it must equal its key {key!r}")
                    t = {**t, "name": key}
                named[key] = t
            data["teachers"] = named
        domains = data.get("domains")
        if isinstance(domains, dict):  # tiers: [qwen, deepseek, gpt-5] is short for [{teacher: qwen}, ...]
            data["domains"] = {d: [{"teacher": t} if isinstance(t, str) else t for t in tiers]
                               if isinstance(tiers, list) else tiers for d, tiers in domains.items()}
        return data

    @model_validator(mode="after")
    def _tiers_resolve(self) -> CascadeConfig:
        for key, t in self.teachers.items():
            if t.name != key:
                raise ValueError(f"teachers.{key}.name is {t.name!r}; it must equal its key {key!r}")
        for domain, tiers in self.domains.items():
            if not re.match(r"^[a-z][a-z0-9_]*$", domain):
                raise ValueError(f"domains.{domain}: a domain name is lowercase letters, digits and _")
            if not tiers:
                raise ValueError(f"domains.{domain}: needs at least one tier")
            if len(tiers) > MAX_TIERS:
                raise ValueError(f"domains.{domain}: {len(tiers)} tiers; at most {MAX_TIERS} (the modifiers' "
                                 "subphases B, C, D run one tier each)")
            names = [t.teacher for t in tiers]
            for i, name in enumerate(names, 1):
                if name not in self.teachers:
                    raise ValueError(f"domains.{domain} tier {i}: teacher {name!r} is not defined under "
                                     f"teachers (defined: {sorted(self.teachers)})")
                if self.teachers[name].kind == "rubric":
                    raise ValueError(f"domains.{domain} tier {i}: {name!r} is a rubric judge: it scores "
                                     "answers (modifiers.domains.<d>.judge), it does not write them")
                if self.teachers[name].kind == "reference" and i != len(names):
                    raise ValueError(f"domains.{domain} tier {i}: the reference teacher {name!r} can only be "
                                     "the last tier (it answers only what a suite has a reference for)")
            if len(set(names)) != len(names):
                raise ValueError(f"domains.{domain}: a teacher appears twice in {names}")
        return self

    def tiers_for(self, domain: str) -> list[tuple[TierConfig, TeacherConfig]]:
        """(tier, teacher) pairs of a domain, cheapest first, with the cascade's min_confidence applied."""
        if domain not in self.domains:
            raise TeacherConfigError(f"teachers.domains has no tiers for domain {domain!r} "
                                     f"(configured: {sorted(self.domains)})")
        out = []
        for tier in self.domains[domain]:
            if tier.min_confidence is None and self.min_confidence is not None:
                tier = tier.model_copy(update={"min_confidence": self.min_confidence})
            out.append((tier, self.teachers[tier.teacher]))
        return out

    def check_domains(self, domains: list[str]) -> None:
        """For the enabled domains: tiers exist and every remote teacher has an endpoint. Call at parse time
        (remote endpoints only: a local kind's URL exists once its task starts the server)."""
        for domain in domains:
            for _, teacher in self.tiers_for(domain):
                if not teacher.is_local:
                    teacher.require_endpoint()

    def local_teachers(self, domains: list[str]) -> dict[str, TeacherConfig]:
        """The local_model / reference teachers the given domains use: the servers a task must start."""
        return {t.name: t for d in domains for _, t in self.tiers_for(d) if t.is_local}


# ---- the plan's production table ---------------------------------------------------------------------
# Prices: USD per 1K tokens, providers' list prices when this was written; they change, so check yours. The
# cost cap is computed from them. FinGPT and InvestLM have no hosted API: serve them (e.g. vLLM) and set
# their base_url before enabling the finance domain (check_domains says so otherwise).

OPENAI = "https://api.openai.com/v1"
OPENROUTER = "https://openrouter.ai/api/v1"
DEEPSEEK = "https://api.deepseek.com/v1"
DASHSCOPE = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
ANTHROPIC = "https://api.anthropic.com/v1"  # Anthropic's OpenAI-SDK-compatible endpoint

# where each provider's key comes from: the env var, and the Airflow connection the operator exports into it
_OPENAI = {"base_url": OPENAI, "api_key_env": "OPENAI_API_KEY", "conn_id": "forge_openai"}
_OPENROUTER = {"base_url": OPENROUTER, "api_key_env": "OPENROUTER_API_KEY", "conn_id": "forge_openrouter"}
_DEEPSEEK = {"base_url": DEEPSEEK, "api_key_env": "DEEPSEEK_API_KEY", "conn_id": "forge_deepseek"}
_DASHSCOPE = {"base_url": DASHSCOPE, "api_key_env": "DASHSCOPE_API_KEY", "conn_id": "forge_dashscope"}
_ANTHROPIC = {"base_url": ANTHROPIC, "api_key_env": "ANTHROPIC_API_KEY", "conn_id": "forge_anthropic"}
# GPT-5 (a reasoning model) takes max_completion_tokens and only its default temperature
_GPT5 = {**_OPENAI, "model": "gpt-5", "price_in_per_1k": 0.00125, "price_out_per_1k": 0.01,
         "temperature": None, "max_tokens_param": "max_completion_tokens"}

PLAN_TEACHERS: dict[str, dict[str, Any]] = {
    "gpt-5": {**_GPT5, "max_tokens": 4096, "timeout_s": 180.0},
    # the plan's "GPT-5+COT" for reasoning: same model, more reasoning effort
    "gpt-5-cot": {**_GPT5, "max_tokens": 8192, "timeout_s": 300.0,
                  "extra_body": {"reasoning_effort": "high"}},
    "gpt-4o": {**_OPENAI, "model": "gpt-4o", "price_in_per_1k": 0.0025, "price_out_per_1k": 0.01,
               "logprobs": True},
    "qwen-coder": {**_DASHSCOPE, "model": "qwen2.5-coder-32b-instruct", "price_in_per_1k": 0.0007,
                   "price_out_per_1k": 0.0014},
    "qwen-math": {**_DASHSCOPE, "model": "qwen2.5-math-72b-instruct", "price_in_per_1k": 0.0014,
                  "price_out_per_1k": 0.0056},
    "deepseek": {**_DEEPSEEK, "model": "deepseek-chat", "price_in_per_1k": 0.00028,
                 "price_out_per_1k": 0.00042},
    # DeepSeek's API serves no DeepSeek-Math; its reasoner is the math-capable model it hosts
    "deepseek-math": {**_DEEPSEEK, "model": "deepseek-reasoner", "price_in_per_1k": 0.00028,
                      "price_out_per_1k": 0.00042, "temperature": None, "max_tokens": 8192,
                      "timeout_s": 300.0},
    # "Llama-405B FREE": OpenRouter's free variant, rate-limited on its side (20 requests/min)
    "llama-405b": {**_OPENROUTER, "model": "meta-llama/llama-3.1-405b-instruct:free", "max_rpm": 20},
    "llama-70b": {**_OPENROUTER, "model": "meta-llama/llama-3.3-70b-instruct", "price_in_per_1k": 0.00013,
                  "price_out_per_1k": 0.0004},
    "gemma-27b": {**_OPENROUTER, "model": "google/gemma-2-27b-it", "price_in_per_1k": 0.00027,
                  "price_out_per_1k": 0.00027},
    "claude-3.5": {**_ANTHROPIC, "model": "claude-3-5-sonnet-20241022", "price_in_per_1k": 0.003,
                   "price_out_per_1k": 0.015},
    # self-hosted (no hosted API; add api_key_env if your server wants a key): set base_url before enabling
    # the finance domain
    "fingpt": {"model": "FinGPT/fingpt-mt_llama3-8b_lora"},
    "investlm": {"model": "yixuantt/InvestLM-awq"},
}

PLAN_TIERS: dict[str, list[str]] = {
    "general": ["gpt-5"],  # 1C: GPT-5 distillation
    "code": ["qwen-coder", "deepseek", "gpt-5"],
    "reasoning": ["llama-405b", "gpt-4o", "gpt-5-cot"],
    "automation": ["claude-3.5", "gpt-4o", "gpt-5"],
    "math": ["qwen-math", "deepseek-math", "gpt-5"],
    "hard_math": ["qwen-math", "deepseek-math", "gpt-5"],
    "science": ["llama-70b", "gemma-27b", "gpt-5"],
    "finance": ["fingpt", "investlm", "gpt-5"],
    "creative": ["claude-3.5", "gpt-4o", "gpt-5"],
}


def plan_cascade(cost_cap_usd: float | None = 200.0) -> CascadeConfig:
    """The plan's tiers per domain over hosted endpoints (production profile). The default cap is the plan's
    largest per-modifier budget line ($207 for reasoning, rounded down) as a guard rail for one run."""
    return CascadeConfig.model_validate({"teachers": PLAN_TEACHERS, "domains": PLAN_TIERS,
                                         "cost_cap_usd": cost_cap_usd})
