"""Planning for people and for ``run --policy auto``: decide the inputs of the optimizer, call it,
and say how each input was decided (DESIGN §6). No UI here; the CLI renders a :class:`PlanReport`.

The inputs and where they come from:

* **hardware profile** — profiles.py (a given one, this machine's saved one, or a built-in).
* **where the "GPU" tier is** — ``cpu`` when asked, or when a run has no CUDA device, or when a
  plan without a GPU uses a CPU profile; then the "GPU" tier is host memory and nothing needs
  offloading: planning only picks a batch, quickly (the LP and cvxpy are never reached).
* **budgets** — given ones; else the device's memory (the GPU's, 90% of the host's); for a plan on
  a machine without a GPU, the profile's machine. The disk budget is the free space of the
  offload directory (the temp dir when none is given).
* **workload** — ``gen_len`` = ``max_new_tokens``; ``prompt_len`` given, or (for a run) the longest
  of the first prompts of the input rounded up to a multiple of 64, else 512.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from corpusgen.errors import ModelError, PolicyError
from corpusgen.planner.budgets import check_against_machine, disk_free, host_memory
from corpusgen.planner.profiles import ProfileChoice, cuda_name, resolve_profile
from corpusgen.planner.hardware import cpu_has_bf16

DEFAULT_PROMPT_LEN = 512
"""prompt_len when neither given nor estimated (FlexGen's workload)."""
PROMPT_SAMPLE_ROWS = 64
"""Rows a run tokenises to estimate its prompt length."""
CPU_BATCH = 32
"""gpu_batch_size on a CPU-only machine without budgets: wider matmuls use the cores better than
small blocks do, and larger blocks mostly add padding."""
CPU_SHAPES = ((1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (32, 1))
"""Candidate (gpu_batch_size, num_gpu_batches) on a CPU with budgets: blocks beyond 32 rows buy
nothing there."""
HOST_SHARE = 0.9
"""Share of the host's memory planned with when no CPU budget is given (the OS and this process
need the rest)."""
GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class PlanReport:
    """A plan and everything needed to explain it."""

    config: Any
    """The model's ModelConfig."""
    plan: Any
    """The optimizer's Plan."""
    profile: ProfileChoice
    """Hardware profile used."""
    device: str
    """Where the "GPU" tier is: ``cuda`` or ``cpu``."""
    prompt_len: int
    """Prompt tokens per row planned for."""
    gen_len: int
    """Generated tokens per row planned for."""
    rows: int | None
    """Rows of the job (for the ETA), when known."""
    gpu_budget: int | None
    """Bytes (None: not checked, a given policy)."""
    cpu_budget: int | None
    """Bytes (None: not checked, a given policy)."""
    disk_budget: int | None
    """Bytes (None = unlimited)."""
    dtype_bytes: int
    """Bytes per value the engine computes in."""
    notes: tuple[str, ...] = ()
    """How each input was decided, one line each."""
    seconds: float = 0.0
    """Time spent in the optimizer."""

    @property
    def policy(self):
        return self.plan.policy

    @property
    def throughput(self) -> float:
        """Predicted generated tokens per second (prefill + decode)."""
        return self.plan.throughput

    @property
    def prefill_tps(self) -> float:
        """Predicted prompt tokens per second of the prefill step."""
        bt = self.plan.breakdown
        return bt.block_size * self.prompt_len / bt.prefill_s if bt.prefill_s else float("inf")

    @property
    def decode_tps(self) -> float | None:
        """Predicted generated tokens per second of the decode steps (None when gen_len is 1)."""
        bt = self.plan.breakdown
        return bt.block_size * (self.gen_len - 1) / bt.decode_s if bt.decode_s else None

    @property
    def eta_s(self) -> float | None:
        """rows × gen_len / throughput, when the rows are known."""
        return None if self.rows is None else self.rows * self.gen_len / self.throughput

    @property
    def predicted_tps(self) -> float | None:
        """The throughput worth recording beside a measurement: None when the profile is not of
        this machine (a built-in H200 profile says nothing about a laptop)."""
        return self.throughput if self.profile.this_machine else None

    def summary(self) -> dict[str, Any]:
        """JSON-able facts of the plan (stored with a run's engine description)."""
        return {"predicted_tps": _round(self.throughput), "recorded": self.predicted_tps is not None,
                "profile": self.profile.source, "device": self.device, "prompt_len": self.prompt_len,
                "gen_len": self.gen_len, "no_offload": self.plan.no_offload, "eta_s": _round(self.eta_s),
                "gpu_budget_gib": _gib(self.gpu_budget), "cpu_budget_gib": _gib(self.cpu_budget),
                "seconds": _round(self.seconds), "notes": list(self.notes)}

    def header(self) -> str:
        """Comment lines for the policy YAML."""
        return (f"corpusgen plan for {self.config.name}: prompt_len {self.prompt_len}, gen_len {self.gen_len}, "
                f"budgets GPU {_gib(self.gpu_budget)} GiB, CPU {_gib(self.cpu_budget)} GiB\n"
                f"predicted {self.throughput:.1f} tok/s with profile {self.profile.source}\n"
                "use it with: corpusgen run JOB.yaml --policy THIS_FILE")


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _gib(b: int | None) -> float | None:
    return None if b is None else round(b / GIB, 2)


# --------------------------------------------------------------------------- machine facts


# --------------------------------------------------------------------------- profiles


# --------------------------------------------------------------------------- workload

def dtype_bytes_for(device: str, dtype: str | None = None) -> int:
    """Bytes per value the engine will compute in (its choice for ``auto``, see engine.load)."""
    if dtype not in (None, "auto"):
        return 4 if dtype == "float32" else 2
    if device != "cpu":
        return 2
    return 2 if cpu_has_bf16() else 4


def estimate_prompt_len(spec, tokenizer, *, max_context: int, limit: int | None = None) -> int | None:
    """Tokens of the longest of the job's first prompts, rounded up to a multiple of 64 (capped by
    the context); None when no row of the sample makes a prompt."""
    from corpusgen.job.prompts import PromptBuilder
    from corpusgen.job.readers import batch_records, open_input

    builder = PromptBuilder(spec.prompt, tokenizer, max_context=max_context,
                            max_new_tokens=spec.generation.max_new_tokens)
    sample = min(PROMPT_SAMPLE_ROWS, limit or PROMPT_SAMPLE_ROWS)
    reader = open_input(spec.input, columns=spec.input.columns or None, limit=sample)
    reader.select(list(spec.input.columns) or sorted(builder.variables))
    longest = 0
    for batch in reader.batches():
        for key, rec, problem in zip(batch.keys, batch_records(batch), batch.problems, strict=True):
            p = builder.build(key, rec) if problem is None else None
            if p is not None and p.ids is not None:
                longest = max(longest, len(p.ids))
    if not longest:
        return None
    return min(-(-longest // 64) * 64, max(builder.budget, 1))


# --------------------------------------------------------------------------- planning

def plan_model(config, *, profile: ProfileChoice, device: str, prompt_len: int, gen_len: int,
               gpu_budget: int | None = None, cpu_budget: int | None = None, disk_budget: int | None = None,
               dtype_bytes: int = 2, allow_compression: bool = True, rows: int | None = None,
               notes: tuple[str, ...] = ()) -> PlanReport:
    """Fill unset budgets, run the optimizer, return the report (BudgetError when nothing fits)."""
    from corpusgen.planner.optimizer import plan

    if prompt_len < 1 or gen_len < 1:
        raise PolicyError(f"prompt_len and gen_len must be ≥ 1, got {prompt_len} and {gen_len}")
    if prompt_len + gen_len > config.max_positions:
        raise PolicyError(f"prompt_len {prompt_len} + gen_len {gen_len} exceeds the context of {config.name} "
                          f"({config.max_positions} positions); lower --prompt-len or max_new_tokens")
    prof = profile.profile  # budgets over this machine's memory are refused; a plan for another machine's, over it
    elsewhere = device != "cpu" and cuda_name() is None
    check_against_machine(gpu_budget=gpu_budget, cpu_budget=cpu_budget, device=device,
                          machine=(prof.gpu_memory_bytes, prof.cpu_memory_bytes, prof.device_name) if elsewhere else None)
    given = gpu_budget is not None or cpu_budget is not None
    notes = list(notes)
    if gpu_budget is None or cpu_budget is None:
        g, c, why = _default_budgets(device, profile)
        filled = [t for t, v in (("GPU", gpu_budget), ("CPU", cpu_budget)) if v is None]
        notes.append(f"{' and '.join(filled)} budget: {why}")
        gpu_budget = g if gpu_budget is None else gpu_budget
        cpu_budget = c if cpu_budget is None else cpu_budget
    shapes = None
    if device == "cpu":
        # The "GPU" tier is host memory: without budgets nothing is offloaded, only a batch is chosen.
        shapes = CPU_SHAPES if given else ((CPU_BATCH, 1),)
        allow_compression = allow_compression and given
    t0 = time.perf_counter()
    p = plan(config, profile.profile, prompt_len=prompt_len, gen_len=gen_len, gpu_budget=gpu_budget,
             cpu_budget=cpu_budget, disk_budget=disk_budget, dtype_bytes=dtype_bytes,
             allow_compression=allow_compression, candidates=shapes)
    return PlanReport(config=config, plan=p, profile=profile, device=device, prompt_len=prompt_len, gen_len=gen_len,
                      rows=rows, gpu_budget=gpu_budget, cpu_budget=cpu_budget, disk_budget=disk_budget,
                      dtype_bytes=dtype_bytes, notes=tuple(notes), seconds=time.perf_counter() - t0)


def _default_budgets(device: str, choice: ProfileChoice) -> tuple[int, int, str]:
    host = host_memory()
    if device == "cpu":
        share = int(host * HOST_SHARE)
        return share, share, f"{HOST_SHARE:.0%} of this machine's {host / GIB:.0f} GiB (the GPU tier is the CPU)"
    if cuda_name() is not None:
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return total, int(host * HOST_SHARE), (f"this GPU's {total / GIB:.0f} GiB and {HOST_SHARE:.0%} of "
                                               f"this machine's {host / GIB:.0f} GiB")
    prof = choice.profile
    return prof.gpu_memory_bytes, int(prof.cpu_memory_bytes * HOST_SHARE), (
        f"the memory of the profile's machine ({prof.gpu_memory_bytes / GIB:.0f} GiB GPU, "
        f"{HOST_SHARE:.0%} of {prof.cpu_memory_bytes / GIB:.0f} GiB CPU)")


def run_device(device: str | None) -> str:
    """Where the engine's GPU tier will be on this machine: as asked, else cuda when there is one."""
    if device in ("cpu", "cuda"):
        return device
    return "cuda" if cuda_name() is not None else "cpu"


def planning_device(device: str | None, choice: ProfileChoice) -> str:
    """``cpu`` or ``cuda`` for a plan: as asked; else this machine's GPU; else the profile's kind."""
    if device in ("cpu", "cuda"):
        return device
    if cuda_name() is not None:
        return "cuda"
    return "cpu" if choice.cpu else "cuda"


def evaluate(config, policy, *, profile: ProfileChoice, device: str, prompt_len: int, gen_len: int,
             dtype_bytes: int = 2, gpu_budget: int | None = None, cpu_budget: int | None = None,
             notes: tuple[str, ...] = ()) -> PlanReport:
    """The report of a given policy (cost and memory models only; no optimizer, no budget check)."""
    from corpusgen.planner.cost_model import block_time
    from corpusgen.planner.memory import memory_per_tier, realise
    from corpusgen.planner.optimizer import Plan

    r = realise(policy, config)
    bt = block_time(config, policy, profile.profile, prompt_len, gen_len, dtype_bytes, placement=r)
    p = Plan(policy=policy, throughput=bt.throughput, breakdown=bt, placement=r,
             memory=memory_per_tier(config, policy, prompt_len, gen_len, dtype_bytes),
             no_offload=len(r.weights_gpu) == r.num_layers and len(r.kv_gpu) == r.num_layers and r.activations_on_gpu,
             lps_solved=0, evaluated=1)
    return PlanReport(config=config, plan=p, profile=profile, device=device, prompt_len=prompt_len, gen_len=gen_len,
                      rows=None, gpu_budget=gpu_budget, cpu_budget=cpu_budget, disk_budget=None,
                      dtype_bytes=dtype_bytes, notes=notes)


@dataclass(frozen=True, kw_only=True)
class JobWorkload:
    """A job's workload as planned for."""

    prompt_len: int
    """Prompt tokens per row."""
    gen_len: int
    """Generated tokens per row (max_new_tokens)."""
    rows: int | None
    """Rows of the input, when cheap to know."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """How each figure was decided."""


def job_workload(spec, *, prompt_len: int | None = None, gen_len: int | None = None, rows: int | None = None,
                 count_rows: bool = True, estimate_with=None, max_context: int | None = None,
                 limit: int | None = None) -> JobWorkload:
    """prompt_len (given, estimated with the tokenizer ``estimate_with``, or the default), gen_len
    and rows (given, or with ``count_rows`` the input's row count when its metadata says it)."""
    notes = []
    if gen_len is not None:
        notes.append(f"gen_len {gen_len}: given")
    else:
        gen_len = spec.generation.max_new_tokens
        notes.append(f"gen_len {gen_len}: the job's generation.max_new_tokens")
    if prompt_len is not None:
        notes.append(f"prompt_len {prompt_len}: given")
    else:
        est = None
        if estimate_with is not None and max_context is not None:
            est = estimate_prompt_len(spec, estimate_with, max_context=max_context, limit=limit)
        if est is not None:
            prompt_len = est
            notes.append(f"prompt_len {est}: the longest of the first {PROMPT_SAMPLE_ROWS} prompts, rounded up to 64")
        else:
            prompt_len = DEFAULT_PROMPT_LEN
            if max_context is not None:  # a short-context model: what its context leaves
                prompt_len = max(1, min(prompt_len, max_context - gen_len))
            notes.append(f"prompt_len {prompt_len}: the default (--prompt-len sets it)")
    if rows is not None:
        notes.append(f"rows {rows}: given")
    elif count_rows:
        rows = _input_rows(spec)
        notes.append(f"rows {rows}: the input's row count" if rows is not None
                     else "rows unknown: --rows N gives the ETA")
    return JobWorkload(prompt_len=prompt_len, gen_len=gen_len, rows=rows, notes=tuple(notes))


def _input_rows(spec) -> int | None:
    """The input's row count when its metadata says it (Parquet footer, DuckDB table), else None."""
    from corpusgen.errors import CorpusgenError

    if spec.input.path is None:
        return None
    try:
        from corpusgen.job.readers import open_input

        return open_input(spec.input).total_rows
    except CorpusgenError:
        return None


def plan_job(spec, *, prompt_len: int | None = None, gen_len: int | None = None, rows: int | None = None,
             profile: str | None = None,
             gpu_budget: int | None = None, cpu_budget: int | None = None, offload_dir: str | None = None,
             allow_compression: bool = True, device: str | None = None) -> PlanReport:
    """``corpusgen plan JOB.yaml``: what ``run`` would do on this machine (its device, the job's
    model, budgets and lengths), each overridable."""
    from corpusgen.engine.weights import load_config

    e = spec.engine
    config = load_config(spec.model)
    dev = run_device(device or e.device)
    choice = resolve_profile(profile, dev)
    wl = job_workload(spec, prompt_len=prompt_len, gen_len=gen_len, rows=rows)
    return plan_model(config, profile=choice, device=dev, prompt_len=wl.prompt_len, gen_len=wl.gen_len,
                      gpu_budget=gpu_budget if gpu_budget is not None else e.gpu_memory,
                      cpu_budget=cpu_budget if cpu_budget is not None else e.cpu_memory,
                      disk_budget=disk_free(offload_dir or e.offload_dir), dtype_bytes=dtype_bytes_for(dev, e.dtype),
                      allow_compression=allow_compression and e.compress != "none", rows=wl.rows,
                      notes=(choice.note, *wl.notes))


def plan_run(spec, *, dummy: bool, rows: int | None = None, limit: int | None = None) -> PlanReport:
    """``engine.policy: auto`` for a run on this machine: the job's budgets, this machine's
    profile, the prompt length estimated from the first rows with the model's tokenizer (loaded
    once: the engine reuses it)."""
    from corpusgen.engine.weights import load_config, resolve_source

    e = spec.engine
    config = load_config(spec.model)
    dev = run_device(e.device)
    choice = resolve_profile(None, dev)
    tokenizer = None
    if dummy:
        from corpusgen.engine.load import IdTokenizer

        tokenizer = IdTokenizer(config.vocab_size)
    elif resolve_source(spec.model) is not None:
        from corpusgen.engine.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(spec.model)
        except ModelError:
            tokenizer = None  # the engine reports it when it loads the model
    wl = job_workload(spec, count_rows=False, estimate_with=tokenizer, max_context=config.max_positions, limit=limit)
    return plan_model(config, profile=choice, device=dev, prompt_len=wl.prompt_len, gen_len=wl.gen_len,
                      gpu_budget=e.gpu_memory, cpu_budget=e.cpu_memory, disk_budget=disk_free(e.offload_dir),
                      dtype_bytes=dtype_bytes_for(dev, e.dtype), allow_compression=e.compress != "none",
                      rows=rows, notes=(choice.note, *wl.notes))

