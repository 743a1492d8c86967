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
step then starts at column P (``_Batch.start``) with the rows' own suffixes left-padded behind
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
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from corpusgen.engine import compression as cq
from corpusgen.engine.kernels import decode_attention
from corpusgen.engine import decode_graph, kv_cache
from corpusgen.engine import layers as L
from corpusgen.engine.api import EngineStats, Request, Result, SamplingSettings
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.placement import WeightStore, family_of
from corpusgen.engine.sampling import find_stop, row_generator, sample, stop_in_tail
from corpusgen.engine.streams import HostCopy, Streams, handoff, on, onto_device, to_host
from corpusgen.planner.policy import Policy


KV_GROW = 64
"""KV columns a batch's cache is allocated (beyond its prompt) and then widened by, as its rows
generate: memory follows use, while a widening copy (one per 64 steps) costs little next to the
64 steps' attention reads of the same cache."""


@dataclass
class _Batch:
    """One GPU batch of a block: its rows, their padding, its activations and KV cache."""

    rows: list[Request]
    pad: torch.Tensor  # (b,) long, on the compute device
    pad_cpu: torch.Tensor  # (b,) long, on the host (CPU attention)
    ids: torch.Tensor  # (b, s) tokens fed at this step
    hidden: torch.Tensor | None = None  # (b, s, hidden) between units
    kv: list = field(default_factory=list)  # per layer: (K, V) each (seq, b, kv_heads, hd) or Packed
    tokens: list[list[int]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    gens: list[torch.Generator] | None = None
    no_pad: bool = False  # every prompt has the same length: no mask needed
    logits: torch.Tensor | None = None  # (b, vocab) fp32 after the head
    stored: object = None  # CUDA event of the last store of this batch (None on CPU)
    ids_width: int = 0  # prompt width (columns) of this batch, shared prefix included
    start: int = 0  # first column of the prompt step: the shared prefix's length, or 0
    col: int = 0  # column of this batch's next input (== start: the prompt, not yet prefilled)
    pos_col: int = -1  # column for which ``positions``/``aux``/``masks`` were computed
    masks: dict = field(default_factory=dict)  # this step's attention masks, by device type
    positions: torch.Tensor | None = None  # (b, s) token positions of this step's inputs
    aux: object = None  # the family's per-step values (Llama: rotary cos/sin)
    graph: object = None  # decode_graph._Graph of this batch's decode steps, when captured
    graph_key: tuple | None = None  # the buffers the last eager decode step ran on (decode_graph)
    prompt: torch.Tensor | None = None  # chunked prefill: the whole prompt while chunks after ``ids`` remain

    @property
    def decoding(self) -> bool:
        """Past its prompt: each step feeds one sampled token."""
        return self.col >= self.ids_width

    @property
    def samples(self) -> bool:
        """Whether this step ends with a sampled token: decoding, or the prompt's last chunk."""
        return self.prompt is None


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
        self._prefix: _Batch | None = None  # the shared prefix's one-row batch, holding its K/V
        self._widest = 0  # KV columns of the widest batch admitted in this run (bounds merges)
        # Whether this engine's last layer feeds the head: then a prompt step's last layer needs
        # its output only at the last column (``_layer_end``). A pipeline stage that passes its
        # hidden states on to the next stage needs them all (pipeline.StageEngine sets False).
        self.feeds_head = True
        # The units this engine runs: all of them, or a pipeline stage's (pipeline.StageEngine).
        self.unit_range = range(cfg.num_layers + 2)
        # Decode steps of a GPU-resident model as CUDA graphs (decode_graph.py), or None.
        self.graphs = decode_graph.DecodeGraphs(self) if decode_graph.eligible(self) else None
        # Decode attention straight from a 4-bit cache, never dequantised whole (decode_attention.py).
        self.packed_attention = decode_attention.packed_usable(cfg, device, dtype, policy.compress_kv)

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
        batches: list[_Batch] = []
        self._widest = 0
        plen = self._set_prefix(prefix)
        while queue or batches:
            self._admit(queue, batches, sampling, plen)
            self._grow(batches, sampling.max_new_tokens)
            prefill_only = not any(b.decoding for b in batches)
            dt = self._pass(batches)
            if prefill_only:
                self.stats.prefill_seconds += dt
            else:
                self.stats.decode_seconds += dt
            yield from self._sample(batches, sampling, logits_hook, last=False)
            self._advance(batches)

    run_block = run

    def _advance(self, batches: list[_Batch]) -> None:
        """After a token step's sampling: every batch moves to its next column, finished batches
        leave, and with refill finished rows are compacted out (at ≥ 25 % of a batch) and batches
        whose live rows fit one GPU batch are merged, so freed slots become whole batches that
        waiting rows can fill."""
        for b in batches:
            if b.decoding:
                b.col += 1
            elif b.prompt is not None:  # a chunk of the prompt ran; the next one is fed next step
                self._next_chunk(b)
            else:  # the prompt step (or its last chunk) ran and sampled the first token
                b.col = b.ids_width
        for b in batches:
            if all(f is not None for f in b.finish):
                self._sync_stores(b)  # its host KV may go back to the arena's pool: no write in flight
        batches[:] = [b for b in batches if any(f is None for f in b.finish)]
        if self.policy.refill:
            for b in batches:
                if sum(f is not None for f in b.finish) * 4 >= len(b.rows):
                    self._compact(b)
            self._merge(batches)

    def _next_chunk(self, b: _Batch) -> None:
        """Chunked prefill: move batch ``b`` past the chunk it just ran, onto the next one."""
        b.col += b.ids.shape[1]
        off = b.col - b.start
        b.ids = b.prompt[:, off:off + self.policy.prefill_chunk]
        if b.col + b.ids.shape[1] >= b.ids_width:
            b.prompt = None  # the last chunk: its step samples

    def _pass(self, batches: list[_Batch]) -> float:
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

    def _units(self, batches: list[_Batch]) -> None:
        """Every unit once, every GPU batch of ``batches`` under it (the block schedule's loop)."""
        self.store.prefetch(self.unit_range.start)
        done: dict[int, torch.cuda.Event] = {}  # unit -> its compute, all batches, has run
        lead = self.policy.run_ahead
        for j in self.unit_range:
            if j - lead in done:
                # The host queues at most ``run_ahead`` units ahead of the GPU: every queued unit holds
                # its batches' loaded KV, so an unbounded lead filled the GPU budget and the
                # allocator's out-of-memory path synchronised the device, draining every stream.
                done.pop(j - lead).synchronize()
            w = self.store.get(j)
            # What this layer's batches need from the host goes on the load stream *before* the
            # next layer's weights, or the first batch's compute waits for those weights (a whole
            # layer's transfer) before it can start. With CPU attention every batch's is loaded
            # (activations only, small); otherwise the first batch's, the rest one batch ahead.
            two_phase = 0 < j <= self.cfg.num_layers and all(self._cpu_attends(j - 1, b, b.col) for b in batches)
            # With a 4-bit cache attended in place, decoding batches' loads are small (the block's
            # packed KV, OPT-30B 448 rows: 2 GB a layer) and are all queued at once, prompt chunks
            # computed first: their long compute then hides those loads, not just the next one's.
            # Prompts' loads (activations: 0.5 GB a batch) stay one batch ahead.
            deep = self.packed_attention and not two_phase
            order = sorted(batches, key=lambda b: b.decoding) if deep else batches
            ahead = range(len(order)) if two_phase else [k for k, b in enumerate(order) if k == 0 or deep and b.decoding]
            loads = {k: self._load_cache(j, order[k], order[k].col) for k in ahead}
            # The next unit that streams (resident ones need no load), wrapping around to the next
            # step's: the link keeps working through GPU-resident layers and the head. A resident
            # unit holds neither of the two weight buffers, so the streamed unit after that one
            # starts too (OPT-30B CPU attention, 7 resident layers: 61.9 -> 68.4 tok/s).
            nxt = self.store.next_streamed(j)
            self.store.prefetch(nxt)
            if self.store.tier[j] == "gpu":
                self.store.prefetch(self.store.next_streamed(nxt))
            if two_phase:
                loads = [loads[k] for k in range(len(order))]
                # CPU attention: every batch's q/k/v leave for the host first, then the host attends
                # batch after batch. One batch at a time, batch k+1's q/k/v queued on the GPU behind
                # batch k's attention output, whose copy waits behind the next layer's weights on
                # the link: the host idled for that prefetch every layer (OPT-30B: 1.37 s steps).
                for begun in [self._compute_begin(j, w, b, b.col, p) for b, p in zip(batches, loads)]:
                    self._compute_end(begun)
                    self._computed(j, begun[0])
            else:
                for k, b in enumerate(order):
                    if k + 1 < len(order) and k + 1 not in loads:  # one batch ahead
                        loads[k + 1] = self._load_cache(j, order[k + 1], order[k + 1].col)
                    self._compute(j, w, b, b.col, loads.pop(k))
                    self._computed(j, b)
            w = None  # drop this layer's (dequantised) weights before the next get()
            self.store.release(j)
            if self.device.type == "cuda":
                done[j] = self.streams.event(self.streams.compute)

    def _computed(self, j: int, b: _Batch) -> None:
        """Unit ``j`` has been enqueued for batch ``b`` (a pipeline stage passes its output on)."""

    def _set_prefix(self, prefix: Sequence[int] | None) -> int:
        """Make ``prefix``'s K/V available (computing it only when it changed); its length, or 0."""
        if not prefix:
            return 0
        ids = tuple(int(t) for t in prefix)
        if self._prefix is None or tuple(self._prefix.rows[0].prompt_ids) != ids:
            b = self._make_batch([Request(key="\0prefix", prompt_ids=ids)], SamplingSettings(), len(ids))
            b.kv = [self.caches.alloc(j, 1, len(ids)) for j in range(self.cfg.num_layers)]
            self.stats.prefill_seconds += self._pass([b])  # the head's logits are not used
            while b.prompt is not None:  # chunked prefill: the prefix's other chunks
                self._next_chunk(b)
                self.stats.prefill_seconds += self._pass([b])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # its K/V stores (store stream) must land first
            b.hidden = b.logits = None
            self._prefix = b
            self.stats.prefix_computes += 1
            self.stats.prefix_tokens = len(ids)
        return len(ids)

    def _admit(self, queue: deque, batches: list[_Batch], sampling: SamplingSettings, plen: int = 0) -> None:
        """Form new GPU batches from waiting rows while the block has room for a whole batch
        (without refill: only when the block is empty, then as many batches as fit). With refill,
        a decoding batch's hole of at least a quarter batch is topped up too: a batch of that many
        rows joins, and after its prefill it merges into the batch with the hole (``_merge``).

        Chunked prefill (``policy.prefill_chunk``) with refill: one batch is in its prompt at a
        time, so the block's batches are staggered and each step's prompt work is one chunk: the
        GPU computes it while the link carries the other batches' KV for their decode steps."""
        p = self.policy
        if not p.refill and batches:
            return
        active = sum(_live(b) for b in batches)
        prefix = tuple(self._prefix.rows[0].prompt_ids) if plen else ()
        has_prefix = lambda r: plen and len(r.prompt_ids) > plen and tuple(r.prompt_ids[:plen]) == prefix  # noqa: E731
        own = lambda r: len(r.prompt_ids) - plen if has_prefix(r) else len(r.prompt_ids)  # noqa: E731
        width = None
        while queue and len(batches) < 2 * p.num_gpu_batches:
            if p.prefill_chunk and p.refill and any(not b.decoding for b in batches):
                break  # staggered: the next batch joins when this one's prompt is done
            take = min(p.gpu_batch_size, len(queue))
            if active + take > p.block_size:
                if not p.refill:
                    break
                holes = [p.gpu_batch_size - _live(b) for b in batches if b.decoding]
                take = min(max(holes, default=0), p.block_size - active, len(queue))
                if take < max(1, p.gpu_batch_size // 4) or not all(b.decoding for b in batches):
                    break  # no hole worth a prefill, or a top-up already waits for its prefill
                self.stats.top_ups += 1
            rows = [queue.popleft() for _ in range(take)]
            start = plen if plen and all(has_prefix(r) for r in rows) else 0
            if width is None or not p.refill:  # a block admitted at once shares one width (fixed columns)
                width = max(map(own, rows)) if p.refill else max(
                    map(own, [*rows, *list(queue)[:p.block_size - active - take]]))
            b = self._make_batch(rows, sampling, max(width, max(len(r.prompt_ids) - start for r in rows)), start)
            b.kv = [self.caches.alloc(j, len(rows), b.ids_width + min(sampling.max_new_tokens, KV_GROW))
                    for j in range(self.cfg.num_layers)]
            self._widest = max(self._widest, b.ids_width + sampling.max_new_tokens)
            if start:
                self.caches.copy_prefix(self._prefix.kv, b.kv, b.start)
                self.stats.prefix_reused_tokens += start * len(rows)
            self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
            batches.append(b)
            active += take
            if p.refill:
                width = None

    def _grow(self, batches: list[_Batch], max_new: int) -> None:
        """Widen the KV cache of every batch whose next input has no column left, by KV_GROW
        columns (or what its rows can still use): KV memory follows what rows generate, not the
        worst case of max_new_tokens for every row."""
        for b in batches:
            if b.kv and b.decoding and b.col >= self.caches.capacity(b.kv):
                room = max(max_new - len(t) for t, f in zip(b.tokens, b.finish) if f is None)
                self._sync_stores(b)
                b.kv = self.caches.realigned([b], b.col, b.col + min(KV_GROW, max(room, 1)))
                self.stats.kv_grows += 1

    def _merge(self, batches: list[_Batch]) -> None:
        """Merge decoding batches whose live rows fit one GPU batch (``_merged``), smallest first,
        while the merged cache stays within the widest one this run admitted: on a host-bound GPU a
        step costs per batch, not per row, so two half-empty batches cost twice one full one."""
        cap = self.policy.gpu_batch_size
        while True:
            live = sorted((b for b in batches if b.decoding and b.kv), key=_live)
            pair = next(((a, b) for i, a in enumerate(live) for b in live[i + 1:]
                         if a.start == b.start and _live(a) + _live(b) <= cap and self._merged_width(a, b) <= self._widest),
                        None)
            if pair is None:
                return
            a, b = pair
            merged = self._merged(a, b)
            batches[batches.index(a)] = merged
            batches.remove(b)
            self.stats.batch_merges += 1

    def _merged_width(self, a: _Batch, b: _Batch) -> int:
        """KV columns of ``a`` and ``b`` merged: aligned at the later column, with the room each
        still has. Bounded by the widest batch admitted, the block's KV stays within (rows alive)
        x (that width), the bound it had without merging."""
        return max(a.col, b.col) + max(self.caches.capacity(x.kv) - x.col for x in (a, b))

    def _merged(self, a: _Batch, b: _Batch) -> _Batch:
        """One batch of ``a``'s and ``b``'s live rows, aligned at the later column: the earlier
        batch's rows move right by the difference, into more left padding behind the shared prefix
        (layers.py's convention), so every row keeps its positions and its attention."""
        for x in (a, b):
            self._compact(x)
            self._sync_stores(x)
        col, width = max(a.col, b.col), self._merged_width(a, b)
        n = len(a.rows) + len(b.rows)
        shifts = [col - a.col] * len(a.rows) + [col - b.col] * len(b.rows)
        kv = self.caches.realigned([a, b], col, width)
        pad_cpu = torch.cat([a.pad_cpu, b.pad_cpu]) + torch.tensor(shifts, dtype=torch.long)
        gens = a.gens + b.gens if a.gens is not None and b.gens is not None else None
        return _Batch(rows=a.rows + b.rows, pad=pad_cpu.to(self.device), pad_cpu=pad_cpu,
                      ids=torch.cat([a.ids, b.ids]), kv=kv, tokens=a.tokens + b.tokens, finish=[None] * n,
                      gens=gens, no_pad=bool((pad_cpu == 0).all()), ids_width=max(a.ids_width, b.ids_width),
                      start=a.start, col=col)

    @staticmethod
    def _sync_stores(b: _Batch) -> None:
        """Wait for the store stream's last copies into ``b``'s host KV (before host-side reads)."""
        if b.stored is not None:
            b.stored.synchronize()

    def _compact(self, b: _Batch) -> None:
        """Drop finished rows from batch ``b``: their KV, padding, tokens and generators."""
        keep = [i for i, f in enumerate(b.finish) if f is None]
        if len(keep) == len(b.rows):
            return
        self._sync_stores(b)
        idx = torch.tensor(keep, dtype=torch.long)
        b.kv = self.caches.select_rows(b.kv, idx)
        b.rows = [b.rows[i] for i in keep]
        b.tokens = [b.tokens[i] for i in keep]
        b.finish = [None] * len(keep)
        b.gens = [b.gens[i] for i in keep] if b.gens is not None else None
        b.pad_cpu = b.pad_cpu[idx]
        b.pad = b.pad[idx.to(b.pad.device)]
        b.ids = b.ids[idx.to(b.ids.device)]
        b.no_pad = bool((b.pad_cpu == 0).all())
        b.pos_col = -1

    # ------------------------------------------------------------------ steps
    def _make_batch(self, rows: Sequence[Request], s: SamplingSettings, width: int, start: int = 0) -> _Batch:
        """A GPU batch of ``rows``: their prompts after the first ``start`` tokens (the shared
        prefix, already computed) left-padded to ``width`` columns."""
        lens = [len(r.prompt_ids) - start for r in rows]
        pad_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - lens[i]:] = torch.as_tensor(list(r.prompt_ids[start:]), dtype=torch.long)
        pad = torch.tensor([width - n for n in lens], dtype=torch.long)
        gens = [row_generator(s.seed, r.key) for r in rows] if s.temperature > 0 else None
        ids = ids.to(self.device)
        chunk = self.policy.prefill_chunk
        prompt = ids if chunk and width > chunk else None  # fed ``chunk`` columns a step (_advance)
        return _Batch(rows=list(rows), pad=pad.to(self.device), pad_cpu=pad, ids=ids[:, :chunk] if prompt is not None else ids,
                      tokens=[[] for _ in rows], finish=[None] * len(rows), gens=gens, no_pad=min(lens) == width,
                      ids_width=start + width, start=start, col=start, prompt=prompt)

    def _load_cache(self, j: int, b: _Batch, col: int):
        """Prefetch what batch ``b`` needs at unit ``j`` onto the load stream; returns (kv, h, event)."""
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

    def _compute(self, j: int, w, b: _Batch, col: int, pending) -> None:
        self._compute_end(self._compute_begin(j, w, b, col, pending))

    def _compute_begin(self, j: int, w, b: _Batch, col: int, pending):
        """Unit j for batch ``b`` up to its attention (everything, for the embedding and head);
        ``_compute_end`` finishes it. Split so that with CPU attention every GPU batch's q/k/v
        is on its way to the host before the host attends for the first (``_pass``)."""
        cfg, fam, s = self.cfg, self.fam, self.streams
        loaded_kv = loaded_h = None
        if pending is not None:
            loaded_kv, loaded_h, ev = pending
            s.wait(s.compute, ev)
            handoff([*kv_cache.buffers(loaded_kv), loaded_h], s.compute, s.load)
            if (loaded_kv is not None and isinstance(loaded_kv[0], cq.Packed)
                    and not (self.packed_attention and b.decoding)):  # else attended packed (_layer_end)
                # Dequantised here, on the compute stream: on the load stream it would queue the
                # link behind it (measured: OPT-30B 4-bit step = link + dequant, not their max).
                loaded_kv = tuple(cq.dequantize(c) for c in loaded_kv)
        h = loaded_h if loaded_h is not None else b.hidden
        q_len = b.ids.shape[1]
        if b.pos_col != col:  # positions and rotary tables: once per batch per step, not per layer
            b.positions = L.positions_from_pad(b.pad, col, q_len, b.start)
            b.aux = fam.prepare(cfg, b.positions, self.dtype)
            b.pos_col = col
            b.masks = {}
        if j == 0:
            return b, fam.embed(cfg, w, b.ids, b.positions), None
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

    def _cpu_attends(self, layer: int, b: _Batch, col: int) -> bool:
        """Whether batch ``b`` attends on the CPU at this layer and column (decode, host KV)."""
        return self.kv_tier[layer] == "cpu" and self.policy.cpu_attention and col >= b.ids_width

    def _layer_begin(self, layer: int, w, b: _Batch, h, col: int, q_len: int, loaded_kv):
        q, k, v = self.fam.pre_attention(self.cfg, w, h, b.positions, b.aux)  # q (b, H, s, hd); k, v (b, KV, s, hd)
        rot = self.kv_rot
        if rot is not None:  # after RoPE: q R (k R)^T = q k^T; every path below sees only rotated K/V
            q, k, v = rot.apply(q), rot.apply(k), rot.apply(v)
        # With CPU attention only q/k/v of the new token cross the link: their copy starts here.
        qkv = to_host(q, k, v) if self._cpu_attends(layer, b, col) else (q, k, v)
        return layer, w, b, h, col, q_len, loaded_kv, qkv

    def _layer_end(self, layer: int, w, b: _Batch, h, col: int, q_len: int, loaded_kv, qkv):
        cfg, s, rot = self.cfg, self.streams, self.kv_rot
        kc, vc = b.kv[layer]
        end = col + q_len
        on_cpu = self.kv_tier[layer] == "cpu"
        if isinstance(qkv, HostCopy):
            # Decode attention where the cache lives.
            qh, kh, vh = qkv.wait()
            self._sync_stores(b)  # the prompt's K/V reach the host cache asynchronously
            self.caches.write(layer, kc, kh, col)
            self.caches.write(layer, vc, vh, col)
            dt = torch.float32 if qh.dtype == torch.float16 else qh.dtype  # CPUs have no fast fp16
            ks, vs = self.caches.view(layer, kc, end).to(dt), self.caches.view(layer, vc, end).to(dt)
            mask = None if b.no_pad else self._mask(b, b.pad_cpu, col, q_len, end)
            attn = onto_device(L.attend(qh.to(dt), ks, vs, mask, self.scale).to(self.dtype), self.device)
        elif on_cpu:
            q, k, v = qkv
            kq, vq = self._as_stored(k), self._as_stored(v)  # attend to what the cache will hold
            if loaded_kv is not None and isinstance(loaded_kv[0], cq.Packed):
                # Decode from the 4-bit columns as they crossed the link, this step's column dense.
                mask = None if b.no_pad else self._mask(b, b.pad, col, q_len, end)
                attn = decode_attention.packed_decode_attention(
                    q, *(decode_attention.packed_view(c, 0) for c in loaded_kv), mask, self.scale, kq, vq)
                ks = vs = None
            elif col == 0:
                ks, vs = kq, vq
            elif loaded_kv is not None:  # the prefetched columns (b, KV, col, hd) plus this step's
                ks = torch.cat([loaded_kv[0].permute(1, 2, 0, 3), kq], dim=2)
                vs = torch.cat([loaded_kv[1].permute(1, 2, 0, 3), vq], dim=2)
            else:  # a prompt step after a shared prefix or a chunk, with CPU attention: fetch [0, col)
                self._sync_stores(b)  # the previous chunk's K/V land on the host first (read there)
                ks = torch.cat([self.caches.view(layer, kc, col).to(self.device), kq], dim=2)
                vs = torch.cat([self.caches.view(layer, vc, col).to(self.device), vq], dim=2)
            if ks is not None:
                attn = self._attend(q, ks, vs, b, col, q_len, end)
            ev = s.event(s.compute)
            s.wait(s.store, ev)
            handoff([k, v], s.store, s.compute)
            with on(s.store):
                self.caches.write(layer, kc, k, col)
                self.caches.write(layer, vc, v, col)
            b.stored = s.event(s.store)
        else:
            q, k, v = qkv
            self.caches.write(layer, kc, k, col)
            self.caches.write(layer, vc, v, col)
            if col == 0 and not isinstance(kc, cq.Packed):
                ks, vs = k, v
            elif self.packed_attention and q_len == 1:  # a 4-bit GPU cache, read where it is
                mask = None if b.no_pad else self._mask(b, b.pad, col, q_len, end)
                attn = decode_attention.packed_decode_attention(
                    q, *(decode_attention.packed_view(cq.narrow(c, 2, 0, end), 2) for c in (kc, vc)), mask, self.scale)
                ks = vs = None
            else:
                ks, vs = self.caches.view(layer, kc, end), self.caches.view(layer, vc, end)
            if ks is not None:
                attn = self._attend(q, ks, vs, b, col, q_len, end)
        if rot is not None:
            attn = rot.undo(attn)  # softmax(·) V R R^T = softmax(·) V
        if q_len > 1 and layer == cfg.num_layers - 1 and self.feeds_head:
            # The head reads only the last column (every row's last prompt token: left padding),
            # and the last layer's K/V are written above: the output projection and MLP of the
            # other columns would be thrown away. OPT-6.7B, 512-token prompts: 1/43 of the prefill.
            h, attn = h[:, -1:], attn[:, :, -1:]
        return self.fam.post_attention(cfg, w, h, attn, mlp_rows=self.policy.mlp_rows)

    def _as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the KV cache stores it: quantised and back when the cache is compressed, so
        every placement attends to the same numbers (``x`` is already rotated: ``_layer_begin``)."""
        c = self.policy.compress_kv
        if c is None:
            return x
        return cq.dequantize(cq.quantize(x, c.bits, c.group_size, axis=-1))

    def _attend(self, q, ks, vs, b: _Batch, col: int, q_len: int, end: int) -> torch.Tensor:
        if b.no_pad and (col == 0 or q_len == 1):  # causal prefill or unmasked decode: fused kernels
            return L.attend(q, ks.to(q.dtype), vs.to(q.dtype), None, self.scale, causal=col == 0 and q_len > 1)
        mask = self._mask(b, b.pad, col, q_len, end)
        return L.attend(q, ks.to(q.dtype), vs.to(q.dtype), mask, self.scale)

    @staticmethod
    def _mask(b: _Batch, pad: torch.Tensor, col: int, q_len: int, end: int) -> torch.Tensor:
        """The step's attention mask of batch ``b`` on ``pad``'s device: built once per step, not
        per layer (on a host-bound GPU its ~10 small kernels per layer were a tenth of a step)."""
        key = pad.device.type
        if key not in b.masks:
            b.masks[key] = L.attention_mask(pad, col, q_len, end, b.start)
        return b.masks[key]

    def _sample(self, batches: list[_Batch], s: SamplingSettings, hook, last: bool) -> list[Result]:
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
                if t in self.eos:
                    b.finish[i] = "eos"
                else:
                    b.tokens[i].append(t)
                text = None
                if s.stop and b.finish[i] is None and stop_in_tail(self.tok.decode, b.tokens[i], s.stop):
                    text = self.tok.decode(b.tokens[i])  # whole text: where the earliest stop starts
                    cut = find_stop(text, s.stop)
                    if cut is not None:
                        b.finish[i], text = "stop", text[:cut]
                if b.finish[i] is None and (last or len(b.tokens[i]) >= s.max_new_tokens):
                    b.finish[i] = "length"
                if b.finish[i] is not None:
                    if text is None:
                        text = self.tok.decode(b.tokens[i])
                    if b.finish[i] == "stop":
                        b.tokens[i] = self.tok.encode(text) if text else []
                    done.append(Result(key=r.key, token_ids=list(b.tokens[i]), text=text, finish_reason=b.finish[i],
                                       prompt_tokens=len(r.prompt_ids)))
        return done


def _live(b: _Batch) -> int:
    """Rows of ``b`` still generating."""
    return sum(f is None for f in b.finish)
