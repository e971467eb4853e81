"""Images of any shape through SimpleNet (SPEC 8): rectangular inputs end to end, the three resize
modes, maps in the images' own pixels, tiling, training on them, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVICES, TinyBackbone, randomize_head, relative_error
from simplenet_fast import SimpleNet, build_info
from simplenet_fast.data import mask_to_model_view

HEAD = dict(pretrain_embed_dim=32, target_embed_dim=24, hidden=16)


def random_model(backbone, generator, device="cpu", **kwargs):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = SimpleNet(backbone, weights=None, **{**HEAD, **kwargs})
    randomize_head(model.head, generator)
    return model.to(device)


def random_images(generator, count, low=20, high=160, grey=False):
    images = []
    for _ in range(count):
        h, w = (int(v) for v in torch.randint(low, high, (2,), generator=generator))
        shape = (h, w) if grey else (h, w, 3)
        images.append(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).numpy())
    return images


# ---------------------------------------------------------------------------------- SPEC 6
needs_kernel = pytest.mark.skipif(not build_info()["compiled"], reason="needs simplenet_fast._C")


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone, image_size, mode", [
    ("efficientnet_lite0", (64, 96), "whole"),
    ("efficientnet_lite0", (72, 40), "pad"),
    ("wide_resnet50_2", (40, 72), "crop"),
    ("wide_resnet50_2", (56, 33), "pad"),     # odd width: grids of ceil(W / 8)
])
def test_rectangular_fused_matches_reference_end_to_end(generator, device, backbone, image_size, mode):
    """Backbone, fused head and maps on non-square grids agree with the reference (SPEC 6)."""
    from conftest import randomize_backbone_bn

    model = random_model(backbone, generator, device, image_size=image_size, resize_mode=mode)
    randomize_backbone_bn(model.backbone, int(torch.randint(0, 2**31, (1,), generator=generator)))
    images = random_images(generator, 3)
    fused = model.score(images, batch_size=2, fused=True)
    reference = model.score(images, batch_size=2, fused=False)
    grid = tuple(-(-s // 8) for s in image_size)
    assert tuple(fused.patch_scores.shape) == (3, *grid)
    assert tuple(fused.anomaly_map.shape) == (3, *image_size)
    for name in ("pred_score", "anomaly_map", "patch_scores"):
        assert relative_error(getattr(fused, name), getattr(reference, name)) < 1e-4, name


# ---------------------------------------------------------------------------------- pad
@pytest.mark.parametrize("device", DEVICES)
def test_padding_never_scores(generator, device):
    """The image score is the max over patches that hold image pixels; what the padding holds
    changes nothing; padded map pixels hold the map's lowest real value."""
    model = random_model(TinyBackbone(), generator, device, image_size=(48, 80), resize_mode="pad")
    real = torch.tensor([[48, 80], [48, 20], [13, 80], [5, 7]])
    batch = torch.randint(0, 256, (4, 48, 80, 3), generator=generator, dtype=torch.uint8)
    garbage = batch.clone()
    for b, (rows, cols) in enumerate(real.tolist()):
        garbage[b, rows:] = torch.randint(0, 256, garbage[b, rows:].shape, generator=generator,
                                          dtype=torch.uint8)
        garbage[b, :, cols:] = 255
        batch[b, rows:] = 0
        batch[b, :, cols:] = 0
    out = model(batch, real_size=real)
    again = model(garbage, real_size=real)
    for name in ("pred_score", "anomaly_map", "patch_scores"):
        assert torch.equal(getattr(out, name), getattr(again, name)), name
    with torch.inference_mode():  # the raw scores of the same inputs, padding zeroed by hand
        x = (batch.permute(0, 3, 1, 2).float().to(device) / 255 - model._mean) / model._std
        for b, (rows, cols) in enumerate(real.tolist()):
            x[b, :, rows:] = 0
            x[b, :, :, cols:] = 0
        raw = model.head.patch_scores(model.backbone(x))
    for b, (rows, cols) in enumerate(real.tolist()):
        inside = raw[b, :-(-rows // 8), :-(-cols // 8)]
        assert float(out.pred_score[b]) == pytest.approx(float(inside.max()), rel=1e-6, abs=1e-6)
        assert float(out.pred_score[b]) == float(out.patch_scores[b].max())
        amap, scored = out.anomaly_map[b], out.scored_mask[b]
        assert int(scored.sum()) == rows * cols
        assert bool((amap[~scored] == amap[scored].min()).all())


@pytest.mark.parametrize("device", DEVICES[1:])
def test_cuda_graph_replays_padding_like_the_eager_path(generator, device):
    """Real sizes are a static input of the captured graph: a last, smaller batch and images of
    other shapes replay with their own real sizes."""
    model = random_model("efficientnet_lite0", generator, device, image_size=(64, 96),
                         resize_mode="pad")
    images = random_images(generator, 5, 30, 200)
    eager = model.score(images, batch_size=2)
    graph = model.score(images, batch_size=2, cuda_graph=True)
    assert torch.equal(graph.scored_mask, eager.scored_mask)
    for name in ("pred_score", "anomaly_map", "patch_scores"):  # a batch of 1 padded into 2:
        assert relative_error(getattr(graph, name), getattr(eager, name)) < 1e-5, name  # last bits


def test_pad_score_is_the_max_over_real_patches_on_real_images(generator):
    model = random_model("efficientnet_lite0", generator, image_size=(64, 96), resize_mode="pad")
    images = random_images(generator, 4, 30, 200)
    result = model.score(images, batch_size=3)
    for i, image in enumerate(images):
        prepared = model.prepare(image)
        rows, cols = prepared.placement.real_grid(result.patch_scores.shape[1:])
        assert float(result.pred_score[i]) == float(result.patch_scores[i, :rows, :cols].max())


# ---------------------------------------------------------------------------------- maps
def test_input_maps_are_per_image_and_consistent(generator):
    model = random_model(TinyBackbone(), generator, image_size=(48, 64), resize_mode="whole")
    images = random_images(generator, 3)
    model_maps = model.score(images)
    result = model.score(images, map_size="input")
    assert isinstance(result.anomaly_map, list)
    assert [tuple(m.shape) for m in result.anomaly_map] == [im.shape[:2] for im in images]
    assert torch.equal(result.pred_score, model_maps.pred_score)
    for i, image_map in enumerate(result.anomaly_map):
        expected = torch.nn.functional.interpolate(model_maps.anomaly_map[i][None, None],
                                                   size=images[i].shape[:2], mode="bilinear",
                                                   align_corners=False)[0, 0]
        torch.testing.assert_close(image_map, expected, rtol=1e-5, atol=1e-5)
    for image_map in result.anomaly_map + [model_maps.anomaly_map, model_maps.patch_scores]:
        image_map.add_(1.0)  # ordinary tensors: users may modify them
    same = [images[0], images[0].copy()]
    stacked = model.score(same, map_size="input")
    assert isinstance(stacked.anomaly_map, torch.Tensor)
    assert tuple(stacked.anomaly_map.shape) == (2, *images[0].shape[:2])


class Brightness(nn.Module):
    """A backbone whose features are the local mean brightness above mid-grey (stride 8 and 16;
    dark background and zero padding alike give 0), so that the head of `bright_model` scores
    brighter patches higher: maps must peak on bright spots."""

    channels = (1, 1)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x):
        bright = torch.relu(x.mean(1, keepdim=True) - 0.5)
        f2 = torch.nn.functional.avg_pool2d(bright, 8, ceil_mode=True)
        return [f2, torch.nn.functional.avg_pool2d(f2, 2, ceil_mode=True)]


def bright_model(**kwargs) -> SimpleNet:
    model = SimpleNet(Brightness(), weights=None, pretrain_embed_dim=9, target_embed_dim=9,
                      hidden=1, sigma=2.0, **kwargs)
    head = model.head
    with torch.no_grad():
        head.adaptor.weight.copy_(torch.eye(9))
        head.adaptor.bias.zero_()
        head.discriminator.linear.weight.fill_(1.0)
        head.discriminator.linear.bias.zero_()
        head.discriminator.bn.reset_parameters()
        head.discriminator.bn.reset_running_stats()
        head.discriminator.tail.weight.fill_(-1.0)  # score = -logit = brightness (monotone)
    return model.eval()


def defect_image(height, width, top, left, size=12):
    rng = np.random.default_rng(0)
    image = rng.integers(40, 60, (height, width), dtype=np.uint8)
    image[top:top + size, left:left + size] = 250
    return image


@pytest.mark.parametrize("mode, tiling", [("crop", None), ("whole", None), ("pad", None),
                                          ("whole", (64, 48)), ("pad", ((48, 96), (32, 64)))])
def test_input_map_peaks_on_the_defect_in_original_pixels(mode, tiling):
    """Alignment: a bright defect near a corner of a rectangular image is where the input-size
    map peaks, in the image's own pixels, whatever the resize mode or tiling."""
    height, width = 150, 260
    # crop mode cuts off the border: put the defect inside the crop, near its edge
    top, left = (30, 200) if mode == "crop" else (128, 236)
    model = bright_model(image_size=(64, 96), resize_mode=mode, tiling=tiling)
    result = model.score(defect_image(height, width, top, left), map_size="input")
    amap = result.anomaly_map[0]
    assert tuple(amap.shape) == (height, width)
    row, col = divmod(int(amap.argmax()), width)
    # patch scores live on the stride-8 grid: one cell is ~20 px of this image in every mode
    cell = 22
    assert top - cell <= row < top + 12 + cell and left - cell <= col < left + 12 + cell, (row, col)
    far = amap[:height // 2, :width // 2] if mode != "crop" else amap[100:, :100]
    assert float(amap.max()) > float(far.max()) + 0.05  # a clear peak, not a flat map


def test_crop_does_not_see_a_defect_in_the_cut_off_border():
    model = bright_model(image_size=(64, 96), resize_mode="crop")
    result = model.score(defect_image(150, 260, 2, 2), map_size="input")
    amap, scored = result.anomaly_map[0], result.scored_mask[0]
    assert not bool(scored[2:14, 2:14].any())
    assert bool((amap[2:14, 2:14] == amap[scored].min()).all())


@pytest.mark.parametrize("mode", ["crop", "whole", "pad"])
def test_masks_follow_their_images_through_each_mode(mode):
    """`mask_to_model_view` puts a mask where the model input has its defect."""
    image = defect_image(150, 260, 40, 180, size=30)
    mask = image > 200
    model = bright_model(image_size=(64, 96), resize_mode=mode)
    model_input = model.prepare(image).input[..., 0].numpy()
    view = mask_to_model_view(mask, model.resize, model.image_size, mode)
    assert view.shape == (64, 96) and view.any()
    bright = model_input > 150
    overlap = (view & bright).sum() / max(view.sum(), bright.sum())
    assert overlap > 0.8, overlap
    if mode == "pad":
        real = model.prepare(image).placement.real
        assert not view[real[0]:].any() and not view[:, real[1]:].any()


# ---------------------------------------------------------------------------------- tiling
def test_tiles_covering_the_image_once_equal_scoring_the_crops(generator):
    model = random_model(TinyBackbone(), generator, image_size=64, tiling=(64, 64))
    image = random_images(generator, 1, 100, 101)[0]
    image = np.ascontiguousarray(np.concatenate([image, image[:28]], 0)[:128, :100][:, :96])
    image = np.ascontiguousarray(np.pad(image, ((0, 0), (0, 96), (0, 0)), mode="reflect"))
    assert image.shape[:2] == (128, 192)
    tiled = model.score(image, batch_size=4)
    model.tiling = None
    crops = [image[t:t + 64, c:c + 64] for t in (0, 64) for c in (0, 64, 128)]
    alone = model.score(crops, map_size="input")
    assert float(tiled.pred_score[0]) == pytest.approx(float(alone.pred_score.max()), abs=1e-6)
    stitched = tiled.anomaly_map[0]
    for k, (t, c) in enumerate((t, c) for t in (0, 64) for c in (0, 64, 128)):
        torch.testing.assert_close(stitched[t:t + 64, c:c + 64], alone.anomaly_map[k],
                                   rtol=1e-6, atol=1e-6)


def test_tiled_progress_counts_each_image_once_when_its_last_window_is_scored(generator):
    model = random_model(TinyBackbone(), generator, image_size=32, tiling=(32, 16))
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).numpy()
              for h, w in ((48, 40), (20, 21), (32, 64))]   # 4, 1 and 3 windows
    seen = []
    model.score(images, batch_size=3, progress=seen.append)
    assert sum(seen) == 3 and len(seen) == 3   # 8 windows in batches of 3
    assert seen == [0, 2, 1]                   # the first image completes in the second batch


def test_overlapping_tiles_average_and_small_images_pad(generator):
    model = random_model(TinyBackbone(), generator, image_size=32, tiling=(32, 16))
    image = random_images(generator, 1, 48, 49)[0][:48, :40]   # windows: rows 0,16; cols 0,8
    small = random_images(generator, 1, 20, 21)[0]              # smaller than a tile: padded
    result = model.score([image, small], batch_size=3)
    assert [tuple(m.shape) for m in result.anomaly_map] == [(48, 40), (20, 20)]
    model.tiling = None
    total, count = torch.zeros(48, 40), torch.zeros(48, 40)
    for t in (0, 16):
        for c in (0, 8):
            window = model.score(image[t:t + 32, c:c + 32], map_size="input")
            total[t:t + 32, c:c + 32] += window.anomaly_map[0]
            count[t:t + 32, c:c + 32] += 1
    torch.testing.assert_close(result.anomaly_map[0], total / count, rtol=1e-5, atol=1e-6)
    # the small image is one padded window: scored like a "pad" model sees a 20x20 image in a
    # 32x32 input, at the tile's scale (1:1 here)
    pad_model = SimpleNet(TinyBackbone(), weights=None, image_size=32, resize_mode="pad", **HEAD)
    pad_model.load_state_dict(model.state_dict())
    padded = np.zeros((32, 32, 3), np.uint8)
    padded[:20, :20] = small
    direct = pad_model(torch.from_numpy(padded)[None], real_size=torch.tensor([[20, 20]]))
    assert float(result.pred_score[1]) == pytest.approx(float(direct.pred_score[0]), abs=1e-6)
    torch.testing.assert_close(result.anomaly_map[1], direct.anomaly_map[0, :20, :20],
                               rtol=1e-5, atol=1e-6)
    assert result.scored_mask is None


def test_tiling_needs_input_maps_and_scores_lazily(generator):
    model = random_model(TinyBackbone(), generator, image_size=32, tiling=(32, 24))
    with pytest.raises(ValueError, match="map_size='input'"):
        model.score(random_images(generator, 1), map_size="model")
    seen = []
    forward = model._device_forward
    model._device_forward = lambda batch, *a, **k: seen.append(batch.shape[0]) or forward(batch, *a, **k)
    result = model.score((image for image in random_images(generator, 5, 60, 100)), batch_size=4)
    assert len(result) == 5 and max(seen) <= 4 and result.patch_scores is None
    result.anomaly_map[0].mul_(2.0)
    result.pred_score.mul_(2.0)


# ---------------------------------------------------------------------------------- training
def test_padded_patches_are_left_out_of_training(generator):
    model = random_model(TinyBackbone(), generator, image_size=(32, 48), resize_mode="pad")
    images = [np.full((64, 48, 3), 90, np.uint8), np.full((30, 90, 3), 90, np.uint8)]
    # placements: 32x24 (3 of 6 columns of patches real) and 16x48 (2 of 4 rows real)
    samples = []
    step = model._train_step
    model._train_step = lambda emb, *a: samples.append(emb.reshape(-1, emb.shape[-1]).shape[0]) or step(emb, *a)
    model.fit(images, epochs=1, batch_size=2, seed=0, progress=False)
    assert samples == [4 * 3 + 2 * 6]


def test_fit_trains_on_tiles(generator, tmp_path):
    from PIL import Image

    model = random_model(TinyBackbone(), generator, image_size=32, tiling=(32, 32), epochs=2)
    path = tmp_path / "big.png"
    Image.fromarray(random_images(generator, 1, 64, 65)[0][:64, :64]).save(path)
    in_memory = np.asarray(Image.open(path))
    sizes = []
    step = model._train_step
    model._train_step = lambda emb, *a: sizes.append(emb.reshape(-1, emb.shape[-1]).shape[0]) or step(emb, *a)
    history = model.fit([path], batch_size=8, seed=3, progress=False)
    assert len(history) == 2 and sizes == [4 * 16, 4 * 16]   # 4 windows of 4x4 patches
    again = model.fit([in_memory], batch_size=8, seed=3, progress=False)
    assert again == history  # a path and its decoded array give the same windows


# ---------------------------------------------------------------------------------- defaults
def test_defaults_come_from_the_backbone():
    from simplenet_fast.backbones import PAPER_DEFAULTS, default_config

    lite = SimpleNet("efficientnet_lite0", weights=None)
    assert lite.config == {**lite.config, "image_size": (224, 224), "resize_mode": "whole",
                           "resize": None, "pretrain_embed_dim": 384, "target_embed_dim": 384,
                           "hidden": 256, "noise_std": 0.25, "epochs": 20, "tiling": None,
                           "recipe": "relative"}
    assert default_config("efficientnet_lite0").epochs == 20
    paper = default_config("wide_resnet50_2")
    assert paper is PAPER_DEFAULTS and (paper.image_size, paper.resize_mode) == ((288, 288), "crop")
    assert (paper.pretrain_embed_dim, paper.hidden, paper.noise_std, paper.epochs) == (1536, 1024, 0.015, 160)
    custom = SimpleNet(TinyBackbone(), weights=None, **HEAD)
    assert custom.config["image_size"] == (288, 288) and custom.resize == 329
    assert custom.noise_std == 0.015 and custom.epochs == 160

    class Declares(TinyBackbone):
        defaults = {"image_size": (32, 48), "resize_mode": "pad", "noise_std": 0.5, "epochs": 3}

    declared = SimpleNet(Declares(), weights=None, **HEAD)
    assert (declared.image_size, declared.resize_mode, declared.noise_std, declared.epochs) == \
        ((32, 48), "pad", 0.5, 3)
    explicit = SimpleNet(Declares(), weights=None, image_size=40, epochs=1, **HEAD)
    assert explicit.image_size == (40, 40) and explicit.epochs == 1
    assert SimpleNet(TinyBackbone(), weights=None, tiling=(64, 32), **HEAD).resize_mode == "whole"


def test_fit_uses_the_configured_epochs(generator):
    model = random_model(TinyBackbone(), generator, image_size=32, epochs=3)
    assert len(model.fit(random_images(generator, 2), seed=0, progress=False)) == 3
    assert len(model.fit(random_images(generator, 2), epochs=1, seed=0, progress=False)) == 1


# ---------------------------------------------------------------------------------- errors
def test_bad_calls_are_refused_clearly(generator):
    model = random_model(TinyBackbone(), generator, image_size=(32, 48), resize_mode="pad")
    with pytest.raises(ValueError, match="map_size must be one of"):
        model.score(random_images(generator, 1), map_size="original")
    batch = torch.zeros(2, 32, 48, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"real_size must be \[2, 2\] ints"):
        model(batch, real_size=torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"real_size must be \[2, 2\] ints"):
        model(batch, real_size=torch.ones(2, 2))
    with pytest.raises(ValueError, match="real_size entries must lie in"):
        model(batch, real_size=torch.tensor([[32, 48], [33, 10]]))
    with pytest.raises(ValueError, match="real_size entries must lie in"):
        model(batch, real_size=torch.tensor([[0, 48], [3, 10]]))
    with pytest.raises(ValueError, match="tiling's stride"):
        model.tiling = (16, 0)
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        SimpleNet(TinyBackbone(), weights=None, resize_mode="fit", **HEAD)
    with pytest.raises(ValueError, match="image_size must be positive"):
        SimpleNet(TinyBackbone(), weights=None, image_size=(0, 32), **HEAD)
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        SimpleNet(TinyBackbone(), weights=None, epochs=-1, **HEAD)
