"""Memory-bank benchmark: every backend and the original LongMem scheme.

Measures, per memory size (tokens per stream) and storage dtype, at the paper's
shapes (16 heads x head_dim 64, chunk 4, k 64, segments of 1024 tokens, 8
streams):

* time to write one segment with the memory 10% full and full (evicting);
* time to search one segment (1024 queries x 16 heads x 8 streams), and the
  part of it that chooses chunks (``select``; the rest gathers k pairs/query);
* recall@k of the retrieved chunk sets against exact search on the same data;
* bytes per stored token (ring, chunk keys and index, per stream-token, all heads).

The ORIGINAL scheme is re-implemented here as the baseline, as in the authors'
code: one ``faiss.IndexFlatIP`` per head over the chunk keys of all rows
(shared: ``--memory-size`` tokens in total, so a query scans as many chunks as
one of our rows holds), key/value stores per head; once full, every other write
calls ``remove_ids`` of the oldest ``2 x segment`` chunks on every index and
shifts the stores with ``torch.cat`` (cost grows with the memory). It runs on
CPU (faiss-cpu): its GPU->CPU->GPU index copies are not simulated.

Large configurations are SUBSAMPLED (fewer streams, heads or queries, chosen by
the budgets below and printed per row) and times are scaled linearly to the
paper's shape: write x (8 x 16) / (streams x heads), search x (8 x 16 x 1024) /
(streams x heads x queries). Every cost measured here is a sum of independent
per-(stream, head) or per-query work, so the scaling is linear by construction
(the batched torch kernels may do somewhat better at full size). Raw measured
times are in the JSON.

Usage::

    python -m benchmarks.memory_bench                   # default sizes, CPU, minutes
    python -m benchmarks.memory_bench --quick --out q.json   # seconds (tests)
    python -m benchmarks.memory_bench --device cuda --backends torch,original
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import faiss  # noqa: E402


def _import_memory_modules():
    """The memory modules import nothing from fairseq; when fairseq is missing
    (a bare GPU box) load them without the plugin's package ``__init__``."""
    try:
        import fairseq_longmem  # noqa: F401  (registers the plugin; needs fairseq)
    except ImportError:
        import types

        for name, path in (("fairseq_longmem", REPO / "fairseq_longmem"),
                           ("fairseq_longmem.modules", REPO / "fairseq_longmem" / "modules")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub


_import_memory_modules()
from fairseq_longmem.modules.memory_bank import chunk_validity, resolve_dtype  # noqa: E402
from fairseq_longmem.modules.memory_factory import build_memory  # noqa: E402
from fairseq_longmem.modules.memory_spec import MemorySpec  # noqa: E402

DEFAULT_SIZES = [4096, 16384, 65536, 262144, 1048576]
ALL_BACKENDS = ["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw", "original"]
INDEXED = ("faiss-ivf", "faiss-hnsw")
GiB = 1 << 30


# ------------------------------------------------------------------ data
class KeyStream:
    """Synthetic attention keys/values.

    ``clustered`` (default): per head, 1024 random centres; every stream
    stays on a centre for runs of ~16 tokens (a "topic"), key = centre + noise
    (sd 0.5 per dim): structured like real keys, where approximate indexes work.
    ``gaussian``: iid N(0, 1), the hardest case for an index (no structure).
    """

    def __init__(self, kind: str, heads: int, d: int, seed: int, device):
        self.kind, self.heads, self.d, self.device = kind, heads, d, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.centres = torch.randn(heads, 1024, d, generator=self.gen, device=device)

    def take(self, streams: int, tokens: int, dtype) -> torch.Tensor:
        g, h, d, dev = self.gen, self.heads, self.d, self.device
        if self.kind == "gaussian":
            x = torch.randn(streams, h, tokens, d, generator=g, device=dev)
        else:
            switch = torch.rand(streams, tokens, generator=g, device=dev) < 1 / 16
            run = torch.cumsum(switch, 1)
            topic = torch.randint(0, 1024, (streams, tokens + 1), generator=g, device=dev)
            topic = topic.gather(1, run)
            x = self.centres[:, topic].permute(1, 0, 2, 3)  # (streams, h, tokens, d)
            x = x + 0.5 * torch.randn(streams, h, tokens, d, generator=g, device=dev)
        return x.to(dtype=dtype)


# ------------------------------------------------------------------ original
class OriginalScheme:
    """The authors' memory (see module doc): shared per-head IndexFlatIP + stores."""

    backend = "original"

    def __init__(self, heads, d, memory_size, chunk, dtype, k):
        self.heads, self.d, self.chunk, self.dtype, self.k = heads, d, chunk, dtype, k
        self.num_chunks = memory_size // chunk
        self.index = [faiss.IndexFlatIP(d) for _ in range(heads)]
        self.keys = [torch.zeros(self.num_chunks, chunk, d, dtype=dtype) for _ in range(heads)]
        self.vals = [torch.zeros(self.num_chunks, chunk, d, dtype=dtype) for _ in range(heads)]
        self.dstore_idx = 0
        self.evictions = 0

    def write(self, keys, values):
        """keys, values: (bsz, heads, seg, d), rows appended one after another."""
        bsz, heads, seg, d = keys.shape
        n_new = bsz * seg // self.chunk
        if self.dstore_idx + n_new >= self.num_chunks:
            update = min(2 * n_new, self.dstore_idx)
            self.dstore_idx -= update
            self.evictions += 1
            ids = np.arange(update, dtype=np.int64)
            for index in self.index:
                index.remove_ids(ids)
            zeros = torch.zeros(update, self.chunk, d, dtype=self.dtype)
            self.keys = [torch.cat((kh[update:], zeros)) for kh in self.keys]
            self.vals = [torch.cat((vh[update:], zeros)) for vh in self.vals]
        kc = keys.to(self.dtype).permute(1, 0, 2, 3).reshape(heads, n_new, self.chunk, d)
        vc = values.to(self.dtype).permute(1, 0, 2, 3).reshape(heads, n_new, self.chunk, d)
        lo, hi = self.dstore_idx, self.dstore_idx + n_new
        for h in range(heads):
            self.index[h].add(np.ascontiguousarray(kc[h].float().mean(1).numpy()))
            self.keys[h][lo:hi] = kc[h]
            self.vals[h][lo:hi] = vc[h]
        self.dstore_idx = hi

    def select(self, queries):
        """queries (bsz, heads, tgt, d) -> per head (bsz*tgt, k/c) chunk ids."""
        bsz, heads, tgt, d = queries.shape
        q = queries.float().permute(1, 0, 2, 3).reshape(heads, bsz * tgt, d).numpy()
        return [self.index[h].search(np.ascontiguousarray(q[h]), self.k // self.chunk)[1]
                for h in range(heads)]

    def search(self, queries):
        bsz, heads, tgt, d = queries.shape
        found = self.select(queries)
        out_k = [self.keys[h][torch.from_numpy(found[h]).clamp(min=0)].view(bsz * tgt, self.k, d)
                 for h in range(heads)]
        out_v = [self.vals[h][torch.from_numpy(found[h]).clamp(min=0)].view(bsz * tgt, self.k, d)
                 for h in range(heads)]
        return torch.stack(out_k, 1), torch.stack(out_v, 1)

    def bytes_per_token(self, memory_size, streams):
        """Stores + index, per stored token (the memory holds memory_size tokens)."""
        esize = torch.finfo(self.dtype).bits // 8
        per_head = self.num_chunks * self.chunk * self.d * esize * 2 + self.num_chunks * self.d * 4
        return per_head * self.heads / memory_size


# ------------------------------------------------------------------ helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps=1):
    times = []
    out = None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def plan(backend, size, dtype, a, device):
    """Streams/heads/queries actually measured (subsampling) for one configuration."""
    esize = torch.finfo(dtype).bits // 8
    chunks = size // a.chunk
    token_heads = a.ring_budget_gb * GiB / (a.head_dim * esize * 2)  # ring: keys + values
    sh = min(a.streams * a.heads, max(1, int(token_heads // size)))
    if backend in INDEXED:
        budget = a.hnsw_budget if backend == "faiss-hnsw" else a.ivf_budget
        sh = min(sh, max(1, budget // chunks))
    heads = min(a.heads, sh)
    streams = max(1, min(a.streams, sh // heads))
    if backend == "original":
        streams = a.streams  # one shared index of `size` tokens per head: heads alone limit it
        heads = min(a.heads, max(1, int(token_heads // size)))
    scan = a.scan_budget // max(1, streams * heads * chunks)
    gathered = a.gather_budget // max(1, streams * heads * a.k * a.head_dim)
    queries = max(min(a.segment, a.min_queries), min(a.segment, scan, gathered))
    return streams, heads, queries


def bank_bytes_per_token(bank) -> float:
    """Ring (keys, values, chunk keys) + index structures, per stream token."""
    total = sum(t.numel() * t.element_size() for t in (bank.keys, bank.values, bank.chunk_keys))
    name = bank.backend
    if name == "faiss-flat" and bank._mirror is not None:
        total += bank._mirror.nbytes
    elif name == "faiss-ivf":
        for row in bank._index:
            for index in row:
                if index is not None:  # codes + ids (+ hash map ~ 2 words/entry) + centroids
                    total += index.ntotal * (bank.head_dim * 4 + 8 + 16) + index.nlist * bank.head_dim * 4
    elif name == "faiss-hnsw":
        for row in bank._index:
            for head in row:
                for index in head:
                    if index is not None and index.ntotal:
                        total += faiss.serialize_index(index).nbytes
    return total / (bank.num_streams * bank.memory_size)


def fill(target_tokens, write, keys_src, streams, piece, dtype):
    """Write until `target_tokens` tokens per stream have been written."""
    done = 0
    while done < target_tokens:
        n = min(piece, target_tokens - done)
        kv = keys_src.take(streams, n, dtype)
        write(kv, kv)
        done += n


def recall_of(got_logical: torch.Tensor, exact_logical: torch.Tensor) -> float:
    """Mean |retrieved & exact| / |exact| over query-heads with a full exact set."""
    full = (exact_logical >= 0).all(-1)
    hit = (got_logical.unsqueeze(-1) == exact_logical.unsqueeze(-2)).any(-1) & (exact_logical >= 0)
    per = hit.float().sum(-1) / (exact_logical >= 0).float().sum(-1).clamp(min=1)
    return float(per[full].mean()) if full.any() else float("nan")


# ------------------------------------------------------------------ one run
def run_one(backend, size, dtype_name, a, device):
    dtype = resolve_dtype(dtype_name)
    streams, heads, queries = plan(backend, size, dtype, a, device)
    bank_device = device if backend == "torch" else torch.device("cpu")
    src = KeyStream(a.data, heads, a.head_dim, seed=a.seed, device=bank_device)
    qsrc = KeyStream(a.data, heads, a.head_dim, seed=a.seed, device=bank_device)
    qsrc.gen.manual_seed(a.seed + 1)
    row = {
        "backend": backend, "size": size, "dtype": dtype_name,
        "device": str(bank_device),
        "measured": {"streams": streams, "heads": heads, "queries": queries},
    }
    write_scale = (a.streams * a.heads) / (streams * heads)
    search_scale = (a.streams * a.heads * a.segment) / (streams * heads * queries)
    row["scale"] = {"write": write_scale, "search": search_scale}
    t_start = time.perf_counter()
    if backend == "original":
        bank = OriginalScheme(heads, a.head_dim, size, a.chunk, dtype, a.k)
        write = bank.write
    else:
        spec = MemorySpec(
            memory_size=size, chunk_size=a.chunk, k=a.k, backend=backend,
            ivf_nlist=a.ivf_nlist, ivf_nprobe=a.ivf_nprobe, hnsw_m=a.hnsw_m,
            hnsw_ef_search=a.hnsw_ef_search, hnsw_ef_construction=a.hnsw_ef_construction,
            hnsw_blocks=a.hnsw_blocks,
        )
        bank = build_memory(spec, streams, heads, a.head_dim, dtype, bank_device)
        write = bank.write
    piece = max(a.segment, min(65536, (1 << 24) // (streams * heads * a.head_dim) // a.segment * a.segment))
    if backend == "original":
        # its FIFO frees 2 writes' worth at a time: fill in writes of <= 1/4 memory
        piece = max(a.segment, size // (4 * streams) // a.segment * a.segment)
    seg = lambda: src.take(streams, a.segment, dtype)  # noqa: E731
    q = qsrc.take(streams, queries, dtype)
    # the original's memory is shared: `size` tokens in total over all streams
    fill_tokens = size // streams if backend == "original" else size

    def write_times(reps):
        times = []
        for _ in range(reps):
            kv = seg()
            t, _ = timed(lambda: write(kv, kv), device if backend == "torch" else torch.device("cpu"))
            times.append(t)
        return times

    def search_time(select=True):
        ts = None
        if backend == "original":
            t, _ = timed(lambda: bank.search(q), torch.device("cpu"), a.search_reps)
            if select:
                ts, _ = timed(lambda: bank.select(q), torch.device("cpu"), a.search_reps)
            return t, ts, None
        dev = bank.device
        t, got = timed(lambda: bank.search(q, a.k), dev, a.search_reps)
        if select:
            valid, _ = chunk_validity(bank.total, bank.num_chunks, bank.chunk_size)
            ts, _ = timed(lambda: bank._select_chunks(q, a.k // a.chunk, valid, None), dev,
                          a.search_reps)
        return t, ts, got

    if backend == "faiss-ivf":
        # train every stream's quantizers first (they survive resets), so that
        # both fills time a maintained index, not the exact pre-training phase
        fill(fill_tokens, write, src, streams, piece, dtype)
        bank.reset()
    # 10% full (one untimed warm-up write first)
    fill(int(0.1 * fill_tokens) - 2 * a.segment, write, src, streams, piece, dtype)
    write_times(1)
    w10 = write_times(a.write_reps)
    s10, _, _ = search_time(select=False)
    # full (writes now evict); the original: bulk to 60%, then segment writes,
    # so that its FIFO reaches the steady state of per-segment evictions
    if backend == "original":
        bulk = int(0.6 * fill_tokens) // a.segment * a.segment
        fill(bulk, write, src, streams, piece, dtype)
        fill(fill_tokens + a.segment - bulk, write, src, streams, a.segment, dtype)
    else:
        fill(fill_tokens + a.segment, write, src, streams, piece, dtype)
    evicted = getattr(bank, "evictions", 0)
    wfull = write_times(max(a.write_reps, 2 if backend == "original" else 1))
    if backend == "original":
        row["original_evictions_in_full_writes"] = bank.evictions - evicted
    sfull, selfull, got = search_time()
    row["raw_s"] = {
        "write_10pct": w10, "write_full": wfull, "search_10pct": s10, "search_full": sfull,
        "select_full": selfull,
    }
    # min of the repetitions (the least disturbed: CPU machines are shared);
    # the original evicts on every other write, so its full cost is the mean
    w10m = min(w10)
    wfm = statistics.mean(wfull) if backend == "original" else min(wfull)
    row["write_10pct_s"] = w10m * write_scale
    row["write_full_s"] = wfm * write_scale
    row["write_ratio"] = wfm / w10m if w10m > 0 else float("nan")
    row["search_10pct_s"] = s10 * search_scale
    row["search_full_s"] = sfull * search_scale
    row["select_full_s"] = selfull * search_scale
    if backend == "original":
        row["bytes_per_token"] = bank.bytes_per_token(size, streams) * a.heads / heads
        row["recall_at_k"] = 1.0  # exact flat search
    else:  # per stream token, all heads of the paper shape
        row["bytes_per_token"] = bank_bytes_per_token(bank) * a.heads / heads
        if backend in INDEXED:
            exact = bank.search_exact(q, a.k)  # exact torch search, same ring
            row["recall_at_k"] = recall_of(got.chunk_logical, exact.chunk_logical)
        else:
            row["recall_at_k"] = 1.0
    row["wall_s"] = time.perf_counter() - t_start
    bank = got = None  # free the memory before the next configuration
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------ verify
def verify_device(device, a) -> dict:
    """The torch backend on `device` retrieves what it retrieves on CPU, and a
    CPU-resident bank answers queries that live on `device` (--memory-on-cpu)."""
    out = {"device": str(device)}
    for dtype_name in a.dtypes:
        dtype = resolve_dtype(dtype_name)
        banks = [build_memory(MemorySpec(4096, 4, 4), 2, 4, 32, dtype, dev)
                 for dev in (torch.device("cpu"), device)]
        gen = torch.Generator().manual_seed(0)
        for step in range(6):
            kv = torch.randn(2, 4, 1500, 32, generator=gen).to(dtype)
            start = torch.tensor([step % 5, 0])
            for bank in banks:
                bank.reset(torch.tensor([step == 3, False]))
                bank.write(kv.to(bank.device), kv.to(bank.device), start=start.to(bank.device))
        q = torch.randn(2, 4, 64, 32, generator=gen).to(dtype)
        mask = torch.rand(2, 64, generator=gen) < 0.9
        ref = banks[0].search(q, 32, mask)
        got = banks[1].search(q.to(device), 32, mask.to(device))
        same = (got.chunk_logical.cpu().sort(-1).values == ref.chunk_logical.sort(-1).values)
        cross = banks[0].search(q.to(device), 32, mask.to(device))  # CPU bank, device queries
        out[dtype_name] = {
            "same_chunks_frac": float(same.float().mean()),
            "cpu_bank_device_queries_ok": bool(
                cross.keys.device.type == "cpu"
                and torch.equal(cross.chunk_logical, ref.chunk_logical)),
        }
    print("verify:", json.dumps(out), flush=True)
    return out


# ------------------------------------------------------------------ report
def targets(rows, a):
    """The issue's targets, evaluated on what was measured (None: not measured)."""
    by = {(r["backend"], r["size"], r["dtype"]): r for r in rows}
    dt = "fp16" if "fp16" in a.dtypes else a.dtypes[0]
    out = {}
    mid = 65536 if 65536 in a.sizes else sorted(a.sizes)[len(a.sizes) // 2]
    ratios = {b: by[(b, mid, dt)]["write_ratio"] for b in ALL_BACKENDS if (b, mid, dt) in by}
    ours = {b: v for b, v in ratios.items() if b != "original"}
    out["write_full_over_10pct"] = {
        "size": mid, "dtype": dt, "target": "<= 1.2 for our backends", "ratios": ratios,
        "met": all(v <= 1.2 for v in ours.values()) if ours else None,
    }
    if (("torch", mid, dt) in by) and (("original", mid, dt) in by):
        t, o = by[("torch", mid, dt)], by[("original", mid, dt)]
        out["torch_search_vs_original_flat_loop"] = {
            "size": mid, "dtype": dt, "target": ">= 3x", "torch_device": t["device"],
            "speedup_search": o["search_full_s"] / t["search_full_s"],
            "speedup_select": o["select_full_s"] / t["select_full_s"],
            "met": o["search_full_s"] / t["search_full_s"] >= 3,
        }
    big = max(a.sizes)
    approx = {}
    for b in INDEXED:
        if (b, big, dt) in by:
            r = by[(b, big, dt)]
            entry = {"recall_at_k": r["recall_at_k"], "met": r["recall_at_k"] >= 0.95}
            for ref in ("torch", "faiss-flat"):
                if (ref, big, dt) in by:
                    entry[f"speedup_vs_{ref}"] = by[(ref, big, dt)]["search_full_s"] / r["search_full_s"]
            approx[b] = entry
    out["approx_recall_at_largest"] = {"size": big, "dtype": dt, "target": ">= 0.95", **approx}
    return out


def fmt_table(rows):
    head = ("backend", "size", "dtype", "meas SxHxQ", "write10%", "writeFull", "ratio",
            "search10%", "searchFull", "selectFull", "recall", "B/token")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        m = r["measured"]
        lines.append(" | ".join([
            r["backend"], str(r["size"]), r["dtype"], f"{m['streams']}x{m['heads']}x{m['queries']}",
            f"{r['write_10pct_s'] * 1e3:.1f} ms", f"{r['write_full_s'] * 1e3:.1f} ms",
            f"{r['write_ratio']:.2f}", f"{r['search_10pct_s']:.3f} s", f"{r['search_full_s']:.3f} s",
            f"{r['select_full_s']:.3f} s", f"{r['recall_at_k']:.3f}", f"{r['bytes_per_token']:.0f}",
        ]))
    return "\n".join("| " + line + " |" for line in lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_SIZES)
    p.add_argument("--backends", type=lambda s: s.split(","), default=ALL_BACKENDS)
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "fp32"])
    p.add_argument("--device", default="cpu", help="device of the torch backend (cpu, cuda)")
    p.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--ivf-nlist", type=int, default=1024)
    p.add_argument("--ivf-nprobe", type=int, default=32)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-ef-search", type=int, default=32)
    p.add_argument("--hnsw-ef-construction", type=int, default=40)
    p.add_argument("--hnsw-blocks", type=int, default=8)
    p.add_argument("--ring-budget-gb", type=float, default=None,
                   help="max ring (keys+values) GiB per run (default 1 on CPU, 40 on CUDA)")
    p.add_argument("--scan-budget", type=int, default=None,
                   help="max query x chunk scores per search (default 2^27 CPU, 2^40 CUDA)")
    p.add_argument("--gather-budget", type=int, default=None,
                   help="max retrieved key elements per search (default 2^27 CPU, 2^40 CUDA)")
    p.add_argument("--ivf-budget", type=int, default=1 << 18, help="max IVF entries filled")
    p.add_argument("--hnsw-budget", type=int, default=1 << 15, help="max HNSW entries filled")
    p.add_argument("--index-dtypes-max-size", type=int, default=65536,
                   help="IVF/HNSW above this size: only the first --dtypes entry (their index "
                        "is fp32 whatever the ring dtype)")
    p.add_argument("--min-queries", type=int, default=32)
    p.add_argument("--write-reps", type=int, default=5)
    p.add_argument("--search-reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true",
                   help="first check the torch backend on --device against CPU (exactness, "
                        "CPU-resident bank with device queries)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: seconds (used by the tests)")
    p.add_argument("--out", default=None, help="write the JSON here")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes = [s for s in a.sizes if s <= 2048] if a.sizes != DEFAULT_SIZES else [512, 2048]
        a.streams, a.heads, a.head_dim, a.k, a.segment = 2, 2, 16, 16, 128
        a.ivf_nlist, a.ivf_nprobe, a.hnsw_m, a.hnsw_blocks = 8, 4, 8, 4
        a.write_reps, a.min_queries = 2, 16
    cuda = a.device.startswith("cuda")
    if a.ring_budget_gb is None:
        a.ring_budget_gb = 40.0 if cuda else 1.0
    if a.gather_budget is None:
        a.gather_budget = 1 << 40 if cuda else 1 << 27
    if a.scan_budget is None:
        a.scan_budget = 1 << 40 if cuda else 1 << 27
    return a


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    device = torch.device(a.device)
    verified = verify_device(device, a) if a.verify else None
    rows = []
    t0 = time.perf_counter()
    for size in a.sizes:
        for dtype_name in a.dtypes:
            for backend in a.backends:
                if backend == "original" and size < 2 * a.streams * a.segment:
                    continue  # the original cannot hold two segments of all rows: undefined
                if backend in INDEXED and size > a.index_dtypes_max_size and dtype_name != a.dtypes[0]:
                    continue
                row = run_one(backend, size, dtype_name, a, device)
                rows.append(row)
                m = row["measured"]
                print(f"[{time.perf_counter() - t0:6.1f}s] {backend:10s} size {size:8d} {dtype_name} "
                      f"meas {m['streams']}x{m['heads']}x{m['queries']}: write10 "
                      f"{row['write_10pct_s'] * 1e3:.1f} ms full {row['write_full_s'] * 1e3:.1f} ms "
                      f"search {row['search_full_s']:.3f} s recall {row['recall_at_k']:.3f}",
                      flush=True)
    result = {
        "config": {
            "paper_shape": {"streams": a.streams, "heads": a.heads, "head_dim": a.head_dim,
                            "chunk": a.chunk, "k": a.k, "segment": a.segment},
            "sizes": a.sizes, "dtypes": a.dtypes, "backends": a.backends, "device": a.device,
            "data": a.data, "quick": a.quick,
            "ivf": {"nlist": a.ivf_nlist, "nprobe": a.ivf_nprobe},
            "hnsw": {"m": a.hnsw_m, "ef_search": a.hnsw_ef_search,
                     "ef_construction": a.hnsw_ef_construction, "blocks": a.hnsw_blocks},
            "budgets": {"ring_gb": a.ring_budget_gb, "scan": a.scan_budget,
                        "gather": a.gather_budget,
                        "ivf_entries": a.ivf_budget, "hnsw_entries": a.hnsw_budget,
                        "min_queries": a.min_queries},
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "subsampling": (
            "times are scaled to the paper shape: write x (streams*heads)/(measured streams*heads), "
            "search and select x (streams*heads*segment)/(measured streams*heads*queries); "
            "the 'measured' field of each row gives what ran. Faiss backends and the original run "
            "on CPU whatever --device. CPU search scores are computed in fp32 (fp16 storage is "
            "upcast once per search). Write 'full' for the original is the mean over consecutive "
            "writes (it evicts on every other write); every other write time is the min of "
            "--write-reps writes. faiss-ivf rows time a trained index at "
            "both fills (quantizers trained on a first full pass, kept across the reset)."
        ),
        "verify": verified,
        "results": rows,
        "targets": targets(rows, a),
        "wall_s": time.perf_counter() - t0,
    }
    print()
    print(fmt_table(rows))
    print()
    print(json.dumps(result["targets"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
