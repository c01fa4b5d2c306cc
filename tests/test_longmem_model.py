"""LongMem model: wiring, causality, isolation, reset, frozen backbone, bad input."""

import copy

import pytest
import torch

from conftest import build_longmem
from fairseq_longmem.models.backbone import BackboneError
from fairseq_longmem.models.memory_lm import segment_boundaries
from fairseq_longmem.modules.decoder_layer import decoder_forward
from fairseq_longmem.modules.memory_bank import MemoryConfigError


def batches(task, split="train", bsz=3, n=4):
    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_sentences=bsz).next_epoch_itr(shuffle=False)
    return [next(itr) for _ in range(n)]


def run(model, samples):
    """Logits of consecutive segments, memory carried between them."""
    model.decoder.reset_memory()
    with torch.no_grad():
        return [model(**s["net_input"])[0] for s in samples]


def test_wiring_zero_side_outputs_and_closed_gate_give_backbone_logits(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=-30.0)
    side = model.decoder.side
    for layer in side.layers:
        for lin in (layer.self_attn.out_proj, layer.fc2):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    samples = batches(task, n=3)
    got = run(model, samples)
    for s, logits in zip(samples, got):
        with torch.no_grad():
            _, feats, _ = decoder_forward(model.decoder.backbone, s["net_input"]["src_tokens"])
            ref = model.decoder.backbone.output_layer(feats)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_side_layers_initialised_from_backbone(tiny_backbone, tiny_data):
    model, _ = build_longmem(tiny_backbone, tiny_data)
    bb = model.decoder.backbone
    for i, layer in enumerate(model.decoder.side.layers):
        src = bb.layers[2 * i + 1]
        for (n1, p1), (n2, p2) in zip(layer.named_parameters(), src.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    fresh, _ = build_longmem(tiny_backbone, tiny_data, reload_ptm_layer=False)
    assert not torch.equal(fresh.decoder.side.layers[0].fc1.weight, bb.layers[1].fc1.weight)


def test_backbone_frozen_and_in_eval_mode(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data)
    model.train()
    assert not model.decoder.backbone.training
    assert all(not p.requires_grad for p in model.decoder.backbone.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.side.") for n in trainable)
    s = batches(task, n=1)[0]
    logits, _ = model(**s["net_input"])
    logits.sum().backward()
    assert all(p.grad is None for p in model.decoder.backbone.parameters())
    assert model.decoder.side.memory_gate.grad is not None


def test_causality_within_and_across_segments(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data)
    samples = batches(task, n=3)
    base = run(model, samples)
    t = 20
    changed = copy.deepcopy(samples)
    src = changed[1]["net_input"]["src_tokens"]
    src[:, t:] = (src[:, t:] + 7) % 900 + 4
    got = run(model, changed)
    torch.testing.assert_close(got[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1][:, :t], base[1][:, :t], rtol=0, atol=0)
    assert not torch.allclose(got[1][:, t:], base[1][:, t:])
    # the changed segment reaches the next one only through memory
    assert not torch.allclose(got[2], base[2])


def test_isolation_between_rows(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data)
    samples = batches(task, n=4)
    base = run(model, samples)
    changed = copy.deepcopy(samples)
    for s in changed[:3]:  # rewrite row 1's history
        s["net_input"]["src_tokens"][1] = (s["net_input"]["src_tokens"][1] * 3) % 900 + 4
    got = run(model, changed)
    for b, g in zip(base, got):
        torch.testing.assert_close(g[[0, 2]], b[[0, 2]], rtol=0, atol=0)
    assert not torch.allclose(got[3][1], base[3][1])


def test_memory_is_used_and_reset_forgets(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=2.0)
    samples = batches(task, n=3)
    with_mem = run(model, samples)
    # a reset at the start of segment 2 (a new document in every row) ...
    reset = copy.deepcopy(samples)
    reset[2]["net_input"]["doc_start"][:, 0] = True
    after_reset = run(model, reset)
    # ... equals reading segment 2 with an empty memory
    model.decoder.reset_memory()
    with torch.no_grad():
        fresh = model(**samples[2]["net_input"])[0]
    torch.testing.assert_close(after_reset[2], fresh, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_mem[2], fresh, atol=1e-3)  # memory did change the logits


def test_reset_inside_a_segment_only_affects_later_positions(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=2.0)
    samples = batches(task, n=3)
    base = run(model, samples)
    mid = copy.deepcopy(samples)
    mid[2]["net_input"]["doc_start"][0, 10] = True
    got = run(model, mid)
    torch.testing.assert_close(got[2][0, :10], base[2][0, :10], rtol=0, atol=0)
    assert not torch.allclose(got[2][0, 10:], base[2][0, 10:])
    torch.testing.assert_close(got[2][1:], base[2][1:], rtol=0, atol=0)


def test_segment_boundaries():
    ds = torch.zeros(3, 8, dtype=torch.bool)
    ds[1, 3] = True
    ds[2, 2] = ds[2, 6] = True
    tokens = torch.full((3, 8), 5)
    tokens[2, 7] = 1  # pad at the tail
    qm, reset, start, end = segment_boundaries(ds, tokens, pad=1)
    assert qm[0].all() and qm[1].tolist() == [True] * 3 + [False] * 5
    assert qm[2].tolist() == [True] * 2 + [False] * 6
    assert reset.tolist() == [False, True, True]
    assert start.tolist() == [0, 3, 6] and end.tolist() == [8, 8, 7]


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        ({"retrieval_layer_index": 4}, "outside the backbone"),
        ({"k": 6}, "multiple of --chunk-size"),
        ({"memory_size": 66}, "--memory-size (66) must be a multiple"),
        ({"memory_size": 4, "k": 8}, "smaller than --k"),
        ({"decoder_embed_dim": 128}, "side network width 128 differs"),
        ({"layer_reduction_factor": 3}, "does not divide"),
        ({"pretrained_model_path": "/nonexistent/ckpt.pt"}, "backbone checkpoint not found"),
        ({"backbone_context": -1}, "--backbone-context must be >= 0"),
    ],
)
def test_bad_configuration(tiny_backbone, tiny_data, overrides, phrase):
    with pytest.raises((BackboneError, MemoryConfigError)) as err:
        build_longmem(tiny_backbone, tiny_data, **overrides)
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)


def test_corrupt_and_foreign_checkpoints(tiny_backbone, tiny_data, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(tiny_backbone.read_bytes()[:2000])
    with pytest.raises(BackboneError, match="corrupt or not a fairseq checkpoint"):
        build_longmem(bad, tiny_data)
    # a LongMem checkpoint is not a backbone
    state = torch.load(tiny_backbone, weights_only=False)
    state["cfg"]["model"]["_name"] = "longmem_tiny"
    foreign = tmp_path / "foreign.pt"
    torch.save(state, foreign)
    with pytest.raises(BackboneError, match="not a decoder-only transformer LM"):
        build_longmem(foreign, tiny_data)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(BackboneError, match="not a fairseq model checkpoint"):
        build_longmem(plain, tiny_data)


def test_dictionary_mismatch(tiny_backbone, tiny_data, tmp_path):
    other = tmp_path / "bin"
    other.mkdir()
    lines = (tiny_data / "dict.txt").read_text().splitlines()
    (other / "dict.txt").write_text("\n".join(lines[:-10]) + "\n")
    with pytest.raises(BackboneError, match="dictionary mismatch"):
        build_longmem(tiny_backbone, other)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    lines[0], lines[1] = lines[1], lines[0]
    (swapped / "dict.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(BackboneError, match="dictionary mismatch"):
        build_longmem(tiny_backbone, swapped)


def test_transformer_lm_backbone(tiny_data, tmp_path, caplog):
    """Any fairseq transformer_lm checkpoint is a backbone (learned positions here)."""
    from conftest import run_fairseq

    run_fairseq("train", [
        tiny_data, "--task", "language_modeling", "--arch", "transformer_lm",
        "--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
        "--decoder-attention-heads", 4, "--decoder-learned-pos", "--tokens-per-sample", 64,
        "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--max-update", 2,
        "--save-dir", tmp_path, "--cpu", "--disable-validation", "--no-epoch-checkpoints",
        "--sample-break-mode", "none"])
    with caplog.at_level("WARNING"):
        model, task = build_longmem(tmp_path / "checkpoint_last.pt", tiny_data,
                                    decoder_embed_dim=32, retrieval_layer_index=1)
    assert "encode absolute" in caplog.text
    assert len(model.decoder.side.layers) == 1
    logits = run(model, batches(task, n=3))
    assert all(torch.isfinite(x).all() for x in logits)
    assert model.decoder.memories["train"].fill().min() > 0
    # learned positions: the context and a segment must fit the backbone's 64
    with pytest.raises(BackboneError, match="exceeds the backbone's 64 learned positions; "
                       "lower --backbone-context to 32"):
        build_longmem(tmp_path / "checkpoint_last.pt", tiny_data, decoder_embed_dim=32,
                      retrieval_layer_index=1, backbone_context=33)
    model, task = build_longmem(tmp_path / "checkpoint_last.pt", tiny_data, decoder_embed_dim=32,
                                retrieval_layer_index=1, backbone_context=32)
    assert all(torch.isfinite(x).all() for x in run(model, batches(task, n=3)))


def _row_streams(samples):
    """Per row, the tokens of consecutive segments laid end to end, ``(bsz, n * T)``."""
    return torch.cat([s["net_input"]["src_tokens"] for s in samples], 1)


@pytest.mark.parametrize("memory", [True, False])
def test_backbone_context_reads_the_last_tokens_of_the_row_before_each_segment(
        tiny_backbone, tiny_data, memory):
    """--backbone-context C: the frozen backbone reads segment t after the row's C
    tokens before it (none at the first segment): the keys written to memory are the
    backbone's over the row's stream [a - C, a + T), cut to the segment."""
    C, T = 5, 32
    model, task = build_longmem(tiny_backbone, tiny_data, backbone_context=C,
                                memory_gate_init=2.0, use_external_memory=memory)
    samples = batches(task, n=4)
    rows = _row_streams(samples)
    model.decoder.reset_memory()
    bb = model.decoder.backbone
    for t, s in enumerate(samples):
        with torch.no_grad():
            logits, extra = model(**s["net_input"])
            a = max(0, t * T - C)
            hiddens, _, kv = decoder_forward(bb, rows[:, a:(t + 1) * T], kv_layer=3)
            c = t * T - a
            feats = model.decoder.side([h[:, c:] for h in hiddens], bb.attn_bias(T, "cpu"),
                                       memory_reader=None)
        if memory:
            torch.testing.assert_close(extra["written"][0], kv[0][:, :, c:], rtol=0, atol=1e-6)
            torch.testing.assert_close(extra["written"][1], kv[1][:, :, c:], rtol=0, atol=1e-6)
        else:  # the ablation: exactly the side network over the backbone read with context
            torch.testing.assert_close(logits, model.decoder.output_layer(feats), rtol=0,
                                       atol=1e-5)
    # a context of 0 (the paper): each segment alone
    plain, _ = build_longmem(tiny_backbone, tiny_data, memory_gate_init=2.0,
                             use_external_memory=memory)
    plain.load_state_dict(model.state_dict())
    got, ref = run(plain, samples), run(model, samples)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    assert not torch.allclose(got[1][:, :4], ref[1][:, :4], atol=1e-4)


def test_backbone_context_is_causal_and_per_row(tiny_backbone, tiny_data):
    """Without memory, segment t depends on the stream only through the C tokens
    before it; a row's context is its own."""
    C = 5
    model, task = build_longmem(tiny_backbone, tiny_data, backbone_context=C,
                                use_external_memory=False)
    samples = batches(task, n=3)
    # the collater says on the host whether every row restarts (no device sync per step)
    assert [s["net_input"]["rows_restart"] for s in samples] == [True, False, False]
    base = run(model, samples)
    early = copy.deepcopy(samples)  # tokens before the context of segment 2
    early[1]["net_input"]["src_tokens"][:, : 32 - C] += 1
    got = run(model, early)
    torch.testing.assert_close(got[2], base[2], rtol=0, atol=0)
    inside = copy.deepcopy(samples)  # the first of the context's tokens, row 1 only
    inside[1]["net_input"]["src_tokens"][1, 32 - C] += 1
    got = run(model, inside)
    torch.testing.assert_close(got[2][[0, 2]], base[2][[0, 2]], rtol=0, atol=0)
    assert not torch.allclose(got[2][1], base[2][1])
    # a new pass (first_segment) or a document starting in every row at position 0: no context
    fresh = copy.deepcopy(samples[2]["net_input"])
    fresh["doc_start"][:, 0] = True
    del fresh["rows_restart"]  # read from doc_start when the caller does not say
    model.decoder.reset_memory()
    with torch.no_grad():
        alone = model(**fresh)[0]
        run(model, samples[:2])
        after = model(**fresh)[0]
        run(model, samples[:2])
        first = model(**dict(samples[2]["net_input"], first_segment=True))[0]
        model.decoder.reset_memory()
        reset = model(**samples[2]["net_input"])[0]
    torch.testing.assert_close(after, alone, rtol=0, atol=0)
    torch.testing.assert_close(first, reset, rtol=0, atol=0)
    assert not torch.allclose(first, base[2])
