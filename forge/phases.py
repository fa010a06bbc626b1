"""The phase registry: plan id -> job, inputs, config sections, where it runs.

Importing this module is cheap (no ML libraries): the DAG file builds its tasks from it.
A phase that is not built yet is simply absent here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from forge.config import PipelineConfig


@dataclass(frozen=True)
class Phase:
    id: str  # plan id ("1A") or a preparation step ("prep_data")
    task_id: str  # Airflow task id inside its group: plan id in lower case + "_" + name
    group: str  # Airflow TaskGroup
    title: str
    job: str  # "module:function", imported lazily by the runner
    inputs: tuple[str, ...] = ()  # upstream phase ids whose manifests the job reads
    sections: tuple[str, ...] = ()  # config sections hashed into the cache key
    gpu: bool = False  # runs on the GPU queue/pool when a GPU runtime is configured
    skip: Callable[[PipelineConfig], str | None] | None = None  # returns a reason to skip


def _trim_skip(cfg: PipelineConfig) -> str | None:
    return None if cfg.vocab.trim_enabled else cfg.vocab.trim_skip_reason


PHASES: tuple[Phase, ...] = (
    Phase("prep_data", "prepare_data", "prepare", "Datasets and task suites",
          "forge.data.prepare:run", (), ("data", "domains")),
    Phase("prep_model", "prepare_base_model", "prepare", "Base model (demo build or HF load)",
          "forge.train.base_model:run", ("prep_data",), ("model", "eval", "domains")),
    Phase("0A", "0a_vocab_analysis", "phase0_vocab", "Vocab analysis",
          "forge.data.vocab:analyze", ("prep_data", "prep_model"), ("vocab",)),
    Phase("0B", "0b_vocab_trim", "phase0_vocab", "Vocab trimming",
          "forge.data.vocab:trim", ("prep_data", "prep_model", "0A"), ("vocab",), skip=_trim_skip),
    Phase("1A", "1a_base_qlora", "phase1_base", "Base QLoRA (own PyTorch loop)",
          "forge.train.qlora_trainer:run", ("prep_data", "prep_model", "0B"), ("train", "eval"),
          gpu=True),
    Phase("1B", "1b_failure_analysis", "phase1_base", "Failure analysis",
          "forge.data.failure_analysis:run", ("prep_data", "1A"), ("failure_analysis", "eval")),
    Phase("2A", "2a_structured_pruning", "phase2_compress", "Structured pruning (MLP width)",
          "forge.compress.pruning:run", ("prep_data", "1A"), ("pruning", "eval"), gpu=True),
    Phase("2B", "2b_awq_quantization", "phase2_compress", "AWQ 4-bit (llm-compressor W4A16 g128)",
          "forge.compress.awq:run", ("prep_data", "2A"), ("awq", "eval"), gpu=True),
    # 2B and 2C are two exports of the pruned model (GPU serving / CPU serving), not a chain
    Phase("2C", "2c_gguf_q5_k_m", "phase2_compress", "GGUF export + Q5_K_M (llama.cpp)",
          "forge.compress.gguf_export:run", ("prep_data", "2A"), ("gguf", "eval")),
    Phase("2D", "2d_lossless_compression", "phase2_compress", "Lossless compression (zstd/byte planes)",
          "forge.compress.lossless:run", ("2A", "2C"), ("lossless",)),
    Phase("2E", "2e_recovery_lora", "phase2_compress", "Recovery LoRA on the dequantized GGUF",
          "forge.train.recovery:run", ("prep_data", "1B", "2A", "2C"), ("recovery", "gguf", "eval"),
          gpu=True),
    # 1A is an input for lineage: the registered compressed base names the 1A run it came from
    Phase("2F", "2f_confidence_calibration", "phase2_compress", "Confidence calibration (temperature, Platt)",
          "forge.compress.calibration:run", ("prep_data", "1A", "2C", "2E"), ("calibration", "gguf", "eval")),
)

BY_ID: dict[str, Phase] = {p.id: p for p in PHASES}


def get_phase(phase_id: str) -> Phase:
    try:
        return BY_ID[phase_id]
    except KeyError:
        raise KeyError(f"unknown phase {phase_id!r}; known: {list(BY_ID)}") from None
