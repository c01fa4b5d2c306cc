"""Tokenizing with an imported backbone's HF tokenizer (preprocess/hf_tokenizer.py) and
adapting LongMem over the imported backbone (models/backbone.py with a transformer_lm)."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import PLUGIN_DIR, build_longmem, run_fairseq
from hf_models import build_hf_pipeline, eval_lm_inprocess, hf_perplexity

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fairseq_longmem.errors import LongMemError  # noqa: E402
from fairseq_longmem.hf_vocab import load_vocab_map  # noqa: E402
from fairseq_longmem.preprocess.documents import PreprocessError  # noqa: E402
from fairseq_longmem.preprocess.hf_tokenizer import HFTokenizerEncoder  # noqa: E402
from fairseq_longmem.preprocess.prepare_corpus import main as preprocess_main  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_hf_pipeline(tmp_path_factory.mktemp("hf_pipeline"))


def binarized(data, split):
    from fairseq.data import data_utils

    ds = data_utils.load_indexed_dataset(str(data / split), None, "mmap")
    return [ds[i].numpy() for i in range(len(ds))]


def test_dictionary_is_the_imported_models_and_matches_its_embedding_rows(pipe):
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    assert (pipe["data"] / "dict.txt").read_text() == (pipe["backbone"] / "dict.txt").read_text()
    d = Dictionary.load(str(pipe["data"] / "dict.txt"))
    emb = checkpoint_utils.load_checkpoint_to_cpu(str(pipe["ckpt"]))["model"]["decoder.embed_tokens.weight"]
    wte = pipe["model"].transformer.wte.weight.detach()
    assert len(d) == emb.shape[0] == pipe["vocab_size"]
    vocab = load_vocab_map(pipe["backbone"])
    for t in range(pipe["vocab_size"]):  # the row of every fairseq symbol is its HF token's row
        idx = vocab.hf_to_fairseq[t] if t in vocab.reserved or t == vocab.eos_id else d.index(str(t))
        assert torch.equal(emb[idx], wte[t]), t


def test_text_round_trips_and_documents_are_lines_ended_by_eot(pipe):
    enc = HFTokenizerEncoder(pipe["backbone"])
    raw = (pipe["root"] / "prep" / "raw" / "test.txt").read_text(encoding="utf-8")
    docs = [d.strip("\n") for d in raw.split("\n\n")]
    items = binarized(pipe["data"], "test")
    assert len(items) == 2 * len(docs) - 1  # one line per document + separators
    for doc, item in zip(docs, items[::2]):
        assert item[-1] == 2  # </s> = <|endoftext|> ends each document
        assert enc.decode(item[:-1]) == doc
        assert item[:-1].tolist() == enc.encode(doc)
    assert all(len(sep) == 1 and sep[0] == 2 for sep in items[1::2])
    flat = np.concatenate([np.concatenate(binarized(pipe["data"], s)) for s in ("train", "valid", "test")])
    assert not np.isin(flat, [0, 1, 3]).any()  # <s>, <pad>, <unk> never occur in the data
    assert enc.decode(enc.encode("x  = 'é€😀' <|endoftext|>")) == "x  = 'é€😀' <|endoftext|>"


def test_reserved_tokens_are_spelled_by_their_merges(pipe):
    enc = HFTokenizerEncoder(pipe["backbone"])
    for t in enc.vocab.reserved:
        s = enc.tokenizer.id_to_token(t)
        spelled = enc.respell[t]
        assert len(spelled) >= 2 and not set(spelled) & set(enc.vocab.reserved)
        assert "".join(enc.tokenizer.id_to_token(p) for p in spelled) == s
        text = enc.tokenizer.decode([t])
        assert enc.decode(enc.encode(text)) == text


def test_vocab_json_and_merges_txt_give_the_same_encoding(pipe, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pipe["backbone"] / "tokenizer.json"))
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt
    shutil.copy(pipe["backbone"] / "hf_vocab.json", tmp_path)
    a, b = HFTokenizerEncoder(pipe["backbone"]), HFTokenizerEncoder(tmp_path)
    text = (pipe["corpus"] / sorted(p.name for p in pipe["corpus"].iterdir())[0]).read_text()
    assert a.encode(text) == b.encode(text) and b.decode(b.encode(text)) == text


def test_eval_lm_perplexity_on_tokenized_text_matches_hf(pipe):
    results = eval_lm_inprocess(pipe["data"], pipe["ckpt"], 128)
    hf_ppl, n = hf_perplexity(pipe["model"], pipe["data"], 128, load_vocab_map(pipe["backbone"]))
    assert n > 1000
    assert abs(2 ** results["loss"] - hf_ppl) / hf_ppl <= 1e-4


def test_bad_tokenizer_folders(pipe, tmp_path, capsys):
    with pytest.raises(PreprocessError, match="not found"):
        HFTokenizerEncoder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    shutil.copy(pipe["backbone"] / "tokenizer.json", tmp_path / "a")
    with pytest.raises(PreprocessError, match="neither hf_vocab.json nor config.json"):
        HFTokenizerEncoder(tmp_path / "a")
    cfg = json.loads((pipe["hf_dir"] / "config.json").read_text())
    cfg["vocab_size"] = pipe["vocab_size"] - 20  # a model with fewer embeddings than tokens
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PreprocessError, match=f"has {pipe['vocab_size']} tokens but the model has "
                                              f"{pipe['vocab_size'] - 20} embeddings"):
        HFTokenizerEncoder(tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copy(pipe["backbone"] / "hf_vocab.json", tmp_path / "b")
    with pytest.raises(PreprocessError, match="has no tokenizer"):
        HFTokenizerEncoder(tmp_path / "b")
    code = preprocess_main(["--input", str(pipe["corpus"]), "--out", str(tmp_path / "o"),
                            "--tokenizer", str(tmp_path / "a")])
    assert code == 2 and capsys.readouterr().err.startswith("error: the tokenizer in")


def test_data_of_another_tokenizer_is_refused_by_the_backbone(pipe, tmp_path):
    other = build_hf_pipeline(tmp_path, n_docs=6, vocab_size=280)
    with pytest.raises(LongMemError, match="dictionary mismatch"):
        build_longmem(pipe["ckpt"], other["data"], 32, retrieval_layer_index=3)


def test_segments_longer_than_the_learned_positions(pipe):
    with pytest.raises(LongMemError, match="exceeds the backbone's 128 positions"):
        build_longmem(pipe["ckpt"], pipe["data"], 256)
    # the stream task refuses; (stock --task language_modeling skips such blocks: docs/backbones.md)
    proc = run_fairseq("eval_lm", [pipe["data"], "--user-dir", PLUGIN_DIR, "--task",
                                   "longmem_language_modeling", "--path", pipe["ckpt"],
                                   "--tokens-per-sample", 256, "--batch-size", 1, "--gen-subset",
                                   "test", "--cpu"], check=False)
    assert proc.returncode != 0
    assert "--tokens-per-sample 256 exceeds the model's 128 positions" in proc.stderr


def test_longmem_adapts_over_an_imported_backbone(pipe, tmp_path):
    from test_training import losses, perplexity, train_args

    save = tmp_path / "longmem"
    proc = run_fairseq("train", ["--user-dir", PLUGIN_DIR] + train_args(
        pipe["data"], pipe["ckpt"], save, 60, bsz=4, extra=["--disable-validation"]))
    log = proc.stdout + proc.stderr
    assert "absolute positions" in log  # the learned-position warning
    ls = losses(log)
    assert len(ls) == 60 and sum(ls[-10:]) / 10 < sum(ls[:10]) / 10 - 0.3, ls
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    bb = torch.load(pipe["ckpt"], map_location="cpu", weights_only=False)["model"]
    for name, tensor in bb.items():
        if name.startswith("decoder.") and name != "decoder.version":
            assert torch.equal(state["decoder.backbone." + name[len("decoder."):]], tensor), name
    ev = run_fairseq("eval_lm", [pipe["data"], "--user-dir", PLUGIN_DIR, "--task",
                                 "longmem_language_modeling", "--path", save / "checkpoint_last.pt",
                                 "--tokens-per-sample", 32, "--batch-size", 1, "--gen-subset", "test",
                                 "--cpu"])
    ppl = perplexity(ev.stdout + ev.stderr)
    assert 1 < ppl < pipe["vocab_size"]


def test_train_sh_adapt_takes_the_imported_backbone(pipe, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    env = dict(
        os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPUS="0",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        DATA_DIR=str(pipe["data"]), CKPT_DIR=str(tmp_path / "ckpt"), PTM_PATH=str(pipe["ckpt"]),
        ARCH="longmem_tiny", TOKENS_PER_SAMPLE="32", BATCH_SIZE="2", MAX_UPDATE="4", WARMUP="1",
        LR="1e-3", MEMORY_SIZE="128", K="8", RETRIEVAL_LAYER="3", SAVE_INTERVAL="4",
        EXTRA_ARGS="--disable-validation --log-format simple",
    )
    proc = subprocess.run(["bash", str(REPO_ROOT / "train.sh"), "adapt"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "ckpt" / "longmem_tiny" / "checkpoint_last.pt").exists()


def test_longmem_and_memtrm_run_the_imported_backbone_as_hf_does(pipe):
    from fairseq_longmem.models.memtrm import MemTRMConfig, MemTRMModel
    from fairseq_longmem.modules.decoder_layer import decoder_forward
    from conftest import build_memory_model

    vocab = load_vocab_map(pipe["backbone"])
    f2h = torch.tensor(vocab.fairseq_to_hf)
    h2f = torch.tensor(vocab.hf_to_fairseq)
    lm, task = build_longmem(pipe["ckpt"], pipe["data"], 64)
    mt, _ = build_memory_model(MemTRMModel, MemTRMConfig, pipe["ckpt"], pipe["data"], 64, dict(
        pretrained_model_path=str(pipe["ckpt"]), use_external_memory=True, memory_size=64,
        chunk_size=4, k=8, retrieval_layer_index=3, decoder_embed_dim=64))
    task.load_dataset("valid")
    tokens = torch.from_numpy(task.dataset("valid").tokens[:64].copy())[None]
    with torch.no_grad():
        ref = pipe["model"](f2h[tokens]).logits
        # the plugin's own forward of the imported network (LongMem: frozen; MemTRM: trained)
        for backbone in (lm.decoder.backbone, mt.decoder.net):
            _, features, _ = decoder_forward(backbone, tokens)
            got = backbone.output_layer(features)[..., h2f]
            assert (got - ref).abs().max().item() <= 1e-4


def test_added_special_tokens_at_the_reserved_ids(pipe, tmp_path):
    from tokenizers import Tokenizer

    from fairseq_longmem.hf_vocab import VocabMap

    tok = Tokenizer.from_file(str(pipe["backbone"] / "tokenizer.json"))
    tok.add_special_tokens(["<|pad|>", "<|sep|>", "<|x|>"])  # the three largest ids
    tok.save(str(tmp_path / "tokenizer.json"))
    VocabMap(pipe["vocab_size"] + 3, 0).save(tmp_path)
    enc = HFTokenizerEncoder(tmp_path)
    assert all(enc.respell[t] is None for t in enc.vocab.reserved)
    assert enc.decode(enc.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    with pytest.raises(PreprocessError, match=r"token \d+ \('<\|sep\|>'\).*remove it"):
        enc.encode("a <|sep|> b")
