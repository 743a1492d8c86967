"""Predicted time of one block (prefill + decode) for a model, a policy and a machine (DESIGN §6).

Pure functions over dataclasses; no torch. The schedule modelled is the engine's (schedule.py):
a block of ``b × nb`` rows (``b`` = gpu_batch_size, ``nb`` = num_gpu_batches) runs one prefill step
(``prompt_len`` tokens) and ``gen_len - 1`` decode steps (the first token comes from prefill). In
every step, for every layer ``j``:

* **weight load** — layer ``j+1``'s weights (wrapping to layer 0 of the next step), unless
  GPU-resident, cross the link while layer ``j`` computes: ``L / h2d`` from CPU, ``L / disk_read +
  L / h2d`` from disk (``L`` as stored: compressed weights travel compressed).
* **compute**, per GPU batch — matmuls ``2 · b · q_len · P`` FLOPs at the GEMM rate for
  ``m = b · q_len`` rows (``P`` = matmul weights of a layer); prefill attention ``2 · b · heads ·
  head_dim · p²`` FLOPs (causal); decode attention on the GPU scans K and V at
  ``gpu_attention_gbps`` (and dequantises them first when compressed). Compressed weights are
  dequantised once per layer per block (``L₁₆ / gpu_dequant_gbps``).
* **cache I/O**, per GPU batch — KV on the CPU with attention on the GPU: load the batch's cache
  (``ctx - 1`` tokens) host→GPU and store the new token's K/V GPU→host; prefill stores the prompt's
  K/V. Activations on the CPU: load and store the batch's hidden states.
* **CPU attention** (``cpu_attention``, KV on the CPU, decode): q/k/v of the new token go GPU→CPU,
  attention runs on the CPU over the cache (``ctx`` tokens at ``cpu_attention_gbps``, plus CPU
  dequantisation when compressed), the output comes back. It is on the batch's critical path, so it
  counts as compute.

Overlap on: ``layer = max(load(j+1) + nb · cache I/O, dequant + nb · max(compute, cache I/O))`` (weights and cache share the link); overlap off: the
sum of all. Each step adds the head (logits of the block). Throughput = ``block · gen_len /
(prefill + decode)``. Every term is affine in the context length, so decode steps are summed
exactly by evaluating the terms at the first and last context and interpolating.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

from corpusgen.engine.config import ModelConfig
from corpusgen.planner.hardware import GB, HardwareProfile
from corpusgen.planner.memory import RealisedPlacement, kv_layer_bytes, layer_matmul_params, layer_weight_bytes, realise
from corpusgen.planner.policy import Policy


HOST_OVERHEAD_S = 5.2e-4
"""Host time to issue one unit's kernels for one GPU batch (eager PyTorch, ~16 launches). A GPU
batch-layer never takes less. Calibrated, conservatively, against OPT-6.7B's decode step at batch 4,
where the host, not the GPU, sets the pace (docs/benchmarks.md#the-planner-predicted-against-measured)."""

KV_COMPRESS_HOST_S = 9e-4
"""Extra host time per layer per GPU batch when the KV cache is compressed: quantising the new
token's K and V and dequantising the cache are ~50 more eager launches. Calibrated against
OPT-6.7B's decode step at 16 rows with 4-bit KV on the GPU, compared with the same step
uncompressed."""

KV_DEQUANT_EFFICIENCY = 0.4
"""Share of the profiled dequantisation rate (weights: one contiguous tensor) that a KV cache
prefix reaches: it is a strided slice of the cache, made contiguous before the kernel, and
dequantised into a fresh buffer every step. Calibrated against OPT-30B at 64 × 7 with 4-bit KV on
the host: the dequantisation rate its decode step implies over the profiled rate."""


@dataclass(frozen=True, kw_only=True)
class StepTerms:
    """Seconds of one layer in one token step, per placement choice (the LP's coefficients)."""

    load_cpu: float
    """Loading one layer's weights from pinned CPU memory."""
    load_disk: float
    """Loading one layer's weights from disk (disk → pinned → GPU)."""
    dequant: float
    """Dequantising one layer's weights on the GPU (once per block)."""
    compute: float
    """Per GPU batch: matmuls and prefill attention, wherever things live."""
    attn_kv_gpu: float
    """Per GPU batch: extra compute when the layer's KV is on the GPU."""
    attn_kv_cpu: float
    """Per GPU batch: extra compute when the layer's KV is on the CPU (GPU attention over the loaded
    cache, or the CPU-attention path)."""
    cpu_attention: bool
    """``attn_kv_cpu`` is CPU attention (decode, cpu_attention on)."""
    io_kv_cpu: float
    """Per GPU batch: cache I/O when the layer's KV is on the CPU."""
    io_act_cpu: float
    """Per GPU batch: hidden-state I/O when activations rest on the CPU."""
    head: float
    """Per step: logits of the whole block."""
    host: float = HOST_OVERHEAD_S
    """Per GPU batch: the host time to issue a layer's kernels (a floor under compute)."""

    def lerp(self, other: StepTerms, w: float) -> StepTerms:
        vals = {f.name: getattr(self, f.name) * (1 - w) + getattr(other, f.name) * w
                for f in fields(self) if f.name != "cpu_attention"}
        return StepTerms(cpu_attention=self.cpu_attention, **vals)


NON_MATMUL_FACTOR = 1.3
"""Norms, activations, residual adds, KV writes and attention launches on top of the matmuls.
Calibrated against OPT-6.7B's prefill of 128 x 512 tokens: the matmul rate the matmul table gives
over the rate of matmul work the whole prefill achieves."""


def step_terms(config: ModelConfig, policy: Policy, profile: HardwareProfile, *, q_len: int, ctx: int,
               dtype_bytes: int = 2) -> StepTerms:
    """Coefficients for a step computing ``q_len`` new tokens per row with ``ctx`` positions attended."""
    b, hw = policy.gpu_batch_size, profile
    cw, ck = policy.compress_weights, policy.compress_kv
    prefill = q_len > 1
    L = layer_weight_bytes(config, dtype_bytes, cw)
    h2d, d2h = hw.h2d_pinned_gbps * GB, hw.d2h_pinned_gbps * GB
    flops = 2 * b * q_len * layer_matmul_params(config)
    compute = NON_MATMUL_FACTOR * flops / (hw.matmul_tflops(b * q_len) * 1e12)
    if prefill:
        compute += 2 * b * config.num_heads * config.head_dim * q_len * q_len / (hw.gpu_attention_tflops * 1e12)
    new16 = kv_layer_bytes(config, b, q_len, dtype_bytes)            # this step's K/V, uncompressed
    new_st = kv_layer_bytes(config, b, q_len, dtype_bytes, ck)       # … as stored
    old_st = kv_layer_bytes(config, b, ctx - q_len, dtype_bytes, ck)  # the cache before this step
    all16 = kv_layer_bytes(config, b, ctx, dtype_bytes)
    quant = new16 / (hw.gpu_dequant_gbps * GB) if ck else 0.0
    if prefill:
        attn_gpu = quant  # attention over the prompt is in ``compute``
    else:
        attn_gpu = all16 / (hw.gpu_attention_gbps * GB) + (
            all16 / (KV_DEQUANT_EFFICIENCY * hw.gpu_dequant_gbps * GB) if ck else 0.0)
    cpu_attn = policy.cpu_attention and not prefill
    if cpu_attn:
        act = b * config.head_dim * dtype_bytes
        xfer = act * (config.num_heads + 2 * config.num_kv_heads) / d2h + act * config.num_heads / h2d
        attn_cpu = xfer + all16 / (hw.cpu_attention_gbps * GB)
        attn_cpu += all16 / (hw.cpu_dequant_gbps * GB) if ck else 0.0
        io_kv = 0.0  # the new K/V reached the CPU with q
    else:
        attn_cpu = attn_gpu
        io_kv = old_st / h2d + new_st / d2h
    hidden = b * q_len * config.hidden_size * dtype_bytes
    head = policy.num_gpu_batches * 2 * b * config.embed_dim * config.vocab_size / (hw.matmul_tflops(b) * 1e12)
    return StepTerms(
        load_cpu=L / h2d, load_disk=L / (hw.disk_read_gbps * GB) + L / h2d,
        dequant=layer_weight_bytes(config, dtype_bytes, None) / (hw.gpu_dequant_gbps * GB) if cw else 0.0,
        compute=compute, attn_kv_gpu=attn_gpu, attn_kv_cpu=attn_cpu, cpu_attention=cpu_attn,
        io_kv_cpu=io_kv, io_act_cpu=hidden / h2d + hidden / d2h, head=head,
        host=HOST_OVERHEAD_S + (KV_COMPRESS_HOST_S if ck else 0.0),
    )


@dataclass(frozen=True, kw_only=True)
class PhaseTerms:
    """Seconds of a phase (prefill, or all decode steps), each term summed over layers and steps
    without overlap; ``time_s`` is the phase with the schedule's overlap."""

    weight_load_s: float
    """Weights crossing the link (and read from disk)."""
    compute_s: float
    """GPU compute: matmuls, GPU attention, dequantisation, head."""
    cache_io_s: float
    """KV cache and activation traffic."""
    cpu_attention_s: float
    """CPU attention and its q/k/v round trip."""
    time_s: float
    """Wall time of the phase."""

    @property
    def bound(self) -> str:
        """The largest term: what this phase waits on."""
        terms = {"weight_load": self.weight_load_s, "compute": self.compute_s, "cache_io": self.cache_io_s,
                 "cpu_attention": self.cpu_attention_s}
        return max(terms, key=terms.__getitem__)


@dataclass(frozen=True, kw_only=True)
class CostBreakdown:
    """Predicted time of one block and the throughput it implies."""

    block_size: int
    """Rows per block."""
    gen_len: int
    """Tokens generated per row."""
    prefill_s: float
    """Prefill step of the block."""
    decode_s: float
    """All ``gen_len - 1`` decode steps."""
    prefill: PhaseTerms
    """Terms of the prefill step."""
    decode: PhaseTerms
    """Terms summed over the decode steps."""
    per_layer_decode: dict[str, float]
    """Mean seconds per layer per decode step: weight_load, compute, cache_io, cpu_attention."""

    @property
    def throughput(self) -> float:
        """Generated tokens per second."""
        return self.block_size * self.gen_len / (self.prefill_s + self.decode_s)


def _layer_classes(r: RealisedPlacement) -> Counter:
    """How many layers have (tier of the next layer's weights, tier of this layer's KV)."""
    n = r.num_layers
    w, kv = ["disk"] * n, ["cpu"] * n
    for tier, layers in (("gpu", r.weights_gpu), ("cpu", r.weights_cpu)):
        for i in layers:
            w[i] = tier
    for i in r.kv_gpu:
        kv[i] = "gpu"
    return Counter((w[(j + 1) % n], kv[j]) for j in range(n))


def _phase(t: StepTerms, classes: Counter, nb: int, act_gpu: bool, overlap: bool, steps: float) -> PhaseTerms:
    load = comp = io = cpu = total = 0.0
    for (w_next, kv), count in classes.items():
        ld = {"gpu": 0.0, "cpu": t.load_cpu, "disk": t.load_disk}[w_next]
        extra = t.attn_kv_gpu if kv == "gpu" else t.attn_kv_cpu
        c = max(t.compute + extra, t.host)  # eager PyTorch: the host issues every kernel
        i = (t.io_kv_cpu if kv == "cpu" else 0.0) + (0.0 if act_gpu else t.io_act_cpu)
        if overlap:
            # Weights and cache I/O share one host link: their bytes queue behind each other.
            layer = max(ld + nb * i, t.dequant + nb * max(c, i))
        else:
            layer = ld + t.dequant + nb * (c + i)
        cpu_part = extra if (kv == "cpu" and t.cpu_attention) else 0.0
        load += count * ld
        comp += count * (t.dequant + nb * (c - cpu_part))
        io += count * nb * i
        cpu += count * nb * cpu_part
        total += count * layer
    return PhaseTerms(weight_load_s=load * steps, compute_s=(comp + t.head) * steps, cache_io_s=io * steps,
                      cpu_attention_s=cpu * steps, time_s=(total + t.head) * steps)


def block_time(config: ModelConfig, policy: Policy, profile: HardwareProfile, prompt_len: int, gen_len: int,
               dtype_bytes: int = 2, placement: RealisedPlacement | None = None) -> CostBreakdown:
    """Predicted prefill and decode seconds of one block under ``policy`` (placed by :func:`realise`)."""
    assert prompt_len >= 1 and gen_len >= 1, (prompt_len, gen_len)
    r = placement or realise(policy, config)
    classes = _layer_classes(r)
    nb, ov, act = policy.num_gpu_batches, policy.overlap, r.activations_on_gpu
    kw = {"dtype_bytes": dtype_bytes}
    pre = _phase(step_terms(config, policy, profile, q_len=prompt_len, ctx=prompt_len, **kw), classes, nb, act, ov, 1)
    steps = gen_len - 1
    if steps:
        first = step_terms(config, policy, profile, q_len=1, ctx=prompt_len + 1, **kw)
        last = step_terms(config, policy, profile, q_len=1, ctx=prompt_len + steps, **kw)
        # Terms are affine in the context: interpolate them; max() is per step, so sum step by step.
        parts = [_phase(first.lerp(last, t / max(1, steps - 1)), classes, nb, act, ov, 1) for t in range(steps)]
        dec = PhaseTerms(**{f.name: sum(getattr(p, f.name) for p in parts) for f in fields(PhaseTerms)})
    else:
        dec = PhaseTerms(weight_load_s=0.0, compute_s=0.0, cache_io_s=0.0, cpu_attention_s=0.0, time_s=0.0)
    denom = max(1, steps) * config.num_layers
    per_layer = {"weight_load": dec.weight_load_s / denom, "compute": dec.compute_s / denom,
                 "cache_io": dec.cache_io_s / denom, "cpu_attention": dec.cpu_attention_s / denom}
    return CostBreakdown(block_size=policy.block_size, gen_len=gen_len, prefill_s=pre.time_s, decode_s=dec.time_s,
                         prefill=pre, decode=dec, per_layer_decode=per_layer)
