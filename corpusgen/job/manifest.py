"""The output directory's memory: committed parts and keys, the job fingerprint, runs, the lock.

``manifest.sqlite`` (SQLite, WAL) is the single source of truth of what is done: a part counts
once its row and its keys are committed in one transaction, after the file was renamed into place.
Part files the manifest does not list (a crash between rename and commit) and ``*.tmp`` files are
deleted by the next run. Before a run resumes, the manifest passes ``PRAGMA quick_check`` and each
committed part its size and sha256 (:func:`verify_parts`): damage is refused, never accepted.
The lock is an ``fcntl.flock`` on ``lock`` (pid, hostname and start time written inside); the
kernel releases it when the holder dies, so a stale lock never blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from corpusgen.errors import LockedError, OutputError
from corpusgen.job.ranks import parse_rank_dir
from corpusgen.job.writer import PartInfo, part_number

MANIFEST = "manifest.sqlite"
LOCK = "lock"
PROGRESS = "progress.json"
OWN_FILES = (MANIFEST, MANIFEST + "-wal", MANIFEST + "-shm", MANIFEST + "-journal", LOCK, PROGRESS,
             PROGRESS + ".tmp", ".write-test")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY CHECK (id = 1), fingerprint TEXT NOT NULL, fields TEXT NOT NULL,
    spec TEXT NOT NULL, tokenizer TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY, rows INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    statuses TEXT NOT NULL, run_id TEXT NOT NULL, committed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, part TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started TEXT NOT NULL, ended TEXT, status TEXT NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, gen_tokens INTEGER NOT NULL DEFAULT 0, seconds REAL,
    engine_seconds REAL, overhead_seconds REAL, load_seconds REAL, engine TEXT, input TEXT,
    predicted_tps REAL, pid INTEGER, host TEXT);
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """SQLite manifest of one output directory."""

    def __init__(self, out_dir: Path, *, readonly: bool = False):
        self.path = Path(out_dir) / MANIFEST
        try:
            if readonly:
                if not self.path.is_file():
                    raise OutputError(f"{out_dir}: no {MANIFEST}; is this a corpusgen output directory?")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
                self.db.execute("PRAGMA schema_version").fetchone()  # reads the header: "not a database"?
            else:
                self.db = sqlite3.connect(self.path, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                # a damaged manifest is refused before a run reads or writes it
                bad = self.db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if bad != "ok":
                    raise sqlite3.DatabaseError(bad)
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            self.close_quietly()
            raise OutputError(f"{self.path}: the manifest is damaged or unreadable ({e}); restore it from a "
                              "backup, or run with --restart to move this directory aside and start over") from None
        self.db.row_factory = sqlite3.Row

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
        self.db.close()

    # --- job ---------------------------------------------------------------------------------
    def job(self) -> dict[str, Any] | None:
        """The stored job (fingerprint, fields, spec, tokenizer, created) or None when new."""
        row = self.db.execute("SELECT * FROM job WHERE id = 1").fetchone()
        if row is None:
            return None
        d = dict(row)
        d["fields"], d["spec"] = json.loads(d["fields"]), json.loads(d["spec"])
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
            found.update(self.db.execute(q, chunk).fetchall())
        return found

    def commit_part(self, info: PartInfo, keys: Iterable[str], run_id: str) -> None:
        """Record a renamed part and its keys in one transaction (the commit point of its rows)."""
        with self._tx():
            self.db.execute("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (info.name, info.rows, info.size, info.sha256, json.dumps(dict(info.statuses)),
                             run_id, now_iso()))
            self.db.executemany("INSERT INTO keys VALUES (?, ?)", ((k, info.name) for k in keys))

    def forget_parts(self, names: Iterable[str]) -> None:
        """Drop parts (and their keys) from the manifest: their rows are generated again."""
        with self._tx():
            for name in names:
                self.db.execute("DELETE FROM keys WHERE part = ?", (name,))
                self.db.execute("DELETE FROM parts WHERE name = ?", (name,))

    def parts(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM parts ORDER BY name").fetchall()
        return [dict(r, statuses=json.loads(r["statuses"])) for r in rows]

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
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY started, run_id").fetchall()]


def prepare_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or refuse a directory that is not ours (it would be cleaned)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # a run starting at the same moment may have removed it
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot write the output directory ({e.strerror}); "
                          "choose another --output") from None
    if not (out_dir / MANIFEST).exists():
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


def verify_parts(out_dir: Path, manifest: Manifest) -> list[str]:
    """Check every committed part against its size and sha256 in the manifest before resuming.

    A damaged part, or part files next to a manifest that knows no job (it was lost or replaced),
    raise OutputError saying what to do; never silently accepted. Returns the committed parts whose
    file is missing (the caller forgets them so that their rows are generated again).
    """
    check_not_lost(out_dir, manifest)
    parts = manifest.parts()
    missing = []
    for p in parts:
        path = out_dir / p["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            missing.append(p["name"])
            continue
        why = None
        if size != p["size"]:
            why = f"{size} bytes, committed with {p['size']}"
        elif _sha256(path) != p["sha256"]:
            why = "its contents changed since it was committed (sha256 differs)"
        if why is not None:
            raise OutputError(f"{path}: committed part is damaged ({why}); its {p['rows']} rows cannot be trusted. "
                              "Restore it from a backup, or delete it and run again to generate those rows again")
    return missing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_orphans(out_dir: Path, manifest: Manifest) -> list[str]:
    """Delete part files the manifest does not list and leftover ``.tmp`` files; return their names."""
    known = {p["name"] for p in manifest.parts()}
    removed = []
    for p in sorted(out_dir.iterdir()):
        if p.name.endswith(".tmp") or (part_number(p.name) is not None and p.name not in known):
            p.unlink()
            removed.append(p.name)
    return removed


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


class OutputLock:
    """Exclusive lock of an output directory for the lifetime of a run."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        with contextlib.suppress(OSError):  # who holds it is information; a full disk must not stop here
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}).encode())
            os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file keeps the last holder's info
            self.fd = None


def read_lock(out_dir: Path) -> dict[str, Any] | None:
    """The last lock holder's info plus ``alive``: whether a process holds the lock now."""
    path = Path(out_dir) / LOCK
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError:
        info = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        info["alive"] = False
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        info["alive"] = True
    finally:
        os.close(fd)
    return info


# --- reading an output directory (status, SQL) ---------------------------------------------------

def written_elsewhere(lock: Mapping[str, Any]) -> bool:
    """Whether a live process on another machine holds this lock (a rank of a multi-node job).

    Its manifest is then not opened from here: SQLite's WAL index is shared memory, which a network
    filesystem does not keep coherent between machines; its progress.json and part files are read."""
    return bool(lock.get("alive")) and lock.get("host") not in (None, socket.gethostname())


def _dir_status(d: Path, rank: int, world: int) -> dict[str, Any]:
    """Figures of one manifest directory: DIR itself, or one rank's."""
    try:
        progress = json.loads((d / PROGRESS).read_text())
    except (FileNotFoundError, ValueError):
        progress = {}
    lock = read_lock(d) or {}
    if written_elsewhere(lock):
        job, runs = None, []
        totals = {"rows": progress.get("rows_done", 0), "statuses": progress.get("statuses", {}),
                  "parts": sum(1 for p in d.iterdir() if part_number(p.name) is not None)}
    else:
        m = Manifest(d, readonly=True)
        try:
            job, totals, runs = m.job(), m.totals(), m.runs()
        finally:
            m.close()
    last = runs[-1] if runs else None
    if lock.get("alive"):
        state = "running"
    elif last is None:
        state = "not started"
    elif last["status"] == "running":
        state = "dead"  # the run never recorded its end: killed
    else:
        state = last["status"]
    return {
        "dir": "." if world == 1 else d.name, "rank": rank, "world": world, "state": state, "job": job,
        "rows_done": totals["rows"], "parts": totals["parts"], "statuses": totals["statuses"],
        "gen_tokens": sum(r["gen_tokens"] or 0 for r in runs) + (progress.get("gen_tokens", 0)
                                                                if state in ("running", "dead") else 0),
        "rows_total": progress.get("input_rows", progress.get("rows_total")),
        "tokens_per_s": progress.get("tokens_per_s"), "rows_per_s": progress.get("rows_per_s"),
        "eta_s": progress.get("eta_s") if state == "running" else None, "updated": progress.get("updated"),
        "stale_keys": progress.get("stale_keys"),
        "lock": {k: lock.get(k) for k in ("pid", "host", "started", "alive")} if lock else None,
        "runs": [{**r, "rank": rank, "world": world} for r in runs],
    }


_STATE_ORDER = ("running", "dead", "failed", "interrupted", "finished", "not started")


def _state_rank(state: str) -> int:
    return _STATE_ORDER.index(state) if state in _STATE_ORDER else len(_STATE_ORDER)


def job_status(out_dir: str | Path) -> dict[str, Any]:
    """Figures of a running or stopped job, from disk: progress, totals, lock holders, runs.

    A data-parallel job (corpusgen.job.ranks) is summed over every manifest of DIR; ``ranks`` has one
    entry per directory that ran. The state is that of the latest launch (its world size): running
    while any process holds a lock, else the worst of its ranks (dead, failed, interrupted, finished)."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise OutputError(f"{out}: no {MANIFEST}; pass the output directory of a corpusgen run")
    dirs = [_dir_status(*t) for t in manifest_dirs(out)]
    top = dirs[0]
    ran = [d for d in dirs if d["runs"]] or [top]
    world = max(ran, key=lambda d: (d["runs"][-1]["started"] if d["runs"] else "", d["world"]))["world"]
    latest = [d for d in ran if d["world"] == world]
    alive = [d for d in dirs if (d["lock"] or {}).get("alive")]
    state = "running" if alive else min((d["state"] for d in latest), key=_state_rank)
    statuses: dict[str, int] = {}
    for d in dirs:
        for k, v in d["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    rows_done = sum(d["rows_done"] for d in dirs)
    rows_total = next((d["rows_total"] for d in sorted(latest, key=lambda d: d["updated"] or "", reverse=True)
                       if d["rows_total"] is not None), None)
    rates = {k: [d[k] for d in latest if d[k] is not None] for k in ("tokens_per_s", "rows_per_s")}
    rates = {k: round(sum(v), 3) if v else None for k, v in rates.items()}
    eta = None
    if state == "running" and world == 1:
        eta = latest[0]["eta_s"]
    elif state == "running" and rows_total is not None:
        rate = sum(d["rows_per_s"] or 0 for d in latest if d["state"] == "running")
        eta = round(max(rows_total - rows_done, 0) / rate, 1) if rate > 0 else None
    keep = ("dir", "rank", "world", "state", "rows_done", "parts", "tokens_per_s", "rows_per_s", "updated", "lock")
    return {
        "output_dir": str(out), "state": state, "name": (top["job"] or {}).get("spec", {}).get("name"),
        "fingerprint": (top["job"] or {}).get("fingerprint"), "rows_done": rows_done, "rows_total": rows_total,
        "parts": sum(d["parts"] for d in dirs), "statuses": statuses,
        "failures": {k: v for k, v in statuses.items() if k != "ok"},
        "gen_tokens": sum(d["gen_tokens"] for d in dirs), **rates, "eta_s": eta, "stale_keys": top["stale_keys"],
        "updated": max((d["updated"] for d in dirs if d["updated"]), default=None),
        "lock": top["lock"], "world": world, "ranks": [{k: d[k] for k in keep} for d in ran],
        "runs": sorted((r for d in dirs for r in d["runs"]), key=lambda r: (r["started"], r["rank"])),
    }


def connect_sql(out_dir: str | Path):
    """A DuckDB connection with views ``outputs`` (committed parts), ``inputs`` (the last run's
    input, when it is still readable), ``runs`` and ``parts`` (from the manifests: DIR's and, for a
    data-parallel job, every rank's, with ``rank`` and ``world`` columns)."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpusgen.job.writer import output_schema

    out = Path(out_dir)
    m = Manifest(out, readonly=True)
    try:
        job = m.job()
    finally:
        m.close()
    parts, runs = [], []
    for d, rank, world in manifest_dirs(out):  # DIR, then each rank's directory of a data-parallel job
        prefix = "" if d == out else d.name + "/"
        if written_elsewhere(read_lock(d) or {}):  # its complete files so far (a part is renamed when complete)
            parts += [{"name": prefix + p.name, "rows": pq.read_metadata(p).num_rows, "rank": rank, "world": world}
                      for p in sorted(d.iterdir()) if part_number(p.name) is not None]
            continue
        m = Manifest(d, readonly=True)
        try:
            parts += [{**p, "name": prefix + p["name"], "rank": rank, "world": world} for p in m.parts()]
            runs += [{**r, "rank": rank, "world": world} for r in m.runs()]
        finally:
            m.close()
    runs.sort(key=lambda r: (r["started"], r["rank"]))
    con = duckdb.connect()
    files = [str(out / p["name"]) for p in parts]
    if files:
        con.execute(f"CREATE VIEW outputs AS SELECT * FROM read_parquet({_sql_list(files)})")
    else:
        from corpusgen.job.columns import typed_fields

        schema = job["spec"].get("output", {}).get("schema") if job else None
        con.register("outputs", output_schema(schema is not None, typed_fields(schema)).empty_table())
    con.register("runs", pa.Table.from_pylist(runs) if runs else pa.table({"run_id": pa.array([], pa.string())}))
    columns = list(dict.fromkeys(k for p in parts for k in p))  # parts read from files lack some columns
    con.register("parts", pa.Table.from_pylist([{**{k: p.get(k) for k in columns}, "statuses": json.dumps(
        p.get("statuses"))} for p in parts]) if parts else pa.table({"name": pa.array([], pa.string())}))
    if runs and runs[-1].get("input"):
        _inputs_view(con, json.loads(runs[-1]["input"]))
    return con


def _sql_list(items: Sequence[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _inputs_view(con: Any, inp: Mapping[str, Any]) -> None:
    from corpusgen.job.spec import InputSpec

    spec = InputSpec(**{**inp, "columns": tuple(inp.get("columns") or ())})
    try:
        fmt = spec.resolved_format()
        path = spec.path
        if fmt == "parquet":
            src = f"{path.rstrip('/')}/**/*.parquet" if Path(path).is_dir() else path
            con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_parquet({_sql_str(src)})")
        elif fmt == "csv":
            con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_csv_auto({_sql_str(path)})")
        elif fmt == "jsonl":
            con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_json_auto({_sql_str(path)}, "
                        "format='newline_delimited')")
        elif fmt == "duckdb":
            con.execute(f"ATTACH {_sql_str(path)} AS input_db (READ_ONLY)")
            if spec.query:
                # the query names the database's tables unqualified: look there first, then here
                con.execute("SET search_path = 'input_db.main,memory.main'")
                con.execute(f"CREATE VIEW memory.main.inputs AS {spec.query}")
                return
            table = spec.table
            if table is None:
                tables = [r[0] for r in con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'input_db'").fetchall()]
                table = tables[0] if len(tables) == 1 else None
            if table is not None:
                con.execute(f'CREATE VIEW inputs AS SELECT * FROM input_db.main."{table}"')
    except Exception:  # noqa: BLE001 - the input may have moved since the run; outputs still work
        pass
