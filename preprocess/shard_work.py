"""The work on one input unit, run in a worker process: scan it, or binarize it.

* :func:`scan_unit` (first pass): counts the unit's usable documents and skipped
  inputs, keeps the first bad lines, and draws the unit's part of the bounded
  sentencepiece sample (:class:`LineSample`).
* :func:`binarize_unit` (second pass): assigns each document to its split
  (:mod:`preprocess.splitting`), tokenizes it and appends it to the unit's own
  ``{train,valid,test}.{bin,idx}`` (fairseq mmap, :mod:`preprocess.mmap_writer`),
  ``raw.{split}.txt`` and ``names.{split}.jsonl``; documents are separated by a
  one-token item (``</s>``). Everything goes to ``DIR.partial`` which is renamed to
  ``DIR`` when complete, so a killed unit is simply done again.

Memory per worker: one encode batch plus the sample, whatever the unit's size.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .documents import Document, InputUnit, PreprocessError, document_lines, iter_unit_documents
from .mmap_writer import MMapWriter
from .splitting import SPLITS, unit_assignment

_ENCODE_LINES = 4096  # lines per sentencepiece encode call (bounds the memory of a batch)
_ENCODE_DOCS = 64  # documents per HF encode call
_REPORT_S = 0.25  # seconds between progress reports

#: Progress sink of this process: called with (documents, tokens) increments.
_progress: Optional[Callable[[int, int], None]] = None
_encoders: Dict[Tuple[str, str], Any] = {}


def init_worker(queue: Any) -> None:
    """Pool initializer: send progress to ``queue`` as ``(documents, tokens)`` tuples."""
    global _progress
    _progress = lambda d, t: queue.put((d, t))  # noqa: E731


def set_progress(callback: Optional[Callable[[int, int], None]]) -> None:
    """Progress sink when the work runs in this process."""
    global _progress
    _progress = callback


# --------------------------------------------------------------------------- sample


class LineSample:
    """Bottom-k sample of lines by random key under a character budget.

    Keeps the longest run of lines in key order (smallest keys first) whose
    characters add up to at most ``budget``: the same set whatever the order
    lines arrive in, so per-unit samples merge into the corpus sample, and
    ``--workers 1`` and ``2`` train the same sentencepiece model. Once a line is
    dropped for the budget, no line with a larger key can enter (``cutoff``):
    without that rule a short line could fill the room a longer, earlier-keyed
    line left, and the set depended on the order the units finished in.
    Memory: O(budget).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chars = 0
        self.cutoff = float("inf")  # smallest key dropped for the budget
        self._heap: List[Tuple[float, int, int, str]] = []  # (-key, unit, doc, line)

    def add(self, key: float, unit: int, doc: int, line: str) -> None:
        if key >= self.cutoff:
            return
        heapq.heappush(self._heap, (-key, unit, doc, line))
        self.chars += len(line)
        while self.chars > self.budget and self._heap:
            neg_key, _, _, dropped = heapq.heappop(self._heap)
            self.chars -= len(dropped)
            self.cutoff = min(self.cutoff, -neg_key)

    def entries(self) -> List[Tuple[float, int, int, str]]:
        """``(key, unit, doc, line)`` sorted by key."""
        return sorted(((-k, u, d, ln) for k, u, d, ln in self._heap))

    def __len__(self) -> int:
        return len(self._heap)


# --------------------------------------------------------------------------- pass 1


def scan_unit(task: Dict[str, Any]) -> Dict[str, Any]:
    """Count the usable documents of ``task["unit"]`` and draw its sample.

    ``task``: ``unit``, ``index``, ``subsets``, ``sample_chars`` (0: no sample),
    ``seed``, ``max_line_chars``. Returns ``docs``, ``skipped``, ``bad_lines``,
    ``sample`` (``(key, unit, doc, line)`` entries) and ``seconds``.
    """
    t0 = time.perf_counter()
    unit: InputUnit = task["unit"]
    counter: Counter = Counter()
    bad_lines: List[str] = []
    budget = int(task["sample_chars"])
    sample = LineSample(budget) if budget > 0 else None
    rng = random.Random(f"longmem-sample:{task['seed']}:{task['index']}")
    n_docs = 0
    for doc in iter_unit_documents(unit, counter, bad_lines, subsets=task["subsets"]):
        if sample is not None:
            for line in document_lines(doc.text, task["max_line_chars"]):
                sample.add(rng.random(), task["index"], n_docs, line)
        n_docs += 1
    return {
        "docs": n_docs,
        "skipped": dict(counter),
        "bad_lines": bad_lines,
        "sample": sample.entries() if sample is not None else [],
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- encoders


def get_encoder(kind: str, path: str) -> Any:
    """The encoder of this process (built once): ``spm`` model file or ``hf`` tokenizer folder."""
    key = (kind, path)
    if key not in _encoders:
        if kind == "spm":
            from .sentencepiece_model import PieceEncoder

            _encoders[key] = PieceEncoder(path)
        else:
            from .hf_tokenizer import HFTokenizerEncoder

            _encoders[key] = HFTokenizerEncoder(path)
    return _encoders[key]


def _encode_spm(encoder: Any, docs: List[List[str]]) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """Per document: ``(flat, sizes, pieces)``, one item per line."""
    lines = [line for doc in docs for line in doc]
    flat, sizes = encoder.encode_fairseq(lines)
    ends = np.concatenate([[0], np.cumsum(sizes)])
    i = 0
    for doc in docs:
        j = i + len(doc)
        yield flat[ends[i] : ends[j]], sizes[i:j], int(ends[j] - ends[i]) - len(doc)
        i = j


def _encode_hf(encoder: Any, docs: List[List[str]]) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """Per document: ``(flat, sizes, pieces)``, the whole document as one item."""
    for ids in encoder.encode_hf(["\n".join(doc) for doc in docs]):
        if not ids:
            raise RuntimeError("a non-empty document encoded to zero tokens")
        flat = np.empty(len(ids) + 1, dtype=np.int64)
        flat[:-1] = encoder.hf_to_fairseq[ids]
        flat[-1] = 2  # </s>
        yield flat, np.array([flat.size], dtype=np.int64), len(ids)


# --------------------------------------------------------------------------- pass 2


class _SplitOutput:
    """One split of one unit: mmap dataset, raw text and document names."""

    SEPARATOR = np.array([2], dtype=np.int64)  # an empty line: just </s>

    def __init__(self, folder: Path, split: str, dtype: np.dtype, write_raw: bool) -> None:
        self.writer = MMapWriter(folder / split, dtype)
        self.raw = (folder / f"raw.{split}.txt").open("w", encoding="utf-8", newline="\n") if write_raw else None
        self.names = (folder / f"names.{split}.jsonl").open("w", encoding="utf-8", newline="\n")
        self.stats = {"docs": 0, "lines": 0, "text_lines": 0, "chars": 0, "pieces": 0}

    def add(self, name: str, lines: List[str], flat: np.ndarray, sizes: np.ndarray, pieces: int) -> None:
        if self.stats["docs"]:
            self.writer.add(self.SEPARATOR, np.ones(1, dtype=np.int64))
            if self.raw is not None:
                self.raw.write("\n")
        self.writer.add(flat, sizes)
        if self.raw is not None:
            for line in lines:
                self.raw.write(line)
                self.raw.write("\n")
        self.names.write(json.dumps(name, ensure_ascii=False) + "\n")
        st = self.stats
        st["docs"] += 1
        st["lines"] += int(sizes.size)
        st["text_lines"] += len(lines)
        st["chars"] += sum(len(line) for line in lines)
        st["pieces"] += pieces

    def close(self) -> Dict[str, int]:
        self.writer.finalize()
        for fh in (self.raw, self.names):
            if fh is not None:
                fh.close()
        return dict(self.stats, items=self.writer.items, bin_tokens=self.writer.tokens)


def binarize_unit(task: Dict[str, Any]) -> Dict[str, Any]:
    """Tokenize and binarize one unit into ``task["out"]`` (see the module docstring).

    ``task``: ``unit``, ``index``, ``docs`` (count from the scan), ``split`` (a fixed
    split) or ``valid``/``test`` (its allocated counts), ``seed``, ``encoder``
    (``(kind, path)``), ``max_line_chars``, ``dtype``, ``write_raw``, ``subsets``,
    ``out``. Returns per-split statistics and ``seconds``.
    """
    t0 = time.perf_counter()
    unit: InputUnit = task["unit"]
    final = Path(task["out"])
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    kind, enc_path = task["encoder"]
    encoder = get_encoder(kind, enc_path)
    encode = _encode_spm if kind == "spm" else _encode_hf
    batch_limit = _ENCODE_LINES if kind == "spm" else _ENCODE_DOCS
    outputs = {s: _SplitOutput(partial, s, np.dtype(task["dtype"]), task["write_raw"]) for s in SPLITS}
    if task.get("split"):
        assignment: Iterator[str] = iter(lambda: task["split"], None)
    else:
        assignment = unit_assignment(task["seed"], task["index"], task["docs"], task["valid"], task["test"])

    pending: List[Tuple[str, Document, List[str]]] = []
    pending_size = 0
    done_docs = reported_docs = reported_tokens = 0
    tokens = 0
    last_report = time.perf_counter()

    def flush() -> None:
        nonlocal pending, pending_size, tokens
        if not pending:
            return
        for (split, doc, lines), (flat, sizes, pieces) in zip(pending, encode(encoder, [p[2] for p in pending])):
            outputs[split].add(doc.name, lines, flat, sizes, pieces)
            tokens += int(flat.size)
        pending, pending_size = [], 0

    counter: Counter = Counter()
    for doc in iter_unit_documents(unit, counter, subsets=task["subsets"]):
        if done_docs >= task["docs"]:
            raise PreprocessError(f"{unit.label} changed since it was scanned (more documents); run again")
        split = next(assignment)
        lines = document_lines(doc.text, task["max_line_chars"])
        pending.append((split, doc, lines))
        pending_size += len(lines) if kind == "spm" else 1
        done_docs += 1
        if pending_size >= batch_limit:
            flush()
            now = time.perf_counter()
            if _progress is not None and now - last_report >= _REPORT_S:
                _progress(done_docs - reported_docs, tokens - reported_tokens)
                reported_docs, reported_tokens, last_report = done_docs, tokens, now
    flush()
    if done_docs != task["docs"]:
        raise PreprocessError(
            f"{unit.label} changed since it was scanned ({done_docs} documents, {task['docs']} before); run again"
        )
    stats = {s: outputs[s].close() for s in SPLITS}
    if _progress is not None:
        _progress(done_docs - reported_docs, tokens - reported_tokens)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return {"splits": stats, "tokens": tokens, "seconds": time.perf_counter() - t0}
