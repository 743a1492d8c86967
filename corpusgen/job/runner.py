"""run_job(): the pipeline of DESIGN §4, emitting events; no UI. This module sets a run up (checks,
the output directory, the engine); loop.py is the run itself.

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
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from corpusgen.engine.api import Generator, GeneratorFactory
from corpusgen.errors import LockedError, ModelError, ResumeMismatch
from corpusgen.job.answers import answer_format as _answer_format
from corpusgen.job.columns import describe as describe_columns
from corpusgen.job.events import Event, JobStarted, JobWarning, RunSummary
from corpusgen.job.loop import Run
from corpusgen.job.lock import LOCK, OutputLock, read_lock
from corpusgen.job.manifest import (PROGRESS, Manifest, check_not_lost, manifest_dirs, move_aside, prepare_dir,
                                    rank_dirs)
from corpusgen.job.parts import check_keys, clean_orphans, verify_parts
from corpusgen.job.prompts import check_columns, compile_template
from corpusgen.job.ranks import Ranks, StartGroup
from corpusgen.job.readers import open_input
from corpusgen.job.spec import JobSpec, changed_fields, fingerprint_of, with_overrides
from corpusgen.job.safety import signals_as_interrupt


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


def _open_engine(spec: JobSpec, factory: GeneratorFactory, policy, dummy: bool, emit,
                 prompt_len: int | None = None) -> Generator:
    e = spec.engine
    if e.compress != "auto":
        if policy is not None:
            policy = _policy_with_compress(policy, e.compress)
        else:
            emit(JobWarning(message=f"engine.compress={e.compress} needs an explicit policy; "
                                    "ignored with policy auto"))
    # gen_len sizes the KV cache in the memory check; prompt_len is what the planner planned for
    return factory(spec.model, dummy=dummy, device=None if e.device == "auto" else e.device,
                   dtype=None if e.dtype == "auto" else e.dtype, policy=policy, gpu_memory=e.gpu_memory,
                   cpu_memory=e.cpu_memory, offload_dir=e.offload_dir, prompt_len=prompt_len or 512,
                   gen_len=spec.generation.max_new_tokens)


def run_job(spec: JobSpec, *, input_override: str | None = None, output_dir: str | Path | None = None,
            limit: int | None = None, restart: bool = False, policy: Any = None, dummy: bool = False,
            engine_factory: Callable[..., Any] | None = None, on_event: Callable[[Event], None] | None = None,
            commit_rows: int | None = None, commit_seconds: float = 30.0, window_blocks: int = 8,
            predicted_tps: float | None = None, plan_auto: bool | None = None,
            ranks: Ranks | None = None) -> RunSummary:
    """Run (or resume) ``spec`` into its output directory; return what this run did.

    ``policy`` (a Policy) overrides the spec's ``engine.policy``; ``engine_factory`` is a
    GeneratorFactory (default: open_engine). With policy ``auto``, ``plan_auto`` (default: with the
    real engine) plans the policy (planner.plan.plan_run) and records its predicted throughput.
    ``ranks`` (default: torchrun's environment) makes this process one rank of a data-parallel
    launch, writing the rows whose key hashes to it in ``DIR/rank-<r>-of-<w>`` (job/ranks.py).
    Raises a CorpusgenError for anything the user can fix; re-raises KeyboardInterrupt after
    recording the interrupted run."""
    emit = on_event or (lambda e: None)
    started = time.perf_counter()
    if input_override is not None:
        spec = with_overrides(spec, input=input_override)
    out = Path(output_dir) if output_dir is not None else spec.output_dir()

    # everything a user can get wrong is checked before the engine loads
    reader = _open_reader(spec, limit)
    if policy is None:
        policy = spec.engine.resolve_policy()
    if plan_auto is None:
        plan_auto = engine_factory is None
    plan_auto = plan_auto and policy is None
    constraint, typed = _answer_format(spec)
    fields, fingerprint = _fingerprint(spec, dummy, typed)

    ranks = ranks or Ranks.from_env()
    spec, gpu, here = _this_rank(spec, ranks, out, emit)

    with StartGroup(ranks) as group, signals_as_interrupt(), contextlib.ExitStack() as locks:
        held: dict[Path, OutputLock] = {}

        def prepare() -> tuple[str | None, list[str]]:
            prepare_dir(out)
            held[out] = locks.enter_context(OutputLock(out))  # rank 0 (or the single process) holds DIR's lock
            return _prepare_output(out, ranks, restart=restart, fingerprint=fingerprint, fields=fields, spec=spec)

        moved, removed = group.leader_first(prepare)
        if here != out:
            prepare_dir(here)
            held[here] = locks.enter_context(OutputLock(here))
        manifest = Manifest(here)
        others = _other_launches(out, ranks)
        engine = None
        try:
            _repair(here, manifest, fingerprint, fields, spec, removed, emit)
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
            _check_tokenizer(engine, (manifest, *others), fingerprint, out)
            run = Run(spec=spec, out=here, manifest=manifest, engine=engine, reader=reader, emit=emit,
                       commit_rows=commit_rows, commit_seconds=commit_seconds, window_blocks=window_blocks,
                       job_dir=out, others=others, ranks=ranks, constraint=constraint, typed=typed)
            _announce(run, engine, plan, gpu, fingerprint=fingerprint, predicted_tps=predicted_tps,
                      load_seconds=load_seconds, moved=moved)
            try:
                return run.execute(started, load_seconds)
            except BaseException as e:  # noted in the lock too: the manifest may be what failed (a full disk)
                stopped = isinstance(e, KeyboardInterrupt)
                held[here].note_end(run.run_id, "interrupted" if stopped else "failed", None if stopped else str(e))
                raise
        finally:
            for m in (manifest, *others):
                m.close()
            if engine is not None:
                engine.close()


def _announce(run: "Run", engine: Generator, plan, gpu: int | None, *, fingerprint: str,
              predicted_tps: float | None, load_seconds: float, moved: Path | None) -> None:
    """Record the run in the manifest (what ran, where, the prediction) and tell the caller."""
    describe = {**engine.describe(), **({"plan": plan.summary()} if plan is not None else {})}
    if gpu is not None and describe.get("device") == "cuda":
        describe["device"] = f"cuda:{gpu}"  # "cuda" is this rank's current device
    run.manifest.start_run(run.run_id, engine=describe, input=dataclasses.asdict(run.spec.input),
                           predicted_tps=predicted_tps, load_seconds=load_seconds)
    run.emit(JobStarted(run_id=run.run_id, output_dir=str(run.out), fingerprint=fingerprint,
                        resumed=run.resumed, rows_done=run.done_before, rows_total=run.reader.total_rows,
                        block_size=run.block_size, engine=describe, load_seconds=load_seconds,
                        moved_to=None if moved is None else str(moved)))


def _this_rank(spec: JobSpec, ranks: Ranks, out: Path, emit) -> tuple[JobSpec, int | None, Path]:
    """This process's share of the machine: its GPU (several ranks on a machine: cuda:LOCAL_RANK),
    budgets checked against what the machine has, the directory it writes (DIR, or
    DIR/rank-<r>-of-<w>) and its own disk-tier folder."""
    gpu = ranks.select_gpu(spec.engine.device)
    from corpusgen.planner.budgets import check_against_machine

    check_against_machine(gpu_budget=spec.engine.gpu_memory, cpu_budget=spec.engine.cpu_memory,
                          device=spec.engine.device if gpu is None else f"cuda:{gpu}")
    here = ranks.directory(out)
    if here != out and spec.engine.offload_dir:  # ranks of a machine must not share the disk tier's files
        spec = dataclasses.replace(spec, engine=dataclasses.replace(
            spec.engine, offload_dir=str(Path(spec.engine.offload_dir) / here.name)))
    if ranks.local_world > 1 and ranks.local_rank == 0 and spec.engine.cpu_memory is None:
        emit(JobWarning(message=f"{ranks.local_world} ranks share this machine's memory and engine.cpu_memory "
                                "is unset (each rank assumes most of it); set it to at most 1/"
                                f"{ranks.local_world} of the host's memory"))
    return spec, gpu, here


def _open_reader(spec: JobSpec, limit: int | None):
    """The input, its columns checked against the template's variables (before the engine loads)."""
    _, variables = compile_template(spec.prompt)
    reader = open_input(spec.input, columns=spec.input.columns, limit=limit)
    check_columns(variables, spec.input.columns or reader.available)
    reader.select(list(spec.input.columns) or sorted(variables))
    return reader


def _fingerprint(spec: JobSpec, dummy: bool, typed) -> tuple[dict[str, Any], str]:
    """The job's fingerprint fields and hash; the typed columns are fixed for the job's life, so a
    resume under others is refused."""
    fields = {**spec.fingerprint_fields(), "weights": "dummy" if dummy else "real"}
    if not typed:
        return fields, spec.fingerprint(weights=fields["weights"])
    fields["columns"] = describe_columns(typed)
    return fields, fingerprint_of(fields)


def _repair(here: Path, manifest: Manifest, fingerprint: str, fields: dict[str, Any], spec: JobSpec,
            removed: list[str], emit) -> None:
    """Before a run: refuse damaged parts, forget missing ones (their rows run again), remove what a
    crash left uncommitted, and bring the manifest's keys in line with the parts (never a row twice)."""
    missing = verify_parts(here, manifest)
    job = manifest.job()
    if job is None or job["fingerprint"] != fingerprint:  # DIR's record was checked by rank 0
        manifest.set_job(fingerprint, fields, spec.to_dict())
    for name in [*removed, *clean_orphans(here, manifest)]:
        emit(JobWarning(message=f"removed {name}: written by a run that stopped before committing it"))
    manifest.forget_parts(missing)
    for name in missing:
        emit(JobWarning(message=f"committed part {name} is missing: its rows will be generated again"))
    for message in check_keys(here, manifest):
        emit(JobWarning(message=message))


def _check_tokenizer(engine: Generator, manifests, fingerprint: str, out: Path) -> None:
    """A resume must tokenise as the rows already committed were: the same tokenizer."""
    tok = engine.tokenizer.fingerprint()
    for m in manifests:
        j = m.job()
        if j is not None and j["fingerprint"] == fingerprint and j.get("tokenizer") not in (None, tok):
            raise ResumeMismatch(f"{out} was written with a different tokenizer ({j['tokenizer'][:12]}… "
                                 f"now {tok[:12]}…); run with --restart, or choose another --output")
    manifests[0].set_tokenizer(tok)


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
