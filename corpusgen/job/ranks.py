"""Data parallelism (DESIGN §7): processes started by torchrun split a job's rows by a hash of the key.

Rank r of a world of w processes keeps the input rows whose ``sha256(key) mod w`` is r, and writes
its parts, manifest, lock and progress under ``DIR/rank-<r>-of-<w>/``; a single process (w = 1)
writes directly in DIR, as always. The job fingerprint lives once, in DIR's own manifest.

The ranks talk once, at the start: rank 0 prepares the directory (locks, ``--restart``, the
fingerprint, cleaning what earlier launches left) while the others wait, and its outcome — or its
error — is broadcast, so every rank goes on or fails with the same message. After that they never
talk: a rank that dies cannot damage another's parts, and a relaunch of any world size skips every
key committed in any manifest of DIR (the runner unions them), so a changed ``--nproc-per-node``
resumes too.

The process group is gloo even on GPUs: a few bytes cross it once, and NCCL would take GPU memory
from each rank's budget. Nothing here imports torch until a world of more than one process asks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from corpusgen import envs, errors
from corpusgen.errors import CorpusgenError

RANK_DIR_RE = re.compile(r"^rank-(\d+)-of-(\d+)$")
T = TypeVar("T")


def key_rank(key: str, world: int) -> int:
    """The rank that owns ``key``: sha256 of its UTF-8 bytes mod ``world``.

    Stable across processes, machines and Python versions (``hash()`` is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % world


def rank_dir_name(rank: int, world: int) -> str:
    return f"rank-{rank}-of-{world}"


def parse_rank_dir(name: str) -> tuple[int, int] | None:
    """(rank, world) of a ``rank-<r>-of-<w>`` directory name, else None."""
    m = RANK_DIR_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, kw_only=True)
class Ranks:
    """Where this process stands among the processes of one launch."""

    rank: int = 0
    """This process's rank, 0 … world-1 (torchrun's ``RANK``)."""
    world: int = 1
    """Number of processes of the launch (torchrun's ``WORLD_SIZE``); 1 = a plain single process."""
    local_rank: int = 0
    """Rank among the processes of this machine (torchrun's ``LOCAL_RANK``): picks ``cuda:LOCAL_RANK``."""
    local_world: int = 1
    """Processes of the launch on this machine (torchrun's ``LOCAL_WORLD_SIZE``): they share its memory."""

    def __post_init__(self) -> None:
        assert self.world >= 1 and 0 <= self.rank < self.world and self.local_rank >= 0, self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Ranks":
        """From the variables torchrun sets; a single process when ``WORLD_SIZE`` is unset."""
        env = envs.torchrun() if env is None else env
        try:
            world = int(env.get("WORLD_SIZE") or 1)
            rank = int(env.get("RANK") or 0)
            local = int(env.get("LOCAL_RANK") or rank)
            local_world = int(env.get("LOCAL_WORLD_SIZE") or world)
        except ValueError:
            raise CorpusgenError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start corpusgen with "
                                 "torchrun, or unset them for a single process") from None
        if not (world >= 1 and 0 <= rank < world and local >= 0):
            raise CorpusgenError(f"RANK={rank} is not in 0…WORLD_SIZE-1 (WORLD_SIZE={world}); start corpusgen "
                                 "with torchrun, or unset them for a single process")
        return cls(rank=rank, world=world, local_rank=local, local_world=max(local_world, local + 1))

    @property
    def leader(self) -> bool:
        """Rank 0 prepares the output directory and holds its top-level lock."""
        return self.rank == 0

    def owns(self, key: str) -> bool:
        return self.world == 1 or key_rank(key, self.world) == self.rank

    def directory(self, out: Path) -> Path:
        """Where this process writes: DIR itself for a single process, else ``DIR/rank-<r>-of-<w>``."""
        return out if self.world == 1 else out / rank_dir_name(self.rank, self.world)

    def select_gpu(self, requested: str) -> int | None:
        """With several processes on a machine with GPUs, make ``cuda:LOCAL_RANK`` the current device,
        so that ``auto`` and ``cuda`` mean this rank's GPU, and return its index; else None."""
        if self.world == 1 or requested not in ("auto", "cuda"):
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        if self.local_rank >= torch.cuda.device_count():
            raise CorpusgenError(f"LOCAL_RANK={self.local_rank} but this machine has {torch.cuda.device_count()} "
                                 "GPU(s); start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(self.local_rank)
        return self.local_rank


class StartGroup:
    """The process group of a launch, used for one thing: rank 0 prepares, the others wait.

    A context manager; a no-op for a single process. It joins a process group that already exists
    (a library caller's) and otherwise creates a gloo one from torchrun's environment, which it
    destroys on exit."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self._owned = False

    def __enter__(self) -> "StartGroup":
        if self.ranks.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                missing = envs.missing_rendezvous()
                if missing:
                    raise CorpusgenError(f"WORLD_SIZE={self.ranks.world} but {' and '.join(missing)} is not set; "
                                         "start the ranks with torchrun")
                dist.init_process_group("gloo", rank=self.ranks.rank, world_size=self.ranks.world)
                self._owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False

    def leader_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn``; every rank returns its (picklable) result or raises its error."""
        if self.ranks.world == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.ranks.leader:
            try:
                value = fn()
            except CorpusgenError as e:
                box[0] = ("error", type(e).__name__, str(e))
                dist.broadcast_object_list(box, src=0)
                raise
            except BaseException:
                why = "rank 0 failed while preparing the output directory; see its messages"
                box[0] = ("error", "CorpusgenError", why)
                dist.broadcast_object_list(box, src=0)
                raise
            box[0] = ("ok", value)
            dist.broadcast_object_list(box, src=0)
            return value
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            _, kind, message = box[0]
            cls = getattr(errors, kind, CorpusgenError)
            raise (cls if isinstance(cls, type) and issubclass(cls, CorpusgenError) else CorpusgenError)(message)
        return box[0][1]
