"""Integration: a tiny random Llama (2 layers, GQA 4/2 heads, head_dim 64) gives the same logits and greedy
tokens with every op on the `triton` backend (under the interpreter without a GPU) as on the `torch`
backend, in bf16, FP8 and INT4: a batched prefill of two prompts, then several decode steps, so each
Triton kernel runs where the model calls it (norms, FP8 quantization and GEMM, INT4 GEMM, RoPE + cache
write, paged prefill attention, decode attention)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close

from llama_kernels import backends
from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread (see conftest)

pytest.importorskip("triton")

CONFIG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, rope_theta=500000.0, tie_word_embeddings=False,
                     max_position_embeddings=64)  # fmt: skip
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 128, 64, 33], [200, 1, 77, 9, 31]]  # 11 and 5 tokens
NEW = 4  # tokens generated per prompt: the first from prefill, 3 from decode steps
SEED = 1  # weights whose greedy choices are decisive: top-2 logit margins >= 0.1 (bf16, int4) and 0.2 (fp8)
# Relative error of the triton logits against the torch logits, measured per step: bf16 0-0.009, int4
# 0.015-0.017 (the same math rounded in another order), fp8 0.040-0.049: the ops agree alone (same FP8
# codes), but bf16-level differences upstream flip some activations to the neighbouring FP8 value.
TOLS = {None: 0.02, "fp8": 0.08, "int4": 0.03}


OPS = {None: {"add_rms_norm", "rope_and_cache", "paged_prefill_attention", "decode_attention"}}
OPS["fp8"] = OPS[None] | {"add_rms_norm_fp8", "quantize_fp8", "fp8_gemm"}
OPS["int4"] = OPS[None] | {"int4_gemm"}


def run(llm: LLM, backend: str, monkeypatch) -> tuple[torch.Tensor, list[list[int]], set[tuple[str, str]]]:
    """(logits [steps, B, V] float32 of the prefill's last tokens then of each decode step, the greedy
    tokens of LLM.generate_ids, the (op, backend) pairs called) with every op forced to `backend`."""
    monkeypatch.setenv(backends.ENV_VAR, backend)
    used: set[tuple[str, str]] = set()
    select = backends.select
    monkeypatch.setattr(backends, "select", lambda op, dev, be=None: used.add((op, select(op, dev, be)[0]))
                        or select(op, dev, be))  # fmt: skip
    steps = []
    forward = llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda *a, **k: steps.append(forward(*a, **k).float()) or steps[-1])
    tokens = llm.generate_ids(PROMPTS, max_new_tokens=NEW, stop_ids=())
    monkeypatch.undo()
    return torch.stack(steps), tokens, used


@pytest.mark.parametrize("quant", [None, "fp8", "int4"], ids=["bf16", "fp8", "int4"])
def test_triton_backend_matches_torch_in_the_model(quant, monkeypatch):
    llm = LLM.from_config(CONFIG, quant=quant, device="cpu", dtype="bfloat16", max_context=32, max_batch=2, seed=SEED)
    ref_logits, ref_tokens, ref_used = run(llm, "torch", monkeypatch)
    logits, tokens, used = run(llm, "triton", monkeypatch)
    assert ref_used == {(op, "torch") for op in OPS[quant]} and used == {(op, "triton") for op in OPS[quant]}
    assert logits.shape == (NEW, 2, CONFIG.vocab_size)
    for step in range(NEW):
        assert_rel_close(logits[step], ref_logits[step], TOLS[quant], f"{quant or 'bf16'} logits of step {step}")
    assert tokens == ref_tokens
    assert all(len(t) == NEW for t in tokens)


def test_prefill_on_a_kernel_backend_never_calls_sdpa(monkeypatch):
    """Prefill attends through ops.paged_prefill_attention, never through F.scaled_dot_product_attention
    (whose 3-D calls took the math path on GPUs: fp32 [Hq, n, n] scores): with every op on triton,
    a prefill in several chunks over the paged cache runs with SDPA made to fail."""
    llm = LLM.from_config(CONFIG, device="cpu", dtype="bfloat16", max_context=32, max_batch=2, seed=SEED,
                          prefill_chunk=4)  # fmt: skip
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: pytest.fail("prefill called scaled_dot_product_attention"))  # fmt: skip
    tokens = llm.generate_ids(PROMPTS, max_new_tokens=2, stop_ids=())
    assert [len(t) for t in tokens] == [2, 2]
