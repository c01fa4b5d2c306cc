"""Writing fairseq's memory-mapped dataset format (``.bin`` + ``.idx``) with bounded memory.

The files are those of ``fairseq.data.indexed_dataset.MMapIndexedDatasetBuilder``
(byte for byte; tests/test_preprocess.py checks it), but item sizes go to a
temporary file instead of a Python list, and :meth:`MMapWriter.merge` streams the
other file's sizes: fairseq's ``merge_file_`` keeps every item size of the whole
split in a list (about 36 bytes per line). numpy only: no torch in the workers.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Tuple, Union

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = len(_MAGIC) + 8 + 1 + 8  # magic, version, dtype code, number of items
_CODES = {np.dtype(t): c for c, t in {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                      6: np.float64, 8: np.uint16, 9: np.uint32, 10: np.uint64}.items()}
_DTYPES = {c: t for t, c in _CODES.items()}
_CHUNK = 1 << 18  # items per streamed block

Prefix = Union[str, "os.PathLike[str]"]


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """The token dtype fairseq-preprocess picks for a dictionary of ``vocab_size`` symbols."""
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    if vocab_size < 4294967295:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)


def read_index_header(idx_path: Prefix) -> Tuple[np.dtype, int]:
    """``(token dtype, number of items)`` of a fairseq mmap ``.idx`` file."""
    with open(idx_path, "rb") as fh:
        head = fh.read(_HEADER)
    if len(head) != _HEADER or head[: len(_MAGIC)] != _MAGIC:
        raise ValueError(f"{idx_path} is not a fairseq mmap index")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise ValueError(f"{idx_path}: unknown index version {version}")
    return _DTYPES[head[17]], struct.unpack("<Q", head[18:26])[0]


def read_sizes(idx_path: Prefix) -> np.ndarray:
    """The item sizes of an ``.idx`` file (a read-only memory map: nothing is loaded)."""
    _, n = read_index_header(idx_path)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(idx_path, dtype=np.int32, mode="r", offset=_HEADER, shape=(n,))


class MMapWriter:
    """Append items to ``PREFIX.bin`` / ``PREFIX.idx`` in fairseq's mmap format.

    ``add(flat, sizes)`` appends ``len(sizes)`` items whose tokens are ``flat``
    (concatenated); :meth:`finalize` writes the index. Memory is O(one block).
    """

    def __init__(self, prefix: Prefix, dtype: np.dtype) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = open(self.prefix + ".bin", "wb")
        self._sizes_path = self.prefix + ".sizes.tmp"
        self._sizes = open(self._sizes_path, "wb")
        self.items = 0
        self.tokens = 0

    def add(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Append items: ``flat`` holds their tokens back to back, ``sizes`` their lengths."""
        sizes = np.asarray(sizes, dtype=np.int32)
        flat = np.asarray(flat)
        if int(sizes.sum()) != flat.size:
            raise ValueError("sizes do not add up to the number of tokens")
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.write(sizes.tobytes(order="C"))
        self.items += int(sizes.size)
        self.tokens += int(flat.size)

    def merge(self, other: Prefix) -> None:
        """Append every item of the finished dataset ``other`` (``.bin`` copied, sizes streamed)."""
        other = str(other)
        dtype, n = read_index_header(other + ".idx")
        if dtype != self.dtype:
            raise ValueError(f"{other}: tokens are {dtype}, this dataset's are {self.dtype}")
        sizes = read_sizes(other + ".idx")
        for a in range(0, n, _CHUNK):
            block = np.asarray(sizes[a : a + _CHUNK])
            self._sizes.write(block.tobytes(order="C"))
            self.tokens += int(block.sum(dtype=np.int64))
        self.items += n
        del sizes
        with open(other + ".bin", "rb") as fh:
            shutil.copyfileobj(fh, self._bin, 16 << 20)

    def finalize(self) -> None:
        """Close ``.bin`` and write ``.idx`` (header, int32 sizes, int64 byte pointers)."""
        self._bin.close()
        self._sizes.close()
        itemsize = self.dtype.itemsize
        tmp_idx = self.prefix + ".idx.tmp"
        with open(tmp_idx, "wb") as out:
            out.write(_MAGIC)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", _CODES[self.dtype]))
            out.write(struct.pack("<Q", self.items))
            with open(self._sizes_path, "rb") as fh:
                shutil.copyfileobj(fh, out, 16 << 20)
            address = 0
            with open(self._sizes_path, "rb") as fh:
                while True:
                    block = np.frombuffer(fh.read(4 * _CHUNK), dtype=np.int32)
                    if block.size == 0:
                        break
                    ends = np.cumsum(block, dtype=np.int64) * itemsize + address
                    pointers = np.empty_like(ends)
                    pointers[0] = address
                    pointers[1:] = ends[:-1]
                    out.write(pointers.tobytes(order="C"))
                    address = int(ends[-1])
        os.replace(tmp_idx, self.prefix + ".idx")
        os.unlink(self._sizes_path)

    def close(self) -> None:
        """Abandon an unfinished dataset (temporary files removed)."""
        for fh in (self._bin, self._sizes):
            fh.close()
        Path(self._sizes_path).unlink(missing_ok=True)
