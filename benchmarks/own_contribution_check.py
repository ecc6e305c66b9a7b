"""How much of a class map's fit to its particles is their own noise: a fixed-pose
classification below a resolution limit, scored against class maps that hold each
particle (as the engine's E-step does) or that leave it out.

    python benchmarks/own_contribution_check.py SET STATE [--poses true|run] [--init truth|random]

SET is a simulated set (``particles.star``, ``truth.star``, ``true_classNNN.mrc``, as
``bench_states`` writes it); STATE a ``run_itNNN_state.npz`` of a run on it, which gives
the noise spectrum, the signal spectrum (tau2, mean over classes) and, with ``--poses
run``, the poses.  Each iteration reconstructs the K class maps from the current
posteriors at the fixed poses (the M-step's sums, ``D / (W + 1 / (pad^3 T tau2))``),
masks them around the density of the true mean map, projects them at each particle's
pose and scores the particle below ``--res``:

* ``own``: against the maps as reconstructed (each holds the particle's own slice);
* ``left-out``: against the maps without the particle's own slice (its terms taken out
  of the sums at its trilinear corners; the mask scales the left-out part by its mean,
  the share of a projected ray that the mask keeps);
* ``left-out+variance``: the same, with the left-out maps' noise variance (the mask's
  mean square times ``sum w^2 / D`` over the corners) added to the noise in the
  likelihood, and its log-determinant.

Prints the ARI against the truth after each iteration and the final class sizes.  A
diagnostic, not a way to run data; docs/benchmarks.md ("Maps without the particle's own
contribution") gives its figures.
"""
import argparse
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_true_map_ceiling import start_on_set  # noqa: E402
from cryoclass_plugin.engine import projector as P  # noqa: E402
from cryoclass_plugin.engine.geometry import euler_to_matrix  # noqa: E402
from cryoclass_plugin.engine.metrics import adjusted_rand_index  # noqa: E402
from cryoclass_plugin.engine.mrc_io import read_map  # noqa: E402
from cryoclass_plugin.engine.particles import Pixels, prepare_block  # noqa: E402

PAD = 2
MODES = ("own", "left-out", "left-out+variance")


def density_mask(mean_map, threshold, dilation_px, edge_px=3.0):
    """Soft mask around ``mean_map``'s density: above ``threshold`` x its maximum after
    a 1.5-px Gaussian, dilated by ``dilation_px``, raised-cosine edge of ``edge_px``."""
    smooth = ndimage.gaussian_filter(mean_map, 1.5)
    dist = ndimage.distance_transform_edt(smooth <= threshold * smooth.max())
    edge = 0.5 + 0.5 * np.cos(np.pi * np.clip(dist - dilation_px, 0, edge_px) / edge_px)
    return np.where(dist <= dilation_px, 1.0, np.where(dist <= dilation_px + edge_px, edge, 0.0))


class FixedPoseClassifier:
    """The particles' transforms below the resolution limit at fixed poses, and the
    corners of their slices on the padded half grid."""

    def __init__(self, x, ctf, inv_sigma2, mats, pixels, box, shell, tau2, tau2_fudge, mask):
        self.x, self.c, self.isg = x, ctf, inv_sigma2
        self.mats, self.pixels, self.box, self.shell = mats, pixels, box, shell
        self.mask = mask
        self.f_own, self.f_var = float(mask.mean()), float((mask ** 2).mean())
        self.grid = P.HalfGrid(box, PAD, shell + 1)
        first, fx, fy, fz, self.sign = P._flipped_corners(
            mats, P._pixel_pairs(pixels.ky, pixels.kx), self.grid)
        self.corners = [(first + step, w) for step, w in
                        zip(P._corner_steps(self.grid), P._corner_weights(fx, fy, fz))]
        shells = P.BackProjector(box, PAD, np, max_shell=shell + 1).shells()
        prior = np.zeros(int(shells.max()) + 1)
        t = np.asarray(tau2[:prior.size], dtype=np.float64)
        prior[:t.size] = np.where(t > 0, 1 / (PAD ** 3 * tau2_fudge * np.maximum(t, 1e-300)), 0)
        self.prior = prior[shells]
        # The particle's values in the stored half grid's frame (conjugated where flipped).
        self.x_stored = np.where(self.sign > 0, x, np.conj(x))

    def sums(self, post):
        """Per class: the data sums and the regularised divisor on the half grid."""
        out = []
        for k in range(post.shape[1]):
            bp = P.BackProjector(self.box, PAD, np, max_shell=self.shell + 1)
            p = post[:, k:k + 1]
            bp.insert(self.mats, self.pixels.ky, self.pixels.kx,
                      (p * self.x * self.c * self.isg).astype(np.complex64),
                      (p * self.c * self.c * self.isg).astype(np.float32))
            out.append((bp.data.copy(), bp.weight + self.prior))
        return out

    def masked_projections(self, data, divisor):
        vol = P.half_grid_to_real((data / divisor).reshape(self.grid.shape), self.grid,
                                  gridding=False) * self.mask
        proj = P.Projector(vol.astype(np.float32), pad=PAD, gridding=False,
                           max_shell=self.shell + 1)
        return proj.project(self.mats, self.pixels.ky, self.pixels.kx).astype(np.complex128)

    def log_likelihoods(self, post, mode):
        """(n, K) log-likelihoods of every particle under every class map."""
        out = np.zeros(post.shape)
        for k, (data, divisor) in enumerate(self.sums(post)):
            own = np.zeros_like(self.x)
            var = np.zeros(self.x.shape)
            for index, w in self.corners:
                d, dv = data[index], divisor[index]
                if mode != "own":
                    share = w * post[:, k:k + 1] * self.c * self.isg
                    own += w * (d / dv - (d - share * self.x_stored) / (dv - share * self.c))
                    var += self.f_var * w * w / (dv - share * self.c)
            own = np.where(self.sign > 0, own, np.conj(own))
            proj = self.masked_projections(data, divisor) - self.f_own * own
            r2 = np.abs(self.x - self.c * proj) ** 2
            if mode == "left-out+variance":
                s2 = 1 / self.isg + self.c * self.c * var
                out[:, k] = -(0.5 * r2 / s2 + np.log(s2 * self.isg)).sum(axis=1)
            else:
                out[:, k] = -(0.5 * r2 * self.isg).sum(axis=1)
        return out

    def run(self, init, n_classes, mode, n_iter, labels):
        post = np.eye(n_classes)[init]
        history = []
        for _ in range(n_iter):
            scores = self.log_likelihoods(post, mode) + np.log(np.maximum(post.mean(0), 1e-6))
            scores -= scores.max(axis=1, keepdims=True)
            post = np.exp(scores)
            post /= post.sum(axis=1, keepdims=True)
            history.append(adjusted_rand_index(labels, post.argmax(axis=1)))
        return history, np.bincount(post.argmax(axis=1), minlength=n_classes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("state")
    p.add_argument("--poses", choices=("true", "run"), default="true")
    p.add_argument("--init", choices=("truth", "random"), default="truth")
    p.add_argument("--res", type=float, default=25.0, help="resolution limit (A; 25)")
    p.add_argument("--iter", type=int, default=10, help="iterations (10)")
    p.add_argument("--tau2-fudge", type=float, default=4.0, help="T (4)")
    p.add_argument("--mask-threshold", type=float, default=0.05,
                   help="mask level, fraction of the smoothed mean map's maximum (0.05)")
    p.add_argument("--mask-dilation", type=float, default=3.0, help="pixels (3)")
    p.add_argument("--seed", type=int, default=0, help="random start's seed (0)")
    a = p.parse_args(argv)
    model, r, truth = start_on_set(os.path.abspath(a.data), a.state, "own_contribution_")
    labels = truth["rlnClassNumber"].to_numpy() - 1
    n_classes = int(labels.max()) + 1
    if a.poses == "true":
        model.part_eulers = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
        model.part_origin_angst = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    shell = int(np.floor(model.box * model.apix / a.res))
    pixels = Pixels.within(model.box, shell, np)
    block, _, _ = prepare_block(r.ctx.settings, model, r.ctx.data, np.arange(labels.size),
                                pixels, np)
    maps = [read_map(f"true_class{k + 1:03d}.mrc")[0] for k in range(n_classes)]
    mask = density_mask(np.mean(maps, axis=0), a.mask_threshold, a.mask_dilation)
    clf = FixedPoseClassifier(
        block.images_f.astype(np.complex128), block.ctf.astype(np.float64),
        block.inv_sigma2.astype(np.float64),
        euler_to_matrix(*model.part_eulers.T).astype(np.float32), pixels, model.box, shell,
        model.tau2.mean(axis=0), a.tau2_fudge, mask)
    init = (labels.copy() if a.init == "truth"
            else np.random.default_rng(a.seed).integers(0, n_classes, labels.size))
    print(f"{labels.size} particles, {block.images_f.shape[1]} pixels below {a.res:g} A, "
          f"{a.poses} poses, start {a.init}; mask {clf.f_own:.3f} of the box")
    for mode in MODES:
        history, sizes = clf.run(init, n_classes, mode, a.iter, labels)
        print(f"{mode:18s} ARI " + " ".join(f"{h:.3f}" for h in history)
              + f"   sizes {sizes.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
