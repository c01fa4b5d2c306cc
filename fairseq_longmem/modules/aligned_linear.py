"""An output projection whose output dimension is padded for the GPU's matmul kernels.

A vocabulary of 50,257 (GPT-2's, what ``longmem-import-hf`` keeps) is not a
multiple of 8: on an H200 cuBLAS then runs the LM head's bf16 matmuls with an
old, slow kernel (``cutlass_75 ... s1688gemm``: 8.8 + 6.1 ms of a 75 ms
training step at the paper's shapes, ``benchmarks/train_speed.py --op-profile``),
where 50,264 symbols took the fast kernels and the step 12.5-13.7 ms less
(docs/speed.md). :func:`aligned_linear` multiplies by the weight padded with
zero rows to a multiple of ``multiple`` and returns the first ``out_features``
columns: the same logits, as a view.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

#: output dims are padded to a multiple of this on CUDA (cuBLAS's alignment for bf16/fp16)
ALIGN = 8


def aligned_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, multiple: Optional[int] = None
) -> Tensor:
    """``F.linear(x, weight, bias)`` ``(..., out_features)``; on CUDA (or with
    ``multiple`` given) computed with ``weight`` ``(out_features, in_features)``
    padded to a multiple of ``multiple`` rows (default :data:`ALIGN`) and sliced
    back. Gradients reach ``x``, ``weight`` and ``bias`` as through ``F.linear``."""
    out = weight.size(0)
    if multiple is None:
        multiple = ALIGN if x.is_cuda else 1
    pad = -out % multiple
    if pad == 0:
        return F.linear(x, weight, bias)
    w = F.pad(weight, (0, 0, 0, pad))
    b = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, w, b)[..., :out]
