"""Full disks, damaged files, out-of-memory and failing engine I/O (docs/reliability.md): each fault
gives a clear error or a per-row status, leaves every committed part intact, and a resume (after
the fault is gone) ends with exactly the output of a run that never saw it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fake_engine
from conftest import read_outputs, write_job, write_parquet
from corpusgen.cli import cli
from corpusgen.errors import OffloadIOError, OutputError
from corpusgen.job.events import JobWarning
from corpusgen.job.manifest import Manifest
from corpusgen.job.reading import job_status
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec
from test_reliability import ROWS, finish, integrity, make_corpus_job, orphans, start


def _run(job: Path, out: Path, **kw):
    events: list = []
    kw.setdefault("engine_factory", fake_engine.open_engine)
    summary = run_job(load_spec(job), output_dir=out, on_event=events.append, **kw)
    return summary, events


def _one_line_error(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- full disk ---------------------------------------------------------------------------------------

def test_full_disk_injected_enospc(tmp_path):
    """A part write failing with ENOSPC (the disk fills after a few parts): one clear line, exit 1,
    no .tmp left, every part committed before it intact, the run recorded as failed; a resume once
    space is back completes the job exactly."""
    job, ref = make_corpus_job(tmp_path)
    out = tmp_path / "out"
    proc = start(job, out, disk_full=6000)  # a part of 4 rows is about 2.5 kB: two or three fit
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    _one_line_error(stderr, "No space left on device", "committed parts are intact", "run the same command again")
    assert orphans(out) == []
    committed = integrity(out)
    assert committed is not None and 0 < committed.num_rows < ROWS
    assert job_status(out)["state"] == "failed"
    finish(job, out, ref)


def _mount_tmpfs(size: str) -> Path | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    d = Path(tempfile.mkdtemp(prefix="corpusgen-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=10)
    if r.returncode != 0:
        d.rmdir()
        return None
    return d


def test_full_disk_real_tmpfs(tmp_path):
    """The same on a real, small tmpfs that fills up (parts, the manifest's WAL or progress.json
    hit ENOSPC first, whichever): a clear error, intact committed parts, and a resume after space
    is freed completes the job exactly. Skipped where a tmpfs cannot be mounted (not root)."""
    mnt = _mount_tmpfs("1m")
    if mnt is None:
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        job, ref = make_corpus_job(tmp_path)
        out = mnt / "out"
        filler = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        filler.write_bytes(b"\0" * (free - 96 * 1024))  # leave about 96 kB: some parts, then full
        proc = start(job, out)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        line = _one_line_error(stderr)
        assert "No space left on device" in line or "disk is full" in line, line
        assert "free space" in line
        committed = integrity(out)
        assert committed is None or committed.num_rows < ROWS
        filler.unlink()
        finish(job, out, ref)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)
        with contextlib.suppress(OSError):
            mnt.rmdir()


# --- corruption -------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_part_is_refused_with_what_to_do(tmp_path, damage, fake_env):
    """A committed part truncated, or garbled in place (same size), is detected on resume: a one-line
    error naming the file and what to do, and nothing is deleted. Deleting it as told regenerates
    exactly its rows."""
    job, ref = make_corpus_job(tmp_path)
    out = tmp_path / "out"
    _run(job, out, limit=40, commit_rows=8)
    part = out / "part-00002.parquet"
    data = bytearray(part.read_bytes())
    if damage == "truncate":
        part.write_bytes(bytes(data[: len(data) // 2]))
    else:
        for i in range(100, 140):
            data[i] ^= 0xFF
        part.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["run", str(job), "--output", str(out)])
    assert r.exit_code == 1
    _one_line_error(r.output, "part-00002.parquet", "committed part is damaged", "delete it and run again")
    assert part.exists() and len(list(out.glob("part-*.parquet"))) == 5
    with pytest.raises(OutputError, match="part-00002.parquet: committed part is damaged"):
        job_status(out)  # readers refuse it too
    m = Manifest(out, readonly=True)
    assert m.totals()["rows"] == 40  # nothing was dropped from the manifest either
    m.close()
    part.unlink()
    summary, events = _run(job, out)
    assert any(isinstance(e, JobWarning) and "part-00002.parquet is missing" in e.message for e in events)
    assert summary.rows == ROWS - 32
    assert integrity(out).drop_columns(["run_id"]).equals(ref)


@pytest.mark.parametrize("damage", ["garble", "truncate", "empty", "delete"])
def test_damaged_manifest_is_refused_with_what_to_do(tmp_path, damage, fake_env):
    """A garbled, truncated, emptied or deleted manifest is never taken for a new job (which would
    delete every part as an orphan): a one-line error says to restore it or use --restart; the
    parts stay; --restart moves them aside and starts over."""
    job, ref = make_corpus_job(tmp_path)
    out = tmp_path / "out"
    _run(job, out, limit=40)
    manifest = out / "manifest.sqlite"
    assert not (out / "manifest.sqlite-wal").exists() or (out / "manifest.sqlite-wal").stat().st_size == 0
    data = bytearray(manifest.read_bytes())
    if damage == "garble":
        data[0:4096] = os.urandom(4096)
        manifest.write_bytes(bytes(data))
    elif damage == "truncate":
        manifest.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "empty":
        manifest.write_bytes(b"")
    else:
        manifest.unlink()
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    r = CliRunner().invoke(cli, ["run", str(job), "--output", str(out)])
    assert r.exit_code == 1
    line = _one_line_error(r.output, "--restart")
    assert "restore it" in line.lower() or "Restore it" in line
    assert sorted(p.name for p in out.glob("part-*.parquet")) == parts
    r = CliRunner().invoke(cli, ["run", str(job), "--output", str(out), "--restart"])
    assert r.exit_code == 0, r.output
    assert integrity(out).drop_columns(["run_id"]).equals(ref)
    (old,) = tmp_path.glob("out.old-*")
    assert sorted(p.name for p in old.glob("part-*.parquet")) == parts


def test_garbled_progress_and_lock_files_are_harmless(tmp_path):
    """progress.json and lock are information, rewritten by each run: garbage in them never stops a
    resume nor `corpusgen status`."""
    job, ref = make_corpus_job(tmp_path)
    out = tmp_path / "out"
    _run(job, out, limit=20)
    (out / "progress.json").write_bytes(b"\xff{not json")
    (out / "lock").write_bytes(b"\x00\x01garbage")
    assert job_status(out)["rows_done"] == 20
    _run(job, out)
    assert integrity(out).drop_columns(["run_id"]).equals(ref)


# --- out of memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, after", [("cuda", 0), ("cuda", 2), ("host", 3)])
def test_oom_splits_the_block_and_keeps_finished_rows(tmp_path, kind, after):
    """A block too big for memory (CUDA allocator or host) is split in halves until it fits; rows the
    engine yielded before the error are kept, never generated twice; the output equals a run that
    never ran out of memory."""
    job, ref = make_corpus_job(tmp_path)
    engines = []

    def factory(model, **kw):
        engines.append(fake_engine.FakeEngine(block_size=8, oom_rows=3, oom_after=after, oom_kind=kind))
        return engines[-1]

    summary, events = _run(job, tmp_path / "out", engine_factory=factory)
    assert summary.status == "finished" and summary.rows == ROWS and summary.statuses == {"ok": ROWS}
    assert integrity(tmp_path / "out").drop_columns(["run_id"]).equals(ref)
    calls = engines[0].calls
    # each block of 8: OOM after `after` rows, then halves of the rest (4 → OOM → 2 + 2, or 3 + 3)
    assert calls[0] == 8 and max(calls[1:]) <= 8 and all(c <= 3 for c in calls if c not in (8, 4))
    warnings = [e.message for e in events if isinstance(e, JobWarning) and "out of memory" in e.message]
    assert warnings and "in a block of 8 rows" in warnings[0]


def test_row_that_cannot_fit_alone_is_an_error_row_and_the_job_continues(tmp_path):
    """A row that runs out of memory even in a block of its own gets status `error` with the reason;
    every other row is generated as usual and the job finishes."""
    job, ref = make_corpus_job(tmp_path)
    poison = {"doc-0005", "doc-0050"}
    summary, _ = _run(job, tmp_path / "out",
                      engine_factory=lambda m, **kw: fake_engine.FakeEngine(block_size=8, oom_keys=poison, oom_after=1))
    assert summary.status == "finished" and summary.statuses == {"ok": ROWS - 2, "error": 2}
    got = {r["key"]: r for r in integrity(tmp_path / "out").to_pylist()}
    for k in poison:
        assert got[k]["status"] == "error" and got[k]["finish_reason"] == "error"
        assert got[k]["error"].startswith("out of memory even in a block of its own: CUDA out of memory")
    ok = [r for r in ref.to_pylist() if r["key"] not in poison]
    assert [{k: v for k, v in got[r["key"]].items() if k != "run_id"} for r in ok] == ok


def test_oom_through_the_cli_env(tmp_path, monkeypatch, fake_env):
    """CORPUSGEN_FAKE_OOM_* reach the fake engine of `corpusgen run`: allocator failures on CPU."""
    job, _ = make_corpus_job(tmp_path)
    monkeypatch.setenv("CORPUSGEN_FAKE_OOM_ROWS", "2")
    monkeypatch.setenv("CORPUSGEN_FAKE_OOM_KEYS", "doc-0007")
    monkeypatch.setenv("CORPUSGEN_FAKE_OOM_KIND", "host")
    r = CliRunner().invoke(cli, ["run", str(job), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and f"{ROWS} rows committed (error 1, ok {ROWS - 1})" in r.output, r.output
    assert "out of memory in a block of 8 rows" in r.output


def test_other_engine_errors_are_not_taken_for_oom(tmp_path):
    """Only out-of-memory is retried: any other engine failure stops the job with its error, with
    the parts committed before it intact."""
    job, _ = make_corpus_job(tmp_path)

    class Broken(fake_engine.FakeEngine):
        def generate(self, requests, sampling, logits_hook=None):
            if len(self.calls) >= 2:
                raise RuntimeError("device-side assert triggered")
            yield from super().generate(requests, sampling)

    with pytest.raises(RuntimeError, match="device-side assert"):
        _run(job, tmp_path / "out", engine_factory=lambda m, **kw: Broken(block_size=8))
    assert integrity(tmp_path / "out").num_rows == 16
    assert job_status(tmp_path / "out")["state"] == "failed"


# --- engine disk I/O, end to end ------------------------------------------------------------------

def test_offload_disk_read_failure_end_to_end(tmp_path):
    """A real tiny model with every weight on disk: when a layer file is truncated between blocks,
    the run fails promptly with OffloadIOError, the blocks before it stay committed and intact,
    nothing of the failing block is committed, and a resume completes the job exactly."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Placement, Policy

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                                 bos_token_id=1, eos_token_id=98, pad_token_id=0)).save_pretrained(tmp_path / "m")
    rows = [{"id": f"r{i}", "text": " ".join(str(3 + (i * 7 + j) % 90) for j in range(3 + i % 4))} for i in range(8)]
    write_parquet(tmp_path / "data" / "docs.parquet", rows)
    job = write_job(tmp_path, prompt={"template": "{{ text }}"}, generation={"max_new_tokens": 4})

    def factory(offload: Path, fail_on_call: int | None):
        def open_(model, **kw):
            eng = open_engine(str(tmp_path / "m"), dtype="float32", device="cpu", tokenizer=IdTokenizer(99),
                              offload_dir=str(offload),
                              policy=Policy(gpu_batch_size=2, refill=False, weights=Placement(gpu=0.0, cpu=0.0)))
            real, calls = eng.generate, []

            def generate(requests, sampling, logits_hook=None):
                calls.append(len(requests))
                if len(calls) == fail_on_call:  # the disk goes bad between two blocks
                    (offload / "weights" / "layer.1.bin").write_bytes(b"\0" * 10)
                return real(requests, sampling, logits_hook)

            eng.generate = generate
            return eng
        return open_

    _run(job, tmp_path / "ref", engine_factory=factory(tmp_path / "off-ref", None))
    ref = read_outputs(tmp_path / "ref").drop_columns(["run_id"])
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with pytest.raises(OffloadIOError, match="truncated"):
        _run(job, out, engine_factory=factory(tmp_path / "off", 3))
    assert time.perf_counter() - t0 < 30
    committed = integrity(out)
    assert committed.num_rows == 4 and orphans(out) == []  # blocks 1 and 2; nothing of block 3
    assert job_status(out)["state"] == "failed"
    _run(job, out, engine_factory=factory(tmp_path / "off2", None))
    assert integrity(out).drop_columns(["run_id"]).equals(ref)


def test_write_part_failure_is_an_output_error_and_leaves_no_tmp(tmp_path, monkeypatch):
    """In-process, the writer's own contract: an OSError while writing a part (here EIO on fsync)
    becomes OutputError naming the part, and its .tmp file is removed."""
    import errno

    import corpusgen.job.writer as writer

    job, _ = make_corpus_job(tmp_path)
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the lock file, part 0, part 1's tmp file: fails
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    with pytest.raises(OutputError, match=r"part-\d+\.parquet: cannot write the part \(Input/output error\)"):
        _run(job, tmp_path / "out")
    monkeypatch.undo()
    assert orphans(tmp_path / "out") == []
    assert integrity(tmp_path / "out").num_rows == 8
