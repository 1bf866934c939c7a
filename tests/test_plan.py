"""The memory planner: exact parameter counts, per-GPU bytes, the fit / no-fit cases of the
issue, the largest context x batch, the errors, and `llama-kernels plan`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from llama_kernels import cli
from llama_kernels.plan import (
    PRESETS,
    check_fits,
    kv_cache_bytes_per_token,
    load_config,
    parameter_counts,
    parse_bytes,
    plan,
)

GiB = 1 << 30
H100 = 80 * GiB
# A config with every optional key set, biases included (no preset has them).
TINY_BIAS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=100, tie_word_embeddings=False,
                 max_position_embeddings=256, attention_bias=True, mlp_bias=True)  # fmt: skip


# --- parameter counts ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PRESETS, "tiny-bias"])
def test_parameter_counts_match_transformers(name):
    """Every part counted by transformers' own LlamaForCausalLM, built on the meta device."""
    transformers = pytest.importorskip("transformers")
    config = TINY_BIAS if name == "tiny-bias" else PRESETS[name]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    parts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    for param_name, p in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        part = next(k for k, key in [("embedding", "embed_tokens"), ("attention", "self_attn"), ("mlp", ".mlp."),
                                     ("norms", "norm"), ("lm_head", "lm_head")] if key in param_name)  # fmt: skip
        parts[part] += p.numel()
    assert parameter_counts(config) == {**parts, "total": sum(parts.values())}


def test_known_parameter_figures():
    h, i, layers, vocab = 16384, 53248, 126, 128256
    per_layer = 2 * h * h + 2 * 1024 * h + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    assert parameter_counts("llama-3.1-405b")["total"] == 2 * vocab * h + layers * per_layer + h
    figures = {"llama-3.1-405b": 405.85, "llama-3.1-70b": 70.55, "llama-3.1-8b": 8.03, "llama-3.2-1b": 1.24,
               "llama-3.2-3b": 3.21, "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98}  # fmt: skip
    for name, billions in figures.items():
        assert round(parameter_counts(name)["total"] / 1e9, 2) == billions, name
    assert parameter_counts("llama-3.2-1b")["lm_head"] == 0  # tied


# --- bytes per GPU ---------------------------------------------------------------------------


def test_kv_cache_bytes_per_token():
    assert kv_cache_bytes_per_token("llama-3.1-8b", "bf16", 1) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_cache_bytes_per_token("llama-3.1-8b", "fp8", 1) == 65536
    assert kv_cache_bytes_per_token("llama-3.1-405b", "bf16", 8) == 2 * 126 * 1 * 128 * 2
    # 16 GPUs > 8 KV heads: each GPU holds one (replicated) head, so no less than at 8
    assert kv_cache_bytes_per_token("llama-3.1-405b", "bf16", 16) == 2 * 126 * 1 * 128 * 2
    assert kv_cache_bytes_per_token("llama-3.2-1b", "bf16", 2) == 2 * 16 * 4 * 64 * 2


def test_weights_are_sharded_exactly():
    w = plan("llama-3.1-405b", gpus=16, max_context=16).weight_bytes
    h, layers, d = 16384, 126, 128
    # q and o: 128 / 16 = 8 heads; k and v: 1 head each (replicated, 8 KV heads < 16 GPUs)
    assert w["attention"] == 2 * layers * (2 * 8 * d * h + 2 * 1 * d * h)
    assert w["mlp"] == 2 * layers * 3 * h * (53248 // 16)
    assert w["embedding"] == w["lm_head"] == 2 * (128256 // 16) * h
    assert w["norms"] == 2 * (2 * layers + 1) * h
    assert w["scales"] == 0
    # FP8 row-wise: one float32 per output row; row-parallel o/down hold every output row
    fp8 = plan("llama-3.1-405b", quant="fp8", gpus=8, max_context=16).weight_bytes
    rows = 2048 + 128 + 128 + 16384 + 6656 + 6656 + 16384  # q, k, v, o, gate, up, down on one of 8 GPUs
    assert fp8["scales"] == 4 * layers * rows
    assert fp8["mlp"] == layers * 3 * h * 6656 and fp8["embedding"] == 2 * 16032 * h
    # INT4: N*K/2 bytes plus, per group of 128, a 2-byte scale and a 1-byte zero point
    int4 = plan("llama-3.1-8b", quant="int4", max_context=16).weight_bytes
    mlp_elements = 32 * 3 * 4096 * 14336
    assert int4["mlp"] == mlp_elements // 2
    assert int4["scales"] == 3 * (mlp_elements + 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096)) // 128
    # fp8-meta: FFN in FP8 except the first and last layers; attention bf16
    meta = plan("llama-3.1-405b", quant="fp8-meta", gpus=8, max_context=16).weight_bytes
    assert meta["mlp"] == (2 * 2 + (layers - 2)) * 3 * h * 6656
    assert meta["attention"] == plan("llama-3.1-405b", gpus=8, max_context=16).weight_bytes["attention"]
    assert meta["scales"] == 4 * (layers - 2) * (6656 + 6656 + 16384)


def test_fewer_bytes_with_more_gpus_and_smaller_formats():
    def weights(quant="bf16", gpus=1):
        return sum(plan("llama-3.1-70b", quant=quant, gpus=gpus, max_context=16).weight_bytes.values())

    per_gpu = [weights(gpus=n) for n in (1, 2, 4, 8)]
    assert per_gpu == sorted(per_gpu, reverse=True) and len(set(per_gpu)) == 4
    assert weights("int4") < weights("fp8") < weights("fp8-meta") < weights("bf16")
    assert weights("fp8") < 0.52 * weights("bf16")
    for quant in ("int4", "fp8", "fp8-meta", "bf16"):
        assert weights(quant, 8) < weights(quant, 4)


@pytest.mark.parametrize("model,gpus,group,kv_heads,d", [("llama-3.1-8b", 1, 4, 8, 128),
                                                        ("llama-3.1-405b", 8, 16, 1, 128),
                                                        ("llama-3.2-1b", 1, 4, 8, 64)])  # fmt: skip
def test_activations_count_the_prefill_attention_plans_workspace(monkeypatch, model, gpus, group, kv_heads, d):
    """The prefill attention plan's partial outputs (issue 22) are in the activation budget at the size the
    kernel allocates for a plan on an H100 (132 SMs, sm_90 tiles): the planner's share is the kernel's
    own workspace, measured from a plan built for 132 SMs, and at most 35 MB."""
    from llama_kernels import plan as planner
    from llama_kernels.attention_workspace import workspace_shapes
    from llama_kernels.triton import attention_plan, prefill_attention

    with_ws = plan(model, gpus=gpus, max_context=4096)
    monkeypatch.setattr(planner, "workspace_bytes", lambda *a: 0)
    counted = with_ws.activation_bytes - plan(model, gpus=gpus, max_context=4096).activation_bytes
    cfg = prefill_attention.call_config(torch.bfloat16, group, d, torch.bfloat16, (9, 0))
    lens = torch.tensor([4096], dtype=torch.int32)
    built = attention_plan.build_plan(lens, lens, 4096, 4096, cfg.block_m // group, cfg.block_n,
                                      prefill_attention.programs(planner.GPU_SMS, kv_heads), 256)  # fmt: skip
    kernel = sum(4 * math.prod(s) for s in workspace_shapes(built.max_slots, kv_heads, cfg.block_m, d))
    assert counted == kernel and 0 < counted <= 35e6, (counted, kernel)
    assert with_ws.activation_bytes > counted + planner.GEMM_WORKSPACE  # added to, not instead of, the rest


# --- the cases -------------------------------------------------------------------------


def test_405b_fp8_fits_8_h100_with_128k_context():
    p = plan("llama-3.1-405b", quant="fp8", kv_dtype="bf16", gpus=8, gpu_mem_bytes=H100, max_context=131072)
    assert p.fits and p.headroom_bytes > 0
    assert p.kv_cache_bytes == 131072 * 2 * 126 * 128 * 2
    assert p.max_context_at_batch == 131072 and p.max_batch_at_context >= 1
    check_fits(p)
    assert plan("llama-3.1-405b", quant="fp8", gpus=8, gpu_mem_bytes=parse_bytes("80GB"), max_context=131072).fits


def test_405b_bf16_does_not_fit_8_h100():
    p = plan("llama-3.1-405b", quant="bf16", gpus=8, gpu_mem_bytes=H100, max_context=131072)
    assert not p.fits and p.headroom_bytes < 0
    assert sum(p.weight_bytes.values()) > H100  # the weights alone
    assert p.max_context_at_batch == 0 and p.max_batch_at_context == 0
    with pytest.raises(ValueError, match=r"(?s)does not fit on 8 x 80.00 GiB.*mlp.*KV cache.*headroom"):
        check_fits(p)


def test_70b_fp8_fits_one_h100_with_a_shorter_context():
    p = plan("llama-3.1-70b", quant="fp8", gpus=1, gpu_mem_bytes=H100)  # default: as much context as fits
    assert p.fits and p.max_context == p.max_context_at_batch
    assert 8192 <= p.max_context_at_batch < 131072
    assert not plan("llama-3.1-70b", quant="fp8", gpu_mem_bytes=H100, max_context=131072).fits
    assert not plan("llama-3.1-70b", quant="bf16", gpu_mem_bytes=H100).fits


@pytest.mark.parametrize(
    "model,kwargs",
    [
        ("llama-3.1-70b", dict(quant="fp8")),
        ("llama-3.1-8b", dict(gpu_mem_bytes=24 * GiB, batch=3)),
        ("llama-3.1-405b", dict(quant="fp8", gpus=8, batch=4, kv_dtype="fp8")),
        ("llama-2-70b", dict(quant="int4", gpus=2, gpu_mem_bytes=parse_bytes("24GB"))),
    ],
)
def test_largest_context_and_batch_are_tight(model, kwargs):
    p = plan(model, **kwargs)
    block, ctx = p.block_size, p.max_context_at_batch
    assert 0 < ctx and ctx % block == 0
    assert plan(model, max_context=ctx, **kwargs).fits
    assert ctx == p.max_positions or not plan(model, max_context=ctx + block, **kwargs).fits
    batch_kwargs = {k: v for k, v in kwargs.items() if k != "batch"}
    batch = plan(model, max_context=ctx, **kwargs).max_batch_at_context
    assert batch >= kwargs.get("batch", 1)
    assert plan(model, max_context=ctx, batch=batch, **batch_kwargs).fits
    assert not plan(model, max_context=ctx, batch=batch + 1, **batch_kwargs).fits


def test_fp8_kv_cache_halves_the_cache_and_adds_per_head_scales():
    bf16 = plan("llama-3.1-8b", max_context=4096)
    fp8 = plan("llama-3.1-8b", kv_dtype="fp8", max_context=4096)
    assert fp8.kv_cache_bytes == bf16.kv_cache_bytes // 2 + 2 * 32 * 8 * 4
    assert fp8.max_context_at_batch == bf16.max_context_at_batch == 131072
    assert fp8.max_batch_at_context > 1.9 * bf16.max_batch_at_context


def test_float32_activations_and_cache_are_planned_at_4_bytes():
    """The runner's dtype=float32 on CUDA holds float32 weights, activations and KV cache: planning
    them as bf16 under-counted by about 2x."""
    bf16 = plan("llama-3.2-1b", max_context=4096, batch=2)
    fp32 = plan("llama-3.2-1b", dtype="fp32", kv_dtype="fp32", max_context=4096, batch=2)
    assert fp32.kv_cache_bytes == 2 * bf16.kv_cache_bytes
    assert fp32.weight_bytes == {k: 2 * v for k, v in bf16.weight_bytes.items()}
    assert fp32.activation_bytes > 1.5 * bf16.activation_bytes
    int4 = (plan("llama-3.2-1b", quant="int4", dtype=d, max_context=4096) for d in ("bf16", "fp32"))
    assert next(int4).weight_bytes["mlp"] == next(int4).weight_bytes["mlp"]  # quantized linears keep their format
    assert "norms fp32" in fp32.format()


def test_runner_plans_real_dtypes_against_free_memory(monkeypatch):
    """llm.size_context on CUDA: the activation and KV dtypes it will allocate, and the memory that is
    free now (other processes may hold some), not the device's total."""
    from llama_kernels.llm import size_context
    from llama_kernels.model import LlamaConfig

    free, total = 48 * GiB, 80 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    c = PRESETS["llama-3.1-8b"]
    config = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                         intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                         num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"], head_dim=128,
                         max_position_embeddings=c["max_position_embeddings"])  # fmt: skip
    gpu = torch.device("cuda", 0)
    ctx = size_context(config, gpu, max_batch=4, dtype=torch.float32, kv_dtype=torch.float32)
    assert ctx == plan("llama-3.1-8b", dtype="fp32", kv_dtype="fp32", batch=4, gpu_mem_bytes=free).max_context
    assert ctx < plan("llama-3.1-8b", batch=4, gpu_mem_bytes=free).max_context // 1.9
    assert size_context(config, gpu, max_batch=4) == plan("llama-3.1-8b", batch=4, gpu_mem_bytes=free).max_context
    assert size_context(config, gpu, max_batch=4) < plan("llama-3.1-8b", batch=4, gpu_mem_bytes=total).max_context


def test_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["llama-3.1-8b"], "model_type": "llama"}))
    assert load_config(str(tmp_path)) == load_config(str(tmp_path / "config.json"))
    assert plan(str(tmp_path), max_context=1024).weight_bytes == plan("llama-3.1-8b", max_context=1024).weight_bytes
    assert parameter_counts(str(tmp_path / "config.json")) == parameter_counts("llama-3.1-8b")


# --- errors ----------------------------------------------------------------------------------


def test_gpus_that_do_not_divide_the_heads():
    valid_405b = r"valid choices: 1, 2, 4, 8, 16, 32, 64, 128$"
    with pytest.raises(ValueError, match=r"gpus=3: .*num_attention_heads=128.*" + valid_405b):
        plan("llama-3.1-405b", gpus=3)
    with pytest.raises(ValueError, match=r"gpus=5: .*llama-3.2-3b.*num_attention_heads=24.*valid choices: 1, 2, 4, 8$"):
        kv_cache_bytes_per_token("llama-3.2-3b", gpus=5)  # 3 divides 24 heads but not the 8 KV heads


@pytest.mark.parametrize(
    "text,expected",
    [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("141GB", 141 * 10**9), ("79.5 gib", int(79.5 * 2**30)),
     ("512MiB", 2**29), ("1TB", 10**12)],
)  # fmt: skip
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["80", "80 gigs", "-1GB", "0GiB", "GiB", "", "80GiB extra"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="as a memory size; expected a positive number and a unit, e.g. 80GiB"):
        parse_bytes(text)


@pytest.mark.parametrize(
    "config,kwargs,match",
    [
        ("llama-4", {}, r"unknown preset 'llama-4'; presets: llama-2-7b, .*llama-3.1-405b, .*llama-3.2-3b"),
        ("/nowhere/config.json", {}, r"/nowhere/config.json: no such file"),
        ({"hidden_size": 64, "num_attention_heads": 4}, {},
         r"config is missing intermediate_size, num_hidden_layers, vocab_size, max_position_embeddings"),
        ({**PRESETS["llama-3.1-8b"], "num_hidden_layers": 0}, {}, r"num_hidden_layers=0; expected a positive integer"),
        ({**PRESETS["llama-3.1-8b"], "num_key_value_heads": 5}, {}, r"num_attention_heads=32 is not a multiple of"),
        ("llama-3.1-8b", dict(quant="fp4"), r"quant='fp4'; expected one of bf16, fp8, fp8-meta, int4"),
        ("llama-3.1-8b", dict(kv_dtype="int8"), r"kv_dtype='int8'; expected one of bf16, fp16, fp32, fp8"),
        ("llama-3.1-8b", dict(dtype="fp8"), r"dtype='fp8'; expected one of bf16, fp16, fp32"),
        ("llama-3.1-8b", dict(max_context=200000), r"max_context=200000 exceeds .*=131072"),
        ("llama-3.1-8b", dict(batch=0), r"batch=0; expected a positive integer"),
        ("llama-3.1-8b", dict(quant="int4", group_size=96), r"group_size=96 does not divide the 4096 input columns"),
    ],
)  # fmt: skip
def test_bad_input(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(config, **kwargs)


# --- `llama-kernels plan` ---------------------------------------------------------------------


def test_cli_405b_fp8_fits():
    done = subprocess.run(
        [sys.executable, "-m", "llama_kernels", "plan", "llama-3.1-405b", "--quant", "fp8", "--gpus", "8",
         "--gpu-mem", "80GiB", "--max-context", "131072"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\nfits: " in done.stdout and "405.85B parameters" in done.stdout
    assert "largest context at batch 1: 131072 tokens" in done.stdout


def test_cli_405b_bf16_does_not_fit(capsys):
    assert cli.main(["plan", "llama-3.1-405b", "--gpus", "8", "--max-context", "131072"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: needs" in out and "\nfits" not in out


def test_cli_json(capsys):
    args = ["plan", "llama-3.1-70b", "--quant", "fp8", "--gpu-mem", "80GiB", "--json"]
    assert cli.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == plan("llama-3.1-70b", quant="fp8", gpu_mem_bytes=H100).to_dict()
    assert data["fits"] is True and data["max_context"] == data["max_context_at_batch"] > 8192
    assert cli.main(["plan", "llama-3.2-1b", "--dtype", "fp32", "--kv-dtype", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plan("llama-3.2-1b", dtype="fp32", kv_dtype="fp32").to_dict()


@pytest.mark.parametrize(
    "args,match",
    [
        (["llama-3.1-405b", "--gpus", "3"], "gpus=3: .*valid choices: 1, 2, 4, 8, 16, 32, 64, 128"),
        (["llama-3.1-8b", "--gpu-mem", "80"], "--gpu-mem: cannot read '80' as a memory size"),
        (["llama-9"], "unknown preset 'llama-9'; presets: llama-2-7b"),
    ],
)
def test_cli_bad_values_exit_1(capsys, args, match):
    """A bad value is one line, `llama-kernels plan: error: ...`, exit status 1, as in every command."""
    assert cli.main(["plan", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama-kernels plan: error: ") and err.count("\n") == 1 and re.search(match, err)


def test_cli_usage_error_exits_2_with_the_plan_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "llama-3.1-8b", "--quant", "fp4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: llama-kernels plan ") and "argument --quant: invalid choice: 'fp4'" in err


def test_nothing_fits_is_said_plainly(capsys):
    """Not "largest batch at context 16: 0": one sentence that nothing fits, and what would help."""
    assert cli.main(["plan", "llama-3.1-405b", "--gpus", "1"]) == 1
    out = capsys.readouterr().out
    assert "nothing fits: not even one sequence of 16 tokens (one KV block) beside the weights" in out
    assert "largest batch at context" not in out and "largest context at batch" not in out


def test_llama_3_and_3_3_presets():
    """Llama 3 (8K positions) and 3.3 70B (3.1 70B's shapes) are presets too."""
    p3, p31 = plan("llama-3-8b", max_context=8192), plan("llama-3.1-8b", max_context=8192)
    assert p3.parameters == p31.parameters and p3.weight_bytes == p31.weight_bytes
    with pytest.raises(ValueError, match="max_context=8193 exceeds llama-3-8b's max_position_embeddings=8192"):
        plan("llama-3-8b", max_context=8193)
    assert plan("llama-3.3-70b", quant="fp8").to_dict() | {"model": ""} == plan(
        "llama-3.1-70b", quant="fp8").to_dict() | {"model": ""}
    assert plan("llama-3-70b").parameters == plan("llama-3.1-70b").parameters


# --- a speculative draft model --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(quant="fp8", batch=8), dict(quant="int4", gpus=2, kv_dtype="fp8", batch=3, gpu_mem_bytes=12 * GiB)])
def test_a_draft_model_is_counted(kwargs):
    """plan(draft=...): the draft's weights are its own plan's (same formats, same GPUs), its KV cache that of
    batch x max_context tokens of its own, the activations the larger model's; the context that fits shrinks
    and stays tight; the table and JSON show them."""
    alone = plan("llama-3.1-8b", **kwargs)
    p = plan("llama-3.1-8b", draft="llama-3.2-1b", **kwargs)
    ctx = p.max_context
    assert p.draft == "llama-3.2-1b" and p.draft_parameters == parameter_counts("llama-3.2-1b")["total"]
    draft_alone = plan("llama-3.2-1b", max_context=ctx, **kwargs)
    assert p.draft_weight_bytes == sum(draft_alone.weight_bytes.values())
    assert p.draft_kv_cache_bytes == draft_alone.kv_cache_bytes > 0
    same_ctx = plan("llama-3.1-8b", max_context=ctx, **kwargs)
    assert p.kv_cache_bytes == same_ctx.kv_cache_bytes and p.weight_bytes == same_ctx.weight_bytes
    rope = ctx * 64 * 4  # the draft's cos/sin tables (head_dim 64, float32)
    assert p.activation_bytes == same_ctx.activation_bytes + rope  # the 8B's activations are the larger
    assert p.total_bytes > same_ctx.total_bytes + p.draft_weight_bytes + p.draft_kv_cache_bytes
    assert 0 < ctx == p.max_context_at_batch < alone.max_context_at_batch
    assert p.fits and not plan("llama-3.1-8b", draft="llama-3.2-1b", max_context=ctx + 16, **kwargs).fits
    text = p.format()
    assert "speculative draft llama-3.2-1b: 1.24B parameters" in text
    assert re.search(rf"\ndraft weights \(llama-3.2-1b\) +{p.draft_weight_bytes / GiB:.2f}\n", text)
    assert f"draft KV cache ({p.batch} x {ctx} tokens)" in text
    assert p.to_dict()["draft_kv_cache_bytes"] == p.draft_kv_cache_bytes
    assert "draft" not in alone.format()


def test_a_draft_that_does_not_fit_is_one_line(monkeypatch):
    """70B FP8 fits one H100 at 8K tokens alone; with an 8B draft (FP8 too) it does not: check_fits says so in
    one line naming the draft and its bytes, as does llm.size_context, before anything loads; a model that
    does not fit without its draft still gets the table."""
    from llama_kernels.llm import size_context

    assert plan("llama-3.1-70b", quant="fp8", max_context=8192).fits
    p = plan("llama-3.1-70b", quant="fp8", max_context=8192, draft="llama-3.1-8b")
    one_line = (r"^the draft model llama-3.1-8b does not fit beside llama-3.1-70b on 1 x 80.00 GiB GPUs at 1 x 8192 "
                r"tokens: it needs \d+\.\d\d GiB per GPU \(weights 8.46, KV cache 1.00\), \d+\.\d\d GiB are left; use "
                r"a smaller draft, a shorter context or batch, or n-gram speculation$")  # fmt: skip
    with pytest.raises(ValueError, match=one_line):
        check_fits(p)
    with pytest.raises(ValueError, match="(?s)^llama-3.1-405b does not fit .*\n.*draft weights"):
        check_fits(plan("llama-3.1-405b", quant="fp8", max_context=8192, draft="llama-3.1-8b"))
    config, draft = (_llama_config(PRESETS[name]) for name in ("llama-3.1-70b", "llama-3.1-8b"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (H100, H100))
    gpu = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=one_line):
        size_context(config, gpu, 8192, quant="fp8", max_batch=1, name="llama-3.1-70b", draft=draft,
                     draft_name="llama-3.1-8b")  # fmt: skip
    # sized by the planner with the draft counted
    assert size_context(config, gpu, quant="fp8", max_batch=1, draft=_llama_config(PRESETS["llama-3.2-1b"])) == plan(
        "llama-3.1-70b", quant="fp8", draft="llama-3.2-1b").max_context < plan("llama-3.1-70b", quant="fp8").max_context


def _llama_config(c: dict):
    from llama_kernels.model import LlamaConfig

    return LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                       intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                       num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                       head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                       tie_word_embeddings=c["tie_word_embeddings"],
                       max_position_embeddings=c["max_position_embeddings"])  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(draft="llama-2-7b"), "draft llama-2-7b: vocab_size=32000, llama-3.1-8b's is 128256; a draft model needs"),
        (dict(draft="llama-3.2-3b", gpus=16), "gpus=16: tensor parallel over 16 GPUs cannot split llama-3.2-3b"),
        (dict(draft="llama-3-8b", max_context=16384), "max_context=16384 exceeds draft llama-3-8b's max_position"),
    ],
)
def test_bad_drafts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan("llama-3.1-8b", **kwargs)


def test_a_draft_caps_the_context():
    p = plan("llama-3.1-8b", quant="fp8", draft="llama-3-8b")
    assert p.max_context == p.max_context_at_batch == p.max_positions == 8192


def test_cli_draft(capsys):
    assert cli.main(["plan", "llama-3.1-8b", "--quant", "fp8", "--batch", "8", "--draft", "llama-3.2-1b"]) == 0
    out = capsys.readouterr().out
    assert "draft weights (llama-3.2-1b)" in out and "draft KV cache (8 x " in out and "\nfits: " in out
    assert cli.main(["plan", "llama-3.1-8b", "--draft", "llama-3.2-1b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plan("llama-3.1-8b", draft="llama-3.2-1b").to_dict()


def test_the_verify_graphs_pool_is_counted(monkeypatch, capsys):
    """spec_tokens = k: the CUDA-graph pool holds a verify step of batch (k + 1) + 1 tokens with every
    token's logits (engine/runner.py: verify_layout) when it is larger than a decode step's; size_context
    plans with it; plan --num-speculative-tokens."""
    from llama_kernels.llm import size_context
    from llama_kernels.plan import _activation_bytes, _model

    base = plan("llama-3.1-8b", quant="fp8", batch=8, max_context=8192)
    p = plan("llama-3.1-8b", quant="fp8", batch=8, max_context=8192, spec_tokens=5)
    assert p.cuda_graph_pool_bytes == _activation_bytes(_model("llama-3.1-8b"), 1, "fp8", 49, 49, 2)
    assert p.cuda_graph_pool_bytes > base.cuda_graph_pool_bytes
    assert p.total_bytes > base.total_bytes and p.kv_cache_bytes == base.kv_cache_bytes
    with pytest.raises(ValueError, match="spec_tokens=-1; expected an int >= 0"):
        plan("llama-3.1-8b", spec_tokens=-1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * GiB, H100))
    config = _llama_config(PRESETS["llama-3.1-8b"])
    got = size_context(config, torch.device("cuda", 0), quant="fp8", max_batch=64, spec_tokens=7)
    assert got == plan("llama-3.1-8b", quant="fp8", batch=64, gpu_mem_bytes=24 * GiB, spec_tokens=7).max_context
    assert cli.main(["plan", "llama-3.1-8b", "--quant", "fp8", "--batch", "8", "--max-context", "8192",
                     "--num-speculative-tokens", "5", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["cuda_graph_pool_bytes"] == p.cuda_graph_pool_bytes
