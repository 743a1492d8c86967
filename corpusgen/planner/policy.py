"""Policy: where each kind of tensor lives and how a block is cut (DESIGN §5).

Placements have names (``weights: {gpu: 0.2, cpu: 0.8}``), never FlexGen's positional
``--percent 20 80 0 100 0 100``. The disk tier gets whatever gpu + cpu leave.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from corpusgen.errors import PolicyError

TIERS = ("gpu", "cpu", "disk")


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Fractions of one kind of tensor on each tier; they sum to 1."""

    gpu: float = 1.0
    """Share on the GPU."""
    cpu: float = 0.0
    """Share in pinned CPU memory."""

    @property
    def disk(self) -> float:
        """Share in the disk tier (what gpu and cpu leave)."""
        return max(0.0, 1.0 - self.gpu - self.cpu)

    def as_dict(self) -> dict[str, float]:
        return {"gpu": self.gpu, "cpu": self.cpu, "disk": round(self.disk, 6)}


@dataclass(frozen=True, kw_only=True)
class Compression:
    """Group-wise asymmetric min/max quantisation."""

    bits: int = 4
    """Bits per value: 4 or 8."""
    group_size: int = 64
    """Values sharing one (min, scale) pair."""
    rotate: bool = True
    """KV cache only: quantise K and V in a rotated basis (per head, an orthogonal rotation of
    head_dim: Hadamard, or a fixed random one when head_dim is not a power of two), so one outlier
    channel no longer sets a whole group's scale; q is rotated alike and the attention output
    back, so attention computes the same thing. Ignored for weights."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How the engine runs a model: batch shape, placements, attention site, compression."""

    gpu_batch_size: int = 8
    """Sequences computed together on the GPU in one kernel launch."""
    num_gpu_batches: int = 1
    """GPU batches per block; a block (gpu_batch_size × num_gpu_batches rows) shares one load of
    each layer's weights."""
    weights: Placement = Placement()
    """Where the layer weights live."""
    kv_cache: Placement = Placement()
    """Where the KV cache lives (gpu or cpu; disk is not supported for the cache)."""
    activations: Placement = Placement()
    """Where hidden states rest between layers (gpu or cpu)."""
    cpu_attention: bool = False
    """Run decode attention on the CPU when the KV cache is on the CPU."""
    overlap: bool = True
    """Prefetch the next layer/batch on side streams while the current batch computes."""
    refill: bool = True
    """A finished row's slot takes a waiting row (new GPU batches join mid-block); off = FlexGen's
    fixed blocks, where every row waits for the block's longest."""
    prefill_chunk: int | None = None
    """Prompt columns a GPU batch's prefill feeds per token step (chunked prefill), or None: the
    whole prompt in one step. With refill, one batch is in its prompt at a time, so batches are
    staggered and every step carries one chunk of prompt compute next to the other batches' decode:
    the GPU computes while the link moves offloaded weights and KV (docs/design.md)."""
    shared_prefix: bool = True
    """Compute the token prefix common to the prompts (system message, instructions) once and
    reuse its K/V for every row; off = every row computes its whole prompt."""
    compress_weights: Compression | None = None
    """Quantise weights (stored, moved and cached compressed), or None."""
    compress_kv: Compression | None = None
    """Quantise the KV cache, or None."""
    mlp_rows: int = 16384
    """Token rows a prefill's MLP runs over at a time (0: all at once). Rows are independent; the
    (rows, ffn) intermediates, a prefill's largest buffers, shrink to a chunk's (the memory model
    counts them so)."""
    run_ahead: int = 2
    """Units (layers) the host may queue ahead of the GPU's compute within a token step (CUDA).
    Every queued unit holds its batches' loaded KV and activations, so the bound keeps them within
    the budget the memory model counts; two keep the load stream a unit ahead of compute."""
    cuda_graphs: bool = True
    """Replay the decode steps of a model whose units, KV cache and activations are all on the GPU
    and uncompressed as CUDA graphs (no host launches); off: eager steps."""

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def replace(self, **changes: Any) -> "Policy":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gpu_batch_size": self.gpu_batch_size,
            "num_gpu_batches": self.num_gpu_batches,
            "weights": self.weights.as_dict(),
            "kv_cache": self.kv_cache.as_dict(),
            "activations": self.activations.as_dict(),
            "cpu_attention": self.cpu_attention,
            "overlap": self.overlap,
            "refill": self.refill,
            "shared_prefix": self.shared_prefix,
            "mlp_rows": self.mlp_rows,
            "run_ahead": self.run_ahead,
            "cuda_graphs": self.cuda_graphs,
        }
        if self.prefill_chunk is not None:
            out["prefill_chunk"] = self.prefill_chunk
        for name in ("compress_weights", "compress_kv"):
            c = getattr(self, name)
            out[name] = None if c is None else {"bits": c.bits, "group_size": c.group_size}
        if self.compress_kv is not None:
            out["compress_kv"]["rotate"] = self.compress_kv.rotate
        return out


_FIELDS = {f.name for f in dataclasses.fields(Policy)}


def _placement(name: str, value: Any) -> Placement:
    if not isinstance(value, Mapping):
        raise PolicyError(f"policy.{name}: expected a mapping like {{gpu: 0.2, cpu: 0.8}}, got {value!r}")
    unknown = set(value) - set(TIERS)
    if unknown:
        raise PolicyError(f"policy.{name}: unknown tier {sorted(unknown)[0]!r}; tiers are gpu, cpu, disk")
    try:
        gpu, cpu = float(value.get("gpu", 0.0)), float(value.get("cpu", 0.0))
        disk = float(value.get("disk", max(0.0, 1.0 - gpu - cpu)))
    except (TypeError, ValueError):
        raise PolicyError(f"policy.{name}: fractions must be numbers between 0 and 1, got {value!r}") from None
    if not all(math.isfinite(x) for x in (gpu, cpu, disk)):  # NaN passes every comparison below
        raise PolicyError(f"policy.{name}: fractions must be numbers between 0 and 1, got {value!r}")
    if min(gpu, cpu, disk) < 0 or abs(gpu + cpu + disk - 1.0) > 1e-6:
        raise PolicyError(f"policy.{name}: fractions must be ≥ 0 and sum to 1, got gpu={gpu} cpu={cpu} disk={disk}")
    if name in ("kv_cache", "activations") and disk > 1e-6:
        raise PolicyError(f"policy.{name}: the disk tier holds weights only; put the {name} on gpu and cpu")
    return Placement(gpu=gpu, cpu=cpu)


def _compression(name: str, value: Any) -> Compression | None:
    if value in (None, False):
        return None
    if value is True:
        return Compression()
    if isinstance(value, Mapping) and name != "compress_kv" and "rotate" in value:
        raise PolicyError(f"policy.{name}.rotate: rotate applies to compress_kv only (it rotates K and V)")
    if not isinstance(value, Mapping) or set(value) - {"bits", "group_size", "rotate"}:
        example = "{bits: 4, group_size: 64, rotate: true}" if name == "compress_kv" else "{bits: 4, group_size: 64}"
        raise PolicyError(f"policy.{name}: expected null or {example}, got {value!r}")
    rotate = value.get("rotate", True)
    if not isinstance(rotate, bool):
        raise PolicyError(f"policy.{name}.rotate: expected true or false, got {rotate!r}")
    bits, group = value.get("bits", 4), value.get("group_size", 64)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group)):
        raise PolicyError(f"policy.{name}: bits and group_size must be integers, got {value!r}")
    c = Compression(bits=bits, group_size=group, rotate=rotate)
    if c.bits not in (4, 8) or c.group_size < 2 or c.group_size % 2:
        raise PolicyError(f"policy.{name}: bits must be 4 or 8 and group_size an even number ≥ 2, got {value!r}")
    return c


def policy_from_dict(data: Mapping[str, Any]) -> Policy:
    """Validate a policy mapping (from YAML or a job's ``engine.policy``)."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"a policy is a mapping of fields, got {type(data).__name__}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise PolicyError(f"policy: unknown field {sorted(unknown)[0]!r}; fields are: {', '.join(sorted(_FIELDS))}")
    kw: dict[str, Any] = {}
    for key in ("gpu_batch_size", "num_gpu_batches"):
        if key in data:
            v = data[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PolicyError(f"policy.{key}: expected a positive integer, got {v!r}")
            kw[key] = v
    if data.get("prefill_chunk") is not None:
        v = data["prefill_chunk"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PolicyError(f"policy.prefill_chunk: expected a positive number of prompt columns or null, got {v!r}")
        kw["prefill_chunk"] = v
    for key, least in (("mlp_rows", 0), ("run_ahead", 1)):
        if key in data:
            v = data[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise PolicyError(f"policy.{key}: expected an integer ≥ {least}, got {v!r}")
            kw[key] = v
    for key in ("weights", "kv_cache", "activations"):
        if key in data:
            kw[key] = _placement(key, data[key])
    for key in ("cpu_attention", "overlap", "refill", "shared_prefix", "cuda_graphs"):
        if key in data:
            if not isinstance(data[key], bool):
                raise PolicyError(f"policy.{key}: expected true or false, got {data[key]!r}")
            kw[key] = data[key]
    for key in ("compress_weights", "compress_kv"):
        if key in data:
            kw[key] = _compression(key, data[key])
    return Policy(**kw)


def load_policy(path: str | Path) -> Policy:
    """Read a policy YAML file (policies/*.yaml)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise PolicyError(f"{p}: policy file not found; pass --policy auto or a YAML file under policies/") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, Mapping) and "policy" in data and len(data) <= 3:
        data = data["policy"]
    return policy_from_dict(data or {})


def dump_policy(policy: Policy, path: str | Path, comment: str = "") -> None:
    """Write ``policy`` as YAML (with an optional comment header)."""
    import yaml

    text = yaml.safe_dump(policy.to_dict(), sort_keys=False)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(header + text)
