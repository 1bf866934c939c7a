"""The cuda add_rms_norm kernels against the reference, on a GPU (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch

from conftest import TOL, assert_rel_close, poison_allocator, randn
from llama_kernels import ops, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 576), (3, 4096), (17, 1032), (64, 8192), (5, 16384), (4096, 576)]


def _inputs(m, h, dtype, device, seed):
    x = randn(m, h, dtype=dtype, seed=seed, scale=2.0, device=device)
    res = randn(m, h, dtype=dtype, seed=seed + 1, device=device)
    w = randn(h, dtype=dtype, seed=seed + 2, device=device)
    return x, res, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_cuda(gpu, dtype, m, h, with_residual):
    x, res, w = _inputs(m, h, dtype, gpu, seed=m + h)
    res = res if with_residual else None
    want_y, want_r = reference.add_rms_norm(x, res, w, 1e-5)
    poison_allocator(gpu)
    y, r = ops.add_rms_norm(x, res, w, 1e-5, backend="cuda")
    assert torch.equal(r, want_r), "residual_out must equal the dtype-rounded sum exactly"
    assert_rel_close(y, want_y, TOL[dtype], "y")
    y2, r2 = ops.add_rms_norm(x, res, w, 1e-5, backend="cuda")
    assert torch.equal(y, y2) and torch.equal(r, r2), "repeat runs must be bit-identical"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h", SHAPES)
def test_rms_norm_cuda(gpu, dtype, m, h):
    x, _, w = _inputs(m, h, dtype, gpu, seed=h)
    poison_allocator(gpu)
    assert_rel_close(ops.rms_norm(x, w, 1e-6, backend="cuda"), reference.rms_norm(x, w, 1e-6), TOL[dtype], "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h", SHAPES)
@pytest.mark.parametrize("scale_ub", [None, 2.0])
def test_add_rms_norm_fp8_cuda(gpu, dtype, m, h, scale_ub):
    x, res, w = _inputs(m, h, dtype, gpu, seed=m * h)
    want_q, want_s, want_r = reference.add_rms_norm_fp8(x, res, w, 1e-5, scale_ub)
    poison_allocator(gpu)
    yq, ys, r = ops.add_rms_norm_fp8(x, res, w, 1e-5, scale_ub, backend="cuda")
    assert torch.equal(r, want_r)
    assert_rel_close(ys, want_s, 1e-5, "y_scale")
    got, want = yq.float(), want_q.float()
    assert torch.isfinite(got).all()
    # x * (1/scale) may round a tie differently from x / scale: allow rare one-code differences.
    differ = got != want
    assert differ.float().mean() < 0.01, f"{int(differ.sum())} of {got.numel()} FP8 codes differ"
    assert_rel_close(got * ys[:, None], want * want_s[:, None], 0.01, "dequantized yq")


def test_add_rms_norm_fp8_cuda_no_nan_far_above_448(gpu):
    x, res, w = _inputs(4, 4096, torch.bfloat16, gpu, seed=3)
    yq, ys, _ = ops.add_rms_norm_fp8(x, res, w * 1e30, 1e-5, backend="cuda")
    assert torch.isfinite(yq.float()).all() and torch.isfinite(ys).all()


def test_add_rms_norm_cuda_on_a_side_stream(gpu):
    x, res, w = _inputs(64, 4096, torch.bfloat16, gpu, seed=5)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y, r = ops.add_rms_norm(x, res, w, 1e-5, backend="cuda")
    stream.synchronize()
    assert_rel_close(y, reference.add_rms_norm(x, res, w, 1e-5)[0], TOL[torch.bfloat16], "y")


def test_add_rms_norm_cuda_in_a_cuda_graph(gpu):
    x, res, w = _inputs(8, 4096, torch.bfloat16, gpu, seed=6)
    ops.add_rms_norm(x, res, w, 1e-5, backend="cuda")  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, r = ops.add_rms_norm(x, res, w, 1e-5, backend="cuda")
    x.copy_(randn(8, 4096, dtype=torch.bfloat16, seed=7, device=gpu))
    graph.replay()
    torch.cuda.synchronize()
    assert_rel_close(y, reference.add_rms_norm(x, res, w, 1e-5)[0], TOL[torch.bfloat16], "graph replay y")


def test_misaligned_input_is_rejected_before_launch(gpu):
    base = randn(3 * 4096 + 8, dtype=torch.bfloat16, device=gpu)
    x = base[1:].narrow(0, 0, 3 * 4096).view(3, 4096)  # 2-byte offset
    w = randn(4096, dtype=torch.bfloat16, device=gpu)
    with pytest.raises(ValueError, match=r"add_rms_norm: argument 'x' has data pointer .* not 16-byte aligned"):
        ops.add_rms_norm(x, None, w, backend="cuda")


def test_hidden_not_multiple_of_8_is_rejected(gpu):
    x, w = randn(2, 100, device=gpu), randn(100, device=gpu)
    with pytest.raises(ValueError, match=r"rms_norm: hidden=100 must be a multiple of 8"):
        ops.rms_norm(x, w, backend="cuda")
