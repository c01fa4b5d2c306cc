"""The shared layer forward equals fairseq's own; ALiBi and joint attention against references."""

import math

import pytest
import torch

from conftest import lm_args, setup_stream_task
from fairseq.models.transformer_lm import TransformerLanguageModel, transformer_lm_gpt2_tiny
from fairseq_longmem.models.alibi_lm import AlibiLanguageModel, alibi_lm_tiny
from fairseq_longmem.modules.decoder_layer import alibi_bias, alibi_slopes, decoder_forward
from fairseq_longmem.modules.joint_attention import (
    gate_mix,
    local_attention,
    memory_attention,
)
from references import reference_joint_attention


@pytest.mark.parametrize(
    "normalize_before, learned_pos",
    [(True, True), (False, False), (True, False), (False, True)],
)
def test_forward_equals_fairseq_transformer_lm(tiny_data, normalize_before, learned_pos):
    task = setup_stream_task(tiny_data)
    args = lm_args(decoder_normalize_before=normalize_before, decoder_learned_pos=learned_pos)
    transformer_lm_gpt2_tiny(args)
    torch.manual_seed(0)
    model = TransformerLanguageModel.build_model(args, task).eval()
    tokens = torch.randint(4, 900, (2, 17))
    with torch.no_grad():
        ref = model(tokens)[0]
        _, feats, _ = decoder_forward(model.decoder, tokens)
        got = model.decoder.output_layer(feats)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_alibi_lm_matches_slow_reference(tiny_data):
    task = setup_stream_task(tiny_data)
    args = lm_args()
    alibi_lm_tiny(args)
    torch.manual_seed(0)
    model = AlibiLanguageModel.build_model(args, task).eval()
    assert model.decoder.embed_positions is None
    tokens = torch.randint(4, 900, (1, 9))
    layer = model.decoder.layers[0]
    x = model.decoder.embed_scale * model.decoder.embed_tokens(tokens)
    h = layer.self_attn.num_heads
    d = layer.self_attn.head_dim
    # slow reference of one pre-norm ALiBi attention block
    y = layer.self_attn_layer_norm(x)
    q = layer.self_attn.q_proj(y).view(9, h, d)
    k = layer.self_attn.k_proj(y).view(9, h, d)
    v = layer.self_attn.v_proj(y).view(9, h, d)
    slopes = alibi_slopes(h)
    out = torch.zeros(9, h, d)
    for i in range(9):
        for hh in range(h):
            s = torch.stack([q[i, hh] @ k[j, hh] / math.sqrt(d) - slopes[hh] * (i - j) for j in range(i + 1)])
            out[i, hh] = torch.softmax(s, 0) @ v[: i + 1, hh]
    ref = x + layer.self_attn.out_proj(out.reshape(1, 9, h * d))
    with torch.no_grad():
        bias = alibi_bias(slopes, 9)
        qb, kb, vb = (t.view(1, 9, h, d).transpose(1, 2) for t in (q, k, v))
        got = x + layer.self_attn.out_proj(
            local_attention(qb, kb, vb, bias).transpose(1, 2).reshape(1, 9, h * d)
        )
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)


def test_alibi_slopes_known_values():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(12).shape == (12,)


@pytest.mark.parametrize("with_bias", [False, True])
def test_joint_attention_matches_loop_reference(with_bias):
    torch.manual_seed(0)
    b, h, t, d, k = 2, 3, 5, 8, 4
    q, kk, v = (torch.randn(b, h, t, d) for _ in range(3))
    mem_k, mem_v = torch.randn(b, h, t, k, d), torch.randn(b, h, t, k, d)
    mask = torch.rand(b, h, t, k) > 0.3
    mask[0, 0, 0] = False  # a query with no memory at all
    gate = torch.randn(h)
    bias = alibi_bias(alibi_slopes(h), t) if with_bias else None
    local = local_attention(q, kk, v, bias)
    mem, has = memory_attention(q, mem_k, mem_v, mask)
    got = gate_mix(local, mem, gate, has)
    ref = reference_joint_attention(q, kk, v, mem_k, mem_v, mask, gate, bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, 0, 0], local[0, 0, 0])
