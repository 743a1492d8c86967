"""Writing a prompt's K/V into a cache: a Triton tile copy on the GPU, a 2-D DMA to the host.

Both exist because PyTorch's ``copy_`` is slow for exactly the copies a prefill makes.

* **GPU cache** (``tile_copy_``). The projections give K and V as (batch, seq, heads, head_dim) in
  memory, viewed as (batch, heads, seq, head_dim); the cache is (batch, heads, columns, head_dim).
  Neither side is contiguous, so ``copy_`` falls back to its element-wise kernel with two-byte
  accesses. Every (row, head, column) is still a contiguous ``head_dim`` vector on both sides, and
  a Triton program that copies whole (tile, head_dim) blocks moves it at memory speed
  (docs/benchmarks.md#measurements-behind-engine-defaults).
* **Host cache, batch-major** (``copy_to_host_2d``). With CPU attention the host cache is
  (batch, heads, columns, head_dim), so a prompt's K lands as batch x heads strips, each one
  contiguous run of ``seq x head_dim`` elements at a fixed pitch: one ``cudaMemcpy2DAsync``. PyTorch
  has no strided device-to-host copy; ``copy_`` stages through a pageable tensor, synchronously,
  and the host copies again, which would dominate an offloaded prefill.

Without CUDA (or without triton, or the CUDA runtime library) the callers use ``copy_``.
"""

from __future__ import annotations

import ctypes

import torch

from corpusgen.engine.kernels import tl, triton
from corpusgen.engine.streams import cudart as _cudart


MIN_ELEMENTS = 1 << 20
"""Elements from which a copy goes through the tile kernel (a prompt's K, not a decode token's)."""


def tile_copy_usable(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether ``tile_copy_`` applies: 4-D CUDA tensors of one shape and dtype, last dim contiguous,
    a power-of-two last dim, and enough elements for a launch to pay (a prefill, not a decode token)."""
    return (triton is not None and dst.is_cuda and src.is_cuda and dst.dim() == src.dim() == 4
            and dst.shape == src.shape and dst.dtype == src.dtype and dst.stride(-1) == 1 and src.stride(-1) == 1
            and dst.shape[-1] in (16, 32, 64, 128, 256) and src.numel() >= MIN_ELEMENTS)


if triton is not None:

    @triton.jit(do_not_specialize=("t_len", "heads"))
    def _tile_copy_kernel(src_ptr, dst_ptr, s_b, s_h, s_t, d_b, d_h, d_t, heads, t_len,
                          D: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        bh = tl.program_id(0)
        b = (bh // heads).to(tl.int64)
        h = bh % heads
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        live = (t < t_len)[:, None]
        x = tl.load(src_ptr + b * s_b + h * s_h + t[:, None].to(tl.int64) * s_t + d[None, :], mask=live)
        tl.store(dst_ptr + b * d_b + h * d_h + t[:, None].to(tl.int64) * d_t + d[None, :], x, mask=live)


def tile_copy_(dst: torch.Tensor, src: torch.Tensor, block_t: int = 32) -> torch.Tensor:
    """``dst.copy_(src)`` for (batch, heads, seq, head_dim) tensors with a contiguous last dim."""
    if not tile_copy_usable(dst, src):
        return dst.copy_(src)
    return _tile_copy(dst, src, block_t)


def _tile_copy(dst: torch.Tensor, src: torch.Tensor, block_t: int) -> torch.Tensor:
    """The launch behind ``tile_copy_`` (also run by tests/test_kernels.py under the interpreter)."""
    b, heads, t_len, d = src.shape
    grid = (b * heads, triton.cdiv(t_len, block_t))
    _tile_copy_kernel[grid](src, dst, *src.stride()[:3], *dst.stride()[:3], heads, t_len, D=d, BLOCK_T=block_t,
                            num_warps=4)
    return dst


def warm_up(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Compile the tile copy for this head size now, not inside a timed prefill."""
    if triton is None or head_dim not in (16, 32, 64, 128, 256):
        return
    x = torch.zeros(1, 16, MIN_ELEMENTS // (16 * head_dim), head_dim, device=device, dtype=dtype)
    tile_copy_(torch.empty_like(x), x.transpose(1, 2).contiguous().transpose(1, 2))


# --------------------------------------------------------------------------- 2-D device -> host

_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost


def host_2d_usable(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether ``copy_to_host_2d`` applies: ``dst`` a pinned host view (rows, cols, ...) whose rows
    are one fixed pitch apart with each row's elements contiguous, ``src`` a contiguous CUDA tensor
    of the same shape and dtype, and the CUDA runtime found."""
    if not (src.is_cuda and dst.device.type == "cpu" and dst.shape == src.shape
            and dst.dtype == src.dtype and src.is_contiguous() and dst.dim() >= 2):
        return False
    pitch, _ = _rows(dst)
    return pitch is not None and dst.is_pinned() and _cudart() is not None


def _rows(t: torch.Tensor):
    """(pitch in elements, elements per row) when ``t`` is rows of a fixed pitch over its first two
    dims, each row = dims 2.. contiguous; (None, None) otherwise."""
    inner = 1
    for n in t.shape[2:]:
        inner *= n
    # dims 2.. contiguous
    expect = 1
    for n, s in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if n != 1 and s != expect:
            return None, None
        expect *= n
    b, h = t.shape[0], t.shape[1]
    if h > 1:
        pitch = t.stride(1)
        if b > 1 and t.stride(0) != h * pitch:
            return None, None
    else:
        pitch = t.stride(0) if b > 1 else inner
    if pitch < inner:
        return None, None
    return pitch, inner


def copy_to_host_2d(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Enqueue ``dst.copy_(src)`` on ``stream`` as one strided DMA (``host_2d_usable`` must hold).
    Asynchronous: the caller orders readers of ``dst`` after an event on ``stream``, and keeps
    ``src`` alive for the stream (``record_stream``)."""
    pitch, inner = _rows(dst)
    es = src.element_size()
    rows = src.shape[0] * src.shape[1]
    err = _cudart().cudaMemcpy2DAsync(ctypes.c_void_p(dst.data_ptr()), pitch * es, ctypes.c_void_p(src.data_ptr()),
                                      inner * es, inner * es, rows, _DEVICE_TO_HOST,
                                      ctypes.c_void_p(stream.cuda_stream))
    if err != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")
