"""Job spec loading, validation and fingerprints (DESIGN §3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from corpusgen.errors import JobSpecError
from corpusgen.job.spec import (DEFAULT_MODEL, JobSpec, changed_fields, load_spec, parse_size, spec_from_dict,
                            with_overrides)


def _spec(**data) -> JobSpec:
    return spec_from_dict(data, base_dir="/jobs")


@pytest.mark.parametrize("name", ["extract", "classify", "summarize"])
def test_shipped_jobs_load(name):
    """The example jobs in jobs/ must stay valid as the spec evolves."""
    path = REPO / "jobs" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    spec = load_spec(path)
    assert Path(spec.input.path).is_absolute()
    assert spec.input.path.startswith(str(path.parent))


def test_every_field_has_a_default():
    """DESIGN §3: a job with nothing in it is valid; the name defaults to the file stem."""
    spec = spec_from_dict({}, default_name="myjob")
    assert spec.name == "myjob" and spec.model == DEFAULT_MODEL
    assert spec.prompt.too_long == "mark" and spec.generation.max_new_tokens == 64
    assert spec.output_dir() == Path("out/myjob")


@pytest.mark.parametrize("data, path, allowed", [
    ({"bogus": 1}, "bogus", "top-level fields are: name, model"),
    ({"generation": {"max_tokens": 5}}, "generation.max_tokens", "max_new_tokens"),
    ({"input": {"file": "x"}}, "input.file", "path, id, columns"),
    ({"engine": {"gpu": "1GiB"}}, "engine.gpu", "gpu_memory"),
])
def test_unknown_field_names_path_and_allowed(data, path, allowed):
    """A typo must be caught with the field path and the valid names, not ignored."""
    with pytest.raises(JobSpecError) as e:
        _spec(**data)
    assert path in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize("data, needle", [
    ({"generation": {"max_new_tokens": "ten"}}, "generation.max_new_tokens: expected an integer"),
    ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens: expected an integer ≥ 1"),
    ({"generation": {"temperature": True}}, "generation.temperature: expected a number"),
    ({"generation": {"top_p": 1.5}}, "generation.top_p: expected a number between 0.0 and 1.0"),
    ({"generation": {"stop": [1, 2]}}, "generation.stop: expected a list of strings"),
    ({"prompt": {"too_long": "cut"}}, "prompt.too_long: expected one of mark, truncate_middle"),
    ({"prompt": {"template": 3}}, "prompt.template: expected a string"),
    ({"input": {"format": "xlsx"}}, "input.format: expected one of auto, parquet, csv, jsonl, duckdb"),
    ({"engine": {"compress": "yes"}}, "engine.compress: expected one of auto, none, weights, kv, both"),
    ({"engine": {"gpu_memory": "lots"}}, "engine.gpu_memory: expected a size like 16GiB"),
    ({"engine": {"policy": {"gpu_batch_size": -1}}}, "engine.policy: policy.gpu_batch_size"),
    ({"output": {"schema": {"type": "objekt"}}}, "output.schema: not a valid JSON Schema"),
    ({"input": "docs.parquet"}, "input: expected a mapping"),
    ({"name": "a/b"}, "name: 'a/b' must be letters"),
    ({"input": {"table": "t", "query": "SELECT 1"}}, "input.table or input.query, not both"),
])
def test_wrong_types_name_field_and_expectation(data, needle):
    """Wrong values must produce one line naming the field and what is allowed."""
    with pytest.raises(JobSpecError) as e:
        _spec(**data)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml(tmp_path):
    """Broken YAML is a JobSpecError with the line, not a yaml traceback."""
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ninput: {path: [unclosed\n")
    with pytest.raises(JobSpecError, match=r"not valid YAML at line \d"):
        load_spec(p)
    with pytest.raises(JobSpecError, match="job file not found"):
        load_spec(tmp_path / "missing.yaml")
    p.write_text("- just\n- a list\n")
    with pytest.raises(JobSpecError, match="a job spec is a mapping"):
        load_spec(p)


def test_relative_paths_resolve_against_job_file(tmp_path):
    """Paths in a job file mean the same whatever directory corpusgen is started from."""
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "j.yaml"
    p.write_text("input: {path: ../data/docs.parquet}\noutput: {dir: outs}\nengine: {offload_dir: scratch}\n")
    spec = load_spec(p)
    assert Path(spec.input.path) == tmp_path / "sub" / "../data/docs.parquet"
    assert Path(spec.output.dir) == tmp_path / "sub" / "outs"
    assert Path(spec.engine.offload_dir) == tmp_path / "sub" / "scratch"
    assert spec.name == "j"


def test_cli_overrides_resolve_against_cwd(tmp_path, monkeypatch):
    """--input/--output are relative to where the command runs, and --input re-decides the format."""
    monkeypatch.chdir(tmp_path)
    spec = _spec(input={"path": "a.csv", "format": "csv"})
    new = with_overrides(spec, input="x/b.jsonl", output="o", table=None, device="cpu", policy="auto")
    assert new.input.path == str(tmp_path / "x/b.jsonl") and new.input.resolved_format() == "jsonl"
    assert new.output_dir() == tmp_path / "o" and new.engine.device == "cpu"
    assert with_overrides(spec, query="SELECT 1").input.query == "SELECT 1"
    with pytest.raises(JobSpecError, match="--device"):
        with_overrides(spec, device="tpu")


def test_sizes():
    """Budgets are written like 16GiB; a typo must not silently become 0."""
    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("512 MB") == 512 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1024) == 1024
    for bad in ("16 GiBs", "-1GiB", 0, "", True):
        with pytest.raises(JobSpecError):
            parse_size(bad, "engine.cpu_memory")
    assert _spec(engine={"cpu_memory": "100GiB"}).engine.cpu_memory == 100 * 2**30


def test_inline_policy_resolves():
    """engine.policy may be a mapping (validated at load) or auto."""
    spec = _spec(engine={"policy": {"gpu_batch_size": 4, "num_gpu_batches": 2}})
    assert spec.engine.resolve_policy().block_size == 8
    assert _spec().engine.resolve_policy() is None


def test_format_auto_by_extension():
    """Formats are decided by extension; an unknown one asks for input.format."""
    for path, fmt in [("a.parquet", "parquet"), ("a.csv", "csv"), ("a.jsonl", "jsonl"),
                      ("a.duckdb", "duckdb"), ("dir/*.parquet", "parquet")]:
        assert _spec(input={"path": path}).input.resolved_format() == fmt
    with pytest.raises(JobSpecError, match="set input.format"):
        _spec(input={"path": "a.txt"}).input.resolved_format()


def test_fingerprint_covers_outputs_only():
    """Resume must refuse a changed prompt/model/generation, but allow moving the input or output
    directory, changing the limit or the engine placement."""
    base = _spec(name="j", input={"path": "a.parquet", "id": "id"}, prompt={"template": "{{ text }}"})
    fp = base.fingerprint()
    assert len(fp) == 64 and fp == _spec(name="j", input={"path": "a.parquet", "id": "id"},
                                         prompt={"template": "{{ text }}"}).fingerprint()
    same = [
        with_overrides(base, input="/elsewhere/b.parquet", output="/o", device="cpu"),
        _spec(name="other-name", input={"path": "a.parquet", "id": "id", "batch_rows": 7},
              prompt={"template": "{{ text }}"}, engine={"gpu_memory": "1GiB", "compress": "both"}),
    ]
    for s in same:
        assert s.fingerprint() == fp
    different = [
        _spec(name="j", input={"path": "a.parquet", "id": "id"}, prompt={"template": "{{ text }}!"}),
        _spec(name="j", input={"path": "a.parquet", "id": "id"}, prompt={"template": "{{ text }}"},
              generation={"max_new_tokens": 5}),
        _spec(name="j", model="x.gguf", input={"path": "a.parquet", "id": "id"}, prompt={"template": "{{ text }}"}),
        _spec(name="j", input={"path": "a.parquet", "id": "key"}, prompt={"template": "{{ text }}"}),
        _spec(name="j", input={"path": "a.parquet", "id": "id"}, prompt={"template": "{{ text }}"},
              output={"schema": {"type": "object"}}),
    ]
    for s in different:
        assert s.fingerprint() != fp
    assert base.fingerprint(weights="dummy") != fp


def test_changed_fields_names_paths():
    """ResumeMismatch names what changed, down to the field."""
    a = _spec(generation={"max_new_tokens": 5}).fingerprint_fields()
    b = _spec(generation={"max_new_tokens": 6}, prompt={"system": "s"}).fingerprint_fields()
    assert changed_fields(a, b) == ["generation.max_new_tokens", "prompt.system"]
