"""train.sh's launcher (scripts/launch.sh): two torchrun "nodes" on this machine give the
losses of one node with the same global batch; a resume under another number of streams
stops with a clear error; GPU presets refuse CPU; EXTRA_ARGS keep their quotes."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT
from test_training import free_port, losses

VENV = str(Path(sys.executable).parents[1])


def recipe_env(tmp_path, backbone, ckpt, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "GPUS", "NPROC")}
    env.update(
        OMP_NUM_THREADS="1", LONGMEM_VENV=VENV, DEVICE="cpu",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        CKPT_DIR=str(ckpt), PTM_PATH=str(backbone), ARCH="longmem_tiny",
        TOKENS_PER_SAMPLE="32", LR="2e-3", WARMUP="2", MAX_UPDATE="6", MEMORY_SIZE="128",
        K="8", RETRIEVAL_LAYER="3", SAVE_INTERVAL="100",
        # quotes inside EXTRA_ARGS survive (one argument "(0.9, 0.98)")
        EXTRA_ARGS="--disable-validation --log-format json --log-interval 1 --seed 3 "
                   "--side-dropout 0.0 --adam-betas '(0.9, 0.98)'",
    )
    env.update({k: str(v) for k, v in kw.items()})
    return env


def train_sh(env, *args, timeout=900):
    return subprocess.Popen(["bash", str(REPO_ROOT / "train.sh"), "adapt", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def test_two_nodes_match_one_node_and_resume_checks_streams(tiny_data, tiny_backbone, tmp_path):
    port = free_port()
    nodes = [train_sh(recipe_env(tmp_path, tiny_backbone, tmp_path / "two", DATA_DIR=tiny_data,
                                 NNODES=2, NODE_RANK=r, NPROC=2, BATCH_SIZE=1,
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in (0, 1)]
    results = [finish(p) for p in nodes]
    for rc, text in results:
        assert rc == 0, text[-4000:]
    two_text = results[0][1]
    assert "2 node(s) x 2 process(es) (CPU)" in two_text and VENV in two_text
    assert "distributed init (rank 3)" in results[1][1]  # node 1 holds ranks 2 and 3
    rc, one_text = finish(train_sh(recipe_env(tmp_path, tiny_backbone, tmp_path / "one",
                                              DATA_DIR=tiny_data, NPROC=2, BATCH_SIZE=2)))
    assert rc == 0, one_text[-4000:]
    l2, l1 = losses(two_text), losses(one_text)
    assert len(l1) == 6 and len(l2) == 6
    for a, b in zip(l2, l1):  # same 4 streams, same global batch
        assert abs(a - b) < 1e-3, (l2, l1)
    # resuming the 4-stream checkpoint (mid-epoch) with 2 streams: a clear error
    rc, text = finish(train_sh(recipe_env(tmp_path, tiny_backbone, tmp_path / "two",
                                          DATA_DIR=tiny_data, NPROC=1, BATCH_SIZE=2,
                                          MAX_UPDATE=8)))
    assert rc == 2, text[-3000:]
    assert "error: the checkpoint stopped at batch 6 of an epoch over 4 streams" in text


def test_gpu_preset_refuses_cpu_and_bad_venv(tmp_path):
    env = recipe_env(tmp_path, tmp_path / "none.pt", tmp_path / "ckpt", DATA_DIR=tmp_path,
                     ARCH="longmem_gpt2_medium", GPUS=0)
    del env["DEVICE"]
    rc, text = finish(train_sh(env), timeout=120)
    assert rc == 2 and "longmem_gpt2_medium is a GPU preset" in text and "DEVICE=cpu" in text
    env["LONGMEM_VENV"] = str(tmp_path / "novenv")
    rc, text = finish(train_sh(env), timeout=120)
    assert rc == 2 and "has no bin/python" in text
