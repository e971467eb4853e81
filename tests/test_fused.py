"""The fused head against the reference (SPEC 6: 1e-4 relative in float32), CPU and CUDA alike."""
import threading

import pytest
import torch

from conftest import DEVICES, official_case, random_features, randomize_head, relative_error
from simplenet_fast import SimpleNetHead, build_info
from simplenet_fast import _fused

FLOAT32_TOL = 1e-4  # SPEC 6

pytestmark = pytest.mark.skipif(not build_info()["compiled"], reason="simplenet_fast._C is not built")

CASES = {
    # name: (head config, layer2 grid, layer3 grid)
    "paper": (dict(), (36, 36), (18, 18)),
    "odd_grid": (dict(channels=(40, 112), pretrain_embed_dim=300, target_embed_dim=200, hidden=96), (35, 37), (18, 19)),
    "straddle": (dict(channels=(24, 40), pretrain_embed_dim=100, target_embed_dim=71, hidden=48), (10, 12), (5, 6)),
    "tiny": (dict(channels=(3, 5), pretrain_embed_dim=7, target_embed_dim=5, hidden=17), (1, 2), (1, 1)),
}


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would make 'float32' GEMMs on the GPU 10-bit: the contract is true float32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def make_case(name, batch, generator, device):
    config, grid2, grid3 = CASES[name]
    head = randomize_head(SimpleNetHead(**config), generator).to(device)
    return head, random_features(head.channels, batch, grid2, grid3, generator, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,batch", [("paper", 1), ("paper", 3), ("odd_grid", 1), ("odd_grid", 3),
                                        ("straddle", 3), ("tiny", 1)])
def test_fused_matches_reference(name, batch, device, generator):
    head, features = make_case(name, batch, generator, device)
    with torch.no_grad():
        expected = head.patch_scores(features, fused=False)
        actual = head.patch_scores(features, fused=True)
    assert actual.shape == expected.shape == (batch, *features[0].shape[2:])
    assert actual.device == features[0].device
    assert relative_error(actual, expected) < FLOAT32_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["case_odd", "case_paper"])
def test_fused_matches_official_fixture(case, device):
    head, features, z = official_case(case)
    head = head.to(device)
    features = [f.to(device) for f in features]
    with torch.no_grad():
        actual = head.patch_scores(features, fused=True)
    assert relative_error(actual, torch.from_numpy(z["patch_scores"])) < FLOAT32_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_fused_accepts_strided_and_channels_last_inputs(device, generator):
    head, (f2, f3) = make_case("odd_grid", 3, generator, device)
    with torch.no_grad():
        expected = head.patch_scores([f2, f3], fused=False)
        channels_last = [f2.to(memory_format=torch.channels_last), f3.to(memory_format=torch.channels_last)]
        assert not channels_last[0].is_contiguous()
        torch.testing.assert_close(head.patch_scores(channels_last, fused=True), expected, rtol=0, atol=1e-4)
        # Every second image of a larger batch, and a transposed-then-transposed-back map.
        wide2 = torch.stack([f2, f2], dim=1)[:, 0]
        wide3 = f3.transpose(2, 3).contiguous().transpose(2, 3)
        assert not wide2.is_contiguous() and not wide3.is_contiguous()
        torch.testing.assert_close(head.patch_scores([wide2, wide3], fused=True), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_empty_scores(device, generator):
    head, (f2, f3) = make_case("straddle", 1, generator, device)
    scores = head.patch_scores([f2[:0], f3[:0]], fused=True)
    assert scores.shape == (0, 10, 12) and scores.device == f2.device


def test_fused_is_inference_only(generator):
    head, (f2, f3) = make_case("straddle", 1, generator, "cpu")
    f2.requires_grad_(True)
    with pytest.raises(ValueError, match="inference-only"):
        head.patch_scores([f2, f3], fused=True)
    # The automatic choice takes the differentiable reference instead.
    scores = head.patch_scores([f2, f3])
    assert scores.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(head.patch_scores([f2, f3], fused=True), scores.detach(), rtol=0, atol=1e-5)


def test_automatic_choice_uses_the_compiled_kernel(generator, monkeypatch):
    head, features = make_case("straddle", 1, generator, "cpu")
    calls = []
    original = _fused.run  # the compiled kernels' one checked entry (under the registered op)
    monkeypatch.setattr(_fused, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        head.patch_scores(features)
        head.double().patch_scores([f.double() for f in features])   # no float64 kernel: reference
    assert calls == [1]


def test_two_threads_scoring_at_once_get_correct_results(generator):
    """The kernel releases the GIL and keeps no global state: concurrent calls stay independent."""
    head, _ = make_case("odd_grid", 1, generator, "cpu")
    inputs = [random_features(head.channels, 2, (35, 37), (18, 19), generator) for _ in range(4)]
    with torch.no_grad():
        expected = [head.patch_scores(f, fused=False) for f in inputs]
    results, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = head.patch_scores(inputs[i], fused=True)
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert relative_error(results[i], expected[i]) < FLOAT32_TOL


def test_threads_racing_over_new_grids_keep_each_others_params_alive(generator):
    """Per-grid kernel params are built on first use and a few are kept: threads that race to
    build the same grid, or push others out, must not free what a running kernel reads."""
    head, _ = make_case("straddle", 1, generator, "cpu")
    grids = [((10 + k % 12, 12), (5 + k % 3, 6)) for k in range(24)]  # more than Prepared.MAX_GRIDS
    inputs = [random_features(head.channels, 1, g2, g3, generator) for g2, g3 in grids]
    with torch.no_grad():
        expected = [head.reference_patch_scores(f) for f in inputs]
    errors = []

    def work(offset):
        try:
            with torch.no_grad():
                for k in range(len(inputs)):
                    i = (k + offset) % len(inputs)
                    error = relative_error(head.patch_scores(inputs[i], fused=True), expected[i])
                    if error >= FLOAT32_TOL:
                        errors.append(error)
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    for _ in range(3):
        _fused._CACHE.clear()
        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


@pytest.mark.parametrize("features,message", [
    (lambda: [torch.zeros(1, 24, 10, 12)], "two backbone maps"),
    (lambda: torch.zeros(1, 24, 10, 12), "two backbone maps"),
    (lambda: [torch.zeros(1, 25, 10, 12), torch.zeros(1, 40, 5, 6)], r"layer2 features must be \[B, 24, H, W\]"),
    (lambda: [torch.zeros(1, 24, 10, 12), torch.zeros(1, 40, 5)], r"layer3 features must be \[B, 40, H, W\]"),
    (lambda: [torch.zeros(1, 24, 10, 12, dtype=torch.int32), torch.zeros(1, 40, 5, 6)], "floating point"),
    (lambda: [torch.zeros(2, 24, 10, 12), torch.zeros(1, 40, 5, 6)], "batch sizes differ"),
    (lambda: [torch.zeros(1, 24, 0, 12), torch.zeros(1, 40, 5, 6)], "non-empty grid"),
    (lambda: [torch.full((1, 24, 10, 12), float("nan")), torch.zeros(1, 40, 5, 6)], "NaN or Inf"),
    (lambda: [torch.zeros(1, 24, 10, 12), torch.full((1, 40, 5, 6), float("inf"))], "NaN or Inf"),
    (lambda: [torch.zeros(1, 24, 10, 12), torch.zeros(1, 40, 5, 6).double()], "share device and dtype"),
    (lambda: [[1.0], torch.zeros(1, 40, 5, 6)], "must be a torch.Tensor"),
])
@pytest.mark.parametrize("fused", [True, False])
def test_bad_features_raise_clear_errors(features, message, fused):
    head = SimpleNetHead((24, 40), 100, 71, 48).eval()
    with pytest.raises(ValueError, match=message):
        head.patch_scores(features(), fused=fused)


def test_fused_without_a_kernel_for_the_dtype_says_so():
    head = SimpleNetHead((24, 40), 100, 71, 48).eval()
    with pytest.raises(ValueError, match="no kernel for cpu torch.float64"):
        head.patch_scores([torch.zeros(1, 24, 10, 12).double(), torch.zeros(1, 40, 5, 6).double()], fused=True)
