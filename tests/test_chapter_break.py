"""ChapterBreak: the builder's instances, the released layout, and leak-free scoring."""

import json

import pytest
import torch

from conftest import build_longmem
from fairseq_longmem.eval import chapter_break as cb
from fairseq_longmem.eval import scoring
from fairseq_longmem.eval.model_loading import LoadedModel, load_for_eval
from fairseq_longmem.eval.text_encoding import TextEncoder, encoder_factory
from test_memtrm import build_memtrm

ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII"]


def novel():
    parts = ["THE BOOK\nA title page and a short preface that is long enough to be a prefix.\n"]
    for i, r in enumerate(ROMAN):
        parts.append(f"CHAPTER {r}\nIn chapter {i + 1} the hero walks to town number {i + 1}.\n"
                     f"More words of chapter {i + 1} follow here.\n")
    return "".join(parts)


def test_builder_prefixes_suffixes_and_negatives():
    text = novel()
    inst = cb.build_instances([("book", text)], cb.HEADING_PRESETS["chapters"],
                              min_prefix_chars=20, subset="test")
    # negatives come from later chapters: chapters I..III have >= 5 later ones
    assert [i.pos.splitlines()[0] for i in inst] == ["CHAPTER I", "CHAPTER II", "CHAPTER III"]
    openings = {r: text[text.index(f"CHAPTER {r}\n"):].split("\nCHAPTER")[0].strip() for r in ROMAN}
    for n, i in enumerate(inst):
        head = f"CHAPTER {ROMAN[n]}\n"
        assert i.ctx == text[: text.index(head)].rstrip()  # ends right before the boundary
        assert i.pos == openings[ROMAN[n]]
        assert len(i.negs) == 5 and len(set(i.negs)) == 5 and i.pos not in i.negs
        later = {openings[r] for r in ROMAN[n + 1 :]}
        assert set(i.negs) <= later
    anyneg = cb.build_instances([("book", text)], cb.HEADING_PRESETS["chapters"],
                                min_prefix_chars=20, negatives="any")
    assert len(anyneg) == 8  # every chapter has >= 5 other chapters
    for i in anyneg:
        assert i.pos not in i.negs and len(set(i.negs)) == 5


def test_negatives_never_equal_the_true_suffix():
    same = "== part ==\nthe same opening every time\n"
    other = [f"== part ==\nopening number {j}\n" for j in range(5)]
    text = "intro text that is the prefix of everything\n" + same + same + "".join(other) + same
    inst = cb.build_instances([("d", text)], r"^== part ==", min_prefix_chars=5, negatives="any",
                              suffix_chars=200)
    assert inst
    for i in inst:
        assert i.pos not in i.negs and len(set(i.negs)) == len(i.negs) == 5


def test_suffix_stops_at_next_heading_and_prefix_cut_at_line_start():
    text = novel()
    inst = cb.build_instances([("book", text)], cb.HEADING_PRESETS["chapters"],
                              min_prefix_chars=20, max_prefix_chars=60, suffix_chars=30)
    for i in inst:
        assert "CHAPTER" not in i.pos[1:] and len(i.pos) <= 30
        assert len(i.ctx) <= 60 and (text.find(i.ctx) == 0 or text[text.find(i.ctx) - 1] == "\n")


def test_python_preset_uses_top_level_definitions():
    src = "import os\n\n" + "".join(
        f"def f{j}(x):\n    def inner():\n        pass\n    return x + {j}\n\n" for j in range(4)
    ) + "class K:\n    def method(self):\n        return 1\n\nasync def g():\n    pass\n"
    starts = cb.section_starts(src, cb.HEADING_PRESETS["python"])
    heads = [src[s:].split("\n")[0] for s in starts]
    assert heads == ["def f0(x):", "def f1(x):", "def f2(x):", "def f3(x):", "class K:",
                     "async def g():"]
    inst = cb.build_instances([("mod.py", src)], cb.HEADING_PRESETS["python"], min_prefix_chars=5,
                              negatives="any")
    assert len(inst) == 6 and all(i.pos.startswith(("def", "class", "async")) for i in inst)


def test_layout_matches_the_released_one(tmp_path):
    inst = cb.build_instances([("book-1", novel()), ("book-2", novel().replace("hero", "cat"))],
                              cb.HEADING_PRESETS["chapters"], min_prefix_chars=20, subset="ao3")
    path = tmp_path / "cb.json"
    rc = cb.main(["build", "--input", str(_write(tmp_path / "b1.txt", novel())),
                  "--min-prefix-chars", "20", "--subset", "pg19", "--out", str(path)])
    assert rc == 0
    layout = json.loads(path.read_text())
    assert list(layout) == ["pg19"] and list(layout["pg19"]) == ["b1.txt"]
    for item in layout["pg19"]["b1.txt"]:
        assert set(item) == {"ctx", "pos", "negs"} and len(item["negs"]) == 5
    # a released-style file with two groups: read back, filtered by group
    released = {"pg19": json.loads(path.read_text())["pg19"], **cb.to_layout(inst)}
    (tmp_path / "rel.json").write_text(json.dumps(released))
    got = cb.load_instances(str(tmp_path / "rel.json"), subset="ao3")
    assert [(g.ctx, g.pos, g.negs) for g in got] == [(i.ctx, i.pos, i.negs) for i in inst]
    assert {g.doc for g in got} == {"book-1", "book-2"}
    assert len(cb.load_instances(str(tmp_path / "rel.json"))) == len(inst) + 3
    assert len(cb.load_instances(str(tmp_path / "rel.json"), max_instances=2)) == 2


def _write(path, text):
    path.write_text(text)
    return path


def test_credit_counts_ties_fractionally():
    assert cb.candidate_credit([-1.0, -2.0, -3.0]) == 1.0
    assert cb.candidate_credit([-2.0, -1.0, -3.0]) == 0.0
    assert cb.candidate_credit([-1.0, -1.0, -3.0, -1.0]) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def split_instances(tiny_data):
    from conftest import setup_stream_task

    task = setup_stream_task(tiny_data, 32)
    enc = TextEncoder(task.source_dictionary)
    docs = cb.documents_from_split(task, "test", enc)
    inst, rx, neg = cb.build_auto(docs, "python-tokens", min_prefix_chars=400, suffix_chars=300,
                                  negatives="any")
    assert len(inst) >= 4 and rx == cb.HEADING_PRESETS["python-tokens"] and neg == "any"
    return inst


def permuted(inst, order):
    return cb.Instance(inst.id, inst.ctx, inst.pos, [inst.negs[j] for j in order], inst.subset)


@pytest.mark.parametrize("kind", ["longmem", "memtrm"])
def test_memory_model_scores_do_not_depend_on_candidate_order(kind, tiny_backbone, tiny_data,
                                                             split_instances, monkeypatch):
    build = build_longmem if kind == "longmem" else build_memtrm
    model, task = build(tiny_backbone, tiny_data, memory_gate_init=1.0)
    enc = TextEncoder(task.source_dictionary)
    inst = max(split_instances, key=lambda i: len(i.ctx))
    order = [4, 2, 0, 3, 1]

    def scores(x):
        r = cb.score_instance(model, enc, x, 32)
        assert r["prefix_tokens"] > 2 * 32  # the prefix needs memory
        return dict(zip([x.pos] + x.negs, r["scores"]))

    a, b = scores(inst), scores(permuted(inst, order))
    assert a == b  # exactly: each candidate sees the same memory
    # with memory disabled the scores differ: the prefix in memory is used
    model.decoder.cfg.use_external_memory = False
    assert scores(inst) != a
    model.decoder.cfg.use_external_memory = True
    # and without the restore, candidates would leak into each other
    monkeypatch.setattr(scoring, "restore_memory", lambda m, s: None)
    leaky_a, leaky_b = scores(inst), scores(permuted(inst, order))
    assert leaky_a != leaky_b


def test_model_without_memory_sees_only_the_local_window(tiny_backbone, tiny_data, split_instances):
    lm = load_for_eval(str(tiny_backbone), data=str(tiny_data), tokens_per_sample=32, device="cpu")
    enc = TextEncoder(lm.task.source_dictionary)
    inst = split_instances[0]
    longer = cb.Instance(inst.id, "def extra ( ) :\nreturn 1\n" + inst.ctx, inst.pos, inst.negs)
    a = cb.score_instance(lm.model, enc, inst, 32)
    b = cb.score_instance(lm.model, enc, longer, 32)
    assert a["scores"] == b["scores"] and b["prefix_tokens"] > a["prefix_tokens"]


def test_evaluate_and_command_line(tiny_backbone, tiny_data, split_instances, tmp_path):
    lm = load_for_eval(str(tiny_backbone), data=str(tiny_data), tokens_per_sample=32,
                       device="cpu", name="backbone")
    model, task = build_longmem(tiny_backbone, tiny_data)
    mem = LoadedModel("longmem", str(tiny_backbone), model, task, "longmem", 32)
    res = cb.evaluate([lm, mem], split_instances[:4], encoder_factory(None))
    assert res["chance"] == pytest.approx(1 / 6)
    for r in res["models"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["scored"] == 4
    assert "| chance | 16.7% |" in cb.markdown_table(res)
    path = tmp_path / "cb.json"
    path.write_text(json.dumps(cb.to_layout(split_instances[:3])))
    out = tmp_path / "res.json"
    rc = cb.main(["score", "--data", str(tiny_data), "--input", str(path), "--checkpoint",
                  f"bb={tiny_backbone}", "--tokens-per-sample", "32", "--cpu", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["models"]["bb"]["scored"] == 3


@pytest.mark.parametrize("kind", ["backbone", "longmem", "memtrm"])
def test_scores_are_the_stream_evaluations_log_probs(kind, tiny_backbone, tiny_data):
    """When the final segment lines up with a stream window, a candidate's score is
    exactly what stream evaluation (fairseq-eval-lm's order) gives its tokens."""
    from fairseq_longmem.eval.scoring import score_continuations
    from fairseq_longmem.eval.token_losses import document_stream, stream_token_losses

    if kind == "backbone":
        lm = load_for_eval(str(tiny_backbone), data=str(tiny_data), tokens_per_sample=32,
                           device="cpu")
        model, task = lm.model, lm.task
    else:
        build = build_longmem if kind == "longmem" else build_memtrm
        model, task = build(tiny_backbone, tiny_data, memory_gate_init=1.0)
    task.load_dataset("valid")
    toks = task.dataset("valid").tokens[1:200].tolist()
    T, n = 32, 10
    prefix, cand = toks[: 3 * T - n], toks[3 * T - n : 3 * T]  # prefix + cand = 3 windows
    inputs = [task.source_dictionary.eos()] + prefix
    s = len(inputs) + n - 1 - T
    assert s == 2 * T
    got = score_continuations(model, inputs[:s], inputs[s:], [cand], T)[0]
    ref = stream_token_losses(model, task, document_stream([prefix + cand], task.source_dictionary.eos()))
    torch.testing.assert_close(torch.tensor(got), -torch.tensor(ref.nll[-n:]), rtol=1e-5, atol=1e-5)
