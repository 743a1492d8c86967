"""Writer, manifest and run_job: atomic parts, resume, statuses, locks, fingerprints, interrupts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import fake_engine
from conftest import make_rows, read_outputs, write_job, write_parquet
from corpusgen.errors import LockedError, OutputError, ResumeMismatch
from corpusgen.job.events import JobFinished, JobStarted, JobWarning, RowsCommitted
from corpusgen.job.lock import OutputLock, read_lock
from corpusgen.job.manifest import Manifest
from corpusgen.job.parts import clean_orphans
from corpusgen.job.reading import job_status
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec
from corpusgen.job.writer import OutputRow, output_schema, write_part

SCHEMA = {"type": "object", "properties": {"first": {"type": "string"}, "words": {"type": "integer"}},
          "required": ["first", "words"]}


def _run(job: Path, out: Path, **kw):
    events = []
    kw.setdefault("engine_factory", fake_engine.open_engine)
    summary = run_job(load_spec(job), output_dir=out, on_event=events.append, **kw)
    return summary, events


def test_part_is_written_atomically_with_the_fixed_schema(tmp_path):
    """A part appears under its final name only complete, with exactly the job's Arrow schema."""
    schema = output_schema(with_json=True)
    rows = [OutputRow(key="a", status="ok", text="{}", json="{}", finish_reason="eos", prompt_tokens=3,
                      gen_tokens=2, run_id="r"),
            OutputRow(key="b", status="prompt_too_long", prompt_tokens=9, error="too long", run_id="r")]
    info = write_part(tmp_path, 7, rows, schema)
    assert info.name == "part-00007.parquet" and info.rows == 2 and info.statuses == {"ok": 1, "prompt_too_long": 1}
    assert sorted(os.listdir(tmp_path)) == ["part-00007.parquet"]
    table = pq.read_table(tmp_path / info.name)
    assert table.schema.equals(schema) and table.column("key").to_pylist() == ["a", "b"]
    assert "json" not in output_schema(with_json=False).names


def test_manifest_commit_and_orphans(tmp_path):
    """Only parts recorded in the manifest count; files a crash left behind are removed."""
    m = Manifest(tmp_path)
    rows = [OutputRow(key=k, status="ok", run_id="r") for k in ("a", "b")]
    info = write_part(tmp_path, 0, rows, output_schema(False))
    m.commit_part(info, ["a", "b"], "r")
    assert m.committed(["a", "c", "b"]) == {"a": info.name, "b": info.name}
    assert m.next_part_number() == 1 and m.totals() == {"rows": 2, "parts": 1, "statuses": {"ok": 2}}
    write_part(tmp_path, 1, rows, output_schema(False))  # renamed, never committed
    (tmp_path / "part-00002.parquet.tmp").write_bytes(b"half")
    assert clean_orphans(tmp_path, m) == ["part-00001.parquet", "part-00002.parquet.tmp"]
    assert (tmp_path / info.name).exists()
    assert m.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    m.close()


def test_run_statuses(tmp_path, monkeypatch):
    """Each way a row can end maps to its status; no row is dropped."""
    rows = [{"id": "ok", "text": "alpha beta"}, {"id": "bad", "text": "NOT-JSON please"},
            {"id": "err", "text": "ENGINE-ERROR"}, {"id": "null", "text": None}, {"id": "empty", "text": ""},
            {"id": "long", "text": "z " * 400}]
    write_parquet(tmp_path / "data" / "docs.parquet", rows)
    job = write_job(tmp_path, prompt={"template": "{{ text }}"}, output={"schema": SCHEMA},
                    generation={"max_new_tokens": 200})
    monkeypatch.setenv("CORPUSGEN_FAKE_CONTEXT", "600")
    summary, _ = _run(job, tmp_path / "out")
    t = {r["key"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    assert {k: v["status"] for k, v in t.items()} == {
        "ok": "ok", "bad": "schema_invalid", "err": "error", "null": "error", "empty": "ok",
        "long": "prompt_too_long"}
    assert json.loads(t["ok"]["json"]) == {"first": "alpha", "words": 2, "h": json.loads(t["ok"]["text"])["h"]}
    assert t["bad"]["json"] is None and t["bad"]["error"].startswith("not JSON")
    assert t["err"]["error"] == "fake engine failure" and t["err"]["finish_reason"] == "error"
    assert t["long"]["finish_reason"] is None and t["long"]["prompt_tokens"] > 400
    assert t["ok"]["gen_tokens"] == len(t["ok"]["text"]) and t["ok"]["run_id"] == summary.run_id
    assert summary.rows == 6 and sum(summary.statuses.values()) == 6


def test_length_is_truncated_and_stop_strings(tmp_path, corpus):
    """An answer cut by max_new_tokens is 'truncated' (never repaired); a stop string ends a row 'ok'."""
    job = write_job(tmp_path, generation={"max_new_tokens": 10})
    _run(job, tmp_path / "a")
    t = read_outputs(tmp_path / "a").to_pylist()
    assert {r["status"] for r in t} == {"truncated"} and {r["finish_reason"] for r in t} == {"length"}
    assert all(r["gen_tokens"] == 10 for r in t)
    job = write_job(tmp_path, name="s", generation={"max_new_tokens": 64, "stop": ['"words"']})
    _run(job, tmp_path / "b")
    t = read_outputs(tmp_path / "b").to_pylist()
    assert {r["status"] for r in t} == {"ok"} and {r["finish_reason"] for r in t} == {"stop"}
    assert all('"words"' not in r["text"] for r in t)


def test_events_blocks_and_progress(tmp_path, corpus):
    """Events tell the whole story; blocks respect the engine's block size; progress.json is current."""
    engines = []

    def factory(model, **kw):
        engines.append(fake_engine.FakeEngine(block_size=5))
        return engines[0]

    summary, events = _run(job := write_job(tmp_path), tmp_path / "out", engine_factory=factory)
    assert isinstance(events[0], JobStarted) and isinstance(events[-1], JobFinished)
    assert events[0].block_size == 5 and events[0].rows_total == 40 and not events[0].resumed
    commits = [e for e in events if isinstance(e, RowsCommitted)]
    assert sum(e.rows for e in commits) == 40 == commits[-1].rows_done
    assert max(engines[0].calls) <= 5 and sum(engines[0].calls) == 40
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["rows_done"] == 40 and progress["pid"] == os.getpid()
    run = job_status(tmp_path / "out")["runs"][0]
    assert run["status"] == "finished" and run["rows"] == 40 and run["engine_seconds"] >= 0
    assert run["overhead_seconds"] == pytest.approx(summary.overhead_seconds)
    assert 0 <= summary.overhead_fraction <= 1
    # a second run resumes and does nothing
    summary2, events2 = _run(job, tmp_path / "out")
    assert summary2.rows == 0 and summary2.skipped == 40 and events2[0].resumed


def test_duplicate_keys_first_wins(tmp_path):
    """Duplicate ids: the first row is generated, later ones are skipped and counted."""
    rows = make_rows(6)
    rows[4]["id"] = rows[1]["id"]
    rows[5]["id"] = rows[1]["id"]
    write_parquet(tmp_path / "data" / "docs.parquet", rows)
    summary, events = _run(write_job(tmp_path), tmp_path / "out", commit_rows=2)
    t = read_outputs(tmp_path / "out").to_pylist()
    assert [r["key"] for r in t] == sorted({r["id"] for r in rows})
    assert summary.duplicates == 2 and summary.rows == 4
    assert any(isinstance(e, JobWarning) and "duplicate key 'doc-0001'" in e.message for e in events)
    assert fake_engine.answer_for("Title 1: " + rows[1]["text"]) == [r for r in t if r["key"] == "doc-0001"][0]["text"]


def test_changed_spec_is_refused_and_restart_moves_aside(tmp_path, corpus):
    """Resuming under a different spec never mixes outputs; --restart keeps the old ones aside."""
    _run(write_job(tmp_path), tmp_path / "out")
    changed = write_job(tmp_path, generation={"max_new_tokens": 20}, prompt={"system": "Be terse."})
    with pytest.raises(ResumeMismatch) as e:
        _run(changed, tmp_path / "out")
    assert "changed: generation.max_new_tokens, prompt.system" in str(e.value) and "--restart" in str(e.value)
    summary, events = _run(changed, tmp_path / "out", restart=True)
    assert summary.rows == 40 and events[0].moved_to
    old = Path(events[0].moved_to)
    assert old.parent == tmp_path and old.name.startswith("out.old-") and (old / "manifest.sqlite").exists()
    assert len(read_outputs(tmp_path / "out")) == 40
    _run(changed, tmp_path / "out")  # and now it resumes normally


def test_changed_spec_allowed_when_nothing_was_committed(tmp_path, corpus):
    """A job that failed before committing anything (say the model did not load) may be edited freely."""
    def broken(model, **kw):
        raise OutputError("no engine today")

    with pytest.raises(OutputError):
        _run(write_job(tmp_path), tmp_path / "out", engine_factory=broken)
    summary, _ = _run(write_job(tmp_path, generation={"max_new_tokens": 20}), tmp_path / "out")
    assert summary.rows == 40


def test_dummy_weights_change_the_fingerprint(tmp_path, corpus):
    """Outputs of random weights must never be mixed with real ones."""
    _run(write_job(tmp_path), tmp_path / "out", limit=3)
    with pytest.raises(ResumeMismatch, match="weights"):
        _run(write_job(tmp_path), tmp_path / "out", dummy=True)


def test_unwritable_or_foreign_output_dir(tmp_path, corpus):
    """An output path that cannot be a directory, or a directory of other files, is refused cleanly."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write the output directory"):
        _run(write_job(tmp_path), tmp_path / "file" / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a corpusgen output directory"):
        _run(write_job(tmp_path), tmp_path / "mine")


def test_lock_blocks_a_second_run_and_names_the_holder(tmp_path, corpus):
    """Two runs on one directory would duplicate work: the second gets LockedError with the pid."""
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(LockedError, match=f"in use by pid {os.getpid()}"):
            _run(write_job(tmp_path), out)
        assert read_lock(out)["alive"] is True
    assert read_lock(out)["alive"] is False
    _run(write_job(tmp_path), out)


def test_lock_of_a_dead_process_does_not_block(tmp_path, corpus):
    """A process killed while holding the lock leaves no stale lock (flock dies with it)."""
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys, time; from pathlib import Path; from corpusgen.job.lock import OutputLock\n"
            "with OutputLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            _run(write_job(tmp_path), out)
    finally:
        proc.kill()
        proc.wait()
    assert read_lock(out) == {"pid": proc.pid, "host": read_lock(out)["host"], "started": read_lock(out)["started"],
                              "alive": False}
    summary, _ = _run(write_job(tmp_path), out)
    assert summary.rows == 40


class _Boom(Exception):
    pass


def test_interrupt_mid_block_keeps_committed_parts(tmp_path, corpus):
    """Ctrl-C mid-block discards only uncommitted rows; resuming gives exactly the uninterrupted output."""
    _run(job := write_job(tmp_path), tmp_path / "ref")

    class Interrupting(fake_engine.FakeEngine):
        yielded = 0

        def generate(self, requests, sampling, logits_hook=None):
            for r in super().generate(requests, sampling):
                Interrupting.yielded += 1
                if Interrupting.yielded == 13:
                    raise KeyboardInterrupt
                yield r

    with pytest.raises(KeyboardInterrupt):
        _run(job, tmp_path / "out", engine_factory=lambda m, **kw: Interrupting(block_size=4))
    st = job_status(tmp_path / "out")
    assert st["state"] == "interrupted" and st["rows_done"] == 12 and st["runs"][0]["status"] == "interrupted"
    summary, _ = _run(job, tmp_path / "out")
    assert summary.skipped == 12 and summary.rows == 28
    assert read_outputs(tmp_path / "out").drop_columns(["run_id"]).equals(
        read_outputs(tmp_path / "ref").drop_columns(["run_id"]))


def test_crash_between_rename_and_manifest_commit(tmp_path, corpus, monkeypatch):
    """A part renamed but not recorded is not done: it is deleted and its rows generated again."""
    job = write_job(tmp_path)
    calls = {"n": 0}
    real = Manifest.commit_part

    def flaky(self, info, keys, run_id):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Boom("power cut")
        return real(self, info, keys, run_id)

    monkeypatch.setattr(Manifest, "commit_part", flaky)
    with pytest.raises(_Boom):
        _run(job, tmp_path / "out", commit_rows=8)
    monkeypatch.setattr(Manifest, "commit_part", real)
    assert (tmp_path / "out" / "part-00002.parquet").exists()
    assert job_status(tmp_path / "out")["state"] == "failed"
    summary, events = _run(job, tmp_path / "out", commit_rows=8)
    assert any(isinstance(e, JobWarning) and "removed part-00002.parquet" in e.message for e in events)
    t = read_outputs(tmp_path / "out")
    assert t.num_rows == 40 and len(set(t.column("key").to_pylist())) == 40
    assert summary.rows == 24


def test_commit_every_n_seconds(tmp_path, corpus):
    """Slow engines still commit regularly: commit_seconds bounds the work a crash can lose."""
    def slow(model, **kw):
        return fake_engine.FakeEngine(block_size=40, delay=0.02)

    summary, events = _run(write_job(tmp_path), tmp_path / "out", engine_factory=slow, commit_seconds=0.1,
                           commit_rows=1000)
    commits = [e for e in events if isinstance(e, RowsCommitted)]
    assert len(commits) >= 3 and sum(e.rows for e in commits) == 40
