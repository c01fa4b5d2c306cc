"""Joint attention of the memory-augmented layer, as pure functions.

Local causal attention (A) and attention over each token's retrieved memory
pairs (M) have separate softmaxes and are mixed per head by a learned gate:
``out = (1 - sigmoid(g)) * A + sigmoid(g) * M``. A token with no retrieved
pair (empty memory, new document) gets ``A`` alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .flex_alibi import alibi_flex_attention, alibi_spec, flex_attention_available, flex_supported


def memory_attention(
    q: Tensor, mem_k: Tensor, mem_v: Tensor, mem_mask: Tensor, dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of each query over its own retrieved pairs.

    q: ``(bsz, heads, tgt_len, d)`` (unscaled); mem_k, mem_v:
    ``(bsz, heads, tgt_len, k, d)``; mem_mask: ``(bsz, heads, tgt_len, k)``.
    Returns ``(out (bsz, heads, tgt_len, d), has_memory (bsz, heads, tgt_len))``.

    On CPU, with keys and values that need no gradient (a memory's never do),
    the backward is :class:`_MemoryAttentionFn`'s; elsewhere autograd's.
    """
    if q.device.type == "cpu" and not (mem_k.requires_grad or mem_v.requires_grad):
        return _MemoryAttentionFn.apply(q, mem_k, mem_v, mem_mask, dropout_p, training)
    return _memory_attention(q, mem_k, mem_v, mem_mask, dropout_p, training)[:2]


def _memory_attention(
    q: Tensor, mem_k: Tensor, mem_v: Tensor, mem_mask: Tensor, dropout_p: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The forward of :func:`memory_attention`; also returns the attention
    probabilities ``(bsz, heads, tgt_len, k)`` (fp32) and the dropout's scale
    (None without dropout), which the hand-written backward needs."""
    scale = q.size(-1) ** -0.5
    mem_k = mem_k.to(q.dtype)
    mem_v = mem_v.to(q.dtype)
    scores = torch.einsum("bhtd,bhtkd->bhtk", q, mem_k).float() * scale
    scores = scores.masked_fill(~mem_mask, float("-inf"))
    has_memory = mem_mask.any(-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(has_memory.unsqueeze(-1), probs, torch.zeros_like(probs))
    drop = None
    used = probs
    if dropout_p > 0 and training:
        # dropout(probs) as F.dropout draws it (same random numbers), with its scale kept
        drop = F.dropout(torch.ones_like(probs), p=dropout_p, training=True)
        used = probs * drop
    out = torch.einsum("bhtk,bhtkd->bhtd", used.to(mem_v.dtype), mem_v)
    return out, has_memory, probs, drop


class _MemoryAttentionFn(torch.autograd.Function):
    """:func:`memory_attention` with a hand-written backward for the queries only.

    The retrieved keys and values come from the memory, which is never
    differentiated. On CPU, autograd's backward of the two einsums runs a
    strided batched matmul that loops over the (stream, head, query) matrices
    one at a time (measured at the quickstart's shapes: 300 of the memory
    attention's 440 ms over 5 steps); here the backward is two more einsums of
    the forward's fast shapes and the softmax's backward:
    ``dS = P * (dP - sum(dP * P))``, ``dq = scale * dS @ K``.
    """

    @staticmethod
    def forward(ctx, q, mem_k, mem_v, mem_mask, dropout_p, training):
        out, has_memory, probs, drop = _memory_attention(
            q, mem_k, mem_v, mem_mask, dropout_p, training
        )
        ctx.save_for_backward(probs, mem_k, mem_v, drop)
        ctx.q_dtype = q.dtype
        ctx.scale = q.size(-1) ** -0.5
        ctx.mark_non_differentiable(has_memory)
        return out, has_memory

    @staticmethod
    def backward(ctx, grad_out, _grad_has_memory):
        probs, mem_k, mem_v, drop = ctx.saved_tensors
        mem_k = mem_k.to(ctx.q_dtype)
        mem_v = mem_v.to(ctx.q_dtype)
        grad_out = grad_out.to(mem_v.dtype).contiguous()  # strided: a slow bmm loop on CPU
        grad_used = torch.einsum("bhtd,bhtkd->bhtk", grad_out, mem_v).float()
        grad_probs = grad_used if drop is None else grad_used * drop
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        grad_q = torch.einsum(
            "bhtk,bhtkd->bhtd", (grad_scores * ctx.scale).to(mem_k.dtype), mem_k
        )
        return grad_q.to(ctx.q_dtype), None, None, None, None, None


# Largest gathered block (keys or values) on CPU: a block stays below glibc's
# largest mmap threshold (32 MiB), so it comes from the heap and is reused instead
# of being mapped and page-faulted in at every step (measured at the quickstart's
# shapes: one 32 MiB gather 15.3 ms, the same in eight 4 MiB blocks 2.3 ms)
CPU_GATHER_BLOCK_BYTES = 8 << 20


def memory_attention_chunks(
    q: Tensor, store_k: Tensor, store_v: Tensor, chunk_index: Tensor, mem_mask: Tensor,
    chunk_size: int, dropout_p: float = 0.0, training: bool = False,
    block_bytes: Optional[int] = None, overwrite_log=None,
) -> tuple[Tensor, Tensor]:
    """:func:`memory_attention` over the chunks a search chose, gathering them from
    the memory's ring buffers a block of (stream, head) rows at a time.

    q: ``(bsz, heads, tgt_len, d)``; store_k, store_v: ``(bsz, heads, slots, d)``
    (:class:`.memory_bank.MemoryBank`'s ``keys``/``values``, on any device);
    chunk_index: ``(bsz, heads, tgt_len, kc)`` ring chunk slots, on the store's
    device; mem_mask: ``(bsz, heads, tgt_len, kc * chunk_size)``. Returns
    ``(out (bsz, heads, tgt_len, d), has_memory (bsz, heads, tgt_len))``, the
    same as gathering everything first (``MemoryBank.gather``) and calling
    :func:`memory_attention`. On CPU in fp32, with the compiled kernels built,
    one pass of :func:`.cpu_kernels.memory_attention` reads the chunks straight
    from the ring buffers instead (nothing gathered); when gradients flow it
    needs ``overwrite_log`` (:meth:`.memory_bank.MemoryBank.log_overwrites`,
    opened before the read) and without one the gathering path runs.
    ``block_bytes`` bounds one gathered block
    (default: :data:`CPU_GATHER_BLOCK_BYTES` on CPU; one block elsewhere, where
    each block is more kernel launches and large allocations are cached).
    """
    from .memory_bank import gather_chunk_tokens  # memory_bank does not import this module

    needs_log = q.requires_grad and torch.is_grad_enabled()
    if (overwrite_log is not None or not needs_log) and cpu_kernels.memory_attention_supported(
        q, store_k, store_v
    ):
        return cpu_kernels.memory_attention(
            q, store_k, store_v, chunk_index, mem_mask, chunk_size, dropout_p, training,
            overwrite_log if needs_log else None,
        )
    bsz, heads, tgt_len, d = q.shape
    kc = chunk_index.size(-1)
    if block_bytes is None:
        block_bytes = CPU_GATHER_BLOCK_BYTES if store_k.device.type == "cpu" else 0
    rows = bsz * heads
    per_row = tgt_len * kc * chunk_size * d * store_k.element_size()
    step = rows if block_bytes <= 0 else max(1, block_bytes // max(1, per_row))
    if step >= rows:
        mem_k = gather_chunk_tokens(store_k, chunk_index, chunk_size).to(q.device)
        mem_v = gather_chunk_tokens(store_v, chunk_index, chunk_size).to(q.device)
        return memory_attention(q, mem_k, mem_v, mem_mask, dropout_p, training)
    slots = store_k.size(-2)
    flat = lambda t, n: t.reshape(1, rows, n, t.size(-1))  # noqa: E731  (1, rows, n, x)
    sk, sv = flat(store_k, slots), flat(store_v, slots)
    qf, idx, msk = flat(q, tgt_len), flat(chunk_index, tgt_len), flat(mem_mask, tgt_len)
    outs, has = [], []
    for r in range(0, rows, step):
        e = min(r + step, rows)
        mem_k = gather_chunk_tokens(sk[:, r:e], idx[:, r:e], chunk_size).to(q.device)
        mem_v = gather_chunk_tokens(sv[:, r:e], idx[:, r:e], chunk_size).to(q.device)
        o, h = memory_attention(qf[:, r:e], mem_k, mem_v, msk[:, r:e], dropout_p, training)
        outs.append(o)
        has.append(h)
    out = torch.cat(outs, 1).view(bsz, heads, tgt_len, d)
    return out, torch.cat(has, 1).view(bsz, heads, tgt_len)


def gate_mix(local: Tensor, memory: Tensor, gate: Tensor, has_memory: Tensor) -> Tensor:
    """Per-head gated mix of local and memory attention outputs.

    local, memory: ``(bsz, heads, tgt_len, d)``; gate: ``(heads,)`` logits;
    has_memory: ``(bsz, heads, tgt_len)`` bool. Where a query has no memory the
    local output passes unchanged.
    """
    g = torch.sigmoid(gate.float()).to(local.dtype).view(1, -1, 1, 1)
    mixed = local + g * (memory - local)
    return torch.where(has_memory.unsqueeze(-1), mixed, local)


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], dropout_p: float = 0.0
) -> Tensor:
    """Causal self-attention over the segment.

    q, k, v: ``(bsz, heads, tgt_len, d)``; attn_bias: ``None`` for a plain
    causal mask, else an additive float bias broadcastable to
    ``(bsz, heads, tgt_len, tgt_len)`` that already contains the causal mask.
    An ALiBi bias made by :func:`~.decoder_layer.alibi_bias` runs through
    FlexAttention with the bias computed in the kernel where
    :func:`~.flex_alibi.flex_attention_available` (CUDA; ``LONGMEM_FLEX_ATTENTION=0``
    turns it off) and ``dropout_p`` is 0; any other bias through SDPA.
    """
    if attn_bias is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    spec = alibi_spec(attn_bias) if dropout_p == 0 else None
    if (
        spec is not None
        and flex_attention_available(q.device)
        and flex_supported(q, k, v, attn_bias)
    ):
        return alibi_flex_attention(q, k, v, spec)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=dropout_p
    )
