"""Choose a memory backend by name (``--memory-backend``)."""

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
    """A memory bank of the given backend; every backend has MemoryBank's interface."""
    if backend == "torch":
        return MemoryBank(num_streams, num_heads, head_dim, memory_size, chunk_size, dtype, device)
    raise MemoryConfigError(
        f"unknown --memory-backend {backend!r}: choose one of {', '.join(MEMORY_BACKENDS)}"
    )
