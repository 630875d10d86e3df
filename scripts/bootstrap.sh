#!/usr/bin/env bash
# Set up (or reuse) the local virtual environment, then run the pipeline or the tests.
#   bash scripts/bootstrap.sh run  [snakemake args...]   # full default reproduction on kn-tiny
#   bash scripts/bootstrap.sh test [pytest args...]      # the test suite
#   bash scripts/bootstrap.sh lint                       # snakemake --lint (default and sweep experiments)
# Needs only Python >= 3.11 with venv and pip reaching PyPI. KN_VENV overrides the venv path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KN_VENV:-.venv}"
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kn needs Python >= 3.11, found " + sys.version.split()[0])'

stamp="$VENV/.kn-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[kn] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[kn] installing kn and its pinned dependencies (torch==2.13.0, CPU build where available)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

cmd="${1:-}"; shift || true
case "$cmd" in
  run)  exec snakemake --cores "${KN_CORES:-2}" "$@" ;;
  test) exec python -m pytest "$@" ;;
  lint) snakemake --lint && exec snakemake --lint --config 'overrides=["experiment=organism-sweep"]' ;;
  *)    echo "usage: bash scripts/bootstrap.sh run|test|lint [args...]" >&2; exit 2 ;;
esac
