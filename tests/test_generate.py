"""longmem-generate end to end on tiny models trained by stock fairseq-train, and
fairseq-interactive with --task longmem_language_modeling."""

import logging
import subprocess
import sys

import pytest

from conftest import PLUGIN_DIR, REPO_ROOT, run_fairseq
from test_training import train_args
from fairseq_longmem.generate import main


@pytest.fixture(scope="module")
def ckpts(tiny_data, tiny_backbone, tmp_path_factory):
    """LongMem, its no-memory ablation and MemTRM, a few updates each (T = 32)."""
    root = tmp_path_factory.mktemp("gen_ckpts")
    out = {}
    for name, extra in (("longmem", []), ("memtrm", ["--arch", "memtrm_tiny"])):
        args = train_args(tiny_data, tiny_backbone, root / name, steps=3) + extra
        run_fairseq("train", ["--user-dir", PLUGIN_DIR] + args)
        out[name] = root / name / "checkpoint_last.pt"
    args = [a for a in train_args(tiny_data, tiny_backbone, root / "ablation", steps=3)
            if a != "--use-external-memory"]
    run_fairseq("train", ["--user-dir", PLUGIN_DIR] + args)
    out["ablation"] = root / "ablation" / "checkpoint_last.pt"
    args = train_args(tiny_data, tiny_backbone, root / "ctx", steps=3) + ["--backbone-context", 5]
    run_fairseq("train", ["--user-dir", PLUGIN_DIR] + args)
    out["longmem_ctx"] = root / "ctx" / "checkpoint_last.pt"
    return out


@pytest.fixture(scope="module")
def context(tiny_data, tmp_path_factory):
    """A few hundred tokens of real text: several windows of 32."""
    text = (tiny_data.parent / "test.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()][:40]
    path = tmp_path_factory.mktemp("ctx") / "context.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def capsys(capsys, caplog):
    """stdout, and stderr with the log records (pytest captures logging itself)."""
    caplog.set_level(logging.INFO)
    capsys.caplog = caplog
    return capsys


def gen(capsys, *argv):
    capsys.caplog.clear()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err + capsys.caplog.text


def test_greedy_is_reproducible_and_memory_path_reuses_the_context(ckpts, context, tmp_path,
                                                                    capsys):
    mem = tmp_path / "ctx.mem"
    base = ["--path", ckpts["longmem"], "--spm", "none", "--max-len", 12, "--prompt", "def"]
    rc, out1, err = gen(capsys, *base, "--context", context, "--memory-path", mem)
    assert rc == 0, err
    assert "context tokens" in err and "tokens/s" in err
    assert mem.is_file() and out1.strip()
    rc, out2, err = gen(capsys, *base, "--memory-path", mem)
    assert rc == 0, err
    assert "memory loaded" in err and "read " not in err.split("memory loaded")[0][-200:]
    assert out2 == out1
    rc, beam, err = gen(capsys, *base, "--context", context, "--beam", 3)
    assert rc == 0 and beam.strip(), err


def test_backbone_context_survives_the_saved_memory(ckpts, context, tmp_path, capsys):
    """--backbone-context: a saved context restores the tokens its last segment is
    read after; a model reading another context refuses the file."""
    mem = tmp_path / "ctx.mem"
    base = ["--spm", "none", "--max-len", 12, "--prompt", "def"]
    rc, out1, err = gen(capsys, "--path", ckpts["longmem_ctx"], *base, "--context", context,
                        "--memory-path", mem)
    assert rc == 0, err
    rc, out2, err = gen(capsys, "--path", ckpts["longmem_ctx"], *base, "--memory-path", mem)
    assert rc == 0 and out2 == out1, err
    rc, _, err = gen(capsys, "--path", ckpts["longmem"], *base, "--memory-path", mem)
    assert rc != 0 and "written with backbone_context=5 but this model reads 0" in err


def test_sampling_is_deterministic_under_a_seed(ckpts, context, capsys):
    base = ["--path", ckpts["memtrm"], "--spm", "none", "--context", context, "--max-len", 15,
            "--prompt", "import", "--sampling", "--topk", 20]
    outs = [gen(capsys, *base, "--seed", 7) for _ in range(2)]
    assert outs[0][0] == 0, outs[0][2]
    assert outs[0][1] == outs[1][1] and outs[0][1].strip()


def test_prompt_longer_than_the_window_continues_into_memory(ckpts, context, tmp_path,
                                                             capsys):
    prompt = " ".join(["self", ".", "value", "=", "value"] * 16)  # 80 tokens > T = 32
    rc, out, err = gen(capsys, "--path", ckpts["longmem"], "--spm", "none", "--max-len", 5,
                       "--context", context, "--prompt", prompt)
    assert rc == 0, err
    assert "80 prompt +" in err


def test_bad_input(ckpts, context, tmp_path, capsys):
    lm = ["--path", ckpts["longmem"], "--max-len", 5, "--prompt", "x"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    rc, _, err = gen(capsys, *lm, "--spm", "none", "--context", empty)
    assert rc == 2 and "holds no text" in err
    rc, _, err = gen(capsys, *lm, "--context", context)  # tiny data has no spm.model
    assert rc == 2 and "no tokenizer beside the data" in err and "--spm" in err
    mem = tmp_path / "lm.mem"
    assert gen(capsys, *lm, "--spm", "none", "--context", context, "--memory-path", mem)[0] == 0
    rc, _, err = gen(capsys, "--path", ckpts["memtrm"], "--spm", "none", "--prompt", "x",
                     "--memory-path", mem)
    assert rc == 2 and "saved by another model" in err
    rc, _, err = gen(capsys, "--path", ckpts["ablation"], "--spm", "none", "--prompt", "x",
                     "--context", context, "--memory-path", tmp_path / "a.mem")
    assert rc == 2 and "has no memory" in err
    rc, _, err = gen(capsys, *lm, "--spm", "none", "--memory-path", tmp_path / "missing.mem")
    assert rc == 2 and "does not exist" in err


def test_ablation_generates_without_memory(ckpts, context, capsys):
    rc, out, err = gen(capsys, "--path", ckpts["ablation"], "--spm", "none", "--max-len", 8,
                       "--context", context, "--prompt", "def")
    assert rc == 0 and out.strip(), err


def test_fairseq_interactive_with_the_stream_task(ckpts, tiny_data):
    prompt = " ".join(["return", "self", ".", "x"] * 12)  # 48 tokens: crosses a window
    cmd = [sys.executable, "-m", "fairseq_cli.interactive", str(tiny_data), "--user-dir",
           PLUGIN_DIR, "--task", "longmem_language_modeling", "--path", str(ckpts["longmem"]),
           "--tokens-per-sample", "32", "--beam", "2", "--max-len-b", "60", "--cpu"]
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, input=prompt + "\n", capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hyps = [line for line in proc.stdout.splitlines() if line.startswith("H-0")]
    assert hyps and hyps[0].split("\t")[2].startswith(prompt), proc.stdout[-2000:]


def test_memory_size_at_generation(ckpts, context, tmp_path, capsys):
    """--memory-size sets the memory that reads the context: a memory saved with one size
    is refused by a run with another; a size that is not a whole number of chunks, or
    below k, is refused by name."""
    base = ["--path", ckpts["longmem"], "--spm", "none", "--max-len", 6, "--prompt", "def"]
    mem = tmp_path / "big.mem"
    rc, out, err = gen(capsys, *base, "--context", context, "--memory-size", 4096,
                       "--memory-path", mem)
    assert rc == 0 and out.strip(), err
    rc, _, err = gen(capsys, *base, "--memory-path", mem)  # the checkpoint's own size
    assert rc == 2 and "memory_size" in err
    rc, _, err = gen(capsys, *base, "--context", context, "--memory-size", 0)
    assert rc == 2 and "--memory-size must be >= 1" in err
    rc, _, err = gen(capsys, *base, "--context", context, "--memory-size", 6)
    assert rc == 2 and "memory" in err.lower()
