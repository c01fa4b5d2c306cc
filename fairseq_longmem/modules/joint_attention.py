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

from .flex_alibi import alibi_flex_attention, alibi_spec, flex_attention_available, flex_supported


def memory_attention(
    q: Tensor, mem_k: Tensor, mem_v: Tensor, mem_mask: Tensor, dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of each query over its own retrieved pairs.

    q: ``(bsz, heads, tgt_len, d)`` (unscaled); mem_k, mem_v:
    ``(bsz, heads, tgt_len, k, d)``; mem_mask: ``(bsz, heads, tgt_len, k)``.
    Returns ``(out (bsz, heads, tgt_len, d), has_memory (bsz, heads, tgt_len))``.
    """
    scale = q.size(-1) ** -0.5
    mem_k = mem_k.to(q.dtype)
    mem_v = mem_v.to(q.dtype)
    scores = torch.einsum("bhtd,bhtkd->bhtk", q, mem_k).float() * scale
    scores = scores.masked_fill(~mem_mask, float("-inf"))
    has_memory = mem_mask.any(-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(has_memory.unsqueeze(-1), probs, torch.zeros_like(probs))
    if dropout_p > 0 and training:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.einsum("bhtk,bhtkd->bhtd", probs.to(mem_v.dtype), mem_v)
    return out, has_memory


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
