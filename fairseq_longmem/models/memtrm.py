"""MemTRM baseline: a Memorizing-Transformer-style LM in the same framework as LongMem.

One network, initialised from the same backbone checkpoint as LongMem
(``--pretrained-model-path``), *all* of it trainable. Its layer ``m``
(``--retrieval-layer-index``) uses the same joint (local + memory, gated)
attention as LongMem's memory-augmented side layer, but the memory holds the
layer-``m`` keys/values that *this network itself* computed on earlier segments
(detached). As the weights train, keys cached under old weights no longer match
the queries of the new ones: the "memory staleness" LongMem's frozen memory
encoder avoids (DESIGN.md 1.1). This is the coupled design the paper compares
against, so that both run from the same commands, data order and memory module.

Shared with LongMem, not copied: the layer forward with a memory hook and
key/value output (:func:`~fairseq_longmem.modules.decoder_layer.layer_forward`),
the joint attention (:func:`memory_attention`, :func:`gate_mix`), the memory
backends (:func:`build_memory`, through :class:`MemoryOwner`), and
the per-row memory protocol (:func:`segment_boundaries`, ``memory_key``).

Per segment: embed -> layers (layer m reads memory written by *earlier*
segments, and returns its own k/v) -> logits -> append the segment's layer-m
k/v (detached) to each row's memory. Training uses the same ``fairseq-train``
command as LongMem with ``--arch memtrm_*`` (there is no
``--layer-reduction-factor``: there is no side network).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.models import (
    FairseqDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor, nn

from ..modules.decoder_layer import decoder_attn_bias, embed, final_features, layer_forward
from ..modules.memory_reader import MemoryOwner, joint_memory_reader
from .backbone import build_backbone, dumps_config, load_backbone, loads_config
from .longmem import MemoryKnobs, check_backbone_fit, memory_preset, segment_boundaries

logger = logging.getLogger(__name__)


@dataclass
class MemTRMConfig(MemoryKnobs):
    pretrained_model_path: str = field(
        default="",
        metadata={"help": "initial weights: a fairseq alibi_lm or transformer_lm checkpoint "
                  "(the same backbone LongMem uses); all of it is trained"},
    )
    use_external_memory: bool = field(
        default=False,
        metadata={"help": "read and write the memory bank (without it: plain fine-tuning)"},
    )
    # accepted so that LongMem's training command runs unchanged with --arch memtrm_*
    reload_ptm_layer: bool = field(
        default=False,
        metadata={"help": "accepted for command compatibility with longmem; MemTRM always "
                  "starts from all of the backbone's weights"},
    )
    tune_lm_head: bool = field(
        default=False,
        metadata={"help": "accepted for command compatibility with longmem; MemTRM trains "
                  "every parameter, the output projection included"},
    )
    side_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "dropout of the network's layers and embeddings (default: the "
                  "backbone's); named as in longmem"},
    )
    decoder_embed_dim: Optional[int] = field(
        default=None, metadata={"help": "expected width of the backbone"}
    )
    decoder_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "expected heads of the backbone"}
    )
    backbone_config: str = field(
        default="",
        metadata={"help": "filled automatically: the backbone's model config (JSON), so a "
                  "checkpoint rebuilds without the backbone file"},
    )
    tokens_per_sample: int = II("task.tokens_per_sample")


class MemTRMDecoder(MemoryOwner, FairseqDecoder):
    """The whole backbone decoder, trainable, whose layer m reads its own past k/v."""

    def __init__(self, cfg: MemTRMConfig, dictionary, net):
        super().__init__(dictionary)
        check_backbone_fit(cfg, net, "MemTRM network")
        self.cfg = cfg
        self.net = net
        self.retrieval_layer = cfg.retrieval_layer_index
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
        self.init_memory_state()
        # set True to keep the last segment's layer-m keys/values (what was written)
        self.record_written = False
        self.last_written = None

    def max_positions(self):
        return self.net.max_positions()

    def output_layer(self, features: Tensor) -> Tensor:
        return self.net.output_layer(features)

    def forward(
        self,
        prev_output_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        doc_start: Optional[Tensor] = None,
        memory_key: str = "default",
        features_only: bool = False,
        **unused,
    ):
        """prev_output_tokens ``(bsz, tgt_len)``; doc_start ``(bsz, tgt_len)`` bool:
        True where a new document (memory scope) begins. Returns ``(logits, extra)``."""
        tokens = prev_output_tokens
        bsz, tgt_len = tokens.shape
        net = self.net
        m = self.retrieval_layer
        use_memory = bool(self.cfg.use_external_memory)
        x = embed(net, tokens)
        bias = decoder_attn_bias(net, tgt_len, tokens.device)
        reader, held = None, {}
        if use_memory:
            query_mask, reset_rows, write_start, write_end = segment_boundaries(
                doc_start, tokens, self.dictionary.pad()
            )
            reader = self._memory_reader(memory_key, query_mask, held)
        hiddens = [x]
        kv = None
        for i, layer in enumerate(net.layers):
            x, layer_kv = layer_forward(
                layer, x, bias,
                memory_reader=reader if i == m else None,
                return_kv=use_memory and i == m,
            )
            if layer_kv is not None:
                kv = layer_kv
            hiddens.append(x)
        x = final_features(net, x)
        if use_memory:
            bank = held["bank"]
            mem_k, mem_v = kv[0].detach(), kv[1].detach()
            if self.record_written:
                self.last_written = (mem_k.clone(), mem_v.clone())
            with torch.no_grad():
                bank.reset(reset_rows)
                bank.write(mem_k, mem_v, start=write_start, end=write_end)
                self.last_stats["memory_fill"] = bank.fill().float().mean()
        extra = {"inner_states": hiddens, "memory_stats": dict(self.last_stats)}
        if features_only:
            return x, extra
        return self.output_layer(x), extra

    def _memory_reader(self, memory_key: str, query_mask: Tensor, held: dict):
        def get_bank(q: Tensor):
            # the bank takes the dtype of this layer's keys (q has the same dtype)
            bsz, heads, _, head_dim = q.shape
            held["bank"] = self.get_memory(memory_key, bsz, heads, head_dim, q.device, q.dtype)
            return held["bank"]

        layer = self.net.layers[self.retrieval_layer]
        return joint_memory_reader(
            self, get_bank, query_mask, self.memory_gate, self.cfg.k,
            layer.self_attn.dropout_module.p,
        )


@register_model("memtrm", dataclass=MemTRMConfig)
class MemTRMModel(FairseqLanguageModel):
    """Memorizing-Transformer-style baseline: one trainable network, self-written memory."""

    accepts_stream_inputs = True  # reads doc_start / memory_key of stream batches

    @classmethod
    def build_model(cls, cfg: MemTRMConfig, task):
        if cfg.backbone_config:
            backbone_cfg = loads_config(cfg.backbone_config)
            backbone = build_backbone(backbone_cfg, task)  # weights come from our checkpoint
        else:
            backbone, backbone_cfg = load_backbone(cfg.pretrained_model_path, task)
            cfg.backbone_config = dumps_config(backbone_cfg)
            logger.info("MemTRM initialised from %s", cfg.pretrained_model_path)
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


# presets mirror longmem_*: same memory size, chunk, k and retrieval layer


@register_model_architecture("memtrm", "memtrm_tiny")
def memtrm_tiny(args):
    """Tests: over an alibi_lm_tiny backbone (4 layers, d=64)."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    memory_preset(args, memory_size=256, chunk_size=4, k=16, layer=3)


@register_model_architecture("memtrm", "memtrm_small")
def memtrm_small(args):
    """CPU quickstart: over alibi_lm_small (4 layers, d=256)."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 256)
    memory_preset(args, memory_size=8192, chunk_size=4, k=32, layer=3)


@register_model_architecture("memtrm", "memtrm_gpt2_medium")
def memtrm_gpt2_medium(args):
    """The paper's baseline size: 24 layers d=1024 16 heads, memory in layer 17."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 1024)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 16)
    memory_preset(args, memory_size=65536, chunk_size=4, k=64, layer=17)
