#!/usr/bin/env bash
# LongMem evaluation recipe: fairseq-eval-lm in stream order for
#   (i) the backbone alone, (ii) the side network adapted without memory (if ABLATION_PATH),
#   (iii) LongMem with memory switched off, (iv) LongMem with memory.
#
#   CKPT_PATH=checkpoints/longmem_gpt2_medium/checkpoint_best.pt PTM_PATH=... bash eval.sh
#   bash eval.sh report      # the paper's tables and plots in REPORT_DIR (longmem-report)
#
# Variables: DATA_DIR, SUBSET (test), TOKENS_PER_SAMPLE (1024), BATCH_SIZE (1: whole documents
# per stream), PTM_PATH, ABLATION_PATH, CKPT_PATH, MEMTRM_PATH, DEVICE (auto|cuda|cpu), GPUS,
# PRECISION (fp32; fp16 or bf16 on GPU; FP16=1 is PRECISION=fp16), EXTRA_ARGS (split like a
# shell line, quotes respected); for `report` also REPORT_DIR (report), SPM (DATA_DIR/spm.model
# if it exists, else text is split on whitespace) and REPORT_ARGS (e.g. --quick). Python and
# devices as train.sh (scripts/launch.sh); evaluation runs in one process: fairseq-eval-lm does
# not combine the perplexities of several ranks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/launch.sh
source "$ROOT/scripts/launch.sh"
PYTHON="$(longmem_python)"
MODE="${1:-ppl}"
DATA_DIR="${DATA_DIR:-data-bin}"
SUBSET="${SUBSET:-test}"
TOKENS_PER_SAMPLE="${TOKENS_PER_SAMPLE:-1024}"
BATCH_SIZE="${BATCH_SIZE:-1}"
CKPT_DIR="${CKPT_DIR:-checkpoints}"
PTM_PATH="${PTM_PATH:-$CKPT_DIR/backbone/checkpoint_best.pt}"
CKPT_PATH="${CKPT_PATH:-$CKPT_DIR/longmem_gpt2_medium/checkpoint_best.pt}"
ABLATION_PATH="${ABLATION_PATH:-}"
MEMTRM_PATH="${MEMTRM_PATH:-}"
if [ "${NNODES:-1}" -gt 1 ] || [ "${NPROC_PER_NODE:-1}" -gt 1 ]; then
  echo "error: eval.sh runs one process (fairseq-eval-lm does not combine the perplexities of" \
       "several ranks); unset NNODES/NPROC_PER_NODE" >&2
  exit 2
fi
[ "${FP16:-0}" = "1" ] && PRECISION="${PRECISION:-fp16}"
PRECISION="${PRECISION:-fp32}"
NNODES=1 NPROC_PER_NODE=1 longmem_setup_devices
[ "$GPUS" -gt 0 ] && DEVICE_ARGS+=(--distributed-world-size 1)  # fairseq would use every GPU
longmem_extra_args
REPORT_DIR="${REPORT_DIR:-report}"
cd "$ROOT"
SPM="${SPM:-}"; [ -z "$SPM" ] && [ -f "$DATA_DIR/spm.model" ] && SPM="$DATA_DIR/spm.model"

if [ "$MODE" = "report" ]; then
  ARGS=(--data "$DATA_DIR" --split "$SUBSET" --out "$REPORT_DIR" --batch-size "$BATCH_SIZE"
        --tokens-per-sample "$TOKENS_PER_SAMPLE" "${DEVICE_ARGS[@]}" --checkpoint "backbone=$PTM_PATH")
  [ -n "$SPM" ] && ARGS+=(--spm "$SPM")
  [ -n "$ABLATION_PATH" ] && ARGS+=(--checkpoint "no_memory=$ABLATION_PATH")
  [ -n "$MEMTRM_PATH" ] && ARGS+=(--checkpoint "memtrm=$MEMTRM_PATH")
  ARGS+=(--checkpoint "longmem=$CKPT_PATH")
  exec "$PYTHON" -m fairseq_longmem.eval.report "${ARGS[@]}" ${REPORT_ARGS:-}
fi

evaluate() {  # $1 = label, $2 = checkpoint, $3.. = extra flags
  local label="$1" path="$2"; shift 2
  if [ ! -f "$path" ]; then echo "error: $label checkpoint $path not found" >&2; exit 2; fi
  local out
  out=$("$PYTHON" -m fairseq_longmem.cli eval-lm "$DATA_DIR" --task longmem_language_modeling \
        --path "$path" --gen-subset "$SUBSET" --tokens-per-sample "$TOKENS_PER_SAMPLE" \
        --batch-size "$BATCH_SIZE" "${DEVICE_ARGS[@]}" "$@" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1) || {
    echo "$out" | tail -20 >&2; exit 2; }
  local ppl
  ppl=$(echo "$out" | sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p' | tail -1)
  printf '| %-44s | %10s |\n' "$label" "$ppl"
}

printf '| %-44s | %10s |\n|---|---|\n' "model ($SUBSET, stream order)" "perplexity"
evaluate "(i) backbone alone" "$PTM_PATH"
[ -n "$ABLATION_PATH" ] && evaluate "(ii) side network adapted without memory" "$ABLATION_PATH"
[ -n "$MEMTRM_PATH" ] && evaluate "MemTRM" "$MEMTRM_PATH"
evaluate "(iii) LongMem, memory switched off" "$CKPT_PATH" --model-overrides "{'use_external_memory': False}"
evaluate "(iv) LongMem" "$CKPT_PATH"
