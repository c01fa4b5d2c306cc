"""benchmarks/train_speed.py: the --tiny CPU run and the FLOPs formula."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_speed.py")


def run_script(tmp_path, *flags):
    out = tmp_path / "speed.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, SCRIPT, *flags, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.parametrize("search", ["torch", "fused"])
def test_tiny_run_reports_every_field(tmp_path, search):
    r, stdout = run_script(tmp_path, "--tiny", "--steps", "2", "--warmup", "1", "--search", search)
    for key in ("step_ms", "tokens_per_s", "flops_per_token", "mfu", "write_ms", "retrieval_ms",
                "write_share", "retrieval_share", "peak_memory_bytes", "memory_overhead_ratio",
                "loss", "fill_s", "build_s"):
        assert finite(r[key]), (key, r[key])
    for key in ("step_ms", "tokens_per_s", "flops_per_token", "mfu", "peak_memory_bytes", "loss"):
        assert finite(r["no_memory"][key]), (key, r["no_memory"][key])
    assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
    assert r["tokens_per_step"] == 2 * 64
    assert r["write_ms"] > 0 and r["retrieval_ms"] > 0  # the bank's calls were timed
    assert 0 < r["write_share"] < 1 and 0 < r["retrieval_share"] < 1
    assert r["search_calls_per_step"] == 1  # one memory-augmented layer
    assert r["syncs_in_step"] is None  # CPU: not measured
    assert r["search_impl"] == "torch"  # no Triton on CPU: the fallback ran
    if search == "fused":
        assert r["fused_search_calls"] > 0  # the monkeypatch reached the bank
    # the memory was full when the timed steps ran
    assert all(f >= 512 for f in r["memory_fill_tokens"])
    assert r["flops_per_token"] > r["no_memory"]["flops_per_token"]
    assert "memory on" in stdout and "memory off" in stdout


def test_flops_formula_at_paper_shapes(tmp_path):
    r, _ = run_script(tmp_path, "--flops-only")
    f = r["flops_breakdown"]
    d, f_dim, t, v, k = 1024, 4096, 1024, 50257, 64
    layer = 4 * d * d + 2 * d * f_dim + 9 * d + f_dim  # q,k,v,o, fc1, fc2, biases, 2 norms
    assert f["backbone_layer_params"] == 24 * layer
    assert f["side_layer_params"] == 12 * layer
    assert f["backbone_fwd"] == 2 * 24 * layer + 4 * 24 * t * d
    assert f["side_fwd_bwd"] == 6 * 12 * layer + 12 * 12 * t * d
    assert f["memory_attention"] == 12 * k * d
    assert f["lm_head"] == 4 * v * d
    assert f["search_flops_per_token"] == 2 * (65536 // 4) * d
    assert r["flops_per_token"] == f["total"] == sum(
        f[x] for x in ("backbone_fwd", "side_fwd_bwd", "memory_attention", "lm_head")
    )
    assert 1.9e9 < r["flops_per_token"] < 2.0e9
