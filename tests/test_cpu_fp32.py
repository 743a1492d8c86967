"""The CPU fp32 fast path computes what the plain one does.

fp32 linears on the CPU go through oneDNN (layers.linear) after a numeric probe; the Llama MLP,
residual adds and RMSNorm work in place; CPU engines keep freed host blocks in glibc's heap
(load.keep_freed_host_memory). Each is a speed change only: these tests pin that.
"""

from __future__ import annotations

import ctypes
import math
import platform

import pytest
import torch
import torch.nn.functional as F

from corpusgen.engine import layers as L
from corpusgen.engine.models import llama
from corpusgen.engine.config import ModelConfig

needs_onednn = pytest.mark.skipif(not L.onednn_fp32_probe(L._onednn_linear),
                                  reason="oneDNN fp32 matmul unavailable or imprecise here")


@pytest.fixture
def route(monkeypatch):
    """Set layers.CPU_ONEDNN_FP32 for one test (the module keeps its probed value otherwise)."""
    def set_route(value):
        monkeypatch.setattr(L, "CPU_ONEDNN_FP32", value)
    return set_route


def _bf16_matmul(x, w, b=None):
    return F.linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()).float()


def test_probe_refuses_an_imprecise_or_missing_matmul():
    """A kernel that rounds its inputs to bf16 (as oneDNN's fpmath mode does on AMX CPUs, or with
    ONEDNN_DEFAULT_FPMATH_MODE=BF16) or that fails must not be used for fp32; fp32 itself passes."""
    def missing(x, w):
        raise RuntimeError("no such op")

    assert not L.onednn_fp32_probe(_bf16_matmul)
    assert not L.onednn_fp32_probe(missing)
    assert L.onednn_fp32_probe(F.linear)


def test_linear_falls_back_when_the_probe_fails(route, monkeypatch):
    """With an imprecise oneDNN, fp32 linears are F.linear's bit for bit (the probe runs once)."""
    monkeypatch.setattr(L, "_onednn_linear", _bf16_matmul)
    monkeypatch.setattr(L, "_cpu_vendor", lambda: "AuthenticAMD")
    route(None)
    x, w, b = torch.randn(5, 3, 64), torch.randn(32, 64), torch.randn(32)
    assert torch.equal(L.linear(x, w, b), F.linear(x, w, b))
    assert L.CPU_ONEDNN_FP32 is False


def test_linear_keeps_mkl_off_amd(route, monkeypatch):
    """oneDNN is chosen for AMD CPUs only (where MKL runs AVX2 code); elsewhere F.linear, bit for bit."""
    monkeypatch.setattr(L, "_cpu_vendor", lambda: "GenuineIntel")
    route(None)
    x, w = torch.randn(5, 64), torch.randn(32, 64)
    assert torch.equal(L.linear(x, w), F.linear(x, w))
    assert L.CPU_ONEDNN_FP32 is False


@needs_onednn
def test_onednn_linear_is_fp32(route):
    """oneDNN's linear differs from MKL's only by fp32 summation order: within the rounding bound
    of the probe on model-like shapes (3-D input, bias, a strided last-token slice); and bf16
    inputs still take F.linear."""
    route(True)
    x, w, b = torch.randn(4, 9, 576), torch.randn(1536, 576), torch.randn(1536)
    bound = math.sqrt(576) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    ref = x.double() @ w.double().T + b.double()
    assert ((L.linear(x, w, b).double() - ref).abs() <= bound).all()
    last = x[:, -1]  # (4, 576) with stride 9*576: the head's input
    assert ((L.linear(last, w).double() - last.double() @ w.double().T).abs() <= bound[:, -1]).all()
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(L.linear(xb, wb), F.linear(xb, wb))


def _cfg() -> ModelConfig:
    return ModelConfig(name="tiny", family="llama", vocab_size=99, hidden_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=16, ffn_dim=160, max_positions=64, norm_eps=1e-5)


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_in_place_post_attention_equals_the_reference(route, onednn):
    """The in-place residual adds and SwiGLU compute HF's LlamaDecoderLayer tail bit for bit:
    h + o(attn), then h + down(silu(gate(x)) * up(x)) with x = RMSNorm(h), out of place."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    route(onednn)
    cfg = _cfg()
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    w = {"o": r(64, 64), "mlp_norm": 1 + r(64), "gate": r(160, 64), "up": r(160, 64), "down": r(64, 160)}
    h, attn = r(3, 7, 64), r(3, 4, 7, 16)
    norm = LlamaRMSNorm(64, eps=cfg.norm_eps)
    norm.weight.data.copy_(w["mlp_norm"])
    with torch.no_grad():
        h1 = h + L.linear(L.merge_heads(attn), w["o"])
        x = norm(h1)
        ref = h1 + L.linear(F.silu(L.linear(x, w["gate"])) * L.linear(x, w["up"]), w["down"])
        h_before = h.clone()
        assert torch.equal(llama.post_attention(cfg, w, h, attn), ref)
    assert torch.equal(h, h_before)  # the caller's residual stream is not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers(dtype):
    """RMSNorm with its scale applied in place equals HF's LlamaRMSNorm bit for bit, and leaves its
    input alone (in fp32, ``t.float()`` is ``t`` itself)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 5, 48).to(dtype)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.data.normal_()
    x_before = x.clone()
    with torch.no_grad():
        assert torch.equal(L.rms_norm(x, norm.weight, 1e-5), norm(x))
    assert torch.equal(x, x_before)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_cpu_engine_keeps_freed_blocks_in_the_heap():
    """After keep_freed_host_memory a 64 MiB block comes from glibc's heap, not from mmap (which
    would be unmapped on free and faulted in again on the next allocation)."""
    from corpusgen.engine.load import keep_freed_host_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    assert keep_freed_host_memory()
    mapped = libc.mallinfo2().hblkhd
    block = torch.empty(64 << 20, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd < mapped + (64 << 20)
    del block
