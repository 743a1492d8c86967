"""A catalogue of hostile inputs, each with its expected outcome (docs/reliability.md, "Hostile
input"): job files that are malformed, huge or booby-trapped; templates that reach for Python
internals or try to exhaust the machine; rows whose ids look like paths, documents with NUL bytes
or invalid UTF-8, 10 MB documents, millions of tiny rows, duplicate ids. Nothing crashes, hangs or
escapes the output directory: a job-level problem is one CorpusgenError naming it, a row-level
problem is a row with status ``error`` (or ``prompt_too_long``) while the job goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fake_engine
from fake_cli import SCRIPT as FAKE_CLI
from conftest import REPO, read_outputs, write_job, write_parquet
from corpusgen.errors import JobSpecError, TemplateError
from corpusgen.job.prompts import compile_template
from corpusgen.job.readers import batch_records, open_input
from corpusgen.job.runner import run_job
from corpusgen.job.spec import InputSpec, PromptSpec, load_spec
from test_reliability import integrity

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}' if p else 'x'] * 10)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh", strict=True))


def _run(job: Path, out: Path, **kw):
    events: list = []
    kw.setdefault("engine_factory", fake_engine.open_engine)
    return run_job(load_spec(job), output_dir=out, on_event=events.append, **kw), events


# --- job files ------------------------------------------------------------------------------------

JOB_FILES = {
    "unclosed bracket": (b"name: [x\n", "not valid YAML at line 2"),
    "tab indentation": (b"name: x\n\tmodel: y\n", "not valid YAML at line 2"),
    "not UTF-8": (b"name: \xff\xfe\n", "cannot read the job file"),
    "NUL byte": (b"name: a\x00b\n", "not valid YAML"),
    "python tag runs nothing": (b"name: !!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
    "alias bomb (billion laughs)": (b"name: x\n" + BOMB.encode(), "more than 100000 values"),
    "alias bomb inside output.schema": (
        b"name: x\noutput:\n  schema:\n" + "".join("    " + line + "\n" for line in BOMB.splitlines()).encode(),
        "more than 100000 values"),
    "5000 nested lists": (b"name: x\noutput: {schema: " + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested too deeply"),
    "100 nested mappings": (b"name: x\noutput: {schema: " + b"{a: " * 100 + b"1" + b"}" * 101 + b"\n",
                            "deeper than 64 levels"),
    "2 MiB file": (b"name: x\nprompt: {system: '" + b"x" * (2 * 2**20) + b"'}\n", "larger than 1 MiB"),
    "a list, not a mapping": (b"- name: x\n", "a job spec is a mapping"),
    "empty file": (b"", "a job spec is a mapping"),
    "unknown field": (b"name: x\nsystem_prompt: hi\n", "system_prompt: unknown field"),
    "NaN temperature": (b"name: x\ngeneration: {temperature: .nan}\n", "generation.temperature"),
    "name that is a path": (b"name: ../../etc\n", "must be letters, digits"),
    "schema that is not a schema": (b"name: x\noutput: {schema: {type: 7}}\n", "not a valid JSON Schema"),
    "schema $ref to the network": (b"name: x\noutput: {schema: {properties: {a: {$ref: 'http://169.254.169.254/x'}}}}\n",
                                   "points outside the schema"),
}


@pytest.mark.parametrize("case", list(JOB_FILES))
def test_hostile_job_file(tmp_path, monkeypatch, case):
    """Each broken or booby-trapped job file is a JobSpecError naming the problem, within seconds,
    without running anything it contains."""
    content, needle = JOB_FILES[case]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    t0 = time.perf_counter()
    with pytest.raises(JobSpecError) as e:
        load_spec(path)
    assert time.perf_counter() - t0 < 10
    assert needle in str(e.value) and len(str(e.value)) < 400, str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_hostile_job_file_through_the_cli_is_one_line(tmp_path):
    """The CLI turns the worst of them into one line and exit code 1, never a traceback."""
    from click.testing import CliRunner

    from corpusgen.cli import cli

    for content, _ in (JOB_FILES["alias bomb inside output.schema"], JOB_FILES["5000 nested lists"]):
        (tmp_path / "job.yaml").write_bytes(content)
        r = CliRunner().invoke(cli, ["run", str(tmp_path / "job.yaml")])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.splitlines()) == 1, r.output


# --- templates ------------------------------------------------------------------------------------

INTERNALS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ text.__class__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ joiner.__call__.__globals__ }}",
    "{{ text|attr('__class__') }}",
    "{{ text['__class__'] }}",
    "{{ self._TemplateReference__context }}",
    "{% set f = text.upper %}{{ f.__self__ }}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
]


@pytest.mark.parametrize("template", INTERNALS)
def test_template_reaching_python_internals_is_refused_before_the_job_starts(template):
    """A template that names Python internals (or files through include/import/extends) is refused
    when the job starts, with a TemplateError — never rendered."""
    with pytest.raises(TemplateError, match="prompt.template"):
        compile_template(PromptSpec(template=template))


def test_sandbox_refusals_at_render_time_are_row_errors(tmp_path):
    """What only shows when rendering — a row's text used as a format string, values that would
    exhaust memory — is refused by the sandbox for that row (status error), quickly; the other rows
    and the job go on. Row text is data: it is never evaluated as a template."""
    rows = [{"id": "fmt", "text": "{0.__class__.__mro__}"}, {"id": "jinja", "text": "{{ 7 * 7 }} {% raw %}"},
            {"id": "plain", "text": "hello"}]
    write_parquet(tmp_path / "data" / "docs.parquet", rows)
    cases = {
        "format": ("{{ text.format(text) }}", {"fmt": "error", "jinja": "error", "plain": "ok"}),
        "repeat": ("{{ text * 10**10 }}", {"fmt": "error", "jinja": "error", "plain": "error"}),
        "ljust": ("{{ text.ljust(10**10) }}", {"fmt": "error", "jinja": "error", "plain": "error"}),
        "range": ("{% for i in range(10**9) %}{% endfor %}{{ text }}", {"fmt": "error", "jinja": "error",
                                                                     "plain": "error"}),
        "echo": ("{{ text }}", {"fmt": "ok", "jinja": "ok", "plain": "ok"}),
    }
    for name, (template, expected) in cases.items():
        job = write_job(tmp_path, name=name, prompt={"template": template})
        t0 = time.perf_counter()
        summary, _ = _run(job, tmp_path / name)
        assert time.perf_counter() - t0 < 10
        got = {r["key"]: r for r in read_outputs(tmp_path / name).to_pylist()}
        assert {k: r["status"] for k, r in got.items()} == expected, (name, got)
        assert all(r["error"].startswith("template: ") for r in got.values() if r["status"] == "error")
    jinja = read_outputs(tmp_path / "echo").to_pylist()[1]
    assert json.loads(jinja["text"])["first"] == "{{"  # the row's "{{ 7 * 7 }}" reached the model as text


# --- rows -----------------------------------------------------------------------------------------

PATH_IDS = ["../../etc/passwd", "/etc/shadow", "a/b/c", "..", ".", "~root", "C:\\Windows\\x", "part-00000.parquet",
            "manifest.sqlite", "lock", "progress.json", "", " ", "nul\x00byte", "new\nline", "é/😀", "x" * 100_000,
            "'; DROP TABLE keys; --", "%s%n", "${HOME}"]


def test_ids_that_look_like_paths_are_only_keys(tmp_path):
    """Ids are data: each is stored verbatim as a key and never used as a file name; nothing is
    written outside the output directory, which holds only its own files."""
    rows = [{"id": k, "text": f"doc {i}"} for i, k in enumerate(PATH_IDS)]
    write_parquet(tmp_path / "data" / "docs.parquet", rows)
    job = write_job(tmp_path, prompt={"template": "{{ text }}"})
    before = sorted(p.name for p in tmp_path.iterdir())
    summary, _ = _run(job, tmp_path / "out")
    assert summary.statuses == {"ok": len(PATH_IDS)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert all(n.startswith("part-") or n in ("manifest.sqlite", "manifest.sqlite-wal", "manifest.sqlite-shm",
                                              "lock", "progress.json") for n in names), names
    assert sorted(integrity(tmp_path / "out").column("key").to_pylist()) == sorted(PATH_IDS)
    summary, _ = _run(job, tmp_path / "out")  # and the manifest finds each of them again
    assert summary.rows == 0 and summary.skipped == len(PATH_IDS)


def test_nul_bytes_and_invalid_utf8_are_row_outcomes(tmp_path):
    """NUL bytes are ordinary text; bytes that are not UTF-8 (Parquet binary or string columns, CSV,
    JSONL, lone surrogate escapes) make that row an error — or, in an id, a key with backslash
    escapes — and never stop the job."""
    bad = pa.array([b"ok-id", b"\xff\xfe-id", b"nul\x00id"], pa.binary())
    as_string = pa.Array.from_buffers(pa.string(), len(bad), bad.buffers())  # a string column holding bad bytes
    docs = pa.array([b"fine text", b"caf\xc3", b"a\x00b"], pa.binary())
    pq.write_table(pa.table({"id": as_string, "text": pa.Array.from_buffers(pa.string(), 3, docs.buffers())}),
                   tmp_path / "strings.parquet")
    pq.write_table(pa.table({"id": ["b1", "b2"], "text": pa.array([b"\xc3\x28", b"plain"], pa.binary())}),
                   tmp_path / "binary.parquet")
    (tmp_path / "c.csv").write_bytes(b"id,text\nc1,\xff\xfe\nc2,nul\x00here\nc3,ok\n")
    (tmp_path / "j.jsonl").write_bytes(b'{"id": "j1", "text": "\\ud800 lone"}\n{"id": "j2", "text": "\\u0000 nul"}\n'
                                       b'{"id": "j3", "text": "\xff"}\n')
    expected = {
        "strings.parquet": {"ok-id": "ok", "\\xff\\xfe-id": "error", "nul\x00id": "ok"},
        "binary.parquet": {"b1": "error", "b2": "ok"},
        "c.csv": {"c1": "error", "c2": "ok", "c3": "ok"},
        "j.jsonl": {"j1": "error", "j2": "ok", "(no id) j.jsonl:2": "error"},
    }
    for name, statuses in expected.items():
        job = write_job(tmp_path, name=name.replace(".", "-"), input={"path": str(tmp_path / name), "id": "id"},
                        prompt={"template": "{{ text }}"})
        summary, _ = _run(job, tmp_path / ("out-" + name))
        got = {r["key"]: r for r in integrity(tmp_path / ("out-" + name)).to_pylist()}
        assert {k: r["status"] for k, r in got.items()} == statuses, name
        for r in got.values():
            if r["status"] == "error":
                assert "UTF-8" in r["error"] or "Unicode" in r["error"], r["error"]


def test_ten_megabyte_documents(tmp_path):
    """A 10 MB document (Parquet, CSV, JSONL) is read; with too_long: mark it is prompt_too_long,
    with truncate_middle it is cut to fit and generated; in seconds, next to ordinary rows."""
    big = "word " * 2_000_000
    rows = [{"id": "small", "text": "a small one"}, {"id": "big", "text": big}]
    write_parquet(tmp_path / "docs.parquet", rows)
    (tmp_path / "docs.csv").write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fmt in ("parquet", "csv", "jsonl"):
        for too_long, status in (("mark", "prompt_too_long"), ("truncate_middle", "ok")):
            name = f"{fmt}-{too_long}"
            job = write_job(tmp_path, name=name.replace("_", "-"), input={"path": str(tmp_path / f"docs.{fmt}"), "id": "id"},
                            prompt={"template": "{{ text }}", "too_long": too_long})
            t0 = time.perf_counter()
            _run(job, tmp_path / name)
            assert time.perf_counter() - t0 < 30
            got = {r["key"]: r for r in integrity(tmp_path / name).to_pylist()}
            assert got["small"]["status"] == "ok" and got["big"]["status"] == status, (name, got["big"]["error"])
            if status == "ok":
                assert got["big"]["prompt_cut"] > 9_000_000 and got["big"]["prompt_tokens"] <= 2048
            else:
                assert got["big"]["prompt_tokens"] > 10_000_000


def test_duplicate_ids_first_wins_in_files_directories_and_across_resumes(tmp_path):
    """A repeated id is generated once: the first occurrence wins, later ones are counted as
    duplicates — within a file, across the files of a directory input, and after a resume."""
    d = tmp_path / "corpus"
    write_parquet(d / "a.parquet", [{"id": "x", "text": "first"}, {"id": "y", "text": "y1"}, {"id": "x", "text": "2nd"}])
    write_parquet(d / "b.parquet", [{"id": "y", "text": "y2"}, {"id": "z", "text": "z"}, {"id": "x", "text": "3rd"}])
    job = write_job(tmp_path, input={"path": str(d), "id": "id"}, prompt={"template": "{{ text }}"})
    summary, _ = _run(job, tmp_path / "out", commit_rows=1)
    t = {r["key"]: r for r in integrity(tmp_path / "out").to_pylist()}
    assert sorted(t) == ["x", "y", "z"] and summary.duplicates == 3
    assert json.loads(t["x"]["text"])["first"] == "first" and json.loads(t["y"]["text"])["first"] == "y1"
    summary, _ = _run(job, tmp_path / "out")
    assert summary.rows == 0 and integrity(tmp_path / "out").num_rows == 3


def test_millions_of_tiny_rows_stream_in_bounded_memory(tmp_path):
    """Two million one-character rows stream through the reader in batches of input.batch_rows,
    with Arrow memory bounded by a batch, never the corpus."""
    n = 2_000_000
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array(["x"] * n)}),
                   tmp_path / "tiny.parquet", row_group_size=100_000)
    reader = open_input(InputSpec(path=str(tmp_path / "tiny.parquet"), id="id", batch_rows=4096), columns=["text"])
    assert reader.total_rows == n
    base, peak, rows, last = pa.total_allocated_bytes(), 0, 0, None
    for batch in reader.batches():
        assert batch.rows.num_rows <= 4096
        rows += batch.rows.num_rows
        last = batch.keys[-1]
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert rows == n and last == str(n - 1)
    assert peak < 64 * 2**20, peak  # a row group or two, not 2M rows
    assert batch_records(batch)[-1] == {"id": n - 1, "text": "x"}


def test_hundreds_of_thousands_of_tiny_rows_end_to_end_in_flat_memory(tmp_path):
    """A whole run of 100,000 tiny rows: every row committed exactly once in a bounded number of
    parts, the process's peak memory close to a 10,000-row run's (memory does not grow with the
    corpus), and a resume that skips them all quickly."""
    # blocks of 1024 rows: both runs fill the runner's window (8 blocks), which bounds its memory
    env = {**os.environ, "CORPUSGEN_FAKE_BLOCK": "1024", "PYTHONPATH": str(REPO)}
    env.pop("CORPUSGEN_FAKE_DELAY", None)
    procs = {}
    for n in (10_000, 100_000):
        d = tmp_path / str(n)
        d.mkdir()
        pq.write_table(pa.table({"id": pa.array([f"r{i}" for i in range(n)]), "text": pa.array(["x"] * n)}),
                       d / "tiny.parquet", row_group_size=10_000)  # the reader holds one row group
        job = write_job(d, input={"path": "tiny.parquet", "id": "id"}, prompt={"template": "{{ text }}"},
                        generation={"max_new_tokens": 8})
        procs[n] = (job, subprocess.Popen([sys.executable, FAKE_CLI, "run", str(job), "-o", str(d / "out")],
                                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    peak = {}
    for n, (job, proc) in procs.items():
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, proc.stderr.read()
        peak[n] = usage.ru_maxrss * 1024
        got = integrity(job.parent / "out")
        assert got.num_rows == n and set(got.column("status").to_pylist()) == {"truncated"}  # 8 tokens
        assert len(list((job.parent / "out").glob("part-*.parquet"))) <= n // 1024 + 2
    assert peak[100_000] < peak[10_000] + 64 * 2**20, peak  # measured: about +10 MB (allocator caches)
    job = procs[100_000][0]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, FAKE_CLI, "run", str(job), "-o", str(job.parent / "out")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "0 rows committed" in r.stdout and "100000 already done" in r.stdout, r.stdout
    assert time.perf_counter() - t0 < 60
