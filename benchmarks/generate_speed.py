#!/usr/bin/env python
"""Generation speed with memory (random weights, no file): reading vs writing.

Builds LongMem at the quickstart's size (``longmem_small`` over ``alibi_lm_small``:
4 backbone layers d=256, 8 heads, 2 side layers; vocabulary 4,000; window
``--tokens-per-sample`` 128; chunk 4, k 32, layer 3) with random weights, then
for each memory size (default 8,192 and 65,536 tokens):

* reads a context of ``memory_size + T`` random tokens
  (:meth:`~fairseq_longmem.modules.incremental.SegmentDecoding.read_context`:
  the backbone's layer-m keys/values of whole segments, batched over segments,
  then written to memory; the last segment through the full step), so that
  the memory is full, and reports tokens read per second;
* generates ``--new-tokens`` tokens greedily, one incremental step each
  (``decoder.forward(..., incremental_state=...)`` + argmax, batch 1), and
  reports tokens per second and the share of a step spent in memory search
  (``bank.search``: chunk search + gather of the retrieved keys/values; the
  bank's method is wrapped here, timed with ``time.perf_counter``).

Targets (issue 15): reading >= 10x faster than generating the same number of
tokens; memory search <= 30% of a generated token's time at 65k tokens on CPU.

    python benchmarks/generate_speed.py                      # CPU, quickstart size
    python benchmarks/generate_speed.py --device cuda --paper  # the paper's shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_speed import FakeTask, backbone_config, make_dictionary  # noqa: E402

SMALL = dict(layers=4, dim=256, heads=8, ffn=1024, vocab=4000, tokens_per_sample=128,
             retrieval_layer=3, k=32)
PAPER = dict(layers=24, dim=1024, heads=16, ffn=4096, vocab=50257, tokens_per_sample=1024,
             retrieval_layer=17, k=64)


def build(args, memory_size: int, device):
    import fairseq_longmem  # noqa: F401
    from fairseq_longmem.models.backbone import dumps_config
    from fairseq_longmem.models.longmem import LongMemConfig, LongMemModel

    ns = argparse.Namespace(backbone="alibi", layers=args.layers, dim=args.dim, ffn=args.ffn,
                            heads=args.heads, tokens_per_sample=args.tokens_per_sample)
    cfg = LongMemConfig()
    cfg.backbone_config = dumps_config(backbone_config(ns))
    cfg.layer_reduction_factor = 2
    cfg.reload_ptm_layer = True
    cfg.use_external_memory = True
    cfg.retrieval_layer_index = args.retrieval_layer
    cfg.memory_size = memory_size
    cfg.chunk_size = 4
    cfg.k = args.k
    cfg.tokens_per_sample = args.tokens_per_sample
    torch.manual_seed(0)
    model = LongMemModel.build_model(cfg, FakeTask(make_dictionary(args.vocab)))
    return model.to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(args, memory_size: int, device) -> dict:
    model = build(args, memory_size, device)
    dec = model.decoder
    T = args.tokens_per_sample
    n_ctx = memory_size + T
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(4, args.vocab, (n_ctx,), generator=g)
    dec.read_context(ctx[: 2 * T], device=device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    state = dec.read_context(ctx, device=device, batch_segments=args.batch_segments)
    sync(device)
    read_s = time.perf_counter() - t0
    assert int(state.bank.fill().min()) == memory_size, "memory should be full"

    from fairseq_longmem.modules.memory_bank import MemoryBank

    search_s = [0.0]
    inner = MemoryBank.search

    def timed_search(self, *a, **kw):
        sync(device)
        s = time.perf_counter()
        out = inner(self, *a, **kw)
        sync(device)
        search_s[0] += time.perf_counter() - s
        return out

    MemoryBank.search = timed_search  # the generation's bank is a copy of state.bank
    dec.set_generation_context(state)
    incremental = {}
    tokens = torch.tensor([[dec.dictionary.eos()]], device=device)
    n = args.new_tokens
    for i in range(args.warmup + n):
        if i == args.warmup:
            sync(device)
            search_s[0] = 0.0
            t0 = time.perf_counter()
        logits = dec(tokens, incremental_state=incremental)[0][:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    sync(device)
    gen_s = time.perf_counter() - t0
    MemoryBank.search = inner
    dec.set_generation_context(None)
    read_tps, gen_tps = n_ctx / read_s, n / gen_s
    return {
        "memory_size": memory_size, "context_tokens": n_ctx, "read_tokens_per_s": read_tps,
        "generate_tokens_per_s": gen_tps, "read_over_generate": read_tps / gen_tps,
        "ms_per_generated_token": 1000 * gen_s / n,
        "search_ms_per_generated_token": 1000 * search_s[0] / n,
        "search_share": search_s[0] / gen_s,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="the paper's shape (24 x 1024)")
    p.add_argument("--memory-sizes", default="8192,65536")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch-segments", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    for key, value in (PAPER if args.paper else SMALL).items():
        setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(args, int(m), device) for m in args.memory_sizes.split(",")]
    print(f"device {device}, threads {torch.get_num_threads()}, {args.layers} x {args.dim} "
          f"backbone, T={args.tokens_per_sample}, k={args.k}")
    print("memory  read tok/s  gen tok/s  read/gen  ms/token  search ms  search share")
    for r in rows:
        print(f"{r['memory_size']:6d}  {r['read_tokens_per_s']:10.0f}  "
              f"{r['generate_tokens_per_s']:9.1f}  {r['read_over_generate']:8.1f}  "
              f"{r['ms_per_generated_token']:8.2f}  {r['search_ms_per_generated_token']:9.2f}  "
              f"{100 * r['search_share']:11.1f}%")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"device": str(device), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
