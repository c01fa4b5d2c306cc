"""Bucketed perplexity: tokens land in the right buckets, the buckets add up to the whole."""

import json
import math
import re

import numpy as np
import pytest

from conftest import PLUGIN_DIR, run_fairseq
from fairseq_longmem.eval import bucketed_ppl as bp
from fairseq_longmem.eval import EvalError
from fairseq_longmem.eval.model_loading import load_for_eval, parse_checkpoints
from fairseq_longmem.eval.token_losses import TokenLosses, stream_token_losses


def constructed(doc_lengths, tokens_per_doc=3, seed=0):
    """TokenLosses with a few scored tokens per document (loss = known values)."""
    rng = np.random.RandomState(seed)
    doc = np.repeat(np.arange(len(doc_lengths)), tokens_per_doc)
    pos = np.tile(np.arange(tokens_per_doc), len(doc_lengths))
    nll = rng.uniform(0.5, 6.0, size=len(doc))
    return TokenLosses(nll, doc, pos, np.asarray(doc_lengths, dtype=np.int64))


def test_labels_and_half_open_buckets():
    assert bp.bucket_labels(bp.DEFAULT_EDGES) == [
        "<5K", "5K-10K", "10K-100K", "100K-500K", "500K-1M", ">1M"]
    lengths = [10, 4999, 5000, 9999, 10000, 99999, 100000, 499999, 500000, 999999,
               1000000, 3000000]
    assert bp.bucket_index(np.array(lengths), bp.DEFAULT_EDGES).tolist() == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(EvalError):
        bp.check_edges([10, 5])


def test_tokens_go_to_their_documents_bucket_and_nothing_is_dropped():
    lengths = [100, 6000, 7000, 50000, 200000, 700000, 2000000]
    losses = constructed(lengths, tokens_per_doc=4)
    res = bp.bucketed_perplexity(losses, bp.DEFAULT_EDGES)
    rows = {r["label"]: r for r in res["buckets"]}
    expect_docs = {"<5K": [0], "5K-10K": [1, 2], "10K-100K": [3], "100K-500K": [4],
                   "500K-1M": [5], ">1M": [6]}
    for label, docs in expect_docs.items():
        sel = np.isin(losses.doc, docs)
        assert rows[label]["documents"] == len(docs)
        assert rows[label]["tokens"] == int(sel.sum())
        assert rows[label]["ppl"] == pytest.approx(math.exp(losses.nll[sel].mean()), rel=1e-12)
    assert sum(r["tokens"] for r in res["buckets"]) == len(losses.nll)
    assert sum(r["documents"] for r in res["buckets"]) == len(lengths)
    # the token-weighted buckets give back the overall perplexity
    tot = sum(r["tokens"] * r["nll"] for r in res["buckets"] if r["tokens"])
    assert math.exp(tot / len(losses.nll)) == pytest.approx(res["overall"]["ppl"], rel=1e-12)
    assert res["overall"]["ppl"] == pytest.approx(losses.perplexity, rel=1e-12)


def test_custom_edges_and_empty_buckets():
    losses = constructed([5, 10, 50, 100, 150])
    res = bp.bucketed_perplexity(losses, [10, 100, 1000])
    assert [r["label"] for r in res["buckets"]] == ["<10", "10-100", "100-1K", ">1K"]
    assert [r["documents"] for r in res["buckets"]] == [1, 2, 2, 0]
    assert math.isnan(res["buckets"][3]["ppl"]) and res["buckets"][3]["tokens"] == 0
    table = bp.markdown_table({"models": {"m": res}})
    assert "| >1K | 0 | 0 | - |" in table and "**overall**" in table


def test_loss_by_position_bins_cover_every_token():
    losses = constructed([4000, 4000], tokens_per_doc=1500)
    edges = bp.position_bins(int(losses.pos.max()))
    assert edges[0] == 0 and edges[-1] > losses.pos.max()
    assert np.all(np.diff(edges) > 0)
    ratios = edges[2:] / np.maximum(edges[1:-1], 1)
    assert ratios.max() < 2.5  # log-spaced (4 per decade)
    res = bp.loss_by_position(losses, edges)
    assert sum(b["tokens"] for b in res["bins"]) == len(losses.nll)
    first = res["bins"][0]
    assert first["lo"] == 0 and first["nll"] == pytest.approx(losses.nll[losses.pos == 0].mean())


def test_checkpoint_specs():
    specs = parse_checkpoints(["a=x.pt", "b=y.pt"], ["b.use_external_memory=false", "*.k=8"])
    assert [(s.name, s.path) for s in specs] == [("a", "x.pt"), ("b", "y.pt")]
    assert specs[1].overrides == {"use_external_memory": False, "k": 8}
    assert specs[0].overrides == {"k": 8}
    with pytest.raises(EvalError):
        parse_checkpoints(["a=x", "a=y"])


def test_backbone_overall_matches_stream_losses_and_fairseq_eval_lm(tiny_backbone, tiny_data, tmp_path):
    lm = load_for_eval(str(tiny_backbone), data=str(tiny_data), tokens_per_sample=32,
                       device="cpu", name="backbone")
    assert lm.kind == "lm" and not lm.uses_memory
    res = bp.evaluate([lm], "valid", [300, 1500], batch_size=2)
    row = res["models"]["backbone"]
    stream = lm.task.dataset("valid")
    direct = stream_token_losses(lm.model, lm.task, stream, batch_size=2)
    assert row["overall"]["ppl"] == pytest.approx(direct.perplexity, rel=1e-9)
    assert row["overall"]["tokens"] == stream.num_predictions
    assert sum(r["tokens"] for r in row["buckets"]) == stream.num_predictions
    # the same number fairseq-eval-lm prints for the same stream task
    proc = run_fairseq("eval_lm", [tiny_data, "--user-dir", PLUGIN_DIR, "--task",
                                   "longmem_language_modeling", "--path", tiny_backbone,
                                   "--tokens-per-sample", 32, "--batch-size", 2, "--cpu",
                                   "--gen-subset", "valid"])
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", proc.stdout + proc.stderr).group(1))
    assert row["overall"]["ppl"] == pytest.approx(ppl, abs=0.006)

    # the command line: markdown table + JSON
    out = tmp_path / "b.json"
    rc = bp.main(["--data", str(tiny_data), "--split", "valid", "--checkpoint",
                  f"backbone={tiny_backbone}", "--tokens-per-sample", "32", "--batch-size", "2",
                  "--buckets", "300,1500", "--cpu", "--json", str(out), "--max-documents", "2"])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["labels"] == ["<300", "300-1.5K", ">1.5K"]
    assert saved["documents"] == 2
    assert saved["models"]["backbone"]["by_position"]
