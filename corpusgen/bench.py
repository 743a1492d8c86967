"""``corpusgen bench``: FlexGen's workload, timed end to end without extrapolation.

Dummy (or real) weights, ``num_seqs`` prompts of ``prompt_len`` random tokens, ``gen_len`` new
tokens each, every token generated (no EOS). Throughput = generated tokens / (prefill + decode
time), as FlexGen defines it; the wall time including weight placement is reported separately.
Results are returned as a dict and appended as one JSON line to a results file. No UI here.

Under torchrun (DESIGN §7) the ranks start generating together (after all have loaded) and rank 0
records the aggregate: ``num_seqs`` × ``gen_len`` tokens over the slowest rank's time. Data
parallel: each rank runs its share of the rows; time = its prefill + decode, as above. Pipeline:
every stage runs every row, the stages overlap, so time = generate wall time less stage 0's
admission time (allocating the KV of new rows, which a single process excludes as well).
``wall_tps`` (tokens / generate wall time, everything included) is recorded in every mode.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import socket
import time
from pathlib import Path
from typing import Any

from corpusgen.planner.policy import Policy

GIB = 2**30


def link_seconds_per_decode_step(engine, profile) -> dict[str, float]:
    """Bytes one decode step must move over the host link with this placement, and the time the
    link needs for them at the profile's pinned bandwidth (the floor of a decode step)."""
    store, pol = engine.store, engine.policy
    weight_bytes = store.resident_bytes["cpu"] + store.resident_bytes["disk"]
    cfg = engine.config
    kv_cpu_layers = sum(1 for t in store.kv_tiers if t == "cpu")
    kv_bytes = 0
    if kv_cpu_layers and not pol.cpu_attention:
        from corpusgen.planner.memory import kv_layer_bytes

        kv_bytes = kv_cpu_layers * kv_layer_bytes(cfg, pol.block_size, engine._last_len, 2, pol.compress_kv)
    moved = weight_bytes + kv_bytes
    bw = profile.h2d_pinned_gbps * 1e9 if profile is not None else None
    return {"bytes": moved, "link_seconds": moved / bw if bw else float("nan")}


def run_bench(model: str, *, dummy: bool = True, prompt_len: int = 512, gen_len: int = 32, num_seqs: int | None = None,
              policy: Policy | None = None, gpu_memory: int | None = None, cpu_memory: int | None = None,
              offload_dir: str | None = None, device: str | None = None, dtype: str | None = None,
              profile=None, predicted_tps: float | None = None, results_file: str | Path | None = None,
              label: str = "", seed: int = 0, pipeline_stages: int = 1, ranks=None) -> dict[str, Any]:
    """Run the workload; return (and append to ``results_file``) one result record.

    Under torchrun (``ranks.world`` > 1) every process calls this: with ``pipeline_stages`` 1 the
    ranks split ``num_seqs`` (default: one block each) and run them concurrently, each on its own
    GPU with its own budgets (data parallel); with ``pipeline_stages`` = the world size, rank r is
    stage r of one pipeline (``policy`` is a stage's; default: one sub-block per stage). Rank 0
    returns and records the aggregate, with every rank's figures under ``ranks``.
    """
    from corpusgen.errors import PolicyError
    from corpusgen.job.ranks import Ranks

    ranks = ranks or Ranks.from_env()
    if pipeline_stages not in (1, ranks.world):
        raise PolicyError(f"--pipeline-stages {pipeline_stages} needs as many processes: start them with "
                          f"torchrun --nproc-per-node {pipeline_stages} (WORLD_SIZE is {ranks.world})")
    t_wall = time.perf_counter()
    policy = policy or Policy()
    if ranks.world == 1:
        engine = _open(model, None, dummy, device, dtype, policy, gpu_memory, cpu_memory, offload_dir, prompt_len,
                       gen_len, seed)
        rec = _measure(engine, None, ranks, num_seqs or policy.block_size, prompt_len, gen_len, seed, profile,
                       dummy, gpu_memory)
        rec.update(mode="single", world=1, wall_tps=round(rec["num_seqs"] * gen_len / rec["generate_wall_s"], 3))
    else:
        rec = _bench_ranks(model, ranks, pipeline_stages, dummy, device, dtype, policy, gpu_memory, cpu_memory,
                           offload_dir, prompt_len, gen_len, seed, num_seqs, profile)
        if rec is None:  # not rank 0
            return {}
    rec = {"label": label, **rec, "predicted_tps": round(predicted_tps, 3) if predicted_tps else None,
           "host": socket.gethostname(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_s": round(time.perf_counter() - t_wall, 2)}
    if results_file:
        p = Path(results_file)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def _open(model, stage, dummy, device, dtype, policy, gpu_memory, cpu_memory, offload_dir, prompt_len, gen_len, seed):
    kw = dict(dummy=dummy, device=device, dtype=dtype, policy=policy, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
              offload_dir=offload_dir, prompt_len=prompt_len, gen_len=gen_len, seed=seed)
    from corpusgen.engine.load import open_engine

    return open_engine(model, stage=stage, **kw)


def _bench_ranks(model, ranks, stages, dummy, device, dtype, policy, gpu_memory, cpu_memory, offload_dir, prompt_len,
                 gen_len, seed, num_seqs, profile) -> dict[str, Any] | None:
    """Every rank: open, wait for the others, generate its share, then gather the figures on rank 0."""
    import torch
    import torch.distributed as dist

    from corpusgen.engine.load import pick_device
    from corpusgen.engine.pipeline import PipelineGroup, split_layers
    from corpusgen.engine.weights import load_config
    from corpusgen.job.ranks import StartGroup, rank_dir_name

    ranks.select_gpu(device or "auto")
    pipeline = stages > 1
    group = PipelineGroup(ranks.rank, ranks.world, pick_device(device)) if pipeline else StartGroup(ranks)
    if offload_dir:
        offload_dir = str(Path(offload_dir) / rank_dir_name(ranks.rank, ranks.world))
    with group:
        stage = split_layers(load_config(model).num_layers, stages)[ranks.rank] if pipeline else None
        engine = _open(model, stage, dummy, device, dtype, policy, gpu_memory, cpu_memory, offload_dir, prompt_len,
                       gen_len, seed)
        n = num_seqs or ranks.world * policy.block_size
        dist.all_reduce(torch.zeros(1))  # every rank loaded: start together
        rec = _measure(engine, None if pipeline else (ranks.rank, ranks.world), ranks, n, prompt_len, gen_len, seed,
                       profile, dummy, gpu_memory)
        if pipeline:
            rec["admit_s"] = round(engine.block.admit_seconds, 3)
        gathered: list[Any] = [None] * ranks.world
        dist.all_gather_object(gathered, rec)
    if not ranks.leader:
        return None
    tokens = n * gen_len
    wall = max(r["generate_wall_s"] for r in gathered)
    if pipeline:  # the stages overlap: wall time less stage 0's admissions (its KV allocation)
        busy = wall - gathered[0]["admit_s"]
    else:
        busy = max(r["prefill_s"] + r["decode_s"] for r in gathered)
    first = gathered[0]
    keep = ("model", "dummy", "prompt_len", "gen_len", "policy", "device", "dtype", "gpu_name", "gpu_budget_gib",
            "cpu_budget_gib")
    return {**{k: first[k] for k in keep}, "mode": "pipeline" if pipeline else "data-parallel", "world": ranks.world,
            "num_seqs": n, "total_tps": round(tokens / busy, 3), "wall_tps": round(tokens / wall, 3),
            "generate_wall_s": round(wall, 3), "ranks": gathered}


def _graph_counts(engine) -> dict | None:
    """Decode steps replayed from CUDA graphs (engine/decode_graph.py), or None when not used."""
    g = engine.block.graphs
    if g is None:
        return None
    return {"captures": g.captures, "replays": g.replays, "capture_s": round(g.capture_seconds, 4)}


def _measure(engine, share, ranks, n: int, prompt_len: int, gen_len: int, seed: int, profile, dummy: bool,
             gpu_memory: int | None) -> dict[str, Any]:
    """Generate the workload (rows ``share[0]::share[1]`` of it, when given) and return this
    process's figures; closes the engine."""
    import torch

    from corpusgen.engine.api import Request, SamplingSettings

    policy = engine.policy
    try:
        g = torch.Generator().manual_seed(seed)
        vocab = engine.config.vocab_size
        reqs = [Request(key=str(i), prompt_ids=torch.randint(4, vocab, (prompt_len,), generator=g).tolist())
                for i in range(n)]
        if share is not None:
            reqs = reqs[share[0]::share[1]]
        engine.block.eos = set()  # FlexGen's workload: every row generates gen_len tokens
        engine._last_len = prompt_len + gen_len
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        s = SamplingSettings(max_new_tokens=gen_len, temperature=0.0)
        # Warm-up, not timed: the first call of a process loads kernels and picks GEMM algorithms,
        # which can take most of a small prefill.
        list(engine.generate([Request(key="warm-up", prompt_ids=reqs[0].prompt_ids[:16])],
                             SamplingSettings(max_new_tokens=2, temperature=0.0)))
        engine.block.stats.__init__()
        t0 = time.perf_counter()
        results = list(engine.generate(reqs, s))
        gen_seconds = time.perf_counter() - t0
        st = engine.stats
        mine = len(reqs)
        assert len(results) == mine and all(len(r.token_ids) == gen_len for r in results), "every row must finish"
        tokens = mine * gen_len
        decode_tokens = mine * (gen_len - 1)
        steps = max(gen_len - 1, 1) * -(-mine // policy.block_size)
        link = link_seconds_per_decode_step(engine, profile)
        gpu = engine.device.type == "cuda"
        return {
            "rank": ranks.rank, "model": engine.config.name, "dummy": dummy,
            "prompt_len": prompt_len, "gen_len": gen_len,
            "num_seqs": mine, "policy": policy.to_dict(), "realised": engine.describe()["realised"],
            "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "gpu_name": torch.cuda.get_device_name(engine.device) if gpu else platform.processor(),
            "gpu_budget_gib": gpu_memory / GIB if gpu_memory else None,
            "cpu_budget_gib": engine.arena.budget / GIB if engine.arena.budget else None,
            "prefill_s": round(st.prefill_seconds, 4), "decode_s": round(st.decode_seconds, 4),
            "prefill_tps": round(st.prompt_tokens / st.prefill_seconds, 2) if st.prefill_seconds else None,
            "decode_tps": round(decode_tokens / st.decode_seconds, 2) if st.decode_seconds else None,
            "total_tps": round(tokens / (st.prefill_seconds + st.decode_seconds), 3),
            "generate_wall_s": round(gen_seconds, 3), "load_s": round(engine.load_seconds, 3),
            "decode_step_s": round(st.decode_seconds / steps, 5),
            "decode_step_link_s": None if math.isnan(link["link_seconds"]) else round(link["link_seconds"], 5),
            "decode_step_link_bytes": link["bytes"],
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(engine.device) / GIB, 3) if gpu else None,
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(engine.device) / GIB, 3) if gpu else None,
            # the allocator's out-of-memory retries: each frees cached blocks after a device sync
            "alloc_retries": torch.cuda.memory_stats(engine.device).get("num_alloc_retries", 0) if gpu else None,
            "peak_pinned_gib": round(engine.arena.peak / GIB, 3),
            "disk_gib": round((engine.disk.bytes_written if engine.disk else 0) / GIB, 3),
            "decode_graphs": _graph_counts(engine),
        }
    finally:
        engine.close()
