"""Every Triton kernel through Triton's CPU interpreter (``TRITON_INTERPRET=1``), on small CPU
tensors, against its PyTorch reference: CI has no GPU, and without this the kernels' index
arithmetic, masks and split bookkeeping would go untested there. tests/test_cuda_kernels.py runs
them compiled, on CUDA, at engine scale and inside the engine.

The interpreter has to be on before ``corpusgen.engine.kernels`` is imported (its one import guard
reads it), and off for the rest of the suite, whose CPU code paths must stay the ones users get.
So the checks run in one child process started with ``TRITON_INTERPRET=1`` (one import of torch
and triton for all of them): ``python tests/test_kernels.py`` runs every ``check_*`` function below
and prints their outcomes as one JSON line; each test reports its own.

Not covered: the ``cudaMemcpy2DAsync`` host copy in kv_copy.py (CUDA runtime, not Triton).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
_MARK = "KERNEL-CHECKS "


def _why_not() -> str | None:
    """Why the interpreter cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install triton; the test extra has it) for TRITON_INTERPRET=1"
    from importlib.metadata import version

    import numpy

    v = version("triton")
    if int(numpy.__version__.split(".")[0]) >= 2 and tuple(int(x) for x in re.findall(r"\d+", v)[:2]) < (3, 7):
        return f"triton {v}'s interpreter fails under numpy 2 (tensor.__index__); needs triton >= 3.7"
    return None


# --------------------------------------------------------------------------- the checks (child process)

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dequant4() -> None:
    """dequant4 equals compression._dequantize_last rounded to the output dtype, bit for bit in fp32
    and fp16 (docs/design.md says the kernel equals the torch path exactly); in bf16 within one ulp,
    as the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest. On odd lengths (the
    last group padded), tiles cut by rows and columns, a constant group (scale 0), strided codes (a
    narrowed cache) and a strided output; and compression.dequantize takes the kernel here."""
    from corpusgen.engine import compression as cq
    from corpusgen.engine.kernels import dequantize as dk

    g = _gen(1)
    cases = [((7,), 64, 64), ((3, 5), 130, 64), ((2,), 2500, 32), ((1,), 6, 16), ((9, 2), 96, 32)]
    for lead, length, gs in cases:
        for dtype in DTYPES:
            x = torch.randn(*lead, length, generator=g) * 3 + 1
            x[..., : min(gs, length)] = 0.5  # a constant group: scale 0, every code 0
            p = cq.quantize(x.to(dtype), 4, gs)
            want = cq._dequantize_last(*p.buffers, 4, gs, length).to(dtype)
            out = torch.full(x.shape, float("nan"), dtype=dtype)
            got = dk.dequant4(*p.buffers, gs, out)
            assert got is out
            if dtype == torch.bfloat16:
                tol = torch.finfo(dtype).eps * want.float().abs()
                assert ((got.float() - want.float()).abs() <= tol).all(), (lead, length, gs, dtype)
            else:
                assert torch.equal(got, want), (lead, length, gs, dtype)
            # A strided output (a transposed buffer): filled through a contiguous copy.
            out_t = torch.empty(x.shape[::-1], dtype=dtype).transpose(0, -1) if x.dim() == 2 else None
            if out_t is not None:
                assert torch.equal(dk.dequant4(*p.buffers, gs, out_t), got)
            # Codes narrowed along a leading dim (strided): the cache's live rows.
            if lead[0] > 1:
                part = cq.narrow(p, 0, 1, lead[0] - 1)
                assert dk.usable(4, True, torch.empty(part.shape, dtype=dtype))
                assert torch.equal(cq.dequantize(part), got[1:]), "compression.dequantize through the kernel"


def _padding_mask(b: int, k_len: int, g: torch.Generator) -> torch.Tensor:
    """(b, k_len) True = visible: each row a short prefix, then left padding, as the engine lays
    it out; row 0 padded over half its columns (whole tiles and splits masked)."""
    mask = torch.ones(b, k_len, dtype=torch.bool)
    for row in range(b):
        pad = k_len // 2 if row == 0 else int(torch.randint(0, max(1, k_len // 2), (1,), generator=g))
        start = min(2, k_len - 1)
        mask[row, start : start + pad] = False
    return mask


def check_decode_attention() -> None:
    """decode_attention against the float64 reference (``reference``) at selfcheck's tolerance,
    4 eps(dtype) * (max |ref| + 1): one split writing directly and 4 to 13 splits through the
    combine kernel, several tiles per split with the last one cut, one column, strided (narrowed)
    caches, padding masks that hide whole tiles and splits, and the live length read from a
    tensor (``klen``, CUDA graphs) over the whole buffer."""
    from corpusgen.engine.kernels import decode_attention as da

    g = _gen(2)
    # (batch, heads, k_len, head_dim, block_t, programs): programs sets the split count. Each case
    # runs in two dtypes, the three taking turns (the interpreter costs ~10 ms per program and tile).
    cases = [(2, 2, 17, 64, None, None),  # the default tile (128 columns), one split, direct
             (1, 3, 130, 64, 16, 24),  # 5 splits of 2 tiles, the last one cut
             (1, 1, 200, 64, 16, 64),  # 13 splits of one tile
             (2, 1, 1, 128, 16, 64),  # one column
             (1, 2, 77, 128, 8, 1)]  # one split of 10 tiles  # fmt: skip
    for i, (b, heads, k_len, d, block_t, programs) in enumerate(cases):
        for dtype in (DTYPES[i % 3], DTYPES[(i + 1) % 3]):
            q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
            cache_k, cache_v = (torch.randn(b, heads, k_len + 7, d, generator=g).to(dtype) for _ in range(2))
            k, v = cache_k[:, :, :k_len], cache_v[:, :, :k_len]
            mask = _padding_mask(b, k_len, g)
            for m in (None, mask):
                ref = da.reference(q, k, v, m, d**-0.5)
                tol = 4 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
                got = da.decode_attention(q, k, v, None if m is None else m.view(b, 1, 1, k_len), d**-0.5,
                                          block_t=block_t, programs=programs)  # fmt: skip
                err = (got.double() - ref).abs().max().item()
                case = (b, heads, k_len, d, block_t, programs, dtype, m is not None)
                assert got.dtype == dtype and not got.isnan().any() and err <= tol, (case, err, tol)
                if m is None:
                    continue
                # CUDA graphs: the whole buffer, the live length from a tensor, the mask past it False.
                klen = torch.full((1,), k_len, dtype=torch.int32)
                full_m = torch.cat([m, m.new_zeros(b, 7)], 1)
                got = da.decode_attention(q, cache_k, cache_v, full_m, d**-0.5, block_t=block_t, programs=programs,
                                          klen=klen)  # fmt: skip
                err = (got.double() - ref).abs().max().item()
                assert not got.isnan().any() and err <= tol, ("klen", case, err, tol)


def check_packed_decode_attention() -> None:
    """packed_decode_attention against dequantise-then-float64-attention at packed_selfcheck's
    tolerance, 4 eps(dtype) * (max |ref| + 1): groups of 16 to 64, seq-major (host) and batch-major
    caches narrowed to their live columns, padding masks, this step's dense tail column, one split
    and several. The reference dequantises with torch ops (compression._dequantize_last), not with
    the dequant4 kernel."""
    from corpusgen.engine import compression as cq
    from corpusgen.engine.kernels import decode_attention as da
    from corpusgen.engine.kernels import packed_attention as pa

    g = _gen(3)
    # (batch, heads, n, head_dim, group): 2 splits of one tile, 4 of one, one column, 5 splits.
    # Each case runs seq-major in one dtype and batch-major in the next, the three taking turns.
    cases = [(2, 2, 17, 64, 64), (1, 2, 50, 64, 16), (2, 1, 1, 128, 32), (1, 1, 70, 128, 64)]
    for i, (b, heads, n, d, gs) in enumerate(cases):
        for seq_major, dtype in ((True, DTYPES[i % 3]), (False, DTYPES[(i + 1) % 3])):
            q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
            tail = [torch.randn(b, heads, 1, d, generator=g).to(dtype) for _ in range(2)]
            mask = torch.cat([_padding_mask(b, n, g), torch.ones(b, 1, dtype=torch.bool)], 1)
            shape = (n + 5, b, heads, d) if seq_major else (b, heads, n + 5, d)
            seq_dim = 0 if seq_major else 2
            packed = [cq.narrow(cq.quantize(torch.randn(shape, generator=g).to(dtype), 4, gs), seq_dim, 0, n)
                      for _ in range(2)]  # fmt: skip
            kv = [pa.packed_view(p, seq_dim) for p in packed]
            dense = [cq._dequantize_last(*bufs, 4, gs, d).to(dtype) for bufs in kv]  # (b, heads, n, d)
            for m in (None, mask):
                for with_tail in (False, True):
                    kk = torch.cat([dense[0], tail[0]], 2) if with_tail else dense[0]
                    vv = torch.cat([dense[1], tail[1]], 2) if with_tail else dense[1]
                    mm = None if m is None else (m if with_tail else m[:, :n])
                    ref = da.reference(q, kk, vv, mm, d**-0.5)
                    got = pa.packed_decode_attention(q, kv[0], kv[1], mm, d**-0.5,
                                                     *(tail if with_tail else (None, None)))  # fmt: skip
                    err = (got.double() - ref).abs().max().item()
                    tol = 4 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
                    case = (b, heads, n, d, gs, dtype, seq_major, m is not None, with_tail)
                    assert got.dtype == dtype and not got.isnan().any() and err <= tol, (case, err, tol)


def check_fused_norm() -> None:
    """The add + LayerNorm kernel (``_launch``; ``usable`` keeps the engine's CPU path on PyTorch):
    the residual sum equals ``h + delta`` in the dtype exactly and lands in ``delta``; the norm is
    within 2 eps(dtype) * (max |ref| + 1) of fp32 F.layer_norm of that sum (test_cuda_kernels.py's
    tolerance), on widths that are not powers of two (masked columns), one to a few rows; the
    variant without the add, likewise."""
    from corpusgen.engine.kernels import fused_norm as fn

    g = _gen(4)
    for rows, n in ((1, 5), (3, 100), (7, 1000), (2, 2049)):
        for dtype in DTYPES:
            h = (torch.randn(rows, n, generator=g) * 3 + 1).to(dtype)
            d = torch.randn(rows, n, generator=g).to(dtype)
            w, bias = (torch.randn(n, generator=g).to(dtype) for _ in range(2))
            want = h + d
            delta = d.clone()
            s, y = fn._launch(h, delta, w, bias, 1e-5)
            assert s is delta, "the sum lands in delta"
            if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest)
                assert ((s.float() - want.float()).abs() <= torch.finfo(dtype).eps * want.float().abs()).all()
            else:
                assert torch.equal(s, want), ("the sum, rounded to the dtype", rows, n, dtype)
            ref = F.layer_norm(s.float(), (n,), w.float(), bias.float(), 1e-5)
            tol = 2 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
            assert y.dtype == dtype and (y.float() - ref).abs().max().item() <= tol, (rows, n, dtype)
            _, y = fn._launch(h, None, w, bias, 1e-5)
            ref = F.layer_norm(h.float(), (n,), w.float(), bias.float(), 1e-5)
            assert (y.float() - ref).abs().max().item() <= tol, ("no add", rows, n, dtype)


def check_tile_copy() -> None:
    """The K/V tile copy (``_tile_copy``, the launch behind ``tile_copy_``) equals ``copy_``
    bit for bit: a projection viewed as heads (strided source) into a narrowed cache window,
    sequence lengths that cut the last tile, head sizes 16 to 128, every dtype; nothing outside
    the window changes."""
    from corpusgen.engine.kernels import kv_copy

    g = _gen(5)
    for b, heads, s, d, cols, col, block_t in ((3, 5, 37, 64, 50, 4, 32), (1, 2, 30, 128, 33, 0, 16),
                                               (4, 3, 9, 16, 9, 0, 16)):  # fmt: skip
        for dtype in DTYPES:
            x = torch.randn(b, s, heads * d, generator=g).to(dtype)
            src = x.view(b, s, heads, d).transpose(1, 2)  # as pre_attention splits a projection into heads
            cache = torch.randn(b, heads, cols, d, generator=g).to(dtype)
            want = cache.clone()
            want[:, :, col : col + s] = src
            kv_copy._tile_copy(cache[:, :, col : col + s], src, block_t)
            assert torch.equal(cache, want), (b, heads, s, d, dtype)


def check_engine_routing_stays_on_pytorch() -> None:
    """Under the interpreter the kernels can be launched on CPU tensors, but the engine's routing
    checks still send CPU tensors to PyTorch (the interpreter is for tests): decode attention,
    the packed cache, the fused norm and the tile copy ask for CUDA. Only dequantisation asks
    ``runs_on``, so compression.dequantize uses the kernel here."""
    from corpusgen.engine.kernels import decode_attention as da
    from corpusgen.engine.kernels import packed_attention as pa
    from corpusgen.engine.kernels import dequantize as dk
    from corpusgen.engine.kernels import fused_norm as fn
    from corpusgen.engine.kernels import kv_copy, runs_on, triton
    from corpusgen.engine.config import preset
    from corpusgen.planner.policy import Compression

    x = torch.zeros(2, 4, 1, 128, dtype=torch.float16)
    k = x.expand(2, 4, 1 << 22, 128)  # past MIN_KV_ELEMENTS, without the memory
    assert triton is not None and runs_on(x)
    assert not da.usable(x, k)
    assert not pa.packed_usable(preset("opt-125m"), torch.device("cpu"), torch.float16, Compression(bits=4))
    rows = torch.zeros(fn.MIN_ROWS, 64, dtype=torch.float16)
    assert not fn.usable(rows, rows[0])
    big = torch.zeros(1, 16, kv_copy.MIN_ELEMENTS // (16 * 64), 64, dtype=torch.float16)  # 2 MiB
    assert not kv_copy.tile_copy_usable(big, big)
    assert dk.usable(4, True, x)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def _run_checks() -> None:
    """The child process: every check under the interpreter; one JSON line of outcomes."""
    from corpusgen import envs

    assert envs.triton_interpret(), "run with TRITON_INTERPRET=1"
    out = {}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            fn()
            out[name] = {"error": None}
        except Exception:  # noqa: BLE001 - reported to the test, with its traceback
            out[name] = {"error": traceback.format_exc()}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(_MARK + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- the tests (pytest process)

@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Outcomes of every check, from one child process with TRITON_INTERPRET=1 (the tests that
    use it skip where triton cannot run)."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and lines, f"the interpreter process failed:\n{tail}"
    return json.loads(lines[-1][len(_MARK):])


def _outcome(interpreted: dict, name: str) -> None:
    err = interpreted[name]["error"]
    if err:
        pytest.fail(f"{name} under TRITON_INTERPRET=1:\n{err}", pytrace=False)


def test_dequant4_matches_the_torch_dequantisation(interpreted):
    """Every 4-bit weight and KV read on CUDA goes through dequant4; a wrong nibble, group or
    padding offset would corrupt model outputs silently, and CI has no GPU to catch it."""
    _outcome(interpreted, "check_dequant4")


def test_split_kv_decode_attention_matches_float64(interpreted):
    """The decode kernel's split plan, online softmax, masked tiles and combine step are where
    attention goes wrong without an error; CI checks them on shapes that exercise each."""
    _outcome(interpreted, "check_decode_attention")


def test_packed_decode_attention_matches_dequantise_then_attend(interpreted):
    """Attention straight from the 4-bit cache decodes nibbles, groups, strides of two cache
    layouts and a tail column in registers: each is a way to be silently wrong."""
    _outcome(interpreted, "check_packed_decode_attention")


def test_fused_add_layer_norm_matches_pytorch(interpreted):
    """Every large CUDA prefill's residual add and LayerNorm run in this kernel; its masking of
    widths that are not powers of two and its in-place sum need checking without a GPU."""
    _outcome(interpreted, "check_fused_norm")


def test_tile_copy_matches_copy(interpreted):
    """A prefill's K/V reach the GPU cache through the tile copy; an off-by-one stride or tile
    mask would write outside the cache window or leave columns stale."""
    _outcome(interpreted, "check_tile_copy")


def test_interpreter_does_not_reroute_the_engine(interpreted):
    """The interpreter exists here for tests: it must not move the engine's CPU paths (what users
    run without a GPU) onto kernels, except dequantisation, whose check asks ``runs_on``."""
    _outcome(interpreted, "check_engine_routing_stays_on_pytorch")


def test_the_rest_of_the_suite_runs_without_the_interpreter():
    """The other tests pin the CPU code paths users get; with TRITON_INTERPRET=1 set for the whole
    run, CPU dequantisation would go through the interpreter instead. Only the child process above
    sets it."""
    from corpusgen import envs

    assert not envs.triton_interpret(), "run the suite without TRITON_INTERPRET=1; tests/test_kernels.py sets it itself"


if __name__ == "__main__":
    _run_checks()
