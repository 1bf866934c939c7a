"""Compile Triton kernels for a GPU target without a GPU, and read what ptxas says about them.

The interpreter (TRITON_INTERPRET=1) cannot catch what only the GPU compiler rejects (block
shapes tensor cores refuse, unsupported dtypes), nor register spills; compiling for
GPUTarget("cuda", 90, 32) here does.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# triton.language as imported, before any interpreted launch (pytest imports every test module,
# and so this one, before running any test): an interpreted kernel that calls tl.max / tl.sum /
# tl.zeros leaves triton.language patched for the interpreter (its device-call path never
# restores it), and a later compile in the same process would then emit interpreter ops.
_LANG = [m for name, m in sys.modules.items() if name.startswith("triton.language") and m is not None]
_PATCHED_CLASSES = (tl.tensor, getattr(tl.core, "tensor_descriptor_base", None))
_PRISTINE = {obj: dict(vars(obj)) for obj in (*_LANG, *_PATCHED_CLASSES) if obj is not None}


def _set_vars(obj, attrs: dict) -> None:
    for name in [n for n in vars(obj) if n not in attrs]:
        delattr(obj, name)
    for name, value in attrs.items():
        if vars(obj).get(name) is not value:
            setattr(obj, name, value)


def _jit(fn: InterpretedFunction) -> JITFunction:
    return JITFunction(fn.fn, **getattr(fn, "kwargs", {}))


def _compilable(attrs: dict) -> dict:
    return {k: _jit(v) if isinstance(v, InterpretedFunction) else v for k, v in attrs.items()}


@contextlib.contextmanager
def _compilable_language():
    """The pristine triton.language, and every @jit helper (an InterpretedFunction under
    TRITON_INTERPRET=1) of triton.language and of llama_kernels as a compilable JITFunction;
    the current state is put back after."""
    ours = [m for name, m in sys.modules.items() if name.startswith("llama_kernels.") and m is not None]
    current = {obj: dict(vars(obj)) for obj in (*_PRISTINE, *ours)}
    try:
        for obj, attrs in _PRISTINE.items():
            _set_vars(obj, _compilable(attrs))
        for module in ours:
            _set_vars(module, _compilable(dict(vars(module))))
        yield
    finally:
        for obj, attrs in current.items():
            _set_vars(obj, attrs)


def compile_for(kernel, signature: dict, constexprs: dict, capability: int = 90, aligned_ints=(), **options):
    """triton.compile `kernel` for sm_<capability>; works whether or not TRITON_INTERPRET is set,
    also after interpreted launches in the same process.

    signature: every argument name -> type ("*bf16", "*fp8e4nv", "i32", "fp32", "constexpr");
    constexprs: values of the constexpr arguments; options: num_warps, num_stages, ...
    Pointers, and the integer arguments named in `aligned_ints`, are marked divisible by 16, as a
    launch with torch tensors (and such sizes) specializes them: without it every load is scalar
    and register use is not what a real launch sees.
    """
    fn = kernel if isinstance(kernel, JITFunction) else _jit(kernel)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(signature.items())
             if t.startswith("*") or name in aligned_ints}  # fmt: skip
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    with _compilable_language():
        return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def ptxas_report(compiled, capability: int = 90) -> dict:
    """Registers and spill bytes of a compiled kernel, from `ptxas -v` on its PTX."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        errors = []
        for name in ("ptxas-blackwell", "ptxas"):  # the wheel's newest ptxas reads triton's PTX version
            exe = os.path.join(_BIN, name)
            if not os.path.exists(exe):
                continue
            done = subprocess.run([exe, f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode == 0:
                text = done.stdout + done.stderr
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                regs = re.search(r"Used (\d+) registers", text)
                return {"spill_stores": int(spills[1]), "spill_loads": int(spills[2]),
                        "registers": int(regs[1]), "log": text}  # fmt: skip
            errors.append(done.stderr)
    raise RuntimeError(f"no ptxas in {_BIN} could assemble the kernel: {errors}")
