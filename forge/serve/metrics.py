"""8D: what the server exposes at /metrics (Prometheus text format) and its structured JSON logs.

Every metric lives in the server's own CollectorRegistry (several servers in one test process stay apart).
The Grafana dashboard (docker/grafana/dashboards/forge-serving.json) queries exactly these names.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
TPS_BUCKETS = (1, 2, 5, 10, 20, 40, 60, 80, 120, 200, 400, 800)


class ServingMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "forge_requests_total",
            "Chat requests by mode, routed option and outcome",
            ["mode", "option", "status"],
            registry=r,
        )
        self.http_errors = Counter(
            "forge_http_errors_total",
            "Rejected requests by HTTP status and reason",
            ["status", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "forge_request_latency_seconds",
            "Whole request, submit to last token",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "forge_time_to_first_token_seconds",
            "Submit to first generated token",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "forge_tokens_per_second", "Decode speed per request", ["mode"], buckets=TPS_BUCKETS, registry=r
        )
        self.tokens = Counter(
            "forge_tokens_total", "Tokens by kind (prompt, completion)", ["kind"], registry=r
        )
        self.routing = Counter(
            "forge_routing_decisions_total", "Which option answered, by mode", ["mode", "option"], registry=r
        )
        self.escalations = Counter(
            "forge_escalations_total", "Follow-ups the detector read as dissatisfaction", registry=r
        )
        self.router_latency = Histogram(
            "forge_router_latency_seconds", "Routing per request (6A-6D)", buckets=FAST_BUCKETS, registry=r
        )
        self.adapter_switch = Histogram(
            "forge_adapter_switch_seconds", "LoRA hot-swap on a worker", buckets=FAST_BUCKETS, registry=r
        )
        self.feedback = Counter("forge_feedback_total", "Thumbs up/down from users", ["rating"], registry=r)
        self.self_consistency_agreement = Histogram(
            "forge_self_consistency_agreement",
            "Share of sampled paths that agree with the vote",
            buckets=(0.2, 0.4, 0.5, 0.6, 0.8, 1.0),
            registry=r,
        )
        self.critique_scores = Histogram(
            "forge_critique_score",
            "12A's 0-10 score of first answers",
            buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
            registry=r,
        )
        self.regenerations = Counter(
            "forge_critique_regenerations_total", "Answers 12B regenerated", registry=r
        )
        self.in_flight = Gauge("forge_requests_in_flight", "Requests being generated or waiting", registry=r)
        self.queue_depth = Gauge("forge_queue_depth", "Requests waiting for a worker", registry=r)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and whatever `extra={"fields": {...}}` adds."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def json_logging(level: int = logging.INFO) -> None:
    """Route forge.serve's logs to stderr as JSON lines (the server's CLI calls this)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("forge.serve", "forge.serve.access"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(level)
        lg.propagate = False


def now() -> float:
    return time.perf_counter()
