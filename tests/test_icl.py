"""In-context learning: exact templates, data layout, label scoring, memory of demonstrations."""

import json
import os

import pytest
import torch

from conftest import REPO_ROOT, build_longmem
from fairseq_longmem.eval import icl
from fairseq_longmem.eval.model_loading import LoadedModel, load_for_eval
from fairseq_longmem.eval.scoring import FixedMemory
from fairseq_longmem.eval.text_encoding import TextEncoder, encoder_factory

SHARED_ICL = REPO_ROOT.parent / "shared" / "data" / "icl"

TEXTS = [
    "def return the value", "import os and sys", "class with self", "if not none else",
    "for i in range", "while true break", "try except raise", "with open as f",
    "lambda x : x", "yield from self", "assert is not", "global name in",
]


def make_icl_root(root):
    """Every data set of the README's layout, a dozen lines each."""
    (root / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        rows = "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXTS))
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    (root / "sst-5").mkdir()
    for split in ("train", "dev"):
        (root / "sst-5" / f"stsa.fine.{split}").write_text(
            "".join(f"{i % 5} {t}\n" for i, t in enumerate(TEXTS)))
    for name in ("mr", "subj", "mpqa"):
        (root / name).mkdir()
        for split in ("train", "test"):
            rows = "".join(f'{i % 2},"{t} , and more"\n' if i % 3 else f"{i % 2},{t}\n"
                           for i, t in enumerate(TEXTS))
            (root / name / f"{split}.csv").write_text(rows)
    return root


@pytest.fixture()
def icl_root(tmp_path):
    return make_icl_root(tmp_path / "icl")


def test_templates_are_exact():
    sst2, subj, sst5 = icl.TASKS["sst2"], icl.TASKS["subj"], icl.TASKS["sst5"]
    assert icl.format_demo(sst2, "a gem of a film", 1) == "Review: a gem of a film Sentiment: positive. "
    assert icl.format_demo(sst2, "dull", 0) == "Review: dull Sentiment: negative. "
    assert icl.format_demo(subj, "the film opens in 1950", 1) == "Input: the film opens in 1950 Type: objective. "
    assert icl.query_prefix(subj, "so {moving}") == "Input: so {moving} Type:"
    prompt = icl.build_prompt(sst5, [("bad film", 0), ("fine", 3)], "wow")
    assert prompt == ("Review: bad film Sentiment: terrible. Review: fine Sentiment: good. "
                      "Review: wow Sentiment:")
    for task in icl.TASKS.values():
        for y, label in enumerate(task.labels):
            assert icl.query_prefix(task, "x") + " " + label + ". " == icl.format_demo(task, "x", y)
    assert icl.TASKS["sst5"].labels == ("terrible", "bad", "okay", "good", "great")
    assert icl.TASKS["subj"].labels == ("subjective", "objective")
    assert icl.task_by_name("SST-2") is sst2


def test_reads_the_readme_layout(icl_root):
    train, test = icl.load_task(str(icl_root), icl.TASKS["sst2"])
    assert train[0] == (TEXTS[0], 0) and test[1] == (TEXTS[1], 1) and len(test) == 12
    train, test = icl.load_task(str(icl_root), icl.TASKS["sst5"])
    assert test[4] == (TEXTS[4], 4)
    train, test = icl.load_task(str(icl_root), icl.TASKS["mr"])
    assert test[1] == (TEXTS[1] + " , and more", 1) and test[0] == (TEXTS[0], 0)
    if SHARED_ICL.is_dir():  # the real files, read in place
        sizes = {n: len(icl.load_task(str(SHARED_ICL), t)[1]) for n, t in icl.TASKS.items()}
        assert sizes["sst2"] == 872 and sizes["sst5"] == 1101 and sizes["subj"] == 2000


def test_demonstrations_per_seed():
    train = [(t, i % 2) for i, t in enumerate(TEXTS)]
    loc_a, mem_a = icl.draw_demos(train, 3, 4, seed=1)
    loc_b, mem_b = icl.draw_demos(train, 3, 8, seed=1)
    assert loc_a == loc_b and mem_b[:4] == mem_a  # local fixed across N, memory nested
    assert not set(loc_a) & set(mem_b)
    assert icl.draw_demos(train, 3, 4, seed=2) != (loc_a, mem_a)
    assert icl.subsample(train, 5) == icl.subsample(train, 5) and len(icl.subsample(train, 5)) == 5


def test_fit_local_drops_oldest_demonstrations_first():
    ids, kept = icl.fit_local(2, [[10] * 5, [11] * 5, [12] * 5], [13] * 4, budget=16)
    assert kept == 2 and ids == [2] + [11] * 5 + [12] * 5 + [13] * 4
    ids, kept = icl.fit_local(2, [[10] * 5], [13] * 40, budget=16)
    assert kept == 0 and len(ids) == 16 and ids[0] == 2 and ids[1:] == [13] * 15


def test_label_scoring_picks_the_higher_log_prob(tiny_backbone, tiny_data):
    lm = load_for_eval(str(tiny_backbone), data=str(tiny_data), tokens_per_sample=32, device="cpu")
    d = lm.task.source_dictionary
    local = [d.eos()] + [d.index(w) for w in "def __init__ ( self , name ) :".split()]
    labels = [[d.index("self")], [d.index("return")], [d.index("name"), d.index(")")]]
    fixed = FixedMemory.after(lm.model, [], 32)
    pred, scores = icl.predict(fixed, local, labels, 32)
    # reference: full forward of local + label[:-1], sum of the label tokens' log-probs
    ref = []
    for lab in labels:
        x = torch.tensor([local + lab[:-1]])
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(x)[0].float(), -1)[0]
        ref.append(sum(float(lp[len(local) - 1 + j, t]) for j, t in enumerate(lab)))
    assert scores == pytest.approx(ref, abs=1e-5)
    assert pred == max(range(3), key=lambda i: ref[i])
    assert len(set(scores)) == 3


def test_sentencepiece_text_to_ids(tmp_path):
    import sentencepiece as spm
    from fairseq.data import Dictionary

    from fairseq_longmem.preprocess.prepare_corpus import PieceEncoder, write_fairseq_dict

    text = "\n".join(icl.format_demo(icl.TASKS["sst2"], t, i % 2) for i, t in enumerate(TEXTS * 3))
    (tmp_path / "corpus.txt").write_text(text + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"),
                                   model_prefix=str(tmp_path / "spm"), vocab_size=48,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    write_fairseq_dict(PieceEncoder(tmp_path / "spm.model"), tmp_path / "dict.txt")
    enc = TextEncoder(Dictionary.load(str(tmp_path / "dict.txt")), str(tmp_path / "spm.model"))
    prompt = icl.build_prompt(icl.TASKS["sst2"], [(TEXTS[0], 1)], TEXTS[1])
    assert enc.encode(prompt) + enc.encode("positive") == enc.encode(prompt + " positive")
    a = icl.format_demo(icl.TASKS["sst2"], TEXTS[2], 0)
    b = icl.format_demo(icl.TASKS["sst2"], TEXTS[3], 1)
    assert enc.encode(a) + enc.encode(b) == enc.encode(a + b)  # demos encode independently
    assert enc.unknown == 0
    lines = enc.encode_lines("Review: with open\n\nfor i in range")
    assert lines.count(enc.eos) == 2 and lines[-1] == enc.eos
    assert enc.decode_lines(lines) == "Review: with open\nfor i in range"


def test_memory_of_demonstrations_is_used_saved_and_reloaded(tiny_backbone, tiny_data, icl_root,
                                                             tmp_path, monkeypatch):
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=1.0, memory_size=256)
    lm = LoadedModel("longmem", str(tiny_backbone), model, task, "longmem", 32)
    enc = TextEncoder(task.source_dictionary)
    t = icl.TASKS["sst2"]
    train, test = icl.load_task(str(icl_root), t)
    ids = icl.PromptIds(t, enc)
    local = [enc.eos] + ids.query(test[0][0])
    _, mem_demos = icl.draw_demos(train, 2, 8, seed=1)
    meta = icl.memory_meta(lm, t, 1, 2, 8)
    fixed, n_tokens = icl.prepare_memory(lm, ids, mem_demos, meta, str(tmp_path / "mem"))
    with_memory = icl.predict(fixed, local, ids.labels, 32)[1]
    again = icl.predict(fixed, local, ids.labels, 32)[1]
    assert again == with_memory  # scoring does not change the memory
    empty = icl.predict(FixedMemory.after(model, [], 32, memory_key=icl.MEMORY_KEY), local,
                        ids.labels, 32)[1]
    assert empty != with_memory and n_tokens > 32
    saved = sorted(os.listdir(tmp_path / "mem"))
    assert saved == ["longmem.sst2.seed1.k2.N8.pt"]

    def no_rebuild(*a, **k):
        raise AssertionError("memory rebuilt instead of reloaded")

    monkeypatch.setattr(icl, "run_history", no_rebuild)
    model.decoder.reset_memory()
    fixed2, _ = icl.prepare_memory(lm, ids, mem_demos, meta, str(tmp_path / "mem"))
    assert icl.predict(fixed2, local, ids.labels, 32)[1] == with_memory
    # a memory saved for another seed is refused
    from fairseq_longmem.modules.memory_bank import MemoryConfigError

    os.rename(tmp_path / "mem" / saved[0], tmp_path / "mem" / "longmem.sst2.seed2.k2.N8.pt")
    with pytest.raises(MemoryConfigError, match="icl_seed"):
        icl.prepare_memory(lm, ids, mem_demos, icl.memory_meta(lm, t, 2, 2, 8), str(tmp_path / "mem"))


def test_evaluate_end_to_end(tiny_backbone, tiny_data, icl_root, tmp_path):
    bb = load_for_eval(str(tiny_backbone), data=str(tiny_data), tokens_per_sample=32,
                       device="cpu", name="backbone")
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=1.0)
    mem = LoadedModel("longmem", str(tiny_backbone), model, task, "longmem", 32)
    res = icl.evaluate([bb, mem], encoder_factory(None), str(icl_root), ["sst2", "subj"],
                       shots=2, memory_demos=[0, 8], seeds=[1, 2], max_test=6)
    for tname in ("sst2", "subj"):
        entry = res["tasks"][tname]
        assert entry["test"] == 6 and entry["chance"] == 0.5
        for name in ("backbone", "longmem"):
            for n in ("0", "8"):
                r = entry["models"][name][n]
                assert 0 <= r["mean"] <= 1 and len(r["per_seed"]) == 2 and r["std"] >= 0
        assert entry["models"]["backbone"]["0"] == entry["models"]["backbone"]["8"]
        assert entry["models"]["longmem"]["8"]["memory_demos"] == 8
    table = icl.markdown_table(res)
    assert "| sst2 | longmem |" in table and "N=8" in table
    icl.plot_accuracy(res, str(tmp_path / "icl.png"))
    assert (tmp_path / "icl.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "icl.json"
    rc = icl.main(["--data", str(tiny_data), "--data-root", str(icl_root), "--checkpoint",
                   f"bb={tiny_backbone}", "--tokens-per-sample", "32", "--tasks", "mpqa,sst5",
                   "--shots", "2", "--memory-demos", "0,4", "--seeds", "2", "--max-test", "4",
                   "--cpu", "--json", str(out)])
    assert rc == 0 and set(json.loads(out.read_text())["tasks"]) == {"mpqa", "sst5"}
