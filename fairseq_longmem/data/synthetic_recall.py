"""A synthetic long-range recall corpus, binarized for the stream task.

Documents are random tokens from a small vocabulary (``s0 .. s{V-1}``) in which
text recurs at chosen distances, so that only a model that can look that far
back predicts the recurrence:

* ``spans`` documents: a random background in which spans of ``--span``
  tokens are copied at each distance of ``--distances`` (source at ``a``,
  copy at ``a + d``), ``--repeats`` times per distance; plus, with
  ``--pairs``, multi-query associative recall (MQAR): a block of key-value
  pairs (keys ``--key-len`` tokens, values ``--value-len`` tokens) written
  once and queried, in another order, at each distance of ``--distances``;
* ``dense`` documents (a curriculum for pretraining a backbone to copy in
  context): units ``[x, y, x, ...]`` with ``x`` a random span of ``--span-min``
  .. ``--span`` tokens (``--copies`` times) and ``y`` random filler of up to
  ``--max-gap`` tokens, so that every recurrence is within a short window. With
  ``--alphabet A < V`` each document draws its tokens from ``A`` random
  symbols only: short contexts then recur by chance, and copying needs the
  last several tokens, not the last one (the keys of a backbone trained this
  way carry several previous tokens, which is what a search among tens of
  thousands of memory tokens needs). ``--alphabet-frac`` mixes: that share of
  the documents from an alphabet, the rest from the whole vocabulary.

One call writes one split (``SPLIT.bin/.idx``, fairseq's mmap format, one
item per document followed by an empty line, i.e. a size-1 ``</s>`` item, as
the stream task expects), ``dict.txt`` (created once, checked afterwards) and
``SPLIT.recurrences.json``: every planned recurrence as ``[kind, source,
target, length]`` (token offsets in the document, kind ``span`` or ``pair``).
Everything is determined by ``--seed`` (and the split name).

Usage::

    python -m fairseq_longmem.data.synthetic_recall --out DIR --split test \\
        --kind spans --docs 2 --doc-tokens 100000 --distances 32,256,4096,40000,90000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import LongMemError

logger = logging.getLogger(__name__)

Recurrence = Tuple[str, int, int, int]  # kind, source offset, target offset, length


class SyntheticCorpusError(LongMemError):
    """Sizes that cannot make the asked-for corpus (message names the fix)."""


@dataclass
class RecallCorpusConfig:
    """Sizes of one split (the CLI flags, same names)."""

    kind: str = "spans"
    docs: int = 4
    doc_tokens: int = 4096
    vocab: int = 64
    seed: int = 1
    # spans documents
    distances: List[int] = field(default_factory=lambda: [256, 1024])
    span: int = 32
    repeats: int = 4
    pairs: int = 0
    key_len: int = 8
    value_len: int = 2
    # dense documents
    span_min: int = 8
    max_gap: int = 32
    alphabet: int = 0  # 0: the whole vocabulary
    alphabet_frac: float = 1.0  # share of documents drawn from an alphabet (with alphabet > 0)
    alphabet_copies: int = 0  # copies of each span in an alphabet's documents (0: copies)
    alphabet_max_gap: int = -1  # filler between copies there (-1: max_gap)
    copies: int = 2

    def check(self) -> None:
        if self.kind not in ("spans", "dense"):
            raise SyntheticCorpusError(f"--kind {self.kind!r}: use spans or dense")
        if self.vocab < 2 or self.docs < 1 or self.doc_tokens < 1:
            raise SyntheticCorpusError("--vocab must be >= 2, --docs and --doc-tokens >= 1")
        if self.kind == "dense":
            if not 1 <= self.span_min <= self.span:
                raise SyntheticCorpusError(f"need 1 <= --span-min ({self.span_min}) <= --span ({self.span})")
            if self.copies < 2:
                raise SyntheticCorpusError(f"--copies {self.copies}: a unit needs at least 2 copies")
            if self.alphabet and not 2 <= self.alphabet <= self.vocab:
                raise SyntheticCorpusError(f"--alphabet {self.alphabet}: use 2..--vocab ({self.vocab}), or 0")
            if self.alphabet_copies == 1 or self.alphabet_copies < 0:
                raise SyntheticCorpusError(
                    f"--alphabet-copies {self.alphabet_copies}: a unit needs at least 2 copies (0: --copies)")
            if not 0.0 <= self.alphabet_frac <= 1.0:
                raise SyntheticCorpusError(f"--alphabet-frac {self.alphabet_frac}: use a share in [0, 1]")
            return
        if not self.distances or min(self.distances) < 1:
            raise SyntheticCorpusError("--distances: give positive token distances, e.g. 64,1024,70000")
        if min(self.distances) < self.span and self.repeats:
            raise SyntheticCorpusError(
                f"--distances {min(self.distances)} is shorter than --span {self.span}: a copy "
                "would overlap its source; use distances >= --span"
            )
        pair_block = self.pairs * (self.key_len + self.value_len)
        need = max(self.distances) + max(self.span, pair_block)
        if need > self.doc_tokens:
            raise SyntheticCorpusError(
                f"--doc-tokens {self.doc_tokens} cannot hold a recurrence at distance "
                f"{max(self.distances)}: use --doc-tokens >= {need}"
            )


def symbols(vocab: int) -> List[str]:
    return [f"s{i}" for i in range(vocab)]


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The generator of one split: a function of the seed and the split name only."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def _free(occupied: np.ndarray, start: int, length: int) -> bool:
    return start >= 0 and start + length <= len(occupied) and not occupied[start:start + length].any()


def spans_document(cfg: RecallCorpusConfig, rng: np.random.Generator
                   ) -> Tuple[np.ndarray, List[Recurrence]]:
    """Random background with span copies and MQAR blocks at ``cfg.distances``.

    Returns the symbols ``(doc_tokens,)`` in ``[0, vocab)`` and the recurrences.
    Sources are drawn at random until neither the source nor its target
    overlaps an earlier one (after 1,000 misses, among all places still free);
    MQAR blocks first, then spans, longest distances first (fewest places).
    """
    n = cfg.doc_tokens
    doc = rng.integers(0, cfg.vocab, n)
    occupied = np.zeros(n, dtype=bool)
    rec: List[Recurrence] = []
    unit = cfg.key_len + cfg.value_len
    block = cfg.pairs * unit
    jobs = [("span", d) for d in cfg.distances for _ in range(cfg.repeats)]
    if cfg.pairs:
        jobs += [("pair", d) for d in cfg.distances]
    jobs.sort(key=lambda j: (j[0] != "pair", -j[1]))  # big blocks, then long distances first
    for kind, d in jobs:
        length = cfg.span if kind == "span" else block
        for _ in range(1000):
            a = int(rng.integers(0, n - d - length + 1))
            if _free(occupied, a, length) and _free(occupied, a + d, length):
                break
        else:  # crowded: draw among all the places that are still free
            cum = np.concatenate([[0], np.cumsum(occupied)])
            free = cum[length:] == cum[:-length]  # free[a]: [a, a + length) is unoccupied
            ok = np.nonzero(free[: n - d - length + 1] & free[d:])[0]
            if len(ok) == 0:
                raise SyntheticCorpusError(
                    f"no room for a {kind} recurrence at distance {d} in a {n}-token "
                    "document; raise --doc-tokens or lower --repeats/--pairs"
                )
            a = int(rng.choice(ok))
        occupied[a:a + length] = True
        occupied[a + d:a + d + length] = True
        if kind == "span":
            doc[a + d:a + d + length] = doc[a:a + length]
            rec.append(("span", a, a + d, length))
        else:  # MQAR: the pairs written at a are queried at a + d in another order
            order = rng.permutation(cfg.pairs)
            for j, i in enumerate(order):
                src, dst = a + int(i) * unit, a + d + j * unit
                doc[dst:dst + unit] = doc[src:src + unit]
                rec.append(("pair", src, dst, unit))
    return doc, rec


def dense_document(cfg: RecallCorpusConfig, rng: np.random.Generator
                   ) -> Tuple[np.ndarray, List[Recurrence]]:
    """Units ``[x, y, x, ..., x]`` (span, filler, ``copies - 1`` more copies of the
    span) until ``doc_tokens``; one alphabet per document (with ``cfg.alphabet``,
    for a share ``cfg.alphabet_frac`` of the documents; the others use the whole
    vocabulary). An alphabet's documents may have their own ``alphabet_copies``
    and ``alphabet_max_gap`` (longer filler between fewer copies: the most
    recent match of the last token is then rarely the right one)."""
    use = bool(cfg.alphabet) and (cfg.alphabet_frac >= 1.0 or rng.random() < cfg.alphabet_frac)
    alphabet = rng.choice(cfg.vocab, cfg.alphabet, replace=False) if use else None
    copies, max_gap = cfg.copies, cfg.max_gap
    if use:
        copies = cfg.alphabet_copies or copies
        max_gap = max_gap if cfg.alphabet_max_gap < 0 else cfg.alphabet_max_gap
    out: List[np.ndarray] = []
    rec: List[Recurrence] = []
    pos = 0
    while pos < cfg.doc_tokens:
        s = int(rng.integers(cfg.span_min, cfg.span + 1))
        g = int(rng.integers(0, max_gap + 1))
        draw = rng.integers(0, cfg.vocab if alphabet is None else len(alphabet), s + g)
        if alphabet is not None:
            draw = alphabet[draw]
        x, y = draw[:s], draw[s:]
        out += [x, y] + [x] * (copies - 1)
        for c in range(1, copies):
            rec.append(("span", pos, pos + s * c + g, s))
        pos += copies * s + g
    doc = np.concatenate(out)[: cfg.doc_tokens]
    rec = [r for r in rec if r[2] + r[3] <= cfg.doc_tokens]
    return doc, rec


def generate(cfg: RecallCorpusConfig, split: str) -> Tuple[List[np.ndarray], List[List[Recurrence]]]:
    """The documents (symbol ids) and recurrences of one split."""
    cfg.check()
    rng = split_rng(cfg.seed, split)
    make = spans_document if cfg.kind == "spans" else dense_document
    docs, recs = [], []
    for _ in range(cfg.docs):
        d, r = make(cfg, rng)
        docs.append(d)
        recs.append(r)
    return docs, recs


def write_split(out: str, split: str, cfg: RecallCorpusConfig) -> dict:
    """Write ``out/SPLIT.bin/.idx``, ``out/dict.txt`` and ``out/SPLIT.recurrences.json``."""
    import torch
    from fairseq.data import Dictionary, indexed_dataset

    os.makedirs(out, exist_ok=True)
    dictionary = Dictionary()
    for s in symbols(cfg.vocab):
        dictionary.add_symbol(s, n=1000)
    dict_path = os.path.join(out, "dict.txt")
    if os.path.exists(dict_path):
        have = Dictionary.load(dict_path)
        if have.symbols != dictionary.symbols:
            raise SyntheticCorpusError(
                f"{dict_path} holds another vocabulary ({len(have)} symbols, want "
                f"{len(dictionary)}): use the same --vocab for every split or a new --out"
            )
    else:
        dictionary.save(dict_path)
    offset = dictionary.index("s0")
    eos = dictionary.eos()
    docs, recs = generate(cfg, split)
    prefix = os.path.join(out, split)
    builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=len(dictionary))
    for d in docs:
        builder.add_item(torch.from_numpy(np.append(d + offset, eos).astype(np.int64)))
        builder.add_item(torch.tensor([eos]))  # empty line: document separator
    builder.finalize(prefix + ".idx")
    with open(prefix + ".recurrences.json", "w", encoding="utf-8") as fh:
        json.dump({"config": cfg.__dict__, "recurrences": recs}, fh)
    info = {"split": split, "docs": len(docs), "tokens": int(sum(len(d) + 1 for d in docs)),
            "recurrences": int(sum(len(r) for r in recs))}
    logger.info("wrote %s: %s", prefix, info)
    return info


def parse_ints(text: str, flag: str) -> List[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SyntheticCorpusError(f"{flag} {text!r}: give comma-separated integers") from None


def build_parser() -> argparse.ArgumentParser:
    d = RecallCorpusConfig()
    p = argparse.ArgumentParser(prog="python -m fairseq_longmem.data.synthetic_recall",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="binarized data directory to write into")
    p.add_argument("--split", default="train", help="split name (train, valid, test, ...)")
    p.add_argument("--kind", default=d.kind, choices=["spans", "dense"])
    p.add_argument("--docs", type=int, default=d.docs)
    p.add_argument("--doc-tokens", type=int, default=d.doc_tokens)
    p.add_argument("--vocab", type=int, default=d.vocab, help="symbols s0..s{V-1}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--distances", default=",".join(map(str, d.distances)),
                   help="spans: distances (tokens) at which spans and MQAR blocks recur")
    p.add_argument("--span", type=int, default=d.span, help="tokens per copied span (dense: maximum)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="spans: copies per distance per document")
    p.add_argument("--pairs", type=int, default=d.pairs, help="spans: MQAR key-value pairs per block (0: none)")
    p.add_argument("--key-len", type=int, default=d.key_len)
    p.add_argument("--value-len", type=int, default=d.value_len)
    p.add_argument("--span-min", type=int, default=d.span_min, help="dense: shortest span")
    p.add_argument("--max-gap", type=int, default=d.max_gap, help="dense: most filler between copies")
    p.add_argument("--copies", type=int, default=d.copies, help="dense: copies of each span")
    p.add_argument("--alphabet", type=int, default=d.alphabet,
                   help="dense: symbols per document (0: all); small values force multi-token copying")
    p.add_argument("--alphabet-frac", type=float, default=d.alphabet_frac,
                   help="dense: share of documents drawn from --alphabet symbols (the rest: all)")
    p.add_argument("--alphabet-copies", type=int, default=d.alphabet_copies,
                   help="dense: copies of each span in the alphabet's documents (0: --copies)")
    p.add_argument("--alphabet-max-gap", type=int, default=d.alphabet_max_gap,
                   help="dense: most filler between copies in the alphabet's documents (-1: --max-gap)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = RecallCorpusConfig(
            kind=args.kind, docs=args.docs, doc_tokens=args.doc_tokens, vocab=args.vocab,
            seed=args.seed, distances=parse_ints(args.distances, "--distances"), span=args.span,
            repeats=args.repeats, pairs=args.pairs, key_len=args.key_len,
            value_len=args.value_len, span_min=args.span_min, max_gap=args.max_gap,
            alphabet=args.alphabet, alphabet_frac=args.alphabet_frac,
            alphabet_copies=args.alphabet_copies, alphabet_max_gap=args.alphabet_max_gap, copies=args.copies,
        )
        info = write_split(args.out, args.split, cfg)
    except LongMemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
