"""Memory-augmented in-context learning (the LongMem paper's ICL table).

``k`` demonstrations (``--shots``) sit in the local context before the test
input, and ``N`` more (``--memory-demos``, 2000 in the paper) are cached in
memory: they run through the model first, as one document, in segments of
``tokens_per_sample``, so that a memory model writes them to its memory. The
label is the one whose label word has the highest log-probability after the
test input's template prefix (summed over the word's tokens). Accuracy is
averaged over ``--seeds`` draws of the demonstrations (6 in the paper), with
its standard deviation. The backbone alone with the same ``k`` local
demonstrations is the baseline (models without memory ignore ``N``).

Templates (exact): ``Review: {text} Sentiment: {label}. `` and, for Subj,
``Input: {text} Type: {label}. ``. The test prompt is the local
demonstrations followed by ``Review: {text} Sentiment:``; each label is scored
as the continuation `` {label}``.

Data (``--data-root``, read in place, never copied; see its README.md)::

    SST-2/train.tsv, dev.tsv        header "sentence<TAB>label"; eval on dev
    sst-5/stsa.fine.{train,dev}     "L text" (L = 0..4); eval on dev
    mr/, subj/, mpqa/ train.csv, test.csv   "L,text" (csv quoting); eval on test

Per seed ``s``: the train set is permuted with ``numpy.random.RandomState(s)``;
the first ``k`` examples are the local demonstrations, the next ``N`` the
memory's (so the local ones are the same for every ``N`` and a smaller memory
is a prefix of a larger one). With ``--memory-dir`` each memory is saved once
(``fairseq_longmem.modules.memory_io.save_memory``) and reloaded by later runs
(checked against the checkpoint, task, seed, k and N).

Usage::

    python -m fairseq_longmem.eval.icl --data DIR [--spm DIR/spm.model] \\
        --data-root PATH/icl --checkpoint NAME=PATH ... [--tasks sst2,sst5,mr,subj,mpqa] \\
        [--shots 20] [--memory-demos 2000] [--seeds 6] [--max-test 200] [--memory-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import EvalError
from .cli_common import add_common_args, emit, load_all, run_command
from .model_loading import LoadedModel, file_digest
from .scoring import FixedMemory, run_history
from .text_encoding import TextEncoder, encoder_factory

logger = logging.getLogger(__name__)

MEMORY_KEY = "icl"

TEMPLATES = {
    "review": "Review: {text} Sentiment: {label}. ",
    "input": "Input: {text} Type: {label}. ",
}


@dataclass(frozen=True)
class IclTask:
    name: str
    folder: str
    train: str
    test: str
    fmt: str  # tsv (header sentence/label) | label-space ("L text") | csv ("L,text")
    labels: Tuple[str, ...]
    template: str  # key of TEMPLATES


TASKS: Dict[str, IclTask] = {
    t.name: t
    for t in (
        IclTask("sst2", "SST-2", "train.tsv", "dev.tsv", "tsv", ("negative", "positive"), "review"),
        IclTask("sst5", "sst-5", "stsa.fine.train", "stsa.fine.dev", "label-space",
                ("terrible", "bad", "okay", "good", "great"), "review"),
        IclTask("mr", "mr", "train.csv", "test.csv", "csv", ("negative", "positive"), "review"),
        IclTask("subj", "subj", "train.csv", "test.csv", "csv", ("subjective", "objective"), "input"),
        IclTask("mpqa", "mpqa", "train.csv", "test.csv", "csv", ("negative", "positive"), "review"),
    )
}


def task_by_name(name: str) -> IclTask:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise EvalError(f"unknown ICL task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[key]


# ---------------------------------------------------------------------- prompts
def format_demo(task: IclTask, text: str, label: int) -> str:
    """One demonstration: ``Review: {text} Sentiment: {label}. `` (Subj: ``Input: ... Type: ...``)."""
    return TEMPLATES[task.template].format(text=text, label=task.labels[label])


def query_prefix(task: IclTask, text: str) -> str:
    """The test input's template up to (not including) the label: ``Review: {text} Sentiment:``."""
    template = TEMPLATES[task.template]
    return template[: template.index(" {label}")].format(text=text)


def build_prompt(task: IclTask, demos: Sequence[Tuple[str, int]], text: str) -> str:
    """Local demonstrations then the test prefix; a label ``y`` continues it with
    ``" " + label``, so ``build_prompt(...) + " " + label + ". "`` is one more demonstration."""
    return "".join(format_demo(task, t, y) for t, y in demos) + query_prefix(task, text)


# ------------------------------------------------------------------------- data
def _read(path: str, fmt: str, n_labels: int) -> List[Tuple[str, int]]:
    if not os.path.isfile(path):
        raise EvalError(f"ICL data file not found: {path}; check --data-root (see its README.md)")
    rows: List[Tuple[str, int]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        if fmt == "tsv":
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["sentence", "label"]:
                raise EvalError(f"{path}: expected a 'sentence<TAB>label' header, got {header}")
            for r in reader:
                if len(r) >= 2 and r[0].strip():
                    rows.append((r[0].strip(), int(r[1])))
        elif fmt == "label-space":
            for line in fh:
                line = line.strip()
                if line:
                    label, _, text = line.partition(" ")
                    rows.append((text.strip(), int(label)))
        elif fmt == "csv":
            for r in csv.reader(fh):
                if len(r) >= 2:
                    rows.append((",".join(r[1:]).strip(), int(r[0])))
        else:
            raise ValueError(fmt)
    bad = [y for _, y in rows if not 0 <= y < n_labels]
    if bad:
        raise EvalError(f"{path}: labels {sorted(set(bad))} outside 0..{n_labels - 1}")
    if not rows:
        raise EvalError(f"{path}: no examples")
    return rows


def load_task(root: str, task: IclTask) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """``(train, test)`` examples ``(text, label)`` of ``task`` under ``root``."""
    folder = os.path.join(root, task.folder)
    train = _read(os.path.join(folder, task.train), task.fmt, len(task.labels))
    test = _read(os.path.join(folder, task.test), task.fmt, len(task.labels))
    return train, test


def subsample(test: Sequence, max_test: Optional[int], seed: int = 0) -> List:
    """The same random subset (in file order) for every seed and model."""
    if max_test is None or max_test >= len(test):
        return list(test)
    keep = np.sort(np.random.RandomState(seed).choice(len(test), max_test, replace=False))
    return [test[i] for i in keep]


def draw_demos(train: Sequence, shots: int, n_memory: int, seed: int):
    """``(local, memory)`` demonstrations of one seed: a permutation's first ``shots``
    examples, then the next ``n_memory`` (fewer if the train set is smaller)."""
    perm = np.random.RandomState(seed).permutation(len(train))
    local = [train[i] for i in perm[:shots]]
    memory = [train[i] for i in perm[shots : shots + n_memory]]
    return local, memory


# ---------------------------------------------------------------------- scoring
class PromptIds:
    """Token ids of demonstrations, queries and labels of one task (cached)."""

    def __init__(self, task: IclTask, encoder: TextEncoder):
        self.task = task
        self.encoder = encoder
        self.labels = [encoder.encode(label) for label in task.labels]
        if any(not ids for ids in self.labels):
            raise EvalError(f"a label word of {task.name} encodes to no token")
        if len({tuple(ids) for ids in self.labels}) < len(self.labels):
            logger.warning(
                "%s: label words %s encode to the same ids %s (not in the dictionary?): the "
                "first label wins every tie", task.name, task.labels, self.labels,
            )
        self._demo: Dict[Tuple[str, int], List[int]] = {}

    def demo(self, text: str, label: int) -> List[int]:
        key = (text, label)
        if key not in self._demo:
            self._demo[key] = self.encoder.encode(format_demo(self.task, text, label))
        return self._demo[key]

    def demos(self, demos: Sequence[Tuple[str, int]]) -> List[int]:
        out: List[int] = []
        for t, y in demos:
            out.extend(self.demo(t, y))
        return out

    def query(self, text: str) -> List[int]:
        return self.encoder.encode(query_prefix(self.task, text))


def fit_local(eos: int, demo_ids: Sequence[Sequence[int]], query: Sequence[int], budget: int):
    """``[eos] + demos + query`` within ``budget`` tokens: whole demonstrations are
    dropped from the front first, then the query is cut from the left.
    Returns ``(ids, demonstrations kept)``."""
    demos = list(demo_ids)
    while demos and 1 + sum(map(len, demos)) + len(query) > budget:
        demos.pop(0)
    ids = [eos] + [t for d in demos for t in d] + list(query)
    if len(ids) > budget:
        ids = [eos] + ids[len(ids) - budget + 1 :]
    return ids, len(demos)


def predict(fixed: FixedMemory, local: Sequence[int], labels: Sequence[Sequence[int]],
            tokens_per_sample: int) -> Tuple[int, List[float]]:
    """The label with the highest summed log-prob after ``local`` (and all scores)."""
    per_token = fixed.score(local, labels, tokens_per_sample)
    scores = [float(sum(p)) for p in per_token]
    return int(np.argmax(scores)), scores


def memory_meta(lm: LoadedModel, task: IclTask, seed: int, shots: int, n_memory: int) -> dict:
    return {
        "checkpoint_digest": file_digest(lm.path), "icl_task": task.name, "icl_seed": seed,
        "icl_shots": shots, "icl_memory_demos": n_memory, "template": TEMPLATES[task.template],
        "segment_tokens": lm.tokens_per_sample,
    }


_warned: Dict[tuple, bool] = {}


def prepare_memory(lm: LoadedModel, ids: PromptIds, memory_demos, meta: dict,
                   memory_dir: Optional[str] = None) -> Tuple[FixedMemory, int]:
    """The model's memory of ``memory_demos`` (one document), built or reloaded.

    Returns ``(fixed memory, history tokens)``. Saving/loading uses
    :mod:`fairseq_longmem.modules.memory_io`.
    """
    model, T = lm.model, lm.tokens_per_sample
    history = [ids.encoder.eos] + ids.demos(memory_demos)
    size = getattr(model.decoder.cfg, "memory_size", None)
    if size is not None and len(history) > size and not _warned.get((lm.name, len(memory_demos))):
        _warned[(lm.name, len(memory_demos))] = True
        logger.warning("%s: %d demonstrations are %d tokens but the memory keeps %d: the "
                       "oldest fall out (FIFO)", lm.name, len(memory_demos), len(history), size)
    path = None
    if memory_dir:
        name = (f"{lm.name}.{meta['icl_task']}.seed{meta['icl_seed']}.k{meta['icl_shots']}"
                f".N{meta['icl_memory_demos']}.pt")
        path = os.path.join(memory_dir, name)
    if path and os.path.exists(path):
        from ..modules.memory_io import load_memory

        device = next(model.parameters()).device
        bank = load_memory(path, expected=meta, device=device, spec=model.decoder.spec)
        model.decoder.reset_memory(MEMORY_KEY)
        model.decoder.memories[MEMORY_KEY] = bank
        logger.info("%s: memory of %d demonstrations loaded from %s", lm.name, len(memory_demos), path)
        return FixedMemory.loaded(model, MEMORY_KEY), len(history)
    run_history(model, history, T, memory_key=MEMORY_KEY)
    if path:
        from ..modules.memory_io import save_memory

        save_memory(model.decoder.memories[MEMORY_KEY], path, meta)
        logger.info("%s: memory saved to %s", lm.name, path)
    return FixedMemory.loaded(model, MEMORY_KEY), len(history)


def evaluate_task(
    lm: LoadedModel,
    encoder: TextEncoder,
    task: IclTask,
    train: Sequence,
    test: Sequence,
    shots: int,
    memory_demos: Sequence[int],
    seeds: Sequence[int],
    memory_dir: Optional[str] = None,
) -> Dict:
    """Accuracy per ``N`` of one model on one task: ``{N: {mean, std, per_seed, ...}}``.

    Models without memory are evaluated once (``N`` does not reach them) and
    the same numbers are reported for every ``N``.
    """
    ids = PromptIds(task, encoder)
    T = lm.tokens_per_sample
    budget = T - (max(len(label) for label in ids.labels) - 1)
    ns = sorted(set(int(n) for n in memory_demos))
    with_memory = lm.uses_memory
    runs = ns if with_memory else [0]
    per_n: Dict[int, Dict] = {}
    for n in runs:
        accs, kept, hist = [], [], []
        for seed in seeds:
            local_demos, mem_demos = draw_demos(train, shots, n, seed)
            if with_memory and mem_demos:
                meta = memory_meta(lm, task, seed, shots, len(mem_demos))
                fixed, h = prepare_memory(lm, ids, mem_demos, meta, memory_dir)
            else:
                fixed, h = FixedMemory.after(lm.model, [], T, memory_key=MEMORY_KEY), 0
            local_ids = [ids.demo(t, y) for t, y in local_demos]
            correct = 0
            for text, y in test:
                local, k_kept = fit_local(encoder.eos, local_ids, ids.query(text), budget)
                pred, _ = predict(fixed, local, ids.labels, T)
                correct += int(pred == y)
                kept.append(k_kept)
            fixed.release()
            accs.append(correct / max(1, len(test)))
            hist.append(h)
        per_n[n] = {
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "per_seed": accs,
            "memory_demos": n if with_memory else 0,
            "memory_tokens": float(np.mean(hist)),
            "local_demos_kept": float(np.mean(kept)) if kept else 0.0,
        }
        logger.info("ICL %s %s N=%d: %.3f +- %.3f", lm.name, task.name, n,
                    per_n[n]["mean"], per_n[n]["std"])
    return {str(n): per_n[n if with_memory else 0] for n in ns}


def evaluate(
    loaded: Sequence[LoadedModel],
    encoder_for,
    data_root: str,
    tasks: Sequence[str] = tuple(TASKS),
    shots: int = 20,
    memory_demos: Sequence[int] = (2000,),
    seeds: Sequence[int] = (1, 2, 3, 4, 5, 6),
    max_test: Optional[int] = None,
    memory_dir: Optional[str] = None,
) -> Dict:
    """``{"tasks": {task: {"test": n, "models": {name: {N: {...}}}}}, ...}``."""
    if not os.path.isdir(data_root):
        raise EvalError(f"--data-root {data_root}: not a directory (the ICL data, see its README.md)")
    result = {
        "shots": shots, "memory_demos": [int(n) for n in memory_demos], "seeds": list(seeds),
        "max_test": max_test, "tasks": {},
    }
    for name in tasks:
        task = task_by_name(name)
        train, test = load_task(data_root, task)
        test = subsample(test, max_test)
        entry = {"test": len(test), "train": len(train), "labels": list(task.labels),
                 "chance": 1.0 / len(task.labels), "models": {}}
        for lm in loaded:
            entry["models"][lm.name] = evaluate_task(
                lm, encoder_for(lm), task, train, test, shots, memory_demos, seeds, memory_dir
            )
        result["tasks"][task.name] = entry
    return result


def markdown_table(result: Dict) -> str:
    ns = [str(n) for n in sorted(set(result["memory_demos"]))]
    lines = [
        f"k = {result['shots']} local demonstrations, N in memory; accuracy (%) mean ± std over "
        f"{len(result['seeds'])} seeds" + (f", {result['max_test']} test examples max" if result["max_test"] else ""),
        "",
        "| task | model | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---:|" * len(ns),
    ]
    for tname, entry in result["tasks"].items():
        for mname, per_n in entry["models"].items():
            cells = [f"{100 * per_n[n]['mean']:.1f} ± {100 * per_n[n]['std']:.1f}" for n in ns]
            lines.append(f"| {tname} | {mname} | " + " | ".join(cells) + " |")
        lines.append(f"| {tname} | chance | " + " | ".join(f"{100 * entry['chance']:.1f}" for _ in ns) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(result: Dict, path: str) -> str:
    """Accuracy against N (one panel per task, one line per model)."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    ns = sorted(set(result["memory_demos"]))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.6),
                             squeeze=False)
    for ax, tname in zip(axes[0], tasks):
        entry = result["tasks"][tname]
        for mname, per_n in entry["models"].items():
            ys = [100 * per_n[str(n)]["mean"] for n in ns]
            es = [100 * per_n[str(n)]["std"] for n in ns]
            ax.errorbar(ns, ys, yerr=es, marker="o", capsize=3, label=mname)
        ax.axhline(100 * entry["chance"], color="gray", ls=":", lw=1, label="chance")
        if len(ns) > 1 and ns[0] >= 0:
            ax.set_xscale("symlog", linthresh=max(1, min(n for n in ns if n > 0) if any(ns) else 1))
        ax.set_title(f"{tname} (k={result['shots']})")
        ax.set_xlabel("demonstrations in memory (N)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ CLI
def parse_ints(text: str, flag: str) -> List[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{flag} {text!r}: give comma-separated integers") from None
    if not vals or any(v < 0 for v in vals):
        raise EvalError(f"{flag} {text!r}: give non-negative integers")
    return vals


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairseq_longmem.eval.icl",
                                description="Memory-augmented in-context learning accuracy.")
    add_common_args(p, text=True)
    p.add_argument("--data-root", required=True, help="ICL data folder (SST-2, sst-5, mr, subj, mpqa)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ",".join(TASKS))
    p.add_argument("--shots", type=int, default=20, help="k: demonstrations in the local context")
    p.add_argument("--memory-demos", default="2000",
                   help="N: demonstrations in memory (comma-separated list for several)")
    p.add_argument("--seeds", type=int, default=6, help="number of seeds (1..S)")
    p.add_argument("--max-test", type=int, default=None, help="subsample the test set")
    p.add_argument("--memory-dir", default=None, help="save/reload the demonstration memories here")
    p.add_argument("--json", default=None)

    def body(args) -> int:
        ns = parse_ints(args.memory_demos, "--memory-demos")
        result = evaluate(load_all(args), encoder_factory(args.spm), args.data_root,
                          [t for t in args.tasks.split(",") if t.strip()], args.shots, ns,
                          list(range(1, args.seeds + 1)), args.max_test, args.memory_dir)
        return emit(result, args.json, markdown_table(result))

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
