"""The block schedule (FlexGen, Sheng et al. 2023, Alg. 1), generalised to both model families.

The loop
--------
A *block* is ``gpu_batch_size × num_gpu_batches`` rows. The model is a list of units
``embed, layer.0 … layer.n-1, head``. For one block::

    for step in (prefill, decode_1, …, decode_G-1):        # token steps
        for j, unit in enumerate(units):                   # layers
            load_weight(j + 1)                             # prefetch, whole block's compute to hide it
            for k in range(num_gpu_batches):               # GPU batches
                load_cache(j, k + 1)                       # prefetch next batch's KV / activations
                compute(j, k)
                store_cache(j, k)                          # new K/V back to its tier, asynchronously

The prefetch is of the next unit that *streams* (``WeightStore.next_streamed``), wrapping around
to the next token step, and during a GPU-resident unit of the one after it too: a resident layer
(and the head, and sampling) does not leave the link idle, and the loop body has no edge cases.
Streamed weights land in two device buffers used alternately (never more than two streamed
layers on the GPU); a buffer is refilled after the event recorded when its layer was released.

Refill (``policy.refill``): every GPU batch keeps its own column, so when finished rows have been
compacted out and a whole batch of slots is free, waiting rows join as a new GPU batch whose
prefill runs inside the next token step — the same weight load serves the batches that decode
and the one that prefills. Without refill the block runs FlexGen's way, to its longest row.

Shared prefix (``run(prefix=…)``): the token prefix common to a job's prompts runs once, as a
one-row batch through one pass of the units, and its K/V — in each layer's tier and storage form,
compressed too — is copied into columns ``[0, P)`` of every batch admitted later, whose prompt
step then starts at column P (``Batch.start``) with the rows' own suffixes left-padded behind
the prefix (layers.py's convention). A row that does not start with the prefix runs whole.

What overlaps with what (CUDA): three streams. *compute* runs the math. *load* carries
host→GPU copies (next layer's weights, next batch's KV and activations); disk reads run on an
I/O thread pool into pinned staging buffers and then enqueue their host→GPU copy on *load* too.
*store* carries GPU→host copies of new K/V and activations. Ordering is by CUDA events only:
compute waits on the event of the load it needs; store waits on the event recorded after the
compute that produced the data; a staging buffer is reused only after the event of the copy
that drained it. The only host synchronisations are (1) sampling — the next tokens must be known
on the host for stop checks — once per token step per GPU batch, and (2) CPU attention, which
needs the new token's q/k/v on the host (only those cross the link, never the cache). With CPU
attention a layer runs in two phases: every GPU batch's pre-attention and q/k/v copy first, then
the host attends batch after batch (``_compute_begin``/``_compute_end``), so no batch's q/k/v wait
on the GPU behind another's attention output, itself queued on the link behind the next weights.
With ``overlap: false`` every copy runs on the compute stream (a reference for tests).
When nothing streams (every unit, K/V and activation on the GPU, uncompressed), each batch's decode
step is a CUDA graph replay instead of the unit loop (decode_graph.py): same math, no host launches.
On a CPU-only machine the "GPU" tier is the CPU: the same loop runs, copies become no-ops or
clones, and the disk tier still prefetches on its I/O pool, so CI exercises the whole schedule.

Where the rest lives: batches.py forms, grows, advances, compacts and merges the GPU batches;
attention.py chooses, once per layer and batch, where attention runs (host, streamed KV, resident
KV) and stores the new K/V (``store_cache``); sampling.py picks tokens and ends rows. A pipeline
stage (pipeline.py) runs this same loop over its range of units and sends its output on. The
host queues at most ``policy.run_ahead`` units ahead of the GPU, which bounds the KV in flight.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator, Sequence

import torch

from corpusgen.engine import compression as cq
from corpusgen.engine import decode_graph, kv_cache
from corpusgen.engine import layers as L
from corpusgen.engine.api import EngineStats, Request, Result, SamplingSettings
from corpusgen.engine.attention import HOST, Attention
from corpusgen.engine.batches import Batch, Lifecycle, StepInputs
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.kernels import packed_attention
from corpusgen.engine.placement import WeightStore, family_of
from corpusgen.engine.sampling import append_token, sample
from corpusgen.engine.streams import Streams, handoff, on
from corpusgen.planner.policy import Policy


class BlockEngine:
    """Runs blocks of requests through the block schedule with the policy's placements."""

    def __init__(self, cfg: ModelConfig, store: WeightStore, policy: Policy, *, tokenizer, device: torch.device,
                 dtype: torch.dtype, eos_ids: Sequence[int]):
        self.cfg, self.store, self.policy = cfg, store, policy
        self.fam = family_of(cfg)
        self.tok = tokenizer
        self.device, self.dtype = device, dtype
        self.eos = set(eos_ids)
        self.streams = Streams(device, policy.overlap)
        if device.type == "cuda":
            # cuDNN attention rebuilds its graph for every new KV length: ~1 ms of host time per
            # call, which made decode host-bound (measured on an H200). Flash/efficient kernels don't.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.host = torch.device("cpu")
        self.kv_tier = store.kv_tiers  # per layer: "gpu" | "cpu"
        # Host KV is seq-major when the GPU attends, batch-major when the CPU does (kv_cache.py).
        self.caches = kv_cache.KVCaches(cfg, self.kv_tier, cpu_attention=policy.cpu_attention,
                                        compress=policy.compress_kv, arena=store.arena, device=device, dtype=dtype)
        self.act_on_gpu = store.placement.activations_on_gpu
        self.stats = EngineStats()
        self.scale = cfg.head_dim ** -0.5
        ck = policy.compress_kv  # compressed K/V are quantised in a rotated basis (compression.py)
        self.kv_rot = cq.kv_rotation(cfg.head_dim, dtype, device) if ck is not None and ck.rotate else None
        self._prefix: Batch | None = None  # the shared prefix's one-row batch, holding its K/V
        self.life = Lifecycle(cfg, policy, self.caches, self.stats, device)  # admit, grow, advance, merge
        # Whether this engine's last layer feeds the head: then a prompt step's last layer needs
        # its output only at the last column (``_layer_end``). A pipeline stage that passes its
        # hidden states on to the next stage needs them all (pipeline.StageEngine sets False).
        self.feeds_head = True
        # The units this engine runs: all of them, or a pipeline stage's (pipeline.StageEngine).
        self.unit_range = range(cfg.num_layers + 2)
        # Decode steps of a GPU-resident model as CUDA graphs (decode_graph.py), or None.
        self.graphs = decode_graph.DecodeGraphs(self) if decode_graph.eligible(self) else None
        # Decode attention straight from a 4-bit cache, never dequantised whole (kernels/packed_attention.py).
        self.packed_attention = packed_attention.packed_usable(cfg, device, dtype, policy.compress_kv)
        self.attention = Attention(kv_tiers=self.kv_tier, cpu_attention=policy.cpu_attention, caches=self.caches,
                                   streams=self.streams, compress_kv=policy.compress_kv, packed=self.packed_attention,
                                   scale=self.scale, device=device, dtype=dtype)

    # ------------------------------------------------------------------ the block
    def run(self, requests: Sequence[Request], sampling: SamplingSettings, logits_hook=None,
            prefix: Sequence[int] | None = None) -> Iterator[Result]:
        """Generate for ``requests``; yield each row's Result in the token step it finishes.

        The block holds at most ``block_size`` rows in GPU batches of ``gpu_batch_size``. With
        ``policy.refill`` a block never drains: finished rows are compacted out of their batch
        and, once a whole GPU batch of slots is free, a new batch of waiting rows joins; its
        prefill runs inside the next token step's layer loop, sharing that step's weight loads
        with the batches that decode. Each GPU batch keeps its own column (left padding aligns
        its rows), so batches at different depths coexist. Without refill, rows run in fixed
        blocks, FlexGen's way: the block ends when its last row ends.

        ``prefix``: token ids that (most of) the requests start with; computed once (kept across
        calls while it stays the same) and reused by every batch whose rows all start with it.
        """
        queue = deque(requests)
        batches: list[Batch] = []
        self.life.widest = 0
        shared = self._prefix if self._set_prefix(prefix) else None
        while queue or batches:
            self.life.admit(queue, batches, sampling, shared)
            self.life.grow(batches, sampling.max_new_tokens)
            prefill_only = not any(b.decoding for b in batches)
            dt = self._pass(batches)
            if prefill_only:
                self.stats.prefill_seconds += dt
            else:
                self.stats.decode_seconds += dt
            yield from self._sample(batches, sampling, logits_hook, last=False)
            self.life.advance(batches)

    run_block = run

    def _pass(self, batches: list[Batch]) -> float:
        """One token step: every unit once, every GPU batch under it. Returns its seconds."""
        t0 = time.perf_counter()
        graphs = self.graphs
        if graphs is not None and all(b.decoding for b in batches):
            # Every batch decodes and every unit is resident: batch by batch, each a graph replay
            # (or, the first step with new buffers, the units eagerly). Nothing streams, so the
            # order of batches and units changes no data movement.
            for b in batches:
                if not graphs.step(b):
                    self._units([b])
        else:
            self._units(batches)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - t0

    def _units(self, batches: list[Batch]) -> None:
        """Every unit once, every GPU batch of ``batches`` under it: Algorithm 1's loop, one token step."""
        self.store.prefetch(self.unit_range.start)
        done: dict[int, torch.cuda.Event] = {}  # unit -> its compute, all batches, has been enqueued
        for j in self.unit_range:
            self._bound_run_ahead(j, done)
            w = self.store.get(j)  # this unit's weights, prefetched while the last unit computed
            order, ahead, two_phase = self._batch_order(j, batches)
            # What this layer's batches need from the host goes on the load stream *before* the
            # next layer's weights, or the first batch's compute waits for a whole layer's transfer.
            loads = {k: self.load_cache(j, order[k]) for k in ahead}
            self.load_weight(j)
            if two_phase:
                # CPU attention: every batch's q/k/v leave for the host first, then the host attends
                # batch after batch; one at a time, batch k+1's q/k/v would queue on the link behind
                # batch k's attention output, itself behind the next layer's weights.
                for begun in [self._compute_begin(j, w, b, loads[k]) for k, b in enumerate(order)]:
                    self._compute_end(begun)
                    self._computed(j, begun[0])
            else:
                for k, b in enumerate(order):
                    if k + 1 < len(order) and k + 1 not in loads:  # the next batch's, one batch ahead
                        loads[k + 1] = self.load_cache(j, order[k + 1])
                    self.compute(j, w, b, loads.pop(k))
                    self._computed(j, b)
            w = None  # drop this layer's (dequantised) weights before the next get()
            self.store.release(j)
            if self.device.type == "cuda":
                done[j] = self.streams.event(self.streams.compute)

    def _bound_run_ahead(self, j: int, done: dict) -> None:
        """The host queues at most ``policy.run_ahead`` units ahead of the GPU: every queued unit
        holds its batches' loaded KV, so an unbounded lead fills the GPU budget (and the allocator's
        out-of-memory path synchronises the device, draining every stream)."""
        if j - self.policy.run_ahead in done:
            done.pop(j - self.policy.run_ahead).synchronize()

    def _batch_order(self, j: int, batches: list[Batch]) -> tuple[list[Batch], list[int], bool]:
        """The order unit ``j`` computes ``batches`` in, the ones whose loads are queued before any
        compute, and whether the unit runs in two phases (CPU attention for every batch).

        With CPU attention every batch's load is queued at once (activations only, small);
        otherwise the first batch's, the rest one batch ahead. With a 4-bit cache attended in place,
        decoding batches' loads are small (packed KV) and all queued at once, prompt chunks
        computed first, so their long compute hides those loads."""
        two_phase = 0 < j <= self.cfg.num_layers and all(self.attention.path(j - 1, b, b.col) == HOST for b in batches)
        deep = self.packed_attention and not two_phase
        order = sorted(batches, key=lambda b: b.decoding) if deep else list(batches)
        ahead = list(range(len(order))) if two_phase else [k for k, b in enumerate(order) if k == 0 or deep and b.decoding]
        return order, ahead, two_phase

    def load_weight(self, j: int) -> None:
        """Prefetch the next unit that streams (resident ones need no load), wrapping around to the
        next step's, so the link works through GPU-resident layers and the head too. A resident unit
        holds neither of the two weight buffers, so the streamed unit after that one starts too."""
        nxt = self.store.next_streamed(j)
        self.store.prefetch(nxt)
        if self.store.tier[j] == "gpu":
            self.store.prefetch(self.store.next_streamed(nxt))

    def _computed(self, j: int, b: Batch) -> None:
        """Unit ``j`` has been enqueued for batch ``b`` (a pipeline stage passes its output on)."""

    def _set_prefix(self, prefix: Sequence[int] | None) -> int:
        """Make ``prefix``'s K/V available (computing it only when it changed); its length, or 0."""
        if not prefix:
            return 0
        ids = tuple(int(t) for t in prefix)
        if self._prefix is None or tuple(self._prefix.rows[0].prompt_ids) != ids:
            b = self.life.make([Request(key="\0prefix", prompt_ids=ids)], SamplingSettings(), len(ids))
            b.kv = [self.caches.alloc(j, 1, len(ids)) for j in range(self.cfg.num_layers)]
            self.stats.prefill_seconds += self._pass([b])  # the head's logits are not used
            while b.prompt is not None:  # chunked prefill: the prefix's other chunks
                self.life.next_chunk(b)
                self.stats.prefill_seconds += self._pass([b])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # its K/V stores (store stream) must land first
            b.hidden = b.logits = None
            self._prefix = b
            self.stats.prefix_computes += 1
            self.stats.prefix_tokens = len(ids)
        return len(ids)

    def load_cache(self, j: int, b: Batch):
        """Prefetch what batch ``b`` needs at unit ``j`` (host KV columns, resting activations) onto
        the load stream; returns (kv, h, event), or None when it needs nothing."""
        col = b.col
        layer = j - 1
        need_kv = (0 <= layer < self.cfg.num_layers and col > 0 and self.kv_tier[layer] == "cpu"
                   and not self.policy.cpu_attention)
        need_act = not self.act_on_gpu and b.hidden is not None and j > 0
        if not (need_kv or need_act):
            return None
        s = self.streams
        s.wait(s.load, b.stored)
        with on(s.load):
            kv = None
            if need_kv:  # columns [0, col) of a seq-major host cache: one contiguous copy each
                kv = tuple(kv_cache.to_device(c, col, self.device) for c in b.kv[layer])
            h = b.hidden.to(self.device, non_blocking=True) if need_act else None
        return kv, h, s.event(s.load)

    def compute(self, j: int, w, b: Batch, pending) -> None:
        """Unit ``j`` for batch ``b``: its new K/V stored back to their tier, its output where activations rest."""
        self._compute_end(self._compute_begin(j, w, b, pending))

    def _compute_begin(self, j: int, w, b: Batch, pending):
        """Unit j for batch ``b`` up to its attention (everything, for the embedding and head);
        ``_compute_end`` finishes it. Split so that with CPU attention every GPU batch's q/k/v
        is on its way to the host before the host attends for the first (``_pass``)."""
        cfg, fam, s, col = self.cfg, self.fam, self.streams, b.col
        loaded_kv = loaded_h = None
        if pending is not None:
            loaded_kv, loaded_h, ev = pending
            s.wait(s.compute, ev)
            handoff([*kv_cache.buffers(loaded_kv), loaded_h], s.compute, s.load)
            if (loaded_kv is not None and isinstance(loaded_kv[0], cq.Packed)
                    and not (self.packed_attention and b.decoding)):  # else attended packed (attention.py)
                # Dequantised here, on the compute stream: on the load stream it would queue the
                # link behind it (a step would take the link's time plus the dequantisation's).
                loaded_kv = tuple(cq.dequantize(c) for c in loaded_kv)
        h = loaded_h if loaded_h is not None else b.hidden
        q_len = b.ids.shape[1]
        if b.step.col != col:  # positions and rotary tables: once per batch per step, not per layer
            positions = L.positions_from_pad(b.pad, col, q_len, b.start)
            b.step = StepInputs(col=col, positions=positions, aux=fam.prepare(cfg, positions, self.dtype))
        if j == 0:
            return b, fam.embed(cfg, w, b.ids, b.step.positions), None
        if j == cfg.num_layers + 1:  # a chunk of a prompt that is not its last samples nothing
            b.logits = fam.head(cfg, w, h[:, -1]) if b.samples else None  # (b, vocab) fp32
            return b, None, None
        return b, h, self._layer_begin(j - 1, w, b, h, col, q_len, loaded_kv)

    def _compute_end(self, begun) -> None:
        b, h, layer = begun
        s = self.streams
        if layer is not None:
            h = self._layer_end(*layer)
        if h is not None and not self.act_on_gpu:
            ev = s.event(s.compute)
            s.wait(s.store, ev)
            handoff([h], s.store, s.compute)
            with on(s.store):
                h = h.to(self.host, non_blocking=True)
            b.stored = s.event(s.store)
        b.hidden = h

    def _layer_begin(self, layer: int, w, b: Batch, h, col: int, q_len: int, loaded_kv):
        q, k, v = self.fam.pre_attention(self.cfg, w, h, b.step.positions, b.step.aux)  # q (b, H, s, hd); k, v (b, KV, s, hd)
        rot = self.kv_rot
        if rot is not None:  # after RoPE: q R (k R)^T = q k^T; every path below sees only rotated K/V
            q, k, v = rot.apply(q), rot.apply(k), rot.apply(v)
        path = self.attention.path(layer, b, col)
        return path, layer, w, b, h, col, q_len, loaded_kv, self.attention.send(path, q, k, v)

    def _layer_end(self, path: str, layer: int, w, b: Batch, h, col: int, q_len: int, loaded_kv, qkv):
        attn = self.attention(path, layer, b, col, q_len, loaded_kv, qkv)
        if self.kv_rot is not None:
            attn = self.kv_rot.undo(attn)  # softmax(·) V R R^T = softmax(·) V
        if q_len > 1 and layer == self.cfg.num_layers - 1 and self.feeds_head:
            # The head reads only the last column (every row's last prompt token: left padding),
            # and the last layer's K/V are written: the output projection and MLP of the other
            # columns would be thrown away.
            h, attn = h[:, -1:], attn[:, :, -1:]
        return self.fam.post_attention(self.cfg, w, h, attn, mlp_rows=self.policy.mlp_rows)

    def _sample(self, batches: list[Batch], s: SamplingSettings, hook, last: bool) -> list[Result]:
        """Each sampling batch's next tokens (one host sync per batch); the rows that finish."""
        done: list[Result] = []
        for b in batches:
            if not b.samples:
                continue
            logits = b.logits
            if hook is not None:
                logits = hook.mask([r.key for r in b.rows], logits)
            nxt = sample(logits, s, b.gens)
            if hook is not None:
                hook.advance([r.key for r in b.rows], nxt)
            host = nxt.tolist()  # the one sync per step and batch
            b.ids = nxt[:, None]
            for i, (r, t) in enumerate(zip(b.rows, host)):
                if b.finish[i] is not None:
                    continue
                self.stats.generated_tokens += 1
                b.finish[i], text = append_token(b.tokens[i], t, self.eos, s, self.tok, last=last)
                if b.finish[i] is not None:
                    done.append(Result(key=r.key, token_ids=list(b.tokens[i]), text=text, finish_reason=b.finish[i],
                                       prompt_tokens=len(r.prompt_ids)))
        return done
