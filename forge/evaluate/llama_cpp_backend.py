"""The harness `Backend` over llama.cpp (llama-cpp-python): a GGUF model, optionally with a GGUF LoRA.

Prompts are rendered by the HF tokenizer's chat template (the same text HFBackend sees) and tokenized
by llama.cpp with special tokens parsed and no BOS added (the template places every special token).
Greedy decoding is an argmax loop over llama.cpp's logits, so no sampler default can change it.
llama_cpp is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge.compress.gguf_config import GGUFConfig
    from forge.config import EvalConfig
    from forge.evaluate.harness import EvalReport

log = logging.getLogger("forge.evaluate")


class LlamaCppBackend:
    """One llama.cpp model + context; use as a context manager (or call close()) to free them."""

    def __init__(self, model_path: str | Path, tokenizer_dir: str | Path, lora_path: str | Path | None = None,
                 n_ctx: int = 2048, n_threads: int = 1, n_batch: int = 512, max_new_tokens: int = 64) -> None:
        from llama_cpp import Llama

        from forge.evaluate.llama_cpp_params import plain_cpu_buffers
        from forge.modeling import load_tokenizer

        plain_cpu_buffers()
        model_path, tokenizer_dir = Path(model_path), Path(tokenizer_dir)
        if not model_path.is_file():
            raise FileNotFoundError(f"no GGUF model at {model_path}")
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"no HF tokenizer (with the chat template) at {tokenizer_dir} "
                                    "(tokenizer_config.json missing)")
        if lora_path is not None and not Path(lora_path).is_file():
            raise FileNotFoundError(f"no GGUF LoRA at {lora_path}")
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.max_new_tokens = max_new_tokens
        # never past what the model was trained for (HFBackend's limit is max_position_embeddings too)
        trained = trained_context(model_path)
        n_ctx = min(n_ctx, trained) if trained else n_ctx
        # logits_all: teacher-forced scoring reads the logits of every answer position
        self.llm: Any = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                              n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_threads_batch=n_threads,
                              logits_all=True, verbose=False)
        import llama_cpp

        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        # the chat's end-of-turn as the HF side knows it (HFBackend stops and scores with these too)
        self.eos_id = self.tokenizer.eos_token_id
        self.stop_ids = {i for i in (self.eos_id, *_generation_eos(tokenizer_dir)) if i is not None}
        self.limit = min(self.llm.n_ctx(), n_ctx)  # llama.cpp pads its context to a multiple of 256
        self.max_prompt_len = max(8, self.limit - max_new_tokens)

    # ---- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- text <-> ids ---------------------------------------------------------------------------

    def prompt(self, messages: list[dict[str, str]]) -> str:
        from forge.modeling import chat_prompt

        return chat_prompt(self.tokenizer, messages)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids for rendered text: special tokens parsed, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    def is_stop(self, token: int) -> bool:
        return token in self.stop_ids or bool(self._is_eog(self._vocab, token))

    # ---- decoding -------------------------------------------------------------------------------

    def _evaluate(self, ids: list[int]) -> Any:
        """Run ids from an empty context; returns their logits, one row per position (float32 view)."""
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        return llm.scores[:len(ids)]

    def _greedy(self, prompt: str, n: int, stop: bool) -> list[int]:
        import numpy as np

        llm = self.llm
        ids = self.tokenize(prompt)[-self.max_prompt_len:]  # cut from the left, as HFBackend does
        self._evaluate(ids)
        out: list[int] = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if stop and self.is_stop(token):
                break
            out.append(token)
            if llm.n_tokens >= self.limit:
                break
            llm.eval([token])
        return out

    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy completions (new text only, special tokens dropped), stopping at EOS / end of turn."""
        return [self.detokenize(self._greedy(p, self.max_new_tokens, stop=True)).strip() for p in prompts]

    def greedy_token_ids(self, prompt: str, n: int) -> list[int]:
        """The first n argmax tokens after prompt, not stopping at EOS (so two models compare position
        by position)."""
        return self._greedy(prompt, n, stop=False)

    # ---- teacher-forced scoring -----------------------------------------------------------------

    def prompt_answer_ids(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Prompt ids and answer ids, split as every harness backend does (harness.answer_ids)."""
        from forge.evaluate.harness import answer_ids

        p = self.tokenize(prompt)
        return p, answer_ids(p, self.tokenize(prompt + answer), lambda: self.tokenize(answer))

    def answer_logprobs_at(self, prompts: list[str], answers: list[str],
                           temperatures: Sequence[float]) -> list[list[float]]:
        """Mean token log-prob of answer + EOS after prompt, logits divided by each temperature."""
        import numpy as np

        temps = np.asarray(list(temperatures), dtype=np.float64)
        if temps.size == 0 or (temps <= 0).any():
            raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
        rows: list[list[float]] = []
        for prompt, answer in zip(prompts, answers, strict=True):
            p, a = self.prompt_answer_ids(prompt, answer)
            a = a + [self.eos_id]
            if len(a) >= self.limit:
                raise ValueError(f"answer of {len(a)} tokens does not fit the context of {self.limit} "
                                 "(gguf.n_ctx / the model's trained context)")
            p = p[max(0, len(p) + len(a) - self.limit):]  # keep the whole answer, cut the prompt's head
            if not p:
                raise ValueError("empty prompt: teacher-forced scoring needs at least one prompt token")
            logits = np.asarray(self._evaluate(p + a)[len(p) - 1:len(p) + len(a) - 1], dtype=np.float64)
            picked_rows = np.arange(len(a))
            row = []
            for t in temps:  # one temperature at a time: (answer tokens x vocab) stays the peak memory
                scaled = logits / t
                top = scaled.max(axis=-1)
                logz = np.log(np.exp(scaled - top[:, None]).sum(axis=-1)) + top
                row.append(float((scaled[picked_rows, a] - logz).mean()))
            rows.append(row)
        return rows

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [r[0] for r in self.answer_logprobs_at(prompts, answers, [1.0])]


def trained_context(model_path: str | Path) -> int | None:
    """<arch>.context_length from the GGUF's metadata (the HF config's max_position_embeddings)."""
    from forge.compress.llama_cpp_tools import gguf_metadata

    meta = gguf_metadata(model_path)
    value = meta.get(f"{meta.get('general.architecture')}.context_length")
    return int(value) if value else None


def _generation_eos(folder: Path) -> list[int]:
    """eos_token_id(s) of generation_config.json, when the folder has one (HFBackend stops on them)."""
    import json

    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []


def evaluate_gguf(model_path: str | Path, tokenizer_dir: str | Path, rows: Sequence[dict[str, Any]],
                  eval_cfg: EvalConfig, gguf_cfg: GGUFConfig,
                  lora_path: str | Path | None = None) -> EvalReport:
    """Greedy generation + suite checks + reference log-prob of a GGUF model (and LoRA), via run_eval."""
    from forge.evaluate.harness import run_eval

    with LlamaCppBackend(model_path, tokenizer_dir, lora_path, n_ctx=gguf_cfg.n_ctx,
                         n_threads=gguf_cfg.n_threads, n_batch=gguf_cfg.n_batch,
                         max_new_tokens=eval_cfg.max_new_tokens) as backend:
        return run_eval(backend, rows, eval_cfg, backend.prompt)
