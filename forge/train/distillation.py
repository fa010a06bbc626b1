"""Phase 1C: distillation. Teachers answer the student's failures and critique its answers; Axolotl trains
SFT on the verified answers, then DPO on (verified answer, student's wrong answer) pairs. The result is one
LoRA adapter for 1A's merged model (the "enhanced base").

"Bidirectional" (forge.train.distill_config): 1B's failures go to the teachers as questions, and a sample of
the student's own answers to train rows goes to them for a critique. Everything a teacher says is checked by
the suites' checker before it is used: an answer must pass the row's check; a critique must judge the student
the way the checker does and end with a final answer that passes it.

Read top to bottom:
  1. critique format  what a teacher is asked about a student's answer, and how its reply is read
  2. items            1B's failures (hardest first) and critiques of the student's answers (a stable sample)
  3. training data    verified answers -> SFT rows; verified answer vs the student's wrong one -> a pair
  4. training         Axolotl SFT on 1A's merged model; DPO on that model merged with the SFT adapter (so
                      DPO's reference is the SFT model); SFT + DPO stacked into one adapter; checkpoints of
                      both stages go to the store and a retried task resumes from the newest
  5. evaluation       1A merged vs + adapter on dev and held-out (held-out rows trained on reported apart)
  6. job              run(ctx)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.data.records import DataError, prompt_messages, read_json_objects, read_jsonl, write_jsonl
from forge.modifiers.axolotl_runner import ADAPTER_FILES

if TYPE_CHECKING:
    from forge.data.suites import CheckResult
    from forge.evaluate.harness import EvalReport
    from forge.modifiers.axolotl_config import MlflowTarget
    from forge.modifiers.axolotl_runner import AxolotlResult
    from forge.modifiers.cascade import CascadeResult
    from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.train")

# what differs between two runs that produce the same data (transport noise; response-cache hits, whose tokens
# are not billed): kept out of cascade.json, reported as metrics
RUN_DEPENDENT_STATS = ("seconds", "http_attempts", "retries", "timeouts", "cached", "prompt_tokens",
                       "completion_tokens")
QUALITY_KEYS = ("acc", "logprob")


# ---- 1. critique format --------------------------------------------------------------------------------

# Sent as the last user turn after [question turns..., assistant: the student's answer]: the question and the
# answer stay separate messages (nothing to parse out of free text), and a teacher reads the answer as a
# reply in the conversation. The reference solver (forge.modifiers.local_teachers) recognizes this request.
CRITIQUE_REQUEST = (
    "The previous assistant message is a student model's answer to the question above; it was not written by "
    "you. Judge whether it is correct, then give the correct answer. Reply in exactly this format:\n"
    "Verdict: correct or incorrect\n"
    "Critique: what is right or wrong in the student's answer, in one or two sentences\n"
    "Final answer:\n"
    "the complete correct answer to the question, in the form the question asks for, and nothing after it")

_VERDICT = re.compile(r"^[\s*_#>-]*verdict[\s*_]*:[\s*_]*(incorrect|correct)\b", re.I | re.M)
# "**Final answer:** x" too: a closing bold marker after the colon is not part of the answer
_CRITIQUE = re.compile(r"^[\s*_#>-]*critique[ \t*_]*:(?:\*\*|__)?[ \t]*", re.I | re.M)
_FINAL = re.compile(r"^[\s*_#>-]*final answer[ \t*_]*:(?:\*\*|__)?[ \t]*", re.I | re.M)


@dataclass(frozen=True)
class Critique:
    verdict: bool | None  # the teacher's judgement of the student's answer; None: no Verdict line
    critique: str
    final_answer: str | None  # None: no (or an empty) "Final answer:" section


def _ws(text: Any) -> str:
    return " ".join(str(text).split())


def critique_messages(row: Mapping[str, Any], student_answer: str) -> list[dict[str, str]]:
    """The conversation a teacher gets to critique `student_answer` to `row`'s question."""
    return [*prompt_messages(dict(row)), {"role": "assistant", "content": student_answer},
            {"role": "user", "content": CRITIQUE_REQUEST}]


def split_critique(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, str]], str] | None:
    """(question turns, student's answer) of a critique conversation; None for anything else."""
    msgs = [dict(m) for m in messages]
    if len(msgs) < 3 or msgs[-1].get("role") != "user" or _ws(msgs[-1].get("content", "")) != _ws(
            CRITIQUE_REQUEST):
        return None
    if msgs[-2].get("role") != "assistant" or not any(m.get("role") == "user" for m in msgs[:-2]):
        return None
    return msgs[:-2], str(msgs[-2].get("content", ""))


def format_critique(correct: bool, critique: str, final_answer: str) -> str:
    """A reply in the requested format (what the reference solver sends)."""
    return (f"Verdict: {'correct' if correct else 'incorrect'}\nCritique: {_ws(critique)}\n"
            f"Final answer:\n{final_answer}")


def parse_critique(text: str) -> Critique:
    """The verdict (the first Verdict line), the critique, and everything after the first "Final answer:"
    that follows the verdict (an answer may itself contain the words "Final answer")."""
    verdict_m = _VERDICT.search(text)
    verdict = None if verdict_m is None else verdict_m.group(1).lower() == "correct"
    start = verdict_m.end() if verdict_m else 0
    final_m = _FINAL.search(text, start)
    final = text[final_m.end():].strip() if final_m else ""
    critique_m = _CRITIQUE.search(text, start)
    critique = ""
    if critique_m:
        end = final_m.start() if final_m and final_m.start() >= critique_m.end() else len(text)
        critique = text[critique_m.end():end].strip()
    return Critique(verdict, critique, final or None)


# ---- 2. items ------------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict[str, Any]]:
    """Eval records (forge.evaluate.harness.RECORD_FIELDS) from JSONL: not chat rows, so not read_jsonl."""
    if not path.is_file():
        raise DataError(f"{path}: missing (1B writes its eval records there)")
    return read_json_objects(path, ("id", "output", "correct", "logprob"), "an eval record")


def _cluster_of(clusters_path: Path) -> dict[str, int]:
    if not clusters_path.is_file():
        return {}
    try:
        clusters = json.loads(clusters_path.read_text()).get("clusters", [])
        return {str(m): int(c["id"]) for c in clusters for m in c.get("member_ids", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{clusters_path}: not 1B's clusters file ({type(exc).__name__}: {exc})") from exc


def failure_items(one_b_dir: Path, heldout: Sequence[dict[str, Any]], limit: int,
                  timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """1B's failed held-out rows, hardest first (lowest reference log-prob, as 1B ranks them), at most
    `limit`: each row with the student's wrong output (`student`) and its 1B cluster."""
    from forge.data.suites import check_answer

    records = read_records(one_b_dir / "records.jsonl")
    cluster_of = _cluster_of(one_b_dir / "clusters.json")
    by_id = {r["id"]: r for r in heldout}
    failed = sorted((r for r in records if not r["correct"]),
                    key=lambda r: (float(r["logprob"]), str(r["id"])))
    missing = [r["id"] for r in failed if r["id"] not in by_id]
    if missing:
        raise DataError(f"{one_b_dir / 'records.jsonl'}: failures {missing[:5]} have no row in prep_data's "
                        "heldout.jsonl (1B and prep_data of different runs?)")
    items = []
    for rec in failed[:limit]:
        row = by_id[rec["id"]]
        student = str(rec["output"])
        items.append({**row, "id": f"failure:{row['id']}", "row_id": row["id"], "kind": "failure",
                      "student": student, "student_correct": check_answer(row, student, timeout_s).correct,
                      "cluster": cluster_of.get(str(row["id"]))})
    return items


def critique_sample(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """n rows in a stable pseudo-random order of (seed, id): the same rows for the same data and seed."""
    def order(row: dict[str, Any]) -> str:
        return hashlib.sha256(f"{seed}|{row['id']}".encode()).hexdigest()

    return sorted(rows, key=order)[:n]


def critique_items(rows: Sequence[dict[str, Any]], student: Mapping[str, Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
    """Each row with the student's answer to it (`student`: eval records by row id)."""
    items = []
    for row in rows:
        rec = student[row["id"]]
        items.append({**row, "id": f"critique:{row['id']}", "row_id": row["id"], "kind": "critique",
                      "student": str(rec["output"]), "student_correct": bool(rec["correct"])})
    return items


def item_prompt(item: Mapping[str, Any]) -> list[dict[str, str]]:
    """What the teachers get: a failure's question, or a critique conversation."""
    if item["kind"] == "critique":
        return critique_messages(item, item["student"])
    return prompt_messages(dict(item))


def item_answer(item: Mapping[str, Any], reply: str) -> str | None:
    """The answer a teacher's reply gives to the item's question."""
    return parse_critique(reply).final_answer if item["kind"] == "critique" else reply


def make_verify(timeout_s: float):
    """verify(item, reply) for the cascade: a failure's answer must pass the row's check; a critique must
    judge the student as the check does and give a final answer that passes it."""
    from forge.data.suites import CheckResult, check_answer

    def verify(item: Mapping[str, Any], reply: str) -> CheckResult:
        if item["kind"] != "critique":
            return check_answer(dict(item), reply, timeout_s)
        crit = parse_critique(reply)
        if crit.verdict is None:
            return CheckResult(False, "the critique has no 'Verdict: correct|incorrect' line")
        if crit.final_answer is None:
            return CheckResult(False, "the critique has no 'Final answer:' section")
        if crit.verdict != item["student_correct"]:
            said = "correct" if crit.verdict else "incorrect"
            return CheckResult(False, f"the verdict ({said}) contradicts the suite check of the student's "
                                      "answer")
        result = check_answer(dict(item), crit.final_answer, timeout_s)
        return CheckResult(result.correct, f"final answer: {result.detail}")

    return verify


# ---- 3. training data ----------------------------------------------------------------------------------

@dataclass
class DistillData:
    sft: list[dict[str, Any]]  # records schema: prompt turns + the verified teacher answer; the row's check
    pairs: list[dict[str, Any]]  # messages (prompt turns), chosen (verified), rejected (the student's, wrong)
    counts: dict[str, int]


def _prompt_key(messages: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([[m["role"], _ws(m["content"])] for m in messages])


def build_data(items: Sequence[dict[str, Any]], result: CascadeResult) -> DistillData:
    """SFT rows from every accepted item (the first per prompt; failures come first), and a preference pair
    wherever the student's answer failed the check (`student_correct`) and is not empty."""
    by_id = {r.id: r for r in result.items}
    sft: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    seen_sft: set[str] = set()
    seen_pairs: set[str] = set()
    counts: Counter[str] = Counter()
    for item in items:
        kind, res = item["kind"], by_id[item["id"]]
        counts[f"{kind}.items"] += 1
        answer = item_answer(item, res.answer or "") if res.status == "accepted" else None
        if not answer:
            continue
        counts[f"{kind}.accepted"] += 1
        prompt = prompt_messages(item)
        key = _prompt_key(prompt)
        source = f"distill:{kind}:{res.teacher}"
        row_id = f"1c-{kind}-{item['row_id']}"
        if key in seen_sft:
            counts["sft.duplicates"] += 1
        else:
            seen_sft.add(key)
            sft.append({"id": row_id, "domain": item["domain"],
                        "messages": [*prompt, {"role": "assistant", "content": answer}],
                        "check": item["check"], "source": source, "task": item.get("task"),
                        "teacher": res.teacher, "tier": res.tier})
        rejected = item["student"]
        if item["student_correct"] or not rejected.strip() or key in seen_pairs:
            continue
        seen_pairs.add(key)
        pairs.append({"id": row_id, "domain": item["domain"], "messages": prompt, "chosen": answer,
                      "rejected": rejected, "check": item["check"], "source": source, "teacher": res.teacher})
    counts["sft_rows"], counts["pairs"] = len(sft), len(pairs)
    return DistillData(sft, pairs, dict(sorted(counts.items())))


def cascade_summary(name: str, items: Sequence[Mapping[str, Any]], result: CascadeResult) -> dict[str, Any]:
    """cascade.json: per tier what it was sent, accepted and cost; per item kind what was accepted where."""
    by_id = {r.id: r for r in result.items}
    kinds: dict[str, dict[str, Any]] = {}
    for item in items:
        res = by_id[item["id"]]
        k = kinds.setdefault(item["kind"], {"items": 0, "accepted": 0, "by_teacher": {}})
        k["items"] += 1
        if res.status == "accepted":
            k["accepted"] += 1
            k["by_teacher"][res.teacher] = k["by_teacher"].get(res.teacher, 0) + 1
    tiers = [{k: v for k, v in asdict(t).items() if k not in RUN_DEPENDENT_STATS} for t in result.tiers]
    return {"cascade": name, "tiers": tiers, "kinds": kinds, "cost_usd": result.cost_usd,
            "stopped": result.stopped}


# ---- 4. training ---------------------------------------------------------------------------------------

class AdapterError(ValueError):
    """An adapter that cannot be stacked or exported as a plain LoRA."""


def _lora_scale(cfg: Mapping[str, Any], where: Path) -> float:
    plain = {"peft_type": "LORA", "use_dora": False, "bias": "none"}
    for key, want in plain.items():
        if cfg.get(key, want) != want:
            raise AdapterError(f"{where}: {key}={cfg.get(key)!r}; only plain LoRA adapters ({plain}) stack")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters"):
        if cfg.get(key):
            raise AdapterError(f"{where}: {key} is set; only plain LoRA adapters stack")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r


def stack_adapters(first: Path, second: Path, out_dir: Path, base: str) -> Path:
    """One LoRA equal to `first` followed by `second`, where `second` was trained on the model with `first`
    merged in. Their ranks side by side, each B scaled by its own alpha/r, and alpha = r (scale 1):
    [B1 s1 | B2 s2] [A1; A2] = B1 A1 s1 + B2 A2 s2, exactly. A module only one of them adapts gets zeros."""
    import torch
    from safetensors.torch import load_file, save_file

    dirs = (first, second)
    cfgs = [json.loads((d / "adapter_config.json").read_text()) for d in dirs]
    scales = [_lora_scale(c, d) for c, d in zip(cfgs, dirs, strict=True)]
    if cfgs[0].get("fan_in_fan_out") != cfgs[1].get("fan_in_fan_out"):
        raise AdapterError(f"{first} and {second} differ in fan_in_fan_out")
    tensors = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    modules: set[str] = set()
    for d, t in zip(dirs, tensors, strict=True):
        for key in t:
            if not re.search(r"\.lora_[AB]\.weight$", key):
                raise AdapterError(f"{d}: tensor {key} is not a LoRA A/B weight")
            modules.add(key.rsplit(".lora_", 1)[0])
    out: dict[str, Any] = {}
    for m in sorted(modules):
        pairs = [(t.get(f"{m}.lora_A.weight"), t.get(f"{m}.lora_B.weight")) for t in tensors]
        shape = next((a.shape[1], b.shape[0]) for a, b in pairs if a is not None and b is not None)
        a_parts, b_parts = [], []
        for (a, b), c, s in zip(pairs, cfgs, scales, strict=True):
            if a is None or b is None:
                a, b = torch.zeros(int(c["r"]), shape[0]), torch.zeros(shape[1], int(c["r"]))
            a_parts.append(a.float())
            b_parts.append(b.float() * s)
        out[f"{m}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        out[f"{m}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    rank = sum(int(c["r"]) for c in cfgs)
    targets = [c["target_modules"] for c in cfgs]
    if all(isinstance(t, list) for t in targets):
        target: Any = sorted(set(targets[0]) | set(targets[1]))
    elif targets[0] == targets[1]:
        target = targets[0]
    else:
        raise AdapterError(f"{first} and {second} name their target modules differently: {targets}")
    config = {**cfgs[0], "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": target,
              "base_model_name_or_path": base, "inference_mode": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def export_adapter(src: Path, out_dir: Path, base: str) -> Path:
    """The adapter's two files, naming `base` (not a local path, which would name this run) as its base."""
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise AdapterError(f"{src}: no {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


@dataclass
class Restored:
    """The newest checkpoint in the store: its stage, Axolotl step and folder (see StageCheckpoints)."""

    stage: str
    step: int
    folder: Path
    info: dict[str, Any]


class StageCheckpoints:
    """Axolotl checkpoints of both stages in the artifact store (it keeps only the newest). A stored
    checkpoint is a folder: stage.json ({stage, step, sft summary for DPO}), trainer/ (Axolotl's checkpoint-N)
    and, for DPO, sft_adapter/ (DPO's base is 1A merged + this). Store steps continue across stages (DPO's =
    SFT's last + N), so every save has its own folder."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def restored(self) -> Restored | None:
        latest = self.ctx.latest_checkpoint()
        if latest is None:
            return None
        folder = latest[1]
        info = json.loads((folder / "stage.json").read_text())
        log.info("1C: resuming from the stored %s checkpoint at step %d", info["stage"], info["step"])
        return Restored(info["stage"], int(info["step"]), folder, info)

    def saver(self, stage: str, offset: int, sft_adapter: Path | None = None,
              sft_summary: dict[str, Any] | None = None):
        def save(step: int, ckpt: Path) -> None:
            payload = self.ctx.work_dir / "checkpoint-payload"
            shutil.rmtree(payload, ignore_errors=True)
            shutil.copytree(ckpt, payload / "trainer")
            if sft_adapter is not None:
                (payload / "sft_adapter").mkdir()
                for name in ADAPTER_FILES:
                    shutil.copyfile(sft_adapter / name, payload / "sft_adapter" / name)
            info = {"stage": stage, "step": step, "sft": sft_summary}
            (payload / "stage.json").write_text(json.dumps(info))
            self.ctx.save_checkpoint(offset + step, payload)
            shutil.rmtree(payload, ignore_errors=True)
            log.info("1C: %s checkpoint at step %d saved to the store", stage, step)

        return save


@dataclass
class StageOutcome:
    stage: str
    steps: int
    resumed_from: int | None
    metrics: dict[str, float]  # the last logged value of each (axolotl_runner.summarize_history)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "resumed_from": self.resumed_from, "metrics": self.metrics}


@contextlib.contextmanager
def _mlflow_target(ctx: JobContext, stage: str) -> Iterator[MlflowTarget | None]:
    """SFT logs into the task's MLflow run; DPO into a run nested under it (the same metric names, e.g.
    loss, mean different things in the two stages)."""
    from forge.modifiers.axolotl_config import MlflowTarget

    if ctx.mlflow is None:
        yield None
        return
    tracking = ctx.config.tracking
    if stage == "sft":
        yield MlflowTarget(tracking.tracking_uri, tracking.experiment, ctx.mlflow.id)
        return
    tracker = ctx.mlflow.tracker
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"{ctx.phase.task_id}_{stage}",
                                    tags={"mlflow.parentRunId": ctx.mlflow.id, "forge.run_id": ctx.run_id,
                                          "forge.kind": "stage", "forge.phase": ctx.phase.id,
                                          "forge.stage": stage})
    status = "FAILED"
    try:
        yield MlflowTarget(tracking.tracking_uri, tracking.experiment, run.info.run_id)
        status = "FINISHED"
    finally:
        tracker.client.set_terminated(run.info.run_id, status=status)


def _axolotl_stage(ctx: JobContext, stage: str, *, base_model: Path, data: Path, out: Path,
                   restored: Restored | None, checkpoints: StageCheckpoints, offset: int,
                   preference_beta: float | None = None, sft_adapter: Path | None = None,
                   sft_summary: dict[str, Any] | None = None) -> tuple[AxolotlResult, StageOutcome]:
    from forge.modifiers.axolotl_config import render_axolotl_yaml, write_axolotl_yaml
    from forge.modifiers.axolotl_runner import run_axolotl, stage_checkpoint

    dcfg = ctx.config.distill
    axo = dcfg.axolotl
    if stage == "dpo":  # Axolotl refuses rl + sample_packing (production packs the SFT stage)
        axo = axo.model_copy(update={"sample_packing": False, **(
            {"max_steps": dcfg.dpo_max_steps} if dcfg.dpo_max_steps is not None else {})})
    resume = None
    if restored is not None and restored.stage == stage:
        resume = stage_checkpoint(restored.step, restored.folder / "trainer", out)
    with _mlflow_target(ctx, stage) as target:
        rendered = render_axolotl_yaml(axo, base_model=base_model, dataset_path=data, output_dir=out,
                                       prepared_dir=ctx.work_dir / f"prepared-{stage}", resume_from=resume,
                                       mlflow=target, preference_beta=preference_beta)
        yaml_path = write_axolotl_yaml(rendered, ctx.work_dir / f"axolotl-{stage}.yaml")
        result = run_axolotl(yaml_path, mlflow_run_id=target.run_id if target else None,
                             on_checkpoint=checkpoints.saver(stage, offset, sft_adapter, sft_summary))
    outcome = StageOutcome(stage, result.global_step, result.resumed_from, result.metrics)
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    log.info("1C: %s done: %d steps%s, last loss %s", stage, result.global_step, resumed,
             result.metrics.get("loss"))
    return result, outcome


@dataclass
class Trained:
    sft: StageOutcome
    dpo: StageOutcome | None
    adapter_dir: Path
    rank: int


def train_adapter(ctx: JobContext, merged: Path, sft_path: Path, pairs_path: Path | None,
                  device: str) -> Trained:
    """SFT on 1A's merged model; then (pairs_path) DPO on merged + SFT adapter; the adapter for 1A's merged
    model in out_dir/adapter (SFT's, or SFT + DPO stacked)."""
    from forge.modeling import load_tokenizer
    from forge.train.qlora_trainer import merge_adapter

    work = ctx.work_dir
    base = "forge:1A"  # what the adapter names as its base (qlora_trainer.base_name's convention)
    checkpoints = StageCheckpoints(ctx)
    restored = checkpoints.restored()
    if restored is not None and restored.stage == "dpo":  # SFT finished before the task was stopped
        # a copy: the store drops the restored checkpoint once DPO saves a newer one
        sft_adapter = export_adapter(restored.folder / "sft_adapter", work / "sft-adapter", base)
        info = restored.info["sft"]
        sft = StageOutcome("sft", int(info["steps"]), info["resumed_from"], info["metrics"])
    else:
        result, sft = _axolotl_stage(ctx, "sft", base_model=merged, data=sft_path, out=work / "sft",
                                     restored=restored, checkpoints=checkpoints, offset=0)
        sft_adapter = result.output_dir
    final = ctx.out_dir / "adapter"
    if pairs_path is None:
        export_adapter(sft_adapter, final, base)
        return Trained(sft, None, final, int(json.loads((final / "adapter_config.json").read_text())["r"]))
    # Axolotl 0.19 drops lora_model_dir's weights under rl: dpo (axolotl_config's doc): DPO trains a new
    # LoRA on the SFT model itself, which is then also DPO's reference (adapter disabled), as DPO wants
    dpo_base = work / "sft-merged"
    merge_adapter(str(merged), sft_adapter, dpo_base, load_tokenizer(merged), device)
    result, dpo = _axolotl_stage(ctx, "dpo", base_model=dpo_base, data=pairs_path, out=work / "dpo",
                                 restored=restored, checkpoints=checkpoints, offset=sft.steps,
                                 preference_beta=ctx.config.distill.dpo_beta, sft_adapter=sft_adapter,
                                 sft_summary=sft.summary())
    stack_adapters(sft_adapter, result.output_dir, final, base)
    shutil.rmtree(dpo_base, ignore_errors=True)
    return Trained(sft, dpo, final, int(json.loads((final / "adapter_config.json").read_text())["r"]))


# ---- 5. evaluation -------------------------------------------------------------------------------------

def evaluate_merged(merged: Path, adapter: Path | None, rows: Sequence[dict[str, Any]], ctx: JobContext,
                    device: str) -> EvalReport:
    """The HF harness on 1A's merged model, with the adapter merged in when given."""
    import torch

    from forge.evaluate.harness import evaluate
    from forge.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(merged)
    model = load_model(str(merged), device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    try:
        return evaluate(model, tokenizer, rows, ctx.config.eval, device)
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def _summary(records: list[dict[str, Any]]) -> dict[str, float]:
    from forge.evaluate.harness import EvalReport

    return EvalReport(records=records).summary()


def compare(before: EvalReport, after: EvalReport,
            groups: Mapping[str, set[str]]) -> dict[str, dict[str, Any]]:
    """eval.json: per group of row ids, the before and after summaries and how many outputs changed."""
    b = {r["id"]: r for r in before.records}
    a = {r["id"]: r for r in after.records}
    report: dict[str, dict[str, Any]] = {}
    for name, ids in groups.items():
        keep = sorted(i for i in ids if i in a and i in b)
        if keep:
            report[name] = {"n": len(keep), "before": _summary([b[i] for i in keep]),
                            "after": _summary([a[i] for i in keep]),
                            "outputs_changed": sum(a[i]["output"] != b[i]["output"] for i in keep)}
    return report


def quality_of(report: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The ledger's quality: acc and logprob on the clean rows (never trained on) with their before and delta
    (ledger.with_deltas); the held-out rows trained on, apart: their acc says what was learnt, not how well
    it generalizes."""
    from forge.ledger import with_deltas

    quality: dict[str, float] = {}
    clean = report.get("clean")
    if clean:
        quality.update(with_deltas({k: clean["after"][k] for k in QUALITY_KEYS}, clean["before"]))
        quality["n"] = float(clean["n"])
    taught = report.get("heldout_taught")
    if taught:
        quality.update({"taught.acc": taught["after"]["acc"], "taught.acc_before": taught["before"]["acc"],
                        "taught.n": float(taught["n"])})
    return quality


# ---- 6. job --------------------------------------------------------------------------------------------

def ask_teachers(ctx: JobContext, items: list[dict[str, Any]]) -> CascadeResult:
    """All items through the distill cascade's tiers in one task (final=True), within the cost cap."""
    from forge.modifiers.cascade import run_cascade, tiers_from_config
    from forge.modifiers.endpoints import started_teachers
    from forge.modifiers.teachers import CostTracker, ResponseCache

    cfg = ctx.config
    name = cfg.distill.cascade
    teachers = [teacher for _, teacher in cfg.teachers.tiers_for(name)]
    cost = CostTracker(cfg.teachers.cost_cap_usd)
    cache = ResponseCache(ctx.store) if cfg.teachers.cache else None
    with started_teachers(ctx, teachers, items) as ready:
        tiers = tiers_from_config(cfg.teachers, name, ready)
        return run_cascade(items, tiers, make_verify(cfg.eval.code_timeout_s), cost, cache,
                           prompt=item_prompt, final=True)


def run(ctx: JobContext) -> JobResult:
    from forge.modifiers.axolotl_config import resolve_device, write_chat_jsonl, write_preference_jsonl
    from forge.runner import JobResult

    cfg = ctx.config
    dcfg = cfg.distill
    data_dir = ctx.input_dir("prep_data")
    merged = ctx.input_dir("1A") / "merged"
    if not (merged / "config.json").is_file():
        raise DataError(f"1C needs 1A's merged model at {merged} (config.json missing)")
    dev, heldout = read_jsonl(data_dir / "dev.jsonl"), read_jsonl(data_dir / "heldout.jsonl")
    timeout = cfg.eval.code_timeout_s
    failures = failure_items(ctx.input_dir("1B"), heldout, dcfg.failures, timeout)
    sample = critique_sample(read_jsonl(data_dir / "train.jsonl"), dcfg.critiques, cfg.data.seed)
    device = resolve_device(dcfg.axolotl)

    # the student answers the critique sample; the same pass scores it on dev + held-out ("before")
    log.info("1C: the student answers %d train rows for critique and is scored on %d dev + %d held-out rows",
             len(sample), len(dev), len(heldout))
    before = evaluate_merged(merged, None, [*sample, *dev, *heldout], ctx, device)
    student = {r["id"]: r for r in before.records}
    items = failures + critique_items(sample, student)
    if not items:
        raise DataError("1C: nothing to distill: 1B found no failures and distill.critiques is 0")

    result = ask_teachers(ctx, items)
    data = build_data(items, result)
    out = ctx.out_dir
    write_jsonl(out / "sft.jsonl", data.sft)
    write_jsonl(out / "preference.jsonl", data.pairs)
    summary = cascade_summary(dcfg.cascade, items, result)
    (out / "cascade.json").write_text(json.dumps({**summary, "counts": data.counts}, indent=2,
                                                 sort_keys=True))
    log.info("1C: %s; %d SFT rows, %d preference pairs", result.notes(), len(data.sft), len(data.pairs))
    if len(data.sft) < dcfg.min_rows:
        raise DataError(f"1C: only {len(data.sft)} verified SFT rows (failures accepted "
                        f"{data.counts.get('failure.accepted', 0)}/{data.counts.get('failure.items', 0)}, "
                        f"critiques {data.counts.get('critique.accepted', 0)}/"
                        f"{data.counts.get('critique.items', 0)}); distill.min_rows is {dcfg.min_rows}. "
                        f"Teachers: {result.notes()}")

    sft_path = write_chat_jsonl(data.sft, ctx.work_dir / "sft-chat.jsonl", "1C sft rows")
    use_dpo = dcfg.preference == "dpo" and bool(data.pairs)
    pairs_path = (write_preference_jsonl(data.pairs, ctx.work_dir / "pairs.jsonl", "1C pairs")
                  if use_dpo else None)
    trained = train_adapter(ctx, merged, sft_path, pairs_path, device)

    taught = {str(r["id"]).removeprefix("1c-failure-") for r in data.sft if r["id"].startswith("1c-failure-")}
    dev_ids, held_ids = {r["id"] for r in dev}, {r["id"] for r in heldout}
    groups = {"clean": dev_ids | (held_ids - taught), "dev": dev_ids, "heldout_unseen": held_ids - taught,
              "heldout_taught": held_ids & taught}
    after = evaluate_merged(merged, trained.adapter_dir, [*dev, *heldout], ctx, device)
    report = compare(before, after, groups)
    (out / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    quality = quality_of(report)

    tier_q = {f"tier{t.tier}.{s}": float(getattr(t, s)) for t in result.tiers for s in ("sent", "accepted")}
    tier_q.update({f"tier{t.tier}.cost_usd": t.cost_usd for t in result.tiers})
    quality.update(sft_rows=float(len(data.sft)), pairs=float(len(data.pairs)), **tier_q,
                   cost_usd=result.cost_usd)
    metrics = {**quality, **{f"teachers.{k}": float(v) for k, v in result.quality().items()},
               **{f"{g}.{k}": v for g, r in report.items() for k, v in r["after"].items()},
               "sft_steps": float(trained.sft.steps), "adapter_rank": float(trained.rank)}
    metrics.update({_metric_name(f"sft.{k}"): v for k, v in trained.sft.metrics.items()})
    if trained.dpo is not None:
        metrics["dpo_steps"] = float(trained.dpo.steps)
        metrics.update({_metric_name(f"dpo.{k}"): v for k, v in trained.dpo.metrics.items()})
    notes = _notes(data, result, trained, quality, report, dcfg.preference)
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"adapter": "adapter", "base": "1A merged", "sft_rows": len(data.sft),
                           "pairs": len(data.pairs), "preference": dcfg.preference if use_dpo else "none",
                           "adapter_rank": trained.rank, "device": device})


def _metric_name(name: str) -> str:
    """Axolotl logs names such as "memory/max_active (GiB)"; MLflow refuses parentheses."""
    return re.sub(r"[^\w\-. :/]", "_", name).strip("_ ")


def _notes(data: DistillData, result: CascadeResult, trained: Trained, quality: Mapping[str, float],
           report: Mapping[str, Any], preference: str) -> str:
    c = data.counts
    parts = [f"{len(data.sft)} SFT rows (failures {c.get('failure.accepted', 0)}/{c.get('failure.items', 0)} "
             f"and critiques {c.get('critique.accepted', 0)}/{c.get('critique.items', 0)} verified), "
             f"{len(data.pairs)} pairs",
             "teachers: " + "; ".join(f"t{t.tier} {t.teacher} {t.accepted}/{t.sent} ${t.cost_usd:.4f}"
                                      for t in result.tiers)]
    train = f"SFT {trained.sft.steps} steps"
    if trained.dpo is not None:
        train += f" + DPO {trained.dpo.steps} steps (stacked adapter r={trained.rank})"
    elif preference == "dpo":
        train += " (no DPO: no pairs)"
    parts.append(train)
    clean = report.get("clean")
    if clean:
        rows = round(quality["delta_acc"] * clean["n"])  # on small eval sets a row or two is noise
        parts.append(f"dev + unseen held-out ({clean['n']} rows) acc {quality['acc_before']:.3f} -> "
                     f"{quality['acc']:.3f} ({rows:+d} rows), logprob {quality['logprob_before']:.3f} -> "
                     f"{quality['logprob']:.3f}")
    taught = report.get("heldout_taught")
    if taught:
        parts.append(f"held-out rows trained on ({taught['n']}; not a generalization measure) acc "
                     f"{taught['before']['acc']:.3f} -> {taught['after']['acc']:.3f}")
    if trained.sft.resumed_from or (trained.dpo and trained.dpo.resumed_from):
        parts.append("resumed from a stored checkpoint")
    if result.stopped:
        parts.append(f"cost cap stopped the teachers: {len(result.unsent)} unsent")
    return "; ".join(parts)
