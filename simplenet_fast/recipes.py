"""Training recipes: how the adaptor and discriminator learn from normal features.

A recipe says how fake features are made from the adapted training features, which loss and
which learning-rate schedule train the head, and how the adaptor starts. Inference never depends
on it: the trained head is scored by the same reference and fused paths (SPEC 1 and 4), whatever
recipe trained it.

- ``"paper"``: SPEC 2 exactly (Gaussian noise of the fixed std ``noise_std`` on every adapted
  feature, one fake copy, truncated L1 with ``margin``, constant learning rates). Its noise std is
  in the features' own units, so it must be tuned per backbone (0.015 for WideResNet-50-2).
- ``"relative"``: noise whose std is ``noise_std`` times the adapted features' spread, both
  learning rates x3 with a step decay (x0.4) after 80% and 90% of the epochs
  (``noise=relative,lr_scale=3,lr_milestones=0.8+0.9``). EfficientNet-Lite0's default (noise_std
  0.25), chosen on ELPV validation data (bench/RESULTS.md, "Training recipes").

A recipe is a `TrainingRecipe`; `SimpleNet(recipe=...)` takes a registered name (`RECIPES`), a
`TrainingRecipe`, or its text form (`TrainingRecipe.spec()`, e.g. ``"noise=diagonal,levels=1+2"``),
which is what a saved model stores.

Fields:
- ``noise``: how the fake features' noise is drawn, for a batch of adapted features ``t``
  ([N, T], treated as constants: no gradient flows through the noise scale):
  ``"absolute"``: N(0, noise_std^2) on every dimension (SPEC 2);
  ``"relative"``: N(0, (noise_std * s)^2) with s the root mean square over dimensions of the
  batch's per-dimension standard deviations (one scale for all dimensions);
  ``"diagonal"``: N(0, (noise_std * s_d)^2) per dimension d, s_d that dimension's std in the batch;
  ``"covariance"``: noise_std times a draw with the batch's own covariance: a sum of
  `COVARIANCE_DRAWS` randomly chosen centred features of the batch, each weighted by an N(0, 1)
  number, over sqrt(`COVARIANCE_DRAWS`). Lite0's patch features span few directions (64 of 384
  hold 90% of their variance): isotropic noise mostly leaves that subspace, where a fake is
  told apart by its distance from it alone; this noise stays in it, so the discriminator must
  learn where in it normal features lie.
  The relative kinds make ``noise_std`` a fraction of the features' spread, the same for every
  backbone, and stop the adaptor from making the noise look larger by shrinking the features.
- ``levels``: one fake copy of every patch per level, with noise std ``level * noise_std``; the
  fake term of the loss is the mean over all copies.
- ``loss``: ``"truncated_l1"`` (SPEC 2: ``relu(margin - true) + relu(fake + margin)`` on the
  logits, each term a mean over all patches), ``"hard_l1"`` (the same terms, each a mean over
  the patches that still violate the margin only: once most normal patches are learned, the
  rare normal patterns left keep their full weight instead of 1/N each) or ``"softplus"``
  (logistic loss, ``softplus(-true) + softplus(fake)``; never flat, so well-separated patches
  keep pulling; ``margin`` is unused).
- ``lr_scale``: both learning rates are SPEC 2's times this (a short schedule can learn as far
  as a long one at a higher rate).
- ``lr_milestones``, ``lr_gamma``: both learning rates are multiplied by ``lr_gamma`` after each
  milestone, given as a fraction of the epochs (SuperSimpleNet: 0.8 and 0.9, gamma 0.4).
- ``adaptor_init``: ``"xavier"`` (SPEC 2) or ``"identity"`` (the adaptor starts as the identity
  map, so training starts from the backbone's own feature geometry).
- ``average``: 0 (SPEC 2) keeps the weights of the last step; a fraction f in (0, 1] makes the
  trained head the mean of the head's weights and BatchNorm statistics after every step of the
  last f of the epochs (stochastic weight averaging, Izmailov et al. 2018). The last step's
  weights are one point of a noisy walk: on ELPV validation data, the paper recipe's image AUROC
  moves by 0.01-0.02 from one epoch to the next, more than the recipes being compared differ.
  The mean is still one head of the same shape, so inference is unchanged. (On ELPV it did not
  narrow the spread between training seeds: bench/RESULTS.md, "Training recipes".)
- ``members``: 1 (SPEC 2) trains the head itself; K > 1 trains K independent heads, each with
  its own adaptor, its own init and noise draws and a discriminator of hidden / K units, and
  makes the trained head their exact mean: an identity adaptor, the K first layers each composed
  with its member's adaptor (``W1_k A_k``, bias ``W1_k a_k + b1_k``) and stacked, the BatchNorm
  channels side by side, and the tail weights divided by K. The head keeps its shapes, so its
  fused scoring costs what it did (SPEC 4 folds the identity adaptor away), while its score is
  the mean of K heads' (an ensemble: seeds disagree less). Training costs about K adaptor
  passes per step.
- ``member_adaptor``: with ``members`` > 1, ``"own"`` gives each member its own adaptor (as
  above); ``"shared"`` trains one adaptor, the head's, under the K discriminators (each still
  with its own init, noise draws and loss): one adaptor pass per step instead of K (on Lite0's
  head under recipe "relative", K=4: 2.2x the paper recipe's step time instead of 2.9x; the K
  noise draws and fake copies remain). The merged head keeps the shared adaptor and stacks the K first layers as
  they are. (On ELPV its training seeds disagreed more than under one head: bench/RESULTS.md.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import SimpleNetHead

NOISE_KINDS = ("absolute", "relative", "diagonal", "covariance")
LOSSES = ("truncated_l1", "hard_l1", "softplus")
ADAPTOR_INITS = ("xavier", "identity")
MEMBER_ADAPTORS = ("own", "shared")

# SPEC 2: the official optimisers and learning rates.
ADAPTOR_LR, ADAPTOR_WEIGHT_DECAY = 1e-4, 0.01        # AdamW
DISCRIMINATOR_LR, DISCRIMINATOR_WEIGHT_DECAY = 2e-4, 1e-5  # Adam
MAX_LEVELS = 8  # fake copies per patch: each one is a discriminator pass over the whole batch
MAX_MEMBERS = 8  # independently trained heads averaged into one: each one is an adaptor pass
COVARIANCE_DRAWS = 4  # features summed per covariance-shaped noise vector


@dataclass(frozen=True)
class TrainingRecipe:
    """How the head is trained (module doc). The defaults are SPEC 2's."""

    noise: str = "absolute"
    levels: tuple[float, ...] = (1.0,)
    loss: str = "truncated_l1"
    lr_scale: float = 1.0
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.4
    adaptor_init: str = "xavier"
    average: float = 0.0
    members: int = 1
    member_adaptor: str = "own"

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        object.__setattr__(self, "lr_milestones", tuple(float(v) for v in self.lr_milestones))
        for name, value, known in (("noise", self.noise, NOISE_KINDS), ("loss", self.loss, LOSSES),
                                   ("adaptor_init", self.adaptor_init, ADAPTOR_INITS),
                                   ("member_adaptor", self.member_adaptor, MEMBER_ADAPTORS)):
            if value not in known:
                raise ValueError(f"recipe {name} must be one of {list(known)}, got {value!r}")
        if not 1 <= len(self.levels) <= MAX_LEVELS or not all(
                math.isfinite(v) and v > 0 for v in self.levels):
            raise ValueError(f"recipe levels must be 1..{MAX_LEVELS} positive finite noise "
                             f"multiples, got {self.levels}")
        if not all(0 < v < 1 for v in self.lr_milestones) or list(self.lr_milestones) != sorted(
                set(self.lr_milestones)):
            raise ValueError("recipe lr_milestones must be increasing fractions of the schedule in "
                             f"(0, 1), got {self.lr_milestones}")
        if not (isinstance(self.lr_gamma, (int, float)) and 0 < self.lr_gamma <= 1):
            raise ValueError(f"recipe lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        if not (isinstance(self.lr_scale, (int, float)) and 0 < self.lr_scale <= 100):
            raise ValueError(f"recipe lr_scale must be in (0, 100], got {self.lr_scale!r}")
        if not (isinstance(self.average, (int, float)) and 0 <= self.average <= 1):
            raise ValueError(f"recipe average must be a fraction of the schedule in [0, 1], got "
                             f"{self.average!r}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or not (
                1 <= self.members <= MAX_MEMBERS):
            raise ValueError(f"recipe members must be an int in 1..{MAX_MEMBERS}, got "
                             f"{self.members!r}")
        if self.member_adaptor == "shared" and self.members == 1:
            raise ValueError("recipe member_adaptor=shared needs members > 1 (one head has one "
                             "adaptor already)")

    @property
    def fake_copies(self) -> int:
        return len(self.levels)

    def spec(self) -> str:
        """The text form: the fields that differ from SPEC 2's, ``key=value`` joined by commas
        (tuples joined by '+'); "" for the paper's recipe. `parse(spec())` gives the recipe back."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                text = "+".join(f"{v:g}" for v in value) if isinstance(value, tuple) else (
                    f"{value:g}" if isinstance(value, float) else str(value))
                parts.append(f"{f.name}={text}")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> "TrainingRecipe":
        """A recipe from its text form (`spec`)."""
        recipe = cls()
        if not text:
            return recipe
        kinds = {f.name: f.default for f in fields(cls)}
        changes = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise ValueError(f"recipe {text!r}: {part!r} is not key=value with a key in "
                                 f"{sorted(kinds)}")
            default = kinds[key]
            try:
                if isinstance(default, tuple):
                    changes[key] = tuple(float(v) for v in value.split("+"))
                elif isinstance(default, float):
                    changes[key] = float(value)
                elif isinstance(default, int):
                    changes[key] = int(value)
                else:
                    changes[key] = value.strip()
            except ValueError:
                raise ValueError(f"recipe {text!r}: {key} takes numbers, got {value!r}") from None
        return replace(recipe, **changes)


RECIPES = {
    "paper": TrainingRecipe(),
    # EfficientNet-Lite0's default, chosen on ELPV validation data by the rule of
    # bench/results/elpv_recipe_rule2.md (with noise_std 0.25: a quarter of the features' spread).
    "relative": TrainingRecipe(noise="relative", lr_scale=3, lr_milestones=(0.8, 0.9)),
}


def resolve_recipe(recipe) -> tuple[str, TrainingRecipe]:
    """(stored name, recipe) of a registered name, a text form or a `TrainingRecipe`. The stored
    name is the registered name when the recipe is one, else its text form."""
    if isinstance(recipe, TrainingRecipe):
        found = recipe
    elif isinstance(recipe, str):
        found = RECIPES.get(recipe)
        if found is None:
            if "=" not in recipe:
                raise ValueError(f"recipe must be one of {sorted(RECIPES)}, a TrainingRecipe or "
                                 f"its text form ('noise=diagonal,levels=1+2'), got {recipe!r}")
            found = TrainingRecipe.parse(recipe)
    else:
        raise ValueError(f"recipe must be a name, a TrainingRecipe or its text form, got "
                         f"{type(recipe).__name__}")
    name = next((n for n, r in RECIPES.items() if r == found), None)
    return (name if name is not None else found.spec()), found


class RecipeTrainer:
    """The optimisers, schedule and training step of one `fit` under a recipe.

    `step(embeddings)` trains on every patch of one batch ([b, H2, W2, T] or [n, T] embeddings)
    and returns its loss (a 0-dim tensor); `end_epoch()` advances the learning-rate schedule;
    `finish()`, after the last epoch, gives the head its trained weights (the average's, the
    members' mean).
    """

    def __init__(self, recipe: TrainingRecipe, head, noise_std: float, margin: float, epochs: int,
                 noise_generator: torch.Generator):
        self.recipe, self.head = recipe, head
        self.noise_std, self.margin = float(noise_std), float(margin)
        self.noise_generator = noise_generator
        # The heads that learn: the head itself, or its members (module doc, ``members``).
        self.members = nn.ModuleList([head] if recipe.members == 1 else
                                     _new_members(head, recipe.members, noise_generator))
        if recipe.member_adaptor == "shared":
            for member in self.members:
                member.adaptor = head.adaptor
        # Each adaptor once, however many members share it.
        adaptors = list({id(m.adaptor): m.adaptor for m in self.members}.values())
        if recipe.adaptor_init == "identity":
            with torch.no_grad():
                for adaptor in adaptors:
                    adaptor.weight.copy_(torch.eye(head.target_embed_dim))
                    adaptor.bias.zero_()
        self.adaptor_opt = torch.optim.AdamW(
            [p for a in adaptors for p in a.parameters()],
            lr=ADAPTOR_LR * recipe.lr_scale, weight_decay=ADAPTOR_WEIGHT_DECAY)
        self.disc_opt = torch.optim.Adam(
            [p for m in self.members for p in m.discriminator.parameters()],
            lr=DISCRIMINATOR_LR * recipe.lr_scale, weight_decay=DISCRIMINATOR_WEIGHT_DECAY)
        # Epochs after which the rates drop; a milestone that rounds to 0 epochs never fires.
        self.drops = [round(f * epochs) for f in recipe.lr_milestones]
        self.epoch = 0
        # Steps of epochs from `average_from` on are averaged; at least the last epoch's when
        # averaging is asked for at all.
        self.average_from = (epochs - max(1, round(recipe.average * epochs))
                             if recipe.average else None)
        self.averaged: dict[str, Tensor] | None = None  # running means, by state_dict key
        self.averaged_steps = 0
        # The live weights and BatchNorm statistics (the optimisers and BatchNorm update them in
        # place), each once: a shared adaptor under its first member's name.
        self.live = {k: v.detach() for k, v in (*self.members.named_parameters(),
                                               *self.members.named_buffers())
                     if v.is_floating_point()}

    def end_epoch(self) -> None:
        self.epoch += 1
        for _ in range(self.drops.count(self.epoch)):
            for opt in (self.adaptor_opt, self.disc_opt):
                for group in opt.param_groups:
                    group["lr"] *= self.recipe.lr_gamma

    def noise_scale(self, true_feats: Tensor) -> Tensor | float:
        """The std of the unit-level Gaussian noise: a float, a 0-dim or a [T] tensor."""
        kind = self.recipe.noise
        if kind == "absolute":
            return self.noise_std
        spread = true_feats.detach().std(dim=0)  # [T]
        if kind == "relative":
            spread = spread.square().mean().sqrt()
        return self.noise_std * spread

    def unit_noise(self, true_feats: Tensor) -> Tensor:
        """One draw of the level-1 noise for every row of `true_feats` [N, T] (module doc)."""
        n, device, generator = len(true_feats), true_feats.device, self.noise_generator
        if self.recipe.noise == "covariance":
            centred = (true_feats - true_feats.mean(dim=0)).detach()
            pick = torch.randint(n, (COVARIANCE_DRAWS, n), generator=generator, device=device)
            weight = torch.randn(COVARIANCE_DRAWS, n, 1, generator=generator, device=device)
            return (weight * centred[pick]).sum(0) * (self.noise_std / math.sqrt(COVARIANCE_DRAWS))
        noise = torch.randn(true_feats.shape, generator=generator, device=device)
        return noise * self.noise_scale(true_feats)

    def discriminator_loss(self, discriminator, true_feats: Tensor) -> Tensor:
        """The loss of one discriminator (the head's, or one member's) on the adapted features
        of every patch of a batch, with fakes drawn for it."""
        recipe = self.recipe
        # level 1.0 adds the noise unscaled: exactly SPEC 2's numbers under "paper"
        fakes = [true_feats + self.unit_noise(true_feats) * level for level in recipe.levels]
        # BatchNorm in training mode sees the true features and every fake copy together (SPEC 2).
        logits = discriminator(torch.cat([true_feats, *fakes]))
        true_logits, fake_logits = logits[:len(true_feats)], logits[len(true_feats):]
        # Scores are minus the logits: true patches are pushed up, fakes down. With several copies
        # the fake term is the mean over all of them (each copy has as many patches as the batch).
        if recipe.loss == "truncated_l1":
            return F.relu(self.margin - true_logits).mean() + F.relu(fake_logits + self.margin).mean()
        if recipe.loss == "hard_l1":
            return _mean_of_violations(self.margin - true_logits) + _mean_of_violations(
                fake_logits + self.margin)
        return F.softplus(-true_logits).mean() + F.softplus(fake_logits).mean()

    def step(self, embeddings: Tensor) -> Tensor:
        """One optimiser step on every patch of a batch; returns the mean loss of the heads that
        learn. Members share no discriminator weight, so the gradient of their summed losses is
        each one's own; a shared adaptor gets the sum of theirs."""
        flat = embeddings.reshape(-1, self.head.target_embed_dim)
        adapted = {}  # one pass per adaptor, however many members share it
        loss = 0
        for member in self.members:
            if id(member.adaptor) not in adapted:
                adapted[id(member.adaptor)] = member.adaptor(flat)
            loss = loss + self.discriminator_loss(member.discriminator, adapted[id(member.adaptor)])
        self.adaptor_opt.zero_grad(set_to_none=True)
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.adaptor_opt.step()
        self.disc_opt.step()
        if self.average_from is not None and self.epoch >= self.average_from:
            self._accumulate()
        return loss / len(self.members)

    def _accumulate(self) -> None:
        """Adds the learning heads' current weights and BatchNorm statistics to the running mean
        (the step counter `num_batches_tracked` is kept as the last step leaves it)."""
        self.averaged_steps += 1
        with torch.no_grad():
            if self.averaged is None:
                self.averaged = {k: v.clone() for k, v in self.live.items()}
            else:
                for k, mean in self.averaged.items():
                    mean.lerp_(self.live[k], 1 / self.averaged_steps)

    def finish(self) -> None:
        """Gives the head its trained weights: the averaged ones (``average``), the members'
        mean (``members``); a no-op for a recipe with neither."""
        if self.averaged is not None:
            self.members.load_state_dict(self.averaged, strict=False)
        if self.recipe.members > 1:
            _merge_members(self.head, list(self.members))


def _new_members(head, count: int, generator: torch.Generator) -> list:
    """`count` heads like `head` with hidden / count units each, under the official init (SPEC 2)
    from a seed drawn from `generator`, on the head's device."""
    if head.hidden % count:
        raise ValueError(f"recipe members={count} must divide the discriminator's hidden width "
                         f"{head.hidden}")
    config = {**head.config(), "hidden": head.hidden // count}
    device = head.adaptor.weight.device
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [SimpleNetHead(**config).train().to(device) for _ in range(count)]


def _merge_members(head, members: list) -> None:
    """Writes the members' mean into `head` (module doc, ``members``): for every patch feature
    x, head's logit is the mean of the members' logits, in training and in eval mode."""
    with torch.no_grad():
        linears = [m.discriminator.linear for m in members]
        disc = head.discriminator
        if all(m.adaptor is head.adaptor for m in members):  # ``member_adaptor="shared"``
            disc.linear.weight.copy_(torch.cat([lin.weight for lin in linears]))
            disc.linear.bias.copy_(torch.cat([lin.bias for lin in linears]))
        else:
            pairs = list(zip(linears, (m.adaptor for m in members)))
            head.adaptor.weight.copy_(torch.eye(head.target_embed_dim))
            head.adaptor.bias.zero_()
            disc.linear.weight.copy_(torch.cat([lin.weight @ a.weight for lin, a in pairs]))
            disc.linear.bias.copy_(torch.cat([lin.weight @ a.bias + lin.bias for lin, a in pairs]))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(disc.bn, name).copy_(
                torch.cat([getattr(m.discriminator.bn, name) for m in members]))
        disc.bn.num_batches_tracked.copy_(members[0].discriminator.bn.num_batches_tracked)
        disc.tail.weight.copy_(torch.cat([m.discriminator.tail.weight for m in members], dim=1)
                               / len(members))


def _mean_of_violations(excess: Tensor) -> Tensor:
    """Mean of the positive entries (0 when there are none), differentiable in them."""
    violated = excess > 0
    return (excess * violated).sum() / violated.sum().clamp(min=1)


__all__ = ["TrainingRecipe", "RECIPES", "resolve_recipe", "RecipeTrainer"]
