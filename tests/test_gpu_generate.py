"""Decode as CUDA graphs (one per batch-size bucket) against eager decode: the same logits and greedy
tokens, on a tiny random model (bf16, FP8, INT4, FP8 KV cache) and on SmolLM2. The graphs' static,
padded inputs are also checked on the CPU, where the rest cannot run."""

from __future__ import annotations


import pytest
import torch
from conftest import assert_rel_close, needs_smollm2

from llama_kernels.llm import LLM
from llama_kernels.model import AttentionBatch, LlamaConfig
from llama_kernels.engine.runner import DecodeGraphs

CONFIG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, max_position_embeddings=64)  # fmt: skip
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [200, 1, 77], [9, 31], [4, 4, 4, 4, 4, 4, 4, 4, 4], [60]]


def test_padded_static_inputs_give_the_live_rows_logits():
    """What a graph replays, run eagerly on the CPU: 3 live sequences in bucket 4 (one padding row, slot -1)
    with the full-context block table give the live rows' logits and write exactly their k/v."""
    torch.set_num_threads(1)
    llm = LLM.from_config(CONFIG, device="cpu", max_context=64, max_batch=4, seed=0)
    model, cache = llm.model, llm.cache
    lens = [7, 3, 2]
    table = torch.arange(3, dtype=torch.int32)[:, None]  # [3, 1]: one block each
    positions = torch.cat([torch.arange(n) for n in lens])
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    n_new = torch.tensor(lens, dtype=torch.int32)
    with torch.inference_mode():
        model(torch.tensor([t for p in PROMPTS[:3] for t in p]),
              AttentionBatch(positions, cache.slots(table, positions, rows), table, n_new, n_new), cache)  # fmt: skip
        pos = torch.tensor(lens)
        tokens = torch.tensor([11, 12, 13])
        batch = AttentionBatch(pos, cache.slots(table, pos, torch.arange(3)), block_table=table,
                               seq_lens=(pos + 1).to(torch.int32))  # fmt: skip
        eager = model(tokens, batch, cache)
        after_eager = [k.clone() for k in cache.k + cache.v]
        bufs = DecodeGraphs.static_inputs(4, 4, torch.device("cpu"))  # W = 64 / 16 blocks
        DecodeGraphs.fill(bufs, tokens, batch)
        tok, p, slots, t, n = bufs
        assert slots.tolist() == [*batch.slot_mapping.tolist(), -1] and n.tolist() == [*(pos + 1).tolist(), 1]
        padded = model(tok, AttentionBatch(p, slots, block_table=t, seq_lens=n), cache)
    assert padded.shape == (4, CONFIG.vocab_size)
    assert_rel_close(padded[:3], eager, 1e-6, "live rows")
    live = batch.slot_mapping
    for a, b in zip(cache.k + cache.v, after_eager):  # [blocks, S, Hkv, D]
        a, b = a.flatten(0, 1).clone(), b.flatten(0, 1).clone()
        assert_rel_close(a[live], b[live], 1e-6, "the live tokens' k/v")  # M = 4 rows round like M = 3 rows
        a[live] = b[live] = 0
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), "the padding row wrote to the cache"

def test_no_graphs_off_cuda():
    llm = LLM.from_config(CONFIG, device="cpu", max_context=64, max_batch=2)
    assert llm.graphs is None
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(llm.model, llm.cache, 2, 64)


def _sampled_logits(llm: LLM, prompts, monkeypatch) -> tuple[list[torch.Tensor], list[list[int]]]:
    """(the logits each step sampled from, float32, the greedy tokens)."""
    seen = []
    runner = llm.engine.runner
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda *a, **k: seen.append(run(*a, **k).clone()) or seen[-1])
    tokens = llm.generate_ids(prompts, max_new_tokens=6, stop_ids=())
    monkeypatch.undo()
    return seen, tokens


@pytest.mark.gpu
@pytest.mark.parametrize("quant,kv", [(None, None), ("fp8", None), ("fp8", "fp8"), ("int4", None)])
def test_cuda_graphs_match_eager(quant, kv, monkeypatch):
    kw = dict(quant=quant, device="cuda", dtype="bfloat16", kv_cache_dtype=kv, max_context=64, max_batch=8, seed=1)
    graphed, eager = LLM.from_config(CONFIG, **kw), LLM.from_config(CONFIG, cuda_graphs=False, **kw)
    assert graphed.graphs is not None and eager.graphs is None
    for prompts in (PROMPTS[:1], PROMPTS[:3], PROMPTS, PROMPTS[:1]):  # buckets 1, 4 and 8 (padded), 1 again
        got, got_tokens = _sampled_logits(graphed, prompts, monkeypatch)
        ref, ref_tokens = _sampled_logits(eager, prompts, monkeypatch)
        # the same kernels on the live rows; decode attention may split the longer block table differently
        for step, (g, r) in enumerate(zip(got, ref)):
            assert_rel_close(g, r, 0.02, f"{quant}/{kv} batch {len(prompts)} step {step} logits")
        assert got_tokens == ref_tokens
    assert sorted(graphed.graphs.graphs) == [1, 4, 8]


@pytest.mark.gpu
@needs_smollm2
def test_smollm2_graphs_give_the_eager_text():
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "1, 2, 3,"]
    graphed = LLM.from_pretrained(None, device="cuda", max_context=256, max_batch=4, progress=False)
    eager = LLM.from_pretrained(None, device="cuda", max_context=256, max_batch=4, progress=False, cuda_graphs=False)
    text = graphed.generate(prompts, max_new_tokens=32, chat=True)
    assert text == eager.generate(prompts, max_new_tokens=32, chat=True)
    assert "Paris" in text[0]
