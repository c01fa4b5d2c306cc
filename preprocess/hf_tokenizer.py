"""Tokenizing with an imported backbone's own HuggingFace tokenizer (docs/backbones.md).

``longmem-preprocess --tokenizer DIR`` uses this instead of sentencepiece. DIR
holds ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``), read with the
``tokenizers`` library from local files, and either ``hf_vocab.json`` (the
folder ``longmem-import-hf`` writes) or the model's ``config.json``: the
dictionary is then the imported model's (:mod:`fairseq_longmem.hf_vocab`).

Layout: each document is encoded as a whole (its lines joined by ``\\n``, the way
GPT-2 reads text) into ONE line of fairseq symbols; fairseq-preprocess ends it
with ``</s>`` (= the model's end-of-text token) and the empty line between
documents stays the separator item. So the stream task reads
``<|endoftext|> doc_0 <|endoftext|> doc_1 ...``, as GPT-2 was trained.

The three HF tokens that stand at fairseq's ``<s>``, ``<pad>``, ``<unk>`` are
never emitted: each is spelled as the two tokens of its BPE merge (recursively),
which decodes to the same text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_longmem.hf_vocab import VocabMap, load_vocab_map

from .documents import PathLike, PreprocessError

_ENCODE_DOCS = 64  # documents per encode_batch call


class HFTokenizerEncoder:
    """Text <-> fairseq ids/symbols of an imported model, through its HF tokenizer."""

    def __init__(self, folder: PathLike) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise PreprocessError(f"--tokenizer folder not found: {folder}; pass the folder written "
                                  "by longmem-import-hf (or the HF model's folder)")
        try:
            self.vocab: VocabMap = load_vocab_map(folder)
        except Exception as e:  # HFVocabError is a LongMemError, not a PreprocessError
            raise PreprocessError(str(e)) from None
        self.tokenizer, merges = load_tokenizer(folder)
        self.tokenizer_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.tokenizer_size > self.vocab.vocab_size:
            raise PreprocessError(
                f"the tokenizer in {folder} has {self.tokenizer_size} tokens but the model has "
                f"{self.vocab.vocab_size} embeddings; use the model's own tokenizer"
            )
        self.hf_to_fairseq = np.asarray(self.vocab.hf_to_fairseq, dtype=np.int64)
        self.fairseq_to_hf = np.asarray(self.vocab.fairseq_to_hf, dtype=np.int64)
        self.symbols = self.vocab.symbols()
        self.respell = self._respellings(merges)

    def _respellings(self, merges: List[Tuple[str, str]]) -> Dict[int, Optional[List[int]]]:
        """HF id of each reserved token the tokenizer can produce -> its spelling without them
        (``None`` for a token that is no BPE merge, e.g. an added special token: text that
        produces it is refused when encoded)."""
        reserved = [t for t in self.vocab.reserved if t < self.tokenizer_size]
        strings = {self.tokenizer.id_to_token(t): t for t in reserved}
        parts: Dict[int, Tuple[str, str]] = {}
        for a, b in merges:
            t = strings.get(a + b)
            if t is not None and t not in parts:
                parts[t] = (a, b)

        def spell(t: int, depth: int = 0) -> Optional[List[int]]:
            if t not in reserved:
                return [t]
            if t not in parts or depth > 8:
                return None
            out: List[int] = []
            for piece in parts[t]:
                pid = self.tokenizer.token_to_id(piece)
                if pid is None:
                    raise PreprocessError(f"BPE merge part {piece!r} is not in the vocabulary; "
                                          "the tokenizer files are damaged")
                sub = spell(pid, depth + 1)
                if sub is None:
                    return None
                out.extend(sub)
            return out

        return {t: spell(t) for t in reserved}

    def _spelled(self, t: int) -> List[int]:
        ids = self.respell[t]
        if ids is None:
            raise PreprocessError(
                f"the text contains token {t} ({self.tokenizer.id_to_token(t)!r}), which stands at "
                "a fairseq special symbol (<s>/<pad>/<unk>) and is not a BPE merge that could be "
                "spelled otherwise; remove it from the corpus"
            )
        return ids

    def encode_hf(self, texts: Sequence[str]) -> List[List[int]]:
        """HF ids of each text, reserved tokens spelled out."""
        out = []
        for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            ids = enc.ids
            if self.respell and any(t in self.respell for t in ids):
                ids = [p for t in ids for p in (self._spelled(t) if t in self.respell else (t,))]
            out.append(ids)
        return out

    def encode(self, text: str) -> List[int]:
        """fairseq dictionary indices of ``text``."""
        return self.hf_to_fairseq[self.encode_hf([text])[0]].tolist()

    def to_symbols(self, fairseq_ids: Sequence[int]) -> List[str]:
        return [self.symbols[i] for i in fairseq_ids]

    def decode(self, fairseq_ids: Sequence[int]) -> str:
        """Text of fairseq indices (``</s>`` decodes to the model's end-of-text token)."""
        hf = self.fairseq_to_hf[np.asarray(list(fairseq_ids), dtype=np.int64)].tolist()
        return self.tokenizer.decode(hf, skip_special_tokens=False)

    def write_dict(self, path: PathLike) -> int:
        """The imported model's dict.txt (identical to longmem-import-hf's)."""
        return self.vocab.write_dict(path)


def load_tokenizer(folder: Path):
    """``(Tokenizer, merges)`` from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PreprocessError("--tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
            if model.get("type") != "BPE":
                raise PreprocessError(f"{folder}/tokenizer.json is a {model.get('type')} tokenizer; "
                                      "only BPE tokenizers (GPT-2 family) are supported")
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                      for m in model.get("merges", [])]
            return tok, merges
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from tokenizers import decoders, models, pre_tokenizers

            tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            specials = [s for s in vocab if s.startswith("<|") and s.endswith("|>")]
            if specials:  # GPT-2's <|endoftext|>: matched whole in text, as HF does
                tok.add_special_tokens(specials)
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(ln.split(" ", 1)) for ln in lines if ln and not ln.startswith("#version")]
            return tok, merges
    except PreprocessError:
        raise
    except Exception as e:
        raise PreprocessError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: "
                              f"{str(e)[:120]}); re-copy its files") from None
    raise PreprocessError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json "
                          "and merges.txt")


def _documents(raw_path: Path) -> Iterator[str]:
    """Documents of a raw split (non-empty lines, one empty line between documents)."""
    lines: List[str] = []
    with raw_path.open("r", encoding="utf-8", newline="\n") as fh:
        for line in fh:
            line = line[:-1] if line.endswith("\n") else line
            if line:
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def encode_document_split(raw_path: Path, tok_path: Path, encoder: HFTokenizerEncoder) -> Dict[str, int]:
    """Write ``tok_path``: one line of symbols per document, an empty line between documents.

    Returns ``{"lines", "separators", "pieces"}`` (``lines`` = documents).
    """
    n_docs = n_tokens = 0
    batch: List[str] = []
    with tok_path.open("w", encoding="utf-8", newline="\n") as out:

        def flush() -> None:
            nonlocal n_docs, n_tokens
            for ids in encoder.encode_hf(batch):
                if n_docs:
                    out.write("\n")
                out.write(" ".join(encoder.to_symbols(encoder.hf_to_fairseq[ids].tolist())))
                out.write("\n")
                n_docs += 1
                n_tokens += len(ids)
            batch.clear()

        for doc in _documents(raw_path):
            batch.append(doc)
            if len(batch) >= _ENCODE_DOCS:
                flush()
        flush()
    return {"lines": n_docs, "separators": max(n_docs - 1, 0), "pieces": n_tokens}
