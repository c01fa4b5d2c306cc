"""Tiny HuggingFace GPT-2 models and tokenizers built locally (nothing downloaded).

Used by the tests of ``fairseq_longmem.hf_gpt2`` and ``preprocess.hf_tokenizer``
and by docs/backbones.md's end-to-end measurement.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

EOT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's recipe), saved as
    ``out_dir/tokenizer.json``; returns its vocabulary size. ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def save_tiny_gpt2(out_dir: Path, vocab_size: int, eos_id: int, n_layer: int = 2, n_embd: int = 32,
                   n_head: int = 4, n_positions: int = 64, tied: bool = True, seed: int = 0,
                   scale: float = 0.3, **config_kw):
    """A GPT2LMHeadModel with random weights (every tensor perturbed, so layer norms and
    biases are not at their trivial init), saved with ``save_pretrained``; returns it (eval)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, eos_token_id=eos_id, bos_token_id=eos_id,
                     tie_word_embeddings=tied, **config_kw)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale / math.sqrt(max(1, p.shape[0] / 32)))
    model.save_pretrained(str(out_dir))
    return model.eval()
