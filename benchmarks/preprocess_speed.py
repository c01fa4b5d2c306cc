"""Throughput and peak memory of ``longmem-preprocess`` on a multi-shard ``.jsonl.zst`` corpus.

Generates a Pile-layout corpus (``{"text": ..., "meta": {"pile_set_name": ...}}``,
zstandard-compressed shards) of ``--gb`` GB of uncompressed text: synthetic but
word-like, words drawn from a Zipfian vocabulary of the words of this Python's
standard-library sources, documents of log-normal length, lines of 5-40 words.
Then runs ``longmem-preprocess`` (small sentencepiece vocabulary and sample, so
that training it is short) with each ``--workers`` count in a fresh process and
reports tokens/s (end to end, and of the binarize step) and the peak resident
memory of the process tree (main + workers, sampled from /proc every 0.1 s).
The generated corpus and outputs are deleted afterwards unless ``--keep``.

    python benchmarks/preprocess_speed.py                 # 1 GB, 8 shards, 1 and 2 workers
    python benchmarks/preprocess_speed.py --quick         # seconds (tests)
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SUBSETS = ("Books3", "ArXiv", "Github", "Pile-CC")


def stdlib_vocabulary(size: int = 20000) -> list:
    """The ``size`` most frequent words (2-15 letters) of the stdlib sources, most frequent first."""
    counts: collections.Counter = collections.Counter()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        counts.update(re.findall(r"[A-Za-z]{2,15}", path.read_text(encoding="utf-8", errors="ignore")))
    return [w for w, _ in counts.most_common(size)]


def generate_corpus(folder: Path, total_bytes: int, shards: int, seed: int = 0, doc_words: int = 3000) -> dict:
    """Write ``shards`` ``.jsonl.zst`` files holding about ``total_bytes`` of text; returns counts."""
    import zstandard

    rng = np.random.default_rng(seed)
    vocab = np.array(stdlib_vocabulary(), dtype=object)
    p = 1.0 / np.arange(1, vocab.size + 1) ** 1.1
    p /= p.sum()
    # a pool of Zipf-distributed words; documents are random stretches of it (fast to generate)
    pool = vocab[rng.choice(vocab.size, size=4_000_000, p=p)].tolist()
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = total_bytes // shards
    n_docs = n_bytes = 0
    for s in range(shards):
        path = folder / f"{s:02d}.jsonl.zst"
        written = 0
        with path.open("wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
            while written < per_shard:
                n = int(max(50, rng.lognormal(np.log(doc_words), 0.8)))
                n = min(n, len(pool) // 2)
                start = int(rng.integers(len(pool) - n))
                words = pool[start : start + n]
                cuts = np.cumsum(rng.integers(5, 40, size=n // 5 + 2)).tolist()
                bounds = [0] + [c for c in cuts if c < n] + [n]
                lines = [" ".join(words[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
                text = "\n".join(lines) + "\n"
                rec = {"text": text, "meta": {"pile_set_name": SUBSETS[int(rng.integers(len(SUBSETS)))]}}
                out.write((json.dumps(rec) + "\n").encode("utf-8"))
                written += len(text)
                n_docs += 1
        n_bytes += written
    return {"documents": n_docs, "text_bytes": n_bytes,
            "compressed_bytes": sum(f.stat().st_size for f in folder.iterdir())}


def _tree_rss(pid: int) -> int:
    """Proportional resident bytes (PSS: shared pages divided among their users) of ``pid``
    and all its descendants (from /proc)."""
    children: dict = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def idle_rss() -> int:
    """PSS of a Python that imported the preprocessing CLI (and with it the plugin, torch, fairseq)."""
    proc = subprocess.Popen([sys.executable, "-c", "import fairseq_longmem.preprocess.prepare_corpus, "
                             "sentencepiece, zstandard, sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    time.sleep(0.5)
    rss = 0
    while proc.poll() is None:
        new = _tree_rss(proc.pid)
        if new and new == rss:
            break
        rss = new
        time.sleep(1.0)
    proc.communicate("")
    return rss


def run_preprocess(corpus: Path, out: Path, workers: int, vocab: int, sample_chars: int) -> dict:
    """One ``longmem-preprocess`` run in a fresh process; wall time, peak tree RSS, corpus_info."""
    cmd = [sys.executable, "-m", "fairseq_longmem.preprocess.prepare_corpus", "--input", str(corpus),
           "--out", str(out), "--vocab-size", str(vocab), "--spm-sample-chars", str(sample_chars),
           "--workers", str(workers), "--no-raw-text", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"longmem-preprocess failed ({proc.returncode}): {stderr[-2000:]}")
    info = json.loads((out / "corpus_info.json").read_text())
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "tokens": info["tokens"],
        "tokens_per_s": round(info["tokens"] / wall),
        "binarize_tokens_per_s": round(info["binarize_tokens_per_s"] or 0),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "timings_s": info["timings_s"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="uncompressed text to generate (GB)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated")
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--spm-sample-chars", type=int, default=5_000_000)
    ap.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="5 MB, 4 shards (seconds)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    args = ap.parse_args(argv)
    if args.quick:
        args.gb, args.shards, args.vocab_size, args.spm_sample_chars = 0.005, 4, 400, 500_000
    work = Path(args.workdir or tempfile.mkdtemp(prefix="preprocess_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        corpus = generate_corpus(work / "corpus", int(args.gb * 1e9), args.shards)
        corpus["generate_s"] = round(time.perf_counter() - t0, 1)
        print(f"corpus: {corpus}", flush=True)
        idle = idle_rss()
        print(f"idle Python with the CLI imported: {idle / 2**20:.1f} MB", flush=True)
        runs = []
        for w in (int(x) for x in args.workers.split(",")):
            r = run_preprocess(work / "corpus", work / f"out_w{w}", w, args.vocab_size, args.spm_sample_chars)
            r["peak_rss_above_idle_mb"] = round(r["peak_rss_mb"] - idle / 2**20, 1)
            runs.append(r)
            print(f"workers={w}: {r['tokens']:,} tokens in {r['wall_s']} s: {r['tokens_per_s']:,} tokens/s "
                  f"end to end, {r['binarize_tokens_per_s']:,} tokens/s binarizing; peak RSS "
                  f"{r['peak_rss_mb']} MB (PSS, all processes; {r['peak_rss_above_idle_mb']} MB above idle); steps {r['timings_s']}", flush=True)
        summary = {"corpus": corpus, "shards": args.shards, "idle_rss_mb": round(idle / 2**20, 1), "cpus": os.cpu_count(), "runs": runs}
        print(json.dumps(summary))
        return summary
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
