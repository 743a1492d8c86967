"""Constrained decoding: the job's answer format → a grammar → one token mask per row and step.

Three forms, compiled once per job by llguidance (docs/structured.md says why llguidance):

- ``output.schema`` (a JSON Schema) → llguidance's JSON grammar; the answer is a JSON document;
- an enum-only schema (``{enum: [billing, bug_report, other]}``, strings only) → a choice grammar;
  the answer is the bare label, as a classifier writes it;
- ``output.regex`` → a regex grammar; the answer is text that matches it in full.

The hook (the engine's logits-hook protocol, corpusgen.engine.schedule ``_sample``)::

    step t, batch k:  mask(keys, logits)     wait for the bitmasks of batch k, apply them on the device
                      sample
                      advance(keys, tokens)   hand the tokens to the mask worker and return at once
    worker:           consume the tokens (one matcher per row), fill the bitmasks of step t + 1

The worker is one thread per process driving llguidance's parallel executor (which drops the GIL),
so on a GPU the masks of step t + 1 are computed while the device runs step t + 1's layer loop;
``mask`` only waits when the CPU is slower than the model. When the model itself runs on the CPU
there is nothing to overlap with — a worker would only take cores from the model's threads, and an
OpenMP region waits for its slowest thread — so ``mask`` fills the bitmasks itself, on the
executor's threads, while the model is between steps (``overlap`` overrides this choice).
Bitmasks are int32 words (bit j of word w is token 32w + j), written into pinned host memory when
the logits live on a GPU, copied with one transfer and turned there into -inf biases in one
vectorised op. Rows that have finished get no mask (their tokens are ignored); a matcher that fails (a resource limit of the grammar engine) allows only EOS, so its
row ends and the runner reports the failure. When a matcher is accepting, llguidance allows the
EOS tokens (we give it the engine's), so a complete answer ends with finish reason ``eos``.
Logit columns beyond the tokenizer's vocabulary (padding rows of the embedding) are masked out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from corpusgen.errors import JobSpecError, ModelError

# Our default JSON layout: whitespace as the model likes it (llguidance's default), but at most 8
# characters between two tokens of JSON — an unbounded run of newlines is how small models loop
# until max_new_tokens. A schema whose "x-guidance" sets any layout option gets llguidance's
# defaults plus its own options instead.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,8}"}
_LAYOUT = ("whitespace_flexible", "whitespace_pattern", "item_separator", "key_separator")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Constraint:
    """What every answer of a job must look like, compiled to an llguidance grammar."""

    kind: str
    """json (a JSON Schema), choice (the labels of an enum-only schema) or regex."""
    grammar: str
    """The llguidance grammar (serialised), tokenizer-independent."""
    labels: tuple[str, ...] = ()
    """The labels of a choice constraint."""
    notes: tuple[str, ...] = ()
    """Where the constraint is looser than the schema (keywords llguidance does not implement);
    answers are still validated, so rows that break those keywords are ``schema_invalid``."""


def labels_of(schema: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The labels of an enum-only schema (``{enum: [...]}`` of strings, nothing else), or None."""
    if not isinstance(schema, Mapping) or "enum" not in schema:
        return None
    if set(schema) - {"enum", "type", "title", "description", "$schema"}:
        return None
    values = schema["enum"]
    if not values or not all(isinstance(v, str) and v for v in values) or schema.get("type", "string") != "string":
        return None
    return tuple(dict.fromkeys(values))


def compile_constraint(schema: Mapping[str, Any] | None = None, regex: str | None = None) -> Constraint | None:
    """The constraint of ``output.schema`` or ``output.regex`` (None when neither is set).
    Raises JobSpecError naming the field when llguidance cannot compile it at all."""
    if schema is None and regex is None:
        return None
    if regex is not None:
        return Constraint(kind="regex", grammar=_checked(LLMatcher.grammar_from_regex(regex), "output.regex"))
    labels = labels_of(schema)
    if labels is not None:
        lark = "start: " + " | ".join(json.dumps(label) for label in labels)
        return Constraint(kind="choice", grammar=_checked(LLMatcher.grammar_from_lark(lark), "output.schema"),
                          labels=labels)
    own = schema.get("x-guidance")
    defaults = {} if isinstance(own, Mapping) and any(k in own for k in _LAYOUT) else JSON_DEFAULTS
    grammar = LLMatcher.grammar_from_json_schema(dict(schema), defaults=defaults)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return Constraint(kind="json", grammar=grammar, notes=tuple(messages))
    lenient = LLMatcher.grammar_from_json_schema(dict(schema), defaults=defaults,
                                                 overrides={"lenient": True, "coerce_one_of": True})
    is_error2, messages2 = LLMatcher.validate_grammar_with_warnings(lenient)
    if is_error2:
        raise JobSpecError(f"output.schema: constrained decoding cannot compile it ({_first(messages2)}); "
                           "simplify the schema")
    return Constraint(kind="json", grammar=lenient, notes=tuple(dict.fromkeys([*messages, *messages2])))


def _checked(grammar: str, where: str) -> str:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise JobSpecError(f"{where}: constrained decoding cannot compile it ({_first(messages)})")
    return grammar


def _first(messages: Sequence[str]) -> str:
    return (messages[0].splitlines()[0] if messages else "unknown error")[:300]


@dataclasses.dataclass
class MaskStats:
    """Where the constraint's time goes (seconds), for benchmarks."""

    steps: int = 0
    """Batch steps masked."""
    rows: int = 0
    """Row masks computed."""
    worker_s: float = 0.0
    """Mask steps: consuming tokens and filling bitmasks (on the worker, overlapping the model, or inline)."""
    wait_s: float = 0.0
    """Time ``mask`` waited for its bitmasks (what the overlap did not hide; inline: the whole step)."""
    apply_s: float = 0.0
    """Time ``mask`` spent copying and applying bitmasks."""


class Grammar:
    """A constraint bound to a tokenizer: makes one :class:`MaskHook` per ``generate`` call.

    ``eos_ids`` are the tokens that end a row in the engine; an accepting matcher allows them all.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any, *, eos_ids: Sequence[int], threads: int | None = None,
                 overlap: bool | None = None):
        hf = getattr(tokenizer, "hf", None)
        if hf is None or not eos_ids:
            raise ModelError(f"constrained decoding needs a Hugging Face fast tokenizer with an EOS token; "
                             f"{getattr(tokenizer, 'name', type(tokenizer).__name__)} has none")
        assert sys.byteorder == "little", "bitmask unpacking assumes little-endian int32 words"
        self.constraint = constraint
        self.lltok = _lltokenizer(hf, tuple(eos_ids))
        self.eos = frozenset(int(t) for t in eos_ids)
        self.template = LLMatcher(self.lltok, constraint.grammar, log_level=0)
        if self.template.is_error():
            raise JobSpecError(f"output: constrained decoding cannot start ({_first([self.template.get_error()])})")
        self.vocab = self.lltok.vocab_size
        self.words = (self.vocab + 31) // 32
        self.initial = torch.empty((1, self.words), dtype=torch.int32)
        self.template.unsafe_compute_mask_ptr(self.initial.data_ptr(), self.words * 4)
        self.eos_only = torch.zeros((1, self.words), dtype=torch.int32)
        for t in self.eos:
            if t < self.vocab:
                self.eos_only[0, t // 32] |= _bit(t % 32)
        self.eos_only_np = self.eos_only[0].numpy()
        # a few threads: masks of a batch take a millisecond or two on them, and more would compete
        # with the thread that drives the model (and, on a CPU-only machine, with the model itself)
        self.executor = LLExecutor(threads or max(1, min(4, (os.cpu_count() or 2) // 4)))
        self.worker = _worker()
        self.overlap = overlap
        """Compute masks on the worker thread while the model runs: None = when the logits are on a GPU."""
        self.stats = MaskStats()
        self.errors: dict[str, str] = {}
        """Row key → why its matcher failed (taken by the runner with :meth:`pop_error`)."""
        self._lock = threading.Lock()

    def hook(self, max_new_tokens: int) -> MaskHook:
        """A hook for one ``engine.generate`` call (fresh matchers for its rows). Calls run one after
        the other, so errors of an earlier call (rows it ran again after an out-of-memory split, say)
        are dropped."""
        with self._lock:
            self.errors.clear()
        return MaskHook(self, max_new_tokens)

    def pop_error(self, key: str) -> str | None:
        with self._lock:
            return self.errors.pop(key, None)


_WORKER: list[ThreadPoolExecutor] = []


def _worker() -> ThreadPoolExecutor:
    """The one mask thread of the process (jobs in one process never mask at the same time)."""
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="corpusgen-mask"))
    return _WORKER[0]


_LLTOKENIZERS: dict[tuple[int, tuple[int, ...]], tuple[Any, LLTokenizer]] = {}


def _lltokenizer(hf: Any, eos: tuple[int, ...]) -> LLTokenizer:
    # about a second to build for a 50k vocabulary: once per tokenizer and EOS set (the entry keeps
    # the HF tokenizer alive, so its id is not reused by another)
    key = (id(hf), eos)
    if key not in _LLTOKENIZERS or _LLTOKENIZERS[key][0] is not hf:
        import llguidance.hf

        _LLTOKENIZERS[key] = (hf, llguidance.hf.from_tokenizer(hf, eos_token=list(eos)))
    return _LLTOKENIZERS[key][1]


def _bit(j: int) -> int:
    """Bit j of an int32 word, as a Python int that torch accepts for int32 (bit 31 is negative)."""
    return (1 << j) - (1 << 32 if j == 31 else 0)


@dataclasses.dataclass
class _Row:
    matcher: LLMatcher | None
    tokens: int = 0
    done: bool = False


@dataclasses.dataclass
class _Step:
    keys: tuple[str, ...]
    bits: torch.Tensor  # (rows, words) int32, pinned when the logits are on a GPU

    @functools.cached_property
    def pos(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}


class MaskHook:
    """The engine's logits hook for one ``generate`` call: ``mask`` then ``advance``, per step and
    GPU batch. Rows are tracked by key, so batches may be compacted or refilled between steps."""

    def __init__(self, grammar: Grammar, max_new_tokens: int):
        self.g = grammar
        self.max_new_tokens = max_new_tokens
        self.rows: dict[str, _Row] = {}
        self.pending: dict[str, Future] = {}  # key → the worker step that holds its next mask
        self.pin = False
        self.overlap = bool(grammar.overlap)

    def mask(self, keys: Sequence[str], logits: torch.Tensor) -> torch.Tensor:
        """Restrict ``logits`` (rows, vocab) fp32 of these rows to the tokens their grammar allows."""
        self.pin = logits.is_cuda
        self.overlap = self.g.overlap if self.g.overlap is not None else logits.is_cuda
        t0 = time.perf_counter()
        bits = self._bits(tuple(keys))
        t1 = time.perf_counter()
        apply_bitmask(logits, bits)
        st = self.g.stats
        st.steps += 1
        st.wait_s += t1 - t0
        st.apply_s += time.perf_counter() - t1
        return logits

    def advance(self, keys: Sequence[str], next_ids: torch.Tensor) -> None:
        """Hand the sampled tokens to the worker, which prepares the next step's masks."""
        ids = next_ids.tolist()  # the engine syncs on these right after; the worker needs them on the host
        keys = tuple(keys)
        if all((r := self.rows.get(k)) is not None and r.done for k in keys):
            return
        # allocated here, filled there: the worker makes no torch calls (their intra-op thread pool is
        # the model's, and a pinned allocation may synchronise the device)
        bits = torch.empty((len(keys), self.g.words), dtype=torch.int32, pin_memory=self.pin)
        fut = self.g.worker.submit(self._step, keys, ids, bits) if self.overlap else _Later(self._step, keys, ids, bits)
        for k in keys:
            self.pending[k] = fut

    # --- internals -------------------------------------------------------------------------------
    def _bits(self, keys: tuple[str, ...]) -> torch.Tensor:
        futs = [self.pending.pop(k, None) for k in keys]
        if futs[0] is not None and all(f is futs[0] for f in futs):
            step = futs[0].result()
            if step.keys == keys:
                return step.bits
        bits = self.g.initial.expand(len(keys), -1).clone()  # rows seen for the first time
        for i, (k, f) in enumerate(zip(keys, futs)):
            if f is not None:  # a batch compacted since the last step, or a mix of old and new rows
                step = f.result()
                bits[i] = step.bits[step.pos[k]]
        return bits

    def _step(self, keys: tuple[str, ...], ids: list[int], bits: torch.Tensor) -> _Step:
        """Worker: consume each row's token, fill the bitmask of its next step into ``bits``."""
        t0 = time.perf_counter()
        g = self.g
        out = bits.numpy()  # (rows, words) int32 view; numpy writes stay on this thread
        consume: list[tuple[LLMatcher, int]] = []
        where: list[tuple[str, int]] = []
        for i, (k, t) in enumerate(zip(keys, ids)):
            row = self.rows.get(k)
            if row is None:
                row = self.rows[k] = _Row(g.template.deep_copy())
            if not row.done:
                row.tokens += 1
                if t in g.eos or row.tokens >= self.max_new_tokens:
                    row.done, row.matcher = True, None  # the engine ends this row now
            if row.done:
                out[i] = -1  # finished: everything allowed, its token is ignored
                continue
            consume.append((row.matcher, t))
            where.append((k, i))
        ok = g.executor.consume_token_par(consume) if consume else []
        fill = []
        for (m, _), (k, i), good in zip(consume, where, ok):
            if good:
                fill.append((m, i))
            else:
                self._fail(k, m, out, i)
        if fill:
            g.executor.unsafe_compute_mask_ptr(fill, bits.data_ptr(), g.words * 4, len(keys))
            for m, i in fill:
                if m.is_error():
                    self._fail(keys[i], m, out, i)
        g.stats.rows += len(fill)
        g.stats.worker_s += time.perf_counter() - t0
        return _Step(keys=keys, bits=bits)

    def _fail(self, key: str, m: LLMatcher, out, i: int) -> None:
        """A matcher in error allows only EOS: the row ends, the runner reports why."""
        out[i] = self.g.eos_only_np
        with self.g._lock:
            self.g.errors.setdefault(key, _first([m.get_error()]))


class _Later:
    """A step run by ``mask`` itself when it needs it (no overlap: the model runs on the CPU)."""

    def __init__(self, fn, *args):
        self.fn, self.args, self.value = fn, args, None

    def result(self):
        if self.value is None:
            self.value = self.fn(*self.args)
        return self.value


_BIAS: dict[torch.device, torch.Tensor] = {}


def _byte_bias(dev: torch.device) -> torch.Tensor:
    """(256, 8) fp32: entry [v, j] is 0 when bit j of byte v is set, else -inf."""
    if dev not in _BIAS:
        v = torch.arange(256, dtype=torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)
        _BIAS[dev] = torch.zeros(256, 8).masked_fill_((v & 1) == 0, float("-inf")).to(dev)
    return _BIAS[dev]


def apply_bitmask(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Set ``logits`` (rows, vocab) to -inf where ``bits`` (rows, words) int32 has a 0 bit, in place;
    columns beyond 32 × words (vocabulary padding) are masked too.

    One gather from a byte → 8 biases table and one add: on a CPU far cheaper than unpacking the
    bits and ``masked_fill``, and the mask is applied every step on the engine's critical path."""
    rows, vocab = logits.shape
    assert bits.shape[0] == rows and bits.dtype == torch.int32, (bits.shape, rows, bits.dtype)
    dev = logits.device
    octets = bits.to(dev, non_blocking=True).view(torch.uint8).reshape(-1).int()  # (rows × words × 4,)
    bias = _byte_bias(dev).index_select(0, octets).view(rows, -1)  # (rows, 32 × words)
    n = min(vocab, bias.shape[1])
    logits[:, :n].add_(bias[:, :n])
    if vocab > n:
        logits[:, n:] = float("-inf")
    return logits
