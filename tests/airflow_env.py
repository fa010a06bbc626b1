"""A throwaway AIRFLOW_HOME for the Airflow tests, set BEFORE airflow is first imported.

Airflow reads its config (home, metadata DB, dags folder) once, at import; every Airflow test
module calls `configure()` at its top so all of them agree on one temp home per pytest process,
and no test ever touches a real ~/airflow or a developer's AIRFLOW_HOME.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_HOME: Path | None = None


def configure() -> Path:
    global _HOME
    if _HOME is not None:
        return _HOME
    if "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before tests.airflow_env.configure(): "
                           "its config (AIRFLOW_HOME, DB) is already fixed")
    _HOME = Path(tempfile.mkdtemp(prefix="forge-airflow-test-"))
    atexit.register(shutil.rmtree, _HOME, True)
    os.environ.update({
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    })
    return _HOME
