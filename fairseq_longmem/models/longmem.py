"""The LongMem language model: frozen backbone + residual side network + memory.

Per segment: backbone forward (no grad, also the layer-m keys/values) -> side
forward, whose memory-augmented layer retrieves from what *earlier* segments
wrote -> logits (loss outside) -> append this segment's layer-m keys/values to
each row's memory (the protocol: :mod:`.memory_lm`).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from fairseq.models import FairseqLanguageModel, register_model
from fairseq.utils import safe_getattr
from torch import Tensor

from ..modules.aligned_linear import aligned_linear
from ..modules.decoder_layer import decoder_attn_bias, decoder_forward
from ..modules.incremental import LayerCache, SegmentCache, decoder_step, piece_bias
from ..modules.memory_reader import JointMemoryReader
from ..modules.side_network import SideNetwork
from .backbone import BackboneError
from .memory_lm import MemoryDecoder, MemoryLMConfig, backbone_of, check_backbone_fit
from .memory_lm import register_presets

logger = logging.getLogger(__name__)


@dataclass
class LongMemConfig(MemoryLMConfig):
    layer_reduction_factor: int = field(
        default=2, metadata={"help": "r: one side layer per r backbone layers"}
    )
    reload_ptm_layer: bool = field(
        default=False,
        metadata={"help": "initialise side layer i from backbone layer r*i+(r-1) (else random)"},
    )
    tune_lm_head: bool = field(
        default=False, metadata={"help": "train a copy of the output projection (else frozen)"}
    )
    backbone_context: int = field(
        default=0,
        metadata={"help": "tokens of the stream before each segment that the frozen "
                  "backbone also reads, as context only (nothing is predicted or written "
                  "for them): the memory keys and side-network inputs at a segment's first "
                  "positions then carry the tokens before them, as later positions' do "
                  "(0: every segment alone, as in the paper)"},
    )


class LongMemDecoder(MemoryDecoder):
    """Frozen backbone + side network + one memory bank per batch row, per data split."""

    def __init__(self, cfg: LongMemConfig, dictionary, backbone_decoder):
        layers = len(backbone_decoder.layers)
        r = cfg.layer_reduction_factor
        if r < 1 or layers % r != 0:
            raise BackboneError(
                f"--layer-reduction-factor {r} does not divide the backbone's {layers} "
                f"layers; use a divisor of {layers} (the paper uses 2)"
            )
        check_backbone_fit(cfg, backbone_decoder, "side network")
        check_backbone_context(cfg, backbone_decoder)
        super().__init__(cfg, dictionary)
        self.backbone = backbone_decoder
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.side = SideNetwork(
            backbone_decoder,
            reduction=r,
            memory_layer=cfg.retrieval_layer_index // r,
            reload_ptm_layer=cfg.reload_ptm_layer,
            gate_init=cfg.memory_gate_init,
            tune_lm_head=cfg.tune_lm_head,
            dropout=cfg.side_dropout,
        )
        # an unused gate would stall DDP (no gradient): train it only when memory is on
        self.side.memory_gate.requires_grad_(bool(cfg.use_external_memory))

    @property
    def memory_gate(self) -> Tensor:
        return self.side.memory_gate

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def max_positions(self):
        return self.backbone.max_positions()

    def output_layer(self, features: Tensor) -> Tensor:
        """Side features ``(bsz, tgt_len, dim)`` -> logits, through the backbone's
        (frozen) output-dim projection, if it has one, and output projection."""
        if self.backbone.project_out_dim is not None:
            features = self.backbone.project_out_dim(features)
        proj = self.side.output_projection
        if proj is None and getattr(self.backbone, "adaptive_softmax", None) is None:
            proj = getattr(self.backbone, "output_projection", None)
        if isinstance(proj, torch.nn.Linear):  # the vocabulary padded for the GPU's kernels
            return aligned_linear(features, proj.weight, proj.bias)
        if proj is not None:
            return proj(features)
        return self.backbone.output_layer(features)

    def memory_layout(self):
        attn = self.side.layers[self.side.memory_layer].self_attn
        dtype = next(self.backbone.parameters()).dtype  # the backbone writes memory
        return attn.num_heads, attn.head_dim, dtype, attn.dropout_module.p

    def context_length(self) -> int:
        return int(safe_getattr(self.cfg, "backbone_context", 0) or 0)

    def backbone_forward(self, tokens: Tensor, context: Optional[Tensor], kv: bool):
        """The frozen backbone over ``[context, tokens]``, cut back to the positions
        of ``tokens``: hiddens ``[h^0 .. h^L]`` ``(bsz, tgt_len, dim)`` and the
        layer-m keys/values ``(bsz, heads, tgt_len, head_dim)`` (with ``kv``)."""
        c = 0 if context is None else context.size(1)
        seq = tokens if c == 0 else torch.cat([context.to(tokens), tokens], 1)
        with torch.no_grad():
            hiddens, _, layer_kv = decoder_forward(
                self.backbone, seq, kv_layer=self.retrieval_layer if kv else None
            )
        if c:
            hiddens = [h[:, c:] for h in hiddens]
            if layer_kv is not None:
                layer_kv = (layer_kv[0][:, :, c:], layer_kv[1][:, :, c:])
        return hiddens, layer_kv

    def extract(self, tokens: Tensor, reader: Optional[JointMemoryReader],
                context: Optional[Tensor] = None):
        hiddens, kv = self.backbone_forward(tokens, context, kv=reader is not None)
        bias = decoder_attn_bias(self.backbone, tokens.size(1), tokens.device)
        return self.side(hiddens, bias, memory_reader=reader), kv, hiddens

    def replay_keys(self, tokens: Tensor,
                    context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The frozen backbone's layer-m keys/values: the same now as when written."""
        return self.backbone_forward(tokens, context, kv=True)[1]

    # ------------------------------------------------------------ generation
    def segment_stacks(self):
        return {"backbone": len(self.backbone.layers), "side": len(self.side.layers)}

    def segment_context_length(self) -> int:
        return self.context_length()

    @torch.no_grad()
    def begin_segment(self, state: SegmentCache, doc_start: Optional[Tensor]) -> None:
        """--backbone-context: the backbone's caches start with the stream's last
        tokens, read alone as :meth:`backbone_forward` reads them (none at the
        first segment, or when every row starts a document here)."""
        state.ctx_len = 0
        ctx = state.recent
        if ctx is not None and doc_start is not None and bool(doc_start.all()):
            state.recent = ctx = None  # as in training: these rows start anew
        if ctx is None:
            return
        decoder_step(self.backbone, ctx, 0, state.caches["backbone"])
        state.ctx_len = ctx.size(1)

    def segment_step(self, tokens: Tensor, state: SegmentCache, query_mask: Optional[Tensor]):
        with torch.no_grad():
            hiddens, _ = decoder_step(self.backbone, tokens, state.ctx_len + state.pos,
                                      state.caches["backbone"])
        bias = piece_bias(self.backbone, state.pos, tokens.size(1), tokens.device)
        return self.side(hiddens, bias, memory_reader=self.generation_reader(state, query_mask),
                         caches=state.caches["side"], pos=state.pos)

    def segment_memory_kv(self, state: SegmentCache):
        cache = state.caches["backbone"][self.retrieval_layer]
        return cache.k[:, :, state.ctx_len:], cache.v[:, :, state.ctx_len:]

    @torch.no_grad()
    def context_kv(self, segments: Tensor, before: Optional[Tensor] = None):
        """The frozen backbone's layer-m keys/values of whole segments, each read
        after its ``before`` tokens (layers past m are not run): memory never
        depends on memory."""
        seq = segments if before is None else torch.cat([before, segments], 1)
        caches = [LayerCache(seq.size(1)) for _ in range(self.retrieval_layer + 1)]
        decoder_step(self.backbone, seq, 0, caches, upto=self.retrieval_layer + 1)
        c = seq.size(1) - segments.size(1)
        return caches[-1].k[:, :, c:], caches[-1].v[:, :, c:]


def check_backbone_context(cfg: LongMemConfig, decoder) -> None:
    """--backbone-context: not negative, and, for a backbone with learned position
    embeddings, the context and a segment within its positions."""
    c = int(safe_getattr(cfg, "backbone_context", 0) or 0)
    if c < 0:
        raise BackboneError(f"--backbone-context must be >= 0 (tokens), got {c}")
    tps = safe_getattr(cfg, "tokens_per_sample", None)
    limit = decoder.max_positions()
    if (c and isinstance(tps, int) and limit is not None and decoder.embed_positions is not None
            and c + tps > limit):
        raise BackboneError(
            f"--backbone-context {c} + --tokens-per-sample {tps} exceeds the backbone's "
            f"{limit} learned positions; lower --backbone-context to {max(0, limit - tps)} "
            "or --tokens-per-sample"
        )


@register_model("longmem", dataclass=LongMemConfig)
class LongMemModel(FairseqLanguageModel):
    """LongMem (Wang et al. 2023) over a frozen fairseq LM."""

    accepts_stream_inputs = True  # reads doc_start / memory_key of stream batches

    @classmethod
    def build_model(cls, cfg: LongMemConfig, task):
        backbone = backbone_of(cfg, task)
        decoder = LongMemDecoder(cfg, task.target_dictionary, backbone.decoder)
        n_side = sum(p.numel() for p in decoder.side.parameters())
        logger.info(
            "LongMem: %d side layers over %d frozen backbone layers, memory %s "
            "(layer %d, %d tokens, chunk %d, k %d, backend %s), backbone context %d, "
            "%.2fM trainable parameters",
            len(decoder.side.layers), len(backbone.decoder.layers),
            "ON" if cfg.use_external_memory else "OFF (pass --use-external-memory)",
            cfg.retrieval_layer_index, cfg.memory_size, cfg.chunk_size, cfg.k,
            cfg.memory_backend, decoder.context_length(), n_side / 1e6,
        )
        return cls(decoder)


# longmem_tiny (tests), longmem_small (CPU quickstart), longmem_gpt2_medium (the
# paper: 12 side layers d=1024, 16 heads over a 24 x 1024 backbone)
register_presets("longmem", layer_reduction_factor=2)
