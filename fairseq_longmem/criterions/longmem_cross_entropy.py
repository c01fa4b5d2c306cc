"""Cross entropy that also logs the memory's statistics."""


from dataclasses import dataclass

from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

STATS = ("memory_fill", "memory_read_frac", "memory_gate")


@dataclass
class LongMemCrossEntropyConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("longmem_cross_entropy", dataclass=LongMemCrossEntropyConfig)
class LongMemCrossEntropyCriterion(CrossEntropyCriterion):
    """Token-level cross entropy (sentence-level with ``--sentence-avg``, as
    fairseq's ``cross_entropy``); also logs memory fill (tokens per stream), the
    share of queries that read memory and the mean memory gate sigmoid(g)."""

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        stats = net_output[1].get("memory_stats", {}) if len(net_output) > 1 else {}
        for name in STATS:
            if name in stats:
                # weighted by tokens so that the sum over workers averages correctly
                logging_output[name] = stats[name].detach().float() * sample_size
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        for name in STATS:
            if any(name in log for log in logging_outputs) and sample_size > 0:
                total = sum(log.get(name, 0) for log in logging_outputs)
                metrics.log_scalar(name, float(total) / sample_size, sample_size, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
