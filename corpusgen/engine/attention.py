"""Attention where the cache lives (DESIGN §5): one of three paths per layer and GPU batch, chosen
once (``Attention.path``) when the layer's q/k/v are computed, each a function of its own.

``HOST``      the layer's KV cache is on the host, cpu_attention is on, the batch decodes: only
              the new token's q/k/v cross the link (their copy starts when they are computed), the
              host writes them into its cache and attends there, the output goes back.
``STREAMED``  the layer's KV cache is on the host and the GPU attends: the cache's columns were
              brought over by the schedule (``load_cache``), dense or 4-bit (then a decode step
              attends straight from the packed columns); the new K/V go back on the store stream.
``RESIDENT``  the layer's KV cache is on the GPU (dense, or 4-bit attended in place at decode).

Every path attends to the numbers the cache holds: with a compressed cache the new token's K/V
are quantised and back first (``as_stored``), so placements agree. K/V are in the rotated basis
when ``compress_kv.rotate`` (the schedule rotates q, k, v after RoPE and the output back).
"""

from __future__ import annotations

import torch

from corpusgen.engine import compression as cq
from corpusgen.engine import layers as L
from corpusgen.engine.batches import Batch, sync_stores
from corpusgen.engine.kernels import packed_attention
from corpusgen.engine.kv_cache import KVCaches
from corpusgen.engine.streams import HostCopy, Streams, handoff, on, onto_device, to_host
from corpusgen.planner.policy import Compression

HOST, STREAMED, RESIDENT = "host", "streamed", "resident"


class Attention:
    """The attention step of every layer of one engine: its caches, streams and settings."""

    def __init__(self, *, kv_tiers: list[str], cpu_attention: bool, caches: KVCaches, streams: Streams,
                 compress_kv: Compression | None, packed: bool, scale: float, device: torch.device,
                 dtype: torch.dtype):
        self.kv_tiers, self.cpu_attention = kv_tiers, cpu_attention
        self.caches, self.streams, self.compress_kv = caches, streams, compress_kv
        self.packed = packed  # decode steps attend straight from a 4-bit cache (kernels/packed_attention.py)
        self.scale, self.device, self.dtype = scale, device, dtype

    def path(self, layer: int, b: Batch, col: int) -> str:
        """Where batch ``b`` attends at ``layer`` for the step at column ``col``."""
        if self.kv_tiers[layer] == "gpu":
            return RESIDENT
        return HOST if self.cpu_attention and col >= b.ids_width else STREAMED

    def send(self, path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The step's q/k/v where ``path`` needs them: their host copy starts now on ``HOST``."""
        return to_host(q, k, v) if path == HOST else (q, k, v)

    def __call__(self, path: str, layer: int, b: Batch, col: int, q_len: int, loaded_kv, qkv) -> torch.Tensor:
        """The attention output (b, heads, q_len, hd) of batch ``b`` at ``layer``; writes the step's
        K/V into the batch's cache."""
        if path == HOST:
            return self._host(layer, b, col, q_len, qkv)
        if path == STREAMED:
            return self._streamed(layer, b, col, q_len, loaded_kv, qkv)
        return self._resident(layer, b, col, q_len, qkv)

    # ------------------------------------------------------------------ the paths
    def _host(self, layer: int, b: Batch, col: int, q_len: int, qkv: HostCopy) -> torch.Tensor:
        kc, vc = b.kv[layer]
        end = col + q_len
        qh, kh, vh = qkv.wait()
        sync_stores(b)  # the prompt's K/V reach the host cache asynchronously
        self.caches.write(layer, kc, kh, col)
        self.caches.write(layer, vc, vh, col)
        dt = torch.float32 if qh.dtype == torch.float16 else qh.dtype  # CPUs have no fast fp16
        ks, vs = self.caches.view(layer, kc, end).to(dt), self.caches.view(layer, vc, end).to(dt)
        mask = None if b.no_pad else self.mask(b, b.pad_cpu, col, q_len, end)
        return onto_device(L.attend(qh.to(dt), ks, vs, mask, self.scale).to(self.dtype), self.device)

    def _streamed(self, layer: int, b: Batch, col: int, q_len: int, loaded_kv, qkv) -> torch.Tensor:
        s = self.streams
        kc, vc = b.kv[layer]
        end = col + q_len
        q, k, v = qkv
        kq, vq = self.as_stored(k), self.as_stored(v)  # attend to what the cache will hold
        if loaded_kv is not None and isinstance(loaded_kv[0], cq.Packed):
            # Decode from the 4-bit columns as they crossed the link, this step's column dense.
            mask = None if b.no_pad else self.mask(b, b.pad, col, q_len, end)
            attn = packed_attention.packed_decode_attention(
                q, *(packed_attention.packed_view(c, 0) for c in loaded_kv), mask, self.scale, kq, vq)
        else:
            if col == 0:
                ks, vs = kq, vq
            elif loaded_kv is not None:  # the prefetched columns (b, KV, col, hd) plus this step's
                ks = torch.cat([loaded_kv[0].permute(1, 2, 0, 3), kq], dim=2)
                vs = torch.cat([loaded_kv[1].permute(1, 2, 0, 3), vq], dim=2)
            else:  # a prompt step after a shared prefix or a chunk, with CPU attention: fetch [0, col)
                sync_stores(b)  # the previous chunk's K/V land on the host first (read there)
                ks = torch.cat([self.caches.view(layer, kc, col).to(self.device), kq], dim=2)
                vs = torch.cat([self.caches.view(layer, vc, col).to(self.device), vq], dim=2)
            attn = self.dense(q, ks, vs, b, col, q_len, end)
        ev = s.event(s.compute)
        s.wait(s.store, ev)
        handoff([k, v], s.store, s.compute)
        with on(s.store):  # the new columns back to the host cache, behind the compute that made them
            self.caches.write(layer, kc, k, col)
            self.caches.write(layer, vc, v, col)
        b.stored = s.event(s.store)
        return attn

    def _resident(self, layer: int, b: Batch, col: int, q_len: int, qkv) -> torch.Tensor:
        kc, vc = b.kv[layer]
        end = col + q_len
        q, k, v = qkv
        self.caches.write(layer, kc, k, col)
        self.caches.write(layer, vc, v, col)
        if col == 0 and not isinstance(kc, cq.Packed):
            ks, vs = k, v
        elif self.packed and q_len == 1:  # a 4-bit GPU cache, read where it is
            mask = None if b.no_pad else self.mask(b, b.pad, col, q_len, end)
            return packed_attention.packed_decode_attention(
                q, *(packed_attention.packed_view(cq.narrow(c, 2, 0, end), 2) for c in (kc, vc)), mask, self.scale)
        else:
            ks, vs = self.caches.view(layer, kc, end), self.caches.view(layer, vc, end)
        return self.dense(q, ks, vs, b, col, q_len, end)

    # ------------------------------------------------------------------ shared pieces
    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the KV cache stores it: quantised and back when the cache is compressed, so
        every placement attends to the same numbers."""
        c = self.compress_kv
        if c is None:
            return x
        return cq.dequantize(cq.quantize(x, c.bits, c.group_size, axis=-1))

    def dense(self, q, ks, vs, b: Batch, col: int, q_len: int, end: int) -> torch.Tensor:
        """Attention over dense K/V (b, kv_heads, end, hd) on the compute device."""
        if b.no_pad and (col == 0 or q_len == 1):  # causal prefill or unmasked decode: fused kernels
            return L.attend(q, ks.to(q.dtype), vs.to(q.dtype), None, self.scale, causal=col == 0 and q_len > 1)
        mask = self.mask(b, b.pad, col, q_len, end)
        return L.attend(q, ks.to(q.dtype), vs.to(q.dtype), mask, self.scale)

    @staticmethod
    def mask(b: Batch, pad: torch.Tensor, col: int, q_len: int, end: int) -> torch.Tensor:
        """The step's attention mask of batch ``b`` on ``pad``'s device: built once per step, not
        per layer (a host-bound GPU spends a step's tenth on ~10 small kernels per layer)."""
        key = pad.device.type
        if key not in b.step.masks:
            b.step.masks[key] = L.attention_mask(pad, col, q_len, end, b.start)
        return b.step.masks[key]
