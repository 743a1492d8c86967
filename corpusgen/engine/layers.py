"""Math shared by the model families: norms, rotary embeddings, masked attention.

Pure functions over tensors. Padding convention of the whole engine: prompts are *left*-padded
so every row's last prompt token sits at the same column; ``pad[b]`` is the number of padding
columns of row b. A column c of row b holds the token at position ``c - pad[b]``; padding columns
are never attended to by real tokens.

With a shared prompt prefix of ``prefix`` tokens (computed once for a whole job), columns
``[0, prefix)`` hold the prefix for every row and the padding moves behind it: row b's padding is
columns ``[prefix, prefix + pad[b])``, and a column c >= prefix + pad[b] holds position c - pad[b].
``prefix = 0`` is the plain convention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from corpusgen.engine.kernels import decode_attention, fused_norm
from corpusgen.engine.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as in HF Llama: normalise in fp32, cast back, then scale. Large prefills run in
    token chunks: the fp32 temporaries are 6x the input (Llama-70B, 98 k tokens: 3 GiB each)."""
    def norm(t: torch.Tensor) -> torch.Tensor:
        tf = t.float()
        y = (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)  # a new tensor
        return y.mul_(weight) if weight.dtype == y.dtype else weight * y  # in place: one buffer less

    return chunked(norm, x, NORM_CHUNK_TOKENS) if x.dim() == 3 else norm(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim (a Triton kernel for large fp16/bf16 CUDA prefills)."""
    return fused_norm.layer_norm(x, weight, bias, eps)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; fp32 on the CPU goes through oneDNN's fp32 matmul when ``onednn_fp32()``."""
    if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and onednn_fp32():
        return _onednn_linear(x, w, b)
    return F.linear(x, w, b)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    # oneDNN's inner product with no post-op and no fpmath attribute: plain fp32 (the op Inductor
    # uses for CPU linears). Not torch.backends.mkldnn.matmul.fp32_precision = "bf16", which
    # reaches the same kernel here (bit-identical results) but is process-global and asks for
    # bf16 math, which another CPU or oneDNN version may deliver.
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


CPU_ONEDNN_FP32: bool | None = None
"""fp32 CPU linears through oneDNN: None decides once (``onednn_fp32``), True/False force it."""


def onednn_fp32() -> bool:
    """Whether fp32 CPU linears use oneDNN: on AMD CPUs, where MKL's sgemm runs AVX2 code and
    oneDNN's AVX512 (much faster on prefill GEMMs and the 49k-wide head), when
    ``onednn_fp32_probe`` passes. On an Intel Xeon (AMX) the two are level (MKL ahead on prefill),
    so other CPUs keep ``F.linear``."""
    global CPU_ONEDNN_FP32
    if CPU_ONEDNN_FP32 is None:
        CPU_ONEDNN_FP32 = _cpu_vendor() == "AuthenticAMD" and onednn_fp32_probe(_onednn_linear)
    return CPU_ONEDNN_FP32


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def onednn_fp32_probe(fn) -> bool:
    """True when ``fn`` (x, w) -> x @ w.T exists and computes in fp32: on a random 16x1536 by
    1536x64 product, every output is within sqrt(K)·u·Σ|x·w| of the float64 value (u = 2^-24; the
    probabilistic rounding bound of an fp32 dot product of length K). fp32 oneDNN and MKL stay well
    inside it and bf16 inputs land far outside it: a oneDNN that rounds to bf16 (its bf16 fpmath mode,
    e.g. ONEDNN_DEFAULT_FPMATH_MODE=BF16 where a CPU implements it) is refused, not used."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 1536, generator=g), torch.randn(64, 1536, generator=g)
    try:
        with torch.no_grad():
            y = fn(x, w)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    ref = x.double() @ w.double().T
    bound = math.sqrt(x.shape[1]) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
    return y.shape == ref.shape and bool(((y.double() - ref).abs() <= bound).all())


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies (head_dim/2,), fp32, with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (batch, seq, head_dim) for integer ``positions`` (batch, seq)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads*head_dim) -> (batch, heads, seq, head_dim)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads*head_dim)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def attention_mask(pad: torch.Tensor, q_start: int, q_len: int, k_len: int, prefix: int = 0) -> torch.Tensor:
    """Boolean mask (batch, 1, q_len, k_len): True where query column may attend to key column.

    Queries occupy columns [q_start, q_start + q_len). A key is visible when it is not padding
    and not in the future. A padding query sees only itself, which keeps softmax finite; its
    output is never read. Padding is columns [prefix, prefix + pad) (see the module docstring).
    """
    dev = pad.device
    q_cols = torch.arange(q_start, q_start + q_len, device=dev)
    k_cols = torch.arange(k_len, device=dev)
    causal = k_cols[None, :] <= q_cols[:, None]  # (q, k)
    end = prefix + pad[:, None]
    real_key = (k_cols[None, :] >= end) | (k_cols[None, :] < prefix)  # (b, k)
    mask = causal[None] & real_key[:, None, :]  # (b, q, k)
    pad_query = (q_cols[None, :] < end) & (q_cols[None, :] >= prefix)  # (b, q)
    self_only = pad_query[:, :, None] & (k_cols[None, None, :] == q_cols[None, :, None])
    return (mask | self_only).unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q (batch, heads, q_len, head_dim); k, v (batch, kv_heads, k_len, head_dim);
    mask (batch, 1, q_len, k_len) bool, or None with ``causal`` for unpadded prefill.
    Returns (batch, heads, q_len, head_dim). One query per row goes to ``_decode_attend_cpu`` (small
    bf16/fp16 CPU caches) or ``decode_attention`` (large multi-head CUDA caches) when they apply.
    """
    if q.device.type == "cpu" and q.shape[2] == 1 and q.dtype != torch.float32 and k.numel() <= SMALL_CPU_KV:
        return _decode_attend_cpu(q, k, v, mask, scale)
    if q.is_cuda and decode_attention.usable(q, k):  # one query on CUDA: split-KV Triton kernel
        return decode_attention.decode_attention(q, k, v, mask, scale)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal, enable_gqa=gqa)


SMALL_CPU_KV = 1 << 21
"""K elements up to which a single bf16/fp16 query attends through ``_decode_attend_cpu``: below
it PyTorch's CPU flash kernel is dominated by a fixed cost per call; above it the kernel's
in-place bf16 reads beat upcasting the cache to fp32."""


def _decode_attend_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """One query token per row on the CPU in bf16/fp16: two batched matmuls in fp32.

    For small caches PyTorch's CPU flash kernel takes several times longer than this for a single
    bf16 query (its fixed cost per call). Accumulating in fp32 keeps it as exact as
    the fused kernel. Heads of a group are consecutive (HF's repeat_kv).
    """
    b, heads, _, d = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    qg = q.reshape(b, kv_heads, heads // kv_heads, d).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale)  # (b, kv, group, k_len)
    if mask is not None:
        scores.masked_fill_(~mask.reshape(b, 1, 1, k_len), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype).reshape(b, heads, 1, d)


def positions_from_pad(pad: torch.Tensor, start: int, length: int, prefix: int = 0) -> torch.Tensor:
    """Token positions (batch, length) of columns [start, start+length); padding clamps to 0
    (or to ``prefix``: its outputs are never read either way)."""
    return _positions(pad, torch.arange(start, start + length, device=pad.device)[None, :], prefix)


def positions_at(pad: torch.Tensor, col: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """``positions_from_pad(pad, c, 1, prefix)`` for the column c held in the one-element device
    tensor ``col``: (batch, 1), no host value involved (CUDA graphs, decode_graph.py)."""
    return _positions(pad, col.view(1, 1), prefix)


def _positions(pad: torch.Tensor, cols: torch.Tensor, prefix: int) -> torch.Tensor:
    """Positions (batch, n) of the columns ``cols`` (1, n) for rows padded by ``pad`` (batch,)."""
    if prefix == 0:
        return (cols - pad[:, None]).clamp_min(0)
    shifted = (cols - pad[:, None]).clamp_min(prefix)
    return torch.where(cols < prefix, cols, shifted)


NORM_CHUNK_TOKENS = 8192
"""Tokens per chunk of an RMSNorm over a prefill: its fp32 temporaries stay bounded."""


def chunked(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` (a token-wise map of the last dim to the same size) over x (b, s, d) in chunks of at
    most ``chunk`` tokens (0: whole), so its intermediates are bounded; x itself when it is small."""
    b, s, d = x.shape
    n = b * s
    if not chunk or n <= chunk:
        return fn(x)
    flat = x.reshape(n, d)
    out = torch.empty_like(flat)
    for i in range(0, n, chunk):
        out[i:i + chunk] = fn(flat[i:i + chunk])
    return out.view(b, s, d)