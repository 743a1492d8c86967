"""Where each layer lives, and how many bytes every tier holds (DESIGN §5, §6).

This module is the single source of truth for placement: the engine calls :func:`realise` to put
layers on tiers and allocates exactly the buffers :func:`memory_terms` counts; the planner plans
with the same two functions, so a plan that fits here fits in the engine.

Placement is by whole layers
----------------------------
``weights.gpu = f`` puts ``round(f·n)`` layers' weights on the GPU; ``weights.cpu`` the next ones, so
that ``round((gpu + cpu)·n)`` layers are on GPU or CPU; the rest are on disk. ``kv_cache.gpu = f``
keeps ``round(f·n)`` layers' KV cache on the GPU, the rest in pinned CPU memory (never disk).
Activations rest on the GPU when ``activations.gpu ≥ 0.5``, else on the CPU. ``round`` is half-up.
GPU-resident layers are spread evenly over depth (layer ``⌊(2i+1)·n / 2k⌋`` for i < k); CPU layers
are spread the same way over the layers left; disk takes the remainder. The embedding and the head
(final norm + LM head, which shares the embedding when tied) are always on the GPU, uncompressed.

Memory the engine allocates (bytes; ``L`` = one layer's weights as stored, i.e. compressed when
``compress_weights`` is set, ``L₁₆`` uncompressed; ``kv(b)`` = one layer's K and V for ``b`` rows of
``prompt_len + gen_len`` positions, shape ``(b, kv_heads, max_len, head_dim)`` each, compressed when
``compress_kv`` is set; ``B`` = block, ``b`` = gpu_batch_size, ``p`` = prompt_len, ``c`` = the prompt
columns one step computes: ``min(p, prefill_chunk)``, or ``p`` unchunked)::

    gpu.embed_head          embed + head weights (tied LM head counted once)
    gpu.layer_weights       GPU-resident layers × L
    gpu.weight_staging      2 × L                     if any layer is off the GPU (double buffer)
    gpu.weight_dequant      L₁₆                       if compress_weights (resident layers are
                                                      stored compressed too and dequantised here)
    gpu.kv_cache            GPU-KV layers × kv(B)
    gpu.kv_staging          2 × kv(b)                 if any KV layer is on the CPU and not cpu_attention;
                            (num_gpu_batches + 1) × kv(b) when the packed kernel takes the
                            4-bit cache (shapes.packed_fits; attended in place on
                            CUDA, a layer's loads are queued for every batch at once)
    gpu.kv_dequant          kv(b) uncompressed        if compress_kv and some KV is attended on the GPU
    gpu.activations         B × c × hidden × dtype    if activations on the GPU
    gpu.activation_staging  2 × b × c × hidden × dtype if activations on the CPU
    gpu.attention_scores    b × c × p × dtype_bytes   (the padding mask as a bias; fused SDPA keeps no scores)
    gpu.mlp_workspace       the MLP runs over m = min(b × c, policy.mlp_rows) token rows at a time
                            OPT: m × ffn × dtype × 2 (fc1 output, ReLU in place), + the chunks'
                            output b × c × hidden × dtype when m < b × c;
                            Llama: m × ffn × dtype × 4 (gate, up, silu, product) + rotary
                            temporaries b × c × (heads + kv_heads) × hd × dtype × 3
                            + attention output b × c × hidden × dtype × 3
    gpu.logits              b × vocab × 4
    cpu.layer_weights       CPU-resident layers × L   (pinned)
    cpu.kv_cache            CPU-KV layers × kv(B)
    cpu.weight_staging      2 × L                     if any layer is on disk (pinned bounce buffers)
    cpu.activations         B × c × hidden × dtype    if activations on the CPU
    cpu.attention_workspace b × heads × (p+g) × 4 (+ kv(b) uncompressed if compress_kv)
                                                      if cpu_attention and any KV layer on the CPU
    disk.layer_weights      disk layers × L

Weights compress 2-D tensors only (1-D norms and biases stay at ``dtype``), grouped along the
input dimension; the KV cache groups along head_dim (see corpusgen/engine/compression.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from corpusgen.engine.config import ModelConfig
from corpusgen.errors import BudgetError
from corpusgen.planner.policy import Compression, Policy

GIB = 2**30

from corpusgen.engine.shapes import compressed_nbytes, is_tied, packed_fits, weight_shapes


def _shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{unit: {name: shape}} for embed, layer.0 (all layers are alike) and head; tied tensors dropped."""
    full = weight_shapes(config)
    return {u: {k: s for k, s in full[u].items() if not is_tied(config, u, k)} for u in ("embed", "layer.0", "head")}


def _tensor_bytes(shape: tuple[int, ...], dtype_bytes: int, compression: Compression | None) -> int:
    if compression is None or len(shape) < 2:
        return math.prod(shape) * dtype_bytes
    return compressed_nbytes(shape, compression.bits, compression.group_size, -1)


@functools.lru_cache(maxsize=256)
def layer_weight_bytes(config: ModelConfig, dtype_bytes: int = 2, compression: Compression | None = None) -> int:
    """Bytes of one decoder layer's weights as stored (compressed 2-D tensors when ``compression``)."""
    return sum(_tensor_bytes(s, dtype_bytes, compression) for s in _shapes(config)["layer.0"].values())


@functools.lru_cache(maxsize=256)
def embed_head_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes of the embedding and head units (never compressed; a tied LM head counted once)."""
    sh = _shapes(config)
    return sum(math.prod(s) * dtype_bytes for u in ("embed", "head") for s in sh[u].values())


@functools.lru_cache(maxsize=256)
def layer_matmul_params(config: ModelConfig) -> int:
    """Weights of one layer that take part in matmuls (2-D tensors): FLOPs per token = 2 × this."""
    return sum(math.prod(s) for s in _shapes(config)["layer.0"].values() if len(s) == 2)


def kv_layer_bytes(config: ModelConfig, rows: int, max_len: int, dtype_bytes: int = 2,
                   compression: Compression | None = None) -> int:
    """K and V of one layer for ``rows`` sequences of ``max_len`` positions, as stored."""
    shape = (rows, config.num_kv_heads, max_len, config.head_dim)
    return 2 * _tensor_bytes(shape, dtype_bytes, compression)


# --------------------------------------------------------------------------- placement

def _round(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _spread(k: int, pool: Sequence[int]) -> list[int]:
    """``k`` indices of ``pool`` spread evenly over it."""
    m = len(pool)
    return [pool[(2 * i + 1) * m // (2 * k)] for i in range(k)]


@dataclass(frozen=True, kw_only=True)
class RealisedPlacement:
    """Which layer indices sit on which tier; what the engine actually does with a policy."""

    num_layers: int
    """Decoder layers of the model."""
    weights_gpu: tuple[int, ...]
    """Layers whose weights are GPU-resident."""
    weights_cpu: tuple[int, ...]
    """Layers whose weights are in pinned CPU memory."""
    weights_disk: tuple[int, ...]
    """Layers whose weights are in the disk tier."""
    kv_gpu: tuple[int, ...]
    """Layers whose KV cache is on the GPU."""
    kv_cpu: tuple[int, ...]
    """Layers whose KV cache is in pinned CPU memory."""
    activations_on_gpu: bool
    """Hidden states rest on the GPU between layers (else in CPU memory)."""
    notes: tuple[str, ...] = ()
    """One line per fraction that was rounded to whole layers."""

    def fraction(self, kind: str, tier: str) -> float:
        """Realised share of ``kind`` (weights, kv) on ``tier``, e.g. 10/48 = 0.2083."""
        return len(getattr(self, f"{kind}_{tier}")) / self.num_layers

    def weight_tier(self, layer: int) -> str:
        return "gpu" if layer in self.weights_gpu else "cpu" if layer in self.weights_cpu else "disk"

    def kv_tier(self, layer: int) -> str:
        return "gpu" if layer in self.kv_gpu else "cpu"

    def as_policy(self, policy: Policy) -> Policy:
        """``policy`` with its fractions replaced by the realised ones (it realises to ``self``)."""
        from corpusgen.planner.policy import Placement

        n = self.num_layers
        g, c = len(self.weights_gpu), len(self.weights_cpu)
        return policy.replace(
            weights=Placement(gpu=g / n, cpu=(g + c) / n - g / n),
            kv_cache=Placement(gpu=len(self.kv_gpu) / n, cpu=1.0 - len(self.kv_gpu) / n),
            activations=Placement(gpu=float(self.activations_on_gpu), cpu=1.0 - self.activations_on_gpu),
        )


def realise(policy: Policy, config: ModelConfig) -> RealisedPlacement:
    """Turn a policy's fractions into whole layers per tier (deterministic; see the module doc)."""
    n = config.num_layers
    w, kv = policy.weights, policy.kv_cache
    n_wg = min(n, _round(w.gpu * n))
    n_wc = min(n, max(n_wg, _round((w.gpu + w.cpu) * n))) - n_wg
    n_kg = min(n, _round(kv.gpu * n))
    wg = _spread(n_wg, range(n))
    rest = sorted(set(range(n)) - set(wg))
    wc = _spread(n_wc, rest)
    wd = sorted(set(rest) - set(wc))
    kg = _spread(n_kg, range(n))
    kc = sorted(set(range(n)) - set(kg))
    notes = []
    for name, want, got in (("weights.gpu", w.gpu, n_wg), ("weights.cpu", w.cpu, n_wc),
                            ("kv_cache.gpu", kv.gpu, n_kg)):
        if abs(want * n - got) > 1e-6:
            notes.append(f"{name} {want:g} → {got} of {n} layers ({got / n:.4f})")
    on_gpu = policy.activations.gpu >= 0.5
    if policy.activations.gpu not in (0.0, 1.0):
        notes.append(f"activations.gpu {policy.activations.gpu:g} → all on {'gpu' if on_gpu else 'cpu'}")
    return RealisedPlacement(num_layers=n, weights_gpu=tuple(wg), weights_cpu=tuple(wc), weights_disk=tuple(wd),
                             kv_gpu=tuple(kg), kv_cpu=tuple(kc), activations_on_gpu=on_gpu, notes=tuple(notes))


# --------------------------------------------------------------------------- memory

@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per tier for one policy and workload, with the named terms that make them up."""

    gpu: int
    """Bytes on the GPU (sum of the ``gpu.*`` terms)."""
    cpu: int
    """Bytes of pinned CPU memory (sum of the ``cpu.*`` terms)."""
    disk: int
    """Bytes in the disk tier."""
    terms: Mapping[str, int] = field(default_factory=dict)
    """Every component, keyed ``tier.name`` (see the module docstring), zero terms left out."""

    def largest(self, tier: str, k: int = 3) -> list[tuple[str, int]]:
        """The ``k`` biggest terms of ``tier``."""
        items = [(n, b) for n, b in self.terms.items() if n.startswith(tier + ".")]
        return sorted(items, key=lambda x: -x[1])[:k]


def memory_terms(config: ModelConfig, policy: Policy, prompt_len: int, gen_len: int, dtype_bytes: int = 2, *,
                 w_gpu: float, w_cpu: float, w_disk: float, kv_gpu: float, kv_cpu: float, act_gpu: float,
                 weight_staging: bool, disk_staging: bool, kv_staging: bool, cpu_attention_ws: bool,
                 kv_dequant: bool) -> dict[str, float]:
    """The terms of the module docstring for layer counts (may be fractional: the planner's LP uses
    them as linear coefficients) and the structural switches (which buffers exist)."""
    b, B, p, s = policy.gpu_batch_size, policy.block_size, prompt_len, prompt_len + gen_len
    cw, ck = policy.compress_weights, policy.compress_kv
    c = min(p, policy.prefill_chunk) if policy.prefill_chunk else p  # prompt columns a step computes
    L = layer_weight_bytes(config, dtype_bytes, cw)
    kv_block = kv_layer_bytes(config, B, s, dtype_bytes, ck)
    kv_batch = kv_layer_bytes(config, b, s, dtype_bytes, ck)
    kv_batch16 = kv_layer_bytes(config, b, s, dtype_bytes, None)
    hidden = B * c * config.hidden_size * dtype_bytes
    # A 4-bit cache the packed kernel takes is attended in place (on CUDA), so a layer's loads are
    # queued for every GPU batch at once, one layer ahead: num_gpu_batches + 1 batches' KV, not 2.
    staged = policy.num_gpu_batches + 1 if packed_fits(config, ck) else 2
    t = {
        "gpu.embed_head": embed_head_bytes(config, dtype_bytes),
        "gpu.layer_weights": w_gpu * L,
        "gpu.weight_staging": 2 * L if weight_staging else 0,
        "gpu.weight_dequant": layer_weight_bytes(config, dtype_bytes, None) if cw else 0,
        "gpu.kv_cache": kv_gpu * kv_block,
        "gpu.kv_staging": staged * kv_batch if kv_staging else 0,
        "gpu.kv_dequant": kv_batch16 if ck and kv_dequant else 0,
        "gpu.activations": act_gpu * hidden,
        "gpu.activation_staging": (1 - act_gpu) * 2 * b * c * config.hidden_size * dtype_bytes,
        # fused SDPA never materialises the scores; a padded batch passes its mask as a bias
        "gpu.attention_scores": b * c * p * dtype_bytes,
        "gpu.mlp_workspace": mlp_workspace_bytes(config, b * c, dtype_bytes, policy.mlp_rows),
        "gpu.logits": b * config.vocab_size * 4,
        "cpu.layer_weights": w_cpu * L,
        "cpu.kv_cache": kv_cpu * kv_block,
        "cpu.weight_staging": 2 * L if disk_staging else 0,
        "cpu.activations": (1 - act_gpu) * hidden,
        "cpu.attention_workspace": (b * config.num_heads * s * 4 + (kv_batch16 if ck else 0)) if cpu_attention_ws else 0,
        "disk.layer_weights": w_disk * L,
    }
    return t


def memory_per_tier(config: ModelConfig, policy: Policy, prompt_len: int, gen_len: int,
                    dtype_bytes: int = 2) -> MemoryEstimate:
    """Bytes the engine allocates per tier for ``policy`` as :func:`realise` places it."""
    r = realise(policy, config)
    n_kc = len(r.kv_cpu)
    kv_staging = n_kc > 0 and not policy.cpu_attention
    t = memory_terms(
        config, policy, prompt_len, gen_len, dtype_bytes,
        w_gpu=len(r.weights_gpu), w_cpu=len(r.weights_cpu), w_disk=len(r.weights_disk),
        kv_gpu=len(r.kv_gpu), kv_cpu=n_kc, act_gpu=float(r.activations_on_gpu),
        weight_staging=len(r.weights_gpu) < r.num_layers, disk_staging=len(r.weights_disk) > 0,
        kv_staging=kv_staging, cpu_attention_ws=policy.cpu_attention and n_kc > 0,
        kv_dequant=len(r.kv_gpu) > 0 or kv_staging,
    )
    terms = {k: int(v) for k, v in t.items() if v}
    tot = {tier: sum(v for k, v in terms.items() if k.startswith(tier + ".")) for tier in ("gpu", "cpu", "disk")}
    return MemoryEstimate(gpu=tot["gpu"], cpu=tot["cpu"], disk=tot["disk"], terms=terms)


def check_budgets(estimate: MemoryEstimate, gpu_budget: int, cpu_budget: int, disk_budget: int | None = None) -> None:
    """Raise :class:`BudgetError` naming the first tier over budget, the shortfall and its biggest terms."""
    for tier, budget in (("gpu", gpu_budget), ("cpu", cpu_budget), ("disk", disk_budget)):
        need = getattr(estimate, tier)
        if budget is not None and need > budget:
            big = ", ".join(f"{n} {b / GIB:.2f}" for n, b in estimate.largest(tier))
            raise BudgetError(
                f"{tier.upper()} budget short by {(need - budget) / GIB:.2f} GiB: needs {need / GIB:.2f} GiB "
                f"of {budget / GIB:.2f} GiB (largest, GiB: {big})")


def mlp_workspace_bytes(config, tokens: int, dtype_bytes: int, mlp_rows: int) -> int:
    """Peak MLP intermediates of a step over ``tokens`` tokens, ``mlp_rows`` at a time (the table above)."""
    rows = min(tokens, mlp_rows) if mlp_rows else tokens

    if config.family == "llama":
        # + rotary temporaries: q·cos, rotate_half(q), ·sin and their sum, for q and k
        rope = tokens * (config.num_heads + config.num_kv_heads) * config.head_dim * dtype_bytes * 3
        attn_out = tokens * config.hidden_size * dtype_bytes * 3  # attention output, merged, projected
        return rows * config.ffn_dim * dtype_bytes * 4 + rope + attn_out
    chunks_out = tokens * config.hidden_size * dtype_bytes if rows < tokens else 0
    return rows * config.ffn_dim * dtype_bytes * 2 + chunks_out
