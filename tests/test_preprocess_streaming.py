"""longmem-preprocess at scale: shard kinds, --subsets, given splits, resuming, bad lines,
bounded memory, parallel == serial, and the mmap writer against fairseq's builder."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard

from conftest import REPO_ROOT

from fairseq_longmem.preprocess.documents import PreprocessError, document_lines
from fairseq_longmem.preprocess.mmap_writer import MMapWriter
from fairseq_longmem.preprocess.prepare_corpus import SPLITS, PieceEncoder, prepare_corpus

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import preprocess_speed  # noqa: E402

VOCAB = 300
WORDS = ("the of and to in is was for that with as on by at from river garden music history letter "
         "winter summer harbour mountain village market window evening morning question answer café "
         "naïve Zürich 東京 number seven eleven").split()


def _doc(rng: random.Random) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
                     for _ in range(rng.randint(2, 6))) + "\n"


def _records(rng: random.Random, n: int, subset: str = "Books3") -> list:
    return [{"text": _doc(rng), "meta": {"pile_set_name": subset}} for _ in range(n)]


def _write_shard(path: Path, lines: list) -> None:
    data = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines).encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _decoded(out: Path) -> dict:
    """Per split: the documents' lines decoded from data-bin, in stream order."""
    from fairseq.data import Dictionary, data_utils

    enc = PieceEncoder(out / "spm.model")
    d = Dictionary.load(str(out / "data-bin" / "dict.txt"))
    result = {}
    for split in SPLITS:
        ds = data_utils.load_indexed_dataset(str(out / "data-bin" / split), d)
        docs, cur = [], []
        for i in range(len(ds)):
            item = ds[i].tolist()
            if len(item) == 1:
                docs.append(cur)
                cur = []
            else:
                cur.append(enc.decode([d[t] for t in item[:-1]]))
        docs.append(cur)
        result[split] = docs
    return result


def _files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "data-bin").iterdir())}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple:
    """A folder with .jsonl, .jsonl.gz, .jsonl.zst shards (one nested) and text files."""
    root = tmp_path_factory.mktemp("sharded") / "corpus"
    rng = random.Random(5)
    texts = {}
    for name in ("a.jsonl", "b.jsonl.gz", "sub/c.jsonl.zst", "d.jsonl.zst"):
        recs = _records(rng, 12, subset="ArXiv" if name.startswith("b") else "Books3")
        _write_shard(root / name, recs)
        texts.update({f"{name}:{i + 1}": r["text"] for i, r in enumerate(recs)})
    for i in range(5):
        (root / "txt" / f"t{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "txt" / f"t{i}.txt").write_text(_doc(rng), encoding="utf-8")
        texts[f"txt/t{i}.txt"] = (root / "txt" / f"t{i}.txt").read_text(encoding="utf-8")
    return root, texts


def _check_documents(out: Path, texts: dict) -> None:
    """Every split's stream is its splits.json documents' lines, in order."""
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    decoded = _decoded(out)
    for split in SPLITS:
        assert decoded[split] == [document_lines(texts[n], 10000) for n in splits[split]], split
    assert sorted(n for s in SPLITS for n in splits[s]) == sorted(texts)


def test_every_shard_kind_and_parallel_equals_serial(sharded, tmp_path):
    root, texts = sharded
    info1 = prepare_corpus(root, tmp_path / "w1", vocab_size=VOCAB, workers=1, valid_frac=0.1, test_frac=0.1)
    info2 = prepare_corpus(root, tmp_path / "w2", vocab_size=VOCAB, workers=2, valid_frac=0.1, test_frac=0.1)
    assert info1["units"] == 5 and info1["input_kind"] == "mixed" and info1["documents"] == 53
    assert {s: info1["splits"][s]["docs"] for s in SPLITS} == {"train": 43, "valid": 5, "test": 5}
    _check_documents(tmp_path / "w1", texts)
    # token for token: the same files whatever the number of workers
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    assert (tmp_path / "w1" / "splits.json").read_bytes() == (tmp_path / "w2" / "splits.json").read_bytes()
    assert not (tmp_path / "w1" / "shards").exists() and not (tmp_path / "w1" / "manifest.json").exists()


def test_subsets_and_globs(sharded, tmp_path):
    root, texts = sharded
    info = prepare_corpus(str(root / "**" / "*.jsonl*"), tmp_path / "o", vocab_size=VOCAB, subsets=["ArXiv"],
                          workers=1, valid_frac=0.1, test_frac=0.1)
    assert info["documents"] == 12 and info["skipped"] == {"other_subset": 36}
    _check_documents(tmp_path / "o", {k: v for k, v in texts.items() if k.startswith("b.jsonl.gz")})
    with pytest.raises(PreprocessError, match="no usable documents.*other_subset=48"):
        prepare_corpus(str(root / "**" / "*.jsonl*"), tmp_path / "o2", vocab_size=VOCAB, subsets=["Github"])
    with pytest.raises(PreprocessError, match="matches no file"):
        prepare_corpus(str(root / "*.parquet"), tmp_path / "o3", vocab_size=VOCAB)


def test_given_splits_are_kept(sharded, tmp_path):
    root, texts = sharded
    info = prepare_corpus(None, tmp_path / "o", vocab_size=VOCAB, train=[root / "a.jsonl", root / "sub"],
                          valid=root / "txt", test=str(root / "d.*"))
    splits = json.loads((tmp_path / "o" / "splits.json").read_text(encoding="utf-8"))
    assert splits["train"] == [f"a.jsonl:{i}" for i in range(1, 13)] + [f"c.jsonl.zst:{i}" for i in range(1, 13)]
    assert splits["valid"] == [f"t{i}.txt" for i in range(5)]
    assert splits["test"] == [f"d.jsonl.zst:{i}" for i in range(1, 13)]
    named = {f"c.jsonl.zst:{k.split(':')[1]}" if k.startswith("sub/") else k.split("/")[-1]: v
             for k, v in texts.items() if not k.startswith("b.")}
    _check_documents(tmp_path / "o", named)
    assert info["given_splits"]["valid"] == [str(root / "txt")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(PreprocessError, match="no usable documents in the --valid input"):
        prepare_corpus(None, tmp_path / "o2", vocab_size=VOCAB, train=root / "a.jsonl", valid=empty,
                       test=root / "txt")
    with pytest.raises(PreprocessError, match="no input for --test"):
        prepare_corpus(None, tmp_path / "o3", train=root / "a.jsonl", valid=root / "txt")


def test_bad_lines_counted_and_reported_with_file_and_line(tmp_path, caplog):
    rng = random.Random(2)
    good = _records(rng, 6)
    lines = [good[0], '{"text": "unterminated', good[1], {"content": "no text"}, good[2], "[1, 2]",
             {"text": 7}, good[3], "not json at all", "", good[4], "{bad", good[5]]
    _write_shard(tmp_path / "in" / "s.jsonl.zst", lines)
    with caplog.at_level(logging.WARNING):
        info = prepare_corpus(tmp_path / "in", tmp_path / "o", vocab_size=VOCAB, min_split_docs=1)
    assert info["documents"] == 6
    assert info["skipped"] == {"bad_json": 3, "no_text": 3, "blank_line": 1}
    assert [b.split(": ")[0] for b in info["bad_lines"]] == ["s.jsonl.zst:2", "s.jsonl.zst:4", "s.jsonl.zst:6",
                                                             "s.jsonl.zst:7", "s.jsonl.zst:9"]
    assert "bad_json" in info["bad_lines"][0] and "no_text" in info["bad_lines"][1]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 6 bad input lines" in msg and "s.jsonl.zst:2: bad_json" in msg
    _write_shard(tmp_path / "bad" / "x.jsonl", ["{", "[]"])
    with pytest.raises(PreprocessError, match=r"no usable documents.*bad_json=1, no_text=1"):
        prepare_corpus(tmp_path / "bad", tmp_path / "o2", vocab_size=VOCAB)


def _shard_corpus(root: Path, n_shards: int = 4, docs: int = 30, seed: int = 9) -> None:
    rng = random.Random(seed)
    for s in range(n_shards):
        _write_shard(root / f"{s:02d}.jsonl.zst", _records(rng, docs))


def test_resume_skips_finished_units(tmp_path, caplog):
    corpus = tmp_path / "c"
    _shard_corpus(corpus)
    kw = dict(vocab_size=VOCAB, workers=1, keep_shards=True)
    prepare_corpus(corpus, tmp_path / "ref", vocab_size=VOCAB, workers=2)
    out = tmp_path / "o"
    prepare_corpus(corpus, out, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["done"]) == 4
    # a run killed before the merge and before its last unit was recorded
    for p in (out / "data-bin").iterdir():
        p.unlink()
    last = max(manifest["done"], key=lambda k: manifest["done"][k]["index"])
    del manifest["done"][last]
    (out / "manifest.json").write_text(json.dumps(manifest))
    unit_dirs = sorted((out / "shards").iterdir())
    mtimes = {p.name: (p / "train.bin").stat().st_mtime_ns for p in unit_dirs}
    with caplog.at_level(logging.INFO):
        prepare_corpus(corpus, out, **kw)
    assert "skipping 3 of 4 input units already binarized" in caplog.text
    after = {p.name: (p / "train.bin").stat().st_mtime_ns for p in sorted((out / "shards").iterdir())}
    changed = [n for n in after if after[n] != mtimes[n]]
    assert len(changed) == 1 and last in changed[0]  # only the unfinished unit was redone
    assert _files(out) == _files(tmp_path / "ref")
    # a different dictionary for the finished units is an error before anything is binarized
    manifest = json.loads((out / "manifest.json").read_text())
    prepare_corpus(corpus, tmp_path / "other", vocab_size=VOCAB + 20, workers=1)
    (out / "spm.model").write_bytes((tmp_path / "other" / "spm.model").read_bytes())
    with pytest.raises(PreprocessError, match="binarized with another dictionary"):
        prepare_corpus(corpus, out, **kw)


def test_killed_run_restarts_where_it_stopped(tmp_path):
    corpus = tmp_path / "c"
    _shard_corpus(corpus, n_shards=8, docs=400)
    prepare_corpus(corpus, tmp_path / "ref", vocab_size=VOCAB, workers=1)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "fairseq_longmem.preprocess.prepare_corpus", "--input", str(corpus), "--out",
           str(out), "--vocab-size", str(VOCAB), "--workers", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["done"]) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    n_done = len(json.loads((out / "manifest.json").read_text())["done"])
    assert 2 <= n_done < 8
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"skipping {n_done} of 8 input units already binarized" in rerun.stderr
    assert _files(out) == _files(tmp_path / "ref")
    assert not (out / "shards").exists()


def test_memory_stays_bounded(tmp_path):
    """6 MB and 48 MB of text: the Python heap peak does not grow with the corpus and stays far
    below it (no list of documents; the sample, one encode batch and fixed-size blocks)."""
    peaks = {}
    for mb in (6, 48):
        corpus = preprocess_speed.generate_corpus(tmp_path / f"c{mb}", mb * 1_000_000, shards=4, seed=1)
        tracemalloc.start()
        try:
            info = prepare_corpus(tmp_path / f"c{mb}", tmp_path / f"o{mb}", vocab_size=400, workers=1,
                                  spm_sample_chars=2_000_000, write_raw=False)
            peaks[mb] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info["documents"] == corpus["documents"]
    assert info["tokens"] > 10_000_000
    assert peaks[48] < 35_000_000 and peaks[48] - peaks[6] < 10_000_000, peaks


def test_mmap_writer_is_fairseq_builder_byte_for_byte(tmp_path):
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(0)
    items = [rng.integers(0, 60000, size=int(rng.integers(1, 50))) for _ in range(3000)]
    ref = MMapIndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for it in items:
        ref.add_item(torch.from_numpy(it))
    ref.finalize(str(tmp_path / "ref.idx"))
    part = MMapWriter(tmp_path / "part", np.uint16)
    for it in items[1000:]:
        part.add(it, np.array([it.size]))
    part.finalize()
    mine = MMapWriter(tmp_path / "mine", np.uint16)
    mine.add(np.concatenate(items[:1000]), np.array([it.size for it in items[:1000]]))
    mine.merge(tmp_path / "part")
    mine.finalize()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"mine.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_quick_benchmark(tmp_path):
    summary = preprocess_speed.main(["--quick", "--workdir", str(tmp_path / "b")])
    assert [r["workers"] for r in summary["runs"]] == [1, 2]
    assert summary["runs"][0]["tokens"] == summary["runs"][1]["tokens"] > 1_000_000
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in summary["runs"])
    assert not (tmp_path / "b").exists()  # deleted after measuring


def test_progress_bar_on_stderr(tmp_path, capsys):
    corpus = tmp_path / "c"
    _shard_corpus(corpus, n_shards=2, docs=20)
    prepare_corpus(corpus, tmp_path / "o", vocab_size=VOCAB, workers=2, progress=True)
    err = capsys.readouterr().err
    assert "scan" in err and "binarize" in err and "40/40" in err and "tok/s" in err
    prepare_corpus(corpus, tmp_path / "q", vocab_size=VOCAB, workers=1, progress=False)
    assert "tok/s" not in capsys.readouterr().err


def test_line_sample_is_the_same_whatever_the_arrival_order():
    # the sentencepiece sample must not depend on the order units finish in
    # (--workers 2): a short line must not fill the room an earlier-keyed long
    # line left (this made --workers 1 and 2 train different models under load)
    from fairseq_longmem.preprocess.shard_work import LineSample

    rng = random.Random(0)
    lines = [(rng.random(), u, d, "x" * rng.randint(1, 40)) for u in range(4) for d in range(50)]
    want = None
    for trial in range(20):
        order = lines[:]
        rng.shuffle(order)
        per_unit = []
        for u in range(4):  # per-unit samples, merged in a random order, as prepare_corpus does
            s = LineSample(500)
            for e in order:
                if e[1] == u:
                    s.add(*e)
            per_unit.append(s)
        rng.shuffle(per_unit)
        merged = LineSample(500)
        for s in per_unit:
            for e in s.entries():
                merged.add(*e)
        got = merged.entries()
        # the longest run of lines in key order within the budget
        ref, chars = [], 0
        for e in sorted(lines):
            if chars + len(e[3]) > 500:
                break
            ref.append(e)
            chars += len(e[3])
        assert got == ref, trial
        want = want or got
        assert got == want
