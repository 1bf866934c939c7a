"""The triton backend: Triton kernels for the op contract (llama_kernels.ops).

Each module registers its kernels with `llama_kernels.backends` when imported. Without triton
installed nothing is registered, and `backend="triton"` says so. On the CPU the kernels run
under the Triton interpreter (TRITON_INTERPRET=1), which is how the test suite runs them.
"""

try:
    import triton  # noqa: F401
except ImportError:  # the pure-torch install: the triton backend stays empty
    triton = None

if triton is not None:
    from . import attention, fp8_gemm, int4_gemm, norm, prefill_attention, rope  # noqa: F401
