"""Hardware profile: link bandwidths and compute rates of one machine (DESIGN §6, §8).

``corpusgen profile`` calls :func:`measure` once and saves the result as YAML under ``policies/``;
the planner loads it (:func:`profile_for`) and re-measures only when asked. Without a profile it
plans with a built-in one (:data:`BUILTIN`, an H200-class machine).

Units: bandwidths in GB/s (1e9 bytes per second), compute in TFLOP/s, memory in bytes.

On a CPU-only machine the engine's "GPU" tier is the CPU, so the ``gpu_*`` entries measure the
CPU and the host↔"GPU" copies are memory copies.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9


@dataclass(frozen=True, kw_only=True)
class MatmulPoint:
    """One measured GEMM: ``(m, k) @ (k, n)`` in the profile's dtype."""

    m: int
    """Rows (tokens in the GPU batch)."""
    n: int
    """Output features."""
    k: int
    """Input features."""
    tflops: float
    """Achieved TFLOP/s (2·m·n·k per matmul)."""


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """What one machine can move and compute."""

    device_name: str
    """GPU name (``torch.cuda.get_device_name``) or ``cpu-<hostname>``."""
    measured: str
    """ISO date of the measurement, or ``builtin``."""
    h2d_pinned_gbps: float
    """Host→GPU copy from pinned memory."""
    h2d_pageable_gbps: float
    """Host→GPU copy from pageable memory."""
    d2h_pinned_gbps: float
    """GPU→host copy into pinned memory."""
    d2h_pageable_gbps: float
    """GPU→host copy into pageable memory."""
    disk_read_gbps: float
    """Sequential read of the offload directory, page cache bypassed."""
    disk_write_gbps: float
    """Sequential write of the offload directory, fsync included."""
    gpu_matmul: tuple[MatmulPoint, ...]
    """GEMM rates at several m (fp16; bf16 runs at the same rate on the GPUs we target)."""
    gpu_attention_tflops: float
    """Prefill attention (causal SDPA over the prompt)."""
    gpu_attention_gbps: float
    """Decode attention on the GPU: bytes of K and V scanned per second."""
    gpu_dequant_gbps: float
    """4-bit dequantisation on the GPU: bytes of fp16 output per second."""
    cpu_matmul_tflops: float
    """GEMM on the CPU at a decode-like shape."""
    cpu_attention_gbps: float
    """Decode attention on the CPU: bytes of K and V scanned per second (memory-bound)."""
    cpu_dequant_gbps: float
    """4-bit dequantisation on the CPU: bytes of fp16 output per second."""
    gpu_memory_bytes: int
    """Total GPU memory."""
    cpu_memory_bytes: int
    """Total host memory."""

    def matmul_tflops(self, m: float) -> float:
        """GEMM rate at ``m`` rows, interpolated linearly in log m between measured points (clamped)."""
        pts = sorted(self.gpu_matmul, key=lambda p: p.m)
        if m <= pts[0].m:
            return pts[0].tflops * max(m, 1) / pts[0].m  # below the table: memory-bound, ∝ m
        for a, b in itertools.pairwise(pts):
            if m <= b.m:
                w = (math.log(m) - math.log(a.m)) / (math.log(b.m) - math.log(a.m))
                return a.tflops + w * (b.tflops - a.tflops)
        return pts[-1].tflops

    def replace(self, **changes: Any) -> HardwareProfile:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpu_matmul"] = [[p.m, p.n, p.k, p.tflops] for p in self.gpu_matmul]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HardwareProfile:
        d = dict(data)
        d["gpu_matmul"] = tuple(MatmulPoint(m=int(m), n=int(n), k=int(k), tflops=float(t))
                                for m, n, k, t in d["gpu_matmul"])
        d["measured"] = str(d["measured"])
        return cls(**d)


def _mm(rows: list[tuple[int, float]], nk: int = 8192) -> tuple[MatmulPoint, ...]:
    return tuple(MatmulPoint(m=m, n=nk, k=nk, tflops=t) for m, t in rows)


# An H200-class machine as in DESIGN §8 (pinned 55 GB/s, pageable 9 GB/s, fp16 GEMM ~760 TFLOP/s at
# large m). Small-m GEMMs are bound by reading the weights from HBM (~4.8 TB/s ⇒ ~4.8·m TFLOP/s),
# which is why batched decode runs far below peak. Disk: a local NVMe.
_H200 = HardwareProfile(
    device_name="NVIDIA H200 (builtin)", measured="builtin",
    h2d_pinned_gbps=55.0, h2d_pageable_gbps=9.0, d2h_pinned_gbps=50.0, d2h_pageable_gbps=9.0,
    disk_read_gbps=3.0, disk_write_gbps=2.0,
    gpu_matmul=_mm([(1, 3.5), (8, 28), (32, 110), (64, 210), (128, 360), (256, 520), (512, 620),
                    (1024, 690), (4096, 740), (16384, 760)]),
    gpu_attention_tflops=350.0, gpu_attention_gbps=3000.0, gpu_dequant_gbps=1500.0,
    # CPU attention: bf16 over OPT-30B's cache on 16 host cores while the host→GPU link is busy,
    # which shares host memory bandwidth with it (benchmarks/offload_micro.py measures both).
    cpu_matmul_tflops=1.0, cpu_attention_gbps=60.0, cpu_dequant_gbps=4.0,
    gpu_memory_bytes=141 * 10**9, cpu_memory_bytes=126 * 2**30,
)
_H100 = _H200.replace(
    device_name="NVIDIA H100 80GB HBM3 (builtin)", gpu_memory_bytes=80 * 10**9,
    gpu_matmul=_mm([(1, 2.5), (8, 20), (32, 80), (64, 160), (128, 290), (256, 450), (512, 580),
                    (1024, 660), (4096, 720), (16384, 740)]),
    gpu_attention_gbps=2200.0, gpu_dequant_gbps=1100.0,
)
BUILTIN: dict[str, HardwareProfile] = {"h200": _H200, "h100": _H100}
"""Profiles for planning without measuring."""


# --------------------------------------------------------------------------- YAML

def default_path(device_name: str | None = None, root: str | Path = "policies") -> Path:
    """``policies/hardware-<gpu-name or hostname>.yaml``."""
    name = device_name or socket.gethostname()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path(root) / f"hardware-{slug}.yaml"


def save_profile(profile: HardwareProfile, path: str | Path | None = None) -> Path:
    import yaml

    p = Path(path) if path else default_path(profile.device_name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("# corpusgen hardware profile (corpusgen profile); GB/s = 1e9 B/s\n"
                 + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return p


def load_profile(path: str | Path) -> HardwareProfile:
    import yaml

    from corpusgen.errors import PolicyError

    p = Path(path)
    try:
        return HardwareProfile.from_dict(yaml.safe_load(p.read_text()))
    except FileNotFoundError:
        raise PolicyError(f"{p}: hardware profile not found; run `corpusgen profile`") from None
    except (TypeError, KeyError, ValueError) as e:
        raise PolicyError(f"{p}: not a hardware profile ({e}); run `corpusgen profile` to rewrite it") from None


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 / AMX), where bf16 is several times fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
