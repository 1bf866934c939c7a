"""The per-step attention plan (llama_kernels.triton.attention_plan) and the triton kernels that run
it: mixed prefill + decode batches against the reference, with and without split KV ranges; the
plan's invariants and its balance at the issue's shapes (a CPU computation); that a forward pass
builds one plan for all its layers; that building one needs no host sync (it runs on the meta
device); seq_lens clamped to the block table.

Without a GPU the kernels run under the interpreter: small sizes, a covering subset of the
groups, head dims and dtypes rather than their cross product.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_rel_close, paged_attention_case, randn

from llama_kernels import backends, ops, reference
from llama_kernels.model import AttentionBatch, LlamaConfig
from llama_kernels.triton import attention as triton_attention
from llama_kernels.triton import attention_plan, prefill_attention
from llama_kernels.triton.attention_plan import (KV_HI, KV_LO, M_NTOK, M_ROW0, M_SLOT0, M_SLOTS, NTOK, POS0, ROW0, SEQ,
                                                SLOT)

FP8 = torch.float8_e4m3fn
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K = 1024


def mixed_case(seq_lens, query_lens, group, d, block_size, dtype, cache_dtype, seed, hkv=2):
    """[q, k_cache, v_cache, block_table, seq_lens, query_lens, k_scale, v_scale] on DEVICE; unused
    block table entries point far outside the cache (paged_attention_case)."""
    _, kc, vc, table, lens, ks, vs = paged_attention_case(seq_lens, group * hkv, hkv, d, block_size, dtype,
                                                          cache_dtype, seed, device=DEVICE)  # fmt: skip
    q = randn(sum(query_lens), group * hkv, d, dtype=dtype, seed=seed + 7, device=DEVICE)
    return [q, kc, vc, table, lens, torch.tensor(query_lens, dtype=torch.int32, device=DEVICE), ks, vs]


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor torch.empty / empty_like make starts as NaN (the output, the partial
    workspace), so a row the kernels fail to write, or a partial the merge reads unwritten, shows."""

    def poison(make):
        def made(*a, **kw):
            t = make(*a, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return made

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))


# (seq_lens, query_lens): decode rows (query length 1) beside prefill chunks, prefixes that end
# mid-block and on block boundaries, a chunk at prefix 0.
MIXED = [([131, 40, 33, 17], [1, 1, 19, 17]),
         ([16, 200, 70, 9], [1, 1, 38, 3]),
         ([97, 5, 150], [1, 5, 22]),
         ([64, 180, 47, 2], [1, 1, 1, 2])]  # fmt: skip
CASES = [  # (lens, group, D, block_size, q dtype, cache dtype, split)
    (MIXED[0], 1, 64, 16, torch.float32, torch.float32, True),
    (MIXED[1], 3, 128, 32, torch.bfloat16, torch.bfloat16, True),
    (MIXED[2], 4, 64, 16, torch.float16, FP8, True),
    (MIXED[3], 8, 128, 16, torch.bfloat16, FP8, True),
    (MIXED[0], 16, 64, 32, torch.float16, torch.float16, True),
    (MIXED[1], 4, 128, 16, torch.bfloat16, torch.bfloat16, False),
    (MIXED[2], 16, 128, 16, torch.float32, torch.bfloat16, False),  # q and cache of different dtypes
    (MIXED[3], 1, 64, 32, torch.float16, FP8, False),
]


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("lens,group,d,block_size,dtype,cache_dtype,split", CASES,
                         ids=[f"g{c[1]}-d{c[2]}-bs{c[3]}-{c[4]}-{c[5]}-{'split' if c[6] else 'whole'}".replace(
                             "torch.", "") for c in CASES])  # fmt: skip
def test_mixed_batch_matches_reference(lens, group, d, block_size, dtype, cache_dtype, split):
    args = mixed_case(*lens, group, d, block_size, dtype, cache_dtype, seed=group + d)
    q, kc, vc, table, seq_lens, query_lens, ks, vs = args
    # Split: chunks down to one KV tile over an 8-SM "GPU"; whole: chunks of at least 1024 tokens, longer
    # than every tile here. (Few SMs: the interpreter runs every program of the grid, idle ones too.)
    plan = prefill_attention.make_plan(q, kc, table, seq_lens, query_lens, 8, 1 if split else 1024)
    slots = plan.items[:, SLOT][plan.items[:, SEQ] >= 0]
    assert bool((slots >= 0).any()) == split  # the case runs the path it names
    want = reference.paged_prefill_attention(q, kc, vc, table, seq_lens, query_lens, 0.1, ks, vs)
    out = prefill_attention.paged_prefill_attention(q, kc, vc, table, seq_lens, query_lens, 0.1, ks, vs, plan=plan)
    assert out.dtype == dtype and out.shape == q.shape
    assert_rel_close(out, want, TOL[dtype], f"group {group} D {d} {dtype}/{cache_dtype}")


# The same cases over e4m3 caches on the transposed prefill tiles (prefill_attention.FP8_TRANSPOSED):
# q in fp16 where the case has float32, MIXED[2] for MIXED[3] (whose tiles of <= 2 tokens all take the
# decode-row path), and a 448-token prefix so that prefill tiles span several 128-token KV tiles and split.
TRANSPOSED_CASES = [(MIXED[2] if lens is MIXED[3] else lens, group, d, bs, torch.float16 if dt == torch.float32 else dt,
                     split) for lens, group, d, bs, dt, _, split in CASES]  # fmt: skip


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("lens,group,d,block_size,dtype,split", TRANSPOSED_CASES,
                         ids=[f"g{c[1]}-d{c[2]}-bs{c[3]}-{c[4]}-{'split' if c[5] else 'whole'}".replace("torch.", "")
                              for c in TRANSPOSED_CASES])  # fmt: skip
def test_fp8_transposed_tiles_match_reference(monkeypatch, lens, group, d, block_size, dtype, split):
    monkeypatch.setattr(prefill_attention, "FP8_TRANSPOSED", True)
    seq_lens = [n + 448 for n in lens[0]]
    args = mixed_case(seq_lens, lens[1], group, d, block_size, dtype, FP8, seed=group + d + 1)
    q, kc, vc, table, lens_t, qlens, ks, vs = args
    cfg = prefill_attention.call_config(dtype, group, d, FP8, None)
    assert cfg.transposed and cfg.block_m == prefill_attention.TRANSPOSED_ROWS
    plan = prefill_attention.make_plan(q, kc, table, lens_t, qlens, 32, 1 if split else 4096)
    items = plan.items[plan.items[:, SEQ] >= 0]
    prefill = items[:, NTOK] * group > cfg.small_m  # items on the transposed tiles (the others: decode rows)
    assert bool(prefill.any()) and bool((items[prefill, SLOT] >= 0).any()) == split  # the paths the case names
    want = reference.paged_prefill_attention(q, kc, vc, table, lens_t, qlens, 0.1, ks, vs)
    out = prefill_attention.paged_prefill_attention(q, kc, vc, table, lens_t, qlens, 0.1, ks, vs, plan=plan)
    assert_rel_close(out, want, TOL[dtype], f"transposed tiles, group {group} D {d} {dtype}")


def test_ops_default_plan_and_plans_memo():
    # Through ops with the step's memo: the second call (another layer) reuses the plan; a new
    # query_lens tensor (another step's) gets a new one.
    args = mixed_case([20, 37], [1, 6], 4, 64, 16, torch.float16, torch.float16, seed=2)
    plans: dict = {}
    want = reference.paged_prefill_attention(*args)
    for _ in range(2):
        out = ops.paged_prefill_attention(*args[:6], None, *args[6:], plans, backend="triton")
        assert_rel_close(out, want, TOL[torch.float16])
    assert len(plans) == 1
    (entry,) = plans.values()
    args[5] = args[5].clone()
    ops.paged_prefill_attention(*args[:6], None, *args[6:], plans, backend="triton")
    assert next(iter(plans.values())) is not entry and len(plans) == 1
    with pytest.raises(TypeError, match=r"paged_prefill_attention: argument 'plans' must be a dict"):
        ops.paged_prefill_attention(*args[:6], None, *args[6:], [], backend="triton")


def test_no_tokens():
    q, kc, vc, table, lens, qlens, _, _ = mixed_case([5], [5], 2, 64, 16, torch.float16, torch.float16, seed=1)
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    out = ops.paged_prefill_attention(q[:0], kc, vc, table[:0], empty, empty, backend="triton")
    assert out.shape == (0, *q.shape[1:])

def test_seq_lens_clamped_to_the_block_table():
    # seq_lens past the table's capacity (3 blocks of 16 here; only checked on the host by ops) read
    # no table entry past the row: the kernel computes what the reference does at the clamped length.
    q, kc, vc, table, lens, qlens, _, _ = mixed_case([40, 20], [5, 3], 2, 64, 16, torch.float32, torch.float32,
                                                     seed=4)  # fmt: skip
    table = table[:, :3].contiguous()
    over = torch.tensor([48 + 100, 20], dtype=torch.int32, device=DEVICE)
    out = prefill_attention.paged_prefill_attention(q, kc, vc, table, over, qlens)
    want = reference.paged_prefill_attention(q, kc, vc, table, torch.tensor([48, 20], dtype=torch.int32), qlens)
    assert_rel_close(out, want, TOL[torch.float32])



@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_mixed_batch_realistic_sizes(cache_dtype):
    # 405B-TP8-shaped (16 query heads, 1 KV head, D 128) on the GPU's own plan: a 512-token chunk at
    # prefix 0 beside decode rows at 32K and 128K, and a 512-token chunk over a 32K prefix.
    args = mixed_case([512, 32 * K, 128 * K, 32 * K + 512], [512, 1, 1, 512], 16, 128, 16, torch.bfloat16,
                      cache_dtype, seed=3, hkv=1)  # fmt: skip
    want = reference.paged_prefill_attention(*args)
    out = ops.paged_prefill_attention(*args[:6], None, *args[6:], backend="triton")
    assert_rel_close(out, want, TOL[torch.bfloat16], f"405B-TP8-shaped mixed step, {cache_dtype} cache")


@pytest.mark.gpu
def test_plan_and_kernels_capture_in_a_cuda_graph():
    # The plan's build and both launches in one CUDA graph (no host sync), replayed for another step
    # of the same shapes: new seq_lens / query_lens / q values in the captured buffers.
    q, kc, vc, table, lens, qlens, _, _ = mixed_case([300, 40, 2000], [1, 17, 64], 4, 128, 16, torch.bfloat16,
                                                     torch.bfloat16, seed=5)  # fmt: skip
    ops.paged_prefill_attention(q, kc, vc, table, lens, qlens, backend="triton")  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_prefill_attention(q, kc, vc, table, lens, qlens, plans={}, backend="triton")
    lens.copy_(torch.tensor([250, 22, 1990], dtype=torch.int32))  # each within its own blocks
    qlens.copy_(torch.tensor([64, 17, 1], dtype=torch.int32))  # the same total T
    q.copy_(randn(*q.shape, dtype=q.dtype, seed=11))
    graph.replay()
    want = reference.paged_prefill_attention(q, kc, vc, table, lens, qlens)
    assert_rel_close(out, want, TOL[torch.bfloat16], "replayed graph")

# --- the plan ---------------------------------------------------------------------------


def check_plan(plan, seq_lens: list[int], query_lens: list[int]) -> None:
    """Every (new token, cache token it sees) is in exactly one item, items run longest first, and
    split tiles' partial slots are distinct and each in one merge."""
    items = plan.items[plan.items[:, SEQ] >= 0].tolist()
    costs = [it[KV_HI] - it[KV_LO] for it in items]
    assert costs == sorted(costs, reverse=True) and min(costs) > 0
    assert max(costs) <= 1.5 * int(plan.chunk) + plan.block_n  # a tile of up to 1.5 chunks stays whole
    starts = [sum(query_lens[:b]) for b in range(len(seq_lens))]
    seen = {}  # (query row, cache token) -> count, as ranges per tile
    tiles = {}
    for it in items:
        b = it[SEQ]
        assert starts[b] <= it[ROW0] and it[ROW0] + it[NTOK] <= starts[b] + query_lens[b]
        assert it[POS0] == seq_lens[b] - query_lens[b] + it[ROW0] - starts[b]
        assert it[KV_LO] % plan.block_n == 0 and it[NTOK] <= plan.tile_tokens
        tiles.setdefault((it[ROW0], it[NTOK]), []).append(it)
    for (row0, ntok), chunks in tiles.items():
        chunks.sort(key=lambda it: it[KV_LO])
        assert [c[KV_LO] for c in chunks[1:]] == [c[KV_HI] for c in chunks[:-1]] and chunks[0][KV_LO] == 0
        assert chunks[-1][KV_HI] == chunks[0][POS0] + ntok  # the tile's causal end
        split = len(chunks) > 1
        assert all((c[SLOT] >= 0) == split for c in chunks)
        seen[row0] = chunks
    assert sum(n for (_, n) in tiles) == sum(query_lens)  # every new token in one tile
    slots = [it[SLOT] for it in items if it[SLOT] >= 0]
    assert len(set(slots)) == len(slots) and all(s < plan.max_slots for s in slots)
    merges = [m for m in plan.merges.tolist() if m[M_SLOTS] > 0]
    assert sorted((m[M_ROW0], m[M_NTOK]) for m in merges) == sorted(k for k, c in tiles.items() if len(c) > 1)
    for m in merges:
        assert sorted(c[SLOT] for c in seen[m[M_ROW0]]) == list(range(m[M_SLOT0], m[M_SLOT0] + m[M_SLOTS]))


@pytest.mark.parametrize("seed", range(6))
def test_plan_invariants_random_steps(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 12, (), generator=g))
    query_lens = [1 if torch.rand((), generator=g) < 0.5 else int(torch.randint(1, 300, (), generator=g))
                  for _ in range(b)]  # fmt: skip
    seq_lens = [q + int(torch.randint(0, 5000, (), generator=g)) for q in query_lens]
    tile_tokens, block_n, programs = [(128, 64, 264), (8, 64, 32), (16, 16, 6)][seed % 3]
    lens, qlens = torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(query_lens, dtype=torch.int32)
    plan = attention_plan.build_plan(lens, qlens, sum(query_lens), max(seq_lens), tile_tokens, block_n, programs, 256)
    check_plan(plan, seq_lens, query_lens)


def test_plan_needs_no_host_sync():
    # Built from tensors on the meta device (no values): no op of the plan reads a value on the host,
    # and its sizes depend only on shapes, so a CUDA graph can capture it.
    lens = torch.empty(5, dtype=torch.int32, device="meta")
    plan = attention_plan.build_plan(lens, lens, 700, 4096, 8, 64, 264, 256)
    assert plan.items.device.type == "meta" and plan.items.shape == (264 + (700 + 5 * 7) // 8, 8)
    assert plan.merges.shape == (264, 4) and plan.max_slots == 528


# The issue's shapes at 405B on 8 GPUs (one KV head and 16 query heads per GPU, D 128), and 8B.
BALANCE = {  # name: (seq_lens, query_lens, Hq, Hkv)
    "405B-TP8 512 new at prefix 0 + decode row at 128K": ([512, 128 * K], [512, 1], 16, 1),
    "405B-TP8 512 new over a 32K prefix": ([32 * K + 512], [512], 16, 1),
    "8B 512 new over a 32K prefix": ([32 * K + 512], [512], 32, 8),
    "8B 2048 new + 64 decode rows at 8K-128K": ([2048] + [8 * K * (1 + i % 16) for i in range(64)], [2048] + [1] * 64,
                                                32, 8),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BALANCE))
def test_balance_at_the_issues_shapes(name):
    seq_lens, query_lens, hq, hkv = BALANCE[name]
    for dtype, cache_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, FP8)):
        bal = prefill_attention.balance(seq_lens, query_lens, hq, hkv, num_sms=132, cache_dtype=cache_dtype)
        tokens = 128 // (hq // hkv)  # new tokens per query tile (128 rows on sm_90)
        total = hkv * sum(min(s - q + min(j + tokens, q), s) for s, q in zip(seq_lens, query_lens)
                          for j in range(0, q, tokens))  # fmt: skip
        assert sum(bal.work) == total  # every tile's causal KV range planned, once per KV head
        assert bal.largest <= 2 * bal.mean, (name, bal.largest, bal.mean)  # the issue's target
        assert bal.makespan <= 1.25 * bal.mean, (name, bal.makespan, bal.mean)


def test_balance_splits_the_straggler():
    # The decode row at 128K is cut into chunks about the size of the prefill tiles' share: before
    # the plan it was one program walking 128K keys (117x an SM's share of the step).
    bal = prefill_attention.balance([512, 128 * K], [512, 1], 16, 1, num_sms=132)
    assert bal.largest < 128 * K / 100 and len(bal.work) > 132


def test_plan_built_once_per_forward_pass(monkeypatch):
    # A 30-layer model: a step of two prefill chunks, then a mixed step (a chunk beside a decode
    # row), with attention on the triton kernel: one plan per forward pass, and the logits of the
    # torch reference.
    from llama_kernels.llm import LLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=30, num_heads=2,
                         num_kv_heads=1, head_dim=64, max_position_embeddings=64)  # fmt: skip
    llm = LLM.from_config(config, device="cpu", dtype="float32", max_context=64, max_batch=2, seed=3)
    builds = []
    build = attention_plan.build_plan
    monkeypatch.setattr(attention_plan, "build_plan", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(triton_attention, "CPU_SMS", 1)  # the interpreter runs every program: few of them
    auto_order = backends.auto_order
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)

    def step(starts, news, backend):
        monkeypatch.setattr(backends, "auto_order", lambda op, *a: ((backend, "test"),)
                            if op == "paged_prefill_attention" else auto_order(op, *a))  # fmt: skip
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, news)])
        rows = torch.repeat_interleave(torch.arange(2), torch.tensor(news))
        lens = torch.tensor([s + n for s, n in zip(starts, news)], dtype=torch.int32)
        batch = AttentionBatch(positions, llm.cache.slots(table, positions, rows), table, lens,
                               torch.tensor(news, dtype=torch.int32))  # fmt: skip
        ids = torch.randint(0, 64, (sum(news),), generator=torch.Generator().manual_seed(sum(starts)))
        with torch.inference_mode():
            return llm.model(ids, batch, llm.cache)

    step([0, 0], [5, 21], "torch")  # fills the cache
    want = step([5, 21], [4, 1], "torch")
    assert builds == []
    got = [step([5, 21], [4, 1], "triton") for _ in range(2)]  # rewrites the same k/v
    assert len(builds) == 2  # one per forward pass, not one per layer (30)
    for g in got:
        assert_rel_close(g, want, 1e-4)


def test_mixed_benchmark_smoke_and_full_size_memory(tmp_path):
    # The benchmark's CPU smoke run writes its JSON; its full-size cases (built one at a time) each
    # fit in 60 GiB of GPU memory.
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixed_attention.py"
    spec = importlib.util.spec_from_file_location("bench_mixed_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "mixed.json"
    rows = bench.main(["--smoke", "--backends", "triton", "--out", str(out)])
    assert rows and all(t > 0 for r in rows for t in r["times_us"].values()) and rows[0]["ratio"] > 0
    assert json.loads(out.read_text())["rows"] == rows
    full = bench.specs(smoke=False)
    assert {(s.chunk, s.rows) for s in full} >= {(512, 1), (2048, 64)} and min(s.ctx for s in full) == 8 * K
    assert max(bench.peak_bytes(s) for s in full) < 60 * 2**30
