"""Input formats: one class per format that lists the input's columns, counts its rows when cheap,
and yields ``((file label, first row number), pyarrow.RecordBatch)`` of at most ``size`` rows.

corpusgen.job.readers turns these batches into keyed RowBatches. Files of a directory or glob are
read in sorted order; a file's label (in fallback keys) is its path relative to the input's
directory. JSONL carries each row's canonical id (``__id__``, corpusgen.job.keys) and problem
(``__problem__``) as extra columns, computed from the parsed JSON values, never from the type
pyarrow infers for a batch. The DuckDB connection reads the database's tables and nothing else.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from corpusgen.errors import InputError
from corpusgen.job.keys import canonical_id, check_id_type
from corpusgen.job.spec import InputSpec


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise InputError(f"{path}: the glob matches no files; check the pattern")
        return files
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise InputError(f"{path}: the directory holds no {'/'.join(suffixes)} files")
        return files
    if not p.exists():
        raise InputError(f"{path}: input not found; check input.path or --input")
    return [str(p)]


def _labels(path: str, files: list[str]) -> list[str]:
    """Each file's name in fallback keys: its path relative to the input's directory (the glob's
    fixed part), so that two files of one basename in subdirectories never share keys."""
    if any(ch in path for ch in "*?["):
        fixed = path[:min(path.index(ch) for ch in "*?[" if ch in path)]
        root = fixed if fixed.endswith(os.sep) else os.path.dirname(fixed)
    elif Path(path).is_dir():
        root = path
    else:
        return [os.path.basename(f) for f in files]
    return [os.path.relpath(f, root or ".") for f in files]


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    for b in batches:
        for off in range(0, b.num_rows, size):
            yield b.slice(off, size)


class _Parquet:
    def __init__(self, spec: InputSpec):
        import pyarrow.parquet as pq

        self.files = _files(spec.path, (".parquet", ".pq"))
        self.labels = _labels(spec.path, self.files)
        self._open = []
        for f in self.files:
            try:
                # no pre-buffering: it holds whole row groups in memory ahead of the batches
                self._open.append(pq.ParquetFile(f, pre_buffer=False))
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
            schema = self._open[-1].schema_arrow
            if spec.id is not None and spec.id in schema.names:  # every file's, before anything is generated
                check_id_type(schema.field(spec.id).type, spec.id, f)

    def columns(self) -> list[str]:
        return list(self._open[0].schema_arrow.names)

    def total_rows(self) -> int:
        return sum(pf.metadata.num_rows for pf in self._open)

    def batches(self, columns, size):
        for f, label, pf in zip(self.files, self.labels, self._open, strict=True):
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise InputError(f"{f}: no column {missing[0]!r}; "
                                 f"available columns: {', '.join(pf.schema_arrow.names)}")
            row = 0
            for b in _rebatch(pf.iter_batches(batch_size=size, columns=list(columns)), size):
                yield (label, row), b
                row += b.num_rows


_CSV_BLOCK, _CSV_MAX_BLOCK = 1 << 20, 1 << 30
"""Bytes the CSV reader parses at a time; a row larger than that is read again with 8× the block."""


class _Csv:
    def __init__(self, spec: InputSpec):
        self.files = _files(spec.path, (".csv",))
        self.labels = dict(zip(self.files, _labels(spec.path, self.files), strict=True))
        self._header = {}
        for f in self.files:
            try:
                # utf-8-sig: a byte order mark is not part of the first column's name (pyarrow drops it too)
                with open(f, newline="", encoding="utf-8-sig", errors="replace") as fh:
                    self._header[f] = next(csv.reader(fh), [])
            except OSError as e:
                raise InputError(f"{f}: cannot read ({e.strerror})") from None

    def columns(self) -> list[str]:
        return list(self._header[self.files[0]])

    def total_rows(self) -> None:
        return None  # counting would read the whole file

    def batches(self, columns, size):
        import pyarrow.csv as pcsv

        for f in self.files:
            if not self._header[f]:
                continue
            # binary columns: decoding happens per row, so a bad byte is a row problem, not a crash
            convert = pcsv.ConvertOptions(column_types={c: pa.binary() for c in self._header[f]},
                                          include_columns=list(columns), strings_can_be_null=False,
                                          quoted_strings_can_be_null=False)
            row, block = 0, _CSV_BLOCK
            while True:
                try:
                    # after a row too large for the block: again with a larger block, past the rows read
                    reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=block, skip_rows_after_names=row),
                                           parse_options=pcsv.ParseOptions(newlines_in_values=True),
                                           convert_options=convert)
                    for b in _rebatch(reader, size):
                        yield (self.labels[f], row), b
                        row += b.num_rows
                    break
                except pa.ArrowInvalid as e:
                    if "straddl" in str(e) and block < _CSV_MAX_BLOCK:
                        block *= 8
                        continue
                    raise InputError(f"{f}: not a readable CSV file ({str(e).splitlines()[0]})") from None


class _Jsonl:
    def __init__(self, spec: InputSpec):
        self.files = _files(spec.path, (".jsonl", ".ndjson"))
        self.labels = _labels(spec.path, self.files)
        self.id = spec.id
        self._cols: list[str] | None = None

    def columns(self) -> list[str]:
        if self._cols is None:
            # the keys of the first object that parses (columns may be absent in some rows → null)
            for f in self.files:
                with open(f, "rb") as fh:
                    for line in fh:
                        try:
                            obj = json.loads(line)
                        except (ValueError, RecursionError):
                            continue
                        if isinstance(obj, dict):
                            self._cols = list(obj)
                            return self._cols
            self._cols = []
        return self._cols

    def total_rows(self) -> None:
        return None

    def batches(self, columns, size):
        for f, label in zip(self.files, self.labels, strict=True):
            chunk: list[dict] = []
            start = 0
            with open(f, "rb") as fh:
                for lineno, line in enumerate(raw for raw in fh if raw.strip()):
                    chunk.append(_json_row(line, lineno, columns, self.id))
                    if len(chunk) == size:
                        yield (label, start), _pylist_batch(chunk, columns, self.id)
                        start += len(chunk)
                        chunk = []
            if chunk:
                yield (label, start), _pylist_batch(chunk, columns, self.id)


def _json_row(line: bytes, lineno: int, columns, id_col: str | None) -> dict:
    row = _json_values(line, lineno, columns)
    if id_col is not None:  # the key, from the JSON value itself: never from a type inferred per batch
        key, why = canonical_id(row.get(id_col), id_col)
        if key is not None and not _encodable(key):  # a lone surrogate escape: as the \xNN of bytes
            key = key.encode("utf-8", "backslashreplace").decode("utf-8")
        row["__id__"] = key
        if key is None and "__problem__" not in row:
            row["__problem__"] = why
    return row


def _json_values(line: bytes, lineno: int, columns) -> dict:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return {"__problem__": f"row {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"}
    except ValueError as e:
        return {"__problem__": f"row {lineno}: not valid JSON ({e})"}
    except RecursionError:
        return {"__problem__": f"row {lineno}: JSON nested too deeply"}
    if not isinstance(obj, dict):
        return {"__problem__": f"row {lineno}: expected a JSON object, got {type(obj).__name__}"}
    return {c: obj.get(c) for c in columns}


def _pylist_batch(chunk: list[dict], columns, id_col: str | None) -> pa.RecordBatch:
    extra = ["__id__"] if id_col is not None else []
    try:
        return _pylist_batch_of(chunk, columns, extra)
    except UnicodeEncodeError:  # JSON escapes of lone surrogates (\ud800) decode to text UTF-8 cannot hold
        return _pylist_batch_of([_without_surrogates(r) for r in chunk], columns, extra)


def _without_surrogates(row: dict) -> dict:
    """The row without its values that UTF-8 cannot encode, and a problem naming the first."""
    bad = [k for k, v in row.items() if k != "__id__" and not _encodable(v)]
    if not bad:
        return row
    clean = {k: v for k, v in row.items() if k not in bad}
    clean["__problem__"] = row.get("__problem__") or (
        f"column {bad[0]!r} is not valid Unicode (a lone UTF-16 surrogate escape such as \\ud800)")
    return clean


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pylist_batch_of(chunk: list[dict], columns, extra: list[str]) -> pa.RecordBatch:
    data = {}
    for c in columns:
        values = [r.get(c) for r in chunk]
        kinds = {type(v) for v in values if v is not None}
        try:
            if (int in kinds or bool in kinds) and float in kinds:
                raise pa.ArrowInvalid("ints with floats")  # promoted, 1 would read 1.0 in this batch only
            data[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # OverflowError: an integer beyond 64 bits
            # mixed types across rows: each value as the text a column of its own type would give
            data[c] = pa.array([None if v is None else _scalar_text(v) for v in values], pa.string())
    for c in extra:
        data[c] = pa.array([r.get(c) for r in chunk], pa.string())
    data["__problem__"] = pa.array([r.get("__problem__") for r in chunk], pa.string())
    return pa.RecordBatch.from_pydict(data)


def _scalar_text(v: Any) -> str:
    """A value of a JSONL column of mixed types as text: scalars as a typed column renders them
    (``1``, ``7.5``, ``True``), lists and objects as JSON."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float)):
        return str(v)
    return json.dumps(v, ensure_ascii=False)


class _DuckDB:
    def __init__(self, spec: InputSpec):
        import duckdb

        if not Path(spec.path).is_file():
            raise InputError(f"{spec.path}: input not found; check input.path or --input")
        try:
            self.con = duckdb.connect(spec.path, read_only=True)
            # input.query only reads this database: no file, no ATTACH, no COPY ... TO, no INSTALL/LOAD,
            # and the query cannot SET these back (locked)
            # (settings belong to the database instance, which DuckDB shares between connections of a process)
            if not self.con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
                for setting in ("autoinstall_known_extensions = false", "autoload_known_extensions = false",
                                "enable_external_access = false", "lock_configuration = true"):
                    self.con.execute(f"SET {setting}")
            assert not self.con.execute("SELECT current_setting('enable_external_access')").fetchone()[0]
        except duckdb.Error as e:
            raise InputError(f"{spec.path}: not a readable DuckDB database ({str(e).splitlines()[0]})") from None
        self.path = spec.path
        self.label = os.path.basename(spec.path)
        self.table = spec.table
        self.query = spec.query
        tables = [r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        if self.query is None:
            if self.table is None:
                if len(tables) != 1:
                    raise InputError(f"{spec.path}: holds tables {', '.join(tables) or '(none)'}; "
                                     "choose one with input.table / --table or give input.query")
                self.table = tables[0]
            elif self.table not in tables:
                raise InputError(f"{spec.path}: no table {self.table!r}; tables: {', '.join(tables) or '(none)'}")
            self.query = f'SELECT * FROM "{self.table}"'
        try:
            self.rel = self.con.sql(self.query)
            if self.rel is None:  # a statement without rows (SET, PRAGMA, CHECKPOINT ...)
                raise InputError("input.query returns no rows; it must be a SELECT over the database's tables")
        except duckdb.Error as e:
            raise InputError(self._failed(e)) from None
        if spec.id is not None and spec.id in self.rel.columns:
            check_id_type(self.rel.limit(0).arrow().schema.field(spec.id).type, spec.id, spec.path)

    def columns(self) -> list[str]:
        return list(self.rel.columns)

    def total_rows(self) -> int | None:
        if self.table is None:
            return None  # a query may be expensive to count
        return self.con.execute(f'SELECT count(*) FROM "{self.table}"').fetchall()[0][0]

    def _failed(self, e: Exception) -> str:
        what = str(e).splitlines()[0]
        if type(e).__name__ == "PermissionException":
            return (f"input.query may only read the tables of {self.path} ({what}); files, ATTACH, COPY ... TO "
                    "and INSTALL/LOAD are refused")
        return f"input.query failed: {what}; fix the SQL"

    def batches(self, columns, size):
        import duckdb

        cols = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
        try:
            rel = self.con.cursor().sql(f"SELECT {cols} FROM ({self.query})")
            reader = rel.to_arrow_reader(size) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(size)
            row = 0
            for b in _rebatch(iter(reader), size):
                yield (self.label, row), b
                row += b.num_rows
        except (duckdb.Error, pa.ArrowException) as e:  # a query that fails only when it runs
            raise InputError(self._failed(e)) from None


SOURCES = {"parquet": _Parquet, "csv": _Csv, "jsonl": _Jsonl, "duckdb": _DuckDB}
