"""Teacher-forced perplexity through the engine (benchmarks/compression_accuracy.py) on a tiny model.

The benchmark's accuracy numbers are only as good as its measuring stick: scoring each token in
a logits hook while forcing it must give the perplexity of one plain full-sequence pass, and
compressing the KV cache must move it by a small, nonzero amount.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from corpusgen.engine.load import IdTokenizer, open_engine
from corpusgen.engine.weights import iter_units, load_config
from corpusgen.policy.policy import Compression, Policy

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "compression_accuracy.py"
EOS = 98
PREFIX = 4


def _bench():
    spec = importlib.util.spec_from_file_location("compression_accuracy", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (vocab 99, hidden 16, 2 layers, GQA) with weights large enough that its
    next-token distributions are far from uniform (so perplexity reacts to errors)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    # Different lengths, so rows end at different steps (forced EOS) while others go on.
    seqs = {f"r{i}": torch.randint(2, EOS, (n,), generator=gen).tolist() for i, n in enumerate([40, 31, 36, 24, 40])}
    return str(path), seqs


def _ppl(path: str, seqs, **policy) -> float:
    bench = _bench()
    eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99),
                      policy=Policy(gpu_batch_size=4, **policy))  # 5 rows: two batches
    try:
        return bench.nll_stats(bench.engine_logprobs(eng, seqs, PREFIX, EOS))["ppl"]
    finally:
        eng.close()


def test_teacher_forced_perplexity_equals_full_sequence_pass(tiny):
    """Without compression, the hook's perplexity (KV cache, padding, batching, the block
    schedule) must equal the perplexity of reference_logits over each whole sequence."""
    path, seqs = tiny
    bench = _bench()
    cfg = load_config(path)
    units = dict(iter_units(path, cfg, dtype=torch.float32))
    ref = bench.nll_stats(bench.reference_logprobs(cfg, units, seqs, PREFIX))
    assert ref["tokens"] == sum(len(s) - PREFIX for s in seqs.values())
    # Far from the uniform 99 (random tokens under peaked distributions score worse than uniform),
    # so the logits matter and the next test's 1 % is a real bound.
    assert abs(math.log(ref["ppl"] / 99)) > 0.2, ref
    got = _ppl(path, seqs)
    assert abs(got / ref["ppl"] - 1) < 1e-4, (got, ref["ppl"])


def test_8bit_kv_cache_moves_perplexity_by_less_than_one_percent(tiny):
    """8-bit group-wise KV compression is near-lossless: perplexity within 1 %, but not equal
    (equal would mean the compressed cache was never read)."""
    path, seqs = tiny
    base = _ppl(path, seqs)
    kv8 = _ppl(path, seqs, compress_kv=Compression(bits=8, group_size=4))  # head_dim 4
    assert kv8 != base
    assert abs(kv8 / base - 1) < 0.01, (kv8, base)
    assert math.isfinite(kv8)
