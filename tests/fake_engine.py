"""A tiny deterministic engine with the real engine's interface, for tests only.

The tokenizer is byte-level (token = byte + 3; 0 pad, 1 eos, 2 bos). The "model" answers each
prompt with a JSON object derived from the user message and ends it with EOS, so the answer
length depends on the prompt; it honours max_new_tokens (reason ``length``) and stop strings
(reason ``stop``). A user message containing ``NOT-JSON`` gets a non-JSON answer; one containing
``ENGINE-ERROR`` gets a Result with ``error`` set. Rows are yielded shortest answer first (any
order is allowed by the interface).

Selected by the CLI when ``CORPUSGEN_FAKE_ENGINE=1``; ``CORPUSGEN_FAKE_DELAY`` (seconds per
row) slows it down so a test can kill a run midway; ``CORPUSGEN_FAKE_BLOCK`` sets block_size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Iterator, Sequence

from corpusgen.engine.api import EngineStats, Request, Result, SamplingSettings
from corpusgen.engine.config import PRESETS

_OFFSET = 3
_USER, _ASSISTANT = "<|user|>\n", "\n<|assistant|>\n"


class FakeTokenizer:
    """Byte-level tokenizer with a trivial chat template."""

    eos_token_ids = (1,)
    pad_token_id = 0
    bos_token_id = 2
    vocab_size = 256 + _OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - _OFFSET for i in ids if i >= _OFFSET).decode("utf-8", "replace")

    def chat_prompt(self, system: str | None, user: str) -> list[int]:
        sys_part = f"<|system|>\n{system}\n" if system else ""
        return [self.bos_token_id] + self.encode(sys_part + _USER + user + _ASSISTANT)

    def fingerprint(self) -> str:
        return "fake-bytes-v1"


def answer_for(user: str) -> str:
    """The fake model's full answer to a user message (before length/stop limits)."""
    if "NOT-JSON" in user:
        return "this is not json"
    words = user.split()
    digest = hashlib.sha256(user.encode()).hexdigest()[:8]
    return json.dumps({"first": words[0] if words else "", "words": len(words), "h": digest})


class FakeEngine:
    """Deterministic stand-in for corpusgen.engine.load.Engine."""

    def __init__(self, *, max_context: int = 2048, block_size: int = 8, delay: float = 0.0,
                 model: str = "fake"):
        self.config = PRESETS["smollm2-135m"]
        self.tokenizer = FakeTokenizer()
        self.max_context = max_context
        self.block_size = block_size
        self.delay = delay
        self.model = model
        self.stats = EngineStats()
        self.calls: list[int] = []
        """Rows per generate() call (tests look at block sizes)."""

    def describe(self) -> dict:
        return {"model": self.model, "device": "cpu", "dtype": "float32", "policy": None, "fake": True}

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings,
                 logits_hook=None) -> Iterator[Result]:
        self.calls.append(len(requests))
        results = [self._one(r, sampling) for r in requests]
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in results)
        for res in sorted(results, key=lambda r: (len(r.token_ids), r.key)):
            if self.delay:
                time.sleep(self.delay)
            self.stats.generated_tokens += len(res.token_ids)
            self.stats.decode_seconds += self.delay
            yield res

    def _one(self, req: Request, sampling: SamplingSettings) -> Result:
        assert len(req.prompt_ids) + sampling.max_new_tokens <= self.max_context, (req.key, len(req.prompt_ids))
        prompt = self.tokenizer.decode(req.prompt_ids)
        user = prompt.split(_USER, 1)[-1].rsplit(_ASSISTANT, 1)[0]
        if "ENGINE-ERROR" in user:
            return Result(key=req.key, token_ids=[], text="", finish_reason="error",
                          prompt_tokens=len(req.prompt_ids), error="fake engine failure")
        text, reason = answer_for(user), "eos"
        for s in sampling.stop:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        ids = self.tokenizer.encode(text)
        if len(ids) > sampling.max_new_tokens:
            ids, reason = ids[: sampling.max_new_tokens], "length"
            text = self.tokenizer.decode(ids)
        return Result(key=req.key, token_ids=ids, text=text, finish_reason=reason,
                      prompt_tokens=len(req.prompt_ids))


def open_engine(model: str, *, dummy: bool = False, device: str | None = None, dtype: str | None = None,
                policy=None, gpu_memory: int | None = None, cpu_memory: int | None = None,
                offload_dir: str | None = None) -> FakeEngine:
    """Same signature as corpusgen.engine.load.open_engine; settings from CORPUSGEN_FAKE_* env vars."""
    return FakeEngine(
        delay=float(os.environ.get("CORPUSGEN_FAKE_DELAY", "0") or 0),
        block_size=int(os.environ.get("CORPUSGEN_FAKE_BLOCK", "8") or 8),
        max_context=int(os.environ.get("CORPUSGEN_FAKE_CONTEXT", "2048") or 2048),
        model=model,
    )
