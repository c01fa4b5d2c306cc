#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything fairseq-longmem needs.
# Usage: bash scripts/install.sh [VENV_DIR]   (default: .venv in the repo root)
# Idempotent: a venv that already imports everything is left as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${LONGMEM_VENV:-$ROOT/.venv}}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
FAIRSEQ_SPEC="${FAIRSEQ_SPEC:-fairseq-fixed==0.12.3.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# the memory layer's compiled CPU kernels (fairseq_longmem/csrc): built once per
# machine (about a minute, cached); without a compiler the PyTorch path is used
build_kernels() {
  "$VPY" -c "from fairseq_longmem.modules.cpu_kernels import main; main()" \
    || echo "[install] CPU memory kernels not built: the memory layer will use its slower PyTorch path"
}
if "$VPY" - <<'PYCHK' 2>/dev/null; then
import importlib, sys
for m in ("torch", "fairseq", "faiss", "sentencepiece", "matplotlib", "tensorboardX", "pytest",
          "fairseq_longmem", "safetensors", "tokenizers", "transformers", "zstandard"):
    importlib.import_module(m)
import fairseq_longmem.preprocess  # installed (editable) with its package mapping
PYCHK
  echo "[install] $VENV already complete"
  build_kernels
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install -q --upgrade pip setuptools wheel
# 1. torch first and pinned: anything unpinned would pull a multi-GB CUDA build
echo "[install] torch==$TORCH_VERSION"
"$VPY" -m pip install -q "torch==$TORCH_VERSION"
# 2. fairseq's real dependencies (not torchaudio: it would replace torch)
echo "[install] fairseq dependencies"
"$VPY" -m pip install -q -r "$ROOT/requirements.txt" "torch==$TORCH_VERSION"
# 3. fairseq itself, without its declared dependencies (see README: why fairseq-fixed)
if ! "$VPY" -c "import fairseq" 2>/dev/null; then
  echo "[install] $FAIRSEQ_SPEC (source build, about 2-3 minutes)"
  "$VPY" -m pip install -q --no-deps --no-build-isolation "$FAIRSEQ_SPEC"
fi
# 4. this plugin (editable: the repo is the source of truth)
echo "[install] fairseq-longmem (editable)"
"$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
"$VPY" -c "import fairseq, faiss, fairseq_longmem; print('[install] ok: fairseq', fairseq.__version__, 'faiss', faiss.__version__)"
build_kernels
