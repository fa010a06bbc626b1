"""Phase 8 (serving), 10A (modes), 11A (self-consistency), 12A-B (self-critique): the `serving` section of the
pipeline config. Cheap to import (pydantic only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forge.config_base import Strict

Mode = Literal["fast", "accurate", "auto"]
MODES: tuple[str, ...] = ("fast", "accurate", "auto")


class SelfConsistencyConfig(Strict):
    """11A: accurate mode samples several paths and majority-votes the extracted final answer."""

    samples: int = Field(5, ge=2, le=16)  # the plan: 3-5 paths
    temperature: float = Field(0.7, gt=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    # what 11A measures on: the suites' held-out rows of these domains (hard_math is the suites' hard split)
    eval_domains: list[str] = ["hard_math", "reasoning"]
    eval_rows: int = Field(32, ge=4)  # per domain


class CritiqueConfig(Strict):
    """12A: a small critique classifier scores (question, answer) 0-10; 12B regenerates below `threshold`."""

    train_examples: int = Field(8000, ge=64)  # the plan's 8K; generated correct/incorrect answers
    domains: list[str] = [
        "general",
        "code",
        "reasoning",
        "automation",
        "math",
        "hard_math",
        "science",
        "finance",
    ]
    model_answers: int = Field(256, ge=0)  # of them, answers the base model wrote (checked by the suites)
    hidden_dim: int = Field(256, ge=8)
    epochs: int = Field(30, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = 1234
    threshold: float = Field(7.0, ge=0, le=10)  # 12B: regenerate with feedback when the score is below
    max_rounds: int = Field(1, ge=1, le=4)
    regenerate_temperature: float = Field(0.7, gt=0, le=2)
    eval_rows: int = Field(32, ge=4)  # per domain of 12B's measurement (eval_domains below)
    eval_domains: list[str] = ["reasoning", "math", "automation"]
    registered_model: str = "forge-critic"


class ServingConfig(Strict):
    """The inference server (forge.serve): one process, a pool of llama.cpp contexts over one mmap'd GGUF."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # API keys: a comma-separated list in this environment variable (never in the config); unset = the
    # server refuses to start unless allow_no_auth
    api_keys_env: str = "FORGE_API_KEYS"
    allow_no_auth: bool = False
    workers: int = Field(2, ge=1, le=64)  # llama.cpp contexts generating at once (weights shared by mmap)
    queue_size: int = Field(32, ge=1)  # requests waiting for a worker beyond that: 503
    queue_timeout_s: float = Field(60.0, gt=0)
    # threads per context: workers x n_threads should not exceed the cores (STACK.md: oversubscribed 2-core
    # boxes ran 4x slower)
    n_threads: int = Field(1, ge=1)
    n_ctx: int = Field(2048, ge=64)
    n_batch: int = Field(512, ge=1)
    n_gpu_layers: int = 0  # -1 = every layer on the GPU (a CUDA build of llama-cpp-python)
    # llama.cpp's flash attention: +15% decode tokens/s in one H200 build of a 1B model, -55% in another
    # (benchmarks/README.md): measure it on the serving GPU first
    flash_attn: bool = False
    # text reaches the client at most this often (the first token at once): fewer wake-ups and SSE chunks
    # than one per token (benchmarks/README.md, serving.py); 0 = every token on its own
    stream_interval_ms: float = Field(20.0, ge=0, le=1000)
    max_request_bytes: int = Field(256 * 1024, ge=1024)
    max_messages: int = Field(64, ge=1)
    max_tokens: int = Field(1024, ge=1)  # the most a request may ask for
    default_max_tokens: int = Field(256, ge=1)
    default_mode: Mode = "auto"
    # which routing policy: the one the release ships (6C of its run), or the registry's forge-router@champion
    # (what 13A's weekly retraining promotes; read at server start)
    router: Literal["release", "champion"] = "release"
    # a request's own session id, else one derived from its first user message (OpenAI clients send none)
    session_header: str = "x-session-id"
    self_consistency: SelfConsistencyConfig = SelfConsistencyConfig()
    critique: CritiqueConfig = CritiqueConfig()
    # 8A: the Hub repo the release is uploaded to; the token comes from hf_token_env or the Airflow
    # connection `hf_hub` (operators hand it over as this variable), never from here
    hub_repo: str | None = None
    hf_token_env: str = "HF_TOKEN"
    hub_private: bool = True
    # 10A: per-mode evaluation rows per domain (fast / accurate / auto on the suites' held-out rows)
    modes_eval_rows: int = Field(24, ge=2)

    @model_validator(mode="after")
    def _limits(self) -> ServingConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        return self
