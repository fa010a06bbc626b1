"""7B: few-shot prompt templates with retrieved demonstrations.

A template set is a folder (`few_shot/` in 7B's output and in the release):
  templates.json   version (sha256 of the content), k, and per domain: the preamble and the demonstration pool
                   (prompt + reference answer, train-split rows whose answers pass the suites' checks)
  embeddings.npy   the pool prompts' MiniLM embeddings (L2-normalised float32, one row per pool entry, the
                   domains' pools concatenated in templates.json's `order`)

`FewShot.apply(messages)` finds the k pool prompts nearest to the last user message (cosine similarity over
every domain's pool: the nearest examples name their domain) and inserts them as solved user/assistant turns
before the conversation, after a system turn that holds the nearest domain's preamble. Embeddings use MiniLM's
int8 ONNX encoder, the router's: no torch in the serving process.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEW_SHOT_DIR = "few_shot"
TEMPLATES_JSON = "templates.json"
EMBEDDINGS = "embeddings.npy"
FORMAT = "forge-few-shot/v1"

PREAMBLE = (
    "Solved {domain} tasks come first, each a question and its answer. Answer the last question the same "
    "way: same format, same level of detail."
)


def embed(texts: Sequence[str]) -> np.ndarray:
    from forge.routing.minilm import embed_texts_int8

    vecs = np.asarray(embed_texts_int8(list(texts)), dtype=np.float32)
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)


def build(
    dest: Path, pools: Mapping[str, Sequence[dict[str, Any]]], k: int, max_demo_chars: int
) -> dict[str, Any]:
    """Write a template set from train rows per domain (forge.data.records rows: messages + check)."""
    domains: dict[str, Any] = {}
    prompts: list[str] = []
    for domain, rows in pools.items():
        demos = []
        for r in rows:
            q, a = r["messages"][-2]["content"], r["messages"][-1]["content"]
            if len(q) + len(a) <= max_demo_chars and q not in prompts:
                demos.append({"id": r.get("id"), "prompt": q, "answer": a})
                prompts.append(q)
        if not demos:
            raise ValueError(
                f"7B: no demonstration of domain {domain!r} fits max_demo_chars={max_demo_chars}"
            )
        domains[domain] = {"preamble": PREAMBLE.format(domain=domain.replace("_", " ")), "demos": demos}
    # the embeddings' row order (the file's keys are sorted: the order must be stated)
    body = {"format": FORMAT, "k": k, "domains": domains, "order": list(domains)}
    body["version"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / EMBEDDINGS, embed(prompts))
    (dest / TEMPLATES_JSON).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return body


@dataclass
class Demo:
    domain: str
    prompt: str
    answer: str
    similarity: float


class FewShot:
    def __init__(self, body: dict[str, Any], vectors: np.ndarray) -> None:
        self.body, self.k, self.version = body, int(body["k"]), str(body["version"])
        self.entries = [(d, demo) for d in body["order"] for demo in body["domains"][d]["demos"]]
        if len(self.entries) != len(vectors):
            raise ValueError(
                f"few-shot set {self.version}: {len(self.entries)} demonstrations but "
                f"{len(vectors)} embeddings (a damaged {EMBEDDINGS}?)"
            )
        self.vectors = vectors

    @classmethod
    def load(cls, folder: str | Path) -> FewShot:
        folder = Path(folder)
        body = json.loads((folder / TEMPLATES_JSON).read_text())
        if body.get("format") != FORMAT:
            raise ValueError(f"{folder / TEMPLATES_JSON}: format {body.get('format')!r}, expected {FORMAT!r}")
        return cls(body, np.load(folder / EMBEDDINGS))

    @property
    def domains(self) -> list[str]:
        return list(self.body["order"])

    def nearest(self, question: str, k: int | None = None, domain: str | None = None) -> list[Demo]:
        """The k most similar pool prompts (of `domain` only, if given); never the question itself."""
        sims = self.vectors @ embed([question])[0]
        out: list[Demo] = []
        for i in np.argsort(-sims, kind="stable"):
            d, demo = self.entries[int(i)]
            if (domain is None or d == domain) and demo["prompt"].strip() != question.strip():
                out.append(Demo(d, demo["prompt"], demo["answer"], float(sims[i])))
                if len(out) == (k or self.k):
                    break
        return out

    def apply(self, messages: Sequence[dict[str, str]], domain: str | None = None) -> list[dict[str, str]]:
        """The conversation with the demonstrations of its last user message inserted before it."""
        return self.demonstrate(messages, domain)[0]

    def demonstrate(
        self,
        messages: Sequence[dict[str, str]],
        domain: str | None = None,
    ) -> tuple[list[dict[str, str]], list[Demo]]:
        """(the conversation with demonstrations, the demonstrations used)."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        demos = self.nearest(question, domain=domain) if question is not None else []
        if not demos:
            return list(messages), []
        top = domain or Counter(d.domain for d in demos).most_common(1)[0][0]
        turns = [
            t
            for d in demos
            for t in ({"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.answer})
        ]
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        preamble = self.body["domains"][top]["preamble"]
        head = (
            [{"role": "system", "content": f"{system[0]['content']}\n\n{preamble}"}]
            if system
            else [{"role": "system", "content": preamble}]
        )
        return [*head, *system[1:], *turns, *rest], demos
