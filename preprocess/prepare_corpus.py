"""Raw documents -> binarized fairseq dataset that keeps document boundaries.

Usage::

    longmem-preprocess --input PATH --out DIR [--vocab-size 4000]
        [--model-type unigram] [--valid-frac 0.05] [--test-frac 0.05] [--min-split-docs 1]
        [--seed 1] [--workers 1] [--spm-input-sentence-size 2000000] [--max-line-chars 10000]
        [--tokenizer IMPORTED_BACKBONE_DIR]   (an HF tokenizer instead of sentencepiece)

Output layout (``DIR``)::

    raw/{train,valid,test}.txt   documents as non-empty lines, separated by ONE empty line
    spm.model, spm.vocab         sentencepiece model trained on raw/train.txt only
    tok/{train,valid,test}.tok   the same lines as space-separated pieces (separators kept)
    dict.txt                     fairseq dictionary (every usable sentencepiece piece)
    data-bin/                    fairseq-preprocess --only-source output (mmap): one item per
                                 line; a document separator is a length-1 item (just </s>)
    splits.json                  document names per split, in stream order
    corpus_info.json             counts, sizes, settings and step timings
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from .documents import (
    Document,
    PathLike,
    PreprocessError,
    format_skipped,
    iter_documents,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MODEL_TYPES = ("unigram", "bpe")
#: Symbols fairseq's Dictionary reserves; a piece equal to one of them can't be in dict.txt.
FAIRSEQ_SPECIALS = frozenset({"<s>", "<pad>", "</s>", "<unk>"})
_WS = re.compile(r"\s")
_ENCODE_BATCH = 8192  # lines per sentencepiece encode call


# --------------------------------------------------------------------------- splitting


def _split_sizes(n: int, valid_frac: float, test_frac: float, min_split_docs: int) -> tuple[int, int, int]:
    """(train, valid, test) document counts for ``n`` documents (train may come out < 1)."""
    n_valid = max(min_split_docs, int(math.floor(n * valid_frac)))
    n_test = max(min_split_docs, int(math.floor(n * test_frac)))
    return n - n_valid - n_test, n_valid, n_test


def split_documents(
    docs: Sequence[Document],
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    seed: int = 1,
    min_split_docs: int = 1,
) -> dict[str, list[Document]]:
    """Split ``docs`` by document into train/valid/test, deterministically from ``seed``.

    A copy of the list is shuffled with ``random.Random(seed)``; valid takes the first
    ``max(min_split_docs, floor(n * valid_frac))`` documents, test the next
    ``max(min_split_docs, floor(n * test_frac))``, train the rest. Each split keeps the
    shuffled order (that is the document stream order). Too few documents for three
    non-empty splits raises :class:`PreprocessError`.
    """
    _check_split_args(valid_frac, test_frac, min_split_docs)
    n = len(docs)
    n_train, n_valid, n_test = _split_sizes(n, valid_frac, test_frac, min_split_docs)
    if n_train < 1:
        needed = n + 1
        while _split_sizes(needed, valid_frac, test_frac, min_split_docs)[0] < 1:
            needed += 1
        raise PreprocessError(
            f"too few documents: found {n}, need at least {needed} so that train, valid and test "
            f"each get one (valid/test take >= {min_split_docs} each); add documents or lower "
            "--min-split-docs / --valid-frac / --test-frac"
        )
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    return {
        "valid": shuffled[:n_valid],
        "test": shuffled[n_valid : n_valid + n_test],
        "train": shuffled[n_valid + n_test :],
    }


def _check_split_args(valid_frac: float, test_frac: float, min_split_docs: int) -> None:
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


# --------------------------------------------------------------------------- raw text


def document_lines(text: str, max_line_chars: int = 0) -> list[str]:
    """The non-empty lines of a document.

    Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` (universal newlines, as fairseq and
    Python text files read them); empty and whitespace-only lines are dropped; other
    lines are kept verbatim. With ``max_line_chars > 0`` longer lines are cut into
    consecutive chunks of at most that many characters (whitespace-only chunks dropped).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
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


def write_raw_split(docs: Sequence[Document], path: Path, max_line_chars: int = 0) -> dict[str, int]:
    """Write ``docs`` to ``path``: non-empty lines, ONE empty line between documents.

    Returns ``{"docs", "lines", "chars"}`` (lines/chars of text, separators excluded).
    """
    n_lines = n_chars = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for i, doc in enumerate(docs):
            lines = document_lines(doc.text, max_line_chars)
            if not lines:  # cannot happen for documents from iter_documents
                raise PreprocessError(f"document {doc.name!r} has no non-empty line; remove it from the input")
            if i:
                fh.write("\n")
            for line in lines:
                fh.write(line)
                fh.write("\n")
            n_lines += len(lines)
            n_chars += sum(len(line) for line in lines)
    return {"docs": len(docs), "lines": n_lines, "chars": n_chars}


# --------------------------------------------------------------------------- sentencepiece


def train_sentencepiece(
    train_txt: PathLike,
    model_prefix: PathLike,
    vocab_size: int = 4000,
    model_type: str = "unigram",
    workers: int = 1,
    input_sentence_size: int = 2_000_000,
    max_line_chars: int = 10000,
    seed: int = 1,
) -> Path:
    """Train a sentencepiece model on ``train_txt``; returns ``<model_prefix>.model``.

    Settings suit code and arbitrary text: byte fallback (every string is encodable
    without ``<unk>``), character coverage 1.0, identity normalization and no
    whitespace collapsing (exact round trip, indentation kept), whitespace-only pieces
    allowed (indentation runs), no BOS/EOS/PAD pieces (fairseq adds its own). A
    vocabulary size the text cannot support raises :class:`PreprocessError`.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    max_sentence_bytes = max(4192, 4 * max_line_chars) if max_line_chars > 0 else 1 << 16
    try:
        spm.SentencePieceTrainer.train(
            input=str(train_txt),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_bytes,
            num_threads=workers,
            minloglevel=1,
        )
    except RuntimeError as exc:
        raise _spm_error(str(exc), vocab_size, train_txt) from exc
    return Path(f"{model_prefix}.model")


def _spm_error(msg: str, vocab_size: int, train_txt: PathLike) -> PreprocessError:
    """Translate a sentencepiece training failure into a one-line PreprocessError."""
    high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if high:
        return PreprocessError(
            f"--vocab-size {vocab_size} is too large for the training text in {str(train_txt)!r} "
            f"(sentencepiece can make at most {high.group(2)} pieces from it); "
            f"lower --vocab-size to <= {high.group(2)} or add training documents"
        )
    low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if low:
        return PreprocessError(
            f"--vocab-size {vocab_size} is too small: the training text needs {low.group(2)} pieces "
            f"for its characters and control/byte pieces; raise --vocab-size to at least {low.group(2)}"
        )
    last = msg.strip().splitlines()[-1] if msg.strip() else "unknown error"
    return PreprocessError(
        f"sentencepiece training on {str(train_txt)!r} failed: {last}; check --vocab-size and the input text"
    )


def is_safe_piece(piece: str) -> bool:
    """Whether ``piece`` can be a fairseq dictionary symbol (non-empty, no whitespace, not reserved)."""
    return bool(piece) and piece not in FAIRSEQ_SPECIALS and not _WS.search(piece)


class PieceEncoder:
    """Sentencepiece encoding into pieces that are always valid fairseq symbols.

    sentencepiece pieces use U+2581 for spaces, but a piece may still contain other
    whitespace (tabs, form feeds, ...) or equal a fairseq special symbol. Such pieces
    are left out of the dictionary and re-spelled character by character (a safe
    single-character piece if there is one, else its UTF-8 byte pieces ``<0xNN>``), so
    decoding is unchanged and fairseq never sees ``<unk>``.
    """

    def __init__(self, model_file: PathLike) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.dict_pieces: list[str] = []
        unsafe: set[str] = set()
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            piece = self.sp.id_to_piece(i)
            if is_safe_piece(piece):
                self.dict_pieces.append(piece)
            else:
                unsafe.add(piece)
        self._safe = frozenset(self.dict_pieces)
        self._unsafe = frozenset(unsafe)
        self.n_unsafe = len(unsafe)

    def _respell(self, piece: str) -> list[str]:
        out: list[str] = []
        for ch in piece:
            if ch in self._safe:
                out.append(ch)
            else:
                out.extend(f"<0x{b:02X}>" for b in ch.encode("utf-8"))
        return out

    def encode(self, lines: Sequence[str], num_threads: int = 1) -> list[list[str]]:
        """Encode each line into dictionary-safe pieces (an empty line gives ``[]``)."""
        encoded = self.sp.encode(list(lines), out_type=str, num_threads=num_threads)
        if not self._unsafe:
            return encoded
        result: list[list[str]] = []
        for pieces in encoded:
            if any(p in self._unsafe for p in pieces):
                fixed: list[str] = []
                for p in pieces:
                    fixed.extend(self._respell(p) if p in self._unsafe else (p,))
                pieces = fixed
            result.append(pieces)
        return result

    def decode(self, pieces: Sequence[str]) -> str:
        """Pieces (e.g. a line of a ``.tok`` file, split on spaces) back to text."""
        return self.sp.decode_pieces(list(pieces))


def _read_lines(path: Path) -> Iterator[str]:
    with path.open("r", encoding="utf-8", newline="\n") as fh:
        for line in fh:
            yield line[:-1] if line.endswith("\n") else line


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_split(raw_path: Path, tok_path: Path, encoder: PieceEncoder, workers: int = 1) -> dict[str, int]:
    """Encode ``raw_path`` line by line into ``tok_path``; empty separator lines stay empty.

    Returns ``{"lines", "separators", "pieces"}`` (``lines`` counts non-empty lines).
    """
    n_lines = n_sep = n_pieces = 0
    with tok_path.open("w", encoding="utf-8", newline="\n") as out:
        for batch in _batches(_read_lines(raw_path), _ENCODE_BATCH):
            for line, pieces in zip(batch, encoder.encode(batch, num_threads=workers)):
                if not line:
                    n_sep += 1
                    out.write("\n")
                    continue
                if not pieces:
                    raise RuntimeError(f"non-empty line in {raw_path} encoded to zero pieces: {line[:80]!r}")
                n_lines += 1
                n_pieces += len(pieces)
                out.write(" ".join(pieces))
                out.write("\n")
    return {"lines": n_lines, "separators": n_sep, "pieces": n_pieces}


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


# --------------------------------------------------------------------------- fairseq


def run_fairseq_preprocess(out: Path, workers: int = 1) -> Path:
    """Binarize ``out/tok/*.tok`` with fairseq-preprocess into ``out/data-bin`` (mmap)."""
    data_bin = out / "data-bin"
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.preprocess",
        "--only-source",
        "--srcdict",
        str(out / "dict.txt"),
        "--trainpref",
        str(out / "tok" / "train.tok"),
        "--validpref",
        str(out / "tok" / "valid.tok"),
        "--testpref",
        str(out / "tok" / "test.tok"),
        "--destdir",
        str(data_bin),
        "--workers",
        str(workers),
        "--dataset-impl",
        "mmap",
    ]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log_path = out / "fairseq_preprocess.log"
    log_path.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-3:]
        raise PreprocessError(
            f"fairseq-preprocess failed with exit status {proc.returncode}: {' | '.join(tail) or 'no output'}; "
            f"full log in {log_path}"
        )
    return data_bin


def inspect_binarized(data_bin: Path, split: str) -> dict[str, int]:
    """Item/token statistics of one binarized split.

    ``items`` (lines + separators), ``tokens`` (incl. one ``</s>`` per item),
    ``separators`` (length-1 items), ``unk`` (``<unk>`` tokens).
    """
    import numpy as np
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    prefix = str(data_bin / split)
    index = MMapIndexedDataset.Index(prefix + ".idx")
    sizes = np.asarray(index.sizes)
    unk_index = Dictionary.load(str(data_bin / "dict.txt")).unk()
    if Path(prefix + ".bin").stat().st_size:
        tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
        n_unk = int(np.count_nonzero(tokens == unk_index))
        del tokens
    else:  # np.memmap refuses empty files
        n_unk = 0
    result = {
        "items": int(sizes.size),
        "tokens": int(sizes.sum()),
        "separators": int(np.count_nonzero(sizes == 1)),
        "unk": n_unk,
    }
    del index
    return result


# --------------------------------------------------------------------------- pipeline


def _check_args(vocab_size: int, model_type: str, workers: int, spm_input_sentence_size: int, max_line_chars: int) -> None:
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


def _prepare_out_dir(out: Path, input_path: Path) -> None:
    """Create ``out`` (and subfolders) and check that it is writable."""
    if input_path.is_dir():
        try:
            out.resolve().relative_to(input_path.resolve())
        except ValueError:
            pass
        else:
            raise PreprocessError(
                f"output folder {str(out)!r} is inside the input folder {str(input_path)!r}; "
                "choose an --out outside the input"
            )
    try:
        for sub in (out, out / "raw", out / "tok"):
            sub.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise PreprocessError(
            f"output folder {str(out)!r} is not writable ({exc.strerror or exc}); choose a writable --out"
        ) from exc


def prepare_corpus(
    input: PathLike,
    out: PathLike,
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
) -> dict[str, Any]:
    """Run the whole pipeline (see the module docstring) and return the corpus info dict.

    The same dict is written to ``out/corpus_info.json``. Bad input or settings raise
    :class:`PreprocessError` with a one-line message naming the problem and the fix.
    With ``tokenizer`` (a folder), an imported backbone's HF tokenizer and dictionary
    replace sentencepiece (``hf_tokenizer.py``): one line per document.
    """
    _check_args(vocab_size, model_type, workers, spm_input_sentence_size, max_line_chars)
    _check_split_args(valid_frac, test_frac, min_split_docs)
    hf_encoder = None
    if tokenizer is not None:
        from .hf_tokenizer import HFTokenizerEncoder, encode_document_split

        hf_encoder = HFTokenizerEncoder(tokenizer)
    input_path, out_dir = Path(input), Path(out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. read documents (validates the input path eagerly)
    t0 = time.perf_counter()
    skipped: dict[str, int] = {}
    doc_iter = iter_documents(input_path, skipped)
    _prepare_out_dir(out_dir, input_path)
    docs = list(doc_iter)
    timings["read"] = time.perf_counter() - t0
    logger.info("read %d documents from %s (skipped: %s)", len(docs), input_path, format_skipped(skipped))

    # 2. split by document
    splits = split_documents(docs, valid_frac, test_frac, seed, min_split_docs)
    del docs
    with (out_dir / "splits.json").open("w", encoding="utf-8") as fh:
        json.dump({s: [d.name for d in splits[s]] for s in SPLITS}, fh, ensure_ascii=False, indent=0)

    # 3. raw text, one empty line between documents
    t0 = time.perf_counter()
    stats: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        stats[split] = write_raw_split(splits[split], out_dir / "raw" / f"{split}.txt", max_line_chars)
    del splits
    timings["write_raw"] = time.perf_counter() - t0
    logger.info(
        "documents per split: %s", ", ".join(f"{s}={stats[s]['docs']}" for s in SPLITS)
    )

    # 4-6. the backbone's HF tokenizer and dictionary (one line per document), or ...
    if hf_encoder is not None:
        t0 = time.perf_counter()
        for split in SPLITS:
            enc = encode_document_split(out_dir / "raw" / f"{split}.txt", out_dir / "tok" / f"{split}.tok", hf_encoder)
            if enc["lines"] != stats[split]["docs"]:
                raise RuntimeError(f"{split}: encoded {enc['lines']} documents, wrote {stats[split]['docs']}")
            stats[split].update(text_lines=stats[split]["lines"], lines=enc["lines"], pieces=enc["pieces"])
        timings["encode"] = time.perf_counter() - t0
        dict_size = hf_encoder.write_dict(out_dir / "dict.txt")
        encoder = model_file = None
    else:  # ... sentencepiece trained on train only
        # 4. sentencepiece on train only
        t0 = time.perf_counter()
        model_file = train_sentencepiece(
            out_dir / "raw" / "train.txt",
            out_dir / "spm",
            vocab_size=vocab_size,
            model_type=model_type,
            workers=workers,
            input_sentence_size=spm_input_sentence_size,
            max_line_chars=max_line_chars,
            seed=seed,
        )
        timings["train_spm"] = time.perf_counter() - t0
        encoder = PieceEncoder(model_file)
        logger.info(
            "trained sentencepiece %s model %s: %d pieces (%d not usable as fairseq symbols)",
            model_type,
            model_file,
            encoder.sp.get_piece_size(),
            encoder.n_unsafe,
        )

        # 5. encode every split, separators kept
        t0 = time.perf_counter()
        for split in SPLITS:
            enc = encode_split(out_dir / "raw" / f"{split}.txt", out_dir / "tok" / f"{split}.tok", encoder, workers)
            if enc["lines"] != stats[split]["lines"] or enc["separators"] != stats[split]["docs"] - 1:
                raise RuntimeError(f"{split}: encoded line counts {enc} disagree with raw counts {stats[split]}")
            stats[split]["pieces"] = enc["pieces"]
        timings["encode"] = time.perf_counter() - t0

        # 6. fairseq dictionary
        dict_size = write_fairseq_dict(encoder, out_dir / "dict.txt")

    # 7. binarize
    t0 = time.perf_counter()
    data_bin = run_fairseq_preprocess(out_dir, workers)
    timings["binarize"] = time.perf_counter() - t0
    for split in SPLITS:
        binfo = inspect_binarized(data_bin, split)
        st = stats[split]
        expected = {
            "items": st["lines"] + st["docs"] - 1,
            "tokens": st["pieces"] + st["lines"] + st["docs"] - 1,
            "separators": st["docs"] - 1,
            "unk": 0,
        }
        if binfo != expected:
            raise RuntimeError(f"{split}: binarized dataset {binfo} does not match the encoded text {expected}")
        st.update({"items": binfo["items"], "bin_tokens": binfo["tokens"], "separators": binfo["separators"]})
    timings["total"] = time.perf_counter() - t_all

    # 8. summary
    info: dict[str, Any] = {
        "input": str(input_path.resolve()),
        "input_kind": "folder" if input_path.is_dir() else "jsonl",
        "out": str(out_dir.resolve()),
        "seed": seed,
        "valid_frac": valid_frac,
        "test_frac": test_frac,
        "min_split_docs": min_split_docs,
        "max_line_chars": max_line_chars,
        "documents": sum(stats[s]["docs"] for s in SPLITS),
        "skipped": dict(sorted(skipped.items())),
        "model_type": model_type,
        "vocab_size": vocab_size,
        "spm_pieces": encoder.sp.get_piece_size() if encoder else None,
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer is not None else None,
        "dict_size": dict_size,
        "splits": stats,
        "paths": {
            "data_bin": str(data_bin.resolve()),
            "dict": str((out_dir / "dict.txt").resolve()),
            "spm_model": str(model_file.resolve()) if model_file else None,
            "raw": {s: str((out_dir / "raw" / f"{s}.txt").resolve()) for s in SPLITS},
            "tok": {s: str((out_dir / "tok" / f"{s}.tok").resolve()) for s in SPLITS},
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    with (out_dir / "corpus_info.json").open("w", encoding="utf-8") as fh:
        json.dump(info, fh, ensure_ascii=False, indent=2)
        fh.write("\n")
    for split in SPLITS:
        st = stats[split]
        logger.info(
            "%-5s: %d docs, %d lines, %d pieces, %d fairseq tokens (incl. </s>)",
            split,
            st["docs"],
            st["lines"],
            st["pieces"],
            st["bin_tokens"],
        )
    logger.info(
        "wrote %s (dictionary %d symbols) in %.1fs; timings: %s",
        data_bin,
        dict_size,
        timings["total"],
        ", ".join(f"{k}={v:.1f}s" for k, v in timings.items()),
    )
    return info


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m preprocess.prepare_corpus``."""
    p = argparse.ArgumentParser(
        prog="longmem-preprocess",
        description="Raw documents (folder or .jsonl) -> binarized fairseq dataset with document boundaries.",
    )
    p.add_argument("--input", required=True, help="folder of text files (one per document) or a .jsonl file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=4000, help="sentencepiece vocabulary size (default 4000)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="unigram", help="sentencepiece model type")
    p.add_argument("--tokenizer", default=None, help="tokenize with an imported backbone's HF tokenizer "
                   "(folder written by longmem-import-hf) instead of training sentencepiece")
    p.add_argument("--valid-frac", type=float, default=0.05, help="fraction of documents for valid (default 0.05)")
    p.add_argument("--test-frac", type=float, default=0.05, help="fraction of documents for test (default 0.05)")
    p.add_argument("--min-split-docs", type=int, default=1, help="minimum documents in valid and in test")
    p.add_argument("--seed", type=int, default=1, help="seed of the document split (and spm sampling)")
    p.add_argument("--workers", type=int, default=1, help="threads/processes for sentencepiece and fairseq")
    p.add_argument(
        "--spm-input-sentence-size",
        type=int,
        default=2_000_000,
        help="max lines sampled from train for sentencepiece training (default 2000000)",
    )
    p.add_argument(
        "--max-line-chars",
        type=int,
        default=10000,
        help="cut lines longer than this into chunks (0 = never; default 10000)",
    )
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
        )
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
