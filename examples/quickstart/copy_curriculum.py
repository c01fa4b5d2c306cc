"""Natural text with a backbone that learned to copy: the quickstart's comparison again,
from a backbone pretrained on its own text mixed with copy documents.

Run after the quickstart (``bash examples/quickstart/run.sh --workdir Q``):

    python examples/quickstart/copy_curriculum.py --quickstart Q --workdir OUT --steps 900

1. data: the quickstart's train split (same sentencepiece model and dict.txt) plus
   as many tokens of *copy documents* made of its own text: a chunk of 16-96
   tokens, 0-64 tokens of other text, the same chunk again (an in-window copy),
   shuffled in among the natural lines;
2. a backbone of the quickstart's arch and window, pretrained ``--steps`` steps on
   that mix (the quickstart's recipe otherwise);
3. LongMem and the no-memory ablation adapted from it exactly as the quickstart
   adapts them (same data, steps and flags, natural text only);
4. evaluation on the quickstart's held-out documents: the backbone's copy probe,
   recall by distance (``longmem-recall``), perplexity of both models, the memory
   gain at equal steps and the second reading. Writes ``OUT/results.json``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", required=True, help="the quickstart's --workdir (after its run)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=900, help="backbone pretraining steps")
    p.add_argument("--copy-ratio", type=float, default=1.0,
                   help="copy-document tokens per natural token in the backbone's data")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def copy_documents(flat: np.ndarray, n_tokens: int, eos: int, rng) -> list:
    """Items ``[chunk, gap, chunk, eos]`` cut from the stream ``flat`` until ``n_tokens``."""
    items, total = [], 0
    while total < n_tokens:
        length, gap = int(rng.integers(16, 97)), int(rng.integers(0, 65))
        a = int(rng.integers(0, len(flat) - length))
        b = int(rng.integers(0, len(flat) - gap))
        item = np.concatenate([flat[a:a + length], flat[b:b + gap], flat[a:a + length], [eos]])
        items.append(item)
        total += len(item)
    return items


def build_mix(src: Path, dst: Path, ratio: float, seed: int) -> dict:
    """``dst``: ``src``'s dict.txt and valid split, and a train split of ``src``'s
    lines shuffled together with copy documents (``ratio`` tokens per natural one)."""
    import shutil

    from fairseq.data import Dictionary, data_utils
    from preprocess.mmap_writer import MMapWriter, best_fitting_dtype

    dst.mkdir(parents=True, exist_ok=True)
    d = Dictionary.load(str(src / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(src / "train"), d)
    lines = [ds[i].numpy() for i in range(len(ds))]
    flat = np.concatenate(lines)
    rng = np.random.default_rng(seed)
    items = lines + copy_documents(flat, int(ratio * len(flat)), d.eos(), rng)
    order = rng.permutation(len(items))
    writer = MMapWriter(str(dst / "train"), best_fitting_dtype(len(d)))
    for a in range(0, len(order), 10000):
        part = [items[j] for j in order[a:a + 10000]]
        writer.add(np.concatenate(part), np.array([len(x) for x in part]))
    writer.finalize()
    for name in ("dict.txt", "valid.bin", "valid.idx"):
        shutil.copy(src / name, dst / name)
    return {"natural_tokens": int(len(flat)), "copy_tokens": int(sum(map(len, items)) - len(flat))}


def run(cmd, log: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"error: {cmd[2]} failed; see {log}\n" + log.read_text()[-3000:])
    return time.time() - t0


def main(argv=None):
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    qs, out = Path(args.quickstart).resolve(), Path(args.workdir).resolve()
    qs_results = qs / "results.json"
    if not qs_results.exists():
        raise SystemExit(f"error: {qs_results} not found: run the quickstart with --workdir {qs} first")
    cfg = json.loads(qs_results.read_text())["config"]
    data = qs / "prep" / "data-bin"
    out.mkdir(parents=True, exist_ok=True)
    res = {"config": vars(args), "quickstart_config": cfg, "wall_seconds": {}}
    mix = out / "data-copymix"
    if not (mix / "train.idx").exists():
        res["data"] = build_mix(data, mix, args.copy_ratio, args.seed)
    train = [sys.executable, "-m", "fairseq_cli.train"]
    common = ["--user-dir", REPO / "fairseq_longmem", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
              "--weight-decay", 0.01, "--clip-norm", 1.0, "--cpu", "--no-epoch-checkpoints",
              "--disable-validation", "--log-interval", 50, "--log-format", "simple", "--seed", 1,
              "--num-workers", 0]
    bb = out / "backbone" / "checkpoint_last.pt"
    if not bb.exists():  # the quickstart's backbone recipe, --steps steps on the mix
        res["wall_seconds"]["backbone"] = run(train + [
            mix, "--task", "language_modeling", "--arch", cfg["backbone_arch"],
            "--sample-break-mode", "none", "--tokens-per-sample", cfg["backbone_tokens"],
            "--batch-size", 16, "--lr", 2e-3, "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", min(100, max(1, args.steps // 4)), "--dropout", 0.0,
            "--max-update", args.steps, "--save-dir", bb.parent] + common, out / "backbone.log")
    for name, memory in (("longmem", True), ("ablation", False)):
        if (out / name / "checkpoint_last.pt").exists():
            continue
        steps = cfg["adapt_steps"]  # the quickstart's stage 2, flag for flag
        res["wall_seconds"][name] = run(train + [
            data, "--task", "longmem_language_modeling", "--arch", cfg["arch"],
            "--pretrained-model-path", bb, "--reload-ptm-layer", "--criterion", "longmem_cross_entropy",
            "--tokens-per-sample", cfg["tokens_per_sample"], "--batch-size", cfg["batch_size"],
            "--adam-eps", 1e-6, "--lr", cfg["lr"], "--lr-scheduler", "polynomial_decay",
            "--total-num-update", steps, "--warmup-updates", max(1, steps // 20),
            "--side-dropout", 0.0, "--memory-size", cfg["memory_size"], "--k", cfg["k"],
            "--chunk-size", cfg["chunk_size"], "--retrieval-layer-index", cfg["retrieval_layer_index"],
            "--memory-gate-init", cfg["gate_init"], "--max-update", steps, "--save-dir", out / name]
            + common + (["--use-external-memory"] if memory else []), out / f"{name}.log")
    res.update(evaluate(out, data, cfg))
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def evaluate(out: Path, data: Path, cfg: dict) -> dict:
    from fairseq_longmem.eval import recall
    from fairseq_longmem.eval.copy_probe import copy_probe, repeated_spans
    from fairseq_longmem.eval.model_loading import load_for_eval
    from fairseq_longmem.eval.second_reading import second_reading

    T, docs = cfg["tokens_per_sample"], cfg["max_eval_docs"] or None
    models = [load_for_eval(str(out / "backbone" / "checkpoint_last.pt"), data=str(data),
                            tokens_per_sample=T, device="cpu", name="backbone")]
    models += [load_for_eval(str(out / n / "checkpoint_last.pt"), data=str(data), device="cpu", name=n)
               for n in ("ablation", "longmem")]
    stream = recall.load_stream(models[2].task, "test", docs)
    m = cfg["retrieval_layer_index"]
    cp = copy_probe(models[0].model.decoder, repeated_spans(stream, span=min(64, T // 2)))
    rec = recall.evaluate(models, "test", n=8, memory_size=cfg["memory_size"], max_documents=docs)
    lm, ab = (rec["models"][n]["overall"]["ppl"] for n in ("longmem", "ablation"))
    length = min(cfg["probe_length"], int(stream.doc_lengths.max()))
    sr = {n: second_reading(lm_.model, lm_.task, stream, length=length, min_length=min(256, length))
          for n, lm_ in (("longmem", models[2]), ("ablation", models[1]))}
    result = {
        "copy_probe": {"first_ppl": cp.first_perplexity, "second_ppl": cp.second_perplexity,
                       "induction_max": float(cp.induction.max()), "best_layer": cp.best_layer,
                       "induction_at_retrieval_layer": float(cp.induction[m].max())},
        "recall": rec, "longmem_ppl": lm, "ablation_ppl": ab,
        "memory_gain_pct": 100.0 * (ab - lm) / ab,
        "second_reading": {n: v.perplexity for n, v in sr.items()},
        "hit_rate_any_head": sr["longmem"].hit_rate_any_head,
    }
    print(recall.markdown_table(rec))
    c = result["copy_probe"]
    print(f"backbone copy probe: ppl {c['first_ppl']:.2f} on a span, {c['second_ppl']:.2f} on its "
          f"repeat; induction at layer {m} {c['induction_at_retrieval_layer']:.3f}")
    print(f"perplexity: ablation {ab:.2f}, LongMem {lm:.2f}; memory gain at equal steps "
          f"{result['memory_gain_pct']:+.2f}%; second reading LongMem "
          f"{sr['longmem'].perplexity:.2f} vs ablation {sr['ablation'].perplexity:.2f}")
    return result


if __name__ == "__main__":
    main()
