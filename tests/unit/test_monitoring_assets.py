"""8D's monitoring assets (docker/prometheus, docker/grafana) against forge/serve/metrics.py: every forge_*
name a dashboard panel or an alert rule queries must be a sample that ServingMetrics really exposes, so
renaming a metric (or one of its labels) breaks this test instead of silently blanking a panel. Only parses
files; no Prometheus, Grafana or promtool needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forge.serve.metrics import ServingMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
DATASOURCE_YML = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER_YML = DOCKER / "grafana" / "provisioning" / "dashboards" / "forge.yml"
DASHBOARD_JSON = DOCKER / "grafana" / "dashboards" / "forge-serving.json"

# Labels Prometheus attaches at scrape time, not the app.
TARGET_LABELS = {"job", "instance"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![A-Za-z0-9_:])forge_[A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])(forge_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


# ---- what ServingMetrics exposes --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Sample name -> its label names, from the text exposition of a fresh registry after one sample of each
    metric (labelled ones get dummy label values first, or they would expose no samples at all)."""
    m = ServingMetrics()
    metrics = [v for v in vars(m).values() if isinstance(v, (Counter, Gauge, Histogram))]
    assert len(metrics) >= 16, "ServingMetrics lost metrics?"
    for metric in metrics:
        labelnames = getattr(metric, "_labelnames", ())
        child = metric.labels(*[f"dummy_{n}" for n in labelnames]) if labelnames else metric
        if isinstance(metric, Histogram):
            child.observe(1.0)
        elif isinstance(metric, Counter):
            child.inc()
        else:
            child.set(1)
    text = generate_latest(m.registry).decode()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    # the exposition itself, independently of the parser
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.split(r"[{ ]", line, maxsplit=1)[0] in samples
    return samples


def _check_expr(expr: str, exposed: dict[str, set[str]], where: str) -> set[str]:
    bare = _STRING.sub('""', expr)
    names = set(_NAME.findall(bare))
    unknown = sorted(n for n in names if n not in exposed)
    assert not unknown, f"{where}: {unknown} not exposed by ServingMetrics (have {sorted(exposed)})"
    for name, matchers in _SELECTOR.findall(bare):
        labels = set(_MATCHER.findall(matchers))
        extra = labels - exposed[name] - TARGET_LABELS
        assert not extra, f"{where}: {name} has no label(s) {sorted(extra)} (has {sorted(exposed[name])})"
    return names


def test_exposition_has_every_metric(exposed):
    # the suffixed names prometheus_client exposes, spot-checked
    for name in ("forge_requests_total", "forge_http_errors_total", "forge_request_latency_seconds_bucket",
                 "forge_critique_score_count", "forge_queue_depth", "forge_requests_in_flight",
                 "forge_escalations_total"):
        assert name in exposed
    assert "forge_request_latency_seconds" not in exposed  # histograms only as _bucket/_sum/_count


# ---- Grafana dashboard ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "forge-serving"
    assert dashboard["title"] == "Forge serving"
    assert dashboard["schemaVersion"] == 39


def test_dashboard_exprs_use_only_exposed_metrics(dashboard, exposed):
    used: set[str] = set()
    n_targets = 0
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            assert t.get("expr"), f"panel {p['title']!r} target {t.get('refId')} has no expr"
            used |= _check_expr(t["expr"], exposed, f"panel {p['title']!r}")
            n_targets += 1
    assert n_targets >= 15
    # every ServingMetrics metric shows up somewhere on the dashboard
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in exposed if not n.endswith("_created")}
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families - covered == set(), f"not on the dashboard: {sorted(families - covered)}"


def test_panels_have_unique_ids_and_gridpos(dashboard):
    panels = _panels(dashboard)
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p.get("gridPos")
        assert g and {"h", "w", "x", "y"} <= g.keys(), f"panel {p.get('title')!r} has no full gridPos"
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_panels_use_the_provisioned_datasource(dashboard):
    provisioned = yaml.safe_load(DATASOURCE_YML.read_text())["datasources"]
    assert len(provisioned) == 1
    ds = provisioned[0]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090" and ds["isDefault"] is True
    seen = 0
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        for obj in [p, *p.get("targets", [])]:
            if "datasource" in obj:
                assert obj["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
                seen += 1
    assert seen
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == ds["uid"]


def test_mode_variable(dashboard, exposed):
    (mode,) = [v for v in dashboard["templating"]["list"] if v["name"] == "mode"]
    query = mode["query"]["query"] if isinstance(mode["query"], dict) else mode["query"]
    assert query == "label_values(forge_requests_total, mode)"
    assert "mode" in exposed["forge_requests_total"]
    assert any('"$mode"' in t["expr"] for p in _panels(dashboard) for t in p.get("targets", []))


def test_dashboard_provider():
    providers = yaml.safe_load(PROVIDER_YML.read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ---- Prometheus -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS_YML.read_text())


def test_scrape_config(prometheus):
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "forge-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["forge-serve:8000"]
    assert job.get("scrape_interval", prometheus["global"]["scrape_interval"]) == "15s"


def test_rule_files_exist(prometheus):
    files = prometheus.get("rule_files") or []
    assert files
    for f in files:  # Prometheus resolves relative rule_files against the config file's directory
        path = (PROMETHEUS_YML.parent / f) if not Path(f).is_absolute() else Path(f)
        assert path.is_file(), f"rule file {f} not found next to prometheus.yml"


def test_alert_rules(prometheus, exposed):
    alerts = []
    for f in prometheus["rule_files"]:
        doc = yaml.safe_load((PROMETHEUS_YML.parent / f).read_text())
        for group in doc["groups"]:
            assert group["name"] and group["rules"]
            alerts += group["rules"]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), names
    used: set[str] = set()
    for a in alerts:
        assert a["labels"]["severity"] in {"critical", "warning", "info"}, a["alert"]
        assert a["annotations"]["summary"], a["alert"]
        used |= _check_expr(a["expr"], exposed, f"alert {a['alert']}")
    # the brief's four: 5xx ratio, p99 latency, queue depth, target/series gone
    assert {"forge_http_errors_total", "forge_request_latency_seconds_bucket", "forge_queue_depth"} <= used
    assert any("up{" in a["expr"] or "absent(" in a["expr"] for a in alerts)
