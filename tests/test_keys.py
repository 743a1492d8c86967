"""Row keys are a pure function of the id value (issue 28, item 1; docs/output.md, "Keys"): never of
the batch a row was read in, the reader or the type a batch inferred; fallback keys cannot collide
with real ids; ids without a canonical text are refused by name."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fake_engine
from conftest import read_outputs, write_job, write_parquet
from corpusgen.errors import InputError
from corpusgen.job.keys import NO_ID, canonical_id
from corpusgen.job.readers import open_input
from corpusgen.job.runner import run_job
from corpusgen.job.spec import InputSpec, load_spec


def _keys(path: Path, batch_rows: int = 1024, id: str | None = "id") -> tuple[list[str], list]:
    keys, problems = [], []
    for b in open_input(InputSpec(path=str(path), id=id, batch_rows=batch_rows), columns=["text"]).batches():
        keys += b.keys
        problems += b.problems
    return keys, problems


def _jsonl(path: Path, ids: list) -> Path:
    path.write_text("".join(json.dumps({"id": v, "text": f"doc {i}"}) + "\n" for i, v in enumerate(ids)))
    return path


def _run(job: Path, out: Path, **kw):
    events: list = []
    summary = run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine,
                      on_event=events.append, **kw)
    return summary, events


def test_appending_a_float_id_and_resuming_does_not_duplicate(tmp_path):
    """The issue's reproduction: JSONL ids 1-6 as integers, then a row with id 7.5 appended and the
    job resumed gave 13 outputs for 7 inputs (keys 1 and 1.0). Now: 7 outputs, keys 1..6 and 7.5."""
    data = tmp_path / "data" / "docs.jsonl"
    data.parent.mkdir()
    _jsonl(data, [1, 2, 3, 4, 5, 6])
    job = write_job(tmp_path, input={"path": "data/docs.jsonl", "id": "id"}, prompt={"template": "{{ text }}"})
    _run(job, tmp_path / "out")
    _jsonl(data, [1, 2, 3, 4, 5, 6, 7.5])
    summary, _ = _run(job, tmp_path / "out")
    assert summary.rows == 1 and summary.skipped == 6
    keys = read_outputs(tmp_path / "out").column("key").to_pylist()
    assert sorted(keys) == ["1", "2", "3", "4", "5", "6", "7.5"]


def test_batch_rows_does_not_change_keys_or_values(tmp_path):
    """input.batch_rows 2 vs 1024 gave other keys (1.0 vs 1, True vs true) and other template
    values; keys and the values a template sees are now the same for every batch size."""
    ids = [1, 2, 3.0, 7.5, True, False, "x", 10**30, -0.0, "1e-05", 1e-05]
    p = _jsonl(tmp_path / "d.jsonl", ids)
    p.write_text(p.read_text() + "".join(json.dumps({"id": f"v{i}", "text": v}) + "\n"
                                         for i, v in enumerate([1, 2.5, True, "s", [1, "a"]])))
    expected = ["1", "2", "3", "7.5", "true", "false", "x", str(10**30), "0", "1e-05", "1e-05",
                "v0", "v1", "v2", "v3", "v4"]
    texts = {}
    for rows in (1, 2, 3, 1024):
        keys, _ = _keys(p, rows)
        assert keys == expected, rows
        recs = []
        for b in open_input(InputSpec(path=str(p), id="id", batch_rows=rows), columns=["text"]).batches():
            recs += [str(v) for v in b.rows.column("text").to_pylist()]
        texts[rows] = recs
    assert texts[1] == texts[2] == texts[3] == texts[1024]


def test_booleans_are_true_and_false_whatever_the_batch(tmp_path):
    """A boolean id was `True` in a batch of booleans and `true` in a mixed batch; now always
    `true`/`false`, in JSONL and in a Parquet bool column alike."""
    p = _jsonl(tmp_path / "b.jsonl", [True, "a", False])
    q = write_parquet(tmp_path / "b.parquet", [{"id": True, "text": "a"}, {"id": False, "text": "b"}])
    for rows in (1, 2, 1024):
        assert _keys(p, rows)[0] == ["true", "a", "false"]
        assert _keys(q, rows)[0] == ["true", "false"]


def test_typed_columns_give_the_keys_of_their_text(tmp_path):
    """Integers, floats (float64 and float32), decimals and strings in Parquet key rows as their
    canonical text, so a corpus converted between formats keeps its keys."""
    import decimal

    t = pa.table({"i": pa.array([1, -2], pa.int32()), "f": pa.array([1.0, 7.5], pa.float64()),
                  "g": pa.array([0.1, 3.0], pa.float32()),
                  "d": pa.array([decimal.Decimal("7.50"), decimal.Decimal("2")], pa.decimal128(5, 2)),
                  "s": ["1", "7.5"], "text": ["a", "b"]})
    pq.write_table(t, tmp_path / "t.parquet")
    want = {"i": ["1", "-2"], "f": ["1", "7.5"], "g": ["0.1", "3"], "d": ["7.5", "2"], "s": ["1", "7.5"]}
    for col, keys in want.items():
        assert _keys(tmp_path / "t.parquet", id=col)[0] == keys, col


def test_fallback_keys_cannot_collide_with_real_ids(tmp_path):
    """A null id's key was `a.parquet:1`, and a real id `a.parquet:1` then lost its row. Keys of rows
    without a usable id live in the `(no id) ` namespace, which a real id cannot enter."""
    p = write_parquet(tmp_path / "a.parquet", [{"id": "a.parquet:1", "text": "real"}, {"id": None, "text": "null"},
                                               {"id": NO_ID + "a.parquet:1", "text": "forged"}])
    keys, problems = _keys(p)
    assert keys == ["a.parquet:1", NO_ID + "a.parquet:1", NO_ID + "a.parquet:2"] and len(set(keys)) == 3
    assert problems[0] is None and "null" in problems[1] and "reserved" in problems[2]
    job = write_job(tmp_path, input={"path": str(p), "id": "id"}, prompt={"template": "{{ text }}"})
    summary, _ = _run(job, tmp_path / "out")
    assert summary.statuses == {"ok": 1, "error": 2} and summary.duplicates == 0


@pytest.mark.parametrize("value, needle", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"),
                                           (2.0**60, "beyond 2**53"), ([1], "a list"), ({"a": 1}, "an object")])
def test_ids_without_a_canonical_text_are_error_rows_naming_column_and_value(tmp_path, value, needle):
    """NaN, ±inf, floats beyond 2**53, lists and objects have no one text: that row is an error
    naming the column and the value (its key in the `(no id)` namespace); the job goes on."""
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"id": "ok", "text": "a"}) + "\n" + json.dumps({"id": value, "text": "b"}).replace(
        "Infinity", "Infinity") + "\n")
    keys, problems = _keys(p)
    assert keys == ["ok", NO_ID + "x.jsonl:1"]
    assert "'id'" in problems[1] and needle in problems[1] and "\n" not in problems[1]
    if isinstance(value, float):  # and the same from a typed Parquet column
        q = write_parquet(tmp_path / "x.parquet", [{"id": 1.5, "text": "a"}, {"id": value, "text": "b"}])
        keys, problems = _keys(q)
        assert keys == ["1.5", NO_ID + "x.parquet:1"] and needle in problems[1]


def test_id_column_of_a_type_without_text_is_refused_up_front(tmp_path):
    """A timestamp (or list, struct) id column is refused before anything runs, in one line naming
    the column and its type."""
    import datetime

    p = write_parquet(tmp_path / "t.parquet", [{"id": datetime.datetime(2024, 1, 2), "text": "a"}])
    with pytest.raises(InputError, match=r"id column 'id' has type timestamp.*an id must be a string") as e:
        open_input(InputSpec(path=str(p), id="id"), columns=["text"])
    assert "\n" not in str(e.value)


# --- the property ---------------------------------------------------------------------------------

json_ids = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(json_ids, min_size=1, max_size=20), batch=st.integers(min_value=1, max_value=25))
def test_keys_never_depend_on_batching(ids, batch):
    """Property: for any id values and any batch size, each row's key is canonical_id of its own
    value (a usable id), or its `(no id)` fallback — the same as reading one row at a time."""
    with tempfile.TemporaryDirectory() as d:
        p = _jsonl(Path(d) / "h.jsonl", ids)
        keys, problems = _keys(p, batch)
        assert (keys, problems) == _keys(p, 1)
        for i, (v, k) in enumerate(zip(ids, keys, strict=True)):
            want, why = canonical_id(v, "id")
            assert k == (want if want is not None else f"{NO_ID}h.jsonl:{i}")
            assert (problems[i] is None) == (want is not None)
        numbers = [v for v in ids if isinstance(v, float) and math.isfinite(v) and abs(v) <= 2**53]
        if numbers:  # a float column gives the keys its values give in JSONL
            q = Path(d) / "h.parquet"
            pq.write_table(pa.table({"id": pa.array(numbers, pa.float64()), "text": ["t"] * len(numbers)}), q)
            assert _keys(q, batch)[0] == [canonical_id(v, "id")[0] for v in numbers]
