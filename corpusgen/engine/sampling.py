"""Choosing the next token, and deciding when a row is finished. Pure functions over tensors.

Greedy decoding is an argmax on the device. Sampled decoding uses one ``torch.Generator`` per row,
seeded from (job seed, row key), so a row draws the same tokens whatever block it lands in —
resumed jobs and re-batched jobs sample identically.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from corpusgen.engine.api import SamplingSettings


def row_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def filter_logits(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """Temperature, top-k and top-p applied to fp32 logits (rows, vocab); masked entries are -inf."""
    logits = logits / max(s.temperature, 1e-6)
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample(logits: torch.Tensor, s: SamplingSettings, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: logits (rows, vocab) fp32 -> ids (rows,) int64 on the logits' device."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    assert generators is not None and len(generators) == logits.shape[0], "one generator per row"
    probs = filter_logits(logits, s).softmax(-1).cpu()
    out = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
    return out.to(logits.device)


def stop_in_tail(decode, tokens: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether a stop string shows in the decoded last few ``tokens``: a cheap screen, run every
    step, for a stop that the newest token completed (a row's whole text is decoded only when it
    passes). The tail starts at 4 tokens per character of the longest stop plus 4 (a character may
    take 4 byte tokens) and doubles until it decodes to 4 characters more than that stop (tokens
    that decode to nothing), so it holds any stop string that ends in the newest token."""
    longest = max(len(x) for x in stops)
    n = 4 * longest + 4
    while True:
        tail = decode(tokens[-n:])
        if len(tail) >= longest + 4 or n >= len(tokens):
            return any(x and x in tail for x in stops)
        n *= 2


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def append_token(tokens: list[int], t: int, eos, s: SamplingSettings, tok, *, last: bool = False) -> tuple[str | None, str | None]:
    """Add sampled token ``t`` to a row's ``tokens`` (in place) and decide whether the row ends:
    ``eos`` (the token is one of ``eos``, not kept), ``stop`` (a stop string appeared: the text and
    tokens are cut before it), ``length`` (max_new_tokens reached, or ``last``), else None.
    Returns (finish reason, the row's text when it finished)."""
    reason = None
    if t in eos:
        reason = "eos"
    else:
        tokens.append(t)
    text = None
    if s.stop and reason is None and stop_in_tail(tok.decode, tokens, s.stop):
        text = tok.decode(tokens)  # whole text: where the earliest stop starts
        cut = find_stop(text, s.stop)
        if cut is not None:
            reason, text = "stop", text[:cut]
    if reason is None and (last or len(tokens) >= s.max_new_tokens):
        reason = "length"
    if reason is None:
        return None, None
    if text is None:
        text = tok.decode(tokens)
    if reason == "stop":
        tokens[:] = tok.encode(text) if text else []
    return reason, text
