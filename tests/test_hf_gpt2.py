"""Importing local HuggingFace GPT-2 checkpoints (fairseq_longmem/hf_gpt2.py, hf_vocab.py).

Tiny GPT2LMHeadModels with random weights are built with ``transformers``,
saved with ``save_pretrained``, converted, and compared with HuggingFace on
logits and on fairseq-eval-lm perplexity (run in-process).
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from hf_models import eval_lm_inprocess, hf_perplexity, save_tiny_gpt2

pytest.importorskip("transformers")

from fairseq_longmem.errors import LongMemError  # noqa: E402
from fairseq_longmem.cli import import_hf as main  # noqa: E402
from fairseq_longmem.hf_gpt2 import HFImportError, import_hf_gpt2  # noqa: E402
from fairseq_longmem.hf_vocab import VocabMap, load_vocab_map  # noqa: E402

# (vocab, eos, positions, tied, extra config, safetensors)
SHAPES = {
    "tied-p64-v301-eos-last": dict(vocab_size=301, eos_id=300, n_positions=64, tied=True),
    "untied-p128-v257-eos0": dict(vocab_size=257, eos_id=0, n_positions=128, tied=False,
                                  n_embd=48, n_head=2),
    "tied-p128-v1001-gelu-bin": dict(vocab_size=1001, eos_id=500, n_positions=128, tied=True,
                                     activation_function="gelu", n_inner=80, safe=False),
}


def convert(tmp_path, shape):
    kw = dict(SHAPES[shape])
    safe = kw.pop("safe", True)
    hf_dir, out = tmp_path / "hf", tmp_path / "out"
    model = save_tiny_gpt2(hf_dir, kw.pop("vocab_size"), kw.pop("eos_id"), **kw)
    if not safe:  # the original GPT-2 layout: pytorch_model.bin, no "transformer." prefix,
        # causal-mask buffers, no lm_head (tied)
        (hf_dir / "model.safetensors").unlink()
        state = {k[len("transformer."):]: v for k, v in model.state_dict().items()
                 if k.startswith("transformer.")}
        n = model.config.n_positions
        state["h.0.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        torch.save(state, hf_dir / "pytorch_model.bin")
    import_hf_gpt2(hf_dir, out)
    return model, out


def load_fairseq(path):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval(), task


def binarize_random_tokens(tmp_path, out, vocab: VocabMap, n_docs=3, doc_len=150):
    """A test split of random HF tokens (never the reserved ones) in the model's dictionary."""
    g = torch.Generator().manual_seed(1)
    usable = [t for t in range(vocab.vocab_size) if t not in vocab.reserved and t != vocab.eos_id]
    sym = vocab.symbols()
    h2f = vocab.hf_to_fairseq
    lines = []
    for _ in range(n_docs):
        ids = [usable[j] for j in torch.randint(len(usable), (doc_len,), generator=g).tolist()]
        lines.append(" ".join(sym[h2f[t]] for t in ids))
    (tmp_path / "test.tok").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    data = tmp_path / "bin"
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict",
                    str(out / "dict.txt"), "--testpref", str(tmp_path / "test.tok"), "--destdir",
                    str(data), "--workers", "1"], check=True, capture_output=True)
    return data


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_converted_logits_and_eval_lm_perplexity_match_hf(tmp_path, shape):
    hf_model, out = convert(tmp_path, shape)
    fs_model, _ = load_fairseq(out / "model.pt")
    vocab = load_vocab_map(out)
    assert vocab == VocabMap(SHAPES[shape]["vocab_size"], SHAPES[shape]["eos_id"])
    assert fs_model.decoder.embed_tokens.weight.shape[0] == vocab.vocab_size
    assert fs_model.max_positions() == SHAPES[shape]["n_positions"]
    h2f = torch.tensor(vocab.hf_to_fairseq)
    pad_hf = vocab.reserved[1]
    g = torch.Generator().manual_seed(0)
    hf_ids = torch.randint(vocab.vocab_size, (3, SHAPES[shape]["n_positions"]), generator=g)
    hf_ids[hf_ids == pad_hf] = vocab.eos_id  # fairseq never sees <pad> inside text
    with torch.no_grad():
        ref = hf_model(hf_ids).logits
        got = fs_model(h2f[hf_ids])[0][..., h2f]  # fairseq columns in HF order
    assert ref.abs().max() > 1.0  # not a trivially flat model
    assert (got - ref).abs().max().item() <= 1e-4

    tps = SHAPES[shape]["n_positions"]
    data = binarize_random_tokens(tmp_path, out, vocab)
    results = eval_lm_inprocess(data, out / "model.pt", tps)
    fs_ppl = 2 ** results["loss"]
    hf_ppl, n = hf_perplexity(hf_model, data, tps, vocab)
    assert n == 3 * 151 + 2  # every token, each document's </s>, the separators
    print(f"\n{shape}: fairseq-eval-lm ppl {fs_ppl:.6f}, HF ppl {hf_ppl:.6f}, max |logit diff| {(got - ref).abs().max().item():.2e}")
    assert abs(fs_ppl - hf_ppl) / hf_ppl <= 1e-4, (fs_ppl, hf_ppl)


# --------------------------------------------------------------------------- bad input


def test_missing_folder_and_missing_weights(tmp_path, capsys):
    with pytest.raises(HFImportError, match="not found"):
        import_hf_gpt2(tmp_path / "nope", tmp_path / "out")
    assert main(["--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: HuggingFace model folder not found")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFImportError, match="no config.json"):
        import_hf_gpt2(tmp_path / "empty", tmp_path / "out")
    save_tiny_gpt2(tmp_path / "hf", 101, 100)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="has no weights"):
        import_hf_gpt2(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(HFImportError, match="cannot read the weights"):
        import_hf_gpt2(tmp_path / "hf", tmp_path / "out")


def test_weights_of_another_shape_are_refused(tmp_path):
    save_tiny_gpt2(tmp_path / "hf", 101, 100)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_positions"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFImportError, match="wpe.weight has shape"):
        import_hf_gpt2(tmp_path / "hf", tmp_path / "out")


@pytest.mark.parametrize("model_type,arch", [("gpt_neox", "GPTNeoXForCausalLM"),
                                             ("llama", "LlamaForCausalLM"),
                                             ("gpt2", "GPT2ForSequenceClassification")])
def test_unsupported_architectures_are_refused(tmp_path, model_type, arch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"model_type": model_type, "architectures": [arch], "vocab_size": 100,
         "rotary_pct": 0.25, "hidden_size": 32}))
    with pytest.raises(HFImportError, match="only the GPT-2 family.*rotary"):
        import_hf_gpt2(tmp_path / "hf", tmp_path / "out")


@pytest.mark.parametrize("change,message", [
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"activation_function": "silu"}, "no fairseq equivalent"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"eos_token_id": 5000}, "eos_token_id 5000"),
])
def test_unsupported_options_are_refused(tmp_path, change, message):
    save_tiny_gpt2(tmp_path / "hf", 101, 100)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LongMemError, match=message):
        import_hf_gpt2(tmp_path / "hf", tmp_path / "out")


def test_console_script_is_installed_and_converts(tmp_path):
    save_tiny_gpt2(tmp_path / "hf", 101, 100)
    proc = subprocess.run([sys.executable, "-c", "import sys; from fairseq_longmem.cli import import_hf as main; "
                           "sys.exit(main())", "--hf-dir", str(tmp_path / "hf"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and "vocabulary 101" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dict.txt", "hf_config.json", "hf_vocab.json", "model.pt"]
