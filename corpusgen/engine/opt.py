"""The OPT family: learned positions (offset 2), LayerNorm (pre-LN, or post-LN for opt-350m),
ReLU MLP, biases everywhere, tied embeddings, and opt-350m's projection of a 512-wide
embedding in and out of the 1024-wide residual stream.

Same four entry points as llama.py, so the schedule treats both families alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from corpusgen.engine.config import ModelConfig
from corpusgen.engine.fused_norm import add_layer_norm
from corpusgen.engine.layers import layer_norm, linear, merge_heads, split_heads

Weights = dict[str, torch.Tensor]
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (HF OPTLearnedPositionalEmbedding)


def embed(cfg: ModelConfig, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids (batch, seq) -> hidden (batch, seq, hidden)."""
    x = F.embedding(ids, w["tokens"])  # (b, s, embed_dim)
    if "project_in" in w:
        x = linear(x, w["project_in"])
    return x + F.embedding(positions + POSITION_OFFSET, w["positions"])


def prepare(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """Nothing is shared across OPT layers (positions enter once, in the embedding)."""
    return None


def pre_attention(cfg: ModelConfig, w: Weights, h: torch.Tensor, positions: torch.Tensor, aux=None):
    """hidden (b, s, hidden) -> q, k, v (b, heads, s, hd)."""
    x = layer_norm(h, w["attn_norm"], w["attn_norm_bias"], cfg.norm_eps) if cfg.do_layer_norm_before else h
    q = split_heads(linear(x, w["q"], w["q_bias"]), cfg.num_heads)
    k = split_heads(linear(x, w["k"], w["k_bias"]), cfg.num_heads)
    v = split_heads(linear(x, w["v"], w["v_bias"]), cfg.num_heads)
    return q, k, v


def post_attention(cfg: ModelConfig, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Residual stream h (b, s, hidden) and attention output (b, heads, s, hd) -> new h."""
    pre = cfg.do_layer_norm_before
    out = linear(merge_heads(attn), w["o"], w["o_bias"])
    if pre:  # the residual add and the MLP's LayerNorm in one pass over the rows (large CUDA prefills)
        h, x = add_layer_norm(h, out, w["mlp_norm"], w["mlp_norm_bias"], cfg.norm_eps)
    else:
        h = x = layer_norm(h + out, w["attn_norm"], w["attn_norm_bias"], cfg.norm_eps)
    # in-place ReLU: the (b, s, ffn) intermediate is the largest prefill buffer; don't hold two
    h = h + linear(F.relu(linear(x, w["fc1"], w["fc1_bias"]), inplace=True), w["fc2"], w["fc2_bias"])
    if not pre:
        h = layer_norm(h, w["mlp_norm"], w["mlp_norm_bias"], cfg.norm_eps)
    return h


def head(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    """Last hidden states (b, hidden) -> logits (b, vocab), fp32."""
    if "norm" in w:
        h = layer_norm(h, w["norm"], w["norm_bias"], cfg.norm_eps)
    if "project_out" in w:
        h = linear(h, w["project_out"])
    return linear(h, w["lm_head"]).float()
