"""benchmarks/memory_bench.py --quick runs in seconds and writes the documented JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROW_FIELDS = {
    "backend", "size", "dtype", "device", "measured", "scale", "raw_s", "write_10pct_s",
    "write_full_s", "write_ratio", "search_10pct_s", "search_full_s", "select_full_s",
    "recall_at_k", "bytes_per_token", "wall_s",
}


def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_bench", "--quick", "--threads", "1",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| backend | size |" in proc.stdout  # the table
    data = json.loads(out.read_text())
    assert data["config"]["quick"] is True
    assert {"paper_shape", "sizes", "dtypes", "backends", "budgets", "threads"} <= set(data["config"])
    assert "scaled" in data["subsampling"]
    rows = data["results"]
    assert {r["backend"] for r in rows} == {"torch", "faiss-flat", "faiss-ivf", "faiss-hnsw", "original"}
    assert {r["dtype"] for r in rows} == {"fp16", "fp32"}
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert {"streams", "heads", "queries"} == set(r["measured"])
        assert r["write_10pct_s"] > 0 and r["write_full_s"] > 0 and r["search_full_s"] > 0
        assert 0.0 <= r["recall_at_k"] <= 1.0 and r["bytes_per_token"] > 0
        if r["backend"] in ("torch", "faiss-flat", "original"):
            assert r["recall_at_k"] == 1.0
    t = data["targets"]
    assert {"write_full_over_10pct", "torch_search_vs_original_flat_loop",
            "approx_recall_at_largest"} <= set(t)
    assert set(t["write_full_over_10pct"]["ratios"]) == {
        "torch", "faiss-flat", "faiss-ivf", "faiss-hnsw", "original"}
