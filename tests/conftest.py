"""Shared fixtures: a tiny real corpus, a tiny backbone trained by stock fairseq-train."""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import fairseq_longmem  # noqa: E402,F401  (registers everything)

PLUGIN_DIR = str(REPO_ROOT / "fairseq_longmem")


def run_fairseq(tool: str, args, env_extra=None, check=True, timeout=600):
    """Run ``python -m fairseq_cli.<tool>`` with the plugin as --user-dir."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if env_extra:
        env.update(env_extra)
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}"] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def stdlib_documents(n_docs: int, max_lines: int, offset: int = 0):
    """Real long documents on every machine: Python standard-library sources,
    tokenised on word boundaries (no sentencepiece needed for these tests)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in src.glob("*.py") if p.stat().st_size > 8000)[offset:]
    docs = []
    for path in files:
        lines = []
        for line in path.read_text(encoding="utf-8", errors="ignore").splitlines():
            toks = re.findall(r"\w+|[^\w\s]", line)
            if toks:
                lines.append(" ".join(toks))
        if len(lines) >= 40:
            docs.append(lines[:max_lines])
        if len(docs) == n_docs:
            break
    return docs


def write_split(path: Path, docs) -> None:
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Binarized data: 24 train documents, 4 valid, 4 test, word-level dictionary."""
    root = tmp_path_factory.mktemp("tiny_data")
    docs = stdlib_documents(32, max_lines=120)
    write_split(root / "train.txt", docs[:24])
    write_split(root / "valid.txt", docs[24:28])
    write_split(root / "test.txt", docs[28:32])
    run_fairseq(
        "preprocess",
        ["--only-source", "--trainpref", root / "train.txt", "--validpref", root / "valid.txt",
         "--testpref", root / "test.txt", "--destdir", root / "bin", "--nwordssrc", 1000,
         "--workers", 1],
    )
    return root / "bin"


@pytest.fixture(scope="session")
def tiny_backbone(tiny_data, tmp_path_factory) -> Path:
    """An alibi_lm_tiny backbone pretrained by stock fairseq-train (language_modeling)."""
    save = tmp_path_factory.mktemp("backbone")
    run_fairseq(
        "train",
        [tiny_data, "--user-dir", PLUGIN_DIR, "--task", "language_modeling",
         "--arch", "alibi_lm_tiny", "--tokens-per-sample", 64, "--batch-size", 8,
         "--optimizer", "adam", "--lr", "3e-3", "--max-update", 60, "--save-dir", save,
         "--cpu", "--no-epoch-checkpoints", "--seed", 1, "--log-format", "simple",
         "--sample-break-mode", "none", "--disable-validation"],
    )
    return save / "checkpoint_last.pt"


def setup_stream_task(data: Path, tokens_per_sample: int = 32, **kw):
    from fairseq_longmem.tasks.longmem_language_modeling import (
        LongMemLanguageModelingConfig,
        LongMemLanguageModelingTask,
    )

    cfg = LongMemLanguageModelingConfig(data=str(data), tokens_per_sample=tokens_per_sample, **kw)
    return LongMemLanguageModelingTask.setup_task(cfg)


def build_memory_model(model_cls, config_cls, backbone: Path, data: Path,
                       tokens_per_sample: int, args: dict):
    """A memory model (LongMem, MemTRM) built from ``args`` the way fairseq-train builds it."""
    import torch
    from omegaconf import OmegaConf

    task = setup_stream_task(data, tokens_per_sample)
    cfg = OmegaConf.structured(config_cls(tokens_per_sample=tokens_per_sample))
    for key, value in args.items():
        cfg[key] = value
    torch.manual_seed(0)
    model = model_cls.build_model(cfg, task)
    model.eval()
    return model, task


def build_longmem(backbone: Path, data: Path, tokens_per_sample: int = 32, **overrides):
    """A LongMem model over the tiny backbone, built the way fairseq-train builds it."""
    from fairseq_longmem.models.longmem import LongMemConfig, LongMemModel

    args = dict(
        pretrained_model_path=str(backbone), reload_ptm_layer=True, use_external_memory=True,
        memory_size=64, chunk_size=4, k=8, retrieval_layer_index=3, layer_reduction_factor=2,
        decoder_embed_dim=64,
    )
    args.update(overrides)
    return build_memory_model(LongMemModel, LongMemConfig, backbone, data, tokens_per_sample, args)


def lm_args(**kw):
    """Namespace args of a small fairseq LM (3 layers, d=32, 4 heads, no dropout)."""
    import argparse

    args = argparse.Namespace(
        decoder_layers=3, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
        decoder_attention_heads=4, tokens_per_sample=64, dropout=0.0, attention_dropout=0.0,
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args
