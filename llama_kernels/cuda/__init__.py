"""The cuda backend: torch.library custom ops around the hand-written kernels in llama_kernels._C.

Importing this package registers every op with `llama_kernels.backends`; see common.py for the
conventions (raw pointers, the current stream, alignment checks before any launch).
"""

from . import attention, fp8_gemm, int4_gemm, norm, rope  # noqa: F401
