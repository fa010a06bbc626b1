"""The evaluation harness: greedy answers checked by the task suites, plus the log-prob of the reference.

`evaluate()` is written against a small `Backend` protocol (generate / answer_logprobs), so a
llama.cpp (GGUF) backend can be added beside `HFBackend` without touching the scoring code.
torch/transformers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forge.config import EvalConfig
from forge.data.records import DataError, prompt_messages, reference, write_jsonl

log = logging.getLogger("forge.evaluate")

RECORD_FIELDS = ("id", "domain", "prompt", "reference", "output", "correct", "detail", "logprob")


class Backend(Protocol):
    """What the harness needs from an inference engine. Prompts are fully rendered text."""

    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy completions (new text only, special tokens dropped), one per prompt."""
        ...

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Mean per-token log-prob of each answer (followed by end-of-turn) after its prompt."""
        ...

    def answer_logprobs_at(self, prompts: list[str], answers: list[str],
                           temperatures: Sequence[float]) -> list[list[float]]:
        """Like answer_logprobs, with the logits divided by each temperature before the softmax:
        one row per answer, one column per temperature (2F's temperature scaling searches them)."""
        ...


@dataclass
class EvalReport:
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """acc (overall), acc.<domain>, logprob (mean of per-row mean token log-probs), n."""
        if not self.records:
            return {"n": 0.0}
        out: dict[str, float] = {
            "acc": sum(r["correct"] for r in self.records) / len(self.records),
            "logprob": sum(r["logprob"] for r in self.records) / len(self.records),
            "n": float(len(self.records)),
        }
        for domain, recs in sorted(self.by_domain().items()):
            out[f"acc.{domain}"] = sum(r["correct"] for r in recs) / len(recs)
        return out

    def by_domain(self) -> dict[str, list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            groups[r["domain"]].append(r)
        return dict(groups)

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r["correct"]]

    def to_jsonl(self, path: str | Path) -> Path:
        write_jsonl(path, self.records)
        return Path(path)

    def to_markdown(self) -> str:
        """One line per domain plus the total: the table a person reads in a report or the ledger."""
        lines = ["| domain | n | acc | logprob |", "|---|---:|---:|---:|"]
        for domain, recs in sorted(self.by_domain().items()):
            lines.append(_md_row(domain, recs))
        if self.records:
            lines.append(_md_row("**all**", self.records))
        return "\n".join(lines) + "\n"


def _md_row(name: str, recs: list[dict[str, Any]]) -> str:
    acc = sum(r["correct"] for r in recs) / len(recs)
    lp = sum(r["logprob"] for r in recs) / len(recs)
    return f"| {name} | {len(recs)} | {acc:.3f} | {lp:.3f} |"


def run_eval(
    backend: Backend,
    rows: Sequence[dict[str, Any]],
    cfg: EvalConfig,
    build_prompt: Callable[[list[dict[str, str]]], str],
) -> EvalReport:
    """Generate, check and score every row with any backend. The core of `evaluate()`."""
    from forge.data.suites import check_answer  # written by the data suites; imported late

    if not rows:
        raise DataError("evaluate: no rows to evaluate (empty split?)")
    started = time.time()
    records: list[dict[str, Any]] = []
    n_batches = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
    for b in range(n_batches):
        batch = rows[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        prompts = [build_prompt(prompt_messages(r)) for r in batch]
        refs = [reference(r) for r in batch]
        outputs = backend.generate(prompts)
        logprobs = backend.answer_logprobs(prompts, refs)
        if len(outputs) != len(batch) or len(logprobs) != len(batch):
            raise RuntimeError(f"backend {type(backend).__name__} returned {len(outputs)} outputs and "
                               f"{len(logprobs)} log-probs for {len(batch)} prompts")
        for row, prompt, ref, out, lp in zip(batch, prompts, refs, outputs, logprobs, strict=True):
            check = check_answer(row, out, cfg.code_timeout_s)
            records.append({"id": row["id"], "domain": row["domain"], "prompt": prompt, "reference": ref,
                            "output": out, "correct": bool(check.correct), "detail": check.detail,
                            "logprob": float(lp)})
        done = len(records)
        acc = sum(r["correct"] for r in records) / done
        log.info("eval batch %d/%d: %d rows, acc so far %.3f, %.1f rows/s", b + 1, n_batches, done, acc,
                 done / max(time.time() - started, 1e-9))
    return EvalReport(records=records, seconds=time.time() - started)


class HFBackend:
    """A transformers causal LM (plain, quantized or peft-wrapped) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, device: str, max_new_tokens: int = 64,
                 batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.stop_ids = _stop_ids(model, tokenizer)
        # Prompts longer than the context are cut from the left (the question's end matters most).
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_prompt_len = max(8, max_pos - max_new_tokens) if max_pos else None

    def prompt(self, messages: list[dict[str, str]]) -> str:
        from forge.modeling import chat_prompt

        return chat_prompt(self.tokenizer, messages)

    def _encode(self, texts: list[str], side: str):
        tok = self.tokenizer
        old_pad, old_trunc = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = side, "left"
        try:
            # The chat template already placed every special token the model expects (BOS included).
            return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                       truncation=self.max_prompt_len is not None, max_length=self.max_prompt_len)
        finally:
            tok.padding_side, tok.truncation_side = old_pad, old_trunc

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        outputs: list[str] = []
        for chunk in _chunks(prompts, self.batch_size):
            enc = self._encode(chunk, "left").to(self.device)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None,
                    top_p=None, top_k=None, eos_token_id=self.stop_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = gen[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return outputs

    def _prompt_answer_ids(self, prompts: list[str],
                           answers: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids and answer ids (see answer_ids), a batch at a time."""
        tok = self.tokenizer
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        joint = [p + a for p, a in zip(prompts, answers, strict=True)]
        full = tok(joint, add_special_tokens=False)["input_ids"]
        a_ids = [answer_ids(p, f, lambda answer=answer: tok(answer, add_special_tokens=False)["input_ids"])
                 for p, f, answer in zip(p_ids, full, answers, strict=True)]
        return p_ids, a_ids

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Teacher-forced mean token log-prob of answer + EOS: answer_logprobs_at at T=1 (one code path)."""
        return [row[0] for row in self.answer_logprobs_at(prompts, answers, [1.0])]

    def answer_logprobs_at(self, prompts: list[str], answers: list[str],
                           temperatures: Sequence[float]) -> list[list[float]]:
        """Teacher-forced: prompt + answer + EOS, left-padded so only the answer tail needs logits.
        One forward pass per batch; each temperature T re-normalises its logits: log_softmax(logits / T)."""
        import torch

        temps = [float(t) for t in temperatures]
        if not temps or any(not t > 0 for t in temps):
            raise ValueError(f"answer_logprobs_at: temperatures must be a non-empty list of values > 0, "
                             f"got {temps}")
        tok = self.tokenizer
        eos = tok.eos_token_id
        result: list[list[float]] = []
        for p_chunk, a_chunk in zip(_chunks(prompts, self.batch_size), _chunks(answers, self.batch_size),
                                    strict=True):
            p_ids, a_ids = self._prompt_answer_ids(p_chunk, a_chunk)
            a_ids = [ids + [eos] for ids in a_ids]
            limit = getattr(self.model.config, "max_position_embeddings", None)
            seqs = []
            for p, a in zip(p_ids, a_ids, strict=True):
                if limit and len(p) + len(a) > limit:  # keep the whole answer, cut the prompt's head
                    p = p[max(0, len(p) + len(a) - limit):]
                seqs.append(p + a)
            width = max(len(s) for s in seqs)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            # Answers sit at the right edge: logits for the last max_answer+1 positions suffice
            # (a full vocab x sequence logit tensor is what runs big models out of memory).
            keep = min(max(len(a) for a in a_ids) + 1, width)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                    logits_to_keep=keep).logits[:, -keep:-1].float()  # t predicts t+1
            targets = input_ids[:, -(keep - 1):].unsqueeze(-1)
            per_temp = []
            for t in temps:
                token_lp = torch.log_softmax(logits / t, dim=-1).gather(-1, targets).squeeze(-1)
                per_temp.append([token_lp[i, -len(a):].mean().item() for i, a in enumerate(a_ids)])
            result += [list(row) for row in zip(*per_temp, strict=True)]
        return result


def answer_ids(prompt_ids: list[int], joint_ids: list[int],
               encode_answer: Callable[[], list[int]]) -> list[int]:
    """Answer ids as the model sees them after the prompt: the tail of the prompt+answer encoding (a
    lone answer may tokenize differently, e.g. SentencePiece's leading space), unless the prompt's own
    ids are not a prefix of it; then the answer encoded alone. Every backend scores answers this way."""
    if len(joint_ids) > len(prompt_ids) and joint_ids[:len(prompt_ids)] == prompt_ids:
        return joint_ids[len(prompt_ids):]
    return encode_answer()


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def evaluate(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: EvalConfig,
             device: str) -> EvalReport:
    """Greedy generation + suite checks + reference log-prob for an HF model already in memory."""
    backend = HFBackend(model, tokenizer, device, cfg.max_new_tokens, cfg.batch_size)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return run_eval(backend, rows, cfg, backend.prompt)
    finally:
        if was_training:
            model.train()


def evaluate_ref(ref: str | Path, rows: Sequence[dict[str, Any]], cfg: EvalConfig, device: str,
                 revision: str | None = None, trust_remote_code: bool = False) -> EvalReport:
    """Load a model folder or hub id (forge.modeling), then evaluate it."""
    from forge.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code)
    model = load_model(ref, device=device, revision=revision, trust_remote_code=trust_remote_code)
    return evaluate(model, tokenizer, rows, cfg, device)
