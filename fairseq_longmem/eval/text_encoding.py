"""Raw text -> ids of a fairseq dictionary, the way the training data was made.

With the sentencepiece model that ``longmem-preprocess`` trained (``spm.model``
next to ``dict.txt``, whose symbols are its pieces), or, without one, by
splitting on whitespace (data binarized from pre-tokenised text).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from . import EvalError


class TextEncoder:
    """Raw text -> ids of a fairseq dictionary, the way the training data was made.

    spm_model: the ``spm.model`` of ``prepare_corpus.py`` (its ``dict.txt``
    lists the pieces); ``None``: split on whitespace (pre-tokenised data).
    :meth:`encode` encodes one line without ``</s>``; :meth:`encode_lines`
    encodes text line by line with ``</s>`` after every non-empty line, as
    ``fairseq-preprocess`` binarized the training data.
    """

    def __init__(self, dictionary, spm_model: Optional[str] = None):
        self.dictionary = dictionary
        self.spm_model = spm_model
        if spm_model is not None and not os.path.isfile(spm_model):
            raise EvalError(
                f"sentencepiece model not found: {spm_model}; pass --spm DIR/spm.model "
                "(written by longmem-preprocess next to dict.txt)"
            )
        if spm_model:
            from ..preprocess.prepare_corpus import PieceEncoder  # dictionary-safe pieces

            self._spm = PieceEncoder(spm_model)
        else:
            self._spm = None
        self.unknown = 0  # pieces not in the dictionary so far

    @property
    def eos(self) -> int:
        return self.dictionary.eos()

    def pieces(self, text: str) -> List[str]:
        if self._spm is None:
            return text.split()
        return self._spm.encode([text])[0]

    def encode(self, text: str) -> List[int]:
        """One line of text -> ids (no ``</s>``)."""
        ids = [self.dictionary.index(p) for p in self.pieces(text)]
        self.unknown += sum(1 for i in ids if i == self.dictionary.unk())
        return ids

    def encode_lines(self, text: str) -> List[int]:
        """Text -> ids, ``</s>`` after every non-empty line (empty lines are skipped)."""
        out: List[int] = []
        for line in text.split("\n"):
            if line.strip():
                out.extend(self.encode(line))
                out.append(self.eos)
        return out

    def decode_lines(self, ids: Sequence[int]) -> str:
        """Ids (lines ending in ``</s>``) -> text with one line per ``</s>``."""
        lines, cur = [], []
        for i in ids:
            if int(i) == self.eos:
                lines.append(self._decode_line(cur))
                cur = []
            else:
                cur.append(self.dictionary[int(i)])
        if cur:
            lines.append(self._decode_line(cur))
        return "\n".join(lines)

    def _decode_line(self, symbols: List[str]) -> str:
        if self._spm is None:
            return " ".join(symbols)
        return self._spm.decode(symbols)


def encoder_factory(spm_model: Optional[str] = None):
    """``encoder_for(loaded_model)``: one :class:`TextEncoder` per dictionary."""
    encoders: Dict[int, TextEncoder] = {}

    def encoder_for(lm) -> TextEncoder:
        d = lm.task.source_dictionary
        if id(d) not in encoders:
            encoders[id(d)] = TextEncoder(d, spm_model)
        return encoders[id(d)]

    return encoder_for
