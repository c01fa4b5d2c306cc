"""CPU quickstart: real long documents in, LongMem and honest baselines out.

Steps (each visible as it runs, everything under --workdir):
  1. corpus: the Python standard library's own source files (one document per
     file; already on every machine) or --corpus PATH (folder or .jsonl);
  2. preprocess: split by document, sentencepiece, fairseq-preprocess;
  3. stage 1: pretrain an alibi_lm_small backbone with stock fairseq-train;
  4. stage 2: adapt longmem_small WITH memory for N steps, and the same side
     network WITHOUT memory for the same N steps (the ablation) and for the
     same wall time;
  5. evaluate on held-out documents, in stream order with whole documents:
     (i) backbone, (ii) ablation (equal steps), (ii') ablation (equal wall
     time), (iii) LongMem with memory switched off, (iv) LongMem; and (v) the
     second-reading probe with the retrieval hit rate.
Writes results.json, a loss-against-position plot and a table.
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("quickstart")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(REPO / "workdir" / "quickstart"))
    p.add_argument("--corpus", default=None, help="folder of text files or .jsonl (default: stdlib sources)")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--backbone-minutes", type=float, default=3.0)
    p.add_argument("--backbone-arch", default="alibi_lm_small")
    p.add_argument("--backbone-tokens", type=int, default=256, help="backbone pretraining window")
    p.add_argument("--arch", default="longmem_small")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="local window of stage 2")
    p.add_argument("--batch-size", type=int, default=8, help="streams per step in stage 2")
    p.add_argument("--adapt-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--memory-size", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--retrieval-layer-index", type=int, default=3)
    p.add_argument("--gate-init", type=float, default=0.0)
    p.add_argument("--probe-length", type=int, default=2048)
    p.add_argument("--max-eval-docs", type=int, default=12, help="0 = all held-out documents")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--tiny", action="store_true", help="seconds-scale smoke run (tests)")
    p.add_argument("--skip-equal-time", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab_size = min(args.vocab_size, 800)
        args.backbone_minutes = 0.0
        args.backbone_arch = "alibi_lm_tiny"
        args.arch = "longmem_tiny"
        args.backbone_tokens = 64
        args.tokens_per_sample = 32
        args.batch_size = 2
        args.adapt_steps = 6
        args.memory_size = 128
        args.k = 8
        args.probe_length = 96
        args.max_eval_docs = args.max_eval_docs or 3
    return args


def run(cmd, log_path: Path, show=("train_inner", "valid |", "| train |", "Perplexity")):
    """Run a command, tee its output to a log, show progress lines; return wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if any(s in line for s in show):
                print("   ", line.rstrip()[-150:], flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} failed; see {log_path}\n{tail}")
    return time.time() - t0


def fairseq(tool: str):
    return [sys.executable, "-m", f"fairseq_cli.{tool}"]


def stage(msg: str):
    print(f"\n== {msg}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from fairseq_longmem.preprocess.prepare_corpus import prepare_corpus
    from fairseq_longmem.preprocess.stdlib_corpus import build_stdlib_corpus

    t_start = time.time()
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    plugin = REPO / "fairseq_longmem"

    # 1-2. corpus and preprocessing
    stage("1/5 corpus")
    if args.corpus:
        corpus, corpus_name = Path(args.corpus), str(args.corpus)
    else:
        corpus = work / "corpus"
        if not corpus.exists():
            build_stdlib_corpus(corpus, max_docs=40 if args.tiny else None)
        corpus_name = "python-stdlib-sources"
    prep = work / "prep"
    stage("2/5 preprocess (split by document, sentencepiece, fairseq-preprocess)")
    if not (prep / "data-bin" / "test.idx").exists():
        prepare_corpus(corpus, prep, vocab_size=args.vocab_size, workers=args.threads,
                       valid_frac=0.05, test_frac=0.05, seed=1, spm_input_sentence_size=100_000)
    info = json.loads((prep / "corpus_info.json").read_text())
    data = prep / "data-bin"
    split_info = {k: {"docs": v["docs"], "tokens": v["bin_tokens"]} for k, v in info["splits"].items()}
    print(f"    {split_info}")

    # 3. stage 1: backbone
    stage(f"3/5 stage 1: pretrain {args.backbone_arch} with stock fairseq-train")
    bb_dir = work / "backbone"
    bb = bb_dir / "checkpoint_last.pt"
    if not bb.exists():
        budget = ["--max-update", 30] if args.tiny else ["--stop-time-hours", args.backbone_minutes / 60]
        run(fairseq("train") + [
            data, "--user-dir", plugin, "--task", "language_modeling", "--arch", args.backbone_arch,
            "--sample-break-mode", "none", "--tokens-per-sample", args.backbone_tokens,
            "--batch-size", 16, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
            "--lr", 2e-3, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 100,
            "--weight-decay", 0.01, "--clip-norm", 1.0, "--dropout", 0.0, *budget,
            "--save-dir", bb_dir, "--cpu", "--no-epoch-checkpoints", "--disable-validation",
            "--log-interval", 50, "--log-format", "simple", "--seed", 1,
        ], work / "logs" / "backbone.log")

    # 4. stage 2: LongMem, ablation at equal steps, ablation at equal wall time
    def adapt(name: str, memory: bool, steps: int):
        save = work / name
        ckpt = save / "checkpoint_last.pt"
        meta = save / "wall_seconds.json"
        if ckpt.exists() and meta.exists():
            return ckpt, json.loads(meta.read_text())
        cmd = fairseq("train") + [
            data, "--user-dir", plugin, "--task", "longmem_language_modeling", "--arch", args.arch,
            "--pretrained-model-path", bb, "--reload-ptm-layer",
            "--criterion", "longmem_cross_entropy", "--tokens-per-sample", args.tokens_per_sample,
            "--batch-size", args.batch_size, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
            "--adam-eps", 1e-6, "--lr", args.lr, "--lr-scheduler", "polynomial_decay",
            "--total-num-update", steps, "--warmup-updates", max(1, args.adapt_steps // 20),
            "--weight-decay", 0.01, "--clip-norm", 1.0, "--side-dropout", 0.0,
            "--memory-size", args.memory_size, "--k", args.k, "--chunk-size", args.chunk_size,
            "--retrieval-layer-index", args.retrieval_layer_index,
            "--memory-gate-init", args.gate_init, "--max-update", steps,
            "--save-dir", save, "--cpu", "--no-epoch-checkpoints", "--disable-validation",
            "--log-interval", 25, "--log-format", "simple", "--seed", 1,
        ] + (["--use-external-memory"] if memory else [])
        wall = run(cmd, work / "logs" / f"{name}.log")
        log = (work / "logs" / f"{name}.log").read_text()
        steps = [int(m) for m in re.findall(r"num_updates[= ](\d+)", log)]
        rec = {"wall_seconds": wall, "steps": max(steps) if steps else 0}
        meta.write_text(json.dumps(rec))
        return ckpt, rec

    stage(f"4/5 stage 2: adapt {args.arch} with memory, and without (ablation)")
    steps = args.adapt_steps
    lm_ckpt, lm_rec = adapt("longmem", True, steps)
    print(f"    LongMem: {lm_rec['steps']} steps in {lm_rec['wall_seconds']:.0f} s")
    ab_ckpt, ab_rec = adapt("ablation", False, steps)
    print(f"    ablation (no memory): {ab_rec['steps']} steps in {ab_rec['wall_seconds']:.0f} s")
    eq = None
    if not args.skip_equal_time:
        # the same wall time as LongMem's run (minus the shared start-up cost)
        extra_time = max(0.0, lm_rec["wall_seconds"] - ab_rec["wall_seconds"])
        per_step = ab_rec["wall_seconds"] / max(1, ab_rec["steps"])
        eq_steps = args.adapt_steps + int(extra_time / max(per_step, 1e-6))
        eq_ckpt, eq_rec = adapt("ablation_equal_time", False, eq_steps)
        print(f"    ablation at LongMem's wall time: {eq_rec['steps']} steps in {eq_rec['wall_seconds']:.0f} s")
        eq = (eq_ckpt, eq_rec)

    # 5. evaluation
    stage("5/5 evaluate on held-out documents (stream order, whole documents, batch 1)")
    from fairseq_longmem.eval.second_reading import second_reading
    from fairseq_longmem.eval.token_losses import stream_token_losses
    from fairseq_longmem.tasks.longmem_language_modeling import (
        LongMemLanguageModelingConfig,
        LongMemLanguageModelingTask,
    )
    from fairseq import checkpoint_utils

    task = LongMemLanguageModelingTask.setup_task(
        LongMemLanguageModelingConfig(data=str(data), tokens_per_sample=args.tokens_per_sample))
    task.load_dataset("test")
    stream = task.dataset("test")
    if args.max_eval_docs and len(stream.doc_starts) > args.max_eval_docs:
        from fairseq_longmem.eval.token_losses import document_stream

        docs = [stream.tokens[s + 1: s + 1 + n] for s, n in
                zip(stream.doc_starts[: args.max_eval_docs], stream.doc_lengths[: args.max_eval_docs])]
        stream = document_stream(docs, task.source_dictionary.eos(), name="test")

    def load(path, **overrides):
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides=overrides or None, task=task)
        return models[0].eval()

    results, curves = {}, {}
    evals = [
        ("backbone_ppl", "(i) backbone alone", bb, {}),
        ("no_memory_adaptation_ppl", "(ii) ablation: no memory, equal steps", ab_ckpt, {}),
    ]
    if eq is not None:
        evals.append(("no_memory_equal_time_ppl", "(ii') ablation: no memory, equal wall time", eq[0], {}))
    evals += [
        ("longmem_no_memory_ppl", "(iii) LongMem, memory off at evaluation", lm_ckpt,
         {"use_external_memory": False}),
        ("longmem_ppl", "(iv) LongMem", lm_ckpt, {}),
    ]
    for key, label, path, ov in evals:
        t0 = time.time()
        losses = stream_token_losses(load(path, **ov), task, stream, batch_size=1)
        results[key] = losses.perplexity
        curves[label] = losses
        print(f"    {label:48s} ppl {losses.perplexity:9.2f}   ({time.time() - t0:.0f} s)", flush=True)

    from fairseq_longmem.eval.copy_probe import copy_probe, repeated_spans

    copy = copy_probe(load(bb).decoder, repeated_spans(stream, span=min(64, args.tokens_per_sample // 2)))
    m = args.retrieval_layer_index
    print(f"    (vi) backbone in-context copy ([x, x], x = {copy.span} tokens): ppl first copy "
          f"{copy.first_perplexity:.2f}, second {copy.second_perplexity:.2f}; strongest induction "
          f"head {copy.induction.max():.3f} (layer {copy.best_layer}), at layer {m} "
          f"{copy.induction[m].max():.3f}")
    probe_lm = second_reading(load(lm_ckpt), task, stream, length=args.probe_length)
    probe_ab = second_reading(load(ab_ckpt), task, stream, length=args.probe_length)
    print(f"    (v) second reading: LongMem ppl {probe_lm.perplexity:.2f} vs ablation "
          f"{probe_ab.perplexity:.2f}; retrieval hit rate {probe_lm.hit_rate_any_head:.3f} (any head), "
          f"{probe_lm.hit_rate_per_head:.3f} (per head)")

    results.update({
        "adaptation_steps": lm_rec["steps"],
        "adaptation_wall_seconds": {"longmem": lm_rec["wall_seconds"], "ablation": ab_rec["wall_seconds"],
                                    **({"ablation_equal_time": eq[1]["wall_seconds"],
                                        "ablation_equal_time_steps": eq[1]["steps"]} if eq else {})},
        "second_reading_longmem_ppl": probe_lm.perplexity,
        "second_reading_ablation_ppl": probe_ab.perplexity,
        "second_reading_first_reading_longmem_ppl": probe_lm.first_perplexity,
        "retrieval_hit_rate": probe_lm.hit_rate_any_head,
        "retrieval_hit_rate_per_head": probe_lm.hit_rate_per_head,
        "second_reading_tokens": probe_lm.tokens,
        "backbone_copy_first_ppl": copy.first_perplexity,
        "backbone_copy_second_ppl": copy.second_perplexity,
        "backbone_induction_max": float(copy.induction.max()),
        "backbone_induction_best_layer": copy.best_layer,
        "backbone_induction_at_retrieval_layer": float(copy.induction[m].max()),
        "eval_tokens": int(len(curves["(iv) LongMem"].nll)),
        "eval_documents": int(len(stream.doc_starts)),
        "corpus": corpus_name,
        "corpus_info": split_info,
        "config": {k: v for k, v in vars(args).items()},
        "memory_gain_vs_ablation_pct": 100 * (1 - results["longmem_ppl"] / results["no_memory_adaptation_ppl"]),
        "wall_seconds": time.time() - t_start,
    })
    if "no_memory_equal_time_ppl" in results:
        results["memory_gain_vs_equal_time_ablation_pct"] = 100 * (
            1 - results["longmem_ppl"] / results["no_memory_equal_time_ppl"])
    (work / "results.json").write_text(json.dumps(results, indent=2))
    plot(curves, work / "loss_vs_position.png")
    print_table(results, work)
    return results


def plot(curves, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, losses in curves.items():
        edges = np.unique(np.geomspace(1, max(2, losses.pos.max() + 1), 16).astype(int))
        idx = np.digitize(losses.pos, edges)
        xs, ys = [], []
        for b in range(1, len(edges)):
            m = idx == b
            if m.sum() >= 20:
                xs.append(losses.pos[m].mean())
                ys.append(losses.nll[m].mean())
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("token position in document")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("held-out loss against position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(r, work: Path):
    rows = [
        ("(i) backbone alone", r["backbone_ppl"]),
        ("(ii) ablation: no memory, equal steps", r["no_memory_adaptation_ppl"]),
    ]
    if "no_memory_equal_time_ppl" in r:
        rows.append(("(ii') ablation: no memory, equal wall time", r["no_memory_equal_time_ppl"]))
    rows += [
        ("(iii) LongMem, memory off at evaluation", r["longmem_no_memory_ppl"]),
        ("(iv) LongMem", r["longmem_ppl"]),
        ("(v) second reading: LongMem", r["second_reading_longmem_ppl"]),
        ("(v) second reading: ablation", r["second_reading_ablation_ppl"]),
    ]
    lines = ["| model | perplexity |", "|---|---|"] + [f"| {a} | {b:.2f} |" for a, b in rows]
    lines += [
        "",
        f"memory gain (iv) vs (ii), equal steps: {r['memory_gain_vs_ablation_pct']:+.1f}%",
        *( [f"memory gain (iv) vs (ii'), equal wall time: {r['memory_gain_vs_equal_time_ablation_pct']:+.1f}%"]
           if "memory_gain_vs_equal_time_ablation_pct" in r else []),
        f"retrieval hit rate (second reading): {r['retrieval_hit_rate']:.3f} any head, "
        f"{r['retrieval_hit_rate_per_head']:.3f} per head",
        f"backbone in-context copy: ppl {r['backbone_copy_first_ppl']:.2f} on a span, "
        f"{r['backbone_copy_second_ppl']:.2f} on its repeat; strongest induction head "
        f"{r['backbone_induction_max']:.3f} (layer {r['backbone_induction_best_layer']}); "
        f"at the retrieval layer {r['backbone_induction_at_retrieval_layer']:.3f}",
        f"{r['eval_documents']} held-out documents, {r['eval_tokens']} tokens; "
        f"{r['adaptation_steps']} adaptation steps; wall time {r['wall_seconds']:.0f} s",
        f"results: {work / 'results.json'}; plot: {work / 'loss_vs_position.png'}",
    ]
    text = "\n".join(lines)
    (work / "results.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
