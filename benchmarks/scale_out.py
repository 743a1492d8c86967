"""Scale-out benchmark (issue #9, DESIGN §7): one GPU vs two, data parallel and pipeline parallel.

OPT-30B with dummy weights, prompt 512, 32 new tokens, 16 GiB GPU budget per GPU, FlexGen's
workload as `corpusgen bench` runs it (every row generates 32 tokens):

    (a) single  one GPU, 16 × 5 rows, weights 8 GPU / 40 CPU, KV and activations on the CPU
                (the planner's policy; docs/benchmarks.md#two-gpus-data-and-pipeline-parallel)
    (b) dp      2 ranks (torchrun), each its own GPU and a whole model with (a)'s policy: 2 × 80
                rows, 2 × 102 GiB pinned (SCALE_OUT_DP_BATCHES=4 gives 16 × 4 rows and 91 GiB per
                rank, should the host run short)
    (c) pp      2 pipeline stages (torchrun), 24 layers each: 2 sub-blocks of 16 × 5 rows,
                weights 8 GPU / 16 CPU per stage, KV and activations on the CPU

One command, from the repository root, on a machine with 2 GPUs and 256 GiB of memory:

    PYTHONPATH=$PWD OUT=/tmp/scale-out python3 benchmarks/scale_out.py [single] [dp] [pp]

It runs the phases one after another (each in its own processes, within SCALE_OUT_BUDGET_S
seconds altogether, default 570), appends their records to $OUT/scale_out.jsonl, logs each phase
to $OUT/<phase>.log, and prints (and writes to $OUT/summary.txt) tokens/s and the ratio to one GPU
— FlexGen's total (tokens / (prefill + decode); for the pipeline, wall time less stage 0's
admission) and the generate wall time's. It needs only torch and corpusgen (no CLI packages). It
exits non-zero when a phase fails; the other phases still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
MODEL = "opt-30b"
PROMPT_LEN, GEN_LEN = 512, 32
GPU_MEM = 16 * GIB
_DP_BATCHES = int(os.environ.get("SCALE_OUT_DP_BATCHES", "5"))
_HOST = {"kv_cache": {"gpu": 0.0, "cpu": 1.0}, "activations": {"gpu": 0.0, "cpu": 1.0}}
PHASES = {  # name: (processes, pipeline stages, policy, sequences, cpu_memory per process, what)
    "single": (1, 1, {"gpu_batch_size": 16, "num_gpu_batches": 5, "weights": {"gpu": 8 / 48, "cpu": 40 / 48}, **_HOST},
               80, 110 * GIB, "one GPU"),
    "dp": (2, 1, {"gpu_batch_size": 16, "num_gpu_batches": _DP_BATCHES, "weights": {"gpu": 8 / 48, "cpu": 40 / 48},
                  **_HOST}, 2 * 16 * _DP_BATCHES, 110 * GIB, "2 GPUs, data parallel"),
    "pp": (2, 2, {"gpu_batch_size": 16, "num_gpu_batches": 5, "weights": {"gpu": 8 / 24, "cpu": 16 / 24}, **_HOST},
           160, 100 * GIB, "2 GPUs, pipeline"),
}
TARGET = 1.7
SMOKE = os.environ.get("SCALE_OUT_SMOKE") == "1"
"""The same steps on a CPU with opt-125m, 1-row GPU batches and 1/16 of the rows: checks the script."""


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or f"benchmarks/results/scale-out-{time.strftime('%Y%m%dT%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- one phase's process

def run_phase(name: str) -> None:
    """One process of a phase (torchrun starts one per rank): corpusgen.bench.run_bench."""
    from corpusgen.bench import run_bench
    from corpusgen.planner.policy import policy_from_dict

    procs, stages, pol, seqs, cpu_mem, what = PHASES[name]
    model, prompt_len, gen_len, gpu_mem, device, dtype = MODEL, PROMPT_LEN, GEN_LEN, GPU_MEM, None, None
    if SMOKE:
        model, prompt_len, gen_len, gpu_mem, cpu_mem, device, dtype = "opt-125m", 8, 3, None, None, "cpu", "float32"
        pol, seqs = {**pol, "gpu_batch_size": 1}, seqs // 16
    rank = int(os.environ.get("RANK", "0"))
    print(f"[{name} rank {rank}] {what}: loading {model} (dummy) and generating {seqs} × {gen_len} tokens", flush=True)
    rec = run_bench(model, dummy=True, prompt_len=prompt_len, gen_len=gen_len, num_seqs=seqs,
                    policy=policy_from_dict(pol), gpu_memory=gpu_mem, cpu_memory=cpu_mem, device=device, dtype=dtype,
                    results_file=out_dir() / "scale_out.jsonl", label=f"scale-out-{name}", pipeline_stages=stages)
    if rec:  # rank 0 (or the single process)
        print(f"[{name}] total {rec['total_tps']:.2f} tok/s, wall {rec['wall_tps']:.2f} tok/s, "
              f"generate wall {rec['generate_wall_s']:.1f} s", flush=True)
        for r in rec.get("ranks", [rec]):
            print(f"[{name} rank {r['rank']}] rows {r['num_seqs']}, prefill {r['prefill_s']:.1f} s, decode "
                  f"{r['decode_s']:.1f} s, generate wall {r['generate_wall_s']:.1f} s, load {r['load_s']:.1f} s, "
                  f"peak GPU {r['peak_gpu_gib']} GiB, peak pinned (counted) {r['peak_pinned_gib']} GiB", flush=True)


# --------------------------------------------------------------------------- the driver

def _stream(proc: subprocess.Popen, log: Path, name: str, t0: float) -> None:
    """Copy the phase's output to stdout and its log; a heartbeat line every 30 s of silence."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(30):
            print(f"... {name}: {time.monotonic() - t0:.0f} s", flush=True)

    threading.Thread(target=beat, daemon=True).start()
    with log.open("w") as f:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            f.write(line)
            f.flush()
    done.set()


def drive(names: list[str]) -> int:
    out = out_dir()
    budget = float(os.environ.get("SCALE_OUT_BUDGET_S", "570"))
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    env["OUT"] = str(out)  # the phases' processes write there too
    info = []
    for cmd in (["nvidia-smi", "-L"], ["nvidia-smi", "topo", "-m"], ["free", "-g"], ["nproc"]):
        try:
            info.append(f"$ {' '.join(cmd)}\n" + subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            info.append(f"$ {' '.join(cmd)}: {e}")
    (out / "env.txt").write_text("\n".join(info))
    print("\n".join(info), flush=True)
    gpus = sum(line.startswith("GPU ") for line in info[0].splitlines())
    if gpus < max(PHASES[n][0] for n in names) and not SMOKE:
        print(f"FAILED: {gpus} GPU(s) visible; these phases need 2", flush=True)
        return 2
    failed = []
    for name in names:
        procs, stages, pol, seqs, cpu_mem, what = PHASES[name]
        left = budget - (time.monotonic() - start)
        if left < 90:
            print(f"SKIPPED {name}: {left:.0f} s of the {budget:.0f} s budget left", flush=True)
            failed.append(name)
            continue
        me = str(Path(__file__).resolve())
        cmd = [sys.executable, me, "run", name] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), me,
            "run", name]
        print(f"=== {name}: {what}; policy {json.dumps(pol)}; {seqs} sequences; timeout {left:.0f} s\n$ "
              f"{' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        reader = threading.Thread(target=_stream, args=(proc, out / f"{name}.log", name, t0))
        reader.start()
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)  # the phase's own process group (torchrun and its ranks)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = "timeout"
        reader.join(timeout=30)
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    text = summary(out / "scale_out.jsonl", names)
    (out / "summary.txt").write_text(text)
    print(text, flush=True)
    if failed:
        print(f"FAILED phases: {', '.join(failed)} (logs in {out})", flush=True)
    return 1 if failed else 0


def summary(results: Path, names: list[str]) -> str:
    """Tokens/s of each phase's latest record and its ratio to one GPU's."""
    recs: dict[str, dict] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            if r.get("label", "").startswith("scale-out-"):
                recs[r["label"].removeprefix("scale-out-")] = r
    base = recs.get("single")
    first = next(iter(recs.values()), {})
    rows = [f"{first.get('model', MODEL)} dummy, prompt {first.get('prompt_len')}, gen {first.get('gen_len')}, "
            f"GPU budget {first.get('gpu_budget_gib')} GiB per GPU, {first.get('gpu_name')}",
            f"{'config':<24}{'rows':>6}{'total tok/s':>13}{'× 1 GPU':>9}{'wall tok/s':>12}{'× 1 GPU':>9}"
            f"{'gen wall s':>12}"]
    for name in names:
        r = recs.get(name)
        if r is None:
            rows.append(f"{PHASES[name][5]:<24}  no result")
            continue
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else "-"  # noqa: E731
        rows.append(f"{PHASES[name][5]:<24}{r['num_seqs']:>6}{r['total_tps']:>13.2f}{ratio('total_tps'):>9}"
                    f"{r['wall_tps']:>12.2f}{ratio('wall_tps'):>9}{r['generate_wall_s']:>12.1f}")
    if base:
        for name in names:
            if name != "single" and name in recs:
                x = recs[name]["total_tps"] / base["total_tps"]
                rows.append(f"{PHASES[name][5]}: {x:.2f}× one GPU (total tok/s) — target ≥ {TARGET}×: "
                            f"{'met' if x >= TARGET else 'NOT met'}")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["run"]:
        run_phase(args[1])
    else:
        unknown = [a for a in args if a not in PHASES]
        if unknown:
            sys.exit(f"unknown phase {unknown[0]!r}; phases are {', '.join(PHASES)}")
        sys.exit(drive(args or ["single", "pp", "dp"]))
