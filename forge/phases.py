"""The phase registry: plan id -> job, inputs, config sections, where it runs.

Importing this module is cheap (no ML libraries): the DAG file builds its tasks from it.
A phase that is not built yet is simply absent here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial

from forge.config import PipelineConfig
from forge.modifiers.modifier_config import SUBPHASES, TIER_STEPS, ModifierDomainConfig


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
    domain: str | None = None  # a modifier's subphase: its domain
    step: str | None = None  # a modifier's subphase: its letter A-H
    # reads data the store's manifests do not pin (serving feedback, the model registry): always runs, and its
    # output is cached by content (forge.runner)
    live_inputs: bool = False
    # people act first: the DAG puts a deferrable sensor between the inputs and this task (9B's ratings)
    waits_for_ratings: bool = False


def _trim_skip(cfg: PipelineConfig) -> str | None:
    return None if cfg.vocab.trim_enabled else cfg.vocab.trim_skip_reason


def _distill_skip(cfg: PipelineConfig) -> str | None:
    return None if cfg.distill.enabled else cfg.distill.skip_reason


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
    # 1C's local teachers in the demo serve 2C's GGUF and 2E's recovery LoRA, hence those inputs
    Phase("1C", "1c_distillation", "phase1_base", "Distillation: answers to failures + critiques (Axolotl)",
          "forge.train.distillation:run", ("prep_data", "1A", "1B", "2C", "2E"),
          ("distill", "teachers:general", "eval"), gpu=True, skip=_distill_skip),
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

# ---- the modifiers: subphases A-H per configured domain ------------------------------------------------

MODIFIER_JOBS = {
    "A": "forge.modifiers.collect:run",
    "B": "forge.modifiers.generation:run", "C": "forge.modifiers.generation:run",
    "D": "forge.modifiers.generation:run",
    "E": "forge.modifiers.curate:run",
    "F": "forge.modifiers.training:render",
    "G": "forge.modifiers.training:train",
    "H": "forge.modifiers.evaluation:run",
}


def modifier_phase_id(spec: ModifierDomainConfig, step: str) -> str:
    """3 + A -> "3A"; 14A + B -> "14A.B" (a plan id that ends in a letter gets a dot)."""
    return f"{spec.plan_id}{step}" if spec.plan_id.isdigit() else f"{spec.plan_id}.{step}"


def _modifier_skip(domain: str, step: str, cfg: PipelineConfig) -> str | None:
    if domain not in cfg.modifiers.enabled:
        return (f"modifier {domain!r} is not enabled in this run (enable it in the trigger form's "
                f"Modifiers field or modifiers.enabled)")
    tier = TIER_STEPS.get(step)
    n_tiers = len(cfg.teachers.domains.get(domain, []))
    if tier is not None and tier > n_tiers:
        return f"teachers.domains.{domain} has {n_tiers} tier(s): no tier {tier} to run"
    return None


def modifier_phases(domain: str, spec: ModifierDomainConfig) -> tuple[Phase, ...]:
    """The eight subphases of one domain's modifier, wired A -> B -> C -> D -> E -> F -> G -> H."""
    pid = partial(modifier_phase_id, spec)
    group = f"phase{spec.plan_id.lower()}_{domain}_modifier"
    own = (f"modifiers.domains.{domain}",)
    teach = (f"teachers:{domain}", "eval")
    # B/C/D: 2C's GGUF and 2E's LoRA are what the demo's local teachers serve
    specs: dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]] = {
        "A": (("prep_data", "1B"), (*own, "modifiers.sizes", "data"), False),
        "B": ((pid("A"), "2C", "2E"), teach, False),
        "C": ((pid("A"), pid("B"), "2C", "2E"), teach, False),
        "D": ((pid("A"), pid("C"), "2C", "2E"), teach, False),
        "E": ((pid("A"), pid("B"), pid("C"), pid("D")),
              (*own, "modifiers.val_fraction", "modifiers.min_train_rows", "modifiers.max_answer_chars"),
              False),
        # modifiers train on the pruned base (2A): its adapters then fit 2C's GGUF, which is 2A converted
        "F": ((pid("E"), "2A"), ("modifiers.axolotl",), False),
        "G": ((pid("E"), pid("F"), "2A"), ("modifiers.axolotl",), True),
        # E for lineage: the registered adapter names the data it was trained on
        "H": ((pid("A"), pid("E"), pid("G"), "2A", "2C", "2E"),
              (*own, f"teachers:{domain}", "modifiers.registered_prefix", "eval", "gguf", "lossless"), False),
    }
    phases = []
    for step, (inputs, sections, gpu) in specs.items():
        name, title = SUBPHASES[step]
        phase_id = pid(step)
        phases.append(Phase(phase_id, f"{phase_id.lower().replace('.', '_')}_{name}", group,
                            f"{spec.title}: {title}", MODIFIER_JOBS[step], inputs, sections, gpu=gpu,
                            skip=partial(_modifier_skip, domain, step), domain=domain, step=step))
    return tuple(phases)


# ---- 6: the router, its escalation detector, thresholds, session memory -----------------------------------

ROUTING_GROUP = "phase6_routing"


def _routing_skip(cfg: PipelineConfig) -> str | None:
    if not cfg.modifiers.enabled:
        return ("no modifier enabled in this run: nothing to route between (enable one in the trigger form's "
                "Modifiers field or modifiers.enabled)")
    return None


def routing_phases(catalog: Mapping[str, ModifierDomainConfig]) -> tuple[Phase, ...]:
    """6A-6D. 6A reads every catalog domain's H (the adapters it routes to; a domain the run does not enable
    is skipped there and is no option), and the judge of each judged domain scores that domain's answers."""
    h_ids = tuple(modifier_phase_id(spec, "H") for spec in catalog.values())
    judges = tuple(f"teachers:{d}" for d, spec in catalog.items() if spec.judge)
    g = ROUTING_GROUP
    return (
        Phase("6A", "6a_router_training", g, "Router: 3-layer feed-forward over base + modifiers",
              "forge.routing.router_trainer:run", ("2C", "2E", *h_ids),
              ("routing.router", "routing.thresholds.sweep_step", "domains", "data.seed", "modifiers.enabled",
               "calibration", "eval", "gguf", *judges), skip=_routing_skip),
        Phase("6B", "6b_escalation_detector", g, "Escalation detector: MiniLM teacher -> distilled LSTM",
              "forge.routing.escalation_trainer:run", ("prep_data",), ("routing.detector",),
              skip=_routing_skip),
        Phase("6C", "6c_threshold_optimization", g, "Thresholds: offline replay, objective, A/B arms",
              "forge.routing.threshold_optimization:run", ("6A", "6B"),
              ("routing.thresholds", "routing.router.registered_model"), skip=_routing_skip),
        Phase("6D", "6d_session_memory", g, "Session memory: multi-turn replay through the routing stack",
              "forge.routing.session_replay:run", ("prep_data", "6A", "6B", "6C"), ("routing.sessions",),
              skip=_routing_skip),
    )


# ---- 8, 10A, 11A, 12A-B: serving, modes, self-consistency, self-critique -----------------------------------

SERVE_GROUP, MODES_GROUP, CRITIQUE_GROUP = "phase8_serving", "phase10_11_modes", "phase12_self_critique"


def serving_phases(catalog: Mapping[str, ModifierDomainConfig]) -> tuple[Phase, ...]:
    """12A trains the critic; 8A assembles the release (what the server loads) from 2C/2E/2F, every catalog
    domain's H (a domain the run does not enable is no option), 6B/6C and 12A; 8B-8D, 10A, 11A and 12B run the
    real server over that release."""
    h_ids = tuple(modifier_phase_id(spec, "H") for spec in catalog.values())
    return (
        Phase("12A", "12a_critique_classifier", CRITIQUE_GROUP,
              "Critique classifier: (question, answer) -> 0-10", "forge.serve.critique_trainer:run",
              ("prep_data", "2C", "2E"), ("serving.critique", "gguf", "eval")),
        Phase("8A", "8a_release_and_hub_upload", SERVE_GROUP, "Release folder + model card; HF Hub upload",
              "forge.serve.hub_release:run", ("prep_data", "2C", "2E", "2F", *h_ids, "6B", "6C", "12A", "7B"),
              ("serving.hub_upload", "modifiers.enabled")),
        Phase("8B", "8b_rest_api", SERVE_GROUP, "OpenAI-compatible REST API: contract checks, OpenAPI spec",
              "forge.serve.phase_jobs:api_check", ("8A",), ("serving",)),
        Phase("8C", "8c_gradio_chat", SERVE_GROUP, "Gradio chat with routing panel and feedback",
              "forge.serve.phase_jobs:chat_check", ("8A",), ("serving",)),
        Phase("8D", "8d_monitoring", SERVE_GROUP, "Prometheus metrics, JSON logs, Grafana dashboard",
              "forge.serve.phase_jobs:monitoring", ("8A",), ("serving",)),
        Phase("10A", "10a_fast_accurate_modes", MODES_GROUP, "Modes: fast / accurate / auto, per domain",
              "forge.serve.phase_jobs:modes_eval", ("8A",),
              ("serving", "eval", "domains", "modifiers.enabled")),
        Phase("11A", "11a_self_consistency", MODES_GROUP, "Self-consistency: sampled paths, majority vote",
              "forge.serve.phase_jobs:self_consistency_eval", ("8A",), ("serving.self_consistency", "eval")),
        Phase("12B", "12b_critique_regenerate", CRITIQUE_GROUP, "Generate -> critique -> regenerate if < 7",
              "forge.serve.phase_jobs:critique_eval", ("8A",), ("serving.critique", "eval")),
    )


# ---- 7A-7B meta-learning, 9A-9C validation ---------------------------------------------------------------

META_GROUP, VALIDATION_GROUP = "phase7_meta_learning", "phase9_validation"


def wait_task_id(phase: Phase) -> str:
    """The sensor task in front of a phase that waits for ratings: "9B.gate" -> "9b_wait_for_ratings"."""
    return f"{phase.id.split('.')[0].lower()}_wait_for_ratings"


def _human_skip(cfg: PipelineConfig) -> str | None:
    return None if cfg.validation.human.enabled else cfg.validation.human.skip_reason


META_PHASES: tuple[Phase, ...] = (
    # 2A's model: the adapter fits the base the modifiers train on (and 2C's GGUF is 2A converted)
    Phase("7A", "7a_maml", META_GROUP, "MAML: first-order over LoRA; few-shot gain on held-out task families",
          "forge.train.maml_trainer:run", ("2A",), ("meta.maml", "eval", "data.seed", "modifiers.domains"),
          gpu=True),
    Phase("7B", "7b_few_shot_templates", META_GROUP, "Few-shot templates: retrieved demonstrations",
          "forge.serve.few_shot_eval:run", ("2C", "2E"),
          ("meta.few_shot", "eval", "gguf", "data.seed", "modifiers.domains")),
)


def validation_phases() -> tuple[Phase, ...]:
    g = VALIDATION_GROUP
    return (
        Phase("9A", "9a_quality_gates", g, "Quality gates: per-domain thresholds, HumanEval (sandboxed)",
              "forge.evaluate.quality_gates:run", ("8A",),
              ("validation.gates", "serving", "eval", "data.seed", "modifiers.domains", "modifiers.enabled",
               "modifiers.registered_prefix")),
        Phase("9B.prepare", "9b_prepare_human_eval", g, "Human evaluation: blind outputs for the rating app",
              "forge.evaluate.human_study:prepare", ("8A",),
              ("validation.human", "serving", "data.seed", "modifiers.domains"),
              skip=_human_skip),
        # the ratings live in a database the store's manifests do not pin: runs every time
        Phase("9B.gate", "9b_human_eval_gate", g, "Human evaluation: mean rating gate",
              "forge.evaluate.human_study:gate", ("9B.prepare",), ("validation.human",), skip=_human_skip,
              live_inputs=True, waits_for_ratings=True),
        Phase("9C", "9c_speed_benchmarks", g, "Speed: fast / accurate tokens/s here vs the plan's targets",
              "forge.evaluate.speed_bench:run", ("8A",), ("validation.speed", "serving")),
    )


# ---- 15A: the shared backbone ----------------------------------------------------------------------------


def _backbone_skip(cfg: PipelineConfig) -> str | None:
    return cfg.backbone.skip_reason(len(cfg.modifiers.enabled))


def backbone_phases(catalog: Mapping[str, ModifierDomainConfig]) -> tuple[Phase, ...]:
    """15A reads every catalog domain's H (its adapter) and A (its held-out rows); disabled ones skip."""
    ids = tuple(modifier_phase_id(spec, s) for spec in catalog.values() for s in ("A", "H"))
    return (Phase("15A", "15a_shared_backbone", "phase15_shared_backbone",
                  "Shared backbone: the domain adapters as one shared adapter + per-domain heads",
                  "forge.modifiers.shared_backbone:run", ("2A", *ids),
                  ("backbone", "modifiers.enabled", "eval"),
                  skip=_backbone_skip),)


# ---- 13A: the weekly router retraining (its own DAG, forge_router_retraining) ----------------------------

RETRAINING_GROUP = "phase13_router_retraining"
RETRAINING_PHASES: tuple[Phase, ...] = (
    # reads serving feedback and the registry's champion: runs every time, cached by what it read
    Phase("13A.collect", "13a_collect_feedback", RETRAINING_GROUP, "The week's feedback, validated",
          "forge.routing.retraining:collect", (),
          ("routing.retraining", "routing.router.registered_model"), live_inputs=True),
    Phase("13A.retrain", "13a_retrain_router", RETRAINING_GROUP, "Challenger: the champion fine-tuned on it",
          "forge.routing.retraining:retrain", ("13A.collect",),
          ("routing.retraining", "routing.router", "routing.thresholds", "calibration")),
    Phase("13A.promote", "13a_evaluate_and_promote", RETRAINING_GROUP,
          "Challenger vs champion; promote only if better", "forge.routing.retraining:promote",
          ("13A.collect", "13A.retrain"), ("routing.retraining", "routing.thresholds")),
)


def _default_catalog() -> Mapping[str, ModifierDomainConfig]:
    """The DAG's shape: the config file's domains (FORGE_CONFIG, FORGE_PROFILE), re-read when the file
    changes."""
    import os

    from forge.config import config_stamp

    return _catalog(*config_stamp(), os.environ.get("FORGE_PROFILE"))


@lru_cache(maxsize=8)
def _catalog(
    path: str, stamp: tuple[int, int, int] | None, profile: str | None
) -> Mapping[str, ModifierDomainConfig]:
    from forge.config import load_config

    return load_config(path, profile).modifiers.domains


def pipeline_phases(catalog: Mapping[str, ModifierDomainConfig] | PipelineConfig | None = None,
                    ) -> tuple[Phase, ...]:
    """Every phase of the pipeline: the fixed ones, then A-H of each domain in the catalog (a config's
    modifiers.domains; default: the config file's). Disabled domains are here too and skip at run time."""
    if isinstance(catalog, PipelineConfig):
        catalog = catalog.modifiers.domains
    catalog = _default_catalog() if catalog is None else catalog
    mods = [p for domain, spec in catalog.items() for p in modifier_phases(domain, spec)]
    return (*PHASES, *mods, *routing_phases(catalog), *META_PHASES, *serving_phases(catalog),
            *validation_phases(), *backbone_phases(catalog))


def phases_by_id(catalog: Mapping[str, ModifierDomainConfig] | PipelineConfig | None = None,
                 ) -> dict[str, Phase]:
    return {p.id: p for p in pipeline_phases(catalog)}


# the fixed phases, and 13A's (tests swap in their own)
BY_ID: dict[str, Phase] = {p.id: p for p in (*PHASES, *META_PHASES, *validation_phases(), *RETRAINING_PHASES)}


def get_phase(phase_id: str, cfg: PipelineConfig | None = None) -> Phase:
    """A phase by id; modifier subphases come from cfg's domain catalog (default: the config file's)."""
    if phase_id in BY_ID:
        return BY_ID[phase_id]
    catalog = cfg.modifiers.domains if cfg is not None else _default_catalog()
    known = {p.id: p for p in pipeline_phases(catalog) if p.id not in BY_ID}
    try:
        return known[phase_id]
    except KeyError:
        raise KeyError(f"unknown phase {phase_id!r}; known: {[*BY_ID, *known]}") from None


def modifier_input(phase: Phase, step: str, cfg: PipelineConfig) -> str:
    """The id of a sibling subphase of a modifier phase (e.g. its collect step "A")."""
    if phase.domain is None:
        raise ValueError(f"phase {phase.id} is not a modifier subphase")
    return modifier_phase_id(cfg.modifiers.domains[phase.domain], step)
