"""Checkpoint -> model + stream task, for any checkpoint this project makes.

:func:`load_for_eval` loads the backbone alone (trained with fairseq's
``language_modeling``), LongMem or MemTRM through fairseq's
``checkpoint_utils.load_model_ensemble_and_task`` and returns it with a
``longmem_language_modeling`` task over the evaluation data, the model wrapped
by :func:`accept_stream_inputs` so every model reads stream batches. The
command lines name checkpoints ``NAME=PATH`` with per-checkpoint overrides
``NAME.key=value`` (:func:`parse_checkpoints`). :func:`read_checkpoint` turns
a missing, corrupt or foreign file into one :class:`EvalError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..tasks.longmem_language_modeling import (
    LongMemLanguageModelingConfig,
    LongMemLanguageModelingTask,
    accept_stream_inputs,
)
from . import EvalError

logger = logging.getLogger(__name__)

#: how the evaluators' command lines name a checkpoint (completes "check ...")
CHECKPOINT_FLAG = "the NAME=PATH of --checkpoint"


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


def read_checkpoint(path: str, flag: str, arg_overrides: Optional[Dict[str, Any]] = None) -> dict:
    """A fairseq checkpoint loaded to CPU (``arg_overrides`` applied to its config).

    A missing file, a file torch cannot read, or a torch file without fairseq's
    ``model``/``cfg`` entries is an :class:`EvalError` that says which, and to
    check ``flag`` (the command-line flag that named ``path``).
    """
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise EvalError(f"checkpoint not found: {path}; check {flag}")
    fix = f"check {flag}: it must name a checkpoint written by longmem-train or fairseq-train"
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except Exception as e:  # torch, pickle and fairseq's upgrade code raise many kinds
        if not _is_torch_file(path):
            raise EvalError(
                f"cannot read {path} ({type(e).__name__}): the file is corrupt or not a "
                f"checkpoint; {fix}"
            ) from None
        state = None
    if not isinstance(state, dict) or "model" not in state or state.get("cfg") is None:
        raise EvalError(f"{path} is a torch file but not a fairseq model checkpoint "
                        f"(no 'model'/'cfg' entries); {fix}")
    return state


def _is_torch_file(path: str) -> bool:
    """Whether torch reads ``path`` as plain tensors/containers (only on the error path)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


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


def uses_memory(model) -> bool:
    """True for LongMem/MemTRM with ``use_external_memory`` on."""
    decoder = model.decoder
    return hasattr(decoder, "reset_memory") and bool(decoder.cfg.use_external_memory)


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

    arg_overrides = dict(overrides or {})
    if data:
        arg_overrides["data"] = str(data)
    state = read_checkpoint(path, CHECKPOINT_FLAG, arg_overrides)
    task_cfg = state["cfg"]["task"]
    data_dir = data or task_cfg.get("data")
    if not data_dir:
        raise EvalError(f"{path} records no data directory: pass --data")
    if not os.path.isdir(data_dir):
        raise EvalError(
            f"data directory not found: {data_dir}; pass --data with the binarized directory "
            "(dict.txt and the splits) of the model's dictionary"
        )
    try:
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    except FileNotFoundError as e:
        raise EvalError(
            f"loading {path}: {e}; pass --data with the binarized directory (dict.txt) "
            "the model was trained with"
        ) from None
    model = models[0]
    tps = int(tokens_per_sample or task_cfg.get("tokens_per_sample"))
    limit = model.max_positions()
    if tps > limit:
        raise EvalError(
            f"--tokens-per-sample {tps} exceeds the {limit} positions of {path}; lower it"
        )
    task = setup_eval_task(data_dir, tps, memory_scope)
    vocab = len(model.decoder.dictionary)
    if len(task.source_dictionary) != vocab:
        raise EvalError(
            f"{path} has {vocab} output symbols but {data_dir}/dict.txt has "
            f"{len(task.source_dictionary)}: evaluate on data binarized with the model's dict.txt"
        )
    model = accept_stream_inputs(model)
    if fp16:
        model.half()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(torch.device(device))
    model.eval()
    kind = checkpoint_kind(model)
    logger.info("loaded %s (%s) from %s, segments of %d tokens", name or path, kind, path, tps)
    return LoadedModel(name or os.path.basename(path), path, model, task, kind, tps)


def file_digest(path: str, limit: int = 1 << 24) -> str:
    """sha1 of the first ``limit`` bytes and the size of a file (identifies a checkpoint)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:16]
