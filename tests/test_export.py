"""ONNX export: the whole scoring path in standard ops, checked with onnxruntime against PyTorch
(SPEC 6: float32 within 1e-4 relative), dynamic batch, uint8 input, metadata."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simplenet_fast.model import SimpleNet
from simplenet_fast.preprocess import preprocess_image
from simplenet_fast.thresholds import calibrate

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (a test dependency) is not installed")
onnx = pytest.importorskip("onnx", reason="onnx (a test dependency) is not installed")

from simplenet_fast.export import check_onnx, export_onnx, onnx_metadata  # noqa: E402

TOLERANCE = 1e-4  # SPEC 6, float32 paths; measured: ~1e-7 (Lite0), ~3e-6 (WideResNet)


def random_model(backbone: str, image_size: int, resize: int, dims=(48, 40, 24), seed=0):
    """Random backbone, random head with non-trivial BN statistics and biases."""
    torch.manual_seed(seed)
    pretrain, target, hidden = dims
    model = SimpleNet(backbone=backbone, weights=None, image_size=image_size, resize=resize,
                      pretrain_embed_dim=pretrain, target_embed_dim=target, hidden=hidden)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.head.adaptor.bias.copy_(0.1 * torch.randn(target, generator=g))
        model.head.discriminator.linear.bias.copy_(0.1 * torch.randn(hidden, generator=g))
        bn = model.head.discriminator.bn
        bn.running_mean.copy_(0.5 * torch.randn(hidden, generator=g))
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(hidden, generator=g))
        bn.weight.copy_(0.5 + torch.rand(hidden, generator=g))
        bn.bias.copy_(0.3 * torch.randn(hidden, generator=g))
    return model


@pytest.fixture(scope="module")
def lite():
    # 72 px: grids 9x9 and 5x5, so the layer3 upsample has a non-integer factor; odd target dim
    # 41 splits one aggregation window across both layers (SPEC 4).
    return random_model("efficientnet_lite0", 72, 80, dims=(48, 41, 24))


@pytest.fixture(scope="module")
def lite_onnx(lite, tmp_path_factory):
    return export_onnx(lite, tmp_path_factory.mktemp("onnx") / "lite.onnx")


def run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(("pred_score", "anomaly_map", "patch_scores"),
                    session.run(["pred_score", "anomaly_map", "patch_scores"],
                                {session.get_inputs()[0].name: feed})))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_model_score_on_the_same_preprocessed_images(lite, lite_onnx, batch):
    rng = np.random.default_rng(batch)
    images = [rng.integers(0, 256, (90, 100, 3), dtype=np.uint8) for _ in range(batch)]
    expected = lite.score(images)
    crops = torch.stack([preprocess_image(im, lite.image_size, lite.resize) for im in images])
    got = run(lite_onnx, (crops.permute(0, 3, 1, 2).float() / 255.0).numpy())
    assert got["pred_score"].shape == (batch,)
    assert got["anomaly_map"].shape == (batch, 72, 72)
    assert got["patch_scores"].shape == (batch, 9, 9)
    assert batch == 1 or expected.pred_score.std() > 0, "degenerate: all images score alike"
    for name in ("pred_score", "anomaly_map", "patch_scores"):
        assert rel(got[name], getattr(expected, name).numpy()) < TOLERANCE, name
    # The image score is the max of the raw patch scores (SPEC 1.9).
    np.testing.assert_array_equal(got["pred_score"], got["patch_scores"].reshape(batch, -1).max(1))


def test_graph_uses_the_folded_head_ops(lite_onnx):
    graph = onnx.load(str(lite_onnx)).graph
    ops = {node.op_type for node in graph.node}
    assert {"Gather", "MatMul", "Resize", "LeakyRelu", "Conv", "ReduceMax"} <= ops
    assert not ops & {"Col2Im", "Im2Col"}
    inputs = {i.name: i for i in graph.input}
    dims = inputs["image"].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 72, 72]
    assert [o.name for o in graph.output] == ["pred_score", "anomaly_map", "patch_scores"]


def test_uint8_input_and_static_batch(lite, tmp_path):
    path = export_onnx(lite, tmp_path / "u8.onnx", input_format="uint8", batch_size_dynamic=False,
                       example_batch=2)
    crops = torch.randint(0, 256, (2, 72, 72, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(5))
    got = run(path, crops.numpy())
    expected = lite(crops)
    assert rel(got["anomaly_map"], expected.anomaly_map.numpy()) < TOLERANCE
    assert rel(got["pred_score"], expected.pred_score.numpy()) < TOLERANCE
    with pytest.raises(Exception):  # the batch axis is fixed to 2
        run(path, crops[:1].numpy())


def test_check_onnx_reports_small_errors(lite, lite_onnx):
    errors = check_onnx(lite, lite_onnx, batch_sizes=(1, 3))
    assert set(errors) == {f"{n}_{k}" for n in ("pred_score", "anomaly_map", "patch_scores")
                           for k in ("rel", "abs")}
    assert max(v for k, v in errors.items() if k.endswith("_rel")) < TOLERANCE


def test_stale_export_is_caught(lite, lite_onnx):
    # The export freezes the weights: after they change, check_onnx sees the difference.
    changed = copy.deepcopy(lite)
    with torch.no_grad():
        changed.head.discriminator.tail.weight.mul_(1.01)  # every score moves by 1%
    errors = check_onnx(changed, lite_onnx, batch_sizes=(2,))
    assert errors["pred_score_rel"] == pytest.approx(1 / 101, rel=1e-3)


def test_thresholds_travel_as_metadata(tmp_path):
    model = random_model("efficientnet_lite0", 64, 72, dims=(32, 32, 16))
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning):
        t = calibrate(model, [rng.integers(0, 256, (72, 72, 3), dtype=np.uint8) for _ in range(4)])
    meta = onnx_metadata(export_onnx(model, tmp_path / "m.onnx"))
    assert float(meta["image_threshold"]) == t.image
    assert float(meta["pixel_threshold"]) == t.pixel
    assert meta["threshold_source"] == t.source
    assert (meta["image_size"], meta["resize"], meta["input_format"]) == ("[64, 64]", "72", "float")
    assert (meta["resize_mode"], meta["tiling"]) == ("crop", "")


def test_bad_arguments(lite, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(lite, tmp_path / "x.onnx", opset=9)
    with pytest.raises(ValueError, match="input_format"):
        export_onnx(lite, tmp_path / "x.onnx", input_format="int16")


@pytest.mark.slow
def test_wide_resnet_export_matches(tmp_path):
    # The paper's backbone at a small size (layer2 grid 5x5, layer3 3x3), default dims ratio.
    model = random_model("wide_resnet50_2", 40, 46, dims=(96, 96, 64))
    path = export_onnx(model, tmp_path / "wrn.onnx")
    errors = check_onnx(model, path, batch_sizes=(1, 3))
    assert max(v for k, v in errors.items() if k.endswith("_rel")) < TOLERANCE



def test_rectangular_and_pad_exports_match_pytorch(tmp_path):
    """A non-square input; "pad" takes each image's real size as a second input and keeps the
    padding out of the score and the map, as model.score does."""
    for backbone, size, mode in (("efficientnet_lite0", (48, 80), "pad"),
                                 ("wide_resnet50_2", (40, 24), "whole")):
        torch.manual_seed(0)
        model = SimpleNet(backbone, weights=None, image_size=size, resize_mode=mode,
                          pretrain_embed_dim=48, target_embed_dim=41, hidden=24)
        path = export_onnx(model, tmp_path / f"{mode}.onnx")
        errors = check_onnx(model, path, batch_sizes=(1, 3))
        assert max(errors[f"{n}_rel"] for n in ("pred_score", "anomaly_map", "patch_scores")) < TOLERANCE
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert names == (["image", "real_size"] if mode == "pad" else ["image"])
        assert session.get_inputs()[0].shape[1:] == [3, *size]
    # the pad graph on real images of other shapes, fed as a deployment would
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((30, 90, 3), (100, 40, 3))]
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=(48, 80), resize_mode="pad",
                      pretrain_embed_dim=48, target_embed_dim=41, hidden=24)
    path = export_onnx(model, tmp_path / "pad2.onnx")
    prepared = [model.prepare(im) for im in images]
    feed = {"image": torch.stack([p.input for p in prepared]).permute(0, 3, 1, 2).float().numpy() / 255,
            "real_size": np.array([p.placement.real for p in prepared], dtype=np.int64)}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(("pred_score", "anomaly_map"), session.run(["pred_score", "anomaly_map"], feed)))
    expected = model.score(images)
    assert rel(torch.from_numpy(got["pred_score"]), expected.pred_score) < TOLERANCE
    assert rel(torch.from_numpy(got["anomaly_map"]), expected.anomaly_map) < TOLERANCE


def test_a_failed_export_writes_nothing(lite, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(lite, path)
    assert path.read_bytes() == b"previous export" and len(list(tmp_path.iterdir())) == 1
