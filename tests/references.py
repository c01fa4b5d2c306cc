"""Slow loop references of the library's math, for tests only.

Each one computes on tiny tensors, with Python loops, what a fast function of
the package computes: the chunk search (``memory_bank.MemoryBank.search``; and
``topk_chunks_before``, the torch search as it was before issue 16), the
fused kernel's running top-k (``fused_search``) and the joint attention
(``modules.decoder_layer`` with a memory reader).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def plain_topk_chunks(
    queries: Tensor, chunk_keys: Tensor, valid: Tensor, num_chunks: int
):
    """Matmul, mask, ``topk`` over the whole score matrix, in the keys' dtype
    (fp64 stays fp64): what ``memory_bank.topk_chunks`` computes, unblocked.

    queries: ``(bsz, heads, tgt_len, d)``; chunk_keys: ``(bsz, heads, n, d)``;
    valid: ``(bsz, n)`` bool. Returns ``(index, ok)``, ``(bsz, heads, tgt_len, num_chunks)``.
    """
    scores = torch.matmul(queries.to(chunk_keys.dtype), chunk_keys.transpose(-1, -2))
    scores = scores.float().masked_fill(~valid[:, None, None, :], float("-inf"))
    top = min(num_chunks, scores.size(-1))
    values, index = scores.topk(top, dim=-1)
    ok = torch.isfinite(values)
    if top < num_chunks:  # memory smaller than asked: pad with invalid entries
        pad = num_chunks - top
        index = torch.nn.functional.pad(index, (0, pad))
        ok = torch.nn.functional.pad(ok, (0, pad), value=False)
    return index, ok


def topk_chunks_before(
    queries: Tensor,
    chunk_keys: Tensor,
    valid: Tensor,
    num_chunks: int,
    block_elements: int = 1 << 28,
) -> tuple[Tensor, Tensor]:
    """``memory_bank.topk_chunks`` as it was before the CPU search was blocked
    (issue 16), verbatim: the reference the fast search must agree with.

    Top ``num_chunks`` chunks per query by inner product.

    queries: ``(bsz, heads, tgt_len, d)``; chunk_keys: ``(bsz, heads, n, d)``;
    valid: ``(bsz, n)`` bool. Returns ``(index, ok)`` of shape
    ``(bsz, heads, tgt_len, num_chunks)``; ``ok`` is False where fewer valid
    chunks than asked exist. Ties go to ``torch.topk``'s (deterministic) order.

    Scores are computed in the storage dtype on accelerators and in fp32 on
    CPU (CPU half-precision matmuls are slow); the score matrix is built in
    blocks of queries of at most ``block_elements`` entries (a static loop, no
    host synchronisation) so that a 65k-token memory at batch 8 x 16 heads x
    1024 queries does not materialise 2^31 scores at once.
    """
    ck = chunk_keys
    if ck.device.type == "cpu" and ck.dtype != torch.float32:
        ck = ck.float()
    ckt = ck.transpose(-1, -2)
    q = queries.to(device=ck.device, dtype=ck.dtype)
    bsz, heads, tgt_len, _ = q.shape
    n = ck.size(-2)
    top = min(num_chunks, n)
    invalid = ~valid[:, None, None, :]
    # a full memory has no invalid chunk: on CPU (where checking costs no device
    # synchronisation) skip the mask pass over the whole score matrix
    need_mask = ck.device.type != "cpu" or not bool(valid.all())
    step = max(1, block_elements // max(1, bsz * heads * n))
    idx_blocks, ok_blocks = [], []
    for s in range(0, tgt_len, step):
        scores = torch.matmul(q[:, :, s : s + step], ckt)
        if need_mask:
            scores.masked_fill_(invalid, float("-inf"))
        values, index = scores.topk(top, dim=-1)
        idx_blocks.append(index)
        ok_blocks.append(torch.isfinite(values))
    if len(idx_blocks) == 1:
        index, ok = idx_blocks[0], ok_blocks[0]
    elif idx_blocks:
        index, ok = torch.cat(idx_blocks, 2), torch.cat(ok_blocks, 2)
    else:  # no queries
        index = torch.zeros(bsz, heads, 0, top, dtype=torch.long, device=ck.device)
        ok = torch.zeros(bsz, heads, 0, top, dtype=torch.bool, device=ck.device)
    if top < num_chunks:  # memory smaller than asked: pad with invalid entries
        pad = num_chunks - top
        index = torch.nn.functional.pad(index, (0, pad))
        ok = torch.nn.functional.pad(ok, (0, pad), value=False)
    return index, ok


def _finish(values: Tensor, index: Tensor):
    """Sort a top-k buffer by decreasing score; ``ok`` where the score is finite."""
    values, order = values.sort(dim=-1, descending=True, stable=True)
    index = index.gather(-1, order)
    ok = torch.isfinite(values)
    index = index.masked_fill(~ok, 0).long()
    return index, ok


def reference_search(
    keys: Tensor, total: int, memory_size: int, chunk_size: int, queries: Tensor, k: int
) -> list:
    """Slow reference for one row: the logical chunk numbers a query retrieves.

    keys: ``(heads, n_written, d)`` every key written since reset, in order;
    queries: ``(heads, tgt_len, d)``. Returns a nested list ``[h][t] -> sorted
    logical chunk numbers`` computed with Python loops.
    """
    heads, n, d = keys.shape
    first = max(0, math.ceil((total - memory_size) / chunk_size))
    last = total // chunk_size  # exclusive
    out = []
    for h in range(heads):
        per_t = []
        for t in range(queries.shape[1]):
            scored = []
            for j in range(first, last):
                ck = keys[h, j * chunk_size : (j + 1) * chunk_size].float().mean(0)
                scored.append((float(queries[h, t].float() @ ck), j))
            scored.sort(key=lambda s: -s[0])
            per_t.append(sorted(j for _, j in scored[: k // chunk_size]))
        out.append(per_t)
    return out


def tiled_topk_reference(
    queries: Tensor,
    chunk_keys: Tensor,
    valid: Tensor,
    num_chunks: int,
    tile: int = 128,
    return_values: bool = False,
    stats: Optional[dict] = None,
):
    """The kernel's algorithm in plain torch (slow; for tests).

    Walks the chunks ``tile`` at a time and merges each tile into a running
    top-``num_chunks`` buffer per query with the kernel's rule (see the module
    docstring). Scores are computed as the kernel does: queries cast to the
    keys' dtype, products accumulated in fp32 (fp64 for fp64 inputs).
    Returns ``(index, ok)`` like :func:`plain_topk_chunks`, plus the sorted
    scores if ``return_values``. ``stats["rounds"]`` (if given) counts the
    extraction rounds, summed over tiles: the kernel's work beyond one pass.
    """
    bsz, heads, tgt_len, d = queries.shape
    n = chunk_keys.size(2)
    kc = num_chunks
    acc = torch.float64 if chunk_keys.dtype == torch.float64 else torch.float32
    q = queries.to(chunk_keys.dtype).to(acc).reshape(bsz * heads, tgt_len, d)
    ck = chunk_keys.to(acc).reshape(bsz * heads, n, d)
    vmask = valid.bool()[:, None, :].expand(bsz, heads, n).reshape(bsz * heads, 1, n)
    neg = float("-inf")
    rows = bsz * heads * tgt_len
    buf = torch.full((rows, kc), neg, dtype=acc, device=queries.device)
    bidx = torch.zeros((rows, kc), dtype=torch.long, device=queries.device)
    slots = torch.arange(kc, device=queries.device)
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        cols = torch.arange(start, stop, device=queries.device)
        s = torch.matmul(q, ck[:, start:stop].transpose(-1, -2))
        s = s.masked_fill(~vmask[:, :, start:stop], neg).reshape(rows, stop - start)
        thr = buf.min(dim=1).values
        rowmax = s.max(dim=1).values
        while bool((rowmax > thr).any()):
            if stats is not None:
                stats["rounds"] = stats.get("rounds", 0) + 1
            take = rowmax > thr
            amax = torch.where(s == rowmax[:, None], cols[None, :], n).min(dim=1).values
            bpos = torch.where(buf == thr[:, None], slots[None, :], kc).min(dim=1).values
            upd = take[:, None] & (slots[None, :] == bpos[:, None])
            buf = torch.where(upd, rowmax[:, None], buf)
            bidx = torch.where(upd, amax[:, None], bidx)
            s = torch.where(cols[None, :] == amax[:, None], torch.full_like(s, neg), s)
            thr = buf.min(dim=1).values
            rowmax = s.max(dim=1).values
    shape = (bsz, heads, tgt_len, kc)
    index, ok = _finish(buf.view(shape), bidx.view(shape))
    if return_values:
        return index, ok, buf.view(shape).sort(dim=-1, descending=True).values
    return index, ok


def reference_joint_attention(
    q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, mem_mask: Tensor,
    gate: Tensor, attn_bias: Optional[Tensor] = None,
) -> Tensor:
    """Slow loop reference of the joint attention, for tests (no dropout)."""
    bsz, heads, t_len, d = q.shape
    out = torch.zeros_like(q)
    scale = d ** -0.5
    for b in range(bsz):
        for h in range(heads):
            g = torch.sigmoid(gate[h])
            for t in range(t_len):
                s = (k[b, h, : t + 1] @ q[b, h, t]) * scale
                if attn_bias is not None:
                    bias = attn_bias.expand(bsz, heads, t_len, t_len)
                    s = s + bias[b, h, t, : t + 1]
                a = torch.softmax(s, 0) @ v[b, h, : t + 1]
                m_ok = mem_mask[b, h, t]
                if m_ok.any():
                    ms = (mem_k[b, h, t][m_ok] @ q[b, h, t]) * scale
                    m = torch.softmax(ms, 0) @ mem_v[b, h, t][m_ok]
                    a = (1 - g) * a + g * m
                out[b, h, t] = a
    return out
