"""Reading an output directory: ``corpusgen status`` and ``corpusgen sql``.

Every reader verifies what it serves (docs/reliability.md): each committed part must be on disk,
a regular file, of its committed size — and of its committed sha256 when asked (``--verify``;
``sql`` by default), or when its modification time differs from the one recorded at its commit.
A missing or damaged part is refused with one line saying how to repair it, never served.

``sql`` is read-only: an in-memory DuckDB whose views are made first, after which file access is
limited to the committed parts and the job's input (``allowed_paths``/``allowed_directories`` with
``enable_external_access`` off), extensions can be neither installed nor loaded, nothing spills to
disk, and the configuration is locked; only SELECT statements run (``COPY``, ``ATTACH``, ``SET``,
``CREATE``, ``INSTALL``, ``LOAD``, ``PRAGMA``, ``CALL`` … are refused before they run).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Mapping, Sequence

from corpusgen.errors import OutputError, QueryError
from corpusgen.job.lock import open_nofollow, own_file_problem, read_lock, written_elsewhere
from corpusgen.job.manifest import MANIFEST, PROGRESS, Manifest, manifest_dirs
from corpusgen.job.parts import MISSING, damaged_part_error, part_problem
from corpusgen.job.writer import part_number


def verify_for_reading(d: Path, parts: Sequence[Mapping[str, Any]], *, sha256: bool | None) -> None:
    """Refuse to serve a directory whose committed parts are missing or damaged (see the module
    docstring for when the sha256 is compared)."""
    for p in parts:
        path = d / p["name"]
        why = part_problem(path, p, sha256=sha256)
        if why == MISSING:
            raise OutputError(f"{path}: committed part is missing; its {p['rows']} rows cannot be served. Run the job "
                              "again (corpusgen run JOB.yaml with this --output) to generate them again")
        if why is not None:
            raise damaged_part_error(path, p, why)


def _check_manifest_file(out: Path) -> None:
    """DIR/manifest.sqlite exists and is a regular file (not a link, not a directory)."""
    if not os.path.lexists(out / MANIFEST):
        raise OutputError(f"{out}: no {MANIFEST}; pass the output directory of a corpusgen run")
    why = own_file_problem(out / MANIFEST)
    if why is not None:
        raise OutputError(f"{out / MANIFEST} {why}, not the manifest corpusgen wrote: replace it with the file "
                          "itself (restore it from a backup)")


def _read_progress(d: Path) -> dict[str, Any]:
    """progress.json of a directory, or {} when absent, unreadable or not a regular file (a link is
    not followed: it is information only, rewritten by each run)."""
    try:
        fd = open_nofollow(d / PROGRESS, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        data = os.read(fd, 1 << 20) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        info = json.loads(data.decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return info if isinstance(info, dict) else {}


def _dir_status(d: Path, rank: int, world: int, *, verify: bool) -> dict[str, Any]:
    """Figures of one manifest directory: DIR itself, or one rank's."""
    progress = _read_progress(d)
    lock = read_lock(d) or {}
    if written_elsewhere(lock):
        job, runs = None, []
        totals = {"rows": progress.get("rows_done", 0), "statuses": progress.get("statuses", {}),
                  "parts": sum(1 for p in d.iterdir() if part_number(p.name) is not None)}
    else:
        m = Manifest(d, readonly=True)
        try:
            job, totals, runs, parts = m.job(), m.totals(), m.runs(), m.parts()
        finally:
            m.close()
        verify_for_reading(d, parts, sha256=True if verify else None)
    last = runs[-1] if runs else None
    reason = None
    if lock.get("alive"):
        state = "running"
    elif last is None:
        state = "not started"
    elif last["status"] == "running":
        # the run never recorded its end in the manifest: killed ("dead"), unless it could still
        # note it in the lock (the manifest was not writable: a full disk)
        noted = lock.get("status") if lock.get("run_id") == last["run_id"] else None
        state = noted if noted in ("failed", "interrupted", "finished") else "dead"
    else:
        state = last["status"]
    if last is not None and state in ("failed", "interrupted") and lock.get("run_id") == last["run_id"]:
        reason = lock.get("reason")
    return {
        "dir": "." if world == 1 else d.name, "rank": rank, "world": world, "state": state, "reason": reason,
        "job": job, "rows_done": totals["rows"], "parts": totals["parts"], "statuses": totals["statuses"],
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


def job_status(out_dir: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """Figures of a running or stopped job, from disk: progress, totals, lock holders, runs.

    Refuses (OutputError) when a committed part is missing or damaged: its size is always compared,
    its sha256 with ``verify`` or when the file was modified after its commit.

    A data-parallel job (corpusgen.job.ranks) is summed over every manifest of DIR; ``ranks`` has one
    entry per directory that ran. The state is that of the latest launch (its world size): running
    while any process holds a lock, else the worst of its ranks (dead, failed, interrupted, finished)."""
    out = Path(out_dir)
    _check_manifest_file(out)
    try:
        dirs = [_dir_status(*t, verify=verify) for t in manifest_dirs(out)]
    except OSError as e:  # an unreadable directory or file that no check above named
        raise OutputError(f"{e.filename or out}: cannot read it ({e.strerror})") from None
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
        "output_dir": str(out), "state": state,
        "reason": next((d["reason"] for d in latest if d["state"] == state and d["reason"]), None), "name": (top["job"] or {}).get("spec", {}).get("name"),
        "fingerprint": (top["job"] or {}).get("fingerprint"), "rows_done": rows_done, "rows_total": rows_total,
        "parts": sum(d["parts"] for d in dirs), "statuses": statuses,
        "failures": {k: v for k, v in statuses.items() if k != "ok"},
        "gen_tokens": sum(d["gen_tokens"] for d in dirs), **rates, "eta_s": eta, "stale_keys": top["stale_keys"],
        "updated": max((d["updated"] for d in dirs if d["updated"]), default=None),
        "lock": top["lock"], "world": world, "ranks": [{k: d[k] for k in keep} for d in ran],
        "runs": sorted((r for d in dirs for r in d["runs"]), key=lambda r: (r["started"], r["rank"])),
    }


def connect_sql(out_dir: str | Path, *, verify: bool = True):
    """A read-only DuckDB connection with views ``outputs`` (committed parts), ``inputs`` (the last
    run's input, when it is still readable), ``runs`` and ``parts`` (from the manifests: DIR's and,
    for a data-parallel job, every rank's, with ``rank`` and ``world`` columns).

    Every part it serves matches its committed size and (with ``verify``, the default) sha256, else
    OutputError. Run queries with :func:`run_query`, which accepts only SELECT statements."""
    out = Path(out_dir)
    _check_manifest_file(out)
    try:
        return _connect(out, verify)
    except OSError as e:
        raise OutputError(f"{e.filename or out}: cannot read it ({e.strerror})") from None


def _connect(out: Path, verify: bool):
    import duckdb
    import pyarrow as pa

    from corpusgen.job.writer import output_schema

    m = Manifest(out, readonly=True)
    try:
        job = m.job()
    finally:
        m.close()
    parts, runs = [], []
    for d, rank, world in manifest_dirs(out):  # DIR, then each rank's directory of a data-parallel job
        prefix = "" if d == out else d.name + "/"
        if written_elsewhere(read_lock(d) or {}):  # its complete files so far (a part is renamed when complete)
            parts += [{"name": prefix + p.name, "rows": _num_rows(p), "rank": rank, "world": world}
                      for p in sorted(d.iterdir()) if part_number(p.name) is not None]
            continue
        m = Manifest(d, readonly=True)
        try:
            mine, more_runs = m.parts(), m.runs()
        finally:
            m.close()
        verify_for_reading(d, mine, sha256=True if verify else None)
        parts += [{**p, "name": prefix + p["name"], "rank": rank, "world": world} for p in mine]
        runs += [{**r, "rank": rank, "world": world} for r in more_runs]
    runs.sort(key=lambda r: (r["started"], r["rank"]))
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    files = [str(out / p["name"]) for p in parts]
    try:
        if files:
            con.execute(f"CREATE VIEW outputs AS SELECT * FROM read_parquet({_sql_list(files)})")
        else:
            from corpusgen.job.columns import typed_fields

            schema = job["spec"].get("output", {}).get("schema") if job else None
            con.register("outputs", output_schema(schema is not None, typed_fields(schema)).empty_table())
    except duckdb.Error as e:
        raise OutputError(f"{out}: a committed part cannot be read ({str(e).splitlines()[0]}); run "
                          "`corpusgen status --verify` on it to find which") from None
    con.register("runs", pa.Table.from_pylist(runs) if runs else pa.table({"run_id": pa.array([], pa.string())}))
    columns = list(dict.fromkeys(k for p in parts for k in p))  # parts read from files lack some columns
    con.register("parts", pa.Table.from_pylist([{**{k: p.get(k) for k in columns}, "statuses": json.dumps(
        p.get("statuses"))} for p in parts]) if parts else pa.table({"name": pa.array([], pa.string())}))
    readable_paths, readable_dirs = list(files), []
    if runs and runs[-1].get("input"):
        readable = _inputs_view(con, runs[-1]["input"])
        readable_paths += readable[0]
        readable_dirs += readable[1]
    _lock_down(con, readable_paths, readable_dirs)
    return con


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except Exception as e:  # noqa: BLE001 - a part being written elsewhere may be unreadable for many reasons
        raise OutputError(f"{path}: cannot read this part ({str(e).splitlines()[0]})") from None


def _lock_down(con: Any, paths: Sequence[str], dirs: Sequence[str]) -> None:
    """From here on the connection reads only ``paths`` and files under ``dirs`` (the parts and the
    input the views were made over), writes nothing (no spilling either), loads no extension, and
    cannot change its settings."""
    con.execute("SET temp_directory = ''")
    if paths:
        con.execute(f"SET allowed_paths = {_sql_list(paths)}")
    if dirs:
        con.execute(f"SET allowed_directories = {_sql_list(dirs)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_query(con: Any, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``query`` on a :func:`connect_sql` connection; (columns, rows) of its last statement.

    Only SELECT statements (``WITH``, ``FROM …``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``VALUES``)
    run; anything else is refused before any statement runs. Failures are one-line QueryErrors."""
    import duckdb

    hint = "views are outputs, inputs, runs, parts"
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(f"query failed: {_first_line(e)}; {hint}") from None
    if not statements:
        raise QueryError(f"the query is empty; {hint}")
    for st in statements:
        if st.type != duckdb.StatementType.SELECT:
            kind = st.type.name if hasattr(st.type, "name") else str(st.type)
            raise QueryError(f"corpusgen sql is read-only: only SELECT queries run, not {kind} "
                             f"({st.query.strip()[:60]!r}); {hint}")
    try:
        result = None
        for st in statements:
            result = con.sql(st.query)
        if result is None:
            return [], []
        return list(result.columns), result.fetchall()
    except duckdb.Error as e:  # also while fetching: a part damaged after it was verified (or not hashed)
        if ".parquet" in str(e):
            hint = "a part may be damaged: `corpusgen status DIR --verify` checks every part"
        raise QueryError(f"query failed: {_first_line(e)}; {hint}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _sql_list(items: Sequence[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _inputs_view(con: Any, recorded: str) -> tuple[list[str], list[str]]:
    """Make the ``inputs`` view over the last run's input, when it is still readable; return the
    paths and directories it reads (for the lockdown). An input that moved or changed leaves no view."""
    from corpusgen.job.spec import InputSpec

    try:
        inp = json.loads(recorded)
        spec = InputSpec(**{**inp, "columns": tuple(inp.get("columns") or ())})
        fmt = spec.resolved_format()
        path = os.path.abspath(spec.path)
        if fmt == "parquet":
            if Path(path).is_dir():
                con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_parquet({_sql_str(path + '/**/*.parquet')})")
                return [], [path]
            if any(ch in path for ch in "*?["):  # a glob: the directory above its first wildcard
                fixed = path[:min(path.index(ch) for ch in "*?[" if ch in path)]
                con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_parquet({_sql_str(path)})")
                return [], [os.path.dirname(fixed) or "/"]
            con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_parquet({_sql_str(path)})")
        elif fmt == "csv":
            con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_csv_auto({_sql_str(path)})")
        elif fmt == "jsonl":
            con.execute(f"CREATE VIEW inputs AS SELECT * FROM read_json_auto({_sql_str(path)}, "
                        "format='newline_delimited')")
        elif fmt == "duckdb":
            con.execute(f"ATTACH {_sql_str(path)} AS input_db (READ_ONLY)")
            if spec.query:
                import duckdb

                statements = con.extract_statements(spec.query)
                if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                    return [], []  # only one SELECT becomes a view: nothing else runs before the lockdown
                # the query names the database's tables unqualified: look there first, then here
                con.execute("SET search_path = 'input_db.main,memory.main'")
                con.execute(f"CREATE VIEW memory.main.inputs AS {spec.query}")
                return [path], []
            table = spec.table
            if table is None:
                tables = [r[0] for r in con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'input_db'").fetchall()]
                table = tables[0] if len(tables) == 1 else None
            if table is not None:
                con.execute(f'CREATE VIEW inputs AS SELECT * FROM input_db.main."{table}"')
        return [path], []
    except Exception:  # noqa: BLE001 - the input may have moved since the run; outputs still work
        return [], []
