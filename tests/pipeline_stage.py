"""One stage of test_pipeline.py's 2-process pipeline (started by torch.multiprocessing.spawn):
kept apart from the test module so that a stage process imports torch and the engine only."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from corpusgen.engine.api import Request, SamplingSettings

from corpusgen.engine.load import IdTokenizer, open_engine
from corpusgen.engine.pipeline import split_layers
from corpusgen.engine.weights import load_config
from corpusgen.planner.policy import Policy

NEW_TOKENS = 8


def generate(engine, prompts, sampling: dict, eos) -> dict[str, list]:
    """{key: [token_ids, finish_reason]} of ``prompts`` (keys "0", "1", …)."""
    engine.block.eos = set(eos)
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    out = {r.key: [r.token_ids, r.finish_reason] for r in engine.generate(
        reqs, SamplingSettings(max_new_tokens=NEW_TOKENS, **sampling))}
    assert len(out) == len(prompts)
    return out


def main(rank: int, world: int, port: int, models: dict, cases: dict, out: str) -> None:
    """Every case through open_engine as stage ``rank``; results to out/rank-N.json."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, (family, pol, sampling, prompts, eos) in cases.items():
        stage = split_layers(load_config(models[family]).num_layers, world)[rank]
        eng = open_engine(models[family], stage=stage, dtype="float32", device="cpu", tokenizer=IdTokenizer(99),
                         offload_dir=f"{out}/off-{rank}", policy=Policy(**pol))
        results[name] = generate(eng, prompts, sampling, eos)
        eng.close()
    torch.distributed.destroy_process_group()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
