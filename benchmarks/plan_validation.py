"""Make the planner-validation configurations (run here, where cvxpy is) for benchmarks/gpu_suite.py.

    python benchmarks/plan_validation.py [--profile policies/hardware-nvidia-h200.yaml]

For each (model, budgets, compression) below, the planner picks a policy and predicts its
throughput; a small grid of hand-written policies is added for one case. Everything is written
to benchmarks/plan_validation.json; `gpu_suite.py bench-file benchmarks/plan_validation.json`
measures each one with the same workload (prompt 512, generate 32) and records predicted beside
measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corpusgen.engine.config import preset
from corpusgen.planner.cost_model import block_time
from corpusgen.planner.hardware import load_profile
from corpusgen.planner.optimizer import plan
from corpusgen.planner.policy import policy_from_dict

GIB = 2**30
CASES = [  # name, model, gpu GiB, cpu GiB, compression allowed
    ("auto-opt6.7b-unconstrained", "opt-6.7b", 130, 110, False),
    ("auto-opt6.7b-16g", "opt-6.7b", 16, 110, False),
    ("auto-opt6.7b-16g-c", "opt-6.7b", 16, 110, True),
    ("auto-opt30b-unconstrained", "opt-30b", 130, 110, False),
    ("auto-opt30b-16g", "opt-30b", 16, 110, False),
    ("auto-opt30b-16g-c", "opt-30b", 16, 110, True),
    ("auto-llama70b-16g-c", "llama-2-70b", 16, 110, True),
]
GRID = [  # hand-written policies for opt-6.7b at 16 GiB, no compression
    ("grid-opt6.7b-16g-a", dict(gpu_batch_size=32, num_gpu_batches=4, weights={"gpu": 0.5, "cpu": 0.5},
                                kv_cache={"gpu": 0.0, "cpu": 1.0})),
    ("grid-opt6.7b-16g-b", dict(gpu_batch_size=48, num_gpu_batches=3, weights={"gpu": 0.4, "cpu": 0.6},
                                kv_cache={"gpu": 0.0, "cpu": 1.0})),
    ("grid-opt6.7b-16g-c", dict(gpu_batch_size=16, num_gpu_batches=8, weights={"gpu": 0.6, "cpu": 0.4},
                                kv_cache={"gpu": 0.0, "cpu": 1.0})),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="policies/hardware-nvidia-h200.yaml")
    ap.add_argument("--out", default="benchmarks/plan_validation.json")
    args = ap.parse_args()
    hw = load_profile(args.profile)
    out = []
    for name, model, g, c, comp in CASES:
        p = plan(preset(model), hw, prompt_len=512, gen_len=32, gpu_budget=g * GIB, cpu_budget=c * GIB,
                 allow_compression=comp)
        out.append(dict(name=name, model=model, policy=p.policy.to_dict(), gpu_memory=g * GIB, cpu_memory=c * GIB,
                        num_seqs=p.policy.block_size, predicted_tps=p.throughput))
        print(name, round(p.throughput, 1), p.policy.to_dict())
    for name, pol in GRID:
        policy = policy_from_dict(pol)
        bt = block_time(preset("opt-6.7b"), policy, hw, 512, 32)
        out.append(dict(name=name, model="opt-6.7b", policy=policy.to_dict(), gpu_memory=16 * GIB,
                        cpu_memory=110 * GIB, num_seqs=policy.block_size, predicted_tps=bt.throughput))
        print(name, round(bt.throughput, 1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
