"""What every evaluation loads: a checkpoint with a stream task, and text -> token ids.

* :func:`load_for_eval` loads *any* checkpoint this project makes (the backbone
  alone, trained with fairseq's ``language_modeling``; LongMem; MemTRM) through
  fairseq's ``checkpoint_utils.load_model_ensemble_and_task`` and returns it
  with a ``longmem_language_modeling`` task over the evaluation data, the model
  wrapped by :func:`accept_stream_inputs` so every model reads stream batches.
* :class:`TextEncoder` turns raw text into the ids of that task's dictionary:
  with the sentencepiece model that ``preprocess/prepare_corpus.py`` trained
  (``spm.model``; ``dict.txt``'s symbols are its pieces), or, without one, by
  splitting on whitespace (data binarized from pre-tokenised text).
* :func:`snapshot_memory` / :func:`restore_memory`, :class:`FixedMemory` and
  :func:`score_continuations`: run a history through a model (memory models
  write it to memory, in segments, as in stream evaluation), then score several
  continuations against the *same* memory (restored before each), as the
  ChapterBreak and in-context-learning evaluators need.
* :func:`parse_checkpoints` (``NAME=PATH`` and ``NAME.key=value``), :func:`write_json`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import LongMemError
from ..tasks.longmem_language_modeling import (
    LongMemLanguageModelingConfig,
    LongMemLanguageModelingTask,
    accept_stream_inputs,
)

logger = logging.getLogger(__name__)


class EvalError(LongMemError):
    """Bad evaluation input (message names the fix)."""


# ----------------------------------------------------------------- checkpoints
@dataclass
class CheckpointSpec:
    """``NAME=PATH`` of the command lines, plus per-checkpoint model overrides."""

    name: str
    path: str
    overrides: Dict[str, object] = field(default_factory=dict)


def parse_value(text: str):
    """``"false"`` -> False, ``"3"`` -> 3, ``"0.5"`` -> 0.5, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_checkpoints(items: Sequence[str], overrides: Sequence[str] = ()) -> List[CheckpointSpec]:
    """``["NAME=PATH", ...]`` and ``["NAME.key=value", ...]`` -> specs, in order.

    An override applies a model config value to one checkpoint, e.g.
    ``longmem.use_external_memory=false`` evaluates a LongMem checkpoint
    without its memory; ``*.memory_size=16384`` applies to all.
    """
    specs: List[CheckpointSpec] = []
    for item in items:
        if "=" not in item:
            raise EvalError(f"--checkpoint {item!r}: write NAME=PATH (e.g. longmem=ckpt/longmem.pt)")
        name, path = item.split("=", 1)
        name = name.strip()
        if not name or any(s.name == name for s in specs):
            raise EvalError(f"--checkpoint {item!r}: names must be non-empty and distinct")
        specs.append(CheckpointSpec(name, path))
    for item in overrides:
        target, _, value = item.partition("=")
        name, _, key = target.rpartition(".")
        if not name or not key or not _:
            raise EvalError(f"--override {item!r}: write NAME.key=value (e.g. longmem.memory_size=8192)")
        hit = [s for s in specs if name in ("*", s.name)]
        if not hit:
            raise EvalError(f"--override {item!r}: no --checkpoint named {name!r}")
        for s in hit:
            s.overrides[key] = parse_value(value)
    return specs


def setup_eval_task(data: str, tokens_per_sample: int, memory_scope: str = "document"):
    """A ``longmem_language_modeling`` task over the binarized directory ``data``."""
    cfg = LongMemLanguageModelingConfig(
        data=str(data), tokens_per_sample=int(tokens_per_sample), memory_scope=memory_scope,
        allow_single_document=True,
    )
    return LongMemLanguageModelingTask.setup_task(cfg)


def checkpoint_kind(model) -> str:
    """``longmem``, ``memtrm`` or ``lm`` (any other LM: the backbone alone)."""
    from ..models.longmem import LongMemModel
    from ..models.memtrm import MemTRMModel

    if isinstance(model, LongMemModel):
        return "longmem"
    if isinstance(model, MemTRMModel):
        return "memtrm"
    return "lm"


@dataclass
class LoadedModel:
    name: str
    path: str
    model: torch.nn.Module
    task: LongMemLanguageModelingTask
    kind: str
    tokens_per_sample: int

    @property
    def uses_memory(self) -> bool:
        return uses_memory(self.model)


def load_for_eval(
    path: str,
    data: Optional[str] = None,
    tokens_per_sample: Optional[int] = None,
    overrides: Optional[Dict[str, object]] = None,
    device=None,
    memory_scope: str = "document",
    name: Optional[str] = None,
    fp16: bool = False,
) -> LoadedModel:
    """Load any checkpoint for evaluation with a stream task over ``data``.

    data: binarized directory whose ``dict.txt`` is the model's (default: the
    checkpoint's own); tokens_per_sample: segment length of the evaluation
    (default: the checkpoint's); overrides: model config values (e.g.
    ``{"use_external_memory": False}`` or a larger ``memory_size``).
    """
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise EvalError(f"checkpoint not found: {path}; check the NAME=PATH of --checkpoint")
    arg_overrides = dict(overrides or {})
    if data:
        arg_overrides["data"] = str(data)
    try:
        models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
            [path], arg_overrides=arg_overrides
        )
    except LongMemError:
        raise
    except FileNotFoundError as e:
        raise EvalError(
            f"loading {path}: {e}; pass --data with the binarized directory (dict.txt) "
            "the model was trained with"
        ) from None
    model = models[0]
    task_cfg = cfg.task
    data_dir = data or task_cfg.get("data")
    if not data_dir:
        raise EvalError(f"{path} records no data directory: pass --data")
    tps = int(tokens_per_sample or task_cfg.get("tokens_per_sample") or 1024)
    limit = model.max_positions()
    if isinstance(limit, tuple):
        limit = min(x for x in limit if x is not None)
    if isinstance(limit, int) and tps > limit:
        raise EvalError(
            f"--tokens-per-sample {tps} exceeds the {limit} positions of {path}; lower it"
        )
    task = setup_eval_task(data_dir, tps, memory_scope)
    if len(task.source_dictionary) != _vocab_size(model):
        raise EvalError(
            f"{path} has {_vocab_size(model)} output symbols but {data_dir}/dict.txt has "
            f"{len(task.source_dictionary)}: evaluate on data binarized with the model's dict.txt"
        )
    model = accept_stream_inputs(model)
    if fp16:
        model.half()
    device = torch.device(device) if device is not None else _default_device()
    model.to(device)
    model.eval()
    kind = checkpoint_kind(model)
    logger.info("loaded %s (%s) from %s, segments of %d tokens", name or path, kind, path, tps)
    return LoadedModel(name or os.path.basename(path), path, model, task, kind, tps)


def _vocab_size(model) -> int:
    decoder = getattr(model, "decoder", model)
    return len(decoder.dictionary)


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def uses_memory(model) -> bool:
    """True for LongMem/MemTRM with ``use_external_memory`` on."""
    decoder = getattr(model, "decoder", None)
    cfg = getattr(decoder, "cfg", None)
    return hasattr(decoder, "reset_memory") and bool(getattr(cfg, "use_external_memory", False))


def json_safe(obj):
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def emit(result, json_path, *tables: str) -> int:
    """End of an evaluator's command line: print its tables, write its JSON, exit 0."""
    for table in tables:
        print(table)
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    return 0


def write_json(obj, path: str) -> str:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(obj), fh, indent=1, allow_nan=False)
    return path


def file_digest(path: str, limit: int = 1 << 24) -> str:
    """sha1 of the first ``limit`` bytes and the size of a file (identifies a checkpoint)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- memory
def snapshot_memory(model) -> Dict[str, tuple]:
    """A copy of every memory of the model: ``{memory_key: (bank, state)}``."""
    decoder = getattr(model, "decoder", None)
    memories = getattr(decoder, "memories", None) or {}
    snap = {}
    for key, bank in memories.items():
        if hasattr(bank, "state_dict") and hasattr(bank, "load_state_dict"):
            snap[key] = (bank, _clone(bank.state_dict()))
        else:  # a bank without state_dict: keep a deep copy
            snap[key] = (None, copy.deepcopy(bank))
    return snap


def restore_memory(model, snapshot: Dict[str, tuple]) -> None:
    """Put the model's memories back to ``snapshot`` (banks created since are dropped)."""
    decoder = model.decoder
    for key in list(decoder.memories):
        if key not in snapshot:
            del decoder.memories[key]
    for key, (bank, state) in snapshot.items():
        if bank is None:
            decoder.memories[key] = copy.deepcopy(state)
        else:
            bank.load_state_dict(state)
            decoder.memories[key] = bank


def _clone(state):
    if torch.is_tensor(state):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


# ------------------------------------------------------ scoring after a memory
def _forward_logprobs(model, inputs: torch.Tensor, doc_start: torch.Tensor, memory_key: str):
    logits = model(
        src_tokens=inputs, src_lengths=inputs.new_full((inputs.size(0),), inputs.size(1)),
        doc_start=doc_start, memory_key=memory_key,
    )[0]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def run_history(model, history: Sequence[int], tokens_per_sample: int, device=None,
                memory_key: str = "eval") -> None:
    """Feed ``history`` (the input ids of one document, from its start) through the
    model in segments of ``tokens_per_sample``; memory models write it to the memory
    of ``memory_key`` exactly as in stream evaluation."""
    device = device or next(model.parameters()).device
    model.decoder.reset_memory(memory_key)
    T = tokens_per_sample
    for a in range(0, len(history), T):
        seg = torch.tensor([list(history[a : a + T])], dtype=torch.long, device=device)
        ds = torch.zeros_like(seg, dtype=torch.bool)
        if a == 0:
            ds[0, 0] = True
        _forward_logprobs(model, seg, ds, memory_key)


@dataclass
class FixedMemory:
    """A model's memory after some history, restored before every scored segment."""

    model: torch.nn.Module
    memory: bool  # False: a model without memory (history is irrelevant to it)
    empty: bool  # no history at all: the final segment starts a new document
    snapshot: Optional[Dict[str, tuple]] = None
    memory_key: str = "eval"

    @classmethod
    def after(cls, model, history: Sequence[int], tokens_per_sample: int, device=None,
              memory_key: str = "eval", memory: Optional[bool] = None) -> "FixedMemory":
        memory = uses_memory(model) if memory is None else memory
        if memory and len(history):
            run_history(model, history, tokens_per_sample, device, memory_key)
        elif memory:
            model.decoder.reset_memory(memory_key)
        snap = snapshot_memory(model) if memory else None
        return cls(model, memory, len(history) == 0, snap, memory_key)

    @classmethod
    def loaded(cls, model, memory_key: str = "eval") -> "FixedMemory":
        """The model's current memories (e.g. just loaded from a file) as the fixed state."""
        return cls(model, True, False, snapshot_memory(model), memory_key)

    def release(self) -> None:
        if self.memory:
            self.model.decoder.reset_memory(self.memory_key)
        self.snapshot = None

    @torch.no_grad()
    def score(self, local: Sequence[int], continuations: Sequence[Sequence[int]],
              tokens_per_sample: int, device=None) -> List[List[float]]:
        """Per continuation, the log-probs of its tokens after the memory + ``local``.

        The final segment's input is ``local + continuation[:-1]`` (at most
        ``tokens_per_sample``; ``local`` non-empty: its last id predicts the
        continuation's first token). Continuations with the same input share
        one forward pass; the memory is restored before each forward pass.
        """
        if not local:
            raise EvalError("scoring needs at least one local input token")
        model = self.model
        device = device or next(model.parameters()).device
        cache: Dict[tuple, torch.Tensor] = {}
        out: List[List[float]] = []
        for cont in continuations:
            cont = [int(c) for c in cont]
            inputs = tuple(int(t) for t in local) + tuple(cont[:-1])
            if len(inputs) > tokens_per_sample:
                raise EvalError(
                    f"final segment of {len(inputs)} inputs exceeds tokens_per_sample "
                    f"{tokens_per_sample}"
                )
            if inputs not in cache:
                x = torch.tensor([inputs], dtype=torch.long, device=device)
                ds = torch.zeros_like(x, dtype=torch.bool)
                if self.empty:
                    ds[0, 0] = True  # nothing before: a new document
                if self.memory:
                    restore_memory(model, self.snapshot)
                cache[inputs] = _forward_logprobs(model, x, ds, self.memory_key)[0]
            lp = cache[inputs]
            t0 = len(local) - 1
            tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
            got = lp[t0 : t0 + len(cont)].gather(-1, tgt[:, None]).squeeze(-1)
            out.append(got.cpu().tolist())
        if self.memory:
            restore_memory(model, self.snapshot)
        return out


def score_continuations(
    model,
    history: Sequence[int],
    local: Sequence[int],
    continuations: Sequence[Sequence[int]],
    tokens_per_sample: int,
    memory: Optional[bool] = None,
    device=None,
    memory_key: str = "eval",
) -> List[List[float]]:
    """Log-probs of each continuation's tokens after ``history`` + ``local``.

    history: input ids of the same document before the final segment; memory
    models write them to memory (segments of ``tokens_per_sample``), models
    without memory never see them (skipped). Every continuation is scored
    against the same memory (snapshot after ``history``, restored before each).
    """
    fixed = FixedMemory.after(model, history, tokens_per_sample, device, memory_key, memory)
    try:
        return fixed.score(local, continuations, tokens_per_sample, device)
    finally:
        fixed.release()


# ------------------------------------------------------------------------ text
def _piece_encoder(spm_model: str):
    """preprocess's PieceEncoder (dictionary-safe pieces), installed or from a source tree."""
    try:
        from ..preprocess.prepare_corpus import PieceEncoder  # installed package
    except ImportError:
        try:
            from preprocess.prepare_corpus import PieceEncoder  # source tree
        except ImportError:
            PieceEncoder = None
    if PieceEncoder is not None:
        return PieceEncoder(spm_model)
    import sentencepiece as spm

    class _Plain:
        def __init__(self, path):
            self.sp = spm.SentencePieceProcessor(model_file=str(path))

        def encode(self, lines, num_threads=1):
            return self.sp.encode(list(lines), out_type=str)

        def decode(self, pieces):
            return self.sp.decode_pieces(list(pieces))

    return _Plain(spm_model)


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
                "(written by preprocess/prepare_corpus.py next to dict.txt)"
            )
        self._spm = _piece_encoder(spm_model) if spm_model else None
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

    def encoder_for(lm: LoadedModel) -> TextEncoder:
        d = lm.task.source_dictionary
        if id(d) not in encoders:
            encoders[id(d)] = TextEncoder(d, spm_model)
        return encoders[id(d)]

    return encoder_for
