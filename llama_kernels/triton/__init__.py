"""The triton backend: Triton kernels for the op contract (llama_kernels.ops).

Each module registers its kernels with `llama_kernels.backends` when imported. Without triton
installed nothing is registered, and `backend="triton"` says so. On the CPU the kernels run
under the Triton interpreter (TRITON_INTERPRET=1), which is how the test suite runs them.
"""

try:
    import triton  # noqa: F401
except ImportError:  # the pure-torch install: the triton backend stays empty
    triton = None



def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a tensor used as an index or loop bound (a runtime scalar, held as
    a 1-element array) into an int with int(array), which numpy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"): every kernel with a runtime loop bound fails under
    TRITON_INTERPRET=1. Triton 3.9 squeezes the array first; so does this, on interpreters that do not
    (compiled kernels never run this code)."""
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        buggy = original is not None and "int(self.handle.data))" in inspect.getsource(original)
    except (OSError, TypeError):
        buggy = False
    if not buggy:
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if triton is not None:
    _fix_interpreter_index()
    from . import attention, fp8_gemm, int4_gemm, norm, prefill_attention, rope  # noqa: F401
