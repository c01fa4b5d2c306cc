"""Per-stream chunked key/value memory (LongMem's memory bank).

This module does not import fairseq: it is tested and benchmarked alone.

Layout (torch backend, one bank for all streams of a batch, one ring per row):

* ``keys``/``values``: ``(bsz, heads, memory_size + 1, head_dim)``; slot
  ``memory_size`` is a scratch slot that receives the writes of tokens that
  must not be stored (before a reset point, padding), so every write has a
  static shape and needs no host synchronisation.
* ``chunk_keys``: ``(bsz, heads, memory_size // chunk_size, head_dim)``, the
  mean of each chunk's token keys, recomputed only for the chunks a write
  touches (O(segment) per write, whatever the fill). Stored in the memory
  dtype on accelerators and in fp32 on CPU (CPU half-precision matmuls are
  slow, and converting them at every search costs O(memory)): 1/chunk_size of
  the key storage.
* ``total``: ``(bsz,)`` tokens written to each row since its last reset. The
  logical token ``i`` of a row lives in slot ``i % memory_size``. A chunk is
  searchable once its ``chunk_size`` tokens are all written and none of them
  has been evicted; tokens of an incomplete chunk wait for the next write.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import MemoryConfigError
from . import cpu_kernels, fused_search

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``fp32``/``fp16``/``bf16`` to a torch dtype, with a clear error."""
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise MemoryConfigError(
            f"unknown memory dtype {name!r}: use one of fp32, fp16, bf16"
        ) from None


def check_memory_config(memory_size: int, chunk_size: int, k: int) -> None:
    """Validate the memory knobs; raise :class:`MemoryConfigError` on bad ones."""
    if chunk_size < 1:
        raise MemoryConfigError(f"--chunk-size must be >= 1, got {chunk_size}")
    if k < 1:
        raise MemoryConfigError(f"--k must be >= 1, got {k}")
    if k % chunk_size != 0:
        raise MemoryConfigError(
            f"--k ({k}) must be a multiple of --chunk-size ({chunk_size}): "
            f"retrieval reads whole chunks; use e.g. --k {max(chunk_size, k - k % chunk_size)}"
        )
    if memory_size % chunk_size != 0:
        raise MemoryConfigError(
            f"--memory-size ({memory_size}) must be a multiple of --chunk-size "
            f"({chunk_size}); use e.g. --memory-size {memory_size - memory_size % chunk_size or chunk_size}"
        )
    if memory_size < k:
        raise MemoryConfigError(
            f"--memory-size ({memory_size}) is smaller than --k ({k}): a token "
            f"cannot retrieve more pairs than memory holds; raise --memory-size or lower --k"
        )


@dataclass
class Selection:
    """Which chunks a search chose, per query token and head (nothing gathered).

    mask: ``(bsz, heads, tgt_len, k)`` True where the pair is real memory
    chunk_index: ``(bsz, heads, tgt_len, k // chunk_size)`` ring chunk slots
    chunk_logical: same shape, logical chunk number since the row's reset
        (-1 where invalid): lets callers check *what* was retrieved.
    """

    mask: Tensor
    chunk_index: Tensor
    chunk_logical: Tensor


@dataclass
class Retrieved(Selection):
    """A :class:`Selection` with the chosen tokens' keys and values gathered,
    ``(bsz, heads, tgt_len, k, head_dim)`` each."""

    keys: Tensor
    values: Tensor


def chunk_validity(
    total: Tensor, num_chunks: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Which ring chunk slots hold a complete, unevicted chunk.

    total: ``(bsz,)`` tokens written since reset. Returns ``(valid, logical)``
    both ``(bsz, num_chunks)``: ``valid`` bool, ``logical`` the logical chunk
    number held by each slot (meaningful where valid).

    Slot ``s`` holds the newest *complete* logical chunk ``l = s (mod n)``,
    ``l <= total // chunk_size - 1``; it is valid while none of its tokens has
    been overwritten, i.e. ``l * chunk_size >= total - memory_size``. (The
    valid chunks are the logical range :func:`valid_chunk_range` gives.)
    """
    memory_size = num_chunks * chunk_size
    slots = torch.arange(num_chunks, device=total.device)
    last = total // chunk_size - 1  # newest complete logical chunk (-1: none)
    logical = last[:, None] - torch.remainder(last[:, None] - slots[None, :], num_chunks)
    retained = logical * chunk_size >= (total[:, None] - memory_size)
    valid = (logical >= 0) & retained
    return valid, logical


def valid_chunk_range(total: int, memory_size: int, chunk_size: int) -> tuple[int, int]:
    """Host-side ``[lo, hi)`` logical chunks of one row that are searchable."""
    hi = total // chunk_size
    lo = max(0, -(-(total - memory_size) // chunk_size))
    return lo, max(lo, hi)


SCORE_BLOCK_ELEMENTS = 1 << 28  # bound on one block of query x chunk scores (accelerators)
# CPU: 16 MiB of fp32 scores per block. Below glibc's largest mmap threshold
# (32 MiB), so the allocator hands the same heap memory back at every block and
# call (a fresh mmap'd tensor costs a page fault per 4 KiB on first touch: the
# whole 67 MB score matrix of the quickstart cost as much as its matmul); and
# large enough that a search is a few big ops, not hundreds of small parallel
# regions (these stall when the two cores are shared: measured at 2 threads)
CPU_SCORE_BLOCK_ELEMENTS = 1 << 22
# the compiled search (:func:`.cpu_kernels.search_topk`): scores of one task, a
# (row, block of queries), at most 4 MiB of fp32, so that they stay in cache
# between the GEMM that writes them and the top-k that reads them (measured at
# 1,024 queries x 16,384 chunks: blocks of 64 queries 1.14 s, of 16 1.47 s, of
# 256 1.54 s; faiss's flat kernel 3.1 s)
CPU_SEARCH_BLOCK_SCORES = 1 << 20


def topk_chunks(
    queries: Tensor,
    chunk_keys: Tensor,
    valid: Tensor,
    num_chunks: int,
    block_elements: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Top ``num_chunks`` chunks per query by inner product.

    queries: ``(bsz, heads, tgt_len, d)``; chunk_keys: ``(bsz, heads, n, d)``;
    valid: ``(bsz, n)`` bool. Returns ``(index, ok)`` of shape
    ``(bsz, heads, tgt_len, num_chunks)``, sorted by decreasing score; ``ok`` is
    False where fewer valid chunks than asked exist. Among chunks of equal score
    the choice is unspecified (today: ``torch.topk``'s).

    Scores are computed in the storage dtype on accelerators and in fp32 on
    CPU (CPU half-precision matmuls are slow). The score matrix is never built
    whole: on accelerators in blocks of queries of at most ``block_elements``
    entries (default ``SCORE_BLOCK_ELEMENTS``; a static loop, no host
    synchronisation); on CPU, :func:`_topk_chunks_cpu`.
    """
    ck = chunk_keys
    if ck.device.type == "cpu":
        return _topk_chunks_cpu(
            queries, ck, valid, num_chunks, block_elements or CPU_SCORE_BLOCK_ELEMENTS
        )
    block_elements = block_elements or SCORE_BLOCK_ELEMENTS
    ckt = ck.transpose(-1, -2)
    q = queries.to(device=ck.device, dtype=ck.dtype)
    bsz, heads, tgt_len, _ = q.shape
    n = ck.size(-2)
    top = min(num_chunks, n)
    invalid = ~valid[:, None, None, :]
    step = max(1, block_elements // max(1, bsz * heads * n))
    idx_blocks, ok_blocks = [], []
    for s in range(0, tgt_len, step):
        scores = torch.matmul(q[:, :, s : s + step], ckt)
        scores.masked_fill_(invalid, float("-inf"))
        values, index = scores.topk(top, dim=-1)
        idx_blocks.append(index)
        ok_blocks.append(torch.isfinite(values))
    if len(idx_blocks) == 1:
        index, ok = idx_blocks[0], ok_blocks[0]
    elif idx_blocks:
        index, ok = torch.cat(idx_blocks, 2), torch.cat(ok_blocks, 2)
    else:  # no queries
        index = torch.zeros(bsz, heads, 0, top, dtype=torch.long, device=ck.device)
        ok = torch.zeros(bsz, heads, 0, top, dtype=torch.bool, device=ck.device)
    return _pad_topk(index, ok, num_chunks)


def _pad_topk(index: Tensor, ok: Tensor, num_chunks: int) -> tuple[Tensor, Tensor]:
    """Memory smaller than asked: pad ``(index, ok)`` with invalid entries."""
    top = index.size(-1)
    if top < num_chunks:
        pad = num_chunks - top
        index = torch.nn.functional.pad(index, (0, pad))
        ok = torch.nn.functional.pad(ok, (0, pad), value=False)
    return index, ok


def group_size(n: int, kc: int, max_group: int = 4) -> int:
    """Chunks per group of the two-stage top-k (1: plain top-k): the largest power
    of two ``g <= max_group`` that divides ``n`` and leaves at least ``4 kc``
    groups (with fewer, the second stage would read most of the row again)."""
    g = max_group
    while g > 1 and (n % g or n // g < 4 * kc):
        g //= 2
    return g


def blocked_topk(scores: Tensor, kc: int, g: int) -> tuple[Tensor, Tensor]:
    """Exact top-``kc`` of each row of ``scores`` ``(rows, n)``, in two stages.

    The columns form ``n / g`` groups of ``g`` (group ``j``: columns ``j, j + n/g,
    j + 2 n/g, ...``, so the group maxima are one vectorised max over ``g``
    contiguous slices). The ``kc`` largest scores of a row lie in the ``kc``
    groups of largest maximum: a score above the ``kc``-th largest group
    maximum lies in a group whose maximum is above it, and there are fewer
    than ``kc`` of those; so ``topk`` runs over ``kc * g`` candidates instead
    of ``n`` (ties: the same values, possibly other columns). Returns
    ``(values, columns)`` ``(rows, kc)``, by decreasing value.
    """
    rows, n = scores.shape
    if g <= 1:
        return scores.topk(kc, dim=-1)
    groups = n // g
    group_max = scores.view(rows, g, groups).amax(1)  # (rows, groups)
    top_groups = group_max.topk(kc, dim=-1, sorted=False).indices  # (rows, kc)
    offsets = torch.arange(g, device=scores.device) * groups
    cols = (top_groups.unsqueeze(-1) + offsets).view(rows, kc * g)
    values, pos = scores.gather(1, cols).topk(kc, dim=-1)
    return values, cols.gather(1, pos)


def _topk_chunks_cpu(
    queries: Tensor, chunk_keys: Tensor, valid: Tensor, num_chunks: int, block_elements: int
) -> tuple[Tensor, Tensor]:
    """:func:`topk_chunks` on CPU: scores in fp32, one block at a time.

    With the compiled kernels (:mod:`.cpu_kernels`), :func:`.cpu_kernels.search_topk`:
    one GEMM per (row, block of queries) into a buffer that stays in cache, and
    an exact two-pass top-k over it (the same chunks, ties to the lower slot);
    on CPUs with AVX-512 BF16 the scores are screened in bf16 first and only
    the chunks the screen's error bound cannot rule out are scored in fp32
    (same chunks; ``LONGMEM_BF16_SCREEN=0`` turns the screen off).
    Otherwise a block is a few (stream, head) pairs x a range of queries, at most
    ``block_elements`` scores, in one buffer reused by every block; each block
    goes through the two-stage :func:`blocked_topk` straight into the output.
    The full score matrix (16.7M scores = 67 MB at the quickstart's shapes,
    1 GB at the paper's with one stream) is never allocated. Segments of
    :data:`CPU_FAISS_MIN_QUERIES` queries or more over a full memory go to
    :func:`_topk_chunks_faiss` instead.
    """
    ck = chunk_keys if chunk_keys.dtype == torch.float32 else chunk_keys.float()
    bsz, heads, tgt_len, d = queries.shape
    n = ck.size(-2)
    top = min(num_chunks, n)
    rows = bsz * heads
    compiled = bool(top) and cpu_kernels.available()
    if not compiled and tgt_len >= CPU_FAISS_MIN_QUERIES and top and bool(valid.all()):
        return _topk_chunks_faiss(queries, ck, num_chunks)
    q = queries.to(dtype=torch.float32).reshape(rows, tgt_len, d)
    if compiled:
        invalid = torch.empty(0, dtype=torch.bool)
        if not bool(valid.all()):
            invalid = (~valid.bool())[:, None, :].expand(bsz, heads, n).reshape(rows, n).contiguous()
        values, index = cpu_kernels.search_topk(
            q.contiguous(), ck.reshape(rows, n, d).contiguous(), invalid, top,
            max(1, CPU_SEARCH_BLOCK_SCORES // max(1, n)),
        )
        ok = torch.isfinite(values).view(bsz, heads, tgt_len, top)
        return _pad_topk(index.view(bsz, heads, tgt_len, top), ok, num_chunks)
    ckt = ck.reshape(rows, n, d).transpose(1, 2)  # (rows, d, n), a view
    values = torch.empty(rows, tgt_len, top, dtype=torch.float32)
    index = torch.empty(rows, tgt_len, top, dtype=torch.long)
    if tgt_len and top:
        # a full memory has no invalid chunk: skip the mask pass (no sync on CPU)
        invalid = None
        if not bool(valid.all()):
            invalid = (~valid.bool())[:, None, :].expand(bsz, heads, n).reshape(rows, 1, n)
        g = group_size(n, top)
        per_row = tgt_len * n  # scores of one (stream, head)
        if per_row <= block_elements:
            nrows, nq = max(1, block_elements // per_row), tgt_len
        else:
            nrows, nq = 1, max(1, block_elements // n)
        buf = torch.empty(min(nrows, rows) * min(nq, tgt_len) * n, dtype=torch.float32)
        for r in range(0, rows, nrows):
            r1 = min(r + nrows, rows)
            for s in range(0, tgt_len, nq):
                s1 = min(s + nq, tgt_len)
                m = (r1 - r) * (s1 - s)
                out = buf[: m * n].view(r1 - r, s1 - s, n)
                scores = torch.bmm(q[r:r1, s:s1], ckt[r:r1], out=out)
                if invalid is not None:
                    scores.masked_fill_(invalid[r:r1], float("-inf"))
                v, i = blocked_topk(scores.view(m, n), top, g)
                values[r:r1, s:s1] = v.view(r1 - r, s1 - s, top)
                index[r:r1, s:s1] = i.view(r1 - r, s1 - s, top)
    ok = torch.isfinite(values).view(bsz, heads, tgt_len, top)
    return _pad_topk(index.view(bsz, heads, tgt_len, top), ok, num_chunks)


# on CPU without the compiled kernels, segments of at least this many queries over a
# full memory are searched with faiss's exact flat kernel (GEMM blocks with a heap per query, :func:`_topk_chunks_faiss`),
# faster than the blocked matmul + top-k there (docs/speed.md: 1,024 queries x 16,384
# chunks, 1.95 s against 3.09 s; at 128 queries x 2,048 chunks faiss was 3x slower)
CPU_FAISS_MIN_QUERIES = 256


def _topk_chunks_faiss(queries: Tensor, chunk_keys: Tensor, num_chunks: int):
    """:func:`topk_chunks` on CPU for a full memory through ``faiss.knn`` (exact inner
    product), one call per (stream, head). chunk_keys fp32 ``(bsz, heads, n, d)``."""
    import faiss
    import numpy as np

    bsz, heads, tgt_len, d = queries.shape
    n = chunk_keys.size(-2)
    top = min(num_chunks, n)
    q = queries.detach().to(torch.float32).reshape(bsz * heads, tgt_len, d).contiguous().numpy()
    ck = chunk_keys.detach().reshape(bsz * heads, n, d).contiguous().numpy()
    index = np.empty((bsz * heads, tgt_len, top), dtype=np.int64)
    for r in range(bsz * heads):
        _, index[r] = faiss.knn(q[r], ck[r], top, metric=faiss.METRIC_INNER_PRODUCT)
    index_t = torch.from_numpy(index).view(bsz, heads, tgt_len, top)
    return _pad_topk(index_t, torch.ones_like(index_t, dtype=torch.bool), num_chunks)


def search_chunks(
    queries: Tensor, chunk_keys: Tensor, valid: Tensor, num_chunks: int
) -> tuple[Tensor, Tensor]:
    """Exact chunk selection on the bank's device: the fused Triton kernel on CUDA
    (no score matrix in memory, :mod:`.fused_search`), walking the chunks in
    :func:`scan_order`, else :func:`topk_chunks`. Both return the same chunks
    (tie order aside); ``LONGMEM_FUSED_SEARCH=0`` forces the plain path."""
    q = queries.to(device=chunk_keys.device, dtype=chunk_keys.dtype)
    if fused_search.fused_supported(q, chunk_keys, num_chunks):
        return search_in_scan_order(
            fused_search.fused_topk_chunks, q, chunk_keys, valid, num_chunks
        )
    return topk_chunks(queries, chunk_keys, valid, num_chunks)


_SCAN_ORDERS: dict = {}


def scan_order(n: int, device) -> Tensor:
    """A fixed permutation ``(n,)`` of the chunk slots: slot ``i * p mod n`` at
    position ``i``, with ``p`` the integer coprime to ``n`` nearest ``0.618 n``
    (golden-ratio steps: any run of consecutive positions is spread evenly over
    the memory). Cached per ``(n, device)``.

    The fused kernel keeps a running top-k while it walks the chunks; a score
    enters only above the buffer's minimum, so chunks whose scores rise along
    the walk cost an insertion each. Memories have such trends: the keys of a
    segment drift with the position in the segment, and the ring holds segments
    in order (measured on an H200 at the paper's shapes: 26.4 ms per search in
    training against 4.1 ms on random keys, 23.4 ms for keys sorted by score).
    Walking the slots in this order turns any trend along the ring into a
    nearly random order."""
    key = (n, str(device))
    order = _SCAN_ORDERS.get(key)
    if order is None:
        p = max(1, round(0.6180339887 * n))
        step = 0
        while math.gcd(p + step, n) != 1 and math.gcd(p - step, n) != 1:
            step += 1
        p = p + step if math.gcd(p + step, n) == 1 else p - step
        order = (torch.arange(n, dtype=torch.long) * p % max(n, 1)).to(device)
        _SCAN_ORDERS[key] = order
    return order


def search_in_scan_order(
    search, queries: Tensor, chunk_keys: Tensor, valid: Tensor, num_chunks: int
) -> tuple[Tensor, Tensor]:
    """``search(queries, chunk_keys, valid, num_chunks)`` (``topk_chunks``'s
    contract) over the chunks permuted by :func:`scan_order`, its answer mapped
    back to ring slots: same chunks, same ``(index, ok)`` contract (index 0 where
    not ok). Costs one gather of the chunk keys (at the paper's shapes 256 MiB,
    about 0.1 ms on an H200)."""
    n = chunk_keys.size(-2)
    order = scan_order(n, chunk_keys.device)
    index, ok = search(
        queries, chunk_keys.index_select(-2, order), valid.index_select(-1, order), num_chunks
    )
    return torch.where(ok, order[index], torch.zeros_like(index)), ok


def gather_chunk_tokens(store: Tensor, chunk_index: Tensor, chunk_size: int) -> Tensor:
    """Read every token of the chosen chunks.

    store: ``(bsz, heads, slots, d)`` with ``slots >= n_chunks * chunk_size``;
    chunk_index: ``(bsz, heads, tgt_len, kc)``. Returns
    ``(bsz, heads, tgt_len, kc * chunk_size, d)``. One flat ``index_select``,
    so no ``(.., d)``-expanded index is materialised; on CPU over a view whose
    rows are whole chunks (``chunk_size * d`` values starting at every slot; the
    rows overlap, which reading allows): one index and one copy per chunk
    instead of per token.
    """
    bsz, heads, slots, d = store.shape
    _, _, tgt_len, kc = chunk_index.shape
    shape = (bsz, heads, tgt_len, kc * chunk_size, d)
    dev = chunk_index.device
    base = (torch.arange(bsz * heads, device=dev) * slots).view(bsz, heads, 1, 1)
    if store.device.type == "cpu" and store.is_contiguous() and store.numel() > 0:
        first = (chunk_index * chunk_size + base).reshape(-1)  # first slot of each chunk
        rows = store.as_strided((store.numel() // d - chunk_size + 1, chunk_size * d), (d, 1))
        return rows.index_select(0, first).view(shape)
    token = chunk_index.unsqueeze(-1) * chunk_size + torch.arange(chunk_size, device=dev)
    flat = (token + base.unsqueeze(-1)).reshape(-1)
    return store.reshape(bsz * heads * slots, d).index_select(0, flat).view(shape)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16 -> "fp16"`` (the names :func:`resolve_dtype` reads)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


class OverwriteLog:
    """The rows of a bank's ring buffers that writes overwrote since the log opened.

    A reader that keeps only a reference to the buffers (the compiled CPU memory
    attention: no gathered copy of what it read) runs its backward after the
    step's write-after-read; :meth:`restored` puts back what the forward read for
    the duration of that backward. keys, values: the bank's ``(bsz, heads,
    slots, d)`` buffers; each record: flat row indices into their ``(-1, d)``
    views and the rows they held before the write.
    """

    def __init__(self, keys: Tensor, values: Tensor):
        self.keys = keys
        self.values = values
        self.records: list[tuple[Tensor, Tensor, Tensor]] = []

    def record(self, flat: Tensor) -> None:
        """Keep rows ``flat`` (long ``(n,)``) of both buffers before a write replaces them."""
        d = self.keys.size(-1)
        self.records.append(
            (flat, self.keys.view(-1, d).index_select(0, flat),
             self.values.view(-1, d).index_select(0, flat))
        )

    @contextmanager
    def restored(self):
        """The buffers as they were when the log opened, inside the ``with`` block;
        as they are now again after it."""
        if not self.records:
            yield
            return
        d = self.keys.size(-1)
        kf, vf = self.keys.view(-1, d), self.values.view(-1, d)
        flat_all = torch.cat([r[0] for r in self.records])
        now_k, now_v = kf.index_select(0, flat_all), vf.index_select(0, flat_all)
        for flat, old_k, old_v in reversed(self.records):  # oldest last: it wins
            kf.index_copy_(0, flat, old_k)
            vf.index_copy_(0, flat, old_v)
        try:
            yield
        finally:
            kf.index_copy_(0, flat_all, now_k)
            vf.index_copy_(0, flat_all, now_v)


class MemoryBank:
    """Exact chunked memory in torch, one ring buffer per stream (batch row).

    Nothing here is differentiated: writes store detached tensors. ``search``
    accepts queries (and ``query_mask``) on any device and returns tensors on
    the bank's device, so a bank built with ``device="cpu"`` serves a model on
    GPU (the model moves the retrieved pairs back, see ``--memory-on-cpu``).

    Subclasses (:mod:`.faiss_memory`) keep this ring buffer for the tokens and
    override only how chunks are chosen (:meth:`_select_chunks`) and the hooks
    :meth:`_after_write` / :meth:`_after_reset`.
    """

    backend = "torch"

    def __init__(
        self,
        num_streams: int,
        num_heads: int,
        head_dim: int,
        memory_size: int,
        chunk_size: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ):
        if chunk_size < 1 or memory_size < chunk_size or memory_size % chunk_size != 0:
            check_memory_config(memory_size, chunk_size, chunk_size)
        if min(num_streams, num_heads, head_dim) < 1:
            raise MemoryConfigError(
                f"a memory needs >= 1 stream, head and head dim, got {num_streams} streams x "
                f"{num_heads} heads x head_dim {head_dim}"
            )
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise MemoryConfigError(f"memory dtype {dtype} unsupported: use fp32, fp16 or bf16")
        self.num_streams = num_streams
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.memory_size = memory_size
        self.chunk_size = chunk_size
        self.num_chunks = memory_size // chunk_size
        self.dtype = dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (num_streams, num_heads, memory_size + 1, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.chunk_keys = torch.zeros(
            (num_streams, num_heads, self.num_chunks, head_dim),
            dtype=self._chunk_dtype(device), device=device,
        )
        self.total = torch.zeros(num_streams, dtype=torch.long, device=device)
        # work done by the last write, per row and head (python ints from shapes:
        # no host sync); tests use it to check that a write is O(segment)
        self.last_write_cost: dict = {}

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.keys.device

    def _chunk_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float32 if torch.device(device).type == "cpu" else self.dtype

    def to(self, device) -> "MemoryBank":
        device = torch.device(device)
        for name in ("keys", "values", "total"):
            setattr(self, name, getattr(self, name).to(device))
        self.chunk_keys = self.chunk_keys.to(device, self._chunk_dtype(device))
        return self

    def fill(self) -> Tensor:
        """Tokens currently retrievable or waiting in a partial chunk, ``(bsz,)``."""
        return self.total.clamp(max=self.memory_size)

    def config(self) -> dict:
        """What identifies this memory's layout (saved with it, checked on load)."""
        return {
            "backend": self.backend,
            "num_streams": self.num_streams,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "memory_size": self.memory_size,
            "chunk_size": self.chunk_size,
            "dtype": dtype_name(self.dtype),
        }

    def backend_params(self) -> dict:
        """Backend knobs needed to rebuild this bank (none for torch)."""
        return {}

    def state_dict(self) -> dict:
        """Host copies of the ring (the whole content of a torch bank)."""
        return {
            "keys": self.keys.cpu(),
            "values": self.values.cpu(),
            "chunk_keys": self.chunk_keys.cpu(),
            "total": self.total.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("keys", "values", "chunk_keys", "total"):
            cur = getattr(self, name)
            got = state[name]
            # chunk keys are fp32 on CPU, the memory dtype elsewhere: either is fine
            ok_dtype = got.dtype == cur.dtype or (
                name == "chunk_keys" and got.dtype in (torch.float32, self.dtype)
            )
            if tuple(got.shape) != tuple(cur.shape) or not ok_dtype:
                raise MemoryConfigError(
                    f"saved memory tensor {name!r} is {tuple(got.shape)} {got.dtype}, this bank "
                    f"expects {tuple(cur.shape)} {cur.dtype}: the file does not match its own "
                    "header (corrupt?); rebuild the memory"
                )
            setattr(self, name, got.to(device=cur.device, dtype=cur.dtype).clone())

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Forget everything of the rows where ``rows`` (bool ``(bsz,)``) is True."""
        if rows is None:
            self.total.zero_()
        else:
            self.total.masked_fill_(rows.to(self.total.device), 0)
        self._after_reset(rows)

    def _after_reset(self, rows: Optional[Tensor]) -> None:
        """Hook for backends with search structures (torch: nothing to do)."""

    def reorder_rows(self, order: Tensor) -> None:
        """Keep rows ``order`` (``(new_bsz,)`` long, repeats allowed), in that order:
        beam search's reorder of the memory rows (in place)."""
        order = order.to(device=self.device, dtype=torch.long)
        for name in ("keys", "values", "chunk_keys", "total"):
            setattr(self, name, getattr(self, name).index_select(0, order))
        self.num_streams = int(order.numel())
        self._after_reorder(order)

    def _after_reorder(self, order: Tensor) -> None:
        """Hook for backends with search structures (torch: nothing to do)."""

    def skip(self, tokens: Tensor) -> None:
        """Count ``tokens`` ``(bsz,)`` more tokens per row without storing them.

        For a memory rebuilt from the middle of a document: chunk boundaries
        stay where they are in the uninterrupted stream. The skipped tokens are
        older than anything a rebuild keeps: once ``memory_size`` more tokens are
        written, no chunk holding one of them is retrievable.
        """
        self.total = self.total + tokens.to(device=self.device, dtype=torch.long).clamp(min=0)
        self._after_skip()

    def _after_skip(self) -> None:
        """Hook for backends with search structures (torch: nothing to do)."""

    # ------------------------------------------------------------------ write
    def write(
        self,
        keys: Tensor,
        values: Tensor,
        start: Optional[Tensor] = None,
        end: Optional[Tensor] = None,
    ) -> None:
        """Append tokens ``[start, end)`` of every row, in order.

        keys, values: ``(bsz, heads, seg_len, head_dim)``; start, end: ``(bsz,)``
        long (default: whole segment). Cost O(seg_len) whatever the fill: the
        tokens outside a row's window go to the scratch slot, and only the
        chunks the write touched get their mean key recomputed.
        """
        bsz, heads, seg_len, d = keys.shape
        self._check_shape(bsz, heads, d)
        if tuple(values.shape) != tuple(keys.shape):
            raise MemoryConfigError(
                f"memory write: keys {tuple(keys.shape)} and values {tuple(values.shape)} "
                "must have the same shape (bsz, heads, seg_len, head_dim)"
            )
        dev = self.device
        keys = keys.detach().to(device=dev, dtype=self.dtype)
        values = values.detach().to(device=dev, dtype=self.dtype)
        if start is None:
            start = torch.zeros(bsz, dtype=torch.long, device=dev)
        if end is None:
            end = torch.full((bsz,), seg_len, dtype=torch.long, device=dev)
        start, end = start.to(dev), end.to(dev)
        # every token of [start, end) counts (chunks group tokens by their
        # position in the stream), but only the last memory_size can survive
        # the write, so only those are stored (distinct slots: no scatter race)
        first_kept = torch.maximum(start, end - self.memory_size)
        t = torch.arange(seg_len, device=dev)
        keep = (t[None, :] >= first_kept[:, None]) & (t[None, :] < end[:, None])
        logical = self.total[:, None] + t[None, :] - start[:, None]
        slot = torch.where(keep, torch.remainder(logical, self.memory_size), self.memory_size)
        # one flat index_copy_ per store (scatter_ on a CPU fp16 tensor copies
        # the whole store: O(memory)); duplicates only hit the scratch slot
        rows = torch.arange(bsz * heads, device=dev).view(bsz, heads, 1) * (self.memory_size + 1)
        flat = (rows + slot[:, None, :]).reshape(-1)
        self._log_overwrite(flat)
        self.keys.view(-1, d).index_copy_(0, flat, keys.reshape(-1, d))
        self.values.view(-1, d).index_copy_(0, flat, values.reshape(-1, d))
        before = self.total
        self.total = self.total + (end - start).clamp(min=0)
        n = self._refresh_chunk_keys(before, seg_len)
        self.last_write_cost = {"token_slots": seg_len, "chunk_slots": n}
        self._after_write(before, self.total)

    def _after_write(self, before: Tensor, after: Tensor) -> None:
        """Hook for backends with search structures (torch: nothing to do)."""

    def log_overwrites(self) -> "OverwriteLog":
        """An :class:`OverwriteLog` of this bank's ring buffers as they are now: every
        later :meth:`write` records in it the rows it overwrites, for as long as
        the log is referenced (the bank keeps only a weak reference)."""
        log = OverwriteLog(self.keys, self.values)
        logs = [r for r in getattr(self, "_overwrite_logs", []) if r() is not None]
        logs.append(weakref.ref(log))
        self._overwrite_logs = logs
        return log

    def _log_overwrite(self, flat: Tensor) -> None:
        for ref in getattr(self, "_overwrite_logs", ()):
            log = ref()
            if log is not None and log.keys is self.keys:
                log.record(flat)

    def _refresh_chunk_keys(self, before: Tensor, seg_len: int) -> int:
        """Recompute the mean key of every chunk the last write touched.

        A write of ``seg_len`` tokens starting anywhere inside a chunk touches
        at most ``seg_len // chunk_size + 2`` chunks. Returns that count.
        """
        n = min(seg_len // self.chunk_size + 2, self.num_chunks)
        first = before // self.chunk_size
        cidx = torch.remainder(
            first[:, None] + torch.arange(n, device=self.device)[None, :], self.num_chunks
        )  # (bsz, n)
        bsz, heads = self.num_streams, self.num_heads
        ck = cidx[:, None, :, None].expand(bsz, heads, n, 1)
        tokens = gather_chunk_tokens(self.keys, ck, self.chunk_size)  # (b,h,n,c,d)
        means = tokens.float().mean(-2).to(self.chunk_keys.dtype)  # (b,h,n,d)
        rows = torch.arange(bsz * heads, device=self.device).view(bsz, heads, 1) * self.num_chunks
        flat = (rows + cidx[:, None, :]).reshape(-1)
        self.chunk_keys.view(-1, self.head_dim).index_copy_(
            0, flat, means.reshape(-1, self.head_dim)
        )
        return n

    # ----------------------------------------------------------------- search
    def search(
        self, queries: Tensor, k: int, query_mask: Optional[Tensor] = None
    ) -> Retrieved:
        """Token-to-chunk retrieval: top ``k // chunk_size`` chunks per query.

        queries: ``(bsz, heads, tgt_len, head_dim)`` on any device; query_mask:
        ``(bsz, tgt_len)`` bool, False for queries that must see no memory (e.g.
        a new document). Returns a :class:`Retrieved` on the bank's device.
        """
        return self.gather(self._select(queries, k, query_mask, self._select_chunks))

    def search_exact(
        self, queries: Tensor, k: int, query_mask: Optional[Tensor] = None
    ) -> Retrieved:
        """:meth:`search` with the exact torch top-k whatever the backend (the
        reference approximate backends are measured against)."""
        return self.gather(
            self._select(queries, k, query_mask, MemoryBank._select_chunks.__get__(self))
        )

    def select(
        self, queries: Tensor, k: int, query_mask: Optional[Tensor] = None
    ) -> Selection:
        """:meth:`search` without the gather: which chunks each query reads.
        The memory layer gathers them block by block
        (:func:`.joint_attention.memory_attention_chunks`)."""
        return self._select(queries, k, query_mask, self._select_chunks)

    def gather(self, sel: Selection) -> Retrieved:
        """The keys and values of a :class:`Selection`'s chunks, on the bank's device."""
        mem_k = gather_chunk_tokens(self.keys, sel.chunk_index, self.chunk_size)
        mem_v = gather_chunk_tokens(self.values, sel.chunk_index, self.chunk_size)
        return Retrieved(sel.mask, sel.chunk_index, sel.chunk_logical, mem_k, mem_v)

    def _select(self, queries, k, query_mask, select) -> Selection:
        bsz, heads, tgt_len, d = queries.shape
        self._check_shape(bsz, heads, d)
        if k % self.chunk_size != 0 or k > self.memory_size or k < 1:
            check_memory_config(self.memory_size, self.chunk_size, k)
        if query_mask is not None:
            if tuple(query_mask.shape) != (bsz, tgt_len):
                raise MemoryConfigError(
                    f"query_mask must be (bsz, tgt_len) = {(bsz, tgt_len)}, got "
                    f"{tuple(query_mask.shape)}"
                )
            query_mask = query_mask.to(device=self.device, dtype=torch.bool)
        valid, logical = chunk_validity(self.total, self.num_chunks, self.chunk_size)
        kc = k // self.chunk_size
        index, ok = select(queries.detach(), kc, valid, query_mask)
        if query_mask is not None:
            ok = ok & query_mask[:, None, :, None]
        chunk_logical = torch.gather(
            logical[:, None, None, :].expand(bsz, heads, tgt_len, self.num_chunks), 3, index
        ).masked_fill(~ok, -1)
        mask = ok.repeat_interleave(self.chunk_size, dim=-1)
        return Selection(mask, index, chunk_logical)

    def _select_chunks(
        self, queries: Tensor, kc: int, valid: Tensor, query_mask: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(index, ok)`` ring chunk slots per query, ``(bsz, heads, tgt_len, kc)``
        on the bank's device. Exact: a fused kernel on CUDA, matmul plus top-k elsewhere."""
        return search_chunks(queries.to(self.device), self.chunk_keys, valid, kc)

    def _check_shape(self, bsz: int, heads: int, d: int) -> None:
        if (bsz, heads, d) != (self.num_streams, self.num_heads, self.head_dim):
            raise MemoryConfigError(
                f"memory holds {self.num_streams} streams x {self.num_heads} heads x "
                f"head_dim {self.head_dim}, got a batch of {bsz} x {heads} x {d}; "
                "a memory is tied to its batch size: keep --batch-size fixed or reset the memory"
            )
