"""One run's loop (runner.run_job sets it up): input batches, the rows this rank owns, keys already
committed skipped, prompts rendered, windows sorted by prompt length and cut into blocks for the
engine, finished rows buffered and committed as parts, progress written and events emitted.
Out of memory in a block: finished rows are kept, the rest run again in half blocks.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from corpusgen.engine.api import Request
from corpusgen.errors import CorpusgenError
from corpusgen.job.answers import RowMaker as _RowMaker
from corpusgen.job.answers import bind_grammar as _grammar
from corpusgen.job.events import JobFinished, JobWarning, RateWindow, RowsCommitted, RunSummary
from corpusgen.job.manifest import PROGRESS, Manifest, now_iso
from corpusgen.job.prompts import Prompt, PromptBuilder
from corpusgen.job.ranks import Ranks
from corpusgen.job.readers import RowBatch, batch_records
from corpusgen.job.spec import JobSpec
from corpusgen.job.writer import OutputRow, output_schema, write_json_atomic, write_part
from corpusgen.job.safety import free_memory, is_oom, uninterrupted

_MAX_DUP_WARNINGS = 3


def _owned(batch: RowBatch, ranks: Ranks) -> RowBatch:
    """The rows of ``batch`` whose key hashes to this rank."""
    keep = [i for i, k in enumerate(batch.keys) if ranks.owns(k)]
    if len(keep) == len(batch.keys):
        return batch
    return RowBatch(keys=[batch.keys[i] for i in keep], rows=batch.rows.take(keep),
                    problems=[batch.problems[i] for i in keep])


class Run:
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
        self.block_size = engine.block_size
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
        if self.engine.refill:
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
