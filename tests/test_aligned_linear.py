"""The padded output projection gives F.linear's logits and gradients."""

import pytest
import torch
import torch.nn.functional as F

from fairseq_longmem.modules.aligned_linear import aligned_linear


@pytest.mark.parametrize("out, multiple", [(13, 8), (16, 8), (50257, 64), (5, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_aligned_linear_equals_linear(out, multiple, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(out, 16, requires_grad=True)
    b = torch.randn(out, requires_grad=True) if with_bias else None
    got = aligned_linear(x, w, b, multiple=multiple)
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (2, 3, out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    g = torch.randn_like(want)
    params = [x, w] + ([b] if with_bias else [])
    for a, c in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    # the log-softmax a criterion takes of the (sliced) logits is the same
    torch.testing.assert_close(F.log_softmax(got, -1), F.log_softmax(want, -1), rtol=0, atol=1e-5)


def test_cpu_default_does_not_pad(monkeypatch):
    calls = []
    real = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: calls.append(1) or real(*a, **k))
    aligned_linear(torch.randn(2, 4), torch.randn(13, 4))
    assert not calls  # CPU: no padding (nothing measured to gain); CUDA pads to ALIGN
