"""Our engine against transformers' batched generate() on the default model, on the CPU.

    python benchmarks/cpu_vs_transformers.py [--dtype float32] [--rows 16] [--max-new-tokens 32] [--batch 16]
                                             [--hf-onednn] [--ours-mkl]

Both systems get the same token ids (sample rows rendered through the chat template), the same
dequantised weights (transformers' ``LlamaForCausalLM`` is filled from our units: it cannot load
the Q4_1 GGUF itself without accelerate), greedy decoding, the same EOS ids and max_new_tokens.
transformers runs left-padded batches of ``--batch`` rows with an attention mask; ours runs the
block schedule with ``gpu_batch_size=--batch``. Throughput counts real generated tokens only
(up to, not including, the first EOS) over the wall time of the generate calls, prefill included.
Each system is timed ``--repeat`` times (interleaved) after a warm-up; medians are printed.
Our engine is run a second time in bf16 (its default on CPUs with AVX512-BF16) unless
``--no-bf16``; its outputs are compared with transformers' at ``--dtype``.

In fp32 our engine's linears go through oneDNN's fp32 matmul (layers.linear, after a numeric
probe). ``--hf-onednn`` adds a transformers row with ``torch.backends.mkldnn.matmul.fp32_precision
= "bf16"`` set around its generate() calls: on CPUs without AMX (and when the same probe passes
for F.linear under the flag) that reaches the same oneDNN fp32 kernel. ``--ours-mkl`` adds a row
of our engine with MKL's matmul (layers.CPU_ONEDNN_FP32 = False), the path other CPUs take.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "You summarise documents in exactly one short sentence."
INSTRUCTION = "Summarise this document in one sentence.\n\nTitle: {title}\n\n{text}"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sample_prompts(tok, rows: int, text_chars: int) -> list[list[int]]:
    """Chat prompts of the first ``rows`` sample documents (text cut to ``text_chars``)."""
    table = pq.read_table(REPO / "jobs" / "sample" / "docs.parquet").slice(0, rows).to_pylist()
    return [tok.chat_prompt(SYSTEM, INSTRUCTION.format(title=r["title"], text=(r["text"] or "")[:text_chars]))
            for r in table]


def hf_llama(cfg, units: dict[str, dict[str, torch.Tensor]], eos_ids):
    """transformers' Llama holding ``units`` (canonical names mapped back through HF_NAMES)."""
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


def cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def run_ours(engine, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], float]:
    from corpusgen.engine.api import Request, SamplingSettings

    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    out = {r.key: r.token_ids for r in engine.generate(reqs, SamplingSettings(max_new_tokens=max_new))}
    seconds = time.perf_counter() - t0
    return [out[str(i)] for i in range(len(prompts))], seconds


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], max_new: int, batch: int, pad_id: int,
           eos: tuple[int, ...]) -> tuple[list[list[int]], float]:
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=list(eos), pad_token_id=pad_id)
        outputs += [cut_at_eos(s.tolist(), set(eos)) for s in seqs[:, width:]]
    return outputs, time.perf_counter() - t0


def with_flag(run):
    """``run`` with fp32 CPU matmuls through oneDNN for F.linear too (the flag is restored)."""
    def flagged(prompts):
        old = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            return run(prompts)
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = old
    return flagged


def with_route(run, onednn: bool):
    """``run`` with our fp32 CPU linears forced through oneDNN or MKL."""
    from corpusgen.engine import layers

    def routed(prompts):
        old = layers.CPU_ONEDNN_FP32
        layers.CPU_ONEDNN_FP32 = onednn
        try:
            return run(prompts)
        finally:
            layers.CPU_ONEDNN_FP32 = old
    return routed


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    return f"{same}/{len(a)} rows identical"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of both systems")
    ap.add_argument("--rows", type=int, default=16, help="sample rows (prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16,
                    help="rows per generate() call (transformers) and per GPU batch (ours)")
    ap.add_argument("--num-gpu-batches", type=int, default=1, help="our GPU batches per block")
    ap.add_argument("--text-chars", type=int, default=300, help="document characters kept per prompt")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per system (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-bf16", action="store_true", help="skip the extra bf16 run of our engine")
    ap.add_argument("--hf-onednn", action="store_true",
                    help="add transformers with torch.backends.mkldnn.matmul.fp32_precision='bf16' (oneDNN)")
    ap.add_argument("--ours-mkl", action="store_true", help="add our engine with MKL's fp32 matmul")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from corpusgen.engine.load import open_engine
    from corpusgen.engine.tokenizer import load_tokenizer
    from corpusgen.engine.weights import iter_units, load_config
    from corpusgen.planner.policy import Policy

    tok, cfg = load_tokenizer("default"), load_config("default")
    eos = tuple(tok.eos_token_ids)
    prompts = sample_prompts(tok, args.rows, args.text_chars)
    lens = sorted(map(len, prompts))
    print(f"{len(prompts)} prompts of {lens[0]}..{lens[-1]} tokens (median {lens[len(lens) // 2]}), "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    policy = Policy(gpu_batch_size=args.batch, num_gpu_batches=args.num_gpu_batches)
    hf = hf_llama(cfg, dict(iter_units("default", cfg, dtype=torch.float32)), eos).to(DTYPES[args.dtype])
    systems = {f"transformers {args.dtype}": lambda p: run_hf(hf, p, args.max_new_tokens, args.batch,
                                                             tok.pad_token_id, eos)}
    fp32 = args.dtype == "float32"
    if args.hf_onednn and fp32:
        from corpusgen.engine.layers import onednn_fp32_probe

        flagged_linear = lambda x, w: with_flag(lambda _: torch.nn.functional.linear(x, w))(None)
        if not onednn_fp32_probe(flagged_linear):
            raise SystemExit("--hf-onednn: with the flag, F.linear is not fp32 on this CPU (the probe failed)")
        systems[f"transformers {args.dtype} +oneDNN"] = with_flag(systems[f"transformers {args.dtype}"])
    engines = [open_engine("default", device="cpu", dtype=args.dtype, tokenizer=tok, policy=policy)]
    if not args.no_bf16 and args.dtype != "bfloat16":
        engines.append(open_engine("default", device="cpu", dtype="bfloat16", tokenizer=tok, policy=policy))
    for eng in engines:
        name = f"corpusgen {str(eng.dtype).removeprefix('torch.')}"
        systems[name] = lambda p, eng=eng: run_ours(eng, p, args.max_new_tokens)
    if args.ours_mkl and fp32:
        systems[f"corpusgen {args.dtype} MKL matmul"] = with_route(systems[f"corpusgen {args.dtype}"], onednn=False)

    for run in systems.values():  # warm-up: first calls pay for oneDNN/kernel selection
        run(prompts[:2])
    outputs: dict[str, list[list[int]]] = {}
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.repeat):
        for name, run in systems.items():
            out, s = run(prompts)
            seconds[name].append(s)
            assert outputs.setdefault(name, out) == out, f"{name}: greedy outputs changed between runs"

    ref_name = f"transformers {args.dtype}"
    ref = outputs[ref_name]
    hf_tps = None
    print(f"{'system':<30} {'gen tokens':>10} {'median s':>9} {'tokens/s':>9} {'vs HF':>6}  outputs vs {ref_name}")
    for name in systems:
        tokens = sum(map(len, outputs[name]))
        med = statistics.median(seconds[name])
        tps = tokens / med
        hf_tps = hf_tps or tps
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        print(f"{name:<30} {tokens:>10} {med:>9.2f} {tps:>9.1f} {tps / hf_tps:>5.2f}x  "
              f"{'-' if name == ref_name else agreement(outputs[name], ref)}  (runs: {runs} s)")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    for eng in engines:
        eng.close()


if __name__ == "__main__":
    main()
