"""benchmarks/alibi_attention_bench.py on CPU: every variant runs and the ALiBi ones agree
with fp32 math (SDPA with the bias, eager FlexAttention with the score_mod)."""

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import alibi_attention_bench as bench  # noqa: E402
from fairseq_longmem.modules import flex_alibi  # noqa: E402


def test_tiny_bench_outputs_agree(tmp_path, capsys):
    out = tmp_path / "attn.json"
    r = bench.main(["--tiny", "--iters", "1", "--warmup", "0", "--out", str(out)])
    assert out.exists()
    rows = {row["name"]: row for row in r["results"]}
    expected = {"sdpa_causal", "sdpa_bias", "local_attention"}
    if flex_alibi.HAS_FLEX:
        expected |= {"flex_alibi", "flex_causal"}
    assert set(rows) == expected
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["max_abs_err"] < 1e-5, row
        assert row["fwd_ms"] > 0 and math.isfinite(row["fwd_tflops"])
    for name in ("sdpa_causal", "sdpa_bias", "local_attention"):
        assert rows[name]["fwd_bwd_ms"] > 0
    if flex_alibi.HAS_FLEX:
        assert rows["flex_alibi"]["fwd_bwd_ms"] is None  # no flex backward on CPU
    assert r["flex_attention_available"] is False
    table = capsys.readouterr().out
    assert "| flex_alibi" in table or not flex_alibi.HAS_FLEX
    assert "max abs err" in table


def test_bias_matters_for_the_check():
    """The error column can fail: SDPA without the bias is far from ALiBi's truth."""
    import torch

    from fairseq_longmem.modules.decoder_layer import alibi_bias, alibi_slopes

    q, k, v = [torch.randn(1, 4, 32, 8) for _ in range(3)]
    bias = alibi_bias(alibi_slopes(4), 32)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (plain - bench.truth(q, k, v, bias)).abs().max() > 1e-2
