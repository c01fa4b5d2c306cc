"""Where the documents of a binarized split lie, from its ``.idx`` alone.

A fairseq memory-mapped split (``prefix.bin`` + ``prefix.idx``) is a list of
lines, each ending in ``</s>``; an item of size 1 is an empty line, i.e. a
document separator. :func:`scan_split` reads the item sizes in chunks (never
the whole index at once, never the tokens except the separators themselves,
which are checked to be ``</s>``) and returns the *runs* of consecutive
non-separator items: a run is a document, and its tokens are contiguous in the
``.bin``. The result, O(documents), is cached beside the data in
``prefix.docs.npz`` and reused while the ``.idx``/``.bin`` are unchanged.

In the *kept* token space (all tokens with separator items removed), run ``r``
starts at ``run_kept[r]`` and its tokens are ``.bin`` tokens
``run_bin[r] .. run_bin[r] + (run_kept[r+1] - run_kept[r])``.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import LongMemError

logger = logging.getLogger(__name__)

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = 9 + 8 + 1 + 8  # magic, version, dtype code, number of items
_CACHE_VERSION = 1
_CHUNK = 1 << 20  # items per read of the .idx sizes
_CODE_TO_DTYPE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                  6: np.float64, 7: np.double, 8: np.uint16, 9: np.uint32, 10: np.uint64}


class StreamDataError(LongMemError):
    """Bad data for the stream task (message names the fix)."""


@dataclass
class SplitScan:
    """Document runs of one ``.bin``/``.idx`` pair.

    run_kept: ``(R,)`` int64 start of each run in the split's kept-token space;
    run_bin: ``(R,)`` int64 token offset of each run in the ``.bin``;
    kept_total: tokens outside separator items; num_items: lines in the split;
    first_in_run / last_in_run: whether the first / last item is a non-separator
    (a run may continue across the shards of a combined split).
    """

    run_kept: np.ndarray
    run_bin: np.ndarray
    kept_total: int
    num_items: int
    first_in_run: bool
    last_in_run: bool
    dtype: type


def is_mmap_split(prefix: str) -> bool:
    """True when ``prefix.idx`` is fairseq's memory-mapped index format."""
    try:
        with open(prefix + ".idx", "rb") as f:
            return f.read(9) == _MAGIC and os.path.isfile(prefix + ".bin")
    except OSError:
        return False


def read_header(prefix: str):
    """``(dtype, num_items)`` of a memory-mapped split; checks the files' sizes."""
    idx, binf = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as f:
        head = f.read(_HEADER)
    if len(head) < _HEADER or head[:9] != _MAGIC:
        raise StreamDataError(f"corrupt binarized data at {idx}: not a fairseq mmap index; "
                                "re-run longmem-preprocess")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    (n,) = struct.unpack("<Q", head[18:26])
    if version != 1 or code not in _CODE_TO_DTYPE:
        raise StreamDataError(f"corrupt binarized data at {idx}: unknown version/dtype "
                                f"({version}, {code}); re-run longmem-preprocess")
    if os.path.getsize(idx) < _HEADER + 12 * n:
        raise StreamDataError(f"corrupt binarized data at {idx}: truncated index "
                                f"({n} items announced); re-run longmem-preprocess")
    if not os.path.isfile(binf):
        raise StreamDataError(f"corrupt binarized data: {binf} is missing; re-run "
                                "longmem-preprocess")
    return _CODE_TO_DTYPE[code], n


def _cache_key(prefix: str, eos: int) -> np.ndarray:
    si, sb = os.stat(prefix + ".idx"), os.stat(prefix + ".bin")
    return np.array([_CACHE_VERSION, eos, si.st_size, si.st_mtime_ns, sb.st_size, sb.st_mtime_ns],
                    dtype=np.int64)


def cache_path(prefix: str) -> str:
    return prefix + ".docs.npz"


def scan_split(prefix: str, eos: int, use_cache: bool = True) -> SplitScan:
    """The document runs of ``prefix.bin/.idx``, from the cache when it is current."""
    dtype, n = read_header(prefix)
    key = _cache_key(prefix, eos)
    path = cache_path(prefix)
    if use_cache and os.path.isfile(path):
        try:
            with np.load(path) as z:
                if np.array_equal(z["key"], key):
                    flags = z["flags"]
                    return SplitScan(z["run_kept"], z["run_bin"], int(z["kept_total"]), n,
                                     bool(flags[0]), bool(flags[1]), dtype)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or old cache: scan again
    scan = _scan(prefix, eos, dtype, n)
    if use_cache:
        _write_cache(path, key, scan)
    return scan


def _write_cache(path: str, key: np.ndarray, scan: SplitScan) -> None:
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    try:
        np.savez(tmp, key=key, run_kept=scan.run_kept, run_bin=scan.run_bin,
                 kept_total=np.int64(scan.kept_total),
                 flags=np.array([scan.first_in_run, scan.last_in_run]))
        os.replace(tmp, path)  # atomic: ranks that scan at once all write the same file
    except OSError as e:
        logger.warning("could not cache document index at %s (%s); it is rebuilt at each load",
                       path, e)
        try:
            os.remove(tmp)
        except OSError:
            pass


def _scan(prefix: str, eos: int, dtype, n: int) -> SplitScan:
    """One pass over the item sizes in chunks; separators are read with ``pread``
    (no mapping of the ``.bin``, so the pass leaves no resident pages behind)."""
    itemsize = np.dtype(dtype).itemsize
    bin_tokens = os.path.getsize(prefix + ".bin") // itemsize
    run_kept, run_bin = [], []
    kept = 0  # kept tokens before the chunk
    pos = 0  # .bin tokens before the chunk
    in_run = False
    first_in_run = False
    bad = None
    with open(prefix + ".idx", "rb") as f, open(prefix + ".bin", "rb") as fb:
        f.seek(_HEADER)
        done = 0
        while done < n:
            s = np.fromfile(f, dtype="<i4", count=min(_CHUNK, n - done)).astype(np.int64)
            if done == 0:
                first_in_run = bool(s[0] != 1)
            sep = s == 1
            item_pos = pos + np.cumsum(s) - s
            ks = np.where(sep, 0, s)
            item_kept = kept + np.cumsum(ks) - ks
            prev_sep = np.empty_like(sep)
            prev_sep[0] = not in_run
            prev_sep[1:] = sep[:-1]
            starts = ~sep & prev_sep
            run_kept.append(item_kept[starts])
            run_bin.append(item_pos[starts])
            sep_pos = item_pos[sep]
            if bad is None and len(sep_pos) and int(sep_pos[-1]) < bin_tokens:
                bad = _first_non_eos(fb.fileno(), sep_pos, dtype, eos)
            pos += int(s.sum())
            kept += int(ks.sum())
            in_run = not bool(sep[-1])
            done += len(s)
    if pos != bin_tokens or os.path.getsize(prefix + ".bin") != pos * itemsize:
        raise StreamDataError(
            f"corrupt binarized data in {prefix}: .bin holds {bin_tokens} tokens but .idx "
            f"describes {pos}; re-run fairseq-preprocess for this split"
        )
    if bad is not None:
        raise StreamDataError(
            f"corrupt binarized data in {prefix}: the length-1 item at .bin token {bad} is not "
            "an empty line (</s>); re-binarize with longmem-preprocess"
        )
    return SplitScan(
        np.concatenate(run_kept) if run_kept else np.zeros(0, np.int64),
        np.concatenate(run_bin) if run_bin else np.zeros(0, np.int64),
        kept, n, first_in_run, in_run, dtype,
    )


def _first_non_eos(fd: int, positions: np.ndarray, dtype, eos: int):
    """Position of the first separator token that is not ``eos``, else None."""
    itemsize = np.dtype(dtype).itemsize
    expected = np.array([eos], dtype=dtype).tobytes()
    for p in positions.tolist():
        if os.pread(fd, itemsize, p * itemsize) != expected:
            return p
    return None
