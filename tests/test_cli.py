"""The console scripts' help: the --arch's flags, each script's own name, no import noise."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from fairseq_longmem import cli
from fairseq_longmem.eval import report
from fairseq_longmem.preprocess import prepare_corpus


def console_script(name: str) -> str:
    """The installed console script ``name`` (next to this Python, else on PATH)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e {REPO_ROOT}"
    return found


def test_train_help_with_arch_lists_the_model_and_task_flags(capsys):
    assert cli.train(["--arch", "longmem_tiny", "--task", "longmem_language_modeling",
                      "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    assert "Model-specific configuration" in out
    for flag in ("--memory-size", "--retrieval-layer-index", "--pretrained-model-path",
                 "--memory-scope"):
        assert flag in out, flag


def test_train_help_with_unknown_arch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.train(["--arch", "no_such_arch", "-h"])
    assert exit_.value.code == 2
    assert "invalid choice: 'no_such_arch'" in capsys.readouterr().err


@pytest.mark.parametrize("main,name", [(prepare_corpus.main, "longmem-preprocess"),
                                       (report.main, "longmem-report")])
def test_help_names_the_console_script(main, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {name} ")


def test_installed_train_help_shows_the_arch_flags_and_no_noise():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([console_script("longmem-train"), "--arch", "longmem_gpt2_medium",
                           "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: longmem-train ")
    assert "--memory-size" in proc.stdout and "--chunk-size" in proc.stdout
    # fairseq logs "Please install tensorboardX" on import without it (requirements.txt has it)
    assert "tensorboardX" not in proc.stdout + proc.stderr
