"""The LongMem language model: frozen backbone + residual side network + memory.

Order of operations per segment (DESIGN.md 1.6): backbone forward (no grad)
-> side forward, whose memory-augmented layer retrieves from what *earlier*
segments wrote -> logits (loss outside) -> append this segment's layer-m
keys/values to each row's memory.
"""


import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor

from ..modules.decoder_layer import decoder_attn_bias, decoder_forward
from ..modules.memory_bank import check_memory_config
from ..modules.memory_factory import MEMORY_BACKENDS
from ..modules.memory_reader import MemoryOwner, joint_memory_reader
from ..modules.side_network import SideNetwork
from .backbone import (
    BackboneError,
    build_backbone,
    dumps_config,
    load_backbone,
    loads_config,
)

logger = logging.getLogger(__name__)


@dataclass
class MemoryKnobs(FairseqDataclass):
    """Memory flags shared by LongMem and MemTRM (same names, same meaning)."""

    retrieval_layer_index: int = field(
        default=17,
        metadata={"help": "0-based backbone layer whose keys/values fill memory (LongMem: "
                  "side layer index // r reads it; MemTRM: that layer writes and reads)"},
    )
    memory_size: int = field(default=65536, metadata={"help": "tokens kept per stream (FIFO)"})
    chunk_size: int = field(default=4, metadata={"help": "tokens per memory chunk"})
    k: int = field(default=64, metadata={"help": "retrieved tokens per query and head"})
    use_gpu_to_search: bool = field(
        default=False,
        metadata={"help": "faiss backends: search on the GPU (needs a faiss build with GPU "
                  "support); the torch backend always searches on the model's device"},
    )
    memory_backend: ChoiceEnum(MEMORY_BACKENDS) = field(  # type: ignore
        default="torch", metadata={"help": "retrieval backend"}
    )
    memory_on_cpu: bool = field(
        default=False,
        metadata={"help": "keep keys/values in host memory (model on GPU); only retrieved "
                  "pairs move to the device"},
    )
    memory_dtype: ChoiceEnum(["auto", "fp32", "fp16", "bf16"]) = field(  # type: ignore
        default="auto", metadata={"help": "storage dtype of the memory (auto: the model's)"}
    )
    memory_ivf_nlist: int = field(default=1024, metadata={"help": "faiss-ivf: inverted lists"})
    memory_ivf_nprobe: int = field(default=32, metadata={"help": "faiss-ivf: lists probed"})
    memory_hnsw_m: int = field(default=32, metadata={"help": "faiss-hnsw: graph degree"})
    memory_gate_init: float = field(
        default=0.0, metadata={"help": "initial gate logit g; sigmoid(g) is memory's share"}
    )


@dataclass
class LongMemConfig(MemoryKnobs):
    pretrained_model_path: str = field(
        default="", metadata={"help": "frozen backbone: a fairseq alibi_lm or transformer_lm checkpoint"}
    )
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
    use_external_memory: bool = field(
        default=False,
        metadata={"help": "read and write the memory bank (without it: the no-memory ablation)"},
    )
    memory_path: Optional[str] = field(
        default=None,
        metadata={"help": "a saved memory: if the file exists, each stream starts from it "
                  "(its first segment does not reset it); after the last segment of a pass "
                  "the memory is saved there (versioned; checked against this model)"},
    )
    side_dropout: Optional[float] = field(
        default=None, metadata={"help": "dropout of the side layers (default: the backbone's)"}
    )
    decoder_embed_dim: Optional[int] = field(
        default=None, metadata={"help": "expected width of the side network (= backbone's)"}
    )
    decoder_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "expected heads of the side network (= backbone's)"}
    )
    backbone_config: str = field(
        default="",
        metadata={"help": "filled automatically: the backbone's model config (JSON), so a "
                  "checkpoint (which embeds the backbone's weights) rebuilds without the file"},
    )
    tokens_per_sample: int = II("task.tokens_per_sample")


def check_config(cfg: LongMemConfig, backbone_decoder) -> None:
    """Every check that needs the backbone; clear message, before training starts."""
    layers = len(backbone_decoder.layers)
    r = cfg.layer_reduction_factor
    if r < 1 or layers % r != 0:
        raise BackboneError(
            f"--layer-reduction-factor {r} does not divide the backbone's {layers} layers; "
            f"use a divisor of {layers} (the paper uses 2)"
        )
    check_backbone_fit(cfg, backbone_decoder, "side network")


def check_backbone_fit(cfg, decoder, network: str) -> None:
    """Checks shared by LongMem and MemTRM: the memory layer, the width and heads an
    arch preset expects, the memory knobs and the segment length, against ``decoder``."""
    layers = len(decoder.layers)
    dim = decoder.embed_dim
    heads = decoder.layers[0].self_attn.num_heads
    if not 0 <= cfg.retrieval_layer_index < layers:
        raise BackboneError(
            f"--retrieval-layer-index {cfg.retrieval_layer_index} is outside the backbone "
            f"(layers 0..{layers - 1}); pick one in range (the paper: 17 of 24)"
        )
    if cfg.decoder_embed_dim is not None and cfg.decoder_embed_dim != dim:
        raise BackboneError(
            f"{network} width {cfg.decoder_embed_dim} differs from the backbone's {dim}: "
            f"its layers are copies of backbone layers; use an --arch preset for a d={dim} "
            f"backbone or --decoder-embed-dim {dim}"
        )
    if cfg.decoder_attention_heads is not None and cfg.decoder_attention_heads != heads:
        raise BackboneError(
            f"{network} heads {cfg.decoder_attention_heads} differ from the backbone's "
            f"{heads}; use --decoder-attention-heads {heads}"
        )
    check_memory_config(cfg.memory_size, cfg.chunk_size, cfg.k)
    limit = decoder.max_positions()
    tps = safe_getattr(cfg, "tokens_per_sample", None)
    if isinstance(tps, int) and limit is not None and tps > limit:
        raise BackboneError(
            f"--tokens-per-sample {tps} exceeds the backbone's {limit} positions; lower "
            f"--tokens-per-sample to {limit} or pretrain the backbone on longer windows"
        )


class LongMemDecoder(MemoryOwner, FairseqDecoder):
    """Backbone + side network + one memory bank per batch row, per data split."""

    def __init__(self, cfg: LongMemConfig, dictionary, backbone_decoder):
        super().__init__(dictionary)
        check_config(cfg, backbone_decoder)
        self.cfg = cfg
        self.backbone = backbone_decoder
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.retrieval_layer = cfg.retrieval_layer_index
        self.side = SideNetwork(
            backbone_decoder,
            reduction=cfg.layer_reduction_factor,
            memory_layer=cfg.retrieval_layer_index // cfg.layer_reduction_factor,
            reload_ptm_layer=cfg.reload_ptm_layer,
            gate_init=cfg.memory_gate_init,
            tune_lm_head=cfg.tune_lm_head,
            dropout=cfg.side_dropout,
        )
        # an unused gate would stall DDP (no gradient): train it only when memory is on
        self.side.memory_gate.requires_grad_(bool(cfg.use_external_memory))
        self.init_memory_state()

    # -------------------------------------------------------------- plumbing
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
        if self.side.output_projection is not None:
            return self.side.output_projection(features)
        return self.backbone.output_layer(features)

    # --------------------------------------------------------------- forward
    def forward(
        self,
        prev_output_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        doc_start: Optional[Tensor] = None,
        memory_key: str = "default",
        features_only: bool = False,
        replay_tokens: Optional[Tensor] = None,
        replay_doc_start: Optional[Tensor] = None,
        last_segment: bool = False,
        **unused,
    ):
        """prev_output_tokens ``(bsz, tgt_len)``; doc_start ``(bsz, tgt_len)`` bool:
        True where a new document (memory scope) begins. Returns ``(logits, extra)``."""
        tokens = prev_output_tokens
        bsz, tgt_len = tokens.shape
        if replay_tokens is not None and self.cfg.use_external_memory:
            self.replay(replay_tokens, replay_doc_start, memory_key)
        with torch.no_grad():
            hiddens, _, kv = decoder_forward(self.backbone, tokens, kv_layer=self.retrieval_layer)
        bias = decoder_attn_bias(self.backbone, tgt_len, tokens.device)
        reader = None
        bank = None
        if self.cfg.use_external_memory:
            mem_k, mem_v = kv
            bank = self.get_memory(
                memory_key, bsz, mem_k.size(1), mem_k.size(3), tokens.device, mem_k.dtype
            )
            memory_path = safe_getattr(self.cfg, "memory_path", None)  # absent in older checkpoints
            if memory_path and memory_key not in self.memories_seen:
                bank = self.load_saved_memory(memory_key, bank)
                if doc_start is not None:  # a loaded memory precedes the stream: keep it
                    doc_start = doc_start.clone()
                    doc_start[:, 0] = False
            self.memories_seen.add(memory_key)
            query_mask, reset_rows, write_start, write_end = segment_boundaries(
                doc_start, tokens, self.dictionary.pad()
            )
            reader = self._memory_reader(bank, query_mask)
        x = self.side(hiddens, bias, memory_reader=reader)
        if bank is not None:
            with torch.no_grad():
                bank.reset(reset_rows)
                bank.write(mem_k, mem_v, start=write_start, end=write_end)
                self.last_stats["memory_fill"] = bank.fill().float().mean()
            if last_segment and memory_path:
                self.save_memory(memory_key, memory_path)
                self.memories_seen.discard(memory_key)
        extra = {"inner_states": hiddens, "memory_stats": dict(self.last_stats)}
        if features_only:
            return x, extra
        return self.output_layer(x), extra

    def memory_identity(self, bank=None) -> dict:
        """What a saved memory records about its model (``meta``); with ``bank``,
        also the memory layout it must have to be reused (``expected``)."""
        import hashlib

        meta = {
            "retrieval_layer_index": self.retrieval_layer,
            "backbone_sha1": hashlib.sha1(self.cfg.backbone_config.encode()).hexdigest(),
        }
        if bank is not None:
            meta.update(num_streams=bank.num_streams, num_heads=bank.num_heads,
                        head_dim=bank.head_dim, memory_size=bank.memory_size,
                        chunk_size=bank.chunk_size)
        return meta

    def load_saved_memory(self, memory_key: str, bank):
        """``--memory-path``: replace a fresh bank by the saved one, if the file exists."""
        import os

        from ..modules.memory_io import load_memory

        if not os.path.exists(self.cfg.memory_path):
            logger.info("--memory-path %s does not exist yet: starting empty", self.cfg.memory_path)
            return bank
        loaded = load_memory(self.cfg.memory_path, expected=self.memory_identity(bank),
                             device=bank.device, cfg=self.cfg)
        self.memories[memory_key] = loaded
        logger.info("memory %r loaded from %s", memory_key, self.cfg.memory_path)
        return loaded

    def save_memory(self, memory_key: str, path: str) -> None:
        """Write the memory of ``memory_key`` to ``path`` (atomic, versioned)."""
        from ..modules.memory_io import save_memory

        bank = self.memories[memory_key]
        save_memory(bank, path, self.memory_identity())
        logger.info("memory %r saved to %s", memory_key, path)

    @torch.no_grad()
    def replay(self, tokens: Tensor, doc_start: Tensor, memory_key: str) -> None:
        """Rebuild a memory from the segments that preceded this one (after a resume).

        tokens, doc_start: ``(n_segments, bsz, tgt_len)``. The memory holds only the
        frozen backbone's keys/values, so replaying the last ``memory_size`` tokens
        rebuilds it exactly; the side network is not run.
        """
        self.reset_memory(memory_key)
        for seg, starts in zip(tokens, doc_start):
            _, _, (k, v) = decoder_forward(self.backbone, seg, kv_layer=self.retrieval_layer)
            bank = self.get_memory(memory_key, seg.size(0), k.size(1), k.size(3), seg.device, k.dtype)
            _, reset_rows, start, end = segment_boundaries(starts, seg, self.dictionary.pad())
            bank.reset(reset_rows)
            bank.write(k, v, start=start, end=end)

    def replay_segments(self, tokens_per_sample: int) -> int:
        """Segments to replay on resume so that the memory is rebuilt exactly."""
        if not self.cfg.use_external_memory:
            return 0
        return -(-self.cfg.memory_size // tokens_per_sample) + 1

    def _memory_reader(self, bank, query_mask: Tensor):
        layer = self.side.layers[self.side.memory_layer]
        return joint_memory_reader(
            self, lambda q: bank, query_mask, self.side.memory_gate, self.cfg.k,
            layer.self_attn.dropout_module.p,
        )


def segment_boundaries(doc_start: Optional[Tensor], tokens: Tensor, pad: int):
    """The memory protocol of one segment, per row (all ``(bsz,)`` or ``(bsz, tgt_len)``).

    doc_start ``(bsz, tgt_len)`` bool marks where a document (memory scope)
    begins. Returns ``(query_mask, reset_rows, write_start, write_end)``:
    queries before a row's first start may read its memory (the same
    document); the row is reset after the forward pass if it has a start, and
    only its tokens ``[last start, last non-pad)`` are written, so the memory
    then holds exactly the current document's past. Padding is at the tail.
    """
    bsz, tgt_len = tokens.shape
    device = tokens.device
    write_end = tokens.ne(pad).sum(1)
    if doc_start is None:
        z = torch.zeros(bsz, dtype=torch.long, device=device)
        query_mask = torch.ones(bsz, tgt_len, dtype=torch.bool, device=device)
        return query_mask, torch.zeros(bsz, dtype=torch.bool, device=device), z, write_end
    ds = doc_start.to(device=device, dtype=torch.bool)
    pos = torch.arange(tgt_len, device=device)[None, :].expand(bsz, tgt_len)
    first = torch.where(ds, pos, torch.full_like(pos, tgt_len)).min(1).values
    last = torch.where(ds, pos, torch.zeros_like(pos)).max(1).values
    query_mask = pos < first[:, None]
    return query_mask, ds.any(1), last, write_end


@register_model("longmem", dataclass=LongMemConfig)
class LongMemModel(FairseqLanguageModel):
    """LongMem (Wang et al. 2023) over a frozen fairseq LM."""

    accepts_stream_inputs = True  # reads doc_start / memory_key of stream batches

    def replay_segments(self, tokens_per_sample: int) -> int:
        return self.decoder.replay_segments(tokens_per_sample)

    @classmethod
    def build_model(cls, cfg: LongMemConfig, task):
        if cfg.backbone_config:
            backbone_cfg = loads_config(cfg.backbone_config)
            backbone = build_backbone(backbone_cfg, task)  # weights come from our checkpoint
        else:
            backbone, backbone_cfg = load_backbone(cfg.pretrained_model_path, task)
            cfg.backbone_config = dumps_config(backbone_cfg)
            logger.info("backbone loaded from %s", cfg.pretrained_model_path)
        decoder = LongMemDecoder(cfg, task.target_dictionary, backbone.decoder)
        n_side = sum(p.numel() for p in decoder.side.parameters())
        logger.info(
            "LongMem: %d side layers over %d frozen backbone layers, memory %s "
            "(layer %d, %d tokens, chunk %d, k %d, backend %s), %.2fM trainable parameters",
            len(decoder.side.layers), len(backbone.decoder.layers),
            "ON" if cfg.use_external_memory else "OFF (pass --use-external-memory)",
            cfg.retrieval_layer_index, cfg.memory_size, cfg.chunk_size, cfg.k,
            cfg.memory_backend, n_side / 1e6,
        )
        return cls(decoder)


def memory_preset(args, memory_size: int, chunk_size: int, k: int, layer: int, r=None):
    """Defaults of an arch preset's memory knobs (LongMem's and MemTRM's)."""
    args.memory_size = safe_getattr(args, "memory_size", memory_size)
    args.chunk_size = safe_getattr(args, "chunk_size", chunk_size)
    args.k = safe_getattr(args, "k", k)
    args.retrieval_layer_index = safe_getattr(args, "retrieval_layer_index", layer)
    if r is not None:
        args.layer_reduction_factor = safe_getattr(args, "layer_reduction_factor", r)


@register_model_architecture("longmem", "longmem_tiny")
def longmem_tiny(args):
    """Tests: over an alibi_lm_tiny backbone (4 layers, d=64): 2 side layers."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    memory_preset(args, memory_size=256, chunk_size=4, k=16, layer=3, r=2)


@register_model_architecture("longmem", "longmem_small")
def longmem_small(args):
    """CPU quickstart: over alibi_lm_small (4 layers, d=256): 2 side layers."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 256)
    memory_preset(args, memory_size=8192, chunk_size=4, k=32, layer=3, r=2)


@register_model_architecture("longmem", "longmem_gpt2_medium")
def longmem_gpt2_medium(args):
    """The paper: 12 side layers d=1024 16 heads over a 24x1024 backbone."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 1024)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 16)
    memory_preset(args, memory_size=65536, chunk_size=4, k=64, layer=17, r=2)
