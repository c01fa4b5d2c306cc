"""--memory-path / --memory-from: a split's memory saved after its pass is where a
pass over another split starts; never the same split, never another process's."""

import pytest
import torch

from conftest import build_longmem
from fairseq_longmem.errors import MemoryConfigError
from fairseq_longmem.models import memory_lm
from fairseq_longmem.modules.memory_io import read_memory_header


def run_all(model, batches, memory_key=None, first_starts=True):
    out = []
    with torch.no_grad():
        for t in range(len(batches)):
            s = batches.collater([batches[t]])
            ni = dict(s["net_input"])
            if memory_key:
                ni["memory_key"] = memory_key
                ni.pop("first_segment", None)
            if t == 0 and not first_starts:
                ni["doc_start"] = ni["doc_start"].clone()
                ni["doc_start"][:, 0] = False
            out.append(model(**ni)[0])
    return out


def loaded_model(tiny_backbone, tiny_data, memory_dir, **kw):
    model, task = build_longmem(tiny_backbone, tiny_data, memory_gate_init=2.0,
                                memory_path=str(memory_dir), **kw)
    for split in ("valid", "test"):
        task.load_dataset(split)
    return model, task


def test_each_split_saves_its_own_memory_keyed_by_rank(tiny_backbone, tiny_data, tmp_path):
    model, task = loaded_model(tiny_backbone, tiny_data, tmp_path)
    run_all(model, task.stream_batches(task.dataset("valid"), 2))
    run_all(model, task.stream_batches(task.dataset("test"), 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.rank0.pt", "valid.rank0.pt"]
    meta = read_memory_header(tmp_path / "valid.rank0.pt")["meta"]
    assert (meta["split"], meta["rank"], meta["world_size"]) == ("valid", 0, 1)
    # without --memory-from, nothing is loaded: test started empty
    model.decoder.reset_memory()
    fresh = run_all(model, task.stream_batches(task.dataset("test"), 2))
    again = run_all(model, task.stream_batches(task.dataset("test"), 2))
    torch.testing.assert_close(fresh[0], again[0], rtol=0, atol=0)


def test_memory_from_another_split_continues_that_stream(tiny_backbone, tiny_data, tmp_path):
    model, task = loaded_model(tiny_backbone, tiny_data, tmp_path, memory_from="valid")
    valid = task.stream_batches(task.dataset("valid"), 2)
    test = task.stream_batches(task.dataset("test"), 2)
    run_all(model, valid)  # its last segment saves valid's memory
    model.decoder.reset_memory()
    loaded = run_all(model, test)  # starts from valid's memory
    # reference: the same model reading test right after valid in one memory
    model.decoder.cfg.memory_path = None
    model.decoder.reset_memory()
    run_all(model, valid)
    cont = run_all(model, test, memory_key="valid", first_starts=False)
    torch.testing.assert_close(loaded[0], cont[0], rtol=0, atol=0)
    model.decoder.reset_memory()
    fresh = run_all(model, test)
    assert not torch.allclose(loaded[0], fresh[0])


def test_a_pass_never_loads_its_own_split(tiny_backbone, tiny_data, tmp_path):
    """Scoring a split twice must not read its own saved memory (its own future)."""
    model, task = loaded_model(tiny_backbone, tiny_data, tmp_path, memory_from="valid")
    valid = task.stream_batches(task.dataset("valid"), 2)
    first = run_all(model, valid)
    assert (tmp_path / "valid.rank0.pt").exists()
    second = run_all(model, valid)  # the saved memory exists now: still not loaded
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_source_memory_is_a_clear_error(tiny_backbone, tiny_data, tmp_path):
    model, task = loaded_model(tiny_backbone, tiny_data, tmp_path, memory_from="valid")
    with pytest.raises(MemoryConfigError, match="no saved memory at .*valid.rank0.pt; run a pass"):
        run_all(model, task.stream_batches(task.dataset("test"), 2))


def test_memory_of_another_rank_or_world_is_refused(tiny_backbone, tiny_data, tmp_path,
                                                    monkeypatch):
    model, task = loaded_model(tiny_backbone, tiny_data, tmp_path, memory_from="valid")
    monkeypatch.setattr(memory_lm, "process_rank", lambda: (0, 2))  # saved by rank 0 of 2
    run_all(model, task.stream_batches(task.dataset("valid"), 2))
    monkeypatch.setattr(memory_lm, "process_rank", lambda: (0, 1))  # loaded by a 1-process run
    with pytest.raises(MemoryConfigError, match="world_size=2 but this run has world_size=1"):
        run_all(model, task.stream_batches(task.dataset("test"), 2))
    monkeypatch.setattr(memory_lm, "process_rank", lambda: (1, 2))  # rank 1 has no file
    with pytest.raises(MemoryConfigError, match="valid.rank1.pt"):
        run_all(model, task.stream_batches(task.dataset("test"), 2))


def test_memory_from_another_configuration_is_refused(tiny_backbone, tiny_data, tmp_path):
    model, task = loaded_model(tiny_backbone, tiny_data, tmp_path)
    run_all(model, task.stream_batches(task.dataset("valid"), 2))
    other, _ = loaded_model(tiny_backbone, tiny_data, tmp_path, memory_from="valid",
                            memory_size=128)
    with pytest.raises(MemoryConfigError, match="memory_size=64.*this run has memory_size=128"):
        run_all(other, task.stream_batches(task.dataset("test"), 2))
    path = tmp_path / "valid.rank0.pt"
    path.write_bytes(path.read_bytes()[:100])
    loader, _ = loaded_model(tiny_backbone, tiny_data, tmp_path, memory_from="valid")
    with pytest.raises(MemoryConfigError, match="truncated or corrupt"):
        run_all(loader, task.stream_batches(task.dataset("test"), 2))


def test_memory_from_needs_memory_path(tiny_backbone, tiny_data):
    with pytest.raises(MemoryConfigError, match="--memory-from valid needs --memory-path"):
        build_longmem(tiny_backbone, tiny_data, memory_from="valid")
