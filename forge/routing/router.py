"""The router (6A): which option answers a query, {base, each modifier}, and how sure it is.

A 3-layer feed-forward net over standardised query features (forge.routing.features), trained with cross
entropy on the option that actually answered each query (forge.routing.router_data); feedback from serving
(13A) adds "this option was wrong here" examples, trained with the complementary loss -log(1 - p(option)).
Its confidence is temperature-scaled like 2F's: one T dividing the logits, the grid point (2F's grid) with the
lowest log loss on the validation split.

Decision rule (the one every consumer uses: 6A's curve, 6C's replay, serving):
  the best modifier m* = argmax over the modifiers of p(m); route to m* if p(m*) >= threshold, else the base.
threshold 0 sends every query to a modifier, threshold 1 none; 6C chooses it.

Read top to bottom: 1. the net  2. training  3. temperature  4. the Router (save / load / decide).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("forge.routing")

FORMAT = "forge-router/v1"
BASE = "base"  # class 0: the served base alone (its recovery adapter on)
WEIGHTS = "router.safetensors"
CONFIG = "router.json"


class RouterError(ValueError):
    """A router that cannot be trained or loaded as given; the message says what to change."""


# ---- 1. the net --------------------------------------------------------------------------------------

def build_net(dim: int, hidden: int, n_classes: int, dropout: float) -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, n_classes))


# ---- 2. training -------------------------------------------------------------------------------------

@dataclass
class Examples:
    """Training rows: features, an option index, was that option right (+1) or wrong (-1), a weight."""

    X: np.ndarray  # [n, d] float32
    option: np.ndarray  # [n] int
    target: np.ndarray  # [n] +1 / -1
    weight: np.ndarray  # [n] float

    @classmethod
    def positives(cls, X: np.ndarray, labels: np.ndarray, weight: float = 1.0) -> Examples:
        n = len(labels)
        return cls(np.asarray(X, np.float32), np.asarray(labels, np.int64), np.ones(n, np.int64),
                   np.full(n, weight, np.float32))

    def __add__(self, other: Examples) -> Examples:
        return Examples(*(np.concatenate([a, b]) for a, b in ((self.X, other.X), (self.option, other.option),
                                                              (self.target, other.target),
                                                              (self.weight, other.weight))))

    def __len__(self) -> int:
        return len(self.option)


@dataclass
class TrainSettings:
    hidden_dim: int
    dropout: float
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    seed: int


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def _loss(logits: Any, option: Any, target: Any, weight: Any) -> Any:
    """Cross entropy where the option was right; -log(1 - p(option)) where it was wrong, computed as
    -log(sum of the other options' probabilities) so the gradient survives a saturated p(option)."""
    import torch

    logz = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, option.unsqueeze(1)).squeeze(1) - logz
    others = logits.masked_fill(torch.nn.functional.one_hot(option, logits.shape[-1]).bool(), float("-inf"))
    not_picked = torch.logsumexp(others, dim=-1) - logz
    per_row = torch.where(target > 0, -picked, -not_picked)
    return (per_row * weight).sum() / weight.sum()


def train_net(train: Examples, val_X: np.ndarray, val_y: np.ndarray, n_classes: int, settings: TrainSettings,
              mean: np.ndarray, std: np.ndarray, init: dict[str, Any] | None = None) -> tuple[Any, History]:
    """Mini-batch AdamW; the epoch with the lowest validation cross entropy is kept (then accuracy, earlier).
    init: a state dict to start from (13A's warm start from the champion)."""
    import torch

    if len(train) == 0:
        raise RouterError("no training examples")
    torch.manual_seed(settings.seed)
    net = build_net(train.X.shape[1], settings.hidden_dim, n_classes, settings.dropout)
    if init is not None:
        net.load_state_dict(init)
    X = torch.from_numpy((train.X - mean) / std)
    opt_t, tgt_t, w_t = (torch.from_numpy(a) for a in (train.option, train.target, train.weight))
    vX = torch.from_numpy(((val_X - mean) / std).astype(np.float32))
    vy = torch.from_numpy(np.asarray(val_y, np.int64))
    opt = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    history, best, best_state = History(), (math.inf, -1.0), None
    for epoch in range(1, settings.epochs + 1):
        net.train()
        order = torch.randperm(len(X), generator=gen)
        total = 0.0
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            loss = _loss(net(X[idx]), opt_t[idx], tgt_t[idx], w_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            vlogits = net(vX)
            vloss = float(torch.nn.functional.cross_entropy(vlogits, vy)) if len(vy) else 0.0
            vacc = float((vlogits.argmax(-1) == vy).float().mean()) if len(vy) else 0.0
        history.epochs.append({"epoch": epoch, "train_loss": total / len(X), "val_loss": vloss,
                               "val_acc": vacc})
        # the epoch with the best validation loss; without validation rows, the last one
        if not len(vy) or (vloss, -vacc) < (best[0], -best[1]):
            best, history.best_epoch = (vloss, vacc), epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if epoch == 1 or epoch % 10 == 0 or epoch == settings.epochs:
            log.info("router epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f", epoch,
                     settings.epochs, total / len(X), vloss, vacc)
    net.load_state_dict(best_state)
    net.eval()
    return net, history


# ---- 3. temperature ----------------------------------------------------------------------------------

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """The grid temperature with the lowest multi-class log loss (2F's method and grid), and the losses."""
    nll = np.array([class_nll(logits, labels, float(t)) for t in grid])
    return float(grid[int(np.argmin(nll))]), nll


# ---- 4. the Router -----------------------------------------------------------------------------------

def best_modifier(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the index of the most probable modifier (never 0, the base) and its probability."""
    probs = np.atleast_2d(probs)
    j = 1 + np.argmax(probs[:, 1:], axis=1)
    return j, probs[np.arange(len(j)), j]


def decide(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Option index per row under the decision rule (module docstring)."""
    j, conf = best_modifier(probs)
    return np.where(conf >= threshold, j, 0)


@dataclass
class Router:
    classes: list[str]  # classes[0] == "base"
    features: dict[str, Any]  # the extractor's spec (forge.routing.features.open_extractor)
    mean: np.ndarray
    std: np.ndarray
    net: Any
    temperature: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)  # what trained it, its metrics

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0] != BASE or len(self.classes) < 2:
            raise RouterError(f"router classes must start with {BASE!r} and name at least one modifier, "
                              f"got {self.classes}")

    def logits(self, X: np.ndarray) -> np.ndarray:
        """The net's forward in numpy (eval: no dropout): per request, torch's per-op overhead costs more
        than these three small matmuls (measured ~0.7 ms vs ~0.05 ms for one query)."""
        from scipy.special import erf

        h = (np.atleast_2d(X).astype(np.float64) - self.mean) / self.std
        layers = self._numpy_layers()
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # exact GELU, as nn.GELU()
        return h

    def _numpy_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        cached = self.__dict__.get("_layers")
        if cached is None:
            import torch.nn as nn

            cached = [(m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy())
                      for m in self.net if isinstance(m, nn.Linear)]
            self.__dict__["_layers"] = cached
        return cached

    def probs(self, X: np.ndarray) -> np.ndarray:
        """Temperature-calibrated option probabilities, [n, len(classes)]."""
        return softmax(self.logits(X), self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    @property
    def size_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.net.parameters()))

    # ---- save / load ---------------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        import torch
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        tensors["mean"] = torch.from_numpy(self.mean.astype(np.float32))
        tensors["std"] = torch.from_numpy(self.std.astype(np.float32))
        save_file(tensors, str(folder / WEIGHTS))
        dims = {"input": int(self.mean.shape[0]), "hidden": int(self.net[0].out_features),
                "dropout": float(self.net[2].p)}
        (folder / CONFIG).write_text(json.dumps(
            {"format": FORMAT, "classes": self.classes, "features": self.features, "dims": dims,
             "temperature": self.temperature, "decision": "best modifier if p >= threshold, else base",
             "info": self.info}, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path) -> Router:
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file():
            raise RouterError(f"no {CONFIG} in {folder}: not a router folder")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise RouterError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(str(folder / WEIGHTS))
        dims = meta["dims"]
        net = build_net(dims["input"], dims["hidden"], len(meta["classes"]), dims["dropout"])
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        net.eval()
        return cls(list(meta["classes"]), meta["features"], tensors["mean"].numpy(), tensors["std"].numpy(),
                   net, float(meta["temperature"]), meta.get("info", {}))


def standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0).astype(np.float32)
    std = (X.std(axis=0) + 1e-6).astype(np.float32)
    return mean, std


def train_router(train: Examples, val_X: np.ndarray, val_y: np.ndarray, classes: Sequence[str],
                 features: dict[str, Any], settings: TrainSettings, grid: np.ndarray,
                 init: Router | None = None) -> tuple[Router, History, np.ndarray]:
    """Train (or, from `init`, fine-tune: its standardisation and weights are kept), then fit the temperature
    on the validation split. Returns the router, its history, and the temperature search's losses."""
    if init is not None and list(init.classes) != list(classes):
        raise RouterError(f"warm start: the champion's options {init.classes} differ from {list(classes)}")
    mean, std = (init.mean, init.std) if init is not None else standardiser(train.X)
    net, history = train_net(train, val_X, val_y, len(classes), settings, mean, std,
                             init.state_dict() if init is not None else None)
    router = Router(list(classes), features, mean, std, net)
    if len(val_y):
        router.temperature, nll = fit_temperature(router.logits(val_X), np.asarray(val_y), grid)
    else:
        nll = np.zeros(0)
    return router, history, nll
