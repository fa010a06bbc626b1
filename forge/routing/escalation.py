"""6B's escalation detector: P(the user is dissatisfied) from (previous message, follow-up), per request.

The plan: "BERT -> distilled LSTM, 94%". Two models:
- teacher: all-MiniLM-L6-v2 as a cross-encoder pair classifier. [CLS] previous [SEP] follow-up [SEP] runs
  through the encoder (attention sees both messages at once, which is what spots a re-ask), the token
  states are mean-pooled (MiniLM was trained to embed that way) and a linear layer gives 2 logits. Only
  the top `teacher_train_layers` layers and the head are fine-tuned: the frozen lower layers' outputs are
  computed once per pair and cached, so an epoch costs only the top layers (CPU speed).
- student, the one that ships: a bidirectional LSTM over the same word pieces, mapped into a compact
  vocabulary. It reads previous [SEP] follow-up as one sequence; each token's input is its embedding plus
  an exact-match flag (the piece occurs in the other message: DrQA's feature, the cue of a re-ask); its
  states are max-pooled over each message separately and compared ([p, m, |p - m|, p * m] -> MLP -> 2
  logits), the classic sentence-pair recipe. Distillation: loss = alpha * T^2 * KL(teacher/T ||
  student/T) + (1 - alpha) * CE(hard labels), on the training pairs.
  Its vocabulary is the training pairs' most frequent word pieces, filled up to `student_vocab` with
  MiniLM's most common word pieces (BERT's vocab.txt lists word pieces by corpus frequency from "the",
  id 1996, on); its embeddings are MiniLM's word-piece embeddings projected onto their top
  `student_embed_dim` principal components, and stay frozen. Both let the student read words the training
  pairs never used (the test split's phrasings are held out), which a vocabulary of training words with
  trained embeddings cannot (measured: frozen beat trained by ~1.5 points on test).
  Tried and dropped: Tang et al.'s (2019) transfer set of perturbed pairs labelled by the teacher (masked
  / embedding-neighbour swapped word pieces): it cost 1-3 points on test (a swapped piece often turns a
  re-ask into another question, and the student learned that noise).

`EscalationDetector` is the shipped student: detector.json (format, vocabulary, dims, threshold, metrics)
+ student.safetensors, loadable with torch and MiniLM's tokenizer (tokenizer.json) only. One pair costs a
tokenizer call and one LSTM pass: well under a millisecond on one core.

Read top to bottom: 1. tokenizing pairs  2. the student module  3. the shipped detector  4. the teacher
5. distillation  6. metrics and latency  7. train_detector (what 6B's job calls).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forge.routing.minilm import minilm_path
from forge.routing.timing import torch_threads

if TYPE_CHECKING:
    import torch

    from forge.routing.routing_config import DetectorConfig

log = logging.getLogger("forge.routing")

FORMAT = "forge-escalation-detector/v1"
WEIGHTS = "student.safetensors"
CONFIG = "detector.json"
PAD, UNK = 0, 1  # student vocabulary rows; MiniLM word pieces start at row 2
FIRST_FREQUENT_PIECE = 1996  # "the": from here on MiniLM's vocab.txt is ordered by frequency
MINILM_UNK = 100  # MiniLM's [UNK] id
LABELS = {"0": "satisfied or neutral", "1": "dissatisfied"}
HEAD_LR_FACTOR = 20.0  # the teacher's classifier head starts from scratch; the encoder layers only adapt


# ---- 1. tokenizing pairs -----------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _raw_tokenizer(max_len: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len, strategy="longest_first")
    return tok


def tokenizer_digest() -> str:
    """sha256 of MiniLM's vocab.txt: a saved detector is only valid with the word pieces it was built on."""
    return hashlib.sha256((minilm_path() / "vocab.txt").read_bytes()).hexdigest()


def check_pair(previous: Any, message: Any) -> None:
    """The detector scores a follow-up against the message before it: both must be non-empty strings."""
    for name, value in (("previous", previous), ("message", message)):
        if not isinstance(value, str):
            raise ValueError(f"escalation detector: {name} must be a string (got {type(value).__name__})")
        if not value.strip():
            raise ValueError(f"escalation detector: {name} is empty (the detector scores a follow-up "
                             f"message against the user's previous message; both are needed)")


class PairTokenizer:
    """MiniLM's word pieces of [CLS] previous [SEP] message [SEP], cut longest-first to `max_len` tokens
    (the same ids and segment ids transformers' tokenizer gives, without its per-call overhead)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self._tok = _raw_tokenizer(max_len)

    def encode(self, previous: str, message: str) -> tuple[list[int], list[int]]:
        check_pair(previous, message)
        enc = self._tok.encode(previous, message)
        return enc.ids, enc.type_ids

    def encode_batch(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        for p, m in pairs:
            check_pair(p, m)
        return [(e.ids, e.type_ids) for e in self._tok.encode_batch([(p, m) for p, m in pairs])]


# ---- 2. the student module ---------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _student_class() -> type:
    import torch
    from torch import nn

    class PairLSTM(nn.Module):
        """BiLSTM over previous [SEP] message; max-pool each message's states; compare; MLP -> 2 logits.
        Each token's input is its embedding plus an exact-match flag (DrQA's feature): does the same word
        piece occur in the other message? A re-ask is mostly the previous message's pieces again, whatever
        wrapper words come with them."""

        def __init__(self, vocab_size: int, embed_dim: int, hidden: int, dropout: float = 0.1) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
            self.lstm = nn.LSTM(embed_dim + 1, hidden, batch_first=True, bidirectional=True)
            self.mix = nn.Linear(8 * hidden, hidden)
            self.out = nn.Linear(hidden, 2)
            self.dropout = nn.Dropout(dropout)

        def forward(self, ids: torch.Tensor, segments: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
            same = (ids[:, :, None] == ids[:, None, :]) & (segments[:, :, None] != segments[:, None, :])
            match = (same & (valid & (ids > UNK))[:, None, :]).any(-1)
            x = torch.cat([self.dropout(self.embed(ids)), match[..., None].to(torch.float32)], dim=-1)
            if ids.shape[0] == 1 or bool((lengths == ids.shape[1]).all()):
                states, _ = self.lstm(x)
            else:
                packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                           enforce_sorted=False)
                states, _ = self.lstm(packed)
                states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True,
                                                             total_length=ids.shape[1])
            prev = self._max_pool(states, valid & (segments == 0))
            msg = self._max_pool(states, valid & (segments == 1))
            feats = torch.cat([prev, msg, (prev - msg).abs(), prev * msg], dim=-1)
            return self.out(self.dropout(torch.relu(self.mix(feats))))

        def forward_one(self, ids: torch.Tensor, n_previous: int) -> torch.Tensor:
            """One unpadded pair (ids [S], the first n_previous of them the previous message's): the same
            logits as forward(), with slices instead of masks (serving's per-request path)."""
            same = (ids[:n_previous, None] == ids[None, n_previous:]) & (ids[:n_previous, None] > UNK)
            match = torch.cat([same.any(1), same.any(0)]).to(torch.float32)
            states, _ = self.lstm(torch.cat([self.embed(ids), match[:, None]], dim=-1)[None])
            prev = states[0, :n_previous].max(dim=0).values
            msg = states[0, n_previous:].max(dim=0).values
            feats = torch.cat([prev, msg, (prev - msg).abs(), prev * msg])
            return self.out(torch.relu(self.mix(feats)))

        @staticmethod
        def _max_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return states.masked_fill(~mask[..., None], -1e4).max(dim=1).values

    return PairLSTM


def build_student(vocab_size: int, embed_dim: int, hidden: int) -> Any:
    return _student_class()(vocab_size, embed_dim, hidden)


def pad_batch(encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
              lookup: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, S], segments [B, S], lengths [B]) with PAD on the right; ids go through `lookup` (MiniLM
    id -> student row) when given."""
    import torch

    lengths = [len(ids) for ids, _ in encoded]
    width = max(lengths)
    ids = np.full((len(encoded), width), PAD, dtype=np.int64)
    segs = np.zeros((len(encoded), width), dtype=np.int64)
    for i, (row_ids, row_segs) in enumerate(encoded):
        ids[i, :len(row_ids)] = lookup[np.asarray(row_ids)] if lookup is not None else row_ids
        segs[i, :len(row_segs)] = row_segs
    return torch.from_numpy(ids), torch.from_numpy(segs), torch.tensor(lengths, dtype=torch.int64)


# ---- 3. the shipped detector -------------------------------------------------------------------

class EscalationDetector:
    """The distilled student: `score(previous, message)` is P(dissatisfied); `is_dissatisfied` compares it
    with the saved threshold. Load with `EscalationDetector.load(dir)`; needs torch + MiniLM's tokenizer."""

    def __init__(self, module: Any, vocab: Sequence[int], max_len: int, threshold: float,
                 embed_dim: int, hidden: int, metrics: Mapping[str, float] | None = None) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1) (got {threshold})")
        self.module = module.eval()
        self.vocab = [int(v) for v in vocab]  # MiniLM id of student row 2, 3, ...
        self.max_len = int(max_len)
        self.threshold = float(threshold)
        self.embed_dim, self.hidden = int(embed_dim), int(hidden)
        self.metrics = dict(metrics or {})
        self.tokenizer = PairTokenizer(self.max_len)
        self.lookup = vocab_lookup(self.vocab, self.tokenizer._tok.get_vocab_size())

    # -- scoring
    def score(self, previous: str, message: str) -> float:
        """P(dissatisfied) of one follow-up; one LSTM pass, no padding."""
        import torch

        ids, segs = self.tokenizer.encode(previous, message)
        with torch.inference_mode():
            logits = self.module.forward_one(torch.from_numpy(self.lookup[np.asarray(ids)]), segs.index(1))
            return float(torch.softmax(logits, dim=-1)[1])

    def score_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int = 256) -> list[float]:
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(pairs), batch_size):
                enc = self.tokenizer.encode_batch(pairs[i:i + batch_size])
                logits = self.module(*pad_batch(enc, self.lookup))
                out.extend(torch.softmax(logits, dim=-1)[:, 1].tolist())
        return out

    def is_dissatisfied(self, previous: str, message: str) -> bool:
        return self.score(previous, message) >= self.threshold

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def size_bytes(self) -> int:
        """Bytes of the weights (float32: parameters x 4), what student.safetensors holds."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    # -- files
    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": "BiLSTM pair classifier distilled from an all-MiniLM-L6-v2 cross-encoder",
            "input": "MiniLM word pieces of [CLS] previous [SEP] message [SEP], longest-first cut to max_len",
            "output": "softmax over 2 classes; P(dissatisfied) = class 1",
            "labels": LABELS,
            "tokenizer": {"name": "all-MiniLM-L6-v2", "vocab_sha256": tokenizer_digest()},
            "max_len": self.max_len,
            "threshold": self.threshold,
            "dims": {"vocab_size": len(self.vocab) + 2, "embed_dim": self.embed_dim, "hidden": self.hidden,
                     "bidirectional": True},
            "special_rows": {"pad": PAD, "unk": UNK},
            "vocab": self.vocab,
            "n_params": self.n_params,
            "metrics": self.metrics,
        }

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
        (directory / CONFIG).write_text(json.dumps(self.describe(), indent=1, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EscalationDetector:
        from safetensors.torch import load_file

        directory = Path(directory)
        spec = read_detector_json(directory / CONFIG)
        weights = directory / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"escalation detector: {weights} is missing")
        if spec["tokenizer"].get("vocab_sha256") != tokenizer_digest():
            raise ValueError(f"{directory / CONFIG}: built on another MiniLM tokenizer (vocab.txt sha256 "
                             f"{spec['tokenizer'].get('vocab_sha256')}) than the installed one at "
                             f"{minilm_path()}")
        dims = spec["dims"]
        module = build_student(dims["vocab_size"], dims["embed_dim"], dims["hidden"])
        try:
            module.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"escalation detector: {weights} does not match the dims in {CONFIG}: "
                             f"{exc}") from exc
        return cls(module, spec["vocab"], spec["max_len"], spec["threshold"], dims["embed_dim"],
                   dims["hidden"], spec.get("metrics"))


def read_detector_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"escalation detector: {path} is missing (not a detector directory?)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    for key in ("vocab", "max_len", "threshold", "dims", "tokenizer"):
        if key not in spec:
            raise ValueError(f"{path}: missing field {key!r}")
    if len(spec["vocab"]) + 2 != spec["dims"].get("vocab_size"):
        raise ValueError(f"{path}: dims.vocab_size {spec['dims'].get('vocab_size')} != len(vocab) + 2 "
                         f"({len(spec['vocab']) + 2})")
    return spec


def vocab_lookup(vocab: Sequence[int], minilm_size: int) -> np.ndarray:
    """MiniLM id -> student row: row 2 + i for vocab[i], UNK for everything else."""
    lookup = np.full(minilm_size, UNK, dtype=np.int64)
    lookup[np.asarray(vocab, dtype=np.int64)] = np.arange(2, len(vocab) + 2)
    lookup[0] = PAD
    return lookup


def build_vocab(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], size: int,
                minilm_size: int) -> tuple[list[int], int]:
    """The `size` word pieces of the student: the training pairs' pieces by frequency (ties by id), then
    MiniLM's most common pieces (id order from FIRST_FREQUENT_PIECE) until `size`. Returns (vocab, number
    taken from the training pairs)."""
    counts = Counter(i for ids, _ in encoded for i in ids)
    counts.pop(0, None)
    seen = sorted(counts, key=lambda i: (-counts[i], i))[:size]
    vocab, have = list(seen), set(seen)
    for i in range(FIRST_FREQUENT_PIECE, minilm_size):
        if len(vocab) >= size:
            break
        if i not in have:
            vocab.append(i)
    return vocab, len(seen)


# ---- 4. the teacher ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _teacher_class() -> type:
    import torch
    from torch import nn

    class PairTeacher(nn.Module):
        """MiniLM cross-encoder: bottom() runs embeddings + the frozen layers (cacheable), top() the
        trainable layers, the mean pool and the head."""

        def __init__(self, encoder: Any, train_layers: int) -> None:
            super().__init__()
            self.encoder = encoder
            n = len(encoder.encoder.layer)
            self.split = n - train_layers
            self.head = nn.Linear(encoder.config.hidden_size, 2)
            self.dropout = nn.Dropout(0.1)
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            for layer in self.encoder.encoder.layer[self.split:]:
                for p in layer.parameters():
                    p.requires_grad_(True)

        @staticmethod
        def additive_mask(mask: torch.Tensor) -> torch.Tensor:
            return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

        def _layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers: Any) -> torch.Tensor:
            add = self.additive_mask(mask)
            for layer in layers:
                hidden = layer(hidden, add)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            return hidden

        def bottom(self, ids: torch.Tensor, segs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder.embeddings(input_ids=ids, token_type_ids=segs)
            return self._layers(hidden, mask, self.encoder.encoder.layer[:self.split])

        def top(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self._layers(hidden, mask, self.encoder.encoder.layer[self.split:])
            m = mask[..., None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.head(self.dropout(pooled))

        def forward(self, ids: torch.Tensor, segs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.top(self.bottom(ids, segs, mask), mask)

    return PairTeacher


def teacher_inputs(encoded: Sequence[tuple[Sequence[int], Sequence[int]]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, segments, attention mask) for the teacher, padded on the right."""
    ids, segs, lengths = pad_batch(encoded)
    mask = (np.arange(ids.shape[1])[None, :] < lengths.numpy()[:, None]).astype(np.int64)
    import torch

    return ids, segs, torch.from_numpy(mask)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (little padding) for inference passes."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def cache_bottom(teacher: Any, encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
                 batch_size: int = 64) -> list[torch.Tensor]:
    """Per pair, the frozen layers' output [len, hidden]: computed once, reused every epoch."""
    import torch

    states: list[Any] = [None] * len(encoded)
    teacher.eval()
    with torch.no_grad():
        for idx in length_batches([len(e[0]) for e in encoded], batch_size):
            ids, segs, mask = teacher_inputs([encoded[i] for i in idx])
            hidden = teacher.bottom(ids, segs, mask)
            for row, i in enumerate(idx):
                states[i] = hidden[row, :len(encoded[i][0])].clone()
    return states


def _pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    hidden = torch.nn.utils.rnn.pad_sequence(list(states), batch_first=True)
    lengths = torch.tensor([s.shape[0] for s in states])
    mask = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).long()
    return hidden, mask


def teacher_logits(teacher: Any, states: Sequence[torch.Tensor], batch_size: int = 128) -> np.ndarray:
    """Teacher logits [n, 2] from cached bottom states, in eval mode."""
    import torch

    out = np.zeros((len(states), 2), dtype=np.float32)
    teacher.eval()
    with torch.no_grad():
        for idx in length_batches([s.shape[0] for s in states], batch_size):
            hidden, mask = _pad_states([states[i] for i in idx])
            out[idx] = teacher.top(hidden, mask).numpy()
    return out


def linear_schedule(total_steps: int, warmup_frac: float = 0.1) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_frac))
    decay = max(1, total_steps - warmup)
    return lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / decay))


def train_teacher(states: Sequence[torch.Tensor], labels: np.ndarray, teacher: Any, cfg: DetectorConfig,
                  val: tuple[Sequence[torch.Tensor], np.ndarray] | None = None) -> list[dict[str, float]]:
    """Fine-tune the teacher's top layers + head on cached bottom states (cross-entropy, AdamW, linear
    warmup/decay; the new head learns at HEAD_LR_FACTOR x teacher_lr). Returns the per-epoch history."""
    import torch

    trainable = [p for n, p in teacher.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": trainable, "lr": cfg.teacher_lr},
                             {"params": teacher.head.parameters(), "lr": cfg.teacher_lr * HEAD_LR_FACTOR}],
                            weight_decay=0.01)
    steps_per_epoch = math.ceil(len(states) / cfg.teacher_batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps_per_epoch * cfg.teacher_epochs))
    gen = torch.Generator().manual_seed(cfg.seed)
    y = torch.from_numpy(labels.astype(np.int64))
    history = []
    for epoch in range(1, cfg.teacher_epochs + 1):
        teacher.train()
        total, n = 0.0, 0
        for batch in torch.randperm(len(states), generator=gen).split(cfg.teacher_batch_size):
            hidden, mask = _pad_states([states[i] for i in batch.tolist()])
            loss = torch.nn.functional.cross_entropy(teacher.top(hidden, mask), y[batch])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            total, n = total + float(loss.detach()) * len(batch), n + len(batch)
        row = {"epoch": epoch, "loss": total / n}
        if val is not None:
            row["val_acc"] = accuracy(softmax1(teacher_logits(teacher, val[0])), val[1], 0.5)
        history.append(row)
        log.info("6B teacher epoch %d/%d: loss %.4f%s", epoch, cfg.teacher_epochs, row["loss"],
                 f", val acc {row['val_acc']:.3f}" if "val_acc" in row else "")
    teacher.eval()
    return history


def build_teacher(cfg: DetectorConfig) -> Any:
    """A private copy of MiniLM (the process-wide cached one stays untouched) with a fresh 2-way head."""
    import torch

    from forge.routing.minilm import load_minilm

    _, encoder = load_minilm("cpu")
    torch.manual_seed(cfg.seed)
    return _teacher_class()(copy.deepcopy(encoder), cfg.teacher_train_layers)


# ---- 5. distillation ---------------------------------------------------------------------------

def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)."""
    import torch.nn.functional as F

    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.softmax(teacher_logits / temperature, dim=-1), reduction="batchmean")
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def pca_embeddings(minilm_ids: Sequence[int], dim: int) -> torch.Tensor:
    """Rows for PAD, UNK and `minilm_ids`: MiniLM's word-piece embeddings projected onto their top `dim`
    principal components, scaled to unit variance per component (nn.Embedding's own init scale)."""
    import torch

    from forge.routing.minilm import load_minilm

    _, encoder = load_minilm("cpu")
    table = encoder.embeddings.word_embeddings.weight.detach()
    rows = table[torch.tensor([MINILM_UNK, *minilm_ids])]
    mean = rows.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(rows - mean, full_matrices=False)
    proj = (rows - mean) @ v[:dim].T
    proj = proj / proj.std(0, keepdim=True).clamp(min=1e-6)
    if proj.shape[1] < dim:  # more dims asked than MiniLM has: random rest
        proj = torch.cat([proj, torch.randn(proj.shape[0], dim - proj.shape[1])], dim=1)
    return torch.cat([torch.zeros(1, dim), proj])


def train_student(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], labels: np.ndarray,
                  soft: np.ndarray, vocab: Sequence[int], cfg: DetectorConfig,
                  val: tuple[Sequence[tuple[Sequence[int], Sequence[int]]], np.ndarray] | None = None,
                  ) -> tuple[Any, list[dict[str, float]]]:
    """Distil the teacher's logits `soft` (and the hard labels) into a fresh PairLSTM whose embeddings are
    MiniLM's, projected and frozen; the epoch with the best val accuracy (the last of equals) is kept.
    Returns (module, per-epoch history)."""
    import torch

    torch.manual_seed(cfg.seed + 1)
    module = build_student(len(vocab) + 2, cfg.student_embed_dim, cfg.student_hidden)
    with torch.no_grad():
        module.embed.weight.copy_(pca_embeddings(vocab, cfg.student_embed_dim))
    # frozen: pieces the training pairs never used keep the same geometry as those they did (trained
    # embeddings drift away from the untrained ones, and held-out phrasings suffer)
    module.embed.weight.requires_grad_(False)
    lookup = vocab_lookup(vocab, _raw_tokenizer(cfg.max_len).get_vocab_size())
    ids, segs, lengths = pad_batch(encoded, lookup)
    y = torch.from_numpy(labels.astype(np.int64))
    t = torch.from_numpy(soft.astype(np.float32))
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=cfg.student_lr)
    steps = math.ceil(len(encoded) / cfg.student_batch_size) * cfg.student_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps, 0.05))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    val_batch = pad_batch(val[0], lookup) if val is not None else None
    history, best = [], (-1.0, None)
    for epoch in range(1, cfg.student_epochs + 1):
        module.train()
        total = 0.0
        for batch in torch.randperm(len(encoded), generator=gen).split(cfg.student_batch_size):
            width = int(lengths[batch].max())
            logits = module(ids[batch, :width], segs[batch, :width], lengths[batch])
            loss = distill_loss(logits, t[batch], y[batch], cfg.distill_temperature, cfg.distill_alpha)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
        row = {"epoch": epoch, "loss": total / len(encoded)}
        if val_batch is not None:
            module.eval()
            with torch.no_grad():
                row["val_acc"] = accuracy(torch.softmax(module(*val_batch), -1)[:, 1].numpy(), val[1], 0.5)
            if row["val_acc"] >= best[0]:
                best = (row["val_acc"], copy.deepcopy(module.state_dict()))
        history.append(row)
        log.info("6B student epoch %d/%d: loss %.4f%s", epoch, cfg.student_epochs, row["loss"],
                 f", val acc {row['val_acc']:.3f}" if "val_acc" in row else "")
    if best[1] is not None:
        module.load_state_dict(best[1])
    return module.eval(), history


# ---- 6. metrics and latency --------------------------------------------------------------------

def softmax1(logits: np.ndarray) -> np.ndarray:
    """P(class 1) of 2-way logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)


def accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((np.asarray(probs) >= threshold).astype(int) == np.asarray(labels)).mean())


def confusion(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    pred = np.asarray(probs) >= threshold
    y = np.asarray(labels).astype(bool)
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()), "tn": int((~pred & ~y).sum()),
            "fn": int((~pred & y).sum())}


def per_kind_accuracy(probs: np.ndarray, rows: Sequence[Mapping[str, Any]],
                      threshold: float) -> dict[str, float]:
    kinds = sorted({r["kind"] for r in rows})
    labels = np.array([r["label"] for r in rows])
    out = {}
    for kind in kinds:
        idx = np.array([r["kind"] == kind for r in rows])
        out[kind] = accuracy(np.asarray(probs)[idx], labels[idx], threshold)
    return out


def training_threads() -> int:
    """Intra-op threads for training: the cores this process may use, at most 8 (more only adds overhead
    for models this small)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def latency_ms(fn: Callable[[str, str], Any], pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Single-pair latency as serving calls it, per request (forge.routing.timing): p50 / p99 / mean in ms."""
    from forge.routing.timing import summary, time_calls

    return summary(time_calls(lambda pair: fn(*pair), pairs))


def teacher_scorer(teacher: Any, max_len: int) -> Callable[[str, str], float]:
    """The teacher as one request would run it: tokenize, the full encoder, the head."""
    import torch

    tok = PairTokenizer(max_len)

    def score(previous: str, message: str) -> float:
        ids, segs = tok.encode(previous, message)
        with torch.inference_mode():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            logits = teacher(torch.tensor([ids]), torch.tensor([segs]), mask)
            return float(torch.softmax(logits, -1)[0, 1])

    return score


# ---- 7. train_detector -------------------------------------------------------------------------

@dataclass
class DetectorTraining:
    """Everything 6B's job reports: the shipped student, the teacher, both models' P(dissatisfied) per
    split, the training histories."""

    detector: EscalationDetector
    teacher: Any
    probs: dict[str, dict[str, np.ndarray]]  # model ("teacher" | "student") -> split -> P(dissatisfied)
    labels: dict[str, np.ndarray]
    history: dict[str, list[dict[str, float]]]
    vocab_from_train: int
    unk_rate: dict[str, float] = field(default_factory=dict)  # share of word pieces the student sees as UNK

    def accuracy(self, model: str, split: str) -> float:
        return accuracy(self.probs[model][split], self.labels[split], self.detector.threshold)

    def agreement(self, split: str) -> float:
        th = self.detector.threshold
        return float(((self.probs["teacher"][split] >= th) == (self.probs["student"][split] >= th)).mean())


def _pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(r["previous"], r["message"]) for r in rows]


def _labels(rows: Sequence[Mapping[str, Any]], split: str) -> np.ndarray:
    bad = [i for i, r in enumerate(rows) if r.get("label") not in (0, 1)]
    if bad:
        raise ValueError(f"{split} pairs: row {bad[0]} has label {rows[bad[0]].get('label')!r} "
                         f"(expected 0 or 1)")
    return np.array([int(r["label"]) for r in rows])


def train_detector(splits: Mapping[str, Sequence[Mapping[str, Any]]],
                   cfg: DetectorConfig) -> DetectorTraining:
    """Fine-tune the teacher on splits["train"], distil the student from it, score every split with both.

    `splits` maps "train", "val", "test" to rows of forge.routing.escalation_data.make_pairs (val picks the
    student's epoch and reports in-distribution accuracy; test is only measured)."""
    for name in ("train", "val", "test"):
        if not splits.get(name):
            raise ValueError(f"train_detector: the {name} split has no pairs")
    with torch_threads(training_threads()):
        tok = PairTokenizer(cfg.max_len)
        encoded = {s: tok.encode_batch(_pairs(rows)) for s, rows in splits.items()}
        labels = {s: _labels(rows, s) for s, rows in splits.items()}

        teacher = build_teacher(cfg)
        states = {s: cache_bottom(teacher, enc) for s, enc in encoded.items()}
        log.info("6B: teacher = MiniLM, top %d of %d layers + head trained; bottom states cached for %s "
                 "pairs",
                 cfg.teacher_train_layers, len(teacher.encoder.encoder.layer),
                 {s: len(v) for s, v in states.items()})
        t_hist = train_teacher(states["train"], labels["train"], teacher, cfg,
                               val=(states["val"], labels["val"]))
        t_logits = {s: teacher_logits(teacher, st) for s, st in states.items()}

        vocab, from_train = build_vocab(encoded["train"], cfg.student_vocab, _raw_tokenizer(cfg.max_len)
                                        .get_vocab_size())
        module, s_hist = train_student(encoded["train"], labels["train"], t_logits["train"], vocab, cfg,
                                       val=(encoded["val"], labels["val"]))
        detector = EscalationDetector(module, vocab, cfg.max_len, cfg.threshold, cfg.student_embed_dim,
                                      cfg.student_hidden)
        s_probs = {s: np.array(detector.score_batch(_pairs(rows))) for s, rows in splits.items()}
    known = set(vocab)
    unk = {s: float(np.mean([i not in known for ids, _ in enc for i in ids])) for s, enc in encoded.items()}
    training = DetectorTraining(detector, teacher, {"teacher": {s: softmax1(v) for s, v in t_logits.items()},
                                                    "student": s_probs},
                                labels, {"teacher": t_hist, "student": s_hist}, from_train, unk)
    detector.metrics = {f"{m}_acc_{s}": training.accuracy(m, s)
                        for m in ("teacher", "student") for s in splits}
    detector.metrics["agreement_test"] = training.agreement("test")
    return training
