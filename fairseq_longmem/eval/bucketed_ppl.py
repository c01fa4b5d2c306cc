"""Perplexity per document-length bucket, and loss against position.

The paper's long-text table: perplexity of the backbone, MemTRM and LongMem on
PG-22 books grouped by book length (5K-10K, 10K-100K, 100K-500K, 500K-1M, >1M
tokens). Here, for any list of checkpoints over the same binarized split, run
in stream order exactly as ``fairseq-eval-lm`` with the stream task runs them
(:func:`~fairseq_longmem.eval.token_losses.stream_token_losses`).

Buckets are half-open ``[lo, hi)`` ranges of a document's length in target
tokens (the ``</s>`` ending each line included, as the binarized data counts
them). Documents shorter than the first edge go to an explicit ``<5K`` row and
documents of at least the last edge to ``>1M``, so every token is in exactly
one row; a bucket's perplexity is ``exp`` of the mean loss over all its tokens
(token-weighted, like the overall number).

Usage::

    python -m fairseq_longmem.eval.bucketed_ppl --data DIR --split test \\
        --checkpoint backbone=PATH --checkpoint longmem=PATH ... \\
        [--batch-size 1] [--buckets 5000,10000,100000,500000,1000000] \\
        [--tokens-per-sample N] [--max-documents N] [--json bucketed_ppl.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import EvalError
from .cli_common import add_common_args, emit, load_all, run_command
from .model_loading import LoadedModel
from .token_losses import TokenLosses, stream_token_losses

logger = logging.getLogger(__name__)

DEFAULT_EDGES = (5_000, 10_000, 100_000, 500_000, 1_000_000)


def short(n: int) -> str:
    """5000 -> "5K", 1000000 -> "1M", 300 -> "300"."""
    for unit, div in (("M", 1_000_000), ("K", 1_000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    if n >= 1000:
        return f"{n / 1000:g}K"
    return str(n)


def check_edges(edges: Sequence[int]) -> List[int]:
    edges = [int(e) for e in edges]
    if not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise EvalError(f"--buckets {edges}: give positive, strictly increasing token counts")
    return edges


def bucket_labels(edges: Sequence[int]) -> List[str]:
    """``[5000, 10000]`` -> ``["<5K", "5K-10K", ">10K"]`` (len(edges) + 1 labels)."""
    edges = check_edges(edges)
    labels = [f"<{short(edges[0])}"]
    labels += [f"{short(a)}-{short(b)}" for a, b in zip(edges, edges[1:])]
    labels.append(f">{short(edges[-1])}")
    return labels


def bucket_index(lengths: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Bucket of each document length: 0 below the first edge, i for
    ``[edges[i-1], edges[i])``, ``len(edges)`` at or above the last edge."""
    return np.searchsorted(np.asarray(check_edges(edges)), np.asarray(lengths), side="right")


def bucketed_perplexity(losses: TokenLosses, edges: Sequence[int] = DEFAULT_EDGES) -> Dict:
    """``{"buckets": [row...], "overall": row}``; a row has ``label, lo, hi,
    documents, tokens, nll`` (mean natural-log loss) and ``ppl`` (NaN if empty)."""
    edges = check_edges(edges)
    labels = bucket_labels(edges)
    doc_bucket = bucket_index(losses.doc_lengths, edges)
    tok_bucket = doc_bucket[losses.doc] if len(losses.doc) else np.zeros(0, dtype=np.int64)
    bounds = [0] + edges + [None]
    rows = []
    for b, label in enumerate(labels):
        sel = tok_bucket == b
        rows.append(_row(label, bounds[b], bounds[b + 1], int((doc_bucket == b).sum()),
                         losses.nll[sel]))
    overall = _row("overall", 0, None, len(losses.doc_lengths), losses.nll)
    return {"edges": edges, "buckets": rows, "overall": overall}


def _row(label, lo, hi, documents, nll) -> Dict:
    n = int(len(nll))
    mean = float(np.mean(nll)) if n else float("nan")
    return {
        "label": label, "lo": lo, "hi": hi, "documents": documents, "tokens": n,
        "nll": mean, "ppl": float(math.exp(mean)) if n else float("nan"),
    }


def position_bins(max_pos: int, per_decade: int = 4) -> np.ndarray:
    """Log-spaced integer bin edges ``[0, 1, 2, 3, 6, 10, 18, ...]`` covering ``max_pos``."""
    top = max(1, int(max_pos) + 1)
    n = int(math.ceil(math.log10(top) * per_decade)) + 1
    raw = np.round(10 ** (np.arange(n + 1) / per_decade)).astype(np.int64)
    edges = np.unique(np.concatenate([[0], raw]))
    if edges[-1] < top:
        edges = np.append(edges, top)
    edges = edges[: np.searchsorted(edges, top) + 1]
    return edges


def loss_by_position(losses: TokenLosses, edges: Optional[np.ndarray] = None, per_decade: int = 4) -> Dict:
    """Mean loss of the tokens at document positions ``[edges[i], edges[i+1])``.

    Returns ``{"edges": [...], "bins": [{lo, hi, tokens, nll}]}`` (empty bins
    have ``nll`` NaN); use the same edges for every checkpoint of a plot.
    """
    if edges is None:
        edges = position_bins(int(losses.pos.max()) if len(losses.pos) else 0, per_decade)
    edges = np.asarray(edges, dtype=np.int64)
    idx = np.searchsorted(edges, losses.pos, side="right") - 1
    bins = []
    for i in range(len(edges) - 1):
        sel = idx == i
        n = int(sel.sum())
        bins.append({
            "lo": int(edges[i]), "hi": int(edges[i + 1]), "tokens": n,
            "nll": float(losses.nll[sel].mean()) if n else float("nan"),
        })
    return {"edges": [int(e) for e in edges], "bins": bins}


def split_stream(task, split: str, max_documents: Optional[int] = None):
    """The split's :class:`DocumentStream`, optionally cut to its first documents."""
    from .token_losses import document_stream

    task.load_dataset(split)
    stream = task.dataset(split)
    if max_documents is None or max_documents >= len(stream.doc_starts):
        return stream
    starts = list(stream.doc_starts) + [len(stream.tokens) - 1]
    docs = [stream.tokens[starts[i] + 1 : starts[i + 1] + 1] for i in range(max_documents)]
    return document_stream(docs, task.source_dictionary.eos(), name=split)


def evaluate(
    loaded: Sequence[LoadedModel],
    split: str = "test",
    edges: Sequence[int] = DEFAULT_EDGES,
    batch_size: int = 1,
    max_documents: Optional[int] = None,
    per_decade: int = 4,
) -> Dict:
    """Bucketed perplexity and loss-by-position of every loaded checkpoint on ``split``.

    Returns ``{"split", "edges", "documents", "tokens", "models": {name: {...}},
    "position_edges"}``; every model gets the same position bins.
    """
    edges = check_edges(edges)
    per_model, raw = {}, {}
    stream = None
    for lm in loaded:
        stream = split_stream(lm.task, split, max_documents)
        losses = stream_token_losses(lm.model, lm.task, stream, batch_size=batch_size)
        raw[lm.name] = losses
        table = bucketed_perplexity(losses, edges)
        per_model[lm.name] = {
            "path": lm.path, "kind": lm.kind, "tokens_per_sample": lm.tokens_per_sample,
            "memory": lm.uses_memory, **table,
        }
    max_pos = max((int(l.pos.max()) for l in raw.values() if len(l.pos)), default=0)
    pos_edges = position_bins(max_pos, per_decade)
    for name, losses in raw.items():
        per_model[name]["by_position"] = loss_by_position(losses, pos_edges)["bins"]
    lengths = stream.doc_lengths if stream is not None else np.zeros(0)
    return {
        "split": split,
        "edges": edges,
        "labels": bucket_labels(edges),
        "documents": int(len(lengths)),
        "tokens": int(np.sum(lengths)),
        "position_edges": [int(e) for e in pos_edges],
        "models": per_model,
    }


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown_table(result: Dict) -> str:
    """Rows: buckets then overall; columns: documents, tokens, one perplexity per model."""
    names = list(result["models"])
    if not names:
        return "(no checkpoints)\n"
    first = result["models"][names[0]]
    head = "| bucket (doc. tokens) | documents | tokens | " + " | ".join(names) + " |"
    sep = "|---|---:|---:|" + "---:|" * len(names)
    lines = [head, sep]
    for i, row in enumerate(first["buckets"] + [first["overall"]]):
        cells = []
        for n in names:
            rows = result["models"][n]["buckets"] + [result["models"][n]["overall"]]
            cells.append(_fmt(rows[i]["ppl"]))
        label = f"**{row['label']}**" if row["label"] == "overall" else row["label"]
        lines.append(f"| {label} | {row['documents']} | {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def position_table(result: Dict) -> str:
    names = list(result["models"])
    if not names:
        return ""
    head = "| positions | tokens | " + " | ".join(f"{n} loss" for n in names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(names)]
    bins0 = result["models"][names[0]]["by_position"]
    for i, b in enumerate(bins0):
        cells = [_fmt(result["models"][n]["by_position"][i]["nll"]) for n in names]
        lines.append(f"| {b['lo']}-{b['hi'] - 1} | {b['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_by_position(result: Dict, path: str) -> str:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, res in result["models"].items():
        bins = [b for b in res["by_position"] if b["tokens"] > 0]
        xs = [math.sqrt((b["lo"] + 1) * b["hi"]) for b in bins]  # bin centre of position + 1
        ax.plot(xs, [b["nll"] for b in bins], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("position in document + 1 (tokens, log scale)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"loss against position ({result['split']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_buckets(result: Dict, path: str) -> str:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    first = result["models"][names[0]]
    rows = [i for i, r in enumerate(first["buckets"]) if r["tokens"] > 0]
    labels = [first["buckets"][i]["label"] for i in rows] + ["overall"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for j, name in enumerate(names):
        res = result["models"][name]
        vals = [res["buckets"][i]["ppl"] for i in rows] + [res["overall"]["ppl"]]
        ax.bar([x + j * width for x in range(len(labels))], vals, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_xlabel("document length bucket (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity per document-length bucket ({result['split']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ CLI
def parse_edges(text: str) -> List[int]:
    try:
        return check_edges([int(float(x)) for x in text.split(",") if x.strip()])
    except ValueError:
        raise EvalError(f"--buckets {text!r}: give comma-separated token counts") from None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_longmem.eval.bucketed_ppl",
        description="Perplexity per document-length bucket and loss against position.",
    )
    add_common_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=1, help="streams per batch")
    p.add_argument("--buckets", default=",".join(str(e) for e in DEFAULT_EDGES),
                   help="bucket edges in tokens (default 5000,10000,100000,500000,1000000)")
    p.add_argument("--max-documents", type=int, default=None,
                   help="evaluate only the first N documents of the split (quick runs)")
    p.add_argument("--json", default="bucketed_ppl.json",
                   help="write the full result here (default bucketed_ppl.json; '' to skip)")

    def body(args) -> int:
        edges = parse_edges(args.buckets)
        result = evaluate(load_all(args), args.split, edges, args.batch_size, args.max_documents)
        return emit(result, args.json, markdown_table(result), position_table(result))

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
