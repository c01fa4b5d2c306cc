"""FlexAttention with ALiBi computed in the kernel against SDPA with the ALiBi bias tensor:
which biases are recognised, when local_attention takes the flex path (no dropout, the
switch), equal outputs and gradients (eager flex on CPU; the compiled kernel on CUDA,
skipped elsewhere), and a whole LongMem training step equal both ways."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fairseq_longmem.modules import flex_alibi, joint_attention
from fairseq_longmem.modules.decoder_layer import alibi_bias, alibi_slopes
from fairseq_longmem.modules.joint_attention import local_attention

pytestmark = pytest.mark.skipif(not flex_alibi.HAS_FLEX, reason="torch without FlexAttention")


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Eager FlexAttention refuses inputs that require grad on CPU (its check, not its
    math): lift the check so the CPU tests compare gradients too."""
    import torch.nn.attention.flex_attention as fa

    if not hasattr(fa, "_validate_device"):
        pytest.skip("this torch has no _validate_device to lift")
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


@pytest.fixture
def flex_on(monkeypatch):
    """local_attention's flex path switched on for CPU tensors (eager flex)."""
    calls = []
    real = joint_attention.alibi_flex_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(joint_attention, "flex_attention_available", lambda device=None: True)
    monkeypatch.setattr(joint_attention, "alibi_flex_attention", spy)
    return calls


def qkv(bsz, heads, t, d, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(bsz, heads, t, d, generator=g).to(dtype) for _ in range(3)]
    return [x.requires_grad_(grad) for x in out]


def sdpa_bias(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def test_only_biases_made_by_alibi_bias_are_recognised():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 10)
    spec = flex_alibi.alibi_spec(bias)
    assert spec is not None
    torch.testing.assert_close(spec.slopes, slopes)
    assert flex_alibi.alibi_spec(bias.clone()) is None  # a copy: SDPA path
    assert flex_alibi.alibi_spec(torch.zeros(1, 4, 10, 10)) is None
    assert flex_alibi.alibi_spec(None) is None
    assert flex_alibi.alibi_spec(bias).score_mod is spec.score_mod  # one function per bias


def test_switch_and_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(flex_alibi.FLEX_ENV, raising=False)
    assert flex_alibi.flex_attention_available("cuda")
    assert not flex_alibi.flex_attention_available("cpu")  # CUDA only by default
    monkeypatch.setenv(flex_alibi.FLEX_ENV, "0")
    assert not flex_alibi.flex_attention_available("cuda")
    monkeypatch.setenv(flex_alibi.FLEX_ENV, "1")
    assert flex_alibi.flex_attention_available("cuda")


@pytest.mark.parametrize("heads, t", [(4, 9), (6, 77), (8, 130), (16, 128)])
def test_flex_forward_equals_sdpa_with_bias(heads, t):
    q, k, v = qkv(2, heads, t, 16)
    bias = alibi_bias(alibi_slopes(heads), t)
    spec = flex_alibi.alibi_spec(bias)
    got = flex_alibi.alibi_flex_attention(q, k, v, spec)
    torch.testing.assert_close(got, sdpa_bias(q, k, v, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, t", [(4, 9), (6, 77), (8, 130)])
def test_flex_gradients_equal_sdpa_with_bias(cpu_flex_backward, heads, t):
    q, k, v = qkv(2, heads, t, 16, grad=True)
    bias = alibi_bias(alibi_slopes(heads), t)
    out = flex_alibi.alibi_flex_attention(q, k, v, flex_alibi.alibi_spec(bias))
    ref = sdpa_bias(q, k, v, bias)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_local_attention_dispatch(flex_on):
    q, k, v = qkv(2, 4, 128, 8)
    bias = alibi_bias(alibi_slopes(4), 128)
    out = local_attention(q, k, v, bias)
    assert len(flex_on) == 1
    # a length that is not a multiple of the block (one compilation per length): SDPA
    odd = alibi_bias(alibi_slopes(4), 33)
    local_attention(q[:, :, :33], k[:, :, :33], v[:, :, :33], odd)
    assert len(flex_on) == 1
    torch.testing.assert_close(out, sdpa_bias(q, k, v, bias), rtol=1e-5, atol=1e-5)
    # not an ALiBi bias of alibi_bias: SDPA, same numbers
    local_attention(q, k, v, bias.clone())
    assert len(flex_on) == 1
    # no bias: SDPA is_causal
    local_attention(q, k, v, None)
    assert len(flex_on) == 1
    # attention dropout (flex has none): SDPA, and it drops (outputs differ from no dropout)
    torch.manual_seed(0)
    dropped = local_attention(q, k, v, bias, dropout_p=0.5)
    assert len(flex_on) == 1
    assert not torch.allclose(dropped, out)
    # a bias of another shape than (1, heads, T, T) (e.g. a piece of a segment): SDPA
    piece_q = q[:, :, -5:]
    local_attention(piece_q, k, v, bias[:, :, -5:])
    assert len(flex_on) == 1


def test_switch_off_keeps_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(joint_attention, "alibi_flex_attention", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(flex_alibi.FLEX_ENV, "0")
    q, k, v = qkv(1, 4, 12, 8)
    local_attention(q, k, v, alibi_bias(alibi_slopes(4), 12))
    assert not calls  # CPU tensors and the switch off: SDPA


def tiny_longmem(seed=1):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import train_speed

    args = train_speed.parse_args(["--tiny", "--dropout", "0.0", "--dtype", "fp32",
                                   "--tokens-per-sample", "128", "--batch-size", "1"])
    torch.manual_seed(seed)
    model, _ = train_speed.build_model(args, torch.device("cpu"))
    model.train()
    return model, args


def step_grads(model, tokens, target):
    model.zero_grad(set_to_none=True)
    logits, _ = model(tokens)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_longmem_step_equal_with_flex(cpu_flex_backward, monkeypatch):
    """A no-memory LongMem training step (alibi backbone, side network) gives the same
    loss and gradients with local attention through flex as through SDPA."""
    model, args = tiny_longmem()
    model.decoder.cfg.use_external_memory = False
    g = torch.Generator().manual_seed(3)
    seg = torch.randint(4, args.vocab, (args.batch_size, args.tokens_per_sample + 1), generator=g)
    tokens, target = seg[:, :-1], seg[:, 1:]
    loss_sdpa, grads_sdpa = step_grads(model, tokens, target)
    calls = []
    real = joint_attention.alibi_flex_attention
    monkeypatch.setattr(joint_attention, "flex_attention_available", lambda device=None: True)
    monkeypatch.setattr(joint_attention, "alibi_flex_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_flex, grads_flex = step_grads(model, tokens, target)
    n_layers = len(model.decoder.backbone.layers) + len(model.decoder.side.layers)
    assert len(calls) == n_layers  # every local attention of backbone and side ran flex
    torch.testing.assert_close(loss_flex, loss_sdpa, rtol=1e-5, atol=1e-6)
    assert grads_flex.keys() == grads_sdpa.keys() and grads_flex
    for name in grads_sdpa:
        torch.testing.assert_close(grads_flex[name], grads_sdpa[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.skipif(not flex_alibi.flex_attention_available("cuda"),
                    reason="needs CUDA (the compiled FlexAttention kernel)")
def test_compiled_flex_on_cuda_equals_sdpa_with_bias():
    """The compiled kernel in bf16 against SDPA with the bias, both against fp32 math
    (one shape: each compiles the kernels, tens of seconds)."""
    heads, t = 16, 1024
    q, k, v = [x.cuda() for x in qkv(2, heads, t, 64, grad=False)]
    bias = alibi_bias(alibi_slopes(heads), t, device="cuda")
    spec = flex_alibi.alibi_spec(bias)
    qb, kb, vb = [x.bfloat16().requires_grad_(True) for x in (q, k, v)]
    qf, kf, vf = [x.float().requires_grad_(True) for x in (q, k, v)]
    out = flex_alibi.alibi_flex_attention(qb, kb, vb, spec)
    ref = sdpa_bias(qf, kf, vf, bias)  # fp32 truth
    sdpa16 = sdpa_bias(*[x.detach().bfloat16() for x in (q, k, v)], bias)
    err_flex = (out.float() - ref).abs().max().item()
    err_sdpa = (sdpa16.float() - ref).abs().max().item()
    assert err_flex <= max(2 * err_sdpa, 2e-2), (err_flex, err_sdpa)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (qb, kb, vb), g.bfloat16())
    want = torch.autograd.grad(ref, (qf, kf, vf), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
    # through local_attention under autocast, as the model calls it
    with torch.autocast("cuda", dtype=torch.bfloat16):
        via = local_attention(qb, kb, vb, bias)
    torch.testing.assert_close(via, out)


def test_forward_mode_takes_flex_only_without_gradients(flex_on, monkeypatch):
    """LONGMEM_FLEX_ATTENTION=forward: the frozen backbone's calls (no gradient) take
    flex, the side network's (gradients) SDPA; a bad value is refused by name."""
    monkeypatch.setenv(flex_alibi.FLEX_ENV, "forward")
    q, k, v = qkv(1, 4, 128, 8)
    bias = alibi_bias(alibi_slopes(4), 128)
    with torch.no_grad():
        local_attention(q, k, v, bias)
    assert len(flex_on) == 1
    local_attention(q, k, v, bias)  # no tensor needs a gradient: flex too
    assert len(flex_on) == 2
    qg = q.clone().requires_grad_()
    local_attention(qg, k, v, bias)
    assert len(flex_on) == 2
    monkeypatch.setenv(flex_alibi.FLEX_ENV, "fwd")
    with pytest.raises(ValueError, match="LONGMEM_FLEX_ATTENTION"):
        local_attention(q, k, v, bias)
