"""Weak spots of the input layer found by the attack of issue 28 (item 7): a CSV with a byte order
mark, infinite numbers in a job, an input path that does not exist, and input rows removed after
their outputs were committed. Each is a clear line or a warning, never a silent surprise."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import fake_engine
from conftest import write_job, write_parquet
from corpusgen.cli import cli
from corpusgen.errors import InputError, JobSpecError
from corpusgen.job.events import JobWarning
from corpusgen.job.reading import job_status
from corpusgen.job.readers import open_input
from corpusgen.job.runner import run_job
from corpusgen.job.spec import InputSpec, load_spec, spec_from_dict


def test_csv_with_a_byte_order_mark_names_its_first_column_plainly(tmp_path):
    """A CSV saved with a BOM (Excel does) reported `no column 'id'; available columns: \\ufeffid`;
    the BOM is not part of the first column's name."""
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfid,text\n1,a\n2,b\n")
    r = open_input(InputSpec(path=str(p), id="id"), columns=["text"])
    assert r.available == ["id", "text"]
    assert [k for b in r.batches() for k in b.keys] == ["1", "2"]


@pytest.mark.parametrize("section, field, value", [
    ("generation", "temperature", ".inf"), ("generation", "temperature", ".nan"),
    ("generation", "top_p", ".inf"), ("generation", "top_p", ".nan"), ("generation", "temperature", "-.inf"),
])
def test_infinite_and_nan_numbers_are_refused(tmp_path, section, field, value):
    """`temperature: .inf` was accepted while `.nan` was refused: every float field of a job refuses
    both, naming the field."""
    p = tmp_path / "j.yaml"
    p.write_text(f"name: x\n{section}: {{{field}: {value}}}\n")
    with pytest.raises(JobSpecError, match=rf"{section}\.{field}: expected a number"):
        load_spec(p)


@pytest.mark.parametrize("placement", [{"gpu": float("nan"), "cpu": float("nan")}, {"gpu": float("inf")}])
def test_policy_fractions_refuse_nan_and_inf(placement):
    """A NaN fraction passed every comparison of the policy check (NaN < 0 and NaN > 1 are both
    false); NaN and inf are refused by name."""
    with pytest.raises(JobSpecError, match="engine.policy: policy.weights: fractions must be"):
        spec_from_dict({"name": "x", "engine": {"policy": {"weights": placement}}})


@pytest.mark.parametrize("bits", [float("inf"), float("nan"), 4.5])
def test_policy_compression_bits_that_are_not_integers_are_refused(bits):
    """`bits: .inf` crashed with OverflowError (a traceback); now one line."""
    with pytest.raises(JobSpecError, match="bits and group_size must be integers"):
        spec_from_dict({"name": "x", "engine": {"policy": {"compress_weights": {"bits": bits}}}})


def test_a_missing_input_directory_says_it_does_not_exist(tmp_path):
    """`--input /nonexistent/dir/` said "cannot tell the format"; it says the input does not exist."""
    with pytest.raises(InputError, match="input not found") as e:
        open_input(InputSpec(path=str(tmp_path / "nonexistent" / "dir") + "/"))
    assert "format" not in str(e.value)
    job = write_job(tmp_path)
    res = CliRunner().invoke(cli, ["run", str(job), "--input", str(tmp_path / "nope") + "/"])
    assert res.exit_code == 1 and "input not found" in res.output and "Traceback" not in res.output


def test_removed_input_rows_are_counted_on_resume_and_in_status(tmp_path, fake_env):
    """Rows removed from the input after their outputs were committed stayed in the output silently
    (`rows: 9/7`). A resume that reads the whole input warns with their count, and `status` shows it."""
    data = tmp_path / "data" / "docs.parquet"
    rows = [{"id": f"r{i}", "text": f"doc {i}"} for i in range(9)]
    write_parquet(data, rows)
    job = write_job(tmp_path, prompt={"template": "{{ text }}"})
    out = tmp_path / "out"
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine)
    write_parquet(data, rows[:5] + rows[7:])  # r5, r6 removed
    events: list = []
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, on_event=events.append)
    warnings = [e.message for e in events if isinstance(e, JobWarning)]
    assert any(w.startswith("2 committed rows have keys no longer in the input") for w in warnings), warnings
    st = job_status(out)
    assert st["stale_keys"] == 2 and st["rows_done"] == 9
    res = CliRunner().invoke(cli, ["status", str(out)])
    assert "stale: 2 committed rows have keys no longer in the input" in res.output
    # with --limit the input is not read whole: nothing is claimed
    events = []
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, on_event=events.append, limit=3)
    assert not [e for e in events if isinstance(e, JobWarning)]
    write_parquet(data, rows)  # back: nothing stale
    events = []
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, on_event=events.append)
    assert not [e for e in events if isinstance(e, JobWarning)] and job_status(out)["stale_keys"] == 0
    assert json.loads((out / "progress.json").read_text())["stale_keys"] == 0
