"""Incremental decoding under segment semantics (what generation sees, docs/generation.md).

The history of a row (context, prompt, generated tokens) is cut into segments
of ``T`` tokens (``--tokens-per-sample``) from its first token, exactly as a
stream is cut in training and in ``fairseq-eval-lm``. A token at position
``p`` of segment ``s = p // T`` attends locally to the tokens ``s*T .. p`` and,
through memory, to what the segments ``< s`` wrote (their memory-layer
keys/values, chunked by ``--chunk-size``). So the logits of every step equal
those of the training forward of the same history, segment by segment.

:class:`SegmentCache` holds, per attention layer, the keys/values of the
current segment (at most ``T``), the memory bank and the position in the
segment; :func:`run_segments` feeds new tokens through a model's step
function, flushing a finished segment into memory before the next one starts.
The per-layer helpers (:func:`piece_bias`, :func:`embed_piece`,
:func:`decoder_step`) run a fairseq decoder over a piece of a segment with
those caches.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .decoder_layer import embed, final_features, layer_forward
from .memory_bank import MemoryBank


class LayerCache:
    """Keys/values ``(bsz, heads, T, head_dim)`` of one attention layer for the current
    segment; positions ``[0, length)`` are filled."""

    def __init__(self, seg_len: int):
        self.seg_len = seg_len
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def extend(self, k: Tensor, v: Tensor, pos: int) -> Tuple[Tensor, Tensor]:
        """Store a piece's ``k, v`` ``(bsz, heads, n, d)`` at ``[pos, pos + n)``; returns
        the keys/values ``[0, pos + n)`` of the segment."""
        n = k.size(2)
        if self.k is None or self.k.shape[:2] != k.shape[:2] or self.k.dtype != k.dtype:
            shape = (k.size(0), k.size(1), max(self.seg_len, pos + n), k.size(3))
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        elif pos + n > self.k.size(2):  # a context before the segment: room for it too
            grow = pos + n - self.k.size(2)
            self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], grow, self.k.size(3))], 2)
            self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], grow, self.v.size(3))], 2)
        self.k[:, :, pos : pos + n] = k
        self.v[:, :, pos : pos + n] = v
        return self.k[:, :, : pos + n], self.v[:, :, : pos + n]

    def select(self, order: Tensor) -> "LayerCache":
        out = LayerCache(self.seg_len)
        if self.k is not None:
            out.k = self.k.index_select(0, order.to(self.k.device))
            out.v = self.v.index_select(0, order.to(self.v.device))
        return out


def clone_bank(bank: MemoryBank, spec, order: Optional[Tensor] = None) -> MemoryBank:
    """An independent copy of ``bank`` (rows picked by ``order``, default all)."""
    from .memory_factory import build_memory

    copy = build_memory(spec, bank.num_streams, bank.num_heads, bank.head_dim, bank.dtype,
                        bank.device)
    copy.load_state_dict(bank.state_dict())
    if order is not None:
        copy.reorder_rows(order)
    return copy


class SegmentCache:
    """Everything a row's next token depends on, under segment semantics.

    caches: per attention stack (e.g. ``backbone``, ``side``) one :class:`LayerCache`
    per layer; bank: the rows' memory (None without memory); pos: tokens of the
    current segment already cached (the same for every row); doc_seen ``(bsz,)``:
    a document started in the current segment; last_start ``(bsz,)``: where the
    last one started (memory keeps only that document's tokens); consumed:
    tokens taken from ``prev_output_tokens`` (fairseq's incremental protocol).
    """

    def __init__(self, seg_len: int, stacks: Dict[str, int], bank: Optional[MemoryBank] = None,
                 spec=None, context_size: int = 0):
        self.seg_len = seg_len
        # --backbone-context: the last context_size tokens fed (bsz, <= context_size), and
        # how many of them the current segment's caches hold before its first token
        self.context_size = context_size
        self.recent: Optional[Tensor] = None
        self.ctx_len = 0
        self.caches: Dict[str, List[LayerCache]] = {
            name: [LayerCache(seg_len) for _ in range(n)] for name, n in stacks.items()
        }
        self.bank = bank
        self.spec = spec
        self.pos = 0
        self.consumed = 0
        self.tokens_seen = 0
        self.bsz: Optional[int] = bank.num_streams if bank is not None else None
        self.doc_seen: Optional[Tensor] = None
        self.last_start: Optional[Tensor] = None

    # --------------------------------------------------------------- rows
    def _rows(self, bsz: int, device) -> None:
        if self.doc_seen is None or self.doc_seen.numel() != bsz:
            self.doc_seen = torch.zeros(bsz, dtype=torch.bool, device=device)
            self.last_start = torch.zeros(bsz, dtype=torch.long, device=device)
        self.bsz = bsz

    def select(self, order: Tensor, copy_bank: bool = False) -> "SegmentCache":
        """The state of rows ``order`` (``(new_bsz,)`` long, repeats allowed): beam
        search's reorder (in place for the bank) or a copy (``copy_bank``)."""
        out = SegmentCache.__new__(SegmentCache)
        out.__dict__.update(self.__dict__)
        out.caches = {name: [c.select(order) for c in cs] for name, cs in self.caches.items()}
        if self.doc_seen is not None:
            out.doc_seen = self.doc_seen.index_select(0, order.to(self.doc_seen.device))
            out.last_start = self.last_start.index_select(0, order.to(self.last_start.device))
        if self.recent is not None:
            out.recent = self.recent.index_select(0, order.to(self.recent.device))
        if self.bank is not None:
            if copy_bank:
                out.bank = clone_bank(self.bank, self.spec, order)
            else:
                self.bank.reorder_rows(order)
        out.bsz = int(order.numel())
        return out

    def copy(self) -> "SegmentCache":
        bsz = self.bsz or 1
        dev = self.bank.device if self.bank is not None else torch.device("cpu")
        return self.select(torch.arange(bsz, device=dev), copy_bank=True)

    def expand(self, bsz: int) -> "SegmentCache":
        """A copy for ``bsz`` rows: each row repeated ``bsz // rows`` times in place
        (the layout fairseq's generator gives beams: ``row * beam + j``)."""
        rows = self.bsz or 1
        if bsz % rows != 0:
            raise ValueError(f"cannot expand a state of {rows} rows to {bsz} rows")
        dev = self.bank.device if self.bank is not None else torch.device("cpu")
        order = torch.arange(rows, device=dev).repeat_interleave(bsz // rows)
        return self.select(order, copy_bank=True)


# a model's step: (tokens (bsz, n), state, query_mask (bsz, n) or None) -> features;
# the piece sits at segment positions [state.pos, state.pos + n)
StepFn = Callable[[Tensor, SegmentCache, Optional[Tensor]], Tensor]
# the memory layer's cached (keys, values) of the current segment, (bsz, heads, T, d) each
MemoryKV = Callable[[SegmentCache], Tuple[Tensor, Tensor]]


def flush_segment(state: SegmentCache, memory_kv: Optional[MemoryKV]) -> None:
    """End of a segment: its memory-layer keys/values ``[last document start, T)``
    go to memory (rows whose document started in it are reset first), exactly
    as :func:`~fairseq_longmem.models.memory_lm.write_segment` does in training;
    the local caches start over."""
    if state.bank is not None and memory_kv is not None and state.pos > 0:
        k, v = memory_kv(state)
        k, v = k[:, :, : state.pos], v[:, :, : state.pos]
        end = torch.full_like(state.last_start, state.pos)
        state.bank.reset(state.doc_seen)
        state.bank.write(k, v, start=state.last_start, end=end)
    state.pos = 0
    state.ctx_len = 0
    state.doc_seen.zero_()
    state.last_start.zero_()


# a model's segment start: (state, doc_start of the segment's first token (bsz,) or None)
BeginFn = Callable[[SegmentCache, Optional[Tensor]], None]


def run_segments(state: SegmentCache, tokens: Tensor, step: StepFn,
                 memory_kv: Optional[MemoryKV] = None,
                 doc_start: Optional[Tensor] = None,
                 begin: Optional[BeginFn] = None) -> Tensor:
    """Feed ``tokens`` ``(bsz, n)`` (and their ``doc_start`` flags) through ``step``
    piece by piece, never across a segment boundary; returns features ``(bsz, n, dim)``.

    A query may read memory unless a document started at or before it in its
    segment (the training protocol's ``query_mask``). ``begin`` runs before a
    segment's first token (LongMem: the backbone reads the stream context before
    it); ``state.recent`` keeps the last ``state.context_size`` tokens fed.
    """
    bsz, n = tokens.shape
    state._rows(bsz, tokens.device)
    outs = []
    a = 0
    while a < n:
        if state.pos == state.seg_len:
            flush_segment(state, memory_kv)
        if state.pos == 0 and begin is not None:
            begin(state, doc_start[:, a] if doc_start is not None else None)
        b = min(n, a + state.seg_len - state.pos)
        piece = tokens[:, a:b]
        if state.context_size:
            seen = piece if state.recent is None else torch.cat([state.recent, piece], 1)
            state.recent = seen[:, -state.context_size:]
        query_mask = None
        if state.bank is not None:
            if doc_start is not None:
                ds = doc_start[:, a:b].to(device=tokens.device, dtype=torch.bool)
                idx = torch.arange(b - a, device=tokens.device)
                last = torch.where(ds, idx, torch.full_like(idx, -1)).max(1).values
                state.last_start = torch.where(last >= 0, state.pos + last, state.last_start)
                started = state.doc_seen[:, None] | (ds.long().cumsum(1) > 0)
                state.doc_seen = state.doc_seen | ds.any(1)
            else:
                started = state.doc_seen[:, None].expand(bsz, b - a)
            query_mask = ~started
        outs.append(step(piece, state, query_mask))
        state.pos += b - a
        state.tokens_seen += b - a
        a = b
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


# ------------------------------------------------------------ decoder pieces
def piece_bias(decoder: nn.Module, pos: int, n: int, device) -> Tensor:
    """Additive attention bias ``(1, heads or 1, n, pos + n)`` of queries at segment
    positions ``[pos, pos + n)`` over keys ``[0, pos + n)``: ALiBi (for a decoder
    with ``alibi_slopes``) or plain causal."""
    q = torch.arange(pos, pos + n, device=device)
    kpos = torch.arange(pos + n, device=device)
    dist = (q[:, None] - kpos[None, :]).float()
    slopes = getattr(decoder, "alibi_slopes", None)
    if slopes is not None:
        bias = -slopes.float().to(device).view(-1, 1, 1) * dist
    else:
        bias = torch.zeros_like(dist)[None]
    return bias.masked_fill(dist < 0, float("-inf")).unsqueeze(0)


def embed_piece(decoder: nn.Module, tokens: Tensor, pos: int) -> Tensor:
    """:func:`~.decoder_layer.embed` of a piece at segment positions ``[pos, pos + n)``
    (position embeddings, if any, count from the segment's start as in training)."""
    if decoder.embed_positions is None or pos == 0:
        return embed(decoder, tokens)
    bsz, n = tokens.shape
    filler = tokens.new_full((bsz, pos), decoder.padding_idx + 1)
    return embed(decoder, torch.cat([filler, tokens], 1))[:, pos:]


def decoder_step(decoder: nn.Module, tokens: Tensor, pos: int, caches: List[LayerCache],
                 upto: Optional[int] = None) -> Tuple[List[Tensor], Tensor]:
    """A fairseq LM decoder over a piece of a segment with per-layer caches.

    Returns ``(hiddens [h^0 ..], features)`` like
    :func:`~.decoder_layer.decoder_forward`; ``upto``: stop after that many
    layers (features then None).
    """
    x = embed_piece(decoder, tokens, pos)
    bias = piece_bias(decoder, pos, tokens.size(1), tokens.device)
    hiddens = [x]
    layers = decoder.layers if upto is None else decoder.layers[:upto]
    for layer, cache in zip(layers, caches):
        x, _ = layer_forward(layer, x, bias, cache=(cache, pos))
        hiddens.append(x)
    if upto is not None:
        return hiddens, None
    return hiddens, final_features(decoder, x)


# ------------------------------------------------------------------ decoders
class SegmentDecoding:
    """Mixin of a fairseq incremental decoder that generates under segment semantics.

    A subclass implements :meth:`segment_length`, :meth:`segment_stacks`,
    :meth:`segment_step` and, with memory, :meth:`new_generation_memory`,
    :meth:`segment_memory_kv` and (to read a context batched over segments)
    :meth:`context_kv`. fairseq's generators then work through
    ``forward(..., incremental_state=...)`` and ``reorder_incremental_state``;
    :attr:`generation_context` (a :class:`SegmentCache` of one row, e.g. from
    :meth:`read_context`) is the history every new generation continues.
    """

    generation_context: Optional[SegmentCache] = None
    STATE_KEY = "segments"

    # ----------------------------------------------------------- subclass API
    def segment_length(self) -> int:
        raise NotImplementedError

    def segment_stacks(self) -> Dict[str, int]:
        """Attention stacks and their layer counts, e.g. ``{"layers": 4}``."""
        raise NotImplementedError

    def segment_step(self, tokens: Tensor, state: SegmentCache,
                     query_mask: Optional[Tensor]) -> Tensor:
        """Features ``(bsz, n, dim)`` (input of the output layer) of a piece."""
        raise NotImplementedError

    def new_generation_memory(self, bsz: int, device) -> Optional[MemoryBank]:
        return None

    def segment_memory_kv(self, state: SegmentCache) -> Optional[Tuple[Tensor, Tensor]]:
        return None

    def context_kv(self, segments: Tensor,
                   before: Optional[Tensor] = None) -> Optional[Tuple[Tensor, Tensor]]:
        """Memory-layer keys/values ``(n_seg, heads, T, d)`` of whole segments
        ``(n_seg, T)``, each read after its ``before`` tokens ``(n_seg, C)`` (the
        stream context, :meth:`segment_context_length`), computed independently of
        memory (None: not possible)."""
        return None

    def segment_context_length(self) -> int:
        """Stream tokens before a segment that the model reads as context (0: none)."""
        return 0

    def begin_segment(self, state: SegmentCache, doc_start: Optional[Tensor]) -> None:
        """Called before a segment's first token (doc_start ``(bsz,)``: flags of
        that token); a model with a stream context reads it here."""

    # --------------------------------------------------------------- protocol
    def new_segment_cache(self, bsz: int, device) -> SegmentCache:
        bank = self.new_generation_memory(bsz, device)
        state = SegmentCache(self.segment_length(), self.segment_stacks(), bank,
                             getattr(self, "spec", None), self.segment_context_length())
        state._rows(bsz, device)
        return state

    def set_generation_context(self, state: Optional[SegmentCache]) -> None:
        """Every later generation continues this history (None: an empty one)."""
        self.generation_context = state

    def incremental_features(self, prev_output_tokens: Tensor, incremental_state,
                             doc_start: Optional[Tensor] = None) -> Tensor:
        """Features of the tokens of ``prev_output_tokens`` ``(bsz, len)`` not yet
        seen by ``incremental_state`` (fairseq's generators pass one more per step);
        doc_start ``(bsz, len)``: True where a document (memory scope) starts."""
        state = self.get_incremental_state(incremental_state, self.STATE_KEY)
        bsz, length = prev_output_tokens.shape
        if state is None:
            ctx = self.generation_context
            if ctx is not None:
                state = ctx.expand(bsz)
            else:
                state = self.new_segment_cache(bsz, prev_output_tokens.device)
            state.consumed = 0
        new = prev_output_tokens[:, state.consumed:]
        if new.size(1) == 0:
            raise ValueError(
                "incremental decoding: prev_output_tokens holds no token beyond the "
                f"{state.consumed} already decoded"
            )
        if doc_start is not None:
            doc_start = doc_start[:, state.consumed:]
        feats = run_segments(state, new, self.segment_step, self.segment_memory_kv, doc_start,
                             self.begin_segment)
        state.consumed = length
        self.set_incremental_state(incremental_state, self.STATE_KEY, state)
        return feats

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        state = self.get_incremental_state(incremental_state, self.STATE_KEY)
        if state is not None:
            self.set_incremental_state(incremental_state, self.STATE_KEY,
                                       state.select(new_order))
        return incremental_state

    @torch.no_grad()
    def read_context(self, tokens, device=None, batch_segments: int = 8,
                     progress: Optional[Callable[[int], None]] = None) -> SegmentCache:
        """The state of one row after the history ``tokens`` (1-D ids).

        The complete segments that precede the last (partial or full) one only
        matter through memory: their memory-layer keys/values are computed
        ``batch_segments`` segments at a time (:meth:`context_kv`) and written
        segment by segment, as the stream forward writes them; a model without
        memory skips them. The last segment runs through :meth:`segment_step`
        to fill the local caches. ``progress(tokens_read)`` is called as it goes.
        """
        device = torch.device(device) if device is not None else _param_device(self)
        state = self.new_segment_cache(1, device)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device).view(1, -1)
        n = ids.size(1)
        if n == 0:
            return state
        T = state.seg_len
        n_full = (n - 1) // T  # complete segments followed by more tokens
        C = state.context_size
        done = 0
        if n_full and state.bank is not None:
            # batches of segments with a whole context each (C tokens before them; none
            # before the first); the first segments of a context longer than T, alone
            cuts = sorted({0, n_full} | {i for i in range(1, min(n_full, -(-C // T) + 1))}
                          | set(range(0, n_full, batch_segments)))
            for a, b in zip(cuts[:-1], cuts[1:]):
                segs = ids[0, a * T : b * T].view(b - a, T)
                before = None
                if C and a > 0:
                    before = torch.stack([ids[0, max(0, i * T - C) : i * T] for i in range(a, b)])
                kv = self.context_kv(segs, before)
                if kv is None:
                    if C and a > 0:
                        state.recent = ids[:, max(0, a * T - C) : a * T]
                    run_segments(state, segs.reshape(1, -1), self.segment_step,
                                 self.segment_memory_kv, begin=self.begin_segment)
                    if state.pos == T:  # leave no segment cached before the next batch
                        flush_segment(state, self.segment_memory_kv)
                else:
                    for i in range(b - a):
                        state.bank.write(kv[0][i : i + 1], kv[1][i : i + 1])
                done = b * T
                if progress is not None:
                    progress(done)
        if C and n_full:  # what the last segment is read after
            state.recent = ids[:, max(0, n_full * T - C) : n_full * T]
        run_segments(state, ids[:, n_full * T :], self.segment_step, self.segment_memory_kv,
                     begin=self.begin_segment)
        state.consumed = 0
        if progress is not None:
            progress(n)
        return state


def _param_device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
