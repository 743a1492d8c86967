"""Model configuration: one frozen dataclass for both families, built from an HF ``config.json``,
from GGUF metadata, or from a named preset (shapes only, no download).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from corpusgen.errors import ModelError

FAMILIES = ("opt", "llama")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style frequency scaling of RoPE (``rope_type: llama3``)."""

    factor: float
    """Overall stretch of the context."""
    low_freq_factor: float
    """Wavelengths longer than original_max / low_freq_factor are divided by ``factor``."""
    high_freq_factor: float
    """Wavelengths shorter than original_max / high_freq_factor are kept."""
    original_max_position_embeddings: int
    """Context length the model was pre-trained with."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer of the OPT or Llama family."""

    name: str
    """Human-readable name (preset name, checkpoint directory or GGUF file stem)."""
    family: str
    """``opt`` or ``llama`` (Llama, Mistral, Qwen2 and SmolLM load as ``llama``)."""
    vocab_size: int
    """Rows of the token embedding and the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when smaller than ``num_heads``)."""
    head_dim: int
    """Width of one attention head."""
    ffn_dim: int
    """Inner width of the MLP."""
    max_positions: int
    """Longest sequence (prompt + generated) the model supports."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm (OPT) or RMSNorm (Llama)."""
    tie_word_embeddings: bool = True
    """The LM head reuses the token embedding matrix."""
    # --- OPT only -------------------------------------------------------------------
    word_embed_proj_dim: int | None = None
    """OPT-350m: embeddings live in this smaller width and are projected in and out."""
    do_layer_norm_before: bool = True
    """OPT: pre-LayerNorm (every size but 350m, which is post-LayerNorm)."""
    # --- Llama only -----------------------------------------------------------------
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = None
    """Llama-3 frequency scaling, or None."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    # --- tokens ---------------------------------------------------------------------
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a row (Llama-3 instruct models have several)."""
    pad_token_id: int | None = None
    """Token used to fill padded slots (never attended to)."""

    def __post_init__(self) -> None:
        assert self.family in FAMILIES, self.family
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (differs from hidden_size only for OPT-350m)."""
        return self.word_embed_proj_dim or self.hidden_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _opt(name: str, hidden: int, layers: int, heads: int, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name=name, family="opt", vocab_size=50272, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, ffn_dim=4 * hidden,
        max_positions=2048, bos_token_id=2, eos_token_ids=(2,), pad_token_id=1, **kw,
    )


def _llama(name: str, hidden: int, layers: int, heads: int, kv: int, ffn: int, **kw: Any) -> ModelConfig:
    base = dict(vocab_size=32000, max_positions=4096, bos_token_id=1, eos_token_ids=(2,),
                tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(name=name, family="llama", hidden_size=hidden, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, ffn_dim=ffn, **base)


_LLAMA3 = dict(vocab_size=128256, max_positions=8192, rope_theta=500000.0, bos_token_id=128000,
               eos_token_ids=(128001, 128009))

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _opt("opt-125m", 768, 12, 12),
        _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
        _opt("opt-1.3b", 2048, 24, 32),
        _opt("opt-6.7b", 4096, 32, 32),
        _opt("opt-13b", 5120, 40, 40),
        _opt("opt-30b", 7168, 48, 56),
        _opt("opt-66b", 9216, 64, 72),
        _opt("opt-175b", 12288, 96, 96),
        _llama("llama-2-7b", 4096, 32, 32, 32, 11008),
        _llama("llama-2-13b", 5120, 40, 40, 40, 13824),
        _llama("llama-2-70b", 8192, 80, 64, 8, 28672),
        _llama("llama-3-8b", 4096, 32, 32, 8, 14336, **_LLAMA3),
        _llama("llama-3-70b", 8192, 80, 64, 8, 28672, **_LLAMA3),
        _llama("smollm2-135m", 576, 30, 9, 3, 1536, vocab_size=49152, max_positions=8192,
               rope_theta=100000.0, tie_word_embeddings=True, eos_token_ids=(2,), pad_token_id=2),
    ]
}


def preset(name: str) -> ModelConfig:
    """The preset called ``name`` (case-insensitive; ``facebook/`` and ``meta-llama/`` prefixes ok)."""
    key = name.lower().split("/")[-1].removeprefix("meta-").replace("llama2", "llama-2")
    key = key.removesuffix("-instruct").removesuffix("-hf")
    if key not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}")
    return PRESETS[key]


_LLAMA_LIKE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def from_hf_config(cfg: Mapping[str, Any], name: str = "", *, source: str = "") -> ModelConfig:
    """Build a config from the dict of an HF ``config.json`` (``source``: its path, named in errors)."""
    name = name or cfg.get("_name_or_path", cfg.get("model_type", ""))
    try:
        return _from_hf_config(cfg, name, source or name)
    except KeyError as e:
        raise ModelError(f"{source or name}: config.json lacks the key {e}; the file is incomplete") from None


def _from_hf_config(cfg: Mapping[str, Any], name: str, where: str) -> ModelConfig:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    if model_type == "opt" or "OPTForCausalLM" in archs:
        if cfg.get("activation_function", "relu") != "relu":  # e.g. Galactica (gelu)
            act = cfg["activation_function"]
            raise ModelError(f"{where}: OPT activation {act!r} is not supported (only relu)")
        hidden = cfg["hidden_size"]
        proj = cfg.get("word_embed_proj_dim", hidden)
        return ModelConfig(
            name=name, family="opt", vocab_size=cfg["vocab_size"], hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_attention_heads"], head_dim=hidden // cfg["num_attention_heads"],
            ffn_dim=cfg["ffn_dim"], max_positions=cfg["max_position_embeddings"],
            norm_eps=1e-5, tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            word_embed_proj_dim=proj if proj != hidden else None,
            do_layer_norm_before=cfg.get("do_layer_norm_before", True),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
        )
    if model_type in ("llama", "mistral", "qwen2") or _LLAMA_LIKE & set(archs):
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise ModelError(f"{where}: mlp_bias is not supported (Llama-family MLPs without bias only)")
        heads = cfg["num_attention_heads"]
        rs = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
        rope_type = rs.get("rope_type", rs.get("type")) if rs else None
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif rope_type not in (None, "default"):
            raise ModelError(f"{where}: rope scaling {rope_type!r} is not supported (default or llama3)")
        theta = cfg.get("rope_theta", rs.get("rope_theta", 10000.0) if rs else 10000.0)
        return ModelConfig(
            name=name, family="llama", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            ffn_dim=cfg["intermediate_size"], max_positions=cfg.get("max_position_embeddings", 4096),
            norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope_theta=float(theta), rope_scaling=scaling,
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
        )
    raise ModelError(
        f"{where}: architecture {archs or model_type!r} is not supported; "
        "supported: OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    )


def from_hf_dir(path: Path) -> ModelConfig:
    """Read ``path/config.json``."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json; a model is a preset name, an HF checkpoint directory or a .gguf file")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_file}: cannot be parsed as JSON ({e})") from None
    return from_hf_config(cfg, name=Path(path).name, source=str(cfg_file))


def from_gguf_metadata(meta: Mapping[str, Any], name: str = "", *, source: str = "") -> ModelConfig:
    """Build a config from GGUF key/values (``general.architecture`` = llama, qwen2, …).

    ``meta["_tied"]`` says whether the LM head is tied (the file has no ``output.weight``);
    ``source`` (the file's path) is named in errors.
    """
    try:
        return _from_gguf_metadata(meta, name, source or name)
    except KeyError as e:
        raise ModelError(f"{source or name}: GGUF metadata lacks the key {e}; the file is incomplete") from None


def _from_gguf_metadata(meta: Mapping[str, Any], name: str, where: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ModelError(f"{where}: GGUF architecture {arch!r} is not supported (llama, mistral, qwen2)")
    p = f"{arch}."
    heads = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    vocab = meta.get(p + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    # Chat GGUFs (Llama-3) name their end-of-turn token separately; it ends a row like EOS.
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    eos = list(dict.fromkeys(int(t) for t in eos))
    return ModelConfig(
        name=name or str(meta.get("general.name", arch)), family="llama", vocab_size=int(vocab),
        hidden_size=hidden, num_layers=int(meta[p + "block_count"]), num_heads=heads,
        num_kv_heads=int(meta.get(p + "attention.head_count_kv", heads)),
        head_dim=int(meta.get(p + "attention.key_length", hidden // heads)),
        ffn_dim=int(meta[p + "feed_forward_length"]), max_positions=int(meta.get(p + "context_length", 4096)),
        norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=bool(meta.get("_tied", True)),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        attention_bias=arch == "qwen2",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_tuple(eos), pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )

