"""GPU batches and their lifecycle in a block (FlexGen's "GPU batch"; vLLM keeps this apart from
the model runner too): forming batches from waiting rows, widening their KV as rows generate,
moving each to its next column after a token step, dropping finished rows and merging batches
whose live rows fit one. The layer loop (schedule.py) computes whatever batches this leaves it.

A batch's rows are left-padded to a common width behind an optional shared prefix (layers.py's
convention), so batches at different depths coexist: each keeps its own column.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from corpusgen.engine.api import EngineStats, Request, SamplingSettings
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.kv_cache import KVCaches
from corpusgen.engine.sampling import row_generator
from corpusgen.planner.policy import Policy

KV_GROW = 64
"""KV columns a batch's cache is allocated (beyond its prompt) and then widened by, as its rows
generate: memory follows use, while a widening copy (one per 64 steps) costs little next to the
64 steps' attention reads of the same cache."""


@dataclass
class StepInputs:
    """What a batch's token step derives once for every layer: positions, the family's per-step
    values, attention masks by device."""

    col: int = -1
    """Column these were computed for (-1: none yet)."""
    positions: torch.Tensor | None = None
    """(b, s) token positions of this step's inputs."""
    aux: object = None
    """The family's per-step values (Llama: rotary cos/sin)."""
    masks: dict = field(default_factory=dict)
    """This step's attention masks, by device type."""


@dataclass
class GraphState:
    """decode_graph.py's hold on a batch."""

    graph: object = None
    """The captured decode step (decode_graph._Graph), or None."""
    key: tuple | None = None
    """The buffers the last eager decode step ran on (capture once they stay the same)."""


@dataclass
class Batch:
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
    prompt: torch.Tensor | None = None  # chunked prefill: the whole prompt while chunks after ``ids`` remain
    step: StepInputs = field(default_factory=lambda: StepInputs())  # derived once per step, shared by every layer
    graph: GraphState = field(default_factory=lambda: GraphState())  # its decode steps as a CUDA graph

    @property
    def decoding(self) -> bool:
        """Past its prompt: each step feeds one sampled token."""
        return self.col >= self.ids_width

    @property
    def samples(self) -> bool:
        """Whether this step ends with a sampled token: decoding, or the prompt's last chunk."""
        return self.prompt is None


def sync_stores(b: Batch) -> None:
    """Wait for the store stream's last copies into ``b``'s host KV (before host-side reads)."""
    if b.stored is not None:
        b.stored.synchronize()


class Lifecycle:
    """Admits, grows, advances, compacts and merges the GPU batches of a block (``batches`` lists are
    the caller's: one per block, or one per pipeline sub-block)."""

    def __init__(self, cfg: ModelConfig, policy: Policy, caches: KVCaches, stats: EngineStats,
                 device: torch.device):
        self.cfg, self.policy, self.caches, self.stats, self.device = cfg, policy, caches, stats, device
        self.widest = 0
        """KV columns of the widest batch admitted in this run (bounds merges)."""

    def advance(self, batches: list[Batch]) -> None:
        """After a token step's sampling: every batch moves to its next column, finished batches
        leave, and with refill finished rows are compacted out (at ≥ 25 % of a batch) and batches
        whose live rows fit one GPU batch are merged, so freed slots become whole batches that
        waiting rows can fill."""
        for b in batches:
            if b.decoding:
                b.col += 1
            elif b.prompt is not None:  # a chunk of the prompt ran; the next one is fed next step
                self.next_chunk(b)
            else:  # the prompt step (or its last chunk) ran and sampled the first token
                b.col = b.ids_width
        for b in batches:
            if all(f is not None for f in b.finish):
                sync_stores(b)  # its host KV may go back to the arena's pool: no write in flight
        batches[:] = [b for b in batches if any(f is None for f in b.finish)]
        if self.policy.refill:
            for b in batches:
                if sum(f is not None for f in b.finish) * 4 >= len(b.rows):
                    self.compact(b)
            self.merge(batches)

    def next_chunk(self, b: Batch) -> None:
        """Chunked prefill: move batch ``b`` past the chunk it just ran, onto the next one."""
        b.col += b.ids.shape[1]
        off = b.col - b.start
        b.ids = b.prompt[:, off:off + self.policy.prefill_chunk]
        if b.col + b.ids.shape[1] >= b.ids_width:
            b.prompt = None  # the last chunk: its step samples

    def admit(self, queue: deque, batches: list[Batch], sampling: SamplingSettings, prefix: Batch | None = None) -> None:
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
        active = sum(live_rows(b) for b in batches)
        plen = prefix.ids_width if prefix is not None else 0
        prefix_ids = tuple(prefix.rows[0].prompt_ids) if plen else ()
        has_prefix = lambda r: plen and len(r.prompt_ids) > plen and tuple(r.prompt_ids[:plen]) == prefix_ids  # noqa: E731
        own = lambda r: len(r.prompt_ids) - plen if has_prefix(r) else len(r.prompt_ids)  # noqa: E731
        width = None
        while queue and len(batches) < 2 * p.num_gpu_batches:
            if p.prefill_chunk and p.refill and any(not b.decoding for b in batches):
                break  # staggered: the next batch joins when this one's prompt is done
            take = min(p.gpu_batch_size, len(queue))
            if active + take > p.block_size:
                if not p.refill:
                    break
                holes = [p.gpu_batch_size - live_rows(b) for b in batches if b.decoding]
                take = min(max(holes, default=0), p.block_size - active, len(queue))
                if take < max(1, p.gpu_batch_size // 4) or not all(b.decoding for b in batches):
                    break  # no hole worth a prefill, or a top-up already waits for its prefill
                self.stats.top_ups += 1
            rows = [queue.popleft() for _ in range(take)]
            start = plen if plen and all(has_prefix(r) for r in rows) else 0
            if width is None or not p.refill:  # a block admitted at once shares one width (fixed columns)
                width = max(map(own, rows)) if p.refill else max(
                    map(own, [*rows, *list(queue)[:p.block_size - active - take]]))
            b = self.make(rows, sampling, max(width, max(len(r.prompt_ids) - start for r in rows)), start)
            b.kv = [self.caches.alloc(j, len(rows), b.ids_width + min(sampling.max_new_tokens, KV_GROW))
                    for j in range(self.cfg.num_layers)]
            self.widest = max(self.widest, b.ids_width + sampling.max_new_tokens)
            if start:
                self.caches.copy_prefix(prefix.kv, b.kv, b.start)
                self.stats.prefix_reused_tokens += start * len(rows)
            self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
            batches.append(b)
            active += take
            if p.refill:
                width = None

    def grow(self, batches: list[Batch], max_new: int) -> None:
        """Widen the KV cache of every batch whose next input has no column left, by KV_GROW
        columns (or what its rows can still use): KV memory follows what rows generate, not the
        worst case of max_new_tokens for every row."""
        for b in batches:
            if b.kv and b.decoding and b.col >= self.caches.capacity(b.kv):
                room = max(max_new - len(t) for t, f in zip(b.tokens, b.finish) if f is None)
                sync_stores(b)
                b.kv = self.caches.realigned([b], b.col, b.col + min(KV_GROW, max(room, 1)))
                self.stats.kv_grows += 1

    def merge(self, batches: list[Batch]) -> None:
        """Merge decoding batches whose live rows fit one GPU batch (``merged``), smallest first,
        while the merged cache stays within the widest one this run admitted: on a host-bound GPU a
        step costs per batch, not per row, so two half-empty batches cost twice one full one."""
        cap = self.policy.gpu_batch_size
        while True:
            order = sorted((b for b in batches if b.decoding and b.kv), key=live_rows)
            pair = next(((a, b) for i, a in enumerate(order) for b in order[i + 1:]
                         if a.start == b.start and live_rows(a) + live_rows(b) <= cap and self.merged_width(a, b) <= self.widest),
                        None)
            if pair is None:
                return
            a, b = pair
            merged = self.merged(a, b)
            batches[batches.index(a)] = merged
            batches.remove(b)
            self.stats.batch_merges += 1

    def merged_width(self, a: Batch, b: Batch) -> int:
        """KV columns of ``a`` and ``b`` merged: aligned at the later column, with the room each
        still has. Bounded by the widest batch admitted, the block's KV stays within (rows alive)
        x (that width), the bound it had without merging."""
        return max(a.col, b.col) + max(self.caches.capacity(x.kv) - x.col for x in (a, b))

    def merged(self, a: Batch, b: Batch) -> Batch:
        """One batch of ``a``'s and ``b``'s live rows, aligned at the later column: the earlier
        batch's rows move right by the difference, into more left padding behind the shared prefix
        (layers.py's convention), so every row keeps its positions and its attention."""
        for x in (a, b):
            self.compact(x)
            sync_stores(x)
        col, width = max(a.col, b.col), self.merged_width(a, b)
        n = len(a.rows) + len(b.rows)
        shifts = [col - a.col] * len(a.rows) + [col - b.col] * len(b.rows)
        kv = self.caches.realigned([a, b], col, width)
        pad_cpu = torch.cat([a.pad_cpu, b.pad_cpu]) + torch.tensor(shifts, dtype=torch.long)
        gens = a.gens + b.gens if a.gens is not None and b.gens is not None else None
        return Batch(rows=a.rows + b.rows, pad=pad_cpu.to(self.device), pad_cpu=pad_cpu,
                      ids=torch.cat([a.ids, b.ids]), kv=kv, tokens=a.tokens + b.tokens, finish=[None] * n,
                      gens=gens, no_pad=bool((pad_cpu == 0).all()), ids_width=max(a.ids_width, b.ids_width),
                      start=a.start, col=col)

    def compact(self, b: Batch) -> None:
        """Drop finished rows from batch ``b``: their KV, padding, tokens and generators."""
        keep = [i for i, f in enumerate(b.finish) if f is None]
        if len(keep) == len(b.rows):
            return
        sync_stores(b)
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
        b.step = StepInputs()

    # ------------------------------------------------------------------ steps

    def make(self, rows: Sequence[Request], s: SamplingSettings, width: int, start: int = 0) -> Batch:
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
        return Batch(rows=list(rows), pad=pad.to(self.device), pad_cpu=pad, ids=ids[:, :chunk] if prompt is not None else ids,
                      tokens=[[] for _ in rows], finish=[None] * len(rows), gens=gens, no_pad=min(lens) == width,
                      ids_width=start + width, start=start, col=start, prompt=prompt)


def live_rows(b: Batch) -> int:
    """Rows of ``b`` still generating."""
    return sum(f is None for f in b.finish)
