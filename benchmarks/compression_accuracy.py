"""What 4-bit weight and KV-cache compression cost in accuracy on the default model, on the CPU.

    python benchmarks/compression_accuracy.py --dtype float32 --threads 2

Six settings of one model (SmolLM2-135M-Instruct, the Q4_1 GGUF the default model ships as):
no compression, 4-bit weights (group 64), 4-bit KV cache (group 64), both, 4-bit weights with
group 32 — the GGUF Q4_1 block size, which reproduces the checkpoint's own 4-bit tensors exactly
(see the docstring of corpusgen/engine/compression.py) — and that with the 4-bit KV cache. More
(KV cache with groups 32 or 16, or 8 bits) with ``--settings``. Every KV setting quantises K and V
rotated (``compress_kv.rotate``, the default); its ``… norot`` twin (e.g. ``"kv4 g64 norot"``)
quantises them as they are, FlexGen's way. For each setting:

1. **Perplexity** on benchmarks/data/heldout.txt (paragraphs written for this benchmark, in no job
   or job corpus), computed *through the engine* by teacher forcing: each paragraph is a row whose
   prompt is its first ``--prefix`` tokens; at every token step the logits hook records
   ``log_softmax(logits)[target]`` and then forces the target (every other logit -inf), so the
   compressed KV cache and weights are used exactly as in generation. After its last target a row
   is forced to EOS and ends. The uncompressed run is checked against one full-sequence pass of
   ``corpusgen.engine.models.reference.reference_logits`` on the same weights.
2. **Greedy agreement** on the sample jobs: the prompts of jobs/extract.yaml, classify.yaml and
   summarize.yaml over the 48 hand-written sample documents (the two edge-case rows are left
   out), each job's template rendered with the row and wrapped by the chat template, greedy, each
   job's stop strings and max_new_tokens (``--max-new-tokens`` caps it). By default plain greedy:
   the jobs' output schemas are not applied. With ``--structured`` the jobs that have an
   ``output.schema`` (extract, classify) decode under it as ``corpusgen run`` does (llguidance
   masks), and their answers are also compared as parsed JSON, whole and per field. Reported
   against the uncompressed outputs: share of rows with identical tokens, and the mean share of
   identical leading tokens (common prefix / the longer of the two outputs; 1 when both are
   empty). ``--skip-ppl`` and ``--skip-jobs`` run one half only.

All settings use the same fixed blocks (``refill: false``, rows sorted by prompt length), so a row
meets the same batch neighbours and padding in every setting and only compression differs.
Prints a table, then one JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "benchmarks" / "data" / "heldout.txt"
JOBS = ("extract", "classify", "summarize")
SETTINGS = {  # name -> (compress_weights, compress_kv) as (bits, group_size[, rotate])
    "none": (None, None),
    "w4 g64": ((4, 64), None),
    "kv4 g64": (None, (4, 64)),
    "w4+kv4 g64": ((4, 64), (4, 64)),
    "w4 g32": ((4, 32), None),
    "w4 g32+kv4 g64": ((4, 32), (4, 64)),
    # Not run by default; diagnostics for the KV cache (--settings none "kv4 g32" ... --skip-jobs).
    "kv4 g32": (None, (4, 32)),
    "kv4 g16": (None, (4, 16)),
    "kv8 g64": (None, (8, 64)),
}
# "<setting> norot": its KV cache quantised without the rotation (compress_kv.rotate: false), the
# plain FlexGen groups; the settings above rotate K/V first, the policy's default.
SETTINGS.update({f"{name} norot": (w, (*kv, False)) for name, (w, kv) in list(SETTINGS.items()) if kv})
DEFAULT_SETTINGS = ("none", "w4 g64", "kv4 g64", "w4+kv4 g64", "w4 g32", "w4 g32+kv4 g64")


class TeacherForcing:
    """Logits hook that scores and then forces a known continuation per row.

    ``targets[key]`` are the tokens that follow the row's prompt. At each step the hook records
    ``log_softmax(logits)[target]`` for every row that still has a target and returns logits in
    which only the target is finite (greedy sampling then picks it); a row past its targets is
    forced to ``end_token`` (an EOS id, so the engine ends it) and scores nothing.
    """

    def __init__(self, targets: dict[str, Sequence[int]], end_token: int):
        self.targets = {k: list(v) for k, v in targets.items()}
        self.end_token = end_token
        self.pos = {k: 0 for k in targets}
        self.logprobs: dict[str, list[float]] = {k: [] for k in targets}
        self._forced: list[int] = []

    def mask(self, keys: Sequence[str], logits: torch.Tensor) -> torch.Tensor:
        """logits (rows, vocab) fp32 -> logits with -inf everywhere but each row's forced token."""
        logp = logits.float().log_softmax(-1)  # (rows, vocab)
        forced = []
        for i, k in enumerate(keys):
            t, p = self.targets[k], self.pos[k]
            if p < len(t):
                self.logprobs[k].append(float(logp[i, t[p]]))
                forced.append(t[p])
            else:
                forced.append(self.end_token)
        idx = torch.tensor(forced, device=logits.device)[:, None]  # (rows, 1)
        out = torch.full_like(logits, float("-inf"))
        self._forced = forced
        return out.scatter_(1, idx, 0.0)

    def advance(self, keys: Sequence[str], next_ids: torch.Tensor) -> None:
        got = next_ids.tolist()
        assert got == self._forced, f"the engine did not take the forced tokens: {got} vs {self._forced}"
        for k in keys:
            self.pos[k] += 1


def nll_stats(logprobs: dict[str, list[float]]) -> dict:
    """Token-weighted perplexity over all rows."""
    flat = [x for v in logprobs.values() for x in v]
    nll = -sum(flat) / len(flat)
    return {"tokens": len(flat), "nll": nll, "ppl": math.exp(nll)}


def engine_logprobs(engine, seqs: dict[str, list[int]], prefix: int, end_token: int) -> dict[str, list[float]]:
    """Teacher-forced log-probs of tokens ``seq[prefix:]`` of every sequence, through ``engine``."""
    from corpusgen.engine.api import Request, SamplingSettings

    hook = TeacherForcing({k: s[prefix:] for k, s in seqs.items()}, end_token)
    reqs = [Request(key=k, prompt_ids=s[:prefix]) for k, s in seqs.items()]
    longest = max(len(s) - prefix for s in seqs.values())
    sampling = SamplingSettings(max_new_tokens=longest + 1, temperature=0.0)  # + 1: the forced EOS step
    results = {r.key: r for r in engine.generate(reqs, sampling, logits_hook=hook)}
    for k, s in seqs.items():
        r = results[k]
        assert r.finish_reason in ("eos", "length") and r.token_ids == s[prefix:], (k, r.finish_reason, r.error)
        assert len(hook.logprobs[k]) == len(s) - prefix, (k, len(hook.logprobs[k]), len(s) - prefix)
    return hook.logprobs


@torch.no_grad()
def reference_logprobs(cfg, units, seqs: dict[str, list[int]], prefix: int) -> dict[str, list[float]]:
    """The same log-probs from one full-sequence pass per sequence (no cache, no schedule)."""
    from corpusgen.engine.models.reference import reference_logits

    out = {}
    for k, s in seqs.items():
        ids = torch.tensor([s])
        logp = reference_logits(cfg, units, ids)[0].float().log_softmax(-1)  # (seq, vocab)
        pred = logp[prefix - 1:-1]  # position i predicts token i + 1
        out[k] = pred.gather(1, ids[0, prefix:, None])[:, 0].tolist()
    return out


def heldout_sequences(tok, path: Path = HELDOUT) -> dict[str, list[int]]:
    paras = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    return {f"p{i:02d}": tok.encode(p, add_special_tokens=False) for i, p in enumerate(paras)}


def job_requests(tok, cap: int | None) -> dict[str, tuple[list, object, dict | None]]:
    """Per job: (requests sorted by prompt length, SamplingSettings, output schema or None)."""
    import jinja2.sandbox
    import pyarrow.parquet as pq
    import yaml

    from corpusgen.engine.api import Request, SamplingSettings

    rows = [r for r in pq.read_table(REPO / "jobs" / "sample" / "docs.parquet").to_pylist()
            if not r["id"].startswith("edge-")]
    env = jinja2.sandbox.SandboxedEnvironment(finalize=lambda v: "" if v is None else v)
    out = {}
    for name in JOBS:
        spec = yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())
        template = env.from_string(spec["prompt"]["template"])
        system = spec["prompt"].get("system")
        reqs = [Request(key=f"{name}:{r['id']}", prompt_ids=tok.chat_prompt(system, template.render(r))) for r in rows]
        reqs.sort(key=lambda r: len(r.prompt_ids))
        gen = spec.get("generation", {})
        out[name] = (reqs, SamplingSettings(max_new_tokens=min(int(gen.get("max_new_tokens", 64)), cap or 1 << 30),
                                            temperature=0.0, stop=tuple(gen.get("stop", ()))),
                     (spec.get("output") or {}).get("schema"))
    return out


def agreement(ref: dict[str, list[int]], got: dict[str, list[int]]) -> dict:
    same, lead = 0, 0.0
    for k, a in ref.items():
        b = got[k]
        same += a == b
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        lead += 1.0 if not a and not b else n / max(len(a), len(b))
    return {"rows": len(ref), "identical": same, "identical_share": same / len(ref), "lead_share": lead / len(ref)}


def answer_agreement(ref: dict[str, str], got: dict[str, str]) -> dict:
    """Rows whose answers parse to the same JSON value (text compared where either does not parse),
    and per top-level field of JSON-object answers the share of rows with the same value."""
    def parse(text):
        try:
            return json.loads(text)
        except ValueError:
            return None

    same, fields = 0, {}
    for k, a in ref.items():
        pa, pb = parse(a), parse(got[k])
        same += (pa == pb) if pa is not None and pb is not None else a == got[k]
        if isinstance(pa, dict):
            for f, v in pa.items():
                fields.setdefault(f, []).append(isinstance(pb, dict) and pb.get(f, object()) == v)
    return {"rows": len(ref), "answers_equal": same, "answers_equal_share": same / len(ref),
            "field_equal_share": {f: sum(v) / len(v) for f, v in fields.items()}}


def weight_roundtrip(units, bits: int, group_size: int, dtype: torch.dtype) -> float:
    """Largest difference, in ``dtype``, between the linear weights the engine would compress and
    their 4-bit round trip (quantised from the values as loaded, as the engine does)."""
    from corpusgen.engine import compression as cq
    from corpusgen.engine.placement import compressible

    worst = 0.0
    for unit, tensors in units.items():
        for name, w in tensors.items():
            if w is not None and compressible(unit, name, w):
                back = cq.dequantize(cq.quantize(w, bits, group_size, axis=-1), dtype=dtype)
                worst = max(worst, (back.float() - w.to(dtype).float()).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="engine dtype")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--prefix", type=int, default=16, help="prompt tokens of each held-out row (not scored)")
    ap.add_argument("--max-new-tokens", type=int, help="cap on the jobs' max_new_tokens (default: no cap)")
    ap.add_argument("--batch", type=int, default=16, help="gpu_batch_size (rows per batch)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(DEFAULT_SETTINGS))
    ap.add_argument("--skip-jobs", action="store_true", help="perplexity only")
    ap.add_argument("--skip-ppl", action="store_true", help="jobs only")
    ap.add_argument("--structured", action="store_true",
                    help="decode the jobs that have an output.schema under it, as `corpusgen run` does")
    ap.add_argument("--save-outputs", type=Path, help="write every row's greedy tokens and text here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    assert args.settings[0] == "none", "the first setting is the baseline and must be 'none'"
    assert not (args.skip_jobs and args.skip_ppl), "nothing to do"

    from corpusgen.engine.load import open_engine
    from corpusgen.engine.tokenizer import load_tokenizer
    from corpusgen.engine.weights import iter_units, load_config, resolve_source
    from corpusgen.planner.policy import Compression, Policy

    tok, cfg = load_tokenizer(args.model), load_config(args.model)
    end_token = tok.eos_token_ids[0]
    seqs = {} if args.skip_ppl else heldout_sequences(tok)
    jobs = {} if args.skip_jobs else job_requests(tok, args.max_new_tokens)
    grammars = {}
    if args.structured:
        from corpusgen.job.structured import Grammar, compile_constraint

        grammars = {job: Grammar(compile_constraint(schema), tok, eos_ids=tok.eos_token_ids)
                    for job, (_, _, schema) in jobs.items() if schema is not None}
    print(f"model {args.model}, dtype {args.dtype}, threads {torch.get_num_threads()}, held-out: {len(seqs)} "
          f"paragraphs, {sum(map(len, seqs.values()))} tokens ({sum(len(s) - args.prefix for s in seqs.values())} "
          f"scored); jobs: " + ", ".join(f"{n} {len(r)} rows ≤{s.max_new_tokens} new{' (schema)' * (n in grammars)}"
                                         for n, (r, s, _) in jobs.items()))

    # The sanity check, and the Q4_1 round trip, on the same dequantised weights the engine loads
    # (GGUF tensors in fp32 when weights are compressed: corpusgen.engine.load.open_engine).
    dt = getattr(torch, args.dtype)
    gguf = resolve_source(args.model).suffix == ".gguf"
    loaded = dict(iter_units(args.model, cfg, dtype=torch.float32 if gguf else dt))
    roundtrip = {g: weight_roundtrip(loaded, 4, g, dt) for g in (32, 64)}
    units = {u: {n: None if t is None else t.to(dt) for n, t in ts.items()} for u, ts in loaded.items()}
    del loaded
    ref, ref_lp = None, {}
    if seqs:
        t0 = time.perf_counter()
        ref_lp = reference_logprobs(cfg, units, seqs, args.prefix)
        ref = nll_stats(ref_lp)
        print(f"reference_logits perplexity {ref['ppl']:.4f} ({time.perf_counter() - t0:.0f} s)")
    print(f"4-bit round trip of the linear weights (in {args.dtype}), max |Δ|: group 32 {roundtrip[32]:.3g}, "
          f"group 64 {roundtrip[64]:.3g}")
    del units

    results: dict[str, dict] = {}
    baseline_lp: dict[str, list[float]] = {}
    baseline_out: dict[str, list[int]] = {}
    baseline_text: dict[str, str] = {}
    texts: dict[str, dict[str, str]] = {name: {} for name in args.settings}
    saved: dict[str, dict[str, list[int]]] = {}
    for name in args.settings:
        w, kv = SETTINGS[name]
        policy = Policy(gpu_batch_size=args.batch, refill=False,
                        compress_weights=Compression(bits=w[0], group_size=w[1]) if w else None,
                        compress_kv=Compression(bits=kv[0], group_size=kv[1], rotate=kv[2:] != (False,))
                        if kv else None)
        eng = open_engine(args.model, device="cpu", dtype=args.dtype, policy=policy, tokenizer=tok)
        res: dict = {}
        if seqs:
            t0 = time.perf_counter()
            lp = engine_logprobs(eng, seqs, args.prefix, end_token)
            res = {**nll_stats(lp), "ppl_seconds": round(time.perf_counter() - t0, 1)}
            if name == "none":
                baseline_lp = lp
                res["ppl_vs_reference_rel"] = abs(res["ppl"] / ref["ppl"] - 1)
                res["max_abs_dlogprob_vs_reference"] = max(abs(a - b) for k in lp for a, b in zip(lp[k], ref_lp[k]))
            res["max_abs_dlogprob_vs_none"] = max(abs(a - b) for k in lp for a, b in zip(lp[k], baseline_lp[k]))
        t0 = time.perf_counter()
        outs: dict[str, list[int]] = {}
        per_job, answers = {}, {}
        for job, (reqs, sampling, _) in jobs.items():
            hook = grammars[job].hook(sampling.max_new_tokens) if job in grammars else None
            done = list(eng.generate(reqs, sampling, logits_hook=hook))
            errors = [(r.key, r.error) for r in done if r.finish_reason == "error"]
            assert not errors, errors  # an empty output would count as agreeing with an empty one
            got = {r.key: r.token_ids for r in done}
            texts[name].update({r.key: r.text for r in done})
            outs.update(got)
            if name == "none":
                baseline_out.update(got)
                baseline_text.update({r.key: r.text for r in done})
            per_job[job] = agreement({k: baseline_out[k] for k in got}, got)
            if job in grammars:
                answers[job] = answer_agreement({k: baseline_text[k] for k in got}, {r.key: r.text for r in done})
        if jobs:
            res["jobs"] = per_job
            res["all_jobs"] = agreement(baseline_out, outs)
            res["jobs_seconds"] = round(time.perf_counter() - t0, 1)
            res["generated_tokens"] = sum(map(len, outs.values()))
            if answers:
                res["answers"] = answers
        eng.close()
        saved[name] = outs
        results[name] = res
        print(f"  {name}:" + (f" ppl {res['ppl']:.4f} ({res['ppl_seconds']} s)" if seqs else "")
              + (f" jobs {res['all_jobs']['identical']}/{res['all_jobs']['rows']} identical ({res['jobs_seconds']} s)"
                 if jobs else ""), flush=True)

    if args.save_outputs:
        args.save_outputs.write_text(json.dumps({"dtype": args.dtype, "structured": args.structured, "settings": {
            n: {k: {"tokens": saved[n][k], "text": texts[n][k]} for k in saved[n]} for n in saved}}, indent=1))
    print()
    print(f"{'setting':<15} " + (f"{'perplexity':>10} {'Δ ppl':>7} {'max|Δlogp|':>10}  " if seqs else "")
          + (f"{'rows identical':>15} {'lead tokens':>11}  " + "  ".join(f"{j:>9}" for j in JOBS) if jobs else "")
          + "".join(f"  {j + ' answers':>17}" for j in grammars))
    for name, r in results.items():
        line = f"{name:<15} "
        if seqs:
            line += (f"{r['ppl']:>10.4f} {100 * (r['ppl'] / results['none']['ppl'] - 1):>+6.2f}% "
                     f"{r['max_abs_dlogprob_vs_none']:>10.2g}  ")
        if jobs:
            a = r["all_jobs"]
            line += (f"{a['identical']:>6}/{a['rows']:<3} {a['identical_share']:>4.0%} {a['lead_share']:>11.1%}  "
                     + "  ".join(f"{r['jobs'][j]['identical']:>5}/{r['jobs'][j]['rows']:<3}" for j in JOBS))
        line += "".join(f"  {r['answers'][j]['answers_equal']:>13}/{r['answers'][j]['rows']:<3}" for j in grammars)
        print(line)
    if seqs:
        print(f"reference_logits (no cache, no schedule): perplexity {ref['ppl']:.4f}; the engine's uncompressed run "
              f"differs by {results['none']['ppl_vs_reference_rel']:.2e} (relative), per-token log-probs by at most "
              f"{results['none']['max_abs_dlogprob_vs_reference']:.2e}")
    print(json.dumps({"benchmark": "compression_accuracy", "model": args.model, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "prefix": args.prefix, "cap": args.max_new_tokens,
                      "structured": args.structured, "date": time.strftime("%Y-%m-%d"),
                      "load_average": os.getloadavg()[0], "reference": ref, "weight_roundtrip_max_abs": roundtrip,
                      "settings": results}))


if __name__ == "__main__":
    main()
