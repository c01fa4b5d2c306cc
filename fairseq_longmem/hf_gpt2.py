"""Import a local HuggingFace GPT-2-family checkpoint as a fairseq ``transformer_lm``.

Usage::

    longmem-import-hf --hf-dir gpt2-medium/ --out backbones/gpt2-medium
    # -> model.pt (fairseq transformer_lm), dict.txt, hf_vocab.json, tokenizer files

Only local files are read (``config.json``; ``model.safetensors``, its sharded
index, or ``pytorch_model.bin``); ``transformers`` is not needed. The weights
are mapped here, tensor by tensor (docs/backbones.md):

* HF ``Conv1D`` stores ``(in, out)``: every projection is transposed into a
  ``nn.Linear`` ``(out, in)``; ``c_attn`` is split into q, k, v;
* learned positions: fairseq's ``LearnedPositionalEmbedding`` numbers tokens
  from ``padding_idx + 1 = 2``, so ``wpe[p]`` goes to row ``p + 2`` of a table of
  ``n_positions + 2`` rows (rows 0 and 1 are never read by unpadded text);
* token embeddings and the (tied or untied) output rows are permuted by
  :class:`~fairseq_longmem.hf_vocab.VocabMap`;
* ``gelu_new`` (tanh approximation) is fairseq's ``gelu_accurate``; layer-norm
  epsilon must be fairseq's 1e-5; embeddings are not scaled by sqrt(d).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from .errors import LongMemError
from .hf_vocab import PathLike, VocabMap, read_json, vocab_map_from_config

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2",)
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
SUPPORTED = "GPT-2 family (model_type 'gpt2': gpt2, gpt2-medium/large/xl, distilgpt2)"
#: HF activation name -> fairseq activation name
ACTIVATIONS = {"gelu_new": "gelu_accurate", "gelu_pytorch_tanh": "gelu_accurate",
               "gelu_fast": "gelu_accurate", "gelu": "gelu", "relu": "relu"}
FAIRSEQ_LN_EPS = 1e-5
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
#: fairseq's LearnedPositionalEmbedding numbers the first token padding_idx + 1
POSITION_OFFSET = 2


class HFImportError(LongMemError):
    """The HuggingFace folder cannot be imported (message names the fix)."""


@dataclass(frozen=True)
class GPT2Spec:
    """The shape of a GPT-2 model, from its ``config.json``."""

    layers: int
    dim: int
    heads: int
    ffn: int
    positions: int
    activation: str  # fairseq name
    tied: bool
    dropout: float
    attention_dropout: float


# --------------------------------------------------------------------------- reading


def read_config(hf_dir: PathLike) -> dict:
    """``config.json`` of ``hf_dir`` (clear errors for a missing folder or file)."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise HFImportError(f"HuggingFace model folder not found: {folder}; pass --hf-dir DIR "
                            "(a local folder with config.json and model.safetensors)")
    if not (folder / "config.json").is_file():
        raise HFImportError(f"{folder} has no config.json; pass the folder a HuggingFace "
                            "model was saved to (save_pretrained or a hub snapshot)")
    return read_json(folder / "config.json", "model config")


def check_supported(config: dict) -> GPT2Spec:
    """The model's :class:`GPT2Spec`, or a :class:`HFImportError` naming what is supported."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
        what = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise HFImportError(
            f"cannot import {what}: only the {SUPPORTED} with learned absolute positions is "
            "supported (rotary-position models such as GPT-NeoX, GPT-J, Llama or Mistral are "
            "not); use a GPT2LMHeadModel checkpoint"
        )
    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise HFImportError(f"activation_function {act!r} has no fairseq equivalent; supported: "
                            f"{', '.join(sorted(ACTIVATIONS))}")
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    if abs(eps - FAIRSEQ_LN_EPS) > 1e-12:
        raise HFImportError(f"layer_norm_epsilon {eps} differs from fairseq's LayerNorm "
                            f"epsilon {FAIRSEQ_LN_EPS}; the converted model would not match")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if config.get(flag):
            raise HFImportError(f"config sets {flag}, which fairseq's transformer_lm does not "
                                "have; import a plain GPT-2 LM")
    if config.get("scale_attn_weights", True) is False:
        raise HFImportError("config sets scale_attn_weights false; fairseq always scales "
                            "attention by head_dim ** -0.5")
    dim, heads = int(config["n_embd"]), int(config["n_head"])
    if dim % heads:
        raise HFImportError(f"n_embd {dim} is not a multiple of n_head {heads}; config.json is damaged")
    return GPT2Spec(
        layers=int(config["n_layer"]), dim=dim, heads=heads,
        ffn=int(config.get("n_inner") or 4 * dim), positions=int(config["n_positions"]),
        activation=ACTIVATIONS[act], tied=bool(config.get("tie_word_embeddings", True)),
        dropout=float(config.get("resid_pdrop", 0.0)),
        attention_dropout=float(config.get("attn_pdrop", 0.0)),
    )


def read_weights(hf_dir: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint (safetensors, sharded safetensors or pytorch_model.bin)."""
    folder = Path(hf_dir)
    single, index, pt_bin = (folder / "model.safetensors", folder / "model.safetensors.index.json",
                             folder / "pytorch_model.bin")
    try:
        if single.is_file() or index.is_file():
            from safetensors.torch import load_file

            if single.is_file():
                return dict(load_file(str(single)))
            shards = sorted(set(read_json(index, "safetensors index").get("weight_map", {}).values()))
            out: Dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(load_file(str(folder / shard)))
            return out
        if pt_bin.is_file():
            state = torch.load(str(pt_bin), map_location="cpu", weights_only=True)
            return dict(state.get("state_dict", state)) if isinstance(state, dict) else {}
    except HFImportError:
        raise
    except Exception as e:  # corrupt or truncated files raise many kinds of errors
        raise HFImportError(f"cannot read the weights in {folder} ({type(e).__name__}: "
                            f"{str(e)[:120]}); re-copy the model files") from None
    raise HFImportError(f"{folder} has no weights: expected model.safetensors, "
                        "model.safetensors.index.json or pytorch_model.bin")


# --------------------------------------------------------------------------- mapping


def _take(hf: Dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    for key in (f"transformer.{name}", name):
        if key in hf:
            t = hf[key]
            if tuple(t.shape) != tuple(shape):
                raise HFImportError(f"weight {key} has shape {tuple(t.shape)}, config.json says "
                                    f"{tuple(shape)}; the weights do not belong to this config")
            return t.detach().to(torch.float32)
    raise HFImportError(f"weight {name} is missing from the checkpoint; it is not a complete "
                        "GPT-2 model (re-copy the model files)")


def fairseq_state_dict(hf: Dict[str, torch.Tensor], spec: GPT2Spec, vocab: VocabMap) -> Dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> the state dict of a fairseq ``transformer_lm`` (pure mapping)."""
    d, f, v = spec.dim, spec.ffn, vocab.vocab_size
    perm = torch.tensor(vocab.fairseq_to_hf)
    out: Dict[str, torch.Tensor] = {}
    wte = _take(hf, "wte.weight", (v, d))
    out["decoder.embed_tokens.weight"] = wte[perm].contiguous()
    if spec.tied:
        out["decoder.output_projection.weight"] = out["decoder.embed_tokens.weight"]
    else:
        if "lm_head.weight" not in hf:
            raise HFImportError("config.json says tie_word_embeddings false but the checkpoint "
                                "has no lm_head.weight; re-copy the model files")
        head = hf["lm_head.weight"].detach().to(torch.float32)
        if tuple(head.shape) != (v, d):
            raise HFImportError(f"lm_head.weight has shape {tuple(head.shape)}, expected {(v, d)}")
        out["decoder.output_projection.weight"] = head[perm].contiguous()
    wpe = _take(hf, "wpe.weight", (spec.positions, d))
    pos = torch.zeros(spec.positions + POSITION_OFFSET, d)
    pos[POSITION_OFFSET:] = wpe
    out["decoder.embed_positions.weight"] = pos
    for i in range(spec.layers):
        h, o = f"h.{i}.", f"decoder.layers.{i}."
        for hf_ln, fs_ln in (("ln_1", "self_attn_layer_norm"), ("ln_2", "final_layer_norm")):
            out[o + fs_ln + ".weight"] = _take(hf, h + hf_ln + ".weight", (d,))
            out[o + fs_ln + ".bias"] = _take(hf, h + hf_ln + ".bias", (d,))
        w = _take(hf, h + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: (in, out)
        b = _take(hf, h + "attn.c_attn.bias", (3 * d,))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[o + f"self_attn.{name}.weight"] = w[:, j * d:(j + 1) * d].t().contiguous()
            out[o + f"self_attn.{name}.bias"] = b[j * d:(j + 1) * d].clone()
        for hf_lin, fs_lin, shape in (("attn.c_proj", "self_attn.out_proj", (d, d)),
                                      ("mlp.c_fc", "fc1", (d, f)), ("mlp.c_proj", "fc2", (f, d))):
            out[o + fs_lin + ".weight"] = _take(hf, h + hf_lin + ".weight", shape).t().contiguous()
            out[o + fs_lin + ".bias"] = _take(hf, h + hf_lin + ".bias", (shape[1],))
    out["decoder.layer_norm.weight"] = _take(hf, "ln_f.weight", (d,))
    out["decoder.layer_norm.bias"] = _take(hf, "ln_f.bias", (d,))
    # fairseq drops the final layer norm of a state dict whose decoder.version is <= 2
    out["decoder.version"] = torch.tensor([3.0])
    return out


def fairseq_args(spec: GPT2Spec, data_dir: PathLike) -> List[str]:
    """fairseq-train arguments that build the matching ``transformer_lm``."""
    args = [
        str(data_dir), "--task", "language_modeling", "--arch", "transformer_lm",
        "--decoder-layers", spec.layers, "--decoder-embed-dim", spec.dim,
        "--decoder-ffn-embed-dim", spec.ffn, "--decoder-attention-heads", spec.heads,
        "--decoder-input-dim", spec.dim, "--decoder-output-dim", spec.dim,
        "--decoder-normalize-before", "--decoder-learned-pos", "--no-scale-embedding",
        "--activation-fn", spec.activation, "--dropout", spec.dropout,
        "--attention-dropout", spec.attention_dropout, "--activation-dropout", 0.0,
        "--tokens-per-sample", spec.positions, "--max-target-positions", spec.positions,
        "--sample-break-mode", "none",
    ]
    if spec.tied:
        args.append("--share-decoder-input-output-embed")
    return [str(a) for a in args]


# --------------------------------------------------------------------------- writing


def import_hf_gpt2(hf_dir: PathLike, out_dir: PathLike) -> Dict[str, object]:
    """Convert ``hf_dir`` into ``out_dir/{model.pt, dict.txt, hf_vocab.json}`` (+ tokenizer files).

    Returns a summary dict. The model is built by fairseq itself from the written
    config and loaded strictly, so a mapping error fails here, not later.
    """
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    config = read_config(hf_dir)
    spec = check_supported(config)
    vocab = vocab_map_from_config(config)
    hf = read_weights(hf_dir)
    state = fairseq_state_dict(hf, spec, vocab)
    del hf
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HFImportError(f"cannot create --out {out} ({e.strerror or e}); choose a writable folder") from None
    vocab.write_dict(out / "dict.txt")
    vocab.save(out)
    copied = [name for name in TOKENIZER_FILES if (Path(hf_dir) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(hf_dir) / name, out / name)
    shutil.copyfile(Path(hf_dir) / "config.json", out / "hf_config.json")

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=fairseq_args(spec, out.resolve()))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(state, strict=True)
    if model.decoder.layer_norm is None or model.decoder.embed_positions is None:
        raise RuntimeError("fairseq built the transformer_lm without its final norm or positions")
    checkpoint = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {},
        "extra_state": {"train_iterator": None, "hf_import": {
            "source": str(Path(hf_dir).resolve()), "vocab": vocab.to_json()}},
        "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(checkpoint, str(out / "model.pt"))
    params = sum(p.numel() for p in model.parameters())
    summary = {
        "model": str(out / "model.pt"), "dict": str(out / "dict.txt"),
        "layers": spec.layers, "dim": spec.dim, "heads": spec.heads, "positions": spec.positions,
        "vocab_size": vocab.vocab_size, "tied": spec.tied, "activation": spec.activation,
        "parameters": params, "tokenizer_files": copied,
    }
    logger.info("imported %s -> %s: %s", hf_dir, out, json.dumps(summary))
    return summary
