#!/usr/bin/env bash
# Recall by distance in minutes: synthetic corpus, a backbone that copies in context,
# LongMem and the no-memory ablation, recall by distance with a 65,536-token memory.
# Usage: bash examples/recall/run.sh [--workdir DIR] [--corpus DIR] [...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LONGMEM_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/install.sh" "$VENV"
exec "$VENV/bin/python" "$ROOT/examples/recall/recall_demo.py" "$@"
