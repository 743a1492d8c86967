"""Fuzzing (hypothesis) of what reads untrusted bytes: the job spec loader (YAML text and mappings),
the readers (JSONL, CSV, Parquet) and the prompt templates. Several thousand generated cases in
all; the only exceptions allowed are the CorpusgenError kinds a user can act on — never a
traceback (docs/reliability.md, "Hostile input").

Examples are derandomised, so CI sees the same cases every run; for a longer, random hunt:
``CORPUSGEN_FUZZ_EXAMPLES=20000 CORPUSGEN_FUZZ_RANDOM=1 pytest tests/test_fuzz_spec_readers.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fake_engine
from corpusgen.errors import CorpusgenError, InputError, JobSpecError, TemplateError
from corpusgen.job.prompts import PromptBuilder, compile_template
from corpusgen.job.readers import batch_records, open_input
from corpusgen.job.spec import _SECTIONS, InputSpec, PromptSpec, load_spec, spec_from_dict

SCALE = int(os.environ.get("CORPUSGEN_FUZZ_EXAMPLES", "0") or 0)


def fuzz(examples: int):
    """Settings of one fuzz test: ``examples`` cases (or CORPUSGEN_FUZZ_EXAMPLES), no deadline."""
    return settings(max_examples=SCALE or examples, deadline=None, database=None,
                    derandomize=not os.environ.get("CORPUSGEN_FUZZ_RANDOM"),
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="corpusgen-fuzz-") as d:
        yield Path(d)


# --- the job spec -----------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats() | st.text(max_size=12)
           | st.sampled_from(["auto", "cpu", "cuda", "float16", "mark", "truncate_middle", "16GiB", "0B", "-1GiB",
                              "1e400GiB", "jsonl", "x.parquet", "../x", "/dev/zero", "~", "", "a\x00b", "object"]))
KEYS = st.sampled_from(["type", "properties", "enum", "$ref", "gpu", "cpu", "weights", "kv_cache", "x", ""])
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(KEYS, kids, max_size=3),
                      max_leaves=6)


def _section(name: str):
    fields = list(_SECTIONS[name][1])
    return st.dictionaries(st.sampled_from([*fields, "bogus"]), VALUES, max_size=4)


JOBS = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["job", "a.b-c_1", "", "../x", "x y", "é", "-x"]) | SCALARS,
    "model": SCALARS,
    **{s: _section(s) | SCALARS for s in _SECTIONS},
}) | VALUES


@fuzz(1500)
@given(data=JOBS)
def test_fuzz_spec_mappings(scratch, data):
    """Any mapping (or anything else) given as a job spec is a JobSpec or a JobSpecError; a JobSpec
    can always be fingerprinted and serialised."""
    try:
        spec = spec_from_dict(data, base_dir=scratch)
    except JobSpecError:
        return
    spec.fingerprint()
    json.dumps(spec.to_dict())
    if not isinstance(spec.engine.policy, str):
        spec.engine.resolve_policy()


YAML_TOKENS = ["name:", "model:", "input:", "prompt:", "output:", "generation:", "engine:", " path:", " id:",
               " template:", " schema:", " max_new_tokens:", " policy:", "\n", "  ", "- ", "{", "}", "[", "]", ",",
               "&a ", "*a", "!!binary ", "!!python/name:os.system ", "!!str ", "'", '"', ": ", "#", "---\n",
               "...\n", "? ", "|\n", ">\n", "0x1F", ".nan", ".inf", "~", "null", "true", "1e400", "\t", "\\",
               "x", "42", "-1", "16GiB", "{{ text }}", "%YAML 1.1\n", "<<: *a", "\x00", "\ufeff", "é"]


@fuzz(1200)
@given(text=st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join) | st.text(max_size=200))
def test_fuzz_job_files(scratch, text):
    """Any text as a job file is a JobSpec or a JobSpecError (bad YAML, bad tags, wrong shapes)."""
    path = scratch / "job.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_spec(path)
    except JobSpecError:
        pass


# --- the readers ------------------------------------------------------------------------------------

def _drain(spec: InputSpec) -> None:
    """Open and read a whole input: only InputError may come out; every row has a string key."""
    try:
        reader = open_input(spec)
        for batch in reader.batches():
            records = batch_records(batch)
            assert len(records) == len(batch.keys) == len(batch.problems)
            assert all(isinstance(k, str) for k in batch.keys)
    except InputError:
        pass


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                           max_leaves=8)
JSONL_LINES = st.lists(
    st.binary(max_size=30)
    | st.dictionaries(st.sampled_from(["id", "text", "title"]) | st.text(max_size=4), JSON_VALUES, max_size=4)
      .map(lambda d: json.dumps(d).encode())
    | st.sampled_from([b"", b"{}", b"[]", b"null", b'{"id": "\\ud800"}', b'{"text": "\\udfff x"}', b"\xff\xfe",
                       b'{"id": 1e400}', b'{"id": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"id": null, "text": 1}',
                       b"\x00", b'{"id": "a", "id": "b"}']),
    max_size=12)


@fuzz(500)
@given(lines=JSONL_LINES, keyed=st.booleans())
def test_fuzz_jsonl_reader(scratch, lines, keyed):
    """Any bytes as a JSONL corpus: rows with keys and per-row problems, or an InputError."""
    path = scratch / "c.jsonl"
    path.write_bytes(b"\n".join(lines))
    _drain(InputSpec(path=str(path), id="id" if keyed else None, batch_rows=5))


CSV_TOKENS = [b"id", b"text", b",", b"\n", b"\r\n", b'"', b'""', b"\xff", b"a", b"\x00", b" ", b"\t", b";", b"1",
              b"\xef\xbb\xbf", b"\xc3", b"\\"]


@fuzz(1000)
@given(body=st.lists(st.sampled_from(CSV_TOKENS), max_size=60).map(b"".join), keyed=st.booleans())
def test_fuzz_csv_reader(scratch, body, keyed):
    """Any bytes after a header as a CSV corpus: rows with keys and per-row problems, or an InputError."""
    path = scratch / "c.csv"
    path.write_bytes(b"id,text\n" + body)
    _drain(InputSpec(path=str(path), id="id" if keyed else None, batch_rows=3))


def _column(kind: str, draw, n: int) -> pa.Array:
    nulls = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if kind == "string":
        values = draw(st.lists(st.text(max_size=8), min_size=n, max_size=n))
    elif kind == "bad-utf8":
        raw = pa.array(draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n)), pa.binary())
        return pa.Array.from_buffers(pa.string(), n, raw.buffers())
    elif kind == "binary":
        values = draw(st.lists(st.binary(max_size=8), min_size=n, max_size=n))
    elif kind == "int":
        values = draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n))
    elif kind == "float":
        values = draw(st.lists(st.floats(), min_size=n, max_size=n))
    elif kind == "list":
        values = draw(st.lists(st.lists(st.integers(-5, 5), max_size=3), min_size=n, max_size=n))
    elif kind == "struct":
        values = draw(st.lists(st.fixed_dictionaries({"a": st.integers(0, 9), "b": st.text(max_size=3)}),
                               min_size=n, max_size=n))
    else:  # dictionary-encoded strings
        return pa.array(draw(st.lists(st.sampled_from(["x", "y", "z"]), min_size=n, max_size=n))).dictionary_encode()
    return pa.array([None if z else v for v, z in zip(values, nulls, strict=True)])


@st.composite
def tables(draw):
    n = draw(st.integers(1, 12))
    kinds = ["string", "bad-utf8", "binary", "int", "float", "list", "struct", "dict"]
    return pa.table({"id": _column(draw(st.sampled_from(kinds)), draw, n),
                     "text": _column(draw(st.sampled_from(kinds)), draw, n),
                     "title": _column(draw(st.sampled_from(kinds)), draw, n)})


@fuzz(400)
@given(table=tables(), keyed=st.booleans())
def test_fuzz_parquet_reader(scratch, table, keyed):
    """Any Parquet table (nulls, invalid UTF-8 in string columns, binary, nested, dictionary, NaN
    ids): rows with string keys and per-row problems, or an InputError."""
    path = scratch / "c.parquet"
    pq.write_table(table, path)
    _drain(InputSpec(path=str(path), id="id" if keyed else None, batch_rows=4))


# --- templates --------------------------------------------------------------------------------------

TEMPLATE_TOKENS = ["{{", "}}", "{%", "%}", "{#", "#}", " ", "text", "title", ".", "_", "__class__", "|", "attr",
                   "(", ")", "'", '"', "for", "x", "in", "range", "10", "**", "*", "if", "else", "endif", "endfor",
                   "raw", "endraw", "set", "=", "~", "[", "]", "format", "ljust", "upper", "length", "join",
                   "default", "99999999999", ",", "-", "+", "/", "0", "none", "namespace", "loop", "self", "\n"]
ROW_VALUES = st.none() | st.text(max_size=20) | st.binary(max_size=6) | st.integers() | st.floats() \
    | st.sampled_from(["{0.__class__}", "{}", "{% raw %}", "{{ 7*7 }}", "\x00", "\ud800"])


@fuzz(1200)
@given(template=st.lists(st.sampled_from(TEMPLATE_TOKENS), max_size=24).map("".join),
       row=st.fixed_dictionaries({"text": ROW_VALUES, "title": ROW_VALUES}))
def test_fuzz_templates(template, row):
    """Any template either fails to compile with a TemplateError, or renders every row to a Prompt
    (possibly a row with status error); a row never crashes the job."""
    try:
        compile_template(PromptSpec(template=template))
        builder = PromptBuilder(PromptSpec(template=template), fake_engine.FakeTokenizer(), max_context=4096,
                                max_new_tokens=16)
    except TemplateError:
        return
    try:
        p = builder.build("k", row)
    except CorpusgenError:
        raise AssertionError("a row made the job fail") from None
    assert p.status in (None, "error", "prompt_too_long")
