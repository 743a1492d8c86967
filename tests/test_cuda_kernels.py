"""The split-KV decode attention kernel (CUDA, Triton): against float64, SDPA and in the engine."""

import pytest
import torch
import torch.nn.functional as F

from corpusgen.engine.kernels import decode_attention as da
from corpusgen.engine.kernels import packed_attention as pa
from corpusgen.engine import layers as L

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or da.triton is None,
                                reason="needs CUDA and triton")


def test_kernel_matches_float64_reference_on_odd_shapes():
    report = da.selfcheck("cuda")
    assert len(report) == 8 * 2 * 2


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3)])
def test_attend_routes_single_queries_on_multi_head_caches_through_the_kernel(monkeypatch, heads, kv_heads):
    monkeypatch.setattr(da, "MIN_KV_ELEMENTS", 0)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, heads, 1, 64, generator=g).cuda().half()
    k = torch.randn(4, kv_heads, 300, 64, generator=g).cuda().half()
    v = torch.randn(4, kv_heads, 300, 64, generator=g).cuda().half()
    mask = torch.ones(4, 1, 1, 300, dtype=torch.bool, device="cuda")
    mask[1, ..., 5:90] = False
    calls = []
    real = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a: calls.append(1) or real(*a))
    got = L.attend(q, k, v, mask, 0.125)
    assert bool(calls) == (heads == kv_heads), "single fp16 queries on a multi-head cache (only) use the kernel"
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.125,
                                         enable_gqa=heads != kv_heads)
    assert (got.float() - ref).abs().max().item() < 2e-3
    monkeypatch.setattr(da, "usable", lambda q, k: False)  # the reference path: PyTorch's SDPA
    calls.clear()
    L.attend(q, k, v, mask, 0.125)
    assert not calls


class _Record:
    """Logits hook: records each row's logits and forces the given targets (teacher forcing)."""

    def __init__(self, targets):
        self.targets, self.logits = targets, {k: [] for k in targets}

    def mask(self, keys, logits):
        nxt = []
        for i, k in enumerate(keys):
            self.logits[k].append(logits[i].float().cpu())
            nxt.append(self.targets[k][len(self.logits[k]) - 1])
        forced = torch.full_like(logits, float("-inf"))
        return forced.scatter_(1, torch.tensor(nxt, device=logits.device)[:, None], 0.0)

    def advance(self, keys, next_ids):
        pass


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_engine_decodes_alike_with_the_kernel_and_with_sdpa(monkeypatch, tmp_path, family):
    """fp16 on CUDA, multi-head caches, padded rows in two GPU batches: teacher-forced logits of every decode step
    agree between the Triton kernel and PyTorch's SDPA to fp16 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Policy

    torch.manual_seed(0)
    common = dict(vocab_size=99, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=98, pad_token_id=0)
    hf = (LlamaForCausalLM(LlamaConfig(**common, intermediate_size=512, num_key_value_heads=4)) if family == "llama"
          else OPTForCausalLM(OPTConfig(**common, ffn_dim=512)))
    hf.save_pretrained(tmp_path)
    prompts = [[5 + i + j % 7 for j in range(3 + 9 * i)] for i in range(6)]  # 3..48 tokens: padding
    targets = {str(i): [(7 * i + 3 * s) % 90 + 5 for s in range(12)] for i in range(6)}
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]

    monkeypatch.setattr(da, "MIN_KV_ELEMENTS", 0)
    calls = []
    real = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    real_usable = da.usable

    def run(enabled):
        monkeypatch.setattr(da, "usable", real_usable if enabled else (lambda q, k: False))
        eng = open_engine(str(tmp_path), dtype="float16", device="cuda", tokenizer=IdTokenizer(99),
                          policy=Policy(gpu_batch_size=3, num_gpu_batches=2))
        eng.block.eos = set()
        hook = _Record(targets)
        list(eng.generate(reqs, SamplingSettings(max_new_tokens=12), logits_hook=hook))
        eng.close()
        return torch.stack([torch.stack(hook.logits[k]) for k in targets])

    ours = run(True)
    assert calls, "the engine's decode steps did not use the kernel"
    sdpa = run(False)
    assert ours.shape == (6, 12, 99)
    scale = sdpa.abs().max().item()
    assert (ours - sdpa).abs().max().item() <= 2e-2 * scale, (ours - sdpa).abs().max().item()


# --------------------------------------------------------------------------- 4-bit caches


def test_packed_kernel_matches_float64_reference_on_odd_shapes():
    report = pa.packed_selfcheck("cuda")
    assert len(report) == 6 * 2 * 2 * 2 * 2


@pytest.mark.parametrize("family,kv,chunk", [("opt", "cpu", None), ("opt", "gpu", None), ("llama", "cpu", 16),
                                             ("opt", "cpu", 16)])
def test_engine_attends_a_4bit_cache_in_place_like_dequantised(monkeypatch, tmp_path, family, kv, chunk):
    """fp16 on CUDA, 4-bit KV on the host (crossing the link packed) or on the GPU tier, padded
    rows in two GPU batches, whole or chunked prefill: teacher-forced logits of every step agree
    between attention straight from the packed cache and dequantise-then-attend."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Compression, Placement, Policy

    torch.manual_seed(0)
    common = dict(vocab_size=99, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=98, pad_token_id=0)
    hf = (LlamaForCausalLM(LlamaConfig(**common, intermediate_size=512, num_key_value_heads=4)) if family == "llama"
          else OPTForCausalLM(OPTConfig(**common, ffn_dim=512)))
    hf.save_pretrained(tmp_path)
    prompts = [[5 + i + j % 7 for j in range(3 + 9 * i)] for i in range(6)]
    targets = {str(i): [(7 * i + 3 * s) % 90 + 5 for s in range(12)] for i in range(6)}
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    calls = []
    real = pa.packed_decode_attention
    monkeypatch.setattr(pa, "packed_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    real_usable = pa.packed_usable

    def run(enabled):
        monkeypatch.setattr(pa, "packed_usable", real_usable if enabled else (lambda *a: False))
        eng = open_engine(str(tmp_path), dtype="float16", device="cuda", tokenizer=IdTokenizer(99),
                          policy=Policy(gpu_batch_size=3, num_gpu_batches=2, prefill_chunk=chunk,
                                        kv_cache=Placement(gpu=float(kv == "gpu"), cpu=float(kv == "cpu")),
                                        compress_kv=Compression(bits=4, group_size=64)))
        eng.block.eos = set()
        hook = _Record(targets)
        list(eng.generate(reqs, SamplingSettings(max_new_tokens=12), logits_hook=hook))
        eng.close()
        return torch.stack([torch.stack(hook.logits[k]) for k in targets])

    ours = run(True)
    assert calls, "the engine's decode steps did not attend from the packed cache"
    n = len(calls)
    ref = run(False)
    assert len(calls) == n, "the dequantising path still used the packed kernel"
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 2e-2 * scale, (ours - ref).abs().max().item()


# --------------------------------------------------------------------------- decode_graph.py

@pytest.mark.parametrize("family,refill,prefix", [("opt", False, False), ("opt", True, True), ("llama", True, False),
                                                   ("llama-gqa", False, False), ("llama-gqa", True, True)])
def test_decode_graphs_compute_what_the_eager_steps_compute(monkeypatch, tmp_path, family, refill, prefix):
    """fp16 on CUDA, every unit resident: decode steps replayed from CUDA graphs give the eager
    steps' logits (to the attention's split rounding) and the same greedy tokens, with padded rows,
    two GPU batches, fixed blocks or refill (batches compacted and re-captured), a shared prefix;
    multi-head models through the split-KV kernel, grouped-query ones through SDPA with a mask."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.kv_cache import KVCaches
    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Policy

    torch.manual_seed(0)
    common = dict(vocab_size=99, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=160, bos_token_id=1, eos_token_id=98, pad_token_id=0)
    kv_heads = {"llama": 4, "llama-gqa": 2}
    hf = (LlamaForCausalLM(LlamaConfig(**common, intermediate_size=512, num_key_value_heads=kv_heads[family]))
          if family in kv_heads else OPTForCausalLM(OPTConfig(**common, ffn_dim=512)))
    hf.save_pretrained(tmp_path)
    head = [9, 8, 7, 6, 5, 4] if prefix else []
    prompts = [head + [5 + i + j % 7 for j in range(3 + 9 * i)] for i in range(8)]
    reqs = [Request(key=str(i), prompt_ids=p) for i, p in enumerate(prompts)]
    # Rows end at different steps (refill compacts its batches; fixed blocks run to the longest).
    lengths = {str(i): 6 + 3 * i for i in range(8)}
    targets = {k: [(7 * int(k) + 3 * s) % 90 + 5 for s in range(n)] for k, n in lengths.items()}

    class Hook:
        """Records each row's logits and forces its targets, then EOS (98) at its length."""

        def __init__(self):
            self.logits = {k: [] for k in targets}

        def mask(self, keys, logits):
            forced = torch.full_like(logits, float("-inf"))
            for i, k in enumerate(keys):
                seen = self.logits[k]
                if len(seen) < lengths[k]:
                    seen.append(logits[i].float().cpu())
                forced[i, targets[k][len(seen) - 1] if len(seen) < lengths[k] else 98] = 0.0
            return forced

        def advance(self, keys, next_ids):
            pass

    real_alloc = KVCaches.alloc

    def nan_alloc(self, *a, **k):  # K/V columns not yet written hold NaN: nothing may read them
        return tuple(c.fill_(float("nan")) for c in real_alloc(self, *a, **k))

    monkeypatch.setattr(KVCaches, "alloc", nan_alloc)

    def run(graphs):
        policy = Policy(gpu_batch_size=4, num_gpu_batches=2, refill=refill, shared_prefix=prefix, cuda_graphs=graphs)
        eng = open_engine(str(tmp_path), dtype="float16", device="cuda", tokenizer=IdTokenizer(99), policy=policy)
        assert (eng.block.graphs is not None) == graphs
        hook = Hook()
        list(eng.generate(reqs, SamplingSettings(max_new_tokens=40), logits_hook=hook))
        g = eng.block.graphs
        counts = (g.captures, g.replays) if g is not None else (0, 0)
        eng.block.eos = set()  # greedy, every row to max_new_tokens
        greedy = {r.key: r.token_ids for r in eng.generate(reqs, SamplingSettings(max_new_tokens=20))}
        eng.close()
        return hook.logits, counts, greedy

    got, (captures, replays), greedy = run(True)
    want, none, eager_greedy = run(False)
    assert none == (0, 0)
    assert captures >= 2 and replays > captures, (captures, replays)
    for k in targets:
        a, b = torch.stack(got[k]), torch.stack(want[k])
        assert a.shape == b.shape == (lengths[k], 99)
        assert (a - b).abs().max().item() <= 1e-2 * b.abs().max().item(), (k, (a - b).abs().max().item())
    assert greedy == eager_greedy


def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch, tmp_path):
    """An op that cannot be captured: one warning, graphs off, and the tokens of eager steps."""
    from transformers import OPTConfig, OPTForCausalLM

    from corpusgen.engine import decode_graph
    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Policy

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=99, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512,
                             max_position_embeddings=128, bos_token_id=1, eos_token_id=98,
                             pad_token_id=0)).save_pretrained(tmp_path)
    reqs = [Request(key=str(i), prompt_ids=[5 + i + j % 7 for j in range(3 + 5 * i)]) for i in range(4)]

    def run(graphs):
        eng = open_engine(str(tmp_path), dtype="float16", device="cuda", tokenizer=IdTokenizer(99),
                          policy=Policy(cuda_graphs=graphs))
        eng.block.eos = set()
        out = {r.key: r.token_ids for r in eng.generate(reqs, SamplingSettings(max_new_tokens=8))}
        graphs = eng.block.graphs
        eng.close()
        return out, graphs

    eager, _ = run(False)
    real = decode_graph._decode_step

    def uncapturable(*a):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(*a)

    monkeypatch.setattr(decode_graph, "_decode_step", uncapturable)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got, graphs = run(True)
    assert graphs is None
    assert got == eager


# --------------------------------------------------------------------------- kv_copy.py

def test_tile_copy_equals_copy_on_strided_views():
    from corpusgen.engine.kernels import kv_copy

    g = torch.Generator().manual_seed(3)
    for b, heads, s, d, cols, col in ((3, 5, 37, 64, 50, 4), (1, 2, 300, 128, 333, 0), (4, 3, 9, 16, 9, 0)):
        x = torch.randn(b, s, heads * d, generator=g).cuda().half()
        src = x.view(b, s, heads, d).transpose(1, 2)  # a projection split into heads, as pre_attention gives it
        cache = torch.randn(b, heads, cols, d, generator=g).cuda().half()
        want = cache.clone()
        want[:, :, col:col + s] = src
        kv_copy._tile_copy_kernel[(b * heads, -(-s // 16))](
            src, cache[:, :, col:col + s], *src.stride()[:3], *cache.stride()[:3], heads, s, D=d, BLOCK_T=16)
        assert torch.equal(cache, want), (b, heads, s, d)


def test_copy_to_host_2d_lands_in_a_narrowed_pinned_cache():
    from corpusgen.engine.kernels import kv_copy
    from corpusgen.engine.tiers import HostArena

    arena = HostArena()
    stream = torch.cuda.Stream()
    for b, heads, s, d, cols, col in ((3, 5, 37, 64, 50, 4), (1, 7, 20, 32, 21, 1), (5, 1, 8, 16, 30, 22)):
        cache = arena.empty((b, heads, cols, d), torch.float16)
        cache.copy_(torch.randn(b, heads, cols, d))
        want = cache.clone()
        src = torch.randn(b, heads, s, d, device="cuda").half()
        want[:, :, col:col + s] = src.cpu()
        dst = cache[:, :, col:col + s]
        assert kv_copy.host_2d_usable(dst, src)
        stream.wait_stream(torch.cuda.current_stream())
        kv_copy.copy_to_host_2d(dst, src, stream)
        stream.synchronize()
        assert torch.equal(cache, want), (b, heads, s, d)
    assert not kv_copy.host_2d_usable(cache.transpose(1, 2)[:, :2], src.transpose(1, 2)[:, :2].contiguous())


@pytest.mark.parametrize("cpu_attention", [False, True])
def test_engine_prefill_copies_give_the_same_tokens(monkeypatch, tmp_path, cpu_attention):
    """fp32 on CUDA with the tile copy forced on (and the 2-D DMA into the host cache with CPU
    attention): the same greedy tokens as with PyTorch's copies, padded rows, two GPU batches."""
    from transformers import OPTConfig, OPTForCausalLM

    from corpusgen.engine.kernels import kv_copy
    from corpusgen.engine.api import Request, SamplingSettings
    from corpusgen.engine.load import IdTokenizer, open_engine
    from corpusgen.planner.policy import Placement, Policy

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=99, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=256,
                             max_position_embeddings=128, bos_token_id=1, eos_token_id=98,
                             pad_token_id=0)).save_pretrained(tmp_path)
    reqs = [Request(key=str(i), prompt_ids=[5 + i + j % 7 for j in range(3 + 9 * i)]) for i in range(6)]
    placement = dict(kv_cache=Placement(gpu=0.0, cpu=1.0), cpu_attention=True) if cpu_attention else {}
    monkeypatch.setattr(kv_copy, "MIN_ELEMENTS", 0)
    calls = []
    real_tile, real_2d = kv_copy.tile_copy_, kv_copy.copy_to_host_2d
    monkeypatch.setattr(kv_copy, "tile_copy_", lambda *a, **k: calls.append("tile") or real_tile(*a, **k))
    monkeypatch.setattr(kv_copy, "copy_to_host_2d", lambda *a: calls.append("2d") or real_2d(*a))

    usable = kv_copy.tile_copy_usable, kv_copy.host_2d_usable

    def run(enabled):
        monkeypatch.setattr(kv_copy, "tile_copy_usable", usable[0] if enabled else (lambda *a: False))
        monkeypatch.setattr(kv_copy, "host_2d_usable", usable[1] if enabled else (lambda *a: False))
        eng = open_engine(str(tmp_path), dtype="float32", device="cuda", tokenizer=IdTokenizer(99),
                          policy=Policy(gpu_batch_size=3, num_gpu_batches=2, **placement))
        eng.block.eos = set()
        out = {r.key: r.token_ids for r in eng.generate(reqs, SamplingSettings(max_new_tokens=10))}
        eng.close()
        return out

    ours = run(True)
    assert ("2d" if cpu_attention else "tile") in calls
    assert ours == run(False)


# --------------------------------------------------------------------------- fused_norm.py

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layer_norm_matches_pytorch(monkeypatch, dtype):
    from corpusgen.engine.kernels import fused_norm

    monkeypatch.setattr(fused_norm, "MIN_ROWS", 0)
    g = torch.Generator().manual_seed(5)
    for rows, n in ((3, 768), (17, 1000), (64, 4096), (2, 7168)):
        h = (torch.randn(rows, n, generator=g) * 3 + 1).cuda().to(dtype)
        d = torch.randn(rows, n, generator=g).cuda().to(dtype)
        w = torch.randn(n, generator=g).cuda().to(dtype)
        b = torch.randn(n, generator=g).cuda().to(dtype)
        want = h + d
        s, y = fused_norm.add_layer_norm(h, d.clone(), w, b, 1e-5)
        assert torch.equal(s, want), "the residual sum is the dtype's rounding of h + d"
        ref = F.layer_norm((h + d).float(), (n,), w.float(), b.float(), 1e-5)
        tol = 2 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1)
        assert (y.float() - ref).abs().max().item() <= tol, (rows, n)
        ours = fused_norm.layer_norm(h, w, b, 1e-5)
        assert (ours.float() - F.layer_norm(h.float(), (n,), w.float(), b.float(), 1e-5)).abs().max().item() <= tol
        torch_ln = F.layer_norm(h, (n,), w, b, 1e-5)  # PyTorch's own half-precision kernel: same rounding class
        assert (ours.float() - torch_ln.float()).abs().max().item() <= tol


def test_opt_mlp_epilogue_and_fused_qkv_match_the_plain_path(monkeypatch):
    """OPT's prefill fc1 with the ReLU in the GEMM epilogue, and a decode step's q/k/v from the fused
    weight, agree with the separate ops to fp16 rounding; so does the MLP over row chunks."""
    from corpusgen.engine.models import opt
    from corpusgen.engine.config import preset
    from corpusgen.engine.placement import _fuse_qkv

    cfg = preset("opt-125m")
    h = cfg.hidden_size
    g = torch.Generator().manual_seed(2)
    w = {n: (torch.randn(*shape, generator=g) * 0.05).cuda().half() for n, shape in (
        ("attn_norm", (h,)), ("attn_norm_bias", (h,)), ("q", (h, h)), ("q_bias", (h,)), ("k", (h, h)), ("k_bias", (h,)),
        ("v", (h, h)), ("v_bias", (h,)), ("o", (h, h)), ("o_bias", (h,)), ("mlp_norm", (h,)), ("mlp_norm_bias", (h,)),
        ("fc1", (cfg.ffn_dim, h)), ("fc1_bias", (cfg.ffn_dim,)), ("fc2", (h, cfg.ffn_dim)), ("fc2_bias", (h,)))}
    x = torch.randn(2, 2600, h, generator=g).cuda().half()  # 5200 tokens: a prefill
    attn = torch.randn(2, cfg.num_heads, 2600, cfg.head_dim, generator=g).cuda().half()
    fused = opt.post_attention(cfg, w, x, attn)  # a CUDA half prefill: fc1's ReLU in the epilogue
    chunked = opt.post_attention(cfg, w, x, attn, mlp_rows=2048)  # the MLP over row chunks (the last one short)
    assert (chunked.float() - fused.float()).abs().max().item() <= 4e-3 * (fused.abs().max().item() + 1)
    wf32 = {n: t.float() for n, t in w.items()}
    plain = opt.post_attention(cfg, wf32, x.float(), attn.float())  # fp32: a separate ReLU
    assert (fused.float() - plain.float()).abs().max().item() <= 4e-3 * (plain.abs().max().item() + 1)
    step = torch.randn(128, 1, h, generator=g).cuda().half()  # a decode step
    separate = opt.pre_attention(cfg, w, step, None)
    wf = dict(w)
    _fuse_qkv(wf)
    assert "qkv" in wf and "qkv_bias" in wf
    for a, b in zip(opt.pre_attention(cfg, wf, step, None), separate):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= 4e-3 * (b.abs().max().item() + 1)
