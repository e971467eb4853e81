"""What the end-to-end benchmarks share (bench_gpu_e2e.py, bench_bf16_cpu.py): the test pictures,
the paper-configuration WideResNet model, the official code's inference as a baseline, and the
accuracy checks made before anything is timed."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from simplenet_fast import SimpleNet
from simplenet_fast.preprocess import iter_batches, normalise


def make_images(n: int, side: int, seed: int) -> list[np.ndarray]:
    """n uint8 HxWx3 images: smooth random backgrounds with a bright blob of varying size, so
    that image scores differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    images = []
    for i in range(n):
        base = 128 + 40 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), 0.02 + 0.1 * (i % 7) / 7
        blob = 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = base[..., None] + blob[..., None] + rng.normal(0, 8, (side, side, 3))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def wide_resnet_model(image_size: int = 288, resize: int = 329, dims=(1536, 1536, 1024)) -> SimpleNet:
    """WideResNet-50-2 (random weights: speed does not depend on them) with a head of `dims`
    (pretrain, target, hidden) whose BN statistics are non-trivial (SPEC 6), float32 setting."""
    torch.manual_seed(0)
    model = SimpleNet("wide_resnet50_2", weights=None, image_size=image_size, resize=resize,
                      pretrain_embed_dim=dims[0], target_embed_dim=dims[1], hidden=dims[2],
                      precision="float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn = model.head.discriminator.bn
        h = bn.running_mean.numel()
        bn.running_mean.copy_(torch.randn(h, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(h, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(h, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(h, generator=gen) * 0.2)
    return model.eval()


def official_style(model: SimpleNet, images, batch_size: int):
    """The paper code's inference (SPEC 3, "No dead work"), float32, eager, on the model's device:
    the same crops and backbone and the reference head, PLUS the official dead work: the
    [B, H2, W2, 1536] patch features upsampled bilinear to the input size and copied to the CPU,
    the patch scores copied to the CPU (image score = numpy max there), upsampled on the device,
    copied back and blurred on the CPU with scipy.ndimage.gaussian_filter image by image (as the
    official `convert_to_segmentation` does). Returns (image scores, maps) as numpy arrays."""
    from scipy import ndimage

    device = model.device
    size = model.image_size
    scores_out, maps_out = [], []
    with torch.inference_mode():
        for batch in iter_batches(images, batch_size, model.image_size, model.resize,
                                  model.resize_mode):
            x = normalise(batch.to(device), model._mean, model._std).contiguous()
            features = [f.float() for f in model.backbone(x)]
            embeddings = model.head.embed(features)                      # [B, 36, 36, 1536]
            patch_scores = model.head.score_embeddings(embeddings)       # [B, 36, 36]
            patch_np = patch_scores.cpu().numpy()
            scores_out.append(patch_np.reshape(len(patch_np), -1).max(axis=1))
            # official convert_to_segmentation: scores upsampled on the device, then to the CPU ...
            up = F.interpolate(torch.from_numpy(patch_np).to(device)[:, None], size=size,
                               mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            # ... and the features too (the dead work: nobody uses them) ...
            feats = F.interpolate(embeddings.permute(0, 3, 1, 2), size=size, mode="bilinear",
                                  align_corners=False).cpu().numpy()
            del feats
            # ... then the blur on the CPU, image by image.
            maps_out.extend(ndimage.gaussian_filter(m, sigma=model.sigma) for m in up)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return np.concatenate(scores_out), np.stack(maps_out)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference|| in float64; NaN when either holds NaN / Inf."""
    result, reference = result.detach().double().cpu(), reference.detach().double().cpu()
    if not torch.isfinite(result).all() or not torch.isfinite(reference).all():
        return float("nan")
    return ((result - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def ranking_check(scores: torch.Tensor, reference: torch.Tensor, tol: float) -> dict:
    """Exact ranking equality, and order kept for every pair whose reference scores differ by more
    than tol * max|reference| (pairs closer than the tolerance may legitimately swap)."""
    s, r = scores.double().cpu(), reference.double().cpu()
    exact = bool(torch.equal(torch.argsort(s), torch.argsort(r)))
    margin = tol * r.abs().max().item()
    dr = r[:, None] - r[None, :]
    ds = s[:, None] - s[None, :]
    resolvable = dr.abs() > margin
    swapped = int(((torch.sign(dr) != torch.sign(ds)) & resolvable).sum().item()) // 2
    return {"rank_exact": exact, "rank_swaps_beyond_tol": swapped}
