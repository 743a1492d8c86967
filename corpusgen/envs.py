"""Every environment variable corpusgen reads or sets, in one place (vLLM's envs.py).

Engine behaviour is configuration (a Policy field the planner counts), never an environment
variable; what is left here comes from outside: torchrun's rendezvous, Triton's interpreter, the
Hugging Face libraries' offline switches, PyTorch's CUDA allocator. Nothing happens at import.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for each process (corpusgen.job.ranks, corpusgen.engine.pipeline)."""


def torchrun() -> Mapping[str, str]:
    """torchrun's variables that are set, by name."""
    return {k: os.environ[k] for k in TORCHRUN if k in os.environ}


def missing_rendezvous() -> list[str]:
    """torchrun's rendezvous variables a process group needs and the environment lacks."""
    return [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]


def world_size() -> int:
    """Processes in this launch (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def triton_interpret() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run, slowly, without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face libraries never reach the network inside this block (corpusgen never does)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: "1" for k in names})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


CUDA_ALLOC_CONF = "expandable_segments:True"
"""PyTorch's CUDA allocator settings for the engine: segments that grow in place, so a hard budget
is not lost to reserved-but-fragmented blocks."""


def configure_cuda_allocator() -> None:
    """Apply ``CUDA_ALLOC_CONF`` unless the user set ``PYTORCH_CUDA_ALLOC_CONF``; called by
    open_engine before its first CUDA allocation (it applies to segments allocated after it)."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    import torch

    # PyTorch's runtime setter (its name moved between releases; both are private).
    setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
              or getattr(getattr(torch.cuda, "memory", None), "_set_allocator_settings", None))
    if setter is not None:
        setter(CUDA_ALLOC_CONF)
