"""Recall by distance: how well each model predicts text that recurs from far back.

In held-out documents, a token is *recurring* when it and the ``n`` tokens
before it (its context, ``n = 8`` by default) occurred earlier in the same
document, so that copying what followed the earlier context predicts it. Its
*distance* is the gap to the most recent earlier occurrence (target position
minus the position of the earlier token). Recurring tokens are
bucketed by distance against the model's local window ``W`` and memory size
``M``::

    [1, W)  [W, 4W)  [4W, 8K)  [8K, 32K)  [32K, M)  [M, inf)

(edges at or above ``M`` are dropped, so a smaller memory keeps meaningful
buckets, and ``[M, inf)`` is always "beyond the memory"). Every other token is
split in two more rows: tokens whose context recurred with another token
after it (copying would mislead), and the rest. Per row and model: count,
loss, perplexity and top-1 accuracy.

A memory of ``M`` tokens holds the ``M`` tokens before the current segment, so
a token at distance ``d`` is in the local window when ``d`` is at most its
offset in the segment, in memory up to ``M`` beyond that, and evicted later:
``[M, M + W)`` is partly still in memory. The models run in stream order
exactly as ``fairseq-eval-lm`` runs them with the stream task
(:func:`~.token_losses.stream_token_losses`).

Usage::

    longmem-recall --data DIR --split test --checkpoint backbone=PATH \\
        --checkpoint ablation=PATH --checkpoint longmem=PATH \\
        [--override '*.memory_size=65536'] [--n 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import EvalError
from .cli_common import add_common_args, load_all, run_command, write_json
from .token_losses import TokenLosses, document_stream, stream_token_losses

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ recurrences
def previous_occurrence(doc: np.ndarray, n: int = 8, with_token: bool = False) -> np.ndarray:
    """Distance of each token of ``doc`` ``(L,)`` to the most recent earlier
    occurrence of its ``n``-token context: ``p - q`` for the largest ``q < p``
    with ``doc[q-n:q] == doc[p-n:p]`` (and, with ``with_token``, also
    ``doc[q] == doc[p]``: the token recurs with its context); 0 where there is
    none (``p < n`` or a new context). Exact (compared as bytes), O(L log L)."""
    if n < 1:
        raise EvalError(f"--n {n}: the context must be at least 1 token")
    doc = np.ascontiguousarray(doc, dtype=np.int64)
    L = len(doc)
    dist = np.zeros(L, dtype=np.int64)
    if L <= n:
        return dist
    w = n + 1 if with_token else n
    grams = np.lib.stride_tricks.sliding_window_view(doc, w)[: L - n]  # row i ends at p = i + n
    keys = np.ascontiguousarray(grams).view(np.dtype((np.void, 8 * w))).ravel()
    _, ids = np.unique(keys, return_inverse=True)
    ids = ids.ravel()
    order = np.argsort(ids, kind="stable")  # positions ascending within a context
    same = ids[order][1:] == ids[order][:-1]
    later, earlier = order[1:][same], order[:-1][same]
    dist[later + n] = later - earlier
    return dist


def distance_edges(window: int, memory_size: int) -> List[int]:
    """Bucket edges: ``W, 4W, 8K, 32K`` below ``M``, then ``M``."""
    if window < 1 or memory_size < 1:
        raise EvalError(f"window {window} and memory size {memory_size} must be positive")
    base = [window, 4 * window, 8192, 32768]
    return sorted({e for e in base if e < memory_size}) + [int(memory_size)]


def _short(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def bucket_labels(edges: Sequence[int]) -> List[str]:
    """``[128, 512, 65536]`` -> ``["1-128", "128-512", "512-64K", ">=64K"]`` (half-open)."""
    lows = [1] + list(edges[:-1])
    return [f"{_short(a)}-{_short(b)}" for a, b in zip(lows, edges)] + [f">={_short(edges[-1])}"]


# ---------------------------------------------------------------- evaluation
def stream_distances(stream, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per target token of ``stream`` in stream order (document by document): the
    distance at which it recurred with its ``n``-token context (0: it did not),
    and whether its context recurred at all (with the same or another token)."""
    dists, ctx = [], []
    for s, length in zip(stream.doc_starts, stream.doc_lengths):
        doc = np.asarray(stream.tokens[s + 1 : s + 1 + length])
        dists.append(previous_occurrence(doc, n, with_token=True))
        ctx.append(previous_occurrence(doc, n) > 0)
    if not dists:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(dists), np.concatenate(ctx)


def _row(label, lo, hi, losses: TokenLosses, sel: np.ndarray) -> Dict:
    k = int(sel.sum())
    nll = float(losses.nll[sel].mean()) if k else float("nan")
    acc = float(losses.correct[sel].mean()) if k and losses.correct is not None else float("nan")
    return {"label": label, "lo": lo, "hi": hi, "tokens": k, "nll": nll,
            "ppl": math.exp(nll) if k else float("nan"), "top1": acc}


def recall_table(losses: TokenLosses, dist: np.ndarray, context_recurs: np.ndarray,
                 edges: Sequence[int]) -> Dict:
    """``{"buckets": [row ...], "context_only": row, "other": row, "overall": row}``
    for one model; ``dist``/``context_recurs`` per token in the order of ``losses``
    (stream order). ``context_only``: the context recurred, but with another token."""
    if len(dist) != len(losses.nll):
        raise EvalError(f"{len(dist)} distances for {len(losses.nll)} scored tokens")
    lows = [1] + list(edges)
    highs = list(edges) + [None]
    labels = bucket_labels(edges)
    rows = []
    for lo, hi, label in zip(lows, highs, labels):
        sel = (dist >= lo) & ((dist < hi) if hi is not None else True)
        rows.append(_row(label, lo, hi, losses, sel))
    return {
        "buckets": rows,
        "context_only": _row("context recurs, token differs", 0, 0, losses,
                             (dist == 0) & context_recurs),
        "other": _row("other tokens", 0, 0, losses, (dist == 0) & ~context_recurs),
        "overall": _row("all", 0, None, losses, np.ones(len(dist), bool)),
    }


def load_stream(task, split: str, max_documents: Optional[int] = None):
    """The split's stream, optionally only its first documents."""
    task.load_dataset(split)
    stream = task.dataset(split)
    if max_documents is None or max_documents >= len(stream.doc_starts):
        return stream
    docs = [stream.tokens[s + 1 : s + 1 + n] for s, n in
            zip(stream.doc_starts[:max_documents], stream.doc_lengths[:max_documents])]
    return document_stream(docs, task.source_dictionary.eos(), name=split)


def memory_size_of(model) -> Optional[int]:
    """The memory size of a memory model with memory on, else None."""
    decoder = getattr(model, "decoder", None)
    cfg = getattr(decoder, "cfg", None)
    if cfg is None or not getattr(cfg, "use_external_memory", False):
        return None
    return int(decoder.spec.memory_size)


def evaluate(loaded, split: str = "test", n: int = 8, memory_size: Optional[int] = None,
             window: Optional[int] = None, batch_size: int = 1,
             max_documents: Optional[int] = None) -> Dict:
    """Recall by distance of every loaded model (:func:`.model_loading.load_for_eval`).

    window: default the first model's segment length; memory_size: default
    the largest memory of the models that use one (65,536 if none does).
    """
    if not loaded:
        raise EvalError("no --checkpoint NAME=PATH given")
    window = int(window or loaded[0].tokens_per_sample)
    sizes = [m for m in (memory_size_of(lm.model) for lm in loaded) if m]
    memory_size = int(memory_size or (max(sizes) if sizes else 65536))
    edges = distance_edges(window, memory_size)
    stream = load_stream(loaded[0].task, split, max_documents)
    dist, context_recurs = stream_distances(stream, n)
    models = {}
    for lm in loaded:
        losses = stream_token_losses(lm.model, lm.task, stream, batch_size=batch_size)
        models[lm.name] = {"path": lm.path, "kind": lm.kind, "memory": lm.uses_memory,
                           "memory_size": memory_size_of(lm.model),
                           "tokens_per_sample": lm.tokens_per_sample,
                           **recall_table(losses, dist, context_recurs, edges)}
        logger.info("recall: %s done", lm.name)
    return {"split": split, "n": n, "window": window, "memory_size": memory_size,
            "edges": edges, "labels": bucket_labels(edges),
            "documents": int(len(stream.doc_starts)), "tokens": int(len(dist)),
            "recurring_tokens": int((dist > 0).sum()), "models": models}


# ------------------------------------------------------------------- output
def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown_table(result: Dict) -> str:
    """One row per distance bucket and one for the other tokens; per model
    top-1 accuracy and perplexity."""
    names = list(result["models"])
    head = ("| distance (tokens) | tokens | "
            + " | ".join(f"{n} top-1 | {n} ppl" for n in names) + " |")
    lines = [head, "|---|---:|" + "---:|---:|" * len(names)]

    def rows(res):
        return res["buckets"] + [res["context_only"], res["other"]]

    for i, row in enumerate(rows(result["models"][names[0]])):
        cells = []
        for n in names:
            r = rows(result["models"][n])[i]
            cells += [_pct(r["top1"]), _num(r["ppl"])]
        lines.append(f"| {row['label']} | {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(result: Dict, path: str) -> str:
    """Top-1 accuracy against distance (log x), one line per model; the other
    tokens' accuracy as a dotted line, window and memory size marked."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, (name, res) in enumerate(result["models"].items()):
        xs, ys = [], []
        for b in res["buckets"]:
            if b["tokens"]:
                hi = b["hi"] if b["hi"] is not None else 2 * b["lo"]
                xs.append(math.sqrt(b["lo"] * hi))
                ys.append(100 * b["top1"])
        line, = ax.plot(xs, ys, marker="o", label=name)
        if res["other"]["tokens"]:
            ax.axhline(100 * res["other"]["top1"], color=line.get_color(), ls=":", lw=1)
    ax.axvline(result["window"], color="grey", ls="--", lw=1)
    ax.axvline(result["memory_size"], color="black", ls="--", lw=1)
    ax.text(result["window"], 102, " window", fontsize=8)
    ax.text(result["memory_size"], 102, " memory", fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(-2, 108)
    ax.set_xlabel("distance to the earlier occurrence (tokens, log scale)")
    ax.set_ylabel("top-1 accuracy on recurring tokens (%)")
    ax.set_title(f"recall by distance ({result['split']}, context n={result['n']}; "
                 "dotted: other tokens)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_section(loaded, split: str, out: str, n: int = 8,
                   max_documents: Optional[int] = None) -> Tuple[Dict, List[str]]:
    """The ``longmem-report`` section: ``(result, markdown lines)``; writes
    ``OUT/recall_by_distance.png``."""
    res = evaluate(loaded, split, n=n, max_documents=max_documents)
    plot_accuracy(res, os.path.join(out, "recall_by_distance.png"))
    lines = [
        "## Recall by distance", "",
        f"Tokens whose {n}-token context occurred earlier in the same document, by distance "
        f"to that occurrence (window {res['window']}, memory {res['memory_size']} tokens; "
        f"{res['recurring_tokens']} of {res['tokens']} tokens recur). Top-1 accuracy and "
        "perplexity per model.", "",
        markdown_table(res), "![recall by distance](recall_by_distance.png)", "",
    ]
    return res, lines


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longmem-recall",
                                description="Recall by distance: accuracy on recurring tokens.")
    add_common_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=8, help="context tokens that must recur (default 8)")
    p.add_argument("--memory-size", type=int, default=None,
                   help="memory size for the bucket edges (default: the models' largest)")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="streams per batch")
    p.add_argument("--out", default=".", help="writes recall.json, recall.md, recall_by_distance.png")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    res = evaluate(load_all(args), args.split, n=args.n, memory_size=args.memory_size,
                   batch_size=args.batch_size, max_documents=args.max_documents)
    os.makedirs(args.out, exist_ok=True)
    write_json(res, os.path.join(args.out, "recall.json"))
    table = markdown_table(res)
    with open(os.path.join(args.out, "recall.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    plot_accuracy(res, os.path.join(args.out, "recall_by_distance.png"))
    print(table)
    print(json.dumps({"out": args.out, "recurring_tokens": res["recurring_tokens"],
                      "tokens": res["tokens"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
