"""The engine's interface to the rest of corpusgen (the job runner, bench, tests).

No torch here: the runner and the CLI depend on these types without importing the engine.
The engine yields :class:`Result` objects; it never prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence
from typing import Generator as GeneratorType

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


class Tokenizer(Protocol):
    """What the job layer needs from a model's tokenizer (engine/tokenizer.py; IdTokenizer for presets)."""

    name: str
    eos_token_ids: tuple[int, ...]
    """Tokens that end a row (empty: rows end at max_new_tokens or a stop string)."""
    hf: Any
    """The Hugging Face tokenizer that constrained decoding drives, or None (then answers are only validated)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt(self, system: str | None, user: str) -> list[int]: ...

    def fingerprint(self) -> str: ...


class Generator(Protocol):
    """What the job runner needs from an engine (engine.load.Engine; tests pass doubles)."""

    tokenizer: Tokenizer
    max_context: int
    """Longest prompt + generation the model accepts."""
    block_size: int
    """Rows the engine runs together (a block); the runner hands it windows of whole blocks."""
    eos_token_ids: tuple[int, ...]
    """Tokens that end a row in this engine (the tokenizer's, else the model config's)."""
    refill: bool
    """True when the engine keeps its block full from everything it is given (finished rows'
    slots take waiting rows): the runner then hands it a whole window at once."""
    stats: EngineStats

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings,
                 logits_hook: LogitsHook | None = None) -> GeneratorType[Result, None, None]:
        """Generate for all ``requests``; yield each row's result (in any order) when it finishes."""
        ...

    def describe(self) -> dict:
        """What ran (model, device, dtype, policy, placement), recorded with the run."""
        ...

    def close(self) -> None:
        """Free the engine's memory and files."""
        ...


class GeneratorFactory(Protocol):
    """``open_engine``'s signature: how the runner opens a Generator for a job."""

    def __call__(self, model: str, *, dummy: bool, device: str | None, dtype: str | None, policy: Any,
                 gpu_memory: int | None, cpu_memory: int | None, offload_dir: str | None,
                 prompt_len: int, gen_len: int) -> Generator: ...
