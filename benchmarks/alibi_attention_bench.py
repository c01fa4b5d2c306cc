#!/usr/bin/env python
"""Causal attention with and without ALiBi: SDPA with a bias tensor against FlexAttention.

At the paper's local-attention shape (8 streams x 16 heads x 1,024 tokens x
d=64, bf16; ``--tiny``: 2 x 4 x 64 x 16, fp32, CPU) it times, forward and
forward + backward:

* ``sdpa_causal``: ``scaled_dot_product_attention(is_causal=True)``, no ALiBi
  (what a plain GPT step runs; the lower bound);
* ``sdpa_bias``: SDPA with the ALiBi bias tensor as the project passes it
  (:func:`~fairseq_longmem.modules.decoder_layer.alibi_bias`, cast to the
  queries' dtype at each call), default backend choice;
* ``sdpa_bias_efficient`` / ``sdpa_bias_cudnn`` (CUDA): the same, the backend
  forced (``torch.nn.attention.sdpa_kernel``); ``error`` where it refuses;
* ``flex_alibi``: FlexAttention (``torch.compile``'d on CUDA, eager on CPU)
  with ALiBi as a ``score_mod`` and a causal ``BlockMask``, the project's flex
  path (:func:`~fairseq_longmem.modules.flex_alibi.alibi_flex_attention`);
* ``flex_causal``: FlexAttention with the causal block mask alone (the cost of
  the ``score_mod``);
* ``local_attention``: the project's ``local_attention`` with the bias, as the
  model calls it (flex where available, else SDPA).

Every variant's output is checked against fp32 math of the same attention
(``max_abs_err``). FLOP/s count causal attention as half the square: forward
``2 B H T^2 d``, backward 2.5x the forward. On CPU FlexAttention refuses
inputs that need a gradient: its backward is not timed there (null).

    python benchmarks/alibi_attention_bench.py --out attn.json    # CUDA, paper shape
    python benchmarks/alibi_attention_bench.py --tiny             # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fairseq_longmem.modules import flex_alibi  # noqa: E402
from fairseq_longmem.modules.decoder_layer import alibi_bias, alibi_slopes  # noqa: E402
from fairseq_longmem.modules.joint_attention import local_attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1000 * (time.perf_counter() - t0) / iters


def forced_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION}[name]])


def variants(device: torch.device, bias: torch.Tensor) -> Dict[str, Callable]:
    """name -> attention(q, k, v); ``alibi`` says whether the truth has the bias."""
    spec = flex_alibi.alibi_spec(bias)
    t = bias.size(-1)

    def sdpa_causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_bias(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    def forced(name):
        def run(q, k, v):
            with forced_backend(name):
                return sdpa_bias(q, k, v)
        return run

    def flex_alibi_fn(q, k, v):
        return flex_alibi.alibi_flex_attention(q, k, v, spec)

    def flex_causal(q, k, v):
        fn = flex_alibi._flex_fn(q.device)
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, k, v, block_mask=flex_alibi.causal_block_mask(t, q.device))

    def project(q, k, v):
        return local_attention(q, k, v, bias)

    out = {"sdpa_causal": sdpa_causal, "sdpa_bias": sdpa_bias}
    if device.type == "cuda":
        out["sdpa_bias_efficient"] = forced("efficient")
        out["sdpa_bias_cudnn"] = forced("cudnn")
    if flex_alibi.HAS_FLEX:
        out["flex_alibi"] = flex_alibi_fn
        out["flex_causal"] = flex_causal
    out["local_attention"] = project
    return out


def truth(q, k, v, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 attention: causal, plus the bias when given."""
    q, k, v = q.float(), k.float(), v.float()
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def measure(name: str, fn: Callable, q, k, v, g, bias, args, device) -> Dict:
    """Errors against fp32 math, forward ms, forward + backward ms, TFLOP/s."""
    b, h, t, d = q.shape
    fwd_flops = 2 * b * h * t * t * d  # causal: half of 4 B H T^2 d
    row: Dict = {"name": name}
    with_bias = name not in ("sdpa_causal", "flex_causal")
    try:
        with torch.no_grad():
            out = fn(q.detach(), k.detach(), v.detach())
            ref = truth(q, k, v, bias if with_bias else None)
            row["max_abs_err"] = (out.float() - ref).abs().max().item()
            row["fwd_ms"] = time_ms(lambda: fn(q.detach(), k.detach(), v.detach()), device,
                                    args.warmup, args.iters)
        row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
        if device.type == "cpu" and name.startswith("flex"):
            row["fwd_bwd_ms"] = None  # eager FlexAttention: no backward on CPU
            row["note"] = "no backward on CPU"
        else:
            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(g)

            row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, args.warmup, args.iters)
            row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
    except Exception as e:  # a forced backend may refuse the bias: recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def run(args) -> Dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3)]
    g = torch.randn(shape, device=device, dtype=dtype)
    bias = alibi_bias(alibi_slopes(args.heads), args.tokens, device=device)
    rows = []
    for name, fn in variants(device, bias).items():
        t0 = time.perf_counter()
        row = measure(name, fn, q, k, v, g, bias, args, device)
        row["wall_s"] = time.perf_counter() - t0  # includes compilation for flex
        rows.append(row)
        print(f"  {name}: {row}", flush=True)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "heads": args.heads, "tokens": args.tokens,
                  "head_dim": args.head_dim, "dtype": args.dtype},
        "flex_attention_available": flex_alibi.flex_attention_available(device),
        "results": rows,
    }


def table(r: Dict) -> str:
    s = r["shape"]
    lines = [f"{r['device']}  torch {r['torch']}  {s['batch']} x {s['heads']} heads x "
             f"{s['tokens']} tokens x d={s['head_dim']}, {s['dtype']}, causal",
             f"| {'variant':<20} | {'fwd ms':>8} | {'fwd TFLOP/s':>11} | {'fwd+bwd ms':>10} | "
             f"{'fwd+bwd TFLOP/s':>15} | {'max abs err':>11} |",
             f"| {'-' * 20} | {'-' * 7}: | {'-' * 10}: | {'-' * 9}: | {'-' * 14}: | {'-' * 10}: |"]

    def num(x, fmt):
        if isinstance(x, (int, float)):
            return format(x, fmt)
        return "-".rjust(int(fmt.split(".")[0]))

    for row in r["results"]:
        if "error" in row:
            lines.append(f"| {row['name']:<20} | error: {row['error']}")
            continue
        lines.append(
            f"| {row['name']:<20} | {num(row.get('fwd_ms'), '8.3f')} | "
            f"{num(row.get('fwd_tflops'), '11.1f')} | {num(row.get('fwd_bwd_ms'), '10.3f')} | "
            f"{num(row.get('fwd_bwd_tflops'), '15.1f')} | {num(row.get('max_abs_err'), '11.2e')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, 2 x 4 x 64 x 16, fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    defaults = (dict(device="cpu", dtype="fp32", batch=2, heads=4, tokens=64, head_dim=16,
                     warmup=1, iters=3) if args.tiny else
                dict(device="cuda" if torch.cuda.is_available() else "cpu", dtype="bf16",
                     batch=8, heads=16, tokens=1024, head_dim=64, warmup=5, iters=20))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    # eager FlexAttention (CPU) warns that it is unfused: known, and said in the docstring
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    r = run(args)
    print(table(r))
    text = json.dumps(r, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return r


if __name__ == "__main__":
    main()
