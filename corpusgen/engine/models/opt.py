"""The OPT family: learned positions (offset 2), LayerNorm (pre-LN, or post-LN for opt-350m),
ReLU MLP, biases everywhere, tied embeddings, and opt-350m's projection of a 512-wide
embedding in and out of the 1024-wide residual stream.

Same four entry points as llama.py, so the schedule treats both families alike.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from corpusgen.engine.config import ModelConfig
from corpusgen.engine.kernels.fused_norm import add_layer_norm
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
    if "qkv_bias" in w and x.shape[0] * x.shape[1] <= DECODE_TOKENS:
        # One GEMM over the fused weight (placement._fuse_qkv): at decode sizes three separate GEMMs
        # read their weights below HBM speed; prefill-sized ones gain nothing from fusing.
        q, k, v = linear(x, w["qkv"], w["qkv_bias"]).split([w["q"].shape[0], w["k"].shape[0], w["v"].shape[0]], -1)
    else:
        q, k, v = (linear(x, w[n], w[f"{n}_bias"]) for n in ("q", "k", "v"))
    return split_heads(q, cfg.num_heads), split_heads(k, cfg.num_heads), split_heads(v, cfg.num_heads)


DECODE_TOKENS = 4096
"""Tokens (rows x columns) up to which a call is a decode step: q/k/v from the fused weight when
the layer has one; above it, a prefill: fc1 with its ReLU in the GEMM epilogue (CUDA half types)."""

def _mlp(w: Weights, x: torch.Tensor, h: torch.Tensor, epilogue: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """h + fc2(relu(fc1(x))) over 2-D rows; into ``out`` when given."""
    if epilogue:
        a = torch._addmm_activation(w["fc1_bias"], x, w["fc1"].t())
    else:  # in-place ReLU: the (rows, ffn) intermediate is the largest prefill buffer; don't hold two
        a = F.relu(linear(x, w["fc1"], w["fc1_bias"]), inplace=True)
    y = linear(a, w["fc2"], w["fc2_bias"])
    del a
    return torch.add(h, y, out=out) if out is not None else h + y


def post_attention(cfg: ModelConfig, w: Weights, h: torch.Tensor, attn: torch.Tensor, *, mlp_rows: int = 0) -> torch.Tensor:
    """Residual stream h (b, s, hidden) and attention output (b, heads, s, hd) -> new h; the MLP runs
    over ``mlp_rows`` token rows at a time (0: all). A prefill's fc1 (fp16/bf16, CUDA) has its bias
    and ReLU in cuBLASLt's epilogue, not a second pass over the (tokens, ffn) output."""
    pre = cfg.do_layer_norm_before
    out = linear(merge_heads(attn), w["o"], w["o_bias"])
    if pre:  # the residual add and the MLP's LayerNorm in one pass over the rows (large CUDA prefills)
        h, x = add_layer_norm(h, out, w["mlp_norm"], w["mlp_norm_bias"], cfg.norm_eps)
    else:
        h = x = layer_norm(h + out, w["attn_norm"], w["attn_norm_bias"], cfg.norm_eps)
    x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
    rows = x2.shape[0]
    epilogue = x2.is_cuda and x2.dtype != torch.float32 and rows > DECODE_TOKENS
    if mlp_rows and rows > mlp_rows:
        out = torch.empty_like(h2)
        for i in range(0, rows, mlp_rows):
            _mlp(w, x2[i:i + mlp_rows], h2[i:i + mlp_rows], epilogue, out=out[i:i + mlp_rows])
        h = out.view(h.shape)
    else:
        h = _mlp(w, x2, h2, epilogue).view(h.shape)
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
