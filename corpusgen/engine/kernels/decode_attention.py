"""Split-KV decode attention on CUDA: one query token per row against a long KV cache (Triton).

Why: in decode, attention reads the whole KV cache once per step and does almost no arithmetic,
so it should run at HBM bandwidth. PyTorch's flash kernel tiles queries by 128 rows: with one query
it does 128x the tensor-core work needed, and inside a running engine it falls well short of the
bandwidth it reaches in isolation. Splitting the cache's columns instead keeps the GPU reading at
HBM speed (docs/benchmarks.md#measurements-behind-engine-defaults).

How (FlashDecoding): the grid is (batch x heads, splits). A program owns one row, one head and one
contiguous span of columns; it streams K and V tiles, keeps a running max, sum and fp32 accumulator (online softmax),
and writes a partial result. A second kernel combines the splits with their maxima. Splits exist so
that small batches still fill the GPU; with many rows a single split writes the output directly.

Masking: ``mask`` (batch, k_len) bool, True where a key is visible (the engine's padding mask for
one query), or None. Every row must see at least one key (in decode its own).

Multi-head caches only (OPT: one query head per KV head); grouped-query caches stay on SDPA. A
grouped variant (a group's heads as the rows of a tensor-core tile) gains nothing over SDPA's
``enable_gqa`` on large caches and loses to Triton's launch cost on small ones
(docs/benchmarks.md#measurements-behind-engine-defaults).

Numerics: scores, softmax and the weighted sum accumulate in fp32 from fp16/bf16 inputs, like the
fused kernels; results differ from SDPA's by rounding only (checked in
``selfcheck`` against a float64 reference). ``TRITON_INTERPRET=1`` runs the kernels on the CPU
(tests/test_kernels.py, in CI; with numpy 2 the interpreter needs triton >= 3.7, whose
``tensor.__index__`` takes one-element arrays).

The 4-bit variant, which reads a packed cache in place, is packed_attention.py; it shares this
module's launch plan, buffers and combine kernel.
"""

from __future__ import annotations

import functools
import math

import torch

from corpusgen.engine.kernels import tl, triton


MIN_KV_ELEMENTS = 1 << 24
"""K elements from which the engine routes a single-query call here. Below it the call is short and
Triton's launch costs more host time than it saves; PyTorch's SDPA is used."""


def usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``attend`` routes this call here: one query per row, fp16/bf16, CUDA, a multi-head
    cache of at least ``MIN_KV_ELEMENTS``."""
    return (triton is not None and q.shape[2] == 1 and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[-1] in (64, 128, 256) and q.shape[1] == k.shape[1] and k.numel() >= MIN_KV_ELEMENTS)


_RUNTIME = ("sm_b", "k_len", "heads", "split_len", "n_splits")
"""Integer arguments Triton must not specialise on (divisibility by 16, == 1): they change every
decode step, and each new specialisation is a JIT compile that stalls the step. Strides stay
specialised: they are multiples of 16 (head_dim is), and unspecialised ones lose the vectorised
loads."""

if triton is not None:

    @triton.jit(do_not_specialize=_RUNTIME)
    def _mha_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr, klen_ptr,
                    sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b,
                    k_len, heads, split_len, n_splits, scale,
                    D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr, DIRECT: tl.constexpr,
                    KLEN_DEV: tl.constexpr):  # fmt: skip
        # One (row, head) and one span of columns; scores are row sums of q * K on CUDA cores.
        if KLEN_DEV:  # the live length from the device (CUDA graphs); k_len is the capacity
            k_len = tl.minimum(tl.load(klen_ptr), k_len)
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale
        m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)  # fp32 scalars
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc = tl.zeros([D], tl.float32)
        start = sp * split_len
        stop = start + split_len  # split_len is whole tiles; the last split is cut by k_len
        k_base = k_ptr + b.to(tl.int64) * sk_b + h * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + h * sv_h
        for i in range(0, split_len, BLOCK_T):
            t = start + i + tl.arange(0, BLOCK_T)
            live = (t < stop) & (t < k_len)
            if HAS_MASK:
                live = live & (tl.load(mask_ptr + b * sm_b + t, mask=live, other=0) != 0)
            kt = tl.load(k_base + t[:, None] * sk_t + d[None, :], mask=live[:, None], other=0.0)
            s = tl.sum(q[None, :] * kt.to(tl.float32), axis=1)
            s = tl.where(live, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked tile: no NaN
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            vt = tl.load(v_base + t[:, None] * sv_t + d[None, :], mask=live[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            m_i = m_new
        row = bh.to(tl.int64)  # flat (b, head) index
        if DIRECT:
            tl.store(o_ptr + row * D + d, (acc / l_i).to(o_ptr.dtype.element_ty))
        else:
            tl.store(o_ptr + (row * n_splits + sp) * D + d, acc)
            tl.store(m_ptr + row * n_splits + sp, m_i)
            tl.store(l_ptr + row * n_splits + sp, l_i)

    @triton.jit(do_not_specialize=("n_splits",))
    def combine_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, n_splits,
                        D: tl.constexpr, S_P: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, S_P)
        d = tl.arange(0, D)
        live = s < n_splits
        m = tl.load(m_ptr + row * n_splits + s, mask=live, other=float("-inf"))
        l_s = tl.load(l_ptr + row * n_splits + s, mask=live, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(live & (m > float("-inf")), tl.exp(m - m_max), 0.0)
        acc = tl.load(acc_ptr + (row * n_splits + s[:, None]) * D + d[None, :], mask=live[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
        tl.store(o_ptr + row * D + d, out.to(o_ptr.dtype.element_ty))


MAX_SPLITS = 16
"""Splits per row and head: the combine kernel reads them as one tile of this size (one compiled
variant whatever the batch)."""


def plan_splits(batch: int, heads: int, k_len: int, block_t: int, programs: int) -> tuple[int, int]:
    """(split_len, n_splits): enough programs to fill the GPU, whole tiles per split."""
    tiles = max(1, math.ceil(k_len / block_t))
    splits = max(1, min(tiles, MAX_SPLITS, math.ceil(programs / max(1, batch * heads))))
    split_len = math.ceil(tiles / splits) * block_t
    return split_len, math.ceil(k_len / split_len)


@functools.lru_cache(maxsize=None)
def sm_programs(device: torch.device) -> int:
    """Programs that fill the GPU: four per SM."""
    return 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2)


def launch_buffers(q: torch.Tensor, mask: torch.Tensor | None, n_splits: int):
    """The split-KV kernels' output (b, heads, 1, d), mask argument and its row stride, and the
    per-split partials (acc, running max, running sum) — the output itself when there is one split."""
    b, heads, _, d = q.shape
    out = torch.empty((b, heads, 1, d), dtype=q.dtype, device=q.device)
    if mask is not None:
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_arg, sm_b = mask.view(torch.uint8), mask.stride(0)
    else:
        mask_arg, sm_b = q, 0  # never read
    if n_splits == 1:
        return out, mask_arg, sm_b, out, out, out
    acc = torch.empty((b * heads, n_splits, d), dtype=torch.float32, device=q.device)
    m = torch.empty((b * heads, n_splits), dtype=torch.float32, device=q.device)
    return out, mask_arg, sm_b, acc, m, torch.empty_like(m)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, block_t: int | None = None, num_warps: int = 2,
                     num_stages: int | None = None, programs: int | None = None,
                     klen: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one query per row, over a multi-head cache.

    q (batch, heads, 1, D); k, v (batch, heads, k_len, D), any strides with a contiguous last dim
    (a narrowed cache is fine); mask (batch, 1, 1, k_len) or (batch, k_len) bool, True = visible,
    or None. ``klen``: a one-element int32 CUDA tensor, the keys to attend (the first ``klen`` of
    the k_len columns), read by the kernel, so that the launch is the same at every step (CUDA
    graphs, decode_graph.py); the splits then follow k_len. ``block_t`` (columns per tile),
    ``num_warps``, ``num_stages`` (Triton's default when None) and ``programs`` (how many the
    splits aim to fill) are tuning knobs for the benchmark. Returns (batch, heads, 1, D) in q's dtype.
    """
    assert triton is not None, "triton is not available"
    b, heads, one, d = q.shape
    k_len = k.shape[2]
    assert one == 1 and k.shape == v.shape == (b, heads, k_len, d), (q.shape, k.shape, v.shape)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    # Tiles of 8192 // d columns (64 at head_dim 128) on 2 warps: the fastest point of the tile, warp
    # and stage sweep at OPT-6.7B's decode shape (benchmarks/offload_micro.py); stages do not matter.
    block_t = block_t or 8192 // d
    split_len, n_splits = plan_splits(b, heads, k_len, block_t, programs or sm_programs(q.device))
    has_mask = mask is not None
    out, mask_arg, sm_b, acc, m, l_s = launch_buffers(q, mask.reshape(b, k_len) if has_mask else None, n_splits)
    direct = n_splits == 1
    _mha_kernel[(b * heads, n_splits)](
        q, k, v, mask_arg, acc, m, l_s, klen if klen is not None else q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), sm_b,
        k_len, heads, split_len, n_splits, scale,
        D=d, BLOCK_T=block_t, HAS_MASK=has_mask, DIRECT=direct, KLEN_DEV=klen is not None, num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}))  # fmt: skip
    if not direct:
        combine_kernel[(b * heads,)](acc, m, l_s, out, n_splits, D=d, S_P=MAX_SPLITS)
    return out


def warm_up(device, dtype: torch.dtype, cfg) -> None:
    """Compile every variant the engine can launch for model ``cfg`` in ``dtype`` (with and without
    a mask, one split and several): the integer arguments are not specialised (``_RUNTIME``), so
    these are all the compiles a run needs. No-op when ``usable`` can never hold for the model."""
    d = cfg.head_dim
    if (triton is None or cfg.num_heads != cfg.num_kv_heads or d not in (64, 128, 256)
            or dtype not in (torch.float16, torch.bfloat16)):
        return
    for k_len in (8, 4096):  # one split (a tile), several (a long cache, one row)
        q = torch.zeros(1, 1, 1, d, device=device, dtype=dtype)
        k = torch.zeros(1, 1, k_len, d, device=device, dtype=dtype)
        klen = torch.full((1,), k_len, dtype=torch.int32, device=device)
        for mask in (None, torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=device)):
            decode_attention(q, k, k, mask, 1.0)
            decode_attention(q, k, k, mask, 1.0, klen=klen)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """The same attention in float64 with torch ops (for checks)."""
    b, heads, _, d = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    qg = q.double().reshape(b, kv_heads, heads // kv_heads, d)
    s = torch.matmul(qg, k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask.reshape(b, 1, 1, k_len), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.double()).reshape(b, heads, 1, d)


def selfcheck(device: str = "cuda", seed: int = 0) -> dict[str, float]:
    """Compare the kernel with a float64 reference on odd shapes; raises on a mismatch.

    Cases: odd head sizes and counts, padded rows (masked columns inside and at the start),
    strided (narrowed) caches, one tile to ``MAX_SPLITS`` splits.
    Returns the largest absolute error per case (a few fp16 ulps of the output).
    """
    assert triton is not None, "triton is not available"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cases = [(3, 4, 17, 64), (2, 9, 130, 64), (5, 8, 1, 128), (1, 32, 515, 128), (4, 12, 300, 64),
             (16, 32, 1000, 128), (2, 6, 64, 64), (1, 2, 5000, 256)]  # fmt: skip
    report: dict[str, float] = {}
    for b, heads, k_len, d in cases:
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.randn(b, heads, 1, d, generator=gen).to(device, dtype)
            cache_k = torch.randn(b, heads, k_len + 7, d, generator=gen).to(device, dtype)
            cache_v = torch.randn(b, heads, k_len + 7, d, generator=gen).to(device, dtype)
            k, v = cache_k[:, :, :k_len], cache_v[:, :, :k_len]  # strided, like the engine's caches
            mask = torch.ones(b, 1, 1, k_len, dtype=torch.bool)
            for row in range(b):  # left padding behind a short "prefix", as the engine lays it out
                pad = int(torch.randint(0, max(1, k_len // 2), (1,), generator=gen))
                mask[row, ..., min(2, k_len - 1):min(2, k_len - 1) + pad] = False
            mask = mask.to(device)
            for m in (None, mask):
                got = decode_attention(q, k, v, m, d ** -0.5)
                ref = reference(q, k, v, m, d ** -0.5)
                err = (got.double() - ref).abs().max().item()
                tol = 4 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
                assert not got.isnan().any() and err <= tol, ((b, heads, k_len, d), dtype, err, tol)
                report[f"b{b} h{heads} t{k_len} d{d} {str(dtype)[6:]}{' mask' if m is not None else ''}"] = err
                # The live length from the device over the whole buffer (CUDA graphs): the same result.
                klen = torch.full((1,), k_len, dtype=torch.int32, device=device)
                full_m = None if m is None else torch.cat([m.reshape(b, k_len), m.new_zeros(b, 7)], 1)
                got = decode_attention(q, cache_k, cache_v, full_m, d ** -0.5, klen=klen)
                err = (got.double() - ref).abs().max().item()
                assert not got.isnan().any() and err <= tol, ("klen", (b, heads, k_len, d), dtype, err, tol)
    return report
