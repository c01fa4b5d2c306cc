#!/usr/bin/env python
"""Exact chunk search on CPU: the torch bank against faiss's flat kernels.

At the paper's shapes with one stream (memory 65,536 tokens, chunk 4, so
16,384 chunks; 16 heads x head_dim 64; a segment of 1,024 queries; k 64, so
16 chunks per query), fills a torch bank and a ``faiss-flat`` bank with the
same random keys, then times, per segment: the chunk selection alone
(``_select_chunks``: the torch bank's blocked matmul + top-k; faiss-flat's
per-head ``faiss.knn`` loop) and ``search`` (selection + gather of the k
retrieved pairs). With ``--before`` also the torch selection as it was before
issue 16 (``tests/references.py: topk_chunks_before``, one score matrix).
Checks that every selection returns the same chunks (scores of the chosen
chunks equal; Gaussian keys have no ties). Times are medians (and minima) of
``--reps`` repeats, wall clock.

    python benchmarks/cpu_search_bench.py --threads 2 --out search.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def timed(fn, reps: int):
    fn()  # warm-up (allocator, faiss threads)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(ts), "min_ms": min(ts)}


def chosen_scores(queries, chunk_keys, index, ok):
    """Scores of the chosen chunks, sorted (0 where not ok): equal across exact searches."""
    s = torch.einsum("bhtd,bhtkd->bhtk", queries.float(),
                     chunk_keys.float()[:, :, None].expand(-1, -1, queries.size(2), -1, -1)
                     .gather(3, index.unsqueeze(-1).expand(-1, -1, -1, -1, queries.size(-1))))
    return s.masked_fill(~ok, 0).sort(-1).values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--memory-size", type=int, default=65536)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", action="store_true",
                   help="also time the pre-issue-16 torch selection (tests/references.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from fairseq_longmem.modules.memory_bank import chunk_validity
    from fairseq_longmem.modules.memory_factory import build_memory
    from fairseq_longmem.modules.memory_spec import MemorySpec

    banks = {
        name: build_memory(
            MemorySpec(args.memory_size, args.chunk_size, args.k, backend=name),
            args.streams, args.heads, args.head_dim, torch.float32, torch.device("cpu"),
        )
        for name in ("torch", "faiss-flat")
    }
    g = torch.Generator().manual_seed(args.seed)
    seg = (args.streams, args.heads, args.segment, args.head_dim)
    for _ in range(args.memory_size // args.segment + 1):
        k, v = torch.randn(seg, generator=g), torch.randn(seg, generator=g)
        for bank in banks.values():
            bank.write(k, v)
    q = torch.randn(seg, generator=g)
    kc = args.k // args.chunk_size
    ref = banks["torch"]
    valid, _ = chunk_validity(ref.total, ref.num_chunks, ref.chunk_size)
    result = {"config": vars(args), "torch": torch.__version__, "faiss": faiss.__version__}
    selections = {}
    for name, bank in banks.items():
        result[name] = {
            "select": timed(lambda: bank._select_chunks(q, kc, valid, None), args.reps),
            "search": timed(lambda: bank.search(q, args.k), args.reps),
        }
        selections[name] = bank._select_chunks(q, kc, valid, None)
    if args.before:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from references import topk_chunks_before

        result["torch_before"] = {
            "select": timed(lambda: topk_chunks_before(q, ref.chunk_keys, valid, kc), args.reps)
        }
        selections["torch_before"] = topk_chunks_before(q, ref.chunk_keys, valid, kc)
    base = chosen_scores(q, ref.chunk_keys, *selections["torch"])
    result["same_chunks"] = {
        name: bool(torch.allclose(chosen_scores(q, ref.chunk_keys, *sel), base, atol=1e-4))
        for name, sel in selections.items()
    }
    t, f = result["torch"]["select"]["median_ms"], result["faiss-flat"]["select"]["median_ms"]
    result["torch_speedup_over_faiss_flat"] = f / t
    print(f"exact chunk search on CPU ({args.threads} threads): {args.streams} stream(s) x "
          f"{args.heads} heads x {args.segment} queries, {ref.num_chunks} chunks, {kc} per query")
    for name in ("torch_before", "torch", "faiss-flat"):
        if name in result:
            r = result[name]
            line = f"  {name:<13} select {r['select']['median_ms']:9.1f} ms (min {r['select']['min_ms']:.1f})"
            if "search" in r:
                line += f"   search {r['search']['median_ms']:9.1f} ms (min {r['search']['min_ms']:.1f})"
            print(line)
    print(f"  torch / faiss-flat speed: {result['torch_speedup_over_faiss_flat']:.2f}x; "
          f"same chunks: {result['same_chunks']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
    return result


if __name__ == "__main__":
    main()
