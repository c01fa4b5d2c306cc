"""Console scripts: fairseq's own CLIs with the plugin registered, no ``--user-dir``.

* ``longmem-train``   = ``fairseq-train`` (plugin imported); ``--help`` with
  ``--arch X`` also lists X's flags, which fairseq's own help leaves out
* ``longmem-eval-lm`` = ``fairseq-eval-lm``; with only ``--path CKPT`` it takes
  the data directory, task and segment length from the checkpoint.

Both turn the plugin's input errors into one ``error: ...`` line (exit 2)
instead of a traceback.
"""

import logging
import os
import sys
from typing import List, Optional

import fairseq_longmem  # noqa: F401  (registers task, models, criterion)

from .errors import LongMemError

USER_ERRORS = (LongMemError,)  # every bad-input error of the package derives from it

logger = logging.getLogger(__name__)


def _run(main, argv: Optional[List[str]]) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def torchrun_args(argv: List[str], environ=os.environ) -> List[str]:
    """Flags that put fairseq on its distributed path under ``torchrun``.

    fairseq 0.12 only reads torchrun's environment when CUDA devices exist; on
    CPU (gloo) and to be explicit on GPU, pass the rank and world size on.
    """
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "--distributed-init-method" in argv:
        return argv
    local = environ.get("LOCAL_RANK", "0")
    extra = []
    if "--cpu" in argv and "--ddp-backend" not in argv:
        # torch DDP with device_ids fails on CPU modules; fairseq's legacy DDP all-reduces
        # the gradients of trainable parameters only (the frozen backbone has none)
        extra = ["--ddp-backend", "legacy_ddp"]
    return list(argv) + extra + [
        "--distributed-init-method", "env://",
        "--distributed-world-size", str(world),
        "--distributed-rank", environ.get("RANK", "0"),
        "--device-id", local,
        "--distributed-no-spawn",
    ]


def _train_main() -> None:
    """fairseq_cli.train.cli_main, except that ``--bf16`` means bf16 on CPU/GPU.

    fairseq 0.12 turns ``--bf16`` into ``--tpu``; here it keeps the device (CPU or
    CUDA) unless ``--tpu`` is given explicitly.
    """
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli.train import main as train_main

    parser = options.get_training_parser()
    if wants_arch_help(sys.argv[1:]):
        print_help_with_arch(parser, sys.argv[1:])
        return
    args = options.parse_args_and_arch(parser)
    if getattr(args, "bf16", False) and "--tpu" not in sys.argv:
        args.tpu = False
    check_save_dir(args.save_dir, getattr(args, "no_save", False))
    cfg = convert_namespace_to_omegaconf(args)
    distributed_utils.call_main(cfg, train_main)


HELP_FLAGS = ("-h", "--help")


def wants_arch_help(argv: List[str]) -> bool:
    """``--help`` together with ``--arch X`` (or ``-a X``)."""
    return any(a in HELP_FLAGS for a in argv) and bool(_option(argv, "--arch") or _option(argv, "-a"))


def print_help_with_arch(parser, argv: List[str]) -> None:
    """Print the help of ``parser`` with the flags of the ``--arch`` (and ``--task``,
    ``--criterion``, ``--optimizer``...) that ``argv`` names.

    fairseq adds those flags only after a first, partial parse, and argparse
    answers ``--help`` in that first parse. So parse without ``--help`` (fairseq
    adds every flag), let the final parse stop at a missing required argument
    (DATA), and print the completed parser's help.
    """
    from fairseq import options

    class _Incomplete(Exception):
        pass

    def stop(message: str):
        raise _Incomplete(message)

    report = parser.error
    parser.error = stop
    try:
        options.parse_args_and_arch(parser, [a for a in argv if a not in HELP_FLAGS])
    except _Incomplete as e:
        if "the following arguments are required" not in str(e):
            report(str(e))  # a real mistake (e.g. an unknown --arch): usage + error, exit 2
    finally:
        parser.error = report
    parser.print_help()


def check_save_dir(save_dir: str, no_save: bool = False) -> None:
    """Fail before any work when checkpoints could not be written."""
    if no_save:
        return
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, ".longmem_write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise LongMemError(
            f"cannot write checkpoints to --save-dir {save_dir} ({e.strerror or e}); "
            "choose a writable directory"
        ) from None


def train(argv: Optional[List[str]] = None) -> int:
    """``fairseq-train`` with fairseq-longmem registered (torchrun on CPU, bf16 off TPU)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _run(_train_main, torchrun_args(argv))


def _option(argv: List[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def eval_lm_args_from_checkpoint(argv: List[str]) -> List[str]:
    """Fill DATA, --task and --tokens-per-sample from the checkpoint when absent."""
    path = _option(argv, "--path")
    if path is None or any(a in HELP_FLAGS for a in argv):
        return argv
    from .eval.model_loading import read_checkpoint

    state = read_checkpoint(path.split(os.pathsep)[0], "--path")
    task = state["cfg"]["task"]
    out = list(argv)
    if not out or out[0].startswith("-"):
        data = task.get("data")
        if not data:
            raise LongMemError(f"{path} records no data directory: pass it as first argument")
        if not os.path.isdir(data):
            raise LongMemError(
                f"data directory {data} (recorded in {path}) not found; pass the binarized "
                "directory (dict.txt and the splits) as first argument"
            )
        out = [data] + out
    elif not os.path.isdir(out[0].split(os.pathsep)[0]):  # DATA may list shards a:b
        raise LongMemError(
            f"data directory not found: {out[0]}; pass the binarized directory (dict.txt and "
            "the splits) as first argument"
        )
    if "--task" not in out:
        out += ["--task", task["_name"]]
    for key in ("tokens_per_sample", "memory_scope"):
        flag = "--" + key.replace("_", "-")
        if task["_name"] == "longmem_language_modeling" and flag not in out and key in task:
            out += [flag, str(task[key])]
    return out


def eval_lm(argv: Optional[List[str]] = None) -> int:
    """``fairseq-eval-lm``; ``longmem-eval-lm --path ckpt.pt`` needs no other flag."""
    from fairseq_cli.eval_lm import cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = eval_lm_args_from_checkpoint(argv)
    except LongMemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(cli_main, argv)


def import_hf(argv: Optional[List[str]] = None) -> int:
    """``longmem-import-hf``: a local HuggingFace GPT-2-family checkpoint -> a fairseq
    ``transformer_lm`` backbone (``model.pt``) + ``dict.txt``; nothing is downloaded."""
    import argparse

    from .hf_gpt2 import import_hf_gpt2

    p = argparse.ArgumentParser(
        prog="longmem-import-hf",
        description="Local HuggingFace GPT-2-family checkpoint -> fairseq transformer_lm "
                    "backbone (model.pt) + dict.txt. Nothing is downloaded.",
    )
    p.add_argument("--hf-dir", required=True, help="folder with config.json and model.safetensors "
                   "(or pytorch_model.bin), e.g. a save_pretrained output")
    p.add_argument("--out", required=True, help="output folder: model.pt, dict.txt, hf_vocab.json, "
                   "and the tokenizer files found in --hf-dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        summary = import_hf_gpt2(args.hf_dir, args.out)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['model']} ({summary['layers']} x {summary['dim']}, {summary['heads']} heads, "
          f"{summary['positions']} positions, vocabulary {summary['vocab_size']}, "
          f"{'tied' if summary['tied'] else 'untied'} output, {summary['parameters']:,} parameters) "
          f"and {summary['dict']}")
    if not summary["tokenizer_files"]:
        print(f"note: no tokenizer files in {args.hf_dir}; give longmem-preprocess --tokenizer "
              "the folder that has the model's tokenizer.json (or vocab.json + merges.txt)")
    return 0


if __name__ == "__main__":  # python -m fairseq_longmem.cli {train,eval-lm} ...
    commands = {"train": train, "eval-lm": eval_lm}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print("usage: python -m fairseq_longmem.cli {train,eval-lm} [fairseq args]", file=sys.stderr)
        sys.exit(2)
    command = commands[sys.argv.pop(1)]
    sys.exit(command())
