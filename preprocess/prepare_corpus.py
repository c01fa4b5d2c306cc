"""Raw documents -> binarized fairseq dataset that keeps document boundaries, streaming.

Usage::

    longmem-preprocess --input PATH [PATH ...] --out DIR [--vocab-size 4000] [--workers N]
        [--subsets Books3,ArXiv] [--model-type unigram] [--valid-frac 0.05] [--test-frac 0.05]
        [--min-split-docs 1] [--seed 1] [--spm-sample-chars 100000000]
        [--spm-input-sentence-size 2000000] [--max-line-chars 10000] [--no-raw-text]
        [--keep-shards] [--quiet] [--tokenizer IMPORTED_BACKBONE_DIR]
    longmem-preprocess --train PATH.. --valid PATH.. --test PATH.. --out DIR ...   (given splits)

An input is a folder (recursive: ``.jsonl``/``.jsonl.gz``/``.jsonl.zst`` files are
shards of JSON lines, other files are one document each), a shard file, or a glob.
Resident memory is bounded whatever the corpus size: documents stream through
(:mod:`preprocess.shard_work`); nothing holds all documents, their names or
their tokens.

1. **scan** (parallel, per unit): count documents, skips and bad lines; draw a
   bounded sample of lines (``--spm-sample-chars``, train documents only).
2. **split**: exact split sizes from the count; each document's split is decided
   as it streams by (:mod:`preprocess.splitting`), reproducibly from ``--seed``.
3. **dictionary**: sentencepiece trained on the sample (or ``--tokenizer``).
4. **binarize** (parallel, per unit): tokens straight into fairseq's mmap format;
   each finished unit is recorded in ``DIR/manifest.json`` (written atomically), so
   a killed run started again with the same command skips the finished units.
5. **merge**: the units' files into ``data-bin`` (streamed; re-run on a restart).

Output layout (``DIR``)::

    raw/{train,valid,test}.txt   documents as non-empty lines, separated by ONE empty line
                                 (not with --no-raw-text)
    spm.model, spm.vocab         sentencepiece model trained on a sample of train documents
    dict.txt                     fairseq dictionary (every usable sentencepiece piece)
    data-bin/                    fairseq mmap dataset: one item per line; a document
                                 separator is a length-1 item (just </s>)
    splits.json                  document names per split, in stream order
    corpus_info.json             counts, sizes, settings, throughput and step timings
    manifest.json, shards/       progress of an unfinished run (removed at the end
                                 unless --keep-shards)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import queue as queue_mod
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from .documents import (
    REPORTED_SKIPS,
    Document,
    InputUnit,
    PathLike,
    PreprocessError,
    discover_units,
    document_lines,
    format_skipped,
    iter_documents,
    no_documents_error,
)
from .mmap_writer import MMapWriter, best_fitting_dtype, read_index_header, read_sizes
from .sentencepiece_model import (
    FAIRSEQ_SPECIALS,
    PieceEncoder,
    is_safe_piece,
    train_sentencepiece,
)
from .shard_work import LineSample, binarize_unit, init_worker, scan_unit, set_progress
from .splitting import (
    SPLITS,
    allocate,
    check_split_args,
    split_documents,
    split_sizes,
    unit_assignment,
)

__all__ = [
    "SPLITS", "MODEL_TYPES", "FAIRSEQ_SPECIALS", "Document", "PieceEncoder", "PreprocessError",
    "document_lines", "is_safe_piece", "iter_documents", "split_documents", "train_sentencepiece",
    "write_fairseq_dict", "inspect_binarized", "prepare_corpus", "build_parser", "main",
]

logger = logging.getLogger(__name__)

MODEL_TYPES = ("unigram", "bpe")
DEFAULT_SPM_SAMPLE_CHARS = 100_000_000
MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_INSPECT_CHUNK = 1 << 22  # tokens per block when checking the output


# --------------------------------------------------------------------------- dictionary


def write_fairseq_dict(encoder: PieceEncoder, path: Path) -> int:
    """Write ``path`` as a fairseq dictionary (``piece count`` lines); returns the symbol count.

    Every dictionary-safe sentencepiece piece is listed in sentencepiece id order with a
    strictly decreasing pseudo-count, so a later count sort keeps this order.
    """
    n = len(encoder.dict_pieces)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for rank, piece in enumerate(encoder.dict_pieces):
            fh.write(f"{piece} {n - rank}\n")
    return n


def _sha(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inspect_binarized(data_bin: Path, split: str) -> Dict[str, int]:
    """Item/token statistics of one binarized split, read in blocks (bounded memory).

    ``items`` (lines + separators), ``tokens`` (incl. one ``</s>`` per item),
    ``separators`` (length-1 items), ``unk`` (``<unk>`` tokens; fairseq's index 3).
    """
    import numpy as np

    prefix = str(data_bin / split)
    dtype, n_items = read_index_header(prefix + ".idx")
    sizes = read_sizes(prefix + ".idx")
    n_tokens = n_sep = 0
    for a in range(0, n_items, _INSPECT_CHUNK):
        block = np.asarray(sizes[a : a + _INSPECT_CHUNK])
        n_tokens += int(block.sum(dtype=np.int64))
        n_sep += int(np.count_nonzero(block == 1))
    del sizes
    n_unk = 0
    if Path(prefix + ".bin").stat().st_size:  # np.memmap refuses empty files
        tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
        for a in range(0, tokens.size, _INSPECT_CHUNK):
            n_unk += int(np.count_nonzero(tokens[a : a + _INSPECT_CHUNK] == 3))
        del tokens
    return {"items": n_items, "tokens": n_tokens, "separators": n_sep, "unk": n_unk}


# --------------------------------------------------------------------------- arguments


def _check_args(vocab_size: int, model_type: str, workers: int, spm_input_sentence_size: int,
                max_line_chars: int, spm_sample_chars: int) -> None:
    if vocab_size < 2:
        raise PreprocessError(f"--vocab-size must be a positive number of pieces, got {vocab_size}; try 4000")
    if model_type not in MODEL_TYPES:
        raise PreprocessError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    if spm_input_sentence_size < 1:
        raise PreprocessError(f"--spm-input-sentence-size must be >= 1, got {spm_input_sentence_size}")
    if max_line_chars < 0:
        raise PreprocessError(f"--max-line-chars must be >= 0 (0 = no limit), got {max_line_chars}")
    if spm_sample_chars < 1000:
        raise PreprocessError(f"--spm-sample-chars must be >= 1000, got {spm_sample_chars}; try 100000000")


def _as_list(paths: Union[None, PathLike, Sequence[PathLike]]) -> List[PathLike]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


def _prepare_out_dir(out: Path, inputs: Sequence[PathLike]) -> None:
    """Create ``out`` (and subfolders) and check that it is writable and outside the inputs."""
    for inp in inputs:
        input_path = Path(inp)
        if input_path.is_dir():
            try:
                out.resolve().relative_to(input_path.resolve())
            except ValueError:
                continue
            raise PreprocessError(
                f"output folder {str(out)!r} is inside the input folder {str(input_path)!r}; "
                "choose an --out outside the input"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise PreprocessError(
            f"output folder {str(out)!r} is not writable ({exc.strerror or exc}); choose a writable --out"
        ) from exc


# --------------------------------------------------------------------------- manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_manifest(out: Path, fingerprint: str) -> Dict[str, Any]:
    """The manifest of an unfinished run with the same settings and inputs, or a new one."""
    path = out / MANIFEST
    fresh = {"version": _MANIFEST_VERSION, "fingerprint": fingerprint, "scan": None, "dictionary": None,
             "done": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if isinstance(old, dict) and old.get("fingerprint") == fingerprint and old.get("version") == _MANIFEST_VERSION:
            return old
        logger.warning("%s is from a run with other inputs or settings: starting afresh", path)
    if (out / "shards").exists():
        shutil.rmtree(out / "shards")
    _write_json_atomic(path, fresh)
    return fresh


# --------------------------------------------------------------------------- parallel runner


def _run_units(fn: Callable[[Dict[str, Any]], Dict[str, Any]], tasks: List[Dict[str, Any]], workers: int,
               on_done: Callable[[Dict[str, Any], Dict[str, Any]], None],
               on_progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Run ``fn`` on every task (in this process, or ``workers`` spawned processes); ``on_done``
    is called in this process, in completion order; progress ``(docs, tokens)`` as it comes."""
    if not tasks:
        return
    if workers <= 1 or len(tasks) == 1:
        set_progress(on_progress)
        try:
            for task in tasks:
                on_done(task, fn(task))
        finally:
            set_progress(None)
        return
    # fork where there is one: a spawned worker would import the whole plugin (torch, fairseq)
    # again, seconds and hundreds of MB each; the workers use numpy and the tokenizer only
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    q = ctx.Queue()
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                             initializer=init_worker, initargs=(q,)) as pool:
        futures = {pool.submit(fn, task): task for task in tasks}
        pending = set(futures)

        def drain() -> None:
            while True:
                try:
                    d, t = q.get_nowait()
                except (queue_mod.Empty, OSError, EOFError):
                    return
                if on_progress is not None:
                    on_progress(d, t)

        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for fut in done:
                    on_done(futures[fut], fut.result())
            drain()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


class _Progress:
    """tqdm bar on stderr: documents, tokens, tokens/s, ETA (off when not a TTY or quiet)."""

    def __init__(self, total_docs: int, enabled: bool, done_docs: int = 0, desc: str = "binarize",
                 unit: str = "doc") -> None:
        self.bar = None
        self.tokens = 0
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_docs, initial=done_docs, unit=unit, desc=desc,
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tok, {rate / 1e3:.0f}k tok/s", refresh=False)
            self.bar.update(docs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- pipeline


def prepare_corpus(
    input: Union[None, PathLike, Sequence[PathLike]] = None,
    out: PathLike = "prep",
    vocab_size: int = 4000,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    min_split_docs: int = 1,
    seed: int = 1,
    workers: int = 1,
    spm_input_sentence_size: int = 2_000_000,
    max_line_chars: int = 10000,
    model_type: str = "unigram",
    tokenizer: Optional[PathLike] = None,
    *,
    train: Union[None, PathLike, Sequence[PathLike]] = None,
    valid: Union[None, PathLike, Sequence[PathLike]] = None,
    test: Union[None, PathLike, Sequence[PathLike]] = None,
    subsets: Optional[Sequence[str]] = None,
    spm_sample_chars: int = DEFAULT_SPM_SAMPLE_CHARS,
    write_raw: bool = True,
    keep_shards: bool = False,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """Run the whole pipeline (see the module docstring) and return the corpus info dict.

    ``input`` (one or more paths/globs) is split by document with ``seed``; or
    ``train``/``valid``/``test`` give the splits. The info dict is also written to
    ``out/corpus_info.json``. Bad input or settings raise :class:`PreprocessError`
    with a one-line message naming the problem and the fix. With ``tokenizer`` (a
    folder), an imported backbone's HF tokenizer and dictionary replace
    sentencepiece (``hf_tokenizer.py``): one line per document. ``progress``:
    show the bar (``None``: when stderr is a terminal).
    """
    _check_args(vocab_size, model_type, workers, spm_input_sentence_size, max_line_chars, spm_sample_chars)
    inputs = _as_list(input)
    given = {s: _as_list(v) for s, v in (("train", train), ("valid", valid), ("test", test))}
    if inputs and any(given.values()):
        raise PreprocessError("give either --input (split by --seed) or --train/--valid/--test, not both")
    if not inputs and not all(given.values()):
        missing = [f"--{s}" for s in SPLITS if not given[s]] if any(given.values()) else ["--input"]
        raise PreprocessError(f"no input for {', '.join(missing)}; pass --input PATH, or all of "
                              "--train, --valid and --test")
    if not any(given.values()):
        check_split_args(valid_frac, test_frac, min_split_docs)
    subsets = [s.strip() for s in subsets if s.strip()] if subsets else None
    hf_encoder = None
    if tokenizer is not None:
        from .hf_tokenizer import HFTokenizerEncoder

        hf_encoder = HFTokenizerEncoder(tokenizer)
    out_dir = Path(out)
    timings: Dict[str, float] = {}
    t_all = time.perf_counter()

    # 0. inputs -> units (validated eagerly), output folder, manifest
    if inputs:
        units = discover_units(inputs)
    else:
        units = [u for s in SPLITS for u in discover_units(given[s], split=s)]
    all_inputs = inputs or [p for s in SPLITS for p in given[s]]
    _prepare_out_dir(out_dir, all_inputs)
    unit_keys = [u.key for u in units]
    settings = {
        "units": unit_keys, "vocab_size": vocab_size, "model_type": model_type, "seed": seed,
        "valid_frac": valid_frac, "test_frac": test_frac, "min_split_docs": min_split_docs,
        "max_line_chars": max_line_chars, "subsets": subsets, "spm_sample_chars": spm_sample_chars,
        "spm_input_sentence_size": spm_input_sentence_size, "write_raw": write_raw,
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer is not None else None,
    }
    fingerprint = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    manifest = _load_manifest(out_dir, fingerprint)
    manifest_path = out_dir / MANIFEST
    shard_root = out_dir / "shards"
    shard_root.mkdir(exist_ok=True)
    show = progress if progress is not None else sys.stderr.isatty()

    # 1. scan: documents per unit, skips, bad lines, the sentencepiece sample
    fixed_split = not inputs
    train_frac = 1.0 if fixed_split else max(0.05, 1.0 - valid_frac - test_frac)
    need_sample = hf_encoder is None and not (manifest["dictionary"] and (out_dir / "spm.model").is_file())
    t0 = time.perf_counter()
    sample = LineSample(int(spm_sample_chars / train_frac) + 1)
    if manifest["scan"] is None or need_sample:
        scans: List[Optional[Dict[str, Any]]] = [None] * len(units)
        tasks = [{"unit": u, "index": i, "subsets": subsets, "seed": seed, "max_line_chars": max_line_chars,
                  "sample_chars": (sample.budget if need_sample and (u.split in (None, "train")) else 0)}
                 for i, u in enumerate(units)]
        bar = _Progress(len(units), show, desc="scan", unit="unit")

        def scanned(task: Dict[str, Any], res: Dict[str, Any]) -> None:
            for key, u, d, line in res.pop("sample"):
                sample.add(key, u, d, line)
            scans[task["index"]] = res
            bar.update(1, 0)

        try:
            _run_units(scan_unit, tasks, workers, scanned)
        finally:
            bar.close()
        manifest["scan"] = scans
        _write_json_atomic(manifest_path, manifest)
    scans = manifest["scan"]
    timings["scan"] = time.perf_counter() - t0
    skipped: Counter = Counter()
    bad_lines: List[str] = []
    for res in scans:
        skipped.update(res["skipped"])
        bad_lines.extend(res["bad_lines"][: max(0, 5 - len(bad_lines))])
    n_bad = sum(skipped[r] for r in REPORTED_SKIPS)
    if n_bad:
        logger.warning("skipped %d bad input lines (%s); first: %s", n_bad, format_skipped(
            {r: skipped[r] for r in REPORTED_SKIPS}), "; ".join(bad_lines))
    docs_per_unit = [res["docs"] for res in scans]
    label = ", ".join(str(p) for p in all_inputs)
    if sum(docs_per_unit) == 0:
        raise no_documents_error(label, skipped, len(all_inputs) == 1 and Path(all_inputs[0]).is_dir())
    logger.info("scanned %d units: %d documents (skipped: %s)", len(units), sum(docs_per_unit),
                format_skipped(skipped))

    # 2. split sizes and their allocation to units
    if fixed_split:
        for s in SPLITS:
            if sum(n for u, n in zip(units, docs_per_unit) if u.split == s) == 0:
                raise PreprocessError(f"no usable documents in the --{s} input ({', '.join(map(str, given[s]))}); "
                                      f"check the path and the --subsets filter (skipped: {format_skipped(skipped)})")
        alloc = [(0, 0)] * len(units)
    else:
        _, n_valid, n_test = split_sizes(sum(docs_per_unit), valid_frac, test_frac, min_split_docs)
        alloc = allocate(docs_per_unit, n_valid, n_test, seed)

    # 3. dictionary: sentencepiece on the train part of the sample, or the backbone's
    t0 = time.perf_counter()
    if hf_encoder is not None:
        dict_size = hf_encoder.write_dict(out_dir / "dict.txt")
        encoder_spec = ("hf", str(Path(tokenizer).resolve()))
        encoder = model_file = None
    else:
        model_file = out_dir / "spm.model"
        if need_sample:
            sample_path = out_dir / "spm_sample.txt"
            n_lines, n_chars = _write_train_sample(sample, units, docs_per_unit, alloc, seed, fixed_split,
                                                   spm_sample_chars, sample_path)
            logger.info("training sentencepiece on a sample of %d lines (%d characters)", n_lines, n_chars)
            model_file = train_sentencepiece(sample_path, out_dir / "spm", vocab_size=vocab_size,
                                             model_type=model_type, workers=workers,
                                             input_sentence_size=spm_input_sentence_size,
                                             max_line_chars=max_line_chars, seed=seed)
            sample_path.unlink()
            timings["train_spm"] = time.perf_counter() - t0
        del sample
        encoder = PieceEncoder(model_file)
        logger.info("sentencepiece %s model %s: %d pieces (%d not usable as fairseq symbols)", model_type,
                    model_file, encoder.sp.get_piece_size(), encoder.n_unsafe)
        dict_size = write_fairseq_dict(encoder, out_dir / "dict.txt")
        encoder_spec = ("spm", str(model_file.resolve()))
    dict_sha = _sha(out_dir / "dict.txt")
    if manifest["dictionary"] != dict_sha:
        manifest["dictionary"] = dict_sha
        _write_json_atomic(manifest_path, manifest)
    _check_dictionaries(manifest, dict_sha, out_dir)

    # 4. binarize every unit not finished before
    import numpy as np

    with (out_dir / "dict.txt").open("r", encoding="utf-8") as fh:
        n_symbols = 4 + sum(1 for _ in fh)  # fairseq's Dictionary: 4 specials + dict.txt
    dtype = best_fitting_dtype(n_symbols)
    unit_dirs = [shard_root / f"unit-{i:06d}-{k}" for i, k in enumerate(unit_keys)]
    done = manifest["done"]
    for key in list(done):
        if not (shard_root / f"unit-{done[key]['index']:06d}-{key}").is_dir():
            del done[key]  # its files are gone: do it again
    n_finished = sum(1 for k in unit_keys if k in done)
    if n_finished:
        logger.info("resuming: skipping %d of %d input units already binarized (%s)", n_finished, len(units),
                    manifest_path)
    tasks = [{"unit": u, "index": i, "docs": docs_per_unit[i], "split": u.split, "valid": alloc[i][0],
              "test": alloc[i][1], "seed": seed, "encoder": encoder_spec, "max_line_chars": max_line_chars,
              "dtype": np.dtype(dtype).str, "write_raw": write_raw, "subsets": subsets, "out": str(unit_dirs[i])}
             for i, u in enumerate(units) if u.key not in done and docs_per_unit[i] > 0]
    t0 = time.perf_counter()
    bar = _Progress(sum(docs_per_unit), show, done_docs=sum(docs_per_unit[i] for i, k in enumerate(unit_keys)
                                                             if k in done))
    tokens_now = 0

    def binarized(task: Dict[str, Any], res: Dict[str, Any]) -> None:
        nonlocal tokens_now
        tokens_now += res["tokens"]
        done[task["unit"].key] = {"index": task["index"], "label": task["unit"].label, "splits": res["splits"],
                                  "dictionary": dict_sha, "seconds": round(res["seconds"], 3)}
        _write_json_atomic(manifest_path, manifest)

    try:
        _run_units(binarize_unit, tasks, workers, binarized, bar.update)
    finally:
        bar.close()
    timings["binarize"] = time.perf_counter() - t0
    _check_dictionaries(manifest, dict_sha, out_dir)

    # 5. merge the units into data-bin (+ raw text, splits.json)
    t0 = time.perf_counter()
    data_bin = out_dir / "data-bin"
    stats = _merge(out_dir, data_bin, units, unit_dirs, done, docs_per_unit, dtype, write_raw)
    shutil.copyfile(out_dir / "dict.txt", data_bin / "dict.txt")
    timings["merge"] = time.perf_counter() - t0
    for split in SPLITS:
        binfo = inspect_binarized(data_bin, split)
        st = stats[split]
        expected = {"items": st["lines"] + st["docs"] - 1, "tokens": st["pieces"] + st["lines"] + st["docs"] - 1,
                    "separators": st["docs"] - 1, "unk": 0}
        if binfo != expected:
            raise RuntimeError(f"{split}: binarized dataset {binfo} does not match the encoded text {expected}")
        st.update({"items": binfo["items"], "bin_tokens": binfo["tokens"], "separators": binfo["separators"]})
    timings["total"] = time.perf_counter() - t_all
    total_tokens = sum(stats[s]["bin_tokens"] for s in SPLITS)

    # 6. summary
    info: Dict[str, Any] = {
        "input": str(Path(inputs[0]).resolve()) if len(inputs) == 1 else [str(p) for p in all_inputs],
        "input_kind": _input_kind(units),
        "given_splits": {s: [str(p) for p in given[s]] for s in SPLITS} if fixed_split else None,
        "subsets": subsets,
        "out": str(out_dir.resolve()),
        "units": len(units),
        "workers": workers,
        "seed": seed,
        "valid_frac": valid_frac,
        "test_frac": test_frac,
        "min_split_docs": min_split_docs,
        "max_line_chars": max_line_chars,
        "documents": sum(stats[s]["docs"] for s in SPLITS),
        "skipped": dict(sorted((k, v) for k, v in skipped.items() if v)),
        "bad_lines": bad_lines,
        "model_type": model_type,
        "vocab_size": vocab_size,
        "spm_pieces": encoder.sp.get_piece_size() if encoder else None,
        "spm_sample_chars": spm_sample_chars if encoder else None,
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer is not None else None,
        "dict_size": dict_size,
        "splits": stats,
        "tokens": total_tokens,
        "binarize_tokens_per_s": round(tokens_now / timings["binarize"], 1) if tokens_now else None,
        "paths": {
            "data_bin": str(data_bin.resolve()),
            "dict": str((out_dir / "dict.txt").resolve()),
            "spm_model": str(model_file.resolve()) if model_file else None,
            "raw": {s: str((out_dir / "raw" / f"{s}.txt").resolve()) for s in SPLITS} if write_raw else None,
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    _write_json_atomic(out_dir / "corpus_info.json", info)
    if not keep_shards:
        shutil.rmtree(shard_root)
        manifest_path.unlink()
    for split in SPLITS:
        st = stats[split]
        logger.info("%-5s: %d docs, %d lines, %d pieces, %d fairseq tokens (incl. </s>)", split, st["docs"],
                    st["lines"], st["pieces"], st["bin_tokens"])
    logger.info("wrote %s (dictionary %d symbols) in %.1fs; timings: %s", data_bin, dict_size, timings["total"],
                ", ".join(f"{k}={v:.1f}s" for k, v in timings.items()))
    return info


def _input_kind(units: Sequence[InputUnit]) -> str:
    kinds = {u.kind for u in units}
    if kinds == {"jsonl"}:
        return "jsonl"
    return "folder" if kinds == {"files"} else "mixed"


def _check_dictionaries(manifest: Dict[str, Any], dict_sha: str, out_dir: Path) -> None:
    """Every finished unit must have been binarized with the current dict.txt."""
    stale = [v["label"] for v in manifest["done"].values() if v["dictionary"] != dict_sha]
    if stale:
        raise PreprocessError(
            f"{len(stale)} input units (first: {stale[0]}) were binarized with another dictionary than "
            f"{out_dir / 'dict.txt'} (spm.model or --tokenizer changed since); restore the model, or delete "
            f"{out_dir / 'shards'} and {out_dir / MANIFEST} to binarize everything again"
        )


def _write_train_sample(sample: LineSample, units: Sequence[InputUnit], docs_per_unit: Sequence[int],
                        alloc: Sequence[tuple], seed: int, fixed_split: bool, budget: int,
                        path: Path) -> tuple:
    """Write the sample's lines of train documents (smallest keys first, at most ``budget``
    characters) to ``path``; returns ``(lines, characters)``."""
    entries = sample.entries()
    if not fixed_split:  # keep lines of train documents: replay each unit's assignment
        wanted: Dict[int, set] = {}
        for _, u, d, _ in entries:
            wanted.setdefault(u, set()).add(d)
        train_docs: Dict[int, set] = {}
        for u, docs in wanted.items():
            keep = set()
            for d, split in enumerate(unit_assignment(seed, u, docs_per_unit[u], alloc[u][0], alloc[u][1])):
                if split == "train" and d in docs:
                    keep.add(d)
            train_docs[u] = keep
        entries = [e for e in entries if e[2] in train_docs[e[1]]]
    n_lines = n_chars = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for _, _, _, line in entries:
            if n_chars + len(line) > budget:
                break
            fh.write(line)
            fh.write("\n")
            n_lines += 1
            n_chars += len(line)
    if n_lines == 0:
        raise PreprocessError("the sentencepiece sample is empty (no line of a train document fits "
                              "--spm-sample-chars); raise --spm-sample-chars")
    return n_lines, n_chars


def _merge(out_dir: Path, data_bin: Path, units: Sequence[InputUnit], unit_dirs: Sequence[Path],
           done: Dict[str, Any], docs_per_unit: Sequence[int], dtype: Any, write_raw: bool) -> Dict[str, Dict[str, int]]:
    """Concatenate the units' outputs per split, in input order, one separator between units."""
    import numpy as np

    data_bin.mkdir(parents=True, exist_ok=True)
    if write_raw:
        (out_dir / "raw").mkdir(exist_ok=True)
    stats: Dict[str, Dict[str, int]] = {}
    names_tmp = out_dir / "splits.json.tmp"
    with names_tmp.open("w", encoding="utf-8", newline="\n") as names_out:
        names_out.write("{")
        for si, split in enumerate(SPLITS):
            writer = MMapWriter(data_bin / split, dtype)
            raw = (out_dir / "raw" / f"{split}.txt").open("w", encoding="utf-8", newline="\n") if write_raw else None
            st = {"docs": 0, "lines": 0, "text_lines": 0, "chars": 0, "pieces": 0}
            names_out.write(("," if si else "") + f"\n{json.dumps(split)}: [")
            first_name = True
            for unit, udir, n in zip(units, unit_dirs, docs_per_unit):
                if n == 0:
                    continue
                ust = done[unit.key]["splits"][split]
                if ust["docs"] == 0:
                    continue
                if st["docs"]:
                    writer.add(np.array([2]), np.array([1]))
                    if raw is not None:
                        raw.write("\n")
                writer.merge(udir / split)
                if raw is not None:
                    with (udir / f"raw.{split}.txt").open("r", encoding="utf-8", newline="\n") as fh:
                        shutil.copyfileobj(fh, raw, 1 << 20)
                with (udir / f"names.{split}.jsonl").open("r", encoding="utf-8") as fh:
                    for line in fh:
                        names_out.write(("\n" if first_name else ",\n") + line.rstrip("\n"))
                        first_name = False
                for k in st:
                    st[k] += ust[k]
            names_out.write("\n]")
            writer.finalize()
            if raw is not None:
                raw.close()
            stats[split] = st
        names_out.write("\n}\n")
    os.replace(names_tmp, out_dir / "splits.json")
    return stats


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``longmem-preprocess``."""
    p = argparse.ArgumentParser(
        prog="longmem-preprocess",
        description="Raw documents (folders, .jsonl/.jsonl.gz/.jsonl.zst shards) -> binarized fairseq "
                    "dataset with document boundaries, streaming, in parallel, resumable.",
    )
    p.add_argument("--input", nargs="+", default=None, help="folders, shard files or globs; documents are "
                   "split into train/valid/test by --seed")
    p.add_argument("--train", nargs="+", default=None, help="given train split (folders/shards/globs)")
    p.add_argument("--valid", nargs="+", default=None, help="given valid split")
    p.add_argument("--test", nargs="+", default=None, help="given test split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subsets", default=None, help="keep only these Pile subsets (meta.pile_set_name), "
                   "comma-separated, e.g. Books3,ArXiv")
    p.add_argument("--vocab-size", type=int, default=4000, help="sentencepiece vocabulary size (default 4000)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="unigram", help="sentencepiece model type")
    p.add_argument("--tokenizer", default=None, help="tokenize with an imported backbone's HF tokenizer "
                   "(folder written by longmem-import-hf) instead of training sentencepiece")
    p.add_argument("--valid-frac", type=float, default=0.05, help="fraction of documents for valid (default 0.05)")
    p.add_argument("--test-frac", type=float, default=0.05, help="fraction of documents for test (default 0.05)")
    p.add_argument("--min-split-docs", type=int, default=1, help="minimum documents in valid and in test")
    p.add_argument("--seed", type=int, default=1, help="seed of the document split (and spm sampling)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (sentencepiece trains on one thread: the same model for any --workers)")
    p.add_argument("--spm-sample-chars", type=int, default=DEFAULT_SPM_SAMPLE_CHARS,
                   help="sentencepiece trains on a random sample of train lines of at most this many "
                        f"characters (default {DEFAULT_SPM_SAMPLE_CHARS})")
    p.add_argument("--spm-input-sentence-size", type=int, default=2_000_000,
                   help="max lines of the sample sentencepiece reads (default 2000000)")
    p.add_argument("--max-line-chars", type=int, default=10000,
                   help="cut lines longer than this into chunks (0 = never; default 10000)")
    p.add_argument("--no-raw-text", action="store_true", help="do not write raw/{train,valid,test}.txt")
    p.add_argument("--keep-shards", action="store_true", help="keep shards/ and manifest.json after the merge")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (2 on a PreprocessError)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        prepare_corpus(
            args.input,
            args.out,
            vocab_size=args.vocab_size,
            valid_frac=args.valid_frac,
            test_frac=args.test_frac,
            min_split_docs=args.min_split_docs,
            seed=args.seed,
            workers=args.workers,
            spm_input_sentence_size=args.spm_input_sentence_size,
            max_line_chars=args.max_line_chars,
            model_type=args.model_type,
            tokenizer=args.tokenizer,
            train=args.train,
            valid=args.valid,
            test=args.test,
            subsets=args.subsets.split(",") if args.subsets else None,
            spm_sample_chars=args.spm_sample_chars,
            write_raw=not args.no_raw_text,
            keep_shards=args.keep_shards,
            progress=False if args.quiet else None,
        )
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
