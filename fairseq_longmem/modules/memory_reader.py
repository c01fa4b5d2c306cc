"""The memory layer's read: search a bank with the layer's queries, mix per head.

:class:`JointMemoryReader` is the hook a layer's attention calls
(``layer_forward(..., memory_reader=reader)``) for one segment. What it read
(:attr:`retrieved`) and its statistics (:attr:`stats`) stay on the reader, which
the model returns with its output; nothing is stored on the model.
"""

from typing import Dict, Optional

import torch
from torch import Tensor

from . import cpu_kernels
from .joint_attention import gate_mix, memory_attention_chunks
from .memory_bank import MemoryBank, Selection


class JointMemoryReader:
    """Joint attention over one bank for one segment.

    bank: the rows' memories; query_mask ``(bsz, tgt_len)``: False for queries
    that must not read memory (a new document); gate ``(heads,)``: logits g,
    memory's share is sigmoid(g); k: retrieved tokens per query and head.
    """

    def __init__(self, bank: MemoryBank, query_mask: Tensor, gate: Tensor, k: int,
                 attn_dropout: float, training: bool):
        self.bank = bank
        self.query_mask = query_mask
        self.gate = gate
        self.k = k
        self.attn_dropout = attn_dropout
        self.training = training
        self.retrieved: Optional[Selection] = None
        self.stats: Dict[str, Tensor] = {}

    def __call__(self, q: Tensor, local: Tensor) -> Tensor:
        """q, local: ``(bsz, heads, tgt_len, head_dim)`` queries and local attention
        output; returns the gated mix, same shape."""
        got = self.bank.select(q.detach(), self.k, self.query_mask)
        # the compiled CPU read keeps no copy of what it read, and the step's write
        # comes after this read and before its backward: log what the write replaces
        log = None
        if q.requires_grad and torch.is_grad_enabled() and cpu_kernels.memory_attention_supported(
            q, self.bank.keys, self.bank.values
        ):
            log = self.bank.log_overwrites()
        mem_out, has_memory = memory_attention_chunks(
            q, self.bank.keys, self.bank.values, got.chunk_index, got.mask.to(q.device),
            self.bank.chunk_size, dropout_p=self.attn_dropout, training=self.training,
            overwrite_log=log,
        )
        self.retrieved = got
        self.stats = {
            "memory_read_frac": has_memory.float().mean().detach(),
            "memory_gate": torch.sigmoid(self.gate.detach().float()).mean(),
        }
        return gate_mix(local, mem_out, self.gate, has_memory)
