#!/usr/bin/env bash
# Create .venv-axolotl (Python 3.11) from requirements-axolotl.txt: Axolotl's own runtime, since its pins
# clash with llmcompressor's in .venv (shared/STACK.md). Reinstalls only when requirements-axolotl.txt changed
# since the last install (its sha256 is kept in .venv-axolotl/.forge-installed): the second call takes ~1 s.
# The trainer image is the production equivalent; forge.modifiers.axolotl_runner finds either.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FORGE_AXOLOTL_VENV:-$REPO/.venv-axolotl}"
REQS="$REPO/requirements-axolotl.txt"
STAMP="$VENV/.forge-installed"
PYTHON="${PYTHON:-python3.11}"

# pip repeats this line for every install location it is told to skip: pure noise here.
quiet_pip() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v -E '^WARNING: Location .* is ignored' || true; }; }

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" == "$have" && -x "$VENV/bin/axolotl" ]]; then
  echo "setup: .venv-axolotl is up to date with requirements-axolotl.txt"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (Axolotl 0.19 needs Python 3.11)" >&2; exit 1; }
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

echo "setup: installing requirements-axolotl.txt into $(basename "$VENV") (Axolotl 0.19 + torch CPU;"
echo "       first time ~2-6 min and ~4.5 GB, later installs only when the file changes)"
started=$SECONDS
quiet_pip install --disable-pip-version-check -q -r "$REQS"
echo "setup: installed in $((SECONDS - started)) s"
quiet_pip check --disable-pip-version-check
# the CLI is what the runner calls: fail here, not in the first training task
AXOLOTL_DO_NOT_TRACK=1 "$VENV/bin/axolotl" --help >/dev/null \
  || { echo "setup: $VENV/bin/axolotl does not start" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: $(basename "$VENV") ready ($(du -sh "$VENV" | cut -f1))"
