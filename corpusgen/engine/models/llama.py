"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): RMSNorm, RoPE (with llama3 scaling),
grouped-query attention, SwiGLU MLP, tied or untied embeddings, optional q/k/v bias.

A layer is split where the schedule needs to cut it: ``pre_attention`` (norm, projections,
rotary) and ``post_attention`` (output projection, residual, MLP). Attention itself is shared
math (layers.attend) so it can run wherever the KV cache lives.
Weight names are the canonical ones of weights.py (HF names map onto them by table).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from corpusgen.engine.config import ModelConfig
from corpusgen.engine.layers import apply_rope, chunked, linear, merge_heads, rms_norm, rope_cos_sin, rope_inv_freq, split_heads

Weights = dict[str, torch.Tensor]


@functools.lru_cache(maxsize=8)
def _inv_freq(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """Kept on the device the positions live on: no host copy per step (nor inside a CUDA graph)."""
    return rope_inv_freq(cfg).to(device)


def embed(cfg: ModelConfig, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids (batch, seq) -> hidden (batch, seq, hidden)."""
    return F.embedding(ids, w["tokens"])


def prepare(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """Per-step, per-batch values shared by every layer: the rotary cos/sin (b, s, hd)."""
    return rope_cos_sin(_inv_freq(cfg, positions.device), positions, dtype)


def pre_attention(cfg: ModelConfig, w: Weights, h: torch.Tensor, positions: torch.Tensor, aux=None):
    """hidden (b, s, hidden) -> q (b, heads, s, hd), k, v (b, kv_heads, s, hd)."""
    x = rms_norm(h, w["attn_norm"], cfg.norm_eps)
    q = split_heads(linear(x, w["q"], w.get("q_bias")), cfg.num_heads)
    k = split_heads(linear(x, w["k"], w.get("k_bias")), cfg.num_kv_heads)
    v = split_heads(linear(x, w["v"], w.get("v_bias")), cfg.num_kv_heads)
    cos, sin = aux if aux is not None else prepare(cfg, positions, q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def post_attention(cfg: ModelConfig, w: Weights, h: torch.Tensor, attn: torch.Tensor, *, mlp_rows: int = 0) -> torch.Tensor:
    """Residual stream h (b, s, hidden) and attention output (b, heads, s, hd) -> new h; the MLP runs
    over ``mlp_rows`` token rows at a time (0: all)."""
    h = linear(merge_heads(attn), w["o"]).add_(h)  # x + y == y + x bit for bit: add into the new buffer
    x = rms_norm(h, w["mlp_norm"], cfg.norm_eps)
    return chunked(lambda t: swiglu(w, t), x, mlp_rows).add_(h)


def swiglu(w: Weights, t: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(t)) * up(t)), t (..., hidden): HF's LlamaMLP, with silu and the product in
    place in gate's output (the (tokens, ffn) buffers are the largest of a layer)."""
    g = linear(t, w["gate"])
    return linear(F.silu(g, inplace=True).mul_(linear(t, w["up"])), w["down"])


def head(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    """Last hidden states (b, hidden) -> logits (b, vocab), fp32."""
    return linear(rms_norm(h, w["norm"], cfg.norm_eps), w["lm_head"]).float()
