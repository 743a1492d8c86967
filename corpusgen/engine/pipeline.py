"""Pipeline parallelism (DESIGN §7): a model's layers split across GPUs, one *stage* per GPU.

Stage s of S holds a contiguous range of decoder layers (the embedding on stage 0, the head and
sampling on the last stage) in its own WeightStore, so each GPU's memory budget and each GPU's own
host link serve 1/S of the model, and keeps the KV cache of its layers only. Inside a stage the
block schedule of schedule.py runs unchanged: each of the stage's layers is loaded once per
sub-block and serves every GPU batch of it, with the policy's placements and prefetching.

Sub-blocks (FlexGen's "inner iterations", flexgen/dist_flex_opt.py). The rows in flight are
split into S sub-blocks, each a whole block of the policy (gpu_batch_size × num_gpu_batches), so
that every stage has work while the others have theirs. A *turn* is one sub-block through one
stage's layers::

    stage 0   sb0(t)  sb1(t)  sb0(t+1)  sb1(t+1)  …
    stage 1           sb0(t)  sb1(t)    sb0(t+1)  …
                           └─ the tokens of sb0(t) reach stage 0 before it starts sb0(t+1)

Stage s > 0 starts a turn by receiving the sub-block's hidden states, (rows, q_len, hidden) per
GPU batch, from stage s-1; stage s < S-1 sends each GPU batch's on as soon as its last layer has
computed it. The last stage samples and sends the next token ids to every other stage.

No control messages: every stage holds all the requests and keeps the same bookkeeping — which
rows are admitted into which sub-block, which finish, compaction and refill — since all of it
follows from the sampled tokens, which every stage receives (and feeds through the same
``_sample`` as one-hot logits). So the stages agree on every turn, and each yields every result.

A stage holds the KV of S sub-blocks for its L/S layers: the KV one GPU holds for one block of
the whole model, now for S times the rows. Transport: hidden states travel as GPU tensors through
NCCL on CUDA (CPU tensors through gloo on a CPU-only machine), token ids as CPU tensors through
gloo. NCCL's own buffers (tens to hundreds of MiB per GPU) lie outside the allocator's budget cap.
A shared prompt prefix is not computed separately in a pipeline: every row runs its whole prompt.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from corpusgen import envs
from corpusgen.engine.api import Request, Result, SamplingSettings
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.load import Engine
from corpusgen.engine.placement import WeightStore
from corpusgen.engine.batches import Batch
from corpusgen.engine.schedule import BlockEngine
from corpusgen.engine.shapes import weight_shapes
from corpusgen.errors import CorpusgenError, PolicyError
from corpusgen.planner.memory import MemoryEstimate, memory_per_tier
from corpusgen.planner.policy import Policy


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage's place in a pipeline."""

    index: int
    """This stage, 0 … count-1 (its torch.distributed rank, unless ``open_stage(ranks=…)`` maps them)."""
    count: int
    """Stages in the pipeline (and sub-blocks in flight)."""
    first_layer: int
    """The model's first decoder layer held here."""
    num_layers: int
    """Decoder layers held here, contiguous from ``first_layer``."""

    @property
    def first(self) -> bool:
        """Holds the embedding: takes token ids in."""
        return self.index == 0

    @property
    def last(self) -> bool:
        """Holds the head: samples, and sends the tokens back."""
        return self.index == self.count - 1

    def units(self) -> list[str]:
        """The model's units held here, by their model-wide names."""
        layers = [f"layer.{i}" for i in range(self.first_layer, self.first_layer + self.num_layers)]
        return ["embed"] * self.first + layers + ["head"] * self.last


def split_layers(num_layers: int, stages: int) -> list[Stage]:
    """Contiguous layer ranges, as even as possible (stage s starts at ⌊s·L/S⌋)."""
    if stages < 1 or num_layers < stages:
        raise PolicyError(f"a pipeline of {stages} stages needs at least {stages} decoder layers; "
                          f"the model has {num_layers}")
    starts = [s * num_layers // stages for s in range(stages + 1)]
    return [Stage(index=s, count=stages, first_layer=starts[s], num_layers=starts[s + 1] - starts[s])
            for s in range(stages)]


def stage_config(cfg: ModelConfig, stage: Stage) -> ModelConfig:
    """The model as one stage sees it: its own layers, numbered from 0."""
    if stage.first_layer + stage.num_layers > cfg.num_layers:
        raise PolicyError(f"stage {stage.index} holds layers {stage.first_layer}…"
                          f"{stage.first_layer + stage.num_layers - 1}, but {cfg.name} has {cfg.num_layers}")
    return cfg.replace(num_layers=stage.num_layers)


def stage_memory(cfg: ModelConfig, stage: Stage, policy: Policy, prompt_len: int, gen_len: int,
                 dtype_bytes: int = 2) -> MemoryEstimate:
    """Bytes per tier on one stage: memory.py's terms for the stage's layers, with the embedding
    and head counted where they are, KV for every sub-block, and the hidden states of a prefill
    sub-block received (stage > 0) and sent (stage < S-1) on the GPU."""
    est = memory_per_tier(stage_config(cfg, stage), policy, prompt_len, gen_len, dtype_bytes)
    terms = dict(est.terms)
    shapes = weight_shapes(cfg)
    units = (["embed"] if stage.first else []) + (["head"] if stage.last else [])
    tied_once = stage.first and stage.last and cfg.tie_word_embeddings
    terms["gpu.embed_head"] = sum(math.prod(s) * dtype_bytes for u in units for n, s in shapes[u].items()
                                  if not (tied_once and (u, n) == ("head", "lm_head")))
    for key in ("gpu.kv_cache", "cpu.kv_cache"):
        terms[key] = terms.get(key, 0) * stage.count
    if not stage.last:
        terms.pop("gpu.logits", None)
    sub_block = policy.block_size * prompt_len * cfg.hidden_size * dtype_bytes
    terms["gpu.stage_input"] = 0 if stage.first else sub_block
    terms["gpu.stage_output"] = 0 if stage.last else sub_block
    terms = {k: int(v) for k, v in terms.items() if v}
    tot = {t: sum(v for k, v in terms.items() if k.startswith(t + ".")) for t in ("gpu", "cpu", "disk")}
    return MemoryEstimate(gpu=tot["gpu"], cpu=tot["cpu"], disk=tot["disk"], terms=terms)


# --------------------------------------------------------------------------- messages

class Link:
    """Point-to-point messages between the stages of one pipeline, over torch.distributed's
    default group (``cpu:gloo,cuda:nccl`` as :class:`PipelineGroup` makes it, or gloo on CPU).

    Sends are asynchronous (their tensors are kept until done); receives return once the data is
    there — for NCCL, once the current CUDA stream waits for it, without blocking the host.
    """

    def __init__(self, stage: Stage, device: torch.device, ranks: Sequence[int] | None = None):
        self.stage = stage
        self.device = device  # where hidden states travel: a GPU (NCCL) or the CPU (gloo)
        self.ranks = list(ranks) if ranks is not None else list(range(stage.count))
        assert len(self.ranks) == stage.count, (self.ranks, stage)
        self._inflight: deque = deque()

    def send_hidden(self, h: torch.Tensor) -> None:
        """The hidden states (rows, q_len, hidden) of one GPU batch, to the next stage."""
        import torch.distributed as dist

        h = h.contiguous()
        self._keep(dist.isend(h, self.ranks[self.stage.index + 1]), h)

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The hidden states of one GPU batch, from the previous stage."""
        import torch.distributed as dist

        h = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(h, self.ranks[self.stage.index - 1])
        return h

    def send_tokens(self, ids: torch.Tensor) -> None:
        """The sub-block's sampled ids (rows,) int64, from the last stage to every other."""
        import torch.distributed as dist

        ids = ids.to("cpu", torch.long).contiguous()
        for r in self.ranks[:-1]:
            self._keep(dist.isend(ids, r), ids)

    def recv_tokens(self, rows: int) -> torch.Tensor:
        import torch.distributed as dist

        ids = torch.empty(rows, dtype=torch.long)
        dist.recv(ids, self.ranks[-1])
        return ids

    def _keep(self, work, t: torch.Tensor) -> None:
        self._inflight.append((work, t))
        while self._inflight and self._inflight[0][0].is_completed():
            self._inflight.popleft()

    def drain(self) -> None:
        """Wait for every send of this stage to complete."""
        while self._inflight:
            self._inflight.popleft()[0].wait()


class PipelineGroup:
    """The process group of a pipeline launched by torchrun: ``cpu:gloo,cuda:nccl`` on GPUs (hidden
    states through NCCL, token ids and control through gloo), gloo on CPUs. A context manager; it
    joins a default group that already exists and otherwise creates one, which it destroys on exit."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self._owned = False

    def __enter__(self) -> "PipelineGroup":
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            missing = envs.missing_rendezvous()
            if missing:
                raise CorpusgenError(f"a pipeline of {self.world} stages needs {' and '.join(missing)}; "
                                     "start the stages with torchrun --nproc-per-node N")
            backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world)
            self._owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False


# --------------------------------------------------------------------------- the stage

class StageEngine(BlockEngine):
    """The block schedule over one stage's layers, turn by turn over the pipeline's sub-blocks."""

    def __init__(self, cfg: ModelConfig, store: WeightStore, policy: Policy, *, stage: Stage, link: Link,
                 tokenizer, device: torch.device, dtype: torch.dtype, eos_ids: Sequence[int]):
        if policy.prefill_chunk is not None:
            raise PolicyError("policy.prefill_chunk: chunked prefill is not supported across pipeline stages; "
                              "remove it, or run data parallel")
        super().__init__(cfg, store, policy, tokenizer=tokenizer, device=device, dtype=dtype, eos_ids=eos_ids)
        self.stage, self.link = stage, link
        self.feeds_head = stage.last  # a stage before the last sends every column of its output on
        self.graphs = None  # a decode graph replays every unit of the model; a stage runs a range of them
        n = cfg.num_layers  # the stage's own: units are embed, layer.0 … layer.{n-1}, head
        self.unit_range = range(0 if stage.first else 1, n + 2 if stage.last else n + 1)
        self.admit_seconds = 0.0  # admitting rows (allocating their KV), for benchmarks

    def run(self, requests: Sequence[Request], sampling: SamplingSettings, logits_hook=None,
            prefix: Sequence[int] | None = None) -> Iterator[Result]:
        """Generate for ``requests`` (the same on every stage); yield each row's Result once its
        last token is known here. Sub-block i's turns alternate with the other sub-blocks'; before
        its next turn, a stage other than the last waits for the tokens of its previous one.
        ``prefix`` is accepted for the Engine interface and not used."""
        st = self.stage
        queue = deque(requests)
        self.life.widest = 0
        subs: list[list[Batch]] = [[] for _ in range(st.count)]
        owed = [False] * st.count  # sub-block i's last turn still awaits its tokens from the last stage
        try:
            while queue or any(subs):
                for i, batches in enumerate(subs):
                    if owed[i]:
                        owed[i] = False
                        yield from self._receive_tokens(batches, sampling)
                    t0 = time.perf_counter()
                    self.life.admit(queue, batches, sampling)
                    self.life.grow(batches, sampling.max_new_tokens)
                    self.admit_seconds += time.perf_counter() - t0
                    if not batches:
                        continue
                    self._turn(batches)
                    if st.last:
                        done = self._sample(batches, sampling, logits_hook, last=False)
                        self.link.send_tokens(torch.cat([b.ids[:, 0] for b in batches]))
                        self.life.advance(batches)
                        yield from done
                    else:
                        owed[i] = True
        finally:
            self.link.drain()

    run_block = run

    def _turn(self, batches: list[Batch]) -> None:
        """One sub-block through this stage's units: receive its hidden states, the block schedule's
        loop (schedule.BlockEngine._units, over ``unit_range``), each batch sent on by ``_computed``."""
        prefill = all(b.col == b.start for b in batches)
        if not self.stage.first:
            for b in batches:  # (rows, q_len, hidden) per GPU batch, in batch order
                b.hidden = self.link.recv_hidden((len(b.rows), b.ids.shape[1], self.cfg.hidden_size), self.dtype)
        dt = self._pass(batches)
        if prefill:
            self.stats.prefill_seconds += dt
        else:
            self.stats.decode_seconds += dt

    def _computed(self, j: int, b: Batch) -> None:
        if j == self.cfg.num_layers and not self.stage.last:  # the stage's last layer: pass the batch on
            self.link.send_hidden(self._output(b))
            b.hidden = None

    def _output(self, b: Batch) -> torch.Tensor:
        """Batch ``b``'s hidden states where the link carries them. When activations rest on the
        host, the last layer's output went there: bring it back once its store has landed."""
        h = b.hidden
        if h.device.type != self.link.device.type:
            self.streams.wait(self.streams.compute, b.stored)
            h = h.to(self.link.device, non_blocking=True)
        return h

    def _receive_tokens(self, batches: list[Batch], sampling: SamplingSettings) -> list[Result]:
        """The last stage's tokens for ``batches``, through the same bookkeeping as there: each
        row's token becomes one-hot logits, which ``_sample`` picks whatever the settings."""
        sizes = [len(b.rows) for b in batches]
        ids = self.link.recv_tokens(sum(sizes))
        for b, t in zip(batches, ids.split(sizes)):
            b.logits = torch.full((len(t), self.cfg.vocab_size), float("-inf")).scatter_(1, t[:, None], 0.0)
        done = self._sample(batches, sampling, None, last=False)
        for b in batches:
            b.logits = None
            if self.stage.first:
                b.ids = b.ids.to(self.device)  # the next turn's input
        self.life.advance(batches)
        return done



@dataclass
class PipelineEngine(Engine):
    """One stage's Engine: ``generate`` yields every row's result on every stage."""

    stage: Stage | None = None
    """Which layers this process holds (``config`` is the stage's: its layers only)."""

    def _shared_prefix(self, requests: Sequence[Request]) -> None:
        return None  # a stage computes every row's whole prompt


def local_units(source, stage: Stage):
    """The stage's units, streamed one at a time, under the names its WeightStore expects: embed
    (empty off stage 0), its own layers numbered from 0, head (empty off the last stage)."""
    local = {f"layer.{stage.first_layer + i}": f"layer.{i}" for i in range(stage.num_layers)}
    renamed = ((local.get(name, name), w) for name, w in source)
    pending = next(renamed, None)
    for name in ["embed", *local.values(), "head"]:
        if pending is not None and pending[0] == name:
            yield pending
            pending = None  # let the placed unit go before the next one is loaded
            pending = next(renamed, None)
        else:
            yield name, {}
    assert pending is None, f"unexpected unit {pending[0]} for stage {stage.index}"
