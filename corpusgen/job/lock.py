"""The lock of an output directory, and the rule for every file corpusgen writes there.

The lock is an ``fcntl.flock`` on ``DIR/lock`` held for the whole run; pid, host and start time
are written inside for the message a second run gets, and the end of the run (:meth:`OutputLock.note_end`)
for ``corpusgen status`` when the manifest could not record it. The kernel releases a flock when
its holder dies, so a stale lock never blocks.

No file corpusgen writes in an output directory (lock, manifest, parts, progress) is ever opened
through a symbolic link or used when it is a directory (:func:`own_file_problem`, ``O_NOFOLLOW``):
``ln -s /elsewhere/file DIR/lock`` is refused, never written through.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from corpusgen.errors import LockedError, OutputError

LOCK = "lock"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def own_file_problem(path: Path) -> str | None:
    """Why ``path`` — a file corpusgen writes (lock, manifest, part, progress) — cannot be used, or
    None when it is a regular file or absent. A symbolic link is never followed: writing through
    ``DIR/lock -> /elsewhere`` would change a file outside the output directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (corpusgen never follows links in its output directory)"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def open_nofollow(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link as the last component (O_NOFOLLOW)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


LOCK_SIZE = 1024
"""The lock file's JSON is padded to this size, so :meth:`OutputLock.note_end` rewrites bytes already
on disk: it can record a run's end even on a full disk."""


class OutputLock:
    """Exclusive lock of an output directory for the lifetime of a run."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.fd: int | None = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> "OutputLock":
        why = own_file_problem(self.path)
        if why is not None:
            raise OutputError(f"{self.path} {why}, not corpusgen's lock file: remove it and run again")
        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot open the lock file ({e.strerror}); check the output "
                              "directory's permissions, or choose another --output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):
                os.close(fd)
                raise OutputError(f"{self.path}: cannot lock the output directory ({e.strerror}); use an --output "
                                  "on a file system with locks (a local disk)") from None
            os.close(fd)
            info = read_lock(self.path.parent) or {}
            raise LockedError(
                f"{self.path.parent} is in use by pid {info.get('pid', '?')} on {info.get('host', '?')} "
                f"(since {info.get('started', '?')}); wait for it or stop it, or use another --output"
            ) from None
        self.fd = fd
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso()}
        with contextlib.suppress(OSError):  # who holds it is information; a full disk must not stop here
            os.ftruncate(fd, 0)
            self._write(self.info)
        return self

    def _write(self, info: Mapping[str, Any]) -> None:
        data = json.dumps(info).encode()
        assert len(data) <= LOCK_SIZE, data
        os.pwrite(self.fd, data.ljust(LOCK_SIZE), 0)
        os.fsync(self.fd)

    def note_end(self, run_id: str, status: str, reason: str | None = None) -> None:
        """Record how run ``run_id`` ended in the lock file: where the manifest cannot record it (a
        full disk), ``corpusgen status`` still says ``failed`` and why, not ``dead``."""
        if self.fd is None:
            return
        info = {**self.info, "run_id": run_id, "status": status, "ended": _now_iso()}
        if reason:
            room = LOCK_SIZE - len(json.dumps({**info, "reason": ""}).encode()) - 16
            info["reason"] = reason.splitlines()[0][:max(room // 4, 0)]  # JSON escapes take up to 6 bytes
        with contextlib.suppress(OSError, AssertionError):
            self._write(info)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file keeps the last holder's info
            self.fd = None


def read_lock(out_dir: Path) -> dict[str, Any] | None:
    """The last lock holder's info plus ``alive``: whether a process holds the lock now. Unreadable
    contents (garbage, not UTF-8) are no information; a lock that is a link or a directory is refused."""
    path = Path(out_dir) / LOCK
    why = own_file_problem(path)
    if why is not None:
        raise OutputError(f"{path} {why}, not corpusgen's lock file: remove it (and run the job again)")
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"{path}: cannot open the lock file ({e.strerror})") from None
    try:
        data = os.pread(fd, 1 << 16, 0)
        try:
            info = json.loads(data.decode("utf-8", "replace")) if data.strip() else {}
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            info["alive"] = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            info["alive"] = True
    finally:
        os.close(fd)
    return info


def written_elsewhere(lock: Mapping[str, Any]) -> bool:
    """Whether a live process on another machine holds this lock (a rank of a multi-node job).

    Its manifest is then not opened from here: SQLite's WAL index is shared memory, which a network
    filesystem does not keep coherent between machines; its progress.json and part files are read."""
    return bool(lock.get("alive")) and lock.get("host") not in (None, socket.gethostname())
