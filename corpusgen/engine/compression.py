"""Group-wise asymmetric min/max quantisation for weights and the KV cache (DESIGN §5).

FlexGen's scheme (§4.3 of the paper): cut a tensor into groups of ``group_size`` consecutive values
along one axis; each group keeps its minimum and a scale ``(max - min) / (2**bits - 1)`` and
stores ``code = round((x - min) / scale)`` in ``bits`` bits, two 4-bit codes per byte. Dequantised
``x' = code * scale + min``, so ``|x - x'| <= scale / 2`` per group (the stored fp16 scale: min
is rounded down and scale up, so no code clamps). Constant groups have scale 0 and codes 0, and
dequantise exactly when the value is representable in fp16 (otherwise within half a tiny step).

Layout of a :class:`Packed` (grouping axis ``a`` of length ``L``, padded to ``Lp``, ``G = Lp / gs``):
``data`` is ``shape`` with ``shape[a]`` replaced by ``Lp * bits / 8`` bytes (for 4 bits the low
nibble holds the even element), ``mins`` and ``scales`` are ``shape`` with ``shape[a]`` replaced by
``G``. Every other dimension is untouched, so a slice along any other dimension of the three
buffers is the quantisation of the same slice of the tensor (:func:`narrow`). The grouping axis
is padded by repeating its last value, which lies inside the last group's range and widens
nothing; ``group_size`` is even so a byte never straddles two groups.

Which axis, per kind of tensor:

* **Weights** group along the *input* dimension, the last dim of an ``(out, in)`` Linear weight
  (our layout is HF's, used with ``F.linear``); 1-D tensors group along their only dim. FlexGen
  groups its weights along dim 0, the output channels. We use the input dim because it is the
  contiguous one (a row dequantises from contiguous bytes), because row slices of a weight
  (splitting a fused qkv, tensor parallelism) then cut between groups, and because GGUF blocks
  run along the same dim (``ne[0]``, the row), which makes re-quantising GGUF 4-bit weights
  lossless (below).
* **KV cache** groups along ``head_dim``, the last dim of ``(batch, kv_heads, max_len, head_dim)``
  (FlexGen: ``group_dim=2`` of its ``(seq, batch*heads, head_dim)`` cache, the same axis). Each
  token's groups are its own, so a new token is quantised and appended without touching the
  others: :func:`write_tokens` quantises ``src`` and writes it at positions ``[start, start+t)``,
  :func:`read_tokens` dequantises ``[0, end)``.

GGUF checkpoints whose tensors are already 4-bit: the loader dequantises GGUF ``Q4_x`` to floats.
Re-quantising those floats with group 64 adds a second rounding error on top of GGUF's. ``Q4_1``
stores blocks of 32 along the row as ``d * q + m`` (fp16 ``d`` and ``m``, ``q`` in 0..15, with
``m`` the block minimum and ``d = (max - min) / 15``, so codes 0 and 15 both occur): with
``group_size=32`` on the same axis our groups *are* its blocks, our min and scale come out equal
to ``m`` and ``d``, and the codes are reproduced — the second round trip is exact, bit for bit
from the loader's fp32 values (tests/test_compression.py, tests/test_compression_accuracy.py;
``open_engine`` quantises GGUF weights from fp32 for this reason). With group 64 the default
model's perplexity rises sharply (docs/benchmarks.md#accuracy-of-4-bit-compression). ``Q4_0``
(``d * (q - 8)``) and the K-quants (sub-blocks of 32) are reproduced exactly only in blocks whose
codes span the full range (rare for Q4_0, whose ``d`` is set by the largest |value|); elsewhere
the extra error stays below half a GGUF step. So use ``group_size: 32`` for GGUF Q4 sources; the size cost is 4 bytes per 32
values instead of per 64 (0.31 vs 0.28 of fp16).

Rotating K and V first (:func:`kv_rotation`, the KV cache's ``rotate`` option, QuaRot's idea): a
K head often has a few outlier channels, and with group 64 = one whole head (head_dim 64) the
largest one sets the scale of every other channel's 4-bit codes. The schedule multiplies q, K and
V by an orthogonal ``R`` per head after RoPE and attends in that basis (``q R (k R)^T = q k^T``),
rotating the output back (``out' R^T``); a Hadamard ``R`` spreads each channel evenly over all of
them, so a group's range follows the head's norm, not its largest channel. The cache only ever
holds rotated values, so nothing here knows about it.

Dequantisation on CUDA runs the fused Triton kernel kernels/dequantize.py (4-bit, grouped on the
last axis) when triton imports; everything else uses torch ops (``_dequantize_last``, its reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from corpusgen.engine.kernels import dequantize as dequantize_kernel
from corpusgen.engine.shapes import _axis, _check, grouped_shape, packed_shape

SCALE_DTYPE = torch.float16



def _can_pin() -> bool:
    # Pinning is page-locking for DMA to an accelerator; without one there is nothing to pin for.
    return torch.cuda.is_available()


@dataclass(frozen=True, kw_only=True, eq=False)
class Packed:
    """A quantised tensor: codes plus a (min, scale) pair per group, and how to undo it."""

    data: torch.Tensor
    """uint8 codes; ``shape`` with ``shape[axis]`` -> padded length * bits / 8."""
    mins: torch.Tensor
    """Group minima (fp16 by default); ``shape`` with ``shape[axis]`` -> number of groups."""
    scales: torch.Tensor
    """Group scales ``(max - min) / (2**bits - 1)``; same shape and dtype as ``mins``."""
    shape: tuple[int, ...]
    """Shape of the original tensor."""
    dtype: torch.dtype
    """Dtype of the original tensor (the default dtype of :func:`dequantize`)."""
    bits: int
    """4 or 8."""
    group_size: int
    """Values per group along ``axis`` (even)."""
    axis: int
    """The grouping axis, normalised to ``0 <= axis < len(shape)``."""

    @staticmethod
    def empty(
        shape: Sequence[int],
        dtype: torch.dtype,
        bits: int = 4,
        group_size: int = 64,
        axis: int = -1,
        device: torch.device | str = "cpu",
        pin: bool = False,
        scale_dtype: torch.dtype = SCALE_DTYPE,
        alloc=None,
    ) -> "Packed":
        """Preallocate the buffers for a tensor of ``shape`` (contents undefined). ``alloc(shape,
        dtype)`` allocates the host buffers instead (the engine's counted, pinned arena)."""
        _check(bits, group_size)
        shape = tuple(int(s) for s in shape)
        pin = pin and _can_pin() and torch.device(device).type == "cpu"
        gshape = grouped_shape(shape, group_size, axis)
        new = alloc or (lambda s, dt: torch.empty(s, dtype=dt, device=device, pin_memory=pin))  # noqa: E731
        return Packed(
            data=new(packed_shape(shape, bits, group_size, axis), torch.uint8),
            mins=new(gshape, scale_dtype),
            scales=new(gshape, scale_dtype),
            shape=shape, dtype=dtype, bits=bits, group_size=group_size, axis=_axis(axis, len(shape)),
        )  # fmt: skip

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.data, self.mins, self.scales

    @property
    def nbytes(self) -> int:
        """Bytes of all three buffers (what a tier stores and a link moves)."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _with(self, fn) -> "Packed":
        return replace(self, data=fn(self.data), mins=fn(self.mins), scales=fn(self.scales))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Packed":
        """The same Packed on ``device`` (buffers shared when already there, like Tensor.to)."""
        return self._with(lambda b: b.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Packed":
        """A copy in pinned CPU memory (unchanged when no accelerator is present)."""
        assert self.device.type == "cpu", f"pin_memory of a Packed on {self.device}"
        return self._with(lambda b: b.pin_memory()) if _can_pin() else self

    def is_pinned(self) -> bool:
        return all(b.is_pinned() for b in self.buffers)

    def copy_(self, other: "Packed", non_blocking: bool = False) -> "Packed":
        """Copy ``other`` into these (preallocated) buffers; returns self."""
        same = (self.shape, self.bits, self.group_size, self.axis)
        assert same == (other.shape, other.bits, other.group_size, other.axis), (same, other)
        for dst, src in zip(self.buffers, other.buffers):
            dst.copy_(src, non_blocking=non_blocking)
        return self


def narrow(p: Packed, dim: int, start: int, length: int) -> Packed:
    """A view of positions ``[start, start+length)`` along ``dim`` (any dim but the grouping axis).

    Writing into the view writes into ``p``; slicing never touches other positions' groups.
    """
    d = _axis(dim, len(p.shape))
    assert d != p.axis, f"cannot narrow along the grouping axis {p.axis}"
    assert 0 <= start and start + length <= p.shape[d], (start, length, p.shape)
    shape = (*p.shape[:d], length, *p.shape[d + 1 :])
    return replace(p._with(lambda b: b.narrow(d, start, length)), shape=shape)


# --- the math, on the last axis ---------------------------------------------------------------


def _nudge(
    v: torch.Tensor, target: torch.Tensor, sign: int, base: torch.Tensor | None = None, mult: int = 1
) -> torch.Tensor:
    """Move rounded ``v`` one ulp towards ``sign`` where ``base + mult * v`` misses ``target``."""
    reach = v.float() * mult + (0.0 if base is None else base.float())
    miss = reach > target if sign < 0 else reach < target
    return torch.where(miss, torch.nextafter(v, torch.full_like(v, sign * math.inf)), v)


def _quantize_last(
    x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., L) -> data (..., Lp*bits/8) uint8, mins and scales (..., G)."""
    pad = -x.shape[-1] % group_size
    x = x.float()
    if pad:  # repeat the last value: it is inside the last group's range
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    xg = x.unflatten(-1, (-1, group_size))  # (..., G, gs)
    lo, hi = xg.amin(-1), xg.amax(-1)  # (..., G)
    qmax = 2**bits - 1
    # Stored min <= lo and min + qmax * scale >= hi, so rounding them to scale_dtype never clamps
    # a code and the bound stays half a (stored) step; a nudge of one ulp does it.
    mins = _nudge(lo.to(scale_dtype), lo, -1)
    scales = _nudge(((hi - mins.float()) / qmax).to(scale_dtype), hi, +1, base=mins, mult=qmax)
    m, s = mins.float().unsqueeze(-1), scales.float().unsqueeze(-1)  # (..., G, 1)
    codes = ((xg - m) / torch.where(s > 0, s, 1.0)).round_().clamp_(0, qmax)
    codes = codes.masked_fill_(s == 0, 0).to(torch.uint8).flatten(-2)  # (..., Lp)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., Lp/2)
    return codes, mins, scales


def _dequantize_last(
    data: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, length: int
) -> torch.Tensor:
    """data (..., Lp*bits/8), mins/scales (..., G) -> float32 (..., length)."""
    if bits == 4:
        data = torch.stack((data & 15, data >> 4), dim=-1).flatten(-2)  # (..., Lp)
    codes = data.unflatten(-1, (-1, group_size)).float()  # (..., G, gs)
    y = codes.mul_(scales.float().unsqueeze(-1)).add_(mins.float().unsqueeze(-1))
    return y.flatten(-2)[..., :length]


def quantize(
    x: torch.Tensor, bits: int = 4, group_size: int = 64, axis: int = -1, scale_dtype: torch.dtype = SCALE_DTYPE
) -> Packed:
    """Quantise ``x`` in groups of ``group_size`` along ``axis`` (on x's device).

    ``scale_dtype`` holds mins and scales; fp16 (the default, as in FlexGen) needs |x| < 65504.
    """
    _check(bits, group_size)
    assert x.dim() >= 1 and x.is_floating_point(), (x.shape, x.dtype)
    a = _axis(axis, x.dim())
    assert x.shape[a] > 0, f"empty grouping axis in {tuple(x.shape)}"
    data, mins, scales = _quantize_last(x.movedim(a, -1), bits, group_size, scale_dtype)
    back = lambda t: t.movedim(-1, a).contiguous()  # noqa: E731
    return Packed(
        data=back(data), mins=back(mins), scales=back(scales),
        shape=tuple(x.shape), dtype=x.dtype, bits=bits, group_size=group_size, axis=a,
    )  # fmt: skip


def dequantize(p: Packed, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo :func:`quantize`: a tensor of ``p.shape`` in ``dtype`` (default ``p.dtype``).

    With ``out`` (a preallocated buffer of ``p.shape`` on p's device), every element of it is
    written and it is returned.
    """
    if out is None:
        out = torch.empty(p.shape, dtype=dtype or p.dtype, device=p.device)
    assert tuple(out.shape) == p.shape and out.device == p.device, (out.shape, out.device, p.shape, p.device)
    assert dtype is None or out.dtype == dtype, (out.dtype, dtype)
    if dequantize_kernel.usable(p.bits, p.axis == len(p.shape) - 1, out):
        return dequantize_kernel.dequant4(*p.buffers, p.group_size, out)
    a = p.axis
    y = _dequantize_last(*(b.movedim(a, -1) for b in p.buffers), p.bits, p.group_size, p.shape[a])
    return out.copy_(y.movedim(-1, a))


# --- the KV cache: (batch, kv_heads, max_len, head_dim), grouped on head_dim ------------------


def write_tokens(dst: Packed, src: torch.Tensor, start: int, seq_dim: int = 2, non_blocking: bool = False) -> None:
    """Quantise ``src`` (batch, kv_heads, t, head_dim) into positions ``[start, start+t)`` of ``dst``.

    Quantisation runs on src's device and only the compressed bytes cross to dst's device; other
    positions of ``dst`` are not touched.
    """
    d = _axis(seq_dim, len(dst.shape))
    t = src.shape[d]
    assert tuple(src.shape[:d]) + tuple(src.shape[d + 1 :]) == dst.shape[:d] + dst.shape[d + 1 :], (src.shape, dst.shape)
    q = quantize(src, dst.bits, dst.group_size, dst.axis, scale_dtype=dst.mins.dtype)
    narrow(dst, d, start, t).copy_(q, non_blocking=non_blocking)


def read_tokens(
    p: Packed, end: int, seq_dim: int = 2, out: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dequantise positions ``[0, end)`` along ``seq_dim``: (batch, kv_heads, end, head_dim)."""
    return dequantize(narrow(p, seq_dim, 0, end), out=out, dtype=dtype)


# --- rotating K and V before they are quantised (QuaRot) -------------------------------------


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix (n, n) of ±1 for n a power of two, fp32: ``H @ H.T == n * I``."""
    assert n >= 1 and n & (n - 1) == 0, f"n must be a power of two, got {n}"
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@dataclass(frozen=True, kw_only=True, eq=False)
class Rotation:
    """An orthogonal ``R = matrix * scale`` applied over the last dim (head_dim): ``x @ R``."""

    matrix: torch.Tensor
    """(head_dim, head_dim) in the compute dtype: Hadamard's ±1 times a power of two (exact in
    every dtype, and no fp16 overflow on the way), or an orthogonal matrix from QR."""
    scale: float
    """What the matrix leaves of Hadamard's ``head_dim ** -0.5``: 1 or 1/√2, a multiply that
    torch computes in fp32 for half dtypes. 1 for QR."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., head_dim) -> x @ R."""
        y = torch.matmul(x, self.matrix)
        return y.mul_(self.scale) if self.scale != 1 else y

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., head_dim) -> x @ R.T, the inverse of :meth:`apply`."""
        y = torch.matmul(x, self.matrix.mT)
        return y.mul_(self.scale) if self.scale != 1 else y

    @property
    def dense(self) -> torch.Tensor:
        """R itself, fp64 (for tests)."""
        return self.matrix.double() * self.scale


def kv_rotation(head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int = 0) -> Rotation:
    """The rotation of every head's K and V (and q, and back for the attention output).

    A normalised Hadamard matrix when ``head_dim`` is a power of two; otherwise a fixed-seed
    random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed), which
    spreads an outlier channel as well, at the same cost (both run as one dense matmul).
    """
    if head_dim & (head_dim - 1) == 0:
        exact = 2.0 ** -((head_dim.bit_length() - 1) // 2)  # the power-of-two part of head_dim ** -0.5
        return Rotation(matrix=(hadamard(head_dim) * exact).to(device=device, dtype=dtype),
                        scale=head_dim ** -0.5 / exact)
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return Rotation(matrix=q.to(device=device, dtype=dtype), scale=1.0)
