"""Thresholds from normal images only: quantile and mean + k std rules, user overrides, the record
saved with the model, and anomalib-style normalised scores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simplenet_fast.model import SimpleNet
from simplenet_fast.thresholds import (Thresholds, calibrate, current_thresholds,
                                       fit_with_holdout, normalize_scores, set_thresholds,
                                       threshold_source)

SIZE, RESIZE = 64, 72
# Calibrating on fewer than 10 images warns; these tests use few images on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:thresholds calibrated on only")


def small_model(seed: int = 0) -> SimpleNet:
    """EfficientNet-Lite0 at random init with a tiny head whose BN statistics are not trivial."""
    torch.manual_seed(seed)
    model = SimpleNet(backbone="efficientnet_lite0", weights=None, image_size=SIZE, resize=RESIZE,
                      pretrain_embed_dim=32, target_embed_dim=32, hidden=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn = model.head.discriminator.bn
        bn.running_mean.copy_(0.5 * torch.randn(16, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(16, generator=g))
        bn.weight.copy_(0.5 + torch.rand(16, generator=g))
        bn.bias.copy_(0.3 * torch.randn(16, generator=g))
    return model


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (RESIZE, RESIZE, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def model_and_scores():
    model = small_model()
    normal = images(8, seed=1)
    result = model.score(normal)
    return model, normal, result.pred_score.double().numpy(), result.anomaly_map.double().numpy()


def test_quantile_rule_matches_numpy_on_the_model_scores(model_and_scores):
    model, normal, scores, maps = model_and_scores
    t = calibrate(model, normal, q=0.9, pixel_q=0.99, batch_size=3)
    assert len(np.unique(scores)) == len(scores), "degenerate test scores"
    assert t.method == "quantile" and t.n_images == 8
    assert t.image == pytest.approx(np.quantile(scores, 0.9), rel=1e-6)
    assert t.pixel == pytest.approx(np.quantile(maps.ravel(), 0.99), rel=1e-5)
    assert (t.image_min, t.image_max) == pytest.approx((scores.min(), scores.max()), rel=1e-6)
    assert (t.pixel_min, t.pixel_max) == pytest.approx((maps.min(), maps.max()), rel=1e-5)
    # Stored on the model, with its record, and used by score().
    assert model.image_threshold == t.image and model.pixel_threshold == t.pixel
    assert Thresholds.from_dict(model.threshold_info) == t
    assert "0.9 quantile" in t.source and "8 held-out normal images" in t.source
    assert threshold_source(model) == t.source


def test_median_threshold_flags_half_of_the_calibration_images(model_and_scores):
    model, normal, scores, maps = model_and_scores
    t = calibrate(model, normal, q=0.5, pixel_q=0.75)
    result = model.score(normal)
    # Linear interpolation between the 4th and 5th of 8 distinct scores: exactly 4 lie above.
    assert int(result.pred_label.sum()) == 4
    assert result.pred_mask.double().mean().item() == pytest.approx(0.25, abs=1e-3)
    assert t.image == pytest.approx(np.sort(scores)[3:5].mean(), rel=1e-6)


def test_mean_std_rule(model_and_scores):
    model, normal, scores, maps = model_and_scores
    t = calibrate(model, normal, method="mean_std", k=2.5, apply=False)
    assert t.method == "mean_std" and t.k == 2.5 and t.q is None
    assert t.image == pytest.approx(scores.mean() + 2.5 * scores.std(ddof=1), rel=1e-6)
    assert t.pixel == pytest.approx(maps.mean() + 2.5 * maps.std(ddof=1), rel=1e-4)
    assert "mean + 2.5 std" in t.source


def test_apply_false_leaves_the_model_alone():
    model = small_model()
    calibrate(model, images(3, seed=2), apply=False)
    assert model.image_threshold is None and model.pixel_threshold is None
    assert threshold_source(model) == "none"
    assert current_thresholds(model) == Thresholds()


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "f1"}, "method"), ({"q": 1.5}, "q must"), ({"pixel_q": -0.1}, "pixel_q"),
    ({"k": float("nan")}, "k must"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(small_model(), images(2, seed=3), **kwargs)


def test_mean_std_needs_two_images_and_few_images_warn():
    model = small_model()
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(model, images(1, seed=4), method="mean_std")
    with pytest.warns(UserWarning, match="only 3 normal image"):
        calibrate(model, images(3, seed=4))


def test_user_threshold_overrides_and_says_so(model_and_scores):
    model, normal, scores, _ = model_and_scores
    calibrated = calibrate(model, normal)
    t = set_thresholds(model, image=float(np.median(scores)))
    assert model.image_threshold == float(np.median(scores))
    assert model.pixel_threshold == calibrated.pixel  # kept
    assert t.method == "user"
    assert t.source.startswith("image: user-set; pixel: 0.999 quantile")
    assert int(model.score(normal).pred_label.sum()) == 4
    # Ranges from the calibration stay available for normalising.
    assert normalize_scores(t.image, t) == 0.5
    set_thresholds(model, pixel=1.0)
    assert threshold_source(model) == "user-set"


def test_hand_assigned_threshold_is_reported_as_user_set():
    model = small_model()
    calibrate(model, images(4, seed=5))
    model.image_threshold = 123.0  # bypassing set_thresholds: the stale record must not be shown
    t = current_thresholds(model)
    assert t.method == "user" and t.image == 123.0
    assert t.source.startswith("image: user-set; pixel:")
    model.pixel_threshold = None
    assert threshold_source(model) == "user-set (image threshold only)"
    model.image_threshold = None
    assert threshold_source(model) == "none"


def test_set_thresholds_rejects_non_numbers():
    with pytest.raises(ValueError, match="finite number"):
        set_thresholds(small_model(), image=float("inf"))


def test_record_is_plain_types_and_round_trips():
    t = Thresholds(image=1.5, pixel=0.25, method="quantile", n_images=12, source="x", q=0.99,
                   pixel_q=0.999, k=None, image_min=0.1, image_max=2.0, pixel_min=-1.0,
                   pixel_max=3.0)
    d = t.to_dict()
    assert all(v is None or type(v) in (str, int, float) for v in d.values())
    assert Thresholds.from_dict(d) == t
    for bad in ({**d, "image": "1.5"}, {**d, "n_images": -1}, {**d, "version": 99},
                {**d, "method": "f1"}, {k: v for k, v in d.items() if k != "pixel"}, [1, 2]):
        with pytest.raises(ValueError):
            Thresholds.from_dict(bad)


def test_record_survives_save_and_load(tmp_path, model_and_scores):
    model, normal, _, _ = model_and_scores
    t = calibrate(model, normal)
    model.save(tmp_path / "m.pt")
    loaded = SimpleNet.load(tmp_path / "m.pt")
    assert (loaded.image_threshold, loaded.pixel_threshold) == (t.image, t.pixel)
    assert current_thresholds(loaded) == t, "model.save must store model.threshold_info"


def test_results_say_where_the_thresholds_came_from(model_and_scores):
    model, normal, _, _ = model_and_scores
    t = calibrate(model, normal)
    assert model.score(normal[:1]).threshold_source == t.source
    set_thresholds(model, image=0.0, pixel=0.0)
    assert model.score(normal[:1]).threshold_source == "user-set"


def test_normalize_scores_follows_anomalib():
    t = Thresholds(image=2.0, pixel=1.0, method="quantile", n_images=5, source="s", q=0.99,
                   pixel_q=0.999, image_min=1.0, image_max=5.0, pixel_min=0.0, pixel_max=0.5)
    got = normalize_scores(np.array([2.0, 3.0, 1.0, 100.0, -100.0]), t)
    np.testing.assert_allclose(got, [0.5, 0.75, 0.25, 1.0, 0.0])
    tensor = normalize_scores(torch.tensor([[1.25]]), t, kind="pixel")
    assert isinstance(tensor, torch.Tensor) and tensor.item() == pytest.approx(1.0)
    assert normalize_scores(1.1, t, kind="pixel") == pytest.approx(0.7)
    with pytest.raises(ValueError, match="calibrat"):
        normalize_scores([1.0], Thresholds(image=1.0, method="user", source="user-set"))
    with pytest.raises(ValueError, match="kind"):
        normalize_scores([1.0], t, kind="patch")


def test_fit_with_holdout_calibrates_on_images_not_trained_on(monkeypatch):
    model = small_model()
    data = images(8, seed=6)
    seen = {}
    original_fit = model.fit

    def spy_fit(imgs, **kwargs):
        seen["train"] = [id(x) for x in imgs]
        return original_fit(imgs, **kwargs)

    monkeypatch.setattr(model, "fit", spy_fit)
    history, t = fit_with_holdout(model, data, holdout=0.25, seed=3, epochs=1, progress=False)
    assert len(history) == 1 and math.isfinite(history[0])
    assert len(seen["train"]) == 6 and t.n_images == 2
    held = [x for x in data if id(x) not in seen["train"]]
    assert len(held) == 2
    scores = model.score(held).pred_score.double().numpy()
    assert t.image == pytest.approx(np.quantile(scores, 0.99), rel=1e-6)
    assert "held out from training (25%, seed 3)" in t.source
    assert model.image_threshold == t.image


def test_fit_with_holdout_zero_sets_no_threshold():
    model = small_model()
    _, t = fit_with_holdout(model, images(3, seed=7), holdout=0.0, epochs=1, progress=False)
    assert t.image is None and model.image_threshold is None
    assert threshold_source(model) == "none"
    with pytest.raises(ValueError, match="leaves none to train on"):
        fit_with_holdout(model, images(1, seed=7), holdout=0.5, epochs=1, progress=False)
