"""Real fairseq-train / fairseq-eval-lm runs of LongMem, single- and multi-process."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from conftest import PLUGIN_DIR, REPO_ROOT, run_fairseq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data, backbone, save, steps, bsz=2, extra=()):
    return [
        data, "--task", "longmem_language_modeling", "--arch", "longmem_tiny",
        "--pretrained-model-path", backbone, "--reload-ptm-layer", "--use-external-memory",
        "--criterion", "longmem_cross_entropy", "--tokens-per-sample", 32,
        "--batch-size", bsz, "--optimizer", "adam", "--lr", "2e-3", "--max-update", steps,
        "--save-dir", save, "--cpu", "--log-interval", 1, "--log-format", "json",
        "--no-epoch-checkpoints", "--seed", 3, "--side-dropout", 0.0,
        "--memory-size", 128, "--k", 8, *extra,
    ]


def losses(stderr: str):
    out = []
    for line in stderr.splitlines():
        m = re.search(r"(\{.*\"num_updates\".*\})", line)
        if m and "train_inner" in line:
            rec = json.loads(m.group(1))
            out.append(float(rec["loss"]))
    return out


def out(proc) -> str:
    return proc.stdout + proc.stderr


def perplexity(output: str) -> float:
    m = re.search(r"Perplexity: ([0-9.]+)", output)
    assert m, output[-3000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_backbone, tmp_path_factory):
    save = tmp_path_factory.mktemp("longmem")
    proc = run_fairseq(
        "train",
        ["--user-dir", PLUGIN_DIR] + train_args(tiny_data, tiny_backbone, save, 80, bsz=4,
                                                extra=["--disable-validation"]),
    )
    return save / "checkpoint_last.pt", proc.stdout + proc.stderr


def test_training_lowers_loss_and_keeps_backbone(trained, tiny_backbone):
    ckpt, log = trained
    ls = losses(log)
    assert len(ls) == 80
    first, last = sum(ls[:10]) / 10, sum(ls[-10:]) / 10
    assert last < first - 0.3, (first, last)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    bb = torch.load(tiny_backbone, map_location="cpu", weights_only=False)["model"]
    for name, tensor in bb.items():
        if name.startswith("decoder.") and not name.endswith("_float_tensor"):
            assert torch.equal(state["decoder.backbone." + name[len("decoder."):]], tensor), name
    assert "num. trained: " in log


def test_eval_lm_reloads_checkpoint_with_and_without_memory(trained, tiny_data, tiny_backbone, tmp_path):
    ckpt, _ = trained
    common = [tiny_data, "--user-dir", PLUGIN_DIR, "--task", "longmem_language_modeling",
              "--path", ckpt, "--tokens-per-sample", 32, "--batch-size", 2, "--cpu",
              "--gen-subset", "valid"]
    with_mem = perplexity(out(run_fairseq("eval_lm", common)))
    no_mem = perplexity(out(run_fairseq(
        "eval_lm", common + ["--model-overrides", "{'use_external_memory': False}"])))
    assert with_mem != no_mem
    # the checkpoint embeds the backbone: moving the backbone file away changes nothing
    moved = tmp_path / "moved.pt"
    os.rename(tiny_backbone, moved)
    try:
        again = perplexity(out(run_fairseq("eval_lm", common)))
    finally:
        os.rename(moved, tiny_backbone)
    assert again == with_mem
    # the console script needs only --path (data, task, segment length from the checkpoint)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from fairseq_longmem.cli import eval_lm; sys.exit(eval_lm())",
         "--path", str(ckpt), "--batch-size", "2", "--cpu", "--gen-subset", "valid"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert perplexity(out(proc)) == with_mem


def torchrun(args, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "fairseq_longmem.cli", "train"] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_process_training_matches_one_process(tiny_data, tiny_backbone, tmp_path):
    """2 torchrun ranks (gloo) x 2 streams == 1 process x 4 streams, step by step."""
    steps = 8
    extra = ["--disable-validation", "--distributed-backend", "gloo"]
    two = torchrun(train_args(tiny_data, tiny_backbone, tmp_path / "two", steps, bsz=2, extra=extra))
    assert "distributed init (rank 1)" in out(two)
    one = run_fairseq("train", ["--user-dir", PLUGIN_DIR]
                      + train_args(tiny_data, tiny_backbone, tmp_path / "one", steps, bsz=4,
                                   extra=["--disable-validation"]))
    l2, l1 = losses(out(two)), losses(out(one))
    assert len(l2) >= steps and len(l1) == steps
    # rank 0 logs the global (all-reduced) loss; both runs read the same 4 streams
    for a, b in zip(l2[:steps], l1):
        assert abs(a - b) < 1e-3, (l2, l1)  # logged losses are rounded to 3 decimals
    # finer: after 8 identical updates the trained weights agree to float precision
    p2 = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    p1 = torch.load(tmp_path / "one" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    diffs = [(p2["model"][k].float() - v.float()).abs().max().item()
             for k, v in p1["model"].items() if k.startswith("decoder.side.")]
    assert diffs and max(diffs) < 1e-4, max(diffs)  # measured: 1.1e-5 (Adam amplifies fp noise)
