"""Kills, stops and two runs at once: real `python -m corpusgen run` processes (fake engine) are
SIGKILLed at random moments and at every stage of a part's commit, stopped with SIGINT/SIGTERM, and
raced on one directory; after each, the committed parts are intact, and the final output equals an
uninterrupted run's, every key exactly once (docs/reliability.md, "Kills" and "Concurrency").

The helpers here (start, integrity) are shared with tests/test_reliability_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fake_engine
from fake_cli import SCRIPT as FAKE_CLI
from conftest import REPO, make_rows, read_outputs, write_job, write_parquet
from corpusgen.job.manifest import Manifest
from corpusgen.job.reading import job_status
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec

ROWS = 96
BLOCK = 4  # one part per block of 4 rows: 24 commits per full run
LOOP_ROWS = 480  # the kill loop: enough work that 24 killed runs do not finish it


def start(job: Path, out: Path, *extra: str, delay: float = 0.0, **env: str) -> subprocess.Popen:
    """`tests/fake_cli.py run JOB --output OUT` (the fake engine); ``env`` adds CORPUSGEN_FAKE_*."""
    full = {**os.environ, "CORPUSGEN_FAKE_DELAY": str(delay),
            "CORPUSGEN_FAKE_BLOCK": str(BLOCK), "PYTHONPATH": str(REPO),
            **{f"CORPUSGEN_FAKE_{k.upper()}": str(v) for k, v in env.items()}}
    for k in ("CORPUSGEN_FAKE_STAGES", "CORPUSGEN_FAKE_HANG", "CORPUSGEN_FAKE_DISK_FULL"):
        if k.removeprefix("CORPUSGEN_FAKE_").lower() not in env:
            full.pop(k, None)
    # SIGINT as in a terminal, even when the test runner itself was started with it ignored (a
    # background job of a script): corpusgen keeps an ignored SIGINT ignored, as nohup wants
    return subprocess.Popen([sys.executable, FAKE_CLI, "run", str(job), "--output", str(out), *extra],
                            cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(cond, proc: subprocess.Popen | None = None, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout}s")


def stage_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def integrity(out: Path) -> pa.Table:
    """Every part the manifest lists is on disk with its size, sha256 and row count; its keys are
    the manifest's keys of that part; no key is committed twice. Returns the committed rows."""
    m = Manifest(out, readonly=True)
    try:
        parts = m.parts()
        keys = dict(m.db.execute("SELECT key, part FROM keys").fetchall())
    finally:
        m.close()
    tables, seen = [], []
    for p in parts:
        data = (out / p["name"]).read_bytes()
        assert len(data) == p["size"] and hashlib.sha256(data).hexdigest() == p["sha256"], p["name"]
        t = pq.read_table(pa.BufferReader(data))
        assert t.num_rows == p["rows"], p["name"]
        for k in t.column("key").to_pylist():
            assert keys.get(k) == p["name"], (k, p["name"])
            seen.append(k)
        tables.append(t)
    assert len(seen) == len(set(seen)) == len(keys), "a key is committed twice, or without its part"
    return pa.concat_tables(tables).sort_by("key") if tables else None


def orphans(out: Path) -> list[str]:
    """Part files on disk the manifest does not list, and .tmp files."""
    m = Manifest(out, readonly=True)
    try:
        known = {p["name"] for p in m.parts()}
    finally:
        m.close()
    return sorted(p.name for p in out.iterdir()
                  if p.name.endswith(".tmp") or (p.name.startswith("part-") and p.name not in known))


def reference(tmp_path: Path, job: Path) -> pa.Table:
    run_job(load_spec(job), output_dir=tmp_path / "ref", engine_factory=fake_engine.open_engine)
    return read_outputs(tmp_path / "ref").drop_columns(["run_id"])


def make_corpus_job(tmp_path: Path, rows: int = ROWS) -> tuple[Path, pa.Table]:
    """A Parquet corpus of ``rows`` rows, its job, and the uninterrupted run's output."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(rows))
    job = write_job(tmp_path)
    return job, reference(tmp_path, job)


@pytest.fixture
def corpus_job(tmp_path: Path) -> tuple[Path, pa.Table]:
    return make_corpus_job(tmp_path)


def finish(job: Path, out: Path, ref: pa.Table) -> None:
    """Resume to the end; the output is exactly the uninterrupted one."""
    proc = start(job, out)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    got = integrity(out)
    assert got.num_rows == ref.num_rows and got.drop_columns(["run_id"]).equals(ref)
    assert orphans(out) == []


# --- kills ---------------------------------------------------------------------------------------

STAGES = ("tmp", "renamed", "sql", "committed")


def test_sigkill_loop_at_random_moments_and_every_commit_stage(tmp_path):
    """24 runs, each SIGKILLed — half at a random moment (startup, generation, commit), half frozen
    at one stage of a part's commit (tmp file written / renamed / inside the manifest transaction /
    committed) — each resuming the last. After every kill the committed parts are intact; the
    final output equals an uninterrupted run, every key exactly once."""
    job, ref = make_corpus_job(tmp_path, LOOP_ROWS)
    out, rng = tmp_path / "out", random.Random(20240607)
    killed_at: list[str] = []
    for i in range(24):
        stages = tmp_path / f"stages-{i}"
        if i % 2 == 0:
            stage = STAGES[(i // 2) % len(STAGES)]
            nth = rng.randint(1, 3)
            proc = start(job, out, delay=0.002, stages=stages, hang=f"{stage}:{nth}")
            # it freezes at the nth time it reaches the stage
            wait_for(lambda: sum(line.startswith(stage + " ") for line in stage_lines(stages)) >= nth,
                     proc, what=f"stage {stage} #{nth}")
            proc.kill()
            proc.wait()
            part = stage_lines(stages)[-1].split()[1]
            killed_at.append(f"{stage}:{part}")
            left = orphans(out)
            if stage == "tmp":
                assert part + ".tmp" in left
            elif stage in ("renamed", "sql"):  # on disk, not committed: the next run deletes it
                assert part in left
            else:
                assert part not in left and (out / part).exists()
        else:
            proc = start(job, out, delay=0.02, stages=stages)
            time.sleep(rng.uniform(0.1, 1.6))  # startup is most of a second: kills land everywhere
            proc.kill()
            proc.wait()
            killed_at.append(f"random:{len(stage_lines(stages))} commit stages")
        integrity(out)
        assert job_status(out)["lock"]["alive"] is False
    assert len(killed_at) == 24
    done = job_status(out)["rows_done"]
    print(f"rows done after the kills: {done} of {LOOP_ROWS}")
    assert done < LOOP_ROWS, f"the kills should leave work for the last run ({killed_at})"
    finish(job, out, ref)


# --- stops -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, stage", [(signal.SIGTERM, "tmp"), (signal.SIGINT, "renamed"),
                                        (signal.SIGTERM, "sql"), (signal.SIGINT, None)])
def test_stop_signal_finishes_the_commit_and_exits_promptly(tmp_path, corpus_job, sig, stage):
    """SIGINT/SIGTERM — during generation, or in the middle of a part's commit — exits 130 within a
    few seconds, having finished the commit it was in: no .tmp, no uncommitted part, intact parts,
    the run recorded as interrupted; a resume completes the job exactly."""
    job, ref = corpus_job
    out, stages = tmp_path / "out", tmp_path / "stages"
    if stage is None:
        proc = start(job, out, delay=0.01, stages=stages)
        wait_for(lambda: len(stage_lines(stages)) >= 8, proc, what="two commits")
    else:  # frozen for 1.5 s inside the second commit
        proc = start(job, out, delay=0.002, stages=stages, hang=f"{stage}:2:1.5")
        wait_for(lambda: stage_lines(stages).count(f"{stage} part-00001.parquet 2") == 1, proc, what=stage)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert elapsed < 5.0
    assert orphans(out) == []
    committed = integrity(out)
    if stage is not None:  # the commit under way when the signal came was completed, not torn
        assert "part-00001.parquet" in {p.name for p in out.iterdir()}
        assert committed.num_rows == 2 * BLOCK
    st = job_status(out)
    assert st["state"] == "interrupted" and st["runs"][-1]["status"] == "interrupted"
    finish(job, out, ref)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_commits_the_rows_already_finished(tmp_path, corpus_job, sig):
    """A stop in the middle of a block used to throw away the rows the engine had already finished
    (issue 28: a Ctrl-C after 82 s of generation committed nothing). They are committed before the
    exit, in one part, within seconds; only the rows still being generated are lost."""
    job, ref = corpus_job
    out = tmp_path / "out"
    proc = start(job, out, delay=0.05, block=64)  # one block of 64 rows: no commit before it ends
    wait_for(lambda: (json.loads((out / "progress.json").read_text()).get("state") == "running"
                      if (out / "progress.json").exists() else False), proc, what="generation")
    time.sleep(1.0)  # about 20 rows finish, none is committed yet
    assert not list(out.glob("part-*"))
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert time.monotonic() - t0 < 5.0
    committed = integrity(out)
    assert committed is not None and 5 <= committed.num_rows < 64, stderr
    assert f"{committed.num_rows} rows committed by this run" in stderr
    assert orphans(out) == [] and [p.name for p in out.glob("part-*")] == ["part-00000.parquet"]
    assert job_status(out)["state"] == "interrupted"
    finish(job, out, ref)


# --- concurrency -----------------------------------------------------------------------------------

def test_second_run_is_refused_while_the_first_runs_then_takes_over(tmp_path, corpus_job):
    """A second run (or --restart) on a directory in use fails at once naming the holder and touches
    nothing; once the holder is SIGKILLed its lock is stale (flock dies with the process) and the
    next run takes over and completes the job exactly."""
    job, ref = corpus_job
    out, stages = tmp_path / "out", tmp_path / "stages"
    first = start(job, out, delay=0.05, stages=stages)
    wait_for(lambda: len(stage_lines(stages)) >= 4, first, what="a commit")
    for extra in ((), ("--restart",)):
        second = start(job, out, *extra)
        _, stderr = second.communicate(timeout=30)
        assert second.returncode == 1 and "Traceback" not in stderr, stderr
        assert f"in use by pid {first.pid}" in stderr and len(stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out.old-*"))  # --restart moved nothing
    st = job_status(out)
    assert st["state"] == "running" and st["lock"]["alive"] and st["lock"]["pid"] == first.pid
    first.kill()
    first.wait()
    integrity(out)
    assert json.loads((out / "lock").read_text())["pid"] == first.pid  # stale info, not a held lock
    finish(job, out, ref)


def test_two_runs_started_together_one_wins(tmp_path, corpus_job):
    """Two runs started at the same moment on a new directory: one generates, the other is refused
    with the lock holder's pid (never another error, never both generating)."""
    job, ref = corpus_job
    out = tmp_path / "out"
    procs = [start(job, out, delay=0.02), start(job, out, delay=0.02)]
    results = [(p.pid, *p.communicate(timeout=60), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    if codes == [0, 0]:  # the second started only after the first had finished: it resumed
        assert sum(f"{ROWS} already done" in r[1] for r in results) == 1
    else:
        assert codes == [0, 1], results
        winner = next(r for r in results if r[3] == 0)
        loser = next(r for r in results if r[3] == 1)
        assert f"in use by pid {winner[0]}" in loser[2] and "Traceback" not in loser[2], loser
    got = integrity(out)
    assert got.drop_columns(["run_id"]).equals(ref)
