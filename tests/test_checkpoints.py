"""Quantized checkpoint formats (Meta fbgemm FP8, compressed-tensors FP8 and INT4, AWQ, GPTQ), each
written here from a tiny bf16 Llama with that format's tensor names, dtypes and config.json, then
loaded and compared with the unquantized model's logits; their preflight errors; `quantize` round
trips; llama3 RoPE in GGUF (rope_freqs.weight)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from llama_kernels.llm import LLM
from llama_kernels.loader import CheckpointError, open_checkpoint
from llama_kernels.model.linear import Fp8Linear, Fp8StaticLinear, Int4Linear, Linear

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread (see conftest)

transformers = pytest.importorskip("transformers")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(bf16 Hugging Face directory, its tensors, input amax of each linear, token ids, reference logits)."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("bf16")
    hf.save_pretrained(path)
    ids = torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(1))
    amax = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: amax.__setitem__(n, float(args[0].abs().max())))
             for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    with torch.no_grad():
        hf.float()(ids[None])
    for h in hooks:
        h.remove()
    ref = LLM.from_pretrained(path, max_context=64, progress=False).logits(ids)
    return path, load_file(path / "model.safetensors"), amax, ids, ref


def write(src: Path, out: Path, tensors: dict | tuple[dict, dict], quantization_config: dict | None,
          **config) -> Path:  # fmt: skip
    """A checkpoint directory: the source's config.json with `quantization_config` (and `config`) set;
    `tensors` may be quantized()'s pair."""
    if isinstance(tensors, tuple):
        tensors = tensors[0]
    out.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, out / "model.safetensors")
    return out


def quantized(tensors: dict, convert, skip=()) -> tuple[dict, dict]:
    """(the tensors with every decoder linear's weight replaced by convert(module name, float32 weight)
    -> {suffix: tensor}, the same with those weights dequantized: convert's "dequantized" entry)."""
    out, dequantized = {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if module.endswith(LINEARS) and module not in skip:
            stored = convert(module, t.float())
            dequantized[name] = stored.pop("dequantized")
            out.update({f"{module}.{k}": v.contiguous() for k, v in stored.items()})
        else:
            out[name] = dequantized[name] = t
    return out, dequantized


def dequantized_logits(src, dequantized: dict, out: Path) -> torch.Tensor:
    """Logits of the unquantized model with the quantized weights as the test dequantized them."""
    return logits(write(src[0], out, dequantized, None), src[3])


def logits(path: Path, ids) -> torch.Tensor:
    return LLM.from_pretrained(path, max_context=64, progress=False).logits(ids)


def linear_types(path: Path) -> set[type]:
    llm = LLM.from_pretrained(path, max_context=64, progress=False)
    return {type(m) for m in llm.model.modules() if hasattr(m, "load") and hasattr(m, "in_features")}


def fp8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1, keepdim=True) / FP8_MAX  # [N, 1]
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


# --- Meta fbgemm FP8 --------------------------------------------------------------------------------


def fbgemm(src, out: Path, skip: list[str], **changes) -> Path:
    path, tensors, *_ = src

    def convert(module, w):
        q, scale = fp8_rowwise(w)
        return {"weight": q, "weight_scale": scale.float(), "dequantized": q.float() * scale}

    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": skip + ["lm_head"]}
    return write(path, out, quantized(tensors, convert, skip), {**qc, **changes})


def test_fbgemm_fp8(source, tmp_path):
    _, _, _, ids, ref = source
    skip = [f"model.layers.0.{m}" for m in LINEARS]  # Meta's recipe keeps the first (and last) layer in bf16
    path = fbgemm(source, tmp_path / "fp8", skip)
    llm = LLM.from_pretrained(path, max_context=64, progress=False)
    assert type(llm.model.layers[0].feed_forward.w13) is Linear
    w13 = llm.model.layers[1].feed_forward.w13
    assert type(w13) is Fp8Linear and w13.scale_ub == 1200.0
    err = rel_err(llm.logits(ids), ref)  # measured 0.047 (online --quant fp8 of all layers: 0.10)
    assert err < 0.07, err


def test_fbgemm_fp8_errors(source, tmp_path):
    path = fbgemm(source, tmp_path / "a", [])
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"quantization_config \(fbgemm_fp8\) stores it as FP8 row-wise "
                       r"\(weight, weight_scale\), but tensor\(s\) model.layers.1.mlp.up_proj.weight_scale are "
                       "missing"):  # fmt: skip
        open_checkpoint(path)
    # config.json keeps a module in bf16 that the file stores in FP8
    path = fbgemm(source, tmp_path / "b", [])
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = [f"model.layers.1.{m}" for m in LINEARS]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.1.\S+_proj.weight "
                       r"has dtype F8_E4M3, but config.json's quantization_config \(fbgemm_fp8\) keeps it "
                       "unquantized"):  # fmt: skip
        open_checkpoint(path)
    # q_proj in bf16 but k_proj and v_proj FP8: they are one fused linear here
    path = fbgemm(source, tmp_path / "c", ["model.layers.1.self_attn.q_proj"])
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.q_proj: unquantized, "
                       r"model.layers.1.self_attn.k_proj: FP8 row-wise.*fused into one linear"):  # fmt: skip
        open_checkpoint(path)
    # a weight_scale of the wrong shape
    path = fbgemm(source, tmp_path / "d", [])
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(256, dtype=torch.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.0.mlp.down_proj.weight_scale has "
                       r"shape \[256\]; expected \[256, 1\]"):  # fmt: skip
        logits(path, [1, 2])
    with pytest.raises(CheckpointError, match="already quantized"):
        LLM.from_pretrained(path, quant="fp8", progress=False)
    path = fbgemm(source, tmp_path / "e", [], quant_method="bitsandbytes")
    with pytest.raises(CheckpointError, match="quantization_config 'bitsandbytes' is not supported"):
        open_checkpoint(path)


# --- compressed-tensors -----------------------------------------------------------------------------


def ct_config(weights: dict, input_activations: dict | None, fmt: str, ignore: list[str]) -> dict:
    """quantization_config as llm-compressor writes it (one config group targeting every Linear)."""
    args = dict(actorder=None, block_structure=None, dynamic=False, group_size=None, observer="minmax",
                observer_kwargs={})  # fmt: skip
    group = {"targets": ["Linear"], "weights": {**args, **weights}, "output_activations": None,
             "input_activations": None if input_activations is None else {**args, **input_activations}}  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group},
            "ignore": ignore + ["lm_head"], "kv_cache_scheme": None, "quantization_status": "compressed"}  # fmt: skip


def ct_fp8(src, out: Path, static: bool, ignore=()) -> Path:
    """FP8 W8A8: static per-tensor weight and input scales (FP8), or per-channel weight scales with
    dynamic per-token activations (FP8-dynamic); scales in bf16 as llm-compressor stores them."""
    path, tensors, amax, *_ = src

    def convert(module, w):
        if static:
            scale = (w.abs().max() / FP8_MAX).to(torch.bfloat16).reshape(1)
            input_scale = torch.tensor([amax[module] / FP8_MAX], dtype=torch.bfloat16)
            extra = {"input_scale": input_scale}
        else:
            scale, extra = (w.abs().amax(1, keepdim=True) / FP8_MAX).to(torch.bfloat16), {}
        q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": scale, **extra, "dequantized": q.float() * scale.float()}

    fp8 = dict(num_bits=8, type="float", symmetric=True)
    weights = {**fp8, "strategy": "tensor" if static else "channel"}
    inputs = {**fp8, "strategy": "tensor"} if static else {**fp8, "strategy": "token", "dynamic": True}
    return write(path, out, quantized(tensors, convert, ignore),
                 ct_config(weights, inputs, "float-quantized", list(ignore)))  # fmt: skip


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors pack_to_int32 along dim 1: unsigned 4-bit values [R, C] -> int32 [R, C/8],
    value 8j + i in bits 4i..4i+3 of word j."""
    q = q.to(torch.int64).reshape(q.shape[0], -1, 8)
    words = (q << (4 * torch.arange(8))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def ct_int4(src, out: Path, symmetric: bool, group_size: int = 128, ignore=(), skip=()) -> tuple[Path, dict]:
    """INT4 W4A16 pack-quantized: signed values stored + 8, bf16 scales, asymmetric zero points packed along N;
    `ignore` goes to the config, the modules `skip` stay bf16."""
    path, tensors, *_ = src

    def convert(module, w):
        n, k = w.shape
        g = w.reshape(n, k // group_size, group_size)
        if symmetric:
            scale, zp = (g.abs().amax(-1) / 7).to(torch.bfloat16), torch.zeros(n, k // group_size)
        else:
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).to(torch.bfloat16)
            zp = (torch.round(-lo / scale.float()) - 8).clamp(-8, 7)
        q = (torch.round(g / scale.float()[..., None]) + zp[..., None]).clamp(-8, 7)
        dequantized = ((q - zp[..., None]) * scale.float()[..., None]).reshape(n, k)
        q = q.reshape(n, k)
        packed = {"weight_packed": pack_rows(q + 8), "weight_scale": scale, "dequantized": dequantized,
                  "weight_shape": torch.tensor([n, k], dtype=torch.int64)}  # fmt: skip
        if not symmetric:
            packed["weight_zero_point"] = pack_rows((zp + 8).T).T  # packed along N: [N/8, K/G]
        return packed

    weights = dict(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    stored, dequantized = quantized(tensors, convert, skip)
    return write(path, out, stored, ct_config(weights, None, "pack-quantized", list(ignore))), dequantized


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_compressed_tensors_fp8(source, tmp_path, static):
    _, _, _, ids, ref = source
    ignore = ["model.layers.0.mlp.down_proj"]
    path = ct_fp8(source, tmp_path / "ct", static, ignore)
    llm = LLM.from_pretrained(path, max_context=64, progress=False)
    layer = llm.model.layers[0]
    assert type(layer.feed_forward.w2) is Linear
    assert type(layer.attention.wqkv) is (Fp8StaticLinear if static else Fp8Linear)
    if static:  # q, k, v per-tensor scales requantized to their max; their input scales (equal) kept
        assert layer.attention.wqkv.weight_scale.shape == ()
        amax = source[2]["model.layers.0.self_attn.q_proj"] / FP8_MAX
        torch.testing.assert_close(float(layer.attention.wqkv.input_scale), amax, rtol=4e-3, atol=0)
    err = rel_err(llm.logits(ids), ref)  # measured 0.114 static, 0.098 dynamic
    assert err < 0.16, err


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compressed_tensors_int4(source, tmp_path, symmetric):
    _, _, _, ids, ref = source
    path, dequantized = ct_int4(source, tmp_path / "ct", symmetric,
                                ignore=["re:.*layers\\.1\\.mlp\\.down_proj$"], skip=["model.layers.1.mlp.down_proj"])
    llm = LLM.from_pretrained(path, max_context=64, progress=False)
    assert type(llm.model.layers[1].feed_forward.w2) is Linear
    w13 = llm.model.layers[1].feed_forward.w13
    assert type(w13) is Int4Linear and w13.group_size == 128 and (w13.zeros is None) == symmetric
    assert w13.scales.dtype == torch.bfloat16
    out = llm.logits(ids)
    err = rel_err(out, dequantized_logits(source, dequantized, tmp_path / "deq"))  # measured 0.0067
    assert err < 0.02, err  # activations are rounded to bf16 for the INT4 GEMM
    err = rel_err(out, ref)  # measured 0.32 sym, 0.30 asym (online --quant int4: 0.30)
    assert err < 0.45, err


def test_compressed_tensors_errors(source, tmp_path):
    path, _ = ct_int4(source, tmp_path / "a", symmetric=False)
    tensors = load_file(path / "model.safetensors")
    scale = "model.layers.0.mlp.up_proj.weight_scale"
    tensors[scale] = tensors[scale][:, :1].clone()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight_scale has shape \[512, 1\]; "
                       r"expected \[512, 2\]"):  # fmt: skip
        logits(path, [1, 2])
    path, _ = ct_int4(source, tmp_path / "b", symmetric=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"INT4 asym group-wise \(weight_packed, weight_scale, weight_shape, "
                       r"weight_zero_point\), but tensor\(s\) model.layers.0.mlp.down_proj.weight_zero_point are "
                       "missing"):  # fmt: skip
        open_checkpoint(path)
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weights 'int' 3-bit in format 'pack-quantized'; supported"):
        open_checkpoint(path)


# --- AWQ and GPTQ -----------------------------------------------------------------------------------


def int4_groups(w: torch.Tensor, group_size: int, symmetric: bool):
    """Round-to-nearest INT4 of w [N, K] in groups of consecutive inputs, fp16 scales as AutoAWQ and
    AutoGPTQ store them: (q [N, K] in 0..15, zero points [N, K/G], scales [N, K/G] fp16, dequantized)."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    if symmetric:  # GPTQ sym: range [-amax, amax], zero point 8
        scale = (2 * g.abs().amax(-1) / 15).half()
        zeros = torch.full(scale.shape, 8.0)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).half()
        zeros = torch.round(-lo / scale.float()).clamp(1, 15)
    q = (torch.round(g / scale.float()[..., None]) + zeros[..., None]).clamp(0, 15)
    dequantized = ((q - zeros[..., None]) * scale.float()[..., None]).reshape(n, k)
    return q.reshape(n, k), zeros, scale, dequantized


def awq(src, out: Path, skip=()) -> tuple[Path, dict]:
    """AutoAWQ GEMM: qweight [K, N/8] and qzeros [K/G, N/8] packed along N in the order 0 2 4 6 1 3 5 7,
    scales fp16 [K/G, N]."""
    path, tensors, *_ = src

    def pack(v: torch.Tensor) -> torch.Tensor:  # [R, C] -> [R, C/8]: word j, nibble i holds column 8j + order[i]
        return pack_rows(v.reshape(v.shape[0], -1, 8)[..., [0, 2, 4, 6, 1, 3, 5, 7]].reshape(v.shape))

    def convert(module, w):
        q, zeros, scale, dequantized = int4_groups(w, 128, symmetric=False)
        return {"qweight": pack(q.T), "qzeros": pack(zeros.T), "scales": scale.T, "dequantized": dequantized}

    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": list(skip) or None}  # fmt: skip
    stored, dequantized = quantized(tensors, convert, skip)
    return write(path, out, stored, qc, torch_dtype="float16"), dequantized


def gptq(src, out: Path, sym: bool, desc_act: bool) -> tuple[Path, dict]:
    """AutoGPTQ v1: qweight [K/8, N] packed along K, qzeros [K/G, N/8] storing zero - 1, scales fp16
    [K/G, N], g_idx int32 [K]; with desc_act, input channel perm[j] is in group j // G, one perm
    per layer input (q/k/v share theirs, as do gate/up)."""
    path, tensors, *_ = src
    G = 128

    def convert(module, w):
        n, k = w.shape
        perm = torch.arange(k)
        if desc_act:
            seed = sum(map(ord, module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up", "gate")))
            perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        q, zeros, scale, dequantized = int4_groups(w[:, perm], G, sym)
        original = torch.empty_like(perm)
        original[perm] = torch.arange(k)  # position of each input channel in perm
        q, dequantized = q[:, original], dequantized[:, original]
        g_idx = (original // G).to(torch.int32)
        return {"qweight": pack_rows(q).T, "qzeros": pack_rows((zeros - 1).T), "scales": scale.T, "g_idx": g_idx,
                "dequantized": dequantized}  # fmt: skip

    qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": desc_act, "sym": sym,
          "damp_percent": 0.01, "static_groups": False, "true_sequential": True,
          "checkpoint_format": "gptq"}  # fmt: skip
    stored, dequantized = quantized(tensors, convert)
    return write(path, out, stored, qc, torch_dtype="float16"), dequantized


@pytest.mark.parametrize("fmt", ["awq", "gptq-sym-desc_act", "gptq-asym"])
def test_awq_and_gptq(source, tmp_path, fmt):
    _, _, _, ids, ref = source
    if fmt == "awq":
        path, dequantized = awq(source, tmp_path / fmt, skip=["model.layers.0.mlp.down_proj"])
    else:
        path, dequantized = gptq(source, tmp_path / fmt, sym="asym" not in fmt, desc_act="desc_act" in fmt)
    llm = LLM.from_pretrained(path, max_context=64, progress=False)
    assert type(llm.model.layers[0].feed_forward.w2) is (Linear if fmt == "awq" else Int4Linear)
    wqkv = llm.model.layers[0].attention.wqkv
    assert type(wqkv) is Int4Linear and (wqkv.perm is not None) == ("desc_act" in fmt)
    out = llm.logits(ids)
    err = rel_err(out, dequantized_logits(source, dequantized, tmp_path / "deq"))  # measured 0.0065 to 0.0069
    assert err < 0.02, err  # activations are rounded to bf16 for the INT4 GEMM
    err = rel_err(out, ref)  # measured 0.28 awq, 0.35 gptq sym desc_act, 0.30 gptq asym
    assert err < 0.45, err


def test_awq_and_gptq_errors(source, tmp_path):
    path, _ = gptq(source, tmp_path / "a", sym=True, desc_act=True)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.g_idx"] = (torch.arange(256, dtype=torch.int32) // 128).flip(0)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers.1.attention.wqkv: its INT4 parts differ in group size, zero "
                       "points, scale dtype or g_idx order"):  # fmt: skip
        logits(path, [1, 2])
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["sym"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    tensors["model.layers.1.self_attn.k_proj.qzeros"] = torch.full((2, 16), -1, dtype=torch.int32)  # all 15
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: from_gptq: qzeros: 256 stored value\(s\) are 15"):
        logits(path, [1, 2])
    path, _ = awq(source, tmp_path / "b")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quantization_config \(awq\): version='gemv' zero_point=True; "
                       "supported: AWQ 'gemm'"):  # fmt: skip
        open_checkpoint(path)


# --- llama-kernels quantize -------------------------------------------------------------------------


def header(path: Path) -> dict:
    """{name: (dtype, shape)} over every safetensors file of a directory."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        out.update({k: (v["dtype"], v["shape"]) for k, v in meta.items() if k != "__metadata__"})
    return out


def test_quantize_fbgemm_fp8_round_trip(source, tmp_path):
    from llama_kernels.export import quantize_checkpoint

    path, _, _, ids, ref = source
    out = quantize_checkpoint(path, tmp_path / "fp8", "fp8", max_shard_bytes=400_000, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # policy all: a bound that never clamps (vLLM requires the key); policy meta's 1200 would clamp
    assert qc == {"quant_method": "fbgemm_fp8", "activation_scale_ub": 3.4028234663852886e38,
                  "modules_to_not_convert": ["lm_head"]}  # fmt: skip
    assert (out / "model.safetensors.index.json").exists() and (out / "generation_config.json").exists()
    h = header(out)
    assert h["model.layers.1.mlp.down_proj.weight"] == ("F8_E4M3", [256, 512])
    assert h["model.layers.1.mlp.down_proj.weight_scale"] == ("F32", [256, 1])
    assert h["model.layers.0.self_attn.k_proj.weight"] == ("F8_E4M3", [128, 256])
    assert h["model.embed_tokens.weight"] == ("BF16", [256, 256]) and h["lm_head.weight"] == ("BF16", [256, 256])
    # the same weights and activation quantization as quantizing at load (no activation reaches 1200)
    online = LLM.from_pretrained(path, quant="fp8", max_context=64, progress=False).logits(ids)
    torch.testing.assert_close(logits(out, ids), online, rtol=0, atol=1e-5)
    assert rel_err(online, ref) < 0.15  # measured 0.104
    loaded = LLM.from_pretrained(out, max_context=64, progress=False).model
    assert {m.scale_ub for m in loaded.modules() if isinstance(m, Fp8Linear)} == {None}
    meta = quantize_checkpoint(path, tmp_path / "meta", "fp8", policy="meta", progress=False)
    assert json.loads((meta / "config.json").read_text())["quantization_config"]["activation_scale_ub"] == 1200.0


def test_quantize_compressed_tensors_fp8_round_trip(source, tmp_path):
    from llama_kernels.export import quantize_checkpoint

    path, _, _, ids, ref = source
    out = quantize_checkpoint(path, tmp_path / "ct", "fp8", "compressed-tensors", policy="meta", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized" and qc["quantization_status"] == "compressed"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert (group["weights"]["strategy"], group["weights"]["num_bits"], group["weights"]["type"]) == ("channel", 8,
                                                                                                      "float")
    assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"
    # Meta's policy keeps attention and the first and last layers: with 2 layers, every linear
    assert set(qc["ignore"]) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in LINEARS} | {"lm_head"}
    out2 = quantize_checkpoint(path, tmp_path / "ct2", "fp8", "compressed-tensors", progress=False)
    h = header(out2)
    assert h["model.layers.0.mlp.gate_proj.weight"] == ("F8_E4M3", [512, 256])
    assert h["model.layers.0.mlp.gate_proj.weight_scale"] == ("BF16", [512, 1])
    llm = LLM.from_pretrained(out2, max_context=64, progress=False)
    assert type(llm.model.layers[0].attention.wqkv) is Fp8Linear
    err = rel_err(llm.logits(ids), ref)  # measured 0.104 (online --quant fp8: 0.104)
    assert err < 0.15, err


def test_quantize_awq_round_trip_cli(source, tmp_path):
    from llama_kernels.cli import main

    path, _, _, ids, ref = source
    assert main(["quantize", str(path), str(tmp_path / "awq"), "--quant", "int4"]) == 0
    out = tmp_path / "awq"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
    h = header(out)
    assert h["model.layers.0.mlp.down_proj.qweight"] == ("I32", [512, 32])  # [K, N/8]
    assert h["model.layers.0.mlp.down_proj.qzeros"] == ("I32", [4, 32])  # [K/G, N/8]
    assert h["model.layers.0.mlp.down_proj.scales"] == ("F16", [4, 256])  # [K/G, N]
    assert h["model.norm.weight"] == ("F16", [256])
    err = rel_err(logits(out, ids), ref)  # measured 0.30 (online --quant int4: 0.30)
    assert err < 0.45, err


# --- llama3 RoPE in GGUF ----------------------------------------------------------------------------


def llama_cpp_rope_factors(head_dim, theta, factor, low, high, old) -> torch.Tensor:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for a llama3 rope_scaling."""
    import math

    out = []
    for freq in 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0], ids=["llama3.1", "llama3.2"])
def test_gguf_rope_freqs_to_llama3_scaling(factor):
    from llama_kernels.loader.gguf_file import llama3_rope_scaling
    from llama_kernels.reference import rope_inv_freq

    factors = llama_cpp_rope_factors(128, 500000.0, factor, 1.0, 4.0, 8192)
    scaling = llama3_rope_scaling(factors, 128, 500000.0, Path("m.gguf"))
    assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}  # fmt: skip
    expected = rope_inv_freq(128, 500000.0, {**scaling})
    torch.testing.assert_close(expected, rope_inv_freq(128, 500000.0) / factors, rtol=1e-6, atol=0)
    assert llama3_rope_scaling(torch.ones(64), 128, 500000.0, Path("m.gguf")) is None
    with pytest.raises(CheckpointError, match=r"m.gguf: rope_freqs.weight does not follow llama3 RoPE scaling"):
        llama3_rope_scaling(1 + torch.rand(64, generator=torch.Generator().manual_seed(0)), 128, 500000.0,
                            Path("m.gguf"))  # fmt: skip


# --- FP8 KV-cache scales in the checkpoint (loader.kv_scales) ---------------------------------------


def with_kv_scales(src, out: Path, k: list[torch.Tensor], v: list[torch.Tensor], names=("self_attn.k_scale",
                   "self_attn.v_scale"), layers=(0, 1), tensors: dict | None = None, **extra) -> Path:  # fmt: skip
    """The source checkpoint (or `tensors`) plus per-layer k / v scale tensors under `names`
    (k's name, v's name) for `layers`, and `extra` tensors."""
    tensors = dict(src[1] if tensors is None else tensors)
    for i in layers:
        tensors[f"model.layers.{i}.{names[0]}"] = k[i].clone()  # clones: safetensors refuses shared storage
        tensors[f"model.layers.{i}.{names[1]}"] = v[i].clone()
    return write(src[0], out, {**tensors, **extra}, None)


def fp8_kv_llm(path: Path, **kw) -> LLM:
    return LLM.from_pretrained(path, max_context=64, kv_cache_dtype="fp8", **kw)


@pytest.mark.parametrize("fmt", ["ct-per-head", "ct-per-tensor-bf16", "output_scale", "modelopt-scalar"])
def test_fp8_kv_scales_from_the_checkpoint(source, tmp_path, capsys, fmt):
    """Scales a checkpoint carries are the cache's exactly (a scalar on every head), the engine does
    not calibrate them over, and the logits equal those of a cache given the same scales by hand."""
    calibrated = fp8_kv_llm(source[0], progress=False)  # the engine's calibration pass sets these
    k, v = calibrated.cache.k_scale, calibrated.cache.v_scale  # L x [Hkv=2] float32
    names = {"output_scale": ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
             "modelopt-scalar": ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale")}  # fmt: skip
    names = names.get(fmt, ("self_attn.k_scale", "self_attn.v_scale"))
    if fmt == "ct-per-head":  # not the calibrated scales, so a calibration pass would show
        k_ckpt, v_ckpt = [s * torch.tensor([1.25, 1.5]) for s in k], [s * torch.tensor([1.5, 1.25]) for s in v]
        want_k, want_v = k_ckpt, v_ckpt
    elif fmt == "ct-per-tensor-bf16":  # llm-compressor's kv_cache_scheme (strategy tensor): [1] in bf16
        k_ckpt, v_ckpt = [s.max().reshape(1).bfloat16() for s in k], [s.max().reshape(1).bfloat16() for s in v]
        want_k, want_v = [s.float().expand(2) for s in k_ckpt], [s.float().expand(2) for s in v_ckpt]
    else:  # scalars []
        k_ckpt, v_ckpt = [s.max() * 1.5 for s in k], [s.max() * 1.5 for s in v]
        want_k, want_v = [s.expand(2) for s in k_ckpt], [s.expand(2) for s in v_ckpt]
    extra = {"model.layers.0.self_attn.q_scale": torch.ones(1)}  # a query scale is skipped
    path = with_kv_scales(source, tmp_path / fmt, k_ckpt, v_ckpt, names, **extra)
    capsys.readouterr()
    llm = fp8_kv_llm(path)
    assert capsys.readouterr().err.count("KV cache: FP8 scales from the checkpoint") == 1
    # set before the engine started, and not overwritten by a calibration pass
    assert all(torch.equal(a, b) for a, b in zip(llm.cache.k_scale + llm.cache.v_scale, want_k + want_v))
    ids, ref = source[3], source[4]
    out = llm.logits(ids)
    assert torch.isfinite(out).all()
    calibrated.cache.set_scales(want_k, want_v)  # the same scales set by hand: the same logits
    torch.testing.assert_close(out, calibrated.logits(ids), rtol=0, atol=0)
    assert rel_err(out, ref) < 0.06, rel_err(out, ref)  # measured 0.042 (calibrated: 0.042)
    assert len(llm.generate_ids([ids.tolist()], max_new_tokens=4)[0]) == 4


def test_fp8_kv_scales_errors_and_clamping(source, tmp_path):
    ones = [torch.ones(1)] * 2
    # only layer 0 has them: one line naming layer 1, before any weight loads
    partial = with_kv_scales(source, tmp_path / "partial", ones, ones, layers=(0,))
    with pytest.raises(CheckpointError, match=r"layer 1 has no k scale \(model\.layers\.1\.self_attn\.k_scale\)") as e:
        fp8_kv_llm(partial, progress=False)
    assert "\n" not in str(e.value)
    # a cache that is not FP8 ignores them (even a partial set) and needs no scales
    plain = LLM.from_pretrained(partial, max_context=64, progress=False)
    torch.testing.assert_close(plain.logits(source[3]), source[4], rtol=0, atol=0)
    bad = {"nan": [torch.tensor([float("nan")])] * 2, "negative": [torch.tensor(-1.0)] * 2,
           "size": [torch.ones(3)] * 2}  # fmt: skip
    for what, scales in bad.items():
        path = with_kv_scales(source, tmp_path / what, scales, ones)
        with pytest.raises(CheckpointError, match="model.layers.0.self_attn.k_scale"):
            fp8_kv_llm(path, progress=False)
    both = with_kv_scales(source, tmp_path / "both", ones, ones,
                          **{"model.layers.1.self_attn.k_proj.output_scale": torch.ones(1)})  # fmt: skip
    with pytest.raises(CheckpointError, match="layer 1 has two k scales"):
        fp8_kv_llm(both, progress=False)
    # a zero scale is clamped (x / 0 would be inf, then NaN in attention): finite logits
    zero = [torch.zeros(1)] * 2
    llm = fp8_kv_llm(with_kv_scales(source, tmp_path / "zero", zero, zero), progress=False)
    assert all((s > 0).all() for s in llm.cache.k_scale + llm.cache.v_scale)
    assert torch.isfinite(llm.logits(source[3])).all()


def test_fp8_kv_scales_with_quantized_weights_and_tensor_parallel(source, tmp_path):
    """k_proj.output_scale beside compressed-tensors FP8 linears is a KV scale, not a linear's tensor;
    under tensor parallel each rank takes its KV heads' scales (replicated heads: the one it uses)."""
    from llama_kernels.distributed import TensorParallel
    from llama_kernels.loader.kv_scales import read_kv_scales

    ct = ct_fp8(source, tmp_path / "ct", static=True)
    k = [torch.tensor([0.01, 0.02]), torch.tensor([0.03, 0.04])]  # per head, Hkv = 2
    v = [torch.tensor([0.05, 0.06]), torch.tensor([0.07, 0.08])]
    path = with_kv_scales(source, tmp_path / "ct-kv", k, v, ("self_attn.k_proj.output_scale",
                          "self_attn.v_proj.output_scale"), tensors=load_file(ct / "model.safetensors"))  # fmt: skip
    cfg = json.loads((ct / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg))
    llm = fp8_kv_llm(path, progress=False)
    assert type(llm.model.layers[0].attention.wqkv) is Fp8StaticLinear
    assert all(torch.equal(a, b) for a, b in zip(llm.cache.k_scale + llm.cache.v_scale, k + v))
    ckpt = open_checkpoint(path)
    for tp, heads in ((2, [[0], [1]]), (4, [[0], [0], [1], [1]])):
        for rank, h in enumerate(heads):
            got_k, got_v = read_kv_scales(ckpt, TensorParallel(rank, tp, ckpt.config))
            assert [s.tolist() for s in got_k + got_v] == [s[h].tolist() for s in k + v], (tp, rank)


def test_quantize_kv_cache_scales_round_trip(source, tmp_path, capsys):
    """quantize --kv-cache-scales writes llm-compressor's kv_cache_scheme: per layer the max over KV heads
    of the calibrated scales; loading it takes them instead of calibrating."""
    from llama_kernels.cli import main
    from llama_kernels.export import quantize_checkpoint

    path, _, _, ids, ref = source
    out = tmp_path / "ct"
    assert main(["quantize", str(path), str(out), "--quant", "fp8", "--format", "compressed-tensors",
                 "--kv-cache-scales"]) == 0  # fmt: skip
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kv = qc["kv_cache_scheme"]
    assert (kv["type"], kv["num_bits"], kv["strategy"], kv["dynamic"]) == ("float", 8, "tensor", False)
    assert header(out)["model.layers.1.self_attn.v_scale"] == ("F32", [1])
    # the same calibration (no tokenizer here: seeded random ids, as many as the 128 positions hold)
    calibrated = LLM.from_pretrained(path, max_context=128, kv_cache_dtype="fp8", progress=False).cache
    llm = fp8_kv_llm(out)
    assert "KV cache: FP8 scales from the checkpoint" in capsys.readouterr().err
    for mine, theirs in zip(llm.cache.k_scale + llm.cache.v_scale, calibrated.k_scale + calibrated.v_scale):
        assert torch.equal(mine, theirs.max().expand(2))
    err = rel_err(llm.logits(ids), ref)  # measured 0.11 (FP8 weights alone: 0.104)
    assert err < 0.15, err
    # only the compressed-tensors layout carries them; refused before anything is written
    with pytest.raises(ValueError, match="compressed-tensors format only"):
        quantize_checkpoint(path, tmp_path / "fb", "fp8", kv_cache_scales=True)
    assert not (tmp_path / "fb").exists()
