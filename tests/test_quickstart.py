"""The quickstart end to end at a tiny size (the full one is not part of the tests)."""

import json
import subprocess
import sys

from conftest import REPO_ROOT


def test_quickstart_tiny(tmp_path):
    work = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart" / "quickstart.py"), "--tiny",
         "--workdir", str(work), "--threads", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((work / "results.json").read_text())
    for key in ("backbone_ppl", "no_memory_adaptation_ppl", "longmem_no_memory_ppl", "longmem_ppl",
                "adaptation_steps", "second_reading_longmem_ppl", "second_reading_ablation_ppl",
                "retrieval_hit_rate", "eval_tokens", "eval_documents", "corpus", "wall_seconds"):
        assert key in r, key
    assert r["adaptation_steps"] == 6 and 1 <= r["eval_documents"] <= 3 and r["eval_tokens"] > 1000
    assert 0.0 <= r["retrieval_hit_rate"] <= 1.0
    assert 0.0 <= r["backbone_induction_max"] <= 1.0 and r["backbone_copy_second_ppl"] > 1.0
    assert "backbone in-context copy" in proc.stdout
    assert r["longmem_ppl"] != r["longmem_no_memory_ppl"]
    assert (work / "loss_vs_position.png").stat().st_size > 10_000
    assert "| (iv) LongMem |" in proc.stdout

    # the copy-curriculum variant on the same work directory: a backbone pretrained on the
    # quickstart's text mixed with copy documents, then the same adaptation and evaluation
    sys.path.insert(0, str(REPO_ROOT / "examples" / "quickstart"))
    import copy_curriculum

    cc = copy_curriculum.main(["--quickstart", str(work), "--workdir", str(tmp_path / "cc"),
                               "--steps", "4", "--threads", "1"])
    assert cc["data"]["copy_tokens"] >= cc["data"]["natural_tokens"] > 1000
    assert set(cc["recall"]["models"]) == {"backbone", "ablation", "longmem"}
    assert cc["longmem_ppl"] > 1.0 and cc["ablation_ppl"] > 1.0
    assert abs(cc["memory_gain_pct"]) < 100 and 0.0 <= cc["copy_probe"]["induction_max"] <= 1.0
    assert json.loads((tmp_path / "cc" / "results.json").read_text())["config"]["steps"] == 4
    missing = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "quickstart" / "copy_curriculum.py"),
                              "--quickstart", str(tmp_path / "none"), "--workdir", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "run the quickstart with --workdir" in missing.stderr
