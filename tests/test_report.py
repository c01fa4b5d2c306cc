"""The report command end to end (--quick) on the tiny fixtures: report.md, PNGs, JSON."""

import json

from conftest import PLUGIN_DIR, run_fairseq
from fairseq_longmem.eval import report
from test_icl import make_icl_root
from test_training import train_args


def train(data, backbone, save, arch):
    args = [str(a) for a in train_args(data, backbone, save, 2, bsz=2,
                                        extra=["--disable-validation"])]
    args[args.index("--arch") + 1] = arch
    run_fairseq("train", ["--user-dir", PLUGIN_DIR] + args)
    return save / "checkpoint_last.pt"


def test_report_quick_end_to_end(tiny_data, tiny_backbone, tmp_path):
    longmem = train(tiny_data, tiny_backbone, tmp_path / "longmem", "longmem_tiny")
    memtrm = train(tiny_data, tiny_backbone, tmp_path / "memtrm", "memtrm_tiny")
    icl_root = make_icl_root(tmp_path / "icl")
    out = tmp_path / "report"
    rc = report.main([
        "--data", str(tiny_data), "--checkpoint", f"backbone={tiny_backbone}",
        "--checkpoint", f"nomem={longmem}", "--override", "nomem.use_external_memory=false",
        "--checkpoint", f"memtrm={memtrm}", "--checkpoint", f"longmem={longmem}",
        "--tokens-per-sample", "32", "--out", str(out), "--icl-root", str(icl_root),
        "--quick", "--cpu", "--buckets", "1000,1500", "--memory-demos", "0,8",
    ])
    assert rc == 0
    md = (out / "report.md").read_text()
    for heading in ("## Perplexity per document-length bucket", "## Loss against position",
                    "## ChapterBreak suffix identification",
                    "## In-context learning with demonstrations in memory"):
        assert heading in md
    assert "| bucket (doc. tokens) | documents | tokens | backbone | nomem | memtrm | longmem |" in md
    assert "| <1K |" in md and "**overall**" in md
    assert "## Recall by distance" in md and (out / "recall_by_distance.png").exists()
    assert "| chance | 16.7% |" in md
    assert "| sst2 | longmem |" in md and "| subj | memtrm |" in md
    for png in ("ppl_buckets.png", "loss_by_position.png", "icl_accuracy.png"):
        assert f"]({png})" in md
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in data["checkpoints"]] == ["backbone", "nomem", "memtrm", "longmem"]
    assert [c["memory"] for c in data["checkpoints"]] == [False, False, True, True]
    assert [c["kind"] for c in data["checkpoints"]] == ["lm", "longmem", "memtrm", "longmem"]
    ppl = data["perplexity"]["models"]
    assert ppl["nomem"]["overall"]["ppl"] != ppl["longmem"]["overall"]["ppl"]
    assert data["chapter_break"]["instances"] > 0
    assert set(data["icl"]["tasks"]) == {"sst2", "subj"}
    assert (out / "chapter_break_instances.json").exists()
