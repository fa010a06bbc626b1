"""forge_pipeline_scheduled: forge_pipeline on a weekly schedule, so runs can be backfilled.

Same tasks, built by the same code (operators/pipeline_dag.py); only the schedule differs.
Paused on creation: unpause it to rebuild every week, or leave it paused and use it for
`airflow backfill create` (backfill runs need a time schedule; they start once it is unpaused).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

# The project root holds `forge` and `operators`; Airflow puts only dags/ on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from operators.pipeline_dag import build_pipeline_dag  # noqa: E402

DOC_MD = """
### Forge pipeline, scheduled (for backfills)

The tasks of **forge_pipeline**, on a weekly schedule (Sunday 00:00 UTC), catchup off, paused
when created. It exists so a run can be tied to a date and re-run with Airflow's backfill:

* Re-run the failed steps of a date's run (e.g. a compression step killed at 3 a.m.):
  `airflow backfill create --dag-id forge_pipeline_scheduled --from-date 2026-11-22
  --to-date 2026-11-22 --reprocess-behavior failed`. The failed run is cleared and runs again
  under the same run id; every task whose inputs and config did not change is a cache hit
  (its outputs are reused from the artifact store), so only the failed step and what depends
  on it compute.
* A new run for a past date takes its config like a manual run: `--dag-run-conf
  '{"profile": "demo", "overrides": {...}}'` (trigger-form fields and config overrides);
  without it, the form's defaults.
* Backfill runs only start while this DAG is **unpaused**. With catchup off, unpausing also
  schedules the most recent week once (default config) unless a run for that date exists.
"""

dag = build_pipeline_dag(
    "forge_pipeline_scheduled",
    doc_md=DOC_MD,
    schedule="@weekly",
    start_date=datetime(2026, 1, 4, tzinfo=UTC),  # a Sunday: the first weekly slot
    is_paused_upon_creation=True,
    tags=("scheduled", "backfill"),
)
