"""A GPU batch's K/V buffers on their tier: layouts, allocation, reads, writes, row selection,
realignment (design.md §6).

One K and one V buffer per layer per GPU batch. Layout by tier: on the GPU tier (b, kv_heads, seq,
hd), so decode attention reads contiguous rows; on the CPU tier seq-major (seq, b, kv_heads, hd)
when the GPU attends (a new token is one contiguous store, a prefetch of columns [0, c) one
contiguous copy) and batch-major like the GPU's when the CPU attends (its attention reads
contiguous rows). Compressed caches are ``compression.Packed`` of the same shapes. Host buffers
come from the pinned arena (counted against cpu_memory).
"""

from __future__ import annotations

import torch

from corpusgen.engine import compression as cq
from corpusgen.engine.kernels import kv_copy
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.tiers import HostArena
from corpusgen.planner.policy import Compression


class KVCaches:
    """Allocates, reads and writes the K/V buffers of each layer by the layer's tier."""

    def __init__(self, cfg: ModelConfig, kv_tier: list[str], *, cpu_attention: bool, compress: Compression | None,
                 arena: HostArena, device: torch.device, dtype: torch.dtype):
        self.cfg, self.kv_tier, self.compress = cfg, kv_tier, compress
        self.host_seq_major = not cpu_attention
        self.arena, self.device, self.dtype = arena, device, dtype
        self.host = torch.device("cpu")

    def dims(self, layer: int) -> tuple[int, int]:
        """(seq dim, row dim) of layer ``layer``'s buffers."""
        return (0, 1) if self.kv_tier[layer] == "cpu" and self.host_seq_major else (2, 0)

    def alloc(self, j: int, b: int, total: int):
        """K and V buffers of layer j for a batch of b rows. Layout by tier: on the GPU tier
        (b, kv_heads, seq, hd) so decode attention reads contiguous rows; on the CPU tier
        (seq, b, kv_heads, hd) so a new token is one contiguous store and a prefetch of
        columns [0, c) is one contiguous copy."""
        cfg, comp = self.cfg, self.compress
        on_gpu = self.kv_tier[j] == "gpu"
        batch_major = on_gpu or not self.host_seq_major
        shape = (b, cfg.num_kv_heads, total, cfg.head_dim) if batch_major else (total, b, cfg.num_kv_heads, cfg.head_dim)
        if comp is not None:
            dev = self.device if on_gpu else self.host
            alloc = None if on_gpu else self.arena.empty  # host buffers: counted, exact-size pinned
            return tuple(cq.Packed.empty(shape, self.dtype, comp.bits, comp.group_size, -1, dev, alloc=alloc)
                         for _ in range(2))
        if on_gpu:
            return tuple(torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2))
        return self.arena.empty(shape, self.dtype), self.arena.empty(shape, self.dtype)

    def capacity(self, kv: list) -> int:
        """Columns of a batch's KV buffers ``kv``."""
        dim = self.dims(0)[0]
        return kv[0][0].shape[dim]

    def view(self, layer: int, c, end: int) -> torch.Tensor:
        """Columns [0, end) of cache ``c`` as (b, kv_heads, end, hd) (dequantised if compressed)."""
        if self.kv_tier[layer] == "cpu" and self.host_seq_major:
            return prefix_columns(c, end).permute(1, 2, 0, 3)
        if isinstance(c, cq.Packed):
            return cq.read_tokens(c, end, seq_dim=2)
        return c[:, :, :end]

    def write(self, layer: int, c, x: torch.Tensor, col: int) -> None:
        """Write x (b, kv_heads, t, hd) at columns [col, col + t) of cache ``c`` (on the current
        stream; host writes from the GPU are asynchronous where the cache is pinned)."""
        if self.kv_tier[layer] == "cpu" and not self.host_seq_major:
            dst = None if isinstance(c, cq.Packed) else c[:, :, col:col + x.shape[2]]
            if x.is_cuda and dst is not None:
                # A prompt into a batch-major host cache: rows x heads strips at a fixed pitch, one
                # 2-D DMA from a contiguous copy on the GPU (kv_copy.py: PyTorch's copy stages through
                # pageable memory, synchronously).
                stage = x if x.is_contiguous() else kv_copy.tile_copy_(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)
                if kv_copy.host_2d_usable(dst, stage):
                    # On the current (store) stream: ``stage`` was allocated on it, ``x`` handed to it.
                    kv_copy.copy_to_host_2d(dst, stage, torch.cuda.current_stream(x.device))
                    return
            x = x.to(self.host)  # a strided host write: stage on the host first
            if dst is None:
                cq.write_tokens(c, x, col, seq_dim=2)
            else:
                dst.copy_(x)
        elif self.kv_tier[layer] == "cpu":
            x = x.permute(2, 0, 1, 3)  # (t, b, kv_heads, hd)
            if isinstance(c, cq.Packed):
                cq.write_tokens(c, x, col, seq_dim=0, non_blocking=True)
            else:
                c[col:col + x.shape[0]].copy_(x, non_blocking=True)
        elif isinstance(c, cq.Packed):
            cq.write_tokens(c, x, col, seq_dim=2)
        else:  # a prompt's K/V is a strided view of its projection: tile copies on CUDA
            kv_copy.tile_copy_(c[:, :, col:col + x.shape[2]], x)

    def select_rows(self, kv: list, idx: torch.Tensor) -> list:
        """Rows ``idx`` of every layer's K and V (copies; host copies in the pinned arena)."""
        out = []
        for layer, (kc, vc) in enumerate(kv):
            dim = self.dims(layer)[1]
            arena = self.arena if self.kv_tier[layer] == "cpu" else None
            out.append((_select(kc, dim, idx, arena), _select(vc, dim, idx, arena)))
        return out

    def realigned(self, parts, col: int, width: int) -> list:
        """New K/V buffers of ``width`` columns holding the rows of ``parts`` in order, each part's
        columns [0, part.col) moved so that it ends at ``col``: the shared prefix stays at
        [0, start), the rest shifts right into padding (zeroed: masked, but it must be finite, as
        0 x NaN is NaN in P @ V). Layer by layer, freeing the parts' buffers as it goes, so at most
        one layer's KV is held twice. Packed caches are copied as codes, never re-quantised."""
        n, start = sum(len(x.rows) for x in parts), parts[0].start
        kv = []
        for layer in range(len(parts[0].kv)):
            seq_dim, row_dim = self.dims(layer)
            dst = self.alloc(layer, n, width)
            row = 0
            for x in parts:
                shift, m = col - x.col, len(x.rows)
                for src_c, dst_c in zip(x.kv[layer], dst):
                    pairs = zip(src_c.buffers, dst_c.buffers) if isinstance(dst_c, cq.Packed) else ((src_c, dst_c),)
                    for s_t, d_t in pairs:
                        d_t = d_t.narrow(row_dim, row, m)
                        if start:
                            d_t.narrow(seq_dim, 0, start).copy_(s_t.narrow(seq_dim, 0, start))
                        if shift:
                            d_t.narrow(seq_dim, start, shift).zero_()
                        d_t.narrow(seq_dim, start + shift, x.col - start).copy_(s_t.narrow(seq_dim, start, x.col - start))
                row += m
                x.kv[layer] = None
            kv.append(dst)
        return kv

    def copy_prefix(self, src: list, dst: list, start: int) -> None:
        """Columns [0, start) of every layer's K/V from ``src`` (the shared prefix's one-row caches)
        into ``dst``, as the tier stores them (packed codes and group scales are copied as they
        are: nothing is re-quantised)."""
        for layer, (src_kv, dst_kv) in enumerate(zip(src, dst)):
            seq_dim = self.dims(layer)[0]
            for s_c, d_c in zip(src_kv, dst_kv):
                parts = zip(s_c.buffers, d_c.buffers) if isinstance(d_c, cq.Packed) else ((s_c, d_c),)
                for a, d in parts:  # the prefix's batch dimension (1) broadcasts over the rows
                    d.narrow(seq_dim, 0, start).copy_(a.narrow(seq_dim, 0, start))


def _select(c, dim: int, idx: torch.Tensor, arena):
    """Rows ``idx`` along ``dim`` of a cache tensor or Packed (a copy, on the cache's device;
    host copies go to the pinned ``arena``)."""
    def pick(t: torch.Tensor) -> torch.Tensor:
        if arena is None:
            return t.index_select(dim, idx.to(t.device))
        shape = list(t.shape)
        shape[dim] = len(idx)
        return torch.index_select(t, dim, idx, out=arena.empty(shape, t.dtype))

    if isinstance(c, cq.Packed):
        import dataclasses

        shape = list(c.shape)
        shape[dim] = len(idx)
        return dataclasses.replace(c, data=pick(c.data), mins=pick(c.mins), scales=pick(c.scales), shape=tuple(shape))
    return pick(c)


def to_device(c, end: int, device: torch.device):
    """Columns [0, end) of a seq-major host cache on the device; compressed caches travel
    compressed (and are dequantised by the compute stream that uses them)."""
    if isinstance(c, cq.Packed):
        return cq.narrow(c, 0, 0, end).to(device, non_blocking=True)
    return c[:end].to(device, non_blocking=True)


def buffers(kv) -> list[torch.Tensor]:
    """The tensors behind a loaded (K, V) pair, packed or not."""
    out: list[torch.Tensor] = []
    for c in kv or ():
        out.extend(c.buffers if isinstance(c, cq.Packed) else (c,))
    return out


def prefix_columns(c, end: int) -> torch.Tensor:
    """Columns [0, end) of a seq-major host cache (dequantised if compressed)."""
    if isinstance(c, cq.Packed):
        return cq.read_tokens(c, end, seq_dim=0)
    return c[:end]
