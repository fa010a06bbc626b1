#!/usr/bin/env bash
# `make run`: start the stack, run the demo pipeline through Airflow's REST API, then keep the
# stack up for the UIs until Ctrl-C. With --once: stop the stack when the run ends and exit with
# the run's result (0 success, 1 failed, 2 could not start). Other arguments go to run_demo.py.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ONCE=0
if [[ "${1:-}" == "--once" ]]; then ONCE=1; shift; fi

# Whatever happens (failure, Ctrl-C), the stack (and the inference server) is stopped on the way out.
SERVE_PID=""
trap '[[ -n "$SERVE_PID" ]] && kill "$SERVE_PID" 2>/dev/null; "$REPO/scripts/stack.sh" stop' EXIT
trap 'exit 130' INT TERM

"$REPO/scripts/stack.sh" start || exit 2
rc=0
"$REPO/.venv/bin/python" "$REPO/scripts/run_demo.py" "$@" || rc=$?
if ((ONCE)); then exit "$rc"; fi

# shellcheck disable=SC1091
source "${FORGE_HOME:-$REPO/.forge}/env.sh" 2>/dev/null || true

# The run's release (8A) behind the inference server: OpenAI-compatible API, Gradio chat, /metrics
FORGE_HOME_DIR="${FORGE_HOME:-$REPO/.forge}"
SERVE_URL="${FORGE_SERVE_URL:-http://127.0.0.1:8000}"
if ((rc == 0)) && [[ -s "$FORGE_HOME_DIR/last_run_id" ]]; then
  run_id="$(cat "$FORGE_HOME_DIR/last_run_id")"
  "$REPO/.venv/bin/python" -m forge serve --run-id "$run_id" --port "${SERVE_URL##*:}" \
    > "$FORGE_HOME_DIR/logs/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 120); do
    curl -fsS "$SERVE_URL/health" >/dev/null 2>&1 && break
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 1
  done
  if curl -fsS "$SERVE_URL/health" >/dev/null 2>&1; then
    echo
    echo "Inference server (release of run $run_id): API $SERVE_URL/v1 (key: \$FORGE_API_KEYS in" \
         "$FORGE_HOME_DIR/env.sh), chat $SERVE_URL/chat, metrics $SERVE_URL/metrics, docs $SERVE_URL/docs"
  else
    echo "The inference server did not start: see $FORGE_HOME_DIR/logs/serve.log" >&2
  fi
fi
echo
echo "The stack stays up: Airflow UI ${FORGE_AIRFLOW_URL:-http://127.0.0.1:8080} (admin / admin)," \
     "MLflow UI ${FORGE_MLFLOW_URL:-http://127.0.0.1:5000}. Press Ctrl-C to stop it."
while true; do sleep 1; done
