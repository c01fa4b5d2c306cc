"""Microbenchmark of the fused chunk search on CUDA (paper search shape by default).

    python benchmarks/fused_search_bench.py [--sweep]

Times ``fused_topk_chunks`` against the library's plain path
(``memory_bank.topk_chunks``: matmul + ``topk`` over the whole score matrix),
its extra memory, a worst-case input order, and (``--sweep``) every kernel
config without the autotuner. Prints JSON.
"""

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fairseq_longmem.modules import fused_search, memory_bank  # noqa: E402
from fairseq_longmem.modules.fused_search import (  # noqa: E402
    fused_search_available,
    fused_topk_chunks,
)


def bench(args) -> dict:
    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    b, h, t, n, d, kc = args.streams, args.heads, args.queries, args.chunks, args.head_dim, args.kc
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, h, t, d, device=dev, dtype=dtype, generator=g)
    ck = torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool, device=dev)

    def timeit(fn, reps):
        fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    t0 = time.perf_counter()
    fused_topk_chunks(q, ck, valid, kc)  # compile + autotune
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    out = {
        "shape": dict(streams=b, heads=h, queries=t, chunks=n, head_dim=d, kc=kc, dtype=args.dtype),
        "fused_available": fused_search_available(dev),
        "first_call_s": compile_s,
        "fused_ms": timeit(lambda: fused_topk_chunks(q, ck, valid, kc), args.reps),
        "best_config": str(getattr(fused_search._topk_chunks_kernel, "best_config", None)),
    }
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_topk_chunks(q, ck, valid, kc)
    torch.cuda.synchronize()
    out["fused_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    if args.sweep:  # every config without the autotuner, on this input
        sweep = {}
        for cfg in fused_search._CONFIGS:
            kw = dict(cfg.kwargs)

            def launch(kw=kw, cfg=cfg):
                fused_search._launch(q, ck, valid, kc, fixed=(kw, cfg.num_warps, cfg.num_stages))

            try:
                sweep[str(cfg)] = timeit(launch, args.reps)
            except Exception as e:
                sweep[str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
        out["sweep_ms"] = sweep
    # worst case for the running top-k: every query's scores increase along the
    # chunks, so every tile replaces the whole buffer (kc extractions per tile)
    u = torch.nn.functional.normalize(torch.randn(d, device=dev, generator=g), dim=0)
    ramp = torch.linspace(0, 8, n, device=dev)[:, None] * u
    ck_worst = (0.01 * ck.float() + ramp).to(dtype)
    q_worst = (u.expand(b, h, t, d) + 0.01 * q.float()).to(dtype)
    out["fused_ms_worst_order"] = timeit(
        lambda: fused_topk_chunks(q_worst, ck_worst, valid, kc), max(1, args.reps // 4)
    )
    # the same input walked in memory_bank.scan_order (what the bank does): the ramp
    # becomes a nearly random order; the gather of the keys is included
    out["fused_ms_worst_order_scan_order"] = timeit(
        lambda: memory_bank.search_in_scan_order(fused_topk_chunks, q_worst, ck_worst, valid, kc),
        max(1, args.reps // 4),
    )
    out["fused_ms_scan_order"] = timeit(
        lambda: memory_bank.search_in_scan_order(fused_topk_chunks, q, ck, valid, kc),
        max(1, args.reps // 4),
    )
    del ck_worst, q_worst
    try:
        reps = max(1, args.reps // 4)
        out["torch_ms"] = timeit(lambda: memory_bank.topk_chunks(q, ck, valid, kc), reps)
        torch.cuda.reset_peak_memory_stats()
        memory_bank.topk_chunks(q, ck, valid, kc)
        torch.cuda.synchronize()
        out["torch_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        out["speedup"] = out["torch_ms"] / out["fused_ms"]
    except torch.cuda.OutOfMemoryError:
        out["torch_ms"] = None
    # agreement on this input (score values of the chosen chunks)
    i_f, ok_f = fused_topk_chunks(q, ck, valid, kc)
    s = torch.matmul(q.float(), ck.float().transpose(-1, -2))
    out["fused_min_score_gap_vs_exact"] = float(
        (s.topk(kc, dim=-1).values - s.gather(-1, i_f).sort(-1, descending=True).values)
        .abs().max()
    )
    return out


def main(argv: Optional[list] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="fused chunk search microbenchmark (CUDA)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=16384)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kc", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time every kernel config")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the microbenchmark needs a CUDA device")
    print(json.dumps(bench(args), indent=1))


if __name__ == "__main__":
    main()
