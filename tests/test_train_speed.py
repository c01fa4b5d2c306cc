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
        assert r["fused_search_calls"] == 0  # CPU: the bank searched without the kernel
    # the memory was full when the timed steps ran
    assert all(f >= 512 for f in r["memory_fill_tokens"])
    assert r["flops_per_token"] > r["no_memory"]["flops_per_token"]
    assert "memory on" in stdout and "memory off" in stdout
    # the profiler's breakdown of the memory's time: every part measured, and
    # the parts plus "other" add up to the difference of the profiled steps
    b = r["breakdown"]
    parts = b["parts_ms"]
    assert set(parts) == {"search", "gather", "retrieve_other", "attention_fwd",
                          "attention_bwd", "write", "other"}
    for name in ("search", "gather", "attention_fwd", "attention_bwd", "write"):
        assert finite(parts[name]) and parts[name] > 0, (name, parts[name])
    assert math.isclose(sum(parts.values()), b["memory_ms"], rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(b["memory_ms"], b["step_ms"] - b["no_memory_step_ms"], rel_tol=1e-6)
    assert "chunk search" in stdout and "memory attention" in stdout


def test_interleaved_rounds_and_median_ratio(tmp_path):
    r, stdout = run_script(tmp_path, "--tiny", "--steps", "1", "--warmup", "1", "--repeats", "3",
                           "--profile-steps", "0")
    rounds = r["rounds"]
    assert len(rounds["overhead_ratio"]) == 3 and rounds["steps_per_round"] == 1
    ratios = [a / b for a, b in zip(rounds["step_ms"], rounds["no_memory_step_ms"])]
    assert r["memory_overhead_ratio"] == pytest.approx(sorted(ratios)[1])
    assert r["breakdown"] is None and "median of 3 interleaved rounds" in stdout


def test_quickstart_preset_has_the_quickstarts_shapes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import train_speed

    a = train_speed.parse_args(["--preset", "quickstart"])
    got = {k: getattr(a, k) for k in ("layers", "dim", "heads", "ffn", "batch_size",
                                      "tokens_per_sample", "memory_size", "k", "chunk_size",
                                      "retrieval_layer", "reduction", "dtype", "threads",
                                      "device", "dropout")}
    assert got == dict(layers=4, dim=256, heads=8, ffn=1024, batch_size=8, tokens_per_sample=128,
                       memory_size=8192, k=32, chunk_size=4, retrieval_layer=3, reduction=2,
                       dtype="fp32", threads=2, device="cpu", dropout=0.0)
    assert a.repeats > 1  # interleaved rounds
    # the quickstart's own defaults (examples/quickstart/quickstart.py)
    sys.path.insert(0, os.path.join(ROOT, "examples", "quickstart"))
    import quickstart

    qs = quickstart.parse_args([])
    assert (qs.tokens_per_sample, qs.batch_size, qs.memory_size, qs.k, qs.chunk_size,
            qs.retrieval_layer_index) == (128, 8, 8192, 32, 4, 3)
    assert (qs.arch, qs.backbone_arch) == ("longmem_small", "alibi_lm_small")
    # an explicit flag overrides the preset
    assert train_speed.parse_args(["--preset", "quickstart", "--threads", "1"]).threads == 1


def test_memory_never_holds_two_copies_of_a_segment():
    """The benchmark's batches cycle distinct segments, more than the memory holds:
    a memory of repeated segments makes every search a run of exact ties."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    import train_speed

    a = train_speed.parse_args(["--preset", "quickstart"])
    t = train_speed.Trainer(torch.nn.Linear(2, 2), a, torch.device("cpu"))
    n = t.data.size(0)
    assert n * a.tokens_per_sample > a.memory_size
    segs = [t.batch()[0] for _ in range(n + 1)]
    assert torch.equal(segs[0], segs[n])  # cycled
    assert all(not torch.equal(segs[i], segs[j]) for i in range(n) for j in range(i))


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


def test_reference_step_beside_the_projects(tmp_path):
    """--reference: a plain-PyTorch step of the same shapes timed in the same rounds;
    --op-profile: top operators of one no-memory and one reference step."""
    r, stdout = run_script(tmp_path, "--tiny", "--steps", "1", "--warmup", "1", "--repeats", "2",
                           "--profile-steps", "0", "--reference", "--op-profile")
    ref = r["reference"]
    for key in ("step_ms", "tokens_per_s", "flops_per_token", "mfu", "peak_memory_bytes", "loss"):
        assert finite(ref[key]) and ref[key] > 0, (key, ref[key])
    assert len(ref["rounds_step_ms"]) == 2
    assert r["no_memory_vs_reference"] == pytest.approx(r["no_memory"]["step_ms"] / ref["step_ms"])
    # same shapes: same layer parameters (so same FLOPs), same trainable parameters but the
    # project's memory gate (one logit per head)
    assert ref["flops_per_token"] == r["no_memory"]["flops_per_token"]
    assert r["trainable_params"] - ref["trainable_params"] == 4
    assert 3 < ref["loss"] < 12  # ~ln(1000) at random init
    assert "aten::" in r["op_profile"]["no_memory"] and "aten::" in r["op_profile"]["reference"]
    assert "reference :" in stdout and "top operators, one reference step" in stdout
    assert r["flex_attention_available"] is False and r["flex_attention_calls_per_step"] == 0


def test_reference_model_structure():
    """Frozen backbone in eval mode, gradients in the side only, and the cross-network
    residual: with every side block the identity the side ends at the backbone's h^L."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks.reference_step import ReferenceModel

    torch.manual_seed(0)
    m = ReferenceModel(vocab=50, dim=16, heads=2, ffn=32, layers=4, reduction=2, dropout=0.1)
    m.train()
    assert not m.backbone[0].training and m.side[0].training
    tokens = torch.randint(0, 50, (2, 7))
    m(tokens).sum().backward()
    assert all(p.grad is None for p in m.backbone.parameters()) and m.embed.weight.grad is None
    assert all(p.grad is not None for p in m.side.parameters())
    for block in m.side:  # identity blocks: zero output projections
        for lin in (block.proj, block.fc2):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    with torch.no_grad():
        x = m.embed_scale * m.embed(tokens)
        for block in m.backbone:
            x = block(x)
        want = torch.nn.functional.linear(m.side_norm(x), m.embed.weight)
        torch.testing.assert_close(m(tokens), want, rtol=1e-5, atol=1e-5)
