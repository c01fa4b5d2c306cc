"""Faiss retrieval backends for the per-stream memory (``--memory-backend faiss-*``).

Every backend here subclasses :class:`~.memory_bank.MemoryBank` and keeps its
torch ring buffer for the token keys/values and the chunk mean keys (so the
write path, the gather of retrieved tokens and the :class:`Retrieved` result are
shared with the exact torch backend); only the choice of chunks differs.

Search structures are per (stream, head): a row never retrieves another row's
chunks, a reset of one row clears that row's structures only, and only the
row's complete, unevicted chunks (logical range ``[lo, hi)``,
:func:`~.memory_bank.valid_chunk_range`) can be returned. FIFO eviction costs
O(segment) per write in every backend:

* ``faiss-flat`` (exact): no index to maintain. Search is faiss's brute-force
  inner-product kNN (``faiss.knn``, BLAS; ``faiss.knn_gpu`` when faiss has GPU
  support and ``--use-gpu-to-search``) over the valid part of the ring of chunk
  keys, which is at most two contiguous slot ranges; eviction is implicit.
* ``faiss-ivf``: one ``IndexIVFFlat`` (inner product) per (stream, head), ids =
  logical chunk numbers, with a hash-table direct map so that ``remove_ids`` of
  the chunks a write evicts costs O(evicted), not O(index). A stream's
  quantizers are trained (k-means, once per stream, kept across resets) on its
  first ``train_size`` complete chunks; until then its search is exact.
* ``faiss-hnsw``: HNSW has no ``remove_ids``, so each (stream, head) owns a
  ring of ``blocks + 1`` ``IndexHNSWFlat`` sub-indexes over consecutive blocks
  of logical chunks. A sub-index is reset and reused only when all chunks of
  the block it held are evicted; the one partly evicted block is searched with
  an ``IDSelectorRange`` over its still-valid ids. Search queries every live
  block and merges the top-k.

Costs: these backends loop over streams x heads in Python (the original's cost
model: one faiss call per head) and copy queries/keys between the bank's
device and the host; ``write``/``reset``/``search`` synchronise with the host
(``total`` is read on the host to update the indexes). Use the torch backend
on GPU when the memory fits in device memory. GPU support: only ``faiss-flat``
uses the GPU (``faiss.knn_gpu``, with ``--use-gpu-to-search``; a faiss build
without GPU support refuses the flag), and that path cannot be tested on a CPU-only
faiss; IVF removal by id and HNSW are CPU-only in faiss, so those backends
always search on CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import faiss
import numpy as np
import torch
from torch import Tensor

from ..errors import MemoryConfigError
from .memory_bank import MemoryBank, topk_chunks, valid_chunk_range
from .memory_spec import MemorySpec

IP = faiss.METRIC_INNER_PRODUCT


def faiss_has_gpu() -> bool:
    try:
        return faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    except Exception:  # pragma: no cover - faiss builds without the symbol
        return False


def merge_topk(dists: list, labels: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part results ``(nq, ki)`` into the best ``k`` by score.

    Missing results (label -1) never win. Returns ``(D, I)`` of ``(nq, k)``,
    I = -1 where fewer than k results exist.
    """
    nq = dists[0].shape[0] if dists else 0
    if not dists:
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    D = np.concatenate(dists, 1) if len(dists) > 1 else dists[0]
    I = np.concatenate(labels, 1) if len(labels) > 1 else labels[0]
    D = np.where(I < 0, -np.inf, D)
    if len(dists) > 1 or D.shape[1] > k:
        order = np.argsort(-D, axis=1, kind="stable")[:, :k]
        D = np.take_along_axis(D, order, 1)
        I = np.take_along_axis(I, order, 1)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


def _tensor_of(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr).copy())


def _serialize(index) -> Tensor:
    return torch.from_numpy(faiss.serialize_index(index).copy())


def _deserialize(blob: Tensor):
    return faiss.deserialize_index(np.ascontiguousarray(blob.numpy()))


class FaissMemoryBank(MemoryBank):
    """Common part of the faiss backends (host bookkeeping, per-row loops)."""

    backend = "faiss"

    def __init__(
        self,
        num_streams: int,
        num_heads: int,
        head_dim: int,
        memory_size: int,
        chunk_size: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        spec: Optional[MemorySpec] = None,
    ):
        super().__init__(num_streams, num_heads, head_dim, memory_size, chunk_size, dtype, device)
        if spec is None:
            spec = MemorySpec(memory_size, chunk_size, k=chunk_size, backend=self.backend)
        self.spec = spec
        if spec.use_gpu_to_search and not faiss_has_gpu():
            raise MemoryConfigError(
                "--use-gpu-to-search: this faiss build has no GPU support (or sees no GPU); "
                "install faiss-gpu on a GPU machine, or drop the flag to search on the CPU "
                "(or use --memory-backend torch, which searches on the model's device)"
            )
        self.use_gpu = bool(spec.use_gpu_to_search)
        self._gpu_res = None
        # logical chunk range [lo, hi) of each row that the structures hold
        self._lo = np.zeros(num_streams, dtype=np.int64)
        self._hi = np.zeros(num_streams, dtype=np.int64)

    # ------------------------------------------------------------- bookkeeping
    def _after_reset(self, rows: Optional[Tensor]) -> None:
        if rows is None:
            todo = range(self.num_streams)
        else:
            todo = np.flatnonzero(rows.detach().to("cpu", torch.bool).numpy())
        for r in todo:
            self._lo[r] = self._hi[r] = 0
            self._reset_row(int(r))

    def _after_reorder(self, order: Tensor) -> None:
        # the ring is reordered; the per-row faiss structures cannot be copied
        # cheaply: backends with any (ivf, hnsw) refuse, unless nothing moves
        idx = order.cpu().numpy()
        if self.reorder_copies_index and not np.array_equal(idx, np.arange(len(self._lo))):
            raise MemoryConfigError(
                f"--memory-backend {self.backend} cannot reorder memory rows (beam search, "
                "or several prompts over one memory): use --memory-backend torch or "
                "faiss-flat, or --beam 1"
            )
        self._lo = self._lo[idx].copy()
        self._hi = self._hi[idx].copy()

    reorder_copies_index = True

    def _after_skip(self) -> None:
        # skipped tokens were never stored: the structures start empty at the
        # first chunk the next write can complete
        hi = self.total.cpu().numpy() // self.chunk_size
        self._lo[:] = hi
        self._hi[:] = hi

    def _after_write(self, before: Tensor, after: Tensor) -> None:
        totals = after.cpu().numpy()
        added = removed = 0
        for r in range(self.num_streams):
            lo, hi = valid_chunk_range(int(totals[r]), self.memory_size, self.chunk_size)
            old_lo, old_hi = int(self._lo[r]), int(self._hi[r])
            if (lo, hi) != (old_lo, old_hi):
                a, r_ = self._update_row(r, old_lo, old_hi, lo, hi)
                added += a
                removed += r_
            self._lo[r], self._hi[r] = lo, hi
        self.last_write_cost = dict(
            self.last_write_cost, index_added=added, index_removed=removed
        )

    def _chunk_vectors(self, r: int, a: int, b: int) -> np.ndarray:
        """fp32 host copies of row ``r``'s chunk keys of logical chunks ``[a, b)``:
        ``(heads, b - a, d)``, read from the ring (O(b - a))."""
        slots = torch.arange(a, b, device=self.device) % self.num_chunks
        vecs = self.chunk_keys[r].index_select(1, slots)
        return np.ascontiguousarray(vecs.to("cpu", torch.float32).numpy())

    def _sync_all(self) -> None:
        """Rebuild the host ranges from ``total`` (after a load)."""
        totals = self.total.cpu().numpy()
        for r in range(self.num_streams):
            self._lo[r], self._hi[r] = valid_chunk_range(
                int(totals[r]), self.memory_size, self.chunk_size
            )

    # ----------------------------------------------------------------- search
    def _select_chunks(
        self, queries: Tensor, kc: int, valid: Tensor, query_mask: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        bsz, heads, tgt_len, _ = queries.shape
        q = np.ascontiguousarray(queries.to("cpu", torch.float32).numpy())
        qmask = None if query_mask is None else query_mask.cpu().numpy()
        slots = np.zeros((bsz, heads, tgt_len, kc), dtype=np.int64)
        ok = np.zeros((bsz, heads, tgt_len, kc), dtype=bool)
        exact_rows = []
        for r in range(bsz):
            lo, hi = int(self._lo[r]), int(self._hi[r])
            if hi <= lo:
                continue
            active = np.arange(tgt_len) if qmask is None else np.flatnonzero(qmask[r])
            if active.size == 0:
                continue
            if not self._row_searchable(r):
                exact_rows.append(r)
                continue
            for h in range(heads):
                xq = np.ascontiguousarray(q[r, h, active])
                logical = self._search_row_head(r, h, xq, kc, lo, hi)
                good = logical >= 0
                slots[r, h, active] = np.where(good, logical % self.num_chunks, 0)
                ok[r, h, active] = good
        index = torch.from_numpy(slots).to(self.device)
        okt = torch.from_numpy(ok).to(self.device)
        if exact_rows:  # rows whose index is not built yet: exact torch search
            rows = torch.tensor(exact_rows, device=self.device)
            i_ex, ok_ex = topk_chunks(
                queries.index_select(0, rows.to(queries.device)).to(self.device),
                self.chunk_keys.index_select(0, rows),
                valid.index_select(0, rows),
                kc,
            )
            index[rows] = i_ex
            okt[rows] = ok_ex
        return index, okt

    def _row_searchable(self, r: int) -> bool:
        """False while row ``r`` has no index yet (search it exactly)."""
        return True

    # ------------------------------------------------------------- subclasses
    def _reset_row(self, r: int) -> None:
        raise NotImplementedError

    def _update_row(self, r: int, old_lo: int, old_hi: int, lo: int, hi: int) -> tuple[int, int]:
        """Bring row ``r``'s structures from ``[old_lo, old_hi)`` to ``[lo, hi)``;
        returns (entries added, entries removed) summed over heads."""
        raise NotImplementedError

    def _search_row_head(
        self, r: int, h: int, xq: np.ndarray, kc: int, lo: int, hi: int
    ) -> np.ndarray:
        """Logical chunk numbers ``(nq, kc)`` (-1 where none) for one row and head."""
        raise NotImplementedError

    # ------------------------------------------------------------- save/load
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["faiss"] = self._faiss_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._sync_all()
        self._load_faiss_state(state.get("faiss") or {})

    def _faiss_state(self) -> dict:
        return {}

    def _load_faiss_state(self, state: dict) -> None:
        pass


class FlatMemoryBank(FaissMemoryBank):
    """Exact search with faiss's brute-force kernels over the ring of chunk keys."""

    backend = "faiss-flat"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # faiss reads fp32 host memory: a CPU fp32 ring is read in place, any
        # other ring gets an fp32 host mirror updated with each write's new chunks
        self._mirror: Optional[np.ndarray] = None
        if not self._ring_is_host_fp32():
            self._mirror = np.zeros(
                (self.num_streams, self.num_heads, self.num_chunks, self.head_dim), np.float32
            )

    def _ring_is_host_fp32(self) -> bool:
        return self.chunk_keys.device.type == "cpu" and self.chunk_keys.dtype == torch.float32

    def _base(self) -> np.ndarray:
        return self.chunk_keys.numpy() if self._mirror is None else self._mirror

    def _reset_row(self, r: int) -> None:
        pass  # nothing indexed: validity alone hides the old chunks

    def _update_row(self, r, old_lo, old_hi, lo, hi):
        a = max(old_hi, lo)
        if self._mirror is not None and hi > a:
            slots = np.arange(a, hi) % self.num_chunks
            self._mirror[r][:, slots] = self._chunk_vectors(r, a, hi)
        return 0, 0

    def _knn(self, xq: np.ndarray, xb: np.ndarray, k: int):
        if self.use_gpu:  # pragma: no cover - needs faiss with GPU support
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            return faiss.knn_gpu(self._gpu_res, xq, xb, k, metric=IP)
        return faiss.knn(xq, xb, k, metric=IP)

    def _search_row_head(self, r, h, xq, kc, lo, hi):
        base = self._base()[r, h]
        n = self.num_chunks
        a, m = lo % n, hi - lo
        parts = [(a, a + m)] if a + m <= n else [(a, n), (0, a + m - n)]
        dists, labels = [], []
        for s, e in parts:
            D, I = self._knn(xq, base[s:e], min(kc, e - s))
            # slot -> logical number (parts are in logical order from lo)
            first_logical = lo if s == a else lo + (n - a)
            dists.append(D)
            labels.append(np.where(I >= 0, I + first_logical, -1))
        return merge_topk(dists, labels, kc)[1]

    reorder_copies_index = False  # no index: the ring (and mirror) is all there is

    def _after_reorder(self, order: Tensor) -> None:
        super()._after_reorder(order)
        self._rebuild_mirror()

    def _rebuild_mirror(self) -> None:
        if self._ring_is_host_fp32():
            self._mirror = None
        else:
            self._mirror = np.ascontiguousarray(self.chunk_keys.to("cpu", torch.float32).numpy())

    def to(self, device) -> "FlatMemoryBank":
        super().to(device)
        self._rebuild_mirror()
        return self

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._rebuild_mirror()


class IVFMemoryBank(FaissMemoryBank):
    """IVF-Flat (inner product) per (stream, head), O(evicted) removal by id."""

    backend = "faiss-ivf"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        want = int(self.spec.ivf_nlist)
        self.requested_nlist = want
        # >= 40 training points per list (faiss' own advice), even on a small memory
        self.nlist = max(1, min(want, self.num_chunks // 40))
        self.nprobe = int(self.spec.ivf_nprobe)
        self.train_size = min(self.num_chunks, 40 * self.nlist)
        self.niter = int(self.spec.ivf_niter)
        self._trained = np.zeros(self.num_streams, dtype=bool)
        self._index: list = [[None] * self.num_heads for _ in range(self.num_streams)]

    def backend_params(self) -> dict:
        return {"ivf_nlist": self.requested_nlist, "ivf_nprobe": self.nprobe,
                "ivf_niter": self.niter}

    def _row_searchable(self, r: int) -> bool:
        return bool(self._trained[r])

    def _reset_row(self, r: int) -> None:
        for index in self._index[r]:
            if index is not None:
                index.reset()  # keeps the trained quantizer

    def _train_row(self, r: int, lo: int, hi: int) -> None:
        """k-means on the row's first ``train_size`` valid chunks, every head."""
        vecs = self._chunk_vectors(r, lo, min(hi, lo + self.train_size))
        for h in range(self.num_heads):
            quantizer = faiss.IndexFlatIP(self.head_dim)
            index = faiss.IndexIVFFlat(quantizer, self.head_dim, self.nlist, IP)
            index.cp.niter = self.niter
            index.cp.seed = 1234 + h
            index.cp.min_points_per_centroid = 1  # train_size >= 40 * nlist already
            index.train(vecs[h])
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.nprobe = self.nprobe
            self._index[r][h] = index
        self._trained[r] = True

    def _update_row(self, r, old_lo, old_hi, lo, hi):
        if not self._trained[r]:
            if hi - lo < self.train_size:
                return 0, 0  # still exact: nothing to index
            self._train_row(r, lo, hi)
            old_lo = old_hi = lo  # index empty: add everything valid
        removed = 0
        drop_end = min(old_hi, lo)
        if drop_end > old_lo:
            ids = np.arange(old_lo, drop_end, dtype=np.int64)
            for h in range(self.num_heads):
                sel = faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids))
                removed += self._index[r][h].remove_ids(sel)
        a = max(old_hi, lo)
        if hi > a:
            vecs = self._chunk_vectors(r, a, hi)
            ids = np.arange(a, hi, dtype=np.int64)
            for h in range(self.num_heads):
                self._index[r][h].add_with_ids(vecs[h], ids)
        return (max(0, hi - a)) * self.num_heads, removed

    def _search_row_head(self, r, h, xq, kc, lo, hi):
        index = self._index[r][h]
        index.nprobe = self.nprobe
        _, I = index.search(xq, kc)
        return I

    def _faiss_state(self) -> dict:
        blobs = {}
        for r in range(self.num_streams):
            for h in range(self.num_heads):
                if self._index[r][h] is not None:
                    blobs[f"{r}.{h}"] = _serialize(self._index[r][h])
        return {"trained": _tensor_of(self._trained), "indexes": blobs}

    def _load_faiss_state(self, state: dict) -> None:
        self._trained = state["trained"].numpy().astype(bool).copy()
        self._index = [[None] * self.num_heads for _ in range(self.num_streams)]
        for key, blob in state["indexes"].items():
            r, h = (int(x) for x in key.split("."))
            index = _deserialize(blob)
            index.nprobe = self.nprobe
            self._index[r][h] = index


class HNSWMemoryBank(FaissMemoryBank):
    """HNSW (inner product) over a ring of per-block sub-indexes per (stream, head)."""

    backend = "faiss-hnsw"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.m = int(self.spec.hnsw_m)
        self.ef_search = int(self.spec.hnsw_ef_search)
        self.ef_construction = int(self.spec.hnsw_ef_construction)
        blocks = int(self.spec.hnsw_blocks)
        self.blocks = blocks
        self.block_chunks = math.ceil(self.num_chunks / blocks)
        # one spare sub-index: when block j starts, block j - ring is wholly evicted
        self.ring = math.ceil(self.num_chunks / self.block_chunks) + 1
        self._block_id = np.full((self.num_streams, self.ring), -1, dtype=np.int64)
        self._block_base = np.zeros((self.num_streams, self.ring), dtype=np.int64)
        self._index = [
            [[None] * self.ring for _ in range(self.num_heads)] for _ in range(self.num_streams)
        ]

    def backend_params(self) -> dict:
        return {
            "hnsw_m": self.m,
            "hnsw_ef_search": self.ef_search,
            "hnsw_ef_construction": self.ef_construction,
            "hnsw_blocks": self.blocks,
        }

    def _new_index(self):
        index = faiss.IndexHNSWFlat(self.head_dim, self.m, IP)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def _reset_row(self, r: int) -> None:
        self._block_id[r] = -1
        for h in range(self.num_heads):
            for p in range(self.ring):
                if self._index[r][h][p] is not None:
                    self._index[r][h][p].reset()

    def _update_row(self, r, old_lo, old_hi, lo, hi):
        a = max(old_hi, lo)
        added = 0
        if hi <= a:
            return 0, 0
        vecs = self._chunk_vectors(r, a, hi)
        B = self.block_chunks
        for j in range(a // B, (hi - 1) // B + 1):
            s, e = max(a, j * B), min(hi, (j + 1) * B)
            p = j % self.ring
            held = self._index[r][0][p]
            contiguous = held is not None and self._block_base[r, p] + held.ntotal == s
            if self._block_id[r, p] != j or not contiguous:
                # block j - ring (every chunk evicted), or block j itself after a
                # write longer than the memory skipped part of it (evicted too)
                for h in range(self.num_heads):
                    if self._index[r][h][p] is None:
                        self._index[r][h][p] = self._new_index()
                    else:
                        self._index[r][h][p].reset()
                self._block_id[r, p] = j
                self._block_base[r, p] = s
            for h in range(self.num_heads):
                self._index[r][h][p].add(np.ascontiguousarray(vecs[h, s - a : e - a]))
            added += (e - s) * self.num_heads
        return added, 0

    def _search_row_head(self, r, h, xq, kc, lo, hi):
        dists, labels = [], []
        ef = max(self.ef_search, kc)
        for p in range(self.ring):
            if self._block_id[r, p] < 0:
                continue
            index = self._index[r][h][p]
            base = int(self._block_base[r, p])
            s, e = max(base, lo), min(base + index.ntotal, hi)
            if e <= s:
                continue  # wholly evicted (or empty): reset when reused
            if (s, e) == (base, base + index.ntotal):
                params = faiss.SearchParametersHNSW(efSearch=ef)
            else:  # the partly evicted block: only its still-valid ids
                sel = faiss.IDSelectorRange(s - base, e - base)
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
            D, I = index.search(xq, min(kc, e - s), params=params)
            dists.append(D)
            labels.append(np.where(I >= 0, I + base, -1))
        if not dists:
            return np.full((xq.shape[0], kc), -1, np.int64)
        return merge_topk(dists, labels, kc)[1]

    def _faiss_state(self) -> dict:
        blobs = {}
        for r in range(self.num_streams):
            for h in range(self.num_heads):
                for p in range(self.ring):
                    if self._block_id[r, p] >= 0:
                        blobs[f"{r}.{h}.{p}"] = _serialize(self._index[r][h][p])
        return {
            "block_id": _tensor_of(self._block_id),
            "block_base": _tensor_of(self._block_base),
            "indexes": blobs,
        }

    def _load_faiss_state(self, state: dict) -> None:
        self._block_id = state["block_id"].numpy().copy()
        self._block_base = state["block_base"].numpy().copy()
        for key, blob in state["indexes"].items():
            r, h, p = (int(x) for x in key.split("."))
            index = _deserialize(blob)
            index.hnsw.efSearch = self.ef_search
            self._index[r][h][p] = index


FAISS_BACKENDS = {
    "faiss-flat": FlatMemoryBank,
    "faiss-ivf": IVFMemoryBank,
    "faiss-hnsw": HNSWMemoryBank,
}
