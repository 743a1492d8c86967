"""What this machine has, and the one check that a memory budget does not exceed it.

A GPU budget over the GPU's memory, a CPU budget over the host's physical memory, or a disk tier
over the offload directory's free space is refused up front, naming what the machine has:
otherwise the job starts and the kernel's OOM killer (or a full disk) ends it hours later.
``plan`` (when it plans for this machine), ``bench`` and ``run`` call :func:`check_against_machine`.
No torch import unless a GPU budget is to be checked on a CUDA device.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from corpusgen.errors import BudgetError

GIB = 2**30


def host_memory() -> int:
    """Physical memory of this machine, bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def disk_free(directory: str | Path | None) -> int:
    """Free bytes where ``directory`` is (or would be created); the temp dir when None."""
    p = Path(directory or tempfile.gettempdir()).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def gpu_memory(device: str | None) -> tuple[int, str] | None:
    """(bytes, name) of the CUDA device the engine's GPU tier will be on; None when it is the CPU
    (``device`` cpu, or auto without CUDA)."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device not in (None, "auto", "cuda") else None
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    return props.total_memory, props.name


def _gib(b: int) -> str:
    return f"{b / GIB:,.1f} GiB"


def check_against_machine(*, gpu_budget: int | None, cpu_budget: int | None, device: str | None,
                          disk_bytes: int = 0, offload_dir: str | Path | None = None,
                          machine: tuple[int, int, str] | None = None) -> None:
    """Raise BudgetError when a budget exceeds what the machine has.

    ``device``: where the engine's GPU tier is (cpu, cuda, cuda:N, or auto/None: CUDA when present);
    on the CPU the GPU budget is host memory too. ``disk_bytes``: what the disk tier will hold in
    ``offload_dir`` (the temp dir when None). ``machine``: (GPU bytes, host bytes, name) of another
    machine being planned for (a hardware profile), instead of this one.
    """
    if machine is not None:
        gpu_has, host, where = machine[0], machine[1], f"the planned machine ({machine[2]})"
        gpu = (gpu_has, where) if device != "cpu" else None
    else:
        host, where = host_memory(), "this machine"
        gpu = gpu_memory(device) if gpu_budget is not None else None
    if cpu_budget is not None and cpu_budget > host:
        raise BudgetError(f"CPU budget {_gib(cpu_budget)} (--cpu-mem / engine.cpu_memory) is more than {where} "
                          f"has: {_gib(host)} of physical memory; give at most that (less leaves room for the OS)")
    if gpu_budget is not None:
        if gpu is None and gpu_budget > host:
            raise BudgetError(f"GPU budget {_gib(gpu_budget)} (--gpu-mem / engine.gpu_memory) is more than {where} "
                              f"has: the GPU tier is the CPU here, with {_gib(host)} of physical memory")
        if gpu is not None and gpu_budget > gpu[0]:
            raise BudgetError(f"GPU budget {_gib(gpu_budget)} (--gpu-mem / engine.gpu_memory) is more than the GPU "
                              f"has: {_gib(gpu[0])} ({gpu[1]}); give at most that")
    if disk_bytes > 0:
        free = disk_free(offload_dir)
        if disk_bytes > free:
            raise BudgetError(f"the policy puts {_gib(disk_bytes)} of weights on disk but "
                              f"{offload_dir or tempfile.gettempdir()} has {_gib(free)} free; free space, choose "
                              "another offload directory (engine.offload_dir / --offload-dir), or a larger CPU budget")
