"""One command for every evaluation of a list of checkpoints: ``report.md`` + plots + JSON.

::

    longmem-report --data DIR [--spm DIR/spm.model] \\
        --checkpoint backbone=PATH --checkpoint nomem=PATH --checkpoint memtrm=PATH \\
        --checkpoint longmem=PATH --out DIR [--icl-root PATH] [--quick]

Runs, for all checkpoints over the same data:

1. perplexity per document-length bucket and loss against position on
   ``--split`` (:mod:`.bucketed_ppl`);
2. ChapterBreak suffix identification (:mod:`.chapter_break`) on
   ``--chapter-break FILE`` (released layout), or on instances built from
   ``--chapter-source`` documents, or by default from the documents of
   ``--split`` itself (decoded back to text; headings found by ``--heading``,
   ``auto`` trying the presets);
3. memory-augmented in-context learning (:mod:`.icl`) when ``--icl-root`` is
   given, for a few values of ``N`` (demonstrations in memory).

Writes ``OUT/report.md`` (tables and PNG plots: ``ppl_buckets.png``,
``loss_by_position.png``, ``icl_accuracy.png``) and ``OUT/report.json``.
``--quick`` subsamples everything so that small models finish in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from . import bucketed_ppl, chapter_break, icl, recall
from .cli_common import add_common_args, load_all, run_command, write_json
from .text_encoding import encoder_factory

logger = logging.getLogger(__name__)

#: settings of a --quick run (each can still be set explicitly)
QUICK = {
    "max_documents": 40,
    "cb_max_instances": 12,
    "cb_max_prefix_tokens": 2048,
    "icl_tasks": "sst2,subj",
    "shots": 4,
    "memory_demos": "0,32,128",
    "seeds": 2,
    "max_test": 24,
}
FULL = {
    "max_documents": None,
    "cb_max_instances": None,
    "cb_max_prefix_tokens": None,
    "icl_tasks": ",".join(icl.TASKS),
    "shots": 20,
    "memory_demos": "0,200,2000",
    "seeds": 6,
    "max_test": None,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longmem-report",
                                description="All evaluations of a list of checkpoints -> report.md")
    add_common_args(p, text=True)
    p.add_argument("--out", required=True, help="output directory (report.md, report.json, PNGs)")
    p.add_argument("--quick", action="store_true", help="subsample everything (CPU, minutes)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--buckets", default=",".join(str(e) for e in bucketed_ppl.DEFAULT_EDGES))
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--skip-recall", action="store_true", help="skip recall by distance")
    # chapter break
    p.add_argument("--chapter-break", default=None, help="ChapterBreak JSON (released layout)")
    p.add_argument("--chapter-subset", default=None, help="e.g. ao3 or pg19")
    p.add_argument("--chapter-source", nargs="*", default=None,
                   help="documents to build instances from (default: the --split documents)")
    p.add_argument("--chapter-documents", choices=["file", "blank-line"], default="blank-line")
    p.add_argument("--heading", default="auto",
                   help="heading regex or preset (" + ", ".join(chapter_break.HEADING_PRESETS)
                   + ", auto)")
    p.add_argument("--cb-max-instances", type=int, default=None)
    p.add_argument("--cb-max-prefix-tokens", type=int, default=None)
    p.add_argument("--cb-max-candidate-tokens", type=int, default=None)
    p.add_argument("--skip-chapter-break", action="store_true")
    # icl
    p.add_argument("--icl-root", default=None, help="ICL data folder; ICL is skipped without it")
    p.add_argument("--icl-tasks", default=None)
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--memory-demos", default=None, help="comma-separated N values")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--memory-dir", default=None)
    return p


def resolve(args) -> None:
    """Fill unset knobs from QUICK or FULL."""
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _section_ppl(res: Dict, out: str) -> List[str]:
    lines = ["## Perplexity per document-length bucket", ""]
    lines.append(
        f"Split `{res['split']}`: {res['documents']} documents, {res['tokens']} tokens, read in "
        "stream order (one memory per document). Buckets are document lengths in tokens, "
        "half-open `[lo, hi)`; perplexity is exp(mean loss) over all tokens of the bucket."
    )
    lines += ["", bucketed_ppl.markdown_table(res)]
    if res["models"]:
        bucketed_ppl.plot_buckets(res, os.path.join(out, "ppl_buckets.png"))
        bucketed_ppl.plot_by_position(res, os.path.join(out, "loss_by_position.png"))
        lines += ["![perplexity per bucket](ppl_buckets.png)", "",
                  "## Loss against position", "",
                  "Mean loss (nats/token) of the tokens at each position of their document "
                  "(log-spaced bins). A model that uses the document's past gains at later positions.",
                  "", "![loss against position](loss_by_position.png)", "",
                  bucketed_ppl.position_table(res)]
    return lines


def _section_cb(res: Optional[Dict], note: str) -> List[str]:
    lines = ["## ChapterBreak suffix identification", "", note, ""]
    if res is not None:
        lines += [
            "Each prefix runs through the model as one document (memory models write its "
            "earlier segments to memory); each of the 6 candidates is scored by the log-prob "
            "of its first tokens (the same number for all candidates), against the same "
            "memory. Accuracy counts ties fractionally.", "",
            chapter_break.markdown_table(res),
        ]
    return lines


def _section_icl(res: Optional[Dict], note: str) -> List[str]:
    lines = ["## In-context learning with demonstrations in memory", "", note, ""]
    if res is not None:
        lines += [icl.markdown_table(res), "![ICL accuracy against N](icl_accuracy.png)", ""]
    return lines


def run(args) -> Dict:
    resolve(args)
    out = args.out
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    loaded = load_all(args)
    encoder_for = encoder_factory(args.spm)
    report: Dict = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": args.data, "split": args.split, "quick": args.quick,
        "checkpoints": [
            {"name": lm.name, "path": lm.path, "kind": lm.kind, "memory": lm.uses_memory,
             "tokens_per_sample": lm.tokens_per_sample} for lm in loaded
        ],
        "timings": {},
    }
    md = ["# fairseq-longmem evaluation report", "",
          f"Data `{args.data}`, split `{args.split}`" + (" (quick mode: subsampled)" if args.quick else "")
          + f", created {report['created']}.", "",
          "| name | kind | memory | segment tokens | checkpoint |", "|---|---|---|---:|---|"]
    for c in report["checkpoints"]:
        md.append(f"| {c['name']} | {c['kind']} | {'on' if c['memory'] else 'off'} | "
                  f"{c['tokens_per_sample']} | `{c['path']}` |")
    md.append("")

    # 1. perplexity
    if not args.skip_ppl:
        t = time.time()
        ppl = bucketed_ppl.evaluate(loaded, args.split, bucketed_ppl.parse_edges(args.buckets),
                                    args.batch_size, args.max_documents)
        report["perplexity"] = ppl
        report["timings"]["perplexity_s"] = round(time.time() - t, 2)
        md += _section_ppl(ppl, out)

    # 1b. recall by distance (fairseq_longmem.eval.recall)
    if not args.skip_recall:
        t = time.time()
        report["recall"], lines = recall.report_section(loaded, args.split, out,
                                                        max_documents=args.max_documents)
        report["timings"]["recall_s"] = round(time.time() - t, 2)
        md += lines

    # 2. chapter break
    if not args.skip_chapter_break:
        t = time.time()
        cb_res, note = None, ""
        if args.chapter_break:
            inst = chapter_break.load_instances(args.chapter_break, args.chapter_subset,
                                                args.cb_max_instances)
            note = f"Instances: `{args.chapter_break}`" + (
                f" (subset {args.chapter_subset})" if args.chapter_subset else "") + f", {len(inst)} scored."
        else:
            if args.chapter_source:
                docs = chapter_break.read_documents(args.chapter_source, args.chapter_documents)
                where = ", ".join(f"`{s}`" for s in args.chapter_source)
            else:
                docs = chapter_break.documents_from_split(
                    loaded[0].task, args.split, encoder_for(loaded[0]), args.max_documents)
                where = f"the `{args.split}` split (decoded)"
            inst, rx, neg = chapter_break.build_auto(docs, args.heading)
            if args.cb_max_instances is not None and len(inst) > args.cb_max_instances:
                import random

                keep = sorted(random.Random(0).sample(range(len(inst)), args.cb_max_instances))
                inst = [inst[i] for i in keep]
            note = (f"Instances built from {where}: {len(docs)} documents, section headings "
                    f"`{rx}`, negatives from {neg} sections of the same document; "
                    f"{len(inst)} instances scored.")
            if inst:
                write_json(chapter_break.to_layout(inst), os.path.join(out, "chapter_break_instances.json"))
                note += " They are in `chapter_break_instances.json` (released layout)."
        if inst:
            cb_res = chapter_break.evaluate(loaded, inst, encoder_for, args.cb_max_candidate_tokens,
                                            args.cb_max_prefix_tokens, keep_instances=False)
            report["chapter_break"] = cb_res
        else:
            note += " No instance could be built: no section headings found (see --heading)."
        report["timings"]["chapter_break_s"] = round(time.time() - t, 2)
        md += _section_cb(cb_res, note)

    # 3. ICL
    icl_res, note = None, ""
    if args.icl_root:
        t = time.time()
        ns = icl.parse_ints(args.memory_demos, "--memory-demos")
        icl_res = icl.evaluate(loaded, encoder_for, args.icl_root,
                               [x for x in args.icl_tasks.split(",") if x.strip()], args.shots, ns,
                               list(range(1, args.seeds + 1)), args.max_test, args.memory_dir)
        icl.plot_accuracy(icl_res, os.path.join(out, "icl_accuracy.png"))
        report["icl"] = icl_res
        report["timings"]["icl_s"] = round(time.time() - t, 2)
        note = (f"Data `{args.icl_root}`; k = {args.shots} demonstrations in the local context, "
                f"N in memory (written by running them through the model as one document). "
                "Models without memory get the same k demonstrations and ignore N.")
    else:
        note = "Skipped: pass `--icl-root PATH` (the folder with SST-2, sst-5, mr, subj, mpqa)."
    md += _section_icl(icl_res, note)

    report["timings"]["total_s"] = round(time.time() - t0, 2)
    md += ["## Caveats", "",
           "- Numbers from small models and subsampled data (`--quick`) show that the pipeline "
           "runs; they are not the paper's.",
           "- With a word-level or code vocabulary, ICL label words may be unknown symbols; "
           "then every label scores the same and the first label is always chosen.",
           "- See docs/evaluation.md for what each number means.", "",
           f"Total time {report['timings']['total_s']:.0f} s."]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")
    write_json(report, os.path.join(out, "report.json"))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    def body(args) -> int:
        run(args)
        print(f"wrote {os.path.join(args.out, 'report.md')} and report.json")
        return 0

    return run_command(build_parser(), argv, body)

if __name__ == "__main__":
    sys.exit(main())
