"""Quickstart corpus: the running Python's standard-library sources, one document per file.

Usage: ``python -m preprocess.stdlib_corpus OUT_DIR [--min-chars 2000] [--max-docs N]``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Optional, Sequence

from .documents import PathLike, PreprocessError

logger = logging.getLogger(__name__)

#: Directory names whose whole subtree is left out of the corpus.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
     "encodings"}  # encodings: generated codec tables, not prose or code
)


def stdlib_source_files(stdlib_dir: Optional[PathLike] = None) -> list[Path]:
    """The stdlib ``.py`` files (minus :data:`EXCLUDED_DIRS`), sorted by relative path."""
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for fname in filenames:
            fpath = Path(dirpath) / fname
            if fname.endswith(".py") and fpath.is_file():
                found.append(fpath)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def _flat_name(rel: str) -> str:
    """``email/mime/text.py`` -> ``email__mime__text.py``."""
    return rel.replace("/", "__")


def build_stdlib_corpus(
    out_dir: PathLike, min_chars: int = 2000, max_docs: Optional[int] = None
) -> int:
    """Copy stdlib ``.py`` sources into ``out_dir`` (one flat file per document).

    Files shorter than ``min_chars`` characters or not valid UTF-8 are skipped; at most
    ``max_docs`` files are written (first ones in sorted relative-path order). The
    output is deterministic; re-running with the same arguments is idempotent, and
    ``out_dir`` may not contain other files (that would silently mix corpora).
    Returns the number of documents written.
    """
    if min_chars < 0:
        raise PreprocessError(f"min_chars must be >= 0, got {min_chars}; pass a non-negative --min-chars")
    if max_docs is not None and max_docs < 1:
        raise PreprocessError(f"max_docs must be >= 1, got {max_docs}; pass a positive --max-docs or omit it")
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib_dir.is_dir():
        raise PreprocessError(f"Python stdlib folder {str(stdlib_dir)!r} not found; run with a full CPython install")

    selected: dict[str, str] = {}
    too_short = not_utf8 = 0
    for fpath in stdlib_source_files(stdlib_dir):
        if max_docs is not None and len(selected) >= max_docs:
            break
        try:
            text = fpath.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
            continue
        if len(text) < min_chars:
            too_short += 1
            continue
        base = _flat_name(fpath.relative_to(stdlib_dir).as_posix())
        name, k = base, 1
        while name in selected:  # only possible with odd file names; keep names unique
            name = f"{k}__{base}"
            k += 1
        selected[name] = text
    if not selected:
        raise PreprocessError(
            f"no stdlib source file in {str(stdlib_dir)!r} has >= {min_chars} characters; lower --min-chars"
        )

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in selected)
    except OSError as exc:
        raise PreprocessError(
            f"cannot create or list output folder {str(out)!r} ({exc.strerror or exc}); choose a writable folder"
        ) from exc
    if foreign:
        raise PreprocessError(
            f"output folder {str(out)!r} already holds {len(foreign)} other entries (e.g. {foreign[0]!r}); "
            "use an empty or new folder"
        )
    try:
        for name, text in selected.items():
            (out / name).write_text(text, encoding="utf-8", newline="")
    except OSError as exc:
        raise PreprocessError(
            f"cannot write to output folder {str(out)!r} ({exc.strerror or exc}); choose a writable folder"
        ) from exc
    logger.info(
        "wrote %d stdlib documents to %s (skipped: %d shorter than %d chars, %d not UTF-8)",
        len(selected),
        out,
        too_short,
        min_chars,
        not_utf8,
    )
    return len(selected)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.stdlib_corpus",
        description="Copy the Python standard library sources into OUT_DIR, one document per file.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the documents to")
    parser.add_argument("--min-chars", type=int, default=2000, help="skip files shorter than this (default 2000)")
    parser.add_argument("--max-docs", type=int, default=None, help="write at most this many documents")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        n = build_stdlib_corpus(args.out_dir, min_chars=args.min_chars, max_docs=args.max_docs)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
