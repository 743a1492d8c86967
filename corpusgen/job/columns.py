"""Typed output columns: the job's JSON Schema → Arrow fields (fixed at job start), answers → values.

The top level of the answer decides the shape of the table:

- an object with ``properties`` is flattened: property ``p`` becomes the column ``out_<p>``;
- anything else (an enum-only classification, an array, a scalar) becomes one column ``out``.

Each column gets the Arrow type of its schema (table in docs/output.md): string → string,
integer → int64, number → float64, boolean → bool, an enum or const of one JSON type → that type,
an array whose items map → list<item>, an object whose properties all map → struct (declared
properties only). ``{type: [T, "null"]}`` and ``anyOf``/``oneOf`` of T and null are T. Local
``$ref`` (``#/...``) are followed. Everything else — mixed types, free objects, other ``anyOf`` /
``oneOf`` / ``allOf``, recursion — is stored as JSON text (a string column whose field metadata says
``corpusgen.json: "1"``). Every typed column is nullable: a row that is not ``ok``, an optional
property that is absent and a JSON ``null`` are all SQL NULL (the ``json`` column tells them apart).

Pure code over pyarrow: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

PREFIX = "out_"
WHOLE = "out"
SOURCE = b"corpusgen.source"
"""Field metadata: the top-level property the column holds ("" = the whole answer)."""
AS_JSON = b"corpusgen.json"
"""Field metadata: "1" when the column holds JSON text rather than a typed value."""

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _json_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return None


class _Mapper:
    """JSON Schema → Arrow type, following local $refs of one root schema."""

    def __init__(self, root: Mapping[str, Any]):
        self.root = root

    def _deref(self, s: Any, seen: tuple[str, ...]) -> tuple[Any, tuple[str, ...]] | None:
        while isinstance(s, Mapping) and "$ref" in s:
            ref = s["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#") or ref in seen:
                return None  # remote or recursive: JSON text
            seen = (*seen, ref)
            target: Any = self.root
            for part in ref[1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, Mapping) or part not in target:
                    return None
                target = target[part]
            rest = {k: v for k, v in s.items() if k != "$ref"}
            s = {**target, **rest} if isinstance(target, Mapping) and rest else target
        return s, seen

    def arrow(self, s: Any, seen: tuple[str, ...] = ()) -> pa.DataType | None:
        """The Arrow type of values of schema ``s``, or None (stored as JSON text)."""
        got = self._deref(s, seen)
        if got is None:
            return None
        s, seen = got
        if not isinstance(s, Mapping):
            return None
        if "allOf" in s or "not" in s or "if" in s:
            return None
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = [b for b in s[key] if not (isinstance(b, Mapping) and b.get("type") == "null")]
                rest = {k: v for k, v in s.items() if k != key}
                if len(branches) != 1 or not isinstance(branches[0], Mapping):
                    return None
                return self.arrow({**rest, **branches[0]}, seen)
        if "const" in s:
            return self._of_values([s["const"]])
        if "enum" in s:
            return self._of_values(list(s["enum"]))
        types = s.get("type")
        if types is None:
            types = "object" if "properties" in s else "array" if "items" in s else None
        if isinstance(types, list):
            nonnull = [t for t in types if t != "null"]
            types = nonnull[0] if len(nonnull) == 1 else None
        if types in _SCALARS:
            return _SCALARS[types]
        if types == "array":
            items = s.get("items")
            if not isinstance(items, Mapping) or "prefixItems" in s:
                return None
            inner = self.arrow(items, seen)
            return None if inner is None else pa.list_(inner)
        if types == "object":
            props = s.get("properties")
            if not isinstance(props, Mapping) or not props:
                return None
            fields = []
            for name, sub in props.items():
                t = self.arrow(sub, seen)
                if t is None:
                    return None  # not fully typed: the whole object is JSON text
                fields.append(pa.field(name, t))
            return pa.struct(fields)
        return None

    @staticmethod
    def _of_values(values: list[Any]) -> pa.DataType | None:
        kinds = {_json_type(v) for v in values} - {"null"}
        if kinds == {"integer", "number"}:
            kinds = {"number"}
        if len(kinds) != 1 or None in kinds:
            return None
        return _SCALARS[kinds.pop()]

    def top_object(self) -> Mapping[str, Any] | None:
        """The properties of a top-level object schema, or None."""
        got = self._deref(self.root, ())
        s = got[0] if got else None
        if not isinstance(s, Mapping):
            return None
        types = s.get("type", "object" if "properties" in s else None)
        props = s.get("properties")
        if types == "object" and isinstance(props, Mapping) and props:
            return props
        return None


def _field(name: str, source: str, t: pa.DataType | None) -> pa.Field:
    meta = {SOURCE: source.encode()}
    if t is None:
        meta[AS_JSON] = b"1"
    return pa.field(name, t if t is not None else pa.string(), nullable=True, metadata=meta)


def typed_fields(schema: Mapping[str, Any] | None) -> list[pa.Field]:
    """The typed columns of a job whose answers follow ``schema`` (none without a schema)."""
    if schema is None:
        return []
    m = _Mapper(schema)
    props = m.top_object()
    if props is not None:
        return [_field(PREFIX + name, name, m.arrow(sub)) for name, sub in props.items()]
    return [_field(WHOLE, "", m.arrow(schema))]


def describe(fields: Sequence[pa.Field]) -> dict[str, str]:
    """``{column: type}`` for the job fingerprint (JSON text columns read ``json``)."""
    return {f.name: "json" if _as_json(f) else str(f.type) for f in fields}


def _as_json(f: pa.Field) -> bool:
    return (f.metadata or {}).get(AS_JSON) == b"1"


def typed_values(value: Any, fields: Sequence[pa.Field]) -> tuple[dict[str, Any], list[str]]:
    """Column values of one validated answer, and the values that could not be stored
    (an integer beyond int64, say: the column is null, the ``json`` column keeps it)."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields:
        source = (f.metadata or {}).get(SOURCE, b"").decode()
        v = value if source == "" else (value.get(source) if isinstance(value, dict) else None)
        if _as_json(f):
            out[f.name] = None if v is None else json.dumps(v, ensure_ascii=False, separators=(",", ":"))
            continue
        try:
            out[f.name] = _coerce(v, f.type)
        except (TypeError, ValueError, OverflowError) as e:
            out[f.name] = None
            problems.append(f"{f.name}: {e} (kept in json)")
    return out, problems


def _coerce(v: Any, t: pa.DataType) -> Any:
    """A Python value Arrow stores exactly as ``t`` (raises when it cannot)."""
    if v is None:
        return None
    if pa.types.is_int64(t):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{v!r} is not an integer")
        if not _INT64[0] <= v <= _INT64[1]:
            raise OverflowError(f"{v} does not fit int64")
        return v
    if pa.types.is_float64(t):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{v!r} is not a number")
        return float(v)
    if pa.types.is_boolean(t):
        if not isinstance(v, bool):
            raise TypeError(f"{v!r} is not a boolean")
        return v
    if pa.types.is_string(t):
        if not isinstance(v, str):
            raise TypeError(f"{v!r} is not a string")
        return v
    if pa.types.is_list(t):
        if not isinstance(v, list):
            raise TypeError("not an array")
        return [_coerce(x, t.value_type) for x in v]
    if pa.types.is_struct(t):
        if not isinstance(v, dict):
            raise TypeError("not an object")
        return {t.field(i).name: _coerce(v.get(t.field(i).name), t.field(i).type) for i in range(t.num_fields)}
    raise TypeError(f"unsupported Arrow type {t}")  # pragma: no cover - typed_fields makes no others
