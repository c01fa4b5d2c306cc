"""Resident memory while evaluating one very long document with a capped memory.

Reads one document of ``--tokens`` tokens (default 1.05M: the Python standard
library's sources concatenated into a single document and hashed into the
vocabulary — real text, no download) segment by segment through a LongMem
model (random weights: memory use does not depend on them) exactly as
evaluation does, keeping only running loss sums (as fairseq-eval-lm does), and
samples the process's resident set size. Once the memory bank is full, RSS
must stay flat however long the document is.

    python benchmarks/long_document_rss.py                 # 1.05M tokens, memory 8192
    python benchmarks/long_document_rss.py --quick         # seconds (tests)
"""

import argparse
import json
import re
import resource
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stdlib_tokens(n: int, vocab: int) -> np.ndarray:
    """n token ids from the stdlib sources (words hashed into [4, vocab)), repeated if needed."""
    out = []
    total = 0
    src = Path(sysconfig.get_paths()["stdlib"])
    while total < n:
        for path in sorted(src.rglob("*.py")):
            words = re.findall(r"\w+|[^\w\s]", path.read_text(encoding="utf-8", errors="ignore"))
            ids = np.fromiter((4 + (hash(w) % (vocab - 4)) for w in words), dtype=np.int64)
            out.append(ids)
            total += len(ids)
            if total >= n:
                break
    return np.concatenate(out)[:n]


class _Task:
    """The minimum of a fairseq task that the backbone builder and StreamBatches need."""

    def __init__(self, dictionary, tokens_per_sample):
        self.source_dictionary = self.target_dictionary = dictionary
        self.tokens_per_sample = tokens_per_sample


def build_model(vocab: int, memory_size: int, tokens_per_sample: int):
    from fairseq.data import Dictionary
    from omegaconf import OmegaConf

    from fairseq_longmem.models.backbone import build_backbone
    from fairseq_longmem.models.longmem import LongMemConfig, LongMemDecoder, LongMemModel

    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    task = _Task(d, tokens_per_sample)
    bb_cfg = {"_name": "alibi_lm_tiny", "decoder_layers": 4, "decoder_embed_dim": 64,
              "decoder_ffn_embed_dim": 256, "decoder_attention_heads": 4,
              "decoder_input_dim": 64, "decoder_output_dim": 64,
              "decoder_normalize_before": True, "no_token_positional_embeddings": True,
              "share_decoder_input_output_embed": True, "activation_fn": "gelu",
              "dropout": 0.0, "tokens_per_sample": tokens_per_sample,
              "max_target_positions": tokens_per_sample}
    from fairseq.models.transformer_lm import TransformerLanguageModelConfig

    full = OmegaConf.to_container(OmegaConf.structured(TransformerLanguageModelConfig()), resolve=False)
    full = {k: v for k, v in full.items() if not (isinstance(v, str) and v.startswith("${"))}
    full.update(bb_cfg)
    backbone = build_backbone(full, task)
    cfg = OmegaConf.structured(LongMemConfig(tokens_per_sample=tokens_per_sample))
    cfg.use_external_memory = True
    cfg.memory_size = memory_size
    cfg.k = 32
    cfg.retrieval_layer_index = 3
    return LongMemModel(LongMemDecoder(cfg, d, backbone.decoder)).eval(), d


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_050_000)
    p.add_argument("--memory-size", type=int, default=8192)
    p.add_argument("--tokens-per-sample", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--samples", type=int, default=12, help="RSS samples along the document")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.memory_size, args.tokens_per_sample = 60_000, 1024, 256
    torch.manual_seed(0)
    from fairseq_longmem.data.stream_dataset import StreamBatches
    from fairseq_longmem.eval.token_losses import document_stream

    model, d = build_model(args.vocab, args.memory_size, args.tokens_per_sample)
    doc = stdlib_tokens(args.tokens, args.vocab)
    stream = document_stream([doc], d.eos(), name="long")
    batches = StreamBatches(stream, 1, args.tokens_per_sample, d.pad())
    every = max(1, len(batches) // args.samples)
    rows, nll_sum, count = [], 0.0, 0
    t0 = time.time()
    with torch.no_grad():
        for t in range(len(batches)):
            s = batches.collater([batches[t]])
            logits = model(**s["net_input"])[0]
            lp = torch.log_softmax(logits.float(), -1)
            tgt = s["target"]
            keep = tgt.ne(d.pad())
            nll_sum += float(-lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum())
            count += int(keep.sum())
            if (t + 1) % every == 0 or t + 1 == len(batches):
                rows.append({"tokens": (t + 1) * args.tokens_per_sample, "rss_mb": round(rss_mb(), 1),
                             "peak_rss_mb": round(peak_rss_mb(), 1)})
    full_at = args.memory_size
    after_full = [r for r in rows if r["tokens"] >= 2 * full_at]
    growth = (after_full[-1]["rss_mb"] - after_full[0]["rss_mb"]) if len(after_full) > 1 else 0.0
    result = {
        "tokens": int(count), "memory_size": args.memory_size,
        "tokens_per_sample": args.tokens_per_sample, "seconds": round(time.time() - t0, 1),
        "samples": rows, "rss_growth_after_memory_full_mb": round(growth, 1),
        "rss_growth_tokens": (after_full[-1]["tokens"] - after_full[0]["tokens"]) if after_full else 0,
        "note": "document token ids themselves take 8 bytes/token (input data, as with an mmap'd split)",
    }
    print(f"{'tokens read':>12} {'RSS MB':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['tokens']:>12,} {r['rss_mb']:>8.1f} {r['peak_rss_mb']:>12.1f}")
    print(f"RSS growth after the memory is full ({result['rss_growth_tokens']:,} more tokens): "
          f"{growth:+.1f} MB; {result['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
