"""--memory-path: a memory saved after a pass is where the next pass starts."""

import pytest
import torch

from conftest import build_longmem
from fairseq_longmem.modules.memory_bank import MemoryConfigError


def run_all(model, batches, memory_key=None, first_starts=True):
    out = []
    with torch.no_grad():
        for t in range(len(batches)):
            s = batches.collater([batches[t]])
            ni = dict(s["net_input"])
            if memory_key:
                ni["memory_key"] = memory_key
            if t == 0 and not first_starts:
                ni["doc_start"] = ni["doc_start"].clone()
                ni["doc_start"][:, 0] = False
            out.append(model(**ni)[0])
    return out


def test_saved_memory_continues_the_stream(tiny_backbone, tiny_data, tmp_path):
    path = tmp_path / "mem.pt"
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=2.0, memory_path=str(path))
    task.load_dataset("valid")
    task.load_dataset("test")
    valid = task.stream_batches(task.dataset("valid"), 2)
    test = task.stream_batches(task.dataset("test"), 2)
    model.decoder.reset_memory()
    run_all(model, valid)  # the last segment saves the memory
    assert path.exists()
    model.decoder.reset_memory()
    loaded = run_all(model, test)  # starts from the saved memory
    # reference: the same model reading test right after valid in one memory
    model.decoder.cfg.memory_path = None
    model.decoder.reset_memory()
    run_all(model, valid)
    cont = run_all(model, test, memory_key="valid", first_starts=False)
    torch.testing.assert_close(loaded[0], cont[0], rtol=0, atol=0)
    model.decoder.reset_memory()
    fresh = run_all(model, test)
    assert not torch.allclose(loaded[0], fresh[0])


def test_memory_from_another_configuration_is_refused(tiny_backbone, tiny_data, tmp_path):
    path = tmp_path / "mem.pt"
    model, task = build_longmem(tiny_backbone, tiny_data, memory_path=str(path))
    task.load_dataset("valid")
    run_all(model, task.stream_batches(task.dataset("valid"), 2))
    other, _ = build_longmem(tiny_backbone, tiny_data, memory_path=str(path), memory_size=128)
    with pytest.raises(MemoryConfigError, match="memory_size=64.*this run has memory_size=128"):
        run_all(other, task.stream_batches(task.dataset("valid"), 2))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MemoryConfigError):
        run_all(model, task.stream_batches(task.dataset("valid"), 2))
