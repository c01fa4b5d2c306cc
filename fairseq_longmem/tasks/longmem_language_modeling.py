"""Document-stream language modelling task.

Each batch row continues the same stream of documents from one step to the
next, so that a row's memory holds that row's past; per row the model is told
where a new document starts (``doc_start``). fairseq-train, validation and
fairseq-eval-lm all read in stream order. After a resume from a checkpoint,
:meth:`LongMemLanguageModelingTask.train_step` rebuilds each row's memory from
the segments that preceded the first resumed one.
"""


import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from fairseq import utils
from fairseq.data import Dictionary, data_utils, iterators
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from ..data.document_index import is_mmap_split
from ..data.stream_dataset import DocumentStream, StreamBatches, StreamDataError

logger = logging.getLogger(__name__)


@dataclass
class LongMemLanguageModelingConfig(FairseqDataclass):
    data: Optional[str] = field(
        default=None, metadata={"help": "binarized data directory (dict.txt, train/valid/test)"}
    )
    tokens_per_sample: int = field(
        default=1024, metadata={"help": "tokens per segment (local window) of each stream"}
    )
    memory_scope: ChoiceEnum(["document", "stream"]) = field(  # type: ignore
        default="document",
        metadata={"help": "document: reset a row's memory at every document start; "
                  "stream: keep memory across the documents of a stream"},
    )
    allow_single_document: bool = field(
        default=False,
        metadata={"help": "accept a split without document boundaries (empty lines) as one "
                  "document"},
    )
    seed: int = field(default=1, metadata={"help": "random seed"})


@register_task("longmem_language_modeling", dataclass=LongMemLanguageModelingConfig)
class LongMemLanguageModelingTask(FairseqTask):
    """Streams of documents in order, with document starts, for memory-augmented LMs."""

    def __init__(self, cfg: LongMemLanguageModelingConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        # per split (memory key): the batches being served and the segment expected next
        self._stream_batches: Dict[str, StreamBatches] = {}
        self._next_segment: Dict[str, int] = {}

    @classmethod
    def setup_task(cls, cfg: LongMemLanguageModelingConfig, **kwargs):
        if not cfg.data:
            raise StreamDataError(
                "no data directory given: pass the binarized data directory as the first "
                "argument (made by longmem-preprocess)"
            )
        paths = utils.split_paths(cfg.data)
        dictionary = None
        for path in paths:  # DATA=dir1:dir2:..: one directory per epoch, one dictionary
            dict_path = os.path.join(path, "dict.txt")
            if not os.path.isfile(dict_path):
                raise StreamDataError(
                    f"no dict.txt in {path}: is it a fairseq-preprocess output directory? "
                    "run longmem-preprocess first"
                )
            d = Dictionary.load(dict_path)
            if dictionary is None:
                dictionary = d
            elif d.symbols != dictionary.symbols:
                raise StreamDataError(
                    f"the dictionary of {path} differs from that of {paths[0]}: binarize "
                    f"every data directory with the same dict.txt (fairseq-preprocess "
                    f"--srcdict {os.path.join(paths[0], 'dict.txt')})"
                )
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        """Load ``split`` from the data directory of this epoch (``DATA=dir1:dir2``: one
        per epoch, in turn); with ``combine``, ``split1``, ``split2``.. are appended.

        A fairseq memory-mapped split is read straight from disk (O(documents) in
        memory); other index formats are copied into memory."""
        paths = utils.split_paths(self.cfg.data)
        prefix = os.path.join(paths[(epoch - 1) % len(paths)], split)
        if os.path.isfile(prefix + ".bin") and os.path.getsize(prefix + ".bin") == 0:
            raise StreamDataError(
                f"split {split!r} holds no tokens ({prefix}.bin is empty); binarize a "
                "non-empty split (longmem-preprocess) or choose another subset"
            )
        if is_mmap_split(prefix):
            prefixes = [prefix]
            while combine and is_mmap_split(f"{prefix}{len(prefixes)}"):
                prefixes.append(f"{prefix}{len(prefixes)}")
            stream = DocumentStream.from_mmap(prefixes, self.dictionary.eos(), name=split)
        else:
            try:
                data = data_utils.load_indexed_dataset(prefix, self.dictionary, combine=combine)
            except Exception as e:
                raise StreamDataError(
                    f"corrupt binarized data at {prefix}.bin/.idx ({type(e).__name__}: "
                    f"{str(e)[:100]}); re-run longmem-preprocess"
                ) from None
            if data is None:
                raise StreamDataError(
                    f"split {split!r} not found: {prefix}.bin/.idx missing; binarize it "
                    "(longmem-preprocess) or pick another --valid-subset/--gen-subset"
                )
            stream = DocumentStream.from_indexed(data, self.dictionary.eos(), name=split)
        if len(stream.doc_starts) == 1 and stream.num_items > 1 and not self.cfg.allow_single_document:
            raise StreamDataError(
                f"split {split!r} has no document boundaries (no empty line between "
                "documents); re-binarize with an empty line after each document "
                "(longmem-preprocess), or pass --allow-single-document if it "
                "really is one document"
            )
        logger.info(
            "%s: %d documents, %d tokens", split, len(stream.doc_starts), stream.num_predictions
        )
        self.datasets[split] = stream

    def dataset(self, split: str) -> DocumentStream:
        if split not in self.datasets:
            raise KeyError(f"split {split!r} is not loaded")
        return self.datasets[split]

    def stream_batches(self, dataset, bsz: int, num_shards: int = 1, shard_id: int = 0):
        if not isinstance(dataset, DocumentStream):
            raise StreamDataError("longmem_language_modeling batches only its own splits")
        batches = StreamBatches(
            dataset,
            bsz=bsz,
            tokens_per_sample=self.cfg.tokens_per_sample,
            pad=self.dictionary.pad(),
            num_shards=num_shards,
            shard_id=shard_id,
            memory_scope=str(self.cfg.memory_scope),
            memory_key=dataset.name or "default",
        )
        self._stream_batches[batches.memory_key] = batches
        self._next_segment.pop(batches.memory_key, None)
        return batches

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # under the step's own autocast (--amp), so that a rebuilt memory stores the dtype
        # an uninterrupted run's does (--memory-dtype auto: the dtype the model computes in)
        from fairseq.optim.amp_optimizer import AMPOptimizer

        with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
            self.rebuild_memory_after_jump(sample, model)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def rebuild_memory_after_jump(self, sample, model) -> None:
        """When batch ``t > 0`` of a split comes after anything but batch ``t - 1``
        (a run resumed from a checkpoint), rebuild the model's memory from the
        segments before ``t`` (as many as the model asks for), so that the run
        continues as if it had never stopped."""
        t = sample.get("segment") if isinstance(sample, dict) else None
        if t is None:
            return
        key = sample["net_input"]["memory_key"]
        expected = self._next_segment.get(key, 0)
        self._next_segment[key] = t + 1
        decoder = getattr(unwrap_model(model), "decoder", None)
        if t == expected or t == 0 or not hasattr(decoder, "rebuild_memory"):
            return
        n = decoder.replay_segments(self.cfg.tokens_per_sample)
        batches = self._stream_batches.get(key)
        if n == 0 or batches is None:
            return
        first = max(0, t - n)
        past = [batches.segment(i) for i in range(first, t)]
        device = sample["net_input"]["src_tokens"].device
        tokens = torch.stack([p["src"] for p in past]).to(device)
        doc_start = torch.stack([p["doc_start"] for p in past]).to(device)
        offset = torch.from_numpy(batches.document_offsets(first))
        if decoder.rebuild_memory(key, tokens, doc_start, offset):
            logger.info("batch %d of %s served after a jump: memory rebuilt from batches %d..%d",
                        t, key, first, t - 1)
        else:
            logger.info("batch %d of %s served after a jump: this model's memory is not "
                        "rebuilt (it starts empty)", t, key)

    def _batch_size(self, max_sentences, max_tokens) -> int:
        if max_sentences:
            return int(max_sentences)
        if max_tokens:
            return max(1, int(max_tokens) // self.cfg.tokens_per_sample)
        return 1

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        **kwargs,
    ):
        if not isinstance(dataset, DocumentStream):  # prompts of fairseq-interactive
            # no length limit: the models decode past their window (docs/generation.md)
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences,
                max_positions=None, num_shards=num_shards, shard_id=shard_id,
                num_workers=num_workers, epoch=epoch, data_buffer_size=data_buffer_size,
                **kwargs,
            )
        self._check_positions(max_positions)
        batches = self.stream_batches(
            dataset, self._batch_size(max_sentences, max_tokens), num_shards, shard_id
        )
        return StreamEpochBatchIterator(
            layout=stream_layout(batches, num_shards),
            dataset=batches,
            collate_fn=batches.collater,
            batch_sampler=[[i] for i in range(len(batches))],
            seed=self.cfg.seed,
            num_shards=1,  # streams are already sharded over ranks
            shard_id=0,
            num_workers=min(num_workers, 1),  # one worker keeps batches (and replays) in order
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
        )

    def eval_lm_dataloader(
        self,
        dataset,
        max_tokens: Optional[int] = 36000,
        batch_size: Optional[int] = None,
        max_positions: Optional[int] = None,
        num_shards: int = 1,
        shard_id: int = 0,
        num_workers: int = 1,
        data_buffer_size: int = 10,
        context_window: int = 0,
    ):
        if context_window > 0:
            raise StreamDataError(
                "--context-window does not apply to longmem_language_modeling: segments are "
                "read in order and earlier context comes from memory; drop --context-window"
            )
        return self.get_batch_iterator(
            dataset,
            max_tokens=max_tokens,
            max_sentences=batch_size or 1,
            max_positions=max_positions,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=0,
            data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def _check_positions(self, max_positions) -> None:
        limit = max_positions
        if isinstance(limit, (tuple, list)):
            limit = min(x for x in limit if x is not None) if any(limit) else None
        if isinstance(limit, int) and self.cfg.tokens_per_sample > limit:
            raise StreamDataError(
                f"--tokens-per-sample {self.cfg.tokens_per_sample} exceeds the model's "
                f"{limit} positions; lower --tokens-per-sample to {limit}"
            )

    # ------------------------------------------------- fairseq-interactive
    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        """fairseq's generator; the length limit is ``--max-len-b`` alone (these models
        decode past their window under segment semantics, docs/generation.md)."""
        extra = dict(extra_gen_cls_kwargs or {})
        extra.setdefault("max_len", 1 << 20)
        return super().build_generator(models, args, seq_gen_cls, extra,
                                       prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        """Prompts for fairseq-interactive, as fairseq's ``language_modeling`` task
        builds them: ``</s>`` + the prompt (its trailing ``</s>`` stripped)."""
        from fairseq.data import (
            AppendTokenDataset, IdDataset, NestedDictionaryDataset, NumelDataset, PadDataset,
            PrependTokenDataset, StripTokenDataset, TokenBlockDataset,
        )

        d = self.source_dictionary
        dataset = StripTokenDataset(
            TokenBlockDataset(src_tokens, src_lengths, block_size=None, pad=d.pad(),
                              eos=d.eos(), break_mode="eos"),
            d.eos(),
        )
        src = PrependTokenDataset(dataset, token=d.eos())
        tgt = AppendTokenDataset(dataset, token=d.pad())
        return NestedDictionaryDataset(
            {"id": IdDataset(),
             "net_input": {"src_tokens": PadDataset(src, pad_idx=d.pad(), left_pad=False),
                           "src_lengths": NumelDataset(src, reduce=False)},
             "target": PadDataset(tgt, pad_idx=d.pad(), left_pad=False)},
            sizes=[torch.tensor(src_lengths).numpy()],
        )

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Continue each prompt (its tokens are the generator's prefix), as
        ``language_modeling`` does."""
        if constraints is not None:
            raise StreamDataError("longmem_language_modeling does not support --constraints")
        eos = self.source_dictionary.eos()
        with torch.no_grad():
            if prefix_tokens is None and sample["net_input"]["src_tokens"].nelement():
                prefix_tokens = sample["net_input"]["src_tokens"]
                if prefix_tokens[:, 0].eq(eos).all():
                    prefix_tokens = prefix_tokens[:, 1:]
            return generator.generate(models, sample, prefix_tokens=prefix_tokens, bos_token=eos)

    def build_model(self, cfg, from_checkpoint=False):
        return accept_stream_inputs(super().build_model(cfg, from_checkpoint))

    def max_positions(self):
        return self.cfg.tokens_per_sample

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


def stream_layout(batches: StreamBatches, num_shards: int) -> dict:
    """What a batch index means: the streams of the split and their segment length."""
    return {
        "streams": batches.bsz * num_shards,
        "ranks": num_shards,
        "batch_size": batches.bsz,
        "tokens_per_sample": batches.tokens_per_sample,
        "predictions": batches.stream.num_predictions,
    }


class StreamEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's epoch iterator; its state (saved in checkpoints) records the stream
    layout, and resuming mid-epoch under another layout stops with a clear error.

    Batch ``t`` is the ``t``-th window of each of ``ranks x batch_size`` streams; with
    another number of streams (or segment length) the streams cut the documents
    elsewhere, so the saved position and memory no longer correspond to the data.
    """

    def __init__(self, layout: dict, **kwargs):
        super().__init__(**kwargs)
        self.layout = layout

    def state_dict(self):
        state = super().state_dict()
        state["stream_layout"] = dict(self.layout)
        return state

    def load_state_dict(self, state_dict):
        saved = state_dict.get("stream_layout")
        keys = ("streams", "tokens_per_sample", "predictions")
        if (saved and state_dict.get("iterations_in_epoch", 0) > 0
                and any(saved.get(k) != self.layout[k] for k in keys)):
            raise StreamDataError(
                f"the checkpoint stopped at batch {state_dict['iterations_in_epoch']} of an epoch "
                f"over {saved['streams']} streams ({saved['ranks']} ranks x --batch-size "
                f"{saved['batch_size']}, --tokens-per-sample {saved['tokens_per_sample']}, "
                f"{saved['predictions']} tokens); this run has {self.layout['streams']} streams "
                f"({self.layout['ranks']} x {self.layout['batch_size']}, "
                f"{self.layout['tokens_per_sample']}, {self.layout['predictions']} tokens), which "
                "cut the documents elsewhere: resume with the same ranks x --batch-size, "
                "--tokens-per-sample and data, or pass --reset-dataloader to start the epoch "
                "afresh with the new layout"
            )
        if saved and saved.get("streams") != self.layout["streams"]:
            logger.info("stream layout changed at an epoch boundary: %s -> %s",
                        saved, self.layout)
        super().load_state_dict(state_dict)


def accept_stream_inputs(model):
    """Let a model without memory (e.g. the backbone alone) read stream batches.

    Models that use ``doc_start``/``memory_key`` declare ``accepts_stream_inputs``;
    for any other fairseq LM the two inputs are dropped, so the same task, data
    order and ``fairseq-eval-lm`` command evaluate the backbone and LongMem alike.
    """
    if getattr(model, "accepts_stream_inputs", False) or getattr(model, "_stream_adapted", False):
        return model
    inner = model.forward

    def forward(src_tokens, src_lengths=None, doc_start=None, memory_key=None,
                first_segment=None, last_segment=None, rows_restart=None, **kwargs):
        return inner(src_tokens, src_lengths=src_lengths, **kwargs)

    model.forward = forward
    model._stream_adapted = True
    return model


def unwrap_model(model):
    """The model inside fairseq's (or torch's) distributed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
