"""The synthetic recall corpus: seeded, the distances asked for, loadable by the stream task."""

import json

import numpy as np
import pytest

from conftest import setup_stream_task
from fairseq_longmem.data.synthetic_recall import (
    RecallCorpusConfig,
    SyntheticCorpusError,
    generate,
    main,
    write_split,
)
from fairseq_longmem.eval.recall import previous_occurrence


def test_same_seed_same_corpus_other_seed_or_split_differs(tmp_path):
    cfg = RecallCorpusConfig(docs=2, doc_tokens=3000, distances=[40, 900], pairs=3)
    a, ra = generate(cfg, "test")
    b, rb = generate(cfg, "test")
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and ra == rb
    c, _ = generate(cfg, "valid")
    d, _ = generate(RecallCorpusConfig(docs=2, doc_tokens=3000, distances=[40, 900], pairs=3,
                                       seed=2), "test")
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    write_split(str(tmp_path / "x"), "test", cfg)
    write_split(str(tmp_path / "y"), "test", cfg)
    for ext in ("bin", "idx"):
        assert (tmp_path / "x" / f"test.{ext}").read_bytes() == (tmp_path / "y" / f"test.{ext}").read_bytes()


def test_recurrences_are_at_the_asked_distances_and_found_by_recall():
    distances = [48, 300, 2500]
    cfg = RecallCorpusConfig(docs=2, doc_tokens=6000, vocab=64, distances=distances, span=24,
                             repeats=3, pairs=4, key_len=8, value_len=2)
    docs, recs = generate(cfg, "test")
    for doc, rec in zip(docs, recs):
        spans = [r for r in rec if r[0] == "span"]
        assert sorted(t - s for _, s, t, _ in spans) == sorted(distances * 3)
        pairs = [r for r in rec if r[0] == "pair"]
        assert len(pairs) == 4 * len(distances)
        dist = previous_occurrence(doc, n=8)
        for kind, s, t, length in rec:
            assert np.array_equal(doc[t:t + length], doc[s:s + length])
            # every copied token after its first 8 has its 8-token context at distance t - s
            assert np.all(dist[t + 8:t + length] == t - s), (kind, s, t)
        # MQAR: each block's queries come back at distance d plus the shuffle offset
        # MQAR: block at distance d, pairs shuffled: offset d + (slot moves) * pair length
        for _, s, t, length in pairs:
            assert min(abs(t - s - d) for d in distances) < 4 * length
            assert min((t - s - d) % length for d in distances) == 0


def test_dense_documents_repeat_within_the_gap_from_a_small_alphabet():
    cfg = RecallCorpusConfig(kind="dense", docs=3, doc_tokens=2000, vocab=64, span=16,
                             span_min=8, max_gap=20, alphabet=6)
    docs, recs = generate(cfg, "train")
    for doc, rec in zip(docs, recs):
        assert len(doc) == 2000 and len(np.unique(doc)) <= 6
        for _, s, t, length in rec:
            assert 8 <= length <= 16 and length <= t - s <= length + 20
            assert np.array_equal(doc[s:s + length], doc[t:t + length])
    docs, recs = generate(RecallCorpusConfig(kind="dense", docs=1, doc_tokens=500, span=6,
                                             span_min=6, max_gap=0, copies=4), "train")
    assert [t - s for _, s, t, _ in recs[0][:3]] == [6, 12, 18]
    assert np.array_equal(docs[0][:6], docs[0][18:24])


def test_dense_documents_mix_small_alphabets_with_the_whole_vocabulary():
    cfg = RecallCorpusConfig(kind="dense", docs=40, doc_tokens=600, vocab=128, span=16,
                             span_min=4, max_gap=4, copies=4, alphabet=8, alphabet_frac=0.5)
    docs, _ = generate(cfg, "train")
    small = [len(np.unique(d)) <= 8 for d in docs]
    assert 8 <= sum(small) <= 32  # about half, each document one or the other
    assert all(len(np.unique(d)) > 32 for d, s in zip(docs, small) if not s)
    again, _ = generate(cfg, "train")
    assert all(np.array_equal(a, b) for a, b in zip(docs, again))
    # share 1 (the default) draws every document from an alphabet, as before
    whole, _ = generate(RecallCorpusConfig(kind="dense", docs=5, doc_tokens=600, vocab=128,
                                           alphabet=8), "train")
    assert all(len(np.unique(d)) <= 8 for d in whole)
    with pytest.raises(SyntheticCorpusError, match="alphabet-frac"):
        generate(RecallCorpusConfig(kind="dense", alphabet=8, alphabet_frac=1.5), "train")
    # the alphabet's documents with their own copies and filler: [x, y, x], y up to 40 tokens
    cfg.alphabet_copies, cfg.alphabet_max_gap = 2, 40
    docs, recs = generate(cfg, "train")
    gaps = {True: [], False: []}
    for doc, rec in zip(docs, recs):
        for _, s, t, length in rec:
            assert np.array_equal(doc[s:s + length], doc[t:t + length])
            gaps[len(np.unique(doc)) <= 8].append(t - s - length)
    assert max(gaps[False]) <= 3 * 16 + 4 and max(gaps[True]) > 20 and max(gaps[True]) <= 40
    assert min(gaps[True]) >= 0


def test_the_stream_task_loads_it(tmp_path):
    out = tmp_path / "data"
    assert main(["--out", str(out), "--split", "test", "--docs", "3", "--doc-tokens", "1500",
                 "--distances", "64,700", "--span", "32", "--repeats", "2"]) == 0
    task = setup_stream_task(out, tokens_per_sample=64)
    task.load_dataset("test")
    stream = task.dataset("test")
    assert list(stream.doc_lengths) == [1501] * 3  # tokens + the line's </s>
    rec = json.loads((out / "test.recurrences.json").read_text())["recurrences"]
    docs, _ = generate(RecallCorpusConfig(docs=3, doc_tokens=1500, distances=[64, 700],
                                          span=32, repeats=2), "test")
    first = stream.tokens[stream.doc_starts[1] + 1:][:1500] - task.source_dictionary.index("s0")
    assert np.array_equal(first, docs[1]) and len(rec) == 3


def test_bad_sizes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SyntheticCorpusError, match="--doc-tokens 1000 cannot hold"):
        generate(RecallCorpusConfig(doc_tokens=1000, distances=[2000]), "test")
    with pytest.raises(SyntheticCorpusError, match="shorter than --span"):
        generate(RecallCorpusConfig(distances=[8], span=32), "test")
    assert main(["--out", str(tmp_path / "d"), "--vocab", "32", "--distances", "64"]) == 0
    assert main(["--out", str(tmp_path / "d"), "--vocab", "40", "--distances", "64"]) == 2
    assert "another vocabulary" in capsys.readouterr().err
