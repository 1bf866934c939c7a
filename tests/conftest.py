"""Shared test helpers: relative-error comparison that says where tensors differ, seeded random
inputs, poisoned outputs, and the `gpu` marker's skip."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run under the interpreter; triton reads this when a kernel is
# defined, so it must be set before llama_kernels (and its triton backend) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Relative error norm |out - ref| / |ref| allowed for a result rounded once to each dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
# FP8 e4m3 keeps 3 mantissa bits: one rounding is at most 2^-4 relative, ~0.03 as a norm.
FP8_TOL = 0.045


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Assert |out - ref| / |ref| <= tol, with finite values; on failure say where they differ most."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.double(), ref.double()
    bad = ~torch.isfinite(o)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values, first at index {tuple(bad.nonzero()[0].tolist())}"
    err = rel_err(o, r)
    if err > tol:
        diff = (o - r).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; largest difference at index {idx}: "
            f"got {o[idx].item():.6g}, expected {r[idx].item():.6g}"
        )


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def poison_allocator(device: torch.device, nbytes: int = 256 << 20) -> None:
    """Fill a large freed block of the CUDA caching allocator with NaN bytes, so outputs a kernel
    allocates and fails to write show up as NaN instead of stale correct-looking values."""
    if device.type == "cuda":
        junk = torch.empty(nbytes, dtype=torch.uint8, device=device)
        junk.fill_(0xFF)  # 0xFFFF is NaN in fp16/bf16, 0xFFFFFFFF in fp32, 0xFF in e4m3fn
        del junk


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small models on one thread: on 2 busy cores a second thread mostly adds
    synchronization (about 5x the CPU time). Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cuda_backend_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    from llama_kernels import backends

    ext, reason = backends.cuda_extension()
    return None if ext is not None else reason


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="gpu test: no CUDA GPU visible on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
