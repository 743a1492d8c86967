"""The engine's interface to the rest of corpusgen (the job runner, bench, tests).

No torch here: the runner and the CLI depend on these types without importing the engine.
The engine yields :class:`Result` objects; it never prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

FINISH_REASONS = ("eos", "stop", "length", "error")


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How tokens are chosen and when a row stops."""

    max_new_tokens: int = 64
    """Generated tokens per row at most; a row that reaches it finishes with reason ``length``."""
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    seed: int = 0
    """Sampling seed; each row's generator is seeded from (seed, row key), so a row samples the
    same tokens whatever block it lands in."""
    stop: tuple[str, ...] = ()
    """Strings that end a row (the stop string is cut from the text; reason ``stop``)."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """One row to generate for."""

    key: str
    """Row key, unique within a job (used for the per-row sampling seed)."""
    prompt_ids: Sequence[int]
    """Tokenised prompt (chat template applied)."""


@dataclass(frozen=True, kw_only=True)
class Result:
    """A finished row."""

    key: str
    token_ids: list[int]
    """Generated tokens, without the prompt, without the EOS token, cut at a stop string."""
    text: str
    """Decoded ``token_ids`` (stop string removed)."""
    finish_reason: str
    """One of FINISH_REASONS."""
    prompt_tokens: int
    error: str | None = None


# A hook that may restrict the next token of active rows (structured decoding). It receives the
# keys of the rows in the current batch and the logits (rows, vocab) and returns logits.
LogitsHook = Callable[[Sequence[str], "object"], "object"]


@dataclass
class EngineStats:
    """Counters the engine keeps for progress and benchmarks (seconds and tokens)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_computes: int = 0  # times a shared prompt prefix was run through the model
    prefix_tokens: int = 0  # length of the current shared prefix
    prefix_reused_tokens: int = 0  # prompt tokens not computed because the prefix's K/V was reused
    batch_merges: int = 0  # partly finished GPU batches merged into one (refill)
    top_ups: int = 0  # batches admitted to fill a decoding batch's hole (refill), merged after prefill
    kv_grows: int = 0  # times a batch's KV cache was widened as its rows generated
    peak_bytes: dict[str, int] = field(default_factory=dict)


class Generator(Protocol):
    """What the job runner needs from an engine."""

    max_context: int
    """Longest prompt + generation the model accepts."""
    stats: EngineStats

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings,
                 logits_hook: LogitsHook | None = None) -> Iterator[Result]:
        """Generate for all ``requests``; yield each row's result (in any order) when it finishes."""
        ...
