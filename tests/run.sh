#!/usr/bin/env bash
# The README's test command: install what is missing, then run the test suite on CPU.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LONGMEM_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh" "$VENV"
cd "$ROOT"
# one BLAS/OpenMP thread per process: tests run several processes on 2 cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
