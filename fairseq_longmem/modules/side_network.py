"""Residual side network with its memory-augmented layer (joint attention).

Side layer ``i`` is a copy of backbone layer ``r*i + (r-1)`` (same class, so
``--reload-ptm-layer`` initialisation is exact). Its input is the backbone's
embedding output h^0; after side layer ``i`` the cross-network residual adds
``h^{r(i+1)} - h^{r*i}``. Layer ``retrieval_layer_index // r`` reads memory
through joint attention.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import Tensor, nn

from .decoder_layer import MemoryReader, layer_forward


def reinitialise(module: nn.Module) -> None:
    """Fresh fairseq-style initialisation of every sub-module that has one."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def side_layer_sources(num_backbone_layers: int, reduction: int) -> List[int]:
    """Backbone layer each side layer is initialised from: ``r*i + (r-1)``."""
    return [reduction * i + reduction - 1 for i in range(num_backbone_layers // reduction)]


class SideNetwork(nn.Module):
    """Trainable side layers, final norm and gate over a frozen backbone decoder."""

    def __init__(
        self,
        backbone_decoder: nn.Module,
        reduction: int,
        memory_layer: Optional[int],
        reload_ptm_layer: bool = True,
        gate_init: float = 0.0,
        tune_lm_head: bool = False,
        dropout: Optional[float] = None,
    ):
        super().__init__()
        self.reduction = reduction
        self.memory_layer = memory_layer
        sources = side_layer_sources(len(backbone_decoder.layers), reduction)
        self.layers = nn.ModuleList(copy.deepcopy(backbone_decoder.layers[j]) for j in sources)
        if not reload_ptm_layer:
            for layer in self.layers:
                reinitialise(layer)
        self.layer_norm = copy.deepcopy(backbone_decoder.layer_norm)
        self.output_projection = (
            copy.deepcopy(backbone_decoder.output_projection) if tune_lm_head else None
        )
        heads = backbone_decoder.layers[0].self_attn.num_heads
        self.memory_gate = nn.Parameter(torch.full((heads,), float(gate_init)))
        if dropout is not None:
            for layer in self.layers:
                layer.dropout_module.p = dropout
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(
        self,
        hiddens: List[Tensor],
        attn_bias: Optional[Tensor],
        memory_reader: Optional[MemoryReader] = None,
        caches: Optional[list] = None,
        pos: int = 0,
    ) -> Tensor:
        """hiddens: backbone ``[h^0 .. h^L]`` each ``(bsz, tgt_len, dim)``; caches:
        one :class:`~.incremental.LayerCache` per side layer when decoding
        incrementally (hiddens then are a piece at segment positions ``pos..``).

        Returns side features after the final norm, ``(bsz, tgt_len, dim)``.
        """
        r = self.reduction
        x = hiddens[0]
        for i, layer in enumerate(self.layers):
            reader = memory_reader if i == self.memory_layer else None
            cache = (caches[i], pos) if caches is not None else None
            x, _ = layer_forward(layer, x, attn_bias, memory_reader=reader, cache=cache)
            x = x + (hiddens[r * (i + 1)] - hiddens[r * i])
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x
