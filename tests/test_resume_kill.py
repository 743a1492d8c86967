"""A real `python -m corpusgen run` killed with SIGKILL (and stopped with SIGTERM) resumes to exactly
the output of an uninterrupted run: every key once, the same texts (DESIGN §1.2: never lose work)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_engine
from fake_cli import SCRIPT as FAKE_CLI
from conftest import REPO, make_rows, read_outputs, write_job, write_parquet
from corpusgen.job.reading import job_status
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec


def _start(job: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "CORPUSGEN_FAKE_DELAY": str(delay),
           "CORPUSGEN_FAKE_BLOCK": "4", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, FAKE_CLI, "run", str(job), "--output", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = json.loads((out / "progress.json").read_text())["rows_done"]
        except (FileNotFoundError, ValueError, KeyError):
            done = 0
        if done >= rows:
            return done
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"no progress to {rows} rows in {timeout}s")


def _reference(tmp_path: Path, job: Path):
    run_job(load_spec(job), output_dir=tmp_path / "ref", engine_factory=fake_engine.open_engine)
    return read_outputs(tmp_path / "ref").drop_columns(["run_id"])


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """Kill -9 twice at different points (mid-block, maybe mid-commit); the final output is identical."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(120))
    job = write_job(tmp_path)
    ref = _reference(tmp_path, job)
    out = tmp_path / "out"
    for stop_after in (10, 50):
        proc = _start(job, out, delay=0.01)
        _wait_rows(out, stop_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        st = job_status(out)
        assert st["state"] == "dead" and st["lock"]["alive"] is False
        assert stop_after <= st["rows_done"] < 120
    proc = _start(job, out, delay=0.0)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "resuming" in stdout
    got = read_outputs(out)
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 120
    assert got.drop_columns(["run_id"]).equals(ref)
    assert len(set(got.column("run_id").to_pylist())) == 3
    assert not list(out.glob("*.tmp"))


def test_sigterm_stops_cleanly(tmp_path):
    """SIGTERM (a scheduler stopping the job) records an interrupted run, exits 130, resumes exactly."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(60))
    job = write_job(tmp_path)
    ref = _reference(tmp_path, job)
    out = tmp_path / "out"
    proc = _start(job, out, delay=0.01)
    _wait_rows(out, 12, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert job_status(out)["state"] == "interrupted"
    proc = _start(job, out, delay=0.0)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert read_outputs(out).drop_columns(["run_id"]).equals(ref)
