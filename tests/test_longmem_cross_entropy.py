"""The criterion: token-level loss by default, sentence-level with --sentence-avg,
and the memory statistics averaged over what it normalises by."""

import torch

from conftest import build_longmem
from fairseq_longmem.criterions.longmem_cross_entropy import LongMemCrossEntropyCriterion


def test_sentence_avg_normalises_by_rows(tiny_backbone, tiny_data):
    model, task = build_longmem(tiny_backbone, tiny_data)
    task.load_dataset("valid")
    batches = task.stream_batches(task.dataset("valid"), 3)
    sample = batches.collater([batches[0]])
    outs = {}
    for sentence_avg in (False, True):
        model.decoder.reset_memory()
        crit = LongMemCrossEntropyCriterion(task, sentence_avg=sentence_avg)
        with torch.no_grad():
            outs[sentence_avg] = crit(model, sample)
    (loss_t, size_t, log_t), (loss_s, size_s, log_s) = outs[False], outs[True]
    assert size_t == sample["ntokens"] and size_s == 3
    torch.testing.assert_close(loss_t, loss_s)  # the summed loss is the same
    assert log_s["sample_size"] == 3 and log_s["ntokens"] == sample["ntokens"]
    # memory stats are weighted by the sample size, so their average is unchanged
    for name in ("memory_fill", "memory_read_frac", "memory_gate"):
        torch.testing.assert_close(log_t[name] / size_t, log_s[name] / size_s)
