"""Argument checks shared by the ops: every failure names the op, the argument, the value and
what was expected, and is raised before any kernel launches or any state changes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
FP8 = torch.float8_e4m3fn


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Check one tensor argument; `shape` entries of None match any size. (Called some 700 times per decode step:
    the passing path builds no strings, tuples or iterators; the messages are built only to raise.)"""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype}; expected one of: {_names(dtypes)}")
    if shape is not None:
        got = t.shape
        if len(got) != len(shape):
            _wrong_ndim(op, name, t, len(shape), shape)
        axis = 0
        for want in shape:
            if want is not None and got[axis] != want:
                raise ValueError(
                    f"{op}: argument '{name}' has shape {tuple(got)}; expected {_fmt_shape(shape)} "
                    f"(dim {axis} must be {want})"
                )
            axis += 1
    elif ndim is not None and t.dim() != ndim:
        _wrong_ndim(op, name, t, ndim, None)
    if device is not None and t.device != device:
        raise ValueError(f"{op}: argument '{name}' is on {t.device}; expected {device} (the device of the first input)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: argument '{name}' (shape {tuple(t.shape)}) must be contiguous; call .contiguous()")
    return t


def _wrong_ndim(op: str, name: str, t: torch.Tensor, ndim: int, shape: Sequence[int | None] | None) -> None:
    raise ValueError(
        f"{op}: argument '{name}' has shape {tuple(t.shape)} ({t.dim()}-D); expected {ndim}-D"
        + (f" {_fmt_shape(shape)}" if shape is not None else "")
    )


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype}; expected {ref.dtype} (the dtype of '{ref_name}')")


def multiple_of(op: str, name: str, value: int, divisor: int, why: str) -> None:
    if value % divisor:
        raise ValueError(f"{op}: {name}={value} must be a multiple of {divisor} ({why})")


def positive_float(op: str, name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        expected = "a positive float or None" if allow_none else "a positive float"
        raise ValueError(f"{op}: argument '{name}'={value!r}; expected {expected}")


def values_in_range(op: str, name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Check integer values lie in [low, high] where that costs no device sync (CPU tensors only)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return

    def check() -> None:
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi > high:
            raise ValueError(f"{op}: argument '{name}' has values in [{lo}, {hi}]; expected {what} in [{low}, {high}]")

    once((t,), ("range", low, high), check)


# --- value checks done once per forward pass ---------------------------------------------------------------------
# A forward pass hands the same positions / slot_mapping / block_table / seq_lens tensors to the ops of every layer,
# whose value checks (a min/max each on the CPU) would otherwise run once per layer with the same answer.

_frozen = threading.local()  # .memo: inside frozen_values(), {key: the tensors it names}; absent outside


@contextmanager
def frozen_values() -> Iterator[None]:
    """Internal, for the model runner's forward pass: within it, a value check that passed for some tensors is not
    repeated for the same tensor objects and the same bounds. The caller promises not to write or resize those
    tensors during the block; every check still runs the first time, so a bad value is still refused
    before any kernel launches. Outside it (any direct call of an op) every check runs every time."""
    outer = getattr(_frozen, "memo", None)
    if outer is None:
        _frozen.memo = {}
    try:
        yield
    finally:
        if outer is None:
            del _frozen.memo


def once(tensors: tuple[torch.Tensor, ...], bounds: tuple, check: Callable[[], None]) -> None:
    """Run check() (which raises on bad values of `tensors` against `bounds`), unless inside frozen_values() it
    already passed for these tensors and bounds. The memo holds the tensors, so their ids cannot be reused by
    other tensors while it lives."""
    memo = getattr(_frozen, "memo", None)
    if memo is None:
        check()
        return
    key = (bounds, *map(id, tensors))
    if key not in memo:
        check()
        memo[key] = tensors
