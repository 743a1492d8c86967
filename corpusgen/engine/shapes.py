"""Sizes and shapes the engine works with, torch-free, so the planner counts the same bytes the
engine allocates without importing either torch or the engine's internals: every unit's weight
shapes, the group-wise compressed format's sizes, and which caches the packed 4-bit decode kernel
takes.
"""

from __future__ import annotations

import math
from typing import Sequence

from corpusgen.engine.config import ModelConfig

# --------------------------------------------------------------------------- weights

TIED = {("head", "lm_head"): ("embed", "tokens")}
"""Tensors that are the same object as another unit's tensor when the embeddings are tied."""


# --------------------------------------------------------------------------- shapes

def unit_names(config: ModelConfig) -> list[str]:
    """Units in streaming order: embed, layer.0 … layer.{n-1}, head."""
    return ["embed", *(f"layer.{i}" for i in range(config.num_layers)), "head"]


def weight_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every unit's tensor shapes. A tied ``lm_head`` is listed too; see :func:`is_tied`."""
    h, v, ffn = config.hidden_size, config.vocab_size, config.ffn_dim
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    if config.family == "llama":
        layer = {"attn_norm": (h,), "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h)}
        if config.attention_bias:
            layer |= {"q_bias": (q_out,), "k_bias": (kv_out,), "v_bias": (kv_out,)}
        layer |= {"o": (h, q_out), "mlp_norm": (h,), "gate": (ffn, h), "up": (ffn, h), "down": (h, ffn)}
        embed = {"tokens": (v, h)}
        head = {"norm": (h,), "lm_head": (v, h)}
    else:
        e = config.embed_dim
        # OPT's learned positions are offset by 2 (a fairseq leftover), hence the extra rows.
        embed = {"tokens": (v, e), "positions": (config.max_positions + 2, h)}
        if config.word_embed_proj_dim:
            embed["project_in"] = (h, e)
        layer = {"attn_norm": (h,), "attn_norm_bias": (h,)}
        for p in ("q", "k", "v", "o"):
            layer |= {p: (h, h), f"{p}_bias": (h,)}
        layer |= {"mlp_norm": (h,), "mlp_norm_bias": (h,), "fc1": (ffn, h), "fc1_bias": (ffn,),
                  "fc2": (h, ffn), "fc2_bias": (h,)}
        # Post-LayerNorm OPT (350m) has no final LayerNorm.
        head = {"norm": (h,), "norm_bias": (h,)} if config.do_layer_norm_before else {}
        if config.word_embed_proj_dim:
            head["project_out"] = (e, h)
        head["lm_head"] = (v, e)
    shapes = {"embed": embed, "head": head}
    shapes |= {f"layer.{i}": dict(layer) for i in range(config.num_layers)}
    return {u: shapes[u] for u in unit_names(config)}


def is_tied(config: ModelConfig, unit: str, name: str) -> bool:
    """True when ``unit[name]`` is the same tensor as another unit's (count its bytes once)."""
    return config.tie_word_embeddings and (unit, name) in TIED


# --------------------------------------------------------------------------- compressed tensors

def _check(bits: int, group_size: int) -> None:
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    assert group_size >= 2 and group_size % 2 == 0, f"group_size must be even and >= 2, got {group_size}"


def _axis(axis: int, ndim: int) -> int:
    assert -ndim <= axis < ndim, f"axis {axis} out of range for {ndim} dims"
    return axis % ndim


def grouped_shape(shape: Sequence[int], group_size: int, axis: int) -> tuple[int, ...]:
    """Shape of ``mins``/``scales``: ``shape[axis]`` becomes the number of groups."""
    a = _axis(axis, len(shape))
    return (*shape[:a], math.ceil(shape[a] / group_size), *shape[a + 1 :])


def packed_shape(shape: Sequence[int], bits: int, group_size: int, axis: int) -> tuple[int, ...]:
    """Shape of ``data``: ``shape[axis]`` becomes the padded length in bytes."""
    a = _axis(axis, len(shape))
    padded = math.ceil(shape[a] / group_size) * group_size
    return (*shape[:a], padded * bits // 8, *shape[a + 1 :])


def compressed_nbytes(
    shape: Sequence[int], bits: int = 4, group_size: int = 64, axis: int = -1, scale_dtype_bytes: int = 2
) -> int:
    """Bytes of ``quantize(torch.empty(shape), bits, group_size, axis)`` (data + mins + scales)."""
    _check(bits, group_size)
    data = math.prod(packed_shape(shape, bits, group_size, axis))
    return data + 2 * math.prod(grouped_shape(shape, group_size, axis)) * scale_dtype_bytes


def packed_fits(cfg, compress) -> bool:
    """Whether the kernel takes model ``cfg``'s cache under KV compression ``compress`` (the
    model's side of ``packed_usable``; the memory model asks it too): 4-bit, one query head per
    K/V head, head_dim 64/128/256, groups that divide it."""
    return (compress is not None and compress.bits == 4 and cfg.num_heads == cfg.num_kv_heads
            and cfg.head_dim in (64, 128, 256) and cfg.head_dim % compress.group_size == 0)
