"""Read probe: where a trained LongMem loses the recurring tokens it misses.

On a recall demo's work directory (``recall_demo.py --workdir W``), for the
adapted LongMem (``W/longmem/checkpoint_last.pt``): the test document runs in
stream order as the evaluation runs it (``--window``-token segments, the
memory holding the ``--memory-size`` tokens before each segment); at every
recurring token (the definition of ``longmem-recall``, context ``--n``) from
the window to the memory size it recomputes, per head of the memory layer,
what the read sees: the side network's own query, the exact top-``--k`` of
the frozen backbone's keys before the segment, and the memory attention's
softmax over them. The right key is the one after the earlier occurrence
(its value carries the target token). Per head it prints how often the right
key is retrieved, how often it is the first, its softmax share, and the share
of every retrieved token whose value token is the target; then the model's
own top-1 (its stream evaluation) split by what the best head saw: right key
not retrieved (a search miss), retrieved with under half / at least half of
the softmax, and by where the query and the right key sit in their segments
(without ``--backbone-context``, a key or query at a segment's first two
positions cannot carry the two tokens before it).

Usage: python examples/recall/read_probe.py W [--window 256] [--memory-size 65536] [--k 32]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def stream_qkv(decoder, inputs: torch.Tensor, window: int):
    """Per head: the side network's memory-layer queries and the backbone's
    retrieval-layer keys and values over ``inputs`` ``(N,)`` (N a multiple of
    ``window``), segment by segment, each read after the ``--backbone-context``
    tokens before it as the model reads it. Returns q, k, v ``(heads, N, d)``."""
    from fairseq_longmem.modules.decoder_layer import decoder_attn_bias, layer_forward, project_qkv

    side, m = decoder.side, decoder.side.memory_layer
    r = side.reduction
    segs = inputs.view(-1, window)
    c = decoder.context_length()
    bias = decoder_attn_bias(decoder.backbone, window, "cpu")
    pieces = [(0, 1)] if c else []  # segment 0 reads nothing before it
    pieces += [(a, min(segs.size(0), a + 128)) for a in range(1 if c else 0, segs.size(0), 128)]
    qs, ks, vs = [], [], []
    with torch.no_grad():
        for a, b in pieces:
            ctx = None
            if c and a > 0:
                ctx = torch.stack([inputs[max(0, i * window - c):i * window] for i in range(a, b)])
            hiddens, (k, v) = decoder.backbone_forward(segs[a:b], ctx, kv=True)
            x = hiddens[0]
            for i, layer in enumerate(side.layers):
                if i == m:
                    h = layer.self_attn_layer_norm(x) if layer.normalize_before else x
                    qs.append(project_qkv(layer, h)[0])
                    break
                x, _ = layer_forward(layer, x, bias)
                x = x + (hiddens[r * (i + 1)] - hiddens[r * i])
            ks.append(k)
            vs.append(v)
    heads = qs[0].size(1)
    flat = lambda ts: torch.cat(ts).permute(1, 0, 2, 3).reshape(heads, inputs.numel(), -1)  # noqa: E731
    return flat(qs), flat(ks), flat(vs)


def read_probe(work: Path, window: int, memory_size: int, k: int, n: int = 8) -> dict:
    from fairseq_longmem.eval import recall
    from fairseq_longmem.eval.model_loading import load_for_eval
    from fairseq_longmem.eval.token_losses import stream_token_losses

    lm = load_for_eval(str(work / "longmem" / "checkpoint_last.pt"), data=str(work / "data-recall"),
                       overrides={"memory_size": memory_size}, tokens_per_sample=window,
                       device="cpu")
    stream = recall.load_stream(lm.task, "test", 1)
    length = int(stream.doc_lengths[0])
    dist, _ = recall.stream_distances(stream, n)
    losses = stream_token_losses(lm.model, lm.task, stream)
    correct = losses.correct[:length]
    dec = lm.model.decoder
    gate = torch.sigmoid(dec.side.memory_gate.detach().float()).numpy()

    n_in = -(-length // window) * window
    inputs = np.full(n_in, lm.task.source_dictionary.pad(), dtype=np.int64)
    s0 = int(stream.doc_starts[0])
    inputs[:length] = stream.tokens[s0:s0 + length]  # input p: the token before target p
    targets = np.asarray(stream.tokens[s0 + 1:s0 + 1 + length])
    q, key, _ = stream_qkv(dec, torch.from_numpy(inputs), window)
    heads = q.size(0)
    scale = q.size(-1) ** -0.5

    # recurring targets p from the window to the memory; query at input p, right key at p - d + 1
    pos = np.nonzero((dist[:length] >= window) & (dist[:length] < memory_size))[0]
    right_at = pos - dist[pos] + 1
    rec = {f: np.zeros((heads, len(pos))) for f in ("retrieved", "first", "share", "value_share")}
    for j, (p, rk) in enumerate(zip(pos, right_at)):
        seg0 = p // window * window
        lo = max(0, seg0 - memory_size)
        if rk < lo:  # evicted (the [M, M + W) edge): not in memory
            continue
        scores = torch.einsum("hnd,hd->hn", key[:, lo:seg0], q[:, p]) * scale
        top = scores.topk(min(k, seg0 - lo), dim=-1)
        probs = top.values.softmax(-1)
        idx = top.indices + lo
        is_right = idx == int(rk)
        rec["retrieved"][:, j] = is_right.any(-1).numpy()
        rec["first"][:, j] = (idx[:, 0] == int(rk)).numpy()
        rec["share"][:, j] = (probs * is_right).sum(-1).numpy()
        same = torch.from_numpy(inputs[idx.numpy()] == targets[p])  # value token of key i: input i
        rec["value_share"][:, j] = (probs * same).sum(-1).numpy()
    ok = correct[pos].astype(bool)
    best = int(np.argmax(rec["share"].mean(1)))
    out = {"targets": int(len(pos)), "top1": float(ok.mean()), "gate": gate.tolist(), "best_head": best,
           "heads": [{f: float(v[h].mean()) for f, v in rec.items()} for h in range(heads)]}
    got, share = rec["retrieved"].max(0).astype(bool), rec["share"][best]
    clean = ((pos % window) >= 2) & ((right_at % window) >= 2)
    groups = {
        "right key retrieved by no head": ~got,
        f"retrieved, head {best} share < 0.5": got & (share < 0.5),
        f"retrieved, head {best} share >= 0.5": got & (share >= 0.5),
        "query at segment position 0-1": (pos % window) < 2,
        "right key at segment position 0-1": (right_at % window) < 2,
        "query at segment position >= 2, right key >= 2": clean,
    }
    groups.update({
        "clean (query >= 2, key >= 2): right key retrieved by no head": clean & ~got,
        f"clean: retrieved, head {best} share < 0.5": clean & got & (share < 0.5),
        f"clean: retrieved, head {best} share >= 0.5": clean & got & (share >= 0.5),
    })
    out["groups"] = {name: {"tokens": int(sel.sum()), "top1": float(ok[sel].mean()) if sel.any() else None,
                            "misses": int((~ok & sel).sum())} for name, sel in groups.items()}
    out["misses"] = int((~ok).sum())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--window", type=int, default=256,
                   help="segment length of the stream evaluation (the demo's --eval-window)")
    p.add_argument("--memory-size", type=int, default=65536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = read_probe(Path(args.workdir), args.window, args.memory_size, args.k, args.n)
    print(f"{res['targets']} recurring tokens from the window to the memory: LongMem top-1 "
          f"{res['top1']:.1%}, {res['misses']} misses; memory gate per head "
          + " ".join(f"{g:.2f}" for g in res["gate"]))
    for h, r in enumerate(res["heads"]):
        print(f"head {h}: right key retrieved {r['retrieved']:.1%}, first {r['first']:.1%}, its share "
              f"{r['share']:.3f}; share of the target's token {r['value_share']:.3f}")
    for name, g in res["groups"].items():
        top1 = "-" if g["top1"] is None else f"{g['top1']:.1%}"
        print(f"  {name}: {g['tokens']} tokens, top-1 {top1}, {g['misses']} misses")
    return res


if __name__ == "__main__":
    main()
