"""Axolotl backend: our knobs -> Axolotl YAML (checked by Axolotl's own loader), one real
QLoRA train of a few steps on the tiny model in Axolotl's runtime, its MLflow logging into the run we give
it, and a resume from a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from forge.modifiers.axolotl_config import (
    AxolotlConfig,
    AxolotlConfigError,
    MlflowTarget,
    render_axolotl_yaml,
    write_axolotl_yaml,
    write_chat_jsonl,
    write_preference_jsonl,
)
from forge.modifiers.axolotl_runner import (
    AxolotlError,
    AxolotlResult,
    run_axolotl,
    stage_checkpoint,
    validate_yaml,
)
from tests.axolotl_env import needs_axolotl
from tests.tiny_model import save_tiny_model
from tests.unit.test_pruning import make_rows

# 4 optimizer steps, a checkpoint every 2: enough to see the loss move and to resume half-way
TRAIN = dict(adapter="qlora", sequence_len=64, micro_batch_size=4, max_steps=4, save_steps=2, logging_steps=1,
             learning_rate=1e-2, warmup_steps=0, lora_dropout=0.0, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model (max 128 positions) and 40 train rows in Axolotl's JSONL."""
    root = tmp_path_factory.mktemp("axolotl")
    rows = make_rows(40)
    save_tiny_model(root / "model", [m["content"] for r in rows for m in r["messages"]], vocab_size=512,
                    max_position_embeddings=128)
    write_chat_jsonl(rows, root / "train.jsonl")
    return root


def render(tiny: Path, out: str, cfg: AxolotlConfig | None = None, **kw: Any) -> dict[str, Any]:
    return render_axolotl_yaml(cfg or AxolotlConfig(**TRAIN), base_model=tiny / "model",
                               dataset_path=tiny / "train.jsonl", output_dir=tiny / out,
                               prepared_dir=tiny / "prepared", **kw)


def mlflow_run(tiny: Path, name: str) -> tuple[Any, MlflowTarget]:
    """A run in a throwaway tracking DB, standing in for the task's nested run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tiny}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("forge_test")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "forge_test", artifact_location=(tiny / "mlflow-artifacts").as_uri())
    run = client.create_run(exp_id, run_name=name)
    return client, MlflowTarget(uri, "forge_test", run.info.run_id)


def loss_by_step(client: Any, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "loss")}


# ---------------------------------------------------------------- rendering and validation


def test_invalid_knobs_fail_with_our_message_before_axolotl_runs(tiny: Path) -> None:
    # Axolotl's own loader accepts micro_batch_size 0 (and divides by it later): ours names the field
    for bad, why in (({"micro_batch_size": 0}, "micro_batch_size"), ({"lora_dropout": 1.0}, "lora_dropout"),
                     ({"adapter": "dora"}, "adapter"), ({"lora_rank": 8}, "lora_rank"),
                     ({"sample_packing": True, "attention": "eager"}, "sample_packing needs attention")):
        with pytest.raises(ValidationError, match=why):
            AxolotlConfig(**{**TRAIN, **bad})
    with pytest.raises(AxolotlConfigError, match="sequence_len=512 exceeds .*max_position_embeddings=128"):
        render(tiny, "x", AxolotlConfig(**{**TRAIN, "sequence_len": 512}))
    with pytest.raises(AxolotlConfigError, match="precision='bf16' needs a GPU"):
        render(tiny, "x", AxolotlConfig(**{**TRAIN, "precision": "bf16"}))
    with pytest.raises(AxolotlConfigError, match="eval_steps is set but there is nothing to evaluate"):
        render(tiny, "x", AxolotlConfig(**{**TRAIN, "eval_steps": 2}))
    with pytest.raises(AxolotlConfigError, match="resume_from .*not a trainer checkpoint"):
        render(tiny, "x", resume_from=tiny / "model")
    with pytest.raises(AxolotlConfigError, match="training data .*missing"):
        render_axolotl_yaml(AxolotlConfig(**TRAIN), base_model=tiny / "model",
                            dataset_path=tiny / "nope.jsonl", output_dir=tiny / "x")
    rows = make_rows(3)
    rows[1]["messages"][1]["role"] = "bot"
    with pytest.raises(AxolotlConfigError, match=r"row 1 \(id 'r1'\): messages\[1\] needs role"):
        write_chat_jsonl(rows, tiny / "bad.jsonl")
    with pytest.raises(AxolotlConfigError, match="row 0 .*no assistant turn"):
        write_chat_jsonl([{"id": "q", "messages": [{"role": "user", "content": "hi"}]}], tiny / "bad.jsonl")
    assert not (tiny / "x").exists()  # nothing was started


@needs_axolotl
def test_rendered_yaml_passes_axolotls_own_loader(tiny: Path) -> None:
    cfg = AxolotlConfig(**{**TRAIN, "val_set_size": 0.1, "eval_steps": 2, "gradient_accumulation_steps": 2})
    _, target = mlflow_run(tiny, "validate")
    path = write_axolotl_yaml(render(tiny, "validate", cfg, mlflow=target), tiny / "validate.yaml")
    seen = validate_yaml(path)
    assert seen["adapter"] == "qlora" and seen["load_in_4bit"] is True
    assert seen["batch_size"] == 8  # micro 4 x accumulation 2, as Axolotl computes it
    assert seen["dataset_types"] == ["chat_template"]
    assert seen["lora_mlp_kernel"] is False and seen["bf16"] is False  # the CPU fixes survived normalization
    assert seen["use_mlflow"] is True

    # what Axolotl itself rejects comes back with its reason, not only an exit code
    broken = {**render(tiny, "validate", cfg), "load_in_4bit": False}
    with pytest.raises(AxolotlError, match="Require cfg.load_in_4bit to be True for qlora"):
        validate_yaml(write_axolotl_yaml(broken, tiny / "broken.yaml"))


def pairs(n: int) -> list[dict[str, Any]]:
    """Preference rows: the prompt turns, the right sum as chosen, an off-by-one as rejected."""
    return [{"id": r["id"], "messages": r["messages"][:-1], "chosen": r["messages"][-1]["content"],
             "rejected": str(int(r["messages"][-1]["content"]) + 1)} for r in make_rows(n)]


@needs_axolotl
def test_dpo_yaml_passes_axolotls_own_loader(tiny: Path) -> None:
    write_preference_jsonl(pairs(8), tiny / "pairs.jsonl")
    cfg = AxolotlConfig(**{**TRAIN, "adapter": "lora"})
    rendered = render_axolotl_yaml(cfg, base_model=tiny / "model", dataset_path=tiny / "pairs.jsonl",
                                   output_dir=tiny / "dpo", prepared_dir=tiny / "prepared-dpo",
                                   preference_beta=0.2)
    seen = validate_yaml(write_axolotl_yaml(rendered, tiny / "dpo.yaml"))
    assert (seen["rl"], seen["rl_beta"]) == ("dpo", 0.2)
    assert seen["dataset_types"] == ["chat_template.default"] and seen["chat_template"] == "tokenizer_default"
    assert seen["adapter"] == "lora" and seen["lora_mlp_kernel"] is False

    # refused with our reason before Axolotl runs: a warm start Axolotl would silently drop, and bad pairs
    (tiny / "warm").mkdir(exist_ok=True)
    (tiny / "warm" / "adapter_config.json").write_text("{}")
    with pytest.raises(AxolotlConfigError, match="init_adapter with DPO: .*drop the adapter's weights"):
        render_axolotl_yaml(cfg, base_model=tiny / "model", dataset_path=tiny / "pairs.jsonl",
                            output_dir=tiny / "dpo", init_adapter=tiny / "warm", preference_beta=0.2)
    good = pairs(2)
    for bad, why in (({"rejected": good[0]["chosen"]}, "are the same answer"),
                     ({"rejected": "  "}, "'rejected' must be a non-empty string"),
                     ({"messages": [*good[0]["messages"], {"role": "assistant", "content": "x"}]},
                      "must end with the user's")):
        with pytest.raises(AxolotlConfigError, match=why):
            write_preference_jsonl([good[1], {**good[0], **bad}], tiny / "bad-pairs.jsonl")


# ---------------------------------------------------------------- training and resume


@pytest.fixture(scope="module")
def trained(tiny: Path) -> tuple[AxolotlResult, list[int], Any, str]:
    client, target = mlflow_run(tiny, "attempt-1")
    saved: list[int] = []
    path = write_axolotl_yaml(render(tiny, "run1", mlflow=target), tiny / "run1.yaml")
    result = run_axolotl(path, mlflow_run_id=target.run_id, on_checkpoint=lambda step, _: saved.append(step))
    return result, saved, client, target.run_id


@needs_axolotl
def test_train_gives_an_adapter_that_learned_the_rows(tiny: Path, trained) -> None:
    import torch
    from peft import PeftModel

    from forge.modeling import load_model, load_tokenizer

    result, saved, client, run_id = trained
    assert result.global_step == 4 and result.resumed_from is None
    assert saved == [2, 4]  # each checkpoint reported once, as it completed
    assert all(f.is_file() for f in result.adapter_files)
    assert len([h for h in result.log_history if "loss" in h]) == 4
    # Axolotl's own MLflow logging landed in the run we gave it
    assert sorted(loss_by_step(client, run_id)) == [1, 2, 3, 4]

    tok = load_tokenizer(tiny / "model")
    ids = tok("What is 3 plus 1?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = load_model(tiny / "model", "cpu", dtype=torch.float32)
        before, base_loss = base(input_ids=ids).logits, answer_loss(base, tok)
        tuned = PeftModel.from_pretrained(base, str(result.output_dir))
        after, tuned_loss = tuned(input_ids=ids).logits, answer_loss(tuned, tok)
    assert (after - before).abs().max().item() > 1e-3
    # it learned: the answers of the training rows are likelier (a step's logged loss covers 8 answer tokens
    # of 4 rows, too few to compare one step with another)
    assert tuned_loss < base_loss, (tuned_loss, base_loss)


def answer_loss(model: Any, tok: Any, n: int = 40) -> float:
    """Mean negative log-prob of the training rows' answers after their chat prompts (the eval harness's
    teacher-forced scoring)."""
    from forge.evaluate.harness import HFBackend

    backend = HFBackend(model, tok, "cpu")
    rows = make_rows(n)
    logprobs = backend.answer_logprobs([backend.prompt(r["messages"][:-1]) for r in rows],
                                       [r["messages"][-1]["content"] for r in rows])
    return -sum(logprobs) / len(logprobs)


@needs_axolotl
def test_resume_continues_from_the_checkpoint_instead_of_restarting(tiny: Path, trained) -> None:
    first, _, client, first_run = trained
    # a retried task: checkpoint-2 comes back from the store into a fresh output dir, and the task's
    # new nested run receives the metrics
    restored = tiny / "restored-checkpoint-2"
    shutil.copytree(first.output_dir / "checkpoint-2", restored)
    ckpt = stage_checkpoint(2, restored, tiny / "run2")
    _, target = mlflow_run(tiny, "attempt-2")
    saved: list[int] = []
    path = write_axolotl_yaml(render(tiny, "run2", resume_from=ckpt, mlflow=target), tiny / "run2.yaml")
    result = run_axolotl(path, mlflow_run_id=target.run_id, on_checkpoint=lambda step, _: saved.append(step))

    assert result.resumed_from == 2 and result.global_step == 4
    assert saved == [4]  # the restored checkpoint is not reported again
    again = loss_by_step(client, target.run_id)
    assert sorted(again) == [3, 4]  # only the steps after the checkpoint were trained
    before = loss_by_step(client, first_run)
    # same optimizer, scheduler, RNG and adapter state: the same losses as the uninterrupted run
    assert again == pytest.approx({s: before[s] for s in (3, 4)}, rel=1e-4)


@needs_axolotl
def test_axolotl_failure_raises_with_the_tail_of_its_output(tiny: Path) -> None:
    rendered = {**render(tiny, "fail"), "base_model": str(tiny / "no-such-model")}
    with pytest.raises(AxolotlError, match="axolotl train .* failed with exit code") as err:
        run_axolotl(write_axolotl_yaml(rendered, tiny / "fail.yaml"))
    assert "no-such-model" in err.value.tail
