"""Key probe: how sharply a backbone's retrieval-layer keys single out the right memory token.

On a recall demo's work directory (``recall_demo.py --workdir W``), without
adapting anything: the test document is cut into ``--window``-token segments
as the stream task cuts it; at the recurring tokens beyond the window (the
span and key-value recurrences of ``test.recurrences.json``, at most
``--targets`` of them) the backbone's own query at layer ``--layer`` is
scored against the keys of the ``--memory-size`` tokens before its segment.
The right key is the one after the earlier occurrence (where an induction
head looks). Per head it prints how often the right key scores highest, its
share of the softmax over all those keys, and, for a chunked search (chunk
mean keys, ``k / chunk`` chunks), how often the right token is retrieved.

Usage: python examples/recall/key_probe.py W [--layer 1] [--window 64] [--memory-size 65536]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def layer_qk(decoder, tokens: torch.Tensor, layer_index: int, window: int):
    """Per-head queries and keys of one layer over a token stream, segment by segment.

    tokens: ``(N,)`` with N a multiple of ``window``. Returns q, k ``(heads, N, d)``.
    """
    from fairseq_longmem.modules.decoder_layer import (
        decoder_attn_bias, embed, layer_forward, project_qkv)

    segs = tokens.view(-1, window)
    bias = decoder_attn_bias(decoder, window, "cpu")
    qs, ks = [], []
    with torch.no_grad():
        for b in range(0, segs.size(0), 256):
            x = embed(decoder, segs[b:b + 256])
            for i, layer in enumerate(decoder.layers):
                if i == layer_index:
                    h = layer.self_attn_layer_norm(x) if layer.normalize_before else x
                    q, k, _ = project_qkv(layer, h)
                    qs.append(q)
                    ks.append(k)
                    break
                x, _ = layer_forward(layer, x, bias)
    heads = qs[0].size(1)
    flat = lambda ts: torch.cat(ts).permute(1, 0, 2, 3).reshape(heads, tokens.numel(), -1)  # noqa: E731
    return flat(qs), flat(ks)


def key_probe(work: Path, layer: int, window: int, memory_size: int, targets: int = 400,
              searches=((1, 32), (4, 32))) -> dict:
    """The probe's figures per head (see the module docstring)."""
    from fairseq.data import data_utils
    from fairseq_longmem.eval.model_loading import load_for_eval

    lm = load_for_eval(str(work / "backbone" / "checkpoint_last.pt"), data=str(work / "data-recall"),
                       tokens_per_sample=window, device="cpu")
    ds = data_utils.load_indexed_dataset(str(work / "data-recall" / "test"), lm.task.dictionary)
    doc = ds[0][:-1]
    n = len(doc) // window * window
    q, k = layer_qk(lm.model.decoder, doc[:n].long(), layer, window)
    recs = json.loads((work / "data-recall" / "test.recurrences.json").read_text())["recurrences"][0]
    pos = [(t + o, t - s) for _, s, t, length in recs if window < t - s <= memory_size - window
           for o in range(1, length - 1) if t + o < n]
    rng = np.random.default_rng(0)
    pos = [pos[i] for i in rng.choice(len(pos), min(targets, len(pos)), replace=False)]
    scale = q.size(-1) ** -0.5
    out = {"layer": layer, "targets": len(pos), "heads": []}
    for h in range(q.size(0)):
        top1, share, hits = [], [], {f"chunk{c}_k{kk}": [] for c, kk in searches}
        for t, d in pos:
            seg0 = t // window * window
            lo = max(0, seg0 - memory_size)
            keys = k[h, lo:seg0]
            scores = keys @ q[h, t] * scale
            right = t - d + 1 - lo
            top1.append(int(scores.argmax()) == right)
            share.append(float(scores.softmax(0)[right]))
            for c, kk in searches:
                lo_c = (seg0 - (seg0 - lo) // c * c)
                ck = k[h, lo_c:seg0].reshape(-1, c, keys.size(-1)).mean(1)
                got = (ck @ q[h, t]).topk(min(kk // c, ck.size(0))).indices
                hits[f"chunk{c}_k{kk}"].append(bool((got == (t - d + 1 - lo_c) // c).any()))
        out["heads"].append({"argmax_right": float(np.mean(top1)), "share": float(np.mean(share)),
                             **{name: float(np.mean(v)) for name, v in hits.items()}})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--layer", type=int, default=1, help="retrieval layer (0-based)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--memory-size", type=int, default=65536)
    p.add_argument("--targets", type=int, default=400)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = key_probe(Path(args.workdir), args.layer, args.window, args.memory_size, args.targets)
    for h, r in enumerate(res["heads"]):
        print(f"layer {res['layer']} head {h}: right key first {r['argmax_right']:.1%}, its softmax share "
              f"{r['share']:.3f}; retrieved: " + ", ".join(f"{k} {v:.1%}" for k, v in r.items()
                                                          if k.startswith("chunk")))
    return res


if __name__ == "__main__":
    main()
