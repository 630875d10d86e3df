#!/usr/bin/env bash
# The GPU path, executed: one command that checks kn on a CUDA machine and measures it (docs/gpu.md).
#
#   bash scripts/device_check.sh                 # on the device machine (CUDA; bert-base and bert-large sizes)
#   bash scripts/device_check.sh --cpu           # the same steps at tiny sizes on the CPU (tests/test_device_check.py)
#   bash scripts/device_check.sh --fetch-wheels  # here, once: the wheels the device machine lacks, into .whl/
#
# Options: --out DIR (the report: device_check.{json,md,log}; default $OUT, else WORK/out) and
# --work DIR (scratch; default /tmp/kn-device-check). PYTHON picks the interpreter (default python3).
# Each step runs in its own process under `timeout`, so a stuck one cannot eat the device budget;
# the report step always runs and says which steps failed. Exit status 0 when every check passed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=$REPO/.whl
WHEEL_LIST=$REPO/scripts/device_wheels.txt
TREE_LIMIT_MIB=64  # the device tool's limit on the working tree plus carried paths
MODE=cuda
WORK=/tmp/kn-device-check
OUT_DIR=${OUT:-}
FETCH=

while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --fetch-wheels) FETCH=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --work) WORK=$2; shift ;;
    *) echo "usage: bash scripts/device_check.sh [--cpu] [--out DIR] [--work DIR] | --fetch-wheels" >&2; exit 2 ;;
  esac
  shift
done

fetch_wheels() {  # the device machine's platform (CPython 3.12, manylinux x86_64); torch never travels
  local platforms=() n
  for n in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$n")
  done
  rm -rf "$WHEELS" && mkdir -p "$WHEELS" || return
  # binary wheels: everything above the marker line of the list; the pure-Python sdists below it are built here
  sed '/^# --- sdist only/,$d' "$WHEEL_LIST" > "$WHEELS/.binary.txt"
  sed -n '/^# --- sdist only/,$p' "$WHEEL_LIST" | grep -v '^#' > "$WHEELS/.sdist.txt"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$WHEELS" -r "$WHEELS/.binary.txt" || return
  "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" -r "$WHEELS/.sdist.txt" || return
  rm -f "$WHEELS/.binary.txt" "$WHEELS/.sdist.txt"
  local wheels tree
  wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
  tree=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $((wheels / 1048576)) MiB; with the working tree $(((wheels + tree) / 1048576)) MiB of the device tool's $TREE_LIMIT_MIB"
  [ $((wheels + tree)) -le $((TREE_LIMIT_MIB * 1048576)) ] || { echo "too large to travel: carry fewer wheels" >&2; return 1; }
}

if [ -n "$FETCH" ]; then
  fetch_wheels
  exit
fi

OUT_DIR=${OUT_DIR:-$WORK/out}
SITE=$WORK/site
mkdir -p "$WORK" "$OUT_DIR" || exit
rm -rf "$WORK/parts" "$WORK/steps.tsv"
LOG=$OUT_DIR/device_check.log
: > "$LOG"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export KN_CONF_DIR=$REPO/conf            # an installed (non-editable) kn finds the project's config here
export KN_GPU_LOCK_DIR=$WORK/gpu-locks   # kn.devices' GPU slots of this check's processes
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export REPO PYTHON WHEELS MODE WORK SITE
CPU_FLAG=()
[ "$MODE" = cpu ] && CPU_FLAG=(--cpu)

install_kn() {  # the carried wheels (device only) and kn itself into $SITE; torch is the machine's own
  rm -rf "$SITE" "$WORK/kn-src" && mkdir -p "$SITE" "$WORK/kn-src" || return
  if [ "$MODE" = cuda ]; then
    ls "$WHEELS"/*.whl > /dev/null 2>&1 || {
      echo "no wheels in $WHEELS: run 'bash scripts/device_check.sh --fetch-wheels' here and carry .whl" >&2; return 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || return
  fi
  # built from a copy, so no build/ or egg-info lands in the checkout
  cp -r "$REPO/pyproject.toml" "$REPO/src" "$WORK/kn-src/" && rm -rf "$WORK/kn-src/src/"*.egg-info || return
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" "$WORK/kn-src" || return
  "$PYTHON" -c "import kn, snakemake, hydra, omegaconf, torch; print('kn from', kn.__file__, '| torch from', torch.__file__)"
}
export -f install_kn

step() {  # step NAME LIMIT_S COMMAND...: run it under timeout, log its exit status and seconds, never abort
  local name=$1 limit=$2 started=$SECONDS rc extra=""
  shift 2
  echo "[device_check] == $name (limit ${limit} s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$name" = install ] && extra=$'\t'$SITE
  printf '%s\t%s\t%s\t%s%s\n' "$name" "$rc" "$((SECONDS - started))" "$limit" "$extra" >> "$WORK/steps.tsv"
  echo "[device_check] == $name: exit $rc after $((SECONDS - started)) s" | tee -a "$LOG"
}

# Limits: on the device their sum (515 s) stays inside one 540 s call; a normal run should take about
# half (docs/gpu.md). The CPU mode gets three times as long: CI machines are slow and shared.
scale=1
[ "$MODE" = cpu ] && scale=3
py=("$PYTHON" "$REPO/scripts/device_check.py")
step install $((45 * scale)) bash -c install_kn
step env $((30 * scale)) "${py[@]}" env --work "$WORK" "${CPU_FLAG[@]}"
step standins $((60 * scale)) "${py[@]}" standins --work "$WORK" "${CPU_FLAG[@]}"
step agree $((75 * scale)) "${py[@]}" agree --work "$WORK" "${CPU_FLAG[@]}"
step timing $((105 * scale)) "${py[@]}" timing --work "$WORK" "${CPU_FLAG[@]}"
step pipeline $((180 * scale)) "${py[@]}" pipeline --work "$WORK" --limit $((165 * scale)) "${CPU_FLAG[@]}"
timeout $((20 * scale)) "${py[@]}" report --work "$WORK" --out "$OUT_DIR" "${CPU_FLAG[@]}" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
