"""Reference forward pass: the whole sequence at once, no cache, every weight resident.

Used by tests to prove that the block schedule (cache, offloading, compression, batching)
computes what the plain model computes, and that the family files match transformers.
"""

from __future__ import annotations

import torch

from corpusgen.engine import layers as L
from corpusgen.engine.config import ModelConfig
from corpusgen.engine.placement import family_of


@torch.no_grad()
def reference_logits(cfg: ModelConfig, units: dict[str, dict[str, torch.Tensor]], ids: torch.Tensor,
                     pad: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (batch, seq, vocab) fp32 for left-padded ``ids`` (batch, seq)."""
    fam = family_of(cfg)
    b, s = ids.shape
    pad = torch.zeros(b, dtype=torch.long, device=ids.device) if pad is None else pad
    positions = L.positions_from_pad(pad, 0, s)
    h = fam.embed(cfg, units["embed"], ids, positions)
    mask = L.attention_mask(pad, 0, s, s)
    for i in range(cfg.num_layers):
        w = units[f"layer.{i}"]
        q, k, v = fam.pre_attention(cfg, w, h, positions)
        h = fam.post_attention(cfg, w, h, L.attend(q, k, v, mask, cfg.head_dim ** -0.5))
    return fam.head(cfg, units["head"], h.reshape(b * s, -1)).view(b, s, -1)
