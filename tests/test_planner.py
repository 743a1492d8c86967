"""The planner: whole-layer placement, memory accounting, cost model, optimizer, hardware profiles."""

from __future__ import annotations

import math

import pytest

from corpusgen.engine.config import preset
from corpusgen.errors import BudgetError
from corpusgen.planner.cost_model import block_time
from corpusgen.engine.profile import measure
from corpusgen.planner.hardware import BUILTIN, HardwareProfile, load_profile, save_profile
from corpusgen.planner.memory import check_budgets, kv_layer_bytes, layer_weight_bytes, memory_per_tier, realise
from corpusgen.planner.optimizer import plan
from corpusgen.planner.policy import Compression, Placement, Policy, policy_from_dict

GIB = 2**30
H200 = BUILTIN["h200"]
OPT30 = preset("opt-30b")
SMALL = [(8, 1), (16, 2), (32, 2), (48, 3), (64, 4)]


def _offload(**kw) -> Policy:
    base = {"gpu_batch_size": 32, "num_gpu_batches": 2, "weights": Placement(gpu=0.2, cpu=0.8),
            "kv_cache": Placement(gpu=0.0, cpu=1.0), "activations": Placement(gpu=0.0, cpu=1.0)}
    return Policy(**(base | kw))


def _faster(hw: HardwareProfile, f: float) -> HardwareProfile:
    return hw.replace(h2d_pinned_gbps=hw.h2d_pinned_gbps * f, d2h_pinned_gbps=hw.d2h_pinned_gbps * f,
                      disk_read_gbps=hw.disk_read_gbps * f, cpu_attention_gbps=hw.cpu_attention_gbps * f)


# --------------------------------------------------------------------------- realise

def test_realise_rounds_to_whole_layers_and_says_so():
    """The engine places whole layers; 0.2 of 48 layers must become 10 layers (0.2083) and the
    rounding must be reported, since the planner and engine both rely on this exact rule."""
    r = realise(_offload(weights=Placement(gpu=0.2, cpu=0.5)), OPT30)
    assert len(r.weights_gpu) == 10 and round(r.fraction("weights", "gpu"), 4) == 0.2083
    assert len(r.weights_gpu) + len(r.weights_cpu) == round(0.7 * 48)  # cumulative rounding: 34
    assert len(r.weights_disk) == 48 - 34
    assert any("10 of 48 layers (0.2083)" in note for note in r.notes)


def test_realise_partitions_layers_evenly_and_deterministically():
    """Every layer is on exactly one tier, GPU layers are spread over depth, and the same policy
    always gives the same layers (the engine calls realise to place them)."""
    for g, c, kv in [(0.0, 1.0, 0.0), (0.33, 0.33, 0.5), (1.0, 0.0, 1.0), (0.1, 0.0, 0.9)]:
        pol = _offload(weights=Placement(gpu=g, cpu=c), kv_cache=Placement(gpu=kv, cpu=1 - kv))
        r = realise(pol, OPT30)
        assert r == realise(pol, OPT30)
        assert sorted(r.weights_gpu + r.weights_cpu + r.weights_disk) == list(range(48))
        assert sorted(r.kv_gpu + r.kv_cpu) == list(range(48))
        assert realise(r.as_policy(pol), OPT30).weights_gpu == r.weights_gpu
    r = realise(_offload(weights=Placement(gpu=0.25, cpu=0.75)), OPT30)
    gaps = {b - a for a, b in zip(r.weights_gpu, r.weights_gpu[1:])}
    assert gaps == {4}
    assert realise(_offload(activations=Placement(gpu=0.5, cpu=0.5)), OPT30).activations_on_gpu


# --------------------------------------------------------------------------- memory

def test_memory_terms_add_up_and_follow_the_placement():
    """The engine allocates these terms one by one; totals must be their sums, and buffers exist
    only when the placement needs them (staging only with offloaded layers, etc.)."""
    pol = _offload()
    m = memory_per_tier(OPT30, pol, 512, 32)
    L = layer_weight_bytes(OPT30)
    assert m.terms["gpu.layer_weights"] == 10 * L and m.terms["cpu.layer_weights"] == 38 * L
    assert m.terms["gpu.weight_staging"] == 2 * L and "cpu.weight_staging" not in m.terms  # no disk layers
    assert m.terms["cpu.kv_cache"] == 48 * kv_layer_bytes(OPT30, 64, 544)
    assert m.terms["gpu.kv_staging"] == 2 * kv_layer_bytes(OPT30, 32, 544)
    for tier in ("gpu", "cpu", "disk"):
        assert getattr(m, tier) == sum(v for k, v in m.terms.items() if k.startswith(tier + "."))
    cpu_attn = memory_per_tier(OPT30, pol.replace(cpu_attention=True), 512, 32)
    assert "gpu.kv_staging" not in cpu_attn.terms and "cpu.attention_workspace" in cpu_attn.terms
    resident = memory_per_tier(OPT30, Policy(gpu_batch_size=4), 512, 32)
    assert "gpu.weight_staging" not in resident.terms and resident.cpu == 0 and resident.disk == 0


def test_memory_terms_follow_the_prefill_chunk_and_packed_kv_loads():
    """A chunked prompt step holds c columns' transients, not p; a 4-bit host cache attended in
    place queues every GPU batch's KV of a layer at once (num_gpu_batches + 1 staged, not 2)."""
    pol = _offload()
    whole = memory_per_tier(OPT30, pol, 512, 32).terms
    chunked = memory_per_tier(OPT30, pol.replace(prefill_chunk=128), 512, 32).terms
    for term in ("gpu.attention_scores", "gpu.mlp_workspace", "gpu.activation_staging", "cpu.activations"):
        assert chunked[term] == pytest.approx(whole[term] * 128 / 512), term
    assert memory_per_tier(OPT30, pol.replace(prefill_chunk=4096), 512, 32).terms == whole  # longer than p: whole
    c4 = Compression(bits=4, group_size=64)
    packed = memory_per_tier(OPT30, pol.replace(compress_kv=c4), 512, 32).terms
    assert packed["gpu.kv_staging"] == (pol.num_gpu_batches + 1) * kv_layer_bytes(OPT30, 32, 544, 2, c4)
    c8 = Compression(bits=8, group_size=64)
    eight = memory_per_tier(OPT30, pol.replace(compress_kv=c8), 512, 32).terms
    assert eight["gpu.kv_staging"] == 2 * kv_layer_bytes(OPT30, 32, 544, 2, c8)


def test_compressed_sizes():
    """4-bit group-64 storage is ~0.28 of fp16 (codes + fp16 min/scale per group) for both
    weights and KV; the planner's whole advantage from compression rests on these numbers."""
    c = Compression(bits=4, group_size=64)
    h = OPT30.hidden_size
    assert layer_weight_bytes(OPT30) == (12 * h * h + 9 * h + 4 * h) * 2  # 6 matrices, 9 bias/norm vectors, fc1 bias
    ratio = layer_weight_bytes(OPT30, 2, c) / layer_weight_bytes(OPT30)
    assert 0.27 < ratio < 0.29
    assert 0.27 < kv_layer_bytes(OPT30, 8, 100, 2, c) / kv_layer_bytes(OPT30, 8, 100) < 0.29


def test_check_budgets_names_tier_shortfall_and_biggest_terms():
    """A user with a 16 GiB card must read which budget is short, by how much, and what is big."""
    m = memory_per_tier(OPT30, _offload(weights=Placement(gpu=0.5, cpu=0.5)), 512, 32)
    with pytest.raises(BudgetError) as e:
        check_budgets(m, 16 * GIB, 1000 * GIB)
    msg = str(e.value)
    assert msg.startswith("GPU budget short by ") and f"{(m.gpu - 16 * GIB) / GIB:.2f} GiB" in msg
    assert "gpu.layer_weights" in msg and "\n" not in msg
    with pytest.raises(BudgetError, match="CPU budget short"):
        check_budgets(m, 1000 * GIB, 10 * GIB)
    check_budgets(m, m.gpu, m.cpu)


# --------------------------------------------------------------------------- cost model

def test_decode_step_is_bounded_by_weight_traffic():
    """With OPT-30B's weights on the CPU, a decode step cannot beat moving them over the link
    (DESIGN §8: 56 GB at 55 GB/s ≈ 1 s); the model must never predict faster than physics."""
    pol = _offload(weights=Placement(gpu=0.0, cpu=1.0), gpu_batch_size=48, num_gpu_batches=3)
    bt = block_time(OPT30, pol, H200, 512, 32)
    step = bt.decode_s / 31
    assert step >= 48 * layer_weight_bytes(OPT30) / (H200.h2d_pinned_gbps * 1e9)
    assert bt.throughput == pytest.approx(144 * 32 / (bt.prefill_s + bt.decode_s))
    assert bt.decode.weight_load_s == pytest.approx(31 * 48 * layer_weight_bytes(OPT30) / 55e9)


def test_overlap_and_bandwidth_only_help():
    """Turning overlap off, or slowing a link, must never predict more throughput: the optimizer
    trusts these directions when it trades placements."""
    for pol in (_offload(), _offload(cpu_attention=True), _offload(compress_kv=Compression()),
                _offload(weights=Placement(gpu=0.1, cpu=0.4), compress_weights=Compression())):
        t = [block_time(OPT30, pol, _faster(H200, f), 512, 32).throughput for f in (0.5, 1, 2, 4)]
        assert t == sorted(t)
        assert block_time(OPT30, pol.replace(overlap=False), H200, 512, 32).throughput <= t[1]


# --------------------------------------------------------------------------- optimizer

@pytest.mark.parametrize("model,gpu,cpu,disk,comp", [
    ("opt-30b", 16, 110, None, True),
    ("opt-30b", 16, 110, None, False),
    ("opt-66b", 12, 64, None, False),
    ("llama-2-70b", 24, 48, 200, True),
    ("opt-13b", 4, 20, 0, True),
])
def test_plans_respect_budgets(model, gpu, cpu, disk, comp):
    """Budgets are hard (DESIGN §5): the returned policy, placed as the engine places it, fits."""
    cands = None if (model, comp) == ("opt-30b", True) else SMALL
    p = plan(preset(model), H200, prompt_len=512, gen_len=32, gpu_budget=gpu * GIB, cpu_budget=cpu * GIB,
             disk_budget=None if disk is None else disk * GIB, allow_compression=comp, candidates=cands)
    m = memory_per_tier(preset(model), p.policy, 512, 32)
    assert m == p.memory and m.gpu <= gpu * GIB and m.cpu <= cpu * GIB
    assert disk is None or m.disk <= disk * GIB
    assert realise(p.policy, preset(model)) == p.placement and not p.placement.notes  # realises exactly
    assert policy_from_dict(p.policy.to_dict()) == p.policy  # and survives a YAML round trip
    assert p.throughput == pytest.approx(p.breakdown.throughput) and p.throughput > 0
    assert comp or (p.policy.compress_weights is None and p.policy.compress_kv is None)


def test_infeasible_budgets_raise_with_the_short_tier():
    """Nothing fits → one BudgetError that names the short budget and the shortfall, for the
    least demanding candidate (so the user knows how much memory to add)."""
    with pytest.raises(BudgetError, match=r"GPU budget short by \d+\.\d\d GiB"):
        plan(OPT30, H200, prompt_len=512, gen_len=32, gpu_budget=GIB // 2, cpu_budget=100 * GIB, candidates=SMALL)
    with pytest.raises(BudgetError, match=r"CPU budget short by \d+\.\d\d GiB"):
        plan(OPT30, H200, prompt_len=512, gen_len=32, gpu_budget=8 * GIB, cpu_budget=4 * GIB, disk_budget=0,
             candidates=SMALL)


def test_more_bandwidth_never_plans_slower():
    """Monotonicity: a faster link can always run the old plan at least as fast, so the planner
    must never predict less throughput on it."""
    prev = 0.0
    for f in (0.5, 1, 2):
        p = plan(OPT30, _faster(H200, f), prompt_len=512, gen_len=32, gpu_budget=16 * GIB, cpu_budget=110 * GIB,
                 candidates=SMALL)
        assert p.throughput >= prev * (1 - 1e-9)
        prev = p.throughput


def test_no_offload_when_the_model_fits():
    """OPT-125M fits an 80 GiB GPU many times over: the plan must keep everything resident."""
    p = plan(preset("opt-125m"), H200, prompt_len=512, gen_len=32, gpu_budget=80 * GIB, cpu_budget=100 * GIB)
    assert p.no_offload and p.lps_solved == 0
    assert p.memory.cpu == 0 and p.memory.disk == 0 and p.policy.block_size >= 64


# --------------------------------------------------------------------------- hardware

def test_profile_yaml_round_trip_and_matmul_interpolation(tmp_path):
    """Profiles are saved once and reused; the GEMM table is read by interpolation in m."""
    path = save_profile(H200, tmp_path / "hw.yaml")
    assert load_profile(path) == H200
    rates = [H200.matmul_tflops(m) for m in (0.5, 1, 3, 48, 700, 16384, 10**6)]
    assert rates == sorted(rates) and rates[-1] == 760 and math.isclose(rates[1], 3.5)


def test_measure_on_cpu(tmp_path):
    """`corpusgen profile` must run on a CPU-only machine (the GPU tier is the CPU there)."""
    prof = measure("cpu", tmp_path, copy_mb=8, disk_mb=16)
    assert prof.h2d_pinned_gbps > 0 and prof.disk_read_gbps > 0 and prof.matmul_tflops(32) > 0
    assert prof.cpu_attention_gbps > 0 and prof.gpu_dequant_gbps > 0
    assert load_profile(save_profile(prof, tmp_path / "p.yaml")) == prof
    assert not list(tmp_path.glob(".corpusgen-probe-*"))


def test_compress_kv_rotate_option():
    """``compress_kv.rotate`` (K/V quantised in a rotated basis) defaults to on, can be switched
    off to A/B it, survives a YAML round trip, and is refused where it means nothing (weights)
    or is not a boolean."""
    from corpusgen.errors import PolicyError

    assert policy_from_dict({"compress_kv": {"bits": 4}}).compress_kv.rotate
    assert policy_from_dict({"compress_kv": True}).compress_kv.rotate
    off = policy_from_dict({"compress_kv": {"bits": 4, "group_size": 64, "rotate": False}})
    assert off.compress_kv == Compression(bits=4, group_size=64, rotate=False)
    assert off.to_dict()["compress_kv"] == {"bits": 4, "group_size": 64, "rotate": False}
    assert policy_from_dict(off.to_dict()) == off
    for bad in ({"compress_weights": {"bits": 4, "rotate": True}}, {"compress_kv": {"rotate": "yes"}}):
        with pytest.raises(PolicyError, match="rotate"):
            policy_from_dict(bad)
