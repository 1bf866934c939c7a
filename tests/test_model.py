"""The Llama model against transformers' LlamaForCausalLM on a tiny random Llama 3.1 (GQA, llama3
RoPE scaling, positions past original_max_position_embeddings), loaded through our safetensors
loader: prefill logits, teacher-forced batched decode, FP8 KV cache, quantized linears, config parsing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_rel_close

from llama_kernels.llm import LLM
from llama_kernels.model import AttentionBatch, Fp8Linear, Int4Linear, Linear, LlamaConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread (see conftest)

transformers = pytest.importorskip("transformers")

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}  # fmt: skip
SEQ = 60  # tokens: well past original_max_position_embeddings


def tiny_hf_model(tie: bool) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(ROPE), max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped or missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    """(transformers model, its directory): untied as one safetensors file with a hand-written Llama 3.1
    config.json (rope_theta + rope_scaling with the key "type"); tied as shards with an index."""
    tie = request.param
    hf = tiny_hf_model(tie)
    path = tmp_path_factory.mktemp("tiny")
    if tie:
        hf.save_pretrained(path, max_shard_size="40KB")
        assert (path / "model.safetensors.index.json").exists()
    else:
        hf.save_pretrained(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("rope_parameters")
        cfg["rope_theta"] = 500000.0
        cfg["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in ROPE.items()}
        (path / "config.json").write_text(json.dumps(cfg))
    return hf, path


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


def teacher_forced(llm: LLM, seqs: list[torch.Tensor], n_prefill: list[int]) -> list[torch.Tensor]:
    """Logits [T_b, V] of each sequence: a batched prefill of its first n_prefill[b] tokens, then one
    batched decode step per remaining token (sequences drop out of the batch as they end)."""
    model, cache = llm.model, llm.cache
    width = -(-max(len(s) for s in seqs) // cache.block_size)
    table = torch.arange(len(seqs) * width, dtype=torch.int32).view(len(seqs), width)  # whole blocks each
    lens = list(n_prefill)
    positions = torch.cat([torch.arange(n) for n in lens])
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lens))
    n_new = torch.tensor(lens, dtype=torch.int32)
    batch = AttentionBatch(positions, cache.slots(table, positions, rows), table, n_new, query_lens=n_new)
    with torch.inference_mode():
        logits = model(torch.cat([s[:n] for s, n in zip(seqs, lens)]), batch, cache).float()
        out = [[*logits.split(lens)[b]] for b in range(len(seqs))]
        while active := [b for b in range(len(seqs)) if lens[b] < len(seqs[b])]:
            pos = torch.tensor([lens[b] for b in active])
            sub = table[torch.tensor(active)]
            batch = AttentionBatch(pos, cache.slots(sub, pos, torch.arange(len(active))), block_table=sub,
                                   seq_lens=(pos + 1).to(torch.int32))  # fmt: skip
            step = model(torch.stack([seqs[b][lens[b]] for b in active]), batch, cache).float()
            for row, b in enumerate(active):
                out[b].append(step[row])
                lens[b] += 1
    return [torch.stack(o) for o in out]


def test_prefill_logits_match_transformers(tiny):
    hf, path = tiny
    llm = LLM.from_pretrained(path, max_context=128, progress=False)
    assert llm.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert llm.config.rope_scaling["factor"] == 8.0
    ids = tokens(SEQ, seed=1)
    assert_rel_close(llm.logits(ids), hf_logits(hf, ids), 1e-5, "logits")


def test_batched_decode_logits_match_transformers(tiny):
    hf, path = tiny
    llm = LLM.from_pretrained(path, max_context=128, progress=False)
    seqs = [tokens(SEQ, seed=2), tokens(45, seed=3), tokens(50, seed=4)]
    for b, got in enumerate(teacher_forced(llm, seqs, [20, 33, 1])):
        assert_rel_close(got, hf_logits(hf, seqs[b]), 1e-5, f"sequence {b} logits")


def test_fp8_kv_cache_decode_close_to_transformers(tiny):
    hf, path = tiny
    llm = LLM.from_pretrained(path, max_context=128, kv_cache_dtype="fp8", progress=False)
    assert llm.cache.k[0].dtype == torch.float8_e4m3fn
    seqs = [tokens(SEQ, seed=5), tokens(40, seed=6)]
    got = teacher_forced(llm, seqs, [30, 12])
    assert all(((s > 0) & torch.isfinite(s)).all() for s in llm.cache.k_scale + llm.cache.v_scale)
    for b in range(2):
        # prefill (chunked prefill attends over the cache too) and decode read FP8 k/v: measured 0.043-0.047,
        # one e4m3 rounding of every cached k and v (FP8_TOL is 0.045 for one rounding)
        assert_rel_close(got[b], hf_logits(hf, seqs[b]), 0.06, f"sequence {b} logits over the FP8 cache")


def test_bfloat16_model_close_to_transformers(tiny):
    hf, path = tiny
    llm = LLM.from_pretrained(path, dtype="bfloat16", max_context=128, progress=False)
    assert llm.model.layers[0].attention.wqkv.weight.dtype == torch.bfloat16
    assert llm.cache.k[0].dtype == torch.bfloat16
    seqs = [tokens(SEQ, seed=9), tokens(30, seed=10)]
    for b, got in enumerate(teacher_forced(llm, seqs, [40, 10])):  # measured 0.011-0.012
        assert_rel_close(got, hf_logits(hf, seqs[b]), 0.025, f"bfloat16 sequence {b} logits")


@pytest.mark.parametrize("quant,policy", [("fp8", "all"), ("fp8", "meta"), ("int4", "all")])
def test_quantize_model_swaps_the_policy_linears(tiny, quant, policy):
    hf, path = tiny
    llm = LLM.from_pretrained(path, max_context=128, progress=False)
    ids = tokens(SEQ, seed=7)
    ref = llm.logits(ids)
    quantize_model(llm.model, quant, policy)
    kinds = {name: type(m) for name, m in llm.model.named_modules() if isinstance(m, (Linear, Fp8Linear, Int4Linear))}
    q = Fp8Linear if quant == "fp8" else Int4Linear
    if policy == "all":
        assert all(kind is q for name, kind in kinds.items() if name != "output")
    else:  # 2 layers: the first and the last are both kept
        assert all(kind is Linear for kind in kinds.values())
    assert kinds.get("output", Linear) is Linear
    err = (llm.logits(ids) - ref).norm() / ref.norm()
    # measured on this random model: fp8 0.10-0.11, int4 0.26-0.28 ("meta" quantizes nothing here: 0)
    assert err < {"fp8": 0.16, "int4": 0.4}[quant], f"{quant}: logits relative error {err:.3f}"


def test_quantized_load_equals_quantize_after_load(tiny):
    """Online quantization while streaming gives the same model as quantize_model on the loaded one."""
    hf, path = tiny
    ids = tokens(SEQ, seed=8)
    for quant in ("fp8", "int4"):
        online = LLM.from_pretrained(path, quant=quant, max_context=128, progress=False)
        after = LLM.from_pretrained(path, max_context=128, progress=False)
        quantize_model(after.model, quant)
        assert torch.equal(online.logits(ids), after.logits(ids)), quant


def test_config_rope_keys():
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    old = LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {**ROPE, "type": "llama3"}})
    new = LlamaConfig.from_hf({**base, "rope_parameters": {**ROPE, "rope_theta": 5e5}})
    assert old.rope_theta == new.rope_theta == 5e5 and old.rope_scaling["factor"] == new.rope_scaling["factor"]
    assert old.head_dim == 16 and old.num_kv_heads == 4
    plain = LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "default"}, "eos_token_id": [2, 3]})
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0 and plain.eos_token_ids == (2, 3)
    linear = LlamaConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        LlamaConfig.from_hf({**base, "model_type": "qwen2"})
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        LlamaConfig.from_hf({**base, "num_key_value_heads": 3})
