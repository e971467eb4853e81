"""Training time of recipes, as a ratio to the paper recipe's, measured in one run.

`fit`'s time is its training steps (the backbone runs once per image, whatever the recipe), so
this times `RecipeTrainer.step` on one batch of Lite0 embeddings (8 images x 28 x 28 patches,
T384, H256 by default), the recipes interleaved round by round so that every one sees the same
load, and reports each recipe's median step time over the paper's. The recipe selection rules
(bench/results/elpv_recipe_rule2.md, rule3.md) take their fit-time budgets from these ratios; the ELPV
selection logs' own fit times ran under different loads and are not comparable across stages.

    python bench/bench_recipe_step.py --recipes paper noise=relative,lr_scale=3 members=4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simplenet_fast import SimpleNetHead  # noqa: E402
from simplenet_fast.backbones import default_config  # noqa: E402
from simplenet_fast.recipes import RecipeTrainer, resolve_recipe  # noqa: E402


def main(argv=None) -> int:
    lite0 = default_config("efficientnet_lite0")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", required=True, help="recipe names or text forms")
    p.add_argument("--noise-std", type=float, default=lite0.noise_std)
    p.add_argument("--patches", type=int, default=8 * 28 * 28, help="patches per step")
    p.add_argument("--embed-dim", type=int, default=lite0.target_embed_dim)
    p.add_argument("--hidden", type=int, default=lite0.hidden)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="timed steps per recipe and round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write {recipe text form: ratio to the paper's} and the times "
                                 "to this .json (`elpv_benchmark.py --merge --step-times`)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipes = ["paper"] + [r for r in args.recipes if r != "paper"]
    embeddings = torch.randn(args.patches, args.embed_dim, generator=torch.Generator().manual_seed(0))
    trainers = {}
    for name in recipes:
        torch.manual_seed(0)
        head = SimpleNetHead(channels=(40, 112), pretrain_embed_dim=args.embed_dim,
                             target_embed_dim=args.embed_dim, hidden=args.hidden).train()
        trainer = RecipeTrainer(resolve_recipe(name)[1], head, args.noise_std, 0.5, epochs=2,
                                noise_generator=torch.Generator().manual_seed(1))
        trainer.end_epoch()  # in the averaged part of the schedule, where a step does the most
        trainer.step(embeddings)  # warm-up
        trainers[name] = trainer
    times = {name: [] for name in recipes}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(embeddings)
            times[name].append((time.perf_counter() - start) / args.steps)
    paper = statistics.median(times["paper"])
    print(f"{args.patches} patches per step, T{args.embed_dim} H{args.hidden}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load "
          f"{os.getloadavg()[0]:.2f}; median of {args.rounds} rounds x {args.steps} steps")
    ratios = {}
    for name in recipes:
        median = statistics.median(times[name])
        ratios[resolve_recipe(name)[0]] = median / paper
        print(f"  {name:60s} {median * 1e3:8.1f} ms/step  {median / paper:5.2f}x paper")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"ratio_to_paper": ratios, "seconds_per_step": times,
                       "argv": sys.argv[1:] if argv is None else list(argv),
                       "load": os.getloadavg()[0], "torch": torch.__version__}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
