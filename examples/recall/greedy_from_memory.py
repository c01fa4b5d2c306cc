#!/usr/bin/env python
"""Greedy generation from memory on the recall demonstration's models (issue 15).

For every planted span of the demo's test document whose source lies beyond
four local windows and inside the generation memory, reads the document up to
the span's repeat into memory with ``longmem-generate`` (``--context``,
``--memory-size``), prompts
with the repeat's first ``--prompt-tokens`` symbols and decodes ``--new-tokens``
greedily. Counts the generated symbols that equal the span's continuation, for
LongMem and the no-memory ablation. Run after ``bash examples/recall/run.sh``:

    python examples/recall/greedy_from_memory.py --workdir workdir/recall
"""

import argparse
import json
import logging
import tempfile
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="workdir/recall", help="the demo's --workdir")
    p.add_argument("--window", type=int, default=64, help="the demo's --window")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--max-docs", type=int, default=None, help="test documents used (default: all)")
    p.add_argument("--memory-size", type=int, default=4096,
                   help="memory while generating (longmem-generate --memory-size)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import fairseq_longmem  # noqa: F401  (registers the task and models)
    from fairseq.data import Dictionary, data_utils
    from fairseq_longmem import generate

    work = Path(args.workdir)
    data = work / "data-recall"
    d = Dictionary.load(str(data / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(data / "test"), d)
    recs = json.loads((data / "test.recurrences.json").read_text())["recurrences"]
    # the split holds each document followed by an empty line (the stream task's format)
    docs = [dataset[i].tolist() for i in range(len(dataset)) if len(dataset[i]) > 1]
    memory = args.memory_size
    spans = [(doc, r) for doc, doc_recs in zip(docs[: args.max_docs], recs)
             for r in doc_recs if r[0] == "span"
             and 4 * args.window <= r[2] - r[1] <= memory - 2 * args.window]
    P, N = args.prompt_tokens, args.new_tokens
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp) / "context.txt"
        for name in ("longmem", "ablation"):
            rows = []
            for doc, (_, src, tgt, _) in spans:
                ctx.write_text(" ".join(d[i] for i in doc[:tgt]) + "\n")
                prompt = " ".join(d[i] for i in doc[tgt:tgt + P])
                want = [d[i] for i in doc[tgt + P:tgt + P + N]]
                a = generate.get_parser().parse_args(
                    ["--path", str(work / name / "checkpoint_last.pt"), "--context", str(ctx),
                     "--prompt", prompt, "--max-len", str(N), "--spm", "none", "--cpu",
                     "--memory-size", str(memory)])
                got = generate.run(a)[0].split()[:N]
                first_wrong = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), N)
                rows.append({"distance": tgt - src, "correct": sum(x == y for x, y in zip(got, want)),
                             "prefix_correct": first_wrong})
            out[name] = rows
            hits = sum(r["prefix_correct"] > 0 for r in rows)
            print(f"{name:9s}: first token right in {hits} of {len(rows)} spans; "
                  f"correct tokens {sum(r['correct'] for r in rows)} of {N * len(rows)}; "
                  f"longest continued prefix {max((r['prefix_correct'] for r in rows), default=0)}")
    (work / "greedy_from_memory.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
