"""Streams read straight from fairseq's memory-mapped data are the batches of the
former in-memory implementation (kept below as the reference), token for token;
the document index is cached beside the data and checked."""

import os
import pickle

import numpy as np
import pytest
import torch
from fairseq.data import data_utils
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

from conftest import setup_stream_task
from fairseq_longmem.data.document_index import cache_path, scan_split
from fairseq_longmem.data.stream_dataset import DocumentStream, StreamBatches, StreamDataError

EOS, PAD = 2, 1


# ---------------------------------------------------------------------------------------
# reference: the in-memory implementation this replaces (fairseq_longmem 2024-xx, verbatim
# but for names): S = [eos] + all tokens as int64, a per-token bool array of starts.
class RefDocumentStream:
    def __init__(self, tokens, doc_starts):
        self.tokens = tokens
        self.doc_starts = doc_starts
        ends = np.append(doc_starts[1:], len(tokens) - 1)
        self.doc_lengths = ends - doc_starts

    @classmethod
    def from_indexed(cls, dataset, eos):
        sizes = np.asarray(dataset.sizes, dtype=np.int64)
        flat = np.concatenate([np.asarray(dataset[i]) for i in range(len(dataset))]).astype(np.int64)
        sep_items = sizes == 1
        if sep_items.any():
            sep_tok = np.repeat(sep_items, sizes)
            if not np.all(flat[sep_tok] == eos):
                raise StreamDataError("corrupt binarized data")
            keep = ~sep_tok
            doc_of_item = np.cumsum(sep_items)
            doc_ids = doc_of_item[~sep_items]
            first_item = np.ones(len(doc_ids), dtype=bool)
            first_item[1:] = doc_ids[1:] != doc_ids[:-1]
            kept_sizes = sizes[~sep_items]
            item_offsets = np.concatenate([[0], np.cumsum(kept_sizes)[:-1]])
            doc_first_token = item_offsets[first_item]
            flat = flat[keep]
        else:
            doc_first_token = np.zeros(1, dtype=np.int64) if len(flat) else np.zeros(0, np.int64)
        if len(flat) == 0:
            raise StreamDataError("holds no tokens")
        tokens = np.concatenate([[eos], flat]).astype(np.int64)
        return cls(tokens, doc_first_token.astype(np.int64))


class RefStreamBatches:
    def __init__(self, stream, bsz, tokens_per_sample, pad, num_shards=1, shard_id=0,
                 memory_scope="document"):
        n_streams = bsz * num_shards
        n = len(stream.tokens) - 1
        self.stream, self.bsz, self.tokens_per_sample, self.pad = stream, bsz, tokens_per_sample, pad
        bounds = np.round(np.linspace(0, n, n_streams + 1)).astype(np.int64)
        self.bounds = bounds[shard_id * bsz: shard_id * bsz + bsz + 1]
        self.num_batches = -(-int(np.max(np.diff(bounds))) // tokens_per_sample)
        starts = np.zeros(len(stream.tokens), dtype=bool)
        if memory_scope == "document":
            starts[stream.doc_starts] = True
        starts[bounds[:-1]] = True
        self.starts = starts

    def segment(self, t):
        T, B = self.tokens_per_sample, self.bsz
        src = np.full((B, T), self.pad, dtype=np.int64)
        tgt = np.full((B, T), self.pad, dtype=np.int64)
        flags = np.zeros((B, T), dtype=bool)
        for j in range(B):
            a = self.bounds[j] + t * T
            b = min(a + T, self.bounds[j + 1])
            if b > a:
                src[j, : b - a] = self.stream.tokens[a:b]
                tgt[j, : b - a] = self.stream.tokens[a + 1: b + 1]
                flags[j, : b - a] = self.starts[a:b]
        return {"id": t, "src": torch.from_numpy(src), "tgt": torch.from_numpy(tgt),
                "doc_start": torch.from_numpy(flags)}
# ---------------------------------------------------------------------------------------


def write_mmap(prefix, items, dtype=np.uint16):
    """A real fairseq mmap split (``prefix.bin/.idx``) of the given lines."""
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for it in items:
        builder.add_item(torch.tensor(it, dtype=torch.int64))
    builder.finalize(prefix + ".idx")


def random_items(rng, n_docs, max_lines=5, max_len=30, vocab=3000):
    """Lines of random documents separated by empty lines, with the odd cases: leading,
    trailing and doubled separators, one-token lines, and sometimes none at all."""
    items = []
    if rng.rand() < 0.3:
        items.append([EOS])
    for d in range(n_docs):
        for _ in range(rng.randint(1, max_lines + 1)):
            n = rng.randint(1, max_len)
            items.append(list(rng.randint(4, vocab, size=n)) + [EOS])
        if d < n_docs - 1 or rng.rand() < 0.3:
            items.append([EOS])
            if rng.rand() < 0.2:
                items.append([EOS])
    return items


def assert_same_batches(new, ref, configs):
    np.testing.assert_array_equal(new.doc_starts, ref.doc_starts)
    np.testing.assert_array_equal(new.doc_lengths, ref.doc_lengths)
    assert len(new.tokens) == len(ref.tokens)
    np.testing.assert_array_equal(new.tokens[0:len(new.tokens)], ref.tokens)
    for bsz, shards, tps, scope in configs:
        if bsz * shards > len(ref.tokens) - 1:
            continue
        for shard in range(shards):
            a = StreamBatches(new, bsz, tps, PAD, shards, shard, memory_scope=scope)
            b = RefStreamBatches(ref, bsz, tps, PAD, shards, shard, memory_scope=scope)
            assert len(a) == b.num_batches
            for t in range(len(a)):
                x, y = a.segment(t), b.segment(t)
                for key in ("src", "tgt", "doc_start"):
                    assert torch.equal(x[key], y[key]), (bsz, shards, tps, scope, shard, t, key)


CONFIGS = [(1, 1, 7, "document"), (3, 1, 5, "document"), (2, 2, 16, "document"),
           (4, 2, 3, "stream"), (2, 3, 1, "document"), (8, 1, 64, "document")]


@pytest.mark.parametrize("seed", range(12))
def test_random_splits_token_for_token(tmp_path, seed):
    rng = np.random.RandomState(seed)
    n_shards = 1 + seed % 3
    prefixes = []
    for k in range(n_shards):
        prefix = str(tmp_path / ("train" + (str(k) if k else "")))
        dtype = np.uint16 if seed % 2 else np.int32
        write_mmap(prefix, random_items(rng, rng.randint(1, 9)), dtype=dtype)
        prefixes.append(prefix)
    ref_data = data_utils.load_indexed_dataset(prefixes[0], None, combine=True)
    ref = RefDocumentStream.from_indexed(ref_data, EOS)
    new = DocumentStream.from_mmap(prefixes, EOS)
    assert new.num_items == len(ref_data)
    assert_same_batches(new, ref, CONFIGS)
    again = DocumentStream.from_mmap(prefixes, EOS)  # now from the cache
    assert all(os.path.isfile(cache_path(p)) for p in prefixes)
    assert_same_batches(again, ref, CONFIGS[:2])


def test_no_separator_and_separator_only_splits(tmp_path):
    p = str(tmp_path / "one")
    write_mmap(p, [[5, 6, EOS], [7, EOS], [9, 9, 9, EOS]])
    ref = RefDocumentStream.from_indexed(data_utils.load_indexed_dataset(p, None), EOS)
    assert_same_batches(DocumentStream.from_mmap([p], EOS), ref, CONFIGS)
    q = str(tmp_path / "seps")
    write_mmap(q, [[EOS], [EOS]])
    with pytest.raises(StreamDataError, match="holds no tokens"):
        DocumentStream.from_mmap([q], EOS)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_fixture_splits_through_the_task(tiny_data, split):
    task = setup_stream_task(tiny_data)
    task.load_dataset(split, combine=True)
    new = task.dataset(split)
    assert type(new.tokens).__name__ == "MappedTokens"  # nothing copied into memory
    ref = RefDocumentStream.from_indexed(
        data_utils.load_indexed_dataset(os.path.join(tiny_data, split), None), EOS)
    assert_same_batches(new, ref, [(1, 1, 32, "document"), (4, 2, 32, "document"),
                                   (3, 1, 100, "stream")])


def test_separator_that_is_not_eos_is_an_error(tmp_path):
    p = str(tmp_path / "bad")
    write_mmap(p, [[5, 6, EOS], [EOS], [7, 8, EOS], [9], [4, EOS]])
    with pytest.raises(StreamDataError, match="length-1 item at .bin token 7 is not"):
        DocumentStream.from_mmap([p], EOS)


def test_cache_is_rebuilt_when_the_data_changes(tmp_path):
    p = str(tmp_path / "train")
    write_mmap(p, [[5, EOS], [EOS], [6, 7, EOS]])
    assert len(scan_split(p, EOS).run_kept) == 2
    first = os.stat(cache_path(p)).st_mtime_ns
    assert len(scan_split(p, EOS).run_kept) == 2
    assert os.stat(cache_path(p)).st_mtime_ns == first  # reused
    write_mmap(p, [[5, EOS], [EOS], [6, 7, EOS], [EOS], [8, EOS]])
    assert len(scan_split(p, EOS).run_kept) == 3  # stale cache ignored
    with pytest.raises(StreamDataError, match="length-1 item"):
        scan_split(p, 5)  # another eos id is another cache key


def test_truncated_index_is_an_error(tmp_path):
    p = str(tmp_path / "train")
    write_mmap(p, [[5, EOS], [EOS], [6, 7, EOS]])
    with open(p + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(p + ".idx") - 8)
    with pytest.raises(StreamDataError, match="corrupt binarized data.*truncated index"):
        DocumentStream.from_mmap([p], EOS)


def test_mapped_tokens_pickle_and_index(tmp_path):
    p = str(tmp_path / "train")
    items = [[5, 6, EOS], [EOS], [7, 8, 9, EOS]]
    write_mmap(p, items)
    stream = pickle.loads(pickle.dumps(DocumentStream.from_mmap([p], EOS)))
    assert stream.tokens[0:len(stream.tokens)].tolist() == [EOS, 5, 6, EOS, 7, 8, 9, EOS]
    assert stream.tokens[4] == 7 and stream.tokens[-1] == EOS
    assert stream.tokens[3:5].dtype == np.int64
