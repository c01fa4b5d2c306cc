#!/usr/bin/env bash
# LongMem training recipe (the paper's hyper-parameters by default).
#
#   bash train.sh backbone   # stage 1: pretrain an ALiBi backbone with stock fairseq-train
#   bash train.sh adapt      # stage 2: memory-augmented adaptation (LongMem, or MemTRM via ARCH)
#   bash train.sh ablation   # stage 2 without memory: the same side network, the honest baseline
#   bash train.sh all        # stage 1 unless PTM_PATH exists, then stage 2
#
# Everything is overridable by environment variables, e.g.
#   DATA_DIR=data-bin CKPT_DIR=checkpoints GPUS=8 bash train.sh adapt
#   PTM_PATH=/models/my_transformer_lm.pt ARCH=longmem_gpt2_medium bash train.sh adapt
#   ARCH=memtrm_gpt2_medium bash train.sh adapt          # the MemTRM baseline
#   bash train.sh adapt --max-epoch 3 --adam-betas '(0.9, 0.98)'   # extra fairseq flags
#
# Devices and processes (scripts/launch.sh): DEVICE=auto|cuda|cpu (the *_gpt2_medium presets
# refuse to start without a GPU unless DEVICE=cpu); one process per GPU (NPROC_PER_NODE), or
# NPROC CPU processes (gloo); several nodes through torchrun: run the same command on every
# node with NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0> MASTER_PORT=29500 (examples/slurm/).
# The global batch is NNODES x NPROC_PER_NODE x BATCH_SIZE streams x UPDATE_FREQ.
# UPDATE_FREQ (--update-freq), LOG_DIR (tensorboard logs, one folder per stage),
# WANDB_PROJECT (--wandb-project). EXTRA_ARGS are appended to the fairseq command line,
# split like a shell line (quotes respected, no globbing); so are arguments after the stage.
# Python: PYTHON, else LONGMEM_VENV/bin/python, else .venv/bin/python, else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAGE="${1:-all}"
shift || true
# shellcheck source=scripts/launch.sh
source "$ROOT/scripts/launch.sh"

DATA_DIR="${DATA_DIR:-data-bin}"
CKPT_DIR="${CKPT_DIR:-checkpoints}"
# stage 1: backbone
BACKBONE_ARCH="${BACKBONE_ARCH:-alibi_lm_gpt2_medium}"
BACKBONE_TOKENS="${BACKBONE_TOKENS:-1024}"
BACKBONE_LR="${BACKBONE_LR:-3e-4}"
BACKBONE_UPDATES="${BACKBONE_UPDATES:-100000}"
BACKBONE_BATCH="${BACKBONE_BATCH:-8}"
PTM_PATH_GIVEN="${PTM_PATH:-}"
PTM_PATH="${PTM_PATH:-$CKPT_DIR/backbone/checkpoint_best.pt}"
# stage 2: adaptation (train_longmem.sh of the original code)
ARCH="${ARCH:-longmem_gpt2_medium}"
TOKENS_PER_SAMPLE="${TOKENS_PER_SAMPLE:-1024}"
BATCH_SIZE="${BATCH_SIZE:-8}"
LR="${LR:-2e-4}"
WARMUP="${WARMUP:-1000}"
MAX_UPDATE="${MAX_UPDATE:-100000}"
MEMORY_SIZE="${MEMORY_SIZE:-65536}"
CHUNK_SIZE="${CHUNK_SIZE:-4}"
K="${K:-64}"
RETRIEVAL_LAYER="${RETRIEVAL_LAYER:-17}"
MEMORY_BACKEND="${MEMORY_BACKEND:-torch}"
MEMORY_SCOPE="${MEMORY_SCOPE:-document}"
SAVE_INTERVAL="${SAVE_INTERVAL:-1000}"
UPDATE_FREQ="${UPDATE_FREQ:-1}"
LOG_DIR="${LOG_DIR:-}"
WANDB_PROJECT="${WANDB_PROJECT:-}"
CLI_ARGS=("$@")

longmem_setup_devices
longmem_extra_args

launch() {  # $1 = stage name (log folder), then fairseq-train flags
  local name="$1"; shift
  local knobs=(--update-freq "$UPDATE_FREQ")
  [ -n "$LOG_DIR" ] && knobs+=(--tensorboard-logdir "$LOG_DIR/$name")
  [ -n "$WANDB_PROJECT" ] && knobs+=(--wandb-project "$WANDB_PROJECT")
  echo "[train.sh] $NNODES node(s) x $NPROC_PER_NODE process(es) ($([ "$GPUS" -gt 0 ] && echo GPU || echo CPU)), $PYTHON"
  longmem_launch train "$@" "${knobs[@]}" "${DEVICE_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} \
    ${CLI_ARGS[@]+"${CLI_ARGS[@]}"}
}

stage_backbone() {
  longmem_check_arch "$BACKBONE_ARCH"
  echo "[train.sh] stage 1: $BACKBONE_ARCH on $DATA_DIR -> $CKPT_DIR/backbone"
  launch backbone "$DATA_DIR" --task language_modeling --arch "$BACKBONE_ARCH" \
    --sample-break-mode none --tokens-per-sample "$BACKBONE_TOKENS" \
    --batch-size "$BACKBONE_BATCH" --optimizer adam --adam-betas '(0.9,0.98)' --adam-eps 1e-6 \
    --lr "$BACKBONE_LR" --lr-scheduler polynomial_decay --warmup-updates "$WARMUP" \
    --total-num-update "$BACKBONE_UPDATES" --max-update "$BACKBONE_UPDATES" \
    --weight-decay 0.01 --clip-norm 1.0 --save-dir "$CKPT_DIR/backbone" \
    --save-interval-updates "$SAVE_INTERVAL" --keep-interval-updates 2 --no-epoch-checkpoints
}

stage_adapt() {  # $1 = output dir name, $2.. = extra flags (memory on/off)
  local name="$1"; shift
  longmem_check_arch "$ARCH"
  if [ -z "$PTM_PATH_GIVEN" ] && [ ! -f "$PTM_PATH" ] && [ -f "$CKPT_DIR/backbone/checkpoint_last.pt" ]; then
    PTM_PATH="$CKPT_DIR/backbone/checkpoint_last.pt"  # stage 1 ran without validation
  fi
  if [ ! -f "$PTM_PATH" ]; then
    echo "error: backbone checkpoint $PTM_PATH not found: run 'bash train.sh backbone' or set PTM_PATH" >&2
    exit 2
  fi
  echo "[train.sh] stage 2 ($name): $ARCH over $PTM_PATH -> $CKPT_DIR/$name"
  launch "$name" "$DATA_DIR" --task longmem_language_modeling --memory-scope "$MEMORY_SCOPE" \
    --arch "$ARCH" --pretrained-model-path "$PTM_PATH" --reload-ptm-layer \
    --criterion longmem_cross_entropy --tokens-per-sample "$TOKENS_PER_SAMPLE" \
    --batch-size "$BATCH_SIZE" --optimizer adam --adam-betas '(0.9,0.98)' --adam-eps 1e-6 \
    --lr "$LR" --lr-scheduler polynomial_decay --warmup-updates "$WARMUP" \
    --total-num-update "$MAX_UPDATE" --max-update "$MAX_UPDATE" --weight-decay 0.01 \
    --memory-size "$MEMORY_SIZE" --chunk-size "$CHUNK_SIZE" --k "$K" \
    --retrieval-layer-index "$RETRIEVAL_LAYER" --memory-backend "$MEMORY_BACKEND" \
    --save-dir "$CKPT_DIR/$name" --save-interval-updates "$SAVE_INTERVAL" \
    --keep-interval-updates 2 --no-epoch-checkpoints "$@"
}

cd "$ROOT"
case "$STAGE" in
  backbone) stage_backbone ;;
  adapt) stage_adapt "${ADAPT_NAME:-$ARCH}" --use-external-memory ;;
  ablation) stage_adapt "${ABLATION_NAME:-${ARCH}_no_memory}" ;;
  all)
    [ -f "$PTM_PATH" ] || stage_backbone
    stage_adapt "${ADAPT_NAME:-$ARCH}" --use-external-memory ;;
  *) echo "usage: bash train.sh {backbone|adapt|ablation|all} [fairseq flags]" >&2; exit 2 ;;
esac
