"""Compile Triton kernels for a GPU target without a GPU, and read what ptxas says about them.

The interpreter (TRITON_INTERPRET=1) cannot catch what only the GPU compiler rejects (block
shapes tensor cores refuse, unsupported dtypes), nor register spills; compiling for
GPUTarget("cuda", 90, 32) here does.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_for(kernel, signature: dict, constexprs: dict, capability: int = 90, **options):
    """triton.compile `kernel` for sm_<capability>; works whether or not TRITON_INTERPRET is set.

    signature: every argument name -> type ("*bf16", "*fp8e4nv", "i32", "fp32", "constexpr");
    constexprs: values of the constexpr arguments; options: num_warps, num_stages, ...
    """
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
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
