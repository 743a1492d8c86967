"""A tiny deterministic engine with the real engine's interface, for tests only.

The tokenizer is byte-level (token = byte + 3; 0 pad, 1 eos, 2 bos). The "model" answers each
prompt with a JSON object derived from the user message and ends it with EOS, so the answer
length depends on the prompt; it honours max_new_tokens (reason ``length``) and stop strings
(reason ``stop``). A user message containing ``NOT-JSON`` gets a non-JSON answer; one containing
``ENGINE-ERROR`` gets a Result with ``error`` set. Rows are yielded shortest answer first (any
order is allowed by the interface).

Passed to ``run_job`` by tests (tests/fake_cli.py for a whole process); ``CORPUSGEN_FAKE_DELAY`` (seconds per
row) slows it down so a test can kill a run midway; ``CORPUSGEN_FAKE_BLOCK`` sets block_size.

Fault injection (tests/test_reliability*.py), by constructor argument or environment variable:

- ``CORPUSGEN_FAKE_OOM_ROWS=N``: a generate() call with more than N rows runs out of memory;
  ``CORPUSGEN_FAKE_OOM_KEYS=k1,k2``: a call holding one of these keys does, even alone;
  ``CORPUSGEN_FAKE_OOM_AFTER=k``: ... after yielding k rows (never a poisoned key);
  ``CORPUSGEN_FAKE_OOM_KIND=cuda|host``: torch.OutOfMemoryError (the CUDA allocator's) or MemoryError.
- ``CORPUSGEN_FAKE_STAGES=FILE``: append one line per commit stage of a part to FILE —
  ``tmp`` (tmp file written and fsynced, not renamed), ``renamed`` (not in the manifest),
  ``sql`` (inside the manifest transaction, before COMMIT), ``committed``.
- ``CORPUSGEN_FAKE_HANG=STAGE:N[:SECONDS]``: at the N-th STAGE of this process, pause (default:
  until killed), so a test can kill or stop the run exactly there.
- ``CORPUSGEN_FAKE_DISK_FULL=BYTES``: part files written by this process get BYTES in all; the
  write that crosses it writes what fits and fails with ENOSPC, as a full disk does.

The stage and disk hooks patch corpusgen.job.writer / corpusgen.job.manifest while the engine is open and
are removed by close().
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from typing import Iterator, Sequence

from corpusgen.engine.api import EngineStats, Request, Result, SamplingSettings
from corpusgen.engine.config import PRESETS

_OFFSET = 3
_USER, _ASSISTANT = "<|user|>\n", "\n<|assistant|>\n"


class FakeTokenizer:
    """Byte-level tokenizer with a trivial chat template."""

    eos_token_ids = (1,)
    hf = None  # no Hugging Face tokenizer: constrained decoding cannot run
    name = "fake-bytes"
    pad_token_id = 0
    bos_token_id = 2
    vocab_size = 256 + _OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - _OFFSET for i in ids if i >= _OFFSET).decode("utf-8", "replace")

    def chat_prompt(self, system: str | None, user: str) -> list[int]:
        sys_part = f"<|system|>\n{system}\n" if system else ""
        return [self.bos_token_id] + self.encode(sys_part + _USER + user + _ASSISTANT)

    def fingerprint(self) -> str:
        return "fake-bytes-v1"


def answer_for(user: str) -> str:
    """The fake model's full answer to a user message (before length/stop limits)."""
    if "NOT-JSON" in user:
        return "this is not json"
    words = user.split()
    digest = hashlib.sha256(user.encode()).hexdigest()[:8]
    return json.dumps({"first": words[0] if words else "", "words": len(words), "h": digest})


class FakeEngine:
    """Deterministic stand-in for corpusgen.engine.load.Engine."""

    def __init__(self, *, max_context: int = 2048, block_size: int = 8, delay: float = 0.0,
                 model: str = "fake", oom_rows: int | None = None, oom_keys: Sequence[str] = (),
                 oom_after: int = 0, oom_kind: str = "cuda"):
        self.oom_rows, self.oom_keys, self.oom_after, self.oom_kind = oom_rows, frozenset(oom_keys), oom_after, oom_kind
        self.faults: _Faults | None = None
        self.config = PRESETS["smollm2-135m"]
        self.tokenizer = FakeTokenizer()
        self.max_context = max_context
        self.block_size = block_size
        self.refill = False
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.delay = delay
        self.model = model
        self.stats = EngineStats()
        self.calls: list[int] = []
        """Rows per generate() call (tests look at block sizes)."""

    def describe(self) -> dict:
        return {"model": self.model, "device": "cpu", "dtype": "float32", "policy": None, "fake": True}

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings,
                 logits_hook=None) -> Iterator[Result]:
        self.calls.append(len(requests))
        results = [self._one(r, sampling) for r in requests]
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in results)
        oom = (self.oom_rows is not None and len(requests) > self.oom_rows) or any(
            r.key in self.oom_keys for r in requests)
        if oom:  # the rows that get through first never include a poisoned key
            results = [r for r in results if r.key not in self.oom_keys]
        for i, res in enumerate(sorted(results, key=lambda r: (len(r.token_ids), r.key))):
            if oom and i >= self.oom_after:
                raise self._oom(len(requests))
            if self.delay:
                time.sleep(self.delay)
            self.stats.generated_tokens += len(res.token_ids)
            self.stats.decode_seconds += self.delay
            yield res
        if oom:
            raise self._oom(len(requests))

    def _oom(self, rows: int) -> BaseException:
        if self.oom_kind == "host":
            return MemoryError(f"fake host OOM with {rows} rows")
        import torch

        return torch.OutOfMemoryError(f"CUDA out of memory (fake). Tried to allocate 2.00 GiB for {rows} rows")

    def close(self) -> None:
        if self.faults is not None:
            self.faults.remove()
            self.faults = None

    def _one(self, req: Request, sampling: SamplingSettings) -> Result:
        assert len(req.prompt_ids) + sampling.max_new_tokens <= self.max_context, (req.key, len(req.prompt_ids))
        prompt = self.tokenizer.decode(req.prompt_ids)
        user = prompt.split(_USER, 1)[-1].rsplit(_ASSISTANT, 1)[0]
        if "ENGINE-ERROR" in user:
            return Result(key=req.key, token_ids=[], text="", finish_reason="error",
                          prompt_tokens=len(req.prompt_ids), error="fake engine failure")
        text, reason = answer_for(user), "eos"
        for s in sampling.stop:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        ids = self.tokenizer.encode(text)
        if len(ids) > sampling.max_new_tokens:
            ids, reason = ids[: sampling.max_new_tokens], "length"
            text = self.tokenizer.decode(ids)
        return Result(key=req.key, token_ids=ids, text=text, finish_reason=reason,
                      prompt_tokens=len(req.prompt_ids))


def open_engine(model: str, *, dummy: bool = False, device: str | None = None, dtype: str | None = None,
                policy=None, gpu_memory: int | None = None, cpu_memory: int | None = None,
                offload_dir: str | None = None, prompt_len: int = 512, gen_len: int = 32) -> FakeEngine:
    """Same signature as corpusgen.engine.load.open_engine; settings from CORPUSGEN_FAKE_* env vars."""
    env = os.environ.get
    oom_rows = env("CORPUSGEN_FAKE_OOM_ROWS")
    engine = FakeEngine(
        delay=float(env("CORPUSGEN_FAKE_DELAY", "0") or 0),
        block_size=int(env("CORPUSGEN_FAKE_BLOCK", "8") or 8),
        max_context=int(env("CORPUSGEN_FAKE_CONTEXT", "2048") or 2048),
        model=model,
        oom_rows=int(oom_rows) if oom_rows else None,
        oom_keys=[k for k in env("CORPUSGEN_FAKE_OOM_KEYS", "").split(",") if k],
        oom_after=int(env("CORPUSGEN_FAKE_OOM_AFTER", "0") or 0),
        oom_kind=env("CORPUSGEN_FAKE_OOM_KIND", "cuda") or "cuda",
    )
    if any(env(v) for v in ("CORPUSGEN_FAKE_STAGES", "CORPUSGEN_FAKE_HANG", "CORPUSGEN_FAKE_DISK_FULL")):
        engine.faults = _Faults(stages=env("CORPUSGEN_FAKE_STAGES"), hang=env("CORPUSGEN_FAKE_HANG"),
                                disk_bytes=env("CORPUSGEN_FAKE_DISK_FULL"))
    return engine


class _Faults:
    """Commit-stage reporting, pauses and a full disk, patched into the writer and the manifest."""

    def __init__(self, *, stages: str | None, hang: str | None, disk_bytes: str | None):
        import builtins

        import corpusgen.job.manifest as manifest
        import corpusgen.job.writer as writer

        self.stages_file = stages
        self.counts: dict[str, int] = {}
        self.hang_stage, self.hang_n, self.hang_s = None, 0, 3600.0
        if hang:
            parts = hang.split(":")
            self.hang_stage, self.hang_n = parts[0], int(parts[1]) if len(parts) > 1 else 1
            self.hang_s = float(parts[2]) if len(parts) > 2 else 3600.0
        self.disk_left = int(disk_bytes) if disk_bytes else None
        self._undo: list = []
        faults = self

        real_replace, real_commit = os.replace, manifest.Manifest.commit_part

        def replace(src, dst, *a, **kw):
            part = str(src).endswith(".parquet.tmp")
            if part:
                faults.stage("tmp", os.path.basename(dst))
            real_replace(src, dst, *a, **kw)
            if part:
                faults.stage("renamed", os.path.basename(dst))

        def commit_part(self, info, keys, run_id):
            self.db.set_trace_callback(lambda sql: faults.stage("sql", info.name) if sql.strip() == "COMMIT" else None)
            try:
                real_commit(self, info, keys, run_id)
            finally:
                self.db.set_trace_callback(None)
            faults.stage("committed", info.name)

        def open_(path, mode="r", *a, **kw):
            f = builtins.open(path, mode, *a, **kw)
            return _FullDisk(f, faults) if str(path).endswith(".parquet.tmp") and "w" in mode else f

        self._patch(os, "replace", replace)
        self._patch(manifest.Manifest, "commit_part", commit_part)
        if self.disk_left is not None:
            self._patch(writer, "open", open_)

    def _patch(self, obj, name: str, value) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def remove(self) -> None:
        for obj, name, old in reversed(self._undo):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo = []

    def stage(self, name: str, part: str) -> None:
        n = self.counts[name] = self.counts.get(name, 0) + 1
        if self.stages_file:
            with open(self.stages_file, "a") as f:
                f.write(f"{name} {part} {n}\n")
        if name == self.hang_stage and n == self.hang_n:
            deadline = time.monotonic() + self.hang_s
            while time.monotonic() < deadline:
                time.sleep(0.01)


_MISSING = object()


class _FullDisk:
    """A file whose writes fail with ENOSPC once the fault's byte budget is spent."""

    def __init__(self, f, faults: _Faults):
        self.f, self.faults = f, faults

    def write(self, data) -> int:
        left = self.faults.disk_left
        if len(data) > left:
            self.f.write(data[:left])
            self.f.flush()
            self.faults.disk_left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.faults.disk_left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
