"""Storage tiers: they move bytes and know nothing about models.

* ``gpu``  — tensors resident on the compute device (the CPU itself on a CPU-only machine).
* ``cpu``  — pinned host memory (plain host memory when there is no CUDA), counted against a budget.
* ``disk`` — one file per named record under ``offload_dir``: all tensors of the record packed
  back to back, read with one large sequential ``readinto`` into a reusable pinned buffer.

A record is a flat ``dict[str, Tensor]``. Disk reads run on an I/O worker pool; a failure is
re-raised in the caller at the next ``wait`` as :class:`OffloadIOError` — never a hang (FlexGen's
copy threads die silently and the main loop waits forever).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from corpusgen.engine.streams import cudart
from corpusgen.errors import BudgetError, OffloadIOError

Record = dict[str, torch.Tensor]
IO_TIMEOUT_S = 600.0  # a disk read that takes longer than this is treated as a failure, not waited on


def can_pin() -> bool:
    return torch.cuda.is_available()


class HostArena:
    """Pinned host allocations of exactly the requested size, counted against ``budget`` bytes
    (None = unlimited) for as long as they live.

    ``torch.empty(pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds
    every block up to a power of two: a 1.23 GB OPT-30B layer took 2 GiB, and OPT-175B's 4-bit
    weights (≈ 93 GB asked for) did not fit a 125 GiB host. Here the bytes are an ordinary host
    tensor page-locked in place with ``cudaHostRegister`` (unregistered when the tensor is
    collected), so the pinned footprint is what the planner counted. Without CUDA it is plain
    host memory, counted the same way.

    Registering is not free (page-locking a batch's 13 GB of OPT-30B KV took seconds), and with
    refill a block frees a batch's KV buffers just before it allocates the next batch's, of the
    same sizes. So freed registered buffers wait in a pool, by size, for the next request of that
    size; pooled bytes count against the budget too (an allocation that would not fit first
    unregisters pooled ones) and stay below ``pool_limit`` (a quarter of the budget, else 16 GiB).
    """

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.used = 0
        self.peak = 0
        self.pooled = 0
        self.pool_limit = budget // 4 if budget is not None else 16 << 30
        self.reused = 0  # allocations served from the pool (for tests and benchmarks)
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        base = self._count(nbytes)
        registered = base is not None
        if base is None:
            base = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            registered = can_pin() and nbytes > 0 and _register(base)
            if can_pin() and not registered:  # the driver refused: PyTorch's (rounded) pinned blocks
                base = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        t = base[:nbytes].view(dtype).view(tuple(int(n) for n in shape))
        # ``base`` is owned by the finaliser, so its bytes outlive the registration. ``uses``: its
        # storage's users with ``t`` alone alive: more when collected means a view of it survives.
        weakref.finalize(t, _free, self, base, nbytes, registered, _uses(base) if registered else 0)
        return t

    def clear(self) -> None:
        """Unregister and drop every pooled buffer; buffers freed from now on are unregistered, not
        pooled (a pooled buffer outliving its arena would be freed still registered, and its
        address range, reused by the host allocator, could then not be registered again)."""
        with self._lock:
            pool, self._pool, self.pooled = self._pool, {}, 0
            self.closed = True
        for bases in pool.values():
            for base in bases:
                _unregister(base)

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """Move ``t`` into the arena (pinned copy)."""
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out

    def _count(self, nbytes: int) -> torch.Tensor | None:
        """Count ``nbytes`` as used; a pooled registered buffer of that size, if one waits."""
        evict = []
        with self._lock:
            bases = self._pool.get(nbytes)
            if bases:
                base = bases.pop()
                if not bases:
                    del self._pool[nbytes]
                self.pooled -= nbytes
                self.used += nbytes
                self.peak = max(self.peak, self.used)
                self.reused += 1
                return base
            while self.budget is not None and self.used + self.pooled + nbytes > self.budget and self.pooled:
                size = next(iter(self._pool))
                evict.append(self._pool[size].pop())
                self.pooled -= size
                if not self._pool[size]:
                    del self._pool[size]
            if self.budget is not None and self.used + nbytes > self.budget:
                gib = 2**30
                raise BudgetError(
                    f"cpu_memory budget of {self.budget / gib:.2f} GiB exceeded: {self.used / gib:.2f} GiB in use, "
                    f"{nbytes / gib:.2f} GiB more requested; raise engine.cpu_memory or move weights to disk"
                )
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        for base in evict:
            _unregister(base)
        return None

    def _uncount(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def _keep(self, base: torch.Tensor, nbytes: int, uses: int) -> bool:
        """Pool a freed registered buffer (True), unless the pool is full or a view of it lives on."""
        with self._lock:
            self.used -= nbytes
            if self.closed or self.pooled + nbytes > self.pool_limit or not 0 < _uses(base) <= uses:
                return False
            self._pool.setdefault(nbytes, []).append(base)
            self.pooled += nbytes
            return True


def _register(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s bytes for asynchronous DMA; False when the driver refuses.

    A refusal also sets the CUDA runtime's last error, which the next unrelated kernel launch
    would report as its own failure: it is cleared here."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    except (AttributeError, RuntimeError):
        return False
    if int(getattr(err, "value", err)) == 0:
        return True
    lib = cudart()
    if lib is not None:
        lib.cudaGetLastError()
    return False


def _free(arena: HostArena, base: torch.Tensor, nbytes: int, registered: bool, uses: int) -> None:
    if not registered:
        arena._uncount(nbytes)
    elif not arena._keep(base, nbytes, uses):
        _unregister(base)


def _uses(base: torch.Tensor) -> int:
    """Users of ``base``'s storage (tensors on it); 0 when PyTorch cannot say (then no pooling)."""
    try:
        return int(torch._C._storage_Use_Count(base.untyped_storage()._cdata))
    except (AttributeError, RuntimeError):
        return 0


def _unregister(base: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(base.data_ptr())


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


_ALIGN = 4096  # keep every tensor's start aligned so views into the staging buffer are aligned


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class DiskTier:
    """One file per record under ``root``; reads into reusable host buffers on a worker pool."""

    def __init__(self, root: str | Path, workers: int = 4):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[Path, list[_Entry], int]] = {}
        self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corpusgen-io")
        self.bytes_written = 0
        self.bytes_read = 0

    def put(self, key: str, record: Record) -> int:
        """Write ``record`` to its file; return its size in bytes."""
        entries, offset = [], 0
        for name, t in record.items():
            nbytes = t.numel() * t.element_size()
            entries.append(_Entry(name, str(t.dtype), tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        path = self.root / f"{key}.bin"
        try:
            with open(path, "wb") as f:
                for e, t in zip(entries, record.values()):
                    f.seek(e.offset)
                    f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
                f.truncate(offset)
            (self.root / f"{key}.json").write_text(json.dumps([e.__dict__ for e in entries]))
        except OSError as e:
            raise OffloadIOError(f"{path}: cannot write the disk tier ({e.strerror}); free space or change engine.offload_dir") from None
        self._index[key] = (path, entries, offset)
        self.bytes_written += offset
        return offset

    def size(self, key: str) -> int:
        return self._index[key][2]

    def read_into(self, key: str, buf: torch.Tensor) -> Record:
        """Read the record into ``buf`` (uint8, at least size(key)) and return views into it."""
        path, entries, size = self._index[key]
        assert buf.numel() >= size, (key, buf.numel(), size)
        try:
            with open(path, "rb", buffering=0) as f:
                view = memoryview(buf[:size].numpy())
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        raise OSError(0, f"file is truncated at {got} of {size} bytes")
                    got += n
        except OSError as e:
            raise OffloadIOError(f"{path}: disk tier read failed ({e.strerror or e}); check engine.offload_dir") from None
        self.bytes_read += size
        out: Record = {}
        for e in entries:
            out[e.name] = buf[e.offset:e.offset + e.nbytes].view(_dtype(e.dtype)).view(e.shape)
        return out

    def submit(self, fn, *args) -> cf.Future:
        return self.pool.submit(fn, *args)

    @staticmethod
    def wait(fut: cf.Future, timeout: float = IO_TIMEOUT_S):
        """The future's result; any failure (or a timeout) surfaces here as OffloadIOError."""
        try:
            return fut.result(timeout=timeout)
        except OffloadIOError:
            raise
        except cf.TimeoutError:
            raise OffloadIOError(f"a disk tier read did not finish within {timeout:.0f} s; check the offload disk") from None
        except Exception as e:  # noqa: BLE001 - any worker failure must reach the caller
            raise OffloadIOError(f"disk tier worker failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for path, _, _ in self._index.values():
            for p in (path, path.with_suffix(".json")):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        self._index.clear()
