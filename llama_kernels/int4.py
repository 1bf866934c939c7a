"""Weight-only INT4 (group-wise) weights: canonical layout, reference quantizer, AWQ/GPTQ conversion.

Everything here is plain torch (no Triton, no compiled extension) and is the numerical reference
for the INT4 kernels.  The canonical layout is :class:`Int4Weight`; AutoAWQ "GEMM" and AutoGPTQ /
GPTQModel "v1" checkpoint tensors convert to and from it losslessly (see ``from_awq``/``from_gptq``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "Int4Weight",
    "int4_linear_reference",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]

#: AutoAWQ interleave: nibble i of a packed AWQ word holds column ``8 * c + AWQ_ORDER[i]``.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Inverse of :data:`AWQ_ORDER`: column ``8 * c + j`` is in nibble ``AWQ_REVERSE_ORDER[j]``.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SYMMETRIC_ZERO = 8


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t, *, dtypes=None, shape=None, ndim=None) -> None:
    """Raise ValueError naming ``name`` unless ``t`` is a tensor with the given dtype(s)/shape/ndim."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype {want}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {_shape(t)}")
    if shape is not None and _shape(t) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_shape(t)}")


def _check_group_size(group_size, K: int) -> None:
    """Raise ValueError unless ``group_size`` is a positive int dividing K, a multiple of 8 or K."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size: expected a positive int (or None/-1 for per-channel), got {group_size!r}"
        )
    if K % group_size:
        fits = [g for g in (128, 64, 32) if K % g == 0]
        hint = " or ".join(map(str, fits)) if fits else "group_size=None (per-channel)"
        raise ValueError(f"group_size: K={K} is not divisible by group_size={group_size}; use {hint}")
    if group_size % 8 and group_size != K:
        raise ValueError(
            f"group_size: expected a multiple of 8 or K={K}, got group_size={group_size}"
        )


def _resolve_group_size(group_size, K: int) -> int:
    """Map None / -1 to K (per-channel), then validate with :func:`_check_group_size`."""
    if group_size is None or group_size == -1:
        return K
    _check_group_size(group_size, K)
    return group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values along the last dimension, 8 per int32, low nibble first.

    Args:
        q: integer tensor [..., K] with values in [0, 15] (usually uint8); K % 8 == 0.
    Returns:
        int32 [..., K // 8]; nibble i (bits 4i..4i+3) of out[..., j] is q[..., 8j + i].
        Nibble 7 occupies the sign bit, so the int32 may be negative.
    """
    _check_tensor("q", q)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"q: expected an integer tensor with values 0..15, got dtype {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 8:
        raise ValueError(f"q: expected the last dimension to be a multiple of 8, got shape {_shape(q)}")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"q: expected values in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    nibbles = q.to(torch.int64).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    words = (nibbles << shifts).sum(-1)  # in [0, 2**32): reinterpret as signed int32 explicitly
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: int32 [..., M].
    Returns:
        uint8 [..., 8 * M] with values in [0, 15]; out[..., 8j + i] is nibble i of packed[..., j].
    """
    _check_tensor("packed", packed, dtypes=(torch.int32,))
    if packed.dim() == 0:
        raise ValueError("packed: expected at least 1-D, got a 0-d tensor")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 15  # masking undoes the arithmetic shift's sign fill
    return nibbles.to(torch.uint8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _awq_pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 [R, N] -> int32 [R, N // 8] with the AWQ column interleave (:data:`AWQ_ORDER`)."""
    R, N = q.shape
    return pack_int4(q.reshape(R, N // 8, 8)[..., list(AWQ_ORDER)].reshape(R, N))


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N // 8] (AWQ interleave) -> uint8 [R, N] in natural column order."""
    R = packed.shape[0]
    return unpack_int4(packed).reshape(R, -1, 8)[..., list(AWQ_REVERSE_ORDER)].reshape(R, -1)


@dataclass(eq=False)
class Int4Weight:
    """Group-wise INT4 weight of a linear layer y = x @ W.T, W: [N, K] (N = out, K = in features).

    Dequantization: ``W[n, k] = (q[n, k] - z[n, k // group_size]) * scales[n, k // group_size]``,
    computed in float32.

    Fields:
        qweight: int32 [N, K // 8]. q[n, 8j + i] (0..15) is nibble i (bits 4i..4i+3, low nibble
            first) of qweight[n, j].
        scales: float16 / bfloat16 / float32 [N, K // group_size]; kept in the given dtype.
        zeros: uint8 [N, K // group_size] with values 0..15, or None for symmetric weights, whose
            zero point is 8.
        group_size: int; K % group_size == 0 and group_size % 8 == 0 (or group_size == K, i.e.
            per-channel).
        perm: int64 [K] permutation of the input channels, or None.  Set by GPTQ act-order
            (desc_act) checkpoints: q, zeros and scales are then stored in permuted K order, so
            that groups are contiguous, and the layer computes ``y = x[:, perm] @ dequantize().T``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_tensor("Int4Weight.qweight", self.qweight, dtypes=(torch.int32,), ndim=2)
        N, K = self.shape
        try:
            _check_group_size(self.group_size, K)
        except ValueError as e:
            raise ValueError(f"Int4Weight.{e}") from None
        groups = (N, K // self.group_size)
        _check_tensor("Int4Weight.scales", self.scales, dtypes=_SCALE_DTYPES, shape=groups)
        device = self.qweight.device
        if self.scales.device != device:
            raise ValueError(f"Int4Weight.scales: expected device {device}, got {self.scales.device}")
        if self.zeros is not None:
            _check_tensor("Int4Weight.zeros", self.zeros, dtypes=(torch.uint8,), shape=groups)
            if self.zeros.device != device:
                raise ValueError(f"Int4Weight.zeros: expected device {device}, got {self.zeros.device}")
            if self.zeros.numel() and self.zeros.max() > 15:
                raise ValueError(
                    f"Int4Weight.zeros: expected values in [0, 15], got max {int(self.zeros.max())}"
                )
        if self.perm is not None:
            _check_tensor("Int4Weight.perm", self.perm, dtypes=(torch.int64,), shape=(K,))
            if self.perm.device != device:
                raise ValueError(f"Int4Weight.perm: expected device {device}, got {self.perm.device}")
            if not torch.equal(torch.sort(self.perm).values, torch.arange(K, device=device)):
                raise ValueError(f"Int4Weight.perm: expected a permutation of arange({K})")

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) = (out_features, in_features)."""
        return self.qweight.shape[0], self.qweight.shape[1] * 8

    @property
    def out_features(self) -> int:
        """N."""
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K."""
        return self.shape[1]

    def _zero_points(self) -> torch.Tensor:
        """Zero points as int16 [N, K // group_size] (8 everywhere when symmetric)."""
        if self.zeros is None:
            return torch.full(_shape(self.scales), _SYMMETRIC_ZERO, dtype=torch.int16,
                              device=self.scales.device)
        return self.zeros.to(torch.int16)

    def unpack(self) -> torch.Tensor:
        """The 4-bit values q as uint8 [N, K] (permuted K order when ``perm`` is set)."""
        return unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = (q - z) * s computed in float32, then cast to ``dtype``.

        Returns:
            [N, K] in ``dtype``.  When ``perm`` is set the columns are in permuted order: the
            original-order weight is ``W_orig[:, perm] = dequantize()``.
        """
        N, K = self.shape
        ng = K // self.group_size
        q = self.unpack().float().reshape(N, ng, self.group_size)
        z = self._zero_points().float()[..., None]
        s = self.scales.float()[..., None]
        return ((q - z) * s).reshape(N, K).to(dtype)

    def to(self, device) -> Int4Weight:
        """A new Int4Weight with every tensor on ``device``."""
        def move(t):
            return None if t is None else t.to(device)

        return Int4Weight(move(self.qweight), move(self.scales), move(self.zeros), self.group_size,
                          move(self.perm))

    # ---- AutoAWQ "GEMM" format ----------------------------------------------------------------

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> Int4Weight:
        """Convert AutoAWQ GEMM tensors (W[k, n] = (q[k, n] - z[g, n]) * s[g, n], g = k // G).

        Args:
            qweight: int32 [K, N // 8], packed along N with the :data:`AWQ_ORDER` interleave.
            qzeros: int32 [K // G, N // 8], same packing.
            scales: float16 (or bfloat16 / float32) [K // G, N]; dtype is kept.
            group_size: G; None or -1 means per-channel (K).
        Returns:
            Int4Weight with explicit zeros (AWQ is asymmetric) and no perm.
        """
        _check_tensor("from_awq: qweight", qweight, dtypes=(torch.int32,), ndim=2)
        K, N = qweight.shape[0], qweight.shape[1] * 8
        if K % 8:
            raise ValueError(f"from_awq: qweight: K={K} (qweight.shape[0]) must be a multiple of 8")
        G = _resolve_group_size(group_size, K)
        _check_tensor("from_awq: scales", scales, dtypes=_SCALE_DTYPES, shape=(K // G, N))
        _check_tensor("from_awq: qzeros", qzeros, dtypes=(torch.int32,), shape=(K // G, N // 8))
        q = _awq_unpack(qweight).T  # [N, K]
        zeros = _awq_unpack(qzeros).T.contiguous()  # [N, K // G]
        return cls(pack_int4(q), scales.T.contiguous(), zeros, G)

    def to_awq(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Export as AutoAWQ GEMM tensors; inverse of :meth:`from_awq` (bit-exact).

        Returns:
            (qweight int32 [K, N // 8], qzeros int32 [K // G, N // 8], scales [K // G, N] in the
            stored scale dtype).  Symmetric weights store zero points of 8.
        Raises:
            ValueError if ``perm`` is set (AWQ has no act-order) or N % 8 != 0.
        """
        N, _ = self.shape
        if self.perm is not None:
            raise ValueError("to_awq: perm is set, but the AWQ format has no input permutation")
        if N % 8:
            raise ValueError(f"to_awq: N={N} must be a multiple of 8 (AWQ packs along N)")
        qweight = _awq_pack(self.unpack().T)
        qzeros = _awq_pack(self._zero_points().to(torch.uint8).T)
        return qweight, qzeros, self.scales.T.contiguous()

    # ---- AutoGPTQ / GPTQModel "v1" format -----------------------------------------------------

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, *, group_size: int,
                  sym: bool = False) -> Int4Weight:
        """Convert GPTQ v1 tensors (W[n, k] = (q[k, n] - z[g, n]) * s[g, n], g = g_idx[k]).

        Args:
            qweight: int32 [K // 8, N]; nibble i of qweight[r, n] is q[8r + i, n].
            qzeros: int32 [K // G, N // 8]; nibble i of qzeros[g, c] stores z[g, 8c + i] - 1
                (the v1 offset: stored 7 means zero point 8).
            scales: float16 (or bfloat16 / float32) [K // G, N]; dtype is kept.
            g_idx: integer [K] group of each input channel, or None for k // G.  If it differs
                from k // G (act-order), channels are stably sorted by group, the weight is stored
                in that order and ``perm`` records it; each group must have exactly G channels.
            group_size: G; -1 or None means per-channel (K).
            sym: if True, every zero point must be 8 and the result has zeros=None.
        Raises:
            ValueError on bad shapes/dtypes/g_idx, and when a stored zero is 15: v1 readers
            (AutoGPTQ, vLLM) decode it as zero point 16, which Int4Weight (zeros 0..15) cannot hold.
        """
        _check_tensor("from_gptq: qweight", qweight, dtypes=(torch.int32,), ndim=2)
        K, N = qweight.shape[0] * 8, qweight.shape[1]
        if N % 8:
            raise ValueError(f"from_gptq: qweight: N={N} (qweight.shape[1]) must be a multiple of 8")
        G = _resolve_group_size(group_size, K)
        ng = K // G
        _check_tensor("from_gptq: scales", scales, dtypes=_SCALE_DTYPES, shape=(ng, N))
        _check_tensor("from_gptq: qzeros", qzeros, dtypes=(torch.int32,), shape=(ng, N // 8))
        z = unpack_int4(qzeros).to(torch.int16) + 1  # [ng, N], 1..16
        if (z == 16).any():
            raise ValueError(
                f"from_gptq: qzeros: {int((z == 16).sum())} stored value(s) are 15, i.e. zero point 16 "
                "in the GPTQ v1 format; Int4Weight zero points must be in [0, 15]"
            )
        if sym and (z != _SYMMETRIC_ZERO).any():
            raise ValueError("from_gptq: sym=True but qzeros hold zero points other than 8 "
                             "(stored values other than 7)")
        q = unpack_int4(qweight.T)  # [N, K]
        perm = None
        if g_idx is not None:
            _check_tensor("from_gptq: g_idx", g_idx, ndim=1, shape=(K,))
            if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
                raise ValueError(f"from_gptq: g_idx: expected an integer tensor, got dtype {g_idx.dtype}")
            g = g_idx.to(torch.int64)
            if g.min() < 0 or g.max() >= ng:
                raise ValueError(f"from_gptq: g_idx: expected values in [0, {ng}), "
                                 f"got [{int(g.min())}, {int(g.max())}]")
            counts = torch.bincount(g, minlength=ng)
            if (counts != G).any():
                raise ValueError(f"from_gptq: g_idx: every group must have exactly group_size={G} "
                                 f"channels, got counts from {int(counts.min())} to {int(counts.max())}")
            if not torch.equal(g, torch.arange(K, device=g.device) // G):
                perm = torch.argsort(g, stable=True)
                q = q[:, perm]
        zeros = None if sym else z.to(torch.uint8).T.contiguous()
        return cls(pack_int4(q), scales.T.contiguous(), zeros, G, perm)

    def to_gptq(self) -> dict[str, torch.Tensor]:
        """Export as GPTQ v1 tensors; ``from_gptq(**to_gptq())`` computes the same linear map.

        Returns:
            dict with qweight int32 [K // 8, N], qzeros int32 [K // G, N // 8] (storing z - 1),
            scales [K // G, N] in the stored scale dtype, and g_idx int32 [K].  With ``perm`` set,
            qweight is in original channel order and g_idx is the act-order group assignment.
        Raises:
            ValueError if N % 8 != 0 or any zero point is 0 (v1 stores z - 1, so 0 is not
            representable).
        """
        N, K = self.shape
        if N % 8:
            raise ValueError(f"to_gptq: N={N} must be a multiple of 8 (GPTQ packs qzeros along N)")
        z = self._zero_points()
        if (z == 0).any():
            raise ValueError(f"to_gptq: {int((z == 0).sum())} zero point(s) are 0, which the GPTQ v1 "
                             "format (it stores z - 1) cannot represent")
        q = self.unpack()
        g_idx = torch.arange(K, device=q.device) // self.group_size
        if self.perm is not None:  # undo the permutation: column j of q is input channel perm[j]
            q_orig, g_orig = torch.empty_like(q), torch.empty_like(g_idx)
            q_orig[:, self.perm], g_orig[self.perm] = q, g_idx
            q, g_idx = q_orig, g_orig
        return dict(
            qweight=pack_int4(q).T.contiguous(),
            qzeros=pack_int4((z - 1).T),
            scales=self.scales.T.contiguous(),
            g_idx=g_idx.to(torch.int32),
        )


def quantize_int4(w: torch.Tensor, group_size: int | None = 128,
                  symmetric: bool = False) -> Int4Weight:
    """Reference round-to-nearest group-wise INT4 quantizer.

    Args:
        w: [N, K] float16 / bfloat16 / float32 weight (K % 8 == 0), finite.
        group_size: G dividing K, a multiple of 8; None or -1 means per-channel (G = K).
        symmetric: if True, s = max|w| / 7 and zero point 8 (zeros=None); otherwise
            s = (max - min) / 15 over the group's range extended to include 0 (so that the zero
            point z = round(-min / s) lies in [0, 15] and no element is clamped), z stored.
    Returns:
        Int4Weight; scales are in w's dtype for float16/bfloat16, float32 otherwise.  q is computed
        as clamp(round(w / s) + z, 0, 15) with s *as stored*, so |dequantize() - w| <= s / 2 up to
        the scale dtype's rounding.  A scale that is 0 once stored (all-zero group, or a range below
        the scale dtype's smallest subnormal) is set to 1.0: its elements dequantize to 0.
    """
    _check_tensor("w", w, ndim=2)
    if not w.dtype.is_floating_point:
        raise ValueError(f"w: expected a floating-point tensor, got dtype {w.dtype}")
    N, K = w.shape
    if K % 8:
        raise ValueError(f"w: K={K} (w.shape[1]) must be a multiple of 8")
    G = _resolve_group_size(group_size, K)
    if not torch.isfinite(w).all():
        raise ValueError("w: contains NaN or inf")
    scale_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
    wg = w.float().reshape(N, K // G, G)
    if symmetric:
        scale = wg.abs().amax(-1) / 7
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
    scales = scale.to(scale_dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    s = scales.float()
    if symmetric:
        zeros, z = None, torch.full_like(s, _SYMMETRIC_ZERO)
    else:
        z = torch.round(-lo / s).clamp(0, 15)
        zeros = z.to(torch.uint8)
    q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Weight(pack_int4(q.reshape(N, K)), scales, zeros, G)


def int4_linear_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """y = x[..., perm] @ W.T in float32, cast back to x's dtype.

    Args:
        x: floating [..., K].
        w: Int4Weight with in_features K.
    Returns:
        [..., N] in x.dtype.
    """
    _check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x: expected last dimension K={w.in_features}, got shape {_shape(x)}")
    if w.perm is not None:
        x = x[..., w.perm]
    return (x.float() @ w.dequantize(torch.float32).T).to(x.dtype)
