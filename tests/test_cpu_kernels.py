"""The compiled CPU kernels of the memory read (csrc/cpu_memory_ops.cpp) against
their PyTorch twins: exact top-k, attention over chunks read from the ring
buffers, its backward after the step's write-after-read, and the build's
failure path."""

import logging
import shutil

import pytest
import torch

from fairseq_longmem.modules import cpu_kernels
from fairseq_longmem.modules import memory_bank as mb
from fairseq_longmem.modules.joint_attention import memory_attention, memory_attention_chunks
from fairseq_longmem.modules.memory_bank import MemoryBank, blocked_topk, gather_chunk_tokens
from fairseq_longmem.modules.memory_reader import JointMemoryReader

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler: the compiled CPU kernels cannot be built here",
)


@pytest.fixture(scope="module")
def kernels():
    if not cpu_kernels.enabled():
        pytest.skip("LONGMEM_CPU_KERNELS=0")
    module = cpu_kernels.load()
    assert module is not None, f"the CPU kernels did not build: {cpu_kernels.load_error()}"
    return module


def _ranked(values):
    return torch.nan_to_num(values, nan=float("inf"))


@pytest.mark.parametrize("kind", ["normal", "ties", "masked", "trend", "nan", "all_masked"])
def test_topk_rows_is_torch_topk(kernels, kind):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    for n, k in [(2048, 8), (2048, 1), (300, 7), (64, 64), (50, 5), (1000, 100), (9, 0), (700, 33)]:
        s = torch.randn(6, n, generator=g)
        if kind == "ties":
            s = torch.randint(0, 4, (6, n), generator=g).float()
        elif kind == "masked":
            s[torch.rand(6, n, generator=g) < 0.9] = float("-inf")
        elif kind == "trend":
            s = s + torch.linspace(0, 40, n)
        elif kind == "nan":
            s[torch.rand(6, n, generator=g) < 0.02] = float("nan")
        elif kind == "all_masked":
            s[:] = float("-inf")
        values, index = cpu_kernels.topk_rows(s, k)
        ref = s.topk(k, dim=-1).values
        assert values.shape == (6, k) and index.dtype == torch.long
        assert torch.equal(_ranked(values), _ranked(ref)), (kind, n, k)
        assert torch.equal(_ranked(s.gather(1, index)), _ranked(values))
        assert all(len(set(row.tolist())) == k for row in index)  # distinct columns
        # equal values: the lower column first (deterministic)
        same = values[:, 1:] == values[:, :-1]
        assert bool((index[:, 1:] > index[:, :-1])[same].all())


def test_topk_rows_rejects_bad_input(kernels):
    with pytest.raises(RuntimeError, match="k <= n"):
        cpu_kernels.topk_rows(torch.randn(3, 5), 6)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_kernels.topk_rows(torch.randn(3, 5, dtype=torch.float64), 2)


def test_search_with_the_kernel_chooses_the_same_chunks(kernels, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 16, generator=g)
    ck = torch.randn(2, 3, 96, 16, generator=g)
    for valid in (torch.ones(2, 96, dtype=torch.bool), torch.rand(2, 96, generator=g) < 0.3):
        got = mb._topk_chunks_cpu(q, ck, valid, 8, 1 << 12)
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
        ref = mb._topk_chunks_cpu(q, ck, valid, 8, 1 << 12)
        monkeypatch.undo()
        assert torch.equal(got[1], ref[1])
        assert torch.equal(got[0][got[1]], ref[0][ref[1]])
    # and blocked_topk, the PyTorch twin, agrees with the kernel on a real-sized block
    s = torch.randn(256, 2048, generator=g)
    assert torch.equal(cpu_kernels.topk_rows(s, 8)[0], blocked_topk(s, 8, 4)[0])


def _memory_case(seed=0, bsz=2, heads=3, tgt_len=10, d=8, chunks=12, cs=4, kc=3):
    g = torch.Generator().manual_seed(seed)
    store_k = torch.randn(bsz, heads, chunks * cs + 1, d, generator=g)
    store_v = torch.randn(bsz, heads, chunks * cs + 1, d, generator=g)
    idx = torch.randint(0, chunks, (bsz, heads, tgt_len, kc), generator=g)
    ok = torch.rand(bsz, heads, tgt_len, kc, generator=g) < 0.8
    ok[0, 0, 0] = False  # a query without memory
    mask = ok.repeat_interleave(cs, dim=-1)
    q = torch.randn(bsz, heads, tgt_len, d, generator=g, requires_grad=True)
    return q, store_k, store_v, idx, mask, cs


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("d,cs", [(8, 4), (32, 3), (64, 4), (16, 1), (128, 2)])
def test_memory_attention_kernel_equals_gathered_reference(kernels, dropout, d, cs):
    """head_dim 16/32/64/128: the AVX2 path; others the generic one. chunk_size 3:
    retrieved tokens not a multiple of 4."""
    q, sk, sv, idx, mask, cs = _memory_case(d=d, cs=cs)
    grad = torch.randn(q.shape)
    torch.manual_seed(5)
    out, has = cpu_kernels.memory_attention(q, sk, sv, idx, mask, cs, dropout, True)
    out.backward(grad)
    got_grad = q.grad.clone()
    q.grad = None
    torch.manual_seed(5)  # dropout: the same random numbers
    mem_k = gather_chunk_tokens(sk, idx, cs)
    mem_v = gather_chunk_tokens(sv, idx, cs)
    ref, ref_has = memory_attention(q, mem_k, mem_v, mask, dropout, True)
    ref.backward(grad)
    assert torch.equal(has, ref_has) and not bool(has[0, 0, 0])
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_grad, q.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(out[0, 0, 0], torch.zeros(q.size(-1)))
    assert torch.equal(got_grad[0, 0, 0], torch.zeros(q.size(-1)))


def test_memory_attention_kernel_rejects_out_of_range_chunks(kernels):
    q, sk, sv, idx, mask, cs = _memory_case()
    idx = idx.clone()
    idx[1, 2, 3, 0] = 10_000
    with pytest.raises(RuntimeError, match="outside the memory"):
        cpu_kernels.memory_attention(q.detach(), sk, sv, idx, mask, cs)


@pytest.mark.parametrize("d", [8, 32])
def test_backward_after_a_write_sees_what_the_forward_read(kernels, d):
    """The step writes the segment after reading (overwriting the oldest chunks,
    which queries read); the backward must use what was read."""
    torch.manual_seed(0)
    bsz, heads, memory, cs, seg = 2, 2, 32, 4, 16
    grads = {}
    for path in ("compiled", "gather"):
        torch.manual_seed(0)
        bank = MemoryBank(bsz, heads, d, memory, cs)
        for _ in range(3):  # fill and wrap the ring
            bank.write(torch.randn(bsz, heads, seg, d), torch.randn(bsz, heads, seg, d))
        q = torch.randn(bsz, heads, seg, d, requires_grad=True)
        query_mask = torch.ones(bsz, seg, dtype=torch.bool)
        gate = torch.zeros(heads, requires_grad=True)
        if path == "gather":
            orig = cpu_kernels.available
            cpu_kernels.available = lambda: False
        try:
            reader = JointMemoryReader(bank, query_mask, gate, k=16, attn_dropout=0.0,
                                       training=True)
            out = reader(q, torch.zeros_like(q))
            oldest = {4, 5, 6, 7}  # the oldest chunks (tokens 16..31): the next write goes there
            read = set(reader.retrieved.chunk_index[reader.retrieved.mask[..., ::cs]].tolist())
            assert read & oldest, "the case must read chunks the write then overwrites"
            before = bank.keys.clone()
            bank.write(torch.randn(bsz, heads, seg, d), torch.randn(bsz, heads, seg, d))
            assert not torch.equal(before, bank.keys)
            after = bank.keys.clone()
            (out * torch.arange(d).float()).sum().backward()
            assert torch.equal(bank.keys, after), "the backward must leave the memory as written"
        finally:
            if path == "gather":
                cpu_kernels.available = orig
        grads[path] = (q.grad.clone(), gate.grad.clone())
    assert torch.allclose(grads["compiled"][0], grads["gather"][0], atol=1e-5)
    assert torch.allclose(grads["compiled"][1], grads["gather"][1], atol=1e-5)


def test_unlogged_write_before_backward_is_an_error(kernels):
    q, sk, sv, idx, mask, cs = _memory_case()
    out, _ = cpu_kernels.memory_attention(q, sk, sv, idx, mask, cs)
    sk.view(-1, sk.size(-1))[:5] += 1.0  # a write nobody logged
    with pytest.raises(RuntimeError, match="overwrite_log"):
        out.sum().backward()
    # memory_attention_chunks never takes the compiled path with gradients and no log
    q2 = q.detach().clone().requires_grad_()
    out2, _ = memory_attention_chunks(q2, sk, sv, idx, mask, cs)
    sk.view(-1, sk.size(-1))[:5] -= 1.0
    out2.sum().backward()  # the gathering path copied what it read: no error
    assert q2.grad is not None


def test_disabled_or_failed_build_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LONGMEM_CPU_KERNELS", "0")
    assert cpu_kernels.load() is None and not cpu_kernels.available()
    monkeypatch.setenv("LONGMEM_CPU_KERNELS", "1")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_STATE", {"module": None, "tried": False, "error": None})
    monkeypatch.setattr(cpu_kernels, "VERSION", 999_001)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with caplog.at_level(logging.WARNING, logger="fairseq_longmem.modules.cpu_kernels"):
        assert cpu_kernels.load() is None
    assert "could not be built" in caplog.text and "LONGMEM_CPU_KERNELS=0" in caplog.text
    assert cpu_kernels.load_error()
    # the memory layer still works, through PyTorch
    q, sk, sv, idx, mask, cs = _memory_case()
    out, _ = memory_attention_chunks(q.detach(), sk, sv, idx, mask, cs)
    assert torch.isfinite(out).all()


# ---- the bf16-screened search (AVX-512 BF16 CPUs; elsewhere both calls take the fp32 path)

def _exact_search(q, ck, invalid, k):
    """The reference: float64 scores, -inf where invalid, torch.topk."""
    s = torch.bmm(q.double(), ck.double().transpose(1, 2))
    if invalid.numel():
        s.masked_fill_(invalid[:, None, :], float("-inf"))
    return s.topk(min(k + 1, s.size(-1)), dim=-1)


def _assert_same_search(q, ck, invalid, k, what, same_order=False):
    """Screened and fp32 searches agree: at each rank whose float64 score is apart
    from its neighbours' by more than fp32's rounding, both choose the float64
    search's chunk; at a near-tie within that rounding (which fp32 sums in
    another order may rank either way) their scores agree to fp32 precision."""
    v1, i1 = cpu_kernels.search_topk(q, ck, invalid, k, 64, screen=True)
    v0, i0 = cpu_kernels.search_topk(q, ck, invalid, k, 64, screen=False)
    fin = torch.isfinite(v0)
    assert torch.equal(fin, torch.isfinite(v1)), what
    assert torch.allclose(v1[fin], v0[fin], rtol=1e-5, atol=1e-5), what
    if same_order:
        assert torch.equal(i1[fin], i0[fin]), what
    rv, ri = _exact_search(q, ck, invalid, k)
    # position j of a query is clear when its float64 score is apart from its
    # neighbours' by more than fp32's rounding of a dot product
    tol = 2e-6 * (q.abs().sum(-1, keepdim=True) * ck.abs().amax((1, 2))[:, None, None]).double()
    pad = torch.full_like(rv[..., :1], float("inf"))
    gaps = torch.cat([pad, rv[..., :-1] - rv[..., 1:], pad], -1).nan_to_num(nan=0.0)
    n_out = v0.size(-1)
    clear = (gaps[..., :n_out] > tol) & (gaps[..., 1 : n_out + 1] > tol) & fin
    clear &= torch.isfinite(rv[..., :n_out])
    assert clear.sum() >= 0.5 * fin.sum(), what  # the comparison is not vacuous
    for got in (i1, i0):
        assert torch.equal(got[clear], ri[..., :n_out][clear]), what
    return v1, i1


@pytest.mark.parametrize("d", [16, 32, 64])
def test_screened_search_chooses_the_fp32_chunks(kernels, d):
    g = torch.Generator().manual_seed(d)
    for rows, T, n, k in [(3, 40, 2048, 8), (2, 17, 300, 1), (2, 16, 16, 8), (1, 5, 1000, 16),
                          (2, 33, 700, 17), (1, 9, 4096, 64), (2, 1, 97, 3)]:
        # queries and keys that share a direction, as trained ones do: scores
        # bunch up near the top, where the screen must hand over to fp32
        base = torch.randn(d, generator=g)
        q = (torch.randn(rows, T, d, generator=g) + base).contiguous()
        ck = (torch.randn(rows, n, d, generator=g) * 0.5 + base).contiguous()
        none = torch.empty(0, dtype=torch.bool)
        _assert_same_search(q, ck, none, k, (d, n, k))
        invalid = torch.rand(rows, n, generator=g) < 0.5
        invalid[0, : max(0, n - k + 1)] = True  # row 0: fewer valid chunks than k
        _assert_same_search(q, ck, invalid.contiguous(), k, (d, n, k, "masked"))


def test_screened_search_resolves_what_bf16_cannot(kernels):
    # scores near 28 that differ by ~1e-4 (fp32 resolves them: its step there is
    # 2e-6; bf16's is 0.125): the screen sees ties, and the exact pass must
    # still find the fp32 order
    g = torch.Generator().manual_seed(1)
    d = 32
    for n in (200, 2048):  # few candidates re-scored; more than the screen keeps (fp32 path)
        base = torch.randn(d, generator=g)
        ck = (base + 3e-3 * torch.randn(2, n, d, generator=g)).contiguous()
        q = (base + 3e-3 * torch.randn(2, 24, d, generator=g)).contiguous()
        _assert_same_search(q, ck, torch.empty(0, dtype=torch.bool), 8, n)


def test_screened_search_on_vanishing_scales(kernels):
    # norms that underflow in fp32 (|q| ~ 1e-24) would make the screen's error
    # bound vanish: such queries and rows must take the fp32 path, not trust bf16
    g = torch.Generator().manual_seed(3)
    d, n = 32, 200
    base = torch.randn(d, generator=g)
    ck = (base + 3e-3 * torch.randn(2, n, d, generator=g)).contiguous()
    q = (base + 3e-3 * torch.randn(2, 24, d, generator=g)).contiguous()
    none = torch.empty(0, dtype=torch.bool)
    for qs, ks in ((1e-24, 1.0), (1.0, 1e-24), (1e-18, 1e-18)):
        qq, kk = (q * qs).contiguous(), (ck * ks).contiguous()
        v1, i1 = cpu_kernels.search_topk(qq, kk, none, 1, 64, screen=True)
        v0, i0 = cpu_kernels.search_topk(qq, kk, none, 1, 64, screen=False)
        assert torch.equal(i1, i0), (qs, ks)


def test_screened_search_ties_nan_and_huge_values(kernels):
    g = torch.Generator().manual_seed(2)
    d, n = 32, 512
    ck = torch.randn(2, n, d, generator=g)
    ck[:, 256:] = ck[:, :256]  # every chunk twice: ties go to the lower slot
    q = torch.randn(2, 20, d, generator=g)
    none = torch.empty(0, dtype=torch.bool)
    v1, i1 = cpu_kernels.search_topk(q.contiguous(), ck.contiguous(), none, 8, 64, screen=True)
    v0, i0 = cpu_kernels.search_topk(q.contiguous(), ck.contiguous(), none, 8, 64, screen=False)
    assert torch.equal(i1, i0)
    assert torch.equal(i1[..., 1::2], i1[..., 0::2] + 256)  # each pair: the lower slot first
    q[0, 3, 5] = float("nan")  # NaN scores rank first, as in torch.topk
    q[1, 4] *= 1e37  # scores that overflow
    ck2 = ck.clone()
    ck2[1, 7, 0] = float("inf")
    for keys in (ck, ck2):
        v1, i1 = cpu_kernels.search_topk(q.contiguous(), keys.contiguous(), none, 8, 64, screen=True)
        v0, i0 = cpu_kernels.search_topk(q.contiguous(), keys.contiguous(), none, 8, 64, screen=False)
        assert torch.equal(i1, i0)
        assert torch.equal(_ranked(v1).isnan(), _ranked(v0).isnan())



def test_screen_runs_where_the_cpu_has_avx512_bf16(kernels):
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.exists() or "avx512_bf16" not in info.read_text():
        pytest.skip("this CPU has no AVX-512 BF16: the search takes its fp32 path")
    assert cpu_kernels.screen_supported()
