"""``cryoclass train-blush``: train the Blush denoiser from synthetic maps (CPU, one
thread, deterministic from ``--seed``) and write its weights file.

The shipped weights (``cryoclass_plugin/blush/weights/``) come from this command with
the defaults; ``MODEL_CARD.md`` there gives the run's figures.  A run writes the weights
(``--out``) and the training report next to them (``<out>.json``).
"""
import json
import os

from ..engine.errors import CryoClassError


def add_args(parser):
    parser.add_argument("--out", required=True, help="weights file to write (.pt)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--steps", type=int, default=3000,
                        help="optimiser steps (default 3000, about 17 min on one CPU thread)")
    parser.add_argument("--pool", type=int, default=240,
                        help="number of clean synthetic maps to draw pairs from (default 240)")
    parser.add_argument("--crop", type=int, default=40,
                        help="training block size in voxels, a multiple of 8 (default 40)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")


def main(args):
    from ..blush.train import TrainConfig, train, save_weights
    if args.steps < 1 or args.pool < 1:
        raise CryoClassError("--steps and --pool must be >= 1")
    if args.crop % 8 or not 8 <= args.crop <= 64:
        raise CryoClassError(f"--crop {args.crop}: use a multiple of 8 between 8 and 64")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CryoClassError(f"--out {args.out}: folder {out_dir} does not exist")
    cfg = TrainConfig(seed=args.seed, steps=args.steps, pool=args.pool, crop=args.crop,
                      lr=args.lr)
    model, report = train(cfg, log=lambda m: print(m, flush=True))
    save_weights(model, report, args.out)
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"train-blush: wrote {args.out}")
    return 0
