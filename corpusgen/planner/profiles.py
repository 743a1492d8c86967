"""Which hardware profile a plan uses, and why (DESIGN §6): a given YAML (or ``h200``/``h100``, the
built-ins); else the profile ``corpusgen profile`` saved for this machine
(``policies/hardware-<gpu or host>.yaml``); else the built-in profile of this GPU (H100 or H200
class); else, with no GPU, the built-in H200 profile. Measuring is engine/profile.py's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from corpusgen.errors import PolicyError
from corpusgen.planner.hardware import BUILTIN, HardwareProfile, default_path, load_profile, save_profile

@dataclass(frozen=True, kw_only=True)
class ProfileChoice:
    """The hardware profile used and why."""

    profile: HardwareProfile
    """The figures."""
    source: str
    """Its file, or ``builtin h200``."""
    this_machine: bool
    """Measured on this machine (or a built-in of this very GPU model): its predictions are worth
    recording next to measured throughput."""
    note: str
    """One line saying why this profile."""

    @property
    def cpu(self) -> bool:
        """A profile of a CPU-only machine (its "GPU" figures are the CPU's)."""
        return self.profile.device_name.startswith("cpu-")


def cuda_name() -> str | None:
    """Name of the current CUDA device, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def saved_profile_path(device: str) -> Path:
    """Where ``corpusgen profile`` saves (and the planner looks for) this machine's profile:
    named after the GPU, or the host name for ``cpu``."""
    return default_path(cuda_name() if device != "cpu" else None)


def _builtin_for(gpu: str) -> str:
    return "h100" if "H100" in gpu.upper() else "h200"


def _matches_machine(profile: HardwareProfile) -> bool:
    """The profile describes this machine: its host (CPU profiles), its GPU model (built-ins: H100,
    H200), or its exact GPU name (measured)."""
    if profile.device_name.startswith("cpu-"):
        return profile.device_name == f"cpu-{socket.gethostname()}"
    gpu = cuda_name()
    if gpu is None:
        return False
    if profile.measured == "builtin":
        return profile.device_name.split()[1] in gpu
    return profile.device_name in gpu


def resolve_profile(path: str | None = None, device: str = "auto") -> ProfileChoice:
    """The profile to plan with (see the module docstring)."""
    if path:
        if path.lower() in BUILTIN:
            prof = BUILTIN[path.lower()]
            return ProfileChoice(profile=prof, source=f"builtin {path.lower()}", this_machine=_matches_machine(prof),
                                 note=f"the built-in {path.lower()} profile (--profile)")
        prof = load_profile(path)
        return ProfileChoice(profile=prof, source=str(path), this_machine=_matches_machine(prof),
                             note=f"{path} (measured {prof.measured} on {prof.device_name})")
    gpu = cuda_name() if device != "cpu" else None
    saved = default_path(gpu)
    if saved.is_file():
        prof = load_profile(saved)
        return ProfileChoice(profile=prof, source=str(saved), this_machine=True,
                             note=f"this machine's saved profile {saved} (measured {prof.measured})")
    if gpu is not None:
        name = _builtin_for(gpu)
        return ProfileChoice(profile=BUILTIN[name], source=f"builtin {name}",
                             this_machine=_matches_machine(BUILTIN[name]),
                             note=f"no saved profile for {gpu} ({saved}): the built-in {name} profile; "
                                  "`corpusgen profile` measures this machine")
    return ProfileChoice(profile=BUILTIN["h200"], source="builtin h200", this_machine=False,
                         note=f"no saved profile ({saved}) and no GPU: the built-in H200 profile; "
                              "`corpusgen profile` measures this machine")


def measure_profile(device: str = "auto", *, out: str | Path | None = None, offload_dir: str | Path | None = None,
                    remeasure: bool = False, quick: bool = False) -> tuple[HardwareProfile, Path, bool]:
    """This machine's profile: (profile, its file, reused). Reuses the file unless ``remeasure``.

    ``quick`` measures with small transfers (seconds, noisier figures)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PolicyError("--device cuda but no CUDA GPU is visible; use --device cpu")
    path = Path(out) if out else saved_profile_path(device)
    if path.is_file() and not remeasure:
        return load_profile(path), path, True
    from corpusgen.engine.profile import measure

    sizes = {"copy_mb": 32, "disk_mb": 64} if quick else {}
    try:
        prof = measure(device, offload_dir=offload_dir, **sizes)
    except OSError as e:
        raise PolicyError(f"measuring failed ({e}); pass --offload-dir on a writable disk") from None
    return prof, save_profile(prof, path), False
