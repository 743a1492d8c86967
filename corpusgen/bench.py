"""``corpusgen bench``: FlexGen's workload, timed end to end without extrapolation.

Dummy (or real) weights, ``num_seqs`` prompts of ``prompt_len`` random tokens, ``gen_len`` new
tokens each, every token generated (no EOS). Throughput = generated tokens / (prefill + decode
time), as FlexGen defines it; the wall time including weight placement is reported separately.
Results are returned as a dict and appended as one JSON line to a results file. No UI here.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import socket
import time
from pathlib import Path
from typing import Any

from corpusgen.policy.policy import Policy

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
        from corpusgen.policy.memory import kv_layer_bytes

        kv_bytes = kv_cpu_layers * kv_layer_bytes(cfg, pol.block_size, engine._last_len, 2, pol.compress_kv)
    moved = weight_bytes + kv_bytes
    bw = profile.h2d_pinned_gbps * 1e9 if profile is not None else None
    return {"bytes": moved, "link_seconds": moved / bw if bw else float("nan")}


def run_bench(model: str, *, dummy: bool = True, prompt_len: int = 512, gen_len: int = 32, num_seqs: int | None = None,
              policy: Policy | None = None, gpu_memory: int | None = None, cpu_memory: int | None = None,
              offload_dir: str | None = None, device: str | None = None, dtype: str | None = None,
              profile=None, predicted_tps: float | None = None, results_file: str | Path | None = None,
              label: str = "", seed: int = 0) -> dict[str, Any]:
    """Run the workload; return (and append to ``results_file``) one result record."""
    import torch

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine

    t_wall = time.perf_counter()
    policy = policy or Policy()
    engine = open_engine(model, dummy=dummy, device=device, dtype=dtype, policy=policy, gpu_memory=gpu_memory,
                         cpu_memory=cpu_memory, offload_dir=offload_dir, prompt_len=prompt_len, gen_len=gen_len,
                         seed=seed)
    try:
        n = num_seqs or policy.block_size
        g = torch.Generator().manual_seed(seed)
        vocab = engine.config.vocab_size
        reqs = [Request(key=str(i), prompt_ids=torch.randint(4, vocab, (prompt_len,), generator=g).tolist())
                for i in range(n)]
        engine.block.eos = set()  # FlexGen's workload: every row generates gen_len tokens
        engine._last_len = prompt_len + gen_len
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        s = SamplingSettings(max_new_tokens=gen_len, temperature=0.0)
        t0 = time.perf_counter()
        results = list(engine.generate(reqs, s))
        gen_seconds = time.perf_counter() - t0
        st = engine.stats
        assert len(results) == n and all(len(r.token_ids) == gen_len for r in results), "every row must finish"
        tokens = n * gen_len
        decode_tokens = n * (gen_len - 1)
        steps = max(gen_len - 1, 1) * -(-n // policy.block_size)
        link = link_seconds_per_decode_step(engine, profile)
        rec = {
            "label": label, "model": engine.config.name, "dummy": dummy, "prompt_len": prompt_len, "gen_len": gen_len,
            "num_seqs": n, "policy": policy.to_dict(), "realised": engine.describe()["realised"],
            "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "gpu_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else platform.processor(),
            "gpu_budget_gib": gpu_memory / GIB if gpu_memory else None,
            "cpu_budget_gib": cpu_memory / GIB if cpu_memory else None,
            "prefill_s": round(st.prefill_seconds, 4), "decode_s": round(st.decode_seconds, 4),
            "prefill_tps": round(st.prompt_tokens / st.prefill_seconds, 2) if st.prefill_seconds else None,
            "decode_tps": round(decode_tokens / st.decode_seconds, 2) if st.decode_seconds else None,
            "total_tps": round(tokens / (st.prefill_seconds + st.decode_seconds), 3),
            "generate_wall_s": round(gen_seconds, 3), "load_s": round(engine.load_seconds, 3),
            "decode_step_s": round(st.decode_seconds / steps, 5),
            "decode_step_link_s": round(link["link_seconds"], 5) if link["link_seconds"] == link["link_seconds"] else None,
            "decode_step_link_bytes": link["bytes"],
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(engine.device) / GIB, 3)
            if engine.device.type == "cuda" else None,
            "peak_pinned_gib": round(engine.arena.peak / GIB, 3),
            "disk_gib": round((engine.disk.bytes_written if engine.disk else 0) / GIB, 3),
            "predicted_tps": round(predicted_tps, 3) if predicted_tps else None,
            "host": socket.gethostname(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t_wall, 2),
        }
    finally:
        engine.close()
    if results_file:
        p = Path(results_file)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec
