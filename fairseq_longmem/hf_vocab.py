"""How a HuggingFace model's token ids become a fairseq dictionary (docs/backbones.md).

fairseq's :class:`~fairseq.data.Dictionary` always starts with four symbols,
``<s> <pad> </s> <unk>`` (indices 0..3), and its output layer scores every
index. A dictionary of "4 specials + the HF vocabulary" would add four rows to
the softmax that the HuggingFace model does not have; no linear output row can
give them a probability of exactly zero, so perplexities would differ. The
fairseq vocabulary is therefore a *permutation* of the HF vocabulary (same size,
same softmax, same perplexity):

* ``</s>`` (2) is the HF ``eos_token_id`` (GPT-2: ``<|endoftext|>``): fairseq's
  end of a line and this plugin's document separator and first token, exactly
  where GPT-2 puts ``<|endoftext|>``;
* ``<s>`` (0), ``<pad>`` (1) and ``<unk>`` (3) are the three largest HF ids other
  than eos (GPT-2: the three last BPE merges, rare words). The tokenizer path
  (``preprocess/hf_tokenizer.py``) never emits them: it spells each as the two
  tokens of its BPE merge, so the decoded text is unchanged and fairseq never
  sees a padding index inside the data;
* every other HF id ``t`` is the dict.txt symbol ``str(t)``, in HF order, at
  fairseq index 4, 5, ...

The mapping is a pure function of ``(vocab_size, eos_id)``, so the importer and
the preprocessor write the same dict.txt; the importer also records it in
``hf_vocab.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

from .errors import LongMemError

PathLike = Union[str, Path]

#: fairseq's own special symbols, in index order.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
EOS_INDEX = 2
#: fairseq indices of the specials that stand for reserved (never emitted) HF ids
RESERVED_INDICES = (0, 1, 3)
VOCAB_FILE = "hf_vocab.json"


class HFVocabError(LongMemError):
    """The HF vocabulary cannot be mapped to a fairseq dictionary (message names the fix)."""


@dataclass(frozen=True)
class VocabMap:
    """Permutation between fairseq dictionary indices and HF token ids.

    ``fairseq_to_hf[i]`` is the HF id at fairseq index ``i`` (length ``vocab_size``);
    ``reserved`` are the HF ids standing at ``<s>``, ``<pad>``, ``<unk>``.
    """

    vocab_size: int
    eos_id: int

    def __post_init__(self):
        if self.vocab_size < 5:
            raise HFVocabError(
                f"vocabulary of {self.vocab_size} tokens is too small: fairseq needs at least 5 "
                "(4 special symbols and one token)"
            )
        if self.eos_id is None or not 0 <= int(self.eos_id) < self.vocab_size:
            raise HFVocabError(
                f"eos_token_id {self.eos_id} is not a token of the {self.vocab_size}-token "
                "vocabulary; set eos_token_id in config.json to the end-of-text token "
                "(GPT-2: 50256, <|endoftext|>)"
            )

    @property
    def reserved(self) -> Tuple[int, int, int]:
        """HF ids at fairseq ``<s>``, ``<pad>``, ``<unk>``: the three largest ids other than eos."""
        top = [t for t in range(self.vocab_size - 1, -1, -1) if t != self.eos_id][:3]
        return top[2], top[1], top[0]

    @property
    def fairseq_to_hf(self) -> List[int]:
        bos, pad, unk = self.reserved
        taken = {bos, pad, unk, self.eos_id}
        return [bos, pad, self.eos_id, unk] + [t for t in range(self.vocab_size) if t not in taken]

    @property
    def hf_to_fairseq(self) -> List[int]:
        out = [0] * self.vocab_size
        for i, t in enumerate(self.fairseq_to_hf):
            out[t] = i
        return out

    def symbols(self) -> List[str]:
        """The fairseq dictionary's symbols, index order (specials first)."""
        return list(FAIRSEQ_SPECIALS) + [str(t) for t in self.fairseq_to_hf[4:]]

    def write_dict(self, path: PathLike) -> int:
        """Write ``path`` (dict.txt: ``symbol count``, strictly decreasing pseudo-counts,
        so a count sort keeps the order); returns the number of lines."""
        rest = self.fairseq_to_hf[4:]
        n = len(rest)
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            for rank, t in enumerate(rest):
                fh.write(f"{t} {n - rank}\n")
        return n

    def to_json(self) -> dict:
        bos, pad, unk = self.reserved
        return {
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "fairseq_specials_to_hf": {"<s>": bos, "<pad>": pad, "</s>": self.eos_id, "<unk>": unk},
            "rule": "fairseq index i holds HF id fairseq_to_hf[i]; see fairseq_longmem/hf_vocab.py",
        }

    def save(self, folder: PathLike) -> Path:
        path = Path(folder) / VOCAB_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise HFVocabError(f"cannot read {what} {path} ({type(e).__name__}: {str(e)[:100]}); "
                           "re-copy the model folder") from None
    if not isinstance(data, dict):
        raise HFVocabError(f"{what} {path} is not a JSON object; re-copy the model folder")
    return data


def vocab_map_from_config(config: dict) -> VocabMap:
    """The map of a HF ``config.json`` (its ``vocab_size`` and ``eos_token_id``)."""
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return VocabMap(int(config.get("vocab_size") or 0), eos)


def load_vocab_map(folder: PathLike) -> VocabMap:
    """The map of a folder written by ``longmem-import-hf`` (hf_vocab.json) or of a
    HF model folder (config.json)."""
    folder = Path(folder)
    if (folder / VOCAB_FILE).is_file():
        data = read_json(folder / VOCAB_FILE, "vocabulary map")
        return VocabMap(int(data.get("vocab_size", 0)), data.get("eos_id"))
    if (folder / "config.json").is_file():
        return vocab_map_from_config(read_json(folder / "config.json", "model config"))
    raise HFVocabError(
        f"{folder} has neither {VOCAB_FILE} nor config.json, so the model's vocabulary is "
        "unknown; pass the folder written by longmem-import-hf (or the HF model's folder)"
    )
