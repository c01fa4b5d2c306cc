"""The data path at the paper's scale: memory, start-up and speed of one rank.

Builds a synthetic binarized split in fairseq's own memory-mapped format
(uint16 ``train.bin``, ``train.idx`` written by fairseq's index writer layout;
documents of log-normal length around ``--doc-tokens``, lines of ~128 tokens,
an empty line between documents), then for each of ``--ranks`` simulated ranks
runs, in a fresh process, the task exactly as fairseq-train does
(``setup_task``, ``load_dataset("train", combine=True)``, ``get_batch_iterator``
with ``num_shards=ranks``) and reports:

* peak resident memory from the load to the ``--batches``-th batch, above the
  process's resident memory with fairseq and the plugin imported (target: <= 400 MB);
* time from the load to the first batch (target: <= 10 s), for the first rank
  (which scans the index and writes the cache beside the data) and the others;
* batches per second of the data path alone (batch iterator + collater) at
  ``--bsz`` x ``--tokens-per-sample`` (target: >= 500/s on one core).

The token values are a repeated random pattern (the figures do not depend on
them); every file is real and read through the same code as training.
The data is deleted afterwards unless ``--keep``.

    python benchmarks/data_scale.py                  # 2.1B tokens (4.2 GB), 8 ranks
    python benchmarks/data_scale.py --quick          # seconds (tests)
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EOS = 2
VOCAB = 50000


def build_split(root: Path, tokens: int, doc_tokens: int, line_tokens: int, seed: int = 0) -> dict:
    """``root/train.{bin,idx}`` + ``dict.txt``: about ``tokens`` tokens, uint16."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    # documents: log-normal lengths with median doc_tokens
    n_docs = int(1.5 * tokens / (doc_tokens * np.exp(0.5))) + 10  # mean = median * e^0.5
    doc_len = np.maximum(2, rng.lognormal(np.log(doc_tokens), 1.0, size=n_docs)).astype(np.int64)
    while doc_len.sum() < tokens:
        doc_len = np.append(doc_len, doc_len)
    doc_len = doc_len[: int(np.searchsorted(np.cumsum(doc_len), tokens)) + 1]
    # lines of every document: sizes >= 2 (a size-1 item is an empty line)
    n_lines = np.maximum(1, doc_len // line_tokens)
    sizes = np.full(int(n_lines.sum()), line_tokens, dtype=np.int64)
    last = np.cumsum(n_lines) - 1
    sizes[last] += doc_len - n_lines * line_tokens  # the remainder goes to the last line
    # an empty line after every document but the last
    item_sizes = np.insert(sizes, last[:-1] + 1, 1).astype(np.int32)
    total = int(item_sizes.astype(np.int64).sum())
    with open(root / "train.idx", "wb") as f:  # fairseq MMapIndexedDataset.Index layout
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 8))  # uint16
        f.write(struct.pack("<Q", len(item_sizes)))
        f.write(item_sizes.tobytes(order="C"))
        pointers = np.cumsum(item_sizes, dtype=np.int64) * 2
        pointers = np.concatenate([[0], pointers[:-1]])
        f.write(pointers.tobytes(order="C"))
        del pointers
    block = rng.randint(4, VOCAB, size=1 << 24).astype(np.uint16)  # 32 MB pattern
    with open(root / "train.bin", "wb") as f:
        left = total
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n].tobytes())
            left -= n
    # the separators hold </s>
    sep_items = np.flatnonzero(item_sizes == 1)
    item_pos = np.cumsum(item_sizes, dtype=np.int64) - item_sizes
    sep_pos = item_pos[sep_items]
    del item_pos
    if len(sep_pos):
        mm = np.memmap(root / "train.bin", dtype=np.uint16, mode="r+")
        mm[sep_pos] = EOS
        mm.flush()
        del mm
    with open(root / "dict.txt", "w") as f:
        for i in range(4, VOCAB):
            f.write(f"w{i} 1\n")
    return {"tokens": total, "documents": int(len(doc_len)), "lines": int(len(sizes)),
            "bin_bytes": os.path.getsize(root / "train.bin"),
            "idx_bytes": os.path.getsize(root / "train.idx")}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rank_worker(args) -> dict:
    """One rank, in its own process: load -> first batch -> ``--batches`` batches."""
    t_start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import fairseq  # noqa: F401
    import fairseq_longmem  # noqa: F401
    from fairseq_longmem.tasks.longmem_language_modeling import (
        LongMemLanguageModelingConfig, LongMemLanguageModelingTask)

    idle = _status_mb("VmRSS")
    try:  # peak from here on (Linux >= 4.0); else the peak includes the imports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    cfg = LongMemLanguageModelingConfig(data=args.data, tokens_per_sample=args.tokens_per_sample)
    task = LongMemLanguageModelingTask.setup_task(cfg)
    task.load_dataset("train", combine=True)
    itr = task.get_batch_iterator(task.dataset("train"), max_sentences=args.bsz,
                                  num_shards=args.ranks, shard_id=args.rank)
    it = itr.next_epoch_itr(shuffle=False)
    first = next(it)
    t_first = time.perf_counter()
    ntok = first["ntokens"]
    for _ in range(args.batches - 1):
        ntok += next(it)["ntokens"]
    out = {
        "rank": args.rank,
        "idle_rss_mb": round(idle, 1),
        "peak_rss_above_idle_mb": round(_status_mb("VmHWM") - idle, 1),
        "load_to_first_batch_s": round(t_first - t0, 3),
        "start_to_first_batch_s": round(t_first - t_start, 3),
        "documents": int(task.dataset("train").num_documents),
        "batches_read": args.batches, "target_tokens_read": int(ntok),
        "batches_per_epoch": len(itr),
    }
    if args.speed_batches:
        it = itr.next_epoch_itr(shuffle=False)
        t = time.perf_counter()
        n = 0
        for _ in it:
            n += 1
            if n == args.speed_batches:
                break
        out["batches_per_s"] = round(n / (time.perf_counter() - t), 1)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2_100_000_000)
    p.add_argument("--doc-tokens", type=int, default=50_000, help="median document length")
    p.add_argument("--line-tokens", type=int, default=128)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--bsz", type=int, default=8)
    p.add_argument("--tokens-per-sample", type=int, default=1024)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--speed-batches", type=int, default=3000)
    p.add_argument("--workdir", default=None, help="where to build the split (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the split afterwards")
    p.add_argument("--quick", action="store_true", help="a small split, 2 ranks (tests)")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_worker:
        out = rank_worker(args)
        print(json.dumps(out))
        return out
    if args.quick:
        args.tokens, args.doc_tokens, args.ranks = 30_000_000, 20_000, 2
        args.batches, args.speed_batches = 20, 200
    work = Path(args.workdir or tempfile.mkdtemp(prefix="longmem_data_scale_"))
    data = work / "data-bin"
    try:
        t = time.perf_counter()
        built = build_split(data, args.tokens, args.doc_tokens, args.line_tokens)
        built["build_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({"split": built}), flush=True)
        ranks = []
        for r in range(args.ranks):
            cmd = [sys.executable, __file__, "--rank-worker", "--data", str(data),
                   "--rank", str(r), "--ranks", str(args.ranks), "--bsz", str(args.bsz),
                   "--tokens-per-sample", str(args.tokens_per_sample),
                   "--batches", str(args.batches),
                   "--speed-batches", str(args.speed_batches if r in (0, args.ranks - 1) else 0)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"error: rank {r} failed:\n{proc.stderr[-3000:]}")
            ranks.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(ranks[-1]), flush=True)
        others = ranks[1:] or ranks
        summary = {
            "tokens": built["tokens"], "documents": built["documents"], "ranks": args.ranks,
            "batch": f"{args.bsz} x {args.tokens_per_sample}",
            "peak_rss_above_idle_mb_max": max(r["peak_rss_above_idle_mb"] for r in ranks),
            "first_batch_s_first_rank_cold_cache": ranks[0]["load_to_first_batch_s"],
            "first_batch_s_other_ranks_max": max(r["load_to_first_batch_s"] for r in others),
            "batches_per_s_min": min(r["batches_per_s"] for r in ranks if "batches_per_s" in r),
            "batches_per_epoch": ranks[0]["batches_per_epoch"],
        }
        print(json.dumps({"summary": summary}), flush=True)
        return summary
    finally:
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
