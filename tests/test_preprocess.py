"""Tests for the preprocess/ pipeline: documents -> split -> spm -> fairseq data-bin."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # allow plain `pytest` as well as `python -m pytest`
    sys.path.insert(0, str(REPO_ROOT))

from fairseq_longmem.preprocess.documents import Document, PreprocessError, iter_documents  # noqa: E402
from fairseq_longmem.preprocess.prepare_corpus import (  # noqa: E402
    SPLITS,
    PieceEncoder,
    document_lines,
    main,
    prepare_corpus,
    split_documents,
)
from fairseq_longmem.preprocess.stdlib_corpus import EXCLUDED_DIRS, build_stdlib_corpus, stdlib_source_files  # noqa: E402

VOCAB = 400

_WORDS = (
    "the of and to in is was for that with as on by at from his her this which or had an be are "
    "were it not but have they one all their there been has more when who will would can no other "
    "into some time could than first two may then do any like these over such our after most also "
    "made many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three river garden music history letter "
    "winter summer harbour mountain village market window evening morning question answer number "
    "café naïve façade résumé Zürich São Paulo Kraków 東京 Ελλάδα"
).split()


def _paragraph(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ";"]))
    return " ".join(sentences)


def _make_doc(rng: random.Random, idx: int) -> str:
    """A small English-looking document with the awkward bits real files have."""
    lines = [f"Chapter {idx}: {rng.choice(_WORDS).title()} and {rng.choice(_WORDS)}", ""]
    for p in range(rng.randint(3, 5)):
        lines.append(_paragraph(rng, rng.randint(2, 4)))
        lines.append("")  # paragraph break: empty line inside the document
        if p == 1:
            lines.append("   \t  ")  # whitespace-only line: dropped
            lines.append("    indented line with trailing spaces   ")
            lines.append("\tcolumn\tseparated\tvalues\t42\t3.14")  # tabs -> pieces with whitespace
            lines.append("")
            lines.append("")
    text = "\n".join(lines) + "\n"
    if idx % 3 == 0:
        text = text.replace("\n", "\r\n")  # Windows line endings
    return text


@pytest.fixture(scope="module")
def folder_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 usable documents (one nested) + 1 non-UTF-8, 1 empty and 1 whitespace-only file."""
    root = tmp_path_factory.mktemp("folder_corpus")
    rng = random.Random(1234)
    for i in range(8):
        sub = root / "nested" if i == 5 else root
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_bytes(_make_doc(rng, i).encode("utf-8"))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"  \n\t\n\n")
    return root


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 usable documents + one bad line of each kind."""
    path = tmp_path_factory.mktemp("jsonl_corpus") / "pile.jsonl"
    rng = random.Random(99)
    lines = []
    for i in range(7):
        lines.append(json.dumps({"text": _make_doc(rng, i + 10), "meta": {"pile_set_name": "Test"}}))
        if i == 2:
            lines.append('{"text": "unterminated')  # bad_json
            lines.append(json.dumps({"content": "no text field"}))  # no_text
            lines.append(json.dumps({"text": 42}))  # no_text
            lines.append(json.dumps(["text"]))  # no_text
            lines.append(json.dumps({"text": " \n\t "}))  # empty
            lines.append("")  # blank_line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder_prep(folder_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("folder_prep") / "out"
    info = prepare_corpus(folder_corpus, out, vocab_size=VOCAB, seed=3, workers=1)
    return out, info


@pytest.fixture(scope="module")
def jsonl_prep(jsonl_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("jsonl_prep") / "out"
    info = prepare_corpus(jsonl_corpus, out, vocab_size=VOCAB, seed=1, workers=2, min_split_docs=2)
    return out, info


def _docs_by_name(path: Path) -> dict[str, Document]:
    return {d.name: d for d in iter_documents(path)}


# --------------------------------------------------------------------------- reading documents


def test_folder_documents_sorted_and_skips_counted(folder_corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    skipped: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="fairseq_longmem.preprocess.documents"):
        docs = list(iter_documents(folder_corpus, skipped))
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert len(docs) == 8 and "nested/doc05.txt" in names
    assert skipped == {"not_utf8": 1, "empty": 2}
    assert any("empty=2" in r.getMessage() and "not_utf8=1" in r.getMessage() for r in caplog.records)


def test_jsonl_documents_skips_counted(jsonl_corpus: Path) -> None:
    skipped: dict[str, int] = {}
    docs = list(iter_documents(jsonl_corpus, skipped))
    assert len(docs) == 7
    assert docs[0].name == "pile.jsonl:1"
    assert skipped == {"bad_json": 1, "no_text": 3, "empty": 1, "blank_line": 1}


def test_jsonl_invalid_utf8_and_surrogates_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n{"text": "\\ud800 lone"}\n{"text": "fine"}\n')
    skipped: dict[str, int] = {}
    assert [d.text for d in iter_documents(path, skipped)] == ["fine"]
    assert skipped == {"not_utf8": 1, "invalid_unicode": 1}


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="does not exist"):
        iter_documents(tmp_path / "missing")
    txt = tmp_path / "one.txt"
    txt.write_text("hello\n", encoding="utf-8")
    with pytest.raises(PreprocessError, match="use a folder"):
        iter_documents(txt)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(PreprocessError, match="no usable documents.*no files"):
        list(iter_documents(empty_dir))
    bad_dir = tmp_path / "bad_dir"
    bad_dir.mkdir()
    (bad_dir / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (bad_dir / "b.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(PreprocessError, match=r"no usable documents.*empty=1, not_utf8=1"):
        list(iter_documents(bad_dir))


# --------------------------------------------------------------------------- splitting / lines


def test_split_by_document_deterministic() -> None:
    docs = [Document(f"d{i}", f"text {i}") for i in range(30)]
    a = split_documents(docs, 0.1, 0.1, seed=1)
    b = split_documents(docs, 0.1, 0.1, seed=1)
    c = split_documents(docs, 0.1, 0.1, seed=2)
    assert a == b
    assert a != c
    assert {s: len(a[s]) for s in SPLITS} == {"train": 24, "valid": 3, "test": 3}
    names = [d.name for s in SPLITS for d in a[s]]
    assert sorted(names) == sorted(d.name for d in docs)  # a partition of the documents
    assert [d.name for d in docs] == [f"d{i}" for i in range(30)]  # input list untouched


def test_split_min_docs_and_too_few() -> None:
    docs = [Document(f"d{i}", "x") for i in range(5)]
    sizes = {s: len(v) for s, v in split_documents(docs, 0.05, 0.05, seed=1, min_split_docs=2).items()}
    assert sizes == {"train": 1, "valid": 2, "test": 2}
    with pytest.raises(PreprocessError, match="too few documents: found 2, need at least 3"):
        split_documents(docs[:2], 0.05, 0.05, seed=1)
    with pytest.raises(PreprocessError, match="found 4, need at least 5"):
        split_documents(docs[:4], 0.05, 0.05, seed=1, min_split_docs=2)


def test_document_lines() -> None:
    text = "a\r\n\r\n  \t\nb  \rc\n\n\n  d\n"
    assert document_lines(text) == ["a", "b  ", "c", "  d"]
    assert document_lines("abcdefg\n", max_line_chars=3) == ["abc", "def", "g"]
    assert document_lines("ab     cd", max_line_chars=3) == ["ab ", " cd"]  # whitespace-only chunk dropped


# --------------------------------------------------------------------------- full pipeline


def _check_prepared(out: Path, info: dict, corpus: Path, seed: int, min_split_docs: int) -> None:
    from fairseq.data import Dictionary, data_utils

    docs = _docs_by_name(corpus)
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))

    # splits are a partition of the documents, reproducible from the seed
    assert sorted(n for s in SPLITS for n in splits[s]) == sorted(docs)
    expected = split_documents(list(docs.values()), 0.05, 0.05, seed=seed, min_split_docs=min_split_docs)
    assert splits == {s: [d.name for d in expected[s]] for s in SPLITS}

    encoder = PieceEncoder(out / "spm.model")
    dictionary = Dictionary.load(str(out / "data-bin" / "dict.txt"))
    assert (out / "data-bin" / "dict.txt").read_text(encoding="utf-8") == (out / "dict.txt").read_text(
        encoding="utf-8"
    )
    for line in (out / "dict.txt").read_text(encoding="utf-8").splitlines():
        piece, count = line.split(" ")
        assert piece not in {"<s>", "</s>", "<pad>", "<unk>"} and int(count) > 0

    for split in SPLITS:
        names = splits[split]
        n_docs = len(names)
        assert n_docs >= 1 and info["splits"][split]["docs"] == n_docs
        for ext in ("bin", "idx"):
            assert (out / "data-bin" / f"{split}.{ext}").is_file()

        # raw: documents' non-empty lines, exactly one empty line between documents
        raw = (out / "raw" / f"{split}.txt").read_text(encoding="utf-8")
        raw_lines = raw.split("\n")
        assert raw_lines[-1] == ""  # file ends with a newline
        raw_lines = raw_lines[:-1]
        assert raw_lines[0] != "" and raw_lines[-1] != ""
        assert raw_lines.count("") == n_docs - 1
        assert all(raw_lines[i] or raw_lines[i + 1] for i in range(len(raw_lines) - 1))  # never two in a row
        expected_lines: list[str] = []
        for i, name in enumerate(names):
            if i:
                expected_lines.append("")
            expected_lines.extend(document_lines(docs[name].text))
        assert raw_lines == expected_lines

        # binarized: one item per line, separators are the only length-1 items
        dataset = data_utils.load_indexed_dataset(str(out / "data-bin" / split), dictionary)
        assert dataset is not None and len(dataset) == len(raw_lines)
        sizes = [int(s) for s in dataset.sizes]
        assert sizes.count(1) == n_docs - 1 == info["splits"][split]["separators"]
        assert min(sizes) >= 1
        for i, raw_line in enumerate(raw_lines):
            item = dataset[i]
            assert int(item[-1]) == dictionary.eos()
            assert (len(item) == 1) == (raw_line == "")
            assert dictionary.unk() not in item.tolist()
            if raw_line:  # the pieces of the line, as fairseq-preprocess would have binarized them
                pieces = [dictionary[int(t)] for t in item[:-1]]
                assert encoder.decode(pieces) == raw_line
                assert pieces == encoder.encode([raw_line])[0]
        assert sum(sizes) == info["splits"][split]["bin_tokens"]


def test_folder_pipeline(folder_prep: tuple[Path, dict], folder_corpus: Path) -> None:
    out, info = folder_prep
    _check_prepared(out, info, folder_corpus, seed=3, min_split_docs=1)
    assert info["documents"] == 8
    assert info["skipped"] == {"empty": 2, "not_utf8": 1}
    assert json.loads((out / "corpus_info.json").read_text(encoding="utf-8")) == info
    assert info["spm_pieces"] == VOCAB
    # the tab character is a sentencepiece piece but not a valid fairseq symbol: left out, respelled
    assert PieceEncoder(out / "spm.model").n_unsafe >= 1
    assert info["dict_size"] < VOCAB - 1


def test_jsonl_pipeline(jsonl_prep: tuple[Path, dict], jsonl_corpus: Path) -> None:
    out, info = jsonl_prep
    _check_prepared(out, info, jsonl_corpus, seed=1, min_split_docs=2)
    assert {s: info["splits"][s]["docs"] for s in SPLITS} == {"train": 3, "valid": 2, "test": 2}
    assert info["skipped"] == {"bad_json": 1, "blank_line": 1, "empty": 1, "no_text": 3}
    assert info["input_kind"] == "jsonl"


def test_encoder_roundtrip_unseen_text(folder_prep: tuple[Path, dict]) -> None:
    out, _ = folder_prep
    encoder = PieceEncoder(out / "spm.model")
    lines = ["\tdef f(x):\t# ÿ 😀 \u3000 wide\x0cfeed", "<s> </s> <pad> <unk>", "  two  spaces  "]
    for line, pieces in zip(lines, encoder.encode(lines)):
        assert all(p and p.split() == [p] and p not in {"<s>", "</s>", "<pad>", "<unk>"} for p in pieces)
        assert encoder.decode(pieces) == line


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path: Path, folder_corpus: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match="does not exist"):
        prepare_corpus(tmp_path / "nope", out, vocab_size=VOCAB)
    txt = tmp_path / "corpus.txt"
    txt.write_text("one document\n", encoding="utf-8")
    with pytest.raises(PreprocessError, match="use a folder"):
        prepare_corpus(txt, out, vocab_size=VOCAB)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(PreprocessError, match="no usable documents"):
        prepare_corpus(empty, out, vocab_size=VOCAB)
    two = tmp_path / "two"
    two.mkdir()
    for i in range(2):
        (two / f"{i}.txt").write_text(f"document {i}\n", encoding="utf-8")
    with pytest.raises(PreprocessError, match="too few documents: found 2, need at least 3"):
        prepare_corpus(two, out, vocab_size=VOCAB)
    with pytest.raises(PreprocessError, match="lower --vocab-size"):
        prepare_corpus(folder_corpus, out, vocab_size=20000)
    with pytest.raises(PreprocessError, match="raise --vocab-size"):
        prepare_corpus(folder_corpus, out, vocab_size=100)
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(PreprocessError, match="not writable"):
        prepare_corpus(folder_corpus, blocker / "out", vocab_size=VOCAB)
    with pytest.raises(PreprocessError, match="inside the input folder"):
        prepare_corpus(folder_corpus, folder_corpus / "prep", vocab_size=VOCAB)
    with pytest.raises(PreprocessError, match="--valid-frac"):
        prepare_corpus(folder_corpus, out, valid_frac=1.5)
    with pytest.raises(PreprocessError, match="--min-split-docs"):
        prepare_corpus(folder_corpus, out, min_split_docs=0)
    with pytest.raises(PreprocessError, match="--model-type"):
        prepare_corpus(folder_corpus, out, model_type="word")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError) as excinfo:
        prepare_corpus(tmp_path / "missing", tmp_path / "out")
    assert "\n" not in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_cli_missing_path_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_longmem.preprocess.prepare_corpus", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "does not exist" in proc.stderr
    assert proc.stdout == ""


def test_cli_main_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--input", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: no usable documents")


# --------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus(tmp_path: Path) -> None:
    files = stdlib_source_files()
    assert files and all(f.suffix == ".py" for f in files)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert not any(part in EXCLUDED_DIRS for f in files for part in f.relative_to(stdlib).parts[:-1])
    assert files == sorted(files, key=lambda f: f.relative_to(stdlib).as_posix())
    out = tmp_path / "stdlib"
    assert build_stdlib_corpus(out, max_docs=5) == 5
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 5 and all("/" not in n and n.endswith(".py") for n in names)
    assert all(len(p.read_text(encoding="utf-8")) >= 2000 for p in out.iterdir())
    assert build_stdlib_corpus(out, max_docs=5) == 5  # idempotent
    assert sorted(p.name for p in out.iterdir()) == names
    (out / "stray.txt").write_text("other corpus", encoding="utf-8")
    with pytest.raises(PreprocessError, match="empty or new folder"):
        build_stdlib_corpus(out, max_docs=5)
    assert build_stdlib_corpus(tmp_path / "stdlib2", max_docs=3) == 3
    assert len(list(iter_documents(tmp_path / "stdlib2"))) == 3
