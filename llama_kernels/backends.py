"""Backend registry and selection: which implementation of an op runs on which device.

Backends: ``cuda`` (hand-written kernels in ``llama_kernels._C``), ``triton``
(``llama_kernels.triton``) and ``torch`` (``llama_kernels.reference``, always available).

Selection, per call:
1. ``backend=`` on the op, else the environment variable ``LLAMA_KERNELS_BACKEND``
   (``auto`` or empty means no preference). A forced backend that cannot run the call raises
   :class:`BackendUnavailableError` saying why (no ``_C``, no GPU, wrong compute capability,
   no kernel for the op yet).
2. Otherwise on a CUDA device (:func:`auto_order`): the fastest passing kernel backend for the
   op and the call's row bucket if ``llama-kernels selftest --bench`` measured one on this GPU;
   else ``cuda`` if its kernel for the op passed the GPU checks here for the call's instantiation
   (:func:`instance_key`: the dtypes, head_dim, cache dtype, block size, group range or rows that
   select a different template or config) with the current code (:func:`code_id`), per the user's
   selftest record :func:`user_record_path` or the shipped ``validated_kernels.json`` for this
   architecture; else ``triton``; else ``torch``. A kernel the selftest record says failed on this
   GPU for the instantiation is never chosen automatically. When the chosen kernel has no variant for a
   call's shape (:class:`NoKernelError`, raised before any launch) the next backend runs it.
   On the CPU: ``torch``.

For the runner: :func:`check_formats` refuses FP8 weights or an FP8 KV cache at load on a GPU
where one of their ops has no GPU kernel; :func:`graph_safe` says whether selection's pick can be
captured in a CUDA graph; :func:`explain` says which backend an op uses and why (shown by
``llama-kernels info``); :func:`on_device` makes the inputs' GPU current around launches.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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
RECORD_ENV_VAR = "LLAMA_KERNELS_VALIDATED"  # path of the user's selftest record (default: user_record_path())
KERNEL_BACKENDS = ("cuda", "triton")  # those `selftest --bench` may prefer (torch: the reference, host-synchronizing)
ROW_BUCKETS = ((1, "1"), (16, "2-16"), (128, "17-128"))  # rows of the first argument -> bucket; more: ">128"
# Package files every kernel's result depends on besides its own sources: the reference it is checked
# against, the op layer that validates and routes its calls, the INT4 layout (part of code_id).
SHARED_SOURCES = ("int4.py", "reference.py", "ops.py")
# Package files outside a backend's directory that its kernels' results depend on (part of its code_id):
# the triton prefill attention's plan workspace and tile rows (torch-free, shared with the memory planner).
BACKEND_SOURCES = {"triton": ("attention_workspace.py",)}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message says which backend and why."""


class NoKernelError(ValueError):
    """A backend has no compiled kernel for this shape / alignment (raised before any launch);
    automatic dispatch then runs the call on the next backend."""


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


_NOTHING = contextlib.nullcontext()  # stateless, so one instance serves every CPU call (no allocation per op call)


def on_device(where: torch.Tensor | torch.device) -> contextlib.AbstractContextManager:
    """Make the GPU of a tensor (or device) the current device for the launches inside: kernels launch
    on the current device and stream, which for a cuda:1 tensor need not be cuda:1's. Nothing on the CPU."""
    device = where.device if isinstance(where, torch.Tensor) else where
    return torch.cuda.device(device) if device.type == "cuda" else _NOTHING


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


# --- the record of validated kernels ---------------------------------------------------


@functools.cache
def validated_kernels() -> list[dict]:
    """Entries {op, backend, arch, instances, code, device, date, ...} of kernels whose GPU tests
    passed (shipped in validated_kernels.json): `instances` lists the :func:`instance_key` values
    that were validated, `code` is :func:`code_id` of the backend when they were."""
    with open(VALIDATED_FILE) as f:
        return json.load(f)["kernels"]


def stale_shipped() -> list[dict]:
    """Shipped entries whose code hash no longer matches this build: ignored (a kernel changed since)."""
    return [k for k in validated_kernels() if k.get("code") != code_id(k["backend"])]


def is_validated(op: str, backend: str, capability: tuple[int, int], instance: str | None = None) -> bool:
    """Whether a shipped entry with the current code validated `op` on `backend` for this architecture,
    for `instance` (None: for any instantiation)."""
    return any(
        k["op"] == op and k["backend"] == backend and k["arch"] == _sm(capability)
        and k.get("code") == code_id(backend) and (instance is None or instance in k.get("instances", ()))
        for k in validated_kernels()
    )  # fmt: skip


def user_record_path() -> Path:
    """The user's selftest record: $LLAMA_KERNELS_VALIDATED, else ~/.cache/llama-kernels/validated.json
    (under $XDG_CACHE_HOME when set)."""
    env = os.environ.get(RECORD_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(cache) / "llama-kernels" / "validated.json"


def device_key(name: str, capability: tuple[int, int]) -> str:
    """The record's key of one GPU model: its name and compute capability."""
    return f"{name} (sm_{capability[0]}{capability[1]})"


def _build_fingerprint() -> str:
    """What of the build info decides the cuda kernels' code: the digest of the sources compiled
    (csrc/, python/*.cpp, CMakeLists.txt), nvcc's version, whether it is a checked build. Not the
    arch list: each arch's code is compiled on its own, and a validation names its arch."""
    try:
        from . import _build_info
    except ImportError:
        return ""
    return "|".join(str(getattr(_build_info, k, "")) for k in ("SOURCES_SHA256", "CUDA_COMPILER_VERSION", "CHECKED"))


@functools.cache
def code_id(backend: str) -> str:
    """A fingerprint of every file a backend's kernels depend on: for cuda the build info
    (:func:`_build_fingerprint`: the digest of the sources _C was compiled from, nvcc's version,
    checked or not) and llama_kernels/cuda/*.py; for triton its version and llama_kernels/triton/*.py;
    for both SHARED_SOURCES (int4.py, reference.py, ops.py); and the backend's BACKEND_SOURCES. A record
    made with other code does not count (a changed kernel must pass again); shipped entries carry it."""
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    files = [*sorted((pkg / backend).glob("*.py")),
             *(pkg / name for name in SHARED_SOURCES + BACKEND_SOURCES.get(backend, ()))]  # fmt: skip
    if backend == "cuda":
        h.update(_build_fingerprint().encode())
    elif backend == "triton":
        try:
            import triton

            h.update(triton.__version__.encode())
        except ImportError:
            pass
    for source in files:
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    return h.hexdigest()[:16]


def _dtype(t: torch.Tensor | torch.dtype) -> str:
    return str(t.dtype if isinstance(t, torch.Tensor) else t).removeprefix("torch.")


def _up_to_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _group_range(group: int) -> str:
    """Query heads per KV head -> the range that shares one program shape (the Triton kernels pad a
    group to a power of two >= 16; the CUDA decode kernel runs every group <= 16 in one tile)."""
    top = max(16, _up_to_pow2(group))
    return f"{top // 2 + 1 if top > 16 else 1}-{top}"


def _attention_instance(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    group = q.shape[-2] // max(1, k_cache.shape[2])
    return f"{_dtype(q)} D{q.shape[-1]} cache {_dtype(k_cache)} block {k_cache.shape[1]} group {_group_range(group)}"


def _gemm_rows(op: str, m: int) -> str:
    """Rows of M -> the class that selects one CUDA GEMM tile config (cuda/gemm_configs.ROWS: m16, m32,
    m64; beyond, m64 or the Hopper wgmma kernel), so that a pass at M=128 does not vouch for M=32."""
    from .cuda.gemm_configs import ROWS

    top = next((r for r in ROWS[op] if m <= r), None)
    return f"M<={top}" if top is not None else f"M>{ROWS[op][-1]}"


def _norm_instance(args: tuple) -> str:
    return f"{_dtype(args[0])} hidden<={_up_to_pow2(args[0].shape[-1])}"


# op -> (its backend call's positional arguments -> the instantiation key); see instance_key
_INSTANCE: dict[str, Callable[[tuple], str]] = {
    "quantize_fp8": _norm_instance,
    "rms_norm": _norm_instance,
    "add_rms_norm": _norm_instance,
    "add_rms_norm_fp8": _norm_instance,
    "fp8_gemm": lambda a: f"out {_dtype(a[4])}{' bias' if a[5] is not None else ''} {_gemm_rows('fp8_gemm', a[0].shape[0])}",
    "int4_gemm": lambda a: (f"{_dtype(a[0])} group {a[1].group_size}{' asym' if a[1].zeros is not None else ''}"
                            f"{' act-order' if a[1].perm is not None else ''} {_gemm_rows('int4_gemm', a[0].shape[0])}"),
    "rope_and_cache": lambda a: (f"{_dtype(a[0])} D{a[0].shape[-1]} cache {_dtype(a[6])} block {a[6].shape[1]}"
                                 f"{' interleaved' if len(a) > 11 and a[11] else ''}"),
    "decode_attention": lambda a: _attention_instance(a[0], a[1]),
    "paged_prefill_attention": lambda a: _attention_instance(a[0], a[1]),
}  # fmt: skip


def instance_key(op: str, args: tuple) -> str | None:
    """What a validation of `op` on these arguments covers: the properties that select a different
    kernel template or config (dtypes, head_dim, cache dtype, block size, group range; the GEMMs' rows
    class, which picks their tile config; the hidden size class of the norms). None when the
    arguments do not say (such a call is then covered by no validation)."""
    key = _INSTANCE.get(op)
    try:
        return key(args) if key is not None else None
    except (AttributeError, IndexError, TypeError):
        return None


def row_bucket(rows: int) -> str:
    """The shape bucket of a call with `rows` rows (tokens, sequences) in its first argument."""
    return next((label for bound, label in ROW_BUCKETS if rows <= bound), f">{ROW_BUCKETS[-1][0]}")


def args_bucket(args: tuple) -> str | None:
    first = args[0] if args else None
    return row_bucket(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None


@functools.cache
def _user_record_devices() -> dict:
    try:
        with open(user_record_path()) as f:
            return json.load(f).get("devices", {})
    except (OSError, ValueError, AttributeError):
        return {}  # no record yet (or an unreadable one): nothing was validated here


def reload_user_record() -> None:
    """Forget the cached record (after the selftest wrote a new one): the next dispatch rereads it."""
    _user_record_devices.cache_clear()
    _device_record.cache_clear()


@functools.cache
def _device_record(index: int) -> dict:
    devices = _user_record_devices()
    if not devices:
        return {}
    return devices.get(device_key(torch.cuda.get_device_name(index), device_capability(index)), {})


def recorded(op: str, backend: str, index: int) -> dict | None:
    """The selftest result {passed, date, instances: {instance_key: {passed, date}}, ...} of
    `backend`'s `op` kernel on CUDA device `index`, if one was recorded there with the current code;
    else None."""
    entry = _device_record(index).get("kernels", {}).get(f"{op}:{backend}")
    return entry if entry is not None and entry.get("code") == code_id(backend) else None


def _verdict(op: str, backend: str, index: int, instance: str | None) -> tuple[str, str]:
    """("passed" | "failed" | "shipped" | "unvalidated", date or arch) of `backend`'s `op` kernel for
    `instance` on device `index`; instance None (no call at hand: info, load-time checks) asks about
    the op as a whole: failed when an instantiation failed here, else passed when one passed."""
    instances = (recorded(op, backend, index) or {}).get("instances", {})
    if instance is not None:
        result = instances.get(instance)
        if result is not None:
            return ("passed" if result.get("passed") else "failed"), result.get("date", "?")
    else:
        results = sorted(instances.values(), key=lambda r: bool(r.get("passed")))  # a failure first
        if results:
            return ("passed" if results[0].get("passed") else "failed"), results[0].get("date", "?")
    capability = device_capability(index)
    if is_validated(op, backend, capability, instance):
        return "shipped", _sm(capability)
    return "unvalidated", ""


def recorded_fastest(op: str, index: int, bucket: str | None) -> tuple[str, str] | None:
    """(backend, date) of the fastest passing kernel backend one `selftest --bench` run measured for
    `op` in `bucket` on device `index` against the other kernel backends, if any, and if none of
    those backends' code changed since."""
    record = _device_record(index)
    entry = record.get("fastest", {}).get(op, {}).get(bucket or "")
    if not isinstance(entry, dict) or entry.get("backend") not in KERNEL_BACKENDS:
        return None  # none, or a record from before the comparison was recorded with its code
    if any(code_id(name) != code for name, code in entry.get("code", {}).items()):
        return None
    return entry["backend"], entry.get("date", "")


# --- selection -------------------------------------------------------------------------


@functools.cache
def _reference_only(device_type: str) -> tuple[tuple[str, str], ...]:
    """auto_order off CUDA, built once per device type (it is asked on every op call)."""
    return (("torch", f"inputs are on {device_type}: the reference implementation"),)


def auto_order(
    op: str, device: torch.device, bucket: str | None = None, instance: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The backends automatic dispatch tries for `op` on `device` (first one first; a later one runs
    a call the earlier has no kernel for), each with the reason it is there. `instance`: the call's
    instance_key (None: the op as a whole); a cuda kernel runs only where one was validated."""
    if device.type != "cuda":
        return _reference_only(device.type)
    index = device_index(device)
    notes = []  # why a better-ranked backend is not used
    order: list[tuple[str, str]] = []
    trusted = {}  # kernel backend -> why it may run here
    which = f" for {instance}" if instance is not None else ""
    for name in KERNEL_BACKENDS:
        reason = unavailable_reason(op, name, device)
        verdict, when = _verdict(op, name, index, instance) if reason is None else ("", "")
        if reason is not None:
            notes.append(f"{name}: {reason}")
        elif verdict == "failed":
            notes.append(f"the {name} kernel failed llama-kernels selftest on this GPU{which} ({when})")
        elif verdict == "passed":
            trusted[name] = f"passed llama-kernels selftest on this GPU{which} ({when})"
        elif verdict == "shipped":
            trusted[name] = f"validated on {when}{which} (validated_kernels.json)"
        elif name == "cuda":
            notes.append(f"the cuda kernel has not passed llama-kernels selftest on this GPU{which}")
        else:
            trusted[name] = f"the default on GPUs (no selftest result here{which})"  # unless the record says it failed
    fastest = recorded_fastest(op, index, bucket)
    if fastest is not None and fastest[0] in trusted:
        order.append((fastest[0], f"fastest passing backend for {bucket} rows (selftest --bench, {fastest[1]})"))
    for name, why in trusted.items():
        if name not in dict(order):
            order.append((name, why))
    order.append(("torch", "the reference implementation"))
    first, why = order[0]
    if notes and first != "cuda":
        order[0] = (first, f"{why}; {'; '.join(notes)}")
    return tuple(order)


def forced_backend(backend: str | None) -> str | None:
    """The backend the caller or the environment forces, or None for automatic selection."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "")
    if not choice:  # the common case, decided without building new strings
        return None
    choice = choice.strip().lower()
    if choice in ("", "auto"):
        return None
    if choice not in BACKENDS:
        source = "backend=" if backend is not None else ENV_VAR
        raise ValueError(f"{source}{choice!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return choice


def default_backend(op: str, device: torch.device) -> str:
    return auto_order(op, device)[0][0]


def explain(op: str, device: torch.device) -> tuple[str, str]:
    """(backend, why) automatic dispatch uses for `op` on `device` (calls with no row bucket)."""
    forced = forced_backend(None)
    if forced is not None:
        return forced, f"forced by {ENV_VAR}"
    order = auto_order(op, device)
    name, why = order[0]
    if name == "cuda":
        index = device_index(device)
        mine = {k for k, r in (recorded(op, name, index) or {}).get("instances", {}).items() if r.get("passed")}
        shipped = {k for e in validated_kernels() if e["op"] == op and e["backend"] == name
                   and e["arch"] == _sm(device_capability(index)) and e.get("code") == code_id(name)
                   for k in e.get("instances", ())}  # fmt: skip
        why += f"; for the validated instantiations only ({', '.join(sorted(mine | shipped))}), others: {order[1][0]}"
    if device.type == "cuda":
        by_bucket = [f"{bucket}: {auto_order(op, device, bucket)[0][0]}"
                     for bucket in _device_record(device_index(device)).get("fastest", {}).get(op, {})]  # fmt: skip
        if by_bucket:
            why += f"; by rows, after selftest --bench: {', '.join(by_bucket)}"
    return name, why


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


def call(op: str, device: torch.device, backend: str | None, args: tuple):
    """Run `op` on `args`: on the forced backend, else on the first of :func:`auto_order` (for the
    row bucket of args[0] and the instantiation of args) that has a kernel for this shape."""
    if forced_backend(backend) is not None:
        return select(op, device, backend)[1](*args)
    on_gpu = device.type == "cuda"
    order = auto_order(op, device, args_bucket(args) if on_gpu else None, instance_key(op, args) if on_gpu else None)
    for name, _ in order[:-1]:
        try:
            return _REGISTRY[op][name].fn(*args)
        except NoKernelError:
            continue  # raised before any launch: nothing ran, the next backend takes the call
    return _REGISTRY[op][order[-1][0]].fn(*args)


# --- what the runner asks before it loads and captures -----------------------------------

# Reference ops that synchronize with the host (int(seq_lens[b]); boolean-mask indexing), so
# that a CUDA graph cannot capture them; every cuda and triton kernel can be captured.
HOST_SYNCING_REFERENCE = frozenset({"decode_attention", "rope_and_cache", "paged_prefill_attention"})

# The ops each FP8 format runs in every forward pass: their torch reference on a GPU (float32
# dequantized weights, an N x K x 4-byte temporary per GEMM) must never be the hot loop.
FP8_WEIGHT_OPS = ("fp8_gemm", "quantize_fp8", "add_rms_norm_fp8")
FP8_KV_OPS = ("rope_and_cache", "decode_attention")


def graph_safe(op: str, device: torch.device, backend: str | None = None) -> bool:
    """Whether the implementation select() picks for `op` on `device` can be captured in a CUDA
    graph (decode then runs eagerly when an op of its step cannot)."""
    return not (select(op, device, backend)[0] == "torch" and op in HOST_SYNCING_REFERENCE)


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
                    f"({explain(op, device)[1]}); {instead}"
                )


# The op layer registers every backend (the torch reference, cuda, triton) when it is imported, so that importing this
# module alone gives a full registry too. Last, because ops imports this module.
from . import ops as _ops  # noqa: E402,F401
