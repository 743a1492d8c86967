"""Row keys: one canonical string per id value, whatever its reader, batch or inferred type.

The rule (docs/output.md, "Keys"): an id is its text.

* a string is itself (bytes: decoded as UTF-8, invalid bytes as ``\\xNN`` escapes);
* an integer is its decimal digits (``-12``), at any size;
* a boolean is ``true`` or ``false``;
* a float that is integral and at most 2**53 in magnitude is the integer it equals (``1.0`` → ``1``);
  any other finite float is Python's shortest round-trip ``repr`` (``7.5``, ``1e-05``; a float32
  column's shortest float32 spelling); a decimal is its integer digits when integral, else its
  normalised text;
* refused, as that row's problem (status ``error``, key below): null, NaN, ±inf, a float beyond
  2**53 in magnitude (which integer it stood for was lost), a list or an object, and a string
  beginning with :data:`NO_ID` (reserved, below).

So ``1``, ``1.0`` and ``"1"`` are one id (the first row wins; later ones are duplicates, warned).
A row without a usable id is keyed ``(no id) <file>:<row>``: no id can produce that key. Without
``input.id`` every key is ``<file>:<row>``, ``<file>`` being the path relative to the input's
directory (the basename for a single file). Pure code: no torch.
"""

from __future__ import annotations

import decimal
import math
from typing import Any

import pyarrow as pa

from corpusgen.errors import InputError

NO_ID = "(no id) "
"""Prefix of the key of a row whose id is unusable; a real id starting with it is refused."""
MAX_EXACT_FLOAT = 2**53
"""Beyond this a float cannot tell consecutive integers apart: which id it was is lost."""


def fallback_key(label: str, row: int, *, with_id: bool) -> str:
    """The key of row ``row`` of file ``label``: ``<file>:<row>`` without input.id, else in the
    reserved ``(no id)`` namespace (the row's id was unusable)."""
    return f"{NO_ID}{label}:{row}" if with_id else f"{label}:{row}"


def check_id_type(typ: pa.DataType, column: str, where: str) -> None:
    """Refuse an id column whose Arrow type has no canonical text (timestamps, lists, structs…)."""
    t = typ.value_type if pa.types.is_dictionary(typ) else typ
    ok = (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
          or pa.types.is_large_binary(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
          or pa.types.is_decimal(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
          or str(t) in ("string_view", "binary_view"))
    if not ok:
        raise InputError(f"{where}: id column {column!r} has type {typ}; an id must be a string, integer, float, "
                         "decimal or boolean (store it as text, or key rows by another column)")


def canonical_id(value: Any, column: str, *, float32: bool = False) -> tuple[str | None, str | None]:
    """(key, None) for a usable id value, or (None, why not) — see the module docstring."""
    if value is None:
        return None, f"id column {column!r} is null"
    if isinstance(value, str):
        if value.startswith(NO_ID):
            return None, f"id {value[:60]!r} begins with {NO_ID!r}, reserved for rows without a usable id"
        return value, None
    if isinstance(value, bytes):
        return canonical_id(value.decode("utf-8", "backslashreplace"), column)
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"id column {column!r} holds {value!r}, which cannot key a row"
        if abs(value) > MAX_EXACT_FLOAT:
            return None, (f"id column {column!r} holds the float {value!r}, beyond 2**53: which integer it stood for "
                          "is lost; store such ids as integers or strings")
        if value.is_integer():
            return str(int(value)), None
        if float32:
            import numpy as np

            return str(np.float32(value)), None  # shortest text that reads back as this float32
        return repr(value), None
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None, f"id column {column!r} holds {value}, which cannot key a row"
        if value == value.to_integral_value():
            return str(int(value)), None
        return str(value.normalize()), None
    kind = {list: "a list", dict: "an object", tuple: "a list"}.get(type(value), type(value).__name__)
    return None, f"id column {column!r} holds {kind}, not a string, number or boolean"


def canonical_column(col: pa.Array, column: str) -> list[tuple[str | None, str | None]]:
    """:func:`canonical_id` of every value of an Arrow column (its type was checked)."""
    typ = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    f32 = pa.types.is_float32(typ) or pa.types.is_float16(typ)
    if pa.types.is_float16(typ):
        col = col.cast(pa.float32())  # float16 values come back as numpy scalars
    try:
        values = col.to_pylist()
    except (UnicodeDecodeError, pa.ArrowInvalid):  # a string column holding bytes that are not UTF-8
        values = col.cast(pa.binary()).to_pylist()
    return [canonical_id(v, column, float32=f32) for v in values]
