# Launch logic shared by train.sh and eval.sh (sourced, not run).
#
# Python: $PYTHON, else $LONGMEM_VENV/bin/python, else the repo's .venv, else python3 on PATH
# (with a note). Device: DEVICE=auto (default: GPUs when torch sees any) | cuda | cpu.
# Processes: NNODES nodes (default 1) x NPROC_PER_NODE processes (default: the GPUs, or
# NPROC on CPU, 1 by default); more than one in all goes through torchrun with
# NODE_RANK, MASTER_ADDR (127.0.0.1) and MASTER_PORT (29500), every node running the same
# command with its own NODE_RANK.
# EXTRA_ARGS is split like a shell line (quotes respected, no globbing, no eval) by
# python's shlex; arguments after the stage on the command line are passed as they are.

longmem_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local venv="${LONGMEM_VENV:-$ROOT/.venv}"
  if [ -x "$venv/bin/python" ]; then echo "$venv/bin/python"; return; fi
  if [ -n "${LONGMEM_VENV:-}" ]; then
    echo "error: LONGMEM_VENV=$LONGMEM_VENV has no bin/python; run bash scripts/install.sh \"$LONGMEM_VENV\"" >&2
    exit 2
  fi
  echo "[launch] no $venv; using $(command -v python3 || echo python3) from PATH (set LONGMEM_VENV or PYTHON to choose)" >&2
  echo python3
}

# fills PYTHON, GPUS, DEVICE_ARGS, NNODES, NPROC_PER_NODE, WORLD
longmem_setup_devices() {
  PYTHON="$(longmem_python)"
  DEVICE="${DEVICE:-auto}"
  case "$DEVICE" in
    cpu) GPUS=0 ;;
    auto|cuda) GPUS="${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}" ;;
    *) echo "error: DEVICE=$DEVICE: use auto, cuda or cpu" >&2; exit 2 ;;
  esac
  if [ "$DEVICE" = "cuda" ] && [ "$GPUS" -eq 0 ]; then
    echo "error: DEVICE=cuda but torch sees no GPU ($PYTHON); check the CUDA install or set DEVICE=cpu" >&2
    exit 2
  fi
  NNODES="${NNODES:-1}"
  if [ "$GPUS" -gt 0 ]; then
    NPROC_PER_NODE="${NPROC_PER_NODE:-$GPUS}"
    PRECISION="${PRECISION:-fp16}"
    DEVICE_ARGS=()
    [ "$PRECISION" = "fp16" ] && DEVICE_ARGS=(--fp16)
    [ "$PRECISION" = "bf16" ] && DEVICE_ARGS=(--bf16)
  else
    NPROC_PER_NODE="${NPROC_PER_NODE:-${NPROC:-1}}"
    DEVICE_ARGS=(--cpu)
  fi
  WORLD=$((NNODES * NPROC_PER_NODE))
  [ "$GPUS" -eq 0 ] && [ "$WORLD" -gt 1 ] && DEVICE_ARGS+=(--distributed-backend gloo)
  return 0
}

# refuse a GPU-sized preset on CPU unless DEVICE=cpu says so; $1 = arch
longmem_check_arch() {
  local arch="$1"
  if [ "$GPUS" -eq 0 ] && [ "$DEVICE" != "cpu" ]; then
    case "$arch" in
      *_gpt2_medium|*_gpt2_large|*_gpt2_xl)
        echo "error: $arch is a GPU preset (GPT-2 medium size and up) but torch sees no GPU" \
             "($PYTHON): on CPU one step takes minutes and the run weeks. Check the CUDA" \
             "install, pick a small ARCH/BACKBONE_ARCH (e.g. *_tiny), or set DEVICE=cpu to run it on CPU anyway" >&2
        exit 2 ;;
    esac
  fi
  return 0
}

# EXTRA_ARGS as a bash array, split by shlex (quotes kept, no globbing, no eval)
longmem_extra_args() {
  EXTRA=()
  if [ -n "${EXTRA_ARGS:-}" ]; then
    mapfile -d '' EXTRA < <("$PYTHON" -c \
      'import shlex, sys; sys.stdout.write("".join(a + "\0" for a in shlex.split(sys.argv[1])))' \
      "$EXTRA_ARGS")
  fi
  return 0
}

# run a fairseq_longmem.cli command ($1 = train | eval-lm, then its arguments)
longmem_launch() {
  local cmd="$1"; shift
  if [ "$WORLD" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" \
      --nproc_per_node "$NPROC_PER_NODE" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
      --master_port "${MASTER_PORT:-29500}" -m fairseq_longmem.cli "$cmd" "$@"
  elif [ "$GPUS" -gt 0 ]; then  # one GPU: keep fairseq from spawning one process per GPU
    "$PYTHON" -m fairseq_longmem.cli "$cmd" "$@" --distributed-world-size 1
  else
    "$PYTHON" -m fairseq_longmem.cli "$cmd" "$@"
  fi
}
