"""8D: which Prometheus series the Grafana dashboard and the alert rules query (checked against /metrics)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

METRIC = re.compile(r"\bforge_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def series_names(exprs: Iterator[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def family(name: str) -> str:
    """forge_x_seconds_bucket -> forge_x_seconds (the family a /metrics '# TYPE' line names)."""
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_metric_names(path: Path) -> set[str]:
    return series_names(_exprs(json.loads(Path(path).read_text())))


def rule_metric_names(path: Path) -> set[str]:
    return series_names(_exprs(yaml.safe_load(Path(path).read_text())))
