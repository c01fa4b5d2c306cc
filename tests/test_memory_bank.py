"""The exact torch memory bank against a slow brute-force reference.

Helpers here (``History``, ``check_against_reference``, ``random_run``) are
reused by test_memory_backends.py for the faiss backends.
"""

import itertools

import pytest
import torch

from fairseq_longmem.modules.memory_bank import (
    MemoryBank,
    MemoryConfigError,
    check_memory_config,
    chunk_validity,
)
from references import reference_search


class History:
    """Every key/value written to each row since its reset, in logical order."""

    def __init__(self, bsz, heads, d):
        self.keys = [torch.zeros(heads, 0, d) for _ in range(bsz)]
        self.values = [torch.zeros(heads, 0, d) for _ in range(bsz)]

    def reset(self, rows):
        for r, flag in enumerate(rows.tolist()):
            if flag:
                self.keys[r] = self.keys[r][:, :0]
                self.values[r] = self.values[r][:, :0]

    def write(self, keys, values, start, end):
        for r in range(keys.size(0)):
            s, e = int(start[r]), int(end[r])
            if e > s:
                self.keys[r] = torch.cat([self.keys[r], keys[r, :, s:e].float()], 1)
                self.values[r] = torch.cat([self.values[r], values[r, :, s:e].float()], 1)


def chunk_scores(hist_keys, total, memory_size, chunk_size, q):
    """{logical chunk: score (heads, tgt_len)} of every valid chunk of one row."""
    first = max(0, -(-(total - memory_size) // chunk_size))
    out = {}
    for j in range(first, total // chunk_size):
        ck = hist_keys[:, j * chunk_size : (j + 1) * chunk_size].mean(1)  # (h, d)
        out[j] = torch.einsum("htd,hd->ht", q.float(), ck)
    return out


def check_against_reference(bank, hist, queries, k, query_mask=None, tol=1e-4, got=None):
    """Every row/head/query retrieves the reference's chunk set (up to float ties),
    the pairs read are the tokens written, and the mask matches."""
    got = bank.search(queries, k, query_mask) if got is None else got
    c, kc = bank.chunk_size, k // bank.chunk_size
    totals = bank.total.tolist()
    for r in range(bank.num_streams):
        total = totals[r]
        ref = reference_search(hist.keys[r], total, bank.memory_size, c, queries[r], k)
        scores = chunk_scores(hist.keys[r], total, bank.memory_size, c, queries[r])
        for h, t in itertools.product(range(bank.num_heads), range(queries.size(2))):
            logical = got.chunk_logical[r, h, t].tolist()
            mine = sorted(j for j in logical if j >= 0)
            allowed = query_mask is None or bool(query_mask[r, t])
            want = ref[h][t] if allowed else []
            if mine != want:  # only a float tie at the k-th score may differ
                assert len(mine) == len(want), (r, h, t, mine, want)
                kth = min(float(scores[j][h, t]) for j in want)
                for j in set(mine) ^ set(want):
                    assert abs(float(scores[j][h, t]) - kth) < tol, (r, h, t, mine, want)
            # the mask and the pairs read match what was written
            m = got.mask[r, h, t].view(kc, c)
            for slot, j in enumerate(logical):
                assert bool(m[slot].all()) == (j >= 0) and bool(m[slot].any()) == (j >= 0)
                if j >= 0:
                    toks = slice(j * c, (j + 1) * c)
                    rk = got.keys[r, h, t, slot * c : (slot + 1) * c].float()
                    rv = got.values[r, h, t, slot * c : (slot + 1) * c].float()
                    assert torch.allclose(rk, hist.keys[r][h, toks], atol=1e-3)
                    assert torch.allclose(rv, hist.values[r][h, toks], atol=1e-3)
    return got


def random_run(bank, steps, seg_len, k, seed=0, reset_prob=0.15, windows=True, check=None):
    """Random writes (with start/end windows and resets), checked after each."""
    gen = torch.Generator().manual_seed(seed)
    bsz, heads, d = bank.num_streams, bank.num_heads, bank.head_dim
    hist = History(bsz, heads, d)
    check = check or check_against_reference
    for step in range(steps):
        if step and reset_prob:
            rows = torch.rand(bsz, generator=gen) < reset_prob
            bank.reset(rows)
            hist.reset(rows)
        keys = torch.randn(bsz, heads, seg_len, d, generator=gen)
        values = torch.randn(bsz, heads, seg_len, d, generator=gen)
        if windows:
            start = torch.randint(0, seg_len // 2 + 1, (bsz,), generator=gen)
            end = torch.maximum(start, torch.randint(seg_len // 2, seg_len + 1, (bsz,), generator=gen))
        else:
            start = torch.zeros(bsz, dtype=torch.long)
            end = torch.full((bsz,), seg_len, dtype=torch.long)
        bank.write(keys, values, start=start, end=end)
        hist.write(keys.to(bank.dtype), values.to(bank.dtype), start, end)
        queries = torch.randn(bsz, heads, 5, d, generator=gen)
        mask = torch.rand(bsz, 5, generator=gen) < 0.8
        check(bank, hist, queries, k, mask)
    return hist


SHAPES = [  # bsz, heads, d, memory, chunk, k, seg_len
    (2, 2, 8, 32, 1, 4, 5),  # chunk 1
    (3, 2, 8, 64, 4, 8, 10),  # partial chunks, ring wraps many times
    (2, 3, 16, 48, 4, 12, 7),
    (2, 1, 4, 16, 2, 4, 40),  # a segment longer than the memory
    (1, 2, 8, 64, 4, 64, 16),  # k = memory
]


@pytest.mark.parametrize("shape", SHAPES)
def test_search_equals_reference(shape):
    bsz, heads, d, memory, chunk, k, seg = shape
    bank = MemoryBank(bsz, heads, d, memory, chunk)
    random_run(bank, steps=10, seg_len=seg, k=k, seed=hash(shape) % 1000)


def test_search_equals_reference_without_windows_or_resets_fp16():
    bank = MemoryBank(2, 2, 8, 64, 4, dtype=torch.float16)
    random_run(bank, steps=8, seg_len=12, k=8, reset_prob=0, windows=False)


def test_partially_filled_and_exactly_full():
    bank = MemoryBank(1, 1, 4, 16, 4)
    hist = History(1, 1, 4)
    q = torch.randn(1, 1, 3, 4)
    for n in (2, 4, 6, 16, 4, 12):  # totals 2, 6, 12, 28 (full, chunk-aligned), 32, 44
        kv = torch.randn(1, 1, n, 4)
        bank.write(kv, kv)
        hist.write(kv, kv, torch.tensor([0]), torch.tensor([n]))
        check_against_reference(bank, hist, q, 16)
    # a full, chunk-aligned memory holds memory_size / chunk_size chunks
    valid, _ = chunk_validity(torch.tensor([16, 32, 44]), 4, 4)
    assert valid.sum(1).tolist() == [4, 4, 4]


def test_ties_are_deterministic():
    torch.manual_seed(0)
    bank = MemoryBank(2, 2, 4, 32, 4)
    key = torch.randn(2, 2, 1, 4)
    bank.write(key.expand(2, 2, 28, 4).contiguous(), torch.randn(2, 2, 28, 4))  # 7 equal chunks
    q = torch.randn(2, 2, 6, 4)
    a, b = bank.search(q, 8), bank.search(q.clone(), 8)
    for name in ("keys", "values", "mask", "chunk_index", "chunk_logical"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.mask.all()
    assert ((a.chunk_logical >= 0) & (a.chunk_logical < 7)).all()
    # two distinct chunks per query among equal ones
    assert (a.chunk_logical[..., 0] != a.chunk_logical[..., 1]).all()


def test_reset_one_row_hides_its_past_and_leaves_others():
    torch.manual_seed(1)
    bank = MemoryBank(3, 2, 8, 32, 4)
    kv = torch.randn(3, 2, 20, 8)
    bank.write(kv, kv)
    q = torch.randn(3, 2, 4, 8)
    before = bank.search(q, 8)
    bank.reset(torch.tensor([False, True, False]))
    after = bank.search(q, 8)
    assert not after.mask[1].any() and (after.chunk_logical[1] == -1).all()
    for name in ("keys", "values", "mask", "chunk_index", "chunk_logical"):
        assert torch.equal(getattr(before, name)[[0, 2]], getattr(after, name)[[0, 2]])
    assert bank.fill().tolist() == [20, 0, 20]
    # new writes of the reset row are all it retrieves: logical numbers restart at 0
    new = torch.randn(3, 2, 8, 8) + 5
    bank.write(new, new, start=torch.tensor([8, 0, 8]), end=torch.tensor([8, 8, 8]))
    got = bank.search(q, 8)
    assert set(got.chunk_logical[1].unique().tolist()) <= {0, 1}
    hist = History(3, 2, 8)
    hist.write(kv, kv, torch.tensor([0, 0, 0]), torch.tensor([20, 0, 20]))
    hist.write(new, new, torch.tensor([8, 0, 8]), torch.tensor([8, 8, 8]))
    check_against_reference(bank, hist, q, 8)


def test_rows_are_isolated():
    torch.manual_seed(2)
    banks = [MemoryBank(3, 2, 8, 32, 4) for _ in range(2)]
    q = torch.randn(3, 2, 5, 8)
    for step in range(6):
        kv = torch.randn(3, 2, 10, 8)
        other = kv.clone()
        other[1] = torch.randn(2, 10, 8) * 3  # row 1 differs between the two banks
        banks[0].write(kv, kv)
        banks[1].write(other, other, end=torch.tensor([10, 3 + step, 10]))
        if step == 3:
            banks[1].reset(torch.tensor([False, True, False]))
        a, b = banks[0].search(q, 8), banks[1].search(q, 8)
        for name in ("keys", "values", "mask", "chunk_index", "chunk_logical"):
            assert torch.equal(getattr(a, name)[[0, 2]], getattr(b, name)[[0, 2]]), name


def test_eviction_is_fifo_and_partial_chunks_wait():
    c, memory = 4, 16
    bank = MemoryBank(1, 1, 1, memory, c)
    q = torch.ones(1, 1, 1, 1)
    written = 0
    for n in (3, 1, 5, 2, 6, 3, 9, 1):
        tok = torch.arange(written, written + n, dtype=torch.float32).view(1, 1, n, 1)
        bank.write(tok, tok + 0.5)
        written += n
        got = bank.search(q, memory)
        logical = sorted(j for j in got.chunk_logical.flatten().tolist() if j >= 0)
        first = max(0, -(-(written - memory) // c))
        assert logical == list(range(first, written // c)), (written, logical)
        # every retrieved pair is the token written at that logical position
        vals = got.values[got.mask].flatten()
        keys = got.keys[got.mask].flatten()
        assert torch.equal(vals, keys + 0.5)
        want = torch.tensor([float(t) for j in logical for t in range(j * c, (j + 1) * c)])
        assert torch.equal(keys.sort().values, want)
    # the oldest chunk goes first: one more chunk evicts exactly chunk `first`
    before = set(logical)
    tok = torch.arange(written, written + c, dtype=torch.float32).view(1, 1, c, 1)
    bank.write(tok, tok)
    after = {j for j in bank.search(q, memory).chunk_logical.flatten().tolist() if j >= 0}
    assert before - after == {min(before)} and after - before == {written // c}


def test_write_cost_does_not_depend_on_fill():
    """Count ring slots a segment write changes at 10% fill and when full."""
    bsz, heads, d, memory, c, seg = 2, 2, 4, 400, 4, 40
    bank = MemoryBank(bsz, heads, d, memory, c)
    costs = []
    for fill in (0, 40, 360, 400, 1000):  # 0%, 10%, 90%, then full (evicting)
        bank.reset()
        kv = torch.randn(bsz, heads, fill, d)
        if fill:
            bank.write(kv, kv)
        keys, ck = bank.keys.clone(), bank.chunk_keys.clone()
        new = torch.randn(bsz, heads, seg, d) + 10
        bank.write(new, new, start=torch.tensor([1, 0]), end=torch.tensor([seg, seg - 3]))
        changed_tokens = (bank.keys != keys).any(-1)[..., :memory].sum(-1)
        changed_chunks = (bank.chunk_keys != ck).any(-1).sum(-1)
        assert changed_tokens.max() <= seg
        assert changed_chunks.max() <= seg // c + 2
        costs.append(dict(bank.last_write_cost))
    assert all(cost == costs[0] for cost in costs), costs
    assert costs[0] == {"token_slots": seg, "chunk_slots": seg // c + 2}


def test_bad_configs_raise():
    with pytest.raises(MemoryConfigError, match="multiple of --chunk-size"):
        check_memory_config(64, 4, 6)  # k not a multiple of chunk
    with pytest.raises(MemoryConfigError, match="--memory-size \\(66\\) must be a multiple"):
        MemoryBank(1, 1, 4, 66, 4)
    with pytest.raises(MemoryConfigError, match="smaller than --k"):
        check_memory_config(8, 4, 16)
    with pytest.raises(MemoryConfigError, match="--chunk-size must be >= 1"):
        MemoryBank(1, 1, 4, 16, 0)
    bank = MemoryBank(2, 2, 4, 16, 4)
    with pytest.raises(MemoryConfigError, match="multiple of --chunk-size"):
        bank.search(torch.randn(2, 2, 3, 4), 6)
    with pytest.raises(MemoryConfigError, match="smaller than --k"):
        bank.search(torch.randn(2, 2, 3, 4), 32)
    with pytest.raises(MemoryConfigError, match="batch of 3 x 2 x 4"):
        bank.write(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
    with pytest.raises(MemoryConfigError, match="tied to its batch size"):
        bank.search(torch.randn(2, 3, 5, 4), 4)
    with pytest.raises(MemoryConfigError, match="query_mask"):
        bank.search(torch.randn(2, 2, 5, 4), 4, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(MemoryConfigError, match="unknown memory dtype"):
        from fairseq_longmem.modules.memory_bank import resolve_dtype

        resolve_dtype("int8")


def test_queries_of_another_dtype_and_results_on_bank_device():
    bank = MemoryBank(1, 2, 8, 32, 4, dtype=torch.float16)
    kv = torch.randn(1, 2, 16, 8)
    bank.write(kv, kv)
    got = bank.search(torch.randn(1, 2, 3, 8, dtype=torch.float64), 8)
    assert got.keys.dtype == torch.float16 and got.keys.device == bank.device
    assert got.mask.all()


def test_score_blocks_give_the_same_result():
    from fairseq_longmem.modules.memory_bank import topk_chunks

    torch.manual_seed(3)
    q, ck = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 20, 8)
    valid = torch.rand(2, 20) < 0.7
    whole = topk_chunks(q, ck, valid, 4)
    blocked = topk_chunks(q, ck, valid, 4, block_elements=2 * 3 * 20 * 5)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


# ------------------------------------------------ the fast CPU search (issue 16)
def same_selection(q, ck, valid, got, ref):
    """Two exact selections agree: same ``ok``; the same scores chosen per query
    (sorted); and the same chunks wherever the reference's chosen scores have
    no tie with an unchosen one (ties may pick other chunks of equal score)."""
    (index, ok), (ref_index, ref_ok) = got, ref
    assert torch.equal(ok, ref_ok)
    scores = torch.matmul(q.float(), ck.float().transpose(-1, -2))
    n = scores.size(-1)

    def chosen(i, o):
        return scores.gather(3, i.clamp(max=n - 1)).masked_fill(~o, 0).sort(-1).values

    assert torch.equal(chosen(index, ok), chosen(ref_index, ref_ok))
    # chosen chunks are valid, and listed by decreasing score
    vals = scores.gather(3, index.clamp(max=n - 1)).masked_fill(~ok, float("-inf"))
    assert bool((vals[..., :-1] >= vals[..., 1:]).all())
    assert bool(valid[:, None, None, :].expand_as(scores).gather(3, index.clamp(max=n - 1))[ok].all())
    # no tie at the boundary of the reference's choice: the very same set
    masked = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    kth = chosen(ref_index, ref_ok)[..., :1]  # smallest chosen (0 where not ok)
    tie = ((masked == kth) & ~torch.zeros_like(masked, dtype=torch.bool).scatter(
        3, ref_index.clamp(max=n - 1), ref_ok)).any(-1)
    a = index.masked_fill(~ok, -1).sort(-1).values
    b = ref_index.masked_fill(~ref_ok, -1).sort(-1).values
    assert torch.equal(a[~tie], b[~tie])
    return int(tie.sum())


@pytest.mark.parametrize("case", range(6))
def test_cpu_search_selects_the_chunks_of_the_previous_search(case):
    """``topk_chunks`` (blocked, two-stage on CPU) against ``topk_chunks_before``
    (the single score matrix it replaced): partial and invalid chunks, fewer
    valid chunks than asked, ties, block sizes that split queries and rows."""
    from fairseq_longmem.modules.memory_bank import group_size, topk_chunks
    from references import topk_chunks_before

    g = torch.Generator().manual_seed(case)
    bsz, heads, t, d = 2, 3, [37, 1, 64, 16, 5, 33][case], [8, 4, 16, 8, 3, 8][case]
    n, kc = [2048, 64, 512, 256, 40, 512][case], [8, 4, 16, 4, 12, 32][case]
    q = torch.randn(bsz, heads, t, d, generator=g)
    ck = torch.randn(bsz, heads, n, d, generator=g)
    if case in (1, 3):  # ties: integer scores, many equal
        q, ck = q.round(), ck.round()
    fill = [1.0, 0.5, 0.3, 1.0, 0.2, 0.05][case]
    valid = torch.rand(bsz, n, generator=g) < fill
    ref = topk_chunks_before(q, ck, valid, kc)
    for block in (None, n, 3 * n + 1, 1 << 30):
        same_selection(q, ck, valid, topk_chunks(q, ck, valid, kc, block_elements=block), ref)
    if case == 0:
        assert group_size(n, kc) > 1  # the two-stage path ran


def test_two_stage_topk_is_exact():
    from fairseq_longmem.modules.memory_bank import blocked_topk

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 256, generator=g)
    scores[0] = torch.arange(256.0)  # the largest all in one group's neighbourhood
    scores[1, 7::64] = 100.0  # the top-4 all in one group (j = 7)
    scores[2] = 1.0  # all tied
    for g_ in (1, 2, 4, 8):
        values, cols = blocked_topk(scores, 6, g_)
        ref = scores.topk(6, dim=-1).values
        assert torch.equal(values, ref)
        assert torch.equal(scores.gather(1, cols), values)
        assert bool((cols.sort(-1).values[:, 1:] != cols.sort(-1).values[:, :-1]).all())


def test_gather_by_chunk_matches_per_token_indexing():
    from fairseq_longmem.modules.memory_bank import gather_chunk_tokens

    store = torch.randn(2, 3, 4 * 10 + 1, 5)
    index = torch.randint(0, 10, (2, 3, 7, 3))
    token = index.unsqueeze(-1) * 4 + torch.arange(4)  # (2, 3, 7, 3, 4)
    ref = torch.stack([
        torch.stack([store[b, h][token[b, h].reshape(7, 12)] for h in range(3)]) for b in range(2)
    ])
    assert torch.equal(gather_chunk_tokens(store, index, 4), ref)
    # a non-contiguous store takes the per-token path
    wide = torch.randn(2, 3, 41, 10)
    assert torch.equal(gather_chunk_tokens(wide[..., :5], index, 4),
                       gather_chunk_tokens(wide[..., :5].contiguous(), index, 4))
