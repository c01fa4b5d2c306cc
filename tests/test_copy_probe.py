"""The in-context copy probe against fairseq's own attention weights and model loss."""

import numpy as np
import pytest
import torch

from conftest import lm_args, setup_stream_task
from fairseq.models.transformer_lm import TransformerLanguageModel, transformer_lm_gpt2_tiny
from fairseq_longmem.eval.copy_probe import attention_probs, copy_probe, repeated_spans
from fairseq_longmem.eval.token_losses import document_stream
from fairseq_longmem.models.alibi_lm import AlibiLanguageModel, alibi_lm_tiny
from fairseq_longmem.modules.decoder_layer import decoder_attn_bias, embed, layer_forward


def test_repeated_spans_layout_and_errors():
    stream = document_stream([list(range(10, 30)), list(range(50, 55))], eos=2)
    spans = repeated_spans(stream, span=4, stride=8)
    # document 0 gives spans at offsets 0, 8, 16; document 1 (5 tokens) one at 0
    assert spans.tolist() == [
        [10, 11, 12, 13] * 2, [18, 19, 20, 21] * 2, [26, 27, 28, 29] * 2, [50, 51, 52, 53] * 2,
    ]
    assert repeated_spans(stream, span=4, stride=8, max_spans=2).shape == (2, 8)
    with pytest.raises(ValueError, match="no document of 40"):
        repeated_spans(stream, span=40)
    with pytest.raises(ValueError, match="at least 2"):
        repeated_spans(stream, span=1)


def test_attention_probs_equal_fairseq_head_weights(tiny_data):
    task = setup_stream_task(tiny_data)
    args = lm_args(decoder_normalize_before=True)
    transformer_lm_gpt2_tiny(args)
    torch.manual_seed(0)
    model = TransformerLanguageModel.build_model(args, task).eval()
    tokens = torch.randint(4, 900, (2, 11))
    layer = model.decoder.layers[0]
    with torch.no_grad():
        x = embed(model.decoder, tokens)
        got = attention_probs(layer, x, None)
        h = layer.self_attn_layer_norm(x).transpose(0, 1)  # fairseq is time-first
        mask = model.decoder.buffered_future_mask(h)
        # fairseq's fast path returns the weights averaged over heads
        _, ref = layer.self_attn(h, h, h, attn_mask=mask, need_weights=True)
    assert ref.shape == (2, 11, 11)
    torch.testing.assert_close(got.mean(1), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(got.triu(1) == 0)  # causal


def test_copy_probe_matches_model_loss_and_loop_reference(tiny_data):
    task = setup_stream_task(tiny_data)
    args = lm_args(decoder_layers=2)
    alibi_lm_tiny(args)
    torch.manual_seed(0)
    model = AlibiLanguageModel.build_model(args, task).eval()
    span = 6
    x = torch.randint(4, 900, (3, span))
    spans = torch.cat([x, x], 1)
    model.train()  # the probe runs in eval mode and restores the mode it found
    got = copy_probe(model.decoder, spans, batch_size=2)
    assert model.decoder.training
    model.eval()
    with torch.no_grad():
        lprobs = torch.log_softmax(model(spans)[0].float(), -1)
    nll = -lprobs[:, :-1].gather(-1, spans[:, 1:, None]).squeeze(-1)
    assert got.first_perplexity == pytest.approx(float(nll[:, : span - 1].mean().exp()), rel=1e-5)
    assert got.second_perplexity == pytest.approx(float(nll[:, span:].mean().exp()), rel=1e-5)
    # induction score: loop over every second-copy query that has a next token in x
    ref = np.zeros((2, 4))
    with torch.no_grad():
        h = embed(model.decoder, spans)
        bias = decoder_attn_bias(model.decoder, 2 * span, None)
        for li, layer in enumerate(model.decoder.layers):
            p = attention_probs(layer, h, bias)
            for b in range(3):
                for head in range(4):
                    vals = [float(p[b, head, t, t - span + 1]) for t in range(span, 2 * span - 1)]
                    ref[li, head] += sum(vals)
            h, _ = layer_forward(layer, h, bias)
    ref /= 3 * (span - 1)
    np.testing.assert_allclose(got.induction, ref, rtol=1e-5, atol=1e-7)
    assert got.spans == 3 and got.span == span
    assert got.best_layer == int(np.argmax(ref.max(1)))
