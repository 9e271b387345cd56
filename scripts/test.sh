#!/usr/bin/env bash
# The project's test command (README): lint-free code is checked by .ci/run; this runs the tests.
set -euo pipefail
export JAX_PLATFORMS=cpu
exec python -m pytest -n 2 --dist loadfile -q "$@"
