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


def eval_lm_cfg(data, ckpt, tokens_per_sample, extra=()):
    """fairseq-eval-lm's configuration, parsed by fairseq itself."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_eval_lm_parser()
    args = options.parse_args_and_arch(parser, input_args=[
        str(data), "--path", str(ckpt), "--task", "language_modeling", "--gen-subset", "test",
        "--tokens-per-sample", str(tokens_per_sample), "--batch-size", "4", "--cpu",
        "--no-progress-bar", "--sample-break-mode", "none", *extra])
    return convert_namespace_to_omegaconf(args)


def eval_lm_inprocess(data, ckpt, tokens_per_sample, extra=()):
    """fairseq-eval-lm's own main(), in this process; returns its results dict."""
    from fairseq_cli import eval_lm

    return eval_lm.main(eval_lm_cfg(data, ckpt, tokens_per_sample, extra))


def hf_perplexity(hf_model, data, tokens_per_sample, vocab):
    """HuggingFace's perplexity on exactly the blocks fairseq-eval-lm scores."""
    from fairseq import tasks

    task = tasks.setup_task(eval_lm_cfg(data, "unused.pt", tokens_per_sample).task)
    task.load_dataset("test")
    ds = task.dataset("test")
    f2h = torch.tensor(vocab.fairseq_to_hf)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            src, tgt = f2h[item["source"]], f2h[item["target"]]
            logp = torch.log_softmax(hf_model(src[None]).logits[0].double(), -1)
            nll -= logp.gather(1, tgt[:, None]).sum().item()
            n += len(tgt)
    return float(torch.exp(torch.tensor(nll / n))), n


def stdlib_texts(n_docs: int, max_chars: int = 5000, offset: int = 0):
    """``(name, text)`` of real documents: Python standard-library sources."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in src.glob("*.py") if p.stat().st_size > 8000)[offset:offset + n_docs]
    return [(p.stem, p.read_text(encoding="utf-8", errors="ignore")[:max_chars]) for p in files]


def build_hf_pipeline(root: Path, n_docs: int = 14, vocab_size: int = 300, n_positions: int = 128,
                      **model_kw):
    """Corpus -> trained BPE tokenizer -> tiny GPT-2 (4 x 64) -> longmem-import-hf ->
    longmem-preprocess --tokenizer. Returns a dict of the paths and the HF model."""
    from fairseq_longmem.hf_gpt2 import import_hf_gpt2
    from fairseq_longmem.preprocess.prepare_corpus import prepare_corpus

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    docs = stdlib_texts(n_docs)
    for name, text in docs:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    v = train_bpe_tokenizer([t for _, t in docs], root / "hf", vocab_size)
    kw = dict(n_layer=4, n_embd=64, n_head=4, n_positions=n_positions)
    kw.update(model_kw)
    model = save_tiny_gpt2(root / "hf", v, 0, **kw)
    import_hf_gpt2(root / "hf", root / "backbone")
    info = prepare_corpus(corpus, root / "prep", tokenizer=root / "backbone", valid_frac=0.15,
                          test_frac=0.15, seed=1)
    return {"root": root, "corpus": corpus, "hf_dir": root / "hf", "backbone": root / "backbone",
            "ckpt": root / "backbone" / "model.pt", "data": root / "prep" / "data-bin",
            "info": info, "model": model, "vocab_size": v}
