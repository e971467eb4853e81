"""Shared test helpers: official fixtures, random heads with non-trivial BN, devices."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from simplenet_fast import SimpleNetHead

HERE = Path(__file__).resolve().parent
# The project's shared fixtures sit beside the clone; SIMPLENET_FAST_FIXTURES points elsewhere
# (e.g. a copy carried to a GPU machine).
FIXTURES = Path(os.environ.get("SIMPLENET_FAST_FIXTURES",
                               HERE.parent.parent / "shared" / "fixtures" / "official_head"))
# case_odd is small enough to ship (0.4 MB): fidelity is then tested in a user's own clone too.
LOCAL_FIXTURES = HERE / "data"


def fixture_path(name: str) -> Path:
    for folder in (FIXTURES, LOCAL_FIXTURES):
        if (folder / f"{name}.npz").is_file():
            return folder / f"{name}.npz"
    pytest.skip(f"official fixture {name}.npz not found in {FIXTURES} (the project's ../shared "
                "folder is absent in this clone)")


def official_case(name: str):
    """(head, [layer2, layer3], arrays) of an official fixture, head in eval mode."""
    z = np.load(fixture_path(name), allow_pickle=False)
    checkpoint = {"pre_projection": {}, "discriminator": {}}
    for key in z.files:
        top, _, rest = key.partition("__")
        if top in checkpoint:
            checkpoint[top][rest] = torch.from_numpy(z[key])
    f2, f3 = torch.from_numpy(z["layer2"]), torch.from_numpy(z["layer3"])
    head = SimpleNetHead(
        channels=(f2.shape[1], f3.shape[1]),
        pretrain_embed_dim=int(z["cfg_pretrain_embed_dimension"]),
        target_embed_dim=int(z["cfg_target_embed_dimension"]),
        hidden=int(z["cfg_dsc_hidden"]),
    )
    head.load_official_state_dict(checkpoint)
    return head.eval(), [f2, f3], z


def randomize_head(head: SimpleNetHead, generator: torch.Generator) -> SimpleNetHead:
    """Non-trivial biases and BN statistics: mean 0 / var 1 / gamma 1 / beta 0 hides fold bugs."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator)
    with torch.no_grad():
        head.adaptor.bias.copy_(0.1 * rand(head.target_embed_dim))
        head.discriminator.linear.bias.copy_(0.1 * rand(head.hidden))
        bn = head.discriminator.bn
        bn.running_mean.copy_(0.5 * rand(head.hidden))
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(head.hidden, generator=generator))
        bn.weight.copy_(0.5 + torch.rand(head.hidden, generator=generator))
        bn.bias.copy_(0.3 * rand(head.hidden))
    return head.eval()


def randomize_backbone_bn(module: nn.Module, seed: int) -> None:
    """Backbone BN statistics away from mean 0 / var 1 / gamma 1 / beta 0, so that a load or a
    fold that skips them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
                bn.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                bn.bias.copy_(0.1 * torch.randn(c, generator=g))


def random_backbone(name: str, bn_seed: int = 1) -> nn.Module:
    """`build_backbone(name)` with seeded random weights and randomised BN statistics."""
    from simplenet_fast.backbones import build_backbone

    torch.manual_seed(0)
    m = build_backbone(name, weights=None)
    randomize_backbone_bn(m, bn_seed)
    return m


class TinyBackbone(nn.Module):
    """Stride 8 and 16 maps in two convolutions: scoring costs ~1 ms, so fuzzing can run many."""

    channels = (5, 7)

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 8, stride=8)
        self.b = nn.Conv2d(5, 7, 2, stride=2)

    def forward(self, x):
        f2 = torch.relu(self.a(x))
        return [f2, torch.relu(self.b(f2))]


def random_features(channels, batch, grid2, grid3, generator, device="cpu"):
    """Backbone-like maps: rectified Gaussians, about half zeros, as after a ReLU."""
    f2 = torch.relu(torch.randn(batch, channels[0], *grid2, generator=generator) + 0.1)
    f3 = torch.relu(1.2 * torch.randn(batch, channels[1], *grid3, generator=generator))
    return [f2.to(device), f3.to(device)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN anywhere fails."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    return ((actual - expected).norm() / expected.norm()).item()


def cuda_available() -> bool:
    from simplenet_fast import build_info
    return torch.cuda.is_available() and build_info().get("cuda", False)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not cuda_available(), reason="needs a CUDA GPU and the CUDA build of simplenet_fast._C")]),
]


@pytest.fixture
def generator():
    """A fresh seed per test run: the fast paths must hold on any valid input, not one draw."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)
