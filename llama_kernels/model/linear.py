"""Linear layers as swappable modules, and quantize_model, which swaps them (gpt-fast style).

Every linear here computes y [M, N] = x [M, K] @ W.T for W [N, K] with no bias, and has
`load(w)`, which takes the full-precision weight w [N, K] (any float dtype, already on the
target device) and stores it in the module's format, or a weight a checkpoint stores already
quantized (Fp8Weight for the FP8 linears, Int4Weight for Int4Linear), stored as is. A module may
be created on the meta device and loaded later: that is how the loader streams a checkpoint
straight into quantized modules.

The activation dtype (the model's dtype) may be float32: FP8 and INT4 GEMMs take bfloat16 or
float16, so those layers cast float32 activations to bfloat16 around the GEMM (on the CPU the
model runs in float32 and only the quantized GEMMs see bfloat16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..int4 import Int4Weight

logger = logging.getLogger("llama_kernels")

META_FP8_SCALE_UB = 1200.0  # Meta's activation_scale_ub for FP8 Llama 3.1
# activation_scale_ub that never clamps (float32's largest): what `quantize --policy all` writes, as fbgemm_fp8
# loaders (vLLM) require the key; loading it gives no bound
FP8_NO_BOUND = 3.4028234663852886e38


class Fp8Activation(NamedTuple):
    """Activations already quantized row-wise to FP8 (by ops.add_rms_norm_fp8 or ops.quantize_fp8)."""

    q: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M] float32


@dataclass
class Fp8Weight:
    """An FP8 e4m3 weight as a checkpoint stores it: W[n, k] = weight[n, k] * scale[n] (or * scale)."""

    weight: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # float32 [N] (row-wise) or [] (per-tensor)
    input_scale: torch.Tensor | None = None  # float32 [], static activation scale; None: dynamic per token

    def to(self, device) -> Fp8Weight:
        """A copy with every tensor on `device`."""
        move = None if self.input_scale is None else self.input_scale.to(device)
        return Fp8Weight(self.weight.to(device), self.scale.to(device), move)


def _check_fp8(module: nn.Module, w: Fp8Weight) -> None:
    name = type(module).__name__
    _check_weight(module, w.weight)
    if w.weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}.load: FP8 weight has dtype {w.weight.dtype}; expected torch.float8_e4m3fn")
    if w.scale.dtype != torch.float32 or tuple(w.scale.shape) not in ((), (module.out_features,)):
        raise ValueError(f"{name}.load: weight scale is {w.scale.dtype} {tuple(w.scale.shape)}; expected "
                         f"float32 [{module.out_features}] or []")  # fmt: skip


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The half dtype a quantized GEMM runs in for activations of `dtype`."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _check_weight(module: nn.Module, w: torch.Tensor) -> None:
    want = (module.out_features, module.in_features)
    if tuple(w.shape) != want:
        raise ValueError(f"{type(module).__name__}.load: weight has shape {tuple(w.shape)}; expected {list(want)}")


class Linear(nn.Module):
    """Unquantized linear: weight [N, K] in the model's dtype (float32/bfloat16/float16)."""

    fp8_input = False  # whether the preceding RMSNorm should hand it FP8 activations

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features = in_features  # K
        self.out_features = out_features  # N
        self.dtype = dtype  # weight and activation dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)  # [N, K]  # fmt: skip

    def load(self, w: torch.Tensor) -> None:
        _check_weight(self, w)
        self.weight = nn.Parameter(w.to(self.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N]."""
        return F.linear(x, self.weight)


class Fp8Linear(nn.Module):
    """FP8 e4m3 weight with row-wise (per-output-channel) scales; activations quantized per token.

    Activations arrive either as a tensor, quantized here with ops.quantize_fp8 (amax clamped to
    scale_ub when set), or as an Fp8Activation from the fused add_rms_norm_fp8.
    """

    fp8_input = True

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, scale_ub: float | None = None,
                 device=None) -> None:  # fmt: skip
        super().__init__()
        self.in_features = in_features  # K
        self.out_features = out_features  # N
        self.dtype = dtype  # activation (input and output) dtype
        self.scale_ub = scale_ub  # upper bound on a token's activation amax, or None
        self.bound_checked = scale_ub is None  # whether the first input was checked against scale_ub
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))  # [N, K] e4m3  # fmt: skip
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))  # [N]

    def load(self, w: torch.Tensor | Fp8Weight) -> None:
        """Quantize w [N, K] row-wise (weight_scale[n] = amax|w[n]| / 448), or store an Fp8Weight
        without a static input scale (a per-tensor scale is broadcast to every row)."""
        if isinstance(w, Fp8Weight):
            _check_fp8(self, w)
            if w.input_scale is not None:
                raise ValueError("Fp8Linear.load: the weight has a static input scale; use Fp8StaticLinear")
            self.weight, self.weight_scale = w.weight, w.scale.expand(self.out_features).contiguous()
        else:
            _check_weight(self, w)
            self.weight, self.weight_scale = ops.quantize_fp8(w)
        ops.prepare_fp8(self.weight, _gemm_dtype(self.dtype))  # e.g. on the CPU, an int8 requantization

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """x [M, K] (or its FP8 form) -> [M, N] in the activation dtype."""
        if not self.bound_checked and self.scale_ub is not None and isinstance(x, torch.Tensor):
            self._check_bound(x)
        xq, x_scale = x if isinstance(x, Fp8Activation) else ops.quantize_fp8(x, self.scale_ub)
        y = ops.fp8_gemm(xq, x_scale, self.weight, self.weight_scale, out_dtype=_gemm_dtype(self.dtype))
        return y.to(self.dtype)


    def _check_bound(self, x: torch.Tensor) -> None:
        """On the first input only (no calibration, out of the steady state): warn once per process when
        activations exceed scale_ub, which the quantization then saturates at the bound."""
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no host sync inside a CUDA graph capture; a later eager call checks
        self.bound_checked = True
        amax = x.detach().abs().amax().item()
        global _warned_bound
        if amax > self.scale_ub and not _warned_bound:
            _warned_bound = True
            logger.warning(
                "FP8: activations reach %.0f, above the bound of %.0f (Meta's activation_scale_ub, policy 'meta'), "
                "and are clamped to it: this model may lose accuracy. Without a bound: --quant fp8 --policy all "
                "(the default), or a checkpoint written by `llama-kernels quantize --policy all`", amax, self.scale_ub)


_warned_bound = False  # Fp8Linear._check_bound has warned


class Fp8StaticLinear(nn.Module):
    """FP8 e4m3 weight with a per-tensor (or per-channel) scale and a static per-tensor input scale
    from calibration: x is quantized as clamp(x / input_scale, +-448) (saturating).

    Only loads checkpoint weights (an Fp8Weight with input_scale): the scale comes from calibration.
    """

    fp8_input = False  # quantizes its own input with the static scale

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features = in_features  # K
        self.out_features = out_features  # N
        self.dtype = dtype  # activation (input and output) dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))  # [N, K] e4m3  # fmt: skip
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32, device=device))  # [] or [N]
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32, device=device))  # []

    def load(self, w: Fp8Weight) -> None:
        if not isinstance(w, Fp8Weight) or w.input_scale is None:
            raise ValueError("Fp8StaticLinear.load: expected an Fp8Weight with a static input_scale")
        _check_fp8(self, w)
        if w.input_scale.dtype != torch.float32 or w.input_scale.dim() != 0:
            raise ValueError(f"Fp8StaticLinear.load: input_scale is {w.input_scale.dtype} "
                             f"{tuple(w.input_scale.shape)}; expected a float32 scalar")  # fmt: skip
        self.weight, self.weight_scale, self.input_scale = w.weight, w.scale, w.input_scale
        ops.prepare_fp8(self.weight, _gemm_dtype(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in the activation dtype."""
        xq = (x.float() / self.input_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        y = ops.fp8_gemm(xq, self.input_scale, self.weight, self.weight_scale, out_dtype=_gemm_dtype(self.dtype))
        return y.to(self.dtype)


class Int4Linear(nn.Module):
    """Weight-only INT4: asymmetric, group-wise along K (llama_kernels.int4.Int4Weight), via ops.int4_gemm."""

    fp8_input = False

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, group_size: int,
                 device=None) -> None:  # fmt: skip
        super().__init__()
        self.in_features = in_features  # K
        self.out_features = out_features  # N
        self.dtype = dtype  # activation dtype
        self.group_size = group_size  # G: inputs sharing one scale and zero point
        groups = (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32,
                                                    device=device))  # [N, K/8] 8 nibbles per int32  # fmt: skip
        self.register_buffer("scales", torch.empty(groups, dtype=_gemm_dtype(dtype), device=device))  # [N, K/G]
        # [N, K/G] in 0..15; None: symmetric (zero point 8)
        self.register_buffer("zeros", torch.empty(groups, dtype=torch.uint8, device=device))
        self.register_buffer("perm", None)  # [K] int64 input permutation (GPTQ act-order) or None
        self._weight: Int4Weight | None = None  # the buffers as an Int4Weight, rebuilt when they change
        # the int4_gemm backend qweight was repacked for at load (its layout then), or None: the plain layout
        self.backend: str | None = None

    def load(self, w: torch.Tensor | Int4Weight) -> None:
        """Quantize w [N, K] (asymmetric, round to nearest) with this layer's group size, or store a
        checkpoint's Int4Weight as is (scales keep their stored dtype)."""
        if isinstance(w, Int4Weight):
            if w.shape != (self.out_features, self.in_features) or w.group_size != self.group_size:
                raise ValueError(f"Int4Linear.load: Int4Weight {list(w.shape)} with group size {w.group_size}; "
                                 f"expected [{self.out_features}, {self.in_features}] with {self.group_size}")
            q = w
        else:
            _check_weight(self, w)
            q = ops.quantize_int4(w, group_size=self.group_size, symmetric=False)
        # Once, here: the layout the selected kernel reads, in place of the plain one (no second copy).
        q, self.backend = ops.prepare_int4(q, _gemm_dtype(self.dtype))
        self.qweight, self.scales, self.zeros, self.perm = q.qweight, q.scales, q.zeros, q.perm
        self._weight = q

    @property
    def weight(self) -> Int4Weight:
        if self._weight is None or self._weight.qweight is not self.qweight:  # not yet built, or moved
            if self.backend is not None:
                raise RuntimeError(f"Int4Linear: qweight was repacked for the {self.backend} backend at load and "
                                   "cannot be moved; load the model on its device")  # fmt: skip
            self._weight = Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in the activation dtype."""
        return ops.int4_gemm(x.to(_gemm_dtype(self.dtype)), self.weight, backend=self.backend).to(self.dtype)


def int4_group_size(in_features: int) -> int:
    """128 where it divides K, else the largest of 64 and 32 that does."""
    for group in (128, 64, 32):
        if in_features % group == 0:
            return group
    raise ValueError(f"int4: in_features K={in_features} is not a multiple of 32; this layer cannot be INT4")


def quantize_model(model: nn.Module, quant: str, policy: str = "all") -> nn.Module:
    """Swap the decoder's Linear modules for quantized ones, in place; returns the model.

    quant "fp8": policy "all" makes every linear in the decoder layers an Fp8Linear (dynamic
    per-token activation scales, no bound); "meta" is Meta's recipe: only the feed-forward
    linears, first and last layers kept unquantized, activation amax bounded by 1200.
    quant "int4": every linear in the decoder layers (policy "all"), asymmetric, group size from
    int4_group_size. The lm_head and the embedding are never quantized.

    Loaded modules are quantized from their weights; modules on the meta device are swapped for
    empty quantized modules that a later load() fills.
    """
    if quant not in ("fp8", "int4"):
        raise ValueError(f"quantize_model: quant={quant!r}; expected 'fp8' or 'int4'")
    if policy not in ("all", "meta") or (quant == "int4" and policy != "all"):
        allowed = "'all' or 'meta'" if quant == "fp8" else "'all'"
        raise ValueError(f"quantize_model: policy={policy!r} for {quant}; expected {allowed}")
    layers = model.layers
    group_sizes: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for parent_name, parent in layer.named_children():
            for name, lin in list(parent.named_children()):
                if type(lin) is not Linear:
                    continue
                if policy == "meta" and (parent_name != "feed_forward" or index in (0, len(layers) - 1)):
                    continue
                device = lin.weight.device
                if quant == "fp8":
                    scale_ub = META_FP8_SCALE_UB if policy == "meta" else None
                    new = Fp8Linear(lin.in_features, lin.out_features, lin.dtype, scale_ub, device=device)
                else:
                    group = int4_group_size(lin.in_features)
                    group_sizes[lin.in_features] = group
                    new = Int4Linear(lin.in_features, lin.out_features, lin.dtype, group, device=device)
                if device.type != "meta":
                    new.load(lin.weight)
                setattr(parent, name, new)
    for k, group in sorted(group_sizes.items()):
        if group != 128:
            logger.info("int4: K=%d is not a multiple of 128; using group size %d for those linears", k, group)
    return model
