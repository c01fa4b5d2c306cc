"""What LongMem and MemTRM share about owning memories and reading them.

:class:`MemoryOwner` keeps one memory bank per ``memory_key`` (per data split)
with one ring per batch row; :func:`joint_memory_reader` is the hook a layer's
attention calls to search its bank and mix memory into the local attention.
"""

import logging
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .joint_attention import gate_mix, memory_attention
from .memory_bank import resolve_dtype
from .memory_factory import build_memory

logger = logging.getLogger(__name__)


class MemoryOwner:
    """Mixin for a decoder with ``self.cfg`` (memory fields) that owns memories."""

    def init_memory_state(self) -> None:
        self.memories: Dict[str, object] = {}
        self.memories_seen = set()  # keys whose saved memory (--memory-path) was considered
        self.last_stats: Dict[str, Tensor] = {}
        # set True to keep the last segment's retrieval (probes, tests); off in training
        self.record_retrieval = False
        self.last_retrieval = None

    def reset_memory(self, memory_key: Optional[str] = None) -> None:
        """Forget every memory (or the one of ``memory_key``)."""
        if memory_key is None:
            self.memories.clear()
            self.memories_seen.clear()
        else:
            self.memories.pop(memory_key, None)
            self.memories_seen.discard(memory_key)

    def get_memory(self, memory_key: str, bsz: int, heads: int, head_dim: int, device, dtype):
        """The bank of ``memory_key``, made on first use (and anew if the batch size changed)."""
        bank = self.memories.get(memory_key)
        if bank is not None and bank.num_streams != bsz:
            logger.warning(
                "memory %r held %d streams and now gets a batch of %d rows: starting it empty",
                memory_key, bank.num_streams, bsz,
            )
            bank = None
        if bank is None:
            cfg = self.cfg
            mem_dtype = dtype if cfg.memory_dtype == "auto" else resolve_dtype(cfg.memory_dtype)
            bank = build_memory(
                backend=str(cfg.memory_backend),
                num_streams=bsz,
                num_heads=heads,
                head_dim=head_dim,
                memory_size=cfg.memory_size,
                chunk_size=cfg.chunk_size,
                dtype=mem_dtype,
                device=torch.device("cpu") if cfg.memory_on_cpu else device,
                cfg=cfg,
            )
            self.memories[memory_key] = bank
        return bank


def joint_memory_reader(
    owner: MemoryOwner,
    get_bank: Callable[[Tensor], object],
    query_mask: Tensor,
    gate: Tensor,
    k: int,
    attn_dropout: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A layer hook: search ``get_bank(q)`` with the layer's queries and mix per head.

    query_mask ``(bsz, tgt_len)``: False for queries that must not read memory.
    """

    def read(q: Tensor, local: Tensor) -> Tensor:
        bank = get_bank(q)
        got = bank.search(q.detach(), k, query_mask)
        if owner.record_retrieval:
            owner.last_retrieval = got
        mem_out, has_memory = memory_attention(
            q, got.keys.to(q.device), got.values.to(q.device), got.mask.to(q.device),
            dropout_p=attn_dropout, training=owner.training,
        )
        owner.last_stats = {
            "memory_read_frac": has_memory.float().mean().detach(),
            "memory_gate": torch.sigmoid(gate.detach().float()).mean(),
        }
        return gate_mix(local, mem_out, gate, has_memory)

    return read
