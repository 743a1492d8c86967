"""The hardware-facing commands: ``profile`` (measure this machine), ``plan`` (choose a policy
for a model and budgets) and ``bench`` (FlexGen's workload, timed end to end). Registered on the
``corpusgen`` group by ``corpusgen.cli``; same rules: one library call each, one-line errors,
heavy imports inside the commands."""

from __future__ import annotations

from typing import Any, Callable

import click

from corpusgen.cli import _console, _num, cli, translate_errors
from corpusgen.errors import CorpusgenError


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Parse a size option (16GiB, 512MB, bytes) into bytes."""
    if value is None:
        return None
    from corpusgen.errors import JobSpecError
    from corpusgen.job.spec import parse_size

    try:
        return parse_size(value, param.opts[0])
    except JobSpecError as e:
        raise click.BadParameter(str(e)) from None


def budget_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--gpu-mem/--cpu-mem: memory budgets of the GPU and (pinned) CPU tiers."""
    for option in reversed([
        click.option("--gpu-mem", "gpu_mem", metavar="SIZE", callback=_size,
                     help="GPU memory budget, like 16GiB (default: what the device has)."),
        click.option("--cpu-mem", "cpu_mem", metavar="SIZE", callback=_size,
                     help="CPU memory budget, like 100GiB (default: 90% of the host's)."),
    ]):
        fn = option(fn)
    return fn


def workload_options(prompt_len: int | str, gen_len: int | str) -> Callable[..., Any]:
    """--prompt-len/--gen-len: tokens per row in and out; a default given as text is decided later."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name, default, what in (("--gen-len", gen_len, "Generated"), ("--prompt-len", prompt_len, "Prompt")):
            fn = click.option(name, type=click.IntRange(min=1), metavar="N",
                              default=default if isinstance(default, int) else None,
                              help=f"{what} tokens per row (default: {default}).")(fn)
        return fn
    return decorate


profile_option = click.option(
    "--profile", metavar="FILE|h200|h100",
    help="Hardware profile YAML, or a built-in one (default: this machine's saved profile, else a built-in).")


@cli.command()
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="What to measure; cpu measures the CPU as the engine's GPU tier.")
@click.option("--out", metavar="PATH", help="Profile YAML to write (default policies/hardware-<gpu or host>.yaml).")
@click.option("--offload-dir", metavar="DIR", help="Directory whose disk is measured (default: the temp dir).")
@click.option("--remeasure", is_flag=True, help="Measure again even when the profile file exists.")
@click.option("--quick", is_flag=True, help="Small transfers: seconds instead of tens of seconds, noisier figures.")
@translate_errors
def profile(device: str, out: str | None, offload_dir: str | None, remeasure: bool, quick: bool) -> None:
    """Measure this machine (link bandwidths, disk, matmul and attention rates) for the planner."""
    from rich.table import Table

    from corpusgen.planner.profiles import measure_profile

    console = _console()
    prof, path, reused = measure_profile(device, out=out, offload_dir=offload_dir, remeasure=remeasure, quick=quick)
    tier = " (the GPU tier is the CPU)" if prof.device_name.startswith("cpu-") else ""
    t = Table("figure", "value", title=f"{prof.device_name}{tier}, measured {prof.measured}")
    rows = [
        ("host→GPU pinned / pageable", f"{prof.h2d_pinned_gbps:g} / {prof.h2d_pageable_gbps:g} GB/s"),
        ("GPU→host pinned / pageable", f"{prof.d2h_pinned_gbps:g} / {prof.d2h_pageable_gbps:g} GB/s"),
        ("disk read / write", f"{prof.disk_read_gbps:g} / {prof.disk_write_gbps:g} GB/s"),
        *((f"GPU matmul m={p.m} ({p.k}×{p.n})", f"{p.tflops:g} TFLOP/s") for p in prof.gpu_matmul),
        ("GPU prefill attention", f"{prof.gpu_attention_tflops:g} TFLOP/s"),
        ("GPU decode attention", f"{prof.gpu_attention_gbps:g} GB/s of KV"),
        ("GPU 4-bit dequantisation", f"{prof.gpu_dequant_gbps:g} GB/s"),
        ("CPU matmul", f"{prof.cpu_matmul_tflops:g} TFLOP/s"),
        ("CPU decode attention", f"{prof.cpu_attention_gbps:g} GB/s of KV"),
        ("CPU 4-bit dequantisation", f"{prof.cpu_dequant_gbps:g} GB/s"),
        ("GPU / CPU memory", f"{prof.gpu_memory_bytes / 2**30:.1f} / {prof.cpu_memory_bytes / 2**30:.1f} GiB"),
    ]
    for name, value in rows:
        t.add_row(name, value)
    console.print(t)
    if reused:
        console.print(f"reused {path} (measured {prof.measured}); --remeasure measures again")
    else:
        console.print(f"saved {path}; `corpusgen plan` and `run --policy auto` use it")


@cli.command()
@click.argument("job", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "-m", metavar="M",
              help="Model to plan for (preset, HF directory or .gguf) instead of a JOB.yaml.")
@click.option("--dummy", is_flag=True, help="The model will run with random weights (a preset needs it to run).")
@budget_options
@click.option("--disk", metavar="DIR", help="Offload directory; its free space bounds the disk tier "
                                            "(default: engine.offload_dir, else the temp dir).")
@workload_options("512", "the job's max_new_tokens, 32 with --model")
@click.option("--rows", type=click.IntRange(min=1), metavar="N", help="Rows of the job, for the ETA.")
@profile_option
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]),
              help="Plan for a GPU, or for a CPU-only machine (the GPU tier is the CPU).")
@click.option("--no-compression", is_flag=True, help="Do not consider 4-bit weights or KV cache.")
@click.option("--output", "-o", metavar="FILE", help="Write the policy YAML here (for run/bench --policy FILE).")
@translate_errors
def plan(job: str | None, model: str | None, dummy: bool, gpu_mem: int | None, cpu_mem: int | None,
         disk: str | None, prompt_len: int | None, gen_len: int | None, rows: int | None, profile: str | None,
         device: str | None, no_compression: bool, output: str | None) -> None:
    """Choose a policy for JOB.yaml (or --model) within the memory budgets; predict throughput and ETA."""
    from corpusgen.planner.budgets import disk_free
    from corpusgen.planner.plan import DEFAULT_PROMPT_LEN, dtype_bytes_for, plan_job, plan_model, planning_device
    from corpusgen.planner.profiles import resolve_profile

    if (job is None) == (model is None):
        raise click.UsageError("give JOB.yaml or --model M (one of them)")
    if job is not None:
        from corpusgen.job.spec import load_spec

        report = plan_job(load_spec(job), prompt_len=prompt_len, gen_len=gen_len, rows=rows, profile=profile,
                          gpu_budget=gpu_mem, cpu_budget=cpu_mem, offload_dir=disk,
                          allow_compression=not no_compression, device=device)
    else:
        from corpusgen.engine.weights import load_config, resolve_source

        config = load_config(model)
        choice = resolve_profile(profile, device or "auto")
        dev = planning_device(device, choice)
        notes = [choice.note]
        if prompt_len is None:
            notes.append(f"prompt_len {DEFAULT_PROMPT_LEN}: the default (--prompt-len sets it)")
        if resolve_source(model) is None and not dummy:
            notes.append(f"{model} is a preset (shapes, no weights): run it with --dummy")
        report = plan_model(config, profile=choice, device=dev, prompt_len=prompt_len or DEFAULT_PROMPT_LEN,
                            gen_len=gen_len or 32, gpu_budget=gpu_mem, cpu_budget=cpu_mem, disk_budget=disk_free(disk),
                            dtype_bytes=dtype_bytes_for(dev), allow_compression=not no_compression, rows=rows,
                            notes=tuple(notes))
    console = _console()
    _render_plan(console, report)
    if output:
        from corpusgen.planner.policy import dump_policy

        dump_policy(report.policy, output, comment=report.header())
        console.print(f"wrote {output}; use it with: corpusgen run JOB.yaml --policy {output}")
    else:
        import yaml

        console.print("policy (-o FILE writes it):")
        text = yaml.safe_dump(report.policy.to_dict(), sort_keys=False, default_flow_style=None, width=1000)
        console.print(text.rstrip(), highlight=False)


def _render_plan(console: Any, report: Any) -> None:
    """The plan as people read it: inputs, policy, predicted throughput, memory per tier, ETA."""
    from rich.table import Table

    from corpusgen.cli.progress import fmt_seconds

    p, pol, r = report.plan, report.policy, report.plan.placement
    n = r.num_layers
    where = "a CPU-only machine (the GPU tier is the CPU)" if report.device == "cpu" else "a GPU"
    console.print(f"[bold]plan for {report.config.name}[/] ({n} layers) on {where}, profile {report.profile.source}",
                  highlight=False)
    for note in report.notes:
        console.print(f"  {note}", highlight=False)
    what = "no offload: everything fits in the GPU tier" if p.no_offload else "offloaded"
    comp = [f"{k} {c.bits}-bit/group {c.group_size}" for k, c in (("weights", pol.compress_weights),
                                                                   ("KV", pol.compress_kv)) if c]
    console.print(f"policy: blocks of {pol.gpu_batch_size} × {pol.num_gpu_batches} = {pol.block_size} rows, {what}; "
                  f"cpu_attention {'on' if pol.cpu_attention else 'off'}; "
                  f"compression {', '.join(comp) or 'none'}", highlight=False)
    t = Table("placement", "gpu", "cpu", "disk")
    for kind, key in (("weights", "weights"), ("kv_cache", "kv")):
        cells = [f"{r.fraction(key, tier):.4g} ({len(getattr(r, f'{key}_{tier}'))}/{n})"
                 if hasattr(r, f"{key}_{tier}") else "-" for tier in ("gpu", "cpu", "disk")]
        t.add_row(kind, *cells)
    t.add_row("activations", *(("1", "0") if r.activations_on_gpu else ("0", "1")), "-")
    console.print(t)
    bt = p.breakdown
    t = Table("phase", "s per block", "predicted tok/s", "bound by")
    t.add_row("prefill", f"{bt.prefill_s:.3g}", f"{report.prefill_tps:,.1f} prompt", bt.prefill.bound)
    dec = report.decode_tps
    t.add_row("decode", f"{bt.decode_s:.3g}", "-" if dec is None else f"{dec:,.1f}",
              bt.decode.bound if bt.decode_s else "-")
    t.add_row("total", f"{bt.prefill_s + bt.decode_s:.3g}", f"{report.throughput:,.1f}", "")
    console.print(t)
    t = Table("tier", "peak GiB", "budget GiB", "largest terms (GiB)")
    for tier, budget in (("gpu", report.gpu_budget), ("cpu", report.cpu_budget), ("disk", report.disk_budget)):
        big = ", ".join(f"{name.split('.', 1)[1]} {b / 2**30:.2f}" for name, b in p.memory.largest(tier))
        t.add_row(tier.upper(), f"{getattr(p.memory, tier) / 2**30:.2f}",
                  "-" if budget is None else f"{budget / 2**30:.2f}", big or "-")
    console.print(t)
    for note in r.notes:
        console.print(f"  rounded: {note}", highlight=False)
    if report.eta_s is not None:
        console.print(f"ETA: {report.rows} rows × {report.gen_len} tokens / {report.throughput:,.1f} tok/s = "
                      f"{fmt_seconds(report.eta_s)}", highlight=False)
    else:
        console.print("ETA: unknown rows (--rows N gives it)")
    if not report.profile.this_machine:
        console.print(f"note: predicted with {report.profile.source}, not a profile of this machine", highlight=False)


@cli.command()
@click.option("--model", "-m", metavar="M", required=True, help="Preset (with --dummy), HF directory or .gguf file.")
@click.option("--dummy/--no-dummy", default=True, show_default=True,
              help="Random weights of the model's shape (no download).")
@workload_options(512, 32)
@click.option("--num-seqs", type=click.IntRange(min=1), metavar="N",
              help="Sequences (default: one block; under torchrun, one block per rank or stage).")
@click.option("--policy", default="auto", show_default=True, metavar="auto|FILE",
              help="Plan with the optimizer, or a policy YAML (a stage's, with --pipeline-stages).")
@budget_options
@click.option("--offload-dir", metavar="DIR", help="Directory of the disk tier (default: a temp dir).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the engine runs.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype.")
@profile_option
@click.option("--pipeline-stages", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Under torchrun with N processes: split the layers into N pipeline stages (1: data parallel).")
@click.option("--results", metavar="FILE", default="benchmarks/results.jsonl", show_default=True,
              help="JSON-lines file the result is appended to.")
@click.option("--label", default="", metavar="TEXT", help="Free text stored with the result.")
@translate_errors
def bench(model: str, dummy: bool, prompt_len: int, gen_len: int, num_seqs: int | None, policy: str,
          gpu_mem: int | None, cpu_mem: int | None, offload_dir: str | None, device: str, dtype: str,
          profile: str | None, pipeline_stages: int, results: str, label: str) -> None:
    """FlexGen's workload (every row generates gen_len tokens), timed end to end; predicted vs measured."""
    from corpusgen.bench import run_bench
    from corpusgen.engine.weights import load_config
    from corpusgen.planner.budgets import disk_free, host_memory
    from corpusgen.planner.plan import HOST_SHARE, dtype_bytes_for, evaluate, plan_model, run_device
    from corpusgen.planner.profiles import resolve_profile
    from corpusgen.planner.policy import load_policy
    from corpusgen.job.ranks import Ranks

    ranks = Ranks.from_env()
    ranks.select_gpu(device)
    config = load_config(model)
    dev = run_device(device)
    console = _console()
    notes = []
    if ranks.world > 1 and cpu_mem is None:  # the ranks of a machine share its memory
        cpu_mem = int(host_memory() * HOST_SHARE / ranks.local_world)
        notes.append(f"CPU budget per rank: {HOST_SHARE:.0%} of this machine's memory / {ranks.local_world} ranks")
    report = None
    if pipeline_stages > 1:
        if policy == "auto":
            raise CorpusgenError("--pipeline-stages needs --policy FILE, a stage's policy (its block is one "
                                 "sub-block, its fractions are of the stage's layers); the planner plans one GPU")
        pol = load_policy(policy)
        choice = resolve_profile(profile, dev)
    else:
        choice = resolve_profile(profile, dev)
        args: dict[str, Any] = {"profile": choice, "device": dev, "prompt_len": prompt_len, "gen_len": gen_len,
                                "dtype_bytes": dtype_bytes_for(dev, dtype), "notes": (choice.note,)}
        if policy == "auto":
            report = plan_model(config, gpu_budget=gpu_mem, cpu_budget=cpu_mem, disk_budget=disk_free(offload_dir),
                                **args)
        else:
            report = evaluate(config, load_policy(policy), gpu_budget=gpu_mem, cpu_budget=cpu_mem, **args)
        pol = report.policy
    if ranks.leader:
        how = "" if ranks.world == 1 else (f" over {ranks.world} ranks, " + (
            f"a pipeline of {pipeline_stages} stages" if pipeline_stages > 1 else "data parallel"))
        console.print(f"[bold]bench {config.name}[/] on {dev}{how}: {num_seqs or ranks.world * pol.block_size} "
                      f"sequences, prompt {prompt_len}, gen {gen_len}, policy {policy} (blocks of "
                      f"{pol.gpu_batch_size} × {pol.num_gpu_batches}); profile {choice.source}", highlight=False)
        for note in notes:
            console.print(f"note: {note}", highlight=False)
    rec = run_bench(model, dummy=dummy, prompt_len=prompt_len, gen_len=gen_len, num_seqs=num_seqs,
                    policy=pol, gpu_memory=gpu_mem, cpu_memory=cpu_mem, offload_dir=offload_dir,
                    device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype,
                    profile=choice.profile, results_file=results if ranks.leader else None, label=label,
                    # recorded only when it means something: a profile of this machine, or one asked for
                    predicted_tps=report.throughput if report and (choice.this_machine or profile) else None,
                    pipeline_stages=pipeline_stages, ranks=ranks)
    if ranks.world == 1:
        _render_bench(console, rec, report)
    elif ranks.leader:
        _render_ranks(console, rec)
    if ranks.leader:
        console.print(f"appended to {results}")


def _render_ranks(console: Any, rec: dict[str, Any]) -> None:
    """Each rank's figures and the aggregate of a torchrun bench, as a table."""
    from rich.table import Table

    t = Table("rank", "rows", "prefill s", "decode s", "generate wall s", "load s", "peak GPU GiB", "peak pinned GiB")
    for r in rec["ranks"]:
        t.add_row(str(r["rank"]), str(r["num_seqs"]), f"{r['prefill_s']:.2f}", f"{r['decode_s']:.2f}",
                  f"{r['generate_wall_s']:.2f}", f"{r['load_s']:.2f}", _num(r["peak_gpu_gib"], 2),
                  _num(r["peak_pinned_gib"], 2))
    console.print(t)
    console.print(f"{rec['mode']} × {rec['world']}: {rec['num_seqs']} rows, total {rec['total_tps']:,.2f} tok/s, "
                  f"wall {rec['wall_tps']:,.2f} tok/s (generate wall {rec['generate_wall_s']:.2f} s)", highlight=False)


def _render_bench(console: Any, rec: dict[str, Any], report: Any) -> None:
    """Measured beside predicted, as a table."""
    from rich.table import Table

    mem = report.plan.memory
    t = Table("figure", "measured", "predicted")
    t.add_row("prefill (prompt tok/s)", _num(rec["prefill_tps"], 1), _num(report.prefill_tps, 1))
    t.add_row("decode (tok/s)", _num(rec["decode_tps"], 1), _num(report.decode_tps, 1))
    t.add_row("total (tok/s)", _num(rec["total_tps"], 2), _num(report.throughput, 2))
    t.add_row("decode step (s)", _num(rec["decode_step_s"], 4), "")
    t.add_row("  link time of its transfers (s)", _num(rec["decode_step_link_s"], 4),
              f"{rec['decode_step_link_bytes'] / 2**30:.2f} GiB moved")
    g = rec.get("decode_graphs")
    if g:  # every unit on the GPU: decode steps replayed from CUDA graphs (engine/decode_graph.py)
        t.add_row("  from CUDA graphs", f"{g['replays']} replays, {g['captures']} captures", "")
    t.add_row("peak GPU (GiB)", _num(rec["peak_gpu_gib"], 2), f"{mem.gpu / 2**30:.2f}")
    t.add_row("peak pinned CPU (GiB)", _num(rec["peak_pinned_gib"], 2), f"{mem.cpu / 2**30:.2f}")
    t.add_row("disk (GiB)", _num(rec["disk_gib"], 2), f"{mem.disk / 2**30:.2f}")
    t.add_row("load / generate wall (s)", f"{rec['load_s']:.2f} / {rec['generate_wall_s']:.2f}", "")
    console.print(t)
    if not report.profile.this_machine:
        console.print(f"note: predictions use {report.profile.source}, not a profile of this machine "
                      "(`corpusgen profile` measures it)", highlight=False)
