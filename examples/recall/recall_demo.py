"""Minutes-scale demonstration that memory carries the answer: recall by distance.

Steps (everything under --workdir, each visible as it runs):
  1. corpus: a synthetic recall corpus (fairseq_longmem.data.synthetic_recall):
     dense in-window repeats for the backbone (spans read four times in a
     row; half of the documents from 16 symbols, spans read twice far apart,
     so that copying needs the last two tokens), documents whose spans and key-value pairs recur far back for
     adaptation and the test; or --corpus DIR (a folder of text documents,
     preprocessed as the quickstart does);
  2. stage 1: pretrain a small ALiBi backbone with stock fairseq-train, in
     rounds, until the copy probe passes the gate (strongest induction head
     at the retrieval layer >= --gate-induction and the repeat's perplexity
     <= --gate-ratio x the first copy's) after at least --backbone-min-steps,
     or --backbone-max-steps;
  3. stage 2: adapt LongMem (memory on) and the ablation (same side network,
     same backbone, same steps, no memory) on long-range repeats;
  4. evaluate in stream order on --eval-window-token segments (256; the
     backbone pretrains and LongMem adapts on --window, 64: ALiBi
     extrapolates): recall by distance (fairseq_longmem.eval.recall) with the
     memory at --memory-size (>= 65,536 tokens) for the backbone, the
     ablation and LongMem; the second-reading probe.
Writes results.json (per-bucket accuracy per model, copy probe, second
reading, targets, wall time), results.md and recall_by_distance.png.
"""

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(REPO / "workdir" / "recall"))
    p.add_argument("--corpus", default=None, help="folder of text documents (default: synthetic)")
    p.add_argument("--vocab", type=int, default=512, help="synthetic symbols")
    p.add_argument("--spm-vocab", type=int, default=4000, help="--corpus: sentencepiece vocabulary")
    p.add_argument("--alphabet", type=int, default=16,
                   help="symbols per small-alphabet backbone pretraining document (0: none; "
                   "there the last token is ambiguous, copying needs the last two)")
    p.add_argument("--alphabet-frac", type=float, default=0.5,
                   help="share of backbone pretraining documents drawn from --alphabet symbols "
                   "(the rest from the whole vocabulary)")
    p.add_argument("--alphabet-copies", type=int, default=2,
                   help="copies of each span in the alphabet's documents (0: 4, as the others)")
    p.add_argument("--alphabet-max-gap", type=int, default=32,
                   help="most filler between copies in the alphabet's documents (-1: 4, as the others)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=64,
                   help="tokens per segment while the backbone pretrains and LongMem adapts")
    p.add_argument("--eval-window", type=int, default=512,
                   help="tokens per segment at evaluation (the local window of every model "
                   "evaluated; ALiBi extrapolates past --window); the buckets follow it")
    p.add_argument("--backbone-lr", type=float, default=3e-3)
    p.add_argument("--backbone-batch", type=int, default=16)
    p.add_argument("--backbone-round", type=int, default=500, help="steps between copy probes")
    p.add_argument("--backbone-min-steps", type=int, default=3000,
                   help="pretrain at least this many steps (probed first there), even past the gate: "
                   "the retrieval keys keep sharpening after the induction head has formed")
    p.add_argument("--backbone-max-steps", type=int, default=4000)
    p.add_argument("--gate-induction", type=float, default=0.7)
    p.add_argument("--gate-ratio", type=float, default=0.2)
    p.add_argument("--retrieval-layer-index", type=int, default=None, help="default: the last layer")
    p.add_argument("--adapt-steps", type=int, default=3000,
                   help="adaptation steps of LongMem and of the ablation (600 before 2026-12-01)")
    p.add_argument("--adapt-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="adaptation learning rate")
    p.add_argument("--train-memory-size", type=int, default=16384, help="memory while adapting")
    p.add_argument("--memory-size", type=int, default=65536, help="memory at evaluation")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1,
                   help="memory chunk (1: every token's key searched on its own)")
    p.add_argument("--gate-init", type=float, default=0.0)
    p.add_argument("--backbone-context", type=int, default=8,
                   help="tokens before each segment the frozen backbone also reads, so that "
                   "keys and queries at a segment's first positions carry the tokens before "
                   "them (LongMem and the ablation alike; 0: each segment alone)")
    p.add_argument("--span", type=int, default=32, help="tokens per recurring span")
    p.add_argument("--test-docs", type=int, default=2, help="test documents (each: 6 spans per distance)")
    p.add_argument("--probe-length", type=int, default=1024)
    p.add_argument("--n", type=int, default=8, help="recall: context tokens that must recur")
    p.add_argument("--max-eval-docs", type=int, default=12, help="test documents evaluated (0: all)")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--tiny", action="store_true", help="seconds-scale smoke run (tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.dim, args.heads, args.window, args.eval_window = 16, 32, 2, 32, 64
        args.backbone_round, args.backbone_max_steps, args.backbone_batch = 20, 20, 8
        args.backbone_min_steps = 0
        args.adapt_steps, args.adapt_batch = 6, 2
        args.train_memory_size, args.memory_size, args.k = 256, 1024, 8
        args.span, args.probe_length, args.spm_vocab = 16, 128, 600
    if args.backbone_min_steps > args.backbone_max_steps:
        p.error("--backbone-min-steps must be at most --backbone-max-steps")
    if args.eval_window < args.window:
        p.error("--eval-window must be at least --window")
    if args.memory_size < args.train_memory_size:
        p.error("--memory-size must be at least --train-memory-size")
    if args.retrieval_layer_index is None:
        args.retrieval_layer_index = args.layers - 1
    return args


def run(cmd, log_path: Path, show=("train_inner",)):
    """Run a command, tee it to a log, show progress lines; return wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if any(s in line for s in show):
                print("   ", line.rstrip()[-140:], flush=True)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} failed; see {log_path}\n"
                         + log_path.read_text()[-3000:])
    return time.time() - t0


def stage(msg: str):
    print(f"\n== {msg}", flush=True)


def synthetic_corpus(args, work: Path):
    """Backbone data (dense repeats) and recall data (long-range repeats); returns both dirs."""
    from fairseq_longmem.data.synthetic_recall import RecallCorpusConfig, write_split

    W, M, Mt = args.window, args.memory_size, args.train_memory_size
    bb, rc = work / "data-backbone", work / "data-recall"
    if not (bb / "train.idx").exists():
        steps = args.backbone_max_steps
        tokens = max(64 * W, steps * args.backbone_batch * W)  # fresh data at every step
        # dense repeats: spans of 4-16 tokens read 4 times in a row (3/4 of the tokens
        # can be copied), a little filler between units
        dense = dict(kind="dense", vocab=args.vocab, span=16, span_min=4, max_gap=4, copies=4,
                     alphabet=args.alphabet, alphabet_frac=args.alphabet_frac,
                     alphabet_copies=args.alphabet_copies, alphabet_max_gap=args.alphabet_max_gap)
        doc = 4096 if not args.tiny else 512
        write_split(str(bb), "train", RecallCorpusConfig(docs=max(2, tokens // doc), doc_tokens=doc, **dense))
        write_split(str(bb), "valid", RecallCorpusConfig(docs=2, doc_tokens=doc, **dense))
    if not (rc / "test.idx").exists():
        S = args.span
        # adaptation: every distance from inside the window to the training memory
        train_d = sorted({max(S, W // 2), 2 * W, 6 * W, Mt // 3, (3 * Mt) // 4})
        train_tokens = args.adapt_steps * args.adapt_batch * W
        pairs = 4
        spans = dict(kind="spans", vocab=args.vocab, span=S, pairs=pairs, key_len=8, value_len=2)
        doc = max(Mt + 4 * W, 8 * len(train_d) * (S + 10 * pairs))
        repeats = max(1, doc // (4 * S * len(train_d)))  # about half of each document recurs
        if args.tiny:
            repeats = 3
        write_split(str(rc), "train", RecallCorpusConfig(
            docs=max(args.adapt_batch, -(-train_tokens // doc)), doc_tokens=doc,
            distances=train_d, repeats=repeats, **spans))
        # test: one recurrence distance in each bucket of recall.py, and beyond the memory
        from fairseq_longmem.eval.recall import distance_edges

        edges = distance_edges(args.eval_window, M)
        lows = [S] + edges[:-1]
        test_d = sorted({int(math.sqrt(lo * hi)) for lo, hi in zip(lows, edges) if hi > S}
                        | {M + 2 * W + M // 8})
        test_d = [max(d, S) for d in test_d]
        repeats = 6 if not args.tiny else 3
        doc = max(test_d) + 3 * (repeats * S + 10 * pairs) + 4 * args.eval_window  # room for the farthest
        write_split(str(rc), "test", RecallCorpusConfig(
            docs=args.test_docs, doc_tokens=doc, distances=test_d, repeats=repeats,
            seed=2, **spans))
        write_split(str(rc), "valid", RecallCorpusConfig(
            docs=2, doc_tokens=max(8 * W, 4 * S + 2 * W), distances=[2 * W], repeats=2, seed=3,
            **spans))
    return bb, rc


def text_corpus(args, work: Path):
    from fairseq_longmem.preprocess.prepare_corpus import prepare_corpus

    prep = work / "prep"
    if not (prep / "data-bin" / "test.idx").exists():
        prepare_corpus(Path(args.corpus), prep, vocab_size=args.spm_vocab, workers=args.threads,
                       valid_frac=0.05, test_frac=0.05, seed=1, spm_input_sentence_size=100_000)
    data = prep / "data-bin"
    return data, data


def train_backbone(args, data: Path, work: Path, probe_stream_fn):
    """fairseq-train in rounds of --backbone-round steps until the copy probe passes the gate."""
    save = work / "backbone"
    ckpt = save / "checkpoint_last.pt"
    m = args.retrieval_layer_index
    history = []
    steps = 0
    if ckpt.exists():
        import torch

        steps = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"]
    while True:
        if steps:
            probe = probe_stream_fn(ckpt)
            rec = {"steps": steps, "first_ppl": probe.first_perplexity,
                   "second_ppl": probe.second_perplexity,
                   "induction_at_retrieval_layer": float(probe.induction[m].max()),
                   "induction_max": float(probe.induction.max()), "best_layer": probe.best_layer}
            rec["passed"] = bool(rec["induction_at_retrieval_layer"] >= args.gate_induction
                                 and rec["second_ppl"] <= args.gate_ratio * rec["first_ppl"])
            history.append(rec)
            print(f"    copy probe after {steps} steps: ppl first {rec['first_ppl']:.2f}, repeat "
                  f"{rec['second_ppl']:.2f}; induction at layer {m} {rec['induction_at_retrieval_layer']:.3f}"
                  f" -> {'PASSED' if rec['passed'] else 'not yet'}", flush=True)
            if (rec["passed"] and steps >= args.backbone_min_steps) or steps >= args.backbone_max_steps:
                return ckpt, history
        steps = min(args.backbone_max_steps, max(steps + args.backbone_round, args.backbone_min_steps))
        run([sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", REPO / "fairseq_longmem",
             "--task", "language_modeling", "--arch", "alibi_lm", "--decoder-layers", args.layers,
             "--decoder-embed-dim", args.dim, "--decoder-ffn-embed-dim", 2 * args.dim,
             "--decoder-attention-heads", args.heads, "--dropout", 0.0,
             "--sample-break-mode", "none", "--tokens-per-sample", args.window,
             "--max-target-positions", max(args.window, args.eval_window),
             "--batch-size", args.backbone_batch, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
             "--lr", args.backbone_lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 30,
             "--clip-norm", 1.0, "--max-update", steps, "--save-dir", save, "--cpu",
             "--no-epoch-checkpoints", "--disable-validation", "--log-interval", 50,
             "--log-format", "simple", "--seed", 1, "--num-workers", 0],
            work / "logs" / "backbone.log")


def adapt(args, data: Path, work: Path, backbone: Path, name: str, memory: bool):
    save = work / name
    ckpt = save / "checkpoint_last.pt"
    meta = save / "wall_seconds.json"
    if ckpt.exists() and meta.exists():
        return ckpt, json.loads(meta.read_text())
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", REPO / "fairseq_longmem",
           "--task", "longmem_language_modeling", "--arch", "longmem",
           "--pretrained-model-path", backbone, "--reload-ptm-layer",
           "--layer-reduction-factor", 1, "--retrieval-layer-index", args.retrieval_layer_index,
           "--criterion", "longmem_cross_entropy", "--tokens-per-sample", args.window,
           "--batch-size", args.adapt_batch, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
           "--lr", args.lr, "--lr-scheduler", "polynomial_decay", "--total-num-update", args.adapt_steps,
           "--warmup-updates", max(1, args.adapt_steps // 20), "--clip-norm", 1.0,
           "--side-dropout", 0.0, "--memory-size", args.train_memory_size, "--k", args.k,
           "--chunk-size", args.chunk_size, "--memory-gate-init", args.gate_init,
           "--backbone-context", args.backbone_context,
           "--max-update", args.adapt_steps, "--save-dir", save, "--cpu", "--no-epoch-checkpoints",
           "--disable-validation", "--log-interval", 25, "--log-format", "simple", "--seed", 1,
           "--num-workers", 0] + (["--use-external-memory"] if memory else [])
    wall = run(cmd, work / "logs" / f"{name}.log")
    steps = [int(s) for s in re.findall(r"num_updates[= ](\d+)", (work / "logs" / f"{name}.log").read_text())]
    rec = {"wall_seconds": wall, "steps": max(steps) if steps else 0}
    meta.write_text(json.dumps(rec))
    return ckpt, rec


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from fairseq_longmem.eval.model_loading import load_for_eval
    from fairseq_longmem.eval.copy_probe import copy_probe, repeated_spans
    from fairseq_longmem.eval import recall
    from fairseq_longmem.eval.second_reading import second_reading

    t_start = time.time()
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    times = {}

    stage("1/4 corpus")
    t = time.time()
    if args.corpus:
        bb_data, rc_data = text_corpus(args, work)
    else:
        bb_data, rc_data = synthetic_corpus(args, work)
    times["corpus_s"] = time.time() - t

    def probe_backbone(ckpt):
        lm = load_for_eval(str(ckpt), data=str(rc_data), tokens_per_sample=args.window, device="cpu")
        lm.task.load_dataset("valid")
        spans = repeated_spans(lm.task.dataset("valid"), span=min(32, args.window // 2), stride=97)
        return copy_probe(lm.model.decoder, spans)

    stage(f"2/4 stage 1: pretrain a {args.layers} x {args.dim} ALiBi backbone until it copies in context")
    t = time.time()
    bb, gate_history = train_backbone(args, bb_data, work, probe_backbone)
    times["backbone_s"] = time.time() - t
    gate = gate_history[-1]

    stage("3/4 stage 2: adapt LongMem (memory) and the ablation (no memory), equal steps")
    lm_ckpt, lm_rec = adapt(args, rc_data, work, bb, "longmem", True)
    print(f"    LongMem: {lm_rec['steps']} steps in {lm_rec['wall_seconds']:.0f} s", flush=True)
    ab_ckpt, ab_rec = adapt(args, rc_data, work, bb, "ablation", False)
    print(f"    ablation: {ab_rec['steps']} steps in {ab_rec['wall_seconds']:.0f} s", flush=True)
    times["adapt_s"] = lm_rec["wall_seconds"] + ab_rec["wall_seconds"]

    stage(f"4/4 evaluate: recall by distance ({args.eval_window}-token segments, memory "
          f"{args.memory_size} tokens), second reading")
    t = time.time()
    over = {"memory_size": args.memory_size}
    ew = args.eval_window  # every model sees the same local window
    models = [
        load_for_eval(str(bb), data=str(rc_data), tokens_per_sample=ew, device="cpu",
                      name="backbone"),
        load_for_eval(str(ab_ckpt), data=str(rc_data), tokens_per_sample=ew, device="cpu",
                      name="ablation"),
        load_for_eval(str(lm_ckpt), data=str(rc_data), overrides=over, tokens_per_sample=ew,
                      device="cpu", name="longmem"),
    ]
    max_docs = args.max_eval_docs or None
    res = recall.evaluate(models, "test", n=args.n, memory_size=args.memory_size,
                          max_documents=max_docs)
    times["recall_eval_s"] = time.time() - t
    t = time.time()
    stream = recall.load_stream(models[2].task, "test", max_docs)
    length = min(args.probe_length, int(stream.doc_lengths.max()))
    sr = {name: second_reading(lm.model, lm.task, stream, length=length, min_length=min(256, length))
          for name, lm in (("longmem", models[2]), ("ablation", models[1]))}
    times["second_reading_s"] = time.time() - t

    results = {
        "recall": res,
        "copy_probe": gate_history,
        "gate_passed": gate["passed"],
        "second_reading": {k: vars(v) for k, v in sr.items()},
        "adaptation": {"longmem": lm_rec, "ablation": ab_rec},
        "config": vars(args),
        "corpus": args.corpus or "synthetic recall corpus",
    }
    if not args.corpus:
        results["targets"] = targets(res, sr, args.vocab)
    times["total_s"] = time.time() - t_start
    results["wall_seconds"] = times
    (work / "results.json").write_text(json.dumps(recall_json_safe(results), indent=1))
    recall.plot_accuracy(res, str(work / "recall_by_distance.png"))
    text = summary(results, work)
    (work / "results.md").write_text(text)
    print("\n" + text, flush=True)
    return results


def recall_json_safe(obj):
    from fairseq_longmem.eval.cli_common import json_safe

    return json_safe(obj)


def at_chance(top1: float, tokens: int, chance: float, alpha: float = 0.01) -> bool:
    """Whether ``top1`` over ``tokens`` tokens is not significantly above ``chance``:
    the one-sided binomial test P(X >= hits | tokens, chance) >= alpha (a fixed
    multiple of chance would call 3 lucky hits in 312 tokens "above chance")."""
    if tokens <= 0:
        return False
    hits = int(round(top1 * tokens))
    below = sum(math.comb(tokens, i) * chance ** i * (1 - chance) ** (tokens - i)
                for i in range(hits))
    return 1.0 - below >= alpha


def targets(res, sr, vocab: int) -> dict:
    """The issue's targets on the synthetic corpus, each with its measured value."""
    W, M = res["window"], res["memory_size"]
    chance = 1.0 / vocab
    lm, ab = res["models"]["longmem"], res["models"]["ablation"]
    inside = [i for i, b in enumerate(lm["buckets"]) if b["lo"] >= W and b["hi"] is not None and b["tokens"]]
    beyond = lm["buckets"][-1]
    out = {
        "chance_top1": chance,
        "longmem_ge_95pct_from_window_to_memory": {
            "met": bool(inside) and all(lm["buckets"][i]["top1"] >= 0.95 for i in inside),
            "values": {lm["buckets"][i]["label"]: lm["buckets"][i]["top1"] for i in inside}},
        "ablation_at_chance_there": {
            "met": bool(inside) and all(at_chance(ab["buckets"][i]["top1"], ab["buckets"][i]["tokens"],
                                                  chance) for i in inside),
            "values": {ab["buckets"][i]["label"]: ab["buckets"][i]["top1"] for i in inside}},
        "longmem_at_chance_beyond_memory": {
            "met": at_chance(beyond["top1"], beyond["tokens"], chance),
            "value": beyond["top1"]},
        "second_reading_ppl_50pct_below_ablation": {
            "met": sr["longmem"].perplexity <= 0.5 * sr["ablation"].perplexity,
            "values": {"longmem": sr["longmem"].perplexity, "ablation": sr["ablation"].perplexity}},
    }
    del M
    return out


def summary(r, work: Path) -> str:
    from fairseq_longmem.eval.recall import markdown_table

    g = r["copy_probe"][-1]
    sr = r["second_reading"]
    lines = [markdown_table(r["recall"]),
             f"backbone copy probe after {g['steps']} steps: ppl of a span {g['first_ppl']:.2f}, of its "
             f"repeat {g['second_ppl']:.2f}; strongest induction head at the retrieval layer "
             f"{g['induction_at_retrieval_layer']:.3f} -> gate {'passed' if g['passed'] else 'NOT passed'}",
             f"second reading: LongMem ppl {sr['longmem']['perplexity']:.2f} (hit rate "
             f"{(sr['longmem']['hit_rate_any_head'] or 0):.3f} any head), ablation "
             f"{sr['ablation']['perplexity']:.2f}"]
    for name, t in r.get("targets", {}).items():
        if isinstance(t, dict):
            lines.append(f"target {name}: {'MET' if t['met'] else 'not met'} "
                         f"({json.dumps(t.get('values', t.get('value')), default=str)[:160]})")
    lines.append(f"wall time {r['wall_seconds']['total_s']:.0f} s "
                 f"({', '.join(f'{k} {v:.0f}' for k, v in r['wall_seconds'].items())}); "
                 f"results: {work / 'results.json'}; plot: {work / 'recall_by_distance.png'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
