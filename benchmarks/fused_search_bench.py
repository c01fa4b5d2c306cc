"""Microbenchmark of the fused chunk search on CUDA (paper search shape by default).

    python benchmarks/fused_search_bench.py [--sweep]
"""

import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fairseq_longmem.modules.fused_search import bench  # noqa: E402


def main(argv: Optional[list] = None) -> None:  # pragma: no cover - GPU only
    import argparse

    p = argparse.ArgumentParser(description="fused chunk search microbenchmark (CUDA)")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=16384)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kc", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time every kernel config")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the microbenchmark needs a CUDA device")
    import json

    print(json.dumps(bench(args), indent=1))


if __name__ == "__main__":
    main()
