"""One forward function for fairseq's ``TransformerDecoderLayer``, with hooks.

The backbone (ALiBi or any ``transformer_lm``) and the side network use the
very same layer class; this module runs those layers batch-first with
``scaled_dot_product_attention`` and exposes what LongMem needs: the per-head
keys/values of a layer, and an optional memory reader inside the attention
(joint attention). With no hook it computes exactly what fairseq's own
``TransformerDecoderLayer.forward`` computes (checked in the tests).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from ..errors import LongMemError

from .flex_alibi import register_alibi_bias
from .joint_attention import local_attention

# reader(q, local_out) -> new local_out; q and local_out are (bsz, heads, tgt_len, d)
MemoryReader = Callable[[Tensor, Tensor], Tensor]


class UnsupportedLayerError(LongMemError):
    """The backbone uses a decoder-layer option this plugin does not implement."""


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022), ``(num_heads,)``."""

    def power_of_2(n: int) -> List[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, tgt_len: int, device=None) -> Tensor:
    """Causal ALiBi bias ``(1, heads, tgt_len, tgt_len)``: ``-slope * (i - j)``, -inf above."""
    pos = torch.arange(tgt_len, device=device)
    dist = (pos[:, None] - pos[None, :]).float()
    bias = -slopes.to(device).view(-1, 1, 1) * dist
    bias = bias.masked_fill(dist < 0, float("-inf"))
    # known as ALiBi (by identity) to local_attention's flex path
    return register_alibi_bias(bias.unsqueeze(0), slopes)


def check_layer_supported(layer: nn.Module) -> None:
    """Raise a clear error for decoder-layer options we do not implement."""
    attn = layer.self_attn
    problems = []
    if getattr(layer, "cross_self_attention", False):
        problems.append("--cross-self-attention")
    if getattr(layer, "c_attn", None) is not None:
        problems.append("--scale-heads")
    if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
        problems.append("add_bias_kv/add_zero_attn")
    if getattr(layer, "encoder_attn", None) is not None:
        problems.append("encoder attention (not a decoder-only LM)")
    if problems:
        raise UnsupportedLayerError(
            "backbone decoder layer uses " + ", ".join(problems) + ", which LongMem does "
            "not support; pretrain the backbone without these options"
        )


def project_qkv(layer: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-head q, k, v of a layer's self-attention, each ``(bsz, heads, tgt_len, d)``.

    x is the (already normalised, for pre-norm) layer input ``(bsz, tgt_len, dim)``.
    q is *not* scaled (SDPA and the memory attention scale by ``d ** -0.5``).
    """
    attn = layer.self_attn
    bsz, tgt_len, _ = x.shape
    h, d = attn.num_heads, attn.head_dim

    def heads(t: Tensor) -> Tensor:
        return t.view(bsz, tgt_len, h, d).transpose(1, 2)

    return heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))


def layer_forward(
    layer: nn.Module,
    x: Tensor,
    attn_bias: Optional[Tensor],
    memory_reader: Optional[MemoryReader] = None,
    return_kv: bool = False,
    cache: Optional[tuple] = None,
) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """Run a fairseq ``TransformerDecoderLayer`` on ``x`` ``(bsz, tgt_len, dim)``.

    attn_bias: ``None`` (plain causal) or an additive causal bias (ALiBi).
    memory_reader: joint-attention hook applied to the per-head attention output.
    cache: ``(LayerCache, pos)`` for incremental decoding (:mod:`.incremental`):
    x is a piece at segment positions ``[pos, pos + tgt_len)``, its keys/values
    are stored and the queries attend to the segment's cached ones (attn_bias
    then covers ``(tgt_len, pos + tgt_len)``).
    Returns ``(x, (k, v) or None)`` with k, v ``(bsz, heads, tgt_len, d)``.
    """
    residual = x
    if layer.normalize_before:
        x = layer.self_attn_layer_norm(x)
    q, k, v = project_qkv(layer, x)
    kv_out = (k, v)
    if cache is not None:
        k, v = cache[0].extend(k, v, cache[1])
    p = layer.self_attn.dropout_module.p if layer.training else 0.0
    out = local_attention(q, k, v, attn_bias, dropout_p=p)
    if memory_reader is not None:
        out = memory_reader(q, out)
    bsz, h, tgt_len, d = out.shape
    x = layer.self_attn.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, h * d))
    if layer.attn_ln is not None:
        x = layer.attn_ln(x)
    x = layer.dropout_module(x)
    x = x + residual
    if not layer.normalize_before:
        x = layer.self_attn_layer_norm(x)

    residual = x
    if layer.normalize_before:
        x = layer.final_layer_norm(x)
    x = layer.activation_fn(layer.fc1(x))
    x = layer.activation_dropout_module(x)
    if layer.ffn_layernorm is not None:
        x = layer.ffn_layernorm(x)
    x = layer.fc2(x)
    x = layer.dropout_module(x)
    if layer.w_resid is not None:
        residual = layer.w_resid * residual
    x = x + residual
    if not layer.normalize_before:
        x = layer.final_layer_norm(x)
    return x, (kv_out if return_kv else None)


def embed(decoder: nn.Module, tokens: Tensor) -> Tensor:
    """fairseq ``TransformerDecoder`` embedding: h^0, ``(bsz, tgt_len, dim)``."""
    x = decoder.embed_scale * decoder.embed_tokens(tokens)
    if decoder.project_in_dim is not None:
        x = decoder.project_in_dim(x)
    if decoder.embed_positions is not None:
        x = x + decoder.embed_positions(tokens)
    if decoder.layernorm_embedding is not None:
        x = decoder.layernorm_embedding(x)
    return decoder.dropout_module(x)


def decoder_attn_bias(decoder: nn.Module, tgt_len: int, device) -> Optional[Tensor]:
    """The self-attention bias a backbone decoder uses: ALiBi or plain causal (None)."""
    if hasattr(decoder, "attn_bias"):
        return decoder.attn_bias(tgt_len, device)
    return None


def decoder_forward(
    decoder: nn.Module, tokens: Tensor, kv_layer: Optional[int] = None
) -> Tuple[List[Tensor], Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """Full forward of a fairseq LM decoder.

    Returns ``(hiddens, features, kv)``: hiddens ``[h^0 .. h^L]`` each
    ``(bsz, tgt_len, dim)``; features after the final norm / out projection
    (input of the output layer); kv the per-head keys/values of layer
    ``kv_layer`` (0-based), ``(bsz, heads, tgt_len, d)`` each.
    """
    x = embed(decoder, tokens)
    bias = decoder_attn_bias(decoder, tokens.size(1), tokens.device)
    hiddens = [x]
    kv = None
    for i, layer in enumerate(decoder.layers):
        x, layer_kv = layer_forward(layer, x, bias, return_kv=(i == kv_layer))
        if layer_kv is not None:
            kv = layer_kv
        hiddens.append(x)
    return hiddens, final_features(decoder, x), kv


def final_features(decoder: nn.Module, x: Tensor) -> Tensor:
    """Final layer norm and output-dim projection of a fairseq decoder."""
    if decoder.layer_norm is not None:
        x = decoder.layer_norm(x)
    if decoder.project_out_dim is not None:
        x = decoder.project_out_dim(x)
    return x
