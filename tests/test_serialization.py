"""SimpleNet.save / SimpleNet.load: round trips, and files that must be refused (SPEC.md 5)."""
from __future__ import annotations

import builtins
import os

import pytest
import torch
from torch import nn

from simplenet_fast import SimpleNet
from simplenet_fast.model import FORMAT_VERSION

SIZE, RESIZE = 32, 36
HEAD = dict(pretrain_embed_dim=48, target_embed_dim=40, hidden=24)


def small_model(backbone="efficientnet_lite0", seed=0, **kwargs) -> SimpleNet:
    """EfficientNet-Lite0 by default: its 3.6M-parameter state dict keeps these files small."""
    torch.manual_seed(seed)
    return SimpleNet(backbone, weights=None, image_size=SIZE, resize=RESIZE, **HEAD, **kwargs)


def train(model: SimpleNet, images: torch.Tensor) -> SimpleNet:
    model.fit(images, epochs=2, batch_size=4, seed=0, progress=False)
    model.image_threshold, model.pixel_threshold = 1.5, 0.25
    model.threshold_info = {"version": 1, "method": "quantile", "n_images": 12, "q": 0.99,
                            "k": None, "image": 1.5, "pixel": 0.25, "source": "test"}
    return model


def test_round_trip_gives_identical_scores(tmp_path):
    """The paper's backbone (random init, so stored in the file) and a trained head."""
    images = torch.rand(4, 3, RESIZE, RESIZE + 6, generator=torch.Generator().manual_seed(0))
    model = train(small_model("wide_resnet50_2", sigma=2.0), images)
    path = tmp_path / "wrn.pt"
    model.save(path)
    loaded = SimpleNet.load(path)
    assert loaded.config == model.config
    assert loaded.image_threshold == 1.5 and loaded.pixel_threshold == 0.25
    assert loaded.threshold_info == model.threshold_info
    assert loaded.sigma == 2.0 and loaded.backbone.weights_id == "random"
    assert loaded.backbone.name == "wide_resnet50_2"
    for key, value in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    # the random-init backbone was stored: it is not rebuildable from any published file
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    a, b = model.score(images), loaded.score(images)
    for field in ("pred_score", "anomaly_map", "patch_scores", "pred_label", "pred_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.pred_score.std() > 0
    assert not loaded.head.training and not loaded.backbone.training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained model with thresholds, saved once: (model, path, images)."""
    images = torch.rand(4, 3, RESIZE, RESIZE + 6, generator=torch.Generator().manual_seed(0))
    model = train(small_model(sigma=2.0), images)
    path = tmp_path_factory.mktemp("models") / "model.pt"
    model.save(path)
    return model, path, images


def test_small_round_trip(trained):
    model, path, images = trained
    loaded = SimpleNet.load(path)
    assert loaded.threshold_info == model.threshold_info and loaded.image_threshold == 1.5
    assert torch.equal(loaded.score(images).anomaly_map, model.score(images).anomaly_map)


def test_round_trip_keeps_none_thresholds_and_other_settings(tmp_path):
    model = small_model(noise_std=0.03, margin=0.4)
    path = tmp_path / "lite.pt"
    model.save(path)
    loaded = SimpleNet.load(path, map_location="cpu")
    assert loaded.image_threshold is None and loaded.pixel_threshold is None
    assert loaded.threshold_info is None
    assert loaded.backbone.name == "efficientnet_lite0" and loaded.head.channels == (40, 112)
    assert loaded.noise_std == 0.03 and loaded.margin == 0.4
    images = torch.rand(2, 3, RESIZE, RESIZE)
    assert torch.equal(model.score(images).anomaly_map, loaded.score(images).anomaly_map)


def test_saved_file_is_plain_data(trained):
    _, path, _ = trained
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["format"] == "simplenet_fast" and obj["format_version"] == FORMAT_VERSION == 2
    assert obj["config"]["backbone"] == "efficientnet_lite0"
    assert obj["config"]["weights_id"] == "random"
    assert isinstance(obj["backbone"], dict) and isinstance(obj["head"], dict)


def test_custom_module_backbone_cannot_be_saved(tmp_path):
    class Tiny(nn.Module):
        channels = (4, 8)

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=8, padding=1)
            self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

        def forward(self, x):
            f2 = self.a(x)
            return [f2, self.b(f2)]

    model = SimpleNet(Tiny(), weights=None, image_size=SIZE, resize=RESIZE, **HEAD)
    assert model.score(torch.rand(1, 3, SIZE, SIZE)).pred_score.shape == (1,)
    with pytest.raises(ValueError, match="custom nn.Module"):
        model.save(tmp_path / "custom.pt")
    assert not (tmp_path / "custom.pt").exists()


def test_include_backbone_false_refuses_unpublished_weights(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="include_backbone"):
        model.save(tmp_path / "m.pt", include_backbone=False)


# ------------------------------------------------------------------------------- refused files
class Payload:
    """Unpickling this calls builtins.open(marker, "w"): it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_pickle_payload_is_refused_without_running(trained, tmp_path):
    _, path, _ = trained
    good = torch.load(path, map_location="cpu", weights_only=True)
    # The payload is live: an unrestricted load runs it.
    live_marker = tmp_path / "live-marker"
    torch.save({"x": Payload(live_marker)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({**good, "extra": Payload(marker)}, evil)
    with pytest.raises(ValueError) as info:
        SimpleNet.load(evil)
    message = str(info.value)
    assert str(evil) in message and "refused" in message and "weights_only" in message
    assert not marker.exists()
    # payload as the whole file, too
    torch.save(Payload(marker), evil)
    with pytest.raises(ValueError, match="refused"):
        SimpleNet.load(evil)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(trained, tmp_path):
    _, path, _ = trained
    data = path.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "header-only.pt": data[:100],
        "empty.pt": b"",
        "text.pt": b"this is a text file, not a model\n" * 20,
    }
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="cannot be read as a simplenet_fast model") as info:
            SimpleNet.load(bad)
        assert str(bad) in str(info.value), name
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SimpleNet.load(tmp_path / "missing.pt")


def rewrite(trained, tmp_path, name, change) -> str:
    _, path, _ = trained
    obj = torch.load(path, map_location="cpu", weights_only=True)
    change(obj)
    out = tmp_path / name
    torch.save(obj, out)
    return str(out)


@pytest.mark.parametrize("name, change, message", [
    ("state-dict.pt", None, "no 'format' entry; got a plain state dict"),
    ("list.pt", "list", "no 'format' entry; got list"),
    ("other-format.pt", lambda o: o.update(format="anomalib"), "format 'anomalib'"),
    ("v3.pt", lambda o: o.update(format_version=3), "format_version 3"),
    ("no-version.pt", lambda o: o.pop("format_version"), "has no format_version"),
    ("no-head.pt", lambda o: o.pop("head"), "lacks ['head']"),
    ("bad-config.pt", lambda o: o["config"].update(hidden="24"), "'hidden' is missing or not int"),
    ("bad-threshold.pt", lambda o: o.update(image_threshold="high"), "image_threshold must be"),
    ("bad-info.pt", lambda o: o.update(threshold_info=[1, 2]), "threshold_info must be"),
    ("nested-info.pt", lambda o: o.update(threshold_info={"a": {"b": 1}}), "threshold_info must be"),
    ("unknown-backbone.pt", lambda o: o["config"].update(backbone="resnet18"), "unusable config"),
    ("no-backbone.pt", lambda o: o.update(backbone=None), "stores no backbone weights"),
    ("head-shape.pt", lambda o: o["head"].update({"adaptor.weight": torch.zeros(40, 41)}),
     "do not fit its config"),
    ("hidden-mismatch.pt", lambda o: o["config"].update(hidden=16), "do not fit its config"),
    ("backbone-shape.pt",
     lambda o: o["backbone"].update({"_conv_stem.weight": torch.zeros(32, 3, 5, 5)}),
     "do not fit its config"),
    ("missing-key.pt", lambda o: o["head"].pop("discriminator.tail.weight"), "do not fit its config"),
])
def test_inconsistent_files_are_refused(trained, tmp_path, name, change, message):
    model, path, _ = trained
    if change is None:
        torch.save(model.head.state_dict(), tmp_path / name)
        out = str(tmp_path / name)
    elif change == "list":
        torch.save([torch.zeros(2)], tmp_path / name)
        out = str(tmp_path / name)
    else:
        out = rewrite(trained, tmp_path, name, change)
    with pytest.raises(ValueError) as info:
        SimpleNet.load(out)
    assert message in str(info.value)
    assert out in str(info.value)


def test_imagenet_weights_are_referenced_not_stored(tmp_path, monkeypatch):
    """A model on published weights stores only their id; load rebuilds them by name."""
    model = small_model()
    model.backbone.weights_id = "imagenet"  # as if built with weights="imagenet"
    path = tmp_path / "ref.pt"
    model.save(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["backbone"] is None
    requested = []
    import simplenet_fast.model as model_module
    real_build = model_module.build_backbone

    def fake_build(backbone, weights="imagenet"):  # no download in tests
        requested.append((backbone, weights))
        return real_build(backbone, weights=None)

    monkeypatch.setattr(model_module, "build_backbone", fake_build)
    loaded = SimpleNet.load(path)
    assert requested == [("efficientnet_lite0", "imagenet")]
    assert loaded.backbone.weights_id == "imagenet"
    # include_backbone=True stores them anyway (for machines that cannot download)
    model.save(path, include_backbone=True)
    assert torch.load(path, map_location="cpu", weights_only=True)["backbone"] is not None
    requested.clear()
    SimpleNet.load(path)
    assert requested == [("efficientnet_lite0", None)]


def test_save_accepts_pathlike_and_str(trained, tmp_path):
    model, _, images = trained
    model.save(str(tmp_path / "a.pt"))
    model.save(tmp_path / "b.pt")
    assert os.path.getsize(tmp_path / "a.pt") == os.path.getsize(tmp_path / "b.pt")
    assert torch.equal(SimpleNet.load(tmp_path / "a.pt").score(images).pred_score,
                       model.score(images).pred_score)


# ---------------------------------------------------------------------------------- format 2
def test_geometry_round_trips(tmp_path):
    """Rectangular sizes, every resize mode, tiling and epochs survive save / load."""
    images = torch.rand(3, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(image_size=(32, 48), resize_mode="pad", epochs=7),
                   dict(image_size=(40, 24), resize_mode="crop", resize=44),
                   dict(image_size=32, tiling=((40, 48), (24, 32)))):
        torch.manual_seed(0)
        model = SimpleNet("efficientnet_lite0", weights=None, **HEAD, **kwargs)
        path = tmp_path / "m.pt"
        model.save(path)
        loaded = SimpleNet.load(path)
        assert loaded.config == model.config
        a, b = model.score(images), loaded.score(images)
        assert torch.equal(a.pred_score, b.pred_score)
        for x, y in zip(a.anomaly_map, b.anomaly_map):
            assert torch.equal(x, y)


def test_version_1_files_still_load(tmp_path):
    """A file as the code before rectangular inputs wrote it: int image_size and resize, crop,
    no resize_mode, tiling or epochs entries."""
    model = small_model()
    config = {k: model.config[k] for k in ("backbone", "weights_id", "pretrain_embed_dim",
                                           "target_embed_dim", "hidden", "noise_std", "margin",
                                           "sigma", "precision")}
    payload = {"format": "simplenet_fast", "format_version": 1,
               "config": {**config, "image_size": SIZE, "resize": RESIZE},
               "head": {k: v.clone() for k, v in model.head.state_dict().items()},
               "backbone": {k: v.clone() for k, v in model.backbone.state_dict().items()},
               "image_threshold": 0.5, "pixel_threshold": None, "threshold_info": None}
    path = tmp_path / "v1.pt"
    torch.save(payload, path)
    loaded = SimpleNet.load(path)
    # the backbone's default epochs; a file from before recipes was trained under SPEC 2's
    assert loaded.config == {**model.config, "epochs": 20, "recipe": "paper"}
    assert (loaded.image_size, loaded.resize_mode, loaded.resize) == ((SIZE, SIZE), "crop", RESIZE)
    images = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.score(images).anomaly_map, model.score(images).anomaly_map)
    assert loaded.image_threshold == 0.5
    payload["config"]["image_size"] = [SIZE, SIZE]  # a version-1 file never held a pair
    torch.save(payload, path)
    with pytest.raises(ValueError, match="'image_size' is missing or not int"):
        SimpleNet.load(path)


def test_a_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    model = small_model()
    path = tmp_path / "model.pt"
    model.save(path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a model")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    with pytest.raises(OSError):
        model.save(tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
