"""The SPEC 4 algebra: composed pooling plans, the BN/adaptor fold, and its cache."""
import pytest
import torch
import torch.nn.functional as F

from conftest import official_case, random_features, randomize_head, relative_error
from simplenet_fast import SimpleNetHead
from simplenet_fast._fold import adaptive_pool_matrix, fold_head, folded_patch_scores_torch, pooling_plans


@pytest.mark.parametrize("length,out", [(4608, 1536), (216, 100), (360, 100), (200, 70), (7, 3), (5, 9)])
def test_adaptive_pool_matrix_is_torchs_adaptive_avg_pool1d(length, out):
    x = torch.randn(3, length, dtype=torch.float64)
    expected = F.adaptive_avg_pool1d(x[:, None], out)[:, 0]
    torch.testing.assert_close(x @ adaptive_pool_matrix(length, out).T, expected)


@pytest.mark.parametrize("channels,pretrain,target", [
    ((512, 1024), 1536, 1536),   # paper: blocks of 6 and 12
    ((24, 40), 100, 70),         # official case_odd: overlapping, unequal windows
    ((24, 40), 100, 71),         # odd target: one window straddles both layers
    ((5, 7), 9, 5),              # tiny and odd everywhere
])
def test_pooling_plans_reproduce_the_two_stage_pooling(channels, pretrain, target):
    """pool2(u2) and pool3(u3) scattered onto target dims equal SPEC 1.5 + 1.6 done literally."""
    u2 = torch.randn(4, channels[0] * 9, dtype=torch.float64)
    u3 = torch.randn(4, channels[1] * 9, dtype=torch.float64)
    stacked = torch.cat([F.adaptive_avg_pool1d(u[:, None], pretrain)[:, 0] for u in (u2, u3)], dim=1)
    expected = F.adaptive_avg_pool1d(stacked[:, None], target)[:, 0]
    actual = torch.zeros_like(expected)
    for plan, u in zip(pooling_plans(channels, pretrain, target), (u2, u3)):
        pooled = (u[:, plan.index.long()] * plan.weight.double()).sum(-1)   # [4, columns]
        actual.index_add_(1, plan.target_dims, pooled)
    torch.testing.assert_close(actual, expected)


def test_straddling_dim_gets_a_column_in_each_layer():
    plan2, plan3 = pooling_plans((24, 40), 100, 71)
    shared = set(plan2.target_dims.tolist()) & set(plan3.target_dims.tolist())
    assert shared == {35}
    assert plan2.columns + plan3.columns == 72


def test_paper_plans_are_blocks_of_6_and_12():
    plan2, plan3 = pooling_plans((512, 1024), 1536, 1536)
    assert (plan2.columns, plan2.width, plan3.columns, plan3.width) == (768, 6, 768, 12)
    torch.testing.assert_close(plan2.index[5], torch.arange(30, 36, dtype=torch.int32))
    torch.testing.assert_close(plan3.weight, torch.full((768, 12), 1 / 12))


@pytest.mark.parametrize("config,grid2,grid3", [
    (dict(channels=(24, 40), pretrain_embed_dim=100, target_embed_dim=71, hidden=48), (10, 12), (5, 6)),
    (dict(channels=(16, 32), pretrain_embed_dim=64, target_embed_dim=64, hidden=40), (35, 37), (18, 19)),
])
def test_torch_fold_matches_reference(config, grid2, grid3, generator):
    head = randomize_head(SimpleNetHead(**config), generator)
    features = random_features(head.channels, 3, grid2, grid3, generator)
    with torch.no_grad():
        expected = head.reference_patch_scores(features)
        actual = folded_patch_scores_torch(head.folded(), *features)
    assert relative_error(actual, expected) < 1e-5


def test_fold_cache_follows_weight_changes(generator):
    head = randomize_head(SimpleNetHead((8, 8), 16, 16, 12), generator)
    first = head.folded()
    assert head.folded() is first                      # cached while nothing changes
    optimiser = torch.optim.SGD(head.parameters(), lr=0.1)
    head.adaptor.weight.grad = torch.randn_like(head.adaptor.weight)
    optimiser.step()
    second = head.folded()
    assert second is not first
    assert not torch.equal(second.weight2, first.weight2)
    head.load_state_dict(SimpleNetHead((8, 8), 16, 16, 12).state_dict())
    third = head.folded()
    assert third is not second
    torch.testing.assert_close(third.bias, fold_head(head).bias)
    with torch.no_grad():
        head.discriminator.bn.running_var.mul_(2)       # a buffer change counts too
    assert head.folded() is not third


def test_fold_cache_follows_official_state_dict():
    head, features, _ = official_case("case_odd")
    before = head.folded()
    fresh = SimpleNetHead(head.channels, head.pretrain_embed_dim, head.target_embed_dim, head.hidden)
    fresh.eval().folded()
    official, _, _ = official_case("case_odd")
    checkpoint = {
        "pre_projection": {"layers.0fc.weight": official.adaptor.weight, "layers.0fc.bias": official.adaptor.bias},
        "discriminator": {
            "body.block1.0.weight": official.discriminator.linear.weight,
            "body.block1.0.bias": official.discriminator.linear.bias,
            "body.block1.1.weight": official.discriminator.bn.weight,
            "body.block1.1.bias": official.discriminator.bn.bias,
            "body.block1.1.running_mean": official.discriminator.bn.running_mean,
            "body.block1.1.running_var": official.discriminator.bn.running_var,
            "body.block1.1.num_batches_tracked": official.discriminator.bn.num_batches_tracked,
            "tail.weight": official.discriminator.tail.weight,
        },
    }
    fresh.load_official_state_dict(checkpoint)
    torch.testing.assert_close(fresh.folded().weight2, before.weight2)
