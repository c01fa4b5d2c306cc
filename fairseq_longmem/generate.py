"""``longmem-generate``: read a long text into memory, then write.

    longmem-generate --path CKPT --context BOOK.txt --prompt "Once" --max-len 50
    longmem-generate --path CKPT --context DIR --memory-path book.mem --prompts prompts.txt
    longmem-generate --path CKPT --memory-path book.mem --prompt "..." --sampling --topp 0.9

The history of a generation is ``</s>`` + the context (one line per text line,
each ending in ``</s>``) + the prompt + the generated tokens, cut into segments
of the model's ``--tokens-per-sample`` from its start (docs/generation.md). The
context is read batched over segments (only the memory-layer keys/values of its
complete segments are computed, then written to memory as in training); the
generation uses fairseq's ``SequenceGenerator`` (greedy, beam, top-k/top-p
sampling) with incremental decoding. A generation ends at the end of a line
(``</s>``) or after ``--max-len`` tokens. ``--memory-path`` saves what the
context left (the memory and the last segment's tokens) and, without
``--context``, starts from it. Each prompt starts from the same context.

Text is encoded with the data's own sentencepiece model (``spm.model`` that
preprocessing wrote next to, or one level above, the binarized data), or
``--spm none`` for data binarized from whitespace-tokenised text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from .errors import LongMemError, MemoryConfigError

logger = logging.getLogger("fairseq_longmem.generate")


class GenerateError(LongMemError):
    """Bad input of ``longmem-generate`` (message names the fix)."""


# ------------------------------------------------------------------ inputs
def read_context_text(path: str) -> str:
    """A file's text, or the ``*.txt`` files of a folder (sorted) joined as one history."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md"))
        if not files:
            raise GenerateError(f"--context {path}: the folder holds no .txt/.md file")
        return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not p.is_file():
        raise GenerateError(f"--context {path}: no such file or folder")
    return p.read_text(encoding="utf-8", errors="replace")


def find_tokenizer(data_dir: str, spm: Optional[str]) -> Optional[str]:
    """The sentencepiece model of the data: ``--spm`` (``none``: whitespace), else
    ``spm.model`` in the data directory or its parent (where preprocessing puts it)."""
    if spm is not None:
        if spm.lower() == "none":
            return None
        if not os.path.isfile(spm):
            raise GenerateError(f"--spm {spm}: no such file")
        return spm
    for cand in (Path(data_dir) / "spm.model", Path(data_dir).parent / "spm.model"):
        if cand.is_file():
            return str(cand)
    raise GenerateError(
        f"no tokenizer beside the data {data_dir} (no spm.model there or one level up): "
        "pass --spm PATH (the sentencepiece model preprocessing wrote), or --spm none if "
        "the data was binarized from whitespace-tokenised text"
    )


def read_prompts(args) -> List[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise GenerateError(f"--prompts {path}: no such file")
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise GenerateError(f"--prompts {path} holds no prompt (one per non-empty line)")
    return prompts


# ------------------------------------------------------------------ memory
class Progress:
    """Logs tokens read and tokens/s at most every ``every`` seconds (stderr)."""

    def __init__(self, total: int, every: float = 2.0):
        self.total, self.every = total, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last >= self.every or done >= self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            logger.info("read %d/%d context tokens (%.0f tokens/s)", done, self.total, rate)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def memory_meta(lm, decoder, checkpoint: str) -> dict:
    """What a saved generation memory must match: the writer of its keys/values."""
    from .eval.model_loading import file_digest

    meta = decoder.memory_identity("generate")
    meta.update(kind=lm.kind, tokens_per_sample=decoder.segment_length())
    if decoder.segment_context_length():  # keys were written after a stream context
        meta["backbone_context"] = decoder.segment_context_length()
    if lm.kind == "memtrm":  # its own (trained) weights wrote the memory
        meta["writer_checkpoint"] = file_digest(checkpoint)
    return meta


def save_context(path: str, state, meta: dict, tail: List[int], n_tokens: int,
                 before: List[int] = ()) -> None:
    """The memory, the last (partial) segment ``tail`` and the ``before`` tokens
    it is read after (``--backbone-context``)."""
    from .modules.memory_io import save_memory

    save_memory(state.bank, path, dict(meta, tail=list(tail), before=list(before),
                                       context_tokens=n_tokens))
    logger.info("memory saved to %s (%d context tokens)", path, n_tokens)


def load_context(path: str, decoder, meta: dict, device):
    """The state a saved context left: its memory, then its last segment re-run."""
    from .modules.incremental import run_segments
    from .modules.memory_io import load_memory, read_memory_header

    bank_meta = decoder.memory_identity("generate", decoder.new_memory(1, device))
    expected = dict(meta, **{k: v for k, v in bank_meta.items() if k not in meta})
    try:
        bank = load_memory(path, expected=expected, device=device, spec=decoder.spec)
    except MemoryConfigError as err:
        raise GenerateError(
            f"--memory-path {path} cannot serve this model (it was saved by another model "
            f"or setup): {err}"
        ) from None
    header = read_memory_header(path)
    tail = [int(t) for t in header["meta"].get("tail", [])]
    before = [int(t) for t in header["meta"].get("before", [])]
    saved_c = int(header["meta"].get("backbone_context", 0))
    if saved_c != decoder.segment_context_length():
        raise GenerateError(
            f"--memory-path {path} was written with backbone_context={saved_c} but this model "
            f"reads {decoder.segment_context_length()}: read the context again with this "
            f"model (--context FILE --memory-path {path})"
        )
    state = decoder.new_segment_cache(1, device)
    state.bank = bank
    if before and state.context_size:
        state.recent = torch.tensor([before[-state.context_size:]], device=device)
    with torch.no_grad():
        if tail:
            run_segments(state, torch.tensor([tail], device=device), decoder.segment_step,
                         decoder.segment_memory_kv, begin=decoder.begin_segment)
    state.consumed = 0
    logger.info("memory loaded from %s (%s context tokens)", path,
                header["meta"].get("context_tokens"))
    return state


# -------------------------------------------------------------- generation
def build_generator(model, dictionary, args, prompt_len: int):
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    strategy = None
    if args.sampling:
        strategy = search.Sampling(dictionary, args.topk, args.topp)
    return SequenceGenerator(
        [model], dictionary, beam_size=args.beam, max_len_a=0,
        max_len_b=prompt_len + args.max_len, min_len=1, max_len=prompt_len + args.max_len + 2,
        temperature=args.temperature, search_strategy=strategy,
    )


@torch.no_grad()
def generate_one(model, dictionary, prompt_ids: List[int], args, device) -> List[int]:
    """Token ids generated after ``prompt_ids`` (best hypothesis, without ``</s>``)."""
    eos = dictionary.eos()
    src = torch.tensor([[eos] + prompt_ids], device=device)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([src.size(1)])}}
    prefix = torch.tensor([prompt_ids], device=device) if prompt_ids else None
    gen = build_generator(model, dictionary, args, len(prompt_ids))
    hypo = gen.generate([model], sample, prefix_tokens=prefix, bos_token=eos)[0][0]
    out = hypo["tokens"].tolist()[len(prompt_ids):]
    if out and out[-1] == eos:
        out = out[:-1]
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longmem-generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--path", required=True, help="checkpoint (longmem, memtrm or alibi_lm)")
    p.add_argument("--context", help="a text file, or a folder of .txt files read in order")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="the text to continue")
    g.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--max-len", type=int, default=50, help="tokens to generate at most")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--sampling", action="store_true", help="sample instead of searching")
    p.add_argument("--topk", type=int, default=-1, help="sampling: the k most likely only")
    p.add_argument("--topp", type=float, default=-1.0, help="sampling: nucleus probability")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1, help="random seed (set before each prompt)")
    p.add_argument("--memory-path", help="save the context's memory here; without "
                   "--context, start from it")
    p.add_argument("--memory-size", type=int, default=None,
                   help="memory tokens per stream while reading and writing (default: the "
                   "checkpoint's; a larger memory holds more of a long context)")
    p.add_argument("--data", help="binarized data directory (default: the checkpoint's)")
    p.add_argument("--spm", help="sentencepiece model (default: spm.model beside the data); "
                   "'none': whitespace-tokenised data")
    p.add_argument("--batch-segments", type=int, default=8,
                   help="context segments computed together")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    return p


def run(args) -> List[str]:
    from .eval.model_loading import load_for_eval
    from .eval.text_encoding import TextEncoder
    from .modules.incremental import SegmentDecoding

    if args.max_len < 1:
        raise GenerateError(f"--max-len must be >= 1, got {args.max_len}")
    if args.beam < 1:
        raise GenerateError(f"--beam must be >= 1, got {args.beam}")
    if args.context is None and args.memory_path and not os.path.isfile(args.memory_path):
        raise GenerateError(
            f"--memory-path {args.memory_path} does not exist: pass --context to read a "
            "text and save its memory there first"
        )
    prompts = read_prompts(args)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if args.memory_size is not None and args.memory_size < 1:
        raise GenerateError(f"--memory-size must be >= 1, got {args.memory_size}")
    overrides = {"memory_size": args.memory_size} if args.memory_size else None
    lm = load_for_eval(args.path, data=args.data, device=device, overrides=overrides)
    model, decoder = lm.model, lm.model.decoder
    if not isinstance(decoder, SegmentDecoding):
        raise GenerateError(
            f"{args.path} is a {type(model).__name__}: longmem-generate runs longmem, memtrm "
            "and alibi_lm checkpoints"
        )
    dictionary = lm.task.source_dictionary
    encoder = TextEncoder(dictionary, find_tokenizer(lm.task.cfg.data, args.spm))
    has_memory = lm.uses_memory
    if args.memory_path and not has_memory:
        raise GenerateError(
            f"--memory-path: {args.path} has no memory ({lm.kind}, use_external_memory off); "
            "drop --memory-path"
        )
    meta = memory_meta(lm, decoder, args.path) if has_memory else {}

    if args.context is not None:
        text = read_context_text(args.context)
        ids = [dictionary.eos()] + encoder.encode_lines(text)
        if len(ids) == 1:
            raise GenerateError(f"--context {args.context} holds no text (nothing to read)")
        primed = ids[:-1]  # the generator's leading </s> is the context's last one
        progress = Progress(len(primed))
        state = decoder.read_context(primed, device=device, batch_segments=args.batch_segments,
                                     progress=progress)
        logger.info("context: %d tokens read in %.2fs (%.0f tokens/s)", len(primed),
                    progress.seconds, len(primed) / max(progress.seconds, 1e-9))
        if args.memory_path:
            T = decoder.segment_length()
            start = ((len(primed) - 1) // T) * T
            before = primed[max(0, start - decoder.segment_context_length()):start]
            save_context(args.memory_path, state, meta, primed[start:], len(primed),
                         before if start and decoder.segment_context_length() else [])
    elif args.memory_path:
        state = load_context(args.memory_path, decoder, meta, device)
    else:
        state = None
    decoder.set_generation_context(state)

    outputs = []
    try:
        for prompt in prompts:
            torch.manual_seed(args.seed)
            prompt_ids = encoder.encode(prompt)
            start = time.perf_counter()
            out = generate_one(model, dictionary, prompt_ids, args, device)
            secs = time.perf_counter() - start
            logger.info("%d prompt + %d generated tokens in %.2fs", len(prompt_ids), len(out),
                        secs)
            outputs.append(encoder.decode_lines(out))
    finally:
        decoder.set_generation_context(None)
    if encoder.unknown:
        logger.warning("%d prompt/context pieces are not in the dictionary (read as <unk>)",
                       encoder.unknown)
    return outputs


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stderr,
    )
    import fairseq_longmem  # noqa: F401  (registers task, models)

    args = get_parser().parse_args(argv)
    try:
        outputs = run(args)
    except LongMemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text in outputs:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
