"""What every evaluator's command line shares: flags, loading, error handling, output.

An evaluator's ``main(argv)`` builds its parser (:func:`add_common_args` adds
the checkpoints, data and device flags), then hands :func:`run_command` a
function of the parsed flags; a user error (any ``LongMemError``) becomes one
``error: ...`` line on stderr and exit status 2. Results end with
:func:`emit` (tables on stdout, strict JSON to a file).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Callable, List, Optional

from ..cli import USER_ERRORS
from . import EvalError
from .model_loading import LoadedModel, load_for_eval, parse_checkpoints


def add_common_args(p: argparse.ArgumentParser, text: bool = False) -> None:
    """Flags every evaluation command shares (checkpoints, data, device); ``text``:
    also ``--spm`` for evaluators that encode raw text."""
    p.add_argument("--data", required=True, help="binarized data directory (dict.txt, splits)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a checkpoint to evaluate (repeat); any of backbone, longmem, memtrm")
    p.add_argument("--override", action="append", default=[], metavar="NAME.key=value",
                   help="model config override for one checkpoint (NAME) or all (*), e.g. "
                   "longmem.use_external_memory=false")
    p.add_argument("--tokens-per-sample", type=int, default=None,
                   help="segment length of every model (default: each checkpoint's own)")
    p.add_argument("--memory-scope", choices=["document", "stream"], default="document")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--fp16", action="store_true", help="evaluate in half precision (GPU)")
    if text:
        p.add_argument("--spm", default=None,
                       help="sentencepiece model of the data (DIR/spm.model of "
                       "longmem-preprocess); without it text is split on whitespace")


def load_all(args: argparse.Namespace) -> List[LoadedModel]:
    """Every ``--checkpoint`` of the parsed flags, loaded over ``--data``."""
    specs = parse_checkpoints(args.checkpoint, args.override)
    if not specs:
        raise EvalError("no --checkpoint NAME=PATH given")
    device = "cpu" if args.cpu else None
    return [
        load_for_eval(s.path, data=args.data, tokens_per_sample=args.tokens_per_sample,
                      overrides=s.overrides, device=device, memory_scope=args.memory_scope,
                      name=s.name, fp16=args.fp16)
        for s in specs
    ]


def run_command(parser: argparse.ArgumentParser, argv: Optional[List[str]],
                body: Callable[[argparse.Namespace], int]) -> int:
    """Parse ``argv``, log at INFO and return ``body(args)``; a user error is one
    ``error: ...`` line on stderr and exit status 2 (no traceback)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return body(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def emit(result, json_path: Optional[str], *tables: str) -> int:
    """End of an evaluator's command line: print its tables, write its JSON, exit 0."""
    for table in tables:
        print(table)
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    return 0


def json_safe(obj):
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(obj), fh, indent=1, allow_nan=False)
    return path
