"""Documents as streams: order, completeness, document starts, sharding, isolation."""

import numpy as np
import pytest
import torch

from conftest import run_fairseq, setup_stream_task, write_split
from fairseq_longmem.data.stream_dataset import DocumentStream, StreamBatches, StreamDataError
from fairseq_longmem.models.memory_lm import segment_boundaries
from fairseq_longmem.modules.memory_bank import MemoryBank

EOS, PAD = 2, 1


class ListDataset:
    """A stand-in for a fairseq indexed dataset: a list of lines (each ending in </s>)."""

    def __init__(self, items):
        self.items = [np.array(i, dtype=np.int64) for i in items]
        self.sizes = np.array([len(i) for i in self.items])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return torch.from_numpy(self.items[i])


def make_docs(lengths, seed=0):
    """Documents of the given token counts (lines end with </s>), recognisable by value:
    document d uses tokens 100*d+4 ..; returns (lines with separators, docs)."""
    rng = np.random.RandomState(seed)
    items, docs = [], []
    for d, n in enumerate(lengths):
        toks = list(100 * d + 4 + rng.randint(0, 90, size=n - 1)) + [EOS]
        docs.append(toks)
        cut = sorted(rng.choice(range(1, n - 1), size=min(2, n - 2), replace=False)) if n > 3 else []
        start = 0
        for c in list(cut) + [n]:
            if c - start >= 2 or c == n:
                items.append(toks[start:c] if toks[c - 1] == EOS else toks[start:c] + [EOS])
                start = c
        if d < len(lengths) - 1:
            items.append([EOS])  # empty line = document separator
    # rebuild docs from items so that line-end eos tokens are counted exactly
    docs, cur = [], []
    for it in items:
        if len(it) == 1:
            docs.append(cur)
            cur = []
        else:
            cur += list(it)
    docs.append(cur)
    return items, docs


def all_batches(stream, bsz, tps, **kw):
    sb = StreamBatches(stream, bsz, tps, PAD, **kw)
    return sb, [sb.collater([sb[i]]) for i in range(len(sb))]


@pytest.mark.parametrize("bsz, tps", [(1, 7), (3, 5), (4, 16), (2, 1)])
def test_every_token_exactly_once_in_order(bsz, tps):
    items, docs = make_docs([23, 5, 40, 3, 17, 9])
    stream = DocumentStream.from_indexed(ListDataset(items), EOS)
    assert len(stream.doc_starts) == len(docs)
    sb, batches = all_batches(stream, bsz, tps)
    rows = [[] for _ in range(bsz)]
    for b in batches:
        for j in range(bsz):
            t = b["target"][j]
            rows[j] += t[t.ne(PAD)].tolist()
    flat = [tok for d in docs for tok in d]
    assert sum(rows, []) == flat  # complete, in order, no duplicate
    lens = [len(r) for r in rows]
    assert max(lens) - min(lens) <= 1  # nearly equal streams


def test_doc_start_flags_at_segment_edges_and_inside():
    items = [[5, 6, EOS], [7, EOS], [EOS], [8, 9, EOS], [EOS], [10, 11, 12, 13, EOS]]
    docs = [[5, 6, EOS, 7, EOS], [8, 9, EOS], [10, 11, 12, 13, EOS]]
    stream = DocumentStream.from_indexed(ListDataset(items), EOS)
    _, batches = all_batches(stream, 1, 4)
    src = torch.cat([b["net_input"]["src_tokens"][0] for b in batches])
    tgt = torch.cat([b["target"][0] for b in batches])
    flags = torch.cat([b["net_input"]["doc_start"][0] for b in batches])
    first_tokens = [d[0] for d in docs]
    starts = flags.nonzero().flatten().tolist()
    # a start is the input position whose target is a document's first token
    assert [tgt[p].item() for p in starts] == first_tokens
    assert starts == [0, 5, 8]  # 5 inside a 4-token segment, 8 at a segment edge
    assert tgt[tgt.ne(PAD)].tolist() == sum(docs, [])
    assert src[0].item() == EOS


def test_document_and_stream_scope():
    items, _ = make_docs([8, 6, 10])
    stream = DocumentStream.from_indexed(ListDataset(items), EOS)
    _, doc_b = all_batches(stream, 1, 4, memory_scope="document")
    _, str_b = all_batches(stream, 1, 4, memory_scope="stream")
    n_doc = sum(int(b["net_input"]["doc_start"].sum()) for b in doc_b)
    n_str = sum(int(b["net_input"]["doc_start"].sum()) for b in str_b)
    assert (n_doc, n_str) == (3, 1)


def test_sharding_two_ranks_disjoint_and_complete():
    items, docs = make_docs([30, 12, 44, 7, 25])
    stream = DocumentStream.from_indexed(ListDataset(items), EOS)
    seen = {}
    n_batches = set()
    for rank in range(2):
        sb, batches = all_batches(stream, 2, 8, num_shards=2, shard_id=rank)
        n_batches.add(len(sb))
        for j in range(2):
            seen[rank * 2 + j] = sum(
                (b["target"][j][b["target"][j].ne(PAD)].tolist() for b in batches), []
            )
    assert len(n_batches) == 1  # every rank runs the same number of steps
    assert sum((seen[i] for i in range(4)), []) == [t for d in docs for t in d]
    # the 1-process run with the global batch reads the same streams
    _, single = all_batches(stream, 4, 8)
    for j in range(4):
        assert sum((b["target"][j][b["target"][j].ne(PAD)].tolist() for b in single), []) == seen[j]


def test_document_scope_memory_never_returns_another_documents_keys():
    """Keys and values carry the document id; the real boundary logic and memory bank
    must only ever return pairs of the querying token's own document."""
    lengths = [37, 9, 64, 5, 22, 51, 13, 30]
    items, docs = make_docs(lengths, seed=3)
    stream = DocumentStream.from_indexed(ListDataset(items), EOS)
    bsz, tps = 3, 8
    sb, batches = all_batches(stream, bsz, tps)
    # document id of every input position of the stream, with stream cuts = new "documents"
    doc_of = np.zeros(len(stream.tokens), dtype=np.int64)
    marks = np.zeros(len(stream.tokens), dtype=np.int64)
    marks[stream.doc_starts] = 1
    marks[sb.bounds[:-1]] = 1
    doc_of = np.cumsum(marks)
    bank = MemoryBank(bsz, 1, 4, memory_size=16, chunk_size=2)
    reads = 0
    for t, b in enumerate(batches):
        src = b["net_input"]["src_tokens"]
        ids = torch.full((bsz, tps), -1.0)
        for j in range(bsz):
            a = sb.bounds[j] + t * tps
            e = min(a + tps, sb.bounds[j + 1])
            ids[j, : max(0, e - a)] = torch.from_numpy(doc_of[a:e]).float()
        keys = torch.ones(bsz, 1, tps, 4)
        values = ids[:, None, :, None].expand(bsz, 1, tps, 4).clone()
        qm, reset, start, end = segment_boundaries(b["net_input"]["doc_start"], src, PAD)
        got = bank.search(torch.ones(bsz, 1, tps, 4), 4, qm)
        for j in range(bsz):
            for p in range(tps):
                ok = got.mask[j, 0, p]
                if ok.any() and ids[j, p] >= 0:  # (padding past a stream's end is ignored)
                    reads += 1
                    assert torch.all(got.values[j, 0, p][ok][:, 0] == ids[j, p])
        bank.reset(reset)
        bank.write(keys, values, start, end)
    assert reads > 50  # memory was really read


def test_bad_split_inputs(tiny_data, tmp_path):
    task = setup_stream_task(tiny_data)
    with pytest.raises(StreamDataError, match="split 'nosuch' not found"):
        task.load_dataset("nosuch")
    with pytest.raises(StreamDataError, match="no dict.txt"):
        setup_stream_task(tmp_path)
    # a split without document boundaries
    (tmp_path / "one.txt").write_text("a b c\nd e f\n")
    run_fairseq("preprocess", ["--only-source", "--trainpref", tmp_path / "one.txt",
                               "--destdir", tmp_path / "bin", "--srcdict", tiny_data / "dict.txt"])
    task = setup_stream_task(tmp_path / "bin")
    with pytest.raises(StreamDataError, match="no document boundaries"):
        task.load_dataset("train")
    task = setup_stream_task(tmp_path / "bin", allow_single_document=True)
    task.load_dataset("train")
    # corrupt binarized data: truncate the .bin
    binf = tmp_path / "bin" / "train.bin"
    binf.write_bytes(binf.read_bytes()[:-4])
    with pytest.raises(StreamDataError, match="corrupt binarized data"):
        setup_stream_task(tmp_path / "bin", allow_single_document=True).load_dataset("train")
    # more streams than tokens
    stream = DocumentStream.from_indexed(ListDataset([[5, EOS]]), EOS)
    with pytest.raises(StreamDataError, match="fewer than its"):
        StreamBatches(stream, 4, 8, PAD)


def test_task_batches_from_binarized_data(tiny_data):
    task = setup_stream_task(tiny_data, tokens_per_sample=16)
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=2).next_epoch_itr(shuffle=False)
    n_tokens = sum(b["ntokens"] for b in itr)
    assert n_tokens == task.dataset("valid").num_predictions
    assert len(task.dataset("valid").doc_starts) == 4


def test_several_data_directories_one_per_epoch(tiny_data, tmp_path):
    """DATA=dir1:dir2 (a corpus binarized in shards): epoch e reads dir ((e-1) mod 2)."""
    import shutil

    second = tmp_path / "shard2"
    second.mkdir()
    shutil.copy(tiny_data / "dict.txt", second / "dict.txt")
    for ext in ("bin", "idx"):  # shard 2's train split = the fixture's test split
        shutil.copy(tiny_data / f"test.{ext}", second / f"train.{ext}")
    task = setup_stream_task(f"{tiny_data}:{second}")
    sizes = {}
    for epoch in (1, 2, 3):
        task.load_dataset("train", epoch=epoch)
        sizes[epoch] = task.dataset("train").num_predictions
    one = setup_stream_task(tiny_data)
    one.load_dataset("train")
    one.load_dataset("test")
    assert sizes == {1: one.dataset("train").num_predictions,
                     2: one.dataset("test").num_predictions,
                     3: one.dataset("train").num_predictions}
    # a shard binarized with another dictionary is refused before training
    other = tmp_path / "other"
    other.mkdir()
    lines = (tiny_data / "dict.txt").read_text().splitlines()
    (other / "dict.txt").write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    with pytest.raises(StreamDataError, match="dictionary of .*other differs"):
        setup_stream_task(f"{tiny_data}:{second}:{other}")
    with pytest.raises(StreamDataError, match="no dict.txt in .*nosuch"):
        setup_stream_task(f"{tiny_data}:{tmp_path / 'nosuch'}")


def test_resume_under_another_stream_layout_is_refused(tiny_data):
    """The iterator state saved in checkpoints records the streams; resuming mid-epoch
    with another number of streams stops with a clear error (same streams: resumes)."""
    task = setup_stream_task(tiny_data, tokens_per_sample=16)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    itr = task.get_batch_iterator(ds, max_sentences=2, num_shards=2, shard_id=0)
    it = itr.next_epoch_itr(shuffle=False)
    next(it), next(it)
    state = itr.state_dict()
    assert state["iterations_in_epoch"] == 2 and state["stream_layout"]["streams"] == 4
    same = task.get_batch_iterator(ds, max_sentences=1, num_shards=4, shard_id=3)
    same.load_state_dict(state)  # 4 ranks x 1 stream = the same 4 streams
    assert same.iterations_in_epoch == 2
    with pytest.raises(StreamDataError, match="over 4 streams .* this run has 2 streams"):
        task.get_batch_iterator(ds, max_sentences=2, num_shards=1).load_state_dict(state)
    longer = setup_stream_task(tiny_data, tokens_per_sample=32)
    longer.load_dataset("valid")
    with pytest.raises(StreamDataError, match="--reset-dataloader"):
        longer.get_batch_iterator(longer.dataset("valid"), max_sentences=2,
                                  num_shards=2).load_state_dict(state)
    # at an epoch boundary the streams start afresh: any layout may continue
    fresh = task.get_batch_iterator(ds, max_sentences=2, num_shards=1)
    fresh.load_state_dict(dict(state, iterations_in_epoch=0, epoch=2))
    assert fresh.next_epoch_idx == 2
