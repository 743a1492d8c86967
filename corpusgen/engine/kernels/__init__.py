"""Every Triton kernel, behind one import guard, each beside the PyTorch reference it is tested
against (tests/test_kernels.py runs them through Triton's CPU interpreter in CI).

``triton`` and ``tl`` are the modules, or None where no kernel can run: no CUDA device and no
interpreter (``TRITON_INTERPRET=1``), or triton not installed. Each kernel's ``usable`` check
asks this, the tensors' device and their shapes; there is no other switch.
"""

from __future__ import annotations

import torch

from corpusgen import envs

triton = tl = None
if torch.cuda.is_available() or envs.triton_interpret():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        triton = tl = None


def runs_on(t: torch.Tensor) -> bool:
    """Whether a kernel can take tensor ``t``: on CUDA, or anywhere under the interpreter."""
    return triton is not None and (t.is_cuda or envs.triton_interpret())
