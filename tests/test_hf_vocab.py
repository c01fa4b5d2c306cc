"""The HF-id <-> fairseq-index permutation (fairseq_longmem/hf_vocab.py)."""

import pytest

from fairseq_longmem.errors import LongMemError
from fairseq_longmem.hf_vocab import VocabMap, load_vocab_map


def test_vocab_map_is_a_permutation_with_eos_at_fairseq_eos():
    v = VocabMap(301, 300)
    f2h = v.fairseq_to_hf
    assert sorted(f2h) == list(range(301))
    assert f2h[2] == 300 and v.reserved == (297, 298, 299)
    assert [f2h[i] for i in (0, 1, 3)] == [297, 298, 299]
    assert f2h[4:8] == [0, 1, 2, 3]
    assert all(v.hf_to_fairseq[t] == i for i, t in enumerate(f2h))
    assert VocabMap(10, 9).reserved == (6, 7, 8) and VocabMap(10, 8).reserved == (6, 7, 9)
    with pytest.raises(LongMemError, match="eos_token_id"):
        VocabMap(100, 100)


def test_dictionary_loads_in_fairseq_with_the_same_order(tmp_path):
    from fairseq.data import Dictionary

    v = VocabMap(257, 0)
    v.write_dict(tmp_path / "dict.txt")
    d = Dictionary.load(str(tmp_path / "dict.txt"))
    assert len(d) == 257 and d.symbols == v.symbols()
    assert d.eos() == 2 and d.index(str(5)) == v.hf_to_fairseq[5]


def test_map_is_read_back_from_the_import_folder_or_a_config(tmp_path):
    import json

    v = VocabMap(301, 300)
    v.save(tmp_path)
    assert load_vocab_map(tmp_path) == v
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"vocab_size": 301, "eos_token_id": 300}))
    assert load_vocab_map(tmp_path / "cfg") == v
    with pytest.raises(LongMemError, match="neither hf_vocab.json nor config.json"):
        load_vocab_map(tmp_path / "nothing")
