#!/usr/bin/env bash
# Create .venv and install requirements.txt, only when requirements.txt changed since the last
# install (its sha256 is kept in .venv/.forge-installed). Idempotent: the second call takes ~1 s.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.forge-installed"
PYTHON="${PYTHON:-python3.11}"

# pip repeats this line for every install location it is told to skip: pure noise here.
quiet_pip() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v -E '^WARNING: Location .* is ignored' || true; }; }

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (Forge needs Python 3.11)" >&2; exit 1; }
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

want="$(sha256sum "$REPO/requirements.txt" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
  echo "setup: installing requirements.txt into .venv (first time: a few minutes, plus ~12 min to compile"
  echo "       llama-cpp-python on 2 cores; pip caches the wheel, later installs take seconds)"
  started=$SECONDS
  # llama.cpp's multimodal (llava) library is not used: skip compiling it
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF"
  quiet_pip install --disable-pip-version-check -q -r "$REPO/requirements.txt"
  echo "setup: installed in $((SECONDS - started)) s"
  quiet_pip check --disable-pip-version-check
  echo "$want" > "$STAMP"
else
  echo "setup: .venv is up to date with requirements.txt"
fi

# llama.cpp's converters (from the pinned llama-cpp-python sdist) and their gguf-py: once per version,
# silent when already there
(cd "$REPO" && "$VENV/bin/python" -m forge.compress.llama_cpp_tools install)
