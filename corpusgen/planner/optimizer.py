"""Choose a policy: the fastest one that fits the memory budgets (DESIGN §6).

For every candidate batch shape (gpu_batch_size × num_gpu_batches), compression choice (none, KV,
weights, both) and attention site (GPU, CPU), a linear program picks the placement fractions:

    variables  wg, wc, wd ≥ 0 (weights), kg, kc ≥ 0 (KV), ag ∈ [0, 1] (activations on the GPU),
               per phase φ ∈ {prefill, decode}: z_φ (the GPU batches of a layer), T_φ (a layer)
    minimise   T_pre + (gen_len − 1) · T_dec
    subject to wg + wc + wd = 1,  kg + kc = 1
               z_φ ≥ nb · (compute + kg · attn_kv_gpu + kc · attn_kv_cpu)       (batches compute…)
               z_φ ≥ nb · (kc · io_kv_cpu + (1 − ag) · io_act_cpu)               (…or wait on I/O)
               T_φ ≥ wc · load_cpu + wd · load_disk + nb · (kc · io_kv + (1 − ag) · io_act)  (one link)
               T_φ ≥ dequant + z_φ                                             (overlapped max)
               memory_gpu(wg, kg, ag) ≤ gpu_budget, memory_cpu(wc, kc, ag) ≤ cpu_budget,
               memory_disk(wd) ≤ disk_budget

The coefficients are the cost model's :class:`StepTerms` (decode at the mean context) and the
memory model's terms (affine in the layer counts). A layer's time is a max of affine terms, so the
epigraph variables keep it linear; the LP is FlexGen's, with our schedule's terms. Its optimum is a
lower bound on the exact cost of the candidate (max of means ≤ mean of maxes), which prunes: the
candidates are rounded to whole layers and evaluated with the exact cost model in order of their
bound, stopping once the bound exceeds the best exact throughput found. Rounding tries the
floor/ceil neighbours of each count and, when none fits, steps toward less GPU and CPU memory.

One parametrised cvxpy problem is compiled once and re-solved with new parameter values.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from corpusgen.engine.config import ModelConfig
from corpusgen.errors import BudgetError
from corpusgen.planner.cost_model import CostBreakdown, block_time, step_terms
from corpusgen.planner.hardware import HardwareProfile
from corpusgen.planner.memory import (
    GIB,
    MemoryEstimate,
    RealisedPlacement,
    check_budgets,
    layer_weight_bytes,
    memory_per_tier,
    memory_terms,
    realise,
)
from corpusgen.planner.policy import Compression, Placement, Policy

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
NUM_GPU_BATCHES = tuple(range(1, 9))
GOOD_ENOUGH = 0.9
"""A no-offload plan is returned when it reaches this share of the best plan's throughput."""
_TIE = 1e-3
"""A later candidate (larger block, more compression) must beat the best by this share to replace it."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The chosen policy and what the models predict for it."""

    policy: Policy
    """The policy, with fractions that realise exactly (whole layers)."""
    throughput: float
    """Predicted generated tokens per second."""
    breakdown: CostBreakdown
    """Predicted block time, term by term."""
    memory: MemoryEstimate
    """Bytes per tier."""
    placement: RealisedPlacement
    """Layers per tier."""
    no_offload: bool
    """Everything (weights, KV, activations) stays on the GPU."""
    lps_solved: int
    """Linear programs solved while planning."""
    evaluated: int
    """Rounded placements evaluated with the exact cost model."""


# --------------------------------------------------------------------------- the LP

@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS prints its banner on the process's stdout from C the first time it runs; what
    `corpusgen plan` prints is the plan."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # captured (tests): nothing reaches fd 1 anyway
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@functools.lru_cache(maxsize=1)
def _problem():
    import cvxpy as cp

    v = {k: cp.Variable(nonneg=True, name=k) for k in ("wg", "wc", "wd", "kg", "kc", "ag")}
    P = {k: cp.Parameter(name=k) for k in (
        "load_cpu", "load_disk", "dequant", "steps",
        *(f"{n}_{ph}" for n in ("c", "ag_", "ac_", "iok", "ioa") for ph in "pd"),
        "gW", "gK", "gA", "cW", "cK", "cA", "dW", "gpu_room", "cpu_room", "disk_room")}
    z = {ph: cp.Variable(nonneg=True) for ph in "pd"}
    T = {ph: cp.Variable(nonneg=True) for ph in "pd"}
    cons = [v["wg"] + v["wc"] + v["wd"] == 1, v["kg"] + v["kc"] == 1, v["ag"] <= 1,
            P["gW"] * v["wg"] + P["gK"] * v["kg"] + P["gA"] * v["ag"] <= P["gpu_room"],
            P["cW"] * v["wc"] + P["cK"] * v["kc"] + P["cA"] * v["ag"] <= P["cpu_room"],
            P["dW"] * v["wd"] <= P["disk_room"]]
    for ph in "pd":
        cons += [
            z[ph] >= P[f"c_{ph}"] + P[f"ag__{ph}"] * v["kg"] + P[f"ac__{ph}"] * v["kc"],
            z[ph] >= P[f"iok_{ph}"] * v["kc"] + P[f"ioa_{ph}"] * (1 - v["ag"]),
            T[ph] >= P["load_cpu"] * v["wc"] + P["load_disk"] * v["wd"]
            + P[f"iok_{ph}"] * v["kc"] + P[f"ioa_{ph}"] * (1 - v["ag"]),  # one shared host link
            T[ph] >= P["dequant"] + z[ph],
        ]
    prob = cp.Problem(cp.Minimize(T["p"] + P["steps"] * T["d"]), cons)
    solver = next((s for s in ("HIGHS", "CLARABEL") if s in cp.installed_solvers()), None)
    return prob, v, P, solver


def _offload_policy(base: Policy, n: int, n_wg: int, n_wgc: int, n_kg: int, act_gpu: bool) -> Policy:
    return base.replace(
        weights=Placement(gpu=n_wg / n, cpu=n_wgc / n - n_wg / n),
        kv_cache=Placement(gpu=n_kg / n, cpu=1.0 - n_kg / n),
        activations=Placement(gpu=float(act_gpu), cpu=1.0 - float(act_gpu)),
    )


def _solve_lp(config: ModelConfig, base: Policy, hw: HardwareProfile, prompt_len: int, gen_len: int,
              dtype_bytes: int, budgets: tuple[int, int, int | None]) -> tuple[float, dict[str, float]] | None:
    """LP bound (seconds of the block) and fractions for one candidate, or None when infeasible."""
    import cvxpy as cp

    n, nb = config.num_layers, base.num_gpu_batches
    pre = step_terms(config, base, hw, q_len=prompt_len, ctx=prompt_len, dtype_bytes=dtype_bytes)
    dec = step_terms(config, base, hw, q_len=1, ctx=prompt_len + (gen_len + 1) / 2, dtype_bytes=dtype_bytes)
    gpu_b, cpu_b, disk_b = budgets
    flags = {"weight_staging": True, "kv_staging": not base.cpu_attention, "cpu_attention_ws": base.cpu_attention,
             "kv_dequant": base.compress_kv is not None}

    def mem(**counts: float) -> tuple[float, float, float]:
        c = {"w_gpu": 0, "w_cpu": 0, "w_disk": 0, "kv_gpu": 0, "kv_cpu": 0, "act_gpu": 0} | counts
        t = memory_terms(config, base, prompt_len, gen_len, dtype_bytes, disk_staging=disk_staging, **flags, **c)
        return tuple(sum(b for k, b in t.items() if k.startswith(tier)) / GIB for tier in ("gpu", "cpu", "disk"))

    # Bounce buffers for disk layers are reserved only when GPU + CPU cannot hold every layer.
    disk_staging = False
    g0, c0, _ = mem()
    gw, cw = mem(w_gpu=n)[0] - g0, mem(w_cpu=n)[1] - c0
    gk, ck = mem(kv_gpu=n)[0] - g0, mem(kv_cpu=n)[1] - c0
    disk_staging = gw + min(gk, ck) > (gpu_b / GIB - g0) + (cpu_b / GIB - c0)
    g0, c0, _ = mem()
    ga, ca = mem(act_gpu=1)[0] - g0, mem(act_gpu=1)[1] - c0
    if g0 + min(0.0, ga) > gpu_b / GIB or c0 + min(0.0, ca) > cpu_b / GIB:
        return None
    prob, v, P, solver = _problem()
    vals = {
        "load_cpu": dec.load_cpu, "load_disk": dec.load_disk, "dequant": dec.dequant, "steps": gen_len - 1,
        "gW": gw, "gK": gk, "gA": ga, "cW": cw, "cK": ck, "cA": ca, "dW": mem(w_disk=n)[2],
        "gpu_room": gpu_b / GIB - g0, "cpu_room": cpu_b / GIB - c0,
        "disk_room": 1e9 if disk_b is None else disk_b / GIB,
    }
    for ph, t in (("p", pre), ("d", dec)):
        vals |= {f"c_{ph}": nb * t.compute, f"ag__{ph}": nb * t.attn_kv_gpu, f"ac__{ph}": nb * t.attn_kv_cpu,
                 f"iok_{ph}": nb * t.io_kv_cpu, f"ioa_{ph}": nb * t.io_act_cpu}
    for k, x in vals.items():
        P[k].value = x
    try:
        with _quiet_stdout():
            prob.solve(solver=solver)
    except cp.SolverError:
        return None
    if prob.status not in ("optimal", "optimal_inaccurate"):
        return None
    seconds = n * prob.value + pre.head + (gen_len - 1) * dec.head
    return seconds, {k: float(min(1.0, max(0.0, x.value))) for k, x in v.items()}


def _quick_bound(config: ModelConfig, base: Policy, hw: HardwareProfile, prompt_len: int, gen_len: int,
                 dtype_bytes: int, gpu_budget: int) -> float | None:
    """An optimistic throughput for a candidate, without the LP: the least GPU memory it needs, the
    most layers that could then stay resident, the rest loaded at CPU speed; compute at its least."""
    n, nb = config.num_layers, base.num_gpu_batches
    t = memory_terms(config, base, prompt_len, gen_len, dtype_bytes, w_gpu=0, w_cpu=0, w_disk=0, kv_gpu=0,
                     kv_cpu=0, act_gpu=0, weight_staging=False, disk_staging=False, kv_staging=False,
                     cpu_attention_ws=False, kv_dequant=False)
    g_min = sum(v for k, v in t.items() if k.startswith("gpu.")) - t["gpu.activation_staging"]
    if g_min > gpu_budget:
        return None
    fit = min(n, (gpu_budget - g_min) // layer_weight_bytes(config, dtype_bytes, base.compress_weights))
    total = 0.0
    for q_len, ctx, steps in ((prompt_len, prompt_len, 1), (1, prompt_len + (gen_len + 1) / 2, gen_len - 1)):
        s = step_terms(config, base, hw, q_len=q_len, ctx=ctx, dtype_bytes=dtype_bytes)
        layer = max(s.load_cpu * (n - fit) / n, s.dequant + nb * (s.compute + min(s.attn_kv_gpu, s.attn_kv_cpu)))
        total += steps * (n * layer + s.head)
    return base.block_size * gen_len / total


# --------------------------------------------------------------------------- rounding

def _fits(m: MemoryEstimate, budgets: tuple[int, int, int | None]) -> str | None:
    """The first tier over budget, or None."""
    for tier, b in zip(("gpu", "cpu", "disk"), budgets):
        if b is not None and getattr(m, tier) > b:
            return tier
    return None


def _roundings(n: int, f: dict[str, float]) -> Iterable[tuple[int, int, int, bool]]:
    def fc(x: float) -> set[int]:
        return {min(n, max(0, math.floor(x * n + 1e-6))), min(n, max(0, math.ceil(x * n - 1e-6)))}

    acts = {f["ag"] >= 0.5} | ({True, False} if 1e-6 < f["ag"] < 1 - 1e-6 else set())
    for wg, wgc, kg, act in itertools.product(fc(f["wg"]), fc(f["wg"] + f["wc"]), fc(f["kg"]), acts):
        if wgc >= wg:
            yield wg, wgc, kg, act


def _step_down(n: int, wg: int, wgc: int, kg: int, act: bool, over: str, disk_ok: bool):
    """One step toward less memory on the tier ``over``, or None when nothing is left to move."""
    if over == "gpu":
        if kg > 0:
            return wg, wgc, kg - 1, act
        if wg > 0:
            return wg - 1, wgc, kg, act
        if act:
            return wg, wgc, kg, False
    elif over == "cpu":
        if wgc > wg and disk_ok:
            return wg, wgc - 1, kg, act
        if kg < n:
            return wg, wgc, kg + 1, act
    return None


def _evaluate(config, pol, hw, prompt_len, gen_len, dtype_bytes):
    r = realise(pol, config)
    return block_time(config, pol, hw, prompt_len, gen_len, dtype_bytes, placement=r), r


# --------------------------------------------------------------------------- plan

def _compressions(allow: bool) -> list[tuple[Compression | None, Compression | None]]:
    c = Compression(bits=4, group_size=64)
    return [(None, None), (None, c), (c, None), (c, c)] if allow else [(None, None)]


GPU_HEADROOM = 0.08
"""Share of the GPU budget the planner leaves unplanned: the allocator's fragmentation and the
kernels' workspaces take memory the memory model does not count, so a plan that fills the budget
runs out of memory."""


def plan(config: ModelConfig, profile: HardwareProfile, *, prompt_len: int, gen_len: int, gpu_budget: int,
         cpu_budget: int, disk_budget: int | None = None, dtype_bytes: int = 2, allow_compression: bool = True,
         candidates: Iterable[tuple[int, int]] | None = None) -> Plan:
    """The fastest policy within the budgets (bytes; ``disk_budget`` None = unlimited).

    ``candidates`` are (gpu_batch_size, num_gpu_batches) pairs; by default every pair of
    :data:`GPU_BATCH_SIZES` × :data:`NUM_GPU_BATCHES`. Raises :class:`BudgetError` when nothing fits.
    """
    # Headroom the accounting does not see: the CUDA context, allocator fragmentation, and the
    # transient second copy of a dequantised layer while the next one is being prepared.
    gpu_budget = int(gpu_budget * (1 - GPU_HEADROOM))
    budgets = (gpu_budget, cpu_budget, disk_budget)
    n = config.num_layers
    shapes = sorted(set(candidates or itertools.product(GPU_BATCH_SIZES, NUM_GPU_BATCHES)))
    comps = _compressions(allow_compression)
    hw = profile
    args = (hw, prompt_len, gen_len, dtype_bytes)
    best: tuple[float, Policy, CostBreakdown, RealisedPlacement] | None = None
    best_resident = None
    lps = evaluated = 0

    def consider(pol: Policy) -> tuple[float, Policy, CostBreakdown, RealisedPlacement] | None:
        nonlocal evaluated
        evaluated += 1
        bt, r = _evaluate(config, pol, *args)
        return bt.throughput, pol, bt, r

    offload: list[tuple[float, Policy]] = []
    for (b, nb), (cw, ck) in itertools.product(shapes, comps):
        resident = Policy(gpu_batch_size=b, num_gpu_batches=nb, compress_weights=cw, compress_kv=ck)
        if _fits(memory_per_tier(config, resident, prompt_len, gen_len, dtype_bytes), budgets) is None:
            got = consider(resident)
            if best_resident is None or got[0] > best_resident[0] * (1 + _TIE):
                best_resident = got
            continue  # offloading this candidate can only add transfers
        for cpu_attn in (False, True):
            base = resident.replace(cpu_attention=cpu_attn)
            quick = _quick_bound(config, base, hw, prompt_len, gen_len, dtype_bytes, gpu_budget)
            if quick is not None:
                offload.append((quick, base))
    best = best_resident
    # Branch and bound: candidates in order of a cheap optimistic bound; the LP's (tighter) bound
    # next; the exact cost model last. Stop once a bound cannot beat the best exact throughput.
    for quick, base in sorted(offload, key=lambda x: -x[0]):
        if best is not None and quick <= best[0]:
            break
        lps += 1
        sol = _solve_lp(config, base, hw, prompt_len, gen_len, dtype_bytes, budgets)
        if sol is None or (best is not None and base.block_size * gen_len / sol[0] <= best[0]):
            continue
        for wg, wgc, kg, act in _roundings(n, sol[1]):
            state = (wg, wgc, kg, act)
            for _ in range(4 * n + 2):
                pol = _offload_policy(base, n, *state)
                over = _fits(memory_per_tier(config, pol, prompt_len, gen_len, dtype_bytes), budgets)
                if over is None:
                    break
                state = _step_down(n, *state, over, disk_budget is None or disk_budget > 0)
                if state is None:
                    break
            if state is None or over is not None:
                continue
            got = consider(pol)
            if best is None or got[0] > best[0] * (1 + _TIE):
                best = got
    if best is None:
        _raise_infeasible(config, min(shapes), comps[-1], prompt_len, gen_len, dtype_bytes, budgets)
    if best_resident is not None and best_resident[0] >= GOOD_ENOUGH * best[0]:
        best = best_resident
    tput, pol, bt, r = best
    return Plan(policy=pol, throughput=tput, breakdown=bt, placement=r,
                memory=memory_per_tier(config, pol, prompt_len, gen_len, dtype_bytes),
                no_offload=pol.weights.gpu == 1.0 and pol.kv_cache.gpu == 1.0 and r.activations_on_gpu,
                lps_solved=lps, evaluated=evaluated)


def _raise_infeasible(config, shape, comp, prompt_len, gen_len, dtype_bytes, budgets) -> None:
    """Explain why the least demanding candidate does not fit (weights on disk, KV on the CPU)."""
    gpu_b, cpu_b, disk_b = budgets
    b = shape[0]
    base = Policy(gpu_batch_size=b, num_gpu_batches=1, compress_weights=comp[0], compress_kv=comp[1],
                  cpu_attention=True, kv_cache=Placement(gpu=0.0, cpu=1.0), activations=Placement(gpu=0.0, cpu=1.0))
    where = "disk" if disk_b is None or disk_b > 0 else "CPU"
    pol = base.replace(weights=Placement(gpu=0.0, cpu=0.0 if where == "disk" else 1.0))
    m = memory_per_tier(config, pol, prompt_len, gen_len, dtype_bytes)
    prefix = (f"no policy fits {config.name} (even gpu_batch_size {b}, weights on {where}, KV on the CPU"
              f"{', 4-bit compressed' if comp[0] else ''}): ")
    try:
        check_budgets(m, gpu_b, cpu_b, disk_b)
    except BudgetError as e:
        raise BudgetError(prefix + str(e)) from None
    raise BudgetError(prefix + "the budgets leave no room for a feasible placement; raise engine.gpu_memory "
                      "or engine.cpu_memory")
