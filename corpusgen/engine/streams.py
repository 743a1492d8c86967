"""CUDA streams of the block schedule and the copies between them (design.md §5).

*compute* runs the math, *load* carries host→GPU copies, *store* GPU→host copies; ordering is by
CUDA events. On a CPU-only machine every stream is ``None`` and everything runs in order.
"""

from __future__ import annotations

import ctypes
import functools

import torch


class Streams:
    """Compute/load/store streams on CUDA; ``None`` streams (same-stream, in order) otherwise."""

    def __init__(self, device: torch.device, overlap: bool):
        cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if cuda else None
        self.load = torch.cuda.Stream(device) if cuda and overlap else self.compute
        self.store = torch.cuda.Stream(device) if cuda and overlap else self.compute

    def event(self, stream) -> torch.cuda.Event | None:
        if stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    @staticmethod
    def wait(stream, ev) -> None:
        if stream is not None and ev is not None:
            stream.wait_event(ev)


def handoff(tensors, user, owner) -> None:
    """Tell the caching allocator that ``user`` stream reads tensors allocated on ``owner``, so
    their memory is not reused before that stream is done with it."""
    if user is None or user is owner:
        return
    for t in tensors:
        if t is not None and t.is_cuda:
            t.record_stream(user)


class HostCopy:
    """Tensors on their way to the host: started by ``to_host``, collected by ``wait``."""

    def __init__(self, tensors: list[torch.Tensor], event: torch.cuda.Event | None):
        self.tensors, self.event = tensors, event

    def wait(self) -> list[torch.Tensor]:
        """The host tensors, once their copies have landed."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensors


def to_host(*xs: torch.Tensor) -> HostCopy:
    """Start copying CUDA tensors into pinned host buffers on the current stream, with one event
    for all of them (host tensors pass through as they are)."""
    if not xs[0].is_cuda:
        return HostCopy(list(xs), None)
    out = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True) for x in xs]
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(xs[0].device))
    return HostCopy(out, ev)


def onto_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host result onto the device without the host waiting: staged in a pinned buffer (PyTorch's
    pinned allocator keeps it until the copy has run), copied on the current stream."""
    if device.type != "cuda":
        return x
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x).to(device, non_blocking=True)


class on:
    """``with on(stream):`` — a CUDA stream context, or nothing for the CPU."""

    def __init__(self, stream):
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


@functools.lru_cache(maxsize=1)
def cudart():
    """The process's CUDA runtime library (the one PyTorch loaded) through ctypes, or None: for the
    calls PyTorch does not expose (2-D copies, clearing a refused registration's error)."""
    names = []
    try:
        with open("/proc/self/maps") as f:
            names = sorted({line.split()[-1] for line in f if "libcudart" in line.rsplit("/", 1)[-1]})
    except OSError:
        pass
    names += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        return lib
    return None
