"""Causal ALiBi attention through FlexAttention, the bias computed in the kernel.

:func:`.joint_attention.local_attention` takes ALiBi as an additive float bias
``(1, heads, T, T)`` (:func:`.decoder_layer.alibi_bias`). Given to
``scaled_dot_product_attention`` such a bias rules out the flash kernels: SDPA
falls back to a kernel that reads the bias from memory (and the bias is cast to
the queries' dtype at every call). FlexAttention instead adds
``-slope[h] * (i - j)`` to each score inside a generated flash-style kernel
(``score_mod``) and skips the blocks above the diagonal (a causal
``BlockMask``): no bias tensor is read.

To use it, :func:`local_attention` must know that a bias tensor is an ALiBi
bias, and of which slopes. :func:`~.decoder_layer.alibi_bias` registers every
bias it makes here (:func:`register_alibi_bias`), weakly, by tensor identity:
the same tensor object (decoders cache it) is recognised, any other tensor,
copies included, is not, and takes the SDPA path. A registered bias must not be
modified in place.

The flex path runs where :func:`flex_attention_available`: a CUDA device,
``torch.nn.attention.flex_attention`` importable, and the environment variable
``LONGMEM_FLEX_ATTENTION`` unset or not ``0`` (``forward``: only calls that need no
gradient, :func:`flex_mode`); and only without attention
dropout (FlexAttention has none: with ``dropout_p > 0`` SDPA runs), for segment
lengths that are multiples of :data:`FLEX_BLOCK` (:func:`flex_supported`). On CUDA the
function is ``torch.compile``'d once (its first calls compile the kernels);
elsewhere (the CPU tests) it runs eagerly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None
    HAS_FLEX = False

FLEX_ENV = "LONGMEM_FLEX_ATTENTION"
# FlexAttention's default block: local_attention takes the flex path for lengths that
# are multiples of it (whole blocks; one compilation per length)
FLEX_BLOCK = 128


@dataclass(frozen=True)
class AlibiSpec:
    """What the flex path needs of a registered bias: the slopes ``(heads,)``
    (fp32, on the bias's device) and the ``score_mod`` made once from them (one
    function object per bias, so the compiled kernel is reused)."""

    slopes: Tensor
    score_mod: Callable


_REGISTRY = torch.utils.weak.WeakTensorKeyDictionary()
_BLOCK_MASKS: Dict[Tuple[int, str], object] = {}
_COMPILED: Dict[str, Callable] = {}


def alibi_score_mod(slopes: Tensor) -> Callable:
    """``score_mod`` adding ALiBi's ``-slopes[h] * (q_idx - kv_idx)`` to a score."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    return score_mod


def register_alibi_bias(bias: Tensor, slopes: Tensor) -> Tensor:
    """Record that ``bias`` ``(1, heads, T, T)`` is the causal ALiBi bias of ``slopes``
    (``-slopes[h] * (i - j)`` on and below the diagonal, -inf above); returns ``bias``."""
    slopes = slopes.detach().to(device=bias.device, dtype=torch.float32).contiguous()
    _REGISTRY[bias] = AlibiSpec(slopes, alibi_score_mod(slopes))
    return bias


def alibi_spec(bias: Optional[Tensor]) -> Optional[AlibiSpec]:
    """The registered :class:`AlibiSpec` of ``bias``, or None (not an ALiBi bias made by
    :func:`~.decoder_layer.alibi_bias`, or None)."""
    if bias is None:
        return None
    return _REGISTRY.get(bias)


def flex_mode() -> str:
    """``LONGMEM_FLEX_ATTENTION``: ``1`` (default: every call the flex path takes),
    ``0`` (never) or ``forward`` (only calls that need no gradient, such as the
    frozen backbone's: on an H200, flex's forward was faster than SDPA with the
    bias tensor and its forward + backward slower, docs/speed.md)."""
    mode = os.environ.get(FLEX_ENV, "1").strip().lower()
    if mode not in ("0", "1", "forward"):
        raise ValueError(f"{FLEX_ENV}={mode!r}: use 1 (on), 0 (off) or forward")
    return mode


def flex_attention_available(device=None) -> bool:
    """True where :func:`local_attention` may take the flex path on ``device``: CUDA,
    FlexAttention importable, ``LONGMEM_FLEX_ATTENTION`` not ``0``."""
    if not HAS_FLEX or flex_mode() == "0":
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available()


def causal_block_mask(length: int, device) -> object:
    """Cached causal ``BlockMask`` for ``length`` queries over ``length`` keys."""
    key = (length, str(device))
    mask = _BLOCK_MASKS.get(key)
    if mask is None:

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        mask = create_block_mask(causal, None, None, length, length, device=device)
        _BLOCK_MASKS[key] = mask
    return mask


def _flex_fn(device: torch.device) -> Callable:
    """``flex_attention``, compiled on CUDA (once per process), eager elsewhere."""
    if device.type != "cuda":
        return flex_attention
    fn = _COMPILED.get("cuda")
    if fn is None:
        fn = torch.compile(flex_attention, dynamic=False)
        _COMPILED["cuda"] = fn
    return fn


def flex_supported(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> bool:
    """Whether these inputs fit the flex path: square causal self-attention,
    ``(bsz, heads, T, d)`` of one dtype, bias ``(1, heads, T, T)``, and ``T`` a
    multiple of :data:`FLEX_BLOCK`. The kernel is compiled for each length (and
    with and without gradients), so other lengths (an evaluation's last short
    segment, a probe's odd span) take SDPA instead of a compilation each."""
    t = q.size(-2)
    if flex_mode() == "forward" and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
    ):
        return False
    return (
        q.dim() == 4
        and q.shape == k.shape == v.shape
        and q.dtype == k.dtype == v.dtype
        and tuple(bias.shape) == (1, q.size(1), t, t)
        and t > 0
        and t % FLEX_BLOCK == 0
    )


def alibi_flex_attention(q: Tensor, k: Tensor, v: Tensor, spec: AlibiSpec) -> Tensor:
    """Causal ALiBi attention ``(bsz, heads, T, d)`` of q, k, v ``(bsz, heads, T, d)``
    (q unscaled: the scale is ``d ** -0.5``, as SDPA's), the bias of ``spec``
    computed in the kernel. Equals SDPA with the registered bias (up to rounding:
    here the bias is added in fp32, where SDPA's is cast to q's dtype first)."""
    mask = causal_block_mask(q.size(-2), q.device)
    fn = _flex_fn(q.device)
    # q, k, v already have their dtype (autocast made them); the kernel's scores are fp32
    with torch.autocast(q.device.type, enabled=False):
        return fn(q, k, v, score_mod=spec.score_mod, block_mask=mask)
