"""Training recipes (simplenet_fast/recipes.py) and what fit guarantees under any recipe."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simplenet_fast import SimpleNet, SimpleNetHead
from simplenet_fast.recipes import RECIPES, RecipeTrainer, TrainingRecipe, resolve_recipe

T, HIDDEN = 24, 16


def head_and_embeddings(seed: int = 0, n: int = 64, spread: torch.Tensor | float = 1.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = SimpleNetHead(channels=(8, 16), pretrain_embed_dim=T, target_embed_dim=T, hidden=HIDDEN)
    embeddings = torch.randn(n, T, generator=g) * spread + 0.5
    return head.train(), embeddings


def trainer_for(recipe: TrainingRecipe, head, noise_std=0.5, margin=0.5, epochs=10, seed=1):
    return RecipeTrainer(recipe, head, noise_std, margin, epochs, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- text form
def test_spec_round_trips_and_paper_is_the_default():
    assert RECIPES["paper"] == TrainingRecipe() and TrainingRecipe().spec() == ""
    recipe = TrainingRecipe(noise="diagonal", levels=(0.5, 1, 2), loss="softplus", lr_scale=3,
                            lr_milestones=(0.8, 0.9), lr_gamma=0.5, adaptor_init="identity",
                            average=0.25, members=2, member_adaptor="shared")
    assert TrainingRecipe.parse(recipe.spec()) == recipe
    assert recipe.spec() == ("noise=diagonal,levels=0.5+1+2,loss=softplus,lr_scale=3,"
                             "lr_milestones=0.8+0.9,lr_gamma=0.5,adaptor_init=identity,"
                             "average=0.25,members=2,member_adaptor=shared")
    assert resolve_recipe("paper") == ("paper", RECIPES["paper"])
    assert resolve_recipe(TrainingRecipe()) == ("paper", RECIPES["paper"])  # registered: its name
    assert resolve_recipe("levels=1+2") == ("levels=1+2", TrainingRecipe(levels=(1, 2)))


@pytest.mark.parametrize("bad, match", [
    ("nonsense", "recipe must be one of"), ("noise=gaussian", "noise must be one of"),
    ("levels=0", "levels"), ("levels=1+nan", "levels"), ("levels=" + "+".join(["1"] * 9), "levels"),
    ("loss=l2", "loss must be"), ("lr_milestones=0.9+0.8", "increasing"),
    ("lr_milestones=1.5", "lr_milestones"), ("lr_gamma=0", "lr_gamma"), ("lr_scale=0", "lr_scale"),
    ("adaptor_init=zeros", "adaptor_init"), ("levels=a", "takes numbers"), ("depth=3", "key=value"),
    ("average=-0.1", "average"), ("average=1.5", "average"), ("average=nan", "average"),
    ("members=0", "members"), ("members=9", "members"), ("members=1.5", "takes numbers"),
    ("members=2,member_adaptor=mine", "member_adaptor must be"),
    ("member_adaptor=shared", "needs members > 1"),
])
def test_bad_recipes_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_recipe(bad)
    with pytest.raises(ValueError, match="recipe"):
        SimpleNet("efficientnet_lite0", weights=None, image_size=32, resize=32, recipe=bad)


def test_recipe_must_be_text_or_a_recipe():
    with pytest.raises(ValueError, match="TrainingRecipe"):
        resolve_recipe(3)


# ------------------------------------------------------------------------------- noise
def test_noise_scales_follow_the_adapted_features():
    spread = torch.linspace(0.1, 4.0, T)  # per-dimension stds of the features
    head, emb = head_and_embeddings(n=4096, spread=spread)
    t = head.adaptor(emb)
    std = t.detach().std(0)
    assert trainer_for(TrainingRecipe(), head, noise_std=0.3).noise_scale(t) == 0.3
    relative = trainer_for(TrainingRecipe(noise="relative"), head, noise_std=0.3).noise_scale(t)
    torch.testing.assert_close(relative, 0.3 * std.square().mean().sqrt())
    diagonal = trainer_for(TrainingRecipe(noise="diagonal"), head, noise_std=0.3).noise_scale(t)
    torch.testing.assert_close(diagonal, 0.3 * std)
    assert not relative.requires_grad and not diagonal.requires_grad  # no gradient through it


def test_relative_noise_does_not_depend_on_the_features_units():
    """Scaling the features by c scales a relative recipe's whole run by c: the same logits."""
    recipe = TrainingRecipe(noise="relative", levels=(0.5, 2))
    runs = []
    for c in (1.0, 100.0):
        head, emb = head_and_embeddings(seed=3)
        with torch.no_grad():  # the same maps in other units: adapted features c * t, read as t
            head.adaptor.bias *= c
            head.discriminator.linear.weight /= c
        trainer = trainer_for(recipe, head, noise_std=0.4)
        runs.append(trainer.step(emb * c).item())
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_every_level_is_one_fake_copy_seen_by_batchnorm_with_the_true_features():
    head, emb = head_and_embeddings()
    seen = []
    head.discriminator.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    trainer_for(TrainingRecipe(levels=(0.5, 1, 2)), head).step(emb)
    assert seen == [4 * len(emb)]


def step_then_by_hand(recipe: TrainingRecipe, head_seed: int, noise_seed: int, noise_std=0.3):
    """(loss of one trainer step, patches per copy, the discriminator's logits of the true
    features and of each level's fake copy recomputed by hand from the same initial weights and
    noise: level * noise_std * N(0, 1), drawn per level in order)."""
    head, emb = head_and_embeddings(seed=head_seed)
    init = {k: v.clone() for k, v in head.state_dict().items()}
    loss = trainer_for(recipe, head, noise_std=noise_std, seed=noise_seed).step(emb).item()
    head.load_state_dict(init)
    g = torch.Generator().manual_seed(noise_seed)
    t = head.adaptor(emb)
    fakes = [t + torch.randn(t.shape, generator=g) * (noise_std * level) for level in recipe.levels]
    return loss, len(t), head.discriminator(torch.cat([t, *fakes]))


def test_one_step_by_hand_softplus_several_levels():
    """Logistic loss; the fake term averaged over every copy."""
    loss, n, logits = step_then_by_hand(TrainingRecipe(levels=(0.5, 2.0), loss="softplus"), 5, 9)
    expected = F.softplus(-logits[:n]).mean() + (
        F.softplus(logits[n:2 * n]).mean() + F.softplus(logits[2 * n:]).mean()) / 2
    assert loss == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------- schedule, init
def test_learning_rates_drop_at_the_milestones():
    head, _ = head_and_embeddings()
    trainer = trainer_for(TrainingRecipe(lr_scale=2, lr_milestones=(0.5, 0.8), lr_gamma=0.1), head,
                          epochs=10)
    rates = []
    for _ in range(10):
        rates.append((trainer.adaptor_opt.param_groups[0]["lr"], trainer.disc_opt.param_groups[0]["lr"]))
        trainer.end_epoch()
    assert rates[:5] == [(2e-4, 4e-4)] * 5  # epochs 1-5: SPEC 2's rates times lr_scale
    assert rates[5:8] == [pytest.approx((2e-5, 4e-5))] * 3  # after epoch 5
    assert rates[8:] == [pytest.approx((2e-6, 4e-6))] * 2  # after epoch 8


def test_identity_adaptor_init():
    head, emb = head_and_embeddings()
    trainer_for(TrainingRecipe(adaptor_init="identity"), head)
    torch.testing.assert_close(head.adaptor(emb), emb, rtol=0, atol=0)


@pytest.mark.parametrize("average, epochs, averaged_epochs", [(0.5, 4, 2), (1, 3, 3), (0.01, 3, 1)])
def test_average_is_the_mean_of_the_weights_after_every_step_of_the_last_epochs(
        average, epochs, averaged_epochs):
    head, emb = head_and_embeddings()
    trainer = trainer_for(TrainingRecipe(average=average), head, epochs=epochs)
    after_steps = []  # [epoch][step] -> state
    for _ in range(epochs):
        after_steps.append([])
        for batch in emb.split(16):
            trainer.step(batch)
            after_steps[-1].append({k: v.clone() for k, v in head.state_dict().items()})
        trainer.end_epoch()
    last = {k: v.clone() for k, v in head.state_dict().items()}
    trainer.finish()
    kept = [s for epoch in after_steps[epochs - averaged_epochs:] for s in epoch]
    assert len(kept) == 4 * averaged_epochs
    for k, v in head.state_dict().items():
        if v.is_floating_point():  # weights and BatchNorm statistics alike
            torch.testing.assert_close(v, torch.stack([s[k] for s in kept]).mean(0), msg=k)
            assert not torch.equal(v, last[k]), k  # four or more steps differ from the last
        else:  # the step counter is the last step's
            assert torch.equal(v, last[k]), k


def test_no_average_keeps_the_last_steps_weights():
    head, emb = head_and_embeddings()
    trainer = trainer_for(TrainingRecipe(), head, epochs=2)
    for _ in range(2):
        trainer.step(emb)
        trainer.end_epoch()
    last = {k: v.clone() for k, v in head.state_dict().items()}
    trainer.finish()
    for k, v in head.state_dict().items():
        assert torch.equal(v, last[k]), k


@pytest.mark.parametrize("recipe", ["members=4", "members=2,average=0.5,noise=diagonal",
                                    "members=4,member_adaptor=shared",
                                    "members=2,member_adaptor=shared,average=0.5"])
def test_members_merge_into_one_head_whose_logit_is_their_mean(recipe):
    head, emb = head_and_embeddings()
    trainer = trainer_for(resolve_recipe(recipe)[1], head, epochs=2)
    assert len(trainer.members) == int(recipe[8]) and all(
        m.hidden == HIDDEN // len(trainer.members) for m in trainer.members)
    for _ in range(2):
        for batch in emb.split(32):
            trainer.step(batch)
        trainer.end_epoch()
    trainer.finish()
    assert head.hidden == HIDDEN and head.discriminator.bn.num_batches_tracked == 4
    for train in (False, True):  # BatchNorm's running and batch statistics alike
        head.train(train), trainer.members.train(train)
        with torch.no_grad():
            members = torch.stack([m.discriminator(m.adaptor(emb)) for m in trainer.members])
            torch.testing.assert_close(head.discriminator(head.adaptor(emb)), members.mean(0))
    # the members are not copies of one another: each has its own init and noise
    first, second = (m.discriminator.linear.weight for m in trainer.members[:2])
    assert not torch.allclose(first, second)


def test_shared_adaptor_members_run_one_adaptor_pass_and_train_the_heads_adaptor():
    head, emb = head_and_embeddings()
    start = head.adaptor.weight.detach().clone()
    trainer = trainer_for(resolve_recipe("members=4,member_adaptor=shared")[1], head, epochs=1)
    assert all(m.adaptor is head.adaptor for m in trainer.members)
    assert [p for group in trainer.adaptor_opt.param_groups for p in group["params"]] == list(
        head.adaptor.parameters())
    passes = []
    head.adaptor.register_forward_hook(lambda *_: passes.append(1))
    trainer.step(emb)
    assert len(passes) == 1
    trainer.end_epoch()
    trainer.finish()
    assert not torch.allclose(head.adaptor.weight, start)  # learnt, and kept by the merge
    assert not torch.allclose(head.adaptor.weight, torch.eye(T))


def test_members_must_divide_the_hidden_width():
    head, _ = head_and_embeddings()
    with pytest.raises(ValueError, match="members=3 must divide .* 16"):
        trainer_for(TrainingRecipe(members=3), head)


def test_the_paper_recipe_trains_the_head_itself():
    head, emb = head_and_embeddings()
    trainer = trainer_for(TrainingRecipe(), head)
    assert list(trainer.members) == [head]


# ------------------------------------------------------------------------------- through fit
@pytest.fixture(scope="module")
def lite() -> SimpleNet:
    torch.manual_seed(0)
    return SimpleNet("efficientnet_lite0", weights=None, image_size=32, resize=32,
                     pretrain_embed_dim=T, target_embed_dim=T, hidden=HIDDEN, recipe="paper")


def stripes(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 32)
    rows = [0.5 + 0.4 * torch.sin(12.566 * (ramp + 0.2 * torch.rand((), generator=g)))
            for _ in range(n)]
    return torch.stack([r[None].expand(3, 32, 32) for r in rows])


def test_fit_under_a_recipe_is_reproducible_and_saved(lite, tmp_path):
    lite.recipe = "noise=diagonal,levels=1+2,lr_milestones=0.5,members=2"
    try:
        images = stripes(6)
        h1 = lite.fit(images, epochs=3, batch_size=3, seed=4, progress=False)
        state = {k: v.clone() for k, v in lite.head.state_dict().items()}
        assert lite.fit(images, epochs=3, batch_size=3, seed=4, progress=False) == h1
        for k, v in lite.head.state_dict().items():
            assert torch.equal(v, state[k]), k
        lite.save(tmp_path / "m.pt")
        loaded = SimpleNet.load(tmp_path / "m.pt")
        assert loaded.recipe == "noise=diagonal,levels=1+2,lr_milestones=0.5,members=2"
        assert loaded.config == lite.config
    finally:
        lite.recipe = "paper"



def test_fit_keeps_the_averaged_weights(lite, monkeypatch):
    states = []
    step = SimpleNet._train_step

    def recorded(self, *args):
        loss = step(self, *args)
        states.append({k: v.clone() for k, v in self.head.state_dict().items()})
        return loss
    monkeypatch.setattr(SimpleNet, "_train_step", recorded)
    lite.recipe = "average=0.5"
    try:
        lite.fit(stripes(6), epochs=2, batch_size=3, seed=4, progress=False)  # 2 steps an epoch
    finally:
        lite.recipe = "paper"
    assert len(states) == 4
    for k, v in lite.head.state_dict().items():
        expected = torch.stack([s[k] for s in states[2:]]).float().mean(0) if v.is_floating_point() \
            else states[-1][k]
        torch.testing.assert_close(v, expected, msg=k)


def test_the_recipe_defaults_to_the_backbones_and_is_checked_when_set(lite):
    from simplenet_fast.backbones import default_config
    from simplenet_fast.backbones._base import BackboneDefaults

    assert default_config("wide_resnet50_2").recipe == "paper"
    lite0 = default_config("efficientnet_lite0")  # chosen on ELPV validation data (rule 2)
    assert (lite0.recipe, lite0.noise_std) == ("relative", 0.25)
    assert SimpleNet("efficientnet_lite0", weights=None).recipe == "relative"
    assert RECIPES["relative"] == TrainingRecipe.parse("noise=relative,lr_scale=3,lr_milestones=0.8+0.9")
    declared = default_config("efficientnet_lite0").overridden({"recipe": "noise=relative"})
    assert declared.recipe == "noise=relative"
    with pytest.raises(ValueError, match="noise must be one of"):
        default_config("efficientnet_lite0").overridden({"recipe": "noise=gaussian"})
    assert isinstance(declared, BackboneDefaults)
    backbone = torch.nn.Conv2d(3, 3, 1)  # never run: only its declared defaults are read
    backbone.defaults = {"recipe": "loss=softplus"}
    assert default_config(backbone).recipe == "loss=softplus"
    with pytest.raises(ValueError, match="recipe"):
        lite.recipe = "levels=0"
    assert lite.recipe == "paper"  # a rejected value leaves the recipe as it was
    lite.recipe = TrainingRecipe(noise="relative")
    try:
        assert lite.recipe == "noise=relative" and lite.config["recipe"] == "noise=relative"
    finally:
        lite.recipe = "paper"

def test_a_file_from_before_recipes_loads_as_paper(lite, tmp_path):
    lite.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["config"]["recipe"]
    torch.save(payload, tmp_path / "old.pt")
    assert SimpleNet.load(tmp_path / "old.pt").recipe == "paper"
    payload["config"]["recipe"] = 7
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="recipe"):
        SimpleNet.load(tmp_path / "bad.pt")


def test_diverged_training_raises_and_leaves_the_model_as_it_was(lite):
    images = stripes(4)
    lite.fit(images, epochs=1, batch_size=4, seed=0, progress=False)
    lite.image_threshold, lite.pixel_threshold = 1.5, 2.5
    before = {k: v.clone() for k, v in lite.head.state_dict().items()}
    lite.noise_std = 1e38  # noise overflows float32: the loss is NaN in the first epoch
    try:
        with pytest.raises(FloatingPointError, match="diverged.*epoch 1.*left as it was"):
            lite.fit(images, epochs=3, batch_size=2, seed=1, progress=False)
    finally:
        lite.noise_std = 0.5
    for k, v in lite.head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (lite.image_threshold, lite.pixel_threshold) == (1.5, 2.5)
    assert not lite.head.training and all(p.grad is None for p in lite.head.parameters())


def test_an_interrupted_fit_leaves_the_model_as_it_was(lite, monkeypatch):
    images = stripes(4)
    lite.fit(images, epochs=1, batch_size=4, seed=0, progress=False)
    before = {k: v.clone() for k, v in lite.head.state_dict().items()}
    calls = []

    def interrupt(embeddings, trainer):
        calls.append(trainer.step(embeddings))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return calls[-1]
    monkeypatch.setattr(lite, "_train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        lite.fit(images, epochs=2, batch_size=2, seed=1, progress=False)
    for k, v in lite.head.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_covariance_noise_has_the_features_covariance():
    """Many draws from one batch: mean 0 and the batch's covariance times noise_std^2; nothing
    outside the span of the centred features."""
    head, _ = head_and_embeddings()
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(3, T, generator=g)  # features in a 3-dimensional subspace
    t = torch.randn(512, 3, generator=g) @ basis + 1.0
    trainer = trainer_for(TrainingRecipe(noise="covariance"), head, noise_std=0.5)
    draws = torch.cat([trainer.unit_noise(t) for _ in range(200)]).double()
    centred = (t - t.mean(0)).double()
    expected = 0.25 * centred.T @ centred / len(t)
    torch.testing.assert_close(draws.mean(0), torch.zeros(T, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(draws.T @ draws / len(draws), expected, atol=0.05 * expected.abs().max(), rtol=0)
    off_span = draws - draws @ torch.linalg.pinv(basis.double()) @ basis.double()
    assert off_span.abs().max() < 1e-4


def test_hard_l1_averages_over_the_patches_that_violate_the_margin():
    loss, n, logits = step_then_by_hand(TrainingRecipe(loss="hard_l1"), 6, 2)
    true_excess, fake_excess = 0.5 - logits[:n], logits[n:] + 0.5
    assert 0 < int((true_excess > 0).sum()) < n  # some, not all, violate: the cases differ
    expected = true_excess[true_excess > 0].mean() + fake_excess[fake_excess > 0].mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
