"""One device call: correctness of the engine on CUDA, a hardware profile, and timed benches.

    python benchmarks/gpu_suite.py check            # CUDA == CPU token for token, Triton self-check
    python benchmarks/gpu_suite.py profile          # measure the machine -> $OUT/hardware.yaml
    python benchmarks/gpu_suite.py bench NAME ...   # named configurations below, one subprocess each
    python benchmarks/gpu_suite.py step-gaps [GEN]  # OPT-6.7B x 128: a decode step's GPU busy time vs wall
    python benchmarks/gpu_suite.py prefill-ab [N]   # OPT-6.7B x 128 prefill: last layer for the last column vs all
    python benchmarks/gpu_suite.py decode-steps [N] # OPT-6.7B x 128: decode steps from CUDA graphs vs eager

Every bench runs in its own process (a GPU budget caps the allocator for the whole process) and
appends one JSON line to $OUT/bench.jsonl; a short table is printed last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "out"))
GIB = 2**30


def check() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Compression, Placement, Policy

    from corpusgen.engine.kernels import decode_attention

    print("decode attention self-check:", decode_attention.selfcheck())
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [3], [40, 41, 42], [7, 7, 7, 7]]
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    common = dict(vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=98, pad_token_id=0)
    models = {"llama": LlamaForCausalLM(LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2)),
              "opt": OPTForCausalLM(OPTConfig(**common, ffn_dim=128))}
    placements = [{}, dict(weights=Placement(gpu=0.0, cpu=1.0)), dict(weights=Placement(gpu=0.0, cpu=0.0)),
                  dict(weights=Placement(gpu=0.5, cpu=0.25)), dict(kv_cache=Placement(gpu=0.0, cpu=1.0)),
                  dict(kv_cache=Placement(gpu=0.5, cpu=0.5), cpu_attention=True),
                  dict(activations=Placement(gpu=0.0, cpu=1.0)),
                  dict(weights=Placement(gpu=0.0, cpu=0.5), kv_cache=Placement(gpu=0.0, cpu=1.0),
                       activations=Placement(gpu=0.0, cpu=1.0), cpu_attention=True)]
    failures = 0
    for name, hf in models.items():
        d = tempfile.mkdtemp()
        hf.save_pretrained(d)

        def gen(device, rq=reqs, eos=None, **pol):
            eng = open_engine(d, dtype="float32", device=device, tokenizer=IdTokenizer(99), offload_dir=tempfile.mkdtemp(),
                              policy=Policy(**pol))
            if eos is not None:
                eng.block.eos = eos
            host = [t for r, tier in zip(eng.store.records, eng.store.tier) if tier == "cpu" for t in r.values()]
            if device == "cuda" and host:
                assert all(t.is_pinned() for t in host), "host-tier weights are not pinned"
            out = {r.key: r.token_ids for r in eng.generate(rq, SamplingSettings(max_new_tokens=10))}
            eng.close()
            return [out[str(i)] for i in range(len(rq))]

        shared = [[21, 22, 23, 24, 25, 26] + p for p in prompts]  # the shared-prefix path on CUDA
        preqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(shared)]
        pref = gen("cpu", preqs, gpu_batch_size=6, shared_prefix=False)
        for pl in placements:
            got = gen("cuda", preqs, gpu_batch_size=2, num_gpu_batches=3, **pl)
            failures += got != pref
            print(f"check {name} shared prefix {pl}: {'OK' if got == pref else 'MISMATCH'}")

        if name == "llama":  # rows ending early: compaction, merging of batches, refill, on CUDA
            many = [[21, 22, 23, 24, 25, 26] + [(5 * i + 3 * j) % 80 + 10 for j in range(1 + i % 6)] for i in range(17)]
            mreqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(many)]
            free = gen("cpu", mreqs, eos=set(), gpu_batch_size=17)
            counts: dict[int, int] = {}
            for toks in free:
                for t in set(toks[1:8]):
                    counts[t] = counts.get(t, 0) + 1
            eos = {max(counts, key=counts.get)}
            mref = gen("cpu", mreqs, eos=eos, gpu_batch_size=17, refill=False, shared_prefix=False)
            for pl in placements:
                got = gen("cuda", mreqs, eos=eos, gpu_batch_size=4, num_gpu_batches=2, **pl)
                failures += got != mref
                print(f"check {name} early exit + merge + refill {pl}: {'OK' if got == mref else 'MISMATCH'}")

        ref = gen("cpu", gpu_batch_size=6)
        for pl in placements:
            for nb, overlap in ((1, True), (3, True), (2, False)):
                got = gen("cuda", gpu_batch_size=-(-6 // nb), num_gpu_batches=nb, overlap=overlap, **pl)
                ok = got == ref
                failures += not ok
                print(f"check {name} nb={nb} overlap={overlap} {pl}: {'OK' if ok else 'MISMATCH'}")
        comp = dict(compress_weights=Compression(group_size=16), compress_kv=Compression(group_size=16))
        cref = gen("cuda", gpu_batch_size=6, **comp)
        for pl in placements[1:]:
            got = gen("cuda", gpu_batch_size=2, num_gpu_batches=3, **comp, **pl)
            agree = sum(a == b for x, y in zip(got, cref) for a, b in zip(x, y)) / sum(len(x) for x in cref)
            print(f"check {name} compressed {pl}: token agreement with resident compressed {agree:.3f}")
    print(f"CHECK FAILURES: {failures}")


def profile() -> None:
    from corpusgen.engine.profile import measure
    from corpusgen.planner.hardware import save_profile

    prof = measure("cuda", offload_dir=tempfile.mkdtemp(dir="/tmp"))
    save_profile(prof, OUT / "hardware.yaml")
    print((OUT / "hardware.yaml").read_text())


CONFIGS: dict[str, dict] = {}


def _cfg(name: str, model: str, policy: dict, **kw) -> None:
    CONFIGS[name] = dict(model=model, policy=policy, **kw)


_GPU16 = dict(gpu_memory=16 * GIB, cpu_memory=110 * GIB)
_cfg("opt6.7b-gpu-128x1", "opt-6.7b", dict(gpu_batch_size=128, num_gpu_batches=1), num_seqs=128)
_cfg("opt6.7b-gpu-64x2", "opt-6.7b", dict(gpu_batch_size=64, num_gpu_batches=2), num_seqs=128)
_cfg("opt30b-16g-plan", "opt-30b", dict(gpu_batch_size=16, num_gpu_batches=5, weights={"gpu": 5 / 48, "cpu": 43 / 48},
                                        kv_cache={"gpu": 4 / 48, "cpu": 44 / 48}, activations={"gpu": 0, "cpu": 1}), **_GPU16)
_cfg("opt30b-16g-flexgen", "opt-30b", dict(gpu_batch_size=32, num_gpu_batches=2, weights={"gpu": 0.1, "cpu": 0.9},
                                           kv_cache={"gpu": 0, "cpu": 1}, activations={"gpu": 0, "cpu": 1},
                                           cpu_attention=True), **_GPU16)
_cfg("opt30b-16g-c4", "opt-30b", dict(gpu_batch_size=16, num_gpu_batches=8, weights={"gpu": 0, "cpu": 1},
                                      kv_cache={"gpu": 21 / 48, "cpu": 27 / 48}, activations={"gpu": 0, "cpu": 1},
                                      compress_weights={"bits": 4, "group_size": 64},
                                      compress_kv={"bits": 4, "group_size": 64}), **_GPU16)

_cfg("opt30b-16g-c4-plan", "opt-30b", dict(gpu_batch_size=64, num_gpu_batches=7, weights={"gpu": 18 / 48, "cpu": 30 / 48},
                                           kv_cache={"gpu": 0, "cpu": 1}, activations={"gpu": 0, "cpu": 1},
                                           compress_weights={"bits": 4, "group_size": 64},
                                           compress_kv={"bits": 4, "group_size": 64}), **_GPU16)
# Chunked prefill, staggered batches (refill): each step computes one batch's prompt chunk while
# the link carries the other batches' KV (docs/benchmarks.md#opt-30b-16-gib-gpu-4-bit). A corpus
# run: 4 blocks of rows.
_C4_CHUNKED = dict(CONFIGS["opt30b-16g-c4-plan"]["policy"], prefill_chunk=104)
_cfg("opt30b-16g-c4-chunked", "opt-30b", _C4_CHUNKED, num_seqs=1792, **_GPU16)
_cfg("opt30b-16g-c4-chunked-448", "opt-30b", _C4_CHUNKED, num_seqs=448, **_GPU16)
# Longer chunks: fewer steps per prompt, so more steps decode all seven batches, while a chunk's
# compute still hides behind the link (docs/benchmarks.md#measurements-behind-engine-defaults).
for _c in (128, 171):
    _cfg(f"opt30b-16g-c4-chunked{_c}", "opt-30b", dict(_C4_CHUNKED, prefill_chunk=_c), num_seqs=1792, **_GPU16)
# ... with two fewer layers' weights on the GPU: the chunk's larger transients need the room (at
# 18/48 the allocator falls back to freeing and retrying).
_cfg("opt30b-16g-c4-chunked128-w16", "opt-30b", dict(_C4_CHUNKED, prefill_chunk=128, weights={"gpu": 16 / 48, "cpu": 32 / 48}),
     num_seqs=1792, **_GPU16)
# Activations on the GPU (a chunk's are small: 64 x 104 columns) and that memory holding 26 layers'
# weights: the counter-example, slower for the allocator's retries.
_cfg("opt30b-16g-c4-chunked-g26-448", "opt-30b", dict(_C4_CHUNKED, weights={"gpu": 26 / 48, "cpu": 22 / 48},
                                                      activations={"gpu": 1, "cpu": 0}), num_seqs=448, **_GPU16)
_cfg("opt30b-16g-cpuattn", "opt-30b", dict(gpu_batch_size=32, num_gpu_batches=2, weights={"gpu": 8 / 48, "cpu": 40 / 48},
                                           kv_cache={"gpu": 0, "cpu": 1}, cpu_attention=True), **_GPU16)
_cfg("opt30b-16g-cpuattn-80", "opt-30b", dict(gpu_batch_size=40, num_gpu_batches=2, weights={"gpu": 7 / 48, "cpu": 41 / 48},
                                              kv_cache={"gpu": 0, "cpu": 1}, cpu_attention=True), num_seqs=80, **_GPU16)
_cfg("opt30b-16g-cpuattn-88", "opt-30b", dict(gpu_batch_size=44, num_gpu_batches=2, weights={"gpu": 7 / 48, "cpu": 41 / 48},
                                              kv_cache={"gpu": 0, "cpu": 1}, cpu_attention=True), num_seqs=88, **_GPU16)
_cfg("opt175b-16g-c4-plan", "opt-175b", dict(gpu_batch_size=16, num_gpu_batches=2, weights={"gpu": 6 / 96, "cpu": 90 / 96},
                                             kv_cache={"gpu": 0, "cpu": 1}, compress_weights={"bits": 4, "group_size": 64},
                                             compress_kv={"bits": 4, "group_size": 64}), **_GPU16)


def _step_log(path: str) -> None:
    """Append every token step of the engine to ``path`` as it ends (``CG_STEPS=1``; a run cut
    short still leaves its log): seconds of the step, seconds since the previous step ended (what
    runs between steps: admission, sampling), batches in their prompt, decoding batches, rows."""
    from corpusgen.engine import schedule

    real = schedule.BlockEngine._pass
    last = [None]
    traced = {int(x) for x in os.environ.get("CG_TRACE_PASSES", "").split(",") if x}
    count = [0]

    def timed(self, batches):
        n = count[0]
        count[0] += 1
        t0 = time.perf_counter()
        if n in traced:
            dt = _traced_pass(real, self, batches, path.replace("steps-", f"trace{n}-").replace(".jsonl", ".json"))
        else:
            dt = real(self, batches)
        gap = 0.0 if last[0] is None else t0 - last[0]
        last[0] = time.perf_counter()
        with open(path, "a") as f:
            f.write(json.dumps([round(dt, 4), round(gap, 4), sum(not b.decoding for b in batches),
                                sum(b.decoding for b in batches), sum(len(b.rows) for b in batches)]) + "\n")
        return dt

    schedule.BlockEngine._pass = timed


def _traced_pass(real, engine, batches, path: str) -> float:
    """Run one pass under the profiler; write where its time went to ``path``: busy seconds
    (union of intervals) of kernels, host->device and device->host copies, their overlaps, and the
    host's seconds in synchronisations and allocations (CG_TRACE_PASSES=3,40 names the passes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dt = real(engine, batches)
    spans: dict[str, list] = {"kernel": [], "h2d": [], "d2h": []}
    host: dict[str, list] = {}
    for e in prof.events():
        a, b = e.time_range.start, e.time_range.end
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kind = "h2d" if "HtoD" in e.name else "d2h" if "DtoH" in e.name else "kernel"
            spans[kind].append((a, b))
        elif e.name.startswith("cuda") and any(w in e.name for w in ("Synchronize", "Malloc", "Free", "HostAlloc", "HostRegister")):
            v = host.setdefault(e.name, [0, 0.0])
            v[0] += 1
            v[1] += (b - a) / 1e6

    def union(xs):
        xs, out = sorted(xs), []
        for a, b in xs:
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out

    def total(xs):
        return sum(b - a for a, b in xs) / 1e6

    def both(x, y):
        i = j = 0
        t = 0.0
        while i < len(x) and j < len(y):
            a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
            t += max(0, b - a)
            if x[i][1] < y[j][1]:
                i += 1
            else:
                j += 1
        return t / 1e6

    u = {k: union(v) for k, v in spans.items()}
    rec = {"pass_s": dt, "rows": sum(len(b.rows) for b in batches), "prompting": sum(not b.decoding for b in batches),
           "busy_s": {k: round(total(v), 4) for k, v in u.items()},
           "kernel_and_h2d_s": round(both(u["kernel"], u["h2d"]), 4),
           "any_gpu_s": round(total(union(spans["kernel"] + spans["h2d"] + spans["d2h"])), 4),
           "host_calls": {k: [n, round(t, 4)] for k, (n, t) in sorted(host.items())},
           "top_kernels": [(e.key[:60], round(e.self_device_time_total / 1e6, 4), e.count) for e in sorted(
               (e for e in prof.key_averages() if e.self_device_time_total > 0),
               key=lambda e: -e.self_device_time_total)[:15]]}
    Path(path).write_text(json.dumps(rec, indent=1))
    return dt


def bench(names: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = CONFIGS[name]
        t0 = time.time()
        code = (
            "import json,sys; from corpusgen.bench import run_bench; from corpusgen.planner.policy import policy_from_dict;"
            "from corpusgen.planner.hardware import load_profile; import os;"
            f"spec=json.loads({json.dumps(json.dumps(spec))});"
            "prof=load_profile(os.environ['CG_PROFILE']) if os.path.exists(os.environ.get('CG_PROFILE','')) else None;"
            "pol=policy_from_dict(spec.pop('policy')); model=spec.pop('model');"
            f"os.environ.get('CG_STEPS') and _step_log(os.path.join(os.environ['OUT'], 'steps-{name}.jsonl'));"
            f"rec=run_bench(model, dummy=True, policy=pol, profile=prof, label={name!r}, results_file=os.environ['CG_RESULTS'], **spec);"
            "print('RESULT', json.dumps(rec))"
        )
        code = f"from gpu_suite import _step_log; {code}"
        env = dict(os.environ, CG_RESULTS=str(OUT / "bench.jsonl"), CG_PROFILE=str(OUT / "hardware.yaml") if (OUT / "hardware.yaml").exists()
                   else str(Path(__file__).resolve().parent.parent / "policies" / "hardware-nvidia-h200.yaml"),
                   PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(Path(__file__).resolve().parent)]))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: FAILED rc={r.returncode} after {time.time() - t0:.0f}s\n{r.stderr[-3000:]}")
            continue
        rec = json.loads(line[7:])
        print(f"{name}: total {rec['total_tps']} tok/s (prefill {rec['prefill_s']}s, decode {rec['decode_s']}s, "
              f"step {rec['decode_step_s']}s vs link {rec['decode_step_link_s']}s), peak gpu {rec['peak_gpu_gib']} GiB, "
              f"pinned {rec['peak_pinned_gib']} GiB, predicted {rec.get('predicted_tps')}, wall {rec['wall_s']}s")


def trace(model: str = "opt-6.7b", n: int = 128, gen: int = 4) -> None:
    """Profile a prefill and a few decode steps (random prompts of 512 tokens, as in the bench):
    where the GPU time goes (top kernels) and the CPU-side gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy

    eng = open_engine(model, dummy=True, policy=Policy(gpu_batch_size=n))
    eng.block.eos = set()
    g = torch.Generator().manual_seed(0)
    reqs = [Request(key=str(i), prompt_ids=torch.randint(4, 50000, (512,), generator=g).tolist()) for i in range(n)]
    list(eng.generate(reqs, SamplingSettings(max_new_tokens=2)))
    for label, steps in (("prefill", 1), ("prefill + decode", gen)):
        eng.stats.decode_seconds = eng.stats.prefill_seconds = 0.0
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            list(eng.generate(reqs, SamplingSettings(max_new_tokens=steps)))
        print(f"=== {label}: prefill {eng.stats.prefill_seconds:.3f} s, decode {eng.stats.decode_seconds:.3f} s")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=25,
                                                                 max_name_column_width=30, max_shapes_column_width=90))
    print("decode s/step", eng.stats.decode_seconds / max(1, gen - 1))


def step_gaps(gen: int = 9, model: str = "opt-6.7b", n: int = 128) -> None:
    """A decode step's wall time against the GPU time of its kernels (union of their intervals),
    from two profiled runs (1 and ``gen`` tokens) whose difference is ``gen - 1`` decode steps; and
    the kernels that make up a step."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy

    eng = open_engine(model, dummy=True, policy=Policy(gpu_batch_size=n))
    eng.block.eos = set()
    g = torch.Generator().manual_seed(0)
    reqs = [Request(key=str(i), prompt_ids=torch.randint(4, 50000, (512,), generator=g).tolist()) for i in range(n)]
    list(eng.generate(reqs, SamplingSettings(max_new_tokens=2)))
    got = {}
    for steps in (1, gen):
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            list(eng.generate(reqs, SamplingSettings(max_new_tokens=steps)))
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, end = 0.0, float("-inf")
        for a, b in spans:  # union of kernel intervals, microseconds
            if b > end:
                busy += b - max(a, end)
                end = b
        per = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.key] = (e.self_device_time_total, e.count)
        got[steps] = (wall, busy / 1e6, per)
    (w1, b1, p1), (wn, bn, pn) = got[1], got[gen]
    k = gen - 1
    print(f"decode step: wall {(wn - w1) / k * 1e3:.2f} ms, GPU busy {(bn - b1) / k * 1e3:.2f} ms "
          f"(prefill run: wall {w1:.3f} s, busy {b1:.3f} s)")
    rows = sorted(((pn[key][0] - p1.get(key, (0, 0))[0]) / k, (pn[key][1] - p1.get(key, (0, 0))[1]) / k, key)
                  for key in pn)
    for us, calls, key in reversed(rows[-14:]):
        print(f"  {us / 1e3:7.3f} ms/step {calls:6.1f} calls/step  {key[:110]}")
    eng.close()


def trace_config(name: str, gen: int = 3) -> None:
    """Profile one bench configuration's prefill and ``gen - 1`` decode steps (CPU and CUDA
    activity): where a decode step's host time goes (CPU attention, waits, copies)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from corpusgen.bench import _open
    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.planner.policy import policy_from_dict

    spec = dict(CONFIGS[name])
    pol = policy_from_dict(spec.pop("policy"))
    n = spec.pop("num_seqs", None) or pol.block_size
    eng = _open(spec.pop("model"), None, True, None, None, pol, spec.get("gpu_memory"), spec.get("cpu_memory"), None,
                512, 32, 0)
    eng.block.eos = set()
    g = torch.Generator().manual_seed(0)
    reqs = [Request(key=str(i), prompt_ids=torch.randint(4, 50000, (512,), generator=g).tolist()) for i in range(n)]
    list(eng.generate(reqs[:2], SamplingSettings(max_new_tokens=2)))
    eng.stats.decode_seconds = eng.stats.prefill_seconds = 0.0
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(eng.generate(reqs, SamplingSettings(max_new_tokens=gen)))
    print(f"=== {name}: prefill {eng.stats.prefill_seconds:.3f} s, decode {eng.stats.decode_seconds:.3f} s "
          f"({eng.stats.decode_seconds / max(1, gen - 1):.3f} s/step), threads {torch.get_num_threads()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    eng.close()


def prefill_ab(rounds: int = 4, model: str = "opt-6.7b", n: int = 128) -> None:
    """Prefill seconds with the last layer's output projection and MLP run for the last column
    only (the engine's way) and for every column (``feeds_head = False``), interleaved in one
    process, with the same greedy first token checked."""
    import torch

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy

    eng = open_engine(model, dummy=True, policy=Policy(gpu_batch_size=n))
    eng.block.eos = set()
    g = torch.Generator().manual_seed(0)
    reqs = [Request(key=str(i), prompt_ids=torch.randint(4, 50000, (512,), generator=g).tolist()) for i in range(n)]
    list(eng.generate(reqs, SamplingSettings(max_new_tokens=1)))  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    first: dict[bool, dict] = {}
    for _ in range(rounds):
        for last_only in (True, False):
            eng.block.feeds_head = last_only
            eng.stats.prefill_seconds = 0.0
            out = {r.key: r.token_ids for r in eng.generate(reqs, SamplingSettings(max_new_tokens=1))}
            times[last_only].append(eng.stats.prefill_seconds)
            first[last_only] = out
    same = sum(first[True][k] == first[False][k] for k in first[True])
    for last_only in (True, False):
        ts = times[last_only]
        print(f"last layer for {'the last column' if last_only else 'every column'}: prefill "
              f"{', '.join(f'{t:.4f}' for t in ts)} s (mean {sum(ts) / len(ts):.4f})")
    print(f"first tokens identical: {same}/{len(first[True])}")
    eng.close()


def decode_steps(rounds: int = 2, model: str = "opt-6.7b", n: int = 128, gen: int = 32) -> None:
    """Decode step wall times with CUDA graphs and eagerly, interleaved in one process (fixed
    blocks, 512-token prompts), and the GPU time of each replay: what a step spends on the host."""
    import statistics

    import torch

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy

    eng = open_engine(model, dummy=True, policy=Policy(gpu_batch_size=n, refill=False))
    eng.block.eos = set()
    blk = eng.block
    graphs = blk.graphs
    g = torch.Generator().manual_seed(0)
    reqs = [Request(key=str(i), prompt_ids=torch.randint(4, 50000, (512,), generator=g).tolist()) for i in range(n)]
    list(eng.generate(reqs, SamplingSettings(max_new_tokens=3)))  # warm-up
    times: list[float] = []
    real = blk._pass
    blk._pass = lambda batches: times.append(real(batches)) or times[-1]
    tokens = {}
    for _ in range(rounds):
        for on in ((True, False) if graphs is not None else (False,)):
            blk.graphs = graphs if on else None
            if graphs is not None:
                graphs.timed = []
            times.clear()
            tokens[on] = {r.key: r.token_ids for r in eng.generate(reqs, SamplingSettings(max_new_tokens=gen))}
            dec = [t * 1e3 for t in times[1:]]  # times[0]: the prefill
            line = (f"{'graphs' if on else 'eager '}: first decode step {dec[0]:.2f} ms, then median "
                    f"{statistics.median(dec[1:]):.2f}, min {min(dec[1:]):.2f}, max {max(dec[1:]):.2f}, "
                    f"decode total {sum(dec):.1f} ms")
            if on:
                gpu = [a.elapsed_time(b) for a, b in graphs.timed]
                line += f"; replay GPU time median {statistics.median(gpu):.2f} ms (min {min(gpu):.2f})"
            print(line)
    if len(tokens) == 2:
        same = sum(tokens[True][k] == tokens[False][k] for k in tokens[True])
        print(f"rows with identical tokens, graphs vs eager: {same}/{len(tokens[True])}")
    eng.close()


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "check":
        check()
    elif what == "profile":
        profile()
    elif what == "trace":
        trace()
    elif what == "step-gaps":
        step_gaps(*map(int, sys.argv[2:]))
    elif what == "decode-steps":
        decode_steps(*map(int, sys.argv[2:]))
    elif what == "prefill-ab":
        prefill_ab(*map(int, sys.argv[2:]))
    elif what == "trace-config":
        trace_config(sys.argv[2], *map(int, sys.argv[3:]))
    elif what == "bench":
        bench(sys.argv[2:])
    elif what == "bench-file":  # configurations from benchmarks/plan_validation.py
        specs = json.loads(Path(sys.argv[2]).read_text())
        names = [s["name"] for s in specs if not sys.argv[3:] or s["name"] in sys.argv[3:]]
        for s in specs:
            CONFIGS[s.pop("name")] = s
        bench(names)
