"""Data parallelism (DESIGN §7): `torchrun -m corpusgen run` on CPU with the gloo backend.

Ranks split the rows by sha256(key) mod world and write their own parts and manifests under
DIR/rank-<r>-of-<w>/; these tests prove that the whole is the single-process output (every key
once, the same texts), that killing one rank damages nobody's committed rows and a relaunch
finishes the job, and that relaunching with another world size (or none) resumes as well.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fake_engine
from fake_cli import SCRIPT as FAKE_CLI
from conftest import REPO, make_rows, read_outputs, write_job, write_parquet
from corpusgen.cli import cli
from corpusgen.errors import CorpusgenError, LockedError
from corpusgen.job.lock import OutputLock
from corpusgen.job.reading import connect_sql, job_status
from corpusgen.job.ranks import Ranks, key_rank
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(job: Path, out: Path, nproc: int, *args: str, delay: float = 0.0) -> subprocess.Popen:
    """`python -m torch.distributed.run --nproc-per-node N tests/fake_cli.py run JOB -o OUT` (the fake engine)."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(CORPUSGEN_FAKE_DELAY=str(delay), CORPUSGEN_FAKE_BLOCK="4",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--monitor-interval", "0.1",
           FAKE_CLI, "run", str(job), "--output", str(out), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: a session this test started
        raise
    return stdout, stderr


def _reference(tmp_path: Path, job: Path) -> pa.Table:
    """The single-process output, without the run ids."""
    run_job(load_spec(job), output_dir=tmp_path / "ref", engine_factory=fake_engine.open_engine, ranks=Ranks())
    return read_outputs(tmp_path / "ref").drop_columns(["run_id"])


def _rank_table(out: Path, rank: int, world: int) -> pa.Table:
    d = out / f"rank-{rank}-of-{world}"
    return pa.concat_tables([pq.read_table(p) for p in sorted(d.glob("part-*.parquet"))])


def _wait(predicate, proc: subprocess.Popen, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"not reached in {timeout}s")
        time.sleep(0.005)


def _rows_done(d: Path) -> int:
    try:
        return json.loads((d / "progress.json").read_text())["rows_done"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def test_key_rank_is_a_stable_hash():
    """The key → rank map must not depend on the process (Python's hash() is salted per process),
    or a relaunch would hand keys to other ranks; and it must spread keys over every rank."""
    keys = [f"doc-{i:04d}" for i in range(200)]
    mine = [key_rank(k, 3) for k in keys]
    code = "from corpusgen.job.ranks import key_rank; print([key_rank(f'doc-{i:04d}', 3) for i in range(200)])"
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(got.stdout) == mine
    assert min(mine.count(r) for r in range(3)) > 40  # 200 keys over 3 ranks: about 67 each
    assert key_rank("doc-0000", 1) == 0
    with pytest.raises(CorpusgenError, match="RANK=3 is not in"):
        Ranks.from_env({"WORLD_SIZE": "2", "RANK": "3"})
    assert Ranks.from_env({}) == Ranks()


def test_two_ranks_equal_one_process(tmp_path):
    """Two ranks write disjoint halves in their own directories; together they are exactly the
    single-process output, and status/sql see the whole job."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(120))
    job = write_job(tmp_path)
    ref = _reference(tmp_path, job)
    out = tmp_path / "out"
    proc = _torchrun(job, out, 2)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert stdout.count("finished:") == 2

    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rank-0-of-2", "rank-1-of-2"]
    assert not list(out.glob("part-*"))  # DIR itself holds the job record, no rows
    for rank in (0, 1):
        keys = _rank_table(out, rank, 2).column("key").to_pylist()
        assert keys and all(key_rank(k, 2) == rank for k in keys)
    got = read_outputs(out)
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 120
    assert got.drop_columns(["run_id"]).equals(ref)

    st = job_status(out)
    assert (st["state"], st["world"], st["rows_done"], st["rows_total"]) == ("finished", 2, 120, 120)
    assert [(d["dir"], d["state"], d["lock"]["alive"]) for d in st["ranks"]] == [
        ("rank-0-of-2", "finished", False), ("rank-1-of-2", "finished", False)]
    text = CliRunner().invoke(cli, ["status", str(out)]).output
    assert "rows: 120/120" in text and "rank-1-of-2" in text and "(rank 1/2)" in text
    con = connect_sql(out)
    assert con.sql("SELECT count(DISTINCT key), count(*) FROM outputs").fetchall() == [(120, 120)]
    per_rank = dict(con.sql("SELECT rank, sum(rows) FROM runs WHERE world = 2 GROUP BY 1").fetchall())
    assert set(per_rank) == {0, 1} and sum(per_rank.values()) == 120
    assert con.sql("SELECT sum(rows) FROM parts").fetchall() == [(120,)]

    r1 = out / "rank-1-of-2"
    with OutputLock(r1):
        with pytest.raises(LockedError, match="rank-1-of-2"):  # no other launch while a rank is alive
            run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, ranks=Ranks())
        # a live rank on another machine: its manifest is never opened (SQLite's WAL index does not
        # survive a network filesystem); its progress.json and complete part files are read instead
        (r1 / "lock").write_text(json.dumps({"pid": 1, "host": "another-machine", "started": "now"}))
        (r1 / "manifest.sqlite").write_bytes(b"not to be opened")
        st = job_status(out)
        assert (st["state"], st["rows_done"]) == ("running", 120)
        assert connect_sql(out).sql("SELECT count(DISTINCT key) FROM outputs").fetchall() == [(120,)]


def test_killed_rank_then_relaunch_resumes(tmp_path):
    """SIGKILL one rank mid-run: torchrun stops the other, the survivor's committed rows stay
    intact, and the same launch command again finishes the job with every key once."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(160))
    job = write_job(tmp_path)
    ref = _reference(tmp_path, job)
    out = tmp_path / "out"
    r0, r1 = out / "rank-0-of-2", out / "rank-1-of-2"
    proc = _torchrun(job, out, 2, delay=0.03)
    _wait(lambda: _rows_done(r0) >= 4 and _rows_done(r1) >= 8, proc)
    st = job_status(out)
    assert st["state"] == "running" and all(d["lock"]["alive"] for d in st["ranks"])
    victim = json.loads((r1 / "lock").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    _, stderr = _finish(proc)
    assert proc.returncode != 0

    st = job_status(out)
    states = {d["dir"]: d["state"] for d in st["ranks"]}
    assert states["rank-1-of-2"] == "dead" and states["rank-0-of-2"] in ("interrupted", "dead"), states
    assert st["state"] == "dead" and not any(d["lock"]["alive"] for d in st["ranks"])
    assert 12 <= st["rows_done"] < 160
    survivor = _rank_table(out, 0, 2).sort_by("key").drop_columns(["run_id"])
    expected = ref.filter(pc.is_in(ref.column("key"), value_set=survivor.column("key")))
    assert survivor.equals(expected)

    proc = _torchrun(job, out, 2)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert stdout.count("resuming") == 2
    got = read_outputs(out)
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 160
    assert got.drop_columns(["run_id"]).equals(ref)
    st = job_status(out)
    assert st["state"] == "finished" and len(st["runs"]) == 4


def test_relaunch_with_another_world_size(tmp_path):
    """A key committed by any launch is done: one process → two ranks → one process, each with a
    larger --limit, generates every row once and only once (ranks re-hash; nobody redoes a row)."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(90))
    job = write_job(tmp_path)
    ref = _reference(tmp_path, job)
    out = tmp_path / "out"
    first = run_job(load_spec(job), output_dir=out, limit=30, engine_factory=fake_engine.open_engine, ranks=Ranks())
    assert first.rows == 30

    proc = _torchrun(job, out, 2, "--limit", "60")
    _, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    runs = job_status(out)["runs"]
    assert sorted((r["world"], r["rank"]) for r in runs) == [(1, 0), (2, 0), (2, 1)]
    assert sum(r["rows"] for r in runs if r["world"] == 2) == 30

    last = run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, ranks=Ranks())
    assert (last.rows, last.skipped) == (30, 60)
    got = read_outputs(out)
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 90
    assert got.drop_columns(["run_id"]).equals(ref)
    st = job_status(out)
    assert (st["state"], st["world"], st["rows_done"]) == ("finished", 1, 90)
    assert [d["dir"] for d in st["ranks"]] == [".", "rank-0-of-2", "rank-1-of-2"]
