"""Save and load a memory bank (``--memory-path``).

Format (``format_version`` 1): one ``torch.save`` file of a dict

* ``format``: ``"fairseq-longmem-memory"``; ``format_version``: 1
* ``config``: the bank's layout (:meth:`MemoryBank.config`): backend,
  num_streams, num_heads, head_dim, memory_size, chunk_size, dtype
* ``backend_params``: knobs needed to rebuild the index (``ivf_nlist``, ``hnsw_m``, ...;
  files written before the memory spec existed name them ``memory_ivf_nlist``, ...)
* ``meta``: whatever the caller adds (backbone identity/sha, retrieval layer,
  corpus, ...); checked on load like ``config``
* ``state``: the ring (keys, values, chunk_keys, total) as CPU tensors, and
  for faiss backends their indexes, serialised with ``faiss.serialize_index``
  (uint8 tensors), so a loaded memory retrieves exactly what the saved one did.

The file holds only tensors, dicts, lists, strings and numbers: it is read with
``torch.load(weights_only=True)``. It is written to ``path.tmp-<pid>`` and
renamed over ``path`` (atomic on POSIX): a crash never leaves half a memory.
Every problem on load raises :class:`MemoryConfigError` with one line that
names it and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import MemoryConfigError
from .memory_bank import MemoryBank, dtype_name, resolve_dtype
from .memory_factory import build_memory
from .memory_spec import SEARCH_TIME_FIELDS, MemorySpec

FORMAT = "fairseq-longmem-memory"
FORMAT_VERSION = 1


def save_memory(bank: MemoryBank, path, meta: Optional[dict] = None) -> Path:
    """Write ``bank`` (and the caller's ``meta``) to ``path`` atomically."""
    path = Path(path)
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(bank.config()))
    if clash:
        raise MemoryConfigError(
            f"save_memory: meta keys {clash} would shadow the memory's own config; rename them"
        )
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": bank.config(),
        "backend_params": bank.backend_params(),
        "meta": meta,
        "state": bank.state_dict(),
    }
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_memory_header(path) -> dict:
    """``{format_version, config, backend_params, meta}`` of a memory file
    (reads the whole file; raises :class:`MemoryConfigError` like :func:`load_memory`)."""
    blob = _read(Path(path))
    return {key: blob[key] for key in ("format_version", "config", "backend_params", "meta")}


def load_memory(
    path, expected: Optional[dict] = None, device=None, spec: Optional[MemorySpec] = None
) -> MemoryBank:
    """Load a memory saved by :func:`save_memory`.

    expected: fields the memory must have (any of its ``config`` keys, e.g.
    ``num_heads``/``memory_size``/``backend``, and any ``meta`` key, e.g. the
    backbone sha): a missing or different field raises
    :class:`MemoryConfigError`. device: where the ring goes (default CPU).
    spec: the caller's memory spec, for the knobs that only change how a faiss
    index is searched (``ivf_nprobe``, ``hnsw_ef_search``, ``use_gpu_to_search``);
    the index structure always comes from the file.
    """
    path = Path(path)
    blob = _read(path)
    config, meta = blob["config"], blob["meta"]
    saved = dict(meta)
    saved.update(config)
    for field, want in (expected or {}).items():
        if field not in saved:
            raise MemoryConfigError(
                f"memory {path}: it records no {field!r} (expected {want!r}); it was saved "
                f"without it: rebuild the memory with the current setup (delete {path})"
            )
        got = saved[field]
        if _norm(got) != _norm(want):
            raise MemoryConfigError(
                f"memory {path} was built with {field}={got!r} but this run has "
                f"{field}={want!r}: rerun with {field}={got!r}, or delete {path} to "
                "rebuild the memory for this configuration"
            )
    params = {
        (name[len("memory_"):] if name.startswith("memory_") else name): value
        for name, value in (blob.get("backend_params") or {}).items()
    }
    if spec is not None:
        params.update({name: getattr(spec, name) for name in SEARCH_TIME_FIELDS})
    try:
        chunk_size = int(config["chunk_size"])
        saved_spec = MemorySpec(
            memory_size=int(config["memory_size"]), chunk_size=chunk_size, k=chunk_size,
            backend=config["backend"], **params,
        )
        bank = build_memory(
            saved_spec,
            int(config["num_streams"]),
            int(config["num_heads"]),
            int(config["head_dim"]),
            resolve_dtype(config["dtype"]),
            torch.device(device) if device is not None else torch.device("cpu"),
        )
        bank.load_state_dict(blob["state"])
    except MemoryConfigError as err:
        raise MemoryConfigError(f"memory {path}: {err}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise MemoryConfigError(
            f"memory {path} is corrupt ({type(err).__name__}: {err}); delete it and rebuild "
            "the memory"
        ) from None
    return bank


def _norm(value):
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (tuple, list)):
        return [_norm(v) for v in value]
    if isinstance(value, str) and value.lower() in ("float32", "float16", "bfloat16"):
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[value.lower()]
    return value


def _read(path: Path) -> dict:
    if not path.exists():
        raise MemoryConfigError(
            f"no memory file at {path}: build and save one first (save_memory / --memory-path "
            "on a run that fills it), or fix the path"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle/EOF errors of a truncated or foreign file
        raise MemoryConfigError(
            f"memory file {path} is truncated or corrupt ({type(err).__name__}); delete it "
            "and rebuild the memory"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise MemoryConfigError(
            f"{path} is not a fairseq-longmem memory file (no {FORMAT!r} header); point "
            "--memory-path at a file written by save_memory"
        )
    version = blob.get("format_version")
    if version != FORMAT_VERSION:
        raise MemoryConfigError(
            f"memory file {path} has format_version {version!r}, this code reads version "
            f"{FORMAT_VERSION}: rebuild the memory with this version (delete {path})"
        )
    for key in ("config", "meta", "state"):
        if not isinstance(blob.get(key), dict):
            raise MemoryConfigError(
                f"memory file {path} is corrupt (no {key!r} section); delete it and rebuild "
                "the memory"
            )
    return blob
