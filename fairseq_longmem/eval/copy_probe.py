"""The in-context copy probe: can a backbone copy text it has just read?

LongMem's memory layer is a copy of backbone layer ``m`` and reads backbone
layer ``m``'s keys and values, so it can only copy from memory what that
layer can copy in context. The mechanism for that is the *induction head*
(Olsson et al., 2022): at a repeated token, attend to the token that followed
its earlier occurrence. This probe reads spans of real text twice in one
window, ``[x, x]``, and reports

* the perplexity of the first and of the second copy (a backbone with
  induction heads predicts the second copy far better than the first);
* per layer and head, the mean attention from each second-copy position
  ``t`` to ``t - span + 1`` (the induction score: 0 for no head that copies,
  near 1 for a sharp induction head).

A backbone whose scores are all near 0 cannot make memory pay: choose a
better-trained backbone, or the layer with the highest score as
``--retrieval-layer-index``.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..modules.decoder_layer import (
    decoder_attn_bias,
    embed,
    final_features,
    layer_forward,
    project_qkv,
)
from . import EvalError


@dataclass
class CopyProbe:
    first_perplexity: float  # first copy (targets 1 .. span-1)
    second_perplexity: float  # second copy (targets span+1 .. 2*span-1)
    induction: np.ndarray  # (layers, heads) mean attention to the token after the earlier copy
    spans: int
    span: int

    @property
    def best_layer(self) -> int:
        """The layer holding the strongest induction head."""
        return int(np.unravel_index(np.argmax(self.induction), self.induction.shape)[0])


def repeated_spans(stream, span: int, stride: int = 400, max_spans: int = 64) -> Tensor:
    """``[x, x]`` for spans ``x`` of ``span`` tokens taken every ``stride`` tokens of
    each document of ``stream`` (in order, at most ``max_spans``): ``(n, 2 * span)``."""
    if span < 2:
        raise EvalError(f"span must be at least 2 tokens, got {span}")
    rows = []
    for s, n in zip(stream.doc_starts, stream.doc_lengths):
        for off in range(0, int(n) - span + 1, stride):
            x = np.asarray(stream.tokens[s + 1 + off : s + 1 + off + span], dtype=np.int64)
            rows.append(np.concatenate([x, x]))
            if len(rows) == max_spans:
                return torch.as_tensor(np.stack(rows))
    if not rows:
        raise EvalError(f"no document of {span}+ tokens for the copy probe; use a shorter span")
    return torch.as_tensor(np.stack(rows))


def attention_probs(layer, x: Tensor, bias) -> Tensor:
    """Self-attention probabilities of a fairseq decoder layer on input ``x``
    ``(bsz, T, dim)``: ``(bsz, heads, T, T)`` (``bias``: ALiBi or None for causal)."""
    h = layer.self_attn_layer_norm(x) if layer.normalize_before else x
    q, k, _ = project_qkv(layer, h)
    scores = (q @ k.transpose(-1, -2)).float() * q.size(-1) ** -0.5
    T = x.size(1)
    if bias is None:
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    else:
        scores = scores + bias.float()
    return scores.softmax(-1)


@torch.no_grad()
def copy_probe(decoder, spans: Tensor, batch_size: int = 16) -> CopyProbe:
    """Run the probe with a fairseq LM decoder (``model.decoder``) on ``spans``
    ``(n, 2 * span)`` from :func:`repeated_spans`."""
    was_training = decoder.training
    decoder.eval()
    n, two_span = spans.shape
    span = two_span // 2
    t = torch.arange(span, two_span - 1)  # second-copy positions that have a next token in x
    first, second = [], []
    induction = None
    try:
        for b in range(0, n, batch_size):
            tokens = spans[b : b + batch_size].to(next(decoder.parameters()).device)
            x = embed(decoder, tokens)
            bias = decoder_attn_bias(decoder, two_span, tokens.device)
            per_layer = []
            for layer in decoder.layers:
                p = attention_probs(layer, x, bias)
                per_layer.append(p[:, :, t, t - span + 1].sum((0, 2)))  # (heads,)
                x, _ = layer_forward(layer, x, bias)
            scores = torch.stack(per_layer)  # (layers, heads)
            induction = scores if induction is None else induction + scores
            logits = decoder.output_layer(final_features(decoder, x))
            lprobs = torch.log_softmax(logits.float(), -1)[:, :-1]
            nll = -lprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # target j+1 at j
            first.append(nll[:, : span - 1].reshape(-1))
            second.append(nll[:, span:].reshape(-1))
    finally:
        decoder.train(was_training)
    induction = (induction / (n * len(t))).cpu().numpy()
    return CopyProbe(
        first_perplexity=float(torch.cat(first).mean().exp()),
        second_perplexity=float(torch.cat(second).mean().exp()),
        induction=induction,
        spans=n,
        span=span,
    )

