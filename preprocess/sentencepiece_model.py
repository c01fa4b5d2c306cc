"""The sentencepiece model of ``longmem-preprocess``: training, and encoding into fairseq symbols."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from .documents import PathLike, PreprocessError

#: Symbols fairseq's Dictionary reserves; a piece equal to one of them can't be in dict.txt.
FAIRSEQ_SPECIALS = frozenset({"<s>", "<pad>", "</s>", "<unk>"})
#: fairseq's Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3, then dict.txt's symbols in order.
FAIRSEQ_EOS = 2
FAIRSEQ_NSPECIAL = 4
_WS = re.compile(r"\s")


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
    Trained on one thread (``workers`` is accepted for the callers and ignored),
    so the model is the same for any ``--workers``.
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
            # one thread whatever --workers: sentencepiece's multi-threaded EM sums in an
            # order that depends on scheduling, and the model (hence every token count)
            # then differed between --workers 1 and 2 on a loaded machine
            num_threads=1,
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

    # ------------------------------------------------------------------ fairseq indices

    def _fairseq_tables(self) -> None:
        """sentencepiece id -> fairseq index (-1 for respelled pieces) and the respellings."""
        index = {piece: FAIRSEQ_NSPECIAL + rank for rank, piece in enumerate(self.dict_pieces)}
        table = np.full(self.sp.get_piece_size(), -1, dtype=np.int64)
        respell: dict = {}
        for i in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(i)
            if piece in index:
                table[i] = index[piece]
            elif piece in self._unsafe:
                respell[i] = [index[p] for p in self._respell(piece)]
        self._table, self._respell_ids = table, respell

    def encode_fairseq(self, lines: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """fairseq indices of ``lines``, each line ended by ``</s>`` (what fairseq-preprocess makes
        of the pieces of :meth:`encode` with this model's ``dict.txt``).

        Returns ``(flat, sizes)``: the items back to back and their lengths (pieces + 1).
        A non-empty line that encodes to no piece raises ``RuntimeError``.
        """
        if not hasattr(self, "_table"):
            self._fairseq_tables()
        encoded: List[List[int]] = self.sp.encode(list(lines), out_type=int)
        lens = np.fromiter((len(x) for x in encoded), dtype=np.int64, count=len(encoded))
        if lens.size and int(lens.min()) == 0:
            bad = next(i for i, x in enumerate(encoded) if not x)
            raise RuntimeError(f"non-empty line encoded to zero pieces: {lines[bad][:80]!r}")
        ids = np.fromiter((t for x in encoded for t in x), dtype=np.int64, count=int(lens.sum()))
        mapped = self._table[ids] if ids.size else ids
        if ids.size and int(mapped.min()) < 0:  # lines with respelled pieces: rebuild them
            out: List[List[int]] = []
            for x in encoded:
                row = self._table[np.asarray(x, dtype=np.int64)]
                if int(row.min()) < 0:
                    fixed: List[int] = []
                    for t, m in zip(x, row.tolist()):
                        fixed.extend(self._respell_ids[t] if m < 0 else (m,))
                    out.append(fixed)
                else:
                    out.append(row.tolist())
            lens = np.fromiter((len(x) for x in out), dtype=np.int64, count=len(out))
            mapped = np.fromiter((t for x in out for t in x), dtype=np.int64, count=int(lens.sum()))
        sizes = lens + 1
        flat = np.full(int(sizes.sum()), FAIRSEQ_EOS, dtype=np.int64)
        keep = np.ones(flat.size, dtype=bool)
        keep[np.cumsum(sizes) - 1] = False
        flat[keep] = mapped
        return flat, sizes
