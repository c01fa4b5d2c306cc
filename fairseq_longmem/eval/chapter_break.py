"""ChapterBreak suffix identification (Sun et al. 2022), as the LongMem paper reports it.

Given a long prefix that ends at a chapter boundary, pick the true opening of
the next chapter among 6 candidates (the true one and 5 openings of other
chapters of the same book); chance is 1/6 = 16.7%.

**Layout** (the released ``chapterbreak_ctx_{256..8192}.json``)::

    {"pg19": {"<book id>": [{"ctx": "...", "pos": "...", "negs": ["...", x5]}, ...], ...},
     "ao3":  {"<work id>": [ ... ]}}

``ctx`` is the prefix (it ends right before the chapter boundary), ``pos`` the
true next-chapter opening, ``negs`` the negative openings. :func:`load_instances`
reads that layout (and also a bare list of instances or an ``{id: instance}``
dict, found anywhere in the JSON); :func:`build_instances` writes it from any
corpus with chapter/section headings (a regex; ``CHAPTER IV``, ``ACT II`` /
``SCENE 3``, or top-level ``class`` / ``def`` lines of Python source), with
negatives drawn from other section openings of the same document and never
equal to the true one.

**Scoring** (:func:`score_instance`). The prefix runs through the model in
order, as one document: its first part in stream segments of
``tokens_per_sample`` (memory models write each segment to memory as usual),
its last part stays in the local window of the final segment, which ends with
the candidate. Every prefix token is either in memory or in the local context,
never both, so with memory the model sees all of the prefix, without memory
only its end. Each candidate is scored by the sum of its tokens' log-probs,
all candidates of an instance truncated to the same number of tokens ``n``
(at most ``--max-candidate-tokens``, default ``tokens_per_sample // 2``), so
sums are comparable. For memory models the memory after the prefix is
snapshotted once and restored before every candidate: one candidate's writes
never reach the next (the scores do not depend on candidate order). A model
that ranks the true opening first among ``m`` tied candidates gets ``1/m``.

Usage::

    python -m fairseq_longmem.eval.chapter_break build --input DOCS... --out cb.json \\
        [--documents file|blank-line] [--preset chapters|python | --heading-regex RE]
    python -m fairseq_longmem.eval.chapter_break score --data DIR [--spm DIR/spm.model] \\
        --input cb.json --checkpoint NAME=PATH ... [--subset ao3] [--max-instances N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import EvalError
from .cli_common import add_common_args, emit, load_all, run_command, write_json
from .model_loading import LoadedModel
from .scoring import score_continuations
from .text_encoding import TextEncoder, encoder_factory

logger = logging.getLogger(__name__)

NUM_NEGATIVES = 5
MEMORY_KEY = "chapter_break"

#: heading presets (``re.MULTILINE``: ``^`` is a line start)
HEADING_PRESETS = {
    # novels and plays: CHAPTER IV / Chapter 12 / ACT II / SCENE 3
    "chapters": r"^[ \t]*(?:CHAPTER|Chapter|ACT|Act|SCENE|Scene)[ \t]+(?:[IVXLCDM]+|[0-9]+)\b",
    # Python source: top-level definitions (the CPU quickstart's corpus)
    "python": r"^(?:class|def|async def)[ \t]",
    # pre-tokenised Python (the tests' word-level corpus: indentation stripped)
    "python-tokens": r"^(?:class|def) ",
}


@dataclass
class Instance:
    id: str
    ctx: str
    pos: str
    negs: List[str]
    subset: str = ""
    doc: str = ""

    def to_json(self) -> dict:
        return {"ctx": self.ctx, "pos": self.pos, "negs": list(self.negs)}


# ---------------------------------------------------------------------- layout
def _is_instance(obj) -> bool:
    return isinstance(obj, dict) and {"ctx", "pos", "negs"} <= set(obj)


def iter_layout(obj, path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], dict]]:
    """Every instance of a ChapterBreak-style JSON with the keys leading to it."""
    if _is_instance(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_layout(value, path + (str(key),))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from iter_layout(value, path + (str(i),))


def parse_instances(obj, subset: Optional[str] = None) -> List[Instance]:
    out = []
    for path, raw in iter_layout(obj):
        negs = raw["negs"]
        if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
            raise EvalError(f"instance {'/'.join(path)}: 'negs' must be a list of strings")
        if not isinstance(raw["ctx"], str) or not isinstance(raw["pos"], str):
            raise EvalError(f"instance {'/'.join(path)}: 'ctx' and 'pos' must be strings")
        group = path[0] if len(path) >= 3 else ""
        if subset is not None and group != subset:
            continue
        doc = path[1] if len(path) >= 3 else ""
        out.append(Instance("/".join(path), raw["ctx"], raw["pos"], list(negs), group, doc))
    return out


def load_instances(path: str, subset: Optional[str] = None, max_instances: Optional[int] = None,
                   seed: int = 0) -> List[Instance]:
    """Instances of a ChapterBreak JSON; ``subset`` (``pg19``/``ao3``) keeps one group;
    ``max_instances`` keeps a random (seeded) subsample, in file order."""
    if not os.path.isfile(path):
        raise EvalError(f"chapter-break file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path} is not JSON ({e})") from None
    inst = parse_instances(obj, subset)
    if not inst:
        groups = sorted({p[0] for p, _ in iter_layout(obj) if p})
        raise EvalError(
            f"no instances in {path}" + (f" for --subset {subset} (groups: {groups})" if subset else "")
        )
    if max_instances is not None and len(inst) > max_instances:
        keep = sorted(random.Random(seed).sample(range(len(inst)), max_instances))
        inst = [inst[i] for i in keep]
    return inst


def to_layout(instances: Iterable[Instance]) -> Dict[str, Dict[str, List[dict]]]:
    """``{subset: {document id: [instance, ...]}}`` (the released layout)."""
    out: Dict[str, Dict[str, List[dict]]] = {}
    for inst in instances:
        doc = inst.doc or inst.id
        out.setdefault(inst.subset or "custom", {}).setdefault(doc, []).append(inst.to_json())
    return out


# --------------------------------------------------------------------- builder
def read_documents(paths: Sequence[str], mode: str = "file") -> List[Tuple[str, str]]:
    """``(id, text)`` documents: ``file``: each file (or each file in a directory)
    is one document; ``blank-line``: documents are separated by empty lines (the
    ``raw/*.txt`` layout of ``longmem-preprocess``)."""
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise EvalError(f"--input {p}: no such file or directory")
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        name = os.path.relpath(f, os.path.dirname(paths[0]) or ".") if len(files) > 1 else os.path.basename(f)
        if mode == "file":
            docs.append((name, text))
        elif mode == "blank-line":
            parts = [d for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
            docs += [(f"{name}#{i}", d) for i, d in enumerate(parts)]
        else:
            raise EvalError(f"--documents {mode!r}: choose file or blank-line")
    return docs


def section_starts(text: str, heading_regex: str) -> List[int]:
    """Character offsets of the lines that match ``heading_regex`` (multiline)."""
    try:
        rx = re.compile(heading_regex, re.MULTILINE)
    except re.error as e:
        raise EvalError(f"--heading-regex {heading_regex!r}: {e}") from None
    starts = []
    for m in rx.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if not starts or starts[-1] != line_start:
            starts.append(line_start)
    return starts


def _opening(text: str, start: int, end: int, max_chars: int) -> str:
    """The first ``max_chars`` characters of ``text[start:end]``, cut at whitespace."""
    piece = text[start:end]
    if len(piece) > max_chars:
        cut = piece[:max_chars]
        ws = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        piece = cut[:ws] if ws > max_chars // 2 else cut
    return piece.strip()


def build_instances(
    documents: Sequence[Tuple[str, str]],
    heading_regex: str = HEADING_PRESETS["chapters"],
    num_negatives: int = NUM_NEGATIVES,
    suffix_chars: int = 600,
    max_prefix_chars: Optional[int] = None,
    min_prefix_chars: int = 200,
    negatives: str = "later",
    max_per_document: Optional[int] = None,
    subset: str = "custom",
    seed: int = 0,
) -> List[Instance]:
    """Instances of the released layout from documents with section headings.

    For every heading with at least ``min_prefix_chars`` of text before it:
    ``ctx`` = the document up to the heading (its last ``max_prefix_chars``,
    from a line start), ``pos`` = the section's opening (heading included, at
    most ``suffix_chars``, never past the next heading), ``negs`` =
    ``num_negatives`` openings of other sections of the same document, distinct
    from each other and from ``pos``: from *later* sections (``negatives="later"``,
    as ChapterBreak; such text is not in the prefix) or from any other section
    (``"any"``). Boundaries without enough negatives are skipped.
    """
    if negatives not in ("later", "any"):
        raise EvalError(f"--negatives {negatives!r}: choose later or any")
    out: List[Instance] = []
    skipped = 0
    for doc_id, text in documents:
        starts = section_starts(text, heading_regex)
        bounds = starts + [len(text)]
        openings = [_opening(text, bounds[j], bounds[j + 1], suffix_chars) for j in range(len(starts))]
        doc_inst = []
        for i, start in enumerate(starts):
            if len(text[:start].strip()) < max(1, min_prefix_chars):
                continue
            pos = openings[i]
            if not pos:
                continue
            pool_idx = [j for j in range(len(starts)) if j != i and (negatives == "any" or j > i)]
            seen, pool = {pos}, []
            for j in pool_idx:
                if openings[j] and openings[j] not in seen:
                    seen.add(openings[j])
                    pool.append(openings[j])
            if len(pool) < num_negatives:
                skipped += 1
                continue
            rng = random.Random(f"{seed}/{doc_id}/{i}")
            negs = rng.sample(pool, num_negatives)
            lo = 0 if max_prefix_chars is None else max(0, start - max_prefix_chars)
            if lo > 0:
                nl = text.find("\n", lo, start)
                lo = nl + 1 if nl >= 0 else lo
            ctx = text[lo:start].rstrip()
            doc_inst.append(Instance(f"{subset}/{doc_id}/{len(doc_inst)}", ctx, pos, negs, subset, doc_id))
        if max_per_document is not None and len(doc_inst) > max_per_document:
            keep = sorted(random.Random(f"{seed}/{doc_id}").sample(range(len(doc_inst)), max_per_document))
            doc_inst = [doc_inst[k] for k in keep]
            for n, inst in enumerate(doc_inst):
                inst.id = f"{subset}/{doc_id}/{n}"
        out += doc_inst
    if skipped:
        logger.info("chapter-break builder: %d boundaries skipped (fewer than %d distinct "
                    "%s section openings)", skipped, num_negatives, negatives)
    return out


def build_auto(documents: Sequence[Tuple[str, str]], heading: str = "auto", **kw) -> Tuple[List[Instance], str, str]:
    """:func:`build_instances` with a preset name, a regex, or ``auto`` (the preset
    giving the most instances); negatives from later sections, else from any.
    Returns ``(instances, heading regex used, negatives used)``."""
    if heading == "auto":
        candidates = list(HEADING_PRESETS.values())
    else:
        candidates = [HEADING_PRESETS.get(heading, heading)]
    orders = [kw.pop("negatives")] if "negatives" in kw else ["later", "any"]
    for neg in orders:
        best: Tuple[List[Instance], str] = ([], candidates[0])
        for rx in candidates:
            inst = build_instances(documents, rx, negatives=neg, **kw)
            if len(inst) > len(best[0]):
                best = (inst, rx)
        if best[0]:
            return best[0], best[1], neg
    return [], candidates[0], orders[-1]


def documents_from_split(task, split: str, encoder: TextEncoder,
                         max_documents: Optional[int] = None) -> List[Tuple[str, str]]:
    """The documents of a binarized split decoded back to text (one line per ``</s>``)."""
    task.load_dataset(split)
    stream = task.dataset(split)
    starts = list(stream.doc_starts) + [len(stream.tokens) - 1]
    n = len(stream.doc_starts) if max_documents is None else min(max_documents, len(stream.doc_starts))
    return [
        (f"{split}-{d}", encoder.decode_lines(stream.tokens[starts[d] + 1 : starts[d + 1] + 1]))
        for d in range(n)
    ]


# --------------------------------------------------------------------- scoring
def candidate_credit(scores: Sequence[float], true_index: int = 0) -> float:
    """1 if the true candidate scores strictly highest, 1/m if it ties m-way for first."""
    s = np.asarray(scores, dtype=np.float64)
    best = s.max()
    if s[true_index] < best:
        return 0.0
    return 1.0 / float(np.sum(s == best))


def score_instance(
    model,
    encoder: TextEncoder,
    inst: Instance,
    tokens_per_sample: int,
    max_candidate_tokens: Optional[int] = None,
    max_prefix_tokens: Optional[int] = None,
    device=None,
) -> Optional[dict]:
    """Scores of ``[pos] + negs`` (sum of log-probs of their first ``n`` tokens).

    Returns ``{"id", "scores", "n_tokens", "prefix_tokens", "local_tokens",
    "credit"}`` or None when a candidate encodes to no token.
    """
    T = int(tokens_per_sample)
    prefix = encoder.encode_lines(inst.ctx)
    if max_prefix_tokens is not None:
        prefix = prefix[-max_prefix_tokens:] if max_prefix_tokens > 0 else []
    cands = [encoder.encode_lines(c) for c in [inst.pos] + list(inst.negs)]
    cap = max_candidate_tokens or max(1, T // 2)
    n = min([cap, T - 1] + [len(c) for c in cands])
    if n < 1:
        return None
    inputs = [encoder.eos] + prefix  # the input stream of this document before the candidate
    s = max(0, len(inputs) + n - 1 - T)  # inputs[:s] precede the final segment
    per_token = score_continuations(
        model, inputs[:s], inputs[s:], [c[:n] for c in cands], T, device=device,
        memory_key=MEMORY_KEY,
    )
    scores = [float(sum(p)) for p in per_token]
    return {
        "id": inst.id, "scores": scores, "n_tokens": n, "prefix_tokens": len(prefix),
        "local_tokens": len(inputs) - s, "credit": candidate_credit(scores, 0),
    }


def evaluate(
    loaded: Sequence[LoadedModel],
    instances: Sequence[Instance],
    encoder_for,
    max_candidate_tokens: Optional[int] = None,
    max_prefix_tokens: Optional[int] = None,
    keep_instances: bool = True,
) -> Dict:
    """Accuracy of every model; ``encoder_for(lm)`` gives the :class:`TextEncoder` of a model."""
    result = {"instances": len(instances), "chance": 1.0 / (1 + NUM_NEGATIVES), "models": {}}
    for lm in loaded:
        enc = encoder_for(lm)
        rows = []
        for inst in instances:
            r = score_instance(lm.model, enc, inst, lm.tokens_per_sample,
                               max_candidate_tokens, max_prefix_tokens)
            if r is not None:
                rows.append(r)
        credit = [r["credit"] for r in rows]
        chance = float(np.mean([1.0 / len(r["scores"]) for r in rows])) if rows else float("nan")
        result["chance"] = chance if rows else result["chance"]
        result["models"][lm.name] = {
            "path": lm.path, "kind": lm.kind, "memory": lm.uses_memory,
            "tokens_per_sample": lm.tokens_per_sample,
            "accuracy": float(np.mean(credit)) if rows else float("nan"),
            "scored": len(rows), "skipped": len(instances) - len(rows),
            "mean_prefix_tokens": float(np.mean([r["prefix_tokens"] for r in rows])) if rows else 0.0,
            "mean_local_tokens": float(np.mean([r["local_tokens"] for r in rows])) if rows else 0.0,
            "per_instance": rows if keep_instances else [],
        }
        logger.info("chapter-break %s: accuracy %.3f on %d instances",
                    lm.name, result["models"][lm.name]["accuracy"], len(rows))
    return result


def markdown_table(result: Dict) -> str:
    lines = ["| model | accuracy | scored | prefix tokens (mean) | of which local (mean) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in result["models"].items():
        acc = r["accuracy"]
        acc_s = "-" if acc != acc else f"{100 * acc:.1f}%"
        lines.append(f"| {name} | {acc_s} | {r['scored']} | {r['mean_prefix_tokens']:.0f} | "
                     f"{r['mean_local_tokens']:.0f} |")
    lines.append(f"| chance | {100 * result['chance']:.1f}% | | | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ CLI
def _heading(args) -> str:
    if args.heading_regex:
        return args.heading_regex
    return args.preset


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairseq_longmem.eval.chapter_break",
                                description="ChapterBreak: build instances, score checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="make ChapterBreak-layout instances from a corpus")
    b.add_argument("--input", nargs="+", required=True, help="files or directories")
    b.add_argument("--documents", choices=["file", "blank-line"], default="file",
                   help="file: one document per file; blank-line: documents separated by "
                   "empty lines (prepare_corpus.py raw/*.txt)")
    b.add_argument("--preset", choices=sorted(HEADING_PRESETS) + ["auto"], default="chapters",
                   help="heading regex preset; auto: the preset that gives the most instances")
    b.add_argument("--heading-regex", default=None, help="overrides --preset (multiline regex)")
    b.add_argument("--num-negatives", type=int, default=NUM_NEGATIVES)
    b.add_argument("--negatives", choices=["later", "any"], default="later")
    b.add_argument("--suffix-chars", type=int, default=600)
    b.add_argument("--max-prefix-chars", type=int, default=None)
    b.add_argument("--min-prefix-chars", type=int, default=200)
    b.add_argument("--max-per-document", type=int, default=None)
    b.add_argument("--subset", default="custom", help="top-level group name in the JSON")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)

    s = sub.add_parser("score", help="accuracy of checkpoints on a ChapterBreak JSON")
    add_common_args(s, text=True)
    s.add_argument("--input", required=True, help="ChapterBreak JSON (released or built)")
    s.add_argument("--subset", default=None, help="e.g. pg19 or ao3 (default: all)")
    s.add_argument("--max-instances", type=int, default=None)
    s.add_argument("--max-prefix-tokens", type=int, default=None,
                   help="keep only the last N tokens of each prefix (quick runs)")
    s.add_argument("--max-candidate-tokens", type=int, default=None,
                   help="score at most N tokens per candidate (default tokens_per_sample // 2)")
    s.add_argument("--json", default=None)

    def body(args) -> int:
        if args.cmd == "build":
            docs = read_documents(args.input, args.documents)
            if not any(text.strip() for _, text in docs):
                raise EvalError(f"--input {' '.join(args.input)}: no documents (only empty files); "
                                "give files or directories with text")
            inst, rx, _ = build_auto(
                docs, _heading(args), num_negatives=args.num_negatives,
                suffix_chars=args.suffix_chars, max_prefix_chars=args.max_prefix_chars,
                min_prefix_chars=args.min_prefix_chars, negatives=args.negatives,
                max_per_document=args.max_per_document, subset=args.subset, seed=args.seed,
            )
            if not inst:
                raise EvalError(f"no instance built from {len(docs)} documents with section "
                                f"headings {rx!r} (an instance needs a section boundary and "
                                f"{args.num_negatives} other sections of the same document); "
                                "choose --preset or --heading-regex (and --documents)")
            write_json(to_layout(inst), args.out)
            print(f"wrote {len(inst)} instances from {len(docs)} documents to {args.out}")
            return 0
        instances = load_instances(args.input, args.subset, args.max_instances)
        result = evaluate(load_all(args), instances, encoder_factory(args.spm),
                          args.max_candidate_tokens, args.max_prefix_tokens)
        return emit(result, args.json, markdown_table(result))

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
