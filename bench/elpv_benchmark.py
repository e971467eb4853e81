"""ELPV solar-cell benchmark of SimpleNet on EfficientNet-Lite0 (SPEC.md section 7).

    python bench/elpv_benchmark.py --cell-type both --seeds 0 1 2            # the protocol
    python bench/elpv_benchmark.py --select --cell-type both --image-sizes 224 288 \\
        --crops crop whole --embed-dims 128 384 --hiddens 256 --noise-stds 0.5 1 2 \\
        --checkpoints 5 10 20                                               # choose a config
    python bench/elpv_benchmark.py --nearest-neighbour --cell-type mono --seeds 0  # NN baseline

Protocol (SPEC 7, `simplenet_fast.data.elpv_split`): per cell type, train on a seeded 70% of the
normal (p = 0) cells, test the other 30% against every cell with p >= 2/3; p = 1/3 is left out.
Image AUROC of `pred_score` (max patch score). Training is a fixed schedule: the weights after the
last epoch are scored, nothing is selected on the test set.

Selection (`--select`) never looks at a test cell. On the training side of seed `--val-seed`
(default 0) and per cell type, a fixed 30% of the training normals (permutation by
`np.random.default_rng(VAL_SPLIT_SEED)`) become validation normals and the model trains on the
other 70%. The validation defects are (a) the p = 1/3 cells of that type, which the protocol
never tests, and (b) a synthetic-defect copy of every validation normal (`synthetic_defects.py`:
cracks, cut-off regions, interrupted fingers, faint to obvious, anywhere on the cell). The p = 1/3
cells alone separated configurations weakly (most look normal: the annotators were unsure); the
synthetic copies are paired with their own originals, so they measure what the model sees of a
defect and not which cells happen to be darker. One training run per (geometry, embed dim,
hidden, noise) scores the validation set after each epoch in `--checkpoints` (the same weights a
fit of that many epochs gives: the schedule, shuffling and noise depend only on the seed). The
chosen config maximises the mean over the cell types of the AUROC of all validation defects
against the validation normals; among configs within `--tie` (0.005) of the best, the one with
the cheapest training wins. `--out` is rewritten after every run, so a stopped search keeps its
rows, and `--merge` redoes the choice over the rows of several staged searches.

Costs kept low: crops and backbone features of every cell of a type are computed once per
geometry (image size, resize mode) and shared by every config, seed and both scoring paths; `fit`'s
own per-fit embedding cache is filled from them (checked against `fit`'s own embedding on one
batch). Scoring from cached features is `_device_forward` without the backbone:
`head.patch_scores(...).amax((1, 2))`.
For the first seed the test set is also scored end to end with `model.score` on the 300x300
uint8 arrays (preprocessing, backbone, fused head, map; decode excluded), which checks that path
against the cached one and gives images/s.

Every run checks that the fused and reference heads give the same test AUROC within 0.001 (on the
seeds in `--reference-seeds`, default: the first).

The ELPV images are CC BY-NC-SA 4.0 (`pip install elpv-dataset`): evaluation only.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from simplenet_fast import SimpleNet
from simplenet_fast.backbones import build_backbone
from simplenet_fast.backbones import default_config
from simplenet_fast.data import _elpv_dataset, elpv_split
from simplenet_fast.metrics import image_auroc
from simplenet_fast.preprocess import normalise, preprocess_image

from synthetic_defects import defective_copies

VAL_SPLIT_SEED = 20230607  # fixed permutation of the training normals for validation
VAL_FRACTION = 0.3
SYNTHETIC_SEED = 20261128    # synthetic defects of the validation normals (+ cell-type index)
CELL_TYPES = ("mono", "poly")
AUROC_AGREEMENT = 1e-3     # fused vs reference test AUROC (the requirement)
FEATURE_BATCH = 8
TRAIN_BATCH = 8            # fit's batch size, the paper's
SCORE_BATCH = 16


# The configuration chosen on validation data (bench/RESULTS.md, "Accuracy on ELPV") is the
# library's declared default for this backbone; the defaults below read it from there, so the two
# cannot drift.
CHOSEN = default_config("efficientnet_lite0")


@dataclass(frozen=True)
class Config:
    image_size: int = CHOSEN.image_size[0]  # square: ELPV cells are 300x300
    embed_dim: int = CHOSEN.target_embed_dim  # pretrain_embed_dim = embed_dim unless given
    pretrain_dim: int = 0                     # 0: same as embed_dim
    hidden: int = CHOSEN.hidden
    noise_std: float = CHOSEN.noise_std
    epochs: int = CHOSEN.epochs
    # True: the paper's centre crop of the cell resized by 329/288; False: the whole cell resized
    # to image_size (no border cut off)
    crop: bool = CHOSEN.resize_mode == "crop"

    @property
    def resize_mode(self) -> str:
        return "crop" if self.crop else "whole"

    @property
    def pretrain(self) -> int:
        return self.pretrain_dim or self.embed_dim

    def label(self) -> str:
        p = f"/{self.pretrain}" if self.pretrain != self.embed_dim else ""
        view = "" if self.crop else " whole"
        return (f"{self.image_size}px{view} T{self.embed_dim}{p} H{self.hidden} "
                f"noise {self.noise_std:g} {self.epochs}ep")


# ---------------------------------------------------------------------------------- data
def backbone_features(raw: np.ndarray, image_size: int, resize_mode: str, backbone
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """(crops, layer-2 features, layer-3 features, preprocessing s, backbone s) of grey cells."""
    start = time.perf_counter()
    crops = torch.stack([preprocess_image(a, image_size, resize_mode=resize_mode) for a in raw])
    preprocess_s = time.perf_counter() - start
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    f2, f3 = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(crops), FEATURE_BATCH):
            # as SimpleNet._embed: normalise on the device, NCHW, float32
            a, b = backbone(normalise(crops[i:i + FEATURE_BATCH], mean, std).contiguous())
            f2.append(a.float())
            f3.append(b.float())
    backbone_s = time.perf_counter() - start
    # clone out of inference mode so that training code may index them freely
    return crops, torch.cat(f2).clone(), torch.cat(f3).clone(), preprocess_s, backbone_s


class CellFeatures:
    """Crops and frozen-backbone features of every cell of one type at one geometry, and of a
    synthetic-defect copy of every normal cell of that type (validation only)."""

    def __init__(self, cell_type: str, image_size: int, resize_mode: str, backbone, log=print,
                 synthetic: bool = False):
        images, probs, types = _elpv_dataset()
        self.cell_type, self.image_size = cell_type, image_size
        self.rows = np.flatnonzero(types == cell_type)
        self.position = {int(r): i for i, r in enumerate(self.rows)}
        self.probs = probs[self.rows]
        self.raw = images[self.rows]  # 300x300 uint8 grey, read-only
        self.crops, self.f2, self.f3, self.preprocess_s, self.backbone_s = backbone_features(
            self.raw, image_size, resize_mode, backbone)
        log(f"  features {cell_type} {image_size}px ({resize_mode}): {len(self.rows)} cells, "
            f"preprocessing {1e3 * self.preprocess_s / len(self.rows):.2f} ms/img, backbone "
            f"{1e3 * self.backbone_s / len(self.rows):.2f} ms/img (batch {FEATURE_BATCH})")
        if synthetic:
            normal = self.rows_with_probability(0)
            self.synthetic_position = {int(r): i for i, r in enumerate(normal)}
            copies, _ = defective_copies(self.raw[self.index(normal).numpy()],
                                         SYNTHETIC_SEED + CELL_TYPES.index(cell_type))
            _, self.synthetic_f2, self.synthetic_f3, _, _ = backbone_features(
                copies, image_size, resize_mode, backbone)

    def index(self, rows) -> torch.Tensor:
        return torch.tensor([self.position[int(r)] for r in rows], dtype=torch.long)

    def synthetic_index(self, rows) -> torch.Tensor:
        return torch.tensor([self.synthetic_position[int(r)] for r in rows], dtype=torch.long)

    def rows_with_probability(self, p: float) -> np.ndarray:
        return self.rows[np.abs(self.probs - p) < 1e-6]


@dataclass
class Validation:
    """The validation set of one cell type, from the training side of one seed (module doc):
    held-out training normals against their own synthetic-defect copies and the p = 1/3 cells."""
    f2: torch.Tensor
    f3: torch.Tensor
    labels: np.ndarray
    synthetic: np.ndarray  # True where the defect is synthetic

    def aurocs(self, scores: np.ndarray) -> dict:
        """AUROC of all defects, of the synthetic ones and of the p = 1/3 ones, each vs the normals."""
        normal = self.labels == 0
        synthetic = normal | self.synthetic
        p13 = normal | (self.labels == 1) & ~self.synthetic
        return {"val_auroc": image_auroc(self.labels, scores),
                "val_auroc_synthetic": image_auroc(self.labels[synthetic], scores[synthetic]),
                "val_auroc_p13": image_auroc(self.labels[p13], scores[p13])}


def validation_split(features: CellFeatures, train_rows: np.ndarray) -> tuple[np.ndarray, Validation]:
    """(fit rows, validation set) from the training side only (module doc)."""
    perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(train_rows.size)
    n_fit = round((1 - VAL_FRACTION) * train_rows.size)
    fit_rows = np.sort(train_rows[perm[:n_fit]])
    val_normal = features.index(np.sort(train_rows[perm[n_fit:]]))
    val_p13 = features.index(features.rows_with_probability(1 / 3))
    val_synthetic = features.synthetic_index(np.sort(train_rows[perm[n_fit:]]))
    f2 = torch.cat([features.f2[val_normal], features.f2[val_p13], features.synthetic_f2[val_synthetic]])
    f3 = torch.cat([features.f3[val_normal], features.f3[val_p13], features.synthetic_f3[val_synthetic]])
    sizes = (len(val_normal), len(val_p13), len(val_synthetic))
    labels = np.repeat(np.array([0, 1, 1]), sizes)
    synthetic = np.repeat(np.array([False, False, True]), sizes)
    return fit_rows, Validation(f2, f3, labels, synthetic)


# ---------------------------------------------------------------------------------- model
def make_model(cfg: Config, backbone) -> SimpleNet:
    return SimpleNet(backbone=backbone, image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                     pretrain_embed_dim=cfg.pretrain, target_embed_dim=cfg.embed_dim,
                     hidden=cfg.hidden, noise_std=cfg.noise_std)


def embeddings(model: SimpleNet, feats: CellFeatures, index: torch.Tensor) -> torch.Tensor:
    """`head.embed` of cached features: what `fit` caches for these images."""
    return embed_features(model, feats.f2[index], feats.f3[index])


def embed_features(model: SimpleNet, f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
    """`head.embed` of backbone features, [N, H2, W2, T], FEATURE_BATCH images at a time."""
    out = []
    with torch.no_grad():
        for i in range(0, len(f2), FEATURE_BATCH):
            out.append(model.head.embed([f2[i:i + FEATURE_BATCH], f3[i:i + FEATURE_BATCH]]))
    return torch.cat(out)


def image_scores(model: SimpleNet, f2: torch.Tensor, f3: torch.Tensor, fused: bool) -> np.ndarray:
    """pred_score of `_device_forward` from cached features: max of the raw patch scores."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(f2), SCORE_BATCH):
            out.append(model.head.patch_scores([f2[i:i + SCORE_BATCH], f3[i:i + SCORE_BATCH]],
                                               fused=fused).amax((1, 2)))
    return torch.cat(out).numpy()


def train(model: SimpleNet, feats: CellFeatures, rows: np.ndarray, epochs: int, seed: int,
          checkpoints: dict | None = None, check_embedding: bool = False) -> tuple[float, list[float]]:
    """`model.fit` on the crops of `rows`, its embedding cache filled from cached features.

    checkpoints: {epoch: callback(model)}, called with the head in eval mode when that epoch ends.
    Returns (fit seconds excluding checkpoint callbacks, loss history).
    """
    index = feats.index(rows)
    cache = embeddings(model, feats, index)
    if check_embedding:  # the cache must be what fit would compute itself
        own = model._embed(feats.crops[index[:FEATURE_BATCH]])
        err = float((own - cache[:FEATURE_BATCH]).abs().max())
        assert err < 1e-4, f"cached embeddings differ from fit's own by {err}"
    n = len(index)

    def embed_all(data, batch_size, budget):
        assert len(data) == n
        return cache

    # Instance attributes shadow SimpleNet's private methods for this model only (bench code:
    # keeps fit's exact schedule while sharing one backbone pass across configs and seeds).
    model._embed_all = embed_all
    spent = [0.0]
    if checkpoints:
        step, steps_per_epoch, count = model._train_step, math.ceil(n / TRAIN_BATCH), [0]

        def train_step(*args):
            loss = step(*args)
            count[0] += 1
            epoch, rest = divmod(count[0], steps_per_epoch)
            if rest == 0 and epoch in checkpoints:
                start = time.perf_counter()
                model.head.eval()
                checkpoints[epoch](model)
                model.head.train()
                spent[0] += time.perf_counter() - start
            return loss
        model._train_step = train_step
    # fit takes the 300x300 images and crops them itself (a crop passed again would be resized)
    images = list(feats.raw[index.numpy()])
    start = time.perf_counter()
    history = model.fit(images, epochs=epochs, batch_size=TRAIN_BATCH, seed=seed, progress=False,
                        feature_cache_bytes=1 << 40)
    seconds = time.perf_counter() - start - spent[0]
    del model._embed_all
    if checkpoints:
        del model._train_step
    return seconds, history


# ---------------------------------------------------------------------------------- modes
class Features:
    """CellFeatures per (cell type, geometry), one geometry held at a time."""

    def __init__(self, log, synthetic: bool = False):
        self.backbone = build_backbone("efficientnet_lite0")
        self.log = log
        self.synthetic = synthetic
        self.held: dict = {}

    def get(self, cell_type: str, cfg: Config) -> CellFeatures:
        geometry = (cfg.image_size, cfg.resize_mode)
        if (cell_type, geometry) not in self.held:
            for k in [k for k in self.held if k[1] != geometry]:
                del self.held[k]
            self.held[cell_type, geometry] = CellFeatures(cell_type, *geometry, self.backbone,
                                                          self.log, self.synthetic)
        return self.held[cell_type, geometry]


def run_select(args, cell_types, log) -> dict:
    grid = [Config(s, t, args.pretrain_dim, h, n, max(args.checkpoints), c)
            for s in args.image_sizes for c in args.crops for t in args.embed_dims
            for h in args.hiddens for n in args.noise_stds]
    feats = Features(log, synthetic=True)
    rows = []
    log(f"selection: {len(grid)} configs x {cell_types}, validation on the training side of seed "
        f"{args.val_seed}, checkpoints {args.checkpoints}")
    for cfg in grid:
        for ct in cell_types:
            f = feats.get(ct, cfg)
            fit_rows, val = validation_split(f, elpv_split(ct, args.val_seed).train_index)
            model = make_model(cfg, feats.backbone)
            results = {}

            def evaluate(m, epoch, results=results, val=val):
                results[epoch] = val.aurocs(image_scores(m, val.f2, val.f3, fused=True))
            checkpoints = {e: (lambda m, e=e: evaluate(m, e)) for e in args.checkpoints}
            seconds, history = train(model, f, fit_rows, cfg.epochs, args.val_seed, checkpoints)
            for e in args.checkpoints:
                rows.append({"cell_type": ct, **asdict(cfg), "epochs": e, **results[e],
                             "fit_s": seconds * e / cfg.epochs, "n_fit": len(fit_rows),
                             "n_val_normal": int((val.labels == 0).sum()),
                             "n_val_defect": int(val.labels.sum()), "loss": history[e - 1]})
            if args.out:  # after every run, so that a stopped search keeps what it measured
                write_results({"mode": "select", "rows": rows}, args.out)
            log(f"  {ct} {cfg.label().rsplit(' ', 1)[0]}: val AUROC (synthetic, p=1/3) "
                + ", ".join(f"{e}ep {r['val_auroc']:.4f} ({r['val_auroc_synthetic']:.3f}, "
                            f"{r['val_auroc_p13']:.3f})" for e, r in results.items())
                + f"  (fit {seconds:.0f} s for {cfg.epochs} epochs on {len(fit_rows)} cells)")
    return summarise_selection(rows, cell_types, args.tie, log)


def summarise_selection(rows: list[dict], cell_types: list[str], tie: float, log) -> dict:
    """Mean validation AUROC over the cell types per (config, epochs); the best mean wins, and
    among configs within `tie` of it the one with the cheapest training."""
    table: dict = {}
    for r in rows:
        key = (r["image_size"], r["embed_dim"], r["pretrain_dim"], r["hidden"], r["noise_std"],
               r["epochs"], r.get("crop", True) in (True, "True"))
        table.setdefault(key, {})[r["cell_type"]] = r
    summary = []
    for key, per in table.items():
        if not all(ct in per for ct in cell_types):
            continue
        summary.append({"config": Config(*key), "val": {ct: per[ct]["val_auroc"] for ct in cell_types},
                        "mean": statistics.fmean(per[ct]["val_auroc"] for ct in cell_types),
                        "fit_s": sum(per[ct]["fit_s"] for ct in cell_types)})
    best = max(s["mean"] for s in summary)
    eligible = [s for s in summary if s["mean"] >= best - tie]
    chosen = min(eligible, key=lambda s: s["fit_s"])
    log("")
    log(f"{'config':44s} " + " ".join(f"{ct:>7s}" for ct in cell_types) + "    mean   fit s")
    for s in sorted(summary, key=lambda s: -s["mean"]):
        mark = " <- chosen" if s is chosen else (" (tie)" if s in eligible else "")
        log(f"{s['config'].label():44s} " + " ".join(f"{s['val'][ct]:7.4f}" for ct in cell_types)
            + f"  {s['mean']:.4f}  {s['fit_s']:6.0f}{mark}")
    log(f"chosen (best mean validation AUROC {best:.4f}, cheapest within {tie}): "
        f"{chosen['config'].label()}")
    return {"mode": "select", "rows": rows, "chosen": asdict(chosen["config"]),
            "summary": [{**asdict(s["config"]), "val": s["val"], "mean": s["mean"], "fit_s": s["fit_s"]}
                        for s in summary]}


def run_merge(args, cell_types, log) -> dict:
    """Selection over the rows of several `--select --out` files (staged searches)."""
    rows = []
    for path in args.merge:
        with open(path) as fh:
            rows += json.load(fh)["rows"]
    log(f"merged {len(rows)} validation rows from {len(args.merge)} files")
    return summarise_selection(rows, cell_types, args.tie, log)


def nearest_neighbour_scores(memory: torch.Tensor, queries: torch.Tensor,
                             chunk: int = 1 << 15) -> np.ndarray:
    """Image scores of the nearest-neighbour baseline: per image, the largest distance of one of
    its patches ([N, H2, W2, T] queries) to the nearest memory patch ([M, T])."""
    out = []
    with torch.inference_mode():
        for image in queries:
            patches = image.reshape(-1, image.shape[-1])
            nearest = torch.full((len(patches),), math.inf)
            for block in memory.split(chunk):
                nearest = torch.minimum(nearest, torch.cdist(patches, block).amin(1))
            out.append(float(nearest.max()))
    return np.array(out)


def run_nearest_neighbour(args, cell_types, log) -> dict:
    """The PatchCore-style nearest-neighbour baseline of SPEC 7 on the features the SimpleNet head
    sees (`head.embed` of the chosen geometry and embed dims): memory = every patch of the
    training cells, or a seeded random `--nn-memory-fraction` of them (PatchCore's coreset is
    not reproduced: the exact memory is its upper bound). Scored on the validation set of
    `--val-seed` (as `--select`) and on the test set of every seed in `--seeds`."""
    cfg = Config(args.image_size, args.embed_dim, args.pretrain_dim, args.hidden, args.noise_std,
                 args.epochs, args.crop)
    feats = Features(log, synthetic=True)
    log(f"nearest neighbour on {cfg.label().split(' H')[0]} embeddings, memory fraction "
        f"{args.nn_memory_fraction:g}, validation of seed {args.val_seed}, test seeds {args.seeds}")
    model = make_model(cfg, feats.backbone)  # only its parameter-free head.embed is used

    def memory_of(f: CellFeatures, rows: np.ndarray, seed: int) -> torch.Tensor:
        memory = embeddings(model, f, f.index(rows)).flatten(0, 2)
        keep = round(args.nn_memory_fraction * len(memory))
        if keep < len(memory):
            memory = memory[torch.randperm(len(memory), generator=torch.Generator().manual_seed(seed))[:keep]]
        return memory

    rows = []
    for ct in cell_types:
        f = feats.get(ct, cfg)
        fit_rows, val = validation_split(f, elpv_split(ct, args.val_seed).train_index)
        start = time.perf_counter()
        scores = nearest_neighbour_scores(memory_of(f, fit_rows, args.val_seed),
                                          embed_features(model, val.f2, val.f3))
        aurocs = val.aurocs(scores)
        rows.append({"cell_type": ct, "split": "validation", "seed": args.val_seed, **aurocs,
                     "memory_fraction": args.nn_memory_fraction, "seconds": time.perf_counter() - start})
        log(f"  {ct} validation: AUROC {aurocs['val_auroc']:.4f} (synthetic "
            f"{aurocs['val_auroc_synthetic']:.4f}, p=1/3 {aurocs['val_auroc_p13']:.4f})")
        for seed in args.seeds:
            split = elpv_split(ct, seed)
            start = time.perf_counter()
            scores = nearest_neighbour_scores(memory_of(f, split.train_index, seed),
                                              embeddings(model, f, f.index(split.test_index)))
            rows.append({"cell_type": ct, "split": "test", "seed": seed,
                         "auroc": image_auroc(split.test_labels, scores),
                         "memory_fraction": args.nn_memory_fraction,
                         "seconds": time.perf_counter() - start})
            log(f"  {ct} test seed {seed}: AUROC {rows[-1]['auroc']:.4f}")
    return {"mode": "nearest_neighbour", "config": asdict(cfg), "rows": rows}


def run_protocol(args, cell_types, log) -> dict:
    cfg = Config(args.image_size, args.embed_dim, args.pretrain_dim, args.hidden, args.noise_std,
                 args.epochs, args.crop)
    feats = Features(log)
    log(f"protocol: {cfg.label()}, seeds {args.seeds}, {cell_types}")
    rows = []
    for ct in cell_types:
        f = feats.get(ct, cfg)
        for k, seed in enumerate(args.seeds):
            split = elpv_split(ct, seed)
            model = make_model(cfg, feats.backbone)
            seconds, history = train(model, f, split.train_index, cfg.epochs, seed,
                                     check_embedding=k == 0)
            test_index = f.index(split.test_index)
            fused = image_scores(model, f.f2[test_index], f.f3[test_index], fused=True)
            row = {"cell_type": ct, "seed": seed, **asdict(cfg), "n_train": len(split.train_index),
                   "n_test_normal": int((split.test_labels == 0).sum()),
                   "n_test_defect": int(split.test_labels.sum()),
                   "auroc": image_auroc(split.test_labels, fused), "fit_s": seconds,
                   "final_loss": history[-1] if history else None}
            if seed in args.reference_seeds or (not args.reference_seeds and k == 0):
                reference = image_scores(model, f.f2[test_index], f.f3[test_index], fused=False)
                row["auroc_reference"] = image_auroc(split.test_labels, reference)
                row["auroc_diff"] = abs(row["auroc"] - row["auroc_reference"])
                row["max_score_diff"] = float(np.abs(fused - reference).max())
                assert row["auroc_diff"] <= AUROC_AGREEMENT, row
            if k == 0 and args.end_to_end:
                raw = [a for a in f.raw[test_index.numpy()]]
                model.score(raw[:8], batch_size=8)  # warm-up (fold cache, allocator)
                start = time.perf_counter()
                result = model.score(raw, batch_size=8, fused=True)
                e2e = time.perf_counter() - start
                row["e2e_images_per_s"] = len(raw) / e2e
                row["e2e_max_score_diff"] = float(np.abs(result.pred_score.numpy() - fused).max())
                row["e2e_auroc"] = image_auroc(split.test_labels, result.pred_score.numpy())
            rows.append(row)
            extra = ""
            if "auroc_reference" in row:
                extra += f", reference {row['auroc_reference']:.4f} (diff {row['auroc_diff']:.1e})"
            if "e2e_images_per_s" in row:
                extra += (f", model.score {row['e2e_images_per_s']:.1f} img/s (score diff "
                          f"{row['e2e_max_score_diff']:.1e})")
            log(f"  {ct} seed {seed}: AUROC {row['auroc']:.4f}{extra}, fit {seconds:.0f} s")
    log("")
    log(f"{'cell':5s} {'AUROC mean':>10s} {'std':>7s}  per seed{'':14s} {'fit s':>6s}  "
        f"{'|fused-ref|':>11s}  {'e2e img/s':>9s}")
    summary = {}
    for ct in cell_types:
        rs = [r for r in rows if r["cell_type"] == ct]
        a = [r["auroc"] for r in rs]
        summary[ct] = {"mean": statistics.fmean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0,
                       "per_seed": a, "fit_s": statistics.fmean(r["fit_s"] for r in rs),
                       "max_auroc_diff": max((r.get("auroc_diff", 0.0) for r in rs), default=0.0)}
        e2e = [r["e2e_images_per_s"] for r in rs if "e2e_images_per_s" in r]
        log(f"{ct:5s} {summary[ct]['mean']:10.4f} {summary[ct]['std']:7.4f}  "
            + " ".join(f"{x:.4f}" for x in a).ljust(22)
            + f" {summary[ct]['fit_s']:6.0f}  {summary[ct]['max_auroc_diff']:11.1e}  "
            + (f"{e2e[0]:9.1f}" if e2e else f"{'-':>9s}"))
    return {"mode": "protocol", "config": asdict(cfg), "rows": rows, "summary": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell-type", choices=["mono", "poly", "both"], default="both")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--image-size", type=int, default=Config.image_size)
    p.add_argument("--embed-dim", type=int, default=Config.embed_dim,
                   help="target_embed_dim (and pretrain_embed_dim unless --pretrain-dim)")
    p.add_argument("--pretrain-dim", type=int, default=0)
    p.add_argument("--hidden", type=int, default=Config.hidden)
    p.add_argument("--crop", dest="crop", action="store_true", default=Config.crop,
                   help="the paper's resize-then-centre-crop instead of resizing the whole cell")
    p.add_argument("--noise-std", type=float, default=Config.noise_std)
    p.add_argument("--reference-seeds", type=int, nargs="*", default=None,
                   help="seeds whose test set is also scored by the reference head (default: first)")
    p.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                   help="skip the model.score pass over the first seed's test set")
    p.add_argument("--select", action="store_true", help="validation-based selection (module doc)")
    p.add_argument("--val-seed", type=int, default=0)
    p.add_argument("--image-sizes", type=int, nargs="+", default=[288])
    p.add_argument("--embed-dims", type=int, nargs="+", default=[128])
    p.add_argument("--crops", type=lambda v: {"crop": True, "whole": False}[v], nargs="+",
                   default=[True], metavar="{crop,whole}",
                   help="crop: the paper's resize-then-centre-crop; whole: resize the whole cell")
    p.add_argument("--hiddens", type=int, nargs="+", default=[128])
    p.add_argument("--noise-stds", type=float, nargs="+", default=[0.015])
    p.add_argument("--checkpoints", type=int, nargs="+", default=[10, 20])
    p.add_argument("--tie", type=float, default=0.005)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="redo the selection over the rows of earlier --select --out files")
    p.add_argument("--nearest-neighbour", action="store_true",
                   help="the nearest-neighbour baseline on the same embeddings (run_nearest_neighbour)")
    p.add_argument("--nn-memory-fraction", type=float, default=1.0,
                   help="seeded random fraction of the training patches kept as memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write results to this .json (and a .csv beside it)")
    args = p.parse_args(argv)
    if not args.seeds and not (args.select or args.merge or args.nearest_neighbour):
        p.error("the protocol needs at least one seed")
    if not 0 < args.nn_memory_fraction <= 1:
        p.error(f"--nn-memory-fraction must be in (0, 1], got {args.nn_memory_fraction}")
    if args.reference_seeds is None:
        args.reference_seeds = []
    torch.set_num_threads(args.threads)
    cell_types = ["mono", "poly"] if args.cell_type == "both" else [args.cell_type]

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    if args.merge:
        result = run_merge(args, cell_types, log)
    elif args.select:
        result = run_select(args, cell_types, log)
    elif args.nearest_neighbour:
        result = run_nearest_neighbour(args, cell_types, log)
    else:
        result = run_protocol(args, cell_types, log)
    result["wall_s"] = time.perf_counter() - start
    result["argv"] = sys.argv[1:] if argv is None else list(argv)
    result["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    log(f"wall {result['wall_s']:.0f} s")
    if args.out:
        write_results(result, args.out)
    return 0


def write_results(result: dict, path: str) -> None:
    """`path` (.json) and its rows as a .csv beside it."""
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    with open(os.path.splitext(path)[0] + ".csv", "w", newline="") as fh:
        keys = sorted({k for r in result["rows"] for k in r})
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result["rows"])


if __name__ == "__main__":
    raise SystemExit(main())
