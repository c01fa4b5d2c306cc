"""The recall demonstration end to end at a tiny size, and the longmem-recall command on its models."""

import json
import subprocess
import sys

from conftest import REPO_ROOT
from fairseq_longmem.eval import recall

sys.path.insert(0, str(REPO_ROOT / "examples" / "recall"))
import key_probe  # noqa: E402
import read_probe  # noqa: E402
import recall_demo  # noqa: E402


def test_at_chance_is_a_binomial_test():
    """"At chance" (the ablation's and beyond-memory targets): not significantly above
    the uniform guess; a few lucky hits are chance, a copy rate is not."""
    p = 1 / 512
    assert recall_demo.at_chance(0.0, 312, p) and recall_demo.at_chance(3 / 312, 312, p)
    assert not recall_demo.at_chance(5 / 312, 312, p)  # P(X >= 5) ~ 4e-4
    assert not recall_demo.at_chance(0.5, 312, p) and not recall_demo.at_chance(0.0, 0, p)


def test_recall_demo_tiny_and_cli(tmp_path, capsys):
    work = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "recall" / "recall_demo.py"), "--tiny",
         "--workdir", str(work), "--threads", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((work / "results.json").read_text())
    res = r["recall"]
    assert res["window"] == 64 and res["memory_size"] == 1024 and res["edges"] == [64, 256, 1024]
    assert set(res["models"]) == {"backbone", "ablation", "longmem"}
    lm = res["models"]["longmem"]
    assert lm["memory"] and lm["memory_size"] == 1024  # evaluated with the larger memory
    # the test document has recurrences in every bucket, beyond the memory included
    assert all(b["tokens"] > 0 for b in lm["buckets"]) and lm["other"]["tokens"] > 0
    assert (sum(b["tokens"] for b in lm["buckets"]) + lm["other"]["tokens"]
            + lm["context_only"]["tokens"] == res["tokens"])
    assert r["copy_probe"] and "passed" in r["copy_probe"][-1]
    assert r["adaptation"]["longmem"]["steps"] == r["adaptation"]["ablation"]["steps"] == 6
    assert r["second_reading"]["longmem"]["hit_rate_any_head"] is not None
    assert set(r["targets"]) >= {"longmem_ge_95pct_from_window_to_memory", "ablation_at_chance_there",
                                 "longmem_at_chance_beyond_memory",
                                 "second_reading_ppl_50pct_below_ablation"}
    assert r["wall_seconds"]["total_s"] > 0
    assert (work / "recall_by_distance.png").stat().st_size > 10_000
    assert "| >=1K |" in proc.stdout and "target " in proc.stdout

    # the same models through the command, memory made smaller by an override
    out = tmp_path / "cli"
    code = recall.main(["--data", str(work / "data-recall"), "--split", "test", "--cpu",
                        "--checkpoint", f"ablation={work / 'ablation' / 'checkpoint_last.pt'}",
                        "--checkpoint", f"longmem={work / 'longmem' / 'checkpoint_last.pt'}",
                        "--override", "longmem.memory_size=256", "--out", str(out), "--n", "4"])
    assert code == 0
    got = json.loads((out / "recall.json").read_text())
    assert got["memory_size"] == 256 and got["edges"] == [32, 128, 256] and got["n"] == 4
    assert (out / "recall_by_distance.png").exists() and "| >=256 |" in (out / "recall.md").read_text()
    assert recall.main(["--data", str(work / "data-recall"), "--checkpoint", "x=/nonexistent.pt"]) == 2

    # the key probe on the demo's backbone: per head, the right key first implies retrieved
    kp = key_probe.main([str(work), "--layer", "1", "--window", "32", "--memory-size", "1024"])
    assert kp["targets"] > 0 and len(kp["heads"]) == 2
    for h in kp["heads"]:
        assert 0.0 <= h["share"] <= 1.0
        assert h["chunk1_k32"] >= h["argmax_right"] and h["chunk1_k32"] > 0.0
    assert "error: checkpoint not found" in capsys.readouterr().err

    # the read probe on the adapted LongMem: what its memory layer retrieved, against its top-1
    rp = read_probe.main([str(work), "--window", "32", "--memory-size", "1024", "--k", "8",
                          "--threads", "1"])
    assert rp["targets"] > 0 and len(rp["heads"]) == 2 and len(rp["gate"]) == 2
    for h in rp["heads"]:
        assert 0.0 <= h["first"] <= h["retrieved"] <= 1.0
        assert 0.0 <= h["share"] <= h["value_share"] + 1e-6 <= 1.0 + 1e-6
    g = rp["groups"]
    split = [v for name, v in g.items() if name.startswith(("right key retrieved", "retrieved"))]
    assert sum(v["tokens"] for v in split) == rp["targets"]
    assert sum(v["misses"] for v in split) == rp["misses"]
