"""The second-reading probe: does the model find and use text it has in memory?

Each document's opening (``length`` tokens) is read twice in a row as one
document. By the second reading the first is out of the local window but in
memory, so a model that uses memory should predict the second reading far
better than the same network without memory. The retrieval hit rate is the
share of second-reading queries (memory layer, per head or any head) whose
retrieved chunks include the chunk holding the token they repeat.
"""

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from . import EvalError
from .token_losses import TokenLosses, document_stream, stream_token_losses


@dataclass
class SecondReading:
    perplexity: float  # on the second reading
    first_perplexity: float  # on the first reading
    hit_rate_any_head: Optional[float]  # None for models without memory
    hit_rate_per_head: Optional[float]
    tokens: int
    documents: int


def openings(stream, length: int, min_length: int = 256) -> List[np.ndarray]:
    """The first ``length`` tokens of each document of a stream (those with >= min_length)."""
    out = []
    for s, n in zip(stream.doc_starts, stream.doc_lengths):
        if n >= min_length:
            out.append(stream.tokens[s + 1 : s + 1 + min(length, n)])
    return out


@torch.no_grad()
def second_reading(model, task, stream, length: int = 2048, min_length: int = 256) -> SecondReading:
    """Run the probe over the documents of ``stream`` (batch size 1, documents in order)."""
    ops = openings(stream, length, min_length)
    if not ops:
        raise EvalError(f"no document of {min_length}+ tokens for the second-reading probe")
    probe = document_stream([np.concatenate([o, o]) for o in ops], task.source_dictionary.eos())
    half = np.array([len(o) for o in ops])
    decoder = getattr(model, "decoder", None)
    records = hasattr(decoder, "rebuild_memory") and decoder.cfg.use_external_memory
    hits_any, hits_head, queries = [0], [0.0], [0]
    chunk = decoder.cfg.chunk_size if records else 1

    def on_batch(t, sample, extra):
        got = extra.get("retrieval") if isinstance(extra, dict) else None
        if got is None:
            return
        T = sample["net_input"]["src_tokens"].size(1)
        pos = batches_bounds[0] + t * T + np.arange(T)
        pos = pos[pos < len(probe.tokens) - 1]
        doc = np.searchsorted(probe.doc_starts, pos, side="right") - 1
        p = pos - probe.doc_starts[doc]  # input offset in the document = memory logical index
        second = p >= half[doc] + 1
        if not second.any():
            return
        idx = np.nonzero(second)[0]
        want = torch.as_tensor((p[idx] - half[doc[idx]]) // chunk)  # chunk of the repeated token
        logical = got.chunk_logical[0][:, idx].cpu()  # (heads, n, kc)
        hit = (logical == want[None, :, None]).any(-1)  # (heads, n)
        hits_any[0] += int(hit.any(0).sum())
        hits_head[0] += float(hit.float().mean(0).sum())
        queries[0] += len(idx)

    batches_bounds = task.stream_batches(probe, 1).bounds
    losses: TokenLosses = stream_token_losses(
        model, task, probe, batch_size=1, on_batch=on_batch if records else None
    )
    in_second = losses.pos >= half[losses.doc]
    return SecondReading(
        perplexity=float(np.exp(losses.nll[in_second].mean())),
        first_perplexity=float(np.exp(losses.nll[~in_second].mean())),
        hit_rate_any_head=(hits_any[0] / queries[0]) if records and queries[0] else None,
        hit_rate_per_head=(hits_head[0] / queries[0]) if records and queries[0] else None,
        tokens=int(in_second.sum()),
        documents=len(ops),
    )
