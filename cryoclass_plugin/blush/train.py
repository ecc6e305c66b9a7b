"""Training of the Blush denoiser (:class:`.network.BlushUNet`), deterministic from a seed.

One run: build a pool of clean synthetic maps (:func:`.training_data.clean_map`, box
64 at the network's 3 A voxel size, 192 A), then for each step degrade two pool maps
(each turned by a random one of the 24 proper 90-degree rotations, and mirrored half of
the time) with :func:`.training_data.degrade` (20 % of them noise only: half a reconstruction
of nothing, half white noise; target zero), mask them as
:mod:`.denoise` masks maps (soft sphere of the structure's radius + 5 A with a 10 A
edge), standardise both input and target by the input's RMS inside the mask, cut four
random ``crop``^3 blocks of each, and take one Adam step (gradient norm clipped at
``GRAD_CLIP``) on the squared error relative to the identity's (:func:`identity_ratio`):
each block's mean squared error between the network's output and the target, over the
mean squared error of the block's input (the error of returning the input unchanged).
The ratio is 1 for the identity whatever the map, so that maps with little noise left
(high SSNR) and noise-only maps count alike: a loss in absolute units is dominated by the
noise-only maps, whose error is a hundred times larger, and the network then learns to
suppress rather than to denoise.  The learning rate decays from ``lr`` to
``lr / 10`` (cosine).  A fixed validation set (``n_validation`` degraded maps and half as
many noise-only ones, from ``seed + 1``) gives the ratio before and after training (the
untrained network is the identity: ratio 1).

Determinism: ``torch.manual_seed(seed)``, ``torch.use_deterministic_algorithms(True)``,
one thread (``torch.set_num_threads(1)``) and a ``numpy`` generator seeded by ``seed``;
the number of steps, not the time, ends the run.  Same seed, same torch build and CPU
-> the same weights.
"""
import dataclasses
import json
import time

import numpy as np
import torch

from .network import BlushUNet, NETWORK_APIX, n_parameters
from .resample import soft_sphere
from . import training_data

POOL_BOX = 64
MASK_EXTRA_A = 5.0
MASK_EDGE_A = 10.0
#: Floor of the identity's error in the loss's denominator, per crop or map (units of the
#: standardised input's power, 1 inside the mask): a crop the degradation left (almost)
#: exact must not divide by zero.
LOSS_FLOOR = 1e-7
#: Gradient norm clip (a few maps per step: one extreme pair must not throw the step).
GRAD_CLIP = 1.0


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    pool: int = 240
    crop: int = 40
    crops_per_map: int = 4
    maps_per_step: int = 2
    lr: float = 2e-3
    widths: tuple = (16, 32, 48)
    noise_only_fraction: float = 0.2
    n_validation: int = 16


def _rotations():
    """The 24 proper rotations of a cube as (axes swap, flips) applied to (z, y, x)."""
    mats = []
    for perm in ((0, 1, 2), (1, 2, 0), (2, 0, 1), (1, 0, 2), (0, 2, 1), (2, 1, 0)):
        for flips in range(8):
            signs = [(-1) ** ((flips >> i) & 1) for i in range(3)]
            m = np.zeros((3, 3))
            for i, j in enumerate(perm):
                m[i, j] = signs[i]
            if np.linalg.det(m) > 0:
                mats.append((perm, signs))
    return mats


ROTATIONS = _rotations()


def orient(vol, index, mirror):
    """``vol`` turned by the 90-degree rotation ``ROTATIONS[index]`` (about the voxel
    ``N // 2`` when N is even: flips map index i to N - i, so the centre moves by one
    voxel -- the network does not care), mirrored along z when ``mirror``."""
    perm, signs = ROTATIONS[index]
    out = np.transpose(vol, perm)
    for axis, s in enumerate(signs):
        if s < 0:
            out = np.flip(out, axis=axis)
    if mirror:
        out = np.flip(out, axis=0)
    return np.ascontiguousarray(out)


def make_pool(n, seed, box=POOL_BOX, apix=NETWORK_APIX):
    rng = np.random.default_rng(seed)
    return [training_data.clean_map(rng, box, apix) for _ in range(n)]


def _mask(box, radius_a, apix):
    return soft_sphere(box, (radius_a + MASK_EXTRA_A) / apix, MASK_EDGE_A / apix).numpy()


def training_example(clean, radius_a, rng, noise_only_fraction, apix=NETWORK_APIX):
    """One masked, standardised ``(input, target)`` pair (float32 maps of the pool box)."""
    vol = orient(clean, int(rng.integers(len(ROTATIONS))), bool(rng.integers(2)))
    signal = rng.uniform() >= noise_only_fraction
    degraded, target = training_data.degrade(vol, apix, rng, signal=signal)
    if not signal and rng.uniform() < 0.5:
        degraded = rng.normal(size=degraded.shape).astype(np.float32)   # white noise
    mask = _mask(vol.shape[0], radius_a, apix)
    scale = np.sqrt((mask * degraded.astype(np.float64) ** 2).sum() / mask.sum())
    x = (degraded * mask / scale).astype(np.float32)
    y = (target * mask / scale).astype(np.float32)
    return x, y


def identity_error(x, y):
    """The loss's scale for the pair ``(x, y)``: ``mean((x - y)^2)``, at least
    ``LOSS_FLOOR``."""
    return float(max(((x.astype(np.float64) - y) ** 2).mean(), LOSS_FLOOR))


def _crops(x, y, n, crop, rng):
    box = x.shape[0]
    xs, ys = [], []
    for _ in range(n):
        z0, y0, x0 = rng.integers(0, box - crop + 1, size=3)
        sl = (slice(z0, z0 + crop), slice(y0, y0 + crop), slice(x0, x0 + crop))
        xs.append(x[sl])
        ys.append(y[sl])
    return xs, ys


def validation_set(cfg, noise_only=False):
    """Fixed held-out pairs from ``seed + 1``: ``n_validation`` degraded maps, or (with
    ``noise_only``) half as many reconstructions of nothing and white-noise maps."""
    n = max(1, cfg.n_validation // 2) if noise_only else cfg.n_validation
    rng = np.random.default_rng(cfg.seed + 1 + (1000 if noise_only else 0))
    pool = make_pool(n, cfg.seed + 1)
    pairs = [training_example(c, r, rng, 1.0 if noise_only else 0.0) for c, r in pool]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
    y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
    return x, y, torch.tensor([identity_error(*p) for p in pairs])


def identity_ratio(out, y, scale):
    """Mean over maps (or blocks) of ``mean((out - y)^2) / scale``, ``scale`` being the
    error of the map's input itself: 1 for the identity, 0 for a perfect denoiser."""
    per_map = ((out - y) ** 2).mean(dim=(1, 2, 3, 4))
    return (per_map / scale).mean()


def evaluate(model, x, y, scale):
    with torch.no_grad():
        return float(identity_ratio(model(x), y, scale))


def train(cfg, log=print):
    """Train a network per ``cfg``; returns ``(model, report dict)``."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    pool = make_pool(cfg.pool, cfg.seed)
    val = validation_set(cfg)
    val_noise = validation_set(cfg, noise_only=True)
    model = BlushUNet(cfg.widths)
    loss_before = evaluate(model, *val)
    log(f"train-blush: pool of {cfg.pool} maps in {time.time() - t0:.0f} s; "
        f"{n_parameters(model)} parameters; validation error / identity's {loss_before:.4f}")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr / 10)
    t1 = time.time()
    running = []
    for step in range(cfg.steps):
        xs, ys, scales = [], [], []
        for _ in range(cfg.maps_per_step):
            clean, radius = pool[int(rng.integers(len(pool)))]
            x, y = training_example(clean, radius, rng, cfg.noise_only_fraction)
            cx, cy = _crops(x, y, cfg.crops_per_map, cfg.crop, rng)
            xs += cx
            ys += cy
            scales += [identity_error(a, b) for a, b in zip(cx, cy)]
        xb = torch.from_numpy(np.stack(xs)[:, None])
        yb = torch.from_numpy(np.stack(ys)[:, None])
        loss = identity_ratio(model(xb), yb, torch.tensor(scales))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log(f"train-blush: step {step + 1}/{cfg.steps} loss {np.mean(running[-50:]):.4f} "
                f"({time.time() - t1:.0f} s)")
    model.eval()
    report = {
        "seed": cfg.seed, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in dataclasses.asdict(cfg).items()},
        "n_parameters": n_parameters(model), "network_apix": NETWORK_APIX,
        "loss": "squared error / the identity's",
        "validation_ratio_before": loss_before, "validation_ratio_after": evaluate(model, *val),
        "validation_noise_only_ratio_after": evaluate(model, *val_noise),
        "train_loss_first50": float(np.mean(running[:50])),
        "train_loss_last50": float(np.mean(running[-50:])),
        "seconds_total": time.time() - t0, "seconds_training": time.time() - t1,
        "torch_version": torch.__version__,
    }
    log(f"train-blush: validation error / identity's {report['validation_ratio_after']:.4f} "
        f"(noise-only maps {report['validation_noise_only_ratio_after']:.4f}) after "
        f"{cfg.steps} steps ({report['seconds_total']:.0f} s in all)")
    return model, report


def save_weights(model, report, path):
    """Weights and metadata in one file that ``torch.load(weights_only=True)`` reads:
    tensors, plus the report as a JSON string."""
    torch.save({"state_dict": model.state_dict(), "widths": list(model.widths),
                "network_apix": NETWORK_APIX, "report_json": json.dumps(report)}, path)
