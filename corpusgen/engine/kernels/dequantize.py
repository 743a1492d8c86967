"""4-bit group-wise dequantisation in one pass (Triton): packed codes, per-group mins and scales
in, the dense tensor out. The PyTorch reference is compression._dequantize_last; the engine calls
this through compression.dequantize, which owns the format (compression.Packed)."""

from __future__ import annotations

import torch

from corpusgen.engine.kernels import runs_on, tl, triton


def usable(bits: int, grouped_last: bool, out: torch.Tensor) -> bool:
    """Whether ``dequant4`` takes this tensor: 4-bit, grouped on the last axis, where a kernel runs."""
    return bits == 4 and grouped_last and runs_on(out)


if triton is not None:

    @triton.jit(do_not_specialize=("rows",))
    def _dequant4_kernel(data_ptr, mins_ptr, scales_ptr, out_ptr, rows, half_len, length, n_groups,
                         GROUP_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        # One program per (BLOCK_R rows, BLOCK_C columns) tile of the (rows, length) output. Column
        # c sits in byte c // 2 of its row (rows are half_len bytes), low nibble if c is even. Row
        # and column come from the program's coordinates: no per-element division by a runtime
        # length (64-bit division is a long software sequence on the GPU).
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        keep = (r[:, None] < rows) & (c[None, :] < length)
        byte = tl.load(data_ptr + r[:, None] * half_len + (c // 2)[None, :], mask=keep, other=0).to(tl.int32)
        code = (byte >> ((c % 2) * 4)[None, :]) & 15
        g = r[:, None] * n_groups + (c // GROUP_SIZE)[None, :]
        s = tl.load(scales_ptr + g, mask=keep, other=0.0).to(tl.float32)
        m = tl.load(mins_ptr + g, mask=keep, other=0.0).to(tl.float32)
        y = code.to(tl.float32) * s + m
        tl.store(out_ptr + r[:, None] * length + c[None, :], y.to(out_ptr.dtype.element_ty), mask=keep)


def dequant4(data: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, group_size: int,
             out: torch.Tensor) -> torch.Tensor:
    """Codes ``data`` (..., length/2) uint8, two per byte, low nibble first, and ``mins``/``scales``
    (..., length/group_size) -> ``out`` (..., length) = code * scale + min; returns ``out``."""
    assert triton is not None, "triton is not available"
    data, mins, scales = data.contiguous(), mins.contiguous(), scales.contiguous()  # a narrowed cache is strided
    dst = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    half_len, n_groups, length = data.shape[-1], mins.shape[-1], out.shape[-1]
    rows = data.numel() // max(1, half_len)
    # Tiles of 4096 elements: whole rows of a KV cache (head_dim) or 1024-column runs of a weight.
    block_c = min(1024, triton.next_power_of_2(length))
    block_r = 4096 // block_c
    if rows and length:
        grid = (triton.cdiv(rows, block_r), triton.cdiv(length, block_c))
        _dequant4_kernel[grid](data, mins, scales, dst, rows, half_len, length, n_groups,
                               GROUP_SIZE=group_size, BLOCK_R=block_r, BLOCK_C=block_c)  # fmt: skip
    return out if dst is out else out.copy_(dst)
