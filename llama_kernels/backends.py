"""Backend registry and selection: which implementation of an op runs on which device.

Backends: ``cuda`` (hand-written kernels in ``llama_kernels._C``), ``triton``
(``llama_kernels.triton``) and ``torch`` (``llama_kernels.reference``, always available).

Selection, per call:
1. ``backend=`` on the op, else the environment variable ``LLAMA_KERNELS_BACKEND``
   (``auto`` or empty means no preference). A forced backend that cannot run the call raises
   :class:`BackendUnavailableError` saying why (no ``_C``, no GPU, wrong compute capability,
   no kernel for the op yet).
2. Otherwise on a CUDA device: ``cuda`` if its kernel for the op has passed the GPU tests on
   this architecture (recorded in ``validated_kernels.json``), else ``triton`` if available,
   else ``torch``. On the CPU: ``torch``.

For the runner: :func:`check_formats` refuses FP8 weights or an FP8 KV cache at load on a GPU
where one of their ops has no GPU kernel; :func:`graph_safe` says whether selection's pick can be
captured in a CUDA graph; :func:`fallback_reason` says why an op does not run on ``cuda`` (shown
by ``llama-kernels info``); :func:`on_device` makes the inputs' GPU current around launches.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "LLAMA_KERNELS_BACKEND"
VALIDATED_FILE = Path(__file__).with_name("validated_kernels.json")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message says which backend and why."""


@dataclass(frozen=True)
class Impl:
    fn: Callable  # the implementation, same signature as the public op (minus `backend`)
    min_capability: tuple[int, int] | None = None  # GPU compute capability it needs, if any
    instead: str = ""  # what to use on GPUs below min_capability
    # prepare(weight, dtype) -> weight: once per weight at load, the layout this kernel reads in
    # place of the plain one (which only this backend can then read); None: it reads the plain one
    prepare: Callable | None = None


_REGISTRY: dict[str, dict[str, Impl]] = {}


def register(
    op: str,
    backend: str,
    fn: Callable,
    min_capability: tuple[int, int] | None = None,
    instead: str = "",
    prepare: Callable | None = None,
) -> None:
    """Make `fn` the `backend` implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, min_capability, instead, prepare)


def preparer(op: str, backend: str) -> Callable | None:
    """The `backend` implementation's load-time weight preparation for `op` (Impl.prepare), if any."""
    return _REGISTRY[op][backend].prepare


def ops() -> list[str]:
    return list(_REGISTRY)


# --- the CUDA extension ---------------------------------------------------------------


@functools.cache
def cuda_extension() -> tuple[ModuleType | None, str]:
    """(llama_kernels._C or None, why it is missing)."""
    try:
        from . import _C
    except ImportError as err:
        try:
            from . import _build_info

            reason = _build_info.REASON or f"llama_kernels._C failed to import: {err}"
        except ImportError:
            reason = (
                "llama_kernels._C is not built (running from a source tree without an install?); "
                f"import error: {err}"
            )
        return None, reason
    return _C, ""


def compiled_archs() -> list[str]:
    ext, _ = cuda_extension()
    return list(ext.compiled_archs()) if ext is not None else []


def _arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("80", "90a", ...) runs on a GPU of `capability`.

    Plain sm_XY code runs on the same major at minor >= Y; the arch-specific "a" variants
    (sm_90a) run only on exactly that capability.
    """
    specific = arch.endswith("a")
    num = int(arch.rstrip("a"))
    major, minor = divmod(num, 10)
    if specific:
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def device_index(device: torch.device) -> int:
    """The CUDA device ordinal of `device` ("cuda" alone means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (the kernels size their grids by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def on_device(where: torch.Tensor | torch.device) -> contextlib.AbstractContextManager:
    """Make the GPU of a tensor (or device) the current device for the launches inside: kernels launch
    on the current device and stream, which for a cuda:1 tensor need not be cuda:1's. Nothing on the CPU."""
    device = where.device if isinstance(where, torch.Tensor) else where
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- availability ----------------------------------------------------------------------


def _triton_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "inputs are on the CPU; Triton kernels run there only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"inputs are on {device}; Triton kernels need CUDA tensors"
    return None


def _cuda_reason(device: torch.device) -> str | None:
    ext, reason = cuda_extension()
    if ext is None:
        return reason
    if device.type != "cuda":
        return f"inputs are on {device}; the cuda backend needs CUDA tensors"
    capability = device_capability(device_index(device))
    archs = compiled_archs()
    if not any(_arch_runs_on(a, capability) for a in archs):
        return (
            f"llama_kernels._C was built for {['sm_' + a for a in archs]}, none of which runs on this "
            f"{_sm(capability)} GPU; reinstall with LLAMA_KERNELS_CUDA_ARCHS={capability[0]}{capability[1]}"
            f"{'a' if capability[0] >= 9 else ''}"
        )
    return None


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None when `backend` can run `op` on `device`, else a sentence saying why not."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"the {backend} backend has no kernel for {op}"
    if backend == "torch":
        return None
    reason = _cuda_reason(device) if backend == "cuda" else _triton_reason(device)
    if reason is not None:
        return reason
    if impl.min_capability is not None and device.type == "cuda":
        capability = device_capability(device_index(device))
        if capability < impl.min_capability:
            need = impl.min_capability
            return (
                f"the {backend} {op} kernel needs compute capability >= {need[0]}.{need[1]} "
                f"({_sm(need)}); this GPU is {capability[0]}.{capability[1]}"
                + (f"; {impl.instead}" if impl.instead else "")
            )
    return None


# --- the record of validated CUDA kernels ----------------------------------------------


@functools.cache
def validated_kernels() -> list[dict]:
    """Entries {op, backend, arch, device, date, ...} of kernels whose GPU tests passed."""
    with open(VALIDATED_FILE) as f:
        return json.load(f)["kernels"]


def is_validated(op: str, backend: str, capability: tuple[int, int]) -> bool:
    return any(
        k["op"] == op and k["backend"] == backend and k["arch"] == _sm(capability) for k in validated_kernels()
    )


# --- selection -------------------------------------------------------------------------


def forced_backend(backend: str | None) -> str | None:
    """The backend the caller or the environment forces, or None for automatic selection."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "")
    choice = choice.strip().lower()
    if choice in ("", "auto"):
        return None
    if choice not in BACKENDS:
        source = "backend=" if backend is not None else ENV_VAR
        raise ValueError(f"{source}{choice!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return choice


def default_backend(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        if unavailable_reason(op, "cuda", device) is None and is_validated(
            op, "cuda", device_capability(device_index(device))
        ):
            return "cuda"
        if unavailable_reason(op, "triton", device) is None:
            return "triton"
    return "torch"


def select(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """(backend name, implementation) for one call of `op` on `device`."""
    forced = forced_backend(backend)
    if forced is None:
        name = default_backend(op, device)
    else:
        reason = unavailable_reason(op, forced, device)
        if reason is not None:
            source = "backend=" if backend is not None else f"{ENV_VAR}="
            raise BackendUnavailableError(f"{op}: {source}{forced!r} cannot run here: {reason}")
        name = forced
    return name, _REGISTRY[op][name].fn


# --- what the runner asks before it loads and captures -----------------------------------

# Reference ops that synchronize with the host (int(seq_lens[b]); boolean-mask indexing), so
# that a CUDA graph cannot capture them; every cuda and triton kernel can be captured.
HOST_SYNCING_REFERENCE = frozenset({"decode_attention", "rope_and_cache"})

# The ops each FP8 format runs in every forward pass: their torch reference on a GPU (float32
# dequantized weights, an N x K x 4-byte temporary per GEMM) must never be the hot loop.
FP8_WEIGHT_OPS = ("fp8_gemm", "quantize_fp8", "add_rms_norm_fp8")
FP8_KV_OPS = ("rope_and_cache", "decode_attention")


def graph_safe(op: str, device: torch.device, backend: str | None = None) -> bool:
    """Whether the implementation select() picks for `op` on `device` can be captured in a CUDA
    graph (decode then runs eagerly when an op of its step cannot)."""
    return not (select(op, device, backend)[0] == "torch" and op in HOST_SYNCING_REFERENCE)


def fallback_reason(op: str, device: torch.device) -> str | None:
    """Why automatic selection on the CUDA `device` does not run `op` on the cuda backend (and,
    when it runs the torch reference, why not on triton); None on the CPU or when it does."""
    if device.type != "cuda":
        return None
    name = default_backend(op, device)
    if name == "cuda":
        return None
    cuda = unavailable_reason(op, "cuda", device) or (
        f"its kernel has not passed the GPU tests on {_sm(device_capability(device_index(device)))} "
        f"(not in {VALIDATED_FILE.name})"
    )
    if name == "triton":
        return f"cuda: {cuda}"
    return f"cuda: {cuda}; triton: {unavailable_reason(op, 'triton', device)}"


def check_formats(device: torch.device, fp8_weights: bool, fp8_kv: bool) -> None:
    """Refuse, before anything loads, FP8 weights or an FP8 KV cache on a CUDA device where one of
    the ops they run every step has no GPU kernel (the torch reference would be the hot loop):
    ValueError, one line. A backend forced by LLAMA_KERNELS_BACKEND is left alone."""
    if device.type != "cuda" or forced_backend(None) is not None:
        return
    formats = [("FP8 weights (--quant fp8 or an FP8 checkpoint)", FP8_WEIGHT_OPS, "use --quant int4 or bf16 weights")]
    formats += [("an FP8 KV cache", FP8_KV_OPS, "use a bf16/fp16 KV cache")]
    for (what, needed, instead), wanted in zip(formats, (fp8_weights, fp8_kv)):
        for op in needed if wanted else ():
            if default_backend(op, device) == "torch":
                cap = device_capability(device_index(device))
                raise ValueError(
                    f"{what} cannot run on this {_sm(cap)} GPU ({device}): no GPU kernel for {op} "
                    f"({fallback_reason(op, device)}); {instead}"
                )
