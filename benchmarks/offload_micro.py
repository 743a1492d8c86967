"""Micro-benchmarks behind the offloading engine's copies and CPU attention (CUDA machine).

    python benchmarks/offload_micro.py --out results.jsonl [--parts copy,decode,host2d,cpuattn,qkv]

* ``copy``: a prefill's K/V write into a GPU cache (OPT-6.7B, 128 x 512 tokens): ``copy_`` against
  ``kv_copy.tile_copy_``.
* ``decode``: the split-KV decode attention kernel over a sweep of tile, warps and stages at
  OPT-6.7B's decode shape, against PyTorch's SDPA.
* ``host2d``: a prefill's K into a batch-major pinned host cache (OPT-30B, 32 rows x 512 tokens):
  the engine's old path (``.to("cpu")`` then a host copy) against one ``cudaMemcpy2DAsync``.
* ``cpuattn``: one decode step's CPU attention over OPT-30B's cache (32 rows x 56 heads x 544 cols,
  bf16) at several thread counts, alone and while the host-to-GPU link streams weights.
* ``qkv``: OPT-6.7B's prefill projections as three GEMMs against one fused GEMM.
* ``linear``: OPT-6.7B's linears at decode and prefill sizes, weight as stored against transposed.
* ``mlp``: OPT-6.7B's prefill MLP (65,536 rows) whole against cut into row chunks, and fc1 / fc2
  alone over a sweep of row counts (cuBLAS picks its kernel by shape).

Each result is one JSON line; every equality check raises on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch
import torch.nn.functional as F

from corpusgen.engine.kernels import decode_attention as da
from corpusgen.engine.kernels import kv_copy
from corpusgen.engine.tiers import HostArena


def gpu_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def wall_ms(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def part_copy(emit) -> None:
    b, heads, s, d, cols = 128, 32, 512, 128, 576
    x = torch.randn(b, s, heads * d, device="cuda", dtype=torch.float16)
    src = x.view(b, s, heads, d).transpose(1, 2)
    cache = torch.empty(b, heads, cols, d, device="cuda", dtype=torch.float16)
    dst = cache[:, :, :s]
    ref = gpu_ms(lambda: dst.copy_(src))
    want = dst.clone()
    dst.zero_()
    res = {}
    for bt in (16, 32, 64):
        res[bt] = gpu_ms(lambda: kv_copy.tile_copy_(dst, src, block_t=bt))
        assert torch.equal(dst, want), "tile copy differs"
    nbytes = 2 * src.numel() * 2
    emit(part="copy", shape=[b, heads, s, d], copy_ms=ref, copy_gbs=nbytes / ref / 1e6,
         tile_ms=res, tile_gbs={k: nbytes / v / 1e6 for k, v in res.items()})


def part_decode(emit) -> None:
    b, heads, k_len, d, cols = 128, 32, 515, 128, 576
    q = torch.randn(b, heads, 1, d, device="cuda", dtype=torch.float16)
    kc = torch.randn(b, heads, cols, d, device="cuda", dtype=torch.float16)
    vc = torch.randn(b, heads, cols, d, device="cuda", dtype=torch.float16)
    k, v = kc[:, :, :k_len], vc[:, :, :k_len]
    scale = d ** -0.5
    nbytes = 2 * b * heads * k_len * d * 2
    ref = da.reference(q, k, v, None, scale)
    sdpa = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), 50)
    emit(part="decode", config="sdpa", ms=sdpa, gbs=nbytes / sdpa / 1e6)
    configs = [(bt, nw, ns, None) for bt in (32, 64, 128) for nw in (2, 4, 8) for ns in (1, 2, 3, 4)]
    configs += [(32, 1, None, None), (64, 1, None, None), (16, 1, None, None), (64, 2, None, 2 * b * heads),
                (64, 2, None, 4 * b * heads), (128, 2, None, 2 * b * heads), (32, 1, None, 2 * b * heads)]
    if os.environ.get("MICRO_DECODE_QUICK"):
        configs = configs[-8:]
    for bt, nw, ns, progs in configs:
        name = f"t{bt} w{nw} s{ns} p{progs}"
        try:
            f = lambda: da.decode_attention(q, k, v, None, scale, block_t=bt, num_warps=nw, num_stages=ns,  # noqa: E731
                                            programs=progs)
            err = (f().double() - ref).abs().max().item()
            assert err < 1e-2, err
            ms = gpu_ms(f, 50)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
            emit(part="decode", config=name, error=f"{type(e).__name__}: {e}"[:200])
            continue
        emit(part="decode", config=name, ms=ms, gbs=nbytes / ms / 1e6)


def part_host2d(emit) -> None:
    b, heads, s, d, cols = 32, 56, 512, 128, 576
    arena = HostArena()
    cache = arena.empty((b, heads, cols, d), torch.bfloat16)
    print("pinned", cache.is_pinned(), "cudart", kv_copy._cudart())
    x = torch.randn(b, s, heads * d, device="cuda", dtype=torch.bfloat16)
    src = x.view(b, s, heads, d).transpose(1, 2)
    dst = cache[:, :, :s]
    nbytes = src.numel() * 2

    def old():
        dst.copy_(src.to("cpu"))

    old_ms = wall_ms(old, 3)
    want = dst.clone()
    cache.zero_()
    stream = torch.cuda.Stream()
    stage = torch.empty(b, heads, s, d, device="cuda", dtype=torch.bfloat16)

    def new():
        kv_copy.tile_copy_(stage, src)
        ev = torch.cuda.Event()
        ev.record()
        stream.wait_event(ev)
        kv_copy.copy_to_host_2d(dst, stage, stream)
        stream.synchronize()

    assert kv_copy.host_2d_usable(dst, stage), "2-D copy not usable"
    new_ms = wall_ms(new, 5)
    assert torch.equal(dst, want), "2-D copy differs"
    emit(part="host2d", shape=[b, heads, s, d], old_ms=old_ms, old_gbs=nbytes / old_ms / 1e6,
         new_ms=new_ms, new_gbs=nbytes / new_ms / 1e6)


def part_cpuattn(emit) -> None:
    from corpusgen.engine import layers as L

    b, heads, k_len, d, cols = 32, 56, 544, 128, 576
    arena = HostArena()
    kc = arena.empty((b, heads, cols, d), torch.bfloat16)
    vc = arena.empty((b, heads, cols, d), torch.bfloat16)
    kc.normal_()
    vc.normal_()
    q = torch.randn(b, heads, 1, d, dtype=torch.bfloat16)
    k, v = kc[:, :, :k_len], vc[:, :, :k_len]
    nbytes = 2 * b * heads * k_len * d * 2
    weights = arena.empty((1230 << 20,), torch.uint8)  # one OPT-30B layer
    gpu_w = torch.empty_like(weights, device="cuda")
    ref = L.attend(q.float(), k.float(), v.float(), None, d ** -0.5)
    for threads in (16, 12, 8):
        torch.set_num_threads(threads)
        for name, fn in (("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)),
                         ("attend", lambda: L.attend(q, k, v, None, d ** -0.5))):
            out = fn()
            err = (out.float() - ref).abs().max().item()
            for _ in range(2):
                fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            alone = (time.perf_counter() - t0) / 5 * 1e3
            # the same while the link streams a layer's weights over and over
            stop = threading.Event()
            moved = [0, 0.0]

            def stream_weights():
                s = torch.cuda.Stream()
                t = time.perf_counter()
                while not stop.is_set():
                    with torch.cuda.stream(s):
                        gpu_w.copy_(weights, non_blocking=True)
                    s.synchronize()
                    moved[0] += weights.numel()
                moved[1] = time.perf_counter() - t

            th = threading.Thread(target=stream_weights)
            th.start()
            time.sleep(0.05)
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            busy = (time.perf_counter() - t0) / 5 * 1e3
            stop.set()
            th.join()
            emit(part="cpuattn", threads=threads, kernel=name, err=err, alone_ms=alone, alone_gbs=nbytes / alone / 1e6,
                 with_link_ms=busy, with_link_gbs=nbytes / busy / 1e6, link_gbs=moved[0] / moved[1] / 1e9)
    # the link alone
    s = torch.cuda.Stream()
    t = time.perf_counter()
    for _ in range(5):
        with torch.cuda.stream(s):
            gpu_w.copy_(weights, non_blocking=True)
    s.synchronize()
    emit(part="link", gbs=5 * weights.numel() / (time.perf_counter() - t) / 1e9)


def part_qkv(emit) -> None:
    n, h = 65536, 4096
    x = torch.randn(n, h, device="cuda", dtype=torch.float16)
    ws = [torch.randn(h, h, device="cuda", dtype=torch.float16) * 0.02 for _ in range(3)]
    bs = [torch.randn(h, device="cuda", dtype=torch.float16) for _ in range(3)]
    wf, bf = torch.cat(ws), torch.cat(bs)
    three = gpu_ms(lambda: [F.linear(x, w, b_) for w, b_ in zip(ws, bs)], 10)
    fused = gpu_ms(lambda: F.linear(x, wf, bf), 10)
    cat = gpu_ms(lambda: (torch.cat(ws), torch.cat(bs)), 10)
    emit(part="qkv", three_ms=three, fused_ms=fused, cat_ms=cat,
         three_tflops=2 * n * h * 3 * h / three / 1e9, fused_tflops=2 * n * h * 3 * h / fused / 1e9)


def part_linear(emit) -> None:
    """OPT-6.7B's linears at a decode step (128 rows) and a prefill (65,536 rows): the weight as
    stored (out, in) through F.linear, against a transposed (in, out) copy through addmm."""
    for m in (128, 65536):
        for n, k in ((4096, 4096), (16384, 4096), (4096, 16384)):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            wt = w.t().contiguous()
            ref = F.linear(x, w, b)
            assert (torch.addmm(b, x, wt) - ref).abs().max().item() < 0.05
            iters = 200 if m == 128 else 10
            t_lin = gpu_ms(lambda: F.linear(x, w, b), iters)
            t_nn = gpu_ms(lambda: torch.addmm(b, x, wt), iters)
            rate = (lambda t: w.numel() * 2 / t / 1e9) if m == 128 else (lambda t: 2 * m * n * k / t / 1e9)
            emit(part="linear", m=m, n=n, k=k, linear_us=t_lin * 1e3, addmm_t_us=t_nn * 1e3,
                 unit="GB/s" if m == 128 else "TFLOP/s", linear_rate=rate(t_lin), addmm_t_rate=rate(t_nn))


def part_mlp(emit) -> None:
    d, f, m = 4096, 16384, 65536
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, d, device="cuda", dtype=torch.float16, generator=g)
    h = torch.randn(m, d, device="cuda", dtype=torch.float16, generator=g)
    w1 = torch.randn(f, d, device="cuda", dtype=torch.float16, generator=g) * 0.02
    w2 = torch.randn(d, f, device="cuda", dtype=torch.float16, generator=g) * 0.02
    b1 = torch.randn(f, device="cuda", dtype=torch.float16, generator=g) * 0.02
    b2 = torch.randn(d, device="cuda", dtype=torch.float16, generator=g) * 0.02
    flops = 2 * 2 * m * d * f

    def whole(xx, hh):
        a = torch._addmm_activation(b1, xx, w1.t())
        return hh + F.linear(a, w2, b2)

    def chunked(rows):
        def run():
            out = torch.empty_like(h)
            for i in range(0, m, rows):
                out[i:i + rows] = whole(x[i:i + rows], h[i:i + rows])
            return out
        return run

    ref = whole(x, h)
    for rows in (65536, 32768, 16384, 8192):
        fn = chunked(rows) if rows < m else (lambda: whole(x, h))
        diff = (fn().float() - ref.float()).abs().max().item()  # another GEMM shape may round otherwise
        assert diff <= 4e-3 * (ref.abs().max().item() + 1), (rows, diff)
        t = gpu_ms(fn, 10)
        emit(part="mlp", rows_per_chunk=rows, ms=t, tflops=flops / t / 1e9, max_abs_diff=diff)
    for rows in (65536, 32768, 16384, 8192, 4096):
        xa = x[:rows]
        a = torch._addmm_activation(b1, xa, w1.t())
        t1 = gpu_ms(lambda: torch._addmm_activation(b1, xa, w1.t()), 10)
        t2 = gpu_ms(lambda: F.linear(a, w2, b2), 10)
        emit(part="mlp-gemm", rows=rows, fc1_ms=t1, fc2_ms=t2, fc1_tflops=2 * rows * d * f / t1 / 1e9,
             fc2_tflops=2 * rows * d * f / t2 / 1e9)
        del a
    sq = gpu_ms(lambda: F.linear(x, w1[:d], b1[:d]), 40)  # the 4096 x 4096 shape, run ~4x as long
    emit(part="mlp-gemm", rows=m, square_ms=sq, square_tflops=2 * m * d * d / sq / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="offload_micro.jsonl")
    ap.add_argument("--parts", default="copy,decode,host2d,cpuattn,qkv")
    args = ap.parse_args()
    out = open(args.out, "a")

    def emit(**kw):
        line = json.dumps(kw)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    for part in args.parts.split(","):
        try:
            globals()[f"part_{part}"](emit)
        except Exception as e:  # noqa: BLE001 - record and go on to the next part
            emit(part=part, error=f"{type(e).__name__}: {e}"[:500])
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
