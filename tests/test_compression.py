"""Group-wise quantisation (corpusgen/engine/compression.py): error bounds, sizes, KV appends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corpusgen.engine.compression import (
    Packed,
    dequantize,
    hadamard,
    kv_rotation,
    narrow,
    quantize,
    read_tokens,
    write_tokens,
)
from corpusgen.engine.layers import attend, attention_mask
from corpusgen.engine.shapes import compressed_nbytes

def per_element(t: torch.Tensor, p: Packed) -> torch.Tensor:
    """Expand a per-group tensor (mins or scales) to the original shape."""
    return t.float().repeat_interleave(p.group_size, dim=p.axis).narrow(p.axis, 0, p.shape[p.axis])


def error_bound(p: Packed) -> torch.Tensor:
    """|x - deq(q(x))| per element: half the stored step, plus float32 arithmetic."""
    m, s = per_element(p.mins, p), per_element(p.scales, p)
    return s / 2 + 1e-6 * (m.abs() + (2**p.bits - 1) * s)


SHAPES_AXES = [((3, 5, 7), -1), ((3, 5, 7), 0), ((3, 5, 7), 1), ((1, 130), -1), ((17, 64), -1),
               ((17, 64), 0), ((2, 3, 100), -1), ((2, 3, 100), 1), ((129,), 0)]  # fmt: skip


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [2, 6, 32, 64])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_round_trip_within_half_step(shape, axis, bits, group_size):
    """The promise the policy makes: every value comes back within half a quantisation step of
    its group (odd lengths padded, any axis, both widths), so compressed stays within a stated error."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(hash((shape, axis)) % 2**31)) * 2 + 0.5
    p = quantize(x, bits, group_size, axis)
    y = dequantize(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((x - y).abs() <= error_bound(p)).all()


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    data=st.data(),
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([2, 4, 8, 10, 64]),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_property(shape, data, bits, group_size, scale):
    """Random shapes, axes and magnitudes: the half-step bound holds and nothing becomes NaN."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + bits)) * scale
    p = quantize(x, bits, group_size, axis)
    y = dequantize(p)
    assert torch.isfinite(y).all()
    assert ((x - y).abs() <= error_bound(p)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Weights and caches are fp16/bf16: dequantising to the input dtype adds at most its own rounding."""
    x = torch.randn(4, 200).to(dtype)
    p = quantize(x)
    y = dequantize(p)
    assert y.dtype == dtype
    bound = error_bound(p) + torch.finfo(dtype).eps * x.float().abs().add(1)
    assert ((x.float() - y.float()).abs() <= bound).all()
    assert dequantize(p, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_groups_are_exact(bits):
    """Constant groups (max == min) give scale 0: no division by zero, no NaN, exact values."""
    x = torch.zeros(3, 130)
    x[1] = 3.25  # fp16-representable constant row
    x[2, :64] = -7.5  # one constant group, the rest zeros
    p = quantize(x, bits, 64)
    assert torch.isfinite(p.scales).all() and torch.isfinite(p.mins).all()
    assert (p.scales == 0).all()
    y = dequantize(p)
    assert torch.equal(y, x)
    assert torch.equal(dequantize(quantize(torch.zeros(5, 7, 9), bits, 4, axis=1)), torch.zeros(5, 7, 9))
    c = torch.full((2, 64), 0.1)  # not representable in fp16: min rounds down, a tiny step remains
    q = quantize(c, bits, 64)
    assert ((dequantize(q) - c).abs() <= error_bound(q)).all() and error_bound(q).max() < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_size,axis", [((4096, 4096), 64, -1), ((3, 5, 7), 4, 1), ((1, 130), 64, 0),
                                                    ((2, 8, 33, 128), 64, -1), ((10, 100), 32, 0)])  # fmt: skip
def test_sizes(shape, group_size, axis, bits):
    """The planner's memory accounting uses compressed_nbytes; it must equal what quantize
    allocates, and Packed.empty must allocate the same buffers."""
    x = torch.randn(shape)
    p = quantize(x, bits, group_size, axis)
    assert p.nbytes == compressed_nbytes(shape, bits, group_size, axis)
    e = Packed.empty(shape, torch.float16, bits, group_size, axis)
    assert [b.shape for b in e.buffers] == [b.shape for b in p.buffers]
    assert [b.dtype for b in e.buffers] == [b.dtype for b in p.buffers]


@pytest.mark.parametrize("bits", [4, 8])
def test_size_ratio(bits):
    """Compression is the point: bits/16 of fp16 plus 4 bytes of (min, scale) per group of 64."""
    shape = (1024, 4096)
    fp16 = math.prod(shape) * 2
    expected = bits / 16 + 4 / (64 * 2)
    assert compressed_nbytes(shape, bits, 64) / fp16 == pytest.approx(expected)
    assert compressed_nbytes(shape, bits, 64, scale_dtype_bytes=4) > compressed_nbytes(shape, bits, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_write_tokens_equals_whole_quantisation(bits):
    """The KV cache appends one token at a time; each token's groups must be the same bytes as
    quantising the whole sequence at once, and earlier positions must never change."""
    b, h, max_len, d = 2, 3, 9, 40
    kv = torch.randn(b, h, max_len, d)
    whole = quantize(kv, bits, 16)
    cache = Packed.empty((b, h, max_len, d), torch.float32, bits, 16)
    for buf in cache.buffers:
        buf.zero_()
    write_tokens(cache, kv[:, :, :3], 0)  # a prefill of 3 tokens
    snapshots = [tuple(t.clone() for t in narrow(cache, 2, 0, 3).buffers)]
    for pos in range(3, max_len):
        write_tokens(cache, kv[:, :, pos : pos + 1], pos)
        for earlier, before in zip(narrow(cache, 2, 0, pos).buffers, snapshots[-1]):
            assert torch.equal(earlier[:, :, : before.shape[2]], before)
        tail = narrow(cache, 2, pos + 1, max_len - pos - 1)
        assert all((t == 0).all() for t in tail.buffers)  # later positions untouched
        snapshots.append(tuple(t.clone() for t in narrow(cache, 2, 0, pos + 1).buffers))
    for got, want in zip(cache.buffers, whole.buffers):
        assert torch.equal(got, want)
    assert torch.equal(read_tokens(cache, 5), dequantize(whole)[:, :, :5])


def test_dequantize_out_writes_every_element():
    """The engine dequantises into a preallocated buffer once per layer; a NaN left in it would
    poison attention, so every element must be written (including a strided buffer)."""
    x = torch.randn(3, 5, 70)
    p = quantize(x, 4, 64)
    out = torch.full((3, 5, 70), float("nan"))
    assert dequantize(p, out=out) is out
    assert not out.isnan().any() and torch.equal(out, dequantize(p))
    big = torch.full((3, 8, 70), float("nan"), dtype=torch.float16)
    view = big[:, 2:7]  # a non-contiguous destination
    dequantize(p, out=view)
    assert not view.isnan().any() and big[:, :2].isnan().all() and big[:, 7:].isnan().all()
    q = quantize(x, 8, 6, axis=1)
    out = torch.full((3, 5, 70), float("nan"), dtype=torch.bfloat16)
    dequantize(q, out=out)
    assert not out.isnan().any()


def test_to_pin_copy_round_trip():
    """Tiers move Packed tensors between devices and into preallocated (pinned) buffers; the bytes
    must survive every hop unchanged."""
    p = quantize(torch.randn(4, 6, 100), 4, 64)
    moved = p.to("cpu")
    assert all(a is b for a, b in zip(moved.buffers, p.buffers))  # like Tensor.to, no copy
    pinned = p.pin_memory()
    if torch.cuda.is_available():
        assert pinned.is_pinned()
        back = pinned.to("cuda", non_blocking=True).to("cpu")
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(back.buffers, p.buffers))
    dst = Packed.empty(p.shape, p.dtype, p.bits, p.group_size, p.axis, pin=True)
    assert dst.copy_(pinned, non_blocking=True) is dst
    assert all(torch.equal(a, b) for a, b in zip(dst.buffers, p.buffers))
    assert torch.equal(dequantize(dst), dequantize(p))
    assert (dst.shape, dst.dtype, dst.bits, dst.group_size, dst.axis) == (p.shape, p.dtype, 4, 64, 2)


def test_narrow_rejects_grouping_axis():
    """Slicing through groups would break them; narrow only cuts between them."""
    p = quantize(torch.randn(4, 128))
    with pytest.raises(AssertionError):
        narrow(p, 1, 0, 64)
    assert torch.equal(dequantize(narrow(p, 0, 1, 2)), dequantize(p)[1:3])


def q4_1_dequantised(rows: int, blocks: int, seed: int = 0) -> torch.Tensor:
    """What our GGUF loader produces from a Q4_1 tensor: blocks of 32 along the row, each
    ``d * q + m`` with fp16 d and m and codes 0..15 (0 and 15 both present, as llama.cpp's
    quantiser makes them: m is the block min, d = (max - min) / 15)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(rows, blocks, 1, generator=g) * 0.05 + 1e-3).half().float()
    m = (torch.randn(rows, blocks, 1, generator=g) * 0.2).half().float()
    q = torch.randint(0, 16, (rows, blocks, 32), generator=g)
    q[..., 0], q[..., 31] = 0, 15
    q = q[..., torch.randperm(32, generator=g)]
    return (d * q + m).flatten(1)  # (rows, blocks * 32)


def test_gguf_q4_1_requantises_exactly_with_group_32():
    """The module docstring recommends group_size 32 for GGUF Q4 sources: groups then coincide
    with Q4_1 blocks and re-quantising adds no error, where group 64 adds a second rounding."""
    y = q4_1_dequantised(16, 24)
    err32 = (dequantize(quantize(y, 4, 32)) - y).abs().max().item()
    err64 = (dequantize(quantize(y, 4, 64)) - y).abs().max().item()
    assert err32 <= 1e-6 * y.abs().max().item()
    assert err64 > 100 * max(err32, 1e-9)


@pytest.mark.parametrize("group_size", [32, 64])
def test_second_round_trip_is_exact(group_size):
    """Quantising already-quantised values with the same groups reproduces them, so moving a
    tensor through quantise/dequantise twice (or a GGUF block with lined-up groups) does not
    accumulate error."""
    x = torch.randn(8, 300)
    y1 = dequantize(quantize(x, 4, group_size))
    y2 = dequantize(quantize(y1, 4, group_size))
    first = (x - y1).abs().max().item()
    assert (y2 - y1).abs().max().item() <= 1e-3 * first


@pytest.mark.parametrize("head_dim", [4, 32, 64, 128, 80, 96])
def test_kv_rotation_is_orthogonal(head_dim):
    """The KV rotation must be orthogonal (R R^T = I), or rotating q, K and V and rotating the
    attention output back would change what attention computes; undo inverts apply."""
    r = kv_rotation(head_dim)
    dense = r.dense
    assert torch.allclose(dense @ dense.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-6)  # fp32 QR
    if head_dim & (head_dim - 1) == 0:  # Hadamard: ±(a power of two) entries, exact in every dtype
        m = r.matrix.abs()
        assert (m == m[0, 0]).all() and math.log2(m[0, 0].item()).is_integer() and r.scale in (1, 0.5**0.5)
        assert torch.equal(kv_rotation(head_dim, torch.bfloat16).matrix.float(), r.matrix)
        h = hadamard(head_dim)
        assert torch.equal(h @ h.T, head_dim * torch.eye(head_dim))  # so R = H / sqrt(n) is exact
    assert torch.equal(kv_rotation(head_dim).matrix, r.matrix), "the rotation must not depend on the run"
    x = torch.randn(3, 2, 5, head_dim)
    assert torch.allclose(r.undo(r.apply(x)), x, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("masked", [False, True])
def test_rotated_attention_equals_unrotated(head_dim, masked):
    """What the engine does with a compressed KV cache, without the quantisation: attention over
    rotated q, K and V, its output rotated back, equals plain attention (fp32, grouped-query
    heads, with and without a padding mask)."""
    torch.manual_seed(0)
    b, heads, kv_heads, q_len, k_len = 3, 6, 2, 4, 9
    q = torch.randn(b, heads, q_len, head_dim)
    k, v = torch.randn(b, kv_heads, k_len, head_dim), torch.randn(b, kv_heads, k_len, head_dim)
    mask = attention_mask(torch.tensor([0, 2, 3]), k_len - q_len, q_len, k_len) if masked else None
    scale = head_dim ** -0.5
    r = kv_rotation(head_dim)
    plain = attend(q, k, v, mask, scale)
    rotated = r.undo(attend(r.apply(q), r.apply(k), r.apply(v), mask, scale))
    assert (rotated - plain).abs().max().item() <= 1e-5


def test_rotation_reduces_quantisation_error_with_an_outlier_channel():
    """The reason for the rotation: with group 64 = one head, a channel of K 20x larger than the
    rest sets every group's scale, and 4-bit codes lose the other 63 channels; rotated, the
    outlier is spread over all channels and the round-trip error (in the original basis) falls
    by more than 4x (6.6x here). Without an outlier the rotation costs little."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 50, 64)  # (batch, kv_heads, tokens, head_dim)
    x[..., 7] *= 20
    r = kv_rotation(64)

    def mse(t: torch.Tensor, rotate: bool) -> float:
        back = r.undo(dequantize(quantize(r.apply(t), 4, 64))) if rotate else dequantize(quantize(t, 4, 64))
        return (back - t).pow(2).mean().item()

    assert mse(x, rotate=True) * 4 < mse(x, rotate=False)
    y = torch.randn(4, 3, 50, 64)
    assert mse(y, rotate=True) < 1.5 * mse(y, rotate=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_torch():
    """On a GPU, dequantize dispatches to the fused Triton kernel; it must agree with the torch path."""
    from corpusgen.engine import compression

    if compression.triton is None:
        pytest.skip("triton not importable")
    compression._selfcheck_triton("cuda")
    x = torch.randn(4, 8, 33, 128, device="cuda", dtype=torch.float16)
    assert torch.equal(dequantize(quantize(x)).cpu(), dequantize(quantize(x.cpu())))
