#!/usr/bin/env bash
# Resolve every Forge image's Python requirements for the image's own Python and platform, without building
# the image (no Docker engine needed) and without installing anything: `uv pip compile` reads package
# metadata only, so the trainer's CUDA torch (several GB) is resolved, not downloaded.
#
#   scripts/check_image_requirements.sh        # needs PyPI; about a minute the first time, seconds after
#
#   image                Python  what it installs
#   docker/airflow       3.11    requirements.txt + the Airflow providers (ARG AIRFLOW_PROVIDERS); its worker
#                                target adds requirements-axolotl.txt with the CPU torch, which is .venv-axolotl
#                                itself (tests/unit/test_compose.py compares them; PyTorch's CPU index, where
#                                that torch comes from, is not reachable here)
#   docker/serve         3.12    requirements.txt
#   docker/trainer       3.12    /opt/venv: requirements.txt + providers; /opt/venv-axolotl: requirements-axolotl.txt
#                                without its triton pin (the CPU freeze's 3.9.0; CUDA torch 2.13.0 pins 3.7.1)
#
# tests/unit/test_compose.py does the fast part of this (the pins against .venv, the providers with pip).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION=0.13.8
PLATFORM=x86_64-manylinux_2_28   # Debian bookworm (glibc 2.36) and Ubuntu 24.04 (2.39) both run these wheels
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export UV_CACHE_DIR="${UV_CACHE_DIR:-$HOME/.cache/forge-uv}"

python3 -m venv "$WORK/uv" && "$WORK/uv/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION" \
  2> >(grep -v -E '^WARNING: Location .* is ignored' >&2)
UV="$WORK/uv/bin/uv"

providers="$(sed -n 's/^ARG AIRFLOW_PROVIDERS="\(.*\)"$/\1/p' "$REPO/docker/airflow/Dockerfile")"
[[ -n "$providers" ]] || { echo "no ARG AIRFLOW_PROVIDERS in docker/airflow/Dockerfile" >&2; exit 1; }
tr ' ' '\n' <<<"$providers" > "$WORK/providers.txt"
grep -v '^triton==' "$REPO/requirements-axolotl.txt" > "$WORK/axolotl.txt"

failed=0
resolve() {  # NAME PYTHON REQUIREMENTS...
  local name="$1" py="$2"; shift 2
  local started=$SECONDS out="$WORK/$name.txt"
  if "$UV" pip compile --quiet --no-header --python-version "$py" --python-platform "$PLATFORM" \
       -o "$out" "$@" 2> "$WORK/$name.err"; then
    printf '  %-16s python %s  ok: %4d packages  (%ds)  torch %s\n' "$name" "$py" \
      "$(grep -c '==' "$out")" $((SECONDS - started)) "$(sed -n 's/^torch==//p' "$out")"
  else
    printf '  %-16s python %s  FAILED\n' "$name" "$py"; sed 's/^/      /' "$WORK/$name.err"; failed=1
  fi
}

echo "resolving the images' Python requirements (uv $UV_VERSION, $PLATFORM):"
resolve airflow        3.11 "$REPO/requirements.txt" "$WORK/providers.txt"
resolve serve          3.12 "$REPO/requirements.txt"
resolve trainer-main   3.12 "$REPO/requirements.txt" "$WORK/providers.txt"
resolve trainer-axolotl 3.12 "$WORK/axolotl.txt"
exit $failed
