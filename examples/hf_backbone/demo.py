"""A HuggingFace GPT-2 as LongMem's backbone, end to end on CPU (docs/backbones.md).

No pretrained GPT-2 can be downloaded here, so the script first *makes* a local
HuggingFace model folder the way a hub snapshot looks (``config.json``,
``model.safetensors``, ``tokenizer.json``): a byte-level BPE tokenizer trained
with ``tokenizers`` and a small GPT2LMHeadModel trained for a few minutes with
``transformers``, on the quickstart corpus (Python standard-library sources).
Then it runs the three user commands on that folder and measures:

1. ``longmem-import-hf --hf-dir W/hf --out W/backbone``
2. ``longmem-preprocess --input W/corpus --out W/prep --tokenizer W/backbone``
3. ``longmem-train ... --pretrained-model-path W/backbone/model.pt`` (LongMem adaptation)

and reports fairseq-eval-lm's perplexity of the imported model beside the
HuggingFace model's on the same tokens, the copy probe of the imported
backbone, and the second-reading probe of the adapted LongMem model.

Usage: ``python examples/hf_backbone/demo.py --workdir W [--docs 40] [--hf-steps 200]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run(cmd, **kw):
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, time.time() - t0


def console(name):
    return [sys.executable, "-c", f"import sys; from {name} import main; sys.exit(main())"]


def make_hf_folder(corpus: Path, out: Path, args) -> None:
    """Train a BPE tokenizer and a small GPT-2 on ``corpus``; save both as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.iterdir())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    stream = []
    for t in texts:
        stream += [eot] + tok.encode(t).ids
    data = torch.tensor(stream)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=args.positions, n_embd=args.dim,
                     n_layer=args.layers, n_head=args.heads, eos_token_id=eot, bos_token_id=eot)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    n = args.positions
    t0 = time.time()
    for step in range(args.hf_steps):
        starts = torch.randint(0, len(data) - n - 1, (8,))
        batch = torch.stack([data[s:s + n] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * (1 - step / args.hf_steps)
        if step % 100 == 0 or step == args.hf_steps - 1:
            print(f"    HF GPT-2 training step {step}: loss {loss.item():.3f}", flush=True)
    print(f"    {args.hf_steps} steps in {time.time() - t0:.0f} s; {len(stream):,} tokens, "
          f"vocabulary {cfg.vocab_size}")
    model.save_pretrained(str(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--docs", type=int, default=40, help="quickstart-corpus documents")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--hf-steps", type=int, default=200)
    p.add_argument("--adapt-steps", type=int, default=100)
    p.add_argument("--tokens-per-sample", type=int, default=128)
    args = p.parse_args()
    w = Path(args.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    corpus = w / "corpus"
    if not corpus.exists():
        run([sys.executable, "-m", "preprocess.stdlib_corpus", corpus, "--max-docs", args.docs], cwd=REPO)
    if not (w / "hf" / "model.safetensors").exists():
        print("0. a local HuggingFace GPT-2 folder (tokenizer + model trained here)", flush=True)
        make_hf_folder(corpus, w / "hf", args)

    print("1. import", flush=True)
    proc, s = run(console("fairseq_longmem.hf_gpt2") + ["--hf-dir", w / "hf", "--out", w / "backbone"], env=env)
    print("    " + proc.stdout.strip().replace("\n", "\n    ") + f"  ({s:.1f} s)")
    print("2. preprocess with the model's tokenizer", flush=True)
    if not (w / "prep" / "data-bin" / "test.bin").exists():
        run(console("fairseq_longmem.preprocess.prepare_corpus") + [
            "--input", corpus, "--out", w / "prep", "--tokenizer", w / "backbone"], env=env)
    info = json.loads((w / "prep" / "corpus_info.json").read_text())
    print("    " + ", ".join(f"{k}: {v['docs']} docs / {v['bin_tokens']:,} tokens"
                             for k, v in info["splits"].items()))
    data, ckpt = w / "prep" / "data-bin", w / "backbone" / "model.pt"

    from fairseq_longmem.hf_vocab import load_vocab_map

    sys.path.insert(0, str(REPO / "tests"))
    from hf_models import eval_lm_inprocess, hf_perplexity  # the tests' reference code
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(str(w / "hf")).eval()
    res = eval_lm_inprocess(data, ckpt, args.positions)
    hf_ppl, n = hf_perplexity(hf_model, data, args.positions, load_vocab_map(w / "backbone"))
    fs_ppl = 2 ** res["loss"]
    print(f"    test split, {n:,} tokens, windows of {args.positions}: fairseq-eval-lm ppl "
          f"{fs_ppl:.4f}, HuggingFace ppl {hf_ppl:.4f} (relative difference "
          f"{abs(fs_ppl - hf_ppl) / hf_ppl:.1e})")

    print("3. LongMem adaptation over the imported backbone", flush=True)
    save = w / "longmem"
    common = [data, "--task", "longmem_language_modeling", "--arch", "longmem_tiny",
              "--decoder-embed-dim", args.dim, "--decoder-attention-heads", args.heads,
              "--pretrained-model-path", ckpt, "--reload-ptm-layer", "--use-external-memory",
              "--criterion", "longmem_cross_entropy", "--tokens-per-sample", args.tokens_per_sample,
              "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--max-update", args.adapt_steps,
              "--memory-size", 2048, "--k", 16, "--cpu", "--log-interval", 25, "--log-format", "simple",
              "--no-epoch-checkpoints", "--disable-validation", "--seed", 1]
    if not (save / "checkpoint_last.pt").exists():
        proc, s = run([sys.executable, "-m", "fairseq_longmem.cli", "train"] + common + ["--save-dir", save],
                      env=env)
        warn = [ln for ln in proc.stderr.splitlines() if "absolute positions" in ln]
        print(f"    {args.adapt_steps} steps in {s:.0f} s; " + (warn[0].split("WARNING | ")[-1] if warn else ""))
        losses = [ln.split("loss=")[1].split(",")[0] for ln in proc.stderr.splitlines()
                  if "train_inner" in ln and "loss=" in ln]
        print(f"    training loss (every 25 steps): {' '.join(losses)}")

    from fairseq import checkpoint_utils
    from fairseq_longmem.eval.copy_probe import copy_probe, repeated_spans
    from fairseq_longmem.eval.second_reading import second_reading
    from fairseq_longmem.tasks.longmem_language_modeling import (
        LongMemLanguageModelingConfig,
        LongMemLanguageModelingTask,
    )

    task = LongMemLanguageModelingTask.setup_task(
        LongMemLanguageModelingConfig(data=str(data), tokens_per_sample=args.tokens_per_sample))
    task.load_dataset("test")
    stream = task.dataset("test")

    def load(path, **ov):
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=ov or None,
                                                                     task=task)
        return models[0].eval()

    copy = copy_probe(load(ckpt).decoder, repeated_spans(stream, span=64))
    print(f"    copy probe (imported backbone, {copy.spans} spans [x, x] of {copy.span} tokens): ppl "
          f"first copy {copy.first_perplexity:.2f}, second {copy.second_perplexity:.2f}; strongest "
          f"induction head {copy.induction.max():.3f} (layer {copy.best_layer})")
    sr = second_reading(load(save / "checkpoint_last.pt"), task, stream, length=512)
    sr_off = second_reading(load(save / "checkpoint_last.pt", use_external_memory=False), task, stream,
                            length=512)
    print(f"    second reading ({sr.documents} documents, openings of <= 512 tokens): LongMem ppl first "
          f"{sr.first_perplexity:.2f}, second {sr.perplexity:.2f}; memory off: second "
          f"{sr_off.perplexity:.2f}; retrieval hit rate {sr.hit_rate_any_head:.3f} (any head), "
          f"{sr.hit_rate_per_head:.3f} (per head)")


if __name__ == "__main__":
    main()
