"""forge_router_retraining: every week, retrain the router from serving feedback (plan phase 13A).

Built by operators/router_retraining.py from the phase registry; the jobs are forge/routing/retraining.py.
Imports nothing heavier than pydantic/yaml so the DAG processor parses it fast.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

# The project root holds `forge` and `operators`; Airflow puts only dags/ on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from operators.router_retraining import build_retraining_dag  # noqa: E402

DOC_MD = """
### Forge router retraining (13A), weekly

Each run reads the feedback serving logged during its **data interval** (routing decisions, thumbs up/down,
escalations the detector caught), retrains `forge-router@champion` on it, compares the challenger with the
champion on the fixed held-out set (6A's test split) and the week's held-out feedback, and moves the
`champion` alias only if the challenger is better. The decision and its reason are in the last task's
MLflow run, the ledger and the model version's tags.

* Bad feedback rows (missing fields, wrong types, unknown sessions) are counted and skipped; the report is
  `feedback_report.json` in the first task's output and its MLflow run.
* No champion yet, or too little feedback in the week: the run is skipped, saying why.
* Idempotent per week: re-running a week with the same feedback reuses its outputs (cache hits) and
  registers nothing new. Past weeks: `airflow backfill create --dag-id forge_router_retraining
  --from-date 2026-11-15 --to-date 2026-11-22 --reprocess-behavior failed` runs the weeks starting on
  those Sundays, in order: each week's first task waits until the week before has decided
  (`wait_for_downstream`), so a week is always measured against the champion the week before left,
  whatever the backfill's `--max-active-runs`. (Airflow refuses a backfill of such a DAG without
  `--reprocess-behavior failed` or `completed`: say which weeks already run are run again.) A week that
  failed holds the weeks after it until it is cleared (re-run) or marked. A manual trigger retrains on the
  last complete week.
"""

dag = build_retraining_dag(
    "forge_router_retraining",
    doc_md=DOC_MD,
    start_date=datetime(2026, 1, 4, tzinfo=UTC),  # a Sunday: the first weekly interval
)
