"""Pipeline parallelism (DESIGN §7): the layers split across two processes (stages), hidden states
and tokens sent between them with torch.distributed (gloo, CPU), must generate exactly what one
process generates, token for token — with several GPU batches per sub-block, offloaded and
compressed placements inside a stage, sampling, and rows that end early and are refilled.

Tiny random models in fp32 (transformers' testers' sizes, 3–4 layers so a split has work on both
sides). Two processes are started once (torch.multiprocessing, spawn) and run every case.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zlib

import pytest
import torch

import pipeline_stage
from conftest import REPO
from corpusgen.engine.config import preset
from corpusgen.engine.load import IdTokenizer, open_engine
from corpusgen.engine.pipeline import split_layers, stage_memory
from corpusgen.errors import PolicyError
from corpusgen.planner.memory import memory_per_tier
from corpusgen.planner.policy import Compression, Placement, Policy

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [3], [40, 41, 42], [7, 7, 7, 7], [20, 21, 22]]
MANY = [[(7 * i + 3 * j) % 90 + 5 for j in range(2 + i % 5)] for i in range(23)]
OFFLOADED = dict(weights=Placement(gpu=0.0, cpu=0.5), kv_cache=Placement(gpu=0.0, cpu=1.0),
                 activations=Placement(gpu=0.0, cpu=1.0))
# name: (model, policy, sampling, prompts); "eos" in the name: rows end early at a chosen token
CASES = {
    "opt-resident-2x2": ("opt", dict(gpu_batch_size=2, num_gpu_batches=2), {}, PROMPTS),
    "opt-offloaded-cpu-attention": ("opt", dict(gpu_batch_size=2, num_gpu_batches=2, cpu_attention=True,
                                                **OFFLOADED), {}, PROMPTS),
    "opt-4bit-kv-on-cpu": ("opt", dict(gpu_batch_size=3, num_gpu_batches=1, kv_cache=Placement(gpu=0.0, cpu=1.0),
                                       compress_weights=Compression(bits=4, group_size=8),
                                       compress_kv=Compression(bits=4, group_size=4)), {}, PROMPTS),
    "llama-1x3-sampled": ("llama", dict(gpu_batch_size=1, num_gpu_batches=3),
                          dict(temperature=0.8, top_p=0.9, top_k=20, seed=3), PROMPTS),
    "llama-offloaded-3x2": ("llama", dict(gpu_batch_size=3, num_gpu_batches=2, **OFFLOADED,
                                          overlap=False), {}, PROMPTS),
    "llama-eos-refill": ("llama", dict(gpu_batch_size=2, num_gpu_batches=2), {}, MANY),
    "llama-eos-fixed-blocks": ("llama", dict(gpu_batch_size=2, num_gpu_batches=2, refill=False,
                                             kv_cache=Placement(gpu=0.5, cpu=0.5)), {}, MANY),
}


def _hf(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM  # not in the stage processes

    common = dict(vocab_size=99, hidden_size=16, num_attention_heads=4, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=98, pad_token_id=0)
    if family == "opt":  # 4 layers: two per stage
        return OPTForCausalLM(OPTConfig(**common, num_hidden_layers=4, ffn_dim=32))
    # 3 layers, grouped-query attention: an uneven split (1 + 2)
    return LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=3, intermediate_size=32, num_key_value_heads=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in ("opt", "llama"):
        torch.manual_seed(zlib.crc32(family.encode()))
        hf = _hf(family).eval()
        with torch.no_grad():  # random biases: HF initialises them to zero, which would hide bias bugs
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        paths[family] = str(path)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(models, family, pol, prompts, sampling, eos, tmp_path) -> dict[str, list]:
    eng = open_engine(models[family], dtype="float32", device="cpu", tokenizer=IdTokenizer(99),
                      offload_dir=str(tmp_path / "off-single"), policy=Policy(**pol))
    try:
        return pipeline_stage.generate(eng, prompts, sampling, eos)
    finally:
        eng.close()


def _early_token(models, family, prompts, tmp_path) -> int:
    """A token that ends many rows early (not their first), so slots free up mid-block."""
    first = _single(models, family, {"gpu_batch_size": 8}, prompts, {}, set(), tmp_path)
    starts = {toks[0] for toks, _ in first.values()}
    counts: dict[int, int] = {}
    for toks, _ in first.values():
        for t in toks[1:6]:
            if t not in starts:
                counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


def test_two_stages_equal_one_process(models, tmp_path):
    """Every case, run as a 2-stage pipeline, yields exactly the single-process results (tokens
    and finish reasons) on both stages."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # three processes on a small CI machine
    try:
        _compare(models, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare(models, tmp_path) -> None:
    cases = {}
    for name, (family, pol, sampling, prompts) in CASES.items():
        eos = {_early_token(models, family, prompts, tmp_path)} if "eos" in name else set()
        cases[name] = (family, pol, sampling, prompts, sorted(eos))
    stages = torch.multiprocessing.spawn(pipeline_stage.main, args=(2, _free_port(), models, cases, str(tmp_path)),
                                         nprocs=2, join=False)
    want = {}
    for name, (family, pol, sampling, prompts, eos) in cases.items():  # while the stages run
        want[name] = _single(models, family, pol, prompts, sampling, set(eos), tmp_path)
        if "eos" in name:
            assert {f for _, f in want[name].values()} == {"eos", "length"}, "the case must end rows early"
    while not stages.join():
        pass
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        for name in CASES:
            assert got[name] == want[name], (rank, name)


def test_one_stage_is_the_plain_engine(models, tmp_path):
    """A pipeline of one stage (no process group: nothing is sent) runs the turn loop alone and
    equals the plain engine, with rows ending early and refill."""
    from corpusgen.engine.load import open_engine

    prompts, pol = MANY, {"gpu_batch_size": 2, "num_gpu_batches": 2, "activations": Placement(gpu=0.0, cpu=1.0)}
    eos = {_early_token(models, "llama", prompts, tmp_path)}
    eng = open_engine(models["llama"], stage=split_layers(3, 1)[0], dtype="float32", device="cpu",
                     tokenizer=IdTokenizer(99), policy=Policy(**pol))
    assert pipeline_stage.generate(eng, prompts, {}, eos) == _single(models, "llama", pol, prompts, {}, eos, tmp_path)


def test_split_and_stage_memory():
    """Layers split contiguously and evenly; a stage's memory counts its own layers, the embedding
    or head only where they are, and the KV of every sub-block in flight."""
    stages = split_layers(48, 2)
    assert [(s.first_layer, s.num_layers, s.first, s.last) for s in stages] == [
        (0, 24, True, False), (24, 24, False, True)]
    assert [s.num_layers for s in split_layers(3, 2)] == [1, 2]
    assert stages[0].units()[:2] == ["embed", "layer.0"] and stages[1].units()[-2:] == ["layer.47", "head"]
    cfg = preset("opt-30b")
    pol = Policy(gpu_batch_size=16, num_gpu_batches=5, weights=Placement(gpu=0.25, cpu=0.75),
                 kv_cache=Placement(gpu=0.0, cpu=1.0), activations=Placement(gpu=0.0, cpu=1.0))
    whole = memory_per_tier(cfg, pol, 512, 32)
    parts = [stage_memory(cfg, s, pol, 512, 32) for s in stages]
    assert sum(p.terms["cpu.layer_weights"] for p in parts) == whole.terms["cpu.layer_weights"]
    assert sum(p.terms["cpu.kv_cache"] for p in parts) == 2 * whole.terms["cpu.kv_cache"]  # 2 sub-blocks
    assert "gpu.stage_input" not in parts[0].terms and "gpu.stage_output" not in parts[1].terms
    # the tied LM head is a copy of the embedding on the last stage
    assert parts[0].terms["gpu.embed_head"] + parts[1].terms["gpu.embed_head"] > whole.terms["gpu.embed_head"]
    with pytest.raises(PolicyError, match="needs at least 3 decoder layers"):
        split_layers(2, 3)


def test_bench_cli_pipeline_and_data_parallel(tmp_path):
    """`torchrun --nproc-per-node 2 -m corpusgen bench` runs the workload as a 2-stage pipeline
    (--pipeline-stages 2) and as 2 data-parallel ranks, and rank 0 records the aggregate."""
    policy = tmp_path / "p.yaml"
    policy.write_text("gpu_batch_size: 2\nnum_gpu_batches: 2\nweights: {gpu: 0.5, cpu: 0.5}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    results = tmp_path / "r.jsonl"
    for stages in ("2", "1"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "corpusgen", "bench", "--model", "opt-125m",
               "--prompt-len", "8", "--gen-len", "3", "--device", "cpu", "--dtype", "float32", "--policy",
               str(policy), "--pipeline-stages", stages, "--results", str(results), "--label", f"pp{stages}"]
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["label"], r["mode"], r["world"], r["num_seqs"]) for r in recs] == [
        ("pp2", "pipeline", 2, 8), ("pp1", "data-parallel", 2, 8)]
    for r in recs:
        assert len(r["ranks"]) == 2 and r["total_tps"] > 0 and r["wall_tps"] > 0
