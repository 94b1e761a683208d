"""Chunked, fused ``log_softmax(h @ W.T + b)[target]`` that never materialises (N, V).

:func:`linear_token_logps` is the LM-head half of :mod:`modern_llm.alignment.logprobs`: for N
hidden states (N, D) and N target ids it returns the N target log-probs (float32). It is one
:class:`torch.autograd.Function` that tiles the (N, V) logits into blocks of ``chunk_size``
rows × ``vocab_block`` columns, sized so one float32 block (≤ 4 MiB by default) stays in cache:

- forward, per row chunk: an online log-sum-exp over the vocabulary blocks (running max and
  rescaled sum, float32 even when the matmul runs in bf16/fp16), the target logit picked from
  the block that holds it; only ``h``, ``W``, the targets and the N log-sum-exps are kept;
- backward, per block: the logits are recomputed, ``G = g · (onehot - exp(logits - lse))`` is
  formed in place, then ``dh += G @ W_blk`` and ``dW_blk += G.T @ h`` (float32 accumulation).

The LM head thus costs 4 matmuls per training step (forward, recompute, two backward), the
same as activation checkpointing, without autograd's (chunk, V) temporaries, and the extra
memory is one block, independent of N and of V.

Matmuls run in the autocast dtype when autocast is on for the device (bf16 on CUDA), else in
the weight's dtype; softmax statistics are always float32.

:func:`stored_token_logps` is the other LM head: the whole (N, V) float32 logits at once, turned
in place into the softmax and kept for backward, so backward needs no recompute (3 matmuls
instead of 4, no per-block passes) at the price of ``N · V`` stored floats.
:func:`stored_head_bytes` is that price (measured, see its docstring) and
:func:`memory_budget_bytes` the budget ``pair_logps(head="auto")`` compares it with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BLOCK_ELEMENTS",
    "MEMORY_FRACTION",
    "linear_token_logps",
    "matmul_dtype",
    "memory_budget_bytes",
    "stored_head_bytes",
    "stored_token_logps",
]

#: Logit elements per (rows × vocab-columns) block: 1M float32 = 4 MiB (an L2-sized tile).
BLOCK_ELEMENTS = 1 << 20
_MIN_COLUMNS = 256


def matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The LM head's matmul dtype: the autocast dtype when autocast is on for the device."""
    kind = hidden.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _blocks(rows: int, vocab: int) -> list[tuple[int, int]]:
    """Vocabulary column ranges for a chunk of ``rows`` rows."""
    width = max(_MIN_COLUMNS, BLOCK_ELEMENTS // max(rows, 1))
    return [(v, min(v + width, vocab)) for v in range(0, vocab, width)]


def _block_logits(h: Tensor, w: Tensor, b: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Float32 logits (n, v) of one block, in a fresh buffer we may overwrite."""
    logits = F.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    return logits if logits.dtype == torch.float32 else logits.float()


def _local(targets: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Targets as column indices of block [start, end) (clamped) and which rows it holds."""
    local = targets - start
    inside = (local >= 0) & (local < end - start)
    return local.clamp(0, end - start - 1), inside


def _chunk_forward(
    h: Tensor, t: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(target logits, log-sum-exps), each (n,) float32, for one row chunk."""
    n = h.shape[0]
    target = torch.zeros(n, dtype=torch.float32, device=h.device)
    run_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=h.device)
    for start, end in _blocks(n, weight.shape[0]):
        b = None if bias is None else bias[start:end]
        logits = _block_logits(h, weight[start:end], b, dtype)  # (n, v)
        local, inside = _local(t, start, end)
        target = torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), target)
        new_max = torch.maximum(run_max, logits.amax(dim=1))  # (n,)
        run_sum.mul_(torch.exp(run_max - new_max))  # rescale (exp(-inf) = 0 at the start)
        run_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
        run_max = new_max
    return target, run_sum.log_().add_(run_max)


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_size: int,
    ) -> Tensor:
        dtype = matmul_dtype(hidden, weight)
        n = hidden.shape[0]
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                target[s:e], lse[s:e] = _chunk_forward(
                    hidden[s:e], targets[s:e], weight, bias, dtype
                )
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return target.sub_(lse)  # (N,) target log-probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, n, f32 = ctx.dtype, hidden.shape[0], torch.float32
        grad = grad.float()
        dh = torch.zeros(hidden.shape, dtype=f32, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=f32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=f32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, ctx.chunk_size):
                e = min(s + ctx.chunk_size, n)
                h, t, g, m = hidden[s:e], targets[s:e], grad[s:e], lse[s:e, None]
                hc = h.to(dtype)
                for start, end in _blocks(e - s, weight.shape[0]):
                    w = weight[start:end]
                    b = None if bias is None else bias[start:end]
                    # d logp / d logits = onehot(t) - softmax, times the incoming grad g.
                    coef = _block_logits(h, w, b, dtype).sub_(m).exp_().mul_(-g[:, None])
                    local, inside = _local(t, start, end)
                    coef.scatter_add_(1, local[:, None], (g * inside)[:, None])
                    if dh is not None:
                        dh[s:e] += coef.to(dtype) @ w.to(dtype)
                    if dw is not None:
                        dw[start:end] += coef.t().to(dtype) @ hc
                    if db is not None:
                        db[start:end] += coef.sum(dim=0)
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None,
            None,
        )


def linear_token_logps(
    hidden: Tensor,
    targets: Tensor,
    weight: Tensor,
    chunk_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """Token log-probs (N,) float32 of ``targets`` (N,) under ``softmax(hidden @ W.T + b)``.

    Args:
        hidden: (N, D) final hidden states at the positions that predict ``targets``.
        targets: (N,) long target ids.
        weight: (V, D) LM-head weight; ``bias``: (V,) or None.
        chunk_size: rows per chunk; each chunk sweeps the vocabulary in blocks of about
            ``BLOCK_ELEMENTS / chunk_size`` columns (at least 256), so the extra memory is about
            ``max(BLOCK_ELEMENTS, 256 · chunk_size)`` floats whatever N and V are.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    out: Tensor = _LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_size)
    return out


# ------------------------------------------------------------------- stored (unchunked) head


class _StoredTokenLogps(torch.autograd.Function):
    """The (N, V) logits in one matmul; their softmax (float32) is kept for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
    ) -> Tensor:
        dtype = matmul_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            probs = _block_logits(hidden, weight, bias, dtype)  # (N, V) float32, ours
            target = probs.gather(1, targets[:, None]).squeeze(1)  # (N,)
            run_max = probs.amax(dim=1)  # (N,)
            total = probs.sub_(run_max[:, None]).exp_().sum(dim=1)  # in place: exp(l - max)
            probs.div_(total[:, None])  # in place: the softmax
            lse = total.log_().add_(run_max)
        ctx.dtype, ctx.used = dtype, False
        ctx.save_for_backward(hidden, weight, bias, targets, probs)
        return target.sub_(lse)  # (N,) target log-probs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        if ctx.used:  # the stored softmax was overwritten by the first backward
            raise RuntimeError("stored_token_logps supports one backward pass (no retain_graph)")
        ctx.used = True
        hidden, weight, bias, targets, probs = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, g = ctx.dtype, grad.float()
        with torch.autocast(hidden.device.type, enabled=False):
            # d logp / d logits = onehot(t) - softmax, times g, formed in the stored buffer.
            coef = probs.mul_(-g[:, None]).scatter_add_(1, targets[:, None], g[:, None])
            db = coef.sum(dim=0) if need_b else None
            coef_mm = coef.to(dtype)  # no copy in float32
            dh = coef_mm @ weight.to(dtype) if need_h else None
            dw = coef_mm.t() @ hidden.to(dtype) if need_w else None
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None,
        )


def stored_token_logps(
    hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Same values and gradients as :func:`linear_token_logps`, without chunks: the (N, V)
    float32 softmax is stored for backward (:func:`stored_head_bytes` of memory), which then
    costs two matmuls instead of three. Faster for training when it fits; one backward only."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    out: Tensor = _StoredTokenLogps.apply(hidden, weight, bias, targets)
    return out


def stored_head_bytes(n: int, vocab: int, d_model: int, matmul_dtype: torch.dtype) -> int:
    """Extra peak memory of :func:`stored_token_logps` over the chunked head, ``n`` positions.

    The float32 (n, V) softmax is held from forward to backward; with a 16-bit matmul dtype the
    logits (forward) and the gradient coefficients (backward) also exist once in that dtype next
    to it, and so does the (V, D) weight gradient before its float32 cast. Measured peak RSS of
    one forward + backward on CPU, minus the chunked head's (n 2240, V 32000, D 512): 264 MiB
    in float32 (this estimate: 273 MiB), 439 MiB under bf16 autocast (estimate: 441 MiB).
    """
    half = matmul_dtype.itemsize if matmul_dtype.itemsize < 4 else 0
    return n * vocab * (4 + half) + vocab * d_model * half


#: Share of the free memory the stored LM head may use when no budget is given: the rest is
#: left for the backward pass's own temporaries (gradients, autograd buffers) and other work.
MEMORY_FRACTION = 0.5


def _available_cpu_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo, else free physical pages × page size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def memory_budget_bytes(device: torch.device) -> int:
    """Default memory budget for the stored LM head on ``device``: :data:`MEMORY_FRACTION` of
    its free memory (CUDA: free device memory plus what the caching allocator holds unused;
    CPU: available RAM). 0 when unknown, which selects the chunked head."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(MEMORY_FRACTION * (free + cached))
    if device.type == "cpu":
        return int(MEMORY_FRACTION * _available_cpu_bytes())
    return 0
