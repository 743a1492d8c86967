"""Readers: every input format streams keyed batches; input problems are clear errors."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, make_rows, write_parquet
from corpusgen.errors import InputError
from corpusgen.job.readers import batch_records, open_input
from corpusgen.job.spec import InputSpec


def _all(reader):
    keys, rows, problems = [], [], []
    for b in reader.batches():
        keys += b.keys
        rows += batch_records(b)
        problems += b.problems
    return keys, rows, problems


def test_parquet_file_keys_from_id(tmp_path):
    """With input.id the key is that column as a string."""
    rows = [{"id": i * 10, "text": f"t{i}"} for i in range(5)]
    p = write_parquet(tmp_path / "a.parquet", rows)
    r = open_input(InputSpec(path=str(p), id="id", batch_rows=2), columns=["text"])
    keys, recs, _ = _all(r)
    assert keys == ["0", "10", "20", "30", "40"] and r.total_rows == 5
    assert [x["text"] for x in recs] == [f"t{i}" for i in range(5)]
    assert set(recs[0]) == {"text", "id"}


def test_parquet_dir_and_glob_keys_by_file_and_row(tmp_path):
    """Without an id the key is (file, row number), stable across runs; the file is its path
    relative to the input's directory, so files of one basename in two subdirectories never share
    keys (issue 28: fallback keys must not collide)."""
    write_parquet(tmp_path / "d" / "a.parquet", make_rows(3))
    write_parquet(tmp_path / "d" / "sub" / "b.parquet", make_rows(2, prefix="b"))
    write_parquet(tmp_path / "d" / "zz" / "a.parquet", make_rows(1, prefix="z"))
    for path in (str(tmp_path / "d"), str(tmp_path / "d" / "**" / "*.parquet")):
        r = open_input(InputSpec(path=path), columns=["text"])
        keys, _, _ = _all(r)
        assert keys == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "sub/b.parquet:0", "sub/b.parquet:1",
                        "zz/a.parquet:0"]
        assert r.total_rows == 6


def test_limit_spans_files(tmp_path):
    """--limit N reads exactly the first N rows, across files and batches."""
    write_parquet(tmp_path / "d" / "a.parquet", make_rows(3))
    write_parquet(tmp_path / "d" / "b.parquet", make_rows(5, prefix="b"))
    r = open_input(InputSpec(path=str(tmp_path / "d"), id="id", batch_rows=2), columns=["text"], limit=4)
    keys, _, _ = _all(r)
    assert keys == ["doc-0000", "doc-0001", "doc-0002", "b-0000"] and r.total_rows == 4


def test_duckdb_table_and_query(tmp_path):
    """A .duckdb file is read through a table or a query, streaming."""
    db = tmp_path / "c.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE docs AS SELECT range AS id, 'text ' || range AS text FROM range(7)")
    con.execute("CREATE TABLE other AS SELECT 1 AS x")
    con.close()
    r = open_input(InputSpec(path=str(db), table="docs", id="id", batch_rows=3), columns=["text"])
    keys, recs, _ = _all(r)
    assert keys == [str(i) for i in range(7)] and recs[6]["text"] == "text 6" and r.total_rows == 7
    r = open_input(InputSpec(path=str(db), query="SELECT * FROM docs WHERE id % 2 = 0 ORDER BY id"),
                   columns=["text"])
    keys, recs, _ = _all(r)
    assert keys == ["c.duckdb:0", "c.duckdb:1", "c.duckdb:2", "c.duckdb:3"] and recs[1]["text"] == "text 2"
    with pytest.raises(InputError, match="holds tables docs, other; choose one"):
        open_input(InputSpec(path=str(db)))
    with pytest.raises(InputError, match="no table 'nope'; tables: docs, other"):
        open_input(InputSpec(path=str(db), table="nope"))
    with pytest.raises(InputError, match="input.query failed"):
        open_input(InputSpec(path=str(db), query="SELECT * FROM missing"))


def test_csv(tmp_path):
    """CSV is streamed; cells are text; quoted newlines stay inside a row."""
    p = tmp_path / "c.csv"
    p.write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n3,\n')
    keys, recs, problems = _all(open_input(InputSpec(path=str(p), id="id"), columns=["text"]))
    assert keys == ["1", "2", "3"]
    assert [r["text"] for r in recs] == ["hello, world", "two\nlines", ""]
    assert problems == [None] * 3


def test_jsonl_bad_lines_are_row_problems(tmp_path):
    """A broken JSONL line (bad JSON, bad UTF-8) is one error row, not a crash of the job."""
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"id": "a", "text": "x"}\n{not json}\n\n{"id": "c", "text": "\xff\xfe"}\n[1]\n'
                  b'{"id": "e", "text": null}\n')
    keys, recs, problems = _all(open_input(InputSpec(path=str(p), id="id", batch_rows=2), columns=["text"]))
    assert keys[0] == "a" and keys[4] == "e"
    assert problems[0] is None and "not valid JSON" in problems[1]
    assert "not valid UTF-8" in problems[2] and "expected a JSON object" in problems[3]
    assert keys[1] == "(no id) c.jsonl:1"  # no id on a broken line: (file, row) key in its own namespace
    assert recs[4]["text"] is None and problems[4] is None


def test_non_utf8_csv_cell_is_a_row_value_not_a_crash(tmp_path):
    """Invalid UTF-8 in a CSV cell reaches the prompt builder as bytes (which marks the row)."""
    p = tmp_path / "c.csv"
    p.write_bytes(b"id,text\n1,ok\n2,\xff\xfebad\n")
    _, recs, _ = _all(open_input(InputSpec(path=str(p), id="id"), columns=["text"]))
    assert recs[0]["text"] == "ok" and isinstance(recs[1]["text"], bytes)


def test_null_id_is_a_row_problem(tmp_path):
    """A row whose id is null cannot be keyed by it: error row with a (file, row) key."""
    p = write_parquet(tmp_path / "a.parquet", [{"id": "x", "text": "a"}, {"id": None, "text": "b"}])
    keys, _, problems = _all(open_input(InputSpec(path=str(p), id="id"), columns=["text"]))
    assert keys == ["x", "(no id) a.parquet:1"] and problems[1] == "id column 'id' is null"


@pytest.mark.parametrize("kind", ["missing", "column", "id", "empty", "garbage", "emptyjsonl", "emptydir"])
def test_input_errors(tmp_path, kind):
    """Whole-input problems are InputErrors whose message says what is wrong and lists options."""
    p = write_parquet(tmp_path / "a.parquet", make_rows(2))
    spec, cols, needle = InputSpec(path=str(p)), ["text"], ""
    if kind == "missing":
        spec, needle = InputSpec(path=str(tmp_path / "nope.parquet")), "input not found"
    elif kind == "column":
        cols, needle = ["body"], "no column 'body' (input.columns); available columns: id, kind, title, text"
    elif kind == "id":
        spec, needle = InputSpec(path=str(p), id="uid"), "no column 'uid' (input.id)"
    elif kind == "empty":
        empty = tmp_path / "e.parquet"
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
        spec, needle = InputSpec(path=str(empty)), "has no rows"
    elif kind == "garbage":
        bad = tmp_path / "g.parquet"
        bad.write_text("this is not parquet")
        spec, needle = InputSpec(path=str(bad)), "not a readable Parquet file"
    elif kind == "emptyjsonl":
        e = tmp_path / "e.jsonl"
        e.write_text("")
        spec, needle = InputSpec(path=str(e)), "the input is empty"
    elif kind == "emptydir":
        (tmp_path / "d").mkdir()
        spec, needle = InputSpec(path=str(tmp_path / "d")), "holds no .parquet"
    with pytest.raises(InputError) as e:
        _all(open_input(spec, columns=cols))
    assert needle in str(e.value)


def test_header_only_csv_is_empty_input(tmp_path):
    """A CSV with a header and no rows is reported as empty, not as a finished job."""
    p = tmp_path / "c.csv"
    p.write_text("id,text\n")
    with pytest.raises(InputError, match="has no rows"):
        _all(open_input(InputSpec(path=str(p)), columns=["text"]))


def test_sample_corpus_formats_agree():
    """jobs/sample ships the same 50 rows as Parquet, CSV, JSONL and DuckDB: same keys, same text."""
    if not (SAMPLE / "docs.parquet").exists():
        pytest.skip("jobs/sample not written yet")
    results = {}
    for name in ("docs.parquet", "docs.csv", "docs.jsonl", "docs.duckdb"):
        keys, recs, problems = _all(open_input(InputSpec(path=str(SAMPLE / name), id="id"), columns=["text"]))
        results[name] = (keys, [r["text"] or "" for r in recs])
        assert len(keys) == 50 and "edge-empty" in keys and "edge-null" in keys
    first = results["docs.parquet"]
    for name, got in results.items():
        assert got == first, name


def test_million_rows_stream_in_bounded_batches(tmp_path):
    """Memory stays flat: a 1M-row Parquet file is read in batches of batch_rows, never whole."""
    n = 1_000_000
    p = tmp_path / "big.parquet"
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array([f"row {i}" for i in range(n)])})
    pq.write_table(table, p, row_group_size=100_000)
    full = table.column("text").nbytes
    del table
    reader = open_input(InputSpec(path=str(p), batch_rows=4096), columns=["text"])
    assert reader.total_rows == n
    base = pa.total_allocated_bytes()
    peak, count, sizes = 0, 0, set()
    for b in reader.batches():
        sizes.add(b.rows.num_rows)
        count += b.rows.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == n and max(sizes) <= 4096
    assert peak < full / 2, (peak, full)


READ_ONLY_ATTEMPTS = {
    "COPY TO a file": "COPY (SELECT 1 AS id) TO '{victim}'",
    "COPY then SELECT": "COPY (SELECT 1 AS id) TO '{victim}'; SELECT * FROM docs",
    "COPY inside a view of the query": "SELECT * FROM docs WHERE id IN (SELECT 1) UNION ALL "
                                       "SELECT * FROM read_csv('{victim}')",
    "ATTACH a new database": "ATTACH '{victim}' AS x",
    "INSTALL an extension": "INSTALL httpfs",
    "LOAD an extension": "LOAD httpfs",
    "read another file": "SELECT 1 AS id, content AS text FROM read_text('/etc/passwd')",
    "glob the file system": "SELECT 1 AS id, file AS text FROM glob('/etc/*')",
    "turn access back on": "SET enable_external_access = true",
    "change a setting": "SET threads = 1",
}


@pytest.mark.parametrize("case", list(READ_ONLY_ATTEMPTS))
def test_input_query_is_read_only(tmp_path, case):
    """input.query reads the tables of its database and nothing else (issue 28, item 2): writing
    files (COPY ... TO), ATTACH, INSTALL/LOAD, reading other files and re-enabling access are
    refused in one line naming the rule; no file is created."""
    db = tmp_path / "c.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE docs AS SELECT range AS id, 'text ' || range AS text FROM range(3)")
    con.close()
    victim = tmp_path / "victim.csv"
    query = READ_ONLY_ATTEMPTS[case].format(victim=victim)
    with pytest.raises(InputError) as e:
        r = open_input(InputSpec(path=str(db), query=query, id="id"), columns=["text"])
        _all(r)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("input.query"), msg
    assert not victim.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.duckdb"]
    if case not in ("turn access back on", "change a setting", "COPY inside a view of the query"):
        assert "may only read the tables" in msg, msg
