"""train.sh, eval.sh and `eval.sh report` run end to end (tiny sizes, CPU)."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_train_and_eval_recipes(tiny_data, tmp_path):
    env = dict(
        os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPUS="0",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        DATA_DIR=str(tiny_data), CKPT_DIR=str(tmp_path / "ckpt"),
        BACKBONE_ARCH="alibi_lm_tiny", BACKBONE_TOKENS="64", BACKBONE_UPDATES="12",
        BACKBONE_LR="3e-3", WARMUP="2", ARCH="longmem_tiny", TOKENS_PER_SAMPLE="32",
        BATCH_SIZE="2", MAX_UPDATE="5", LR="1e-3", MEMORY_SIZE="128", K="8",
        RETRIEVAL_LAYER="3", SAVE_INTERVAL="5",
        EXTRA_ARGS="--disable-validation --log-format simple",
    )
    for stage in ("all", "ablation"):
        proc = subprocess.run(["bash", str(REPO_ROOT / "train.sh"), stage], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "backbone" / "checkpoint_last.pt").exists()
    env.update(
        PTM_PATH=str(ckpt / "backbone" / "checkpoint_last.pt"),
        CKPT_PATH=str(ckpt / "longmem_tiny" / "checkpoint_last.pt"),
        ABLATION_PATH=str(ckpt / "longmem_tiny_no_memory" / "checkpoint_last.pt"),
        SUBSET="valid", TOKENS_PER_SAMPLE="32", EXTRA_ARGS="",
    )
    proc = subprocess.run(["bash", str(REPO_ROOT / "eval.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| (")]
    assert len(rows) == 4, proc.stdout
    ppls = [float(r.split("|")[2]) for r in rows]
    assert all(p > 1 for p in ppls)
    assert ppls[2] != ppls[3]  # memory off vs on differ
    # `eval.sh report`: every checkpoint through longmem-report, on CPU, into REPORT_DIR
    env.update(REPORT_DIR=str(tmp_path / "report"),
               REPORT_ARGS="--quick --max-documents 2 --cb-max-instances 2 --buckets 1000,1500")
    proc = subprocess.run(["bash", str(REPO_ROOT / "eval.sh"), "report"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [c["name"] for c in report["checkpoints"]] == ["backbone", "no_memory", "longmem"]
    assert {c["tokens_per_sample"] for c in report["checkpoints"]} == {32}
    assert report["split"] == "valid" and report["perplexity"]["documents"] == 2
    assert "| <1K |" in (tmp_path / "report" / "report.md").read_text()
    # a missing backbone is one clear line
    env["PTM_PATH"] = str(tmp_path / "missing.pt")
    proc = subprocess.run(["bash", str(REPO_ROOT / "train.sh"), "adapt"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr
