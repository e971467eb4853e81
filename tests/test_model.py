"""SimpleNet end to end: inputs, scoring, batching, training (simplenet_fast/model.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import simplenet_fast
from simplenet_fast import AnomalyResult, SimpleNet, build_info
from simplenet_fast.preprocess import iter_batches

SIZE, RESIZE = 64, 72  # scoring: 8x8 patch grid (layer3 4x4), cheap enough for WRN-50-2
TRAIN_SIZE, TRAIN_RESIZE = 32, 36  # training: 4x4 patch grid, 4x cheaper again
HEAD = dict(pretrain_embed_dim=96, target_embed_dim=80, hidden=32)
CUDA = torch.cuda.is_available()


def needs_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))



needs_fused = pytest.mark.skipif(not build_info()["compiled"], reason="compiled extension missing")


def small_model(seed: int = 0, **kwargs) -> SimpleNet:
    """WideResNet-50-2 with random weights (tests never download) and a small head."""
    torch.manual_seed(seed)
    kwargs = {**dict(image_size=SIZE, resize=RESIZE, **HEAD), **kwargs}
    return SimpleNet("wide_resnet50_2", weights=None, **kwargs)


def train_model(seed: int = 0, **kwargs) -> SimpleNet:
    return small_model(seed, **{**dict(image_size=TRAIN_SIZE, resize=TRAIN_RESIZE), **kwargs})


def normal_images(n: int, seed: int = 0, h: int = TRAIN_RESIZE, w: int = TRAIN_RESIZE + 4
                  ) -> torch.Tensor:
    """A simple 'normal' class: smooth stripes with a random phase, float [n, 3, h, w]."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, w)
    images = []
    for _ in range(n):
        phase = torch.rand((), generator=g) * 0.2
        stripe = (0.5 + 0.4 * torch.sin(12.566 * (ramp + phase)))[None].expand(h, w)
        images.append(torch.stack([stripe, stripe * 0.8, stripe * 0.6]))
    return torch.stack(images).clamp(0, 1)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def model() -> SimpleNet:
    m = small_model()
    # Non-trivial BN statistics and weights (a fresh BN hides folding bugs, SPEC 6).
    with torch.no_grad():
        bn = m.head.discriminator.bn
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def trainer() -> SimpleNet:
    """One backbone for the training tests: every fit starts from the seeded official init."""
    return train_model()


@pytest.fixture
def rgb(tmp_path):
    """One picture in every accepted form; short side == RESIZE so float tensors match exactly."""
    array = np.random.RandomState(3).randint(0, 256, (72, 90, 3), dtype=np.uint8)
    path = tmp_path / "picture.png"
    Image.fromarray(array).save(path)
    return array, path


# ------------------------------------------------------------------------------- scoring
def test_result_shapes_and_image_score_is_max_patch(model):
    images = torch.rand(3, 3, 80, 72)
    result = model.score(images)
    assert isinstance(result, AnomalyResult) and len(result) == 3
    assert result.patch_scores.shape == (3, SIZE // 8, SIZE // 8)
    assert result.anomaly_map.shape == (3, SIZE, SIZE)
    assert result.pred_score.shape == (3,)
    assert result.pred_label is None and result.pred_mask is None
    assert result.threshold_source == "none"
    torch.testing.assert_close(result.pred_score, result.patch_scores.flatten(1).max(1).values,
                               rtol=0, atol=0)
    # the map is SPEC 1.10 of the patch scores
    torch.testing.assert_close(result.anomaly_map,
                               simplenet_fast.anomaly_map(result.patch_scores, SIZE, 4.0))
    assert result.patch_scores.std() > 0
    # ordinary tensors: users may modify them in place
    result.anomaly_map.add_(1.0)


def test_same_picture_in_every_form_scores_the_same(model, rgb):
    array, path = rgb
    chw = torch.from_numpy(array).permute(2, 0, 1)
    forms = [path, str(path), Image.open(path), array, chw.clone(), chw.float() / 255]
    result = model.score(forms)
    assert torch.equal(result.pred_score, result.pred_score[:1].expand(len(forms)))
    for i in range(1, len(forms)):
        torch.testing.assert_close(result.anomaly_map[i], result.anomaly_map[0], rtol=0, atol=0)
    # a [B, C, H, W] tensor, a folder and single items give the same numbers, up to the
    # backbone's rounding, which depends on the batch size (oneDNN picks other kernels for 1)
    folder_result = model.score(path.parent)
    torch.testing.assert_close(folder_result.pred_score, result.pred_score[:1], rtol=1e-5, atol=1e-6)
    batched = model.score(torch.stack([chw, chw]))
    torch.testing.assert_close(batched.pred_score, result.pred_score[:2], rtol=1e-5, atol=1e-6)


def test_different_pictures_score_differently(model):
    images = torch.rand(2, 3, 72, 72)
    result = model.score(images)
    assert (result.pred_score[0] - result.pred_score[1]).abs() > 0
    # scores do not depend on the rest of the batch
    single = model.score(images[1])
    torch.testing.assert_close(single.pred_score, result.pred_score[1:], rtol=1e-5, atol=1e-5)


@needs_fused
def test_fused_and_reference_agree_through_score(model):
    images = torch.rand(3, 3, 77, 72)
    fused = model.score(images, fused=True)
    reference = model.score(images, fused=False)
    rel = (fused.patch_scores - reference.patch_scores).norm() / reference.patch_scores.norm()
    assert rel < 1e-4
    rel_map = (fused.anomaly_map - reference.anomaly_map).norm() / reference.anomaly_map.norm()
    assert rel_map < 1e-4
    torch.testing.assert_close(fused.pred_score, fused.patch_scores.amax((1, 2)), rtol=0, atol=0)


def test_batches_are_bounded_and_decoded_lazily(model, monkeypatch):
    seen, pulled = [], []
    forward = model.backbone.forward

    def recording_forward(x):
        seen.append((x.shape[0], len(pulled)))
        return forward(x)

    def sources():
        for i in range(7):
            pulled.append(i)
            yield np.full((72, 72, 3), 30 * i, np.uint8)

    monkeypatch.setattr(model.backbone, "forward", recording_forward)
    result = model.score(sources(), batch_size=3)
    assert [b for b, _ in seen] == [3, 3, 1]
    # when the first batch reached the backbone, only its 3 images had been read
    assert [p for _, p in seen] == [3, 6, 7]
    assert result.pred_score.shape == (7,)
    with pytest.raises(ValueError, match="batch_size"):
        model.score(sources(), batch_size=0)


def test_progress_reports_each_batch_within_one_call(model, capsys):
    """A callable hears each batch as it is scored; True draws a bar that reaches the total when
    the total is known without reading the images (count_images)."""
    images = [np.full((72, 72, 3), 20 * i, np.uint8) for i in range(5)]
    seen = []
    result = model.score(images, batch_size=2, progress=seen.append)
    assert seen == [2, 2, 1] and len(result) == 5
    model.score(images, batch_size=2, progress=True)
    assert "5/5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress must be"):
        model.score(images, progress="yes")


def test_count_images_counts_without_reading(tmp_path):
    from simplenet_fast.preprocess import count_images

    arrays = [np.zeros((8, 8, 3), np.uint8)] * 2
    assert count_images(arrays) == 2
    assert count_images([torch.rand(3, 3, 8, 8), arrays[0], str(tmp_path / "a.png")]) == 5
    assert count_images(torch.rand(3, 8, 8)) == 1
    assert count_images(tmp_path) is None            # a folder: counted as it is listed
    assert count_images(iter(arrays)) is None        # an iterator is never consumed here
    assert count_images([arrays, arrays[0]]) is None  # nested lists likewise


def test_thresholds_fill_label_and_mask(model):
    images = torch.rand(4, 3, 72, 72)
    plain = model.score(images)
    try:
        model.image_threshold = float(plain.pred_score.median())
        model.pixel_threshold = float(plain.anomaly_map.mean())
        result = model.score(images)
    finally:
        model.image_threshold = model.pixel_threshold = None
    assert result.pred_label.dtype == torch.bool and result.pred_mask.dtype == torch.bool
    assert torch.equal(result.pred_label, plain.pred_score > plain.pred_score.median())
    assert torch.equal(result.pred_mask, plain.anomaly_map > plain.anomaly_map.mean())
    assert 0 < result.pred_mask.float().mean() < 1
    assert result.threshold_source == "user-set"


def test_forward_takes_uint8_crops(model):
    images = torch.rand(2, 3, 72, 72)
    crops = next(iter_batches(images, 8, SIZE, RESIZE))
    out = model(crops)
    torch.testing.assert_close(out.pred_score, model.score(images).pred_score, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8 inputs"):
        model(crops.float())


def test_decoding_threads_give_the_same_result_and_errors(model, tmp_path):
    """score(workers=N): the files decode in threads, ahead of the model; the scores, maps and
    their order are those of workers=0, and a bad file fails the call naming it, as there."""
    rng = np.random.RandomState(5)
    paths = []
    for i in range(7):
        path = tmp_path / f"cell{i}.png"
        Image.fromarray(rng.randint(0, 256, (72 + 3 * i, 90, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    serial = model.score(paths, batch_size=3)
    for workers in (1, 3):
        threaded = model.score(paths, batch_size=3, workers=workers)
        torch.testing.assert_close(threaded.pred_score, serial.pred_score, rtol=0, atol=0)
        torch.testing.assert_close(threaded.anomaly_map, serial.anomaly_map, rtol=0, atol=0)
    tiled = small_model(tiling=(80, 64), resize_mode="whole", resize=None)
    tiled.head.load_state_dict(model.head.state_dict())
    big = tmp_path / "big.png"
    Image.fromarray(rng.randint(0, 256, (150, 170, 3), dtype=np.uint8)).save(big)
    expected = tiled.score([big, paths[0], big], batch_size=2)
    got = tiled.score([big, paths[0], big], batch_size=2, workers=2)
    torch.testing.assert_close(got.pred_score, expected.pred_score, rtol=0, atol=0)
    for a, b in zip(got.anomaly_map, expected.anomaly_map):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for workers in (0, 2):
        with pytest.raises(ValueError, match="broken.png"):
            model.score([*paths[:4], broken, *paths[4:]], batch_size=2, workers=workers)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        model.score(paths, workers=-1)


def test_bad_inputs_raise_through_score(model, tmp_path):
    with pytest.raises(ValueError, match="empty list"):
        model.score([])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        model.score(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"images\[1\].*C = 1 or 3"):
        model.score([torch.rand(3, 72, 72), torch.rand(2, 72, 72)])


def test_constructor_validation():
    with pytest.raises(ValueError, match="resize"):
        SimpleNet("efficientnet_lite0", weights=None, image_size=64, resize=60)
    with pytest.raises(ValueError, match="precision"):
        SimpleNet("efficientnet_lite0", weights=None, precision="float16")
    with pytest.raises(ValueError, match="sigma"):
        SimpleNet("efficientnet_lite0", weights=None, sigma=float("nan"))
    m = SimpleNet("efficientnet_lite0", weights=None, image_size=64, resize=72, **HEAD)
    assert m.head.channels == m.backbone.channels == (40, 112)
    assert m.image_threshold is None and m.pixel_threshold is None
    assert m.config["backbone"] == "efficientnet_lite0" and m.config["weights_id"] == "random"


def test_module_level_score_caches_loaded_models(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=SIZE, resize=RESIZE, **HEAD)
    path = tmp_path / "m.pt"
    model.save(path)
    loads = []
    original = SimpleNet.load.__func__

    def counting_load(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(SimpleNet, "load", classmethod(counting_load))
    images = torch.rand(2, 3, 72, 72)
    first = simplenet_fast.score(images, model=path)
    second = simplenet_fast.score(images, model=str(path))
    assert len(loads) == 1
    torch.testing.assert_close(first.pred_score, model.score(images).pred_score, rtol=0, atol=0)
    torch.testing.assert_close(second.pred_score, first.pred_score, rtol=0, atol=0)
    # a rewritten file is loaded again
    model.image_threshold = 0.0
    try:
        model.save(path)
        import os
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        third = simplenet_fast.score(images, model=path)
    finally:
        model.image_threshold = None
    assert len(loads) == 2 and third.pred_label is not None
    assert simplenet_fast.score(images, model=model).pred_score.shape == (2,)
    with pytest.raises(TypeError, match="SimpleNet or the path"):
        simplenet_fast.score(images, model=42)


# ------------------------------------------------------------------------------- training
def state(m: SimpleNet) -> dict:
    return {k: v.clone() for k, v in m.head.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_reduces_the_loss(trainer):
    m = trainer
    images = normal_images(12)
    history = m.fit(images, epochs=10, batch_size=4, seed=0, progress=False)
    assert len(history) == 10 and all(isinstance(v, float) for v in history)
    # With the learning rates set to 0 the epoch means still move with the batches' BN
    # statistics and the noise: here the mean of the last 3 falls by 0.026 from the first 3.
    # Training takes off 0.095.
    assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.05, history
    assert not m.head.training and not m.backbone.training


def test_fit_is_reproducible_with_a_seed(trainer):
    m = trainer
    images = normal_images(8)
    h1 = m.fit(images, epochs=2, batch_size=4, seed=7, progress=False)
    s1 = state(m)
    torch.manual_seed(123)  # neither the global generator nor the training before matters
    h2 = m.fit(images, epochs=2, batch_size=4, seed=7, progress=False)
    assert h1 == h2
    assert_same_state(s1, state(m))
    h3 = m.fit(images, epochs=2, batch_size=4, seed=8, progress=False)
    assert h3 != h1


def test_cached_and_recomputed_embeddings_train_identically(trainer, monkeypatch):
    m = trainer
    images = normal_images(8)
    calls = []
    forward = m.backbone.forward
    monkeypatch.setattr(m.backbone, "forward", lambda x: calls.append(x.shape[0]) or forward(x))
    cached = m.fit(images, epochs=2, batch_size=4, seed=3, progress=False)
    cached_state = state(m)
    assert sum(calls) == 8  # the backbone ran once per training image, not once per epoch
    calls.clear()
    recomputed = m.fit(images, epochs=2, batch_size=4, seed=3, progress=False, feature_cache_bytes=0)
    assert sum(calls) == 2 * 8  # feature_cache_bytes=0: no cache pass at all
    assert recomputed == cached
    assert_same_state(cached_state, state(m))
    # a budget just below what 8 images need also recomputes
    calls.clear()
    per_image = (TRAIN_SIZE // 8) ** 2 * HEAD["target_embed_dim"] * 4
    m.fit(images, epochs=1, batch_size=4, seed=3, progress=False, feature_cache_bytes=8 * per_image - 1)
    assert sum(calls) == 4 + 8  # the first batch, then every batch of every epoch
    calls.clear()
    m.fit(images, epochs=1, batch_size=4, seed=3, progress=False, feature_cache_bytes=8 * per_image)
    assert sum(calls) == 8


def test_fit_accepts_folders_lists_and_dataloaders(trainer, tmp_path):
    images = as_uint8(normal_images(6))
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:02d}.png")
    m = trainer
    kwargs = dict(epochs=2, batch_size=6, seed=5, progress=False)
    from_folder = m.fit(tmp_path, **kwargs)
    folder_state = state(m)
    # paths decoded again for every batch of every epoch when nothing is cached
    from_list = m.fit([tmp_path / f"{i:02d}.png" for i in range(6)], **kwargs,
                      feature_cache_bytes=0)
    from_tensor = m.fit(images, **kwargs)
    # fit batches and shuffles itself: the loader's batch size does not matter (its order does,
    # as the order of a list does)
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    from_loader = m.fit(loader, **kwargs)
    assert from_folder == from_list == from_tensor == from_loader
    assert_same_state(folder_state, state(m))
    generator = (image for image in images)  # one-shot iterables are consumed once
    assert m.fit(generator, **kwargs) == from_folder


def test_fit_validation_and_reset(trainer):
    m = trainer
    with pytest.raises(ValueError, match="epochs"):
        m.fit(normal_images(2), epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        m.fit(normal_images(2), batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        m.fit(normal_images(2), seed=-3)
    with pytest.raises(ValueError, match="empty list"):
        m.fit([])
    m.image_threshold, m.pixel_threshold, m.threshold_info = 1.0, 2.0, {"method": "quantile"}
    assert m.fit(normal_images(2), epochs=0, progress=False) == []
    # they belonged to the old weights
    assert m.image_threshold is None and m.pixel_threshold is None and m.threshold_info is None


def test_training_step_follows_spec_2(trainer):
    """One step by hand: adaptor, noise, BN in train mode over both halves, truncated L1."""
    m = trainer
    images = normal_images(4)
    m.fit(images, epochs=0, seed=11, progress=False)  # official init from the seed
    init = state(m)
    history = m.fit(images, epochs=1, batch_size=4, seed=11, progress=False)
    trained = state(m)

    m.head.load_state_dict(init)
    assert all(p.grad is None for p in m.head.parameters())  # fit leaves no gradients behind
    m.head.train()
    embeddings = m._embed(next(iter_batches(images, 4, TRAIN_SIZE, TRAIN_RESIZE)))
    order = torch.randperm(4, generator=torch.Generator().manual_seed(11))
    noise_gen = torch.Generator().manual_seed(12)
    t = m.head.adaptor(embeddings[order].reshape(-1, HEAD["target_embed_dim"]))
    fake = t + 0.015 * torch.randn(t.shape, generator=noise_gen)
    disc = m.head.discriminator
    both = torch.cat([t, fake])
    h = disc.linear(both)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = (h - mean) / torch.sqrt(var + disc.bn.eps) * disc.bn.weight + disc.bn.bias
    logits = disc.tail(torch.nn.functional.leaky_relu(h, 0.2)).squeeze(-1)
    n = len(t)
    loss = torch.clamp(0.5 - logits[:n], min=0).mean() + torch.clamp(logits[n:] + 0.5, min=0).mean()
    assert history[0] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    with torch.no_grad():  # first steps: AdamW (decoupled decay), Adam (L2 decay in the grad)
        # Adam's first update is lr * g / (|g| + eps); where |g| is near eps float32 rounding
        # dominates, so compare where the gradient is clear of it.
        w, g = m.head.adaptor.weight, m.head.adaptor.weight.grad
        expected = 1e-4 * 0.01 * w + 1e-4 * g / (g.abs() + 1e-8)
        clear = g.abs() > 1e-5
        assert clear.float().mean() > 0.5
        torch.testing.assert_close((w - trained["adaptor.weight"])[clear], expected[clear],
                                   rtol=1e-3, atol=1e-9)
        w, g = disc.linear.weight, disc.linear.weight.grad + 1e-5 * disc.linear.weight
        expected = 2e-4 * g / (g.abs() + 1e-8)
        clear = g.abs() > 1e-5
        assert clear.float().mean() > 0.5
        torch.testing.assert_close((w - trained["discriminator.linear.weight"])[clear],
                                   expected[clear], rtol=1e-3, atol=1e-9)
    m.head.eval()


# ------------------------------------------------------------------------------- CUDA (skipped here)
@pytest.fixture
def no_tf32():
    """float32 on CUDA means float32: TF32 convolutions would differ from the CPU by ~1e-3."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_cuda_graph_option_is_ignored_on_cpu(model):
    images = torch.rand(2, 3, 72, 80)
    assert torch.equal(model.score(images, cuda_graph=True).anomaly_map, model.score(images).anomaly_map)
    assert not model._graphs


@needs_cuda
def test_cuda_scores_match_cpu(model, no_tf32):
    images = torch.rand(3, 3, 72, 80)
    cpu = model.score(images, fused=False)
    model.to("cuda")
    try:
        gpu = model.score(images, fused=False)
        fused = model.score(images)
    finally:
        model.to("cpu")
    assert gpu.pred_score.device.type == "cuda"
    for result in (gpu, fused):
        rel = (result.anomaly_map.cpu() - cpu.anomaly_map).norm() / cpu.anomaly_map.norm()
        assert rel < 1e-4


@needs_cuda
def test_cuda_graph_matches_eager(model, no_tf32, monkeypatch):
    images = torch.rand(7, 3, 72, 80)
    model.to("cuda")
    captures = []
    capture = model._capture
    monkeypatch.setattr(model, "_capture", lambda *a: captures.append(a[0]) or capture(*a))
    try:
        eager = model.score(images, batch_size=3)
        graph = model.score(images, batch_size=3, cuda_graph=True)
        again = model.score(images, batch_size=3, cuda_graph=True)  # replayed, not recaptured
        assert len(model._graphs) == 1  # the last batch of 1 was padded into the graph of 3
        short = model.score(images[:2], batch_size=3, cuda_graph=True)
        assert len(model._graphs) == 1  # the graph of 3 exists: 2 images are padded into it
        with torch.no_grad():  # weights change: the captured graph must not serve stale numbers
            model.head.discriminator.tail.weight.mul_(2)
        changed = model.score(images, batch_size=3, cuda_graph=True)
        changed_eager = model.score(images, batch_size=3)
        assert captures == [3, 3]  # captured once, then again for the new weights only
        tiny = model.score(images[:1], batch_size=5, cuda_graph=True)  # shorter than one batch
        assert captures == [3, 3, 1]
        with torch.no_grad():
            model.head.discriminator.tail.weight.div_(2)
    finally:
        model.to("cpu")
    torch.testing.assert_close(short.pred_score, eager.pred_score[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.pred_score, changed_eager.pred_score[:1], rtol=1e-5, atol=1e-5)
    for a, b in ((graph, eager), (again, eager), (changed, changed_eager)):
        torch.testing.assert_close(a.patch_scores, b.patch_scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed.patch_scores, graph.patch_scores)


@needs_cuda
def test_bfloat16_close_to_float32():
    images = torch.rand(4, 3, RESIZE, 80)
    m = small_model(device="cuda")
    fp32 = m.score(images, fused=False)
    m.precision = "bfloat16"
    for kwargs in ({}, {"cuda_graph": True}):
        bf16 = m.score(images, **kwargs)
        rel = (bf16.patch_scores - fp32.patch_scores).norm() / fp32.patch_scores.norm()
        assert rel < 2e-2, kwargs
        assert torch.isfinite(bf16.anomaly_map).all()


@needs_cuda
def test_fit_on_cuda():
    m = train_model(device="cuda")
    history = m.fit(normal_images(8), epochs=4, batch_size=4, seed=0, progress=False)
    assert history[-1] < history[0]
    assert m.score(normal_images(2)).pred_score.device.type == "cuda"
    assert m.fit(normal_images(8), epochs=4, batch_size=4, seed=0, progress=False)[0] == \
        pytest.approx(history[0], rel=1e-4)
