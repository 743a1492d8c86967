"""CUDA graphs for the decode steps of a GPU-resident model.

Why: with every weight and the whole KV cache on the GPU, a decode step is ~480 small dependent
kernels (OPT-6.7B), launched one by one from Python, so the GPU waits on the launches and the
step's wall time follows the host's speed (docs/benchmarks.md#measurements-behind-engine-defaults).
A CUDA graph launches the whole step
(embedding, every layer, the head) as one replay, so the host is out of the step's critical
path; sampling and stop checks stay on the host, between replays.

What a graph needs is a step whose every shape and address is fixed. Three things move from
step to step in the eager path, and here they are device tensors the graph reads:
- the column the new token's K/V are written to (``index_copy_`` at a device index);
- the attention's key length (``decode_attention(..., klen=)``: the grid covers the batch's
  whole KV capacity, programs past the live length do nothing; or, with SDPA, a mask over the
  capacity computed from the column on the device);
- the token positions (from the column and the batch's padding, on the device).

A batch is captured at its first decode step (the capture's warm-up run is that step), and with
refill at its second with the same buffers (so a batch that changes every step, by compaction or
KV growth, never pays for a capture); it replays its graph while its rows and K/V buffers stay
the same. Outputs differ from the eager path's by rounding only (the attention's splits follow the capacity, not the live length):
``tests/test_cuda_kernels.py`` checks greedy outputs are the same.

Used only where it applies (``eligible``): CUDA, every unit and every layer's K/V on the GPU,
activations on the GPU, no compression. Attention is the split-KV kernel's where it serves the model
(one query head per K/V head, fp16/bf16), reading the live length from the device; otherwise
(grouped-query models such as SmolLM2 and Llama 3, fp32) PyTorch's SDPA over the batch's whole K/V
capacity, the live length a device-computed mask. If a capture fails (an op or driver that cannot
be captured), a warning says so and the engine runs eagerly from then on; the step that failed used
its warm-up run's result. ``policy.cuda_graphs: false`` turns it off.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from corpusgen.engine.kernels import decode_attention
from corpusgen.engine import layers as L



def eligible(engine) -> bool:
    """Whether ``engine`` (a BlockEngine) may run its decode steps through graphs."""
    store, policy = engine.store, engine.policy
    return (engine.policy.cuda_graphs and engine.device.type == "cuda"
            and all(t == "gpu" for t in store.tier) and all(t == "gpu" for t in engine.kv_tier)
            and engine.act_on_gpu and policy.compress_kv is None and policy.compress_weights is None)


def _kernel_serves(cfg, dtype: torch.dtype) -> bool:
    """Whether the split-KV kernel attends for this model (multi-head, fp16/bf16); otherwise
    PyTorch's SDPA does, over the whole K/V capacity with the live length in its mask."""
    return (decode_attention.triton is not None and cfg.num_heads == cfg.num_kv_heads
            and cfg.head_dim in (64, 128, 256) and dtype in (torch.float16, torch.bfloat16))


@dataclass
class _Graph:
    key: tuple
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # (b, 1) the step's input tokens
    col: torch.Tensor  # (1,) long: the column written this step
    klen: torch.Tensor  # (1,) int32: keys attended (col + 1)
    logits: torch.Tensor  # (b, vocab) fp32, written by every replay
    keep: tuple  # the other tensors the graph reads (padding, mask): alive as long as it is


class DecodeGraphs:
    """Per-batch graphs of one engine's decode steps (``BlockEngine._pass``)."""

    def __init__(self, engine):
        self.engine = engine
        # One capture stream for every graph: cuBLAS keeps a workspace per stream it has run on.
        self.side = torch.cuda.Stream(engine.device)
        self.kernel = _kernel_serves(engine.cfg, engine.dtype)
        self.captures = 0  # graphs captured (for tests and benchmarks)
        self.replays = 0
        self.capture_seconds = 0.0  # host time of captures (their warm-up step included)
        self.timed: list | None = None  # a list: (start, end) CUDA events of each replay (benchmarks)
        self.failed = False  # a capture failed: every step runs eagerly

    @staticmethod
    def _key(b) -> tuple:
        """What a graph of batch ``b`` bakes in: its row count, prompt layout, every K/V buffer."""
        return (len(b.rows), b.start, b.no_pad, b.pad.data_ptr(),
                tuple(c.data_ptr() for kv in b.kv for c in kv), tuple(c.shape for c in b.kv[0]))

    def step(self, b) -> bool:
        """Batch ``b``'s decode step through its graph (``b.logits`` set); False when this step
        should run eagerly (with refill, the first step with these buffers; after a failed capture,
        every step)."""
        if self.failed:
            return False
        key = self._key(b)
        g = b.graph.graph
        if g is not None and g.key == key:
            g.ids.copy_(b.ids)
            g.col.fill_(b.col)
            g.klen.fill_(b.col + 1)
            if self.timed is not None:
                ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev[0].record()
                g.graph.replay()
                ev[1].record()
                self.timed.append(ev)
            else:
                g.graph.replay()
            b.logits = g.logits
            self.replays += 1
            return True
        b.graph.graph = None  # frees the old graph's memory pool
        if self.engine.policy.refill and b.graph.key != key:
            b.graph.key = key  # refill changes batches (compaction, KV growth): capture when stable
            return False
        t0 = time.perf_counter()
        b.graph.graph = self._capture(b, key)  # this step's logits in b.logits either way
        self.capture_seconds += time.perf_counter() - t0
        return True

    def _capture(self, b, key: tuple) -> _Graph | None:
        """Run batch ``b``'s step eagerly on the capture stream (its logits into ``b.logits``), then
        capture it; None (and the engine's graphs off, with a warning) when capture fails."""
        eng = self.engine
        dev = eng.device
        ids = b.ids.clone()
        col = torch.full((1,), b.col, dtype=torch.long, device=dev)
        klen = torch.full((1,), b.col + 1, dtype=torch.int32, device=dev)
        cap = b.kv[0][0].shape[2]
        mask = None  # padding columns are never visible; the live length bounds the rest
        if not b.no_pad:
            mask = L.attention_mask(b.pad, cap - 1, 1, cap, b.start).reshape(len(b.rows), cap)
        cols = None
        if not self.kernel:  # SDPA: the live length as a mask over the whole capacity
            cols = torch.arange(cap, device=dev)
            # Masked keys still enter SDPA's arithmetic (a NaN score or value is not masked away),
            # and columns not yet written hold whatever memory held: zeros from here on, and the
            # replays write the columns in order (the kernel never loads masked columns).
            for kc, vc in b.kv:
                kc[:, :, b.col:].zero_()
                vc[:, :, b.col:].zero_()
        pad = b.pad  # its address is in the key: a new tensor means a new capture
        weights = [eng.store.get(j) for j in range(eng.cfg.num_layers + 2)]

        def step() -> torch.Tensor:
            return _decode_step(eng, weights, b, ids, col, klen, pad, mask, cols)

        side, cur = self.side, torch.cuda.current_stream(dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):  # warm-up on the capture stream: this step's real result
            b.logits = step()
        cur.wait_stream(side)
        b.logits.record_stream(cur)  # sampled on the compute stream
        # Not ``torch.cuda.graph(...)``: its entry runs gc.collect() and empty_cache() (tens of ms
        # in a large process, and the allocator's cache is gone for the next prefill).
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")  # the disk pool's threads may run
                try:
                    logits = step()
                finally:
                    graph.capture_end()
        except RuntimeError as e:  # an op or driver that cannot be captured: eager from here on
            warnings.warn(f"corpusgen: decode steps run eagerly, a CUDA graph could not be captured ({e})",
                          RuntimeWarning, stacklevel=2)
            eng.graphs, self.failed = None, True
            return None
        self.captures += 1
        return _Graph(key, graph, ids, col, klen, logits, keep=(pad, mask, cols))


def _decode_step(eng, weights, b, ids, col, klen, pad, mask, cols) -> torch.Tensor:
    """One decode step of batch ``b``, every shape fixed: embedding, layers, head -> logits.
    ``cols`` (capacity,): column indices when SDPA attends (the kernel reads ``klen`` itself)."""
    cfg, fam = eng.cfg, eng.fam
    positions = L.positions_at(pad, col, b.start)  # (b, 1)
    visible = None
    if cols is not None:  # (b, 1, 1, capacity): written columns, padding excluded
        live = (cols <= col)[None, :]
        visible = (live if mask is None else mask & live).expand(len(b.rows), -1)[:, None, None, :]
    aux = fam.prepare(cfg, positions, eng.dtype)
    h = fam.embed(cfg, weights[0], ids, positions)
    for i in range(cfg.num_layers):
        w = weights[i + 1]
        q, k, v = fam.pre_attention(cfg, w, h, positions, aux)
        kc, vc = b.kv[i]
        kc.index_copy_(2, col, k)
        vc.index_copy_(2, col, v)
        if cols is None:
            attn = decode_attention.decode_attention(q, kc, vc, mask, eng.scale, klen=klen)
        else:
            attn = L.attend(q, kc, vc, visible, eng.scale)
        h = fam.post_attention(cfg, w, h, attn, mlp_rows=eng.policy.mlp_rows)
    return fam.head(cfg, weights[-1], h[:, -1])
