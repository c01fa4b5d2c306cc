"""benchmarks/data_scale.py --quick: a 30M-token binarized split read by 2 simulated
ranks; a rank's memory stays far below a copy of the tokens, and the data is removed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import data_scale  # noqa: E402


def test_quick_benchmark(tmp_path):
    summary = data_scale.main(["--quick", "--workdir", str(tmp_path)])
    assert summary["ranks"] == 2 and summary["tokens"] >= 30_000_000
    # an int64 copy of the split would be 240 MB; the rank holds its documents only
    assert 0 < summary["peak_rss_above_idle_mb_max"] < 100
    assert summary["batches_per_s_min"] > 0
    assert abs(summary["batches_per_epoch"] - summary["tokens"] / (2 * 8 * 1024)) <= 1
    assert not (tmp_path / "data-bin").exists()  # deleted after measuring
