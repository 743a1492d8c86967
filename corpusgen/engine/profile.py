"""``corpusgen profile``: measure this machine into a planner.hardware.HardwareProfile — host↔GPU
copy rates (pinned and pageable), disk reads and writes, GEMM rates by row count, GPU and CPU
decode attention, the 4-bit dequantisation rate. Runs torch; the planner only reads the result.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpusgen.planner.hardware import (GB, HardwareProfile, MatmulPoint, cpu_has_bf16, default_path, load_profile,
                                        save_profile)


def profile_for(device: str = "cuda", *, path: str | Path | None = None, offload_dir: str | Path | None = None,
                remeasure: bool = False) -> HardwareProfile:
    """The saved profile of this machine, measured (and saved) first if absent or ``remeasure``."""
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    p = Path(path) if path else default_path(name)
    if p.is_file() and not remeasure:
        return load_profile(p)
    prof = measure(device, offload_dir=offload_dir)
    save_profile(prof, p)
    return prof


# --------------------------------------------------------------------------- measuring

def _timeit(fn: Callable[[], object], sync: Callable[[], None], min_s: float = 0.05, max_reps: int = 20) -> float:
    """Seconds per call of ``fn`` (one warm-up, then repeat until ``min_s``)."""
    fn()
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_s or reps >= max_reps:
            return dt / reps


def _copy_rates(torch, dev, nbytes: int, sync) -> dict[str, float]:
    n = nbytes // 2
    gpu = torch.empty(n, dtype=torch.float16, device=dev)
    out = {}
    for kind, pin in (("pinned", dev.type == "cuda"), ("pageable", False)):
        host = torch.empty(n, dtype=torch.float16, pin_memory=pin)
        host.fill_(1.0)
        h2d = functools.partial(gpu.copy_, host, non_blocking=pin)
        d2h = functools.partial(host.copy_, gpu, non_blocking=pin)
        out[f"h2d_{kind}_gbps"] = nbytes / _timeit(h2d, sync) / GB
        out[f"d2h_{kind}_gbps"] = nbytes / _timeit(d2h, sync) / GB
    return out


def _disk_rates(directory: Path, nbytes: int) -> dict[str, float]:
    """Write ``nbytes`` with fsync, then read them back bypassing the page cache."""
    import mmap

    chunk = 16 << 20
    nbytes = max(chunk, nbytes // chunk * chunk)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(4096) * (chunk // 4096))
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".corpusgen-probe-")
    try:
        t0 = time.perf_counter()
        for _ in range(nbytes // chunk):
            os.write(fd, buf)
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - t0) / GB
        os.close(fd)
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            os.preadv(fd, [buf], 0)  # O_DIRECT may open yet refuse reads (tmpfs): probe once
        except OSError:
            os.close(fd) if fd >= 0 else None
            fd = os.open(name, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.preadv(fd, [buf], off)
        read = nbytes / (time.perf_counter() - t0) / GB
        return {"disk_read_gbps": read, "disk_write_gbps": write}
    finally:
        os.close(fd)
        os.unlink(name)


def _compute_rates(torch, dev, sync, dtype) -> dict[str, Any]:
    cuda = dev.type == "cuda"
    nk = 8192 if cuda else 1024
    ms = (1, 8, 32, 128, 512, 2048, 8192) if cuda else (1, 8, 32, 128, 512)
    w = torch.randn(nk, nk, device=dev, dtype=dtype)
    pts = []
    for m in ms:
        x = torch.randn(m, nk, device=dev, dtype=dtype)
        s = _timeit(functools.partial(torch.matmul, x, w), sync)
        pts.append(MatmulPoint(m=m, n=nk, k=nk, tflops=_sig(2 * m * nk * nk / s / 1e12)))
    out: dict[str, Any] = {"gpu_matmul": tuple(pts)}
    F = torch.nn.functional
    # Prefill attention: causal SDPA over a prompt.
    b, h, p, d = (8, 32, 512, 128) if cuda else (1, 8, 256, 64)
    q = torch.randn(b, h, p, d, device=dev, dtype=dtype)
    s = _timeit(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), sync)
    out["gpu_attention_tflops"] = 2 * b * h * d * p * p / s / 1e12
    out["gpu_attention_gbps"] = _decode_attention(torch, dev, sync, dtype, (32, 32, 1024, 128) if cuda else (4, 8, 512, 64))
    out["gpu_dequant_gbps"] = _dequant_rate(torch, dev, sync, 1 << 26 if cuda else 1 << 22)
    return out


def _decode_attention(torch, dev, sync, dtype, shape) -> float:
    """K/V bytes scanned per second by one-token attention over an fp16 cache of ``shape``
    (on the CPU the engine upcasts the cache to fp32 first; that is part of the rate)."""
    k = torch.randn(*shape, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(shape[0], shape[1], 1, shape[3], device=dev, dtype=dtype)
    F = torch.nn.functional
    s = _timeit(lambda: F.scaled_dot_product_attention(q, k.to(dtype), v.to(dtype)), sync)
    return 2 * k.numel() * k.element_size() / s / GB


def _cpu_attention_rate(torch, cpu, sync) -> float:
    """CPU decode attention in the dtype the engine attends in on this host: a bf16 cache read in
    place where the CPU has bf16 (the engine then runs bf16), else an fp16 cache upcast to fp32.
    The cache (16 x 32 x 1024 x 128, 268 MB of K and V) is larger than a CPU's caches."""
    if cpu_has_bf16():
        k = torch.randn(16, 32, 1024, 128, dtype=torch.bfloat16)
        q = torch.randn(16, 32, 1, 128, dtype=torch.bfloat16)
        F = torch.nn.functional
        s = _timeit(lambda: F.scaled_dot_product_attention(q, k, k), sync)
        return 2 * k.numel() * k.element_size() / s / GB
    return _decode_attention(torch, cpu, sync, torch.float32, (8, 32, 512, 128))


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def _dequant_rate(torch, dev, sync, numel: int) -> float:
    from corpusgen.engine import compression as cq

    x = torch.randn(numel // 4096, 4096, device=dev, dtype=torch.float16)
    packed = cq.quantize(x, bits=4, group_size=64, axis=-1)
    out = torch.empty_like(x)
    s = _timeit(lambda: cq.dequantize(packed, out=out), sync)
    return out.numel() * out.element_size() / s / GB


def measure(device: str = "cuda", offload_dir: str | Path | None = None, *, copy_mb: int = 256,
            disk_mb: int = 512, skip_disk: bool = False) -> HardwareProfile:
    """Micro-benchmark this machine (tens of seconds on a GPU machine; sizes are parameters for tests)."""
    import torch

    cuda = device == "cuda" and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # The engine computes in fp16 on a GPU, in bf16 or fp32 on a CPU (corpusgen.engine.load).
    cpu_dtype = torch.float32
    try:
        cpu_dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    except ImportError:
        pass
    dtype = torch.float16 if cuda else cpu_dtype
    vals: dict[str, Any] = _copy_rates(torch, dev, copy_mb << 20, sync)
    if skip_disk:
        vals |= {"disk_read_gbps": 0.0, "disk_write_gbps": 0.0}
    else:
        vals |= _disk_rates(Path(offload_dir or tempfile.gettempdir()), disk_mb << 20)
    vals |= _compute_rates(torch, dev, sync, dtype)
    cpu = torch.device("cpu")
    nosync = lambda: None
    x, w = torch.randn(32, 2048, dtype=cpu_dtype), torch.randn(2048, 2048, dtype=cpu_dtype)
    vals["cpu_matmul_tflops"] = 2 * 32 * 2048 * 2048 / _timeit(lambda: x @ w, nosync) / 1e12
    vals["cpu_attention_gbps"] = _cpu_attention_rate(torch, cpu, nosync)
    vals["cpu_dequant_gbps"] = _dequant_rate(torch, cpu, nosync, 1 << 22)
    name = torch.cuda.get_device_name() if cuda else f"cpu-{socket.gethostname()}"
    host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu_mem = torch.cuda.get_device_properties(0).total_memory if cuda else host_mem
    return HardwareProfile(device_name=name, measured=_dt.date.today().isoformat(),
                           gpu_memory_bytes=int(gpu_mem), cpu_memory_bytes=int(host_mem),
                           **{k: (_sig(v) if isinstance(v, float) else v) for k, v in vals.items()})
