"""Reading raw documents from a folder of text files or a Pile-style ``.jsonl`` file."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, MutableMapping, Optional, Union

from ..errors import LongMemError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Reasons a candidate document is skipped (keys of the skip counter).
SKIP_NOT_UTF8 = "not_utf8"  # file / jsonl line is not valid UTF-8
SKIP_EMPTY = "empty"  # empty or whitespace-only text
SKIP_UNREADABLE = "unreadable"  # OSError while reading a file
SKIP_BAD_JSON = "bad_json"  # jsonl line that is not valid JSON
SKIP_NO_TEXT = "no_text"  # JSON value without a string "text" field
SKIP_INVALID_UNICODE = "invalid_unicode"  # "text" holds lone surrogates (not encodable as UTF-8)
SKIP_BLANK_LINE = "blank_line"  # blank line in a jsonl file


class PreprocessError(LongMemError):
    """A user-facing preprocessing error; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Document:
    """One document: a stable name (relative path or ``file.jsonl:LINE``) and its text."""

    name: str
    text: str


def format_skipped(skipped: "MutableMapping[str, int]") -> str:
    """Render skip counts as ``reason=count, ...`` (sorted by reason), or ``none``."""
    items = [f"{reason}={count}" for reason, count in sorted(skipped.items()) if count]
    return ", ".join(items) if items else "none"


def iter_documents(
    path: PathLike, skipped: Optional[MutableMapping[str, int]] = None
) -> Iterator[Document]:
    """Iterate over the usable documents at ``path``.

    ``path`` is either a folder (every regular file under it, recursively, in sorted
    relative-path order, is one UTF-8 document) or a ``.jsonl`` file (one JSON object
    per line with a string ``"text"`` field). Unusable inputs are skipped and counted
    by reason into ``skipped`` (if given); a warning with the counts is logged when
    the iteration finishes. The path is validated eagerly (a missing path or a plain
    file that is not ``.jsonl`` raises :class:`PreprocessError` at call time); zero
    usable documents raises :class:`PreprocessError` once the input is exhausted.
    """
    root = Path(path)
    if not root.exists():
        raise PreprocessError(
            f"input path {str(root)!r} does not exist; pass an existing folder of text files or a .jsonl file"
        )
    counter: "Counter[str]" = Counter()
    if root.is_dir():
        source: Iterator[Document] = _iter_folder(root, counter)
    elif root.is_file() and root.suffix.lower() == ".jsonl":
        source = _iter_jsonl(root, counter)
    elif root.is_file():
        raise PreprocessError(
            f"input {str(root)!r} is a single file, not a folder or .jsonl; "
            "use a folder (one file per document) or a .jsonl file with a \"text\" field per line"
        )
    else:
        raise PreprocessError(
            f"input {str(root)!r} is neither a folder nor a regular file; use a folder or a .jsonl file"
        )
    return _finish(root, source, counter, skipped)


def _finish(
    root: Path,
    source: Iterator[Document],
    counter: "Counter[str]",
    skipped: Optional[MutableMapping[str, int]],
) -> Iterator[Document]:
    """Yield from ``source``; then report skips and fail if nothing was usable."""
    n_docs = 0
    try:
        for doc in source:
            n_docs += 1
            yield doc
    finally:
        if skipped is not None:
            for reason, count in counter.items():
                skipped[reason] = skipped.get(reason, 0) + count
    n_skipped = sum(counter.values())
    if n_skipped:
        logger.warning(
            "skipped %d of %d inputs in %s (%s)",
            n_skipped,
            n_skipped + n_docs,
            root,
            format_skipped(counter),
        )
    if n_docs == 0:
        if n_skipped:
            detail = f"all {n_skipped} inputs were skipped: {format_skipped(counter)}"
        elif root.is_dir():
            detail = "the folder contains no files"
        else:
            detail = "the file contains no lines"
        raise PreprocessError(
            f"no usable documents in {str(root)!r} ({detail}); "
            "provide UTF-8 text files or .jsonl lines with a non-empty string \"text\" field"
        )


def _folder_files(root: Path) -> list[tuple[str, Path]]:
    """All regular files under ``root`` as ``(relative posix name, path)``, sorted by name."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for fname in filenames:
            fpath = base / fname
            if fpath.is_file():  # excludes fifos, sockets, dangling links
                found.append((fpath.relative_to(root).as_posix(), fpath))
    found.sort(key=lambda item: item[0])
    return found


def _iter_folder(root: Path, counter: "Counter[str]") -> Iterator[Document]:
    """One document per regular file under ``root``."""
    for name, fpath in _folder_files(root):
        try:
            data = fpath.read_bytes()
        except OSError as exc:
            logger.debug("cannot read %s: %s", fpath, exc)
            counter[SKIP_UNREADABLE] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            counter[SKIP_NOT_UTF8] += 1
            continue
        if text.startswith("\ufeff"):
            text = text[1:]
        if not text.strip():
            counter[SKIP_EMPTY] += 1
            continue
        yield Document(name=name, text=text)


def _iter_jsonl(path: Path, counter: "Counter[str]") -> Iterator[Document]:
    """One document per line of a Pile-style jsonl file (``{"text": ..., ...}``)."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                counter[SKIP_BLANK_LINE] += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                counter[SKIP_NOT_UTF8] += 1
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                counter[SKIP_BAD_JSON] += 1
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                counter[SKIP_NO_TEXT] += 1
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                counter[SKIP_INVALID_UNICODE] += 1
                continue
            if not text.strip():
                counter[SKIP_EMPTY] += 1
                continue
            yield Document(name=f"{path.name}:{lineno}", text=text)
