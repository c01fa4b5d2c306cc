"""The bad-input matrix of docs/errors.md: every case is one clear `error:` line, exit 2.

Each case runs the entry point of a console script or evaluator CLI
(longmem-train, longmem-eval-lm, longmem-preprocess, longmem-report and the
``main`` of every evaluator in fairseq_longmem/eval) in-process and checks the
exit status, that the last line of stderr is `error: <message>` naming the
problem, and that no traceback was printed; a few cases run the installed
console scripts as real subprocesses.
"""

import os
import random
import shutil
import subprocess

import pytest
import torch

from fairseq_longmem import cli
from fairseq_longmem.eval import bucketed_ppl, chapter_break, icl, report
from fairseq_longmem.preprocess import prepare_corpus
from test_cli import console_script
from test_icl import make_icl_root

TOOLS = {
    "train": cli.train, "eval_lm": cli.eval_lm, "preprocess": prepare_corpus.main,
    "report": report.main, "bucketed_ppl": bucketed_ppl.main, "icl": icl.main,
    "chapter_break": chapter_break.main,
}


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
    f["random"] = root / "random.pt"
    f["random"].write_bytes(random.Random(0).randbytes(4096))
    f["empty_file"] = root / "empty.txt"
    f["empty_file"].write_text("")
    f["empty_json"] = root / "empty.json"
    f["empty_json"].write_text("{}")
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
    f["icl_empty"] = root / "icl_empty" / "SST-2"
    f["icl_empty"].mkdir(parents=True)
    (f["icl_empty"] / "train.tsv").write_text("sentence\tlabel\n")
    (f["icl_empty"] / "dev.tsv").write_text("sentence\tlabel\n")
    f["icl_empty"] = f["icl_empty"].parent
    f["icl"] = make_icl_root(root / "icl")
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
    ("train-missing-data", "train", lambda d, b, s, f: base_args("/no/such/data", b, s),
     "no dict.txt"),
    # longmem-eval-lm: missing file, corrupt or foreign checkpoint, missing data, empty split
    ("eval-random-bytes", "eval_lm", lambda d, b, s, f: ["--path", str(f["random"])],
     "the file is corrupt or not a checkpoint; check --path"),
    ("eval-truncated-checkpoint", "eval_lm", lambda d, b, s, f: ["--path", str(f["corrupt"])],
     "the file is corrupt or not a checkpoint; check --path"),
    ("eval-not-fairseq", "eval_lm", lambda d, b, s, f: ["--path", str(f["plain"])],
     "not a fairseq model checkpoint"),
    ("eval-missing-data", "eval_lm", lambda d, b, s, f: ["/no/such/data", "--path", str(b)],
     "data directory not found: /no/such/data"),
    ("eval-empty-split", "eval_lm",
     lambda d, b, s, f: [str(f["empty_split"]), "--path", str(b), "--task",
                         "longmem_language_modeling", "--gen-subset", "valid", "--cpu",
                         "--tokens-per-sample", "32"], "holds no tokens"),
    # longmem-report and the evaluators (one loader: eval/model_loading.py)
    ("report-missing-checkpoint", "report",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", "x=/no/such/ckpt.pt", "--out", str(s)],
     "checkpoint not found: /no/such/ckpt.pt; check the NAME=PATH of --checkpoint"),
    ("report-random-bytes", "report",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", f"x={f['random']}", "--out", str(s)],
     "the file is corrupt or not a checkpoint"),
    ("report-not-fairseq", "report",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", f"x={f['plain']}", "--out", str(s)],
     "not a fairseq model checkpoint"),
    ("report-missing-data", "report",
     lambda d, b, s, f: ["--data", "/no/such/data", "--checkpoint", f"x={b}", "--out", str(s)],
     "data directory not found: /no/such/data"),
    ("report-empty-split", "report",
     lambda d, b, s, f: ["--data", str(f["empty_split"]), "--split", "valid", "--cpu",
                         "--tokens-per-sample", "32", "--checkpoint", f"x={b}", "--out", str(s)],
     "holds no tokens"),
    ("report-no-checkpoint", "report", lambda d, b, s, f: ["--data", str(d), "--out", str(s)],
     "no --checkpoint NAME=PATH given"),
    ("bucketed-truncated-checkpoint", "bucketed_ppl",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", f"x={f['corrupt']}", "--json", ""],
     "the file is corrupt or not a checkpoint"),
    ("icl-missing-data-root", "icl",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", f"x={b}", "--cpu",
                         "--tokens-per-sample", "32", "--data-root", "/no/such/icl"],
     "--data-root /no/such/icl: not a directory"),
    ("icl-no-examples", "icl",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", f"x={b}", "--cpu", "--tasks", "sst2",
                         "--tokens-per-sample", "32", "--data-root", str(f["icl_empty"])],
     "no examples"),
    ("icl-missing-spm", "icl",
     lambda d, b, s, f: ["--data", str(d), "--checkpoint", f"x={b}", "--cpu", "--tasks", "sst2",
                         "--tokens-per-sample", "32", "--data-root", str(f["icl"]),
                         "--spm", "/no/such/spm.model"],
     "sentencepiece model not found"),
    ("chapter-break-missing-input", "chapter_break",
     lambda d, b, s, f: ["build", "--input", "/no/such/book.txt", "--out", str(s / "cb.json")],
     "--input /no/such/book.txt: no such file or directory"),
    ("chapter-break-empty-input", "chapter_break",
     lambda d, b, s, f: ["build", "--input", str(f["empty_file"]), "--out", str(s / "cb.json")],
     "no documents"),
    ("chapter-break-missing-instances", "chapter_break",
     lambda d, b, s, f: ["score", "--data", str(d), "--checkpoint", f"x={b}",
                         "--input", "/no/such/cb.json"], "chapter-break file not found"),
    ("chapter-break-no-instances", "chapter_break",
     lambda d, b, s, f: ["score", "--data", str(d), "--checkpoint", f"x={b}",
                         "--input", str(f["empty_json"])], "no instances"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(case, tiny_data, tiny_backbone, files, tmp_path, capsys):
    _, tool, make_argv, phrase = case
    argv = make_argv(tiny_data, tiny_backbone, tmp_path / "save", files)
    code = TOOLS[tool](argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and phrase in last, last
    assert "Traceback" not in err
    if os.environ.get("LONGMEM_ERRORS_LOG"):  # used to regenerate docs/errors.md
        with open(os.environ["LONGMEM_ERRORS_LOG"], "a") as log:
            log.write(f"{case[0]}\t{tool}\t{last}\n")


SCRIPT_CASES = [
    # (script, argv builder, phrase): the examples, as a user types them
    ("longmem-eval-lm", lambda d, b, f: ["--path", str(f["random"])],
     "the file is corrupt or not a checkpoint; check --path"),
    ("longmem-report", lambda d, b, f: ["--data", str(d), "--checkpoint", f"x={f['plain']}",
                                        "--out", str(f["empty_dir"].parent / "report")],
     "not a fairseq model checkpoint"),
    ("longmem-train", lambda d, b, f: base_args(d, f["random"], f["empty_dir"].parent / "ckpt"),
     "corrupt or not a fairseq checkpoint"),
    ("longmem-preprocess", lambda d, b, f: ["--input", str(f["empty_dir"]), "--out",
                                            str(f["empty_dir"].parent / "out")],
     "no usable documents"),
]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_console_scripts_give_one_clear_line(case, tiny_data, tiny_backbone, files):
    script, make_argv, phrase = case
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([console_script(script)] + make_argv(tiny_data, tiny_backbone, files),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and phrase in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
