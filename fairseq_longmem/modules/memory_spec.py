"""One frozen, validated description of a memory (``--memory-*`` flags).

A model builds one :class:`MemorySpec` from its flags (:meth:`MemorySpec.from_config`)
and hands it to every backend (:func:`~.memory_factory.build_memory`) and to
save/load (:mod:`.memory_io`); nothing below the model reads the model config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import MemoryConfigError
from .memory_bank import check_memory_config, resolve_dtype

MEMORY_BACKENDS = ("torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")

# spec field -> model config field (the command-line flag without dashes)
CONFIG_FIELDS = {
    "backend": "memory_backend",
    "memory_size": "memory_size",
    "chunk_size": "chunk_size",
    "k": "k",
    "dtype": "memory_dtype",
    "on_cpu": "memory_on_cpu",
    "use_gpu_to_search": "use_gpu_to_search",
    "ivf_nlist": "memory_ivf_nlist",
    "ivf_nprobe": "memory_ivf_nprobe",
    "ivf_niter": "memory_ivf_niter",
    "hnsw_m": "memory_hnsw_m",
    "hnsw_ef_search": "memory_hnsw_ef_search",
    "hnsw_ef_construction": "memory_hnsw_ef_construction",
    "hnsw_blocks": "memory_hnsw_blocks",
}
# knobs that change how a saved index is searched, not what it holds
SEARCH_TIME_FIELDS = ("use_gpu_to_search", "ivf_nprobe", "hnsw_ef_search")


@dataclass(frozen=True)
class MemorySpec:
    """Layout and backend of a per-stream memory; validated on construction.

    memory_size, chunk_size: tokens kept per stream and per chunk; k: tokens
    retrieved per query and head (whole chunks: ``k // chunk_size`` of them).
    dtype: ``auto`` (the model's), ``fp32``, ``fp16`` or ``bf16``. on_cpu: keep
    the ring in host memory whatever the model's device. The ``ivf_*`` and
    ``hnsw_*`` knobs apply to the faiss backends only.
    """

    memory_size: int
    chunk_size: int
    k: int
    backend: str = "torch"
    dtype: str = "auto"
    on_cpu: bool = False
    use_gpu_to_search: bool = False
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    ivf_niter: int = 10
    hnsw_m: int = 32
    hnsw_ef_search: int = 32
    hnsw_ef_construction: int = 40
    hnsw_blocks: int = 8

    def __post_init__(self) -> None:
        backend = str(self.backend)
        object.__setattr__(self, "backend", backend)
        if backend not in MEMORY_BACKENDS:
            raise MemoryConfigError(
                f"unknown --memory-backend {backend!r}: choose one of {', '.join(MEMORY_BACKENDS)}"
            )
        check_memory_config(int(self.memory_size), int(self.chunk_size), int(self.k))
        if str(self.dtype) != "auto":
            resolve_dtype(self.dtype)
        for name in ("ivf_nlist", "ivf_nprobe", "ivf_niter", "hnsw_ef_search",
                     "hnsw_ef_construction", "hnsw_blocks"):
            if int(getattr(self, name)) < 1:
                raise MemoryConfigError(
                    f"--{CONFIG_FIELDS[name].replace('_', '-')} must be >= 1, got "
                    f"{getattr(self, name)}"
                )
        if int(self.hnsw_m) < 2:
            raise MemoryConfigError(f"--memory-hnsw-m must be >= 2, got {self.hnsw_m}")

    @property
    def num_chunks(self) -> int:
        return self.memory_size // self.chunk_size

    @classmethod
    def from_config(cls, cfg: Any) -> "MemorySpec":
        """The spec of a model config (fields named as the flags; absent ones: defaults,
        so that checkpoints written before a flag existed still load)."""
        kwargs = {}
        for name, flag in CONFIG_FIELDS.items():
            value = getattr(cfg, flag, None)
            if value is not None:
                kwargs[name] = value.value if hasattr(value, "value") else value
        return cls(**kwargs)

    def replace(self, **changes) -> "MemorySpec":
        return dataclasses.replace(self, **changes)

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the ring stores: the model's for ``auto`` (pass
        :func:`compute_dtype`'s answer: under autocast, autocast's dtype)."""
        return model_dtype if self.dtype == "auto" else resolve_dtype(self.dtype)

    def storage_device(self, model_device: Optional[torch.device]) -> torch.device:
        if self.on_cpu or model_device is None:
            return torch.device("cpu")
        return torch.device(model_device)

    def backend_params(self) -> dict:
        """The knobs that define the backend's index (saved with a memory)."""
        if self.backend == "faiss-ivf":
            return {"ivf_nlist": self.ivf_nlist, "ivf_nprobe": self.ivf_nprobe,
                    "ivf_niter": self.ivf_niter}
        if self.backend == "faiss-hnsw":
            return {"hnsw_m": self.hnsw_m, "hnsw_ef_search": self.hnsw_ef_search,
                    "hnsw_ef_construction": self.hnsw_ef_construction,
                    "hnsw_blocks": self.hnsw_blocks}
        return {}


def compute_dtype(param_dtype: torch.dtype, device) -> torch.dtype:
    """The dtype a model whose parameters are ``param_dtype`` computes in on
    ``device``: autocast's where autocast is on for that device type (fairseq's
    ``--amp``; the keys and values it writes are in that dtype), else the
    parameters'. A ring in fp32 under bf16 autocast doubled the memory and kept
    the search off the fused kernel (fp16/bf16 only)."""
    if param_dtype != torch.float32:
        return param_dtype
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:  # torch >= 2.4
        if torch.is_autocast_enabled(dev.type):
            return torch.get_autocast_dtype(dev.type)
    except (TypeError, AttributeError):  # older torch: CUDA and CPU only
        if dev.type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if dev.type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return param_dtype
