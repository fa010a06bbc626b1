"""12A: the critic. Scores a (question, answer) pair 0-10 = 10 x the calibrated probability that the answer is
correct; 12B regenerates answers that score below serving.critique.threshold.

Features of a pair: the MiniLM sentence embeddings (forge.routing.features.MiniLMFeatures, the encoder the
router already holds) of the question q and of the answer a, their product q*a and |q - a|, plus a few cheap
facts about the answer (CHEAP_FEATURES: its length, a number, a code block that compiles, a JSON object
whose values the question mentions, arithmetic claims "x op y = z" that hold...). A small MLP maps the
standardised features to one logit; one temperature dividing it is fitted on the validation split (2F's
grid, binary log loss), so that the score reads as a probability.

The head runs in numpy (critic.safetensors, float32: ~1.9 MB at hidden_dim 256); training (train_critic)
uses torch. Thread-safe: serving threads share one Critic, the extractor runs
under a lock (its tokenizer is not re-entrant), the head only reads its weights.

Read top to bottom: 1. cheap features  2. the feature matrix  3. metrics  4. training  5. the Critic.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("forge.serve")

FORMAT = "forge-critic/v1"
CONFIG = "critic.json"
WEIGHTS = "critic.safetensors"
MAX_SEQ_LEN = 256  # MiniLM tokens per text: an answer's final line is usually within it
DROPOUT = 0.1
WEIGHT_DECAY = 1e-2
BATCH_SIZE = 64
# The embeddings (1,536 of the inputs) memorise training questions long before the cheap features are learnt:
# they enter scaled down (x0.1 after standardising) and half of them are dropped per training example.
# Measured test AUC on 4K suite examples: 0.92 damped, 0.91 cheap features alone, 0.81-0.84 undamped; on 8K:
# 0.937 damped, 0.920 cheap features alone.
EMBED_WEIGHT = 0.1
EMBED_DROPOUT = 0.5
SCALE = 10.0  # scores are 0-10


class CriticError(ValueError):
    """A critic that cannot be trained or loaded as given; the message says what and where."""


# ---- 1. cheap features -----------------------------------------------------------------------------------

CHEAP_FEATURES = (
    "log_chars", "log_words", "log_lines", "empty", "has_number", "has_answer_tag", "has_code_fence",
    "looks_like_code", "code_compiles", "has_json", "json_values_in_question", "log_claims", "claims_true",
    "claim_false", "final_in_work", "question_numbers_used", "words_in_question",
)

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = re.compile(r"[A-Za-z0-9]+")
_ARITH = set("0123456789.+-*/()^ ")
_SENTENCE_DOT = re.compile(r"\.(?=\s|$)")  # a full stop, not a decimal point
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_CODE_HINT = re.compile(r"^\s*(def |class |import |from \S+ import |return\b)", re.MULTILINE)
_BINARY = re.compile(r"[\d)]\s*[-+*/^]")  # an operator after an operand: not a unary minus
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def _eval_arith(text: str) -> float | None:
    """The value of a pure arithmetic expression (numbers, + - * / ^, parentheses), else None."""
    text = text.strip()
    if not text or not any(c.isdigit() for c in text):
        return None
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError):
        return None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(b) > 12 or abs(a) > 1e6:  # no huge powers from a hostile answer
                    raise ValueError("power too large")
                return a ** b
            if isinstance(node.op, ast.Div):
                return a / b
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise ValueError("not arithmetic")

    try:
        value = ev(tree.body)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    return value if isinstance(value, float) and math.isfinite(value) else None


def _decimals(text: str) -> int:
    return max((len(m.group().split(".")[1]) for m in _NUM.finditer(text) if "." in m.group()), default=0)


def arithmetic_claims(text: str) -> list[tuple[bool, float]]:
    """Every "expression = expression" in the text whose two sides are arithmetic and one side computes
    (e.g. "8 * 2 = 16", "(728 - 440) / 728 * 100 = 39.56"): (holds, the right side's value). A side is
    the longest arithmetic run touching the "="; rounding to the decimals shown counts as holding."""
    text = _THOUSANDS.sub("", _SENTENCE_DOT.sub(";", text))
    claims = []
    for m in re.finditer("=", text):
        i = m.start()
        lo = i
        while lo > 0 and text[lo - 1] in _ARITH:
            lo -= 1
        hi = i + 1
        while hi < len(text) and text[hi] in _ARITH:
            hi += 1
        left, right = text[lo:i], text[i + 1:hi]
        if not (_BINARY.search(left) or _BINARY.search(right)):
            continue  # "x = 5": nothing computed, nothing to check
        a, b = _eval_arith(left), _eval_arith(right)
        if a is None or b is None:
            continue
        # rounding to the fewer decimals shown holds: "31500 * 0.095 / 12 = 249.38"
        digits = min(_decimals(left), _decimals(right), 6)
        tolerance = 0.5 * 10 ** -digits * (1 + 1e-6) + 1e-9 * max(abs(a), abs(b))
        claims.append((abs(a - b) <= tolerance, b))
    return claims


def final_in_work(text: str) -> bool:
    """Does the final answer (the suites' numeric reading) appear in the work before it? "16 + 1 = 17.
    Answer: 17" yes; "16 + 1 = 17. Answer: 18" or a bare "Answer: 18" no."""
    from forge.data.suites.checks import extract_number

    text = _THOUSANDS.sub("", text)
    final = extract_number(text)
    if final is None:
        return False
    tags = list(re.finditer(r"answer\s*[:=]", text, re.IGNORECASE))
    # the work: before the last "Answer:", else everything but the last number
    work = text[:tags[-1].start()] if tags else text[:list(_NUM.finditer(text))[-1].start()]
    return any(math.isclose(float(n), final, abs_tol=1e-9) for n in _NUM.findall(work))


def cheap_features(question: str, answer: str) -> np.ndarray:
    """CHEAP_FEATURES of one pair, float32: what an embedding barely sees (lengths, arithmetic that does not
    hold, code that does not compile, tool arguments the question never mentioned)."""
    from forge.data.suites.checks import extract_code, extract_json_object

    words = _WORDS.findall(answer)
    numbers = _NUM.findall(answer)
    looks_like_code = bool(_CODE_HINT.search(answer)) or "```" in answer
    compiles = 0.0
    if looks_like_code:
        try:
            compile(extract_code(answer), "<answer>", "exec")
            compiles = 1.0
        except (SyntaxError, ValueError):
            pass
    obj = extract_json_object(answer) if "{" in answer else None
    grounded = 0.0
    if obj is not None:
        args = obj.get("arguments")
        leaves = [v for v in _leaves(args if isinstance(args, dict) else obj) if not isinstance(v, bool)]
        said = question.casefold()
        grounded = float(np.mean([str(v).casefold() in said for v in leaves])) if leaves else 0.0
    claims = arithmetic_claims(answer)
    q_numbers = set(_NUM.findall(question))
    q_words = {w.casefold() for w in _WORDS.findall(question)}
    return np.array([
        math.log1p(len(answer)) / 8.0,
        math.log1p(len(words)) / 6.0,
        math.log1p(answer.count("\n") + 1) / 4.0,
        float(not answer.strip()),
        float(bool(numbers)),
        float(bool(re.search(r"answer\s*[:=]", answer, re.IGNORECASE))),
        float("```" in answer),
        float(looks_like_code),
        compiles,
        float(obj is not None),
        grounded,
        math.log1p(len(claims)) / 3.0,
        float(np.mean([ok for ok, _ in claims])) if claims else 0.0,
        float(any(not ok for ok, _ in claims)),
        float(final_in_work(answer)),
        float(np.mean([n in numbers for n in q_numbers])) if q_numbers else 0.0,
        float(np.mean([w.casefold() in q_words for w in words])) if words else 0.0,
    ], dtype=np.float32)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


# ---- 2. the feature matrix -------------------------------------------------------------------------------

def feature_matrix(extractor: Any, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """[len(pairs), 4 x dim + len(CHEAP_FEATURES)]: q, a, q*a, |q-a|, cheap. Each distinct text is embedded
    once, shortest first (batches pad to their longest text: sorting roughly halves the time)."""
    # ties by text: the same batches every run (int8 activations are quantised per batch)
    texts = sorted({t for pair in pairs for t in pair}, key=lambda t: (len(t), t))
    if not pairs:
        return np.zeros((0, 4 * extractor.dim + len(CHEAP_FEATURES)), np.float32)
    emb = extractor.embed(texts)
    index = {t: i for i, t in enumerate(texts)}
    q = emb[[index[p[0]] for p in pairs]]
    a = emb[[index[p[1]] for p in pairs]]
    cheap = np.stack([cheap_features(qs, ans) for qs, ans in pairs])
    return np.concatenate([q, a, q * a, np.abs(q - a), cheap], axis=1).astype(np.float32)


# ---- 3. metrics ------------------------------------------------------------------------------------------

def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # no overflow for large |z|


def binary_nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(y, np.float64) * z))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(a random correct answer scores above a random wrong one), ties half (Mann-Whitney); nan if a class
    is missing."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_temperature(logits: np.ndarray, y: np.ndarray, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """The grid temperature with the lowest binary log loss on (logits, y), and the loss at each."""
    nll = np.array([binary_nll(logits, y, float(t)) for t in grid])
    return float(grid[int(np.argmin(nll))]), nll


# ---- 4. training -----------------------------------------------------------------------------------------

@dataclass
class TrainSettings:
    hidden_dim: int
    epochs: int
    learning_rate: float
    seed: int
    batch_size: int = BATCH_SIZE
    dropout: float = DROPOUT
    weight_decay: float = WEIGHT_DECAY
    embed_weight: float = EMBED_WEIGHT
    embed_dropout: float = EMBED_DROPOUT


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    temperature_nll: list[float] = field(default_factory=list)


def build_net(dim: int, hidden: int, dropout: float) -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


def train_critic(X: np.ndarray, y: np.ndarray, val_X: np.ndarray, val_y: np.ndarray, settings: TrainSettings,
                 grid: np.ndarray, features: dict[str, Any], extractor: Any = None) -> tuple[Critic, History]:
    """Mini-batch AdamW on binary cross entropy; the epoch with the lowest validation loss is kept, then the
    temperature is fitted on the validation split."""
    import torch

    from forge.routing.timing import torch_threads

    if len(X) == 0 or len(val_X) == 0:
        raise CriticError(f"train_critic: {len(X)} training and {len(val_X)} validation examples (need both)")
    if len(set(np.asarray(y).tolist())) < 2:
        raise CriticError("train_critic: the training examples are all one label; nothing to separate")
    mean = X.mean(axis=0).astype(np.float32)
    std = (X.std(axis=0) + 1e-6).astype(np.float32)
    n_embed = X.shape[1] - len(CHEAP_FEATURES)
    std[:n_embed] /= settings.embed_weight
    torch.manual_seed(settings.seed)
    net = build_net(X.shape[1], settings.hidden_dim, settings.dropout)
    Xt = torch.from_numpy((X - mean) / std)
    yt = torch.from_numpy(np.asarray(y, np.float32))
    vX = torch.from_numpy(((val_X - mean) / std).astype(np.float32))
    vy = np.asarray(val_y, np.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(settings.seed)
    history, best, best_state = History(), math.inf, None
    with torch_threads(1):  # a head this small: one thread ran 10x faster than two on a 2-core box
        for epoch in range(1, settings.epochs + 1):
            net.train()
            order = torch.randperm(len(Xt), generator=gen)
            total = 0.0
            for i in range(0, len(order), settings.batch_size):
                idx = order[i:i + settings.batch_size]
                xb = Xt[idx]
                if settings.embed_dropout:  # embedding inputs only: the cheap features are never dropped
                    keep = torch.rand(len(idx), n_embed, generator=gen) >= settings.embed_dropout
                    scale = keep / (1 - settings.embed_dropout)
                    xb = torch.cat([xb[:, :n_embed] * scale, xb[:, n_embed:]], 1)
                loss = loss_fn(net(xb).squeeze(1), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            net.eval()
            with torch.no_grad():
                vlogits = net(vX).squeeze(1).numpy()
            vloss = binary_nll(vlogits, vy)
            vacc = float(((vlogits >= 0) == (vy > 0.5)).mean())
            history.epochs.append({"epoch": epoch, "train_loss": total / len(Xt), "val_loss": vloss,
                                   "val_acc": vacc})
            if vloss < best:
                best, history.best_epoch = vloss, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if epoch == 1 or epoch % 10 == 0 or epoch == settings.epochs:
                log.info("critic epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f", epoch,
                         settings.epochs, total / len(Xt), vloss, vacc)
    net.load_state_dict(best_state)
    layers = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
              for m in net if isinstance(m, torch.nn.Linear)]
    critic = Critic(layers, mean, std, 1.0, features, extractor=extractor)
    critic.temperature, nll = fit_temperature(critic.logits(val_X), val_y, grid)
    history.temperature_nll = [float(v) for v in nll]
    return critic, history


# ---- 5. the Critic ---------------------------------------------------------------------------------------

class Critic:
    """score(question, answer) -> 0-10. `features` is the extractor's spec (MiniLMFeatures.spec())."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], mean: np.ndarray, std: np.ndarray,
                 temperature: float, features: dict[str, Any], info: dict[str, Any] | None = None,
                 extractor: Any = None) -> None:
        if len(layers) < 2 or layers[-1][0].shape[1] != 1:
            raise CriticError(f"a critic head needs >= 2 layers ending in one logit, got shapes "
                              f"{[w.shape for w, _ in layers]}")
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.temperature = float(temperature)
        self.features = dict(features)
        self.info: dict[str, Any] = dict(info or {})
        self._extractor = extractor
        self._lock = threading.Lock()

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def hidden_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def n_params(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers))

    @property
    def size_bytes(self) -> int:
        """The head's float32 weights and standardisation (what critic.safetensors holds, less its header)."""
        return 4 * (self.n_params + self.mean.size + self.std.size)

    # ---- the head --------------------------------------------------------------------------------------
    def logits(self, X: np.ndarray) -> np.ndarray:
        """The MLP's logit per row (eval: no dropout), in numpy: per request, torch's per-op overhead costs
        more than these small matmuls."""
        from scipy.special import erf

        h = (np.atleast_2d(X).astype(np.float64) - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # exact GELU, as nn.GELU()
        return h[:, 0]

    def probs(self, X: np.ndarray) -> np.ndarray:
        """Calibrated P(correct) per feature row."""
        return sigmoid(self.logits(X) / self.temperature)

    # ---- scoring ---------------------------------------------------------------------------------------
    def extractor(self) -> Any:
        with self._lock:
            if self._extractor is None:
                from forge.routing.features import open_extractor

                self._extractor = open_extractor(self.features)
            return self._extractor

    def featurize(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        extractor = self.extractor()
        with self._lock:  # MiniLM's fast tokenizer is not safe to call from two threads at once
            X = feature_matrix(extractor, pairs)
        if X.shape[1] != self.input_dim:
            raise CriticError(f"the extractor gives {X.shape[1]} features, the head expects {self.input_dim}")
        return X

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """0-10 per (question, answer): 10 x the calibrated probability that the answer is correct."""
        pairs = [(str(q), str(a)) for q, a in pairs]
        if not pairs:
            return []
        return [float(SCALE * p) for p in self.probs(self.featurize(pairs))]

    def score(self, question: str, answer: str) -> float:
        return self.score_batch([(question, answer)])[0]

    # ---- save / load -----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "std": self.std}
        for i, (w, b) in enumerate(self.layers):
            tensors[f"layer{i}.weight"] = np.ascontiguousarray(w)
            tensors[f"layer{i}.bias"] = np.ascontiguousarray(b)
        save_file(tensors, str(folder / WEIGHTS))
        dims = {"input": self.input_dim, "hidden": self.hidden_dim, "layers": len(self.layers),
                "embedding": (self.input_dim - len(CHEAP_FEATURES)) // 4, "cheap": list(CHEAP_FEATURES)}
        meta = {"format": FORMAT, "dims": dims, "features": self.features, "temperature": self.temperature,
                "score": f"{SCALE:g} x sigmoid(logit / temperature) = {SCALE:g} x P(answer is correct)",
                "activation": "gelu", "metrics": self.info.get("metrics", {}),
                "info": {k: v for k, v in self.info.items() if k != "metrics"}}
        (folder / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, extractor: Any = None) -> Critic:
        """A saved critic. `extractor`: an already-open MiniLMFeatures to share (else opened on first use)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file():
            raise CriticError(f"{folder} is not a critic folder: no {CONFIG}")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CriticError(f"{path}: not JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CriticError(f"{path}: format {got!r}, expected {FORMAT!r} (not a critic folder: {folder})")
        missing = [k for k in ("dims", "features", "temperature") if k not in meta]
        if missing:
            raise CriticError(f"{path}: missing field(s) {missing}")
        dims = meta["dims"]
        if dims.get("cheap") != list(CHEAP_FEATURES):
            raise CriticError(f"{path}: cheap features {dims.get('cheap')} differ from this code's "
                              f"{list(CHEAP_FEATURES)}: retrain the critic (phase 12A)")
        weights = folder / WEIGHTS
        if not weights.is_file():
            raise CriticError(f"{folder}: {CONFIG} is there but {WEIGHTS} is missing")
        try:
            tensors = load_file(str(weights))
            layers = [(tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"]) for i in range(dims["layers"])]
            mean, std = tensors["mean"], tensors["std"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise CriticError(f"{weights}: unreadable or incomplete weights ({exc})") from None
        if layers[0][0].shape[0] != dims["input"] or mean.shape != (dims["input"],):
            raise CriticError(f"{weights}: input width {layers[0][0].shape[0]} / {mean.shape}, {CONFIG} says "
                              f"{dims['input']}")
        info = dict(meta.get("info", {}), metrics=meta.get("metrics", {}))
        return cls(layers, mean, std, float(meta["temperature"]), meta["features"], info, extractor)
