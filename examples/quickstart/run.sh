#!/usr/bin/env bash
# The README's first command: install what is missing, then run the CPU quickstart.
# Usage: bash examples/quickstart/run.sh [--workdir DIR] [--corpus PATH] [...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LONGMEM_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh" "$VENV"
exec "$VENV/bin/python" "$ROOT/examples/quickstart/quickstart.py" "$@"
