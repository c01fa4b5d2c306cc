"""Reading raw documents: folders of text files and Pile-style ``.jsonl`` shards.

An input is a folder (recursive: every ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst``
file in it is a shard of JSON lines, every other regular file is one UTF-8
document), a shard file, or a glob of those. Inputs are cut into
:class:`InputUnit` s (one per shard file, or a group of consecutive text files),
the units of parallel work and of resuming (``prepare_corpus.py``).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, MutableMapping, Optional, Sequence, Union

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
SKIP_OTHER_SUBSET = "other_subset"  # meta.pile_set_name not in --subsets (a filter, not bad input)
#: Skip reasons that are bad input: the first few are reported with file and line number.
REPORTED_SKIPS = frozenset({SKIP_NOT_UTF8, SKIP_BAD_JSON, SKIP_NO_TEXT, SKIP_INVALID_UNICODE})
#: File name endings of JSON-lines shards (plain, gzip, zstandard).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
#: Text files per unit, and bytes per unit, of a folder of text files.
UNIT_FILES = 1000
UNIT_BYTES = 64 << 20


class PreprocessError(LongMemError):
    """A user-facing preprocessing error; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Document:
    """One document: a stable name (relative path or ``file.jsonl:LINE``) and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class InputUnit:
    """A unit of work: one JSON-lines shard, or consecutive text files of a folder.

    ``names`` are the files' names relative to their input (document names; a shard's
    documents are ``NAME:LINE``); ``key`` fingerprints paths, sizes and mtimes (a
    changed file is a new unit); ``split`` is the user-given split or ``None``.
    """

    kind: str  # "jsonl" or "files"
    paths: tuple
    names: tuple
    split: Optional[str] = None

    @property
    def key(self) -> str:
        h = hashlib.sha1()
        h.update(f"{self.kind}|{self.split}".encode())
        for path, name in zip(self.paths, self.names):
            st = os.stat(path)
            h.update(f"|{os.path.abspath(path)}|{name}|{st.st_size}|{st.st_mtime_ns}".encode("utf-8", "replace"))
        return h.hexdigest()[:16]

    @property
    def label(self) -> str:
        """Short human-readable name (logs, progress)."""
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]} (+{len(self.names) - 1} files)"


def format_skipped(skipped: "MutableMapping[str, int]") -> str:
    """Render skip counts as ``reason=count, ...`` (sorted by reason), or ``none``."""
    items = [f"{reason}={count}" for reason, count in sorted(skipped.items()) if count]
    return ", ".join(items) if items else "none"


def is_jsonl_name(name: str) -> bool:
    """Whether ``name`` is a JSON-lines shard (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``)."""
    return name.lower().endswith(JSONL_SUFFIXES)


def _expand(path: PathLike) -> List[Path]:
    """An existing path as is, else a glob's sorted matches (``**`` recursive)."""
    p = Path(path)
    if p.exists():
        return [p]
    if globlib.has_magic(str(path)):
        matches = sorted(Path(m) for m in globlib.glob(str(path), recursive=True))
        if not matches:
            raise PreprocessError(f"input glob {str(path)!r} matches no file; check the pattern")
        return matches
    raise PreprocessError(
        f"input path {str(p)!r} does not exist; pass an existing folder of text files or a .jsonl file"
    )


def discover_units(
    paths: Sequence[PathLike],
    split: Optional[str] = None,
    unit_files: int = UNIT_FILES,
    unit_bytes: int = UNIT_BYTES,
) -> List[InputUnit]:
    """The :class:`InputUnit` s of ``paths`` (folders, shard files or globs), in input order.

    Folders are walked recursively in sorted relative-path order: each JSON-lines file
    is a unit; runs of other files are grouped into units of at most ``unit_files``
    files / ``unit_bytes`` bytes. Raises :class:`PreprocessError` for a missing path,
    a glob without matches, or a plain file that is not a JSON-lines shard.
    """
    units: List[InputUnit] = []
    for arg in paths:
        for root in _expand(arg):
            if root.is_dir():
                group: List[tuple] = []
                group_bytes = 0

                def flush() -> None:
                    nonlocal group, group_bytes
                    if group:
                        units.append(InputUnit("files", tuple(p for _, p in group), tuple(n for n, _ in group), split))
                    group, group_bytes = [], 0

                for name, fpath in _folder_files(root):
                    if is_jsonl_name(name):
                        flush()
                        units.append(InputUnit("jsonl", (str(fpath),), (name,), split))
                        continue
                    try:
                        size = fpath.stat().st_size
                    except OSError:
                        size = 0
                    if group and (len(group) >= unit_files or group_bytes + size > unit_bytes):
                        flush()
                    group.append((name, str(fpath)))
                    group_bytes += size
                flush()
            elif root.is_file() and is_jsonl_name(root.name):
                units.append(InputUnit("jsonl", (str(root),), (root.name,), split))
            elif root.is_file():
                raise PreprocessError(
                    f"input {str(root)!r} is a single file, not a folder or .jsonl; use a folder (one file "
                    "per document) or .jsonl/.jsonl.gz/.jsonl.zst files with a \"text\" field per line"
                )
            else:
                raise PreprocessError(
                    f"input {str(root)!r} is neither a folder nor a regular file; use a folder or a .jsonl file"
                )
    return units


def iter_documents(
    path: PathLike,
    skipped: Optional[MutableMapping[str, int]] = None,
    subsets: Optional[Sequence[str]] = None,
) -> Iterator[Document]:
    """Iterate over the usable documents at ``path`` (see :func:`discover_units`).

    A folder's text files are documents (UTF-8); every line of a JSON-lines shard is
    one JSON object with a string ``"text"`` field (with ``subsets``, only objects
    whose ``meta.pile_set_name`` is one of them). Unusable inputs are skipped and
    counted by reason into ``skipped`` (if given); a warning with the counts is
    logged when the iteration finishes. The path is validated eagerly (a missing
    path or a plain file that is not a shard raises :class:`PreprocessError` at call
    time); zero usable documents raises :class:`PreprocessError` once the input is
    exhausted.
    """
    root = Path(path)
    units = discover_units([path])
    counter: "Counter[str]" = Counter()

    def source() -> Iterator[Document]:
        for unit in units:
            yield from iter_unit_documents(unit, counter, subsets=subsets)

    return _finish(str(root), root.is_dir(), source(), counter, skipped)


def _finish(
    label: str,
    is_dir: bool,
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
        logger.warning("skipped %d of %d inputs in %s (%s)", n_skipped, n_skipped + n_docs, label,
                       format_skipped(counter))
    if n_docs == 0:
        raise no_documents_error(label, counter, is_dir)


def no_documents_error(label: str, counter: "MutableMapping[str, int]", is_dir: bool) -> PreprocessError:
    """The error for an input that gave no usable document."""
    n_skipped = sum(counter.values())
    if n_skipped:
        detail = f"all {n_skipped} inputs were skipped: {format_skipped(counter)}"
    elif is_dir:
        detail = "the folder contains no files"
    else:
        detail = "the file contains no lines"
    return PreprocessError(
        f"no usable documents in {label!r} ({detail}); "
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


def iter_unit_documents(
    unit: InputUnit,
    counter: "Counter[str]",
    bad_lines: Optional[List[str]] = None,
    max_bad_lines: int = 5,
    subsets: Optional[Sequence[str]] = None,
) -> Iterator[Document]:
    """The usable documents of one unit, in order; skips counted into ``counter``.

    For shards, the first ``max_bad_lines`` bad lines (not JSON, no ``text``, not
    UTF-8) are appended to ``bad_lines`` as ``"NAME:LINE: reason"``.
    """
    if unit.kind == "files":
        yield from _iter_files(unit, counter, bad_lines, max_bad_lines)
    else:
        yield from _iter_jsonl(Path(unit.paths[0]), unit.names[0], counter, bad_lines, max_bad_lines,
                               frozenset(subsets) if subsets else None)


def _iter_files(
    unit: InputUnit, counter: "Counter[str]", bad_lines: Optional[List[str]] = None, max_bad_lines: int = 5
) -> Iterator[Document]:
    """One document per file of the unit (undecodable files reported in ``bad_lines``)."""
    for name, fpath in zip(unit.names, unit.paths):
        try:
            data = Path(fpath).read_bytes()
        except OSError as exc:
            logger.debug("cannot read %s: %s", fpath, exc)
            counter[SKIP_UNREADABLE] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            counter[SKIP_NOT_UTF8] += 1
            if bad_lines is not None and len(bad_lines) < max_bad_lines:
                bad_lines.append(f"{name}: {SKIP_NOT_UTF8} ({str(exc)[:60]})")
            continue
        if text.startswith("\ufeff"):
            text = text[1:]
        if not text.strip():
            counter[SKIP_EMPTY] += 1
            continue
        yield Document(name=name, text=text)


def open_shard(path: Path) -> BinaryIO:
    """A binary, line-iterable reader of a (possibly gzip- or zstandard-compressed) shard."""
    lower = path.name.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if lower.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise PreprocessError(
                f"{path.name} is zstandard-compressed; install the 'zstandard' package (pip install zstandard)"
            ) from None
        fh = path.open("rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
    return path.open("rb")


def _iter_jsonl(
    path: Path,
    name: str,
    counter: "Counter[str]",
    bad_lines: Optional[List[str]],
    max_bad_lines: int,
    subsets: Optional[frozenset],
) -> Iterator[Document]:
    """One document per line of a Pile-style shard (``{"text": ..., "meta": {"pile_set_name": ...}}``)."""

    def bad(reason: str, lineno: int, detail: str) -> None:
        counter[reason] += 1
        if bad_lines is not None and len(bad_lines) < max_bad_lines:
            bad_lines.append(f"{name}:{lineno}: {reason} ({detail})")

    try:
        fh = open_shard(path)
    except OSError as exc:
        raise PreprocessError(f"cannot open {str(path)!r} ({exc.strerror or exc}); check the file") from exc
    with fh:
        lineno = 0
        try:
            for raw in fh:
                lineno += 1
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    counter[SKIP_BLANK_LINE] += 1
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad(SKIP_NOT_UTF8, lineno, str(exc)[:60])
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    bad(SKIP_BAD_JSON, lineno, str(exc)[:60])
                    continue
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    bad(SKIP_NO_TEXT, lineno, "no string \"text\" field")
                    continue
                if subsets is not None:
                    meta = obj.get("meta")
                    subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
                    if subset not in subsets:
                        counter[SKIP_OTHER_SUBSET] += 1
                        continue
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    bad(SKIP_INVALID_UNICODE, lineno, "lone surrogates in \"text\"")
                    continue
                if not text.strip():
                    counter[SKIP_EMPTY] += 1
                    continue
                yield Document(name=f"{name}:{lineno}", text=text)
        except (OSError, EOFError) as exc:  # truncated or corrupt compressed stream
            raise PreprocessError(
                f"cannot read {str(path)!r} after line {lineno} ({exc}); the file is truncated or corrupt, "
                "re-download or remove it"
            ) from exc
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise PreprocessError(
                    f"cannot read {str(path)!r} after line {lineno} ({exc}); the file is truncated or corrupt, "
                    "re-download or remove it"
                ) from exc
            raise


def document_lines(text: str, max_line_chars: int = 0) -> List[str]:
    """The non-empty lines of a document.

    Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` (universal newlines, as fairseq and
    Python text files read them); empty and whitespace-only lines are dropped; other
    lines are kept verbatim. With ``max_line_chars > 0`` longer lines are cut into
    consecutive chunks of at most that many characters (whitespace-only chunks dropped).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: List[str] = []
    for line in lines:
        if not line.strip():
            continue
        if max_line_chars > 0 and len(line) > max_line_chars:
            out.extend(
                chunk
                for chunk in (line[i : i + max_line_chars] for i in range(0, len(line), max_line_chars))
                if chunk.strip()
            )
        else:
            out.append(line)
    return out
