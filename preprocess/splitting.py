"""The seeded train/valid/test split by document, decided per document as it streams by.

The split sizes are those of the whole corpus: ``n_valid = max(min_split_docs,
floor(n * valid_frac))``, the same for test, train the rest (``n`` is counted in
a first pass). :func:`allocate` deals these counts out to the input units (a
seeded multivariate hypergeometric draw: every set of documents is equally
likely), and :func:`unit_assignment` decides, document after document, which
split each document of a unit goes to (sequential selection sampling, seeded by
the unit's index). Memory is O(units), never O(documents); the result depends
only on the seed and the per-unit document counts, so a resumed or parallel run
assigns exactly the same documents.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, List, Sequence, Tuple, TypeVar

from .documents import PreprocessError

T = TypeVar("T")
SPLITS = ("train", "valid", "test")


def check_split_args(valid_frac: float, test_frac: float, min_split_docs: int) -> None:
    """Raise :class:`PreprocessError` for fractions or minimums that cannot make three splits."""
    for flag, frac in (("--valid-frac", valid_frac), ("--test-frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise PreprocessError(f"{flag} must be in [0, 1), got {frac}; pass a fraction such as 0.05")
    if valid_frac + test_frac >= 1.0:
        raise PreprocessError(
            f"--valid-frac + --test-frac must be < 1 (got {valid_frac + test_frac}); leave room for train"
        )
    if min_split_docs < 1:
        raise PreprocessError(
            f"--min-split-docs must be >= 1 (got {min_split_docs}); every split needs a document"
        )


def split_sizes(n: int, valid_frac: float, test_frac: float, min_split_docs: int) -> Tuple[int, int, int]:
    """``(train, valid, test)`` document counts for ``n`` documents.

    Raises :class:`PreprocessError` (naming the number of documents needed) when
    train would be empty.
    """
    def sizes(k: int) -> Tuple[int, int, int]:
        n_valid = max(min_split_docs, int(math.floor(k * valid_frac)))
        n_test = max(min_split_docs, int(math.floor(k * test_frac)))
        return k - n_valid - n_test, n_valid, n_test

    result = sizes(n)
    if result[0] < 1:
        needed = n + 1
        while sizes(needed)[0] < 1:
            needed += 1
        raise PreprocessError(
            f"too few documents: found {n}, need at least {needed} so that train, valid and test "
            f"each get one (valid/test take >= {min_split_docs} each); add documents or lower "
            "--min-split-docs / --valid-frac / --test-frac"
        )
    return result


def allocate(unit_docs: Sequence[int], n_valid: int, n_test: int, seed: int) -> List[Tuple[int, int]]:
    """``(valid, test)`` documents of each unit: ``n_valid``/``n_test`` dealt out at random.

    A seeded multivariate hypergeometric draw, i.e. the counts a uniformly random
    choice of ``n_valid`` valid and then ``n_test`` test documents would give.
    """
    import numpy as np

    counts = np.asarray(unit_docs, dtype=np.int64)
    if n_valid + n_test > int(counts.sum()):
        raise ValueError("more valid/test documents than documents")
    rng = np.random.default_rng([seed, 0x5D11])
    if counts.size == 0:
        return []
    valid = rng.multivariate_hypergeometric(counts, n_valid) if n_valid else np.zeros_like(counts)
    rest = counts - valid
    test = rng.multivariate_hypergeometric(rest, n_test) if n_test else np.zeros_like(counts)
    return [(int(v), int(t)) for v, t in zip(valid, test)]


def unit_assignment(seed: int, unit_index: int, n_docs: int, n_valid: int, n_test: int) -> Iterator[str]:
    """The split of each of a unit's ``n_docs`` documents, in order (exactly ``n_valid``
    valid and ``n_test`` test; every arrangement equally likely; O(1) memory)."""
    rng = random.Random(f"longmem-split:{seed}:{unit_index}")
    left, left_valid, left_test = n_docs, n_valid, n_test
    while left > 0:
        u = rng.random() * left
        if u < left_valid:
            left_valid -= 1
            yield "valid"
        elif u < left_valid + left_test:
            left_test -= 1
            yield "test"
        else:
            yield "train"
        left -= 1


def split_documents(
    docs: Sequence[T],
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    seed: int = 1,
    min_split_docs: int = 1,
) -> dict:
    """Split a list of documents (one unit) by the streaming rule; each split keeps input order.

    The reference of what ``longmem-preprocess`` does to a corpus read as one unit.
    Too few documents for three non-empty splits raises :class:`PreprocessError`.
    """
    check_split_args(valid_frac, test_frac, min_split_docs)
    _, n_valid, n_test = split_sizes(len(docs), valid_frac, test_frac, min_split_docs)
    out: dict = {s: [] for s in ("valid", "test", "train")}
    for doc, split in zip(docs, unit_assignment(seed, 0, len(docs), n_valid, n_test)):
        out[split].append(doc)
    return out
