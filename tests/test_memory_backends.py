"""Every memory backend against the exact reference; isolation, reset, eviction,
save/load round trips and every bad save/load input.

Recall floors (stated in docs/memory.md): on iid Gaussian keys (the hardest case
for an index: no structure), 512 chunks of 16 dims per (stream, head),
faiss-ivf with nlist 8 / nprobe 6 must reach recall@k >= 0.9 and faiss-hnsw
(M 8, efSearch 32, 4 blocks) >= 0.95. faiss is a hard dependency: nothing here
is skipped.
"""

import types

import faiss  # hard dependency: fail loudly if missing
import pytest
import torch

from fairseq_longmem.modules.memory_bank import MemoryConfigError
from references import reference_search
from fairseq_longmem.modules.memory_factory import MEMORY_BACKENDS, build_memory
from fairseq_longmem.modules.memory_spec import MemorySpec
from fairseq_longmem.modules.memory_io import FORMAT_VERSION, load_memory, read_memory_header, save_memory
from test_memory_bank import History, check_against_reference, random_run

EXACT = ["torch", "faiss-flat"]
APPROX = ["faiss-ivf", "faiss-hnsw"]
FIELDS = ("keys", "values", "mask", "chunk_index", "chunk_logical")

# small indexes that are really approximate (more than one list / block)
SMALL_KNOBS = dict(ivf_nlist=8, ivf_nprobe=6, hnsw_m=8, hnsw_ef_search=32, hnsw_blocks=4)


def make(backend, bsz=2, heads=2, d=8, memory=64, chunk=4, dtype=torch.float32,
         knobs=SMALL_KNOBS):
    spec = MemorySpec(memory_size=memory, chunk_size=chunk, k=chunk, backend=backend, **knobs)
    return build_memory(spec, bsz, heads, d, dtype)


def same(a, b, rows=None):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if rows is not None:
            x, y = x[rows], y[rows]
        assert torch.equal(x, y), name


def check_valid(bank, hist, queries, k, query_mask=None):
    """Approximate backends: whatever comes back is valid, in-row, correctly read."""
    got = bank.search(queries, k, query_mask)
    c, kc = bank.chunk_size, k // bank.chunk_size
    for r, total in enumerate(bank.total.tolist()):
        first, last = max(0, -(-(total - bank.memory_size) // c)), total // c
        for h in range(bank.num_heads):
            for t in range(queries.size(2)):
                logical = [j for j in got.chunk_logical[r, h, t].tolist() if j >= 0]
                assert len(set(logical)) == len(logical)
                assert all(first <= j < last for j in logical), (logical, first, last)
                if query_mask is not None and not query_mask[r, t]:
                    assert not logical
                for slot, j in enumerate(got.chunk_logical[r, h, t].tolist()):
                    if j >= 0:
                        rk = got.keys[r, h, t, slot * c : (slot + 1) * c].float()
                        assert torch.allclose(rk, hist.keys[r][h, j * c : (j + 1) * c], atol=1e-3)
                m = got.mask[r, h, t].view(kc, c)
                assert torch.equal(m.all(-1), got.chunk_logical[r, h, t] >= 0)
    return got


def recall(bank, hist, queries, k):
    got = bank.search(queries, k)
    hits = want = 0
    for r, total in enumerate(bank.total.tolist()):
        ref = reference_search(hist.keys[r], total, bank.memory_size, bank.chunk_size, queries[r], k)
        for h in range(bank.num_heads):
            for t in range(queries.size(2)):
                mine = set(got.chunk_logical[r, h, t].tolist()) - {-1}
                hits += len(mine & set(ref[h][t]))
                want += len(ref[h][t])
    return hits / max(1, want)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("shape", [(2, 2, 8, 32, 1, 4, 5), (3, 2, 8, 64, 4, 8, 10), (2, 1, 4, 16, 2, 4, 40)])
def test_exact_backends_equal_reference(backend, shape):
    bsz, heads, d, memory, chunk, k, seg = shape
    random_run(make(backend, bsz, heads, d, memory, chunk), steps=8, seg_len=seg, k=k, seed=7)


@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
def test_every_backend_exact_on_tiny_memories(backend):
    """Memories too small for an index (IVF: one list; HNSW: blocks of 2 chunks
    searched with efSearch >= their size) must still be exact and honour windows."""
    bank = make(backend, 3, 2, 8, 64, 4, knobs={})
    random_run(bank, steps=8, seg_len=10, k=8, seed=3)
    # writes longer than the memory (chunks evicted before ever being indexed)
    bank = make(backend, 2, 2, 4, 16, 2, knobs=dict(hnsw_blocks=2))
    random_run(bank, steps=8, seg_len=21, k=4, seed=4)


def test_ivf_is_exact_until_trained_then_approximate():
    bank = make("faiss-ivf", 2, 2, 16, 2048, 4)
    assert bank.nlist == 8 and bank.train_size == 320
    hist = History(2, 2, 16)
    g = torch.Generator().manual_seed(0)
    for step in range(6):  # 1,200 tokens = 300 chunks < train_size: exact
        kv = torch.randn(2, 2, 200, 16, generator=g)
        bank.write(kv, kv)
        hist.write(kv, kv, torch.zeros(2, dtype=torch.long), torch.full((2,), 200))
        check_against_reference(bank, hist, torch.randn(2, 2, 4, 16, generator=g), 16)
    assert not bank._trained.any()
    kv = torch.randn(2, 2, 200, 16, generator=g)
    bank.write(kv, kv)
    hist.write(kv, kv, torch.zeros(2, dtype=torch.long), torch.full((2,), 200))
    assert bank._trained.all()
    check_valid(bank, hist, torch.randn(2, 2, 4, 16, generator=g), 16)


@pytest.mark.parametrize("backend,floor", [("faiss-ivf", 0.9), ("faiss-hnsw", 0.95)])
def test_approximate_backends_recall(backend, floor):
    bank = make(backend, 2, 2, 16, 2048, 4)
    hist = History(2, 2, 16)
    g = torch.Generator().manual_seed(1)
    for step in range(12):  # 3,072 tokens into 2,048: the ring wraps, blocks are evicted
        kv = torch.randn(2, 2, 256, 16, generator=g)
        start = torch.tensor([0, step % 3])
        bank.write(kv, kv, start=start, end=torch.full((2,), 256))
        hist.write(kv, kv, start, torch.full((2,), 256))
        q = torch.randn(2, 2, 8, 16, generator=g)
        check_valid(bank, hist, q, 16, torch.rand(2, 8, generator=g) < 0.8)
    q = torch.randn(2, 2, 50, 16, generator=g)
    assert recall(bank, hist, q, 16) >= floor


# ------------------------------------------------------- isolation, reset, FIFO
@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
def test_isolation_and_reset(backend):
    torch.manual_seed(2)
    a, b = make(backend, 3, 2, 16, 512, 4), make(backend, 3, 2, 16, 512, 4)
    q = torch.randn(3, 2, 6, 16)
    for step in range(8):
        kv = torch.randn(3, 2, 96, 16)
        other = kv.clone()
        other[1] = torch.randn(2, 96, 16) * 3  # only row 1 differs
        a.write(kv, kv)
        b.write(other, other, end=torch.tensor([96, 20 + step, 96]))
        if step == 5:
            b.reset(torch.tensor([False, True, False]))
        same(a.search(q, 8), b.search(q, 8), rows=[0, 2])
    # reset of one row hides everything it wrote before, others untouched
    before = a.search(q, 8)
    a.reset(torch.tensor([True, False, False]))
    after = a.search(q, 8)
    assert not after.mask[0].any() and (after.chunk_logical[0] == -1).all()
    same(before, after, rows=[1, 2])
    new = torch.randn(3, 2, 12, 16) + 4
    a.write(new, new, start=torch.tensor([0, 12, 12]))
    got = a.search(q, 8)
    assert set(got.chunk_logical[0].unique().tolist()) - {-1} <= {0, 1, 2}
    assert got.mask[0].any()
    for h in range(2):
        for t in range(6):
            for slot, j in enumerate(got.chunk_logical[0, h, t].tolist()):
                if j >= 0:
                    assert torch.equal(got.keys[0, h, t, slot * 4 : (slot + 1) * 4],
                                       new[0, h, j * 4 : (j + 1) * 4])
    same(before, got, rows=[1, 2])


@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
def test_eviction_is_fifo(backend):
    c, memory = 4, 64
    bank = make(backend, 1, 1, 2, memory, c, knobs=dict(
        ivf_nlist=1, ivf_nprobe=1, hnsw_blocks=4, hnsw_ef_search=64))
    q = torch.tensor([[[[1.0, 0.0]]]])
    written = 0
    for n in (3, 9, 14, 1, 30, 7, 22, 40, 2):
        tok = torch.arange(written, written + n, dtype=torch.float32)
        kv = torch.stack([tok, -tok], -1).view(1, 1, n, 2)
        bank.write(kv, kv)
        written += n
        got = bank.search(q, memory)
        logical = sorted(j for j in got.chunk_logical.flatten().tolist() if j >= 0)
        first = max(0, -(-(written - memory) // c))
        assert logical == list(range(first, written // c)), (backend, written, logical)
        keys = got.keys[got.mask][:, 0]
        want = torch.tensor([float(t) for j in logical for t in range(j * c, (j + 1) * c)])
        assert torch.equal(keys.sort().values, want)


@pytest.mark.parametrize("backend", APPROX)
def test_index_write_cost_does_not_depend_on_fill(backend):
    """Index entries a segment write adds/removes: the same at 10% fill and full."""
    bank = make(backend, 2, 2, 8, 2048, 4)
    seg = 128
    g = torch.Generator().manual_seed(0)
    costs = {}
    kv = torch.randn(2, 2, 2048, 8, generator=g)
    bank.write(kv, kv)  # IVF: trains the quantizers, which resets keep
    for fill in (205, 2048, 6000):
        bank.reset()
        kv = torch.randn(2, 2, fill, 8, generator=g)
        bank.write(kv, kv)
        kv = torch.randn(2, 2, seg, 8, generator=g)
        bank.write(kv, kv)
        costs[fill] = bank.last_write_cost
    for cost in costs.values():
        assert cost["index_added"] == 2 * 2 * seg // 4
    assert costs[205]["index_removed"] == 0
    assert costs[6000]["index_removed"] == (2 * 2 * seg // 4 if backend == "faiss-ivf" else 0)


# ------------------------------------------------------------------ save/load
@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip(backend, dtype, tmp_path):
    bank = make(backend, 2, 2, 16, 2048, 4, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    for step in range(10):
        kv = torch.randn(2, 2, 256, 16, generator=g)
        bank.write(kv, kv, start=torch.tensor([0, 3]))
    if backend == "faiss-ivf":
        assert bank._trained.all()
    meta = {"backbone_sha": "abc123", "retrieval_layer_index": 17}
    path = save_memory(bank, tmp_path / "mem.pt", meta)
    assert not list(tmp_path.glob("*.tmp-*"))
    expected = {"backend": backend, "num_heads": 2, "memory_size": 2048, "dtype": dtype,
                "backbone_sha": "abc123", "retrieval_layer_index": 17}
    loaded = load_memory(path, expected)
    assert type(loaded) is type(bank) and loaded.dtype == dtype
    q = torch.randn(2, 2, 20, 16, generator=g)
    mask = torch.rand(2, 20, generator=g) < 0.9
    same(bank.search(q, 16, mask), loaded.search(q, 16, mask))
    assert read_memory_header(path)["meta"] == meta
    # both keep working alike (HNSW: new graph levels come from a fresh RNG, so
    # only the exact/IVF backends are bit-identical after further writes)
    for step in range(3):
        kv = torch.randn(2, 2, 256, 16, generator=g)
        bank.write(kv, kv)
        loaded.write(kv, kv)
        bank.reset(torch.tensor([step == 1, False]))
        loaded.reset(torch.tensor([step == 1, False]))
        if backend != "faiss-hnsw":
            same(bank.search(q, 16), loaded.search(q, 16))
        else:
            a, b = bank.search(q, 16), loaded.search(q, 16)
            overlap = (a.chunk_logical.unsqueeze(-1) == b.chunk_logical.unsqueeze(-2)).any(-1)
            assert overlap.float().mean() > 0.9


def _saved(tmp_path, backend="torch"):
    bank = make(backend, 2, 2, 8, 64, 4)
    kv = torch.randn(2, 2, 20, 8)
    bank.write(kv, kv)
    return save_memory(bank, tmp_path / "mem.pt", {"backbone_sha": "abc"})


@pytest.mark.parametrize(
    "field,value",
    [("backend", "faiss-flat"), ("num_streams", 3), ("num_heads", 4), ("head_dim", 16),
     ("memory_size", 128), ("chunk_size", 2), ("dtype", "fp16"), ("backbone_sha", "def")],
)
def test_load_mismatch_names_field_values_and_fix(tmp_path, field, value):
    path = _saved(tmp_path)
    with pytest.raises(MemoryConfigError) as err:
        load_memory(path, {field: value})
    msg = str(err.value)
    assert "\n" not in msg and field in msg and repr(value) in msg and "delete" in msg


def test_load_missing_expected_field(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(MemoryConfigError, match="records no 'corpus'"):
        load_memory(path, {"corpus": "pg19"})


def test_load_missing_file(tmp_path):
    with pytest.raises(MemoryConfigError, match="no memory file at .*fix the path"):
        load_memory(tmp_path / "nope.pt")


@pytest.mark.parametrize("backend", ["torch", "faiss-ivf"])
def test_load_truncated_or_corrupt(tmp_path, backend):
    path = _saved(tmp_path, backend)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryConfigError, match="truncated or corrupt.*rebuild"):
        load_memory(path)
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(MemoryConfigError, match="truncated or corrupt"):
        load_memory(path)


def test_load_other_format_version_and_foreign_file(tmp_path):
    path = _saved(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["format_version"] = FORMAT_VERSION + 1
    torch.save(blob, path)
    with pytest.raises(MemoryConfigError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_memory(path)
    torch.save({"model": torch.zeros(2)}, path)
    with pytest.raises(MemoryConfigError, match="not a fairseq-longmem memory file"):
        load_memory(path)


def test_load_inconsistent_state(tmp_path):
    path = _saved(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["state"]["keys"] = blob["state"]["keys"][:, :1]
    torch.save(blob, path)
    with pytest.raises(MemoryConfigError, match="'keys'.*rebuild"):
        load_memory(path)
    del blob["state"]["keys"]
    torch.save(blob, path)
    with pytest.raises(MemoryConfigError, match="corrupt"):
        load_memory(path)


def test_save_is_atomic_and_meta_cannot_shadow_config(tmp_path, monkeypatch):
    bank = make("torch")
    path = save_memory(bank, tmp_path / "sub" / "mem.pt", {"x": 1})
    first = path.read_bytes()
    with pytest.raises(MemoryConfigError, match="shadow"):
        save_memory(bank, path, {"memory_size": 1})
    assert path.read_bytes() == first

    class Boom(Exception):
        pass

    def half_written(obj, f, *a, **kw):  # the disk fills up mid-save
        open(f, "wb").write(b"partial")
        raise Boom()

    monkeypatch.setattr("fairseq_longmem.modules.memory_io.torch.save", half_written)
    with pytest.raises(Boom):
        save_memory(bank, path, {"x": 2})
    assert path.read_bytes() == first and not list(path.parent.glob("*.tmp-*"))


def test_spec_refuses_bad_knobs():
    with pytest.raises(MemoryConfigError, match="unknown --memory-backend 'annoy'"):
        MemorySpec(memory_size=16, chunk_size=4, k=4, backend="annoy")
    with pytest.raises(MemoryConfigError, match="--memory-ivf-nprobe must be >= 1"):
        MemorySpec(memory_size=16, chunk_size=4, k=4, ivf_nprobe=0)
    with pytest.raises(MemoryConfigError, match="--memory-hnsw-m must be >= 2"):
        MemorySpec(memory_size=16, chunk_size=4, k=4, hnsw_m=1)
    with pytest.raises(MemoryConfigError, match="unknown memory dtype"):
        MemorySpec(memory_size=16, chunk_size=4, k=4, dtype="int8")


def test_spec_from_a_model_config_and_its_flags():
    """Every spec field comes from a model flag; flags absent from an old config
    take the defaults."""
    from fairseq_longmem.models.memory_lm import MemoryLMConfig
    from fairseq_longmem.modules.memory_spec import CONFIG_FIELDS

    cfg = MemoryLMConfig(memory_size=128, chunk_size=8, k=16, memory_backend="faiss-hnsw",
                         memory_hnsw_blocks=3, memory_ivf_niter=5)
    spec = MemorySpec.from_config(cfg)
    assert (spec.memory_size, spec.chunk_size, spec.k, spec.backend) == (128, 8, 16, "faiss-hnsw")
    assert spec.hnsw_blocks == 3 and spec.ivf_niter == 5
    assert all(hasattr(cfg, flag) for flag in CONFIG_FIELDS.values())
    old = types.SimpleNamespace(memory_size=64, chunk_size=4, k=8)
    assert MemorySpec.from_config(old) == MemorySpec(64, 4, 8)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss here has GPU support")
def test_gpu_search_without_gpu_faiss_is_an_error():
    spec = MemorySpec(memory_size=16, chunk_size=4, k=4, backend="faiss-flat",
                      use_gpu_to_search=True)
    with pytest.raises(MemoryConfigError, match="--use-gpu-to-search: this faiss build has no GPU"):
        build_memory(spec, 1, 1, 4)


@pytest.mark.parametrize("backend", APPROX)
def test_search_exact_is_the_torch_search(backend):
    """search_exact (the recall reference) ignores the index: it equals torch."""
    a, b = make(backend, 2, 2, 16, 2048, 4), make("torch", 2, 2, 16, 2048, 4)
    g = torch.Generator().manual_seed(5)
    for _ in range(9):
        kv = torch.randn(2, 2, 256, 16, generator=g)
        a.write(kv, kv)
        b.write(kv, kv)
    q = torch.randn(2, 2, 10, 16, generator=g)
    same(a.search_exact(q, 16), b.search(q, 16))


def test_cpu_chunk_keys_are_fp32_and_banks_move(tmp_path):
    bank = make("faiss-flat", 1, 2, 8, 64, 4, dtype=torch.float16)
    assert bank.chunk_keys.dtype == torch.float32 and bank._mirror is None
    kv = torch.randn(1, 2, 30, 8)
    bank.write(kv, kv)
    q = torch.randn(1, 2, 3, 8)
    before = bank.search(q, 8)
    # a file whose chunk keys are in the memory dtype (saved from a GPU bank) loads on CPU
    path = save_memory(bank, tmp_path / "m.pt")
    blob = torch.load(path, weights_only=True)
    blob["state"]["chunk_keys"] = blob["state"]["chunk_keys"].half()
    torch.save(blob, path)
    loaded = load_memory(path)
    assert loaded.chunk_keys.dtype == torch.float32
    assert torch.equal(loaded.search(q, 8).chunk_logical, before.chunk_logical)
    assert bank.to("cpu") is bank and torch.equal(bank.search(q, 8).chunk_logical, before.chunk_logical)
