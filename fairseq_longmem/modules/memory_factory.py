"""Choose a memory backend by name (``--memory-backend``).

``torch`` (default): exact search on the bank's device (one batched matmul +
top-k per segment). ``faiss-flat``: exact, faiss brute-force kernels.
``faiss-ivf`` / ``faiss-hnsw``: approximate faiss indexes for memories too large
to scan exactly. See docs/memory.md.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .memory_bank import MemoryBank, MemoryConfigError

MEMORY_BACKENDS = ["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"]


def build_memory(
    backend: str,
    num_streams: int,
    num_heads: int,
    head_dim: int,
    memory_size: int,
    chunk_size: int,
    dtype: torch.dtype,
    device: Optional[torch.device] = None,
    cfg: Any = None,
):
    """A memory bank of the given backend; every backend has MemoryBank's interface.

    ``cfg`` (the model config, or None for defaults) supplies the faiss knobs:
    ``memory_ivf_nlist``, ``memory_ivf_nprobe``, ``memory_hnsw_m``,
    ``use_gpu_to_search`` (and, if present, ``memory_hnsw_ef_search``,
    ``memory_hnsw_ef_construction``, ``memory_hnsw_blocks``, ``memory_ivf_niter``).
    """
    backend = str(backend)
    if backend == "torch":
        return MemoryBank(num_streams, num_heads, head_dim, memory_size, chunk_size, dtype, device)
    if backend in MEMORY_BACKENDS:
        from .faiss_memory import FAISS_BACKENDS  # faiss is imported only when used

        return FAISS_BACKENDS[backend](
            num_streams, num_heads, head_dim, memory_size, chunk_size, dtype, device, cfg=cfg
        )
    raise MemoryConfigError(
        f"unknown --memory-backend {backend!r}: choose one of {', '.join(MEMORY_BACKENDS)}"
    )
