"""run_job(): the pipeline of DESIGN §4, emitting events; no UI.

    input batches ─► skip committed keys ─► render + tokenise ─► window of prompts sorted by length
    ─► blocks of engine.block_size ─► engine.generate ─► output rows ─► commit a part ─► events

Commit granularity: a part is committed as soon as ``commit_rows`` finished rows are buffered
(default: the engine's block size, so about one part per block) or ``commit_seconds`` passed since
the last commit, and at the end. An interrupt (Ctrl-C, SIGTERM) commits the rows the engine had
already finished (a commit under way finishes first), loses the rows it was still generating, and
leaves every committed part in place. Out of memory in a block: finished rows are kept, the rest
run again in half blocks; a row out of memory alone is an ``error`` row. docs/reliability.md has
the whole list.
Rows that never reach the engine (reader problems, template errors, prompt_too_long) are written
like any other row, with their status, in the next part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from corpusgen.job.columns import describe as describe_columns
from corpusgen.engine.api import Request
from corpusgen.errors import CorpusgenError, LockedError, ModelError, ResumeMismatch
from corpusgen.job.events import (Event, JobFinished, JobStarted, JobWarning, RateWindow, RowsCommitted,
                              RunSummary)
from corpusgen.job.manifest import (LOCK, PROGRESS, Manifest, OutputLock, check_not_lost, clean_orphans, manifest_dirs,
                                move_aside, now_iso, prepare_dir, rank_dirs, read_lock, verify_parts)
from corpusgen.job.prompts import Prompt, PromptBuilder, check_columns, compile_template
from corpusgen.job.ranks import Ranks, StartGroup
from corpusgen.job.readers import RowBatch, batch_records, open_input
from corpusgen.job.spec import JobSpec, changed_fields, fingerprint_of, with_overrides
from corpusgen.job.writer import OutputRow, output_schema, write_json_atomic, write_part
from corpusgen.job.answers import RowMaker as _RowMaker
from corpusgen.job.answers import answer_format as _answer_format
from corpusgen.job.answers import bind_grammar as _grammar
from corpusgen.job.safety import free_memory, is_oom, signals_as_interrupt, uninterrupted

DEFAULT_BLOCK = 32
_MAX_DUP_WARNINGS = 3


def default_engine_factory() -> Callable[..., Any]:
    """corpusgen.engine.load.open_engine (imported here: the job layer never imports torch itself)."""
    try:
        from corpusgen.engine.load import open_engine
    except ImportError as e:
        raise ModelError(f"the engine cannot be imported ({e}); reinstall corpusgen with its dependencies") from None
    return open_engine


def _policy_with_compress(policy, compress: str):
    from corpusgen.planner.policy import Compression

    if compress == "auto":
        return policy
    w = compress in ("weights", "both")
    kv = compress in ("kv", "both")
    return policy.replace(compress_weights=Compression() if w else None, compress_kv=Compression() if kv else None)


def _open_engine(spec: JobSpec, factory: Callable[..., Any], policy, dummy: bool, emit,
                 prompt_len: int | None = None) -> Any:
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
    if prompt_len is not None and "prompt_len" in inspect.signature(factory).parameters:
        kwargs["prompt_len"] = prompt_len  # the memory check uses what the planner planned for
    return factory(spec.model, **kwargs)


def _block_size(engine: Any) -> int:
    size = getattr(engine, "block_size", None)
    if size is None and getattr(engine, "policy", None) is not None:
        size = getattr(engine.policy, "block_size", None)
    return int(size or DEFAULT_BLOCK)


def run_job(spec: JobSpec, *, input_override: str | None = None, output_dir: str | Path | None = None,
            limit: int | None = None, restart: bool = False, policy: Any = None, dummy: bool = False,
            engine_factory: Callable[..., Any] | None = None, on_event: Callable[[Event], None] | None = None,
            commit_rows: int | None = None, commit_seconds: float = 30.0, window_blocks: int = 8,
            predicted_tps: float | None = None, plan_auto: bool | None = None,
            ranks: Ranks | None = None) -> RunSummary:
    """Run (or resume) ``spec`` into its output directory; return what this run did.

    ``policy`` (a Policy) overrides the spec's ``engine.policy``; ``engine_factory`` has the
    signature of corpusgen.engine.load.open_engine (default: :func:`default_engine_factory`).
    With policy ``auto``, ``plan_auto`` (default: when the real engine is used) plans the policy
    with corpusgen.planner.plan.plan_run and records its predicted throughput (unless
    ``predicted_tps`` is given); otherwise the engine factory gets ``policy=None``.
    ``ranks`` (default: from torchrun's environment) makes this process one rank of a data-parallel
    launch: it generates only the rows whose key hashes to it, in ``DIR/rank-<r>-of-<w>``
    (corpusgen.job.ranks).
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
    if plan_auto is None:
        plan_auto = engine_factory is None
    plan_auto = plan_auto and policy is None
    fields = {**spec.fingerprint_fields(), "weights": "dummy" if dummy else "real"}
    fingerprint = spec.fingerprint(weights=fields["weights"])
    constraint, typed = _answer_format(spec)
    if typed:  # the typed columns are fixed for the job's life: a resume under others is refused
        fields["columns"] = describe_columns(typed)
        fingerprint = fingerprint_of(fields)

    ranks = ranks or Ranks.from_env()
    gpu = ranks.select_gpu(spec.engine.device)  # several ranks on a machine: each on its GPU, cuda:LOCAL_RANK
    from corpusgen.planner.budgets import check_against_machine

    check_against_machine(gpu_budget=spec.engine.gpu_memory, cpu_budget=spec.engine.cpu_memory,
                          device=spec.engine.device if gpu is None else f"cuda:{gpu}")
    here = ranks.directory(out)  # where this process writes: DIR, or DIR/rank-<r>-of-<w>
    if here != out and spec.engine.offload_dir:  # ranks of a machine must not share the disk tier's files
        spec = dataclasses.replace(spec, engine=dataclasses.replace(
            spec.engine, offload_dir=str(Path(spec.engine.offload_dir) / here.name)))
    if ranks.local_world > 1 and ranks.local_rank == 0 and spec.engine.cpu_memory is None:
        emit(JobWarning(message=f"{ranks.local_world} ranks share this machine's memory and engine.cpu_memory "
                                "is unset (each rank assumes most of it); set it to at most 1/"
                                f"{ranks.local_world} of the host's memory"))

    with StartGroup(ranks) as group, signals_as_interrupt(), contextlib.ExitStack() as locks:
        def prepare() -> tuple[str | None, list[str]]:
            prepare_dir(out)
            locks.enter_context(OutputLock(out))  # rank 0 (or the single process) holds DIR's lock to the end
            return _prepare_output(out, ranks, restart=restart, fingerprint=fingerprint, fields=fields, spec=spec)

        moved, removed = group.leader_first(prepare)
        if here != out:
            prepare_dir(here)
            locks.enter_context(OutputLock(here))
        manifest = Manifest(here)
        others = _other_launches(out, ranks)
        engine = None
        try:
            missing = verify_parts(here, manifest)  # a damaged part is refused; a missing one is generated again
            job = manifest.job()
            if job is None or job["fingerprint"] != fingerprint:  # DIR's record was checked by rank 0
                manifest.set_job(fingerprint, fields, spec.to_dict())
            for name in [*removed, *clean_orphans(here, manifest)]:
                emit(JobWarning(message=f"removed {name}: written by a run that stopped before committing it"))
            manifest.forget_parts(missing)
            for name in missing:
                emit(JobWarning(message=f"committed part {name} is missing: its rows will be generated again"))
            plan = None
            if plan_auto:
                from corpusgen.planner.plan import plan_run

                plan = plan_run(spec, dummy=dummy, rows=reader.total_rows, limit=limit)
                policy = plan.policy
                predicted_tps = predicted_tps if predicted_tps is not None else plan.predicted_tps
            t_load = time.perf_counter()
            factory = engine_factory or default_engine_factory()
            engine = _open_engine(spec, factory, policy, dummy, emit, prompt_len=plan and plan.prompt_len)
            load_seconds = time.perf_counter() - t_load
            tok = engine.tokenizer.fingerprint()
            for m in (manifest, *others):
                j = m.job()
                if j is not None and j["fingerprint"] == fingerprint and j.get("tokenizer") not in (None, tok):
                    raise ResumeMismatch(f"{out} was written with a different tokenizer ({j['tokenizer'][:12]}… "
                                         f"now {tok[:12]}…); run with --restart, or choose another --output")
            manifest.set_tokenizer(tok)
            run = _Run(spec=spec, out=here, manifest=manifest, engine=engine, reader=reader, emit=emit,
                       commit_rows=commit_rows, commit_seconds=commit_seconds, window_blocks=window_blocks,
                       job_dir=out, others=others, ranks=ranks, constraint=constraint, typed=typed)
            describe = engine.describe() if hasattr(engine, "describe") else {"model": spec.model}
            if gpu is not None and describe.get("device") == "cuda":
                describe = {**describe, "device": f"cuda:{gpu}"}  # "cuda" is this rank's current device
            if plan is not None:
                describe = {**describe, "plan": plan.summary()}
            manifest.start_run(run.run_id, engine=describe, input=dataclasses.asdict(spec.input),
                               predicted_tps=predicted_tps, load_seconds=load_seconds)
            emit(JobStarted(run_id=run.run_id, output_dir=str(here), fingerprint=fingerprint,
                            resumed=run.resumed, rows_done=run.done_before,
                            rows_total=reader.total_rows, block_size=run.block_size, engine=describe,
                            load_seconds=load_seconds, moved_to=None if moved is None else str(moved)))
            return run.execute(started, load_seconds)
        finally:
            for m in (manifest, *others):
                m.close()
            if engine is not None and hasattr(engine, "close"):
                engine.close()


def _prepare_output(out: Path, ranks: Ranks, *, restart: bool, fingerprint: str, fields: dict[str, Any],
                    spec: JobSpec) -> tuple[str | None, list[str]]:
    """Rank 0 (or the single process), holding DIR's lock: refuse a directory that another launch
    is writing, move it aside with --restart, check or record the job in DIR's manifest, and tidy
    the directories of launches of another world size. Returns (moved to, files removed)."""
    for d, _, world in rank_dirs(out):
        holder = read_lock(d) or {}
        if holder.get("alive"):
            raise LockedError(f"{d} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                              f"(a launch of {world} ranks); wait for it or stop it, or use another --output")
    moved = None
    if restart and any(p.name != LOCK for p in out.iterdir()):
        moved = str(move_aside(out))
    top = Manifest(out)
    try:
        check_not_lost(out, top)
        job = top.job()
        if job is not None and job["fingerprint"] != fingerprint and not _any_parts(out):
            job = None  # nothing was committed under the old spec: nothing to mix, start afresh
        if job is not None and job["fingerprint"] != fingerprint:
            changed = changed_fields(job["fields"], fields) or ["(fingerprint)"]
            raise ResumeMismatch(
                f"{out} holds outputs of a different job (changed: {', '.join(changed)}); "
                "run with --restart to move them aside and start over, or choose another --output")
        if job is None:
            top.set_job(fingerprint, fields, spec.to_dict())
    finally:
        top.close()
    removed = []
    for d, _, world in manifest_dirs(out):
        if world != ranks.world:  # opened for writing: a killed rank's WAL is folded in, readers see one file
            m = Manifest(d)
            try:
                removed += [f"{d.name}/{name}" for name in clean_orphans(d, m)]
            finally:
                m.close()
    return moved, removed


def _other_launches(out: Path, ranks: Ranks) -> list[Manifest]:
    """Read-only manifests, with committed parts, of launches of another world size: they may hold
    keys of this rank, which it then skips (any relaunch resumes, whatever its world size)."""
    found = []
    for d, _, world in manifest_dirs(out):
        if world != ranks.world:
            m = Manifest(d, readonly=True)
            if m.parts():
                found.append(m)
            else:
                m.close()
    return found


def _any_parts(out: Path) -> bool:
    for d, _, _ in manifest_dirs(out):
        m = Manifest(d, readonly=True)
        try:
            if m.parts():
                return True
        finally:
            m.close()
    return False


def _owned(batch: RowBatch, ranks: Ranks) -> RowBatch:
    """The rows of ``batch`` whose key hashes to this rank."""
    keep = [i for i, k in enumerate(batch.keys) if ranks.owns(k)]
    if len(keep) == len(batch.keys):
        return batch
    return RowBatch(keys=[batch.keys[i] for i in keep], rows=batch.rows.take(keep),
                    problems=[batch.problems[i] for i in keep])


class _Run:
    """State of one run: buffers, counters, timing."""

    def __init__(self, *, spec: JobSpec, out: Path, manifest: Manifest, engine: Any, reader: Any, emit,
                 commit_rows: int | None, commit_seconds: float, window_blocks: int, job_dir: Path | None = None,
                 others: Sequence[Manifest] = (), ranks: Ranks | None = None, constraint: Any = None,
                 typed: Sequence[Any] = ()):
        self.spec, self.out, self.manifest, self.engine = spec, out, manifest, engine
        self.job_dir = job_dir or out
        self.others, self.ranks = others, ranks or Ranks()  # other launches' manifests; this process's rank
        self.reader, self.emit = reader, emit
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.block_size = _block_size(engine)
        self.commit_rows = commit_rows or self.block_size
        self.commit_seconds = commit_seconds
        self.window_rows = self.block_size * max(1, window_blocks)
        self.sampling = spec.generation.sampling()
        self.schema = output_schema(with_json=spec.output.schema is not None, typed=typed)
        self.grammar = _grammar(constraint, engine, emit)
        self.maker = _RowMaker(spec.output.schema, self.run_id, regex=spec.output.regex, typed=typed,
                               labels=constraint.labels if constraint is not None else None, grammar=self.grammar)
        self.builder = PromptBuilder(spec.prompt, engine.tokenizer, max_context=engine.max_context,
                                     max_new_tokens=spec.generation.max_new_tokens)
        totals = manifest.totals()
        self.done_before = totals["rows"]
        self.job_statuses: dict[str, int] = dict(totals["statuses"])
        other_totals = [m.totals() for m in others]
        self.resumed = self.done_before > 0 or any(t["rows"] for t in other_totals)
        if self.ranks.world == 1:  # a single process owns every key, so every other launch's rows count
            for t in other_totals:
                self.done_before += t["rows"]
                for k, v in t["statuses"].items():
                    self.job_statuses[k] = self.job_statuses.get(k, 0) + v
        self.next_part = manifest.next_part_number()
        self.my_parts: set[str] = set()
        self.inflight: set[str] = set()  # keys read this run and not yet committed
        self.buffer: list[OutputRow] = []
        self.last_commit = time.monotonic()
        self.rows = self.skipped = self.duplicates = self.gen_tokens = self.oom_splits = 0
        self.statuses: dict[str, int] = {}
        self.engine_seconds = 0.0
        # committed keys met in the input, distinct (a temporary on-disk table: memory stays flat); the
        # committed keys never met are rows no longer in the input, reported at the end
        self.check_stale = reader.limit is None and self.ranks.world == 1 and self.done_before > 0
        self.met = sqlite3.connect("") if self.check_stale else None
        if self.met is not None:
            self.met.execute("CREATE TABLE met (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self.stale_keys: int | None = None
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
            self._report_stale()
        except KeyboardInterrupt:
            status = "interrupted"
            self._keep_finished()
            raise
        finally:
            if self.met is not None:
                self.met.close()
            seconds = time.perf_counter() - started
            overhead = time.perf_counter() - loop_start - self.engine_seconds
            summary = RunSummary(run_id=self.run_id, status=status, output_dir=str(self.job_dir), rows=self.rows,
                                 skipped=self.skipped, duplicates=self.duplicates, statuses=dict(self.statuses),
                                 gen_tokens=self.gen_tokens, seconds=seconds, load_seconds=load_seconds,
                                 engine_seconds=self.engine_seconds, overhead_seconds=max(overhead, 0.0))
            try:
                self.manifest.end_run(self.run_id, status=status, rows=self.rows, gen_tokens=self.gen_tokens,
                                      seconds=seconds, engine_seconds=self.engine_seconds,
                                      overhead_seconds=summary.overhead_seconds)
                self._progress(status)
            except CorpusgenError:
                if status == "finished":
                    raise  # otherwise (a full disk, say) the error that stopped the run is the one to report
            self.emit(JobFinished(summary=summary))
        return summary

    def _prompts(self) -> Iterator[Prompt]:
        """Rows not yet committed, as prompts (or decided rows), in input order."""
        for batch in self.reader.batches():
            if self.ranks.world > 1:
                batch = _owned(batch, self.ranks)
            done = self._committed(batch.keys)
            if self.met is not None and done:
                self.met.executemany("INSERT OR IGNORE INTO met VALUES (?)",
                                     ((k,) for k, part in done.items() if part not in self.my_parts))
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

    def _report_stale(self) -> None:
        """After reading the whole input: warn about committed rows whose key it no longer has."""
        if self.met is None:
            return
        met = self.met.execute("SELECT count(*) FROM met").fetchone()[0]
        self.met.close()
        self.met = None
        self.stale_keys = max(self.done_before - met, 0)
        if self.stale_keys:
            self.emit(JobWarning(message=(
                f"{self.stale_keys} committed rows have keys no longer in the input (rows removed, or ids changed); "
                "they stay in the output: select them with SQL, or run with --restart to start over from this input")))

    def _committed(self, keys: Sequence[str]) -> dict[str, str]:
        """Keys committed in this process's manifest (→ part), or in another launch's (→ '<dir>/<part>')."""
        done = self.manifest.committed(keys)
        for m in self.others:
            rest = [k for k in keys if k not in done]
            if not rest:
                break
            done.update({k: f"{m.path.parent.name}/{part}" for k, part in m.committed(rest).items()})
        return done

    def _generate(self, window: list[Prompt]) -> None:
        """Sort a window by prompt length (little padding per block), run it block by block."""
        window.sort(key=lambda p: len(p.ids))
        if getattr(getattr(self.engine, "policy", None), "refill", False):
            self._run_block(window)  # the engine keeps its block full from the whole window (refill)
            return
        for i in range(0, len(window), self.block_size):
            self._run_block(window[i:i + self.block_size])

    def _run_block(self, prompts: list[Prompt]) -> None:
        """Generate one block. Out of memory (CUDA or host): the rows already yielded are kept, the
        others run again as two half blocks, recursively; a row out of memory alone is an error row."""
        block = {p.key: p for p in prompts}
        oom = self._consume(block)
        if oom is None:
            for key, prompt in block.items():  # never drop a row silently
                self._add(OutputRow(key=key, status="error", error="the engine returned no result for this row",
                                    prompt_tokens=prompt.prompt_tokens, run_id=self.run_id))
            return
        free_memory()
        rest = list(block.values())
        if len(prompts) == 1:
            p = rest[0]
            self._add(OutputRow(key=p.key, status="error", finish_reason="error", prompt_tokens=p.prompt_tokens,
                                error=f"out of memory even in a block of its own: {oom}", run_id=self.run_id))
            return
        half = (len(rest) + 1) // 2
        self.oom_splits += 1
        if self.oom_splits <= _MAX_DUP_WARNINGS:
            self.emit(JobWarning(message=f"out of memory in a block of {len(prompts)} rows ({oom}); "
                                         f"running its {len(rest)} unfinished rows again in blocks of {half}"))
        for part in (rest[:half], rest[half:]):
            if part:
                self._run_block(part)

    def _consume(self, block: dict[str, Prompt]) -> str | None:
        """Run ``block`` through the engine, adding (and popping) each row as it finishes; None, or
        the message of the out-of-memory error that stopped the engine."""
        requests = [Request(key=k, prompt_ids=p.ids) for k, p in block.items()]
        results = None
        try:
            while True:
                t = time.perf_counter()
                try:
                    if results is None:
                        hook = self.grammar.hook(self.sampling.max_new_tokens) if self.grammar else None
                        results = iter(self.engine.generate(requests, self.sampling, logits_hook=hook))
                    r = next(results)
                except StopIteration:
                    return None
                except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
                    if not is_oom(e):
                        raise
                    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                finally:
                    self.engine_seconds += time.perf_counter() - t
                prompt = block.pop(r.key, None)
                assert prompt is not None, f"engine returned an unknown or repeated key {r.key!r}"
                self._add(self.maker.from_result(r, prompt))
        finally:
            if hasattr(results, "close"):
                results.close()

    # --- commits -------------------------------------------------------------------------------
    def _add(self, row: OutputRow) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.commit_rows or time.monotonic() - self.last_commit >= self.commit_seconds:
            self._commit()

    def _commit(self) -> None:
        with uninterrupted():  # Ctrl-C or SIGTERM here takes effect once the part is committed and counted
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

    def _keep_finished(self) -> None:
        """On a stop: commit the rows the engine already finished (one part, seconds at most); the
        rows it was still generating are lost and run again by the next run."""
        if not self.buffer:
            return
        try:
            self._commit()
        except CorpusgenError as e:  # a full disk, say: the stop is still what the user asked for
            self.emit(JobWarning(message=f"the rows finished before the stop could not be committed: {e}"))

    def _progress(self, state: str) -> dict[str, Any]:
        rows_per_s, tokens_per_s = self.rate.rates()
        done = self.done_before + self.rows
        total = self.reader.total_rows
        world = self.ranks.world
        share = total if total is None or world == 1 else total / world  # a rank's share is known only at the end
        eta = None
        if share is not None and rows_per_s > 0:
            eta = max(share - done - self.duplicates, 0) / rows_per_s
        data = {
            "state": state, "run_id": self.run_id, "pid": os.getpid(), "started": self.started_iso,
            "updated": now_iso(), "rows_done": done, "rows_total": total if world == 1 else None,
            "input_rows": total, "rank": self.ranks.rank, "world": world, "rows_this_run": self.rows,
            "skipped": self.skipped, "duplicates": self.duplicates, "gen_tokens": self.gen_tokens,
            "tokens_per_s": round(tokens_per_s, 3), "rows_per_s": round(rows_per_s, 3),
            "eta_s": None if eta is None else round(eta, 1), "statuses": dict(self.job_statuses),
            "failures": {k: v for k, v in self.job_statuses.items() if k != "ok"},
            "engine_seconds": round(self.engine_seconds, 3), "stale_keys": self.stale_keys,
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
    """Paths of the committed parts of an output directory (every rank's, for a data-parallel job)."""
    paths = []
    Manifest(Path(out_dir), readonly=True).close()  # a clear error when DIR is not an output directory
    for d, _, _ in manifest_dirs(Path(out_dir)):
        m = Manifest(d, readonly=True)
        try:
            paths += [str(d / p["name"]) for p in m.parts()]
        finally:
            m.close()
    return paths
