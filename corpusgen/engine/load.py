"""``open_engine``: resolve a model, place its weights by a policy, and return an Engine that
generates blocks of requests through the block schedule.

The only entry point the runner, ``bench`` and the tests use. With everything on one device the
policy is simply "all on gpu", and the same schedule runs (there is no second code path).
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from corpusgen import envs
from corpusgen.engine import layers as L
from corpusgen.engine.api import EngineStats, Request, Result, SamplingSettings
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.placement import WeightStore
from corpusgen.engine.schedule import BlockEngine
from corpusgen.engine.tiers import DiskTier, HostArena
from corpusgen.engine.weights import dummy_units, iter_units, load_config, resolve_source
from corpusgen.errors import CorpusgenError, ModelError
from corpusgen.planner.budgets import check_against_machine
from corpusgen.planner.hardware import cpu_has_bf16
from corpusgen.planner.memory import check_budgets, memory_per_tier
from corpusgen.planner.policy import Policy


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("engine.device is cuda but no CUDA GPU is visible; use device: cpu or auto")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device, cfg: ModelConfig, policy: Policy | None = None) -> torch.dtype:
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise ModelError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        if policy is not None and policy.cpu_attention and cpu_has_bf16():
            return torch.bfloat16  # the CPU attends over the cache: bf16 is native there, fp16 is not
        return torch.float16 if cfg.family == "opt" else torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class IdTokenizer:
    """For dummy-weight presets (benchmarks): token ids are their own text."""

    name = "ids"
    eos_token_ids: tuple[int, ...] = ()
    hf = None  # no Hugging Face tokenizer: constrained decoding cannot run
    pad_token_id = 0
    has_chat_template = False

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) % self.vocab_size for t in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))

    def chat_prompt(self, system: str | None, user: str) -> list[int]:
        return self.encode(user)

    def fingerprint(self) -> str:
        return f"ids-{self.vocab_size}"


MIN_SHARED_PREFIX = 4
"""A shared prefix shorter than this is not worth its own pass over the weights."""


@dataclass
class Engine:
    """A loaded model with its placement; ``generate`` runs requests block by block."""

    config: ModelConfig
    tokenizer: object
    policy: Policy
    device: torch.device
    dtype: torch.dtype
    block: BlockEngine
    store: WeightStore
    arena: HostArena
    disk: DiskTier | None
    load_seconds: float
    _tmpdir: str | None = None

    @property
    def max_context(self) -> int:
        return self.config.max_positions

    @property
    def block_size(self) -> int:
        return self.policy.block_size

    @property
    def refill(self) -> bool:
        return self.policy.refill

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.block.eos))

    @property
    def stats(self) -> EngineStats:
        return self.block.stats

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings, logits_hook=None) -> Iterator[Result]:
        """Yield each row's result as it finishes; rows are run in blocks of ``block_size``."""
        ok: list[Request] = []
        for r in requests:
            n = len(r.prompt_ids)
            if n == 0 or n + sampling.max_new_tokens > self.max_context:
                why = "empty prompt" if n == 0 else (
                    f"prompt of {n} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the context of {self.max_context}")
                yield Result(key=r.key, token_ids=[], text="", finish_reason="error", prompt_tokens=n, error=why)
            else:
                ok.append(r)
        if ok:
            yield from self.block.run(ok, sampling, logits_hook, prefix=self._shared_prefix(ok))
        self._update_peaks()

    def _shared_prefix(self, requests: Sequence[Request]) -> tuple[int, ...] | None:
        """The token prefix to compute once for ``requests``: the one in use while every request
        still starts with it (so a job's prefix is computed once, not once per window), else the
        longest common prefix of these requests, leaving each at least one token of its own.
        None when the policy turns it off or the prefix is too short to pay for a pass."""
        if not self.policy.shared_prefix or len(requests) < 2:
            return None
        current = self.block._prefix
        if current is not None:
            ids = tuple(current.rows[0].prompt_ids)
            if all(len(r.prompt_ids) > len(ids) and tuple(r.prompt_ids[:len(ids)]) == ids for r in requests):
                return ids
        first = requests[0].prompt_ids
        n = min(len(r.prompt_ids) for r in requests) - 1
        for r in requests[1:]:
            ids = r.prompt_ids
            n = next((i for i in range(n) if ids[i] != first[i]), n)
            if n < MIN_SHARED_PREFIX:
                return None
        return tuple(first[:n]) if n >= MIN_SHARED_PREFIX else None

    def _update_peaks(self) -> None:
        peaks = self.stats.peak_bytes
        if self.device.type == "cuda":
            peaks["gpu"] = max(peaks.get("gpu", 0), torch.cuda.max_memory_allocated(self.device))
        peaks["cpu_pinned"] = self.arena.peak
        if self.disk is not None:
            peaks["disk"] = self.disk.bytes_written

    def describe(self) -> dict:
        pl = self.store.placement
        return {
            "model": self.config.name, "family": self.config.family, "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "policy": self.policy.to_dict(),
            "realised": {"weights": {t: round(pl.fraction("weights", t), 4) for t in ("gpu", "cpu", "disk")},
                         "kv_cache": {t: round(pl.fraction("kv", t), 4) for t in ("gpu", "cpu")},
                         "activations_on_gpu": pl.activations_on_gpu, "notes": list(pl.notes)},
            "resident_bytes": dict(self.store.resident_bytes), "load_seconds": round(self.load_seconds, 3),
        }

    def close(self) -> None:
        self.arena.clear()
        if self.disk is not None:
            self.disk.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def open_engine(model: str, *, dummy: bool = False, device: str | None = None, dtype: str | None = None,
                policy: Policy | None = None, gpu_memory: int | None = None, cpu_memory: int | None = None,
                offload_dir: str | None = None, prompt_len: int = 512, gen_len: int = 32, seed: int = 0,
                tokenizer=None, stage=None, ranks: Sequence[int] | None = None) -> Engine:
    """Load ``model`` (preset, HF dir, .gguf, or the default) and place it by ``policy``.

    Budgets are hard: the policy's memory (for prompt_len/gen_len) is checked before anything is
    allocated, the GPU allocator is capped at ``gpu_memory``, and pinned host memory is counted
    against ``cpu_memory``.

    ``stage`` (a pipeline.Stage): load only that stage's layers (and the embedding on the first,
    the head on the last) as one stage of a pipeline (pipeline.py): the same loader over a layer
    range, whose engine sends its hidden states on. The policy is then a stage's (its block is one
    sub-block, its fractions are of the stage's layers) and the budgets this GPU's and process's.
    Several stages need torch.distributed's default group (pipeline.PipelineGroup); ``ranks`` maps
    stages to ranks.
    """
    t0 = time.perf_counter()
    cfg = load_config(model)
    dev = pick_device(device)
    policy = policy or Policy()
    dt = pick_dtype(dtype, dev, cfg, policy)
    dtype_bytes = torch.finfo(dt).bits // 8
    if stage is None:
        local_cfg, wanted = cfg, None
        est = memory_per_tier(cfg, policy, prompt_len, gen_len, dtype_bytes=dtype_bytes)
    else:
        from corpusgen.engine import pipeline

        local_cfg, wanted = pipeline.stage_config(cfg, stage), stage.units()
        est = pipeline.stage_memory(cfg, stage, policy, prompt_len, gen_len, dtype_bytes=dtype_bytes)
    check_budgets(est, gpu_memory, cpu_memory)
    check_against_machine(gpu_budget=gpu_memory, cpu_budget=cpu_memory, device=str(dev), disk_bytes=est.disk,
                          offload_dir=offload_dir)
    if dev.type == "cuda":
        _cap_gpu(dev, gpu_memory)
    tmp = None
    if est.disk > 0 and offload_dir is None:
        tmp = offload_dir = tempfile.mkdtemp(prefix="corpusgen-offload-")
    disk = DiskTier(Path(offload_dir) / "weights") if est.disk > 0 else None
    arena = HostArena(cpu_memory)
    units, tok = _units(model, cfg, policy, dev, dt, dummy=dummy, seed=seed, only=wanted, tokenizer=tokenizer)
    if stage is not None:
        units = pipeline.local_units(units, stage)
    try:
        store = WeightStore(local_cfg, units, policy, device=dev, dtype=dt, arena=arena, disk=disk)
    except CorpusgenError:
        if disk is not None:
            disk.close()
        raise
    eos = tuple(tok.eos_token_ids) or cfg.eos_token_ids if not dummy else ()
    if dev.type == "cuda":
        _warm_kernels(dev, dt, local_cfg, compressed=bool(policy.compress_kv or policy.compress_weights),
                      compress_kv=policy.compress_kv)
    if dev.type == "cpu":
        keep_freed_host_memory()
        if dt == torch.float32:
            L.onednn_fp32()  # its numeric probe runs here, not inside the first prefill
    common = dict(tokenizer=tok, device=dev, dtype=dt, eos_ids=eos)
    if stage is None:
        block, kind, extra = BlockEngine(cfg, store, policy, **common), Engine, {}
    else:
        link = pipeline.Link(stage, dev, ranks)
        block = pipeline.StageEngine(local_cfg, store, policy, stage=stage, link=link, **common)
        kind, extra = pipeline.PipelineEngine, {"stage": stage}
    store.load_stream = block.streams.load if block.streams.load is not block.streams.compute else None
    return kind(config=local_cfg, tokenizer=tok, policy=policy, device=dev, dtype=dt, block=block, store=store,
                arena=arena, disk=disk, load_seconds=time.perf_counter() - t0, _tmpdir=tmp, **extra)


def _cap_gpu(dev: torch.device, gpu_memory: int | None) -> None:
    """The allocator's settings, and its cap at ``gpu_memory`` (the budget is hard)."""
    envs.configure_cuda_allocator()
    if gpu_memory:
        total = torch.cuda.get_device_properties(dev).total_memory
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory / total), index)


def _units(model: str, cfg: ModelConfig, policy: Policy, dev: torch.device, dt: torch.dtype, *, dummy: bool,
           seed: int, only, tokenizer):
    """The model's units as a stream of (name, weights), and its tokenizer."""
    if dummy:
        return dummy_units(cfg, dtype=dt, device=dev, seed=seed, only=only), tokenizer or IdTokenizer(cfg.vocab_size)
    source = resolve_source(model)
    if source is None:
        raise ModelError(f"{model}: a preset has shapes but no weights; add --dummy, or give a checkpoint directory or .gguf file")
    # GGUF tensors are dequantised to fp32 anyway; weights to be compressed are quantised from
    # those fp32 values, so 4-bit group-32 re-quantisation of Q4_1 is exact in any compute dtype.
    gguf_fp32 = policy.compress_weights is not None and source.suffix == ".gguf"
    units = iter_units(model, cfg, dtype=torch.float32 if gguf_fp32 else dt, only=only)
    if tokenizer is None:
        from corpusgen.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source)
    return units, tokenizer


def _warm_kernels(device: torch.device, dtype: torch.dtype, cfg, compressed: bool, compress_kv=None) -> None:
    """Compile the Triton kernels the run will use now (JIT, ~1-3 s each on an H200), not inside
    the first prefill or decode step, where it was counted as generation time (OPT-6.7B: a 16.5 ms
    decode step averaged 26.9 ms over 31 steps with one compile inside)."""
    from corpusgen.engine import compression as cq
    from corpusgen.engine.kernels import decode_attention as da
    from corpusgen.engine.kernels import packed_attention
    from corpusgen.engine.kernels import kv_copy

    if compressed:
        x = torch.randn(2, 128, device=device, dtype=dtype)
        cq.dequantize(cq.quantize(x, 4, 64, axis=-1))
    da.warm_up(device, dtype, cfg)
    packed_attention.packed_warm_up(device, dtype, cfg, compress_kv)
    kv_copy.warm_up(device, dtype, cfg.head_dim)
    if cfg.family == "opt":
        from corpusgen.engine.kernels import fused_norm

        fused_norm.warm_up(device, dtype, cfg.hidden_size)
    torch.cuda.synchronize(device)


HOST_MALLOC_THRESHOLD = 256 << 20
"""Bytes below which glibc serves and keeps host blocks in its heap (``keep_freed_host_memory``)."""


def keep_freed_host_memory() -> bool:
    """Let glibc reuse freed activation-sized blocks instead of returning them to the kernel.

    glibc serves blocks from 128 KiB (its threshold adapts up to 32 MiB) by mmap and unmaps them
    on free, and trims its heap top past 128 KiB; so a CPU layer's fresh activation buffers were
    faulted in page by page again: a 16-row SmolLM2 fp32 generate (2 threads) took 56-166 k minor
    faults every time, and ~0 after the first with both thresholds at ``HOST_MALLOC_THRESHOLD``
    (median 3.09 s -> 2.74 s, quiet machine, separate processes; peak RSS unchanged, 1.4 GB).
    Freed blocks stay in the heap for the next layer, as PyTorch's CUDA caching allocator keeps
    GPU blocks: the process holds its peak host memory instead of returning it. Process-wide
    (transformers in the same process measured no slower with it), glibc only, CPU engines only;
    True when it was applied (it is idempotent).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, HOST_MALLOC_THRESHOLD)
                and libc.mallopt(m_trim_threshold, HOST_MALLOC_THRESHOLD))
