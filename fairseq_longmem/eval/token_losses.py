"""Per-token losses of any LM over a split in stream order, with document positions.

The building block of every evaluation here: perplexity overall and per
document-length bucket, loss against position, the second-reading probe. It
runs the model exactly as fairseq-eval-lm does with the stream task (same
batches, same memory protocol), and also keeps where each target token sits.
"""

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..data.stream_dataset import DocumentStream

logger = logging.getLogger(__name__)


@dataclass
class TokenLosses:
    """nll: natural-log loss per target token; doc: its document index;
    pos: its 0-based position in the document; doc_lengths: tokens per document;
    correct: whether the model's top-1 prediction was the target (bool)."""

    nll: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    doc_lengths: np.ndarray
    correct: Optional[np.ndarray] = None

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.nll.mean())) if len(self.nll) else float("nan")

    def select(self, mask: np.ndarray) -> "TokenLosses":
        correct = None if self.correct is None else self.correct[mask]
        return TokenLosses(self.nll[mask], self.doc[mask], self.pos[mask], self.doc_lengths, correct)


def document_stream(docs, eos: int, name: str = "probe") -> DocumentStream:
    """A :class:`DocumentStream` from lists of token ids (each document a list)."""
    tokens = [eos]
    starts = []
    for d in docs:
        starts.append(len(tokens) - 1)
        tokens.extend(int(t) for t in d)
    return DocumentStream(np.asarray(tokens, dtype=np.int64), np.asarray(starts, dtype=np.int64), name)


@torch.no_grad()
def stream_token_losses(
    model,
    task,
    stream: DocumentStream,
    batch_size: int = 1,
    device: Optional[torch.device] = None,
    on_batch: Optional[Callable[[int, dict, dict], None]] = None,
    log_every: int = 0,
) -> TokenLosses:
    """Run ``model`` over ``stream`` in order; ``on_batch(t, sample, extra)`` is
    called after each batch with the model's second output (probes read what
    the memory layer retrieved there: ``extra["retrieval"]``)."""
    model.eval()
    decoder = getattr(model, "decoder", None)
    if hasattr(decoder, "reset_memory"):
        decoder.reset_memory()
    device = device or next(model.parameters()).device
    batches = task.stream_batches(stream, batch_size)
    pad = task.source_dictionary.pad()
    T = batches.tokens_per_sample
    nll_all, pos_all, top1_all = [], [], []
    for t in range(len(batches)):
        sample = batches.collater([batches[t]])
        net_input = {
            k: (v.to(device) if torch.is_tensor(v) else v) for k, v in sample["net_input"].items()
        }
        logits, extra = model(**net_input)[:2]
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        target = sample["target"].to(device)
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = target.ne(pad)
        input_pos = (
            torch.as_tensor(batches.bounds[:-1], device=device)[:, None]
            + t * T
            + torch.arange(target.size(1), device=device)[None, :]
        )
        nll_all.append(nll[keep].cpu().numpy())
        top1_all.append(lprobs.argmax(-1).eq(target)[keep].cpu().numpy())
        pos_all.append(input_pos[keep].cpu().numpy())
        if on_batch is not None:
            on_batch(t, sample, extra)
        if log_every and (t + 1) % log_every == 0:
            logger.info("%s: batch %d/%d", stream.name, t + 1, len(batches))
    nll = np.concatenate(nll_all) if nll_all else np.zeros(0)
    input_pos = np.concatenate(pos_all) if pos_all else np.zeros(0, dtype=np.int64)
    correct = np.concatenate(top1_all) if top1_all else np.zeros(0, dtype=bool)
    order = np.argsort(input_pos, kind="stable")
    nll, input_pos, correct = nll[order], input_pos[order], correct[order]
    doc = np.searchsorted(stream.doc_starts, input_pos, side="right") - 1
    pos = input_pos - stream.doc_starts[doc]
    return TokenLosses(nll, doc, pos, stream.doc_lengths, correct)
