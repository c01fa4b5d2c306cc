"""MemTRM baseline: same command as LongMem, all of it trains, its memory goes stale."""

import json
import re
import shutil

import pytest
import torch

from conftest import PLUGIN_DIR, build_longmem, build_memory_model, run_fairseq
from fairseq_longmem.eval.model_loading import load_for_eval
from fairseq_longmem.models.backbone import BackboneError
from fairseq_longmem.models.memtrm import MemTRMConfig, MemTRMModel
from fairseq_longmem.modules.decoder_layer import decoder_forward
from test_training import train_args

STEPS = 6


def build_memtrm(backbone, data, tokens_per_sample=32, **overrides):
    """A MemTRM model over the tiny backbone, built as fairseq-train builds it."""
    args = dict(pretrained_model_path=str(backbone), use_external_memory=True, memory_size=64,
                chunk_size=4, k=8, retrieval_layer_index=3, decoder_embed_dim=64)
    args.update(overrides)
    return build_memory_model(MemTRMModel, MemTRMConfig, backbone, data, tokens_per_sample, args)


def batches(task, split="valid", bsz=2, n=3):
    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_sentences=bsz).next_epoch_itr(shuffle=False)
    return [next(itr) for _ in range(n)]


def memtrm_command(data, backbone, save, steps):
    """LongMem's training command of test_training with only --arch changed."""
    args = [str(a) for a in train_args(data, backbone, save, steps, bsz=2,
                                        extra=["--disable-validation"])]
    assert args[args.index("--arch") + 1] == "longmem_tiny"
    args[args.index("--arch") + 1] = "memtrm_tiny"
    return args


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("memtrm")
    own_backbone = root / "backbone.pt"  # a private copy: removed after training
    shutil.copy(tiny_backbone, own_backbone)
    proc = run_fairseq("train", ["--user-dir", PLUGIN_DIR]
                       + memtrm_command(tiny_data, own_backbone, root / "save", STEPS))
    own_backbone.unlink()
    return root / "save" / "checkpoint_last.pt", proc.stdout + proc.stderr


def logged(log):
    out = []
    for line in log.splitlines():
        m = re.search(r"(\{.*\"num_updates\".*\})", line)
        if m and "train_inner" in line:
            out.append(json.loads(m.group(1)))
    return out


def test_trains_with_longmem_command_and_everything_trains(trained, tiny_backbone):
    ckpt, log = trained
    recs = logged(log)
    assert len(recs) == STEPS
    assert all(float(r["memory_read_frac"]) > 0 for r in recs[1:])  # memory is read
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["cfg"]["model"]["_name"] == "memtrm_tiny"
    weights = state["model"]
    bb = torch.load(tiny_backbone, map_location="cpu", weights_only=False)["model"]
    changed = 0
    for name, tensor in bb.items():
        if name.startswith("decoder.") and tensor.is_floating_point():
            mine = weights["decoder.net." + name[len("decoder."):]]
            changed += int(not torch.equal(mine, tensor))
    # every backbone weight matrix was trained (nothing frozen), layer norms included
    layer_weights = [n for n in bb if n.startswith("decoder.layers.") and n.endswith(".weight")]
    assert changed >= len(layer_weights)
    assert not torch.equal(weights["decoder.memory_gate"], torch.zeros(4))


def test_all_parameters_trainable_and_get_gradients(tiny_backbone, tiny_data):
    model, task = build_memtrm(tiny_backbone, tiny_data)
    params = dict(model.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    assert "decoder.memory_gate" in params
    model.train()
    s1, s2 = batches(task, n=2)
    model(**s1["net_input"])  # fills memory
    logits, extra = model(**s2["net_input"])
    assert float(extra["memory_stats"]["memory_read_frac"]) > 0
    logits.float().logsumexp(-1).mean().backward()
    missing = [n for n, p in params.items() if p.grad is None and "embed_positions" not in n]
    assert not missing, missing
    bank = model.decoder.memories["valid"]
    assert not bank.keys.requires_grad and not bank.values.requires_grad


def test_closed_gate_gives_backbone_logits(tiny_backbone, tiny_data):
    model, task = build_memtrm(tiny_backbone, tiny_data, memory_gate_init=-40.0)
    samples = batches(task, n=3)
    model.decoder.reset_memory()
    with torch.no_grad():
        for s in samples:
            got = model(**s["net_input"])[0]
            _, feats, _ = decoder_forward(model.decoder.net, s["net_input"]["src_tokens"])
            ref = model.decoder.net.output_layer(feats)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_reads_only_earlier_segments_of_the_same_document(tiny_backbone, tiny_data):
    model, task = build_memtrm(tiny_backbone, tiny_data, memory_gate_init=2.0)
    s1, s2 = batches(task, n=2)
    cont = dict(s1["net_input"], doc_start=torch.zeros_like(s1["net_input"]["doc_start"]))
    with torch.no_grad():
        model.decoder.reset_memory()
        base = model(**s1["net_input"])[0]
        restart = model(**s1["net_input"])[0]  # a document start again: memory is not read
        again = model(**cont)[0]  # the same text as a continuation: reads its own keys
        model.decoder.reset_memory()
        fresh = model(**cont)[0]  # continuation of nothing: empty memory
    torch.testing.assert_close(restart, base, rtol=0, atol=0)
    torch.testing.assert_close(fresh, base, rtol=0, atol=0)
    assert not torch.allclose(again, base)  # memory changes the output once filled


def test_memory_goes_stale_as_weights_train(trained, tiny_backbone, tiny_data):
    """Same input: MemTRM writes different keys after training; LongMem's writer is frozen."""
    ckpt, _ = trained
    before, task = build_memtrm(tiny_backbone, tiny_data)
    after = load_for_eval(str(ckpt), data=str(tiny_data), tokens_per_sample=32, device="cpu").model
    sample = batches(task, n=1)[0]
    written = []
    for model in (before, after):
        model.decoder.reset_memory()
        with torch.no_grad():
            _, extra = model(**sample["net_input"])
        written.append(extra["written"][0])
        bank = model.decoder.memories["valid"]
        assert int(bank.total.min()) > 0
    assert written[0].shape == written[1].shape
    assert not torch.allclose(written[0], written[1], atol=1e-3)

    # contrast: LongMem's memory comes from the frozen backbone, whatever the side weights
    lm, lm_task = build_longmem(tiny_backbone, tiny_data)
    keys = []
    for scale in (1.0, 1.5):
        with torch.no_grad():
            for p in lm.decoder.side.parameters():
                p.mul_(scale)
        lm.decoder.reset_memory()
        with torch.no_grad():
            lm(**sample["net_input"])
        keys.append(lm.decoder.memories["valid"].keys.clone())
    torch.testing.assert_close(keys[0], keys[1], rtol=0, atol=0)


def test_eval_lm_with_path_only_without_backbone_file(trained, tiny_data):
    ckpt, _ = trained  # its backbone file was deleted after training
    proc = run_fairseq("eval_lm", [tiny_data, "--user-dir", PLUGIN_DIR, "--task",
                                   "longmem_language_modeling", "--path", ckpt,
                                   "--tokens-per-sample", 32, "--batch-size", 2, "--cpu",
                                   "--gen-subset", "valid"])
    m = re.search(r"Perplexity: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m and float(m.group(1)) > 1.0


def test_bad_retrieval_layer_is_a_clear_error(tiny_backbone, tiny_data):
    with pytest.raises(BackboneError, match="retrieval-layer-index 9"):
        build_memtrm(tiny_backbone, tiny_data, retrieval_layer_index=9)
