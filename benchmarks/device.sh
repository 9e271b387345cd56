#!/usr/bin/env bash
# The one command to run on a lent accelerator machine (issue 18), from the repository root of a
# bare copy of the working tree where only the NVIDIA driver and JAX may be installed:
#
#     bash benchmarks/device.sh            # writes $OUT/device_gpu.json (OUT defaults to benchmarks/results)
#
# 1. installs JAX with CUDA (jax[cuda12]==0.10.2, the pinned version) if the JAX here has no GPU,
#    and the project with the trainer (`pip install -e ".[train]"`); with WHEELHOUSE=<dir of wheels> pip installs
#    from that folder only (for a machine without network). A failed install is reported and the
#    benchmark still runs: the kernel cases need only JAX and numpy (device.py puts the repository
#    on sys.path); a case whose imports are missing records the error in the JSON.
# 2. runs `python benchmarks/device.py --out $OUT/device_<backend>.json` with the time left of
#    TOTAL_S (default 450 s, under 8 minutes), less a margin for the last case to finish.
# The JSON names the code that measured it (`code_version`): `git describe` where the copy has its
# git history, else $SPARSESCALE_CODE_VERSION, so set it where the history is when composing the
# command: SPARSESCALE_CODE_VERSION=<git describe --always --dirty here> bash benchmarks/device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-450}
MARGIN_S=${MARGIN_S:-90}
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
JAX_VERSION=0.10.2
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-15}
PIP=(timeout "${PIP_TIMEOUT_S:-150}" "$PY" -m pip install --quiet --retries 1)
if [ -n "${WHEELHOUSE:-}" ]; then
  PIP+=(--no-index --find-links "$WHEELHOUSE")
fi
log() { echo "[device.sh $(($(date +%s) - START))s] $*"; }

gpu_jax() {
  "$PY" - <<'EOF' 2>/dev/null
import jax
raise SystemExit(0 if jax.default_backend() in ("gpu", "cuda", "tpu") else 1)
EOF
}

log "python: $("$PY" --version 2>&1); jax: $("$PY" -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices()[0].device_kind)' 2>&1 | tail -1)"
if ! gpu_jax; then
  log "JAX has no accelerator here: installing jax[cuda12]==$JAX_VERSION"
  "${PIP[@]}" "jax[cuda12]==$JAX_VERSION" || log "WARNING: installing jax[cuda12] failed"
fi
log "installing the project with the trainer (pip install -e .[train])"
if ! "${PIP[@]}" -e ".[train]"; then
  log "WARNING: pip install -e . failed; trying without dependencies (kernel cases need only JAX)"
  "${PIP[@]}" --no-deps --no-build-isolation -e . || log "WARNING: that failed too; running from the tree"
fi
gpu_jax || log "WARNING: JAX still sees no accelerator; the results will be $("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)'s"

BACKEND=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)
BUDGET=$((TOTAL_S - ($(date +%s) - START) - MARGIN_S))
[ "$BUDGET" -lt 60 ] && BUDGET=60
mkdir -p "$OUT"
log "running benchmarks/device.py on $BACKEND with --budget-s $BUDGET"
"$PY" benchmarks/device.py --out "$OUT/device_$BACKEND.json" --budget-s "$BUDGET" "$@"
rc=$?
log "done (exit $rc)"
exit $rc
