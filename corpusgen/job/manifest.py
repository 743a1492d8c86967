"""The output directory's memory: committed parts and keys, the job fingerprint, runs.

``manifest.sqlite`` (SQLite, WAL) is the single source of truth of what is done: a part counts
once its row and its keys are committed in one transaction, after the file was renamed into place.
Part files the manifest does not list (a crash between rename and commit) and ``*.tmp`` files are
deleted by the next run. Before a run resumes, the manifest passes ``PRAGMA quick_check`` and each
committed part its size and sha256 (:func:`verify_parts`): damage is refused, never accepted.
Keys are checked against the parts too (:func:`check_keys`): a part whose key count differs from
its rows has its keys rebuilt from the (verified) file, so a key is never generated twice.
No file corpusgen writes here is ever a symbolic link or a directory (corpusgen.job.lock, which
also holds the directory's lock): such a file is refused, never followed.

The parts it lists are checked against it in parts.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote

from corpusgen.errors import OutputError
from corpusgen.job.lock import LOCK, open_nofollow, own_file_problem
from corpusgen.job.ranks import parse_rank_dir
from corpusgen.job.writer import PartInfo, part_number

MANIFEST = "manifest.sqlite"
PROGRESS = "progress.json"
OWN_FILES = (MANIFEST, MANIFEST + "-wal", MANIFEST + "-shm", MANIFEST + "-journal", LOCK, PROGRESS,
             PROGRESS + ".tmp", ".write-test")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY CHECK (id = 1), fingerprint TEXT NOT NULL, fields TEXT NOT NULL,
    spec TEXT NOT NULL, tokenizer TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY, rows INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    statuses TEXT NOT NULL, run_id TEXT NOT NULL, committed_at TEXT NOT NULL, mtime_ns INTEGER);
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, part TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started TEXT NOT NULL, ended TEXT, status TEXT NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, gen_tokens INTEGER NOT NULL DEFAULT 0, seconds REAL,
    engine_seconds REAL, overhead_seconds REAL, load_seconds REAL, engine TEXT, input TEXT,
    predicted_tps REAL, pid INTEGER, host TEXT);
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- files corpusgen writes: regular files, never links -------------------------------------------

def check_own_files(out_dir: Path) -> None:
    """Refuse a directory where one of corpusgen's own files is a link, a directory or a device."""
    for name in OWN_FILES:
        why = own_file_problem(out_dir / name)
        if why is not None:
            fix = ("replace it with the file itself (restore it from a backup)" if name.startswith(MANIFEST)
                   else "remove it")
            raise OutputError(f"{out_dir / name} {why}, not the file corpusgen keeps there: {fix} and run again")


def disk_full(directory: Path) -> bool:
    """Whether the file system of ``directory`` has (almost) no space left."""
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_NOTADB, _SQLITE_CORRUPT = 13, 10, 26, 11
_SQLITE_ACCESS = {3, 8, 14, 23}  # PERM, READONLY, CANTOPEN, AUTH


def manifest_error(path: Path, e: sqlite3.Error) -> OutputError:
    """The one-line error for a failed open or read of a manifest: a full disk, an I/O error or a
    permission problem is said as such (the manifest is fine: never "run with --restart"); only
    what SQLite finds malformed is called damaged."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if code == _SQLITE_FULL or (code == _SQLITE_IOERR and disk_full(path.parent)):
        return OutputError(f"{path}: the disk is full ({e}); committed parts are intact: free space on "
                           f"{path.parent} and run the same command again to resume")
    if code == _SQLITE_IOERR:
        return OutputError(f"{path}: I/O error reading or writing the manifest ({e}); committed parts are intact: "
                           "check the disk and run the same command again")
    if code in _SQLITE_ACCESS:
        return OutputError(f"{path}: cannot open the manifest ({e}); check the permissions of the file and of "
                           f"{path.parent}")
    return OutputError(f"{path}: the manifest is damaged or unreadable ({e}); restore it from a backup, or run "
                       "with --restart to move this directory aside and start over")


class Manifest:
    """SQLite manifest of one output directory."""

    def __init__(self, out_dir: Path, *, readonly: bool = False):
        self.path = Path(out_dir) / MANIFEST
        self.db: sqlite3.Connection | None = None
        for name in (MANIFEST, MANIFEST + "-wal", MANIFEST + "-shm", MANIFEST + "-journal"):
            why = own_file_problem(self.path.parent / name)  # SQLite would write through a link
            if why is not None:
                raise OutputError(f"{self.path.parent / name} {why}, not the file corpusgen keeps there: replace it "
                                  "with the file itself (restore it from a backup)")
        try:
            if readonly:
                if not self.path.exists():
                    raise OutputError(f"{out_dir}: no {MANIFEST}; is this a corpusgen output directory?")
                try:
                    self.db = sqlite3.connect(self._readonly_uri(), uri=True, timeout=30)
                    tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                except sqlite3.OperationalError as e:  # no room (a full disk) or no right to make its -shm
                    if not self._walless() or (e.sqlite_errorcode & 0xFF) not in (_SQLITE_IOERR, *_SQLITE_ACCESS):
                        raise
                    self.close_quietly()
                    self.db = sqlite3.connect(self._readonly_uri(immutable=True), uri=True, timeout=30)
                    tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                missing = sorted({"job", "parts", "keys", "runs"} - tables)
                if missing:  # an emptied or foreign file: "no such table" later would be a traceback
                    raise sqlite3.DatabaseError(f"no table {missing[0]}")
            else:
                self.db = sqlite3.connect(self.path, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                # a damaged manifest is refused before a run reads or writes it
                bad = self.db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if bad != "ok":
                    raise sqlite3.DatabaseError(bad)
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
                if "mtime_ns" not in {r[1] for r in self.db.execute("PRAGMA table_info(parts)")}:
                    self.db.execute("ALTER TABLE parts ADD COLUMN mtime_ns INTEGER")  # written before parts kept it
        except sqlite3.Error as e:
            self.close_quietly()
            raise manifest_error(self.path, e) from None
        self.db.row_factory = sqlite3.Row

    def _readonly_uri(self, *, immutable: bool = False) -> str:
        """Read-only, or immutable where nothing may be written: a copy on a read-only mount (or
        without write permission, or on a full disk) has no ``-shm`` for SQLite's read-only WAL mode
        to use. Immutable ignores a WAL, so it is used only when there is none (a run folds its WAL
        into the database when it ends)."""
        uri = "file:" + quote(str(self.path.resolve()))
        writable = os.access(self.path.parent, os.W_OK) and os.access(self.path, os.W_OK)
        return uri + ("?immutable=1" if (immutable or not writable) and self._walless() else "?mode=ro")

    def _walless(self) -> bool:
        wal = self.path.parent / (MANIFEST + "-wal")
        try:
            return wal.stat().st_size == 0
        except FileNotFoundError:
            return True

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A query whose failure (a page garbled after opening) is a one-line OutputError."""
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise manifest_error(self.path, e) from None

    def _json(self, text: str, what: str) -> Any:
        try:
            return json.loads(text)
        except (TypeError, ValueError):
            raise manifest_error(self.path, sqlite3.DatabaseError(f"{what} is not JSON")) from None

    def close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failure (a full disk) rolls it back and becomes an OutputError."""
        try:
            with self.db:
                yield self.db
        except sqlite3.Error as e:
            raise OutputError(f"{self.path}: cannot update the manifest ({e}); committed parts are intact: "
                              "fix the disk (free space) and run the same command again to resume") from None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    # --- job ---------------------------------------------------------------------------------
    def job(self) -> dict[str, Any] | None:
        """The stored job (fingerprint, fields, spec, tokenizer, created) or None when new."""
        rows = self._read("SELECT * FROM job WHERE id = 1")
        if not rows:
            return None
        d = dict(rows[0])
        d["fields"], d["spec"] = self._json(d["fields"], "job.fields"), self._json(d["spec"], "job.spec")
        return d

    def set_job(self, fingerprint: str, fields: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO job (id, fingerprint, fields, spec, tokenizer, created) "
                            "VALUES (1, ?, ?, ?, NULL, ?)",
                            (fingerprint, json.dumps(fields), json.dumps(spec), now_iso()))

    def set_tokenizer(self, fingerprint: str) -> None:
        with self._tx():
            self.db.execute("UPDATE job SET tokenizer = ? WHERE id = 1", (fingerprint,))

    # --- parts and keys ------------------------------------------------------------------------
    def committed(self, keys: Sequence[str]) -> dict[str, str]:
        """The subset of ``keys`` already committed, mapped to their part."""
        found: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = list(keys[i:i + 500])
            q = f"SELECT key, part FROM keys WHERE key IN ({','.join('?' * len(chunk))})"
            found.update((r[0], r[1]) for r in self._read(q, chunk))
        return found

    def commit_part(self, info: PartInfo, keys: Iterable[str], run_id: str) -> None:
        """Record a renamed part and its keys in one transaction (the commit point of its rows)."""
        with self._tx():
            self.db.execute("INSERT INTO parts (name, rows, size, sha256, statuses, run_id, committed_at, mtime_ns) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (info.name, info.rows, info.size, info.sha256, json.dumps(dict(info.statuses)),
                             run_id, now_iso(), info.mtime_ns))
            self.db.executemany("INSERT INTO keys VALUES (?, ?)", ((k, info.name) for k in keys))

    def forget_parts(self, names: Iterable[str]) -> None:
        """Drop parts (and their keys) from the manifest: their rows are generated again."""
        with self._tx():
            for name in names:
                self.db.execute("DELETE FROM keys WHERE part = ?", (name,))
                self.db.execute("DELETE FROM parts WHERE name = ?", (name,))

    def parts(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM parts ORDER BY name")
        return [dict(r, statuses=self._json(r["statuses"], "parts.statuses")) for r in rows]

    def next_part_number(self) -> int:
        numbers = [part_number(p["name"]) for p in self.parts()]
        return max((n for n in numbers if n is not None), default=-1) + 1

    def totals(self) -> dict[str, Any]:
        """Committed rows, parts and rows per status."""
        statuses: dict[str, int] = {}
        rows = 0
        parts = self.parts()
        for p in parts:
            rows += p["rows"]
            for k, v in p["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        return {"rows": rows, "parts": len(parts), "statuses": statuses}

    # --- runs ------------------------------------------------------------------------------------
    def start_run(self, run_id: str, *, engine: Mapping[str, Any], input: Mapping[str, Any],
                  predicted_tps: float | None, load_seconds: float) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO runs (run_id, started, status, engine, input, predicted_tps, load_seconds, pid, host) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (run_id, now_iso(), json.dumps(engine, default=str), json.dumps(input), predicted_tps,
                 load_seconds, os.getpid(), socket.gethostname()))

    def end_run(self, run_id: str, *, status: str, rows: int, gen_tokens: int, seconds: float,
                engine_seconds: float, overhead_seconds: float) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE runs SET ended = ?, status = ?, rows = ?, gen_tokens = ?, seconds = ?, "
                "engine_seconds = ?, overhead_seconds = ? WHERE run_id = ?",
                (now_iso(), status, rows, gen_tokens, seconds, engine_seconds, overhead_seconds, run_id))

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT * FROM runs ORDER BY started, rowid")]

    def key_counts(self) -> dict[str, int]:
        """Committed keys per part name (a part the parts table lacks may appear: dangling keys)."""
        return {r[0]: r[1] for r in self._read("SELECT part, count(*) FROM keys GROUP BY part")}

    def replace_keys(self, part: str, keys: Sequence[str]) -> None:
        """Make ``keys`` exactly the keys of ``part`` (rebuilt from its file); a key another part
        already holds makes the manifest inconsistent beyond repair (an OutputError)."""
        try:
            with self.db:
                self.db.execute("DELETE FROM keys WHERE part = ?", (part,))
                self.db.executemany("INSERT INTO keys VALUES (?, ?)", ((k, part) for k in keys))
        except sqlite3.IntegrityError:
            raise OutputError(f"{self.path}: a key of {part} is recorded for another part too; the manifest is "
                              "inconsistent: restore it from a backup, or run with --restart") from None
        except sqlite3.Error as e:
            raise manifest_error(self.path, e) from None

    def forget_keys_of(self, parts: Iterable[str]) -> None:
        """Drop keys that name a part the manifest does not list (their rows are generated again)."""
        with self._tx():
            for name in parts:
                self.db.execute("DELETE FROM keys WHERE part = ?", (name,))


def prepare_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or refuse a directory that is not ours (it would be cleaned)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_own_files(out_dir)
        probe = out_dir / ".write-test"
        probe.unlink(missing_ok=True)
        try:
            os.close(open_nofollow(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass  # a run starting at the same moment made it
        probe.unlink(missing_ok=True)  # ... and may have removed it
    except OSError as e:
        if e.errno == errno.ENOSPC or disk_full(out_dir if out_dir.is_dir() else out_dir.parent):
            raise OutputError(f"{out_dir}: the disk is full ({e.strerror}); committed parts are intact: free space "
                              "and run the same command again to resume") from None
        raise OutputError(f"{out_dir}: cannot write the output directory ({e.strerror}); "
                          "choose another --output") from None
    if not (out_dir / MANIFEST).exists() and not (out_dir / MANIFEST).is_symlink():
        foreign = [p.name for p in out_dir.iterdir() if p.name not in OWN_FILES
                   and part_number(p.name.removesuffix(".tmp")) is None and parse_rank_dir(p.name) is None]
        if foreign:
            raise OutputError(f"{out_dir}: not empty and not a corpusgen output directory (holds {foreign[0]!r}); "
                              "choose another --output")


def rank_dirs(out_dir: Path) -> list[tuple[Path, int, int]]:
    """The ``rank-<r>-of-<w>`` directories of a data-parallel job (corpusgen.job.ranks), as
    (path, rank, world), ordered by world then rank."""
    found = []
    for p in Path(out_dir).iterdir() if Path(out_dir).is_dir() else ():
        rw = parse_rank_dir(p.name)
        if rw is not None and p.is_dir():
            found.append((p, *rw))
    return sorted(found, key=lambda t: (t[2], t[1]))


def manifest_dirs(out_dir: Path) -> list[tuple[Path, int, int]]:
    """Every directory of a job that holds a manifest, as (path, rank, world): DIR itself
    (rank 0 of 1: a single process, and the job record of every launch) and each rank directory."""
    out = Path(out_dir)
    top = [(out, 0, 1)] if (out / MANIFEST).is_file() else []
    return top + [t for t in rank_dirs(out) if (t[0] / MANIFEST).is_file()]


def check_not_lost(out_dir: Path, manifest: Manifest) -> None:
    """Part files next to a manifest that knows no job: the manifest was lost, emptied or replaced
    (a run creates the manifest before its first part). Refused: cleaning would delete every part."""
    if manifest.job() is None:
        on_disk = sorted(p.name for p in out_dir.iterdir() if part_number(p.name) is not None)
        if on_disk:
            raise OutputError(f"{out_dir}: holds {len(on_disk)} part files ({on_disk[0]}, ...) but {MANIFEST} knows "
                              "no job: the manifest was lost or replaced. Restore it from a backup, or run with "
                              "--restart to move these files aside and start over")


def move_aside(out_dir: Path) -> Path:
    """``--restart``: move every file of ``out_dir`` but the lock into ``<dir>.old-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest, n = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}"), n + 1
    dest.mkdir()
    for p in out_dir.iterdir():
        if p.name != LOCK:
            os.replace(p, dest / p.name)
    return dest
