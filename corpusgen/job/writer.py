"""Output rows → Parquet parts with one Arrow schema fixed at job start, written atomically.

A part is written as ``part-NNNNN.parquet.tmp``, flushed and fsynced, renamed to
``part-NNNNN.parquet``, and the directory is fsynced; only then does the runner record it in the
manifest (corpusgen.job.manifest). A crash before the manifest commit leaves a file the manifest does
not know, which the next run deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from corpusgen.errors import OutputError

STATUSES = ("ok", "truncated", "schema_invalid", "prompt_too_long", "error")
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


@dataclass(frozen=True, kw_only=True)
class OutputRow:
    """One row of the output table."""

    key: str
    """The row key (input id, or ``<file>:<row>``)."""
    status: str
    """ok | truncated | schema_invalid | prompt_too_long | error."""
    text: str | None = None
    """Generated text (stop string and EOS removed); null when the row was not generated."""
    json: str | None = None
    """The parsed answer re-serialised as compact JSON (status ok with a schema), else null."""
    finish_reason: str | None = None
    """eos | stop | length | error; null when the row never reached the engine."""
    prompt_tokens: int = 0
    """Prompt length in tokens (after truncate_middle)."""
    gen_tokens: int = 0
    """Generated tokens."""
    prompt_cut: int = 0
    """Tokens truncate_middle removed from the document column (0 when untouched)."""
    error: str | None = None
    """Why the row is not ok (validation message, engine error, reader problem), else null."""
    run_id: str = ""
    """The run that generated the row."""
    typed: Mapping[str, Any] | None = None
    """Values of the typed answer columns (``out_*`` or ``out``, corpusgen.job.columns) of an ok row."""

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status


def output_schema(with_json: bool, typed: Sequence[pa.Field] = ()) -> pa.Schema:
    """The Arrow schema of every part of a job (``json`` only when the job has an output schema,
    followed by the ``typed`` answer columns of corpusgen.job.columns.typed_fields)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("json", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("gen_tokens", pa.int32(), nullable=False),
        pa.field("prompt_cut", pa.int32(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
    fields = [f for f in fields if with_json or f.name != "json"]
    at = [f.name for f in fields].index("json") + 1 if with_json else 3
    return pa.schema([*fields[:at], *typed, *fields[at:]])


@dataclass(frozen=True, kw_only=True)
class PartInfo:
    """A part file written and renamed into place (not yet in the manifest)."""

    name: str
    """File name, ``part-NNNNN.parquet``."""
    rows: int
    """Rows in the part."""
    size: int
    """Bytes on disk."""
    sha256: str
    """Hex digest of the file's bytes."""
    statuses: Mapping[str, int]
    """Rows per status."""
    mtime_ns: int | None = None
    """The file's modification time once renamed into place: a reader hashes a part whose mtime differs."""


def part_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def part_number(name: str) -> int | None:
    m = PART_RE.match(name)
    return int(m.group(1)) if m else None


def _nofollow(path: str, flags: int) -> int:
    """``open(..., opener=_nofollow)``: a file corpusgen writes is never opened through a symbolic link
    (``part-00003.parquet.tmp -> /elsewhere`` fails with ELOOP instead of overwriting the target)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ROW_FIELDS = frozenset(f.name for f in dataclass_fields(OutputRow))


def rows_table(rows: Sequence[OutputRow], schema: pa.Schema) -> pa.Table:
    """Rows as an Arrow table of ``schema``."""
    # getattr, not dataclasses.asdict: asdict deep-copies every value, which would dominate the writer
    cols = {name: [getattr(r, name) for r in rows] if name in _ROW_FIELDS else
            [(r.typed or {}).get(name) for r in rows] for name in schema.names}  # typed answer columns
    return pa.Table.from_pydict(cols, schema=schema)


def write_part(out_dir: Path, number: int, rows: Sequence[OutputRow], schema: pa.Schema) -> PartInfo:
    """Write ``rows`` as part ``number``: tmp file → fsync → rename → fsync the directory."""
    assert rows, "a part has at least one row"
    name = part_name(number)
    buf = io.BytesIO()
    pq.write_table(rows_table(rows, schema), buf, compression="zstd")
    data = buf.getvalue()
    tmp = out_dir / (name + ".tmp")
    try:
        with open(tmp, "wb", opener=_nofollow) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / name)
        fsync_dir(out_dir)
        mtime_ns = os.stat(out_dir / name).st_mtime_ns
    except OSError as e:  # a full disk, an I/O error: nothing of this part is committed
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"{out_dir / name}: cannot write the part ({e.strerror or e}); committed parts are intact: "
                          "free space (or fix the disk) and run the same command again to resume") from None
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return PartInfo(name=name, rows=len(rows), size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    statuses=statuses, mtime_ns=mtime_ns)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", opener=_nofollow) as f:
            f.write(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e}); committed parts are intact: "
                          "free space (or fix the disk) and run the same command again to resume") from None
