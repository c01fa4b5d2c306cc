"""Evaluating a long document with a capped memory keeps resident memory flat."""

import sys

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import long_document_rss  # noqa: E402


def test_rss_does_not_grow_once_memory_is_full():
    result = long_document_rss.main(["--quick", "--samples", "10"])
    assert result["tokens"] >= 60_000
    # 50k+ tokens read after the memory filled up: no growth beyond allocator noise
    assert result["rss_growth_tokens"] >= 50_000
    assert result["rss_growth_after_memory_full_mb"] < 25, result["samples"]
