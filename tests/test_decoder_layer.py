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
    memory_attention_chunks,
)
from fairseq_longmem.modules.memory_bank import MemoryBank
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


@pytest.mark.parametrize("block_bytes", [0, 1, 3 * 4 * 8 * 4 * 4, 10**9])
def test_blocked_memory_attention_equals_gathered(block_bytes):
    """Gathering the chosen chunks a block of (stream, head) rows at a time gives the
    output and gradients of one whole gather (blocks of 1 row, of 3 rows that do
    not divide 2 x 3 rows evenly, one block), queries not contiguous as a layer makes them."""
    torch.manual_seed(0)
    b, h, t, d, c = 2, 3, 6, 4, 4
    bank = MemoryBank(b, h, d, memory_size=32, chunk_size=c)
    bank.write(torch.randn(b, h, 20, d), torch.randn(b, h, 20, d))
    q0 = torch.randn(b, t, h, d, requires_grad=True)
    q = q0.transpose(1, 2)  # (b, h, t, d), a strided view
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :2] = False  # queries that read no memory
    sel = bank.select(q.detach(), 8, mask)
    got = bank.gather(sel)
    ref, ref_has = memory_attention(q, got.keys, got.values, got.mask)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), q0)
    out, has = memory_attention_chunks(
        q, bank.keys, bank.values, sel.chunk_index, sel.mask, c, block_bytes=block_bytes
    )
    (g_out,) = torch.autograd.grad(out.square().sum(), q0)
    assert torch.equal(has, ref_has) and has.any() and not has[1, :, :2].any()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_memory_attention_backward_equals_autograd(dropout_p):
    """The CPU path's hand-written backward gives autograd's gradient of the same
    forward: with dropout (same random numbers), masked pairs and a query with no memory."""
    from fairseq_longmem.modules.joint_attention import _memory_attention

    torch.manual_seed(0)
    b, h, t, d, k = 2, 3, 5, 8, 4
    q0 = torch.randn(b, h, t, d, requires_grad=True)
    mem_k, mem_v = torch.randn(b, h, t, k, d), torch.randn(b, h, t, k, d)
    mask = torch.rand(b, h, t, k) > 0.3
    mask[0, 0, 0] = False
    w = torch.randn(b, h, t, d)
    torch.manual_seed(1)
    out, has = memory_attention(q0, mem_k, mem_v, mask, dropout_p, training=True)
    (g,) = torch.autograd.grad((out * w).sum(), q0)
    torch.manual_seed(1)
    ref, ref_has, _, _ = _memory_attention(q0, mem_k, mem_v, mask, dropout_p, True)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), q0)
    assert torch.equal(has, ref_has) and not has[0, 0, 0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert g[0, 0, 0].abs().sum() == 0  # no memory: no gradient through it
