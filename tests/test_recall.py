"""Recall by distance: the recurrence finder against a slow reference, the buckets, the CLI."""

import json

import numpy as np
import pytest

from fairseq_longmem.eval import EvalError
from fairseq_longmem.eval.recall import (
    bucket_labels,
    distance_edges,
    previous_occurrence,
    recall_table,
)
from fairseq_longmem.eval.token_losses import TokenLosses


def slow_previous_occurrence(doc, n, with_token=False):
    out = np.zeros(len(doc), dtype=np.int64)
    e = 1 if with_token else 0
    for p in range(n, len(doc)):
        for q in range(p - 1, n - 1, -1):
            if list(doc[q - n:q + e]) == list(doc[p - n:p + e]):
                out[p] = p - q
                break
    return out


@pytest.mark.parametrize("n,vocab", [(1, 3), (2, 3), (3, 4), (8, 2)])
def test_previous_occurrence_matches_slow_reference(n, vocab):
    rng = np.random.default_rng(n)
    for length in (0, n, n + 1, 60):
        doc = rng.integers(0, vocab, length)
        for w in (False, True):
            assert np.array_equal(previous_occurrence(doc, n, w), slow_previous_occurrence(doc, n, w))


def test_previous_occurrence_finds_a_copied_span_and_big_ids():
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 10**9, 5000)  # large ids: contexts compared exactly, not hashed
    doc[4000:4100] = doc[1000:1100]
    d = previous_occurrence(doc, 8)
    # positions 4008..4100: the context lies in the copy (4100: its last 8 tokens)
    assert np.all(d[4008:4101] == 3000) and d[:4008].sum() == 0 and d[4101:].sum() == 0
    # with the token: 4100 follows the copy, the token after its context differs
    dt = previous_occurrence(doc, 8, with_token=True)
    assert np.all(dt[4008:4100] == 3000) and dt[4100:].sum() == 0
    with pytest.raises(EvalError, match="at least 1"):
        previous_occurrence(doc, 0)


def test_edges_follow_window_and_memory():
    assert distance_edges(128, 65536) == [128, 512, 8192, 32768, 65536]
    assert bucket_labels(distance_edges(128, 65536)) == [
        "1-128", "128-512", "512-8K", "8K-32K", "32K-64K", ">=64K"]
    assert distance_edges(128, 8192) == [128, 512, 8192]  # 8K-32K and 32K-M dropped
    assert distance_edges(256, 512) == [256, 512]
    assert distance_edges(64, 64) == [64]


def test_recall_table_rows_partition_the_tokens():
    dist = np.array([0, 0, 5, 200, 70000, 3, 0, 9000])
    context = np.array([0, 1, 1, 1, 1, 1, 0, 1], dtype=bool)
    correct = np.array([0, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    nll = np.arange(8, dtype=float)
    losses = TokenLosses(nll, np.zeros(8, int), np.arange(8), np.array([8]), correct)
    t = recall_table(losses, dist, context, distance_edges(128, 65536))
    counts = [r["tokens"] for r in t["buckets"]]
    assert counts == [2, 1, 0, 1, 0, 1] and t["other"]["tokens"] == 2
    assert t["context_only"]["tokens"] == 1 and t["context_only"]["top1"] == 1.0
    local = t["buckets"][0]
    assert local["top1"] == 0.5 and local["nll"] == pytest.approx((2 + 5) / 2)
    assert t["buckets"][-1]["top1"] == 0.0 and t["other"]["top1"] == 0.5
    assert t["overall"]["tokens"] == 8
    with pytest.raises(EvalError, match="distances for"):
        recall_table(losses, dist[:3], context[:3], [128])
