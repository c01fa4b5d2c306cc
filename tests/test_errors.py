"""The bad-input matrix of docs/errors.md: every case is one clear `error:` line, exit 2.

Each case runs the real console-script entry points (longmem-train,
longmem-eval-lm, longmem-preprocess) in-process and checks the exit status,
that the last line of stderr is `error: <message>` naming the problem, and
that no traceback was printed.
"""

import os
import shutil

import pytest
import torch

from fairseq_longmem import cli
from fairseq_longmem.preprocess import prepare_corpus


def base_args(data, backbone, save, **over):
    args = {
        "data": str(data), "--task": "longmem_language_modeling", "--arch": "longmem_tiny",
        "--pretrained-model-path": str(backbone), "--tokens-per-sample": "32",
        "--batch-size": "2", "--optimizer": "adam", "--lr": "1e-3", "--max-update": "1",
        "--save-dir": str(save), "--memory-size": "128", "--k": "8",
    }
    args.update(over)
    argv = [args.pop("data")]
    for k, v in args.items():
        if v is not None:
            argv += [k, v]
    return argv + ["--cpu", "--use-external-memory", "--reload-ptm-layer"]


@pytest.fixture(scope="module")
def files(tiny_data, tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    f = {}
    f["corrupt"] = root / "corrupt.pt"
    f["corrupt"].write_bytes(tiny_backbone.read_bytes()[:3000])
    state = torch.load(tiny_backbone, weights_only=False)
    state["cfg"]["model"]["_name"] = "longmem_tiny"
    f["foreign"] = root / "foreign.pt"
    torch.save(state, f["foreign"])
    f["plain"] = root / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, f["plain"])
    # data dirs: other dictionary, no valid split, empty split, corrupt .bin, no boundaries
    def copy_data(name):
        d = root / name
        shutil.copytree(tiny_data, d)
        return d
    f["dict_mismatch"] = copy_data("dict_mismatch")
    lines = (f["dict_mismatch"] / "dict.txt").read_text().splitlines()
    (f["dict_mismatch"] / "dict.txt").write_text("\n".join(lines[:-5]) + "\n")
    f["no_valid"] = copy_data("no_valid")
    for ext in ("bin", "idx"):
        (f["no_valid"] / f"valid.{ext}").unlink()
    f["corrupt_bin"] = copy_data("corrupt_bin")
    b = f["corrupt_bin"] / "valid.bin"
    b.write_bytes(b.read_bytes()[:-6])
    f["empty_split"] = copy_data("empty_split")
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(str(f["empty_split"] / "valid.bin"), impl="mmap",
                                           vocab_size=1000)
    builder.finalize(str(f["empty_split"] / "valid.idx"))
    f["one_doc"] = copy_data("one_doc")
    builder = indexed_dataset.make_builder(str(f["one_doc"] / "valid.bin"), impl="mmap",
                                           vocab_size=1000)
    for _ in range(3):
        builder.add_item(torch.IntTensor([5, 6, 7, 2]))
    builder.finalize(str(f["one_doc"] / "valid.idx"))
    f["blocker"] = root / "a_file"
    f["blocker"].write_text("not a directory")
    f["empty_dir"] = root / "empty_dir"
    f["empty_dir"].mkdir()
    # a memory saved by a model with --memory-size 64 (the cases below use 128)
    from conftest import build_longmem

    f["memory64"] = root / "memory64"  # holds valid.rank0.pt
    model, task = build_longmem(tiny_backbone, tiny_data, memory_path=str(f["memory64"]),
                                memory_size=64)
    task.load_dataset("valid")
    batches = task.stream_batches(task.dataset("valid"), 2)
    with torch.no_grad():
        for t in range(len(batches)):
            model(**batches.collater([batches[t]])["net_input"])
    f["memory_truncated"] = root / "memory_truncated"
    f["memory_truncated"].mkdir()
    (f["memory_truncated"] / "valid.rank0.pt").write_bytes(
        (f["memory64"] / "valid.rank0.pt").read_bytes()[:200])
    return f


CASES = [
    # (id, tool, argv builder, phrase)
    ("missing-backbone", "train", lambda d, b, s, f: base_args(d, "/no/such/backbone.pt", s),
     "backbone checkpoint not found"),
    ("corrupt-backbone", "train", lambda d, b, s, f: base_args(d, f["corrupt"], s),
     "corrupt or not a fairseq checkpoint"),
    ("other-family", "train", lambda d, b, s, f: base_args(d, f["foreign"], s),
     "not a decoder-only transformer LM"),
    ("not-fairseq", "train", lambda d, b, s, f: base_args(d, f["plain"], s),
     "not a fairseq model checkpoint"),
    ("dictionary-mismatch", "train", lambda d, b, s, f: base_args(f["dict_mismatch"], b, s),
     "dictionary mismatch"),
    ("missing-split", "train", lambda d, b, s, f: base_args(f["no_valid"], b, s),
     "split 'valid' not found"),
    ("empty-split", "train", lambda d, b, s, f: base_args(f["empty_split"], b, s),
     "holds no tokens"),
    ("corrupt-binarized", "train", lambda d, b, s, f: base_args(f["corrupt_bin"], b, s),
     "corrupt binarized data"),
    ("no-document-boundaries", "train", lambda d, b, s, f: base_args(f["one_doc"], b, s),
     "no document boundaries"),
    ("no-dictionary", "train", lambda d, b, s, f: base_args(f["empty_dir"], b, s),
     "no dict.txt"),
    ("tokens-beyond-positions", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--tokens-per-sample": "100"}),
     "exceeds the backbone's 64 positions"),
    ("k-larger-than-memory", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--memory-size": "8", "--k": "16"}),
     "smaller than --k"),
    ("k-not-multiple-of-chunk", "train", lambda d, b, s, f: base_args(d, b, s, **{"--k": "10"}),
     "must be a multiple of --chunk-size"),
    ("memory-not-multiple-of-chunk", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--memory-size": "130"}),
     "--memory-size (130) must be a multiple"),
    ("retrieval-layer-outside", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--retrieval-layer-index": "9"}),
     "outside the backbone"),
    ("side-width", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--decoder-embed-dim": "128"}),
     "side network width 128 differs"),
    ("reduction-factor", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--layer-reduction-factor": "3"}),
     "does not divide"),
    ("unwritable-save-dir", "train", lambda d, b, s, f: base_args(d, b, f["blocker"] / "ckpt"),
     "cannot write checkpoints to --save-dir"),
    ("too-many-streams", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--batch-size": "100000"}),
     "lower --batch-size"),
    ("memory-from-other-config", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--memory-path": str(f["memory64"]),
                                                 "--memory-from": "valid"}),
     "was built with memory_size=64 but this run has memory_size=128"),
    ("memory-file-truncated", "train",
     lambda d, b, s, f: base_args(d, b, s, **{"--memory-path": str(f["memory_truncated"]),
                                                 "--memory-from": "valid"}),
     "delete it and rebuild"),
    ("eval-missing-checkpoint", "eval_lm", lambda d, b, s, f: ["--path", "/no/such/ckpt.pt"],
     "checkpoint not found"),
    ("eval-context-window", "eval_lm",
     lambda d, b, s, f: [str(d), "--task", "longmem_language_modeling", "--path", str(b),
                         "--context-window", "8", "--cpu", "--tokens-per-sample", "32"],
     "--context-window does not apply"),
    ("preprocess-missing-input", "preprocess",
     lambda d, b, s, f: ["--input", "/no/such/corpus", "--out", str(s)], "does not exist"),
    ("preprocess-no-documents", "preprocess",
     lambda d, b, s, f: ["--input", str(f["empty_dir"]), "--out", str(s)], "no usable documents"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(case, tiny_data, tiny_backbone, files, tmp_path, capsys):
    _, tool, make_argv, phrase = case
    argv = make_argv(tiny_data, tiny_backbone, tmp_path / "save", files)
    if tool == "preprocess":
        code = prepare_corpus.main(argv)
    else:
        code = getattr(cli, tool)(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and phrase in last, last
    assert "Traceback" not in err
    if os.environ.get("LONGMEM_ERRORS_LOG"):  # used to regenerate docs/errors.md
        with open(os.environ["LONGMEM_ERRORS_LOG"], "a") as log:
            log.write(f"{case[0]}\t{tool}\t{last}\n")
