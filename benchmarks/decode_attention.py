"""Decode attention on CUDA: our split-KV Triton kernel against PyTorch's SDPA, per call.

    python benchmarks/decode_attention.py [--iters 200]

Shapes are the engine's: one query per row against a narrowed (strided) fp16 cache, with and
without the padding mask, for OPT-6.7B (128 rows x 32 heads x 128), OPT-30B (56 heads) and a small
OPT-1.3B batch (32 heads x 64). The kernel takes multi-head caches only; grouped-query caches stay
on SDPA (the grouped variant measured on 2026-11-22 is in benchmarks/results/…-s4-decode-attention-micro.jsonl). For each: GPU time per
call (CUDA events over ``--iters`` back-to-back calls), the KV bytes it reads and the bandwidth
that implies, the host time per call (how long Python takes to launch it), and the largest
difference from a float64 reference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from corpusgen.engine import decode_attention as da

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
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
