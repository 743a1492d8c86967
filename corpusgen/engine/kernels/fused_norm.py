"""LayerNorm, and a residual add fused into it, for large CUDA prefills (Triton).

In a large prefill PyTorch's LayerNorm runs below HBM bandwidth and the residual add before it is
a pass of its own over the same rows, a visible share of the prefill. Here one program per token
row reads the residual and the sublayer's output once, writes the
new residual and its normalised copy, with mean and variance in fp32 (two passes over the row
held in registers). Small inputs (decode steps) and fp32 stay on PyTorch: a Triton launch costs
more host time than it saves there, and fp32 is what the CPU-equality tests pin.

Numerics: the sum is rounded to the input dtype before it is normalised, as ``h + delta`` then
``F.layer_norm`` round it; statistics accumulate in fp32 like PyTorch's kernel (which uses
Welford's update; results differ by fp32 rounding in the statistics, checked in
``tests/test_cuda_kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from corpusgen.engine.kernels import tl, triton


MIN_ROWS = 4096
"""Token rows from which the kernel is used (prefills; a decode step has one row per sequence)."""


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and x.is_contiguous() and x.numel() // x.shape[-1] >= MIN_ROWS
            and x.shape[-1] <= 16384)


if triton is not None:

    @triton.jit
    def _norm_kernel(h_ptr, d_ptr, s_ptr, y_ptr, w_ptr, b_ptr, n, eps,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * n
        cols = tl.arange(0, BLOCK)
        live = cols < n
        x = tl.load(h_ptr + row + cols, mask=live, other=0.0)
        if ADD:
            x = (x.to(tl.float32) + tl.load(d_ptr + row + cols, mask=live, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(s_ptr + row + cols, x, mask=live)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / n
        xc = tl.where(live, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(y_ptr + row + cols, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=live)


def _launch(h, delta, weight, bias, eps):
    n = h.shape[-1]
    rows = h.numel() // n
    y = torch.empty_like(h)
    s = delta if delta is not None else y  # the sum overwrites delta: one prefill-sized buffer less
    block = triton.next_power_of_2(n)
    _norm_kernel[(rows,)](h, delta if delta is not None else h, s, y, weight, bias, n, eps,
                          BLOCK=block, ADD=delta is not None, num_warps=min(16, max(4, block // 512)))
    return s, y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim."""
    if usable(x, weight):
        return _launch(x, None, weight, bias, eps)[1]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, layer_norm(h + delta)): a residual add and the LayerNorm after it. ``delta`` (a
    sublayer's fresh output) is overwritten with the sum: holding h, delta, the sum and the norm at
    once took one more (rows, hidden) buffer than ``h + delta`` did (OPT-30B 4-bit, 64-row batches
    under a 16 GiB cap: out of memory)."""
    if usable(h, weight) and delta.shape == h.shape and delta.dtype == h.dtype and delta.is_contiguous():
        return _launch(h, delta, weight, bias, eps)
    s = delta.add_(h)
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def warm_up(device: torch.device, dtype: torch.dtype, hidden: int) -> None:
    """Compile both variants for this width now, not inside a timed prefill."""
    if triton is None or hidden > 16384:
        return
    x = torch.zeros(MIN_ROWS, hidden, device=device, dtype=dtype)
    w = torch.ones(hidden, device=device, dtype=dtype)
    layer_norm(x, w, w, 1e-5)
    add_layer_norm(x, x, w, w, 1e-5)
