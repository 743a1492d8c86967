"""Process-level safety of a run: stop signals that wait for a commit to finish, and out-of-memory
errors recognised whichever allocator raised them."""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from typing import Any, Iterator


def is_oom(e: BaseException) -> bool:
    """A failed CUDA or host allocation: torch.OutOfMemoryError, MemoryError, "... out of memory"."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory() -> None:
    """Give memory back after an out-of-memory error, before the smaller retry (a full collection
    only with CUDA in use: it costs tens of milliseconds in a big process)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
    else:
        gc.collect(1)


class signals_as_interrupt:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while a job runs — but not
    inside a commit (:func:`uninterrupted`), which finishes first: a stop never leaves half of one."""

    deferring = False
    pending: int | None = None

    def __enter__(self):
        self.old: dict[int, Any] = {}
        type(self).pending = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup'ed: stay deaf to it
                    self.old[sig] = signal.signal(sig, self._raise)
        return self

    @classmethod
    def _raise(cls, signum, frame):
        if cls.deferring:
            cls.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A stop signal arriving inside this block is raised (as KeyboardInterrupt) at its end."""
    flags = signals_as_interrupt
    outer, flags.deferring = flags.deferring, True
    try:
        yield
    finally:
        flags.deferring = outer
    if not outer and flags.pending is not None:
        signum, flags.pending = flags.pending, None
        raise KeyboardInterrupt(f"signal {signum}")
