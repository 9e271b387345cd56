#!/usr/bin/env bash
# The crossover's accelerator arm (issue 26) on one GPU: `experiments/crossover.py:acc`, 1.8M to
# 20M non-embedding parameters, dense and 87.5%, seed 0, bf16 compute. Run it on a lent machine
# after `benchmarks/device.sh` (which installs JAX with CUDA and the project):
#
#     bash benchmarks/crossover_acc.sh     # writes $OUT/crossover_<preset>_records.tar.gz
#
# 1. with WHEELHOUSE=<dir of wheels>, installs the project from that folder only (a machine
#    without network); then checks the training stack imports, or stops with one line naming
#    what is missing.
# 2. trains the preset under `launch run` (one run per process: the 20M step holds ~50-85 GB of
#    activations, so runs never stack), smallest size first, stopped (SIGTERM: each trainer saves
#    a checkpoint) after BUDGET_S seconds (default 420);
# 3. writes a record per finished run (`launch collect --records`: its summary names the device
#    and the code) and packs them into one archive in $OUT (OUT defaults to runs/crossover).
#    Unpack it into docs/records/crossover/<preset>/ to commit; a rerun finishes the rest.
# PRESET=acc_smoke runs the same path on a CPU in seconds (tests/test_crossover.py).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PRESET=${PRESET:-acc}
OUT=${OUT:-runs/crossover}
ROOT=${ROOT:-runs/crossover/$PRESET}
BUDGET_S=${BUDGET_S:-420}
PY=${PYTHON:-python3}
log() { echo "[crossover_acc.sh $(($(date +%s) - START))s] $*"; }

if [ -n "${WHEELHOUSE:-}" ]; then
  log "installing the project from $WHEELHOUSE"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -e ".[all]" || log "WARNING: install failed"
fi
"$PY" - <<'EOF' || exit 2
import importlib.util
import sys

need = ("jax", "flax", "optax", "orbax", "grain", "tensorflow_datasets", "ml_collections", "pandas")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: the training stack is not installed here (missing: {', '.join(missing)}); "
             "run benchmarks/device.sh first, or set WHEELHOUSE to a folder of wheels")
EOF
log "training experiments/crossover.py:$PRESET under $ROOT for at most ${BUDGET_S}s"
timeout -s TERM -k 90 "$BUDGET_S" "$PY" -m launch run "experiments/crossover.py:$PRESET" \
  --root "$ROOT" --stack 1 --max-retries 0 --refresh 60
rc=$?
[ "$rc" -eq 124 ] && log "budget spent: stopped (checkpoints kept; a rerun resumes)"
records="$ROOT/.records"
rm -rf "$records"
"$PY" -m launch collect "$ROOT" --records "$records" || rc=1
mkdir -p "$OUT"
tar -czf "$OUT/crossover_${PRESET}_records.tar.gz" -C "$records" .
log "$(ls "$records" | wc -l) records in $OUT/crossover_${PRESET}_records.tar.gz (exit $rc)"
exit "$rc"
