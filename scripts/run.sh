#!/usr/bin/env bash
# `make run`: start the stack, run the demo pipeline through Airflow's REST API, then keep the
# stack up for the UIs until Ctrl-C. With --once: stop the stack when the run ends and exit with
# the run's result (0 success, 1 failed, 2 could not start). Other arguments go to run_demo.py.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ONCE=0
if [[ "${1:-}" == "--once" ]]; then ONCE=1; shift; fi

# Whatever happens (failure, Ctrl-C), the stack is stopped on the way out.
trap '"$REPO/scripts/stack.sh" stop' EXIT
trap 'exit 130' INT TERM

"$REPO/scripts/stack.sh" start || exit 2
rc=0
"$REPO/.venv/bin/python" "$REPO/scripts/run_demo.py" "$@" || rc=$?
if ((ONCE)); then exit "$rc"; fi

# shellcheck disable=SC1091
source "${FORGE_HOME:-$REPO/.forge}/env.sh" 2>/dev/null || true
echo
echo "The stack stays up: Airflow UI ${FORGE_AIRFLOW_URL:-http://127.0.0.1:8080} (admin / admin)," \
     "MLflow UI ${FORGE_MLFLOW_URL:-http://127.0.0.1:5000}. Press Ctrl-C to stop it."
while true; do sleep 1; done
