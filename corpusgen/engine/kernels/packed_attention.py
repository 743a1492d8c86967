"""Decode attention straight from a 4-bit KV cache (Triton): the split-KV kernel of
decode_attention.py reading packed tiles and dequantising them in registers, so the cache is read
once at its packed size instead of dequantised whole first (four times its bytes written and read).

A column's ``head_dim / 2`` bytes are a (groups x bytes per group) tile whose mins and scales load
once per group; the step's own column can come dense (``tail_k``/``tail_v``: the new token's K/V as
the cache will hold them). The reference is dequantise-then-attend (``packed_selfcheck``; in CI,
tests/test_kernels.py under the interpreter).
"""

from __future__ import annotations

import torch

from corpusgen.engine.kernels import tl, triton
from corpusgen.engine.kernels import decode_attention as da
from corpusgen.engine.shapes import packed_fits

if triton is not None:

    @triton.jit(do_not_specialize=("sm_b", "n_packed", "heads", "split_len", "n_splits"))
    def _mha_packed_kernel(q_ptr, kd_ptr, km_ptr, ks_ptr, vd_ptr, vm_ptr, vs_ptr, tk_ptr, tv_ptr, mask_ptr,
                           o_ptr, m_ptr, l_ptr,
                           sq_b, sq_h, sd_b, sd_h, sd_t, sg_b, sg_h, sg_t, st_b, st_h, sm_b,
                           n_packed, heads, split_len, n_splits, scale,
                           G: tl.constexpr, GS2: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr,
                           DIRECT: tl.constexpr, HAS_TAIL: tl.constexpr):  # fmt: skip
        # _mha_kernel over a 4-bit cache. A column's D / 2 bytes are handled as a (G groups, GS2
        # bytes) tile: byte i holds elements 2i (low nibble) and 2i + 1, both in group i // GS2, so
        # q and the output are even and odd halves of that shape, and a tile of BLOCK_T columns is
        # (BLOCK_T, G, GS2) codes against (BLOCK_T, G, 1) mins and scales, which broadcast: one
        # load per group, not per element. Each code is dequantised to the model dtype and back,
        # as compression.dequantize stores it.
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        gi = tl.arange(0, G)
        i = gi[:, None] * GS2 + tl.arange(0, GS2)[None, :]  # (G, GS2): byte index in the column
        q_row = q_ptr + b * sq_b + h * sq_h
        qe = tl.load(q_row + 2 * i).to(tl.float32) * scale
        qo = tl.load(q_row + 2 * i + 1).to(tl.float32) * scale
        m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc_e = tl.zeros([G, GS2], tl.float32)
        acc_o = tl.zeros([G, GS2], tl.float32)
        start = sp * split_len
        stop = start + split_len
        d_off = b.to(tl.int64) * sd_b + h * sd_h  # K and V buffers share strides
        g_off = b.to(tl.int64) * sg_b + h * sg_h
        for it in range(0, split_len, BLOCK_T):
            t = start + it + tl.arange(0, BLOCK_T)
            live = (t < stop) & (t < n_packed)
            if HAS_MASK:
                live = live & (tl.load(mask_ptr + b * sm_b + t, mask=live, other=0) != 0)
            t64 = t.to(tl.int64)
            live3 = live[:, None, None]
            dp = d_off + t64[:, None, None] * sd_t + i[None, :, :]  # (BLOCK_T, G, GS2)
            gp = g_off + t64[:, None, None] * sg_t + gi[None, :, None]  # (BLOCK_T, G, 1)
            kb = tl.load(kd_ptr + dp, mask=live3, other=0).to(tl.int32)
            ksc = tl.load(ks_ptr + gp, mask=live3, other=0.0).to(tl.float32)
            kmn = tl.load(km_ptr + gp, mask=live3, other=0.0).to(tl.float32)
            ke = ((kb & 15).to(tl.float32) * ksc + kmn).to(q_ptr.dtype.element_ty).to(tl.float32)
            ko = ((kb >> 4).to(tl.float32) * ksc + kmn).to(q_ptr.dtype.element_ty).to(tl.float32)
            s = tl.sum(tl.sum(qe[None, :, :] * ke + qo[None, :, :] * ko, axis=2), axis=1)
            s = tl.where(live, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            vb = tl.load(vd_ptr + dp, mask=live3, other=0).to(tl.int32)
            vsc = tl.load(vs_ptr + gp, mask=live3, other=0.0).to(tl.float32)
            vmn = tl.load(vm_ptr + gp, mask=live3, other=0.0).to(tl.float32)
            ve = ((vb & 15).to(tl.float32) * vsc + vmn).to(q_ptr.dtype.element_ty).to(tl.float32)
            vo = ((vb >> 4).to(tl.float32) * vsc + vmn).to(q_ptr.dtype.element_ty).to(tl.float32)
            p3 = p[:, None, None]
            acc_e = acc_e * alpha + tl.sum(p3 * ve, axis=0)
            acc_o = acc_o * alpha + tl.sum(p3 * vo, axis=0)
            m_i = m_new
        if HAS_TAIL:
            # This step's own K/V column (dense, always visible), attended by the last split only.
            tk = tk_ptr + b.to(tl.int64) * st_b + h * st_h
            tv = tv_ptr + b.to(tl.int64) * st_b + h * st_h
            s_t = tl.sum(tl.sum(qe * tl.load(tk + 2 * i).to(tl.float32) + qo * tl.load(tk + 2 * i + 1).to(tl.float32),
                                axis=1), axis=0)
            s_t = tl.where(sp == n_splits - 1, s_t, float("-inf"))
            m_new = tl.maximum(m_i, s_t)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p_t = tl.exp(s_t - m_use)
            l_i = l_i * alpha + p_t
            acc_e = acc_e * alpha + p_t * tl.load(tv + 2 * i).to(tl.float32)
            acc_o = acc_o * alpha + p_t * tl.load(tv + 2 * i + 1).to(tl.float32)
            m_i = m_new
        row = bh.to(tl.int64)
        if DIRECT:
            tl.store(o_ptr + row * (2 * G * GS2) + 2 * i, (acc_e / l_i).to(o_ptr.dtype.element_ty))
            tl.store(o_ptr + row * (2 * G * GS2) + 2 * i + 1, (acc_o / l_i).to(o_ptr.dtype.element_ty))
        else:
            base = (row * n_splits + sp) * (2 * G * GS2)
            tl.store(o_ptr + base + 2 * i, acc_e)
            tl.store(o_ptr + base + 2 * i + 1, acc_o)
            tl.store(m_ptr + row * n_splits + sp, m_i)
            tl.store(l_ptr + row * n_splits + sp, l_i)


def packed_usable(cfg, device: torch.device, dtype: torch.dtype, compress) -> bool:
    """Whether decode steps of model ``cfg`` attend straight from its 4-bit cache: ``packed_fits``,
    on CUDA with triton, in fp16/bf16."""
    return (triton is not None and device.type == "cuda"
            and dtype in (torch.float16, torch.bfloat16) and packed_fits(cfg, compress))


def packed_decode_attention(q: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float,
                            tail_k: torch.Tensor | None = None, tail_v: torch.Tensor | None = None,
                            block_t: int = 16, num_warps: int = 2) -> torch.Tensor:
    """``decode_attention`` over a 4-bit cache, dequantised tile by tile in registers: the cache
    is read once, at a quarter of fp16's bytes, and no dequantised copy of it is ever written.

    q (batch, heads, 1, D). ``k``, ``v``: (data, mins, scales) of a ``compression.Packed`` grouped
    on head_dim, each viewed as (batch, heads, n, ·) with any strides (a seq-major host cache
    loaded to the GPU: ``buffer.permute(1, 2, 0, 3)``); K and V share strides. ``tail_k``,
    ``tail_v`` (batch, heads, t, D) dense, t = 1: this step's own column, attended after the n
    packed ones and always visible. ``mask`` (batch, n) or (batch, 1, 1, n [+ t]) bool over the
    packed columns, True = visible, or None. Returns (batch, heads, 1, D) in q's dtype.
    """
    assert triton is not None, "triton is not available"
    b, heads, one, d = q.shape
    kd, km, ks = k
    vd, vm, vs = v
    n = kd.shape[2]
    group = d // km.shape[3]
    assert one == 1 and kd.shape == (b, heads, n, d // 2) and km.shape == ks.shape == (b, heads, n, d // group), \
        (q.shape, kd.shape, km.shape)
    assert vd.stride() == kd.stride() and vm.stride() == km.stride() == ks.stride() == vs.stride(), "K/V strides"
    assert kd.stride(-1) == 1 and km.stride(-1) == 1, "packed buffers need a contiguous last dim"
    has_tail = tail_k is not None
    if has_tail:
        assert tail_k.shape == tail_v.shape == (b, heads, 1, d), (tail_k.shape, tail_v.shape)
        if tail_k.stride(-1) != 1 or tail_k.stride() != tail_v.stride():
            tail_k, tail_v = tail_k.contiguous(), tail_v.contiguous()
        tk, tv, st_b, st_h = tail_k, tail_v, tail_k.stride(0), tail_k.stride(1)
    else:
        tk = tv = q
        st_b = st_h = 0
    if q.stride(-1) != 1:
        q = q.contiguous()
    split_len, n_splits = da.plan_splits(b, heads, max(n, 1), block_t, da.sm_programs(q.device))
    has_mask = mask is not None
    out, mask_arg, sm_b, acc, m, l_s = da.launch_buffers(q, mask.reshape(b, -1)[:, :n] if has_mask else None, n_splits)
    direct = n_splits == 1
    _mha_packed_kernel[(b * heads, n_splits)](
        q, kd, km, ks, vd, vm, vs, tk, tv, mask_arg, acc, m, l_s,
        q.stride(0), q.stride(1), kd.stride(0), kd.stride(1), kd.stride(2), km.stride(0), km.stride(1), km.stride(2),
        st_b, st_h, sm_b, n, heads, split_len, n_splits, scale,
        G=d // group, GS2=group // 2, BLOCK_T=block_t, HAS_MASK=has_mask, DIRECT=direct, HAS_TAIL=has_tail,
        num_warps=num_warps)  # fmt: skip
    if not direct:
        da.combine_kernel[(b * heads,)](acc, m, l_s, out, n_splits, D=d, S_P=da.MAX_SPLITS)
    return out


def packed_view(p, seq_dim: int):
    """(data, mins, scales) of Packed ``p`` (a K/V cache grouped on its last dim) viewed as
    (batch, heads, seq, ·): ``seq_dim`` 0 for a seq-major host layout, 2 for the GPU's."""
    if seq_dim == 2:
        return p.buffers
    return tuple(t.permute(1, 2, 0, 3) for t in p.buffers)


def packed_warm_up(device, dtype: torch.dtype, cfg, compress) -> None:
    """Compile the packed kernel's variants (mask or not, tail or not, one split or several) for
    model ``cfg`` with KV compression ``compress``; no-op when ``packed_usable`` does not hold."""
    if not packed_usable(cfg, device, dtype, compress):
        return
    from corpusgen.engine import compression as cq

    d = cfg.head_dim
    for n in (8, 4096):
        q = torch.zeros(1, 1, 1, d, device=device, dtype=dtype)
        kv = packed_view(cq.quantize(torch.zeros(1, 1, n, d, device=device, dtype=dtype), 4, compress.group_size), 2)
        for mask in (None, torch.ones(1, n + 1, dtype=torch.bool, device=device)):
            for tail in ((None, None), (q, q)):
                packed_decode_attention(q, kv, kv, mask, 1.0, *tail)


def packed_selfcheck(device: str = "cuda", seed: int = 0) -> dict[str, float]:
    """Compare ``packed_decode_attention`` with dequantise-then-float64-attention on odd shapes
    (seq-major and batch-major caches, masks, a tail column, one split and many); raises on a
    mismatch. Returns the largest absolute error per case."""
    from corpusgen.engine import compression as cq

    assert triton is not None, "triton is not available"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    report: dict[str, float] = {}
    for b, heads, n, d, gs in [(3, 4, 17, 64, 64), (2, 9, 130, 128, 64), (1, 32, 515, 128, 64), (16, 8, 1000, 128, 32),
                               (5, 8, 1, 64, 16), (1, 2, 4000, 256, 64)]:  # fmt: skip
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.randn(b, heads, 1, d, generator=gen).to(device, dtype)
            for seq_major in (True, False):
                shape = (n + 5, b, heads, d) if seq_major else (b, heads, n + 5, d)
                kx, vx = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
                kp, vp = cq.quantize(kx, 4, gs), cq.quantize(vx, 4, gs)
                seq_dim = 0 if seq_major else 2
                kv = [packed_view(cq.narrow(p, seq_dim, 0, n), seq_dim) for p in (kp, vp)]
                dense = [cq.dequantize(cq.narrow(p, seq_dim, 0, n)) for p in (kp, vp)]
                if seq_major:
                    dense = [t.permute(1, 2, 0, 3) for t in dense]
                tail = [torch.randn(b, heads, 1, d, generator=gen).to(device, dtype) for _ in range(2)]
                mask = torch.ones(b, n + 1, dtype=torch.bool)
                for row in range(b):
                    pad = int(torch.randint(0, max(1, n // 2), (1,), generator=gen))
                    mask[row, min(1, n - 1):min(1, n - 1) + pad] = False
                mask = mask.to(device)
                for m in (None, mask):
                    for with_tail in (False, True):
                        kk = torch.cat([dense[0], tail[0]], 2) if with_tail else dense[0]
                        vv = torch.cat([dense[1], tail[1]], 2) if with_tail else dense[1]
                        mm = None if m is None else (m if with_tail else m[:, :n])
                        ref = da.reference(q, kk, vv, mm, d ** -0.5)
                        got = packed_decode_attention(q, kv[0], kv[1], mm, d ** -0.5,
                                                      *(tail if with_tail else (None, None)))
                        err = (got.double() - ref).abs().max().item()
                        tol = 4 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
                        case = (b, heads, n, d, gs, dtype, seq_major, m is not None, with_tail)
                        assert not got.isnan().any() and err <= tol, (case, err, tol)
                        report[" ".join(map(str, case))] = err
    return report
