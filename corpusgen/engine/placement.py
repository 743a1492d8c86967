"""Weight placement: each unit's weights go to the tier the policy gives them, and come back to
the compute device one unit at a time, prefetched, for the block schedule.

The layers-to-tiers assignment is :func:`corpusgen.planner.memory.realise` — the same function the
planner's memory accounting uses, so what is planned is what is allocated. ``embed`` and ``head``
always live on the compute device. Compressed weights are stored and moved compressed
(``name.data``/``name.mins``/``name.scales`` in a record) and dequantised on the device once per
layer per token step, shared by every GPU batch of the block.
"""

from __future__ import annotations

import threading
from types import ModuleType

import torch

from corpusgen.engine import compression as cq
from corpusgen.engine.models import llama, opt
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.tiers import DiskTier, HostArena, Record
from corpusgen.planner.memory import realise
from corpusgen.planner.policy import Policy

_PARTS = ("data", "mins", "scales")


def family_of(cfg: ModelConfig) -> ModuleType:
    return {"opt": opt, "llama": llama}[cfg.family]


def compressible(unit: str, name: str, t: torch.Tensor) -> bool:
    """Linear weights of decoder layers are quantised; norms, biases and embeddings are not."""
    return unit.startswith("layer.") and t.dim() == 2


def _quantize_rows(t: torch.Tensor, bits: int, group_size: int, chunk: int = 1 << 24) -> cq.Packed:
    """Quantise an (out, in) weight in row chunks (groups run along ``in``, so chunks are
    independent): bounds the fp32 temporaries — a whole OPT-175B fc1 needed 2.25 GiB more."""
    rows = max(1, chunk // t.shape[1])
    if t.shape[0] <= rows:
        return cq.quantize(t, bits, group_size, axis=-1)
    parts = [cq.quantize(t[i:i + rows], bits, group_size, axis=-1) for i in range(0, t.shape[0], rows)]
    cat = lambda bufs: torch.cat(bufs, dim=0)  # noqa: E731
    return cq.Packed(data=cat([p.data for p in parts]), mins=cat([p.mins for p in parts]),
                     scales=cat([p.scales for p in parts]), shape=tuple(t.shape), dtype=t.dtype, bits=bits,
                     group_size=group_size, axis=1)


class WeightStore:
    """Holds every unit on its tier; ``prefetch(j)`` starts bringing unit j to the device and
    ``get(j)`` returns it ready for compute (the family's weight dict)."""

    def __init__(self, cfg: ModelConfig, units, policy: Policy, *, device: torch.device, dtype: torch.dtype,
                 arena: HostArena, disk: DiskTier | None):
        self.cfg, self.policy, self.device, self.dtype = cfg, policy, device, dtype
        self.placement = pl = realise(policy, cfg)
        self.weight_tiers = [pl.weight_tier(i) for i in range(cfg.num_layers)]
        self.kv_tiers = [pl.kv_tier(i) for i in range(cfg.num_layers)]
        self.arena, self.disk = arena, disk
        self.names = ["embed", *(f"layer.{i}" for i in range(cfg.num_layers)), "head"]
        self.tier: list[str] = []
        self.records: list[Record | None] = []
        self.meta: list[dict[str, tuple]] = []  # per unit: (shape, dtype, bits, group_size, axis) of packed tensors
        self.resident_bytes = {"gpu": 0, "cpu": 0, "disk": 0}
        shared: dict[int, torch.Tensor] = {}
        self._keep: list[torch.Tensor] = []
        for j, (name, w) in enumerate(units):
            assert name == self.names[j], (name, self.names[j])
            tier = "gpu" if j in (0, cfg.num_layers + 1) else self.weight_tiers[j - 1]
            record, meta = self._prepare(name, w, tier, shared)
            nbytes = sum(t.numel() * t.element_size() for t in record.values())
            self.resident_bytes[tier] += nbytes
            if tier == "gpu" and self.device.type == "cuda" and name.startswith("layer."):
                _fuse_qkv(record)  # after counting: q/k/v become views of the fused tensor
            if tier == "disk":
                assert disk is not None, "a disk placement needs an offload_dir"
                disk.put(name, record)
                record = None
            self.tier.append(tier)
            self.records.append(record)
            self.meta.append(meta)
        self._keep.clear()
        disk_sizes = [disk.size(n) for n, t in zip(self.names, self.tier) if t == "disk"] if disk else []
        # Two pinned staging buffers: one being filled from disk while the other drains to the GPU.
        self.staging = [arena.empty((max(disk_sizes),), torch.uint8) for _ in range(2)] if disk_sizes else []
        self._slot_events: list = [None, None]
        self._slot = 0
        # Two device buffers that streamed units are copied into, alternately, allocated once and
        # reused for the whole run (not a fresh allocation per layer, which churns the allocator:
        # an OPT-30B layer is 1.2 GB). A buffer is
        # refilled only after the event recorded when its last unit was released.
        self._buffers: list[dict[str, torch.Tensor]] = [{}, {}]
        self._buffer_free: list = [None, None]
        self._next_buffer = 0
        self._in_buffer: dict[int, int] = {}
        self._pending: dict[int, object] = {}
        self._lock = threading.Lock()
        self.load_stream = None  # set by the engine (CUDA side stream), None = compute stream

    # ------------------------------------------------------------------ placing
    def _prepare(self, unit: str, w: dict[str, torch.Tensor], tier: str, shared: dict[int, torch.Tensor]):
        comp = self.policy.compress_weights
        record: Record = {}
        meta: dict[str, tuple] = {}
        for name, t in w.items():
            if id(t) in shared:  # tied LM head: the embedding already placed, shared not copied
                record[name] = shared[id(t)]
                continue
            if comp is not None and compressible(unit, name, t):
                # From the values as loaded (fp32 for GGUF, see open_engine), not their rounding to
                # the compute dtype: dequantised output is then cast exactly as the plain weight is.
                p = _quantize_rows(t, comp.bits, comp.group_size)
                meta[name] = (p.shape, p.dtype, p.bits, p.group_size, p.axis)
                for part, buf in zip(_PARTS, p.buffers):
                    record[f"{name}.{part}"] = self._place(buf, tier)
            else:
                record[name] = self._place(t.to(self.dtype), tier)
                if unit == "embed":  # only the embedding can be tied; keep `t` alive so its id stays unique
                    shared[id(t)] = record[name]
                    self._keep.append(t)
        return record, meta

    def _place(self, t: torch.Tensor, tier: str) -> torch.Tensor:
        if tier == "gpu":
            return t.to(self.device).contiguous()
        if tier == "cpu":
            return self.arena.hold(t.contiguous())
        return t.contiguous()  # disk: written by the caller, then dropped

    # ------------------------------------------------------------------ fetching
    def next_streamed(self, j: int) -> int:
        """The first unit after j (wrapping around) that is not resident on the device; j + 1
        (mod units) when every unit is resident."""
        n = len(self.tier)
        return next(((j + i) % n for i in range(1, n + 1) if self.tier[(j + i) % n] != "gpu"), (j + 1) % n)

    def prefetch(self, j: int) -> None:
        """Start bringing unit j to the device (no-op for device-resident units)."""
        if self.tier[j] == "gpu" or j in self._pending:
            return
        buf = self._next_buffer
        self._next_buffer ^= 1
        if self.tier[j] == "disk":
            slot = self._slot
            self._slot ^= 1
            self._pending[j] = self.disk.submit(self._load_disk, j, slot, buf)
        else:
            self._pending[j] = self._load(j, self.records[j], buf)

    def _load_disk(self, j: int, slot: int, buf: int):
        ev = self._slot_events[slot]
        if ev is not None:
            ev.synchronize()  # the previous copy out of this staging buffer has drained
        record = self.disk.read_into(self.names[j], self.staging[slot])
        out = self._load(j, record, buf)
        self._slot_events[slot] = out[1]
        return out

    def _load(self, j: int, record: Record, buf: int):
        """Copy a host record into device buffer ``buf`` on the load stream; returns (record on
        the device, event, buf)."""
        if self.device.type != "cuda":
            return record, None, None
        stream = self.load_stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            if self._buffer_free[buf] is not None:
                stream.wait_event(self._buffer_free[buf])  # the unit last in this buffer is computed
            dst = self._buffers[buf]
            out = {}
            for k, v in record.items():
                t = dst.get(k)
                if t is None or t.shape != v.shape or t.dtype != v.dtype:
                    t = dst[k] = torch.empty(v.shape, dtype=v.dtype, device=self.device)
                out[k] = t.copy_(v, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        return out, ev, buf

    def get(self, j: int) -> dict[str, torch.Tensor]:
        """Unit j's weights on the device, dequantised, ready for the family's functions."""
        if self.tier[j] == "gpu":
            return self._materialise(j, self.records[j])
        if j not in self._pending:
            self.prefetch(j)
        pending = self._pending.pop(j)
        record, ev, buf = DiskTier.wait(pending) if self.tier[j] == "disk" else pending
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            self._in_buffer[j] = buf
        return self._materialise(j, record)

    def _materialise(self, j: int, record: Record) -> dict[str, torch.Tensor]:
        meta = self.meta[j]
        if not meta:
            return record
        out = {k: v for k, v in record.items() if k.rsplit(".", 1)[0] not in meta}
        for name, (shape, dtype, bits, group_size, axis) in meta.items():
            parts = [record[f"{name}.{part}"] for part in _PARTS]
            packed = cq.Packed(data=parts[0], mins=parts[1], scales=parts[2], shape=shape, dtype=dtype,
                               bits=bits, group_size=group_size, axis=axis)
            out[name] = cq.dequantize(packed, dtype=self.dtype)
        return out

    def release(self, j: int) -> None:
        """Unit j's compute is enqueued: its device buffer may be refilled once that compute is done."""
        buf = self._in_buffer.pop(j, None)
        if buf is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._buffer_free[buf] = ev


def _fuse_qkv(record: Record) -> None:
    """Replace ``q``, ``k``, ``v`` and their biases by row slices of two concatenated tensors,
    ``qkv`` and ``qkv_bias`` (no extra memory once the originals are dropped). Only layers with
    uncompressed q/k/v and biases (OPT), the ones ``opt.pre_attention`` fuses."""
    groups = ((("q", "k", "v"), "qkv"), (("q_bias", "k_bias", "v_bias"), "qkv_bias"))
    if not all(n in record for names, _ in groups for n in names):
        return
    for names, fused in groups:
        parts = [record[n] for n in names]
        record[fused] = torch.cat(parts)
        for n, view in zip(names, record[fused].split([p.shape[0] for p in parts])):
            record[n] = view
