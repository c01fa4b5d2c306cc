"""Loading and checking the frozen backbone (any fairseq decoder-only LM checkpoint).

A backbone is a fairseq checkpoint of ``alibi_lm`` (ours) or of fairseq's own
``transformer_lm`` family. LongMem embeds the backbone's weights in its own
checkpoints and records the backbone's model config (``backbone_config``), so
a trained LongMem checkpoint evaluates without the backbone file.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from ..errors import LongMemError

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("alibi_lm", "transformer_lm")


class BackboneError(LongMemError):
    """The backbone checkpoint cannot be used (message names the fix)."""


def model_family(name) -> str:
    """The registered model name of an arch name (``alibi_lm_tiny`` -> ``alibi_lm``)."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return ARCH_MODEL_NAME_REGISTRY.get(name, name)


def read_backbone_checkpoint(path: str) -> Dict[str, Any]:
    """Load a fairseq checkpoint to CPU with clear errors for missing/corrupt files."""
    from fairseq import checkpoint_utils

    if not path:
        raise BackboneError(
            "no backbone given: pass --pretrained-model-path PATH to a fairseq LM "
            "checkpoint (stage 1 of train.sh makes one with --arch alibi_lm_*)"
        )
    if not os.path.isfile(path):
        raise BackboneError(
            f"backbone checkpoint not found: {path}; check --pretrained-model-path "
            "(stage 1 of train.sh writes checkpoints/backbone/checkpoint_best.pt)"
        )
    if not os.access(path, os.R_OK):
        raise BackboneError(f"backbone checkpoint is not readable: {path}; fix its permissions")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:  # torch/pickle/fairseq raise many kinds of errors on bad files
        raise BackboneError(_why_unreadable(path, e)) from None
    if not isinstance(state, dict) or "model" not in state or state.get("cfg") is None:
        raise BackboneError(_NOT_FAIRSEQ.format(path=path))
    return state


_NOT_FAIRSEQ = (
    "{path} is not a fairseq model checkpoint (no 'model'/'cfg' entries); "
    "point --pretrained-model-path to a checkpoint written by fairseq-train"
)


def _why_unreadable(path: str, error: Exception) -> str:
    """Tell a readable non-fairseq file from a corrupt one (only on the error path)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raw = None
    if isinstance(raw, dict) and ("model" not in raw or "cfg" not in raw):
        return _NOT_FAIRSEQ.format(path=path)
    return (
        f"could not read backbone checkpoint {path} ({type(error).__name__}: "
        f"{str(error)[:120]}); the file is corrupt or not a fairseq checkpoint: "
        "re-copy it or point --pretrained-model-path to a good one"
    )


def backbone_config_from_state(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The backbone's model config as a plain dict (interpolations resolved)."""
    root = state["cfg"]
    model_cfg = {}
    model_node = root.get("model") if hasattr(root, "get") else None
    for key in (model_node.keys() if model_node is not None else []):
        try:  # resolve each field on its own: one unresolvable field must not lose the rest
            value = model_node[key]
        except Exception:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        model_cfg[key] = value
    task_node = root.get("task") if hasattr(root, "get") else None
    family = model_family(model_cfg.get("_name"))
    if family not in SUPPORTED_FAMILIES:
        raise BackboneError(
            f"{path} holds a {family!r} model, not a decoder-only transformer LM; "
            f"the backbone must be one of {', '.join(SUPPORTED_FAMILIES)} "
            "(a LongMem or MemTRM checkpoint is not a backbone)"
        )
    model_cfg["_backbone_task_data"] = task_node.get("data") if task_node is not None else None
    return model_cfg


def build_backbone(model_cfg: Dict[str, Any], task) -> nn.Module:
    """Build an (uninitialised) backbone LM from its config dict."""
    from fairseq.models import MODEL_REGISTRY

    cfg = {k: v for k, v in model_cfg.items() if not k.startswith("_backbone")}
    family = model_family(cfg.get("_name"))
    if family not in MODEL_REGISTRY:
        raise BackboneError(f"backbone family {family!r} is not registered with fairseq")
    dc = OmegaConf.create(cfg)
    model = MODEL_REGISTRY[family].build_model(dc, task)
    from ..modules.decoder_layer import check_layer_supported

    for layer in model.decoder.layers:
        check_layer_supported(layer)
    if getattr(model.decoder, "adaptive_softmax", None) is not None:
        raise BackboneError(
            "backbone uses an adaptive softmax, which LongMem does not support; "
            "pretrain it without --adaptive-softmax-cutoff"
        )
    return model


def check_dictionary(state_dict: Dict[str, torch.Tensor], model_cfg: Dict[str, Any], task, path: str):
    """The backbone's vocabulary must be the task's."""
    emb = state_dict.get("decoder.embed_tokens.weight")
    n = len(task.source_dictionary)
    if emb is not None and emb.shape[0] != n:
        raise BackboneError(
            f"dictionary mismatch: backbone {path} has {emb.shape[0]} embeddings but the "
            f"task's dict.txt has {n} symbols; binarize the data with the backbone's "
            "dict.txt (fairseq-preprocess --srcdict BACKBONE_DATA/dict.txt)"
        )
    data = model_cfg.get("_backbone_task_data")
    if data:
        from fairseq.data import Dictionary

        first = str(data).split(os.pathsep)[0]
        dict_path = os.path.join(first, "dict.txt")
        if os.path.isfile(dict_path):
            theirs = Dictionary.load(dict_path)
            if theirs.symbols != task.source_dictionary.symbols:
                raise BackboneError(
                    f"dictionary mismatch: {dict_path} (the backbone's) differs from the "
                    "task's dict.txt although both have the same size; binarize the data "
                    "with the backbone's dict.txt (fairseq-preprocess --srcdict)"
                )


def load_backbone(path: str, task) -> Tuple[nn.Module, Dict[str, Any]]:
    """Read, check and build the backbone LM of ``path``; returns ``(model, cfg)``."""
    state = read_backbone_checkpoint(path)
    model_cfg = backbone_config_from_state(state, path)
    check_dictionary(state["model"], model_cfg, task, path)
    model = build_backbone(model_cfg, task)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise BackboneError(
            f"backbone checkpoint {path} does not match its own config "
            f"({str(e).splitlines()[0][:160]}); the file is damaged or was edited"
        ) from None
    if model.decoder.embed_positions is not None:
        logger.warning(
            "backbone %s uses %s position embeddings: its keys encode absolute "
            "positions, so memory search also matches positions; an alibi_lm backbone "
            "searches memory by content only",
            path,
            type(model.decoder.embed_positions).__name__,
        )
    return model, model_cfg


def dumps_config(model_cfg: Dict[str, Any]) -> str:
    return json.dumps(model_cfg, sort_keys=True, default=str)


def loads_config(text: str) -> Dict[str, Any]:
    return json.loads(text)
