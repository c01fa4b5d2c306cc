"""MemTRM baseline: a Memorizing-Transformer-style LM in the same framework as LongMem.

One network, initialised from the same backbone checkpoint as LongMem
(``--pretrained-model-path``), *all* of it trainable. Its layer ``m``
(``--retrieval-layer-index``) uses the same joint (local + memory, gated)
attention as LongMem's memory-augmented side layer, but the memory holds the
layer-``m`` keys/values that *this network itself* computed on earlier segments
(detached). As the weights train, keys cached under old weights no longer match
the queries of the new ones: the "memory staleness" LongMem's frozen memory
encoder avoids. This is the coupled design the paper compares
against, so that both run from the same commands, data order and memory module.

Shared with LongMem, not copied: the config, the backbone loading and the
per-segment memory protocol (:mod:`.memory_lm`), the layer forward with a
memory hook and key/value output
(:func:`~fairseq_longmem.modules.decoder_layer.layer_forward`), the joint
attention and the memory backends.

Per segment: embed -> layers (layer m reads memory written by *earlier*
segments, and returns its own k/v) -> logits -> append the segment's layer-m
k/v (detached) to each row's memory. Training uses the same ``fairseq-train``
command as LongMem with ``--arch memtrm_*`` (there is no
``--layer-reduction-factor``: there is no side network). Its memory is not
rebuilt after a resume (the keys it held were computed by earlier weights):
a resumed run restarts each stream's memory empty.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.models import FairseqLanguageModel, register_model
from torch import Tensor, nn

from ..modules.decoder_layer import decoder_attn_bias, embed, final_features, layer_forward
from ..modules.incremental import LayerCache, SegmentCache, decoder_step, embed_piece, piece_bias
from ..modules.memory_reader import JointMemoryReader
from . import memory_lm
from .memory_lm import MemoryDecoder, MemoryLMConfig

logger = logging.getLogger(__name__)


@dataclass
class MemTRMConfig(MemoryLMConfig):
    # accepted so that LongMem's training command runs unchanged with --arch memtrm_*
    reload_ptm_layer: bool = field(
        default=False,
        metadata={"help": "no effect for memtrm (logged): MemTRM always starts from all of "
                  "the backbone's weights"},
    )
    tune_lm_head: bool = field(
        default=False,
        metadata={"help": "no effect for memtrm (logged): MemTRM trains every parameter, "
                  "the output projection included"},
    )


class MemTRMDecoder(MemoryDecoder):
    """The whole backbone decoder, trainable, whose layer m reads its own past k/v."""

    def __init__(self, cfg: MemTRMConfig, dictionary, net):
        memory_lm.check_backbone_fit(cfg, net, "MemTRM network")
        super().__init__(cfg, dictionary)
        self.net = net
        heads = net.layers[0].self_attn.num_heads
        self.memory_gate = nn.Parameter(torch.full((heads,), float(cfg.memory_gate_init)))
        if cfg.side_dropout is not None:
            net.dropout_module.p = cfg.side_dropout
            for layer in net.layers:
                layer.dropout_module.p = cfg.side_dropout
        for p in self.parameters():
            p.requires_grad_(True)
        # an unused gate would stall DDP (no gradient): train it only when memory is on
        self.memory_gate.requires_grad_(bool(cfg.use_external_memory))

    def max_positions(self):
        return self.net.max_positions()

    def output_layer(self, features: Tensor) -> Tensor:
        return self.net.output_layer(features)

    def memory_layout(self):
        attn = self.net.layers[self.retrieval_layer].self_attn
        dtype = self.net.embed_tokens.weight.dtype
        return attn.num_heads, attn.head_dim, dtype, attn.dropout_module.p

    def extract(self, tokens: Tensor, reader: Optional[JointMemoryReader],
                context: Optional[Tensor] = None):
        net, m = self.net, self.retrieval_layer
        x = embed(net, tokens)
        bias = decoder_attn_bias(net, tokens.size(1), tokens.device)
        hiddens = [x]
        kv = None
        for i, layer in enumerate(net.layers):
            at_m = reader is not None and i == m
            x, layer_kv = layer_forward(
                layer, x, bias, memory_reader=reader if at_m else None, return_kv=at_m
            )
            if layer_kv is not None:
                kv = layer_kv
            hiddens.append(x)
        return final_features(net, x), kv, hiddens


    # ------------------------------------------------------------ generation
    def segment_stacks(self):
        return {"net": len(self.net.layers)}

    def segment_step(self, tokens: Tensor, state: SegmentCache, query_mask: Optional[Tensor]):
        net, m = self.net, self.retrieval_layer
        x = embed_piece(net, tokens, state.pos)
        bias = piece_bias(net, state.pos, tokens.size(1), tokens.device)
        reader = self.generation_reader(state, query_mask)
        for i, layer in enumerate(net.layers):
            x, _ = layer_forward(layer, x, bias, memory_reader=reader if i == m else None,
                                 cache=(state.caches["net"][i], state.pos))
        return final_features(net, x)

    def segment_memory_kv(self, state: SegmentCache):
        cache = state.caches["net"][self.retrieval_layer]
        return cache.k, cache.v

    @torch.no_grad()
    def context_kv(self, segments: Tensor, before: Optional[Tensor] = None):
        """Layer m's own keys/values of whole segments: they come from the layers
        below m, which read no memory, so segments are computed together."""
        caches = [LayerCache(segments.size(1)) for _ in range(self.retrieval_layer + 1)]
        decoder_step(self.net, segments, 0, caches, upto=self.retrieval_layer + 1)
        return caches[-1].k, caches[-1].v


@register_model("memtrm", dataclass=MemTRMConfig)
class MemTRMModel(FairseqLanguageModel):
    """Memorizing-Transformer-style baseline: one trainable network, self-written memory."""

    accepts_stream_inputs = True  # reads doc_start / memory_key of stream batches

    @classmethod
    def build_model(cls, cfg: MemTRMConfig, task):
        for flag in ("reload_ptm_layer", "tune_lm_head"):
            if getattr(cfg, flag, False):
                logger.warning(
                    "memtrm: --%s has no effect (MemTRM starts from all of the backbone's "
                    "weights and trains every parameter)", flag.replace("_", "-"),
                )
        backbone = memory_lm.backbone_of(cfg, task)
        decoder = MemTRMDecoder(cfg, task.target_dictionary, backbone.decoder)
        n = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
        logger.info(
            "MemTRM: %d trainable layers, memory %s (layer %d reads its own keys/values, "
            "%d tokens, chunk %d, k %d, backend %s), %.2fM trainable parameters",
            len(backbone.decoder.layers),
            "ON" if cfg.use_external_memory else "OFF (pass --use-external-memory)",
            cfg.retrieval_layer_index, cfg.memory_size, cfg.chunk_size, cfg.k,
            cfg.memory_backend, n / 1e6,
        )
        return cls(decoder)


# memtrm_tiny, memtrm_small, memtrm_gpt2_medium: the same backbones, memory and
# retrieval layer as longmem_* (24 trainable layers at the paper's size)
memory_lm.register_presets("memtrm")
