"""run_job(): the pipeline of DESIGN §4, emitting events; no UI.

    input batches ─► skip committed keys ─► render + tokenise ─► window of prompts sorted by length
    ─► blocks of engine.block_size ─► engine.generate ─► output rows ─► commit a part ─► events

Commit granularity: a part is committed as soon as ``commit_rows`` finished rows are buffered
(default: the engine's block size, so about one part per block) or ``commit_seconds`` passed since
the last commit, and at the end. An interrupt (Ctrl-C, SIGTERM) discards the rows not yet
committed — at most one part's worth — and leaves every committed part in place.
Rows that never reach the engine (reader problems, template errors, prompt_too_long) are written
like any other row, with their status, in the next part.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from corpusgen.engine.api import Request, Result
from corpusgen.errors import ModelError, ResumeMismatch
from corpusgen.events import (Event, JobFinished, JobStarted, JobWarning, RateWindow, RowsCommitted,
                              RunSummary)
from corpusgen.manifest import (PROGRESS, Manifest, OutputLock, clean_orphans, move_aside, now_iso,
                                prepare_dir)
from corpusgen.prompts import Prompt, PromptBuilder, check_columns, compile_template
from corpusgen.readers import batch_records, open_input
from corpusgen.spec import JobSpec, changed_fields, with_overrides
from corpusgen.writer import OutputRow, output_schema, write_json_atomic, write_part

FAKE_ENGINE_ENV = "CORPUSGEN_FAKE_ENGINE"
DEFAULT_BLOCK = 32
_MAX_DUP_WARNINGS = 3


def default_engine_factory() -> Callable[..., Any]:
    """corpusgen.engine.load.open_engine, or — for tests only — the fake engine named by
    ``CORPUSGEN_FAKE_ENGINE`` (``1`` = tests/fake_engine.py of this checkout, or a .py file path)."""
    fake = os.environ.get(FAKE_ENGINE_ENV)
    if fake:
        path = Path(__file__).resolve().parent.parent / "tests" / "fake_engine.py" if fake == "1" else Path(fake)
        spec = importlib.util.spec_from_file_location("corpusgen_fake_engine", path)
        if spec is None or not path.is_file():
            raise ModelError(f"{FAKE_ENGINE_ENV}={fake}: no such file {path}; unset it to use the real engine")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.open_engine
    try:
        from corpusgen.engine.load import open_engine
    except ImportError as e:
        raise ModelError(f"the engine cannot be imported ({e}); reinstall corpusgen with its dependencies") from None
    return open_engine


def _policy_with_compress(policy, compress: str):
    from corpusgen.policy.policy import Compression

    if compress == "auto":
        return policy
    w = compress in ("weights", "both")
    kv = compress in ("kv", "both")
    return policy.replace(compress_weights=Compression() if w else None, compress_kv=Compression() if kv else None)


def _open_engine(spec: JobSpec, factory: Callable[..., Any], policy, dummy: bool, emit) -> Any:
    e = spec.engine
    kwargs: dict[str, Any] = dict(dummy=dummy, device=None if e.device == "auto" else e.device,
                                  dtype=None if e.dtype == "auto" else e.dtype, policy=policy,
                                  gpu_memory=e.gpu_memory, cpu_memory=e.cpu_memory, offload_dir=e.offload_dir)
    if e.compress != "auto":
        if policy is not None:
            kwargs["policy"] = _policy_with_compress(policy, e.compress)
        elif "compress" in inspect.signature(factory).parameters:
            kwargs["compress"] = e.compress
        else:
            emit(JobWarning(message=f"engine.compress={e.compress} needs an explicit policy; "
                                    "ignored with policy auto"))
    if "gen_len" in inspect.signature(factory).parameters:
        kwargs["gen_len"] = spec.generation.max_new_tokens  # sizes the KV cache in the memory check
    return factory(spec.model, **kwargs)


def _block_size(engine: Any) -> int:
    size = getattr(engine, "block_size", None)
    if size is None and getattr(engine, "policy", None) is not None:
        size = getattr(engine.policy, "block_size", None)
    return int(size or DEFAULT_BLOCK)


def _strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```") and t.endswith("```") and len(t) >= 6:
        t = t[3:-3]
        t = t[t.index("\n") + 1:] if "\n" in t else t  # drop a language tag such as ```json
    return t.strip()


class _RowMaker:
    """Engine results → output rows (status mapping, JSON parsing and schema validation)."""

    def __init__(self, schema: Any, run_id: str):
        self.run_id = run_id
        self.validator = None
        if schema is not None:
            import jsonschema

            self.validator = jsonschema.validators.validator_for(schema)(schema)

    def decided(self, p: Prompt) -> OutputRow:
        return OutputRow(key=p.key, status=p.status, error=p.error, prompt_tokens=p.prompt_tokens,
                         run_id=self.run_id)

    def from_result(self, r: Result, p: Prompt) -> OutputRow:
        base = dict(key=r.key, text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                    gen_tokens=len(r.token_ids), prompt_cut=p.cut_tokens, run_id=self.run_id)
        if r.error is not None or r.finish_reason == "error":
            return OutputRow(status="error", error=r.error or "engine error", **base)
        if r.finish_reason == "length":
            # never repaired: a cut answer is reported as such, with or without a schema
            return OutputRow(status="truncated", **base)
        if self.validator is None:
            return OutputRow(status="ok", **base)
        try:
            value = json.loads(_strip_fence(r.text))
        except ValueError as e:
            return OutputRow(status="schema_invalid", error=f"not JSON: {e}", **base)
        err = next(iter(self.validator.iter_errors(value)), None)
        if err is not None:
            where = "/".join(str(x) for x in err.absolute_path) or "(root)"
            return OutputRow(status="schema_invalid", error=f"{where}: {err.message}", **base)
        return OutputRow(status="ok", json=json.dumps(value, ensure_ascii=False, separators=(",", ":")), **base)


def run_job(spec: JobSpec, *, input_override: str | None = None, output_dir: str | Path | None = None,
            limit: int | None = None, restart: bool = False, policy: Any = None, dummy: bool = False,
            engine_factory: Callable[..., Any] | None = None, on_event: Callable[[Event], None] | None = None,
            commit_rows: int | None = None, commit_seconds: float = 30.0, window_blocks: int = 8,
            predicted_tps: float | None = None) -> RunSummary:
    """Run (or resume) ``spec`` into its output directory; return what this run did.

    ``policy`` (a Policy) overrides the spec's ``engine.policy``; ``engine_factory`` has the
    signature of corpusgen.engine.load.open_engine (default: :func:`default_engine_factory`).
    Raises a CorpusgenError for anything the user can fix; re-raises KeyboardInterrupt after
    recording the interrupted run.
    """
    emit = on_event or (lambda e: None)
    started = time.perf_counter()
    if input_override is not None:
        spec = with_overrides(spec, input=input_override)
    out = Path(output_dir) if output_dir is not None else spec.output_dir()

    # everything a user can get wrong is checked before the engine loads
    _, variables = compile_template(spec.prompt)
    reader = open_input(spec.input, columns=spec.input.columns, limit=limit)
    check_columns(variables, spec.input.columns or reader.available)
    reader.select(list(spec.input.columns) or sorted(variables))
    if policy is None:
        policy = spec.engine.resolve_policy()
    fields = {**spec.fingerprint_fields(), "weights": "dummy" if dummy else "real"}
    fingerprint = spec.fingerprint(weights=fields["weights"])

    prepare_dir(out)
    with OutputLock(out), _signals_as_interrupt():
        moved = None
        if restart and any(p.name != "lock" for p in out.iterdir()):
            moved = move_aside(out)
        manifest = Manifest(out)
        engine = None
        try:
            job = manifest.job()
            if job is not None and job["fingerprint"] != fingerprint and not manifest.parts():
                job = None  # nothing was committed under the old spec: nothing to mix, start afresh
            if job is not None and job["fingerprint"] != fingerprint:
                changed = changed_fields(job["fields"], fields) or ["(fingerprint)"]
                raise ResumeMismatch(
                    f"{out} holds outputs of a different job (changed: {', '.join(changed)}); "
                    "run with --restart to move them aside and start over, or choose another --output")
            if job is None:
                manifest.set_job(fingerprint, fields, spec.to_dict())
            for name in clean_orphans(out, manifest):
                emit(JobWarning(message=f"removed {name}: written by a run that stopped before committing it"))
            t_load = time.perf_counter()
            factory = engine_factory or default_engine_factory()
            engine = _open_engine(spec, factory, policy, dummy, emit)
            load_seconds = time.perf_counter() - t_load
            tok = engine.tokenizer.fingerprint()
            if job is not None and job.get("tokenizer") not in (None, tok):
                raise ResumeMismatch(f"{out} was written with a different tokenizer ({job['tokenizer'][:12]}… "
                                     f"now {tok[:12]}…); run with --restart, or choose another --output")
            manifest.set_tokenizer(tok)
            run = _Run(spec=spec, out=out, manifest=manifest, engine=engine, reader=reader, emit=emit,
                       commit_rows=commit_rows, commit_seconds=commit_seconds, window_blocks=window_blocks)
            describe = engine.describe() if hasattr(engine, "describe") else {"model": spec.model}
            manifest.start_run(run.run_id, engine=describe, input=dataclasses.asdict(spec.input),
                               predicted_tps=predicted_tps, load_seconds=load_seconds)
            emit(JobStarted(run_id=run.run_id, output_dir=str(out), fingerprint=fingerprint,
                            resumed=run.done_before > 0, rows_done=run.done_before,
                            rows_total=reader.total_rows, block_size=run.block_size, engine=describe,
                            load_seconds=load_seconds, moved_to=None if moved is None else str(moved)))
            return run.execute(started, load_seconds)
        finally:
            manifest.close()
            if engine is not None and hasattr(engine, "close"):
                engine.close()


class _signals_as_interrupt:
    """SIGTERM raises KeyboardInterrupt in the main thread while a job runs (Ctrl-C already does)."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


class _Run:
    """State of one run: buffers, counters, timing."""

    def __init__(self, *, spec: JobSpec, out: Path, manifest: Manifest, engine: Any, reader: Any, emit,
                 commit_rows: int | None, commit_seconds: float, window_blocks: int):
        self.spec, self.out, self.manifest, self.engine = spec, out, manifest, engine
        self.reader, self.emit = reader, emit
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.block_size = _block_size(engine)
        self.commit_rows = commit_rows or self.block_size
        self.commit_seconds = commit_seconds
        self.window_rows = self.block_size * max(1, window_blocks)
        self.sampling = spec.generation.sampling()
        self.schema = output_schema(with_json=spec.output.schema is not None)
        self.maker = _RowMaker(spec.output.schema, self.run_id)
        self.builder = PromptBuilder(spec.prompt, engine.tokenizer, max_context=engine.max_context,
                                     max_new_tokens=spec.generation.max_new_tokens)
        totals = manifest.totals()
        self.done_before = totals["rows"]
        self.job_statuses: dict[str, int] = dict(totals["statuses"])
        self.next_part = manifest.next_part_number()
        self.my_parts: set[str] = set()
        self.inflight: set[str] = set()  # keys read this run and not yet committed
        self.buffer: list[OutputRow] = []
        self.last_commit = time.monotonic()
        self.rows = self.skipped = self.duplicates = self.gen_tokens = 0
        self.statuses: dict[str, int] = {}
        self.engine_seconds = 0.0
        self.rate = RateWindow()
        self.rate.add(0, 0)
        self.started_iso = now_iso()

    # --- the pipeline --------------------------------------------------------------------------
    def execute(self, started: float, load_seconds: float) -> RunSummary:
        loop_start = time.perf_counter()
        status = "failed"
        self._progress("running")
        try:
            window: list[Prompt] = []
            for prompt in self._prompts():
                if prompt.status is not None:
                    self._add(self.maker.decided(prompt))
                    continue
                window.append(prompt)
                if len(window) >= self.window_rows:
                    self._generate(window)
                    window = []
            self._generate(window)
            if self.buffer:
                self._commit()
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            seconds = time.perf_counter() - started
            overhead = time.perf_counter() - loop_start - self.engine_seconds
            summary = RunSummary(run_id=self.run_id, status=status, output_dir=str(self.out), rows=self.rows,
                                 skipped=self.skipped, duplicates=self.duplicates, statuses=dict(self.statuses),
                                 gen_tokens=self.gen_tokens, seconds=seconds, load_seconds=load_seconds,
                                 engine_seconds=self.engine_seconds, overhead_seconds=max(overhead, 0.0))
            self.manifest.end_run(self.run_id, status=status, rows=self.rows, gen_tokens=self.gen_tokens,
                                  seconds=seconds, engine_seconds=self.engine_seconds,
                                  overhead_seconds=summary.overhead_seconds)
            self._progress(status)
            self.emit(JobFinished(summary=summary))
        return summary

    def _prompts(self) -> Iterator[Prompt]:
        """Rows not yet committed, as prompts (or decided rows), in input order."""
        for batch in self.reader.batches():
            done = self.manifest.committed(batch.keys)
            records = batch_records(batch)
            for key, rec, problem in zip(batch.keys, records, batch.problems, strict=True):
                part = done.get(key)
                if key in self.inflight or (part is not None and part in self.my_parts):
                    self.duplicates += 1
                    if self.duplicates <= _MAX_DUP_WARNINGS:
                        last = self.duplicates == _MAX_DUP_WARNINGS
                        more = " (further duplicates are counted, not reported)" if last else ""
                        self.emit(JobWarning(
                            message=f"duplicate key {key!r} skipped: the first row with it wins{more}"))
                    continue
                if part is not None:
                    self.skipped += 1
                    continue
                self.inflight.add(key)
                if problem is not None:
                    yield Prompt(key=key, ids=None, status="error", error=problem)
                else:
                    yield self.builder.build(key, rec)

    def _generate(self, window: list[Prompt]) -> None:
        """Sort a window by prompt length (little padding per block), run it block by block."""
        window.sort(key=lambda p: len(p.ids))
        for i in range(0, len(window), self.block_size):
            block = {p.key: p for p in window[i:i + self.block_size]}
            requests = [Request(key=k, prompt_ids=p.ids) for k, p in block.items()]
            results = self.engine.generate(requests, self.sampling)
            try:
                while True:
                    t = time.perf_counter()
                    try:
                        r = next(results)
                    except StopIteration:
                        break
                    finally:
                        self.engine_seconds += time.perf_counter() - t
                    prompt = block.pop(r.key, None)
                    assert prompt is not None, f"engine returned an unknown or repeated key {r.key!r}"
                    self._add(self.maker.from_result(r, prompt))
            finally:
                if hasattr(results, "close"):
                    results.close()
            for key, prompt in block.items():  # never drop a row silently
                self._add(OutputRow(key=key, status="error", error="the engine returned no result for this row",
                                    prompt_tokens=prompt.prompt_tokens, run_id=self.run_id))

    # --- commits -------------------------------------------------------------------------------
    def _add(self, row: OutputRow) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.commit_rows or time.monotonic() - self.last_commit >= self.commit_seconds:
            self._commit()

    def _commit(self) -> None:
        rows, self.buffer = self.buffer, []
        info = write_part(self.out, self.next_part, rows, self.schema)
        self.manifest.commit_part(info, [r.key for r in rows], self.run_id)
        self.next_part += 1
        self.my_parts.add(info.name)
        self.last_commit = time.monotonic()
        for r in rows:
            self.inflight.discard(r.key)
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
            self.job_statuses[r.status] = self.job_statuses.get(r.status, 0) + 1
            self.gen_tokens += r.gen_tokens
        self.rows += len(rows)
        self.rate.add(self.rows, self.gen_tokens)
        progress = self._progress("running")
        self.emit(RowsCommitted(part=info.name, rows=len(rows), rows_done=progress["rows_done"],
                                rows_total=progress["rows_total"], gen_tokens=self.gen_tokens,
                                tokens_per_s=progress["tokens_per_s"], rows_per_s=progress["rows_per_s"],
                                eta_s=progress["eta_s"], statuses=dict(self.job_statuses)))

    def _progress(self, state: str) -> dict[str, Any]:
        rows_per_s, tokens_per_s = self.rate.rates()
        done = self.done_before + self.rows
        total = self.reader.total_rows
        eta = None
        if total is not None and rows_per_s > 0:
            eta = max(total - done - self.duplicates, 0) / rows_per_s
        data = {
            "state": state, "run_id": self.run_id, "pid": os.getpid(), "started": self.started_iso,
            "updated": now_iso(), "rows_done": done, "rows_total": total, "rows_this_run": self.rows,
            "skipped": self.skipped, "duplicates": self.duplicates, "gen_tokens": self.gen_tokens,
            "tokens_per_s": round(tokens_per_s, 3), "rows_per_s": round(rows_per_s, 3),
            "eta_s": None if eta is None else round(eta, 1), "statuses": dict(self.job_statuses),
            "failures": {k: v for k, v in self.job_statuses.items() if k != "ok"},
            "engine_seconds": round(self.engine_seconds, 3),
        }
        write_json_atomic(self.out / PROGRESS, data)
        return data


def read_progress(out_dir: str | Path) -> dict[str, Any] | None:
    """progress.json of an output directory, or None."""
    try:
        return json.loads((Path(out_dir) / PROGRESS).read_text())
    except (FileNotFoundError, ValueError):
        return None


def committed_parts(out_dir: str | Path) -> Sequence[str]:
    """Paths of the committed parts of an output directory, in order."""
    m = Manifest(Path(out_dir), readonly=True)
    try:
        return [str(Path(out_dir) / p["name"]) for p in m.parts()]
    finally:
        m.close()
