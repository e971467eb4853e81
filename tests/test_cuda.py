"""CUDA-only cases of the fused head (csrc/cuda/head.cu): precision paths, awkward sizes, poisoned
outputs, streams, graph capture, empty batch. The device-parametrised bodies shared with the CPU
live in test_fused.py; these need a GPU and the CUDA build, and skip with the reason otherwise.

Tolerances are SPEC 6's: float32 within 1e-4 relative (L2) of the reference, bf16 within 2e-2;
the reference is evaluated in float64 on the GPU, and once more in float32 with TF32 off.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import simplenet_fast
from simplenet_fast import SimpleNetHead, _fused
from conftest import relative_error


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if not simplenet_fast.build_info().get("cuda"):
        return "simplenet_fast._C was built without CUDA (SIMPLENET_FAST_CUDA=OFF or no nvcc)"
    return None


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

# (channels, pretrain_embed_dim, target_embed_dim, hidden, layer2 grid, layer3 grid)
PAPER = ((512, 1024), 1536, 1536, 1024, (36, 36), (18, 18))
# Odd target dim (one column straddles both layers), plan columns that are not a multiple of the
# 16-byte vector (element-wise weight loads), hidden not a multiple of the 128-wide chunk.
ODD = ((13, 21), 50, 37, 200, (9, 11), (5, 6))
# The odd grids with hidden 48 (one partial chunk).
ODD_GRID = ((64, 96), 192, 160, 48, (35, 37), (18, 19))
# 1800 pooled columns per layer: more than shared memory holds for one block, so blocks pool
# their columns piece by piece.
WIDE = ((400, 400), 3600, 3600, 64, (6, 7), (3, 4))
CASES = {"paper": PAPER, "odd": ODD, "odd_grid": ODD_GRID, "wide": WIDE}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@functools.lru_cache(maxsize=None)
def make_head(case: str) -> SimpleNetHead:
    """A head with non-trivial BN statistics and biases (SPEC 6: trivial BN hides folding bugs)."""
    channels, pretrain, target, hidden, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(1234)
    head = SimpleNetHead(channels, pretrain, target, hidden).eval()
    with torch.no_grad():
        disc = head.discriminator
        disc.bn.running_mean.copy_(torch.randn(hidden, generator=gen) * 0.3)
        disc.bn.running_var.copy_(torch.rand(hidden, generator=gen) * 1.5 + 0.5)
        disc.bn.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
        disc.bn.bias.copy_(torch.randn(hidden, generator=gen) * 0.2)
        disc.linear.bias.copy_(torch.randn(hidden, generator=gen) * 0.2)
        head.adaptor.bias.copy_(torch.randn(target, generator=gen) * 0.1)
    return head.cuda()


def make_features(case: str, batch: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    channels, _, _, _, grid2, grid3 = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, channels[0], *grid2, device="cuda", generator=gen).to(dtype),
            torch.randn(batch, channels[1], *grid3, device="cuda", generator=gen).to(dtype)]


@torch.no_grad()
def reference64(head: SimpleNetHead, features) -> torch.Tensor:
    return copy.deepcopy(head).double().reference_patch_scores([f.double() for f in features])


def fused(head, features, compute_dtype=torch.float32, out=None) -> torch.Tensor:
    kwargs = {"compute_dtype": compute_dtype}
    if out is not None:
        kwargs["out"] = out
    return _fused.fused_patch_scores(head, features, **kwargs)


def poisoned(features) -> torch.Tensor:
    """An output buffer full of NaN: every element the kernel fails to write stays NaN."""
    f2 = features[0]
    return torch.full((f2.shape[0], *f2.shape[2:]), float("nan"), device=f2.device)


def check_close(result, reference, compute_dtype):
    assert torch.isfinite(result).all(), "NaN or Inf in the fused scores (an unwritten output?)"
    error = relative_error(result, reference)
    assert error < TOLERANCE[compute_dtype], f"relative error {error:.3e} >= {TOLERANCE[compute_dtype]:.0e}"


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("feature_dtype, compute_dtype", [
    ("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")])
def test_matches_float64_reference(case, batch, feature_dtype, compute_dtype):
    head = make_head(case)
    features = make_features(case, batch, DTYPES[feature_dtype])
    out = poisoned(features)
    result = fused(head, features, DTYPES[compute_dtype], out=out)
    assert result.data_ptr() == out.data_ptr()
    check_close(result, reference64(head, features), DTYPES[compute_dtype])


@pytest.mark.parametrize("case", ["paper", "odd"])
def test_float32_matches_float32_reference_without_tf32(case, no_tf32):
    head = make_head(case)
    features = make_features(case, 3, torch.float32, seed=1)
    with torch.no_grad():
        reference = head.reference_patch_scores(features)
    check_close(fused(head, features, out=poisoned(features)), reference, torch.float32)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_deterministic(compute_dtype):
    head = make_head("paper")
    features = make_features("paper", 2, torch.float32, seed=2)
    first = fused(head, features, DTYPES[compute_dtype]).clone()
    assert torch.equal(first, fused(head, features, DTYPES[compute_dtype], out=poisoned(features)))


def test_channels_last_and_strided_inputs():
    head = make_head("odd_grid")
    f2, f3 = make_features("odd_grid", 3, torch.float32, seed=3)
    expected = fused(head, [f2, f3])
    wide = torch.zeros(f2.shape[0], f2.shape[1], f2.shape[2], 2 * f2.shape[3], device="cuda")
    wide[..., ::2] = f2
    result = fused(head, [wide[..., ::2], f3.contiguous(memory_format=torch.channels_last)])
    assert torch.equal(result, expected)


def test_two_streams_at_once():
    head = make_head("paper")
    a = make_features("paper", 3, torch.float32, seed=4)
    b = make_features("paper", 3, torch.float32, seed=5)
    expected_a, expected_b = fused(head, a, torch.bfloat16), fused(head, b, torch.bfloat16)
    torch.cuda.synchronize()
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(3):  # several rounds, so that the two launches really overlap at least once
        with torch.cuda.stream(first):
            result_a = fused(head, a, torch.bfloat16, out=poisoned(a))
        with torch.cuda.stream(second):
            result_b = fused(head, b, torch.bfloat16, out=poisoned(b))
        torch.cuda.synchronize()
        assert torch.equal(result_a, expected_a)
        assert torch.equal(result_b, expected_b)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 4])  # batch 1 splits hidden across blocks: three launches
def test_cuda_graph_capture_and_replay(compute_dtype, batch):
    head = make_head("paper")
    dtype = DTYPES[compute_dtype]
    static = make_features("paper", batch, torch.float32, seed=6)
    out = poisoned(static)
    fused(head, static, dtype, out=out)  # warm-up: folds, casts and caches outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused(head, static, dtype, out=out)
    fresh = make_features("paper", batch, torch.float32, seed=7)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fused(head, fresh, dtype))


def test_empty_batch():
    head = make_head("odd_grid")
    features = make_features("odd_grid", 0, torch.float32)
    for dtype in DTYPES.values():
        assert fused(head, features, dtype).shape == (0, 35, 37)


def test_kernel_entry_returns_at_once_on_empty_batch():
    """fused_head_cuda must not touch a pointer (nor the device) when batch is 0."""
    from simplenet_fast import _C
    params = {key: 0 for key in (
        "c2 h2 w2 c3 h3 w3 hidden feature_dtype compute_dtype pool2_index pool2_weight pool2_columns "
        "pool2_width pool3_index pool3_weight pool3_columns pool3_width up_y_i0 up_y_i1 up_y_lambda1 "
        "up_x_i0 up_x_i1 up_x_lambda1 layer2 layer3 weight2 weight3 bias w_out workspace scores").split()}
    params.update(batch=0, negative_slope=0.2)
    _C.fused_head_cuda(params, torch.cuda.current_stream().cuda_stream)
