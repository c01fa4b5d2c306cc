"""Build a memory bank from a :class:`~.memory_spec.MemorySpec` (``--memory-backend``).

``torch`` (default): exact search on the bank's device (one batched matmul +
top-k per segment). ``faiss-flat``: exact, faiss brute-force kernels.
``faiss-ivf`` / ``faiss-hnsw``: approximate faiss indexes for memories too large
to scan exactly. See docs/memory.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from .memory_bank import MemoryBank
from .memory_spec import MEMORY_BACKENDS, MemorySpec

__all__ = ["MEMORY_BACKENDS", "build_memory"]


def build_memory(
    spec: MemorySpec,
    num_streams: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> MemoryBank:
    """A bank of ``spec.backend`` with ``num_streams`` rings of ``(num_heads, head_dim)``
    keys/values, stored in ``dtype`` on ``device``; every backend has MemoryBank's
    interface."""
    args = (num_streams, num_heads, head_dim, spec.memory_size, spec.chunk_size, dtype, device)
    if spec.backend == "torch":
        return MemoryBank(*args)
    from .faiss_memory import FAISS_BACKENDS  # faiss is imported only when used

    return FAISS_BACKENDS[spec.backend](*args, spec=spec)
