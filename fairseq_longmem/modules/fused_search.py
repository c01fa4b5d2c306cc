"""Fused exact chunk search: scores and a running top-k in one GPU kernel.

:func:`fused_topk_chunks` has exactly the signature, semantics and return of
``memory_bank.topk_chunks``: for every query token and head, the
``num_chunks`` chunks of largest inner product ``q . chunk_key`` among the
valid chunks of that row, as ``(index, ok)`` of shape ``(bsz, heads, tgt_len,
num_chunks)`` sorted by decreasing score; ``ok`` is False where fewer valid
chunks exist than asked (those entries hold index 0); invalid chunks are never
selected.

The plain torch path materialises the whole ``(tgt_len x n_chunks)`` score
matrix per stream and head (at the paper's shapes, 8 x 16 x 1024 x 16384
scores: 4 GiB in bf16, 8 GiB once cast to fp32 for ``topk``), then sorts it.
The Triton kernel below never writes it: one program takes ``BLOCK_M`` queries
of one (stream, head), walks the chunk keys ``BLOCK_N`` at a time, computes
the tile's scores with ``tl.dot`` (fp32 accumulation) and merges them into a
per-query top-``kc`` buffer held in registers:

* ``thr`` = the smallest score in a query's buffer (``-inf`` while the buffer
  has free slots). A score can enter the buffer only if it is ``> thr``.
* while some query of the tile has a tile score ``> thr``: every such query
  takes its tile maximum (first column among equal maxima), puts it in the
  slot of its buffer minimum (first such slot), removes it from the tile and
  recomputes ``thr``. Scores come out of a tile in decreasing order, so a
  query takes at most ``kc`` of them per tile; once the buffer holds good
  scores most tiles take none (for scores in random order a query takes about
  ``kc * (1 + ln(n / kc))`` in all), and such a tile costs one dot product,
  one row maximum and one comparison.
* invalid chunks score ``-inf`` and ``-inf > thr`` is never true, so they never
  enter; entries never filled stay ``-inf`` and come back with ``ok`` False.

The buffer is sorted by decreasing score at the end (``torch.sort``, stable,
on ``kc`` entries per query), so the output order is ``topk``'s.

Scores differ from the torch path by rounding only: the torch path rounds each
score to the input dtype (a bf16 matmul returns bf16) before ranking; the
kernel ranks by the fp32 accumulator. The kernel's choice is therefore as
exact or more exact; chosen sets can differ only between chunks whose scores
are equal once rounded to bf16/fp16 (checked in ``tests/test_fused_search.py``
by comparing score values).

``tests/references.py`` holds the same algorithm in plain torch (tile by
tile, same insertion rule, same tie-breaking), so the kernel's logic is tested
on CPU. :func:`fused_topk_chunks` runs only where :func:`fused_supported`;
``memory_bank.search_chunks`` takes the plain matmul + ``topk`` path
elsewhere (CPU, no Triton, fp32 inputs, ``head_dim > 256`` or
``num_chunks > 64``, or ``LONGMEM_FUSED_SEARCH=0``).

Microbenchmark (GPU; ``--sweep`` also times every autotuner config)::

    python benchmarks/fused_search_bench.py [--sweep]

On an H100 at the paper's shapes (8 x 16 x 1024 queries x 16,384 chunks,
d=64, kc=16, bf16, random data) it ran in 4.1 ms against 49 ms for matmul +
``topk`` over the full score matrix (docs/speed.md).
"""

from __future__ import annotations

import contextlib
import os
from typing import Tuple

import torch
from torch import Tensor

try:  # Triton is optional: CPU machines, and CUDA builds of torch without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "fused_topk_chunks",
    "fused_search_available",
    "FUSED_DTYPES",
    "MAX_HEAD_DIM",
    "MAX_NUM_CHUNKS",
]

FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_NUM_CHUNKS = 64


def _finish(values: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
    """Sort a top-k buffer by decreasing score; ``ok`` where the score is finite."""
    values, order = values.sort(dim=-1, descending=True, stable=True)
    index = index.gather(-1, order)
    ok = torch.isfinite(values)
    index = index.masked_fill(~ok, 0).long()
    return index, ok


# -------------------------------------------------------------------- triton
if HAS_TRITON:

    _CONFIGS = [
        # measured on an H100 at the paper's shapes (bf16, random data): 64x64/4 warps
        # 4.02 ms, 64x128/4 4.11, 128x64/8 4.40, 32x64/2 4.96, 32x128/4 5.84; a
        # variant taking max and argmax in one reduction was 12-18% slower
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
        for bm, bn, w in ((64, 64, 4), (64, 128, 4), (128, 64, 8))
    ]

    @triton.autotune(configs=_CONFIGS, key=["N", "BLOCK_D", "KC_PAD"])
    @triton.jit
    def _topk_chunks_kernel(
        q_ptr, k_ptr, valid_ptr, out_val_ptr, out_idx_ptr,
        H, T, N, D,
        sqb, sqh, sqt, sqd,
        skb, skh, skn, skd,
        svb, svn,
        KC: tl.constexpr, KC_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqt + dd[None, :] * sqd,
            mask=(rows[:, None] < T) & (dd[None, :] < D),
            other=0.0,
        )
        k_base = k_ptr + b * skb + h * skh
        v_base = valid_ptr + b * svb
        slots = tl.arange(0, KC_PAD)
        # slots >= KC are padding: +inf, so never the minimum, never replaced
        buf = tl.where(
            slots[None, :] < KC,
            tl.full((BLOCK_M, KC_PAD), float("-inf"), tl.float32),
            tl.full((BLOCK_M, KC_PAD), float("inf"), tl.float32),
        )
        bidx = tl.zeros((BLOCK_M, KC_PAD), dtype=tl.int32)
        thr = tl.min(buf, axis=1)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kt = tl.load(
                k_base + cols[None, :].to(tl.int64) * skn + dd[:, None] * skd,
                mask=(cols[None, :] < N) & (dd[:, None] < D),
                other=0.0,
            )
            ok = tl.load(v_base + cols * svn, mask=cols < N, other=0)
            s = tl.dot(q, kt)
            s = tl.where((ok != 0)[None, :], s, float("-inf"))
            rowmax = tl.max(s, axis=1)
            while tl.max((rowmax > thr).to(tl.int32), axis=0) > 0:
                take = rowmax > thr
                amax = tl.min(tl.where(s == rowmax[:, None], cols[None, :], N), axis=1)
                bpos = tl.min(tl.where(buf == thr[:, None], slots[None, :], KC_PAD), axis=1)
                upd = take[:, None] & (slots[None, :] == bpos[:, None])
                buf = tl.where(upd, rowmax[:, None], buf)
                bidx = tl.where(upd, amax[:, None], bidx)
                s = tl.where(cols[None, :] == amax[:, None], float("-inf"), s)
                thr = tl.min(buf, axis=1)
                rowmax = tl.max(s, axis=1)
        out = (pid_bh.to(tl.int64) * T + rows[:, None]) * KC_PAD + slots[None, :]
        omask = (rows[:, None] < T) & (slots[None, :] < KC)
        tl.store(out_val_ptr + out, buf, mask=omask)
        tl.store(out_idx_ptr + out, bidx, mask=omask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def fused_search_available(device=None) -> bool:
    """True where :func:`fused_topk_chunks` runs the Triton kernel on ``device``.

    Needs a CUDA device, Triton, and ``LONGMEM_FUSED_SEARCH`` unset or not ``0``.
    ``device=None`` asks about the current CUDA device.
    """
    if not HAS_TRITON or os.environ.get("LONGMEM_FUSED_SEARCH", "1") == "0":
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available()


def fused_supported(queries: Tensor, chunk_keys: Tensor, num_chunks: int) -> bool:
    """Whether the kernel takes these inputs (else the torch path runs)."""
    return (
        fused_search_available(chunk_keys.device)
        and queries.device == chunk_keys.device
        and chunk_keys.dtype in FUSED_DTYPES
        and queries.dim() == 4
        and chunk_keys.dim() == 4
        and 1 <= queries.size(-1) <= MAX_HEAD_DIM
        and 1 <= num_chunks <= MAX_NUM_CHUNKS
        and queries.numel() > 0
    )


def fused_topk_chunks(
    queries: Tensor, chunk_keys: Tensor, valid: Tensor, num_chunks: int
) -> Tuple[Tensor, Tensor]:
    """Top ``num_chunks`` chunks per query by inner product (``topk_chunks``'s contract).

    queries: ``(bsz, heads, tgt_len, d)``; chunk_keys: ``(bsz, heads, n, d)``;
    valid: ``(bsz, n)`` bool. Returns ``(index, ok)`` of shape
    ``(bsz, heads, tgt_len, num_chunks)``, index long, sorted by decreasing
    score; ``ok`` False where fewer valid chunks exist than asked (index 0
    there). Needs :func:`fused_supported` inputs (``memory_bank.search_chunks``
    checks); no host-device synchronisation.
    """
    if not fused_supported(queries, chunk_keys, num_chunks):
        raise ValueError(
            "fused_topk_chunks: inputs the kernel does not take (see fused_supported); "
            "call memory_bank.search_chunks, which falls back to the torch path"
        )
    return _launch(queries, chunk_keys, valid, num_chunks)


def _launch(queries, chunk_keys, valid, num_chunks, fixed=None):
    """Run the kernel (autotuned, or ``fixed=(meta, num_warps, num_stages)``)."""
    bsz, heads, tgt_len, d = queries.shape
    n = chunk_keys.size(2)
    q = queries.to(chunk_keys.dtype)
    vb = valid.to(device=chunk_keys.device, dtype=torch.bool).view(torch.uint8)
    kc_pad = max(_next_pow2(num_chunks), 2)
    block_d = max(_next_pow2(d), 16)
    values = torch.empty(
        (bsz, heads, tgt_len, kc_pad), dtype=torch.float32, device=chunk_keys.device
    )
    index = torch.empty_like(values, dtype=torch.int32)

    def grid(meta):
        return (triton.cdiv(tgt_len, meta["BLOCK_M"]), bsz * heads)

    args = (
        q, chunk_keys, vb, values, index,
        heads, tgt_len, n, d,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        chunk_keys.stride(0), chunk_keys.stride(1), chunk_keys.stride(2), chunk_keys.stride(3),
        vb.stride(0), vb.stride(1),
    )
    dev = chunk_keys.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if fixed is None:
            _topk_chunks_kernel[grid](*args, KC=num_chunks, KC_PAD=kc_pad, BLOCK_D=block_d)
        else:
            meta, warps, stages = fixed
            _topk_chunks_kernel.fn[grid(meta)](
                *args, KC=num_chunks, KC_PAD=kc_pad, BLOCK_D=block_d,
                num_warps=warps, num_stages=stages, **meta,
            )
    return _finish(values[..., :num_chunks], index[..., :num_chunks])


