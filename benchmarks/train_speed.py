#!/usr/bin/env python
"""Training speed of LongMem adaptation at the paper's configuration (random weights).

Builds, with random weights and no file: a frozen backbone of the paper's shape
(24 layers, d=1024, 16 heads, ffn 4096; our ``alibi_lm`` by default,
``--backbone transformer`` for fairseq's ``transformer_lm``, whose
``transformer_lm_gpt2_small`` preset has that shape), a GPT-2-sized dictionary
(50,257 symbols), and LongMem over it through the model code fairseq-train
runs (``build_backbone`` -> ``LongMemDecoder`` -> ``LongMemModel``; the
backbone's config goes in ``backbone_config`` so no checkpoint is read).
Then it fills every stream's memory (``ceil(memory_size / T) + 1`` untimed
segments) so that the timed steps search a full memory, and times training
steps of memory-augmented adaptation: forward (frozen backbone under no_grad,
side network, memory search + read, memory write), cross entropy, backward,
AdamW on the trainable parameters, under autocast (``--dtype``). The same
steps are then timed with memory off (``use_external_memory`` False, same model
and optimizer), so the memory's overhead is a ratio from one run.

Reported (stdout and ``--out`` JSON): tokens/s, step time, MFU, the time per
step spent in memory writes (``bank.write``) and in retrieval (``bank.select``:
chunk search + masks; the gather runs inside the memory attention) and their share of the
step (CUDA events on GPU, ``time.perf_counter`` on CPU; the bank's methods are
wrapped here, not in the library), peak device memory (peak RSS on CPU), and
the number of host-device synchronisations in one training step (CUDA sync
debug mode; null on CPU).

FLOPs per token (model FLOPs; MFU = flops_per_token * tokens/s / peak)::

    F = 2 P_b + 4 L_b T d                 frozen backbone, forward only
      + 6 P_s + 12 L_s T d                side network, forward + backward
      + 12 k d            (memory on)     memory attention, fwd + bwd
      + 4 V d             (6 V d with --tune-lm-head)   LM head

* ``P_b``, ``P_s``: parameters of the backbone's / side network's transformer
  layers (embeddings and LM head excluded: counted by the last term), counted
  from the built model; 2 FLOPs per parameter and token forward, 6 forward +
  backward.
* attention, per layer and token: ``q k^T`` and ``p v`` over the segment, 2 x 2
  x T x d forward, counted over the whole T x T square (the PaLM/Megatron
  convention: causal masking is not halved). The side layers' backward doubles
  it (x3 in all).
* memory attention (one side layer): each token reads its own k retrieved
  pairs in every head, 2 x 2 x k x d_head per head forward = 4 k d per token;
  x3 for forward + backward.
* LM head: the frozen output projection costs 2 V d forward and 2 V d for the
  gradient with respect to its input (needed to reach the side network); no
  weight gradient since it is frozen: 4 V d. With ``--tune-lm-head`` the side
  network owns a trainable copy: 6 V d.
* not counted in F (reported apart as ``search_flops_per_token``): the chunk
  search itself, 2 x (memory_size / chunk_size) x d per token (every query,
  every head, against every chunk's mean key), ~2% of F at the paper's
  shapes; embeddings, norms, softmax, the optimizer.

Timing: after a warm-up both ways, ``--repeats`` interleaved rounds of
``--steps`` steps with memory then ``--steps`` without; step times and
``memory_overhead_ratio`` are medians over rounds (``rounds`` in the JSON).
On CPU, ``--profile-steps`` steps each way then run under ``torch.profiler``
for ``breakdown``: the memory's time per step split into chunk search,
gather, rest of the bank's search, memory attention forward and backward,
write, and other (see docs/speed.md).

Examples::

    python benchmarks/train_speed.py --preset quickstart --out r.json   # CPU quickstart shapes

    python benchmarks/train_speed.py --device cuda --search torch --out torch.json
    python benchmarks/train_speed.py --device cuda --search fused --out fused.json
    python benchmarks/train_speed.py --tiny            # CPU, seconds (the test runs this)
    python benchmarks/train_speed.py --search fused --reference --op-profile  # vs plain PyTorch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Dict, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from benchmarks.reference_step import backward_and_step  # noqa: E402

PAPER = dict(layers=24, dim=1024, heads=16, ffn=4096, vocab=50257, batch_size=8,
             tokens_per_sample=1024, memory_size=65536, k=64, chunk_size=4,
             retrieval_layer=17, reduction=2, steps=10, warmup=3)
TINY = dict(layers=4, dim=64, heads=4, ffn=256, vocab=1000, batch_size=2,
            tokens_per_sample=64, memory_size=512, k=16, chunk_size=4,
            retrieval_layer=3, reduction=2, steps=3, warmup=1)
# the CPU quickstart's stage 2 (examples/quickstart/quickstart.py): longmem_small over
# alibi_lm_small (4 layers, d=256, 8 heads, ffn 1024), a 4,000-piece vocabulary,
# 8 streams x 128 tokens, memory 8,192 (chunk 4, k 32) read at layer 3, no dropout,
# fp32 on 2 CPU threads
QUICKSTART = dict(layers=4, dim=256, heads=8, ffn=1024, vocab=4000, batch_size=8,
                  tokens_per_sample=128, memory_size=8192, k=32, chunk_size=4,
                  retrieval_layer=3, reduction=2, steps=8, warmup=3)
PRESETS = {"paper": PAPER, "tiny": TINY, "quickstart": QUICKSTART}
# settings a preset fixes unless given on the command line
PRESET_RUN = {
    "paper": dict(dtype="bf16", threads=None, repeats=1, dropout=None),
    "tiny": dict(dtype="bf16", threads=None, repeats=1, dropout=None, device="cpu"),
    "quickstart": dict(dtype="fp32", threads=2, repeats=9, dropout=0.0, device="cpu"),
}
ARCHES = {"alibi": "alibi_lm_gpt2_medium", "transformer": "transformer_lm_gpt2_small"}


# ------------------------------------------------------------------- model
class FakeTask:
    """What ``build_model`` reads of a task: the dictionaries."""

    def __init__(self, dictionary):
        self.source_dictionary = dictionary
        self.target_dictionary = dictionary
        self.dictionary = dictionary


def make_dictionary(size: int):
    """A fairseq Dictionary of exactly ``size`` symbols (4 specials + dummies)."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"tok{i}")
    assert len(d) == size, (len(d), size)
    return d


def backbone_config(args) -> Dict:
    """The backbone's model config dict, as a fairseq checkpoint would record it."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY

    arch = ARCHES[args.backbone]
    ns = argparse.Namespace(
        decoder_layers=args.layers,
        decoder_embed_dim=args.dim,
        decoder_ffn_embed_dim=args.ffn,
        decoder_attention_heads=args.heads,
        tokens_per_sample=args.tokens_per_sample,
        max_target_positions=args.tokens_per_sample,
    )
    if getattr(args, "dropout", None) is not None:  # e.g. the quickstart's --dropout 0.0
        ns.dropout = ns.attention_dropout = ns.activation_dropout = args.dropout
    ARCH_CONFIG_REGISTRY[arch](ns)  # fills the preset's remaining defaults
    cfg = {k: v for k, v in vars(ns).items() if isinstance(v, (int, float, str, bool, type(None)))}
    cfg["_name"] = ARCH_MODEL_NAME_REGISTRY[arch]
    cfg["arch"] = arch
    return cfg


def build_model(args, device):
    """LongMem over a random-init backbone, built as fairseq-train builds it."""
    import fairseq_longmem  # noqa: F401  (registers models/tasks)
    from fairseq_longmem.models.backbone import dumps_config
    from fairseq_longmem.models.longmem import LongMemConfig, LongMemModel

    task = FakeTask(make_dictionary(args.vocab))
    cfg = LongMemConfig()
    cfg.backbone_config = dumps_config(backbone_config(args))
    cfg.layer_reduction_factor = args.reduction
    cfg.reload_ptm_layer = True  # copies of the (random) backbone layers
    cfg.tune_lm_head = args.tune_lm_head
    cfg.use_external_memory = True
    cfg.retrieval_layer_index = args.retrieval_layer
    cfg.memory_size = args.memory_size
    cfg.chunk_size = args.chunk_size
    cfg.k = args.k
    cfg.memory_backend = "torch"
    cfg.memory_dtype = "auto"
    cfg.tokens_per_sample = args.tokens_per_sample
    model = LongMemModel.build_model(cfg, task)
    return model.to(device), task


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_token(model, args, memory_on: bool) -> Dict[str, float]:
    """The formula of the module docstring, with parameter counts of ``model``."""
    dec = model.decoder
    p_b = sum(count_params(layer) for layer in dec.backbone.layers)
    p_s = sum(count_params(layer) for layer in dec.side.layers)
    return flops_from_counts(args, p_b, p_s, len(dec.backbone.layers), len(dec.side.layers),
                             memory_on)


def flops_from_counts(args, p_b: int, p_s: int, l_b: int, l_s: int,
                      memory_on: bool) -> Dict[str, float]:
    """The formula of the module docstring from layer parameter counts and depths."""
    d, t, v, k = args.dim, args.tokens_per_sample, args.vocab, args.k
    parts = {
        "backbone_fwd": 2 * p_b + 4 * l_b * t * d,
        "side_fwd_bwd": 6 * p_s + 12 * l_s * t * d,
        "memory_attention": 12 * k * d if memory_on else 0,
        "lm_head": (6 if args.tune_lm_head else 4) * v * d,
    }
    parts["total"] = sum(parts.values())
    parts["search_flops_per_token"] = (
        2 * (args.memory_size // args.chunk_size) * d if memory_on else 0
    )
    parts["backbone_layer_params"] = p_b
    parts["side_layer_params"] = p_s
    return parts


# ------------------------------------------------------------------ timing
class SectionTimer:
    """Times wrapped callables: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = False
        self.events: Dict[str, list] = {}
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    def reset(self):
        self.events = {}
        self.seconds = {}
        self.calls = {}

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            if not self.enabled:
                return fn(*a, **kw)
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*a, **kw)
                end.record()
                self.events.setdefault(name, []).append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

        return timed

    def total_ms(self, name: str) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events.get(name, []))
        return 1000.0 * self.seconds.get(name, 0.0)


def instrument_banks(model, timer: SectionTimer) -> int:
    """Wrap every memory bank's select/write (instance attributes only)."""
    n = 0
    for bank in model.decoder.memories.values():
        if not getattr(bank, "_speed_wrapped", False):
            bank.select = timer.wrap("retrieval", bank.select)
            bank.write = timer.wrap("write", bank.write)
            bank._speed_wrapped = True
            n += 1
    return n


COUNTS = {"fused_search_calls": 0, "flex_attention_calls": 0}


@contextmanager
def count_flex_calls():
    """Count the local attentions that took the FlexAttention path
    (``joint_attention.alibi_flex_attention``) into ``COUNTS``."""
    from fairseq_longmem.modules import joint_attention

    saved = joint_attention.alibi_flex_attention

    def counted(*a, **kw):
        COUNTS["flex_attention_calls"] += 1
        return saved(*a, **kw)

    joint_attention.alibi_flex_attention = counted
    try:
        yield
    finally:
        joint_attention.alibi_flex_attention = saved


def time_steps(step, steps: int, device) -> tuple:
    """Mean seconds per call of ``step`` over ``steps`` calls (device synchronised
    around), and the last call's result."""
    sync(device)
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    sync(device)
    return (time.perf_counter() - t0) / steps, out


def op_profile(step, device, rows: int = 20) -> str:
    """``torch.profiler`` table of one call of ``step``: the top ``rows`` operators by
    self device time (CUDA), by self CPU time elsewhere."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        step()
        sync(device)
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else []
    for key in keys + ["self_cpu_time_total"]:
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return prof.key_averages().table(row_limit=rows)


@contextmanager
def search_impl(choice: str, timer: "SectionTimer"):
    """Route the torch bank's chunk search (``memory_bank.search_chunks``) through
    ``timer`` ("topk": the search alone, without the gather): ``--search torch``
    to the plain matmul + top-k (``memory_bank.topk_chunks``), ``--search fused``
    to the bank's own search (the kernel on CUDA, walking the chunks in
    ``memory_bank.scan_order``; ``fused_search_calls`` counts the kernel's calls)."""
    from fairseq_longmem.modules import fused_search, memory_bank

    saved = memory_bank.search_chunks
    saved_kernel = fused_search.fused_topk_chunks
    impl = memory_bank.topk_chunks
    if choice == "fused":
        impl = saved

        def counted(*a, **kw):
            COUNTS["fused_search_calls"] += 1
            return saved_kernel(*a, **kw)

        fused_search.fused_topk_chunks = counted
    memory_bank.search_chunks = timer.wrap("topk", impl)
    try:
        yield
    finally:
        memory_bank.search_chunks = saved
        fused_search.fused_topk_chunks = saved_kernel


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# -------------------------------------------------------------------- run
class Trainer:
    def __init__(self, model, args, device):
        self.model = model
        self.args = args
        self.device = device
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        kw = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(
            params, lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, **kw
        )
        use_scaler = args.dtype == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
        g = torch.Generator(device=device).manual_seed(args.seed)
        # distinct segments, cycled (no host->device copy in a step): one more than
        # the memory holds, so that it never holds two copies of a segment. (With
        # a few segments cycled it held ~16 copies of each chunk: exact ties in
        # every search, which no corpus produces.)
        n = max(4, math.ceil(args.memory_size / args.tokens_per_sample) + 1)
        shape = (n, args.batch_size, args.tokens_per_sample + 1)
        self.data = torch.randint(4, args.vocab, shape, device=device, generator=g)
        self.i = 0

    def batch(self):
        seg = self.data[self.i % self.data.size(0)]
        self.i += 1
        return seg[:, :-1], seg[:, 1:]

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self):
        tokens, target = self.batch()
        with self.autocast():
            logits, _ = self.model(tokens)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1))
        return backward_and_step(loss, self.opt, self.scaler)

    @torch.no_grad()
    def forward_only(self):
        tokens, _ = self.batch()
        with self.autocast():
            self.model(tokens)

    def timed(self, steps: int):
        """Mean seconds per step over ``steps`` steps (device synchronised around)."""
        return time_steps(self.step, steps, self.device)


def count_syncs(trainer) -> Optional[int]:
    """Host-device synchronisations in one training step (CUDA sync debug mode)."""
    if trainer.device.type != "cuda":
        return None
    sync(trainer.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(trainer.device)
    msgs = [
        str(w.message) for w in caught
        if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)
    ]
    trainer.sync_messages = sorted(set(m.splitlines()[0][:160] for m in msgs))
    return len(msgs)


def flops_only(args) -> Dict:
    """Build the model on the meta device (no memory, no time) and count FLOPs."""
    with torch.device("meta"):
        model, _ = build_model(args, torch.device("meta"))
    f_on = flops_per_token(model, args, memory_on=True)
    tokens = args.batch_size * args.tokens_per_sample
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "flops_per_token": f_on["total"],
        "flops_breakdown": f_on,
        "flops_per_token_no_memory": flops_per_token(model, args, memory_on=False)["total"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "tokens_per_step": tokens,
        "tokens_per_s_at_100pct_mfu": args.peak_tflops * 1e12 / f_on["total"],
    }


def run(args) -> Dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_build = time.perf_counter()
    try:  # initialise directly on the device (fast); else on the CPU, then move
        with torch.device(device):
            model, _ = build_model(args, device)
    except Exception as e:  # pragma: no cover - depends on fairseq's modules
        print(f"building on {device} failed ({type(e).__name__}: {e}); building on cpu")
        model, _ = build_model(args, device)
    model.train()
    build_s = time.perf_counter() - t_build
    trainer = Trainer(model, args, device)
    timer = SectionTimer(device)
    dec = model.decoder

    from fairseq_longmem.modules import fused_search

    from fairseq_longmem.modules import flex_alibi

    fused_active = args.search == "fused" and fused_search.fused_search_available(device)
    reference = None
    if args.reference:
        from benchmarks.reference_step import ReferenceTrainer

        torch.manual_seed(args.seed)
        reference = ReferenceTrainer(args, device, dropout=dec.side.layers[0].dropout_module.p)
    result: Dict = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "search_impl": "triton" if fused_active else "torch",
        "build_s": build_s,
        "trainable_params": trainer.trainable,
        "frozen_params": trainer.frozen,
        "flex_attention_available": flex_alibi.flex_attention_available(device),
    }
    with search_impl(args.search, timer), count_flex_calls():
        # 1. fill: enough segments that every stream's memory is full (untimed)
        fill_segments = math.ceil(args.memory_size / args.tokens_per_sample) + 1
        t0 = time.perf_counter()
        for _ in range(fill_segments):
            trainer.forward_only()
        sync(device)
        result["fill_segments"] = fill_segments
        result["fill_s"] = time.perf_counter() - t0
        banks = list(dec.memories.values())
        fill = [float(b.fill().float().mean()) for b in banks]
        result["memory_fill_tokens"] = fill
        assert fill and all(f >= args.memory_size for f in fill), "memory not full"

        # 2. warm-up both ways, then interleaved rounds: `steps` steps with memory,
        #    `steps` without, `repeats` times (the machine's load drifts: a ratio
        #    taken within one round compares like with like); medians over rounds
        instrument_banks(model, timer)
        for use_memory in (True, False):
            dec.cfg.use_external_memory = use_memory
            for _ in range(args.warmup):
                trainer.step()
        for _ in range(args.warmup if reference else 0):
            reference.step()
        timer.reset()
        flex_before = COUNTS["flex_attention_calls"]
        on_s, off_s, ref_s = [], [], []
        loss_on = loss_off = loss_ref = float("nan")
        for _ in range(args.repeats):
            dec.cfg.use_external_memory = True
            timer.enabled = True
            t, loss = trainer.timed(args.steps)
            timer.enabled = False
            on_s.append(t)
            loss_on = float(loss)
            dec.cfg.use_external_memory = False
            t, loss = trainer.timed(args.steps)
            off_s.append(t)
            loss_off = float(loss)
            if reference is not None:
                t, loss = time_steps(reference.step, args.steps, device)
                ref_s.append(t)
                loss_ref = float(loss)
        timed_steps = args.steps * args.repeats
        # local attentions through FlexAttention per timed step (both ways)
        flex_per_step = (COUNTS["flex_attention_calls"] - flex_before) / (2 * timed_steps)
        write_ms = timer.total_ms("write") / timed_steps
        topk_ms = timer.total_ms("topk") / timed_steps
        retrieval_ms = timer.total_ms("retrieval") / timed_steps
        search_calls = timer.calls.get("retrieval", 0) / timed_steps

        # 3. peak memory of one step each way; host-device syncs of one memory step
        peaks = {}
        for use_memory in (True, False):
            dec.cfg.use_external_memory = use_memory
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trainer.step()
            sync(device)
            peaks[use_memory] = peak_memory_bytes(device)
        if reference is not None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            reference.step()
            sync(device)
            peaks["reference"] = peak_memory_bytes(device)
        dec.cfg.use_external_memory = True
        syncs = count_syncs(trainer)

        # 4. where the memory's time goes (PyTorch profiler, CPU)
        breakdown = None
        if args.profile_steps > 0 and device.type == "cpu":
            breakdown = profile_breakdown(trainer, dec, args.profile_steps)
        # top operators of one step each way (and of one reference step): where a gap is
        ops = None
        if args.op_profile:
            dec.cfg.use_external_memory = True
            ops = {"memory": op_profile(trainer.step, device, rows=30)}
            dec.cfg.use_external_memory = False
            ops["no_memory"] = op_profile(trainer.step, device)
            if reference is not None:
                ops["reference"] = op_profile(reference.step, device)
        dec.cfg.use_external_memory = True

    ratios = [a / b for a, b in zip(on_s, off_s)]
    step_s = statistics.median(on_s)
    step_off_s = statistics.median(off_s)
    tokens = args.batch_size * args.tokens_per_sample
    f_on = flops_per_token(model, args, memory_on=True)
    f_off = flops_per_token(model, args, memory_on=False)
    peak = args.peak_tflops * 1e12
    step_ms = 1000 * step_s
    step_off_ms = 1000 * step_off_s
    result.update(
        {
            "tokens_per_step": tokens,
            "step_ms": step_ms,
            "tokens_per_s": tokens / step_s,
            "flops_per_token": f_on["total"],
            "flops_breakdown": f_on,
            "mfu": f_on["total"] * tokens / step_s / peak,
            "write_ms": write_ms,
            "retrieval_ms": retrieval_ms,
            "write_share": write_ms / step_ms,
            "retrieval_share": retrieval_ms / step_ms,
            "search_ms": topk_ms,
            "search_share": topk_ms / step_ms,
            "search_calls_per_step": search_calls,
            "fused_search_calls": COUNTS["fused_search_calls"],
            "peak_memory_bytes": peaks[True],
            "peak_memory_kind": (
                "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"
            ),
            "syncs_in_step": syncs,
            "sync_messages": getattr(trainer, "sync_messages", None),
            "loss": loss_on,
            "no_memory": {
                "step_ms": step_off_ms,
                "tokens_per_s": tokens / step_off_s,
                "flops_per_token": f_off["total"],
                "mfu": f_off["total"] * tokens / step_off_s / peak,
                "peak_memory_bytes": peaks[False],
                "loss": loss_off,
            },
            # median over the interleaved rounds of (memory step / no-memory step)
            "memory_overhead_ratio": statistics.median(ratios),
            "rounds": {
                "steps_per_round": args.steps,
                "step_ms": [1000 * t for t in on_s],
                "no_memory_step_ms": [1000 * t for t in off_s],
                "overhead_ratio": ratios,
                "overhead_ratio_min": min(ratios),
                "overhead_ratio_max": max(ratios),
            },
            "breakdown": breakdown,
            "flex_attention_calls": COUNTS["flex_attention_calls"],
            "flex_attention_calls_per_step": flex_per_step,
            "op_profile": ops,
        }
    )
    if reference is not None:
        p_b, p_s = reference.layer_params()
        f_ref = flops_from_counts(args, p_b, p_s, args.layers, args.layers // args.reduction,
                                  memory_on=False)
        step_ref_s = statistics.median(ref_s)
        result["reference"] = {
            "step_ms": 1000 * step_ref_s,
            "tokens_per_s": tokens / step_ref_s,
            "flops_per_token": f_ref["total"],
            "mfu": f_ref["total"] * tokens / step_ref_s / peak,
            "trainable_params": reference.trainable,
            "peak_memory_bytes": peaks["reference"],
            "loss": loss_ref,
            "rounds_step_ms": [1000 * t for t in ref_s],
        }
        # > 1: the project's no-memory step is slower than plain PyTorch's
        result["no_memory_vs_reference"] = step_off_ms / result["reference"]["step_ms"]
    return result


# ------------------------------------------------------------- breakdown
# profiler ranges of the memory's parts, in the order of the table
PARTS = [
    ("search", "chunk search (scores + top-k)"),
    ("gather", "gather retrieved keys/values"),
    ("retrieve_other", "rest of bank.select (validity, masks, indices)"),
    ("attention_fwd", "memory attention + gate, forward"),
    ("attention_bwd", "memory attention + gate, backward"),
    ("write", "memory write (+ reset)"),
]
RANGE = "longmem."


@contextmanager
def profiler_ranges(dec):
    """Wrap the memory's functions in ``record_function`` ranges for the profiler
    (module attributes and bank instance attributes; restored on exit)."""
    from torch.profiler import record_function

    from fairseq_longmem.modules import memory_bank, memory_reader

    def ranged(name, fn):
        def wrapped(*a, **kw):
            with record_function(RANGE + name):
                return fn(*a, **kw)
        return wrapped

    saved = []

    def patch(obj, attr, name):
        if hasattr(obj, attr):
            saved.append((obj, attr, obj.__dict__.get(attr, None) if not isinstance(obj, type)
                          else getattr(obj, attr)))
            setattr(obj, attr, ranged(name, getattr(obj, attr)))

    patch(memory_bank, "search_chunks", "search")
    patch(memory_bank, "gather_chunk_tokens", "gather")
    for attr in ("memory_attention_chunks", "gate_mix"):
        patch(memory_reader, attr, "attention")
    for bank in dec.memories.values():
        patch(bank, "select", "retrieve")
        patch(bank, "write", "write")
        patch(bank, "reset", "write")
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if old is None:  # was a class attribute seen through the instance
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def memory_parts_ms(events) -> Dict[str, float]:
    """Milliseconds (summed over ``events``) of each part of :data:`PARTS`.

    A range nested in another memory range counts for the outer one (the
    gather inside a write is write time), except the gather inside the
    attention (blocks of the retrieved keys/values), which is gather time. The backward of the memory attention
    is every autograd node whose forward op ran inside a ``attention`` range
    (matched by the autograd sequence number)."""
    us = {name: 0.0 for name, _ in PARTS}
    retrieve = gathered_in_retrieve = searched_in_retrieve = gathered_in_attention = 0.0
    attention_seq = set()
    for e in events:
        if not e.name.startswith(RANGE):
            continue
        part = e.name[len(RANGE):]
        parent = e.cpu_parent
        nested = False
        while parent is not None:
            if parent.name.startswith(RANGE):
                nested = True
                break
            parent = parent.cpu_parent
        if part == "attention":
            attention_seq.update(
                d.sequence_nr for d in _descendants(e) if d.sequence_nr is not None
                and d.sequence_nr >= 0
            )
        if nested:
            if part in ("gather", "search") and parent.name == RANGE + "retrieve":
                if part == "gather":
                    gathered_in_retrieve += e.cpu_time_total
                else:
                    searched_in_retrieve += e.cpu_time_total
            elif part == "gather" and parent.name == RANGE + "attention":
                gathered_in_attention += e.cpu_time_total
            continue
        if part == "retrieve":
            retrieve += e.cpu_time_total
        elif part in ("search", "gather", "write"):
            us[part] += e.cpu_time_total
        elif part == "attention":
            us["attention_fwd"] += e.cpu_time_total
    us["search"] += searched_in_retrieve
    us["gather"] += gathered_in_retrieve + gathered_in_attention
    us["attention_fwd"] = max(0.0, us["attention_fwd"] - gathered_in_attention)
    us["retrieve_other"] = max(0.0, retrieve - searched_in_retrieve - gathered_in_retrieve)
    prefix = "autograd::engine::evaluate_function: "
    for e in events:
        if e.name.startswith(prefix) and e.sequence_nr in attention_seq:
            us["attention_bwd"] += e.cpu_time_total
    return {name: v / 1000.0 for name, v in us.items()}


def profile_breakdown(trainer, dec, steps: int) -> Dict:
    """Profile ``steps`` steps with memory and ``steps`` without (alternating):
    the memory's parts per step, and the rest of the difference ("other":
    Python, the extra allocations, everything not in a range)."""
    from torch.profiler import ProfilerActivity, profile

    on_ms, off_ms, parts = [], [], []
    with profiler_ranges(dec):
        for _ in range(steps):
            for use_memory in (True, False):
                dec.cfg.use_external_memory = use_memory
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter()
                    trainer.step()
                    dt = 1000 * (time.perf_counter() - t0)
                if use_memory:
                    on_ms.append(dt)
                    parts.append(memory_parts_ms(prof.events()))
                else:
                    off_ms.append(dt)
    dec.cfg.use_external_memory = True
    med = {name: statistics.median(p[name] for p in parts) for name, _ in PARTS}
    step_on, step_off = statistics.median(on_ms), statistics.median(off_ms)
    extra = step_on - step_off
    med["other"] = extra - sum(med.values())
    return {
        "profiled_steps": steps,
        "step_ms": step_on,
        "no_memory_step_ms": step_off,
        "memory_ms": extra,
        "parts_ms": med,
        "parts_share_of_no_memory_step": {k: v / step_off for k, v in med.items()},
        "labels": dict(PARTS + [("other", "other (Python, allocations, not in a range)")]),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper (default): the paper's shapes, bf16; quickstart: the CPU "
                        "quickstart's stage 2 (4 layers d=256, batch 8 x 128, memory 8,192, k 32, "
                        "fp32, 2 threads, 9 interleaved rounds of 8 steps); tiny: seconds on CPU. "
                        "Explicit flags override the preset")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--backbone", choices=sorted(ARCHES), default="alibi",
                   help="alibi: our alibi_lm (the default backbone); "
                        "transformer: fairseq's transformer_lm")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast dtype (fp16 adds a GradScaler); default bf16, fp32 for quickstart")
    p.add_argument("--search", choices=["torch", "fused"], default="torch",
                   help="chunk search: torch (memory_bank.topk_chunks) or fused "
                        "(fused_search.fused_topk_chunks; the torch path where Triton can't run)")
    for name in ("layers", "dim", "heads", "ffn", "vocab", "batch_size", "tokens_per_sample",
                 "memory_size", "k", "chunk_size", "retrieval_layer", "reduction", "steps",
                 "warmup"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {PAPER[name]} ({TINY[name]} with --tiny, "
                            f"{QUICKSTART[name]} with --preset quickstart)"
                            + (" (per round)" if name == "steps" else ""))
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds of --steps steps with memory then --steps without; "
                        "step times and the overhead ratio are medians over rounds (default 1, "
                        "9 for quickstart)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="CPU: profile this many steps each way (torch.profiler) for the "
                        "breakdown of the memory's time (default 3; 0: no breakdown)")
    p.add_argument("--dropout", type=float, default=None,
                   help="backbone (and so side network) dropout; default the arch's (0.1), "
                        "0 for quickstart")
    p.add_argument("--tune-lm-head", action="store_true")
    p.add_argument("--reference", action="store_true",
                   help="also time a plain-PyTorch step of the same shapes without memory "
                        "(benchmarks/reference_step.py: SDPA is_causal, no ALiBi, no fairseq) "
                        "in the same interleaved rounds: reference.*, no_memory_vs_reference")
    p.add_argument("--op-profile", action="store_true",
                   help="torch.profiler tables (top operators by self CUDA time; CPU time on "
                        "CPU) of one step with memory, one without, and one reference step "
                        "with --reference")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense TFLOP/s of the device for MFU (H100 SXM bf16: 989)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 2 for quickstart)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--flops-only", action="store_true",
                   help="only build the model (meta device) and print the FLOPs per token")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = args.preset or "tiny"
    args.preset = args.preset or "paper"
    args.tiny = args.preset == "tiny"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    run_defaults = dict(PRESET_RUN[args.preset])
    run_defaults.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    for name, value in run_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.profile_steps is None:
        args.profile_steps = 3 if args.preset != "tiny" else 1
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be >= 1")
    return args


def summary(r: Dict) -> str:
    gib = 2 ** 30
    peak = r["peak_memory_bytes"]
    rounds = r["rounds"]
    lines = [
        f"device {r['device']}  search {r['config']['search']} ({r['search_impl']})  "
        f"dtype {r['config']['dtype']}  threads {r['threads']}  batch {r['config']['batch_size']} x "
        f"{r['config']['tokens_per_sample']} tokens, memory {r['config']['memory_size']} "
        f"(chunk {r['config']['chunk_size']}, k {r['config']['k']})",
        f"memory on : {r['step_ms']:9.2f} ms/step  {r['tokens_per_s']:12.0f} tok/s  "
        f"MFU {100 * r['mfu']:5.1f}%  peak mem {peak / gib:.2f} GiB",
        f"memory off: {r['no_memory']['step_ms']:9.2f} ms/step  "
        f"{r['no_memory']['tokens_per_s']:12.0f} tok/s  MFU {100 * r['no_memory']['mfu']:5.1f}%  "
        f"peak mem {r['no_memory']['peak_memory_bytes'] / gib:.2f} GiB",
        f"memory_overhead_ratio x{r['memory_overhead_ratio']:.3f} (median of "
        f"{len(rounds['overhead_ratio'])} interleaved rounds of {rounds['steps_per_round']} steps; "
        f"min {rounds['overhead_ratio_min']:.3f}, max {rounds['overhead_ratio_max']:.3f})",
        f"timers    : write {r['write_ms']:.2f} ms ({100 * r['write_share']:.1f}%)   retrieval "
        f"{r['retrieval_ms']:.2f} ms ({100 * r['retrieval_share']:.1f}%, of which search "
        f"{r['search_ms']:.2f} ms)   syncs/step {r['syncs_in_step']}",
        f"FLOPs/token {r['flops_per_token'] / 1e9:.3f} G (+ search "
        f"{r['flops_breakdown']['search_flops_per_token'] / 1e9:.3f} G, not in MFU)",
    ]
    ref = r.get("reference")
    if ref:
        lines.append(
            f"reference : {ref['step_ms']:9.2f} ms/step  {ref['tokens_per_s']:12.0f} tok/s  "
            f"MFU {100 * ref['mfu']:5.1f}%  peak mem {ref['peak_memory_bytes'] / gib:.2f} GiB  "
            f"(plain PyTorch, SDPA is_causal; no-memory step / reference "
            f"x{r['no_memory_vs_reference']:.3f})")
    lines.append(f"local attention: FlexAttention available {r['flex_attention_available']}, "
                 f"{r['flex_attention_calls_per_step']:.1f} flex calls per timed step")
    for name, table in (r.get("op_profile") or {}).items():
        lines += ["", f"top operators, one {name.replace('_', '-')} step:", table]
    b = r.get("breakdown")
    if b:
        lines += [
            "",
            f"memory's time per step (torch.profiler, median of {b['profiled_steps']} profiled "
            f"steps each way: {b['step_ms']:.1f} ms with memory, {b['no_memory_step_ms']:.1f} ms "
            "without)",
            f"| {'part':<48} | {'ms/step':>8} | {'% of no-memory step':>19} |",
            f"| {'-' * 48} | {'-' * 7}: | {'-' * 18}: |",
        ]
        for name, ms in b["parts_ms"].items():
            share = 100 * b["parts_share_of_no_memory_step"][name]
            lines.append(f"| {b['labels'][name]:<48} | {ms:8.2f} | {share:18.1f}% |")
        lines.append(f"| {'total (memory step - no-memory step)':<48} | {b['memory_ms']:8.2f} | "
                     f"{100 * b['memory_ms'] / b['no_memory_step_ms']:18.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args_threads = torch.get_num_threads()
    if args.flops_only:
        result = flops_only(args)
    else:
        result = run(args)
        result["threads"] = args_threads
        print(summary(result))
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
