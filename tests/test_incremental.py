"""Incremental decoding (fairseq's incremental_state) equals the segment-wise full forward.

Semantics (docs/generation.md): the history is cut into segments of T tokens from
its start; a token sees its own segment up to itself locally and the earlier
segments through memory. The reference is the training/eval forward of the same
history, segment by segment, memory carried between segments.
"""

import pytest
import torch

from conftest import build_longmem, setup_stream_task
from test_memtrm import build_memtrm
from fairseq_longmem.errors import MemoryConfigError
from fairseq_longmem.models.backbone import load_backbone
from fairseq_longmem.modules.decoder_layer import decoder_forward
from fairseq_longmem.modules.memory_bank import MemoryBank

TOL = 1e-4
T = 32


def random_history(vocab: int, bsz: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (bsz, length), generator=g)


def doc_starts(bsz: int, length: int, starts):
    ds = torch.zeros(bsz, length, dtype=torch.bool)
    for row, positions in enumerate(starts):
        for p in positions:
            ds[row, p] = True
    return ds


@torch.no_grad()
def full_logits(model, tokens, doc_start=None, seg_len=T):
    """The stream forward: segments of seg_len, memory carried over."""
    model.decoder.reset_memory("ref")
    outs = []
    for a in range(0, tokens.size(1), seg_len):
        seg = tokens[:, a : a + seg_len]
        ds = doc_start[:, a : a + seg_len] if doc_start is not None else None
        outs.append(model(src_tokens=seg, doc_start=ds, memory_key="ref")[0])
    model.decoder.reset_memory("ref")
    return torch.cat(outs, 1)


@torch.no_grad()
def step_logits(decoder, tokens, doc_start=None, state=None, start=0):
    """One token per call through ``decoder.forward(..., incremental_state=...)``."""
    state = {} if state is None else state
    outs = []
    for t in range(start, tokens.size(1)):
        kw = {"doc_start": doc_start[:, : t + 1]} if doc_start is not None else {}
        outs.append(decoder(tokens[:, : t + 1], incremental_state=state, **kw)[0][:, -1])
    return torch.stack(outs, 1), state


@pytest.fixture(scope="module")
def longmem(tiny_backbone, tiny_data):
    # memory of 64 tokens = 2 segments: full (evicting) from the fourth segment on
    return build_longmem(tiny_backbone, tiny_data, tokens_per_sample=T)[0]


@pytest.fixture(scope="module")
def longmem_ctx(tiny_backbone, tiny_data):
    """--backbone-context 5: the backbone reads each segment after the 5 tokens before it."""
    return build_longmem(tiny_backbone, tiny_data, tokens_per_sample=T, backbone_context=5)[0]


@pytest.fixture(scope="module")
def longmem_ctx_long(tiny_backbone, tiny_data):
    """A context longer than a segment (40 > 32)."""
    return build_longmem(tiny_backbone, tiny_data, tokens_per_sample=T, backbone_context=40)[0]


@pytest.fixture(scope="module")
def memtrm(tiny_backbone, tiny_data):
    return build_memtrm(tiny_backbone, tiny_data, tokens_per_sample=T)[0]


def check_equal(model, length=5 * T + 11, starts=((0, 75), (0, 100))):
    vocab = len(model.decoder.dictionary)
    tokens = random_history(vocab, len(starts), length)
    ds = doc_starts(len(starts), length, starts)
    ref = full_logits(model, tokens, ds)
    got, state = step_logits(model.decoder, tokens, ds)
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"incremental vs full forward: max abs diff {diff}"
    return state, tokens, ds, ref


@pytest.mark.parametrize("name", ["longmem", "memtrm", "longmem_ctx", "longmem_ctx_long"])
def test_every_step_equals_full_forward(name, request):
    """Several window boundaries, a document reset mid-segment, memory full (eviction)."""
    model = request.getfixturevalue(name)
    state, *_ = check_equal(model)
    seg = next(iter(state.values()))
    assert seg.bank.total.max().item() > seg.bank.memory_size  # eviction happened
    assert seg.pos == 11


def test_memory_changes_the_logits(longmem):
    """The equality is not vacuous: without memory the same steps give other logits."""
    vocab = len(longmem.decoder.dictionary)
    tokens = random_history(vocab, 1, 3 * T + 5)
    with_mem, _ = step_logits(longmem.decoder, tokens)
    longmem.decoder.cfg.use_external_memory = False
    try:
        without, _ = step_logits(longmem.decoder, tokens)
    finally:
        longmem.decoder.cfg.use_external_memory = True
    assert (with_mem[:, :T] - without[:, :T]).abs().max() < TOL  # first segment: no memory
    assert (with_mem[:, T:] - without[:, T:]).abs().max() > 1e-2


@pytest.mark.parametrize("context", [0, 5])
def test_no_memory_ablation_equals_full_forward(tiny_backbone, tiny_data, context):
    model = build_longmem(tiny_backbone, tiny_data, tokens_per_sample=T,
                          use_external_memory=False, backbone_context=context)[0]
    check_equal(model, length=3 * T + 3, starts=((0,),))


def test_backbone_context_changes_generation(longmem, longmem_ctx):
    """The context equality is not vacuous: the same weights read each segment
    alone give other logits from the second segment on."""
    longmem_ctx.load_state_dict(longmem.state_dict())
    tokens = random_history(len(longmem.decoder.dictionary), 1, 2 * T + 3)
    alone, _ = step_logits(longmem.decoder, tokens)
    after, _ = step_logits(longmem_ctx.decoder, tokens)
    assert (alone[:, :T] - after[:, :T]).abs().max() < TOL
    assert (alone[:, T:T + 2] - after[:, T:T + 2]).abs().max() > 1e-3


def test_alibi_lm_every_step_equals_segment_forward(tiny_backbone, tiny_data):
    task = setup_stream_task(tiny_data, 64)
    model = load_backbone(str(tiny_backbone), task)[0]
    model.eval()
    decoder = model.decoder
    seg_len = decoder.segment_length()
    tokens = random_history(len(decoder.dictionary), 2, 2 * seg_len + 7)
    with torch.no_grad():
        ref = torch.cat([
            decoder.output_layer(decoder_forward(decoder, tokens[:, a : a + seg_len])[1])
            for a in range(0, tokens.size(1), seg_len)
        ], 1)
    got, _ = step_logits(decoder, tokens)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["longmem", "longmem_ctx", "longmem_ctx_long"])
def test_pieces_and_read_context_equal_steps(name, request):
    """Feeding several tokens per call, or reading a context batched over segments,
    leaves the same state as single steps."""
    longmem = request.getfixturevalue(name)
    decoder = longmem.decoder
    tokens = random_history(len(decoder.dictionary), 1, 4 * T + 9, seed=3)
    ref = full_logits(longmem, tokens)
    for cut in (T, 3 * T, 3 * T + 5, 4 * T + 1):
        with torch.no_grad():
            decoder.set_generation_context(decoder.read_context(tokens[0, :cut]))
            try:
                got, _ = step_logits(decoder, tokens[:, cut:])
            finally:
                decoder.set_generation_context(None)
        assert (got - ref[:, cut:]).abs().max().item() <= TOL, cut
    state = {}
    with torch.no_grad():
        a = decoder(tokens[:, :50], incremental_state=state)[0]
        b = decoder(tokens[:, :T * 3 + 2], incremental_state=state)[0]
    assert (torch.cat([a, b], 1) - ref[:, : 3 * T + 2]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["longmem", "memtrm", "longmem_ctx"])
def test_reorder_includes_memory_rows(name, request):
    """Beam search's reorder (rows repeated and swapped) moves caches and memory rows."""
    model = request.getfixturevalue(name)
    decoder = model.decoder
    vocab = len(decoder.dictionary)
    t0 = 3 * T + 6
    hist = random_history(vocab, 2, t0, seed=1)
    cont = random_history(vocab, 3, 2 * T, seed=2)
    _, state = step_logits(decoder, hist)
    order = torch.tensor([1, 1, 0])
    decoder.reorder_incremental_state_scripting(state, order)
    full = torch.cat([hist[order], cont], 1)
    got, _ = step_logits(decoder, full, state=state, start=t0)
    ref = full_logits(model, full)[:, t0:]
    assert (got - ref).abs().max().item() <= TOL


def test_sequence_generator_beam_scores_match_full_forward(longmem):
    """fairseq's SequenceGenerator (beam 3) over a primed context: each hypothesis'
    positional scores are the full forward's log-probs of its tokens."""
    from fairseq.sequence_generator import SequenceGenerator

    decoder = longmem.decoder
    d = decoder.dictionary
    ctx = random_history(len(d), 1, 2 * T + 20, seed=5)[0]
    decoder.set_generation_context(decoder.read_context(ctx))
    try:
        gen = SequenceGenerator([longmem], d, beam_size=3, max_len_a=0, max_len_b=20,
                                min_len=20, max_len=1000, normalize_scores=False)
        sample = {"net_input": {"src_tokens": torch.full((1, 1), d.eos()),
                                "src_lengths": torch.tensor([1])}}
        with torch.no_grad():
            hypos = gen.generate([longmem], sample)[0]
    finally:
        decoder.set_generation_context(None)
    assert len(hypos) == 3
    for hypo in hypos:
        toks = hypo["tokens"][:-1]  # without the final </s>
        history = torch.cat([ctx, torch.tensor([d.eos()]), toks])[None]
        lp = torch.log_softmax(full_logits(longmem, history)[0], -1)
        pos = len(ctx) + torch.arange(len(toks))
        ref = lp[pos, toks]
        assert (hypo["positional_scores"][:-1] - ref).abs().max().item() <= TOL


def test_memory_bank_reorder_rows():
    bank = MemoryBank(2, 1, 4, memory_size=8, chunk_size=2)
    k = torch.randn(2, 1, 6, 4)
    bank.write(k, k + 1)
    q = torch.randn(2, 1, 3, 4)
    before = bank.search(q, 4)
    bank.reorder_rows(torch.tensor([1, 1, 0]))
    assert bank.num_streams == 3 and bank.total.tolist() == [6, 6, 6]
    after = bank.search(q[[1, 1, 0]], 4)
    for i, j in enumerate([1, 1, 0]):
        torch.testing.assert_close(after.keys[i], before.keys[j])
        torch.testing.assert_close(after.values[i], before.values[j])


def test_faiss_ivf_refuses_beam_reorder():
    from fairseq_longmem.modules.memory_factory import build_memory
    from fairseq_longmem.modules.memory_spec import MemorySpec

    spec = MemorySpec(memory_size=64, chunk_size=4, k=8, backend="faiss-ivf")
    bank = build_memory(spec, 2, 1, 4)
    bank.reorder_rows(torch.tensor([0, 1]))  # nothing moves: fine
    with pytest.raises(MemoryConfigError, match="cannot reorder memory rows"):
        bank.reorder_rows(torch.tensor([1, 1]))
    flat = build_memory(spec.replace(backend="faiss-flat"), 2, 1, 4)
    flat.write(torch.randn(2, 1, 8, 4), torch.randn(2, 1, 8, 4))
    flat.reorder_rows(torch.tensor([1, 1, 0]))
    assert flat.num_streams == 3
