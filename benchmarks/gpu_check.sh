#!/usr/bin/env bash
# One device call that measures the GPU step (issue 16, item 3). Run from the repo root:
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine ($OUT set there)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh     # here: every part, tiny shapes, CPU, .venv
#
# Parts, each under its own `timeout` (a failure or a timeout does not stop the rest) and
# cut to the time left of GPU_CHECK_BUDGET_S (default 540 s):
#   a. pytest: the fused-search kernel's CUDA tests and the FlexAttention tests
#   b. benchmarks/alibi_attention_bench.py: SDPA with the ALiBi bias vs FlexAttention
#   c. train_speed --preset paper --reference --op-profile: memory on (fused search),
#      memory off, the plain-PyTorch reference, top operators; FlexAttention on
#   d. the same with LONGMEM_FLEX_ATTENTION=0 (SDPA with the bias tensor)
# Output: $OUT/gpu_check.log (everything), $OUT/attn.json, $OUT/speed_flex.json,
# $OUT/speed_sdpa.json. Missing packages (fairseq and its pure-Python needs) come from
# .whl/*.whl, installed into /tmp/site; the dry run uses the checkout's .venv instead.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-/tmp/gpu_check_dry}
    PY=${PYTHON:-.venv/bin/python}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    OUT=${OUT:-/tmp/gpu_check_out}
    PY=${PYTHON:-python3}
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

say() { echo "=== [$(date +%H:%M:%S) +${SECONDS}s] $*"; }

# part NAME LIMIT_S CMD...: run CMD under timeout min(LIMIT_S, budget left - 5)
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        say "$name: SKIPPED (${left}s of the budget left)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    say "$name: start (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    say "$name: rc=$rc$([ $rc = 124 ] && echo ' TIMED OUT') elapsed $((SECONDS - t0))s"
}

say "gpu_check (dry=$DRY) in $PWD, budget ${BUDGET}s, out $OUT"
if [ "$DRY" != 1 ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || say "wheel install FAILED"
        export PYTHONPATH="$PWD:/tmp/site"
    else
        say "no .whl/ folder: fairseq must already be importable"
        export PYTHONPATH="$PWD"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv || true
    A_ARGS=()
    B_ARGS=()
    C_ARGS=(--preset paper --steps 5 --warmup 3 --repeats 3)
    D_ARGS=(--preset paper --steps 5 --warmup 2 --repeats 2)
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    A_ARGS=()
    B_ARGS=(--tiny)
    C_ARGS=(--tiny --steps 1 --warmup 1 --repeats 1)
    D_ARGS=(--tiny --steps 1 --warmup 1 --repeats 1)
fi
"$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not importable")
import numpy, fairseq, fairseq_longmem
from fairseq_longmem.modules import flex_alibi, fused_search
print("numpy", numpy.__version__, "fairseq", fairseq.__version__,
      "flex available", flex_alibi.flex_attention_available(),
      "fused search available", fused_search.fused_search_available())
EOF

# one line per train_speed JSON written by rounds 2 and 3
summarize() {
for f in "$OUT"/speed_*.json; do
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); ref=r.get('reference') or {}; \
print(sys.argv[1].split('/')[-1], 'on %.1f off %.1f ref %.1f ms; MFU on %.1f%% off %.1f%% ref %.1f%%; \
off/ref %.3f; overhead %.3f; search %.1f ms; flex calls/step %.0f' % (r['step_ms'], \
r['no_memory']['step_ms'], ref.get('step_ms', 0), 100*r['mfu'], 100*r['no_memory']['mfu'], \
100*ref.get('mfu', 0), r.get('no_memory_vs_reference', 0), r['memory_overhead_ratio'], \
r['search_ms'], r['flex_attention_calls_per_step']))" "$f"
done
}

if [ "${GPU_CHECK_ROUND:-1}" = 3 ]; then
    # round 3: the bank's search walks the chunks in memory_bank.scan_order (round 2 measured
    # 26.4 ms per search in training, 4.1 ms on random keys): kernel agreement through the
    # bank, the kernel on random / ramped keys in both orders, the step at vocabulary 50,264
    part "a3. pytest bank + kernel agreement" 60 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_search.py -k "agrees or scan" \
        "${A_ARGS[@]}"
    part "b3. fused search bench" 60 \
        "$PY" benchmarks/fused_search_bench.py $([ "$DRY" = 1 ] && echo --streams 1 --heads 2 \
        --queries 64 --chunks 256 --reps 2)
    part "c3. train_speed flex=1 vocab 50264, scan order" 100 \
        "$PY" benchmarks/train_speed.py "${D_ARGS[@]}" --search fused --reference \
        --profile-steps 0 $([ "$DRY" = 1 ] || echo --vocab 50264) --out "$OUT/speed_scan.json"
    summarize
    say "done in ${SECONDS}s"
    sleep 1
    exit 0
fi
if [ "${GPU_CHECK_ROUND:-1}" = 2 ]; then
    # round 2, after round 1 (docs/speed.md): the kernel's agreement test (rewritten), the
    # kernel alone with every config, and the step with FlexAttention for the frozen
    # backbone only (forward mode) and everywhere, at a vocabulary padded to a multiple of 8
    # (fairseq's dictionaries are: 50,257 GPT-2 pieces -> 50,264) beside 50,257
    part "a2. pytest kernel agreement" 60 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_search.py -k "agrees or kernel" \
        "${A_ARGS[@]}"
    part "b2. fused search bench --sweep" 60 \
        "$PY" benchmarks/fused_search_bench.py $([ "$DRY" = 1 ] && echo --streams 1 --heads 2 \
        --queries 64 --chunks 256 --reps 2) --sweep
    for mode in forward 1; do
        for vocab in 50264 50257; do
            [ "$mode" = 1 ] && [ "$vocab" = 50257 ] && continue  # round 1 measured it
            part "c2. train_speed flex=$mode vocab $vocab" 100 \
                env LONGMEM_FLEX_ATTENTION=$mode "$PY" benchmarks/train_speed.py "${D_ARGS[@]}" \
                --search fused --reference --profile-steps 0 \
                $([ "$DRY" = 1 ] || echo --vocab $vocab) --out "$OUT/speed_${mode}_$vocab.json"
        done
    done
    summarize
    say "done in ${SECONDS}s"
    sleep 1
    exit 0
fi

# a. kernel tests on CUDA (the CPU tests of these files run too: about a second)
part "a. pytest fused search + flex" 90 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_search.py tests/test_flex_alibi.py \
    "${A_ARGS[@]}"

# b. attention alone: SDPA with the bias (default, efficient, cuDNN) vs FlexAttention
part "b. alibi attention bench" 110 \
    "$PY" benchmarks/alibi_attention_bench.py "${B_ARGS[@]}" --out "$OUT/attn.json"

# c. the training step with FlexAttention (the default on CUDA), reference beside it
part "c. train_speed, flex attention" 210 \
    "$PY" benchmarks/train_speed.py "${C_ARGS[@]}" --search fused --reference --op-profile \
    --profile-steps 0 --out "$OUT/speed_flex.json"

# d. the same with SDPA and the bias tensor
part "d. train_speed, LONGMEM_FLEX_ATTENTION=0" 110 \
    env LONGMEM_FLEX_ATTENTION=0 "$PY" benchmarks/train_speed.py "${D_ARGS[@]}" --search fused \
    --reference --op-profile --profile-steps 0 --out "$OUT/speed_sdpa.json"

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("speed_flex", "speed_sdpa"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        print(f"{name}: no result")
        continue
    r = json.load(open(path))
    ref = r.get("reference") or {}
    print(f"{name}: memory on {r['step_ms']:.1f} ms (MFU {100 * r['mfu']:.1f}%), "
          f"off {r['no_memory']['step_ms']:.1f} ms (MFU {100 * r['no_memory']['mfu']:.1f}%), "
          f"reference {ref.get('step_ms', float('nan')):.1f} ms "
          f"(MFU {100 * ref.get('mfu', float('nan')):.1f}%), off/reference "
          f"{r.get('no_memory_vs_reference', float('nan')):.3f}, memory overhead "
          f"{r['memory_overhead_ratio']:.3f}, retrieval {100 * r['retrieval_share']:.1f}% "
          f"search {100 * r['search_share']:.1f}%, flex calls/step "
          f"{r['flex_attention_calls_per_step']:.0f}, syncs {r['syncs_in_step']}")
EOF
say "done in ${SECONDS}s"
sleep 1  # let tee write the log's last lines before the call returns
