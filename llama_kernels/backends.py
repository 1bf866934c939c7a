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
"""

from __future__ import annotations

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


_REGISTRY: dict[str, dict[str, Impl]] = {}


def register(
    op: str,
    backend: str,
    fn: Callable,
    min_capability: tuple[int, int] | None = None,
    instead: str = "",
) -> None:
    """Make `fn` the `backend` implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, min_capability, instead)


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
