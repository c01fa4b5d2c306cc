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
"""

from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np
import torch
from ..errors import LongMemError

logger = logging.getLogger(__name__)


class StreamDataError(LongMemError):
    """Bad data for the stream task (message names the fix)."""


class DocumentStream(torch.utils.data.Dataset):
    """The flat token stream of one split and where its documents start.

    tokens: ``(N + 1,)`` int64 numpy array ``S``; doc_starts: sorted input
    positions where a document starts; doc_lengths: target tokens per document.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, name: str = ""):
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.name = name
        ends = np.append(doc_starts[1:], len(tokens) - 1)
        self.doc_lengths = ends - doc_starts
        self.sizes = np.array([len(tokens) - 1])

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
                    "(</s>); re-binarize with preprocess/prepare_corpus.py"
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
                "(preprocess/prepare_corpus.py) or choose another --valid-subset/--gen-subset"
            )
        tokens = np.concatenate([[eos], flat]).astype(np.int64)
        # input position predicting a document's first token = its index in S minus 1
        doc_starts = doc_first_token.astype(np.int64)  # (index in flat) + 1 - 1
        return cls(tokens, doc_starts, name=name)

    @property
    def num_predictions(self) -> int:
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        raise TypeError("DocumentStream is batched by StreamBatches, not indexed")


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
        self.all_bounds = bounds
        mine = slice(shard_id * bsz, shard_id * bsz + bsz + 1)
        self.bounds = bounds[mine]  # (bsz + 1,) input positions [a_j, a_{j+1})
        longest = int(np.max(np.diff(bounds)))
        self.num_batches = -(-longest // tokens_per_sample)
        starts = np.zeros(len(stream.tokens), dtype=bool)
        if memory_scope == "document":
            starts[stream.doc_starts] = True
        elif memory_scope != "stream":
            raise StreamDataError(f"--memory-scope must be document or stream, got {memory_scope}")
        starts[bounds[:-1]] = True  # every stream starts with an empty memory
        self.starts = starts
        self.sizes = np.full(self.num_batches, bsz * tokens_per_sample)
        self._start_positions: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, t: int) -> Dict[str, torch.Tensor]:
        return self.segment(t)

    def document_offsets(self, t: int) -> np.ndarray:
        """Per row, ``(bsz,)``: tokens of the row's current memory scope (document,
        or stream) read before batch ``t``, i.e. what its memory has counted
        since its last reset when batch ``t`` begins (0 where the scope starts
        exactly there, or the stream has ended)."""
        if self._start_positions is None:
            self._start_positions = np.flatnonzero(self.starts)
        a = self.bounds[:-1] + t * self.tokens_per_sample
        last = self._start_positions[np.searchsorted(self._start_positions, a, "right") - 1]
        return np.where(a < self.bounds[1:], a - last, 0).astype(np.int64)

    def segment(self, t: int) -> Dict[str, torch.Tensor]:
        """Batch ``t`` alone: inputs, targets and document starts, ``(bsz, T)`` each."""
        T, B = self.tokens_per_sample, self.bsz
        src = np.full((B, T), self.pad, dtype=np.int64)
        tgt = np.full((B, T), self.pad, dtype=np.int64)
        flags = np.zeros((B, T), dtype=bool)
        for j in range(B):
            a = self.bounds[j] + t * T
            b = min(a + T, self.bounds[j + 1])
            if b > a:
                src[j, : b - a] = self.stream.tokens[a:b]
                tgt[j, : b - a] = self.stream.tokens[a + 1 : b + 1]
                flags[j, : b - a] = self.starts[a:b]
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
