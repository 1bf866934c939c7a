"""Quantized Hugging Face checkpoints: the `quantization_config` of config.json read into a
QuantFormat, which says how each linear is stored (its Scheme: module kind and tensors), checks
that against the safetensors headers, and converts each linear's tensors into the weight its
module loads (Fp8Weight or Int4Weight).

Formats:
- fbgemm_fp8 (Meta's FP8 Llama 3.1): e4m3 `weight` [N, K], float32 `weight_scale` [N, 1];
  per-token dynamic activations bounded by `activation_scale_ub`; `modules_to_not_convert` stay
  unquantized.
- compressed-tensors, format float-quantized: e4m3 `weight`, `weight_scale` [1] / [] (tensor) or
  [N, 1] (channel), static `input_scale` or dynamic per-token activations; format pack-quantized:
  INT4 W4A16, `weight_packed` int32 [N, K/8] (8 values per word, low nibble first, stored + 8),
  `weight_scale` [N, K/G], `weight_shape` [2], `weight_zero_point` int32 [N/8, K/G] (packed along
  N, + 8) when asymmetric; strategy group or channel. `ignore` lists unquantized modules.
- awq (version gemm) and gptq (v1 checkpoint format, sym, desc_act with g_idx): INT4 through
  Int4Weight.from_awq / from_gptq.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..int4 import Int4Weight, unpack_int4
from ..model.linear import FP8_NO_BOUND, META_FP8_SCALE_UB, Fp8Linear, Fp8StaticLinear, Fp8Weight, Int4Linear
from .checkpoint import LAYER_PARTS
from .errors import CheckpointError
from .kv_scales import is_attention_scale

FLOAT = ("BF16", "F16", "F32")  # safetensors dtypes of unquantized weights and of scales
_LINEAR_RE = re.compile(r"((?:model\.)?layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)|lm_head)"
                        r"\.(\w+)")  # fmt: skip
SUPPORTED = ("fbgemm_fp8", "compressed-tensors", "awq", "gptq")


@dataclass
class Scheme:
    """How one quantized linear is stored and which module computes it."""

    kind: str  # "fp8" (dynamic per-token activations), "fp8_static" (static input scale) or "int4"
    what: str  # for messages, e.g. "FP8 row-wise"
    tensors: dict[str, tuple[str, ...]]  # suffix -> allowed safetensors dtypes, all required
    optional: dict[str, tuple[str, ...]] = field(default_factory=dict)  # suffix -> dtypes, may be absent
    group_size: int | None = None  # int4: G; None means per-channel (G = K)
    scale_ub: float | None = None  # fp8: bound on a token's activation amax

    def module(self, in_features: int, out_features: int, dtype: torch.dtype) -> nn.Module:
        """An empty module on the meta device for this scheme."""
        if self.kind == "fp8":
            return Fp8Linear(in_features, out_features, dtype, self.scale_ub, device="meta")
        if self.kind == "fp8_static":
            return Fp8StaticLinear(in_features, out_features, dtype, device="meta")
        return Int4Linear(in_features, out_features, dtype, self.group_size or in_features, device="meta")


def split_linear(name: str) -> tuple[str, str] | None:
    """(module prefix, tensor suffix) of a linear layer's tensor, e.g. ("model.layers.0.mlp.up_proj", "qweight");
    None for other tensors (k_proj.output_scale and the like are KV-cache scales: loader.kv_scales)."""
    m = _LINEAR_RE.fullmatch(name)
    return (m.group(1), m.group(2)) if m and not is_attention_scale(name) else None


def _listed(prefix: str, modules) -> bool:
    """Whether a module list (modules_to_not_convert, ignore) names `prefix` or a parent of it;
    compressed-tensors' "re:" entries are regular expressions matched against the name."""
    dotted = f".{prefix}."
    for entry in modules or ():
        if entry.startswith("re:"):
            if re.match(entry[3:], prefix):
                return True
        elif f".{entry}." in dotted:
            return True
    return False


class QuantFormat:
    """A quantization_config; subclasses per quant_method define scheme() and convert()."""

    method: str

    def __init__(self, config: dict, config_file: Path) -> None:
        self.config = config  # the quantization_config dict
        self.config_file = config_file  # config.json, named in errors

    def scheme(self, prefix: str) -> Scheme | None:
        """The Scheme of the linear `prefix` (its Hugging Face module name); None: unquantized."""
        raise NotImplementedError

    def convert(self, prefix: str, scheme: Scheme, t: dict[str, torch.Tensor]) -> Fp8Weight | Int4Weight:
        """The linear's weight from its tensors {suffix: tensor}; ValueError when they disagree."""
        raise NotImplementedError

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.config_file}: quantization_config ({self.method}): {message}")

    def check(self, prefix: str, found: dict[str, tuple[Path, dict]]) -> None:
        """Check one linear's tensors {suffix: (shard, safetensors header entry)} against its scheme."""
        scheme = self.scheme(prefix)
        want = {"weight": FLOAT} if scheme is None else scheme.tensors
        allowed = want if scheme is None else {**want, **scheme.optional}
        how = "keeps it unquantized" if scheme is None else f"stores it as {scheme.what} ({', '.join(want)})"
        for suffix, (shard, info) in sorted(found.items(), key=lambda item: item[0] not in allowed):
            if suffix not in allowed:
                raise CheckpointError(
                    f"{shard}: unexpected tensor {prefix}.{suffix}: config.json's quantization_config "
                    f"({self.method}) {how}; fix quantization_config or download the checkpoint again"
                )
            if info["dtype"] not in allowed[suffix]:
                raise CheckpointError(
                    f"{shard}: tensor {prefix}.{suffix} has dtype {info['dtype']}, but config.json's "
                    f"quantization_config ({self.method}) {how} with {suffix} in {'/'.join(allowed[suffix])}; "
                    "fix quantization_config or download the checkpoint again"
                )
        missing = [s for s in want if s not in found]
        if missing:
            raise CheckpointError(
                f"{self.config_file}: quantization_config ({self.method}) {how}, but tensor(s) "
                f"{', '.join(f'{prefix}.{s}' for s in missing)} are missing from the safetensors files; "
                "download them or fix quantization_config"
            )


def _int(config: dict, key: str, allowed, fmt: QuantFormat) -> int:
    value = config.get(key)
    if value not in allowed:
        raise fmt.error(f"{key}={value!r} is not supported; expected one of {list(allowed)}")
    return value


class FbgemmFp8(QuantFormat):
    method = "fbgemm_fp8"

    def __init__(self, config: dict, config_file: Path) -> None:
        super().__init__(config, config_file)
        ub = float(config.get("activation_scale_ub", META_FP8_SCALE_UB))  # absent: transformers' default, 1200
        self.fp8 = Scheme("fp8", "FP8 row-wise", {"weight": ("F8_E4M3",), "weight_scale": ("F32",)},
                          scale_ub=None if ub >= FP8_NO_BOUND else ub)  # fmt: skip

    def scheme(self, prefix: str) -> Scheme | None:
        skip = _listed(prefix, self.config.get("modules_to_not_convert")) or prefix == "lm_head"
        return None if skip else self.fp8

    def convert(self, prefix: str, scheme: Scheme, t: dict[str, torch.Tensor]) -> Fp8Weight:
        n = t["weight"].shape[0]
        if tuple(t["weight_scale"].shape) != (n, 1):
            raise ValueError(f"{prefix}.weight_scale has shape {list(t['weight_scale'].shape)}; expected [{n}, 1]")
        return Fp8Weight(t["weight"], t["weight_scale"].reshape(n))


class CompressedTensors(QuantFormat):
    method = "compressed-tensors"

    def __init__(self, config: dict, config_file: Path) -> None:
        super().__init__(config, config_file)
        status = config.get("quantization_status", "compressed")
        if status != "compressed":
            raise self.error(f"quantization_status={status!r}; only 'compressed' checkpoints can be loaded")
        self.groups = [(g.get("targets", []), self._group_scheme(g)) for g in config.get("config_groups", {}).values()]

    def _group_scheme(self, group: dict) -> Scheme:
        w, inp = group.get("weights") or {}, group.get("input_activations")
        fmt = group.get("format") or self.config.get("format")
        strategy = w.get("strategy")
        if (w.get("type"), w.get("num_bits"), fmt) == ("float", 8, "float-quantized"):
            if strategy not in ("tensor", "channel"):
                raise self.error(f"FP8 weight strategy {strategy!r}; supported: 'tensor', 'channel'")
            tensors = {"weight": ("F8_E4M3",), "weight_scale": FLOAT}
            if inp and not inp.get("dynamic") and inp.get("strategy") == "tensor":
                return Scheme("fp8_static", f"FP8 {strategy}-wise, static input scale",
                              {**tensors, "input_scale": FLOAT})  # fmt: skip
            if inp and inp.get("dynamic") and inp.get("strategy") == "token":
                return Scheme("fp8", f"FP8 {strategy}-wise, dynamic per-token activations", tensors)
            raise self.error(f"FP8 input_activations {inp!r}; supported: static 'tensor' or dynamic 'token'")
        if (w.get("type"), w.get("num_bits"), fmt) == ("int", 4, "pack-quantized") and not inp:
            if strategy not in ("group", "channel") or w.get("actorder") == "group":
                raise self.error(f"INT4 strategy {strategy!r} (actorder {w.get('actorder')!r}); supported: "
                                 "'group' or 'channel' without a weight_g_idx")  # fmt: skip
            tensors = {"weight_packed": ("I32",), "weight_scale": FLOAT, "weight_shape": ("I32", "I64")}
            sym = w.get("symmetric", True)
            if not sym:
                tensors["weight_zero_point"] = ("I32",)
            group = w.get("group_size") if strategy == "group" else None
            return Scheme("int4", f"INT4 {'sym' if sym else 'asym'} {strategy}-wise", tensors, group_size=group)
        raise self.error(f"weights {w.get('type')!r} {w.get('num_bits')}-bit in format {fmt!r}; supported: FP8 "
                         "'float-quantized' and INT4 W4A16 'pack-quantized'")  # fmt: skip

    def scheme(self, prefix: str) -> Scheme | None:
        if _listed(prefix, self.config.get("ignore")):
            return None
        for targets, scheme in self.groups:
            if any(t == "Linear" or t == prefix or (t.startswith("re:") and re.match(t[3:], prefix))
                   for t in targets):  # fmt: skip
                return None if prefix == "lm_head" else scheme
        return None

    def convert(self, prefix: str, scheme: Scheme, t: dict[str, torch.Tensor]) -> Fp8Weight | Int4Weight:
        scale = t["weight_scale"].float()
        if scheme.kind != "int4":
            n = t["weight"].shape[0]
            if scale.numel() == 1:
                scale = scale.reshape(())
            elif tuple(scale.shape) == (n, 1):
                scale = scale.reshape(n)
            else:
                raise ValueError(f"{prefix}.weight_scale has shape {list(scale.shape)}; expected [1] or [{n}, 1]")
            input_scale = t["input_scale"].float().reshape(()) if "input_scale" in t else None
            return Fp8Weight(t["weight"], scale, input_scale)
        n, k = (int(v) for v in t["weight_shape"])
        packed = t["weight_packed"]
        if tuple(packed.shape) != (n, k // 8) or k % 8:
            raise ValueError(f"{prefix}.weight_packed has shape {list(packed.shape)}; weight_shape [{n}, {k}] "
                             f"implies [{n}, {k // 8}]")  # fmt: skip
        groups = k // (scheme.group_size or k)
        zeros = None
        if "weight_zero_point" in t:
            zp = t["weight_zero_point"]
            if tuple(zp.shape) != (-(-n // 8), groups):
                raise ValueError(f"{prefix}.weight_zero_point has shape {list(zp.shape)}; expected "
                                 f"[{-(-n // 8)}, {groups}]")  # fmt: skip
            zeros = unpack_int4(zp.T.contiguous()).T[:n].contiguous()  # packed along N
        scales = t["weight_scale"]
        if tuple(scales.shape) != (n, groups):
            raise ValueError(f"{prefix}.weight_scale has shape {list(scales.shape)}; expected [{n}, {groups}]")
        return Int4Weight(packed, scales, zeros, scheme.group_size or k)


class Awq(QuantFormat):
    method = "awq"

    def __init__(self, config: dict, config_file: Path) -> None:
        super().__init__(config, config_file)
        _int(config, "bits", (4,), self)
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm" or config.get("zero_point", True) is not True:
            raise self.error(f"version={version!r} zero_point={config.get('zero_point')!r}; supported: AWQ "
                             "'gemm' with zero points")  # fmt: skip
        group = config.get("group_size", 128)
        self.int4 = Scheme("int4", "AWQ INT4", {"qweight": ("I32",), "qzeros": ("I32",), "scales": FLOAT},
                           group_size=None if group in (-1, None) else group)  # fmt: skip

    def scheme(self, prefix: str) -> Scheme | None:
        skip = _listed(prefix, self.config.get("modules_to_not_convert")) or prefix == "lm_head"
        return None if skip else self.int4

    def convert(self, prefix: str, scheme: Scheme, t: dict[str, torch.Tensor]) -> Int4Weight:
        k = t["qweight"].shape[0]
        return Int4Weight.from_awq(t["qweight"], t["qzeros"], t["scales"], scheme.group_size or k)


class Gptq(QuantFormat):
    method = "gptq"

    def __init__(self, config: dict, config_file: Path) -> None:
        super().__init__(config, config_file)
        _int(config, "bits", (4,), self)
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if checkpoint_format != "gptq":
            raise self.error(f"checkpoint_format={checkpoint_format!r}; supported: 'gptq' (v1, zero points "
                             "stored minus 1)")  # fmt: skip
        group = config.get("group_size", 128)
        self.sym = bool(config.get("sym", True))  # all zero points are 8
        self.desc_act = bool(config.get("desc_act", False))  # g_idx orders the input channels
        tensors = {"qweight": ("I32",), "qzeros": ("I32",), "scales": FLOAT}
        g_idx = {"g_idx": ("I32", "I64")}
        self.int4 = Scheme("int4", f"GPTQ INT4 ({'sym' if self.sym else 'asym'}, desc_act={self.desc_act})",
                           {**tensors, **(g_idx if self.desc_act else {})}, {} if self.desc_act else g_idx,
                           group_size=None if group in (-1, None) else group)  # fmt: skip

    def scheme(self, prefix: str) -> Scheme | None:
        skip = _listed(prefix, self.config.get("modules_to_not_convert")) or prefix == "lm_head"
        return None if skip else self.int4

    def convert(self, prefix: str, scheme: Scheme, t: dict[str, torch.Tensor]) -> Int4Weight:
        k = t["qweight"].shape[0] * 8
        g_idx = t.get("g_idx") if self.desc_act else None
        return Int4Weight.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, group_size=scheme.group_size or k,
                                    sym=self.sym)  # fmt: skip


def quant_format(config: dict | None, config_file: Path) -> QuantFormat | None:
    """The QuantFormat of config.json's quantization_config (None when there is none)."""
    if config is None:
        return None
    method = config.get("quant_method")
    formats = {f.method: f for f in (FbgemmFp8, CompressedTensors, Awq, Gptq)}
    if method not in formats:
        raise CheckpointError(
            f"{config_file}: quantization_config {method!r} is not supported (supported: {', '.join(SUPPORTED)}); "
            "use the bf16 checkpoint (with --quant fp8 or int4 to quantize at load)"
        )
    return formats[method](config, config_file)


def linear_schemes(fmt: QuantFormat, num_layers: int) -> dict[str, Scheme]:
    """{our module path: Scheme} of the quantized linears; the Hugging Face projections fused into
    one module (q/k/v, gate/up) must be quantized alike."""
    members: dict[str, list[str]] = {}
    for i in range(num_layers):
        for hf, (path, _, _) in LAYER_PARTS.items():
            if hf.endswith("_proj"):
                members.setdefault(f"layers.{i}.{path}", []).append(f"model.layers.{i}.{hf}")
    out = {}
    for path, prefixes in members.items():
        schemes = [fmt.scheme(p) for p in prefixes]
        if any(s != schemes[0] for s in schemes):
            described = ", ".join(f"{p}: {s.what if s else 'unquantized'}" for p, s in zip(prefixes, schemes))
            raise fmt.error(f"{described}; these are fused into one linear here: quantize them alike "
                            "(modules_to_not_convert / ignore)")  # fmt: skip
        if schemes[0] is not None:
            out[path] = schemes[0]
    return out
