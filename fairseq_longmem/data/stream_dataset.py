"""Documents as streams: each batch row continues the same stream of documents.

A binarized split is a list of lines; an item of size 1 (only ``</s>``) is an
empty line, i.e. a document separator. :class:`DocumentStream` turns it into
one token array::

    S = [</s>] + doc_0 + doc_1 + ...      (separators removed)

Every token of every document is the target of exactly one input position:
input ``S[p]`` predicts ``S[p+1]``. The input position whose target is a
document's first token (the ``</s>`` that ends the previous document, or the
leading ``</s>``) is that document's *start*: from there on the document must
not see earlier documents' memory.

:class:`StreamBatches` cuts the predictions into ``num_shards * bsz`` streams
of nearly equal length (rank ``r`` reads streams ``r*bsz .. r*bsz+bsz-1``);
batch ``t`` is the ``t``-th window of ``tokens_per_sample`` of every stream.
A stream that begins inside a document starts it afresh (flagged as a start).

For a fairseq memory-mapped split, ``S`` is never materialised:
:class:`MappedTokens` maps stream positions to the ``.bin`` through the
document runs of :mod:`.document_index` and reads each window from the mapping
in its stored dtype, so a rank holds O(documents + streams) in memory.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from .document_index import StreamDataError, scan_split

logger = logging.getLogger(__name__)


class DocumentStream(torch.utils.data.Dataset):
    """The flat token stream of one split and where its documents start.

    tokens: ``S``, ``(N + 1,)``: an int64 numpy array, or :class:`MappedTokens`
    (same ``len`` and slicing, read from disk); doc_starts: sorted input positions
    where a document starts; doc_lengths: target tokens per document.
    """

    def __init__(self, tokens, doc_starts: np.ndarray, name: str = ""):
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.name = name
        ends = np.append(self.doc_starts[1:], len(tokens) - 1)
        self.doc_lengths = ends - self.doc_starts
        self.sizes = np.array([len(tokens) - 1])
        self.num_items = None  # lines of the binarized split, when known

    @classmethod
    def from_mmap(cls, prefixes: Sequence[str], eos: int, name: str = "",
                  use_cache: bool = True) -> "DocumentStream":
        """Build from fairseq memory-mapped splits (``prefix.bin/.idx``; several are
        read as one, like fairseq's ``combine``) without reading their tokens."""
        pieces_kept, pieces_file, pieces_bin, starts = [], [], [], []
        dtypes = []
        base, items, in_run = 0, 0, False
        for f, prefix in enumerate(prefixes):
            scan = scan_split(prefix, eos, use_cache=use_cache)
            dtypes.append(scan.dtype)
            items += scan.num_items
            if scan.num_items == 0:
                continue
            kept = scan.run_kept + base
            is_doc = np.ones(len(kept), dtype=bool)
            if len(kept) and in_run and scan.first_in_run:
                is_doc[0] = False  # the document continues from the previous shard
            pieces_kept.append(kept)
            pieces_file.append(np.full(len(kept), f, dtype=np.int32))
            pieces_bin.append(scan.run_bin)
            starts.append(kept[is_doc])
            in_run = scan.last_in_run
            base += scan.kept_total
        if base == 0:
            raise StreamDataError(
                f"split {name} holds no tokens; binarize a non-empty split "
                "(longmem-preprocess) or choose another --valid-subset/--gen-subset"
            )
        tokens = MappedTokens(
            [p + ".bin" for p in prefixes], dtypes, eos, np.concatenate(pieces_kept),
            np.concatenate(pieces_file), np.concatenate(pieces_bin), base,
        )
        stream = cls(tokens, np.concatenate(starts), name=name)
        stream.num_items = items
        return stream

    @classmethod
    def from_indexed(cls, dataset, eos: int, name: str = "") -> "DocumentStream":
        """Build from a fairseq indexed dataset whose size-1 items separate documents."""
        sizes = np.asarray(dataset.sizes, dtype=np.int64)
        flat = _flat_tokens(dataset, sizes, name)
        sep_items = sizes == 1
        if sep_items.any():
            sep_tok = np.repeat(sep_items, sizes)
            if not np.all(flat[sep_tok] == eos):
                raise StreamDataError(
                    f"corrupt binarized data in {name}: a length-1 item is not an empty line "
                    "(</s>); re-binarize with longmem-preprocess"
                )
            keep = ~sep_tok
            # documents = runs of non-separator items; drop empty runs (double separators)
            doc_of_item = np.cumsum(sep_items)
            doc_ids = doc_of_item[~sep_items]
            first_item = np.ones(len(doc_ids), dtype=bool)
            first_item[1:] = doc_ids[1:] != doc_ids[:-1]
            # token offset (in the compacted array) of each document's first item
            kept_sizes = sizes[~sep_items]
            item_offsets = np.concatenate([[0], np.cumsum(kept_sizes)[:-1]])
            doc_first_token = item_offsets[first_item]
            flat = flat[keep]
        else:
            doc_first_token = np.zeros(1, dtype=np.int64) if len(flat) else np.zeros(0, np.int64)
        if len(flat) == 0:
            raise StreamDataError(
                f"split {name} holds no tokens; binarize a non-empty split "
                "(longmem-preprocess) or choose another --valid-subset/--gen-subset"
            )
        tokens = np.concatenate([[eos], flat]).astype(np.int64)
        # input position predicting a document's first token = its index in S minus 1
        doc_starts = doc_first_token.astype(np.int64)  # (index in flat) + 1 - 1
        stream = cls(tokens, doc_starts, name=name)
        stream.num_items = len(sizes)
        return stream

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    @property
    def num_predictions(self) -> int:
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        raise TypeError("DocumentStream is batched by StreamBatches, not indexed")


class MappedTokens:
    """``S = [</s>] + kept tokens`` of memory-mapped ``.bin`` files, read on demand.

    A *piece* is a run of tokens contiguous in one ``.bin``: piece ``i`` starts at
    kept position ``piece_kept[i]`` (``S`` position + 1) and at token
    ``piece_bin[i]`` of file ``piece_file[i]``; all three are ``(P,)`` with
    P = documents (+ shards). Slicing returns an int64 numpy copy of the window.
    """

    def __init__(self, paths: Sequence[str], dtypes, eos: int, piece_kept: np.ndarray,
                 piece_file: np.ndarray, piece_bin: np.ndarray, num_kept: int):
        self.paths = list(paths)
        self.dtypes = list(dtypes)
        self.eos = int(eos)
        self.piece_kept = piece_kept
        self.piece_file = piece_file
        self.piece_bin = piece_bin
        self.num_kept = int(num_kept)
        self._maps = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None  # workers map the files again
        return state

    def _mapped(self):
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=d, mode="r").view(np.ndarray) if os.path.getsize(p)
                          else np.zeros(0, dtype=d) for p, d in zip(self.paths, self.dtypes)]
        return self._maps

    def __len__(self) -> int:
        return self.num_kept + 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise IndexError("MappedTokens supports contiguous slices only")
            return self.read(a, b)
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return int(self.read(i, i + 1)[0])

    def read(self, a: int, b: int) -> np.ndarray:
        """``S[a:b]`` as an int64 array ``(b - a,)``, ``0 <= a <= b <= len``."""
        b = max(a, b)
        out = np.empty(b - a, dtype=np.int64)
        o = 0
        if a == 0 and b > 0:
            out[0] = self.eos
            o, a = 1, 1
        k, end = a - 1, b - 1  # kept positions
        if k >= end:
            return out
        maps = self._mapped()
        kept, files, bins = self.piece_kept, self.piece_file, self.piece_bin
        i = int(kept.searchsorted(k, side="right")) - 1
        n_pieces = len(kept)
        while k < end:
            stop = int(kept[i + 1]) if i + 1 < n_pieces else self.num_kept
            e = min(stop, end)
            if e > k:
                off = int(bins[i]) + k - int(kept[i])
                out[o:o + e - k] = maps[int(files[i])][off:off + e - k]
                o += e - k
                k = e
            i += 1
        return out


def _flat_tokens(dataset, sizes: np.ndarray, name: str) -> np.ndarray:
    """All tokens of an indexed dataset in order, zero-copy for mmap datasets."""
    total = int(sizes.sum())
    index = getattr(dataset, "_index", None)
    buf = getattr(dataset, "_bin_buffer", None)
    if index is not None and buf is not None and hasattr(index, "dtype"):
        itemsize = np.dtype(index.dtype).itemsize
        if len(buf) != total * itemsize:
            raise StreamDataError(
                f"corrupt binarized data in {name}: .bin holds {len(buf) // itemsize} tokens "
                f"but .idx describes {total}; re-run fairseq-preprocess for this split"
            )
        return np.frombuffer(buf, dtype=index.dtype, count=total).astype(np.int64)
    return np.concatenate([np.asarray(dataset[i]) for i in range(len(dataset))]).astype(np.int64)


class StreamBatches(torch.utils.data.Dataset):
    """Item ``t`` is batch ``t``: the ``t``-th window of each of this rank's streams."""

    def __init__(
        self,
        stream: DocumentStream,
        bsz: int,
        tokens_per_sample: int,
        pad: int,
        num_shards: int = 1,
        shard_id: int = 0,
        memory_scope: str = "document",
        memory_key: str = "default",
    ):
        if bsz < 1 or tokens_per_sample < 1:
            raise StreamDataError("--batch-size and --tokens-per-sample must be >= 1")
        n_streams = bsz * num_shards
        n = stream.num_predictions
        if n < n_streams:
            raise StreamDataError(
                f"split {stream.name} has {n} tokens, fewer than its {n_streams} streams "
                f"(--batch-size {bsz} x {num_shards} ranks); lower --batch-size"
            )
        self.stream = stream
        self.bsz = bsz
        self.tokens_per_sample = tokens_per_sample
        self.pad = pad
        self.memory_scope = memory_scope
        self.memory_key = memory_key
        bounds = np.round(np.linspace(0, n, n_streams + 1)).astype(np.int64)
        mine = slice(shard_id * bsz, shard_id * bsz + bsz + 1)
        self.bounds = bounds[mine]  # (bsz + 1,) input positions [a_j, a_{j+1})
        longest = int(np.max(np.diff(bounds)))
        self.num_batches = -(-longest // tokens_per_sample)
        if memory_scope == "document":
            self.starts = stream.doc_starts  # sorted input positions flagged as starts
        elif memory_scope == "stream":
            self.starts = np.zeros(0, dtype=np.int64)
        else:
            raise StreamDataError(f"--memory-scope must be document or stream, got {memory_scope}")
        # and every stream starts with an empty memory (its first position, in batch 0)
        self.sizes = np.full(self.num_batches, bsz * tokens_per_sample)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, t: int) -> Dict[str, torch.Tensor]:
        return self.segment(t)

    def document_offsets(self, t: int) -> np.ndarray:
        """Per row, ``(bsz,)``: tokens of the row's current memory scope (document,
        or stream) read before batch ``t``, i.e. what its memory has counted
        since its last reset when batch ``t`` begins (0 where the scope starts
        exactly there, or the stream has ended)."""
        first = self.bounds[:-1]  # every stream starts with an empty memory
        a = first + t * self.tokens_per_sample
        i = np.searchsorted(self.starts, a, "right") - 1
        last_doc = np.where(i >= 0, self.starts[np.maximum(i, 0)] if len(self.starts) else -1, -1)
        last = np.maximum(last_doc, first)
        return np.where(a < self.bounds[1:], a - last, 0).astype(np.int64)

    def segment(self, t: int) -> Dict[str, torch.Tensor]:
        """Batch ``t`` alone: inputs, targets and document starts, ``(bsz, T)`` each."""
        T, B = self.tokens_per_sample, self.bsz
        src = np.full((B, T), self.pad, dtype=np.int64)
        tgt = np.full((B, T), self.pad, dtype=np.int64)
        flags = np.zeros((B, T), dtype=bool)
        tokens, starts = self.stream.tokens, self.starts
        for j in range(B):
            a = int(self.bounds[j]) + t * T
            b = min(a + T, int(self.bounds[j + 1]))
            if b > a:
                window = tokens[a : b + 1]  # inputs a..b-1, targets a+1..b
                src[j, : b - a] = window[:-1]
                tgt[j, : b - a] = window[1:]
                lo, hi = starts.searchsorted((a, b))
                flags[j, starts[lo:hi] - a] = True
                if t == 0:
                    flags[j, 0] = True
        return {
            "id": t,
            "src": torch.from_numpy(src),
            "tgt": torch.from_numpy(tgt),
            "doc_start": torch.from_numpy(flags),
        }

    def collater(self, items: List[Dict]) -> Dict:
        assert len(items) == 1, "every item of StreamBatches is a whole batch"
        item = items[0]
        src, tgt = item["src"], item["tgt"]
        B = src.size(0)
        lengths = src.ne(self.pad).sum(1)
        net_input = {
            "src_tokens": src,
            "src_lengths": lengths,
            "doc_start": item["doc_start"],
            "memory_key": self.memory_key,
            # every row starts a document here: the backbone context (if any) is dropped
            "rows_restart": bool(item["doc_start"][:, 0].all()),
        }
        if item["id"] == 0:
            net_input["first_segment"] = True
        if item["id"] == self.num_batches - 1:
            net_input["last_segment"] = True
        return {
            "id": torch.arange(B) + item["id"] * B,
            "segment": item["id"],
            "net_input": net_input,
            "target": tgt,
            "nsentences": B,
            "ntokens": int(tgt.ne(self.pad).sum()),
        }

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def size(self, index: int) -> int:
        return int(self.sizes[index])
