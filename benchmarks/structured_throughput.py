"""Throughput with and without constrained decoding, on the default model (docs/structured.md).

    python benchmarks/structured_throughput.py engine --rows 16 --max-new-tokens 24 --repeats 2
    python benchmarks/structured_throughput.py cli --limit 12 --repeats 2
    python benchmarks/structured_throughput.py engine --model DIR --dummy --tokenizer DIR --device cuda \
        --rows 128 --gpu-batch 64 --num-batches 2 --max-new-tokens 32      # the GPU: masks overlap decode

``engine``: one process, one loaded model; the same prompts (jobs/extract.yaml over the first
``--rows`` rows of jobs/sample/docs.parquet) generated with the job's schema hook and without it,
alternately. With ``--max-new-tokens`` below the shortest answer (24: the answers take 34–66
tokens) every row runs every step in both variants, so the two do exactly the same model work and
the difference is the constraint's cost alone. Also prints the mask worker's figures
(corpusgen.job.structured.MaskStats). Rows beyond the 50 sample documents repeat them under new keys.
With ``--dummy`` (random weights of ``--model``'s shape, whose EOS the engine ignores) every
answer is cut at its first EOS token and validated: the masks were applied correctly on the device.

With ``--threads 1`` the model and the inline masks run on the main thread alone, and its CPU time
(``main_thread_cpu_s``) measures the work whatever else loads the machine.

``cli``: ``corpusgen run`` end to end, back to back, with jobs/extract.yaml and with the same job
without ``output.schema`` (same rows via ``--limit``, same max_new_tokens 96). Answers differ in
length between the variants (rows end at their own EOS), so tokens/s also moves with how many rows
are still active; the ``engine`` mode is the controlled measurement.

Each mode prints one JSON line per run and a summary line with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
JOB = REPO / "jobs" / "extract.yaml"
DOCS = REPO / "jobs" / "sample" / "docs.parquet"


def engine_mode(rows: int, max_new_tokens: int, repeats: int, model: str | None = None, dummy: bool = False,
                tokenizer: str | None = None, device: str | None = None, gpu_batch: int = 32, num_batches: int = 1,
                variants: tuple[str, ...] = ("schema", "none")) -> None:
    import dataclasses

    import jsonschema

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.engine.tokenizer import load_tokenizer
    from corpusgen.planner.policy import Policy
    from corpusgen.job.prompts import PromptBuilder
    from corpusgen.job.readers import batch_records, open_input
    from corpusgen.job.spec import load_spec, with_overrides
    from corpusgen.job.structured import Grammar, compile_constraint

    spec = with_overrides(load_spec(JOB), input=str(DOCS))
    engine = open_engine(model or spec.model, dummy=dummy, device=device, tokenizer=load_tokenizer(tokenizer) if tokenizer else None,
                         policy=Policy(gpu_batch_size=gpu_batch, num_gpu_batches=num_batches))
    builder = PromptBuilder(spec.prompt, engine.tokenizer, max_context=engine.max_context,
                            max_new_tokens=max_new_tokens)
    reader = open_input(spec.input, columns=["title", "text"], limit=rows)
    reader.select(["title", "text"])
    prompts = [builder.build(k, r) for b in reader.batches() for k, r in zip(b.keys, batch_records(b))]
    prompts = [p for p in prompts if p.ids is not None]  # the sample has rows meant to fail (a null text)
    requests = [Request(key=f"{p.key}#{i // len(prompts)}", prompt_ids=p.ids)
                for i, p in zip(range(rows), prompts * (rows // len(prompts) + 1))]
    sampling = SamplingSettings(max_new_tokens=max_new_tokens)
    eos = engine.tokenizer.eos_token_ids
    grammars = {"schema": Grammar(compile_constraint(spec.output.schema), engine.tokenizer, eos_ids=eos),
                "schema-overlap": Grammar(compile_constraint(spec.output.schema), engine.tokenizer, eos_ids=eos, overlap=True),
                "schema-inline": Grammar(compile_constraint(spec.output.schema), engine.tokenizer, eos_ids=eos, overlap=False)}
    grammar = grammars["schema"]
    list(engine.generate(requests[:4], SamplingSettings(max_new_tokens=4), logits_hook=grammar.hook(4)))  # warm-up
    runs: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(repeats):
        for variant in variants:
            grammar = grammars.get(variant, grammar)
            before = dataclasses.replace(engine.stats)
            stats0 = dataclasses.replace(grammar.stats)
            t, cpu = time.perf_counter(), time.thread_time()
            hook = grammar.hook(max_new_tokens) if variant != "none" else None
            results = list(engine.generate(requests, sampling, logits_hook=hook))
            wall, cpu = time.perf_counter() - t, time.thread_time() - cpu
            s = engine.stats
            tokens = s.generated_tokens - before.generated_tokens
            secs = (s.prefill_seconds - before.prefill_seconds) + (s.decode_seconds - before.decode_seconds)
            g = grammar.stats
            runs[variant].append(tokens / secs)
            cpus[variant].append(cpu)
            valid = None
            if variant != "none" and dummy:  # the engine ignores EOS with dummy weights: cut there, validate
                valid = 0
                for r in results:
                    ids = r.token_ids[:r.token_ids.index(eos)] if (eos := engine.tokenizer.eos_token_ids[0]) in r.token_ids else None
                    if ids is not None:
                        jsonschema.validate(json.loads(engine.tokenizer.decode(ids)), spec.output.schema)
                        valid += 1
            print(json.dumps({
                "variant": variant, "repeat": i, "rows": len(results), "tokens": tokens, "tokens_per_s": round(tokens / secs, 3),
                "prefill_s": round(s.prefill_seconds - before.prefill_seconds, 2),
                "decode_s": round(s.decode_seconds - before.decode_seconds, 2), "wall_s": round(wall, 2),
                "main_thread_cpu_s": round(cpu, 2), "finish": sorted({r.finish_reason for r in results}), "device": str(engine.device),
                **({"ended_and_valid": valid} if valid is not None else {}),
                **({"mask_worker_s": round(g.worker_s - stats0.worker_s, 3), "mask_wait_s": round(g.wait_s - stats0.wait_s, 3),
                    "mask_apply_s": round(g.apply_s - stats0.apply_s, 3), "masked_rows": g.rows - stats0.rows}
                   if variant != "none" else {}),
            }), flush=True)
    if dummy:  # random weights rarely close extract.yaml's strings: check the device path on classify.yaml's
        schema = load_spec(REPO / "jobs" / "classify.yaml").output.schema
        tight = {**schema, "x-guidance": {"whitespace_flexible": False}}  # random weights love whitespace
        check = Grammar(compile_constraint(tight), engine.tokenizer, eos_ids=engine.tokenizer.eos_token_ids)
        eos, ok = engine.tokenizer.eos_token_ids[0], 0
        for r in engine.generate(requests, SamplingSettings(max_new_tokens=24), logits_hook=check.hook(24)):
            assert eos in r.token_ids, ("no EOS within 24 tokens", r.text)
            jsonschema.validate(json.loads(engine.tokenizer.decode(r.token_ids[:r.token_ids.index(eos)])), schema)
            ok += 1
        print(json.dumps({"device_check": "classify.yaml", "rows": len(requests), "ended_and_valid": ok}))
    _summary(runs, mode="engine", rows=rows, max_new_tokens=max_new_tokens, threads=_threads(), model=engine.config.name,
             dummy=dummy, policy=f"{gpu_batch}x{num_batches}",
             **{f"main_thread_cpu_s_{k}": round(statistics.median(v), 2) for k, v in cpus.items()})


def cli_mode(limit: int, repeats: int) -> None:
    job = yaml.safe_load(JOB.read_text())
    job["input"]["path"] = str(DOCS)
    tmp = Path(tempfile.mkdtemp(prefix="cg-structured-bench-"))
    files = {"schema": tmp / "extract.yaml", "none": tmp / "extract-noschema.yaml"}
    files["schema"].write_text(yaml.safe_dump(job, sort_keys=False))
    files["none"].write_text(yaml.safe_dump({**job, "output": {}}, sort_keys=False))
    runs: dict[str, list[float]] = {"schema": [], "none": []}
    for i in range(repeats):
        for variant in ("schema", "none"):
            out = tmp / f"out-{variant}-{i}"
            cmd = [sys.executable, "-m", "corpusgen", "run", str(files[variant]), "--input", str(DOCS),
                   "--output", str(out), "--limit", str(limit)]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
            wall = time.perf_counter() - t
            from corpusgen.job.reading import connect_sql

            con = connect_sql(out)
            run = con.execute("SELECT rows, gen_tokens, seconds, engine_seconds, load_seconds FROM runs").fetchall()[0]
            statuses = dict(con.execute("SELECT status, count(*) FROM outputs GROUP BY 1").fetchall())
            rows_, tokens, seconds, engine_s, load_s = run
            runs[variant].append(tokens / engine_s)
            print(json.dumps({"variant": variant, "repeat": i, "rows": rows_, "tokens": tokens,
                              "tokens_per_s": round(tokens / engine_s, 3), "engine_s": round(engine_s, 1),
                              "seconds": round(seconds, 1), "load_s": round(load_s, 1), "wall_s": round(wall, 1),
                              "statuses": statuses, "command": " ".join(cmd[1:])}), flush=True)
    _summary(runs, mode="cli", limit=limit, threads=_threads())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _summary(runs: dict[str, list[float]], **extra) -> None:
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"summary": True, **extra, **{f"tokens_per_s_{k}": round(v, 3) for k, v in med.items()},
                      **{f"{k}_vs_none": round(v / med["none"] - 1, 4) for k, v in med.items() if k != "none"},
                      "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--rows", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=24)
    e.add_argument("--repeats", type=int, default=2)
    e.add_argument("--model", help="default: the job's model")
    e.add_argument("--dummy", action="store_true", help="random weights of --model's shape")
    e.add_argument("--tokenizer", help="an HF tokenizer directory (with --dummy)")
    e.add_argument("--device", choices=["cpu", "cuda"])
    e.add_argument("--gpu-batch", type=int, default=32)
    e.add_argument("--num-batches", type=int, default=1)
    e.add_argument("--threads", type=int, help="torch threads (1: all the work on this thread, so its CPU "
                   "time, main_thread_cpu_s, is the work done whatever else loads the machine)")
    e.add_argument("--variants", default="schema,none",
                   help="comma list of schema (auto overlap), schema-overlap, schema-inline, none")
    c = sub.add_parser("cli")
    c.add_argument("--limit", type=int, default=12)
    c.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.mode == "engine":
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        engine_mode(a.rows, a.max_new_tokens, a.repeats, a.model, a.dummy, a.tokenizer, a.device, a.gpu_batch, a.num_batches,
                    tuple(a.variants.split(",")))
    else:
        cli_mode(a.limit, a.repeats)


if __name__ == "__main__":
    main()
