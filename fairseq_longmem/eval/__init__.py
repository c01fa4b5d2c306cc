"""Evaluations of any checkpoint this project makes (backbone alone, LongMem, MemTRM).

Shared parts: :mod:`.model_loading` (``NAME=PATH`` specs, checkpoint -> model
+ stream task), :mod:`.text_encoding` (raw text -> dictionary ids),
:mod:`.scoring` (memory snapshots, continuations scored against a fixed
memory), :mod:`.token_losses` (per-token losses in stream order) and
:mod:`.cli_common` (the evaluators' shared flags, error handling, output).
Evaluators: :mod:`.bucketed_ppl`, :mod:`.chapter_break`, :mod:`.icl`,
:mod:`.second_reading`, :mod:`.copy_probe`; :mod:`.report` runs them all.
"""

from ..errors import LongMemError


class EvalError(LongMemError):
    """Bad evaluation input (message names the fix)."""
