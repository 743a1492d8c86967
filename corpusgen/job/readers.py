"""Input corpora → a stream of keyed pyarrow record batches of bounded size.

Parquet (file, directory, glob), DuckDB (.duckdb with a table or query), CSV and JSONL are read
incrementally (never the whole file at once, corpusgen.job.sources), so memory stays flat for any
corpus size.
Each row gets a key (corpusgen.job.keys): the canonical text of its ``input.id`` value — the same
whatever the reader, the batch or the type inference — or ``<file>:<row number>`` (row numbers
start at 0 within each file). Problems of one row (an unusable id, a JSONL line that is not JSON)
travel with the batch in ``problems`` and become rows with status ``error``; problems of the whole
input (missing file or column, an id column of a type without text, empty input, unreadable
format) raise :class:`InputError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa

from corpusgen.errors import InputError, JobSpecError
from corpusgen.job.keys import canonical_column, check_id_type, fallback_key
from corpusgen.job.sources import SOURCES
from corpusgen.job.spec import InputSpec


@dataclass(frozen=True, kw_only=True)
class RowBatch:
    """Up to ``batch_rows`` input rows with their keys."""

    keys: list[str]
    """One key per row."""
    rows: pa.RecordBatch
    """The selected columns."""
    problems: list[str | None]
    """Per row: None, or why the row cannot be used (it is written with status ``error``)."""


class InputReader:
    """An opened input: its columns, its row count when cheap to know, and its batches."""

    def __init__(self, spec: InputSpec, *, columns: Sequence[str] | None = None, limit: int | None = None):
        if spec.path is None:
            raise InputError("no input given; set input.path in the job or pass --input PATH")
        if not any(ch in spec.path for ch in "*?[") and not os.path.exists(spec.path):
            raise InputError(f"{spec.path}: input not found (no such file or directory); check input.path or --input")
        try:
            self.format = spec.resolved_format()
        except JobSpecError as e:
            raise InputError(str(e)) from None
        self.spec = spec
        self.limit = limit
        self._source = SOURCES[self.format](spec)
        self.available: list[str] = self._source.columns()
        if not self.available:
            raise InputError(f"{spec.path}: the input is empty (no columns, no rows); "
                             "point --input at a non-empty corpus")
        self.columns: list[str] = []
        """The columns batches carry (set by :meth:`select`)."""
        self.select(columns if columns is not None else self.available)
        total = self._source.total_rows()
        self.total_rows: int | None = total if limit is None or total is None else min(total, limit)
        if total == 0:
            raise InputError(f"{spec.path}: the input has no rows; point --input at a non-empty corpus")

    def select(self, columns: Sequence[str]) -> None:
        """Read only ``columns`` (plus the id column); InputError names a missing one."""
        wanted = list(dict.fromkeys(columns))
        if self.spec.id is not None and self.spec.id not in wanted:
            wanted.append(self.spec.id)
        for col in wanted:
            if col not in self.available:
                where = "input.id" if col == self.spec.id else "input.columns"
                raise InputError(f"{self.spec.path}: no column {col!r} ({where}); "
                                 f"available columns: {', '.join(self.available)}")
        # at least one column, so that batches know their row count
        self.columns = wanted or self.available[:1]

    def batches(self) -> Iterator[RowBatch]:
        """Stream the input as RowBatches of at most ``batch_rows`` rows, stopping at ``limit``."""
        seen = 0
        for label, batch in self._source.batches(self.columns, self.spec.batch_rows):
            if self.limit is not None and seen + batch.num_rows > self.limit:
                batch = batch.slice(0, self.limit - seen)
            if batch.num_rows:
                keys, problems = self._keys(label, batch)
                yield RowBatch(keys=keys, rows=batch, problems=problems)
            seen += batch.num_rows
            if self.limit is not None and seen >= self.limit:
                return
        if seen == 0:
            raise InputError(f"{self.spec.path}: the input has no rows; point --input at a non-empty corpus")

    def _keys(self, label: tuple[str, int], batch: pa.RecordBatch) -> tuple[list[str], list[str | None]]:
        name, start = label
        problems: list[str | None] = [None] * batch.num_rows
        if "__problem__" in batch.schema.names:
            problems = batch.column("__problem__").to_pylist()
        col = self.spec.id
        if col is None:
            return [fallback_key(name, start + i, with_id=False) for i in range(batch.num_rows)], problems
        if "__id__" in batch.schema.names:  # JSONL: canonicalised from the parsed JSON values, row by row
            ids = [(k, None) for k in batch.column("__id__").to_pylist()]
        else:
            check_id_type(batch.schema.field(col).type, col, f"{self.spec.path}")
            ids = canonical_column(batch.column(col), col)
        keys = []
        for i, (key, why) in enumerate(ids):
            if key is None:
                keys.append(fallback_key(name, start + i, with_id=True))
                problems[i] = problems[i] or why or f"id column {col!r} is null"
            else:
                keys.append(key)
        return keys, problems


def open_input(spec: InputSpec, *, columns: Sequence[str] | None = None, limit: int | None = None) -> InputReader:
    """Open ``spec``'s input, checking that ``columns`` (and the id column) exist."""
    return InputReader(spec, columns=columns, limit=limit)


def batch_records(batch: RowBatch) -> list[dict[str, Any]]:
    """Rows of a batch as dicts (bytes that are valid UTF-8 become str; others stay bytes)."""
    cols = {}
    for name in batch.rows.schema.names:
        if name in ("__problem__", "__id__"):
            continue
        cols[name] = [_text(v) for v in _pylist(batch.rows.column(name))]
    return [{k: cols[k][i] for k in cols} for i in range(batch.rows.num_rows)]


def _pylist(col: pa.Array) -> list[Any]:
    """Values of a column; a string column holding bytes that are not UTF-8 gives bytes instead."""
    try:
        return col.to_pylist()
    except (UnicodeDecodeError, pa.ArrowInvalid):
        return col.cast(pa.binary()).to_pylist()


def _text(v: Any) -> Any:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    return v
