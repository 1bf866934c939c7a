"""Compile the Triton specializations a run will launch, in parallel, before it launches any.

Triton compiles a kernel on its first launch with a new specialization (dtypes, constexprs,
alignment, num_warps/num_stages), 1-2 s each and one at a time; a selftest on a GPU launches
dozens. Here a dry pass runs the launches with Triton's `jit_cache_hook` answering "skip": each
launch's specialization is recorded (Triton's own serialized form, `specialization_data`) and
nothing is compiled or launched. A process pool then compiles them with `JITFunction.preload`,
Triton's own path, which writes Triton's on-disk cache; the real launches later load from it.
Works with Triton 3.6 through 3.9 (both have the hook and preload).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Specialization:
    """One compilation of one @triton.jit function."""

    module: str  # where the JITFunction lives, e.g. "llama_kernels.triton.attention"
    name: str  # its attribute name there, e.g. "_split_kernel"
    data: str  # Triton's specialization_data (JSON: signature, constexprs, attrs, options, target)

    @property
    def options(self) -> dict:
        return json.loads(self.data)["options"]


@contextlib.contextmanager
def recording() -> Iterator[list[Specialization]]:
    """Inside, Triton launches compile and run nothing: each new specialization is appended to the
    yielded list (once each) and the launch returns None. Outputs are left unwritten."""
    from triton import knobs

    seen: dict[str, Specialization] = {}

    def hook(*, fn, compile, **_) -> bool:
        spec = Specialization(fn.module, fn.name, compile["specialization_data"])
        seen.setdefault(spec.data, spec)
        return True  # skip the compilation, and so the launch

    found: list[Specialization] = []
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        yield found
    finally:
        knobs.runtime.jit_cache_hook = previous
        found.extend(seen.values())


def _jit_function(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def compile_one(spec: Specialization) -> tuple[str, float, str]:
    """Compile one specialization in this process (into Triton's on-disk cache): (name, seconds, error)."""
    start = time.perf_counter()
    try:
        _jit_function(spec.module, spec.name).preload(spec.data)
    except Exception as err:  # noqa: BLE001  (reported; the real launch then compiles it itself)
        return spec.name, time.perf_counter() - start, f"{type(err).__name__}: {err}"
    return spec.name, time.perf_counter() - start, ""


def compile_all(specs: list[Specialization], workers: int, initializer: Callable | None = None,
                initargs: tuple = ()) -> list[tuple[str, float, str]]:  # fmt: skip
    """Compile `specs` in a pool of `workers` fresh processes (spawned: the parent may hold a CUDA
    context, which a forked child cannot use); one (name, seconds, error) per spec, in order."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        return list(pool.map(compile_one, specs))


class TargetOnlyDriver:
    """A Triton driver that knows a GPU target and nothing else: with it active, launches specialize
    and compile (e.g. for GPUTarget("cuda", 90, 32)) on a machine without that GPU. For checking the
    dry pass and the compilation on the CPU; nothing can run."""

    def __init__(self, backend: str = "cuda", arch: int = 90, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(backend, arch, warp_size)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int = 0) -> int:
        return 0


def use_target(backend: str = "cuda", arch: int = 90, warp_size: int = 32) -> None:
    """Make a TargetOnlyDriver Triton's active driver in this process (a pool initializer)."""
    from triton.runtime.driver import driver

    driver.set_active(TargetOnlyDriver(backend, arch, warp_size))
