"""Decode attention on CUDA: our split-KV Triton kernel against PyTorch's SDPA, per call.

    python benchmarks/decode_attention.py [--iters 200] [--packed]

Shapes are the engine's: one query per row against a narrowed (strided) fp16 cache, with and
without the padding mask, for OPT-6.7B (128 rows x 32 heads x 128), OPT-30B (56 heads) and a small
OPT-1.3B batch (32 heads x 64). The kernel takes multi-head caches only; grouped-query caches stay
on SDPA (docs/benchmarks.md#measurements-behind-engine-defaults). For each: GPU time per
call (CUDA events over ``--iters`` back-to-back calls), the KV bytes it reads and the bandwidth
that implies, the host time per call (how long Python takes to launch it), and the largest
difference from a float64 reference.

``--packed`` instead times the 4-bit kernels at OPT-30B's offloaded decode shape (64 rows x 56
heads x 544 columns, seq-major as loaded from the host): ``packed_decode_attention`` over its
tile/warp grid, dequantise-then-attend for comparison, and ``kernels.dequantize.dequant4`` on
the model's weight matrices and that KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from corpusgen.engine.kernels import decode_attention as da
from corpusgen.engine.kernels import packed_attention as pa
from corpusgen.engine.kernels.dequantize import dequant4

SHAPES = {  # name: (rows, heads, kv_heads, k_len, head_dim)
    "opt-6.7b 128 rows": (128, 32, 32, 515, 128),
    "opt-6.7b 128 rows, 1024 cols": (128, 32, 32, 1024, 128),
    "opt-30b 64 rows": (64, 56, 56, 543, 128),
    "opt-1.3b 16 rows": (16, 32, 32, 300, 64),
}


def timed(fn, iters: int) -> tuple[float, float]:
    """(GPU ms per call, host ms per call)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, host


def packed(iters: int, out: Path) -> None:
    """The 4-bit kernels at OPT-30B's offloaded decode shape (see the module's docstring)."""
    from corpusgen.engine import compression as cq

    print("packed self-check: max abs error vs float64", max(pa.packed_selfcheck().values()))
    dev, dt = "cuda", torch.float16
    b, h, n, d, gs = 64, 56, 544, 128, 64
    kp, vp = (cq.quantize(torch.randn(n + 64, b, h, d, device=dev, dtype=dt), 4, gs) for _ in range(2))
    k, v = (pa.packed_view(cq.narrow(p, 0, 0, n), 0) for p in (kp, vp))
    q = torch.randn(b, h, 1, d, device=dev, dtype=dt)
    tail = [torch.randn(b, h, 1, d, device=dev, dtype=dt) for _ in range(2)]
    mask = torch.ones(b, n + 1, dtype=torch.bool, device=dev)
    mask[:, 1:40] = False
    nbytes = sum(t.numel() * t.element_size() for kv in (k, v) for t in kv)
    rec = dict(shape=f"opt-30b {b} rows x {h} heads x {n} cols, 4-bit g{gs}", kv_bytes=nbytes,
               device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for bt in (16, 32, 64, 128):
        for nw in (2, 4, 8):
            ms, _ = timed(lambda: pa.packed_decode_attention(q, k, v, mask, d ** -0.5, *tail, block_t=bt, num_warps=nw), iters)
            rec[f"packed_bt{bt}_w{nw}_ms"] = round(ms, 4)
            print(f"packed attention, {bt}-column tiles on {nw} warps: {ms:.3f} ms ({nbytes / ms / 1e6:.0f} GB/s)")
    dk, dv = (torch.empty(n, b, h, d, device=dev, dtype=dt) for _ in range(2))

    def dequant_then_attend():
        cq.dequantize(cq.narrow(kp, 0, 0, n), dk)
        cq.dequantize(cq.narrow(vp, 0, 0, n), dv)
        return da.decode_attention(q, dk.permute(1, 2, 0, 3), dv.permute(1, 2, 0, 3), None, d ** -0.5)

    rec["dequant_then_attend_ms"] = round(timed(dequant_then_attend, iters)[0], 4)
    print(f"dequantise K and V, then attend: {rec['dequant_then_attend_ms']:.3f} ms")
    for name, shape in (("fc1", (4 * 7168, 7168)), ("fc2", (7168, 4 * 7168)), ("q", (7168, 7168)), ("kv", (n, b, h, d))):
        p = cq.quantize(torch.randn(shape, device=dev, dtype=dt), 4, gs)
        dst = torch.empty(shape, device=dev, dtype=dt)
        ms, _ = timed(lambda: dequant4(*p.buffers, p.group_size, dst), iters)
        moved = dst.numel() * 2.5 + p.mins.numel() * 4  # fp16 out, 4-bit in, fp16 mins and scales
        rec[f"dequant_{name}_ms"] = round(ms, 4)
        print(f"dequantise {name} {tuple(shape)}: {ms:.3f} ms ({moved / ms / 1e6:.0f} GB/s)")
    with open(out / "decode_attention_packed.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--packed", action="store_true", help="the 4-bit kernels instead (see above)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    if args.packed:
        return packed(args.iters, out)
    print("self-check (max abs error vs float64):", json.dumps(da.selfcheck()))
    dev, dt = "cuda", torch.float16
    rows = []
    print(f"{'shape':<30} {'mask':<5} {'ours ms':>8} {'GB/s':>6} {'host ms':>8} {'sdpa ms':>8} {'GB/s':>6} "
          f"{'host ms':>8} {'speedup':>7} {'max err':>8}")
    for name, (b, h, kvh, t, d) in SHAPES.items():
        q = torch.randn(b, h, 1, d, device=dev, dtype=dt)
        kc = torch.randn(b, kvh, t + 64, d, device=dev, dtype=dt)
        vc = torch.randn(b, kvh, t + 64, d, device=dev, dtype=dt)
        k, v = kc[:, :, :t], vc[:, :, :t]
        pad = torch.randint(0, t // 3, (b,), device=dev)
        cols = torch.arange(t, device=dev)
        mask = ((cols[None, :] < 1) | (cols[None, :] >= 1 + pad[:, None])).reshape(b, 1, 1, t)
        kv_bytes = 2 * k.numel() * k.element_size()
        for m in (None, mask):
            ours = lambda: da.decode_attention(q, k, v, m, d ** -0.5)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=d ** -0.5, enable_gqa=h != kvh)
            err = (ours().double() - da.reference(q, k, v, m, d ** -0.5)).abs().max().item()
            g_ours, h_ours = timed(ours, args.iters)
            for bt, nw in ((32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (32, 2)):
                g, _ = timed(lambda: da.decode_attention(q, k, v, m, d ** -0.5, block_t=bt, num_warps=nw), args.iters)
                print(f"    block_t {bt} warps {nw}: {g:.4f} ms ({kv_bytes / g / 1e6:.0f} GB/s)")
            g_sdpa, h_sdpa = timed(sdpa, args.iters)
            rec = dict(shape=name, rows=b, heads=h, kv_heads=kvh, k_len=t, head_dim=d, mask=m is not None,
                       ours_ms=round(g_ours, 4), ours_gbs=round(kv_bytes / g_ours / 1e6, 1), ours_host_ms=round(h_ours, 4),
                       sdpa_ms=round(g_sdpa, 4), sdpa_gbs=round(kv_bytes / g_sdpa / 1e6, 1), sdpa_host_ms=round(h_sdpa, 4),
                       max_err=err, device=torch.cuda.get_device_name(), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            rows.append(rec)
            print(f"{name:<30} {str(m is not None):<5} {g_ours:>8.4f} {rec['ours_gbs']:>6.0f} {h_ours:>8.4f} "
                  f"{g_sdpa:>8.4f} {rec['sdpa_gbs']:>6.0f} {h_sdpa:>8.4f} {g_sdpa / g_ours:>6.2f}x {err:>8.1e}")
    with open(out / "decode_attention.jsonl", "a") as f:
        for rec in rows:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
