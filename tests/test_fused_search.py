"""Fused chunk search: the kernel's algorithm (tiled reference) and the fallback on CPU,
the Triton kernel itself against the fallback on CUDA (skipped without a GPU)."""

import pytest
import torch

from fairseq_longmem.modules import memory_bank
from fairseq_longmem.modules.fused_search import fused_search_available, fused_topk_chunks
from references import plain_topk_chunks, tiled_topk_reference


def make(bsz, heads, t, n, d, dtype=torch.float64, seed=0, device="cpu", ints=False):
    g = torch.Generator().manual_seed(seed)
    if ints:  # small integers: many exactly tied scores
        q = torch.randint(-2, 3, (bsz, heads, t, d), generator=g).to(dtype)
        ck = torch.randint(-2, 3, (bsz, heads, n, d), generator=g).to(dtype)
    else:
        q = torch.randn(bsz, heads, t, d, generator=g, dtype=torch.float64).to(dtype)
        ck = torch.randn(bsz, heads, n, d, generator=g, dtype=torch.float64).to(dtype)
    valid = torch.rand(bsz, n, generator=g) < 0.7
    return q.to(device), ck.to(device), valid.to(device)


def scores_of(q, ck, valid):
    s = torch.matmul(q.to(ck.dtype).double(), ck.double().transpose(-1, -2))
    return s.masked_fill(~valid[:, None, None, :], float("-inf"))


def plain(q, ck, valid, kc):
    """matmul + topk in fp64, the ground truth; returns (index, ok, values)."""
    s = scores_of(q, ck, valid)
    top = min(kc, s.size(-1))
    values, index = s.topk(top, dim=-1)
    return index, torch.isfinite(values), values


def check_same_selection(index, ok, q, ck, valid, kc, exact_sets=True):
    """index/ok (b,h,t,kc) select the same chunks (or, for ties, the same scores)."""
    ref_index, ref_ok, ref_values = plain(q, ck, valid, kc)
    n = ck.size(2)
    top = min(kc, n)
    assert index.shape == ok.shape == (*q.shape[:3], kc)
    assert index.dtype == torch.long and ok.dtype == torch.bool
    assert (index >= 0).all() and (index < max(n, 1)).all()
    # ok: exactly min(kc, #valid chunks of the row) entries, the first ones
    n_valid = valid.sum(1).clamp(max=kc)[:, None, None].expand(ok.shape[:3])
    assert torch.equal(ok.sum(-1), n_valid)
    assert torch.equal(ok[..., :top], ref_ok)
    assert not ok[..., top:].any()
    # chosen chunks are valid and distinct
    s = scores_of(q, ck, valid)
    got = s.gather(-1, index).masked_fill(~ok, float("-inf"))
    assert torch.isfinite(got[ok]).all()
    # sorted by decreasing score, same score values as topk (ties: same values)
    assert torch.equal(got[..., :top], ref_values)
    if exact_sets:
        a = index[..., :top].masked_fill(~ok[..., :top], -1).sort(-1).values
        b = ref_index.masked_fill(~ref_ok, -1).sort(-1).values
        assert torch.equal(a, b)
    marked = torch.where(ok, index, -1 - torch.arange(kc).expand_as(index))
    assert (marked.sort(-1).values.diff(dim=-1) != 0).all(), "a chunk chosen twice"


CASES = [
    # bsz, heads, t, n, d, kc, tile
    (2, 3, 5, 37, 8, 4, 8),  # n not a multiple of the tile
    (1, 2, 7, 128, 16, 16, 32),  # n a multiple of the tile
    (2, 1, 3, 9, 4, 16, 4),  # fewer chunks than kc
    (3, 2, 4, 50, 8, 8, 128),  # one tile larger than n
    (1, 1, 1, 1, 4, 1, 1),  # degenerate
]


@pytest.mark.parametrize("bsz,heads,t,n,d,kc,tile", CASES)
def test_tiled_reference_matches_topk(bsz, heads, t, n, d, kc, tile):
    q, ck, valid = make(bsz, heads, t, n, d, seed=n + kc)
    index, ok = tiled_topk_reference(q, ck, valid, kc, tile=tile)
    check_same_selection(index, ok, q, ck, valid, kc)


@pytest.mark.parametrize("tile", [1, 3, 16, 64])
def test_tiled_reference_ties(tile):
    q, ck, valid = make(2, 2, 6, 40, 3, ints=True, seed=tile)
    index, ok = tiled_topk_reference(q, ck, valid, 8, tile=tile)
    check_same_selection(index, ok, q, ck, valid, 8, exact_sets=False)


def test_tiled_reference_fewer_valid_than_k():
    q, ck, _ = make(3, 2, 4, 40, 8, seed=5)
    valid = torch.zeros(3, 40, dtype=torch.bool)
    valid[0, [3, 17, 39]] = True  # 3 valid < kc
    valid[1, :] = True
    # row 2: nothing valid at all (empty memory)
    index, ok = tiled_topk_reference(q, ck, valid, 8, tile=16)
    check_same_selection(index, ok, q, ck, valid, 8)
    assert ok[0].sum(-1).eq(3).all() and not ok[2].any()
    assert set(index[0][ok[0]].tolist()) <= {3, 17, 39}
    assert index[2].eq(0).all()


def test_tiled_reference_adversarial_order():
    """Scores increasing along the chunks: every tile replaces the whole buffer."""
    n, d, kc = 64, 4, 5
    ck = torch.zeros(1, 1, n, d, dtype=torch.float64)
    ck[0, 0, :, 0] = torch.arange(n, dtype=torch.float64)
    q = torch.zeros(1, 1, 2, d, dtype=torch.float64)
    q[0, 0, 0, 0] = 1.0  # wants the last chunks
    q[0, 0, 1, 0] = -1.0  # wants the first ones
    valid = torch.ones(1, n, dtype=torch.bool)
    index, ok = tiled_topk_reference(q, ck, valid, kc, tile=8)
    assert index[0, 0, 0].tolist() == [63, 62, 61, 60, 59]
    assert index[0, 0, 1].tolist() == [0, 1, 2, 3, 4]
    assert ok.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_reference_low_precision_values(dtype):
    """bf16/fp32 inputs: accumulated in fp32, like the kernel; same scores as exact."""
    q, ck, valid = make(2, 2, 8, 300, 16, dtype=dtype, seed=3)
    index, ok, values = tiled_topk_reference(q, ck, valid, 16, tile=64, return_values=True)
    _, ref_ok, ref_values = plain(q, ck, valid, 16)
    assert torch.equal(ok, ref_ok)
    got = scores_of(q, ck, valid).gather(-1, index)
    torch.testing.assert_close(got, ref_values, rtol=0, atol=1e-4)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bsz,heads,t,n,d,kc,tile", CASES)
def test_fallback_matches_topk_and_memory_bank(bsz, heads, t, n, d, kc, tile):
    q, ck, valid = make(bsz, heads, t, n, d, seed=n)
    index, ok = memory_bank.search_chunks(q, ck, valid, kc)  # CPU: the torch path
    check_same_selection(index, ok, q, ck, valid, kc)
    ref_index, ref_ok = plain_topk_chunks(q, ck, valid, kc)
    # the same chunks in the same order where a chunk was found (which invalid slot
    # fills the rest is unspecified: the compiled search puts the lowest first)
    assert torch.equal(ok, ref_ok) and torch.equal(index[ok], ref_index[ok])
    # the library's own torch path (fp32 inputs: both rank fp32 scores)
    q32, ck32 = q.float(), ck.float()
    ref_index, ref_ok = memory_bank.topk_chunks(q32, ck32, valid, kc)
    index32, ok32 = memory_bank.search_chunks(q32, ck32, valid, kc)
    assert torch.equal(ok32, ref_ok)
    s = scores_of(q32, ck32, valid)
    torch.testing.assert_close(
        s.gather(-1, index32)[ok32], s.gather(-1, ref_index)[ref_ok], rtol=0, atol=1e-5
    )


def test_fallback_noncontiguous_and_mixed_dtype():
    q, ck, valid = make(2, 4, 6, 33, 8, dtype=torch.float32, seed=1)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # the side layer's q layout
    assert not qt.is_contiguous()
    index, ok = memory_bank.search_chunks(qt, ck.double(), valid, 4)  # q cast to the keys' dtype
    check_same_selection(index, ok, qt, ck.double(), valid, 4)
    ref = plain_topk_chunks(qt.contiguous(), ck.double(), valid, 4)
    assert torch.equal(index, ref[0]) and torch.equal(ok, ref[1])


def test_available_on_cpu_is_false():
    assert fused_search_available("cpu") is False
    assert fused_search_available(torch.device("cpu")) is False


# --------------------------------------------------------------- CUDA only
cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_search_available("cuda")),
    reason="needs a CUDA device and Triton",
)

GPU_CASES = [
    # bsz, heads, t, n, d, kc
    (2, 3, 77, 1000, 64, 16),  # t, n not multiples of any block
    (1, 2, 64, 4096, 64, 16),
    (2, 2, 33, 10, 64, 16),  # fewer chunks than kc
    (1, 4, 128, 515, 32, 8),
    (1, 1, 17, 300, 48, 5),  # d and kc not powers of two
    (1, 2, 256, 2048, 128, 64),
]


def check_gpu(q, ck, valid, kc):
    index, ok = fused_topk_chunks(q, ck, valid, kc)
    ref_index, ref_ok = plain_topk_chunks(q, ck, valid, kc)
    assert index.shape == ref_index.shape and index.dtype == torch.long
    assert torch.equal(ok, ref_ok)
    n = ck.size(2)
    assert (index >= 0).all() and (index < n).all()
    # exact scores (fp32 from the same rounded inputs) of what each side chose
    s = torch.matmul(q.to(ck.dtype).float(), ck.float().transpose(-1, -2))
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    top = min(kc, n)
    exact = s.topk(top, dim=-1).values
    got = s.gather(-1, index).masked_fill(~ok, float("-inf"))
    theirs = s.gather(-1, ref_index).masked_fill(~ref_ok, float("-inf"))
    scale = s[torch.isfinite(s)].abs().max().clamp(min=1)
    fin = torch.isfinite(exact)
    # kernel: the exact top-k up to fp32 accumulation-order rounding
    assert torch.equal(torch.isfinite(got[..., :top]), fin)
    assert (got[..., :top][fin] - exact[fin]).abs().max() <= 1e-5 * scale
    # the torch path ranks bf16/fp16-rounded scores: never better than the kernel
    eps = torch.finfo(ck.dtype).eps
    theirs_sorted = theirs.sort(-1, descending=True).values[..., :top]
    assert (theirs_sorted[fin] - exact[fin]).abs().max() <= 2 * eps * scale
    # chosen chunks are valid and distinct
    assert valid.gather(1, index.flatten(1)).view_as(index)[ok].all()
    marked = torch.where(ok, index, -1 - torch.arange(kc, device=index.device).expand_as(index))
    assert (marked.sort(-1).values.diff(dim=-1) != 0).all()
    # sorted by decreasing score
    assert (got[..., :-1] >= got[..., 1:]).all() if kc > 1 else True
    return index, ok


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bsz,heads,t,n,d,kc", GPU_CASES)
def test_kernel_matches_fallback_cuda(bsz, heads, t, n, d, kc, dtype):
    q, ck, valid = make(bsz, heads, t, n, d, dtype=torch.float32, seed=n + d)
    q, ck, valid = q.to("cuda", dtype), ck.to("cuda", dtype), valid.cuda()
    valid[0, : n // 3] = False
    check_gpu(q, ck, valid, kc)


@cuda_only
def test_kernel_special_cases_cuda():
    dev = "cuda"
    q, ck, _ = make(3, 2, 40, 200, 64, dtype=torch.float32, seed=7)
    q, ck = q.to(dev, torch.bfloat16), ck.to(dev, torch.bfloat16)
    valid = torch.zeros(3, 200, dtype=torch.bool, device=dev)
    valid[0, [5, 150, 199]] = True  # 3 valid < kc
    valid[1] = True
    # row 2: empty memory
    index, ok = check_gpu(q, ck, valid, 16)
    assert ok[0].sum(-1).eq(3).all() and not ok[2].any() and index[2].eq(0).all()
    # non-contiguous queries (the side layer's layout), fp32 queries with bf16 keys
    qt = q.float().transpose(1, 2).contiguous().transpose(1, 2)
    check_gpu(qt, ck, valid, 16)
    # ties: integer scores
    qi = torch.randint(-2, 3, q.shape, device=dev).to(torch.bfloat16)
    ki = torch.randint(-2, 3, ck.shape, device=dev).to(torch.bfloat16)
    check_gpu(qi, ki, torch.ones_like(valid), 16)


@cuda_only
def test_kernel_vs_tiled_reference_cuda():
    q, ck, valid = make(1, 2, 50, 700, 64, dtype=torch.float32, seed=11)
    q, ck, valid = q.cuda().bfloat16(), ck.cuda().bfloat16(), valid.cuda()
    index, ok = fused_topk_chunks(q, ck, valid, 16)
    r_index, r_ok, r_val = tiled_topk_reference(q, ck, valid, 16, tile=64, return_values=True)
    assert torch.equal(ok, r_ok)
    s = torch.matmul(q.float(), ck.float().transpose(-1, -2))
    torch.testing.assert_close(s.gather(-1, index)[ok], r_val[ok], rtol=0, atol=1e-4)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_kernel_config_cuda(dtype):
    """The autotuner may pick any config: each one must be exact."""
    from fairseq_longmem.modules import fused_search

    q, ck, valid = make(2, 2, 100, 1500, 64, dtype=torch.float32, seed=3)
    q, ck, valid = q.to("cuda", dtype), ck.to("cuda", dtype), valid.cuda()
    ref_index, ref_ok = plain_topk_chunks(q, ck, valid, 16)
    s = torch.matmul(q.float(), ck.float().transpose(-1, -2))
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    exact = s.topk(16, dim=-1).values
    for cfg in fused_search._CONFIGS:
        index, ok = fused_search._launch(
            q, ck, valid, 16, fixed=(dict(cfg.kwargs), cfg.num_warps, cfg.num_stages)
        )
        assert torch.equal(ok, ref_ok), str(cfg)
        got = s.gather(-1, index)
        assert (got - exact).abs().max() <= 1e-4, str(cfg)


def test_memory_bank_dispatch_on_cpu_is_the_plain_path():
    from fairseq_longmem.modules import memory_bank

    torch.manual_seed(0)
    q, ck = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 40, 8)
    valid = torch.rand(2, 40) > 0.2
    a = memory_bank.search_chunks(q, ck, valid, 4)
    b = memory_bank.topk_chunks(q, ck, valid, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@cuda_only
def test_memory_bank_uses_kernel_on_cuda_and_agrees(monkeypatch):
    """A full bank on CUDA searches through the kernel and retrieves what the plain path does."""
    from fairseq_longmem.modules import fused_search
    from fairseq_longmem.modules.memory_bank import MemoryBank

    torch.manual_seed(0)
    bank = MemoryBank(2, 4, 64, memory_size=4096, chunk_size=4, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        bank.write(torch.randn(2, 4, 1024, 64, device="cuda"), torch.randn(2, 4, 1024, 64, device="cuda"))
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = fused_search.fused_topk_chunks
    monkeypatch.setattr(fused_search, "fused_topk_chunks", lambda *a: calls.append(1) or real(*a))
    fused = bank.search(q, 64)
    monkeypatch.setenv("LONGMEM_FUSED_SEARCH", "0")
    plain = bank.search(q, 64)
    assert calls, "the kernel was not used"
    # the kernel ranks by the fp32 accumulator: its chunks are the exact fp32 top-16 of
    # the bf16 inputs (score values equal); the plain path ranks scores rounded to bf16,
    # so at the boundary it may pick a chunk that only ties after rounding
    exact = torch.matmul(q.float(), bank.chunk_keys.float().transpose(-1, -2))
    want = exact.topk(16, dim=-1).values
    got = exact.gather(-1, fused.chunk_index).sort(-1, descending=True).values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    overlap = (fused.chunk_index.unsqueeze(-1) == plain.chunk_index.unsqueeze(-2)).any(-1)
    assert overlap.float().mean() > 0.95  # sets, not positions: near-ties in bf16 aside


@pytest.mark.parametrize("n", [1, 2, 6, 12, 100, 4096])
def test_scan_order_is_a_permutation_spread_over_the_memory(n):
    order = memory_bank.scan_order(n, "cpu")
    assert torch.equal(order.sort().values, torch.arange(n))
    if n >= 100:  # any 32 consecutive positions (a tile) reach every tenth of the memory
        tenth = (order * 10 // n).tolist()
        assert all(len(set(tenth[i : i + 32])) == 10 for i in range(n - 32))


@pytest.mark.parametrize("search", ["plain", "tiled"])
def test_search_in_scan_order_selects_the_same_chunks(search):
    """The permuted walk answers in ring slots: the same chunks as the plain search,
    with invalid chunks and rows with fewer valid chunks than asked (index 0 where not ok)."""
    q, ck, valid = make(2, 3, 7, 50, 8)
    valid[1, 3:] = False  # row 1: 3 valid chunks, fewer than kc
    fn = (lambda *a: tiled_topk_reference(*a, tile=16)) if search == "tiled" else plain_topk_chunks
    index, ok = memory_bank.search_in_scan_order(fn, q, ck, valid, 5)
    check_same_selection(index, ok, q, ck, valid, 5)
    assert (index[~ok] == 0).all() and (~ok[1]).any()


def test_scan_order_removes_the_cost_of_a_trend_along_the_memory():
    """Keys whose scores rise along the ring (as a segment's keys drift with position)
    make the walk in slot order insert at almost every tile; in scan order far less."""
    g = torch.Generator().manual_seed(0)
    n, d, kc = 1024, 8, 8
    trend = torch.linspace(0, 4, n, dtype=torch.float64)
    ck = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64) * 0.1
    ck[..., 0] += trend
    q = torch.randn(1, 2, 32, d, generator=g, dtype=torch.float64) * 0.1
    q[..., 0] = 1.0
    valid = torch.ones(1, n, dtype=torch.bool)
    in_order, scanned = {}, {}
    a = tiled_topk_reference(q, ck, valid, kc, tile=32, stats=in_order)
    b = memory_bank.search_in_scan_order(
        lambda *x: tiled_topk_reference(*x, tile=32, stats=scanned), q, ck, valid, kc
    )
    check_same_selection(*b, q, ck, valid, kc)
    assert torch.equal(a[0].sort(-1).values, b[0].sort(-1).values)
    assert scanned["rounds"] * 3 < in_order["rounds"], (scanned, in_order)


def test_cpu_long_segments_over_a_full_memory_use_faiss_with_the_same_chunks(monkeypatch):
    """Without the compiled CPU kernels, segments of CPU_FAISS_MIN_QUERIES+ queries over a
    full memory are searched by faiss's exact flat kernel: the same chunks as the blocked
    torch search; a memory with invalid chunks or a short segment keeps the torch path.
    (With the kernels, their search is faster than faiss and always used.)"""
    from fairseq_longmem.modules import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    calls = []
    real = memory_bank._topk_chunks_faiss
    monkeypatch.setattr(memory_bank, "_topk_chunks_faiss", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(memory_bank, "CPU_FAISS_MIN_QUERIES", 16)
    q, ck, valid = make(2, 3, 20, 64, 8, dtype=torch.float32)
    full = torch.ones_like(valid)
    index, ok = memory_bank.topk_chunks(q, ck, full, 6)
    assert calls == [1]
    check_same_selection(index, ok, q, ck, full, 6)
    few = memory_bank.topk_chunks(q, ck[:, :, :4], full[:, :4], 6)  # fewer chunks than kc
    assert calls == [1, 1]
    check_same_selection(*few, q, ck[:, :, :4], full[:, :4], 6)
    memory_bank.topk_chunks(q, ck, valid, 6)  # invalid chunks: torch
    memory_bank.topk_chunks(q[:, :, :8], ck, full, 6)  # 8 queries: torch
    assert calls == [1, 1]
