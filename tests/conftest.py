"""Shared test helpers: relative-error comparison that says where tensors differ, seeded random
inputs, poisoned outputs, and the `gpu` marker's skip."""

from __future__ import annotations

import functools
import os

import torch

# Without a GPU the Triton kernels run under the interpreter; triton reads this when a kernel is
# defined, so it must be set before llama_kernels (and its triton backend) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llama_kernels.selftest import poison_allocator, rel_err  # noqa: E402,F401  (shared with the selftest)

# Relative error norm |out - ref| / |ref| allowed for a result rounded once to each dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
# FP8 e4m3 keeps 3 mantissa bits: one rounding is at most 2^-4 relative, ~0.03 as a norm.
FP8_TOL = 0.045


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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small models on one thread: on 2 busy cores a second thread mostly adds
    synchronization (about 5x the CPU time). Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpu() -> torch.device:
    """The CUDA device, for tests of the cuda backend; skips with the reason it is unavailable."""
    reason = _cuda_backend_reason()
    if reason:
        pytest.skip(f"cuda backend unavailable: {reason}")
    return torch.device("cuda")


def paged_attention_case(seq_lens, hq, hkv, d, block_size, dtype, cache_dtype, seed, device="cpu", spare_blocks=1):
    """Random decode-attention inputs [q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale]:
    a shuffled block table whose unused entries point far outside the cache (a kernel reading past
    a sequence's end faults or fails), heads of distinct magnitudes (a wrong per-head scale or head
    mapping shows), caches in cache_dtype with per-head k/v scales when FP8."""
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    max_blocks = max(-(-n // block_size) for n in seq_lens) + spare_blocks
    num_blocks = b * max_blocks + 3
    table = torch.randperm(num_blocks, generator=g)[: b * max_blocks].reshape(b, max_blocks).int()
    for i, n in enumerate(seq_lens):
        table[i, -(-n // block_size) :] = 1 << 30
    head_mag = torch.arange(1, hkv + 1, dtype=torch.float64)[:, None]
    k_cache = randn(num_blocks, block_size, hkv, d, seed=seed + 1) * head_mag
    v_cache = randn(num_blocks, block_size, hkv, d, seed=seed + 2) * head_mag
    k_scale = v_scale = None
    if cache_dtype == torch.float8_e4m3fn:
        k_scale = (k_cache.abs().amax(dim=(0, 1, 3)) / 448).float()
        v_scale = (v_cache.abs().amax(dim=(0, 1, 3)) / 448).float()
        k_cache = (k_cache / k_scale[:, None].double()).to(cache_dtype)
        v_cache = (v_cache / v_scale[:, None].double()).to(cache_dtype)
        k_scale, v_scale = k_scale.to(device), v_scale.to(device)
    else:
        k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    q = randn(b, hq, d, dtype=dtype, seed=seed + 3)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, table, lens)] + [k_scale, v_scale]


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


@functools.cache
def default_model_missing() -> str:
    """Why the default model (SmolLM2-135M-Instruct GGUF) is unavailable; '' when it is installed, cached, or
    fetched now (once, into the cache, as `llama-kernels generate` would)."""
    from llama_kernels.loader import CheckpointError, default_model_path

    try:
        default_model_path(progress=False)
    except CheckpointError as err:
        return str(err)
    return ""


needs_smollm2 = pytest.mark.skipif(bool(default_model_missing()), reason=default_model_missing() or "available")


def run_engine(engine, requests: dict, after_step=None) -> dict[str, list]:
    """Add every request {id: (prompt ids, SamplingParams)} to an Engine, step until done (calling
    after_step() after each step, if given); {id: the RequestOutputs it got}. Asserts that no KV block is
    left in use."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
        if after_step is not None:
            after_step()
    assert engine.allocator.used == 0, "blocks leaked"
    return outs


def output_tokens(outs: list) -> list[int]:
    """The token ids of a request's RequestOutputs, in order."""
    return [t for o in outs for t in o.new_token_ids]
