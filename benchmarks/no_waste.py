"""Rows/s on a corpus of varied lengths with each "no wasted tokens" mechanism switched on in turn.

    python benchmarks/no_waste.py [--rows 96] [--max-new-tokens 96] [--device cpu] [--model smollm2-135m-instruct]

Prompts are the summarisation prompt of jobs/summarize.yaml over benchmarks/data/varied.parquet
(made by benchmarks/make_varied_corpus.py when missing), in the model's chat template, cut to
--max-prompt tokens. With --job FILE the prompt, stop strings and output schema (constrained
decoding) are that job's, as `corpusgen run` uses them; only max_new_tokens is --max-new-tokens.
Configurations, each on the same rows in one process:

  plain       FlexGen's way: rows in input order, fixed blocks, every row waits for the block's longest,
              every row computes its whole prompt
  +bucket     rows sorted by prompt length within windows of 8 blocks (little padding per block)
  +refill     + early exit and refill: finished rows leave, partly finished batches merge, waiting
              rows join mid-block
  +prefix     + the shared prompt prefix (chat template, system message, instructions) computed once

With --repeat N the configurations run N times, interleaved; the best time of each is reported
(every run is listed under runs_s). Greedy outputs of every configuration are compared with `plain`: identical in fp32 (the tests
prove it); in bf16 a row's batch neighbours change its rounding, so a few rows may differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-prompt", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-gpu-batches", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--job", default=None, help="a job spec: its prompt, stop strings and schema")
    ap.add_argument("--only", default="plain,+bucket,+refill,+prefix")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (best reported)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy

    if args.threads:
        torch.set_num_threads(args.threads)
    data = ROOT / "benchmarks" / "data" / "varied.parquet"
    if not data.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_varied_corpus.py"), str(data)], check=True)
    rows = pq.read_table(data).slice(0, args.rows).to_pylist()
    results = {}
    base_policy = Policy(gpu_batch_size=args.batch, num_gpu_batches=args.num_gpu_batches)
    eng = open_engine(args.model, device=args.device, dtype=args.dtype, policy=base_policy)
    tok = eng.tokenizer
    s = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    render, grammar = None, None
    if args.job:
        from dataclasses import replace

        from corpusgen.job.answers import answer_format, bind_grammar
        from corpusgen.job.prompts import PromptBuilder
        from corpusgen.job.spec import load_spec

        spec = load_spec(args.job)
        builder = PromptBuilder(spec.prompt, tok, max_context=eng.max_context, max_new_tokens=args.max_new_tokens)
        render = lambda r, text: builder.build(r["id"], {**r, "text": text}).ids  # noqa: E731
        s = replace(spec.generation.sampling(), max_new_tokens=args.max_new_tokens)
        grammar = bind_grammar(answer_format(spec)[0], eng, print)
    reqs = []
    for r in rows:
        ids = tok.encode(r["text"], add_special_tokens=False)[: args.max_prompt]
        text = tok.decode(ids)
        if render is not None:
            prompt = render(r, text)
        else:
            prompt = tok.chat_prompt("You summarise documents in exactly one short sentence.",  # jobs/summarize.yaml
                                     f"Summarise this document in one sentence.\n\nTitle: {r['title']}\n\n{text}")
        reqs.append(Request(key=r["id"], prompt_ids=prompt))
    window = args.batch * args.num_gpu_batches * 8
    bucketed = [q for i in range(0, len(reqs), window) for q in sorted(reqs[i:i + window], key=lambda q: len(q.prompt_ids))]
    configs = {  # rows in order, refill, shared prefix
        "plain": (reqs, False, False),
        "+bucket": (bucketed, False, False),
        "+refill": (bucketed, True, False),
        "+prefix": (bucketed, True, True),
    }
    outputs = {}
    seconds: dict[str, list[float]] = {}
    for rep in range(args.repeat):  # configurations interleaved, so drifts of the machine hit all alike
        for name in args.only.split(","):
            order, refill, prefix = configs[name]
            pol = base_policy.replace(refill=refill, shared_prefix=prefix)
            eng.policy = pol
            eng.block.policy = pol
            eng.block.stats.__init__()
            t0 = time.perf_counter()
            hook = grammar.hook(s.max_new_tokens) if grammar is not None else None
            out = {r.key: r.token_ids for r in eng.generate(order, s, logits_hook=hook)}
            seconds.setdefault(name, []).append(time.perf_counter() - t0)
            outputs.setdefault(name, out)
            dt = min(seconds[name])
            gen = sum(len(v) for v in out.values())
            st = eng.stats
            results[name] = {"rows_per_s": round(len(out) / dt, 3), "gen_tokens_per_s": round(gen / dt, 2),
                             "seconds": round(dt, 2), "runs_s": [round(x, 2) for x in seconds[name]], "gen_tokens": gen,
                             "x_plain": round(min(seconds.get("plain", [dt])) / dt, 2),
                             "identical_to_plain": out == outputs.get("plain", out),
                             "rows_identical_to_plain": sum(out[k] == outputs.get("plain", out).get(k) for k in out),
                             "prefix_computes": st.prefix_computes, "prefix_reused_tokens": st.prefix_reused_tokens,
                             "batch_merges": st.batch_merges, "top_ups": st.top_ups, "kv_grows": st.kv_grows,
                             "prefill_s": round(st.prefill_seconds, 2), "decode_s": round(st.decode_seconds, 2)}
            print(name, json.dumps(results[name]), flush=True)
    lens = sorted(len(v) for v in outputs[next(iter(outputs))].values())
    print(json.dumps({"job": args.job, "stop": list(s.stop), "schema": grammar is not None,
                      "rows": len(reqs), "device": str(eng.device), "dtype": str(eng.dtype),
                      "prompt_tokens_median": sorted(len(q.prompt_ids) for q in reqs)[len(reqs) // 2],
                      "answer_tokens_median": lens[len(lens) // 2], "answer_tokens_mean": round(sum(lens) / len(lens), 1),
                      "answer_tokens_max": lens[-1],
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
