"""7A: first-order MAML over LoRA parameters (torch.func.functional_call; learn2learn does not build here).

Tasks are the suites' task families (a row's `task`, e.g. code/list_filter): an episode draws k support rows
and some query rows of one family. Inner loop: `inner_steps` SGD steps on the support loss from the shared
LoRA init theta. Outer loop (first-order): the query loss's gradient at the adapted weights updates theta with
Adam. Families are split by a stable hash: the held-out ones are never seen in meta-training.

Measured on held-out families, per shot count k, over the same episodes: the model adapted from theta (MAML)
vs the same model adapted from the ordinary LoRA init (B = 0: no meta-learning), same steps and learning rate.
Reported: query accuracy (greedy answers checked by the suites) and query loss, each gain with a paired
bootstrap 95% interval. Whatever the sign, it is what the ledger shows.

Output: adapter/ (the meta-learned init as a peft adapter on 2A's model, registered), maml_report.json,
maml_meta_loss.png.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from forge.data.records import stable_unit
from forge.runner import JobContext, JobResult, PhaseSkipped
from forge.train.maml_config import MAMLConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("forge.train")

Params = dict[str, "torch.Tensor"]


# ---- episodes ----------------------------------------------------------------------------------------------


def families(
    domain: str, suite: str, cfg: MAMLConfig, seed: int, split: str, min_rows: int
) -> dict[str, list[dict[str, Any]]]:
    """family -> rows of one split (families with fewer than min_rows rows are left out)."""
    from forge.data.suites import generate

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in generate(suite, cfg.rows_per_family * 40, seed, split):
        groups[f"{domain}/{r['task']}"].append({**r, "domain": domain})
    return {f: rows for f, rows in sorted(groups.items()) if len(rows) >= min_rows}


def heldout_families(names: list[str], cfg: MAMLConfig) -> set[str]:
    """A domain's held-out families: the heldout_fraction of them (at least one, never all) ranked first by a
    stable hash of the name, so the split does not move when rows or seeds change."""
    n = len(names)
    if n < 2:
        return set()
    ranked = sorted(names, key=lambda f: stable_unit(f"maml-heldout|{f}"))
    return set(ranked[: max(1, min(n - 1, round(cfg.heldout_fraction * n)))])


def episode(
    rows: list[dict[str, Any]],
    k: int,
    q: int,
    rng: random.Random,
    query_rows: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(k support rows, q query rows), disjoint; queries from query_rows when given."""
    picked = rng.sample(rows, k + (0 if query_rows else q))
    return picked[:k], (rng.sample(query_rows, q) if query_rows else picked[k:])


# ---- the functional model ----------------------------------------------------------------------------


class LoRAFunctional:
    """The peft model, called with a dict of LoRA tensors in place of its own (torch.func.functional_call)."""

    def __init__(self, model: Any, tokenizer: Any, cfg: MAMLConfig, device: str) -> None:
        from forge.train.qlora_trainer import tokenize_row

        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._tok = tokenize_row
        self._cache: dict[str, Any] = {}

    def init_params(self) -> Params:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.names}

    def batch(self, rows: list[dict[str, Any]]) -> Any:
        from forge.train.qlora_trainer import collate

        exs = []
        for r in rows:
            key = r["id"]
            if key not in self._cache:
                self._cache[key] = self._tok(self.tokenizer, r, self.cfg.max_len)
            if self._cache[key] is not None:
                exs.append(self._cache[key])
        if not exs:
            raise ValueError(f"7A: no row of {[r['id'] for r in rows]} fits maml.max_len={self.cfg.max_len}")
        return {k: v.to(self.device) for k, v in collate(exs, self.tokenizer.pad_token_id).items()}

    def loss(self, params: Params, batch: Any) -> torch.Tensor:
        from torch.func import functional_call

        from forge.train.qlora_trainer import count_targets, token_loss_sum

        out = functional_call(
            self.model,
            params,
            (),
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        )
        return token_loss_sum(out.logits, batch["labels"]) / max(count_targets(batch["labels"]), 1)

    def adapt(self, params: Params, support: list[dict[str, Any]], create_graph: bool = False) -> Params:
        """inner_steps SGD steps on the support rows (first-order: the result is detached)."""
        import torch

        fast = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
        batch = self.batch(support)
        for _ in range(self.cfg.inner_steps):
            grads = torch.autograd.grad(
                self.loss(fast, batch), list(fast.values()), create_graph=create_graph
            )
            fast = {
                n: (t - self.cfg.inner_lr * g).detach().requires_grad_(True)
                for (n, t), g in zip(fast.items(), grads, strict=True)
            }
        return fast

    def answers(self, params: Params, rows: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
        """Greedy answers with `params` loaded into the model."""
        import torch

        from forge.data.records import prompt_messages
        from forge.modeling import chat_prompt

        with torch.no_grad():
            own = dict(self.model.named_parameters())
            for n, t in params.items():
                own[n].copy_(t)
            self.tokenizer.padding_side = "left"
            prompts = [chat_prompt(self.tokenizer, prompt_messages(r)) for r in rows]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ---- meta-training and evaluation ------------------------------------------------------------------------


def meta_train(
    f: LoRAFunctional,
    theta: Params,
    train: dict[str, list[dict[str, Any]]],
    cfg: MAMLConfig,
    progress: Any = None,
) -> list[float]:
    import torch

    rng = random.Random(cfg.seed)
    leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    opt = torch.optim.Adam(leaves.values(), lr=cfg.meta_lr)
    names, history, started = sorted(train), [], time.perf_counter()
    for step in range(1, cfg.meta_steps + 1):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.meta_batch):
            support, query = episode(train[rng.choice(names)], rng.choice(cfg.shots), cfg.query_rows, rng)
            fast = f.adapt(leaves, support)
            qloss = f.loss(fast, f.batch(query))
            grads = torch.autograd.grad(qloss, list(fast.values()))
            for leaf, g in zip(leaves.values(), grads, strict=True):  # first-order: dL/dfast as dL/dtheta
                leaf.grad = g / cfg.meta_batch if leaf.grad is None else leaf.grad + g / cfg.meta_batch
            total += float(qloss.detach()) / cfg.meta_batch
        opt.step()
        history.append(total)
        if progress and (step % max(1, cfg.meta_steps // 10) == 0 or step == cfg.meta_steps):
            progress(step, total, time.perf_counter() - started)
    theta.update({n: t.detach() for n, t in leaves.items()})
    return history


def few_shot_eval(
    f: LoRAFunctional,
    inits: dict[str, Params],
    test: dict[str, tuple[list, list]],
    cfg: MAMLConfig,
    max_new_tokens: int,
) -> dict[int, list[dict[str, Any]]]:
    """Per shot count: one record per episode with each init's query accuracy and loss after adapting."""
    import torch

    from forge.data.suites import check_answer

    rng = random.Random(cfg.seed + 1)
    names = sorted(test)
    out: dict[int, list[dict[str, Any]]] = {}
    for k in cfg.shots:
        out[k] = []
        for e in range(cfg.eval_episodes):
            fam = names[e % len(names)]
            support, query = episode(test[fam][0], k, cfg.query_rows, rng, test[fam][1])
            rec: dict[str, Any] = {"family": fam, "shots": k}
            for label, init in inits.items():
                fast = f.adapt(init, support)
                with torch.no_grad():
                    rec[f"loss_{label}"] = float(f.loss(fast, f.batch(query)))
                outputs = f.answers(fast, query, max_new_tokens)
                rec[f"acc_{label}"] = sum(
                    check_answer(r, o).correct for r, o in zip(query, outputs, strict=True)
                ) / len(query)
            out[k].append(rec)
        log.info("7A: %d-shot: %d held-out episodes evaluated", k, cfg.eval_episodes)
    return out


def summarize(records: dict[int, list[dict[str, Any]]], seed: int) -> dict[str, Any]:
    from forge.serve.phase_jobs import paired_ci

    per_shot = {}
    for k, recs in records.items():
        a_m, a_b = [r["acc_maml"] for r in recs], [r["acc_baseline"] for r in recs]
        l_m, l_b = [r["loss_maml"] for r in recs], [r["loss_baseline"] for r in recs]
        lo, hi = paired_ci(a_m, a_b, seed)
        llo, lhi = paired_ci(l_b, l_m, seed)  # loss reduction: baseline - maml
        per_shot[str(k)] = {
            "episodes": len(recs),
            "acc_maml": sum(a_m) / len(recs),
            "acc_baseline": sum(a_b) / len(recs),
            "acc_gain": (sum(a_m) - sum(a_b)) / len(recs),
            "acc_gain_ci95": [lo, hi],
            "loss_maml": sum(l_m) / len(recs),
            "loss_baseline": sum(l_b) / len(recs),
            "loss_reduction": (sum(l_b) - sum(l_m)) / len(recs),
            "loss_reduction_ci95": [llo, lhi],
        }
    all_m = [r["acc_maml"] for recs in records.values() for r in recs]
    all_b = [r["acc_baseline"] for recs in records.values() for r in recs]
    lo, hi = paired_ci(all_m, all_b, seed)
    return {
        "per_shot": per_shot,
        "acc_gain": (sum(all_m) - sum(all_b)) / len(all_m),
        "acc_gain_ci95": [lo, hi],
    }


def plot(history: list[float], path: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(history) + 1), history, lw=1, alpha=0.5, label="query loss per meta step")
    w = max(1, len(history) // 20)
    smooth = [
        sum(history[max(0, i - w + 1) : i + 1]) / len(history[max(0, i - w + 1) : i + 1])
        for i in range(len(history))
    ]
    ax.plot(range(1, len(history) + 1), smooth, lw=2, label=f"mean of {w}")
    ax.set_xlabel("meta step")
    ax.set_ylabel("query loss after adapting")
    ax.set_title("7A: first-order MAML over LoRA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(ctx: JobContext) -> JobResult:
    import torch
    from peft import LoraConfig, get_peft_model

    from forge.modeling import load_model, load_tokenizer, pick_device
    from forge.train.qlora_trainer import base_name, save_adapter, seed_everything

    cfg, m = ctx.config, ctx.config.meta.maml
    suite = {d: cfg.modifiers.suite_of(d) if d in cfg.modifiers.domains else d for d in m.domains}
    train, test = {}, {}
    for d in m.domains:
        fams = families(d, suite[d], m, cfg.data.seed, "train", m.rows_per_family)
        held = families(d, suite[d], m, cfg.data.seed, "heldout", m.query_rows)
        out = heldout_families(sorted(fams), m)
        for fam, rows in fams.items():
            if fam not in out:
                train[fam] = rows
            elif fam in held:
                test[fam] = (rows, held[fam])
    if not train or not test:
        raise PhaseSkipped(
            f"meta.maml.domains {m.domains} give {len(train)} meta-training and {len(test)} held-out "
            "task families: both must be non-empty (add domains or change heldout_fraction)"
        )
    log.info("7A: %d meta-training families, %d held-out: %s", len(train), len(test), sorted(test))

    device = pick_device("auto")
    seed_everything(m.seed)
    model_dir = ctx.input_dir("2A")
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, device, dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=m.rank, lora_alpha=m.alpha, lora_dropout=0.0, target_modules=m.target_modules, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)
    f = LoRAFunctional(model, tokenizer, m, device)
    baseline = f.init_params()  # the ordinary LoRA init: what adapting without meta-learning starts from
    theta = {n: t.clone() for n, t in baseline.items()}

    def progress(step: int, loss: float, seconds: float) -> None:
        log.info("7A: meta step %d/%d, query loss %.4f (%.1f s)", step, m.meta_steps, loss, seconds)
        ctx.log_metrics({"meta_query_loss": loss}, step)

    history = meta_train(f, theta, train, m, progress)
    records = few_shot_eval(f, {"maml": theta, "baseline": baseline}, test, m, cfg.eval.max_new_tokens)
    summary = summarize(records, m.seed)

    with torch.no_grad():  # the meta-learned init as a peft adapter
        own = dict(model.named_parameters())
        for n, t in theta.items():
            own[n].copy_(t)
    # the base named by its phase, not its local path (that names the run; a recomputed 7A writes the same
    # bytes)
    save_adapter(model, ctx.out_dir / "adapter", base_name("2A", str(model_dir)))
    report = {
        "train_families": sorted(train),
        "heldout_families": sorted(test),
        "settings": m.model_dump(mode="json"),
        "device": device,
        **summary,
        "meta_loss": {
            "first": history[0],
            "last": history[-1],
            "mean_first_10pct": sum(history[: max(1, len(history) // 10)]) / max(1, len(history) // 10),
            "mean_last_10pct": sum(history[-max(1, len(history) // 10) :]) / max(1, len(history) // 10),
        },
    }
    (ctx.out_dir / "maml_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(plot(history, ctx.out_dir / "maml_meta_loss.png"))
    lo, hi = summary["acc_gain_ci95"]
    shots = ", ".join(
        f"{k}-shot {v['acc_baseline']:.3f} -> {v['acc_maml']:.3f} (loss {v['loss_baseline']:.3f} -> "
        f"{v['loss_maml']:.3f})"
        for k, v in summary["per_shot"].items()
    )
    return JobResult(
        metrics={
            "acc_gain": summary["acc_gain"],
            "acc_gain_ci_low": lo,
            "acc_gain_ci_high": hi,
            **{f"acc_gain.{k}shot": v["acc_gain"] for k, v in summary["per_shot"].items()},
            **{f"loss_reduction.{k}shot": v["loss_reduction"] for k, v in summary["per_shot"].items()},
        },
        quality={"few_shot_gain": summary["acc_gain"], "gain_ci_low": lo, "gain_ci_high": hi},
        notes=(
            f"first-order MAML over LoRA r={m.rank} ({m.meta_steps} meta steps, {len(train)} families); "
            f"{len(test)} held-out families, {m.eval_episodes} episodes per shot count, MAML vs the same "
            f"model without meta-learning: {shots}; accuracy gain {summary['acc_gain']:+.3f} (95% CI "
            f"[{lo:+.3f}, {hi:+.3f}])"
        ),
        info={"adapter": "adapter", "report": "maml_report.json"},
        register="adapter",
        register_model=m.registered_model,
    )
