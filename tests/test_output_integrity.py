"""Attacks on a finished output directory (issue 28, docs/reliability.md "Output integrity"): `sql`
cannot write or read outside the job, `status` and `sql` never serve a damaged or missing part,
manifest keys lost or added by hand never duplicate or drop a row, no file corpusgen writes is
followed through a symbolic link, and no damaged file makes any command print a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fake_engine
from conftest import make_rows, write_job, write_parquet
from corpusgen.cli import cli
from corpusgen.job.manifest import Manifest
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec
from test_reliability import integrity

ROWS = 12


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    """A job over 12 rows and its finished output directory of 3 parts (copied by each test)."""
    root = tmp_path_factory.mktemp("template")
    write_parquet(root / "data" / "docs.parquet", make_rows(ROWS))
    job = write_job(root)
    out = root / "out"
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, commit_rows=4)
    return job, out


def copy_out(template: tuple[Path, Path], dest: Path) -> Path:
    shutil.copytree(template[1], dest, symlinks=True)
    return dest


def invoke(*args) -> tuple[int, str]:
    """A command in-process; an exception that escaped click (a traceback for a user) fails here."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.output, repr(r.exception))
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


def one_line_error(code: int, output: str, *needles: str) -> str:
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (code, output)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict[str, str]:
    """Every file under ``d`` with the sha256 of its bytes (links by their target), less the empty
    ``-wal`` and the ``-shm`` index that any SQLite reader of a WAL database may create."""
    found = {}
    wal = d / "manifest.sqlite-wal"
    for p in sorted(d.rglob("*")):
        if p == d / "manifest.sqlite-shm" or (p == wal and not p.is_symlink() and p.stat().st_size == 0):
            continue
        if p.is_symlink():
            found[str(p.relative_to(d))] = "-> " + os.readlink(p)
        elif p.is_file():
            found[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


# --- sql is read-only -------------------------------------------------------------------------------

ATTACKS = {
    "COPY over the manifest": "COPY (SELECT 1) TO '{out}/manifest.sqlite'",
    "COPY over a part": "COPY (SELECT * FROM outputs) TO '{out}/part-00000.parquet' (FORMAT parquet)",
    "COPY after a SELECT": "SELECT 1; COPY (SELECT 1) TO '{tmp}/made.csv'",
    "EXPORT DATABASE": "EXPORT DATABASE '{tmp}/made'",
    "ATTACH creates a file": "ATTACH '{tmp}/made.duckdb' AS x",
    "INSTALL": "INSTALL httpfs",
    "LOAD": "LOAD httpfs",
    "SET external access back on": "SET enable_external_access = true",
    "CREATE TABLE": "CREATE TABLE t AS SELECT 1",
    "read_text of a system file": "SELECT * FROM read_text('/etc/passwd')",
    "read_csv of a file outside the job": "SELECT * FROM read_csv('{tmp}/secret.csv')",
    "read_blob of the manifest": "SELECT * FROM read_blob('{out}/manifest.sqlite')",
    "glob of the file system": "SELECT * FROM glob('/etc/*')",
    "a view reading another file": "SELECT * FROM read_parquet('{tmp}/other.parquet')",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_sql_is_read_only(tmp_path, template, attack):
    """Each way out of a DuckDB connection the issue found (COPY into the output directory, ATTACH
    creating files, INSTALL/LOAD, reading /etc) is refused with one line; the job is intact and
    nothing is created anywhere."""
    out = copy_out(template, tmp_path / "out")
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    write_parquet(tmp_path / "other.parquet", [{"a": 1}])
    before, around = snapshot(out), sorted(p.name for p in tmp_path.iterdir())
    code, output = invoke("sql", out, ATTACKS[attack].format(out=out, tmp=tmp_path))
    line = one_line_error(code, output)
    assert "hunter2" not in output and "root:" not in output, line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == around
    assert invoke("status", out)[0] == 0
    code, output = invoke("sql", out, "SELECT count(*) AS n FROM outputs o JOIN inputs i ON o.key = i.id",
                          "--format", "json")
    assert code == 0 and json.loads(output) == [{"n": ROWS}]


def test_sql_still_answers_every_select_form(tmp_path, template):
    """What stays allowed: several SELECTs, WITH, FROM-first, DESCRIBE, SUMMARIZE, and the inputs
    view over the job's own input file."""
    out = copy_out(template, tmp_path / "out")
    for q in ["SELECT 1; SELECT count(*) FROM outputs", "WITH a AS (SELECT key FROM outputs) SELECT count(*) FROM a",
              "FROM outputs SELECT count(*)", "DESCRIBE outputs", "SUMMARIZE outputs",
              "SELECT count(*) FROM inputs"]:
        code, output = invoke("sql", out, q, "--format", "csv")
        assert code == 0, (q, output)


# --- readers verify the parts -----------------------------------------------------------------------

def _rewrite_one_text(part: Path) -> None:
    """The issue's tampering: the part rewritten with one text changed by one character (same
    length, so the file's size is often equal too)."""
    t = pq.read_table(part)
    texts = t.column("text").to_pylist()
    texts[0] = texts[0][:-1] + ("x" if texts[0][-1] != "x" else "y")
    t = t.set_column(t.schema.get_field_index("text"), "text", [texts])
    pq.write_table(t, part, compression="zstd")


@pytest.mark.parametrize("damage", ["rewritten, one text changed", "rewritten, mtime put back", "truncated",
                                    "deleted"])
def test_readers_refuse_damaged_or_missing_parts(tmp_path, template, damage):
    """`status` and `sql` never serve a part that differs from its commit: sizes always, the sha256
    when the file's mtime differs from its commit's (status) and always (sql, status --verify). A
    tamperer who puts the mtime back escapes plain `status` only. The one line says how to repair,
    and doing it (delete, run) restores a complete output."""
    job, _ = template
    out = copy_out(template, tmp_path / "out")
    part = out / "part-00001.parquet"
    st = part.stat()
    if damage.startswith("rewritten"):
        _rewrite_one_text(part)
        if damage == "rewritten, mtime put back":
            os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    else:
        part.unlink()
    fix = "Run the job again" if damage == "deleted" else "delete it and run again"
    what = "committed part is missing" if damage == "deleted" else "committed part is damaged"
    code, output = invoke("status", out)
    if damage == "rewritten, mtime put back":
        assert code == 0, output  # documented: plain status compares sizes and mtimes only
    else:
        one_line_error(code, output, "part-00001.parquet", what, fix)
    one_line_error(*invoke("status", out, "--verify"), "part-00001.parquet", what, fix)
    one_line_error(*invoke("sql", out, "SELECT count(*) FROM outputs"), "part-00001.parquet", what, fix)
    if damage != "deleted":
        part.unlink()
    code, output = invoke("sql", out, "SELECT count(*) FROM outputs", "--no-verify")
    one_line_error(code, output, "committed part is missing")
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, commit_rows=4)
    assert integrity(out).num_rows == ROWS
    code, output = invoke("sql", out, "SELECT count(DISTINCT key) AS n FROM outputs", "--format", "json")
    assert code == 0 and json.loads(output) == [{"n": ROWS}]


# --- manifest keys against the parts ----------------------------------------------------------------

def test_manifest_keys_are_checked_against_the_parts_on_resume(tmp_path):
    """Keys deleted from the manifest's `keys` table by hand passed `quick_check`, and the resume
    generated their rows a second time (65 outputs for 60 keys); a stray key naming no part would
    make its row be skipped forever. Now the resume rebuilds a part's keys from its (verified) file
    and drops stray keys, with a warning: every key once."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(20))
    job = write_job(tmp_path)
    out = tmp_path / "out"
    run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, limit=12, commit_rows=4)
    db = sqlite3.connect(out / "manifest.sqlite")
    with db:
        lost = db.execute("DELETE FROM keys WHERE key IN (SELECT key FROM keys WHERE part = 'part-00001.parquet' "
                          "LIMIT 3)").rowcount
        db.execute("INSERT INTO keys VALUES ('doc-0015', 'part-09999.parquet')")  # a row not yet generated
    db.close()
    assert lost == 3
    events: list = []
    summary = run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, on_event=events.append)
    warnings = [e.message for e in events if type(e).__name__ == "JobWarning"]
    assert any("keys were rebuilt" in w and "part-00001.parquet" in w for w in warnings), warnings
    assert any("parts it does not list" in w for w in warnings), warnings
    assert summary.rows == 8
    got = integrity(out)  # every part's keys are the manifest's; no key twice
    assert got.num_rows == 20 and sorted(got.column("key").to_pylist()) == [f"doc-{i:04d}" for i in range(20)]


# --- symbolic links ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lock", "progress.json.tmp", "manifest.sqlite-wal", "part-00003.parquet.tmp"])
def test_files_corpusgen_writes_are_never_followed_through_links(tmp_path, template, name, fake_env):
    """`ln -s /elsewhere/file DIR/lock` made a run overwrite the target with the lock's JSON. A link
    where corpusgen writes is refused with one line (or, for a leftover .tmp, removed as a link),
    and the target is never changed."""
    job, _ = template
    out = copy_out(template, tmp_path / "out")
    target = tmp_path / "elsewhere" / "precious"
    target.parent.mkdir()
    target.write_text("do not touch\n")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(target)
    r = CliRunner().invoke(cli, ["run", str(job), "--output", str(out)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    if name.endswith(".parquet.tmp"):
        assert r.exit_code == 0 and not (out / name).is_symlink()  # a crash's leftover: the link is removed
    else:
        one_line_error(r.exit_code, r.output, name, "symbolic link")
    assert target.read_text() == "do not touch\n"


# --- no traceback for any damaged file ----------------------------------------------------------------

def _damage(path: Path, how: str, elsewhere: Path) -> Path | None:
    """Damage ``path``; for a link, return the file it points to (outside the output directory)."""
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garble":
        data = bytearray(path.read_bytes()) or bytearray(b"\0")
        for i in range(0, len(data), max(len(data) // 64, 1)):
            data[i] ^= 0xA5
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    elif how == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("x")
    elif how == "symlink":
        target = elsewhere / path.name
        shutil.copy2(path, target)
        path.unlink()
        path.symlink_to(target)
        return target
    return None


@pytest.mark.parametrize("how", ["truncate", "empty", "garble", "delete", "directory", "symlink"])
def test_no_command_prints_a_traceback_for_any_damaged_file(tmp_path, template, how, fake_env):
    """Every file of a finished output directory (manifest, its -wal/-shm when present, each part,
    progress.json, lock), truncated, emptied, garbled, deleted, replaced by a directory or a link, under `run`, `status` and `sql`: exit 0 or 1, never a
    traceback, one line when 1; a damaged part is never served; a link's target is never written."""
    job, tmpl = template
    names = sorted(p.name for p in tmpl.iterdir())
    assert {"manifest.sqlite", "lock", "progress.json", "part-00000.parquet"} <= set(names), names
    for name in names:
        case = tmp_path / name
        out = copy_out(template, case / "out")
        elsewhere = case / "elsewhere"
        elsewhere.mkdir()
        target = _damage(out / name, how, elsewhere)
        kept = target.read_bytes() if target else None
        results = {}
        for cmd in (["status", out], ["sql", out, "SELECT key, text FROM outputs"], ["run", job, "--output", out]):
            code, output = invoke(*cmd)
            assert code in (0, 1), (name, how, cmd[0], output)
            if code == 1:
                one_line_error(code, output)
            results[cmd[0]] = code
            if target is not None:
                assert target.read_bytes() == kept, (name, how, cmd[0], "wrote through a link")
        if name.startswith("part-") and how != "delete":
            assert results["status"] == results["sql"] == results["run"] == 1, (name, how, results)
        if name.startswith("part-") and how == "delete":
            assert results["status"] == results["sql"] == 1 and results["run"] == 0, (name, how, results)


# --- weak spots: full disk, read-only copies -------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(size: str):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    d = Path(tempfile.mkdtemp(prefix="corpusgen-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=10)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=10)
        with contextlib.suppress(OSError):
            d.rmdir()


def _fill(d: Path) -> Path:
    filler = d / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    return filler


def test_disk_full_at_start_is_not_called_damage_and_status_says_failed(tmp_path, fake_env):
    """A disk already full when a run resumes read "the manifest is damaged … run with --restart"
    (a user may then throw the job away): it now says the disk is full. A run stopped by a full disk
    whose manifest could not record it showed `dead`: `status` now says `failed` and why."""
    write_parquet(tmp_path / "data" / "docs.parquet", make_rows(40))
    job = write_job(tmp_path)
    with _tmpfs("2m") as mnt:
        out = mnt / "out"
        run_job(load_spec(job), output_dir=out, engine_factory=fake_engine.open_engine, limit=8)
        filler = _fill(mnt)
        code, output = invoke("run", job, "--output", out)
        line = output.strip().splitlines()[-1]  # after "resuming …" when the manifest could be opened
        assert code == 1 and line.startswith("Error: ") and "free space" in line, output
        assert "damaged" not in line and "--restart" not in line, line
        # a run that fills the disk mid-way: free a little, so that it starts and then fails
        filler.unlink()
        filler = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        filler.write_bytes(b"\0" * (free - 64 * 1024))
        code, output = invoke("run", job, "--output", out)
        line = output.strip().splitlines()[-1]
        assert code == 1 and line.startswith("Error: ") and "free space" in line, output
        filler.unlink()
        code, output = invoke("status", out, "--json")
        st = json.loads(output)
        reason = st["reason"] or ""
        assert st["state"] == "failed" and ("No space left" in reason or "disk is full" in reason), st
        code, output = invoke("status", out)
        assert code == 0 and ": failed (" in output, output
        code, output = invoke("run", job, "--output", out)
        assert code == 0, output
        assert integrity(out).num_rows == 40


def test_read_only_copy_without_wal_is_readable(tmp_path, template):
    """A finished directory copied without -wal/-shm to a read-only place read as damaged (SQLite
    could not create its -shm there): status and sql open such a manifest immutable."""
    src = copy_out(template, tmp_path / "copy")
    for extra in ("manifest.sqlite-wal", "manifest.sqlite-shm"):
        (src / extra).unlink(missing_ok=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root ignores permissions: a read-only bind mount is what a user would see
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True).returncode == 0
        if mounted and os.access(ro, os.W_OK):
            subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True)
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot make a read-only mount here")
        ro.rmdir()
        src.rename(ro)
        for p in [ro, *ro.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert not os.access(ro, os.W_OK)
        code, output = invoke("status", ro, "--json", "--verify")
        assert code == 0 and json.loads(output)["rows_done"] == ROWS, output
        code, output = invoke("sql", ro, "SELECT count(*) AS n FROM outputs", "--format", "json")
        assert code == 0 and json.loads(output) == [{"n": ROWS}], output
        assert not (ro / "manifest.sqlite-shm").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            for p in [ro, *ro.iterdir()]:
                p.chmod(0o755 if p.is_dir() else 0o644)
