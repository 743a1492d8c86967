"""Engine core: our families equal transformers, and the block schedule equals the plain model.

Tiny random models (vocab 99, hidden 16, 2 layers) in fp32 on the CPU, as transformers' own
model testers do; every test here is fast.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                          OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from corpusgen.engine.api import Request, SamplingSettings
from corpusgen.engine.load import IdTokenizer, open_engine
from corpusgen.engine.models.reference import reference_logits
from corpusgen.engine.weights import iter_units, load_config
from corpusgen.errors import BudgetError, OffloadIOError
from corpusgen.planner.policy import Compression, Placement, Policy

COMMON = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=98, pad_token_id=0)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=32, num_key_value_heads=2)),
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=32, num_key_value_heads=2,
                                                        tie_word_embeddings=True, rope_scaling={
                                                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, intermediate_size=32, num_key_value_heads=1)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, intermediate_size=32, num_key_value_heads=2)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                            num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=98)),
    "opt-350m-like": lambda: OPTForCausalLM(OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                                      num_attention_heads=4, max_position_embeddings=64,
                                                      word_embed_proj_dim=8, do_layer_norm_before=False,
                                                      pad_token_id=0, bos_token_id=1, eos_token_id=98)),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [3], [40, 41, 42], [7, 7, 7, 7]]


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory):
    torch.manual_seed(zlib.crc32(request.param.encode()))  # stable across processes, unlike hash()
    hf = MODELS[request.param]().eval()
    with torch.no_grad():  # random biases (HF initialises them to zero, which would hide bias bugs)
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path)


def _engine(path, **policy):
    eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), policy=Policy(**policy))
    eng.block.eos = set()  # compared with generate(eos_token_id=None): every row runs to max_new_tokens
    return eng


def _generate(engine, prompts=PROMPTS, n=8, **sampling):
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    out = {r.key: r for r in engine.generate(reqs, SamplingSettings(max_new_tokens=n, **sampling))}
    return [out[str(i)].token_ids for i in range(len(prompts))]


def _hf_greedy(hf, prompts=PROMPTS, n=8):
    outs = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(ids[0, len(p):].tolist())
    return outs


def test_logits_equal_transformers(tiny):
    """Our layer code must compute transformers' logits on the same weights (≤ 1e-4 in fp32)."""
    name, hf, path = tiny
    cfg = load_config(path)
    units = dict(iter_units(path, cfg, dtype=torch.float32))
    ids = torch.randint(2, 98, (3, 9))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (reference_logits(cfg, units, ids) - ref).abs().max().item() <= 1e-4


def test_padded_logits_equal_transformers(tiny):
    """Left padding must not change a row's logits (transformers with an attention mask agrees)."""
    name, hf, path = tiny
    cfg = load_config(path)
    units = dict(iter_units(path, cfg, dtype=torch.float32))
    ids = torch.randint(2, 98, (2, 6))
    ids[1, :2] = 0
    pad = torch.tensor([0, 2])
    mask = (torch.arange(6)[None] >= pad[:, None]).long()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    ours = reference_logits(cfg, units, ids, pad)
    assert (ours[1, 2:] - ref[1, 2:]).abs().max().item() <= 1e-4
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-4


def test_greedy_equals_transformers_generate(tiny):
    """Batched greedy decoding through the block schedule equals HF generate(), token for token."""
    name, hf, path = tiny
    assert _generate(_engine(path, gpu_batch_size=4)) == _hf_greedy(hf)


def test_prompt_step_runs_the_last_layer_for_the_last_column_only(tiny, monkeypatch):
    """The head reads the last column, so the prompt step's last layer computes its output
    projection and MLP for that column alone (its K/V for every column), and the outputs stay
    transformers' (test_greedy_equals_transformers_generate covers the same path)."""
    name, hf, path = tiny
    eng = _engine(path, gpu_batch_size=6)
    fam, seen = eng.block.fam, []
    real = fam.post_attention

    def spy(cfg, w, h, attn, **kw):
        seen.append(tuple(h.shape[:2]))
        return real(cfg, w, h, attn, **kw)

    monkeypatch.setattr(fam, "post_attention", spy)
    assert _generate(eng, n=3) == _hf_greedy(hf, n=3)
    width = max(len(p) for p in PROMPTS)
    assert seen[:2] == [(6, width), (6, 1)]  # the prompt step: layer 0 whole, the last layer one column
    assert seen[2:] == [(6, 1)] * 4  # two decode steps of two layers


def test_batched_equals_one_at_a_time(tiny):
    """Padding and batching must not change any row's output."""
    name, hf, path = tiny
    batched = _generate(_engine(path, gpu_batch_size=6))
    single = _generate(_engine(path, gpu_batch_size=1))
    assert batched == single


def test_cache_equals_recomputation(tiny):
    """Decoding with the KV cache equals re-running the whole sequence at every step."""
    name, hf, path = tiny
    cfg = load_config(path)
    units = dict(iter_units(path, cfg, dtype=torch.float32))
    got = _generate(_engine(path, gpu_batch_size=3), n=6)
    for p, toks in zip(PROMPTS, got):
        seq = list(p)
        for _ in range(6):
            seq.append(int(reference_logits(cfg, units, torch.tensor([seq]))[0, -1].argmax()))
        assert toks == seq[len(p):]


PLACEMENTS = [
    dict(weights=Placement(gpu=0.0, cpu=1.0)),
    dict(weights=Placement(gpu=0.0, cpu=0.0)),  # all on disk
    dict(weights=Placement(gpu=0.5, cpu=0.0)),  # mixed gpu/disk
    dict(kv_cache=Placement(gpu=0.0, cpu=1.0)),
    dict(kv_cache=Placement(gpu=0.0, cpu=1.0), cpu_attention=True),
    dict(kv_cache=Placement(gpu=0.5, cpu=0.5), cpu_attention=True),
    dict(activations=Placement(gpu=0.0, cpu=1.0)),
    dict(weights=Placement(gpu=0.0, cpu=0.5), kv_cache=Placement(gpu=0.0, cpu=1.0),
         activations=Placement(gpu=0.0, cpu=1.0), cpu_attention=True),
]


@pytest.mark.parametrize("tiny", ["llama", "opt"], indirect=True)
@pytest.mark.parametrize("placement", range(len(PLACEMENTS)))
@pytest.mark.parametrize("overlap", [True, False])
def test_offloaded_equals_resident(tiny, placement, overlap, tmp_path):
    """Every placement of weights, KV cache and activations, with and without overlap and CPU
    attention, over 1 to 4 GPU batches, generates exactly what the all-resident engine does."""
    name, hf, path = tiny
    resident = _generate(_engine(path, gpu_batch_size=6))
    for nb in (1, 2, 3, 4):
        gbs = -(-len(PROMPTS) // nb)
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(gpu_batch_size=gbs, num_gpu_batches=nb, overlap=overlap, **PLACEMENTS[placement]))
        assert _generate(eng) == resident, (nb, PLACEMENTS[placement])
        eng.close()


@pytest.mark.parametrize("tiny", ["llama", "opt"], indirect=True)
@pytest.mark.parametrize("rotate", [True, False])
def test_compressed_runs_every_placement(tiny, rotate, tmp_path):
    """4-bit weights and KV (K/V rotated before quantisation, or not) run through every placement
    and agree with each other exactly (the same quantised numbers, wherever they are stored)."""
    name, hf, path = tiny
    comp = dict(compress_weights=Compression(bits=4, group_size=8),
                compress_kv=Compression(bits=4, group_size=4, rotate=rotate))
    base = _generate(_engine(path, gpu_batch_size=6, **comp))
    for pl in PLACEMENTS:
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(gpu_batch_size=2, num_gpu_batches=3, **comp, **pl))
        assert _generate(eng) == base, pl
        eng.close()


class _Forced:
    """Logits hook: records every row's logits, then forces its next target token."""

    def __init__(self, targets: dict[str, list[int]]):
        self.targets, self.logits = targets, {k: [] for k in targets}

    def mask(self, keys, logits):
        forced = []
        for i, k in enumerate(keys):
            self.logits[k].append(logits[i].clone())
            forced.append(self.targets[k][min(len(self.logits[k]), len(self.targets[k])) - 1])
        return torch.full_like(logits, float("-inf")).scatter_(1, torch.tensor(forced)[:, None], 0.0)

    def advance(self, keys, next_ids):
        pass


@pytest.mark.parametrize("tiny", ["llama", "opt"], indirect=True)
@pytest.mark.parametrize("placement", [None, *range(len(PLACEMENTS))])
def test_rotated_kv_cache_attends_like_the_plain_one(tiny, placement, tmp_path):
    """A compressed KV cache stores K and V rotated (compression.kv_rotation), with q rotated alike
    and the attention output rotated back. With 8-bit codes, teacher-forced logits must stay as
    close to the uncompressed model's with the rotation as without it, in every placement and
    with a shared prefix (copied as stored): a path that missed a rotation or its undo would be
    far off."""
    name, hf, path = tiny
    pl = {} if placement is None else PLACEMENTS[placement]
    keys = [str(i) for i in range(len(PREFIXED))]
    targets = dict(zip(keys, _generate(_engine(path, gpu_batch_size=7), PREFIXED, n=6)))
    reqs = [Request(key=k, prompt_ids=p) for k, p in zip(keys, PREFIXED)]

    def logits(**policy):
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(**policy))
        eng.block.eos = set()
        hook = _Forced(targets)
        out = {r.key: r.token_ids for r in eng.generate(reqs, SamplingSettings(max_new_tokens=6), logits_hook=hook)}
        assert out == targets
        rotated = eng.block.kv_rot is not None
        assert eng.stats.prefix_tokens == len(PREFIX)
        eng.close()
        return torch.stack([torch.stack(hook.logits[k]) for k in keys]), rotated  # (rows, steps, vocab)

    ref, _ = logits(gpu_batch_size=7)
    err = {}
    for rotate in (True, False):
        got, rotated = logits(gpu_batch_size=3, num_gpu_batches=2, compress_kv=Compression(bits=8, group_size=4,
                                                                                            rotate=rotate), **pl)
        assert rotated == rotate
        err[rotate] = (got - ref).abs().max().item()
    assert err[False] < 1e-3 and err[True] <= 2 * err[False] + 1e-4, err  # a missed undo: ≥ 0.01


def test_sampling_is_per_row_deterministic(tiny):
    """Sampled rows draw the same tokens whatever block they land in (seeded per row key)."""
    name, hf, path = tiny
    a = _generate(_engine(path, gpu_batch_size=6), temperature=0.8, top_p=0.9, top_k=20, seed=3)
    b = _generate(_engine(path, gpu_batch_size=1), temperature=0.8, top_p=0.9, top_k=20, seed=3)
    c = _generate(_engine(path, gpu_batch_size=6), temperature=0.8, top_p=0.9, top_k=20, seed=4)
    assert a == b and a != c


def test_eos_and_stop_and_length(tiny):
    """Each row stops for its own reason, reported per row."""
    name, hf, path = tiny
    eng = _engine(path, gpu_batch_size=6)
    first = _generate(eng, n=8)
    eng.block.eos = {first[0][2]}  # make row 0's third token an EOS
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(PROMPTS)]
    stop = " ".join(map(str, first[1][1:3]))
    out = {r.key: r for r in eng.generate(reqs, SamplingSettings(max_new_tokens=8, stop=(stop,)))}
    cut = first[0].index(first[0][2])  # the EOS token may already occur earlier in the row
    assert out["0"].finish_reason == "eos" and out["0"].token_ids == first[0][:cut]
    if first[0][2] not in first[1][:3]:
        text = " ".join(map(str, first[1]))
        assert out["1"].finish_reason == "stop" and out["1"].text == text[:text.find(stop)]
    assert {r.finish_reason for r in out.values()} <= {"eos", "stop", "length"}


def test_stop_screen_agrees_with_the_whole_text():
    """The per-step stop screen (a decoded tail) fires at the first step whose whole text holds a
    stop string, never earlier and never later: random rows over tokens of 0-3 characters."""
    import random

    from corpusgen.engine.sampling import find_stop, stop_in_tail

    vocab = ["a", "b", "\n", "\n\n", "ab", "é", "x\n", "", "\nb", "ba"]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    rng = random.Random(0)
    fired = 0
    for _ in range(400):
        stops = rng.choice([("\n\n",), ("ab\nb", "é\n"), ("aaa",)])
        toks: list[int] = []
        for _ in range(40):
            toks.append(rng.randrange(len(vocab)))
            whole = find_stop(decode(toks), stops) is not None
            assert stop_in_tail(decode, toks, stops) == whole, (stops, toks)
            if whole:
                fired += 1
                break
    assert fired > 100


def test_disk_read_failure_raises_promptly(tmp_path):
    """A failing disk read in the offloading tier surfaces as an error within a second, never a hang."""
    torch.manual_seed(0)
    hf = MODELS["llama"]().eval()
    hf.save_pretrained(tmp_path / "m")
    eng = open_engine(str(tmp_path / "m"), dtype="float32", device="cpu", tokenizer=IdTokenizer(99),
                      offload_dir=str(tmp_path / "off"), policy=Policy(weights=Placement(gpu=0.0, cpu=0.0)))
    for f in (tmp_path / "off" / "weights").glob("layer.1.bin"):
        f.write_bytes(b"\0" * 10)  # truncate: the next read of layer 1 fails
    import time

    t0 = time.perf_counter()
    with pytest.raises(OffloadIOError, match="truncated"):
        _generate(eng)
    assert time.perf_counter() - t0 < 1.0


def test_infeasible_budget_is_refused_before_allocation(tmp_path):
    """A policy that cannot fit the GPU budget is refused with the numbers, before loading."""
    with pytest.raises(BudgetError, match="GPU budget short by"):
        open_engine("opt-175b", dummy=True, device="cpu", gpu_memory=16 * 2**30, cpu_memory=100 * 2**30,
                    policy=Policy(gpu_batch_size=8))


def test_host_arena_counts_live_bytes_only():
    """The pinned arena counts what is alive: a freed KV buffer gives its bytes back (a long
    refilling job admits thousands of batches under one cpu_memory budget), and the budget is
    still a hard limit for what is alive."""
    import gc

    from corpusgen.engine.tiers import HostArena

    arena = HostArena(budget=4096)
    t = arena.empty((16, 32), torch.float32)  # 2048 bytes, exactly (no power-of-two rounding)
    assert arena.used == 2048 and t.shape == (16, 32) and t.dtype == torch.float32
    t.fill_(1.5)
    view = t[:2]
    with pytest.raises(BudgetError, match="cpu_memory budget"):
        arena.empty((3000,), torch.uint8)
    del t
    gc.collect()
    assert arena.used == 0 and view.sum().item() == 1.5 * 64  # a surviving view stays readable (uninitialised memory could hold NaN: filled first)
    for _ in range(10):  # far more than the budget in total, never more at once
        arena.empty((1024,), torch.float32)
    assert arena.used == 0 and arena.peak == 4096


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_refilling_job_with_host_kv_stays_within_budget(tiny, tmp_path):
    """Many waves of admitted and finished batches, KV on the host tier: the arena's live bytes
    return to the weights alone after the job (nothing leaks per batch)."""
    name, hf, path = tiny
    eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                      policy=Policy(gpu_batch_size=2, num_gpu_batches=2, kv_cache=Placement(gpu=0.0, cpu=1.0)))
    eng.block.eos = set()
    import gc

    before = eng.arena.used
    _generate(eng, [[5 + i % 7, 6, 7 + i % 3] for i in range(40)], n=3)
    gc.collect()
    assert eng.arena.used == before and eng.arena.peak > before
    eng.close()


def test_chunked_weight_quantisation_equals_whole():
    """Quantising a weight in row chunks (to bound GPU temporaries) gives the same packed bytes."""
    from corpusgen.engine import compression as cq
    from corpusgen.engine.placement import _quantize_rows

    t = torch.randn(300, 130)
    a, b = _quantize_rows(t, 4, 64, chunk=130 * 7), cq.quantize(t, 4, 64, axis=-1)
    assert all(torch.equal(x, y) for x, y in zip(a.buffers, b.buffers)) and a.shape == b.shape


@pytest.mark.parametrize("tiny", ["llama", "qwen2"], indirect=True)
def test_refill_and_early_exit_do_not_change_outputs(tiny, tmp_path):
    """Rows ending early (EOS) are compacted out, partly finished batches are merged (realigned
    at the later column) and waiting rows join mid-block as new GPU batches; every row's greedy
    output must equal the fixed-block (FlexGen-style) run's, on resident and offloaded placements."""
    name, hf, path = tiny
    prompts = [[(7 * i + 3 * j) % 90 + 5 for j in range(2 + i % 5)] for i in range(23)]

    def run(**pol):
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(**pol))
        eng.block.eos = set()
        first = _generate(eng, prompts, n=10) if not hasattr(run, "eos") else None
        if first is not None:  # pick a token that ends many rows early, so slots free up
            counts, starts = {}, {toks[0] for toks in first}
            for toks in first:
                for t in toks[1:6]:
                    if t not in starts:
                        counts[t] = counts.get(t, 0) + 1
            run.eos = max(counts, key=counts.get)
        eng.block.eos = {run.eos}
        eng.stats.prompt_tokens = 0
        reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
        out = {r.key: (r.token_ids, r.finish_reason) for r in eng.generate(reqs, SamplingSettings(max_new_tokens=10))}
        run.merges = getattr(run, "merges", 0) + eng.stats.batch_merges
        eng.close()
        return [out[str(i)] for i in range(len(prompts))]

    base = run(gpu_batch_size=4, num_gpu_batches=2, refill=False)
    assert "eos" in {f for _, f in base} and len({len(t) for t, _ in base}) > 1, "the test needs rows that end early"
    for pol in (dict(gpu_batch_size=4, num_gpu_batches=2), dict(gpu_batch_size=3, num_gpu_batches=1),
                dict(gpu_batch_size=5, num_gpu_batches=3, weights=Placement(gpu=0.0, cpu=0.5),
                     kv_cache=Placement(gpu=0.5, cpu=0.5), cpu_attention=True),
                dict(gpu_batch_size=4, num_gpu_batches=2, kv_cache=Placement(gpu=0.0, cpu=1.0)),
                dict(gpu_batch_size=4, num_gpu_batches=2, compress_kv=Compression(bits=8, group_size=4))):
        got = run(refill=True, **pol)
        if "compress_kv" in pol:  # compare compressed with compressed
            ref = run(refill=False, **pol)
            assert got == ref, pol
        else:
            assert got == base, pol
    assert run.merges > 0, "no partly finished batches were merged: the test lost its teeth"


PREFIX = [21, 22, 23, 24, 25, 26]
PREFIXED = [PREFIX + s for s in ([5, 6, 7], [10], [12, 13, 14, 15, 16], [3, 4], [40, 41, 42, 43, 44, 45, 46], [7])]


@pytest.mark.parametrize("tiny", ["llama", "opt"], indirect=True)
@pytest.mark.parametrize("placement", [None, *range(len(PLACEMENTS)), "compressed"])
def test_shared_prefix_is_computed_once_and_changes_nothing(tiny, placement, tmp_path):
    """Prompts sharing a prefix: its K/V is computed once (counted) and copied into every batch,
    in every placement and compressed; greedy outputs equal the run without it (and, resident,
    transformers'). A row without the prefix still runs whole, beside prefixed batches."""
    name, hf, path = tiny
    pol = {} if placement is None else dict(compress_kv=Compression(bits=4, group_size=4)) \
        if placement == "compressed" else PLACEMENTS[placement]
    prompts = PREFIXED + [[9, 9, 9]]  # the last row does not share the prefix

    def run(shared_prefix, nb=2, refill=True):
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(gpu_batch_size=3, num_gpu_batches=nb, shared_prefix=shared_prefix,
                                        refill=refill, **pol))
        eng.block.eos = set()
        first = _generate(eng, PREFIXED)
        again = _generate(eng, prompts)  # a second call with the same prefix reuses it
        stats = eng.stats
        eng.close()
        return first, again, stats

    plain_first, plain_again, plain = run(False)
    assert plain.prefix_computes == 0 and plain.prefix_reused_tokens == 0
    for nb, refill in ((2, True), (1, False), (3, True)):
        first, again, st = run(True, nb, refill)
        assert (first, again) == (plain_first, plain_again), (nb, refill, pol)
        assert st.prefix_computes == 1 and st.prefix_tokens == len(PREFIX), st
        assert st.prefix_reused_tokens >= len(PREFIX) * len(PREFIXED), st
    if placement is None:
        assert plain_first == _hf_greedy(hf, PREFIXED)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
@pytest.mark.parametrize("grow", [64, 3])
@pytest.mark.parametrize("placement", [None, 3, 4, 7, "compressed"])
def test_merged_batches_keep_outputs_with_shared_prefix(tiny, placement, grow, tmp_path, monkeypatch):
    """Batches that end rows early at different depths are merged (the shallower one's rows move
    right, into padding behind the shared prefix), holes are topped up with new rows, and KV
    caches widen as rows generate (``grow`` columns at a time), in each KV layout (GPU tier; host
    seq-major; host batch-major with CPU attention) and compressed: every row's greedy output
    equals the run without prefix, refill, merging or growth."""
    name, hf, path = tiny
    from corpusgen.engine import batches

    pol = {} if placement is None else dict(compress_kv=Compression(bits=8, group_size=4)) \
        if placement == "compressed" else PLACEMENTS[placement]
    prompts = [PREFIX + [(5 * i + 3 * j) % 80 + 10 for j in range(1 + i % 6)] for i in range(17)]

    def run(eos, cols=64, **kw):
        monkeypatch.setattr(batches, "KV_GROW", cols)
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(gpu_batch_size=4, num_gpu_batches=2, **pol, **kw))
        eng.block.eos = eos
        reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
        out = {r.key: (r.token_ids, r.finish_reason) for r in eng.generate(reqs, SamplingSettings(max_new_tokens=12))}
        merges, grows = eng.stats.batch_merges, eng.stats.kv_grows
        run.top_ups = getattr(run, "top_ups", 0) + eng.stats.top_ups
        eng.close()
        return [out[str(i)] for i in range(len(prompts))], (merges, grows)

    free, _ = run(set(), refill=False, shared_prefix=False)
    counts: dict[int, int] = {}
    for toks, _ in free:  # an EOS token that ends many rows early, at different steps
        for t in set(toks[1:8]):
            counts[t] = counts.get(t, 0) + 1
    eos = {max(counts, key=counts.get)}
    base, _ = run(eos, refill=False, shared_prefix=False)
    got, (merges, grows) = run(eos, grow, refill=True, shared_prefix=True)
    assert got == base, pol
    assert merges > 0 and run.top_ups > 0, "no batches were merged or topped up: the test lost its teeth"
    assert (grows > 0) == (grow < 12), "caches should widen exactly when KV_GROW < max_new_tokens"


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_shared_prefix_choice(tiny):
    """The engine picks the longest common prefix (each row keeps a token of its own), keeps it
    while later calls still start with it, and skips prefixes too short to pay for a pass."""
    name, hf, path = tiny
    eng = _engine(path, gpu_batch_size=4)
    reqs = lambda ps: [Request(key=str(i), prompt_ids=p) for i, p in enumerate(ps)]  # noqa: E731
    assert eng._shared_prefix(reqs(PREFIXED)) == tuple(PREFIX)
    assert eng._shared_prefix(reqs([PREFIX + [1], PREFIX])) == tuple(PREFIX[:-1])  # one token left for each
    assert eng._shared_prefix(reqs([[1, 2, 3, 4, 5], [1, 2, 3, 9]])) is None  # 3 < MIN_SHARED_PREFIX
    _generate(eng, PREFIXED, n=2)
    assert eng._shared_prefix(reqs([PREFIX + [1, 2], PREFIX + [1, 3]])) == tuple(PREFIX)  # kept, not extended
    eng.close()


def test_chunked_mlp_equals_whole(tiny):
    """The MLP over token chunks (policy.mlp_rows, to bound its intermediates) computes what it
    does whole, in every family."""
    name, hf, path = tiny
    from corpusgen.engine.placement import family_of

    cfg = load_config(path)
    fam = family_of(cfg)
    w = dict(iter_units(path, cfg, dtype=torch.float32))["layer.0"]
    h, attn = torch.randn(3, 7, cfg.hidden_size), torch.randn(3, cfg.num_heads, 7, cfg.head_dim)
    whole = fam.post_attention(cfg, w, h, attn)
    assert torch.allclose(fam.post_attention(cfg, w, h, attn, mlp_rows=4), whole, atol=1e-6)  # 21 tokens by 4


@pytest.mark.parametrize("prefix", [0, 3])
def test_positions_at_a_device_column_equal_positions_from_pad(prefix):
    """The CUDA graphs' positions (column in a tensor) are the eager path's (column an int)."""
    from corpusgen.engine import layers as L

    pad = torch.tensor([0, 2, 5])
    for c in range(prefix, 12):
        want = L.positions_from_pad(pad, c, 1, prefix)
        assert torch.equal(L.positions_at(pad, torch.tensor([c]), prefix), want), c


@pytest.mark.parametrize("tiny", ["llama", "opt"], indirect=True)
@pytest.mark.parametrize("placement", [None, 3, 4, 7, "compressed", "compressed-gpu"])
def test_chunked_prefill_equals_whole(tiny, placement, tmp_path):
    """Prompts fed ``prefill_chunk`` columns a step (chunked prefill; with refill, staggered
    batches) generate exactly what whole-prompt prefill does: fixed blocks and refill, with a
    shared prefix, early exits (EOS), in each KV layout (GPU tier; host seq-major; host batch-major
    with CPU attention) and 4-bit compressed on the host and on the GPU tier."""
    name, hf, path = tiny
    comp = dict(compress_kv=Compression(bits=4, group_size=4), compress_weights=Compression(bits=4, group_size=8))
    pol = ({} if placement is None else dict(comp, kv_cache=Placement(gpu=0.0, cpu=1.0)) if placement == "compressed"
           else comp if placement == "compressed-gpu" else PLACEMENTS[placement])
    prompts = [[(7 * i + 3 * j) % 90 + 5 for j in range(1 + i % 7)] for i in range(13)]
    prefixed = [PREFIX + p for p in prompts[:7]]

    def run(chunk, prompts, eos=(), **kw):
        eng = open_engine(path, dtype="float32", device="cpu", tokenizer=IdTokenizer(99), offload_dir=str(tmp_path),
                          policy=Policy(gpu_batch_size=3, num_gpu_batches=2, prefill_chunk=chunk, **pol, **kw))
        eng.block.eos = set(eos)
        reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
        out = {r.key: (r.token_ids, r.finish_reason) for r in eng.generate(reqs, SamplingSettings(max_new_tokens=8))}
        eng.close()
        return [out[str(i)] for i in range(len(prompts))]

    for refill in (False, True):
        whole = run(None, prompts, refill=refill)
        eos = {whole[0][0][2]}  # a token some rows generate: they end early, slots free up
        whole_eos = run(None, prompts, eos, refill=refill)
        whole_prefixed = run(None, prefixed, refill=refill, shared_prefix=True)
        for chunk in (1, 2, 3):
            assert run(chunk, prompts, refill=refill) == whole, (chunk, refill)
            assert run(chunk, prompts, eos, refill=refill) == whole_eos, (chunk, refill, "eos")
            assert run(chunk, prefixed, refill=refill, shared_prefix=True) == whole_prefixed, (chunk, refill, "prefix")


@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_chunked_prefill_staggers_batches(tiny, monkeypatch):
    """With refill, one batch is in its prompt at a time and its chunks share token steps with
    the other batches' decode steps: the overlap chunked prefill exists for."""
    name, hf, path = tiny
    from corpusgen.engine import schedule

    seen = []
    real = schedule.BlockEngine._pass

    def spy(self, batches):
        seen.append((sum(not b.decoding for b in batches), sum(b.decoding for b in batches),
                     [b.ids.shape[1] for b in batches if not b.decoding]))
        return real(self, batches)

    monkeypatch.setattr(schedule.BlockEngine, "_pass", spy)
    eng = _engine(path, gpu_batch_size=2, num_gpu_batches=3, prefill_chunk=3)
    out = _generate(eng, [[5 + i] * 8 for i in range(10)], n=6)
    assert all(len(t) == 6 for t in out)
    assert max(p for p, _, _ in seen) == 1, "more than one batch in its prompt at once"
    assert sum(1 for p, d, _ in seen if p and d) >= 4, "prompt chunks never shared a step with decoding batches"
    assert {w for _, _, ws in seen for w in ws} == {3, 2}, "8-column prompts run as chunks of 3, 3, 2"
    assert eng.stats.prefill_seconds > 0 and eng.stats.decode_seconds > 0


def test_host_arena_pools_freed_registered_buffers(monkeypatch):
    """Freed page-locked buffers wait in a pool for the next request of their size (registering
    13 GB of a batch's KV took seconds), count against the budget while pooled (evicted, i.e.
    unregistered, when a new allocation would not fit), and are not reused while a view lives."""
    import gc

    from corpusgen.engine import tiers

    registered, unregistered = [], []
    monkeypatch.setattr(tiers, "can_pin", lambda: True)
    monkeypatch.setattr(tiers, "_register", lambda t: registered.append(t.data_ptr()) or True)
    monkeypatch.setattr(tiers, "_unregister", lambda t: unregistered.append(t.data_ptr()))
    arena = tiers.HostArena(budget=4000)  # pool_limit 1000
    a = arena.empty((100,), torch.float32)  # 400 bytes
    ptr = a.data_ptr()
    del a
    gc.collect()
    assert (arena.used, arena.pooled) == (0, 400) and not unregistered
    b = arena.empty((10, 10), torch.float32)  # same size: the pooled buffer, no new registration
    assert b.data_ptr() == ptr and arena.reused == 1 and len(registered) == 1 and arena.pooled == 0
    view = b[:5]
    del b
    gc.collect()
    assert arena.pooled == 0 and unregistered == [ptr], "a buffer with a live view must not be pooled"
    del view
    c = arena.empty((200,), torch.float32)  # 800 bytes, pooled when freed
    del c
    gc.collect()
    assert arena.pooled == 800
    d = arena.empty((3500,), torch.uint8)  # 800 pooled + 3500 > 4000: the pool gives way
    assert arena.pooled == 0 and len(unregistered) == 2 and arena.used == 3500
    e = arena.empty((400,), torch.uint8)
    with pytest.raises(BudgetError, match="cpu_memory budget"):
        arena.empty((200,), torch.uint8)
    del d, e
    gc.collect()
    assert arena.pooled == 400 and arena.used == 0  # 3500 > pool_limit: unregistered, not pooled
    arena.clear()
    assert arena.pooled == 0 and len(unregistered) == 4


def test_a_closed_arena_unregisters_what_is_freed_later(monkeypatch):
    """Buffers freed after their arena is cleared (an engine's KV collected after close) are
    unregistered, not pooled: a pooled buffer outliving its arena would be freed still page-locked,
    and the next registration of that address range fails (seen on an H100 as
    cudaErrorHostMemoryAlreadyRegistered, reported by an unrelated kernel launch)."""
    from corpusgen.engine import tiers

    unregistered = []
    monkeypatch.setattr(tiers, "can_pin", lambda: True)
    monkeypatch.setattr(tiers, "_register", lambda t: True)
    monkeypatch.setattr(tiers, "_unregister", lambda base: unregistered.append(base.numel()))
    arena = tiers.HostArena(1 << 20)
    a, b = arena.empty((256,), torch.float32), arena.empty((128,), torch.float32)
    del a
    assert arena.pooled == 1024 and not unregistered  # open: a freed buffer waits for reuse
    arena.clear()
    assert unregistered == [1024]
    del b
    assert unregistered == [1024, 512] and arena.pooled == 0
