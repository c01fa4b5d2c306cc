"""Scoring continuations against a fixed memory.

Run a history through a model (memory models write it to memory, in segments,
as in stream evaluation), snapshot the memory, then score several
continuations against that *same* memory, restored before each forward pass,
so one continuation's writes never reach the next. The ChapterBreak and
in-context-learning evaluators score their candidates this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import EvalError
from .model_loading import uses_memory


def snapshot_memory(model) -> Dict[str, tuple]:
    """A copy of every memory of the model: ``{memory_key: (bank, bank.state_dict())}``."""
    return {key: (bank, _clone(bank.state_dict()))
            for key, bank in model.decoder.memories.items()}


def restore_memory(model, snapshot: Dict[str, tuple]) -> None:
    """Put the model's memories back to ``snapshot`` (banks created since are dropped)."""
    memories = model.decoder.memories
    for key in list(memories):
        if key not in snapshot:
            del memories[key]
    for key, (bank, state) in snapshot.items():
        bank.load_state_dict(state)
        memories[key] = bank


def _clone(state):
    if torch.is_tensor(state):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def _forward_logprobs(model, inputs: torch.Tensor, doc_start: torch.Tensor, memory_key: str):
    """Log-probs ``(bsz, len, vocab)`` of one stream segment ``inputs`` ``(bsz, len)``."""
    logits = model(
        src_tokens=inputs, src_lengths=inputs.new_full((inputs.size(0),), inputs.size(1)),
        doc_start=doc_start, memory_key=memory_key,
    )[0]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def run_history(model, history: Sequence[int], tokens_per_sample: int, device=None,
                memory_key: str = "eval") -> None:
    """Feed ``history`` (the input ids of one document, from its start) through the
    model in segments of ``tokens_per_sample``; memory models write it to the memory
    of ``memory_key`` exactly as in stream evaluation."""
    device = device or next(model.parameters()).device
    model.decoder.reset_memory(memory_key)
    T = tokens_per_sample
    for a in range(0, len(history), T):
        seg = torch.tensor([list(history[a : a + T])], dtype=torch.long, device=device)
        ds = torch.zeros_like(seg, dtype=torch.bool)
        if a == 0:
            ds[0, 0] = True
        _forward_logprobs(model, seg, ds, memory_key)


@dataclass
class FixedMemory:
    """A model's memory after some history, restored before every scored segment."""

    model: torch.nn.Module
    memory: bool  # False: a model without memory (history is irrelevant to it)
    empty: bool  # no history at all: the final segment starts a new document
    snapshot: Optional[Dict[str, tuple]] = None
    memory_key: str = "eval"

    @classmethod
    def after(cls, model, history: Sequence[int], tokens_per_sample: int, device=None,
              memory_key: str = "eval", memory: Optional[bool] = None) -> "FixedMemory":
        memory = uses_memory(model) if memory is None else memory
        if memory and len(history):
            run_history(model, history, tokens_per_sample, device, memory_key)
        elif memory:
            model.decoder.reset_memory(memory_key)
        snap = snapshot_memory(model) if memory else None
        return cls(model, memory, len(history) == 0, snap, memory_key)

    @classmethod
    def loaded(cls, model, memory_key: str = "eval") -> "FixedMemory":
        """The model's current memories (e.g. just loaded from a file) as the fixed state."""
        return cls(model, True, False, snapshot_memory(model), memory_key)

    def release(self) -> None:
        if self.memory:
            self.model.decoder.reset_memory(self.memory_key)
        self.snapshot = None

    @torch.no_grad()
    def score(self, local: Sequence[int], continuations: Sequence[Sequence[int]],
              tokens_per_sample: int, device=None) -> List[List[float]]:
        """Per continuation, the log-probs of its tokens after the memory + ``local``.

        The final segment's input is ``local + continuation[:-1]`` (at most
        ``tokens_per_sample``; ``local`` non-empty: its last id predicts the
        continuation's first token). Continuations with the same input share
        one forward pass; the memory is restored before each forward pass.
        """
        if not local:
            raise EvalError("scoring needs at least one local input token")
        model = self.model
        device = device or next(model.parameters()).device
        cache: Dict[tuple, torch.Tensor] = {}
        out: List[List[float]] = []
        for cont in continuations:
            cont = [int(c) for c in cont]
            inputs = tuple(int(t) for t in local) + tuple(cont[:-1])
            if len(inputs) > tokens_per_sample:
                raise EvalError(
                    f"final segment of {len(inputs)} inputs exceeds tokens_per_sample "
                    f"{tokens_per_sample}"
                )
            if inputs not in cache:
                x = torch.tensor([inputs], dtype=torch.long, device=device)
                ds = torch.zeros_like(x, dtype=torch.bool)
                if self.empty:
                    ds[0, 0] = True  # nothing before: a new document
                if self.memory:
                    restore_memory(model, self.snapshot)
                cache[inputs] = _forward_logprobs(model, x, ds, self.memory_key)[0]
            lp = cache[inputs]
            t0 = len(local) - 1
            tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
            got = lp[t0 : t0 + len(cont)].gather(-1, tgt[:, None]).squeeze(-1)
            out.append(got.cpu().tolist())
        if self.memory:
            restore_memory(model, self.snapshot)
        return out


def score_continuations(
    model,
    history: Sequence[int],
    local: Sequence[int],
    continuations: Sequence[Sequence[int]],
    tokens_per_sample: int,
    memory: Optional[bool] = None,
    device=None,
    memory_key: str = "eval",
) -> List[List[float]]:
    """Log-probs of each continuation's tokens after ``history`` + ``local``.

    history: input ids of the same document before the final segment; memory
    models write them to memory (segments of ``tokens_per_sample``), models
    without memory never see them (skipped). Every continuation is scored
    against the same memory (snapshot after ``history``, restored before each).
    """
    fixed = FixedMemory.after(model, history, tokens_per_sample, device, memory_key, memory)
    try:
        return fixed.score(local, continuations, tokens_per_sample, device)
    finally:
        fixed.release()
