"""What LongMem and MemTRM share: the config, the backbone, and the memory protocol.

Per segment (:meth:`MemoryDecoder.forward`), for every batch row:

1. boundaries: where the row's current document started (:func:`segment_boundaries`);
2. read: the memory layer retrieves from what *earlier* segments wrote
   (:class:`~..modules.memory_reader.JointMemoryReader`); queries before the
   row's first document start may read, later ones may not;
3. write: the row is reset if a document started, and the segment's
   memory-layer keys/values from that start on are appended (:func:`write_segment`);
4. stats and retrieval records are returned with the output;
5. memory path: the first segment of a pass may start from a saved memory of
   another split (``--memory-from``), the last one saves the split's memory
   (``--memory-path``).

A subclass says only what differs: which keys/values fill memory
(:meth:`MemoryDecoder.extract`), their layout (:meth:`MemoryDecoder.memory_layout`)
and whether a memory can be rebuilt after a resume (:meth:`MemoryDecoder.replay_keys`).
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, register_model_architecture
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor

from ..errors import MemoryConfigError
from ..modules.incremental import SegmentCache, SegmentDecoding
from ..modules.memory_bank import MemoryBank
from ..modules.memory_factory import build_memory
from ..modules.memory_io import load_memory, save_memory
from ..modules.memory_reader import JointMemoryReader
from ..modules.memory_spec import MEMORY_BACKENDS, MemorySpec, compute_dtype
from .backbone import BackboneError, build_backbone, dumps_config, load_backbone, loads_config

logger = logging.getLogger(__name__)


@dataclass
class MemoryLMConfig(FairseqDataclass):
    """Flags shared by LongMem and MemTRM (same names, same meaning)."""

    pretrained_model_path: str = field(
        default="",
        metadata={"help": "the backbone: a fairseq alibi_lm or transformer_lm checkpoint "
                  "(LongMem keeps it frozen; MemTRM starts from it and trains all of it)"},
    )
    use_external_memory: bool = field(
        default=False,
        metadata={"help": "read and write the memory bank (without it: the no-memory ablation)"},
    )
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
                  "support, else an error); the torch backend always searches on the "
                  "model's device"},
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
    memory_ivf_niter: int = field(
        default=10, metadata={"help": "faiss-ivf: k-means iterations of the quantizer"}
    )
    memory_hnsw_m: int = field(default=32, metadata={"help": "faiss-hnsw: graph degree"})
    memory_hnsw_ef_search: int = field(
        default=32, metadata={"help": "faiss-hnsw: candidates kept while searching"}
    )
    memory_hnsw_ef_construction: int = field(
        default=40, metadata={"help": "faiss-hnsw: candidates kept while inserting"}
    )
    memory_hnsw_blocks: int = field(
        default=8, metadata={"help": "faiss-hnsw: sub-indexes per ring (eviction granularity)"}
    )
    memory_gate_init: float = field(
        default=0.0, metadata={"help": "initial gate logit g; sigmoid(g) is memory's share"}
    )
    memory_path: Optional[str] = field(
        default=None,
        metadata={"help": "a directory: after the last segment of a pass over split S, "
                  "this process's memory is saved there as S.rank<R>.pt (versioned; "
                  "records the model, split, rank and world size)"},
    )
    memory_from: Optional[str] = field(
        default=None,
        metadata={"help": "with --memory-path: each pass over another split starts every "
                  "stream from the saved memory of this split (same rank and world size); "
                  "a pass over this split itself starts empty and saves it (it never reads "
                  "its own future)"},
    )
    side_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "dropout of the trained layers (default: the backbone's)"},
    )
    decoder_embed_dim: Optional[int] = field(
        default=None, metadata={"help": "expected width of the backbone (arch presets set it)"}
    )
    decoder_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "expected heads of the backbone (arch presets set it)"}
    )
    backbone_config: str = field(
        default="",
        metadata={"help": "filled automatically: the backbone's model config (JSON), so a "
                  "checkpoint (which embeds the backbone's weights) rebuilds without the file"},
    )
    tokens_per_sample: int = II("task.tokens_per_sample")


# ------------------------------------------------------------------ protocol
class SegmentPlan(NamedTuple):
    """Where each row's memory scope lies in one segment (see :func:`segment_boundaries`)."""

    query_mask: Tensor  # (bsz, tgt_len) bool: may read memory
    reset_rows: Tensor  # (bsz,) bool: a document starts in the segment
    write_start: Tensor  # (bsz,) long: first token to write (the last document start)
    write_end: Tensor  # (bsz,) long: one past the last real token


def segment_boundaries(doc_start: Optional[Tensor], tokens: Tensor, pad: int) -> SegmentPlan:
    """The memory protocol of one segment, per row.

    doc_start ``(bsz, tgt_len)`` bool marks where a document (memory scope)
    begins. Queries before a row's first start may read its memory (the same
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
        return SegmentPlan(query_mask, torch.zeros(bsz, dtype=torch.bool, device=device), z,
                           write_end)
    ds = doc_start.to(device=device, dtype=torch.bool)
    pos = torch.arange(tgt_len, device=device)[None, :].expand(bsz, tgt_len)
    first = torch.where(ds, pos, torch.full_like(pos, tgt_len)).min(1).values
    last = torch.where(ds, pos, torch.zeros_like(pos)).max(1).values
    return SegmentPlan(pos < first[:, None], ds.any(1), last, write_end)


def write_segment(bank: MemoryBank, plan: SegmentPlan, keys: Tensor, values: Tensor) -> None:
    """Reset the rows whose document started and append their tokens
    ``[write_start, write_end)``; keys, values ``(bsz, heads, tgt_len, head_dim)``."""
    bank.reset(plan.reset_rows)
    bank.write(keys, values, start=plan.write_start, end=plan.write_end)


def replay_segments_needed(memory_size: int, tokens_per_sample: int) -> int:
    """Segments to replay so that every chunk still retrievable was replayed whole:
    at least ``memory_size`` tokens, plus the current segment's own."""
    return -(-memory_size // tokens_per_sample) + 1


def process_rank() -> Tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------- checks
def check_backbone_fit(cfg: MemoryLMConfig, decoder, network: str) -> None:
    """The memory layer, the width and heads an arch preset expects, the memory
    knobs and the segment length, against the backbone ``decoder``."""
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
    if safe_getattr(cfg, "memory_from", None) and not safe_getattr(cfg, "memory_path", None):
        raise MemoryConfigError(
            f"--memory-from {cfg.memory_from} needs --memory-path (the directory the saved "
            "memories are in)"
        )
    limit = decoder.max_positions()
    tps = safe_getattr(cfg, "tokens_per_sample", None)
    if isinstance(tps, int) and limit is not None and tps > limit:
        raise BackboneError(
            f"--tokens-per-sample {tps} exceeds the backbone's {limit} positions; lower "
            f"--tokens-per-sample to {limit} or pretrain the backbone on longer windows"
        )


def backbone_of(cfg: MemoryLMConfig, task):
    """The backbone model: from ``cfg.backbone_config`` when rebuilding a checkpoint
    (its weights come with the checkpoint), else loaded from ``--pretrained-model-path``
    (and its config recorded in ``cfg.backbone_config``)."""
    if cfg.backbone_config:
        return build_backbone(loads_config(cfg.backbone_config), task)
    backbone, backbone_cfg = load_backbone(cfg.pretrained_model_path, task)
    cfg.backbone_config = dumps_config(backbone_cfg)
    logger.info("backbone loaded from %s", cfg.pretrained_model_path)
    return backbone


# arch presets of both memory models: backbone width/heads and memory knobs
PRESETS = {
    # tests: over alibi_lm_tiny (4 layers, d=64)
    "tiny": dict(decoder_embed_dim=64, memory_size=256, chunk_size=4, k=16,
                 retrieval_layer_index=3),
    # the CPU quickstart: over alibi_lm_small (4 layers, d=256)
    "small": dict(decoder_embed_dim=256, memory_size=8192, chunk_size=4, k=32,
                  retrieval_layer_index=3),
    # the paper: a 24 x 1024 backbone with 16 heads, memory in layer 17
    "gpt2_medium": dict(decoder_embed_dim=1024, decoder_attention_heads=16, memory_size=65536,
                        chunk_size=4, k=64, retrieval_layer_index=17),
}


def register_presets(model_name: str, **extra) -> None:
    """Register ``<model_name>_{tiny,small,gpt2_medium}`` with :data:`PRESETS`'
    defaults plus ``extra`` (e.g. LongMem's ``layer_reduction_factor=2``); a flag
    given on the command line wins over the preset."""
    for size, values in PRESETS.items():
        defaults = dict(values, **extra)

        def preset(args, defaults=defaults):
            for name, value in defaults.items():
                setattr(args, name, safe_getattr(args, name, value))

        register_model_architecture(model_name, f"{model_name}_{size}")(preset)


# ------------------------------------------------------------------- decoder
class MemoryDecoder(SegmentDecoding, FairseqIncrementalDecoder):
    """A decoder with one memory bank per ``memory_key`` (data split), one ring per row.

    Subclasses set ``self.memory_gate`` (``(heads,)`` logits) and implement
    :meth:`extract`, :meth:`memory_layout` and :meth:`output_layer`; for
    generation (fairseq's ``incremental_state``, :mod:`..modules.incremental`)
    also :meth:`segment_stacks`, :meth:`segment_step`, :meth:`segment_memory_kv`
    and :meth:`context_kv`.
    """

    def __init__(self, cfg: MemoryLMConfig, dictionary):
        super().__init__(dictionary)
        self.cfg = cfg
        self.spec = MemorySpec.from_config(cfg)
        self.retrieval_layer = cfg.retrieval_layer_index
        self.memories: Dict[str, MemoryBank] = {}
        self.contexts: Dict[str, Tensor] = {}  # per memory_key: (bsz, C) last tokens fed

    # ---------------------------------------------------------- subclass API
    def extract(
        self, tokens: Tensor, reader: Optional[JointMemoryReader],
        context: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]], list]:
        """Features ``(bsz, tgt_len, dim)``, the memory layer's keys/values
        ``(bsz, heads, tgt_len, head_dim)`` each (None without memory) and the
        inner states; the memory layer calls ``reader`` when it is given.
        context ``(bsz, C)``: the stream's tokens before ``tokens``, read as
        context only (:meth:`context_length` > 0; None at a stream's start)."""
        raise NotImplementedError

    def context_length(self) -> int:
        """Tokens before each segment that :meth:`extract` reads as context (0: none)."""
        return 0

    def memory_layout(self) -> Tuple[int, int, torch.dtype, float]:
        """``(heads, head_dim, dtype, attention dropout)`` of the memory layer."""
        raise NotImplementedError

    def replay_keys(self, tokens: Tensor,
                    context: Optional[Tensor] = None) -> Optional[Tuple[Tensor, Tensor]]:
        """The keys/values a past segment ``(bsz, tgt_len)`` wrote (read after
        ``context``, as :meth:`extract` read it), recomputed now; None where they
        cannot be (the writer has changed since)."""
        return None

    # ------------------------------------------------------- stream context
    def stream_context(self, memory_key: str, tokens: Tensor, doc_start: Optional[Tensor],
                       first_segment: bool,
                       rows_restart: Optional[bool] = None) -> Optional[Tensor]:
        """The context ``(bsz, C)`` the segment ``tokens`` is read after: the last
        :meth:`context_length` tokens this stream fed before it. None at the first
        segment of a pass, after a reset, when the batch size changed, or when
        every row starts a document at the segment's first token (the stream task's
        first batch; then, as at a stream's start, each row is read alone).
        rows_restart: that last condition, known on the host (the stream task's
        collater says it, so that a training step needs no device sync); None:
        read from ``doc_start``."""
        if self.context_length() == 0 or first_segment:
            return None
        ctx = self.contexts.get(memory_key)
        if ctx is None or ctx.size(0) != tokens.size(0) or ctx.device != tokens.device:
            return None
        if rows_restart is None:
            rows_restart = doc_start is not None and bool(doc_start[:, 0].all())
        return None if rows_restart else ctx

    def remember_context(self, memory_key: str, context: Optional[Tensor],
                         tokens: Tensor) -> None:
        """Keep the last :meth:`context_length` tokens of ``[context, tokens]`` (all
        of them while the stream is shorter) for the next segment of
        ``memory_key``; rows ended by padding have no next segment to read them."""
        n = self.context_length()
        if n == 0:
            return
        seen = tokens if context is None else torch.cat([context, tokens], 1)
        self.contexts[memory_key] = seen[:, -n:].detach()

    # -------------------------------------------------------------- forward
    def forward(
        self,
        prev_output_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        doc_start: Optional[Tensor] = None,
        memory_key: str = "default",
        features_only: bool = False,
        first_segment: bool = False,
        last_segment: bool = False,
        rows_restart: Optional[bool] = None,
        incremental_state: Optional[dict] = None,
        **unused,
    ):
        """prev_output_tokens ``(bsz, tgt_len)``; doc_start ``(bsz, tgt_len)`` bool:
        True where a new document (memory scope) begins; first/last_segment: the
        segment opens/closes a pass over the split ``memory_key``.

        Returns ``(logits, extra)``; extra holds ``inner_states``,
        ``memory_stats`` (fill, read fraction, gate) and, with memory,
        ``retrieval`` (:class:`~fairseq_longmem.modules.memory_bank.Selection`,
        the chunks each query read) and ``written`` (the keys/values written).

        With ``incremental_state`` (fairseq's generators): the tokens not yet
        decoded are run under segment semantics (:mod:`..modules.incremental`);
        the memory then lives in the incremental state, not in :attr:`memories`.
        """
        tokens = prev_output_tokens
        if incremental_state is not None:
            x = self.incremental_features(tokens, incremental_state, doc_start)
            extra = {"attn": [None], "inner_states": None, "memory_stats": {}}
            return (x, extra) if features_only else (self.output_layer(x), extra)
        context = self.stream_context(memory_key, tokens, doc_start, first_segment, rows_restart)
        if not self.cfg.use_external_memory:
            x, _, hiddens = self.extract(tokens, None, context=context)
            self.remember_context(memory_key, context, tokens)
            extra = {"inner_states": hiddens, "memory_stats": {}}
            return (x, extra) if features_only else (self.output_layer(x), extra)
        bank = self.memory_bank(memory_key, tokens)
        memory_path = safe_getattr(self.cfg, "memory_path", None)  # absent in old checkpoints
        loaded = first_segment and memory_path and safe_getattr(self.cfg, "memory_from", None)
        if loaded and self.cfg.memory_from != memory_key:
            bank = self.load_saved_memory(memory_key, bank)
            if doc_start is not None:  # the loaded memory precedes the stream: keep it
                doc_start = doc_start.clone()
                doc_start[:, 0] = False
        plan = segment_boundaries(doc_start, tokens, self.dictionary.pad())
        reader = JointMemoryReader(bank, plan.query_mask, self.memory_gate, self.spec.k,
                                   self.memory_layout()[3], self.training)
        x, (mem_k, mem_v), hiddens = self.extract(tokens, reader, context=context)
        self.remember_context(memory_key, context, tokens)
        mem_k, mem_v = mem_k.detach(), mem_v.detach()
        with torch.no_grad():
            write_segment(bank, plan, mem_k, mem_v)
        stats = dict(reader.stats, memory_fill=bank.fill().float().mean())
        if last_segment and memory_path:
            self.save_memory(memory_key)
        extra = {"inner_states": hiddens, "memory_stats": stats,
                 "retrieval": reader.retrieved, "written": (mem_k, mem_v)}
        return (x, extra) if features_only else (self.output_layer(x), extra)

    # ----------------------------------------------------------- generation
    def segment_length(self) -> int:
        tps = safe_getattr(self.cfg, "tokens_per_sample", None)
        return int(tps) if isinstance(tps, int) else int(self.max_positions())

    def new_generation_memory(self, bsz: int, device) -> Optional[MemoryBank]:
        return self.new_memory(bsz, device) if self.cfg.use_external_memory else None

    def generation_reader(self, state: SegmentCache,
                          query_mask: Optional[Tensor]) -> Optional[JointMemoryReader]:
        """The memory layer's reader for a piece decoded incrementally (None without memory)."""
        if state.bank is None:
            return None
        return JointMemoryReader(state.bank, query_mask, self.memory_gate, self.spec.k,
                                 self.memory_layout()[3], self.training)

    # ------------------------------------------------------------- memories
    def reset_memory(self, memory_key: Optional[str] = None) -> None:
        """Forget every memory (or the one of ``memory_key``)."""
        if memory_key is None:
            self.memories.clear()
            self.contexts.clear()
        else:
            self.memories.pop(memory_key, None)
            self.contexts.pop(memory_key, None)

    def new_memory(self, bsz: int, device) -> MemoryBank:
        heads, head_dim, dtype, _ = self.memory_layout()
        return build_memory(self.spec, bsz, heads, head_dim,
                            self.spec.storage_dtype(compute_dtype(dtype, device)),
                            self.spec.storage_device(device))

    def memory_bank(self, memory_key: str, tokens: Tensor) -> MemoryBank:
        """The bank of ``memory_key``, made on first use (and anew if the batch size changed)."""
        bsz = tokens.size(0)
        bank = self.memories.get(memory_key)
        if bank is not None and bank.num_streams != bsz:
            logger.warning(
                "memory %r held %d streams and now gets a batch of %d rows: starting it empty",
                memory_key, bank.num_streams, bsz,
            )
            bank = None
        if bank is None:
            bank = self.memories[memory_key] = self.new_memory(bsz, tokens.device)
        return bank

    @torch.no_grad()
    def rebuild_memory(self, memory_key: str, tokens: Tensor, doc_start: Tensor,
                       offset: Tensor) -> bool:
        """Rebuild a memory from the segments that preceded this one (after a resume).

        tokens, doc_start: ``(n_segments, bsz, tgt_len)``; offset ``(bsz,)``: tokens
        of each row's current document read before ``tokens[0]`` (so that chunk
        boundaries fall where they fell in the uninterrupted run). With at least
        :func:`replay_segments_needed` segments, every chunk still retrievable is
        rebuilt from its own tokens; exact for the torch and faiss-flat backends.
        Returns False (memory left empty) when the model cannot recompute its keys.
        """
        self.reset_memory(memory_key)
        if tokens.size(0) == 0:
            return False
        contexts = []  # the context each replayed segment was read after (none for the first)
        restarts = doc_start[:, :, 0].all(1).tolist() if self.context_length() else []
        for i, (seg, starts) in enumerate(zip(tokens, doc_start)):
            ctx = self.stream_context(memory_key, seg, starts, first_segment=(i == 0),
                                      rows_restart=restarts[i] if restarts else None)
            contexts.append(ctx)
            self.remember_context(memory_key, ctx, seg)
        if not self.cfg.use_external_memory:
            return False
        if self.replay_keys(tokens[0]) is None:
            return False
        bank = self.memories[memory_key] = self.new_memory(tokens.size(1), tokens.device)
        bank.skip(offset.to(bank.device))
        for seg, starts, ctx in zip(tokens, doc_start, contexts):
            k, v = self.replay_keys(seg, ctx)
            write_segment(bank, segment_boundaries(starts, seg, self.dictionary.pad()), k, v)
        return True

    def replay_segments(self, tokens_per_sample: int) -> int:
        """Segments to replay on resume (0: nothing to rebuild). With a stream
        context, enough more that the oldest replayed segment (read without its
        own context) is evicted, and its last tokens become the next context."""
        ctx = -(-self.context_length() // tokens_per_sample)
        if not self.cfg.use_external_memory:
            return ctx
        return replay_segments_needed(self.spec.memory_size, tokens_per_sample) + ctx

    # -------------------------------------------------------- saved memories
    def memory_identity(self, memory_key: str, bank: Optional[MemoryBank] = None) -> dict:
        """What a saved memory records about its origin (model, split, rank); with
        ``bank``, also the layout it must have to be reused."""
        rank, world = process_rank()
        meta = {
            "model": type(self).__name__,
            "retrieval_layer_index": self.retrieval_layer,
            "backbone_sha1": hashlib.sha1(self.cfg.backbone_config.encode()).hexdigest(),
            "split": memory_key,
            "rank": rank,
            "world_size": world,
        }
        if bank is not None:
            meta.update(num_streams=bank.num_streams, num_heads=bank.num_heads,
                        head_dim=bank.head_dim, memory_size=bank.memory_size,
                        chunk_size=bank.chunk_size)
        return meta

    def saved_memory_file(self, split: str) -> str:
        rank, _ = process_rank()
        return os.path.join(self.cfg.memory_path, f"{split}.rank{rank}.pt")

    def save_memory(self, memory_key: str) -> str:
        """Write the memory of ``memory_key`` to ``--memory-path`` (atomic, versioned)."""
        path = self.saved_memory_file(memory_key)
        save_memory(self.memories[memory_key], path, self.memory_identity(memory_key))
        logger.info("memory %r saved to %s", memory_key, path)
        return path

    def load_saved_memory(self, memory_key: str, bank: MemoryBank) -> MemoryBank:
        """``--memory-from``: replace the fresh bank of ``memory_key`` by the saved
        memory of the source split (never called for a pass over the source split
        itself: that memory holds the text the pass is about to predict)."""
        source = self.cfg.memory_from
        path = self.saved_memory_file(source)
        if not os.path.exists(path):
            raise MemoryConfigError(
                f"--memory-from {source}: no saved memory at {path}; run a pass over split "
                f"{source!r} with --memory-path {self.cfg.memory_path} first (same number of "
                "processes)"
            )
        expected = self.memory_identity(source, bank)
        loaded = load_memory(path, expected=expected, device=bank.device, spec=self.spec)
        self.memories[memory_key] = loaded
        logger.info("memory %r starts from %s", memory_key, path)
        return loaded
