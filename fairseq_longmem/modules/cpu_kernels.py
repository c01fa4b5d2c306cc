"""Compiled CPU kernels for the memory layer's read (``csrc/cpu_memory_ops.cpp``).

Built once per machine with :mod:`torch.utils.cpp_extension` (g++ and ninja,
about a minute; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) the first time a CPU memory layer reads, or ahead
of time with ``longmem-build-kernels`` (which
``scripts/install.sh`` runs). The build is named after the CPU capability
PyTorch detects (``AVX2``, ``AVX512``, ``DEFAULT``), so a cache shared by
machines of different kinds never hands one of them instructions it lacks, and
after the torch installation, so environments never rebuild over each other.

* :func:`topk_rows`: exact top-k of each row of a score matrix, two
  vectorised passes and a sorted buffer of the few candidates instead of
  ``torch.topk``'s sort of every row; :func:`search_topk`: the chunk search
  (scores by GEMM in cache-sized blocks, then that top-k).
* :func:`memory_attention`: attention of each query over the tokens of its
  retrieved chunks, read straight from the memory's ring buffers (no gathered
  copy of the keys and values), with its backward for the queries.

Both are exact and have PyTorch twins (``memory_bank.blocked_topk``,
``joint_attention._memory_attention``) that the tests compare them with. If
the build fails (no compiler), the memory layer logs why once and uses the
PyTorch path: the same results, slower. ``LONGMEM_CPU_KERNELS=0`` never builds
or uses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_memory_ops.cpp"
# bump when the kernels' interface changes (sources are also hashed by torch)
VERSION = 2

_STATE: dict = {"module": None, "tried": False, "error": None}


def enabled() -> bool:
    """False when ``LONGMEM_CPU_KERNELS=0`` turns the kernels off."""
    return os.environ.get("LONGMEM_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def build_flags() -> tuple[str, list[str]]:
    """``(name, extra_cflags)`` of the build for this machine's CPU capability."""
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    flags = ["-O3", "-fopenmp"]
    if cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    # one build per torch installation: builds for two environments (other include
    # paths, maybe another torch ABI) never replace each other in a shared cache
    env = hashlib.sha1(f"{torch.__version__}:{Path(torch.__file__).parent}".encode()).hexdigest()[:8]
    return f"longmem_cpu_ops_{cap.lower()}_v{VERSION}_{env}", flags


def load(verbose: bool = False):
    """The compiled module, building it on the first call; None if the kernels
    are disabled or cannot be built (the reason is logged once and kept in
    :func:`load_error`)."""
    if not enabled():
        return None
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    name, flags = build_flags()
    try:
        from torch.utils import cpp_extension

        env_bin = str(Path(sys.executable).parent)
        if shutil.which("ninja") is None and (Path(env_bin) / "ninja").exists():
            os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
        t0 = time.time()
        module = cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=flags,
            # at::parallel_for compiles to OpenMP: link the libgomp torch ships and
            # has loaded (same soname), so one thread pool serves both
            extra_ldflags=["-lgomp"], verbose=verbose,
        )
        took = time.time() - t0
        if took > 5:
            logger.info("built the CPU memory kernels %s in %.0f s (cached for next time)", name, took)
        _STATE["module"] = module
    except Exception as e:  # no compiler, no ninja, read-only cache, ...
        _STATE["error"] = f"{type(e).__name__}: {e}"
        logger.warning(
            "the CPU memory kernels (%s) could not be built, so the memory layer uses its "
            "PyTorch path (same results, slower): %s. Fix: install a C++ compiler (g++) and "
            "ninja (pip install ninja), or set LONGMEM_CPU_KERNELS=0 to skip the build.",
            SOURCE.name, _STATE["error"].splitlines()[0][:300],
        )
    return _STATE["module"]


def load_error() -> Optional[str]:
    """Why :func:`load` returned None (None if it did not fail)."""
    return _STATE["error"]


def available() -> bool:
    """Whether the kernels are built (building them if need be) and enabled."""
    return load() is not None


def topk_rows(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of each row of ``scores`` ``(rows, n)`` fp32: ``(values, index)``
    ``(rows, k)`` by decreasing value (ties: lower index first; NaN first, as
    ``torch.topk``). Requires :func:`available`."""
    values, index = load().topk_rows(scores.contiguous(), int(k))
    return values, index


def screen_enabled() -> bool:
    """False when ``LONGMEM_BF16_SCREEN=0`` turns the bf16-screened search off."""
    return os.environ.get("LONGMEM_BF16_SCREEN", "1").strip().lower() not in ("0", "false", "no")


def screen_supported() -> bool:
    """Whether :func:`search_topk` screens with bf16 on this CPU (AVX-512 BF16, and
    the kernels available)."""
    return available() and bool(load().screen_supported())


def search_topk(
    queries: Tensor, chunk_keys: Tensor, invalid: Tensor, k: int, q_block: int,
    screen: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` chunks per query. queries ``(rows, tgt_len, d)``, chunk_keys
    ``(rows, n, d)`` fp32; invalid ``(rows, n)`` bool (True: never chosen) or an
    empty tensor. Returns ``(values, index)`` ``(rows, tgt_len, k)`` by decreasing
    score (ties: lower index first; ``-inf`` for invalid chunks). The scores are
    computed ``q_block`` queries of a row at a time and never stored whole.

    ``screen`` (default: :func:`screen_enabled`): on a CPU with AVX-512 BF16,
    screen every chunk with bf16 dot products (twice the fp32 rate) and score
    in fp32 only the few that its error bound cannot rule out; the chunks
    chosen are those of the fp32 search (head_dim a multiple of 16, k <= 64;
    other shapes and CPUs take the fp32 path). Requires :func:`available`."""
    if screen is None:
        screen = screen_enabled()
    return load().search_topk(queries, chunk_keys, invalid, int(k), int(q_block), bool(screen))


def memory_attention_supported(q: Tensor, store_k: Tensor, store_v: Tensor) -> bool:
    """Whether :func:`memory_attention` handles these tensors (CPU, fp32, keys and
    values without gradient) and the kernels are available."""
    return (
        q.device.type == "cpu"
        and store_k.device.type == "cpu"
        and q.dtype == torch.float32
        and store_k.dtype == torch.float32
        and store_v.dtype == torch.float32
        and not (store_k.requires_grad or store_v.requires_grad)
        and available()
    )


def memory_attention(
    q: Tensor, store_k: Tensor, store_v: Tensor, chunk_index: Tensor, mem_mask: Tensor,
    chunk_size: int, dropout_p: float = 0.0, training: bool = False,
    overwrite_log=None,
) -> tuple[Tensor, Tensor]:
    """:func:`.joint_attention.memory_attention_chunks` in one compiled pass.

    q: ``(bsz, heads, tgt_len, d)``; store_k, store_v: ``(bsz, heads, slots, d)``;
    chunk_index: ``(bsz, heads, tgt_len, kc)``; mem_mask ``(bsz, heads, tgt_len,
    kc * chunk_size)``. Returns ``(out (bsz, heads, tgt_len, d), has_memory
    (bsz, heads, tgt_len))``. Dropout draws the same random numbers as the
    PyTorch path (``F.dropout`` of ones shaped like the probabilities).

    Nothing is copied for the backward: it reads the ring buffers again. A
    write to them between forward and backward (the step's write-after-read)
    must be logged in ``overwrite_log`` (:meth:`.memory_bank.MemoryBank.log_overwrites`,
    opened before this call), which puts back what the forward read while the
    backward runs; an unlogged change is an error, never a wrong gradient.
    """
    return _CompiledMemoryAttentionFn.apply(
        q, store_k, store_v, chunk_index, mem_mask, int(chunk_size), float(dropout_p), training,
        overwrite_log,
    )


class _CompiledMemoryAttentionFn(torch.autograd.Function):
    """Forward and query-gradient of :func:`memory_attention` in the compiled kernels."""

    @staticmethod
    def forward(ctx, q, store_k, store_v, chunk_index, mem_mask, chunk_size, dropout_p, training,
                overwrite_log):
        bsz, heads, tgt_len, d = q.shape
        rows = bsz * heads
        slots = store_k.size(-2)
        kc = chunk_index.size(-1)
        sk = store_k.reshape(rows, slots, d).contiguous()
        sv = store_v.reshape(rows, slots, d).contiguous()
        ci = chunk_index.reshape(rows, tgt_len, kc).contiguous()
        msk = mem_mask.reshape(rows, tgt_len, kc * chunk_size).to(torch.bool).contiguous()
        drop = torch.empty(0)
        if dropout_p > 0 and training:
            drop = F.dropout(
                torch.ones(rows, tgt_len, kc * chunk_size), p=dropout_p, training=True
            )
        scale = d ** -0.5
        out, probs, has = load().memory_attention_forward(
            q.detach().reshape(rows, tgt_len, d).contiguous(), sk, sv, ci, msk, drop,
            chunk_size, scale,
        )
        ctx.save_for_backward(probs, drop, ci)
        # the buffers themselves, not saved tensors: the write after this read
        # bumps their version; the log (or the version check) keeps this exact
        ctx.stores = (sk, sv)
        ctx.versions = (sk._version, sv._version)
        ctx.log = overwrite_log
        ctx.meta = (chunk_size, scale, q.shape)
        has = has.view(bsz, heads, tgt_len)
        ctx.mark_non_differentiable(has)
        return out.view(bsz, heads, tgt_len, d), has

    @staticmethod
    def backward(ctx, grad_out, _grad_has):
        probs, drop, ci = ctx.saved_tensors
        sk, sv = ctx.stores
        chunk_size, scale, shape = ctx.meta
        bsz, heads, tgt_len, d = shape
        g = grad_out.reshape(bsz * heads, tgt_len, d).to(torch.float32).contiguous()
        log = ctx.log
        logged = log is not None and log.keys.data_ptr() == sk.data_ptr()
        if not logged and (sk._version, sv._version) != ctx.versions:
            raise RuntimeError(
                "the memory's ring buffers changed between the compiled memory attention's "
                "forward and its backward, without an overwrite log: pass "
                "overwrite_log=bank.log_overwrites() (opened before the read), or set "
                "LONGMEM_CPU_KERNELS=0"
            )
        if logged:
            with log.restored():
                grad_q = load().memory_attention_backward(
                    g, probs, drop, sk, sv, ci, chunk_size, scale
                )
        else:
            grad_q = load().memory_attention_backward(g, probs, drop, sk, sv, ci, chunk_size, scale)
        return grad_q.view(shape), None, None, None, None, None, None, None, None


def main() -> None:
    """``longmem-build-kernels``: build the kernels now and check them once against
    PyTorch; exit status 1 if they cannot be built."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name, flags = build_flags()
    module = load(verbose=False)
    if module is None:
        reason = "disabled by LONGMEM_CPU_KERNELS=0" if not enabled() else load_error()
        logger.warning("[cpu kernels] %s: not built (%s); the PyTorch path will be used", name, reason)
        raise SystemExit(1 if enabled() else 0)
    scores = torch.randn(64, 300)
    values, index = topk_rows(scores, 7)
    ref = scores.topk(7, dim=-1).values
    if not torch.equal(values, ref):
        raise SystemExit(f"[cpu kernels] {name}: topk_rows disagrees with torch.topk")
    logger.info("[cpu kernels] %s ready (%s)", name, " ".join(flags))


if __name__ == "__main__":
    main()
