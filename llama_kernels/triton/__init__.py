"""The triton backend: Triton kernels for the op contract (llama_kernels.ops); kernels land with issue 3."""
