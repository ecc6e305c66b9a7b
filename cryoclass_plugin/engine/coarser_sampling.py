"""``--allow_coarser_sampling``: RELION's coarser angular and offset sampling in a
classification's early iterations, while the poses cannot yet be told apart as finely
as the sampling the run asks for.

Expected accuracy (RELION's expected angular and translational errors, in the terms of
this engine's score).  For up to :data:`N_TRIALS` particles of the iteration (their CTF,
intensity scale and noise spectrum) and one random pose each, the smallest rotation
(about a random axis) and the smallest shift (in a random direction) on the ladder
:func:`error_ladder` that move a class's projection far enough for the E-step to tell:
``0.5 sum_pixels CTF^2 |V(A) - V(A')|^2 / sigma2 > ln 100`` over the current image's
pixels, i.e. the moved pose is 100 times less likely (RELION's threshold, ``-ln 0.01``).
A trial that never gets there counts as the ladder's last value (35 deg, 12 px).  A
class's accuracy is the mean over the trials; the run's, the smallest over the classes
the iteration searches whose prior is at least 0.01 (all of them when none is).

Sampling from the accuracies (RELION's rule, safety factor 0.8; ``os`` the
oversampling):

- HEALPix order: the coarsest order ``h`` between 0 and the plan's whose fine angular
  step ``360 / (6 2^(h + os))`` is below ``0.8 acc_rot``; the plan's own order when none
  is coarser.  In a cross-correlation iteration (``--firstiter_cc``) no accuracy is
  estimated and the target is the angle that moves the particle's edge by one
  resolution element of the current image, ``360 / ceil(pi D / res)`` (D the mask
  diameter, res the E-step resolution, both A).
- Offset step (pixels): ``0.8 acc_trans 2^os``, at most ``0.95 --offset_range``, never
  finer than ``--offset_step`` (without an estimate, the cross-correlation iteration:
  the largest allowed step).

The rule is applied again in every iteration from the plan's own sampling, so the
sampling returns to the one asked for as the maps improve.  Fixed-pose iterations are
left alone.
"""
import math
from dataclasses import replace

import numpy as np
from scipy.spatial.transform import Rotation

from .backend import to_numpy

#: Particles (with one random pose each) per class in the accuracy estimate (RELION
#: uses 100 for 3D references and 2D images).
N_TRIALS = 100
#: Trials projected together (bounds the (trials, ladder, pixels) temporaries: 10 x 41
#: x 35,000 pixels of a 150 px current size ~ 115 MB of complex64).
TRIALS_PER_CHUNK = 10
#: The angle ladder is first scored at every LADDER_STRIDE-th value, then inside the
#: interval of the first crossing (14 projections per trial instead of 41).
LADDER_STRIDE = 4
#: The score difference that makes a moved pose 100 times less likely.
THRESHOLD = math.log(100.0)
#: Classes with a smaller prior do not decide the run's accuracy (RELION's 0.01).
MIN_CLASS_PRIOR = 0.01
#: RELION's safety factor between the expected accuracy and the fine sampling step.
SAFETY = 0.8
#: Largest offset step as a fraction of ``--offset_range`` (keeps moves in the grid).
MAX_STEP_OF_RANGE = 0.95
#: Limits of the error ladders: angles (deg) and shifts (px); a trial that has not
#: reached the threshold when the ladder passes its limit stops at the next value.
ANGLE_LIMIT_DEG = 30.0
SHIFT_LIMIT_PX = 10.0


def error_ladder(limit):
    """The errors tried, increasing, in steps that grow with the error: 0.05 below
    0.2, 0.1 below 1, 0.2 below 2, 0.5 below 5, 1 below 10, 2 below 20, then 5; the
    last value is the first beyond ``limit``."""
    steps = ((0.2, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0), (20.0, 2.0))
    values, x = [], 0.0
    while x <= limit:
        x = round(x + next((s for edge, s in steps if x < edge - 1e-9), 5.0), 6)
        values.append(x)
    return np.array(values)


def _axis_angle_matrices(axes, angles_deg):
    """(n, m, 3, 3) rotations by ``angles_deg`` (n, m) about the unit ``axes`` (n, 3),
    row by row."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, :, None, None]
    u = axes[:, None, :]
    cross = np.zeros(axes.shape[:1] + (3, 3))
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
    cross[:, 1, 0], cross[:, 2, 0], cross[:, 2, 1] = axes[:, 2], -axes[:, 1], axes[:, 0]
    outer = u[..., :, None] * u[..., None, :]
    eye = np.eye(3)[None, None]
    return (np.cos(a) * eye + np.sin(a) * cross[:, None] + (1 - np.cos(a)) * outer)


def _rotation_scores(projector, poses, axes, angles_deg, here, weight, ky, kx):
    """(n, m) score differences of each trial's pose turned by its ``angles_deg`` (n, m)
    about its axis, against the unturned projections ``here`` (n, pixels)."""
    xp = projector.xp
    n, m = angles_deg.shape
    moves = np.einsum("tlij,tjk->tlik", _axis_angle_matrices(axes, angles_deg), poses)
    scores = np.empty((n, m))
    for t0 in range(0, n, TRIALS_PER_CHUNK):       # (chunk, m, pixels) at a time
        t1 = min(t0 + TRIALS_PER_CHUNK, n)
        moved = to_numpy(projector.project(
            xp.asarray(moves[t0:t1].reshape(-1, 3, 3).astype(np.float32)), ky, kx)).reshape(
            t1 - t0, m, -1)
        scores[t0:t1] = (np.abs(moved - here[t0:t1, None, :]) ** 2
                         * weight[t0:t1, None, :]).sum(axis=2)
    return scores


def _first_angle_beyond(projector, poses, axes, here, weight, ky, kx):
    """Per trial, the first angle of the ladder whose turn the E-step tells apart: found
    on every :data:`LADDER_STRIDE`-th value (and the last), then among the values of
    the interval where it first crossed."""
    ladder = error_ladder(ANGLE_LIMIT_DEG)
    n, L = poses.shape[0], len(ladder)
    coarse = np.unique(np.r_[np.arange(LADDER_STRIDE - 1, L, LADDER_STRIDE), L - 1])
    hit = _rotation_scores(projector, poses, axes, np.tile(ladder[coarse], (n, 1)), here,
                           weight, ky, kx) > THRESHOLD
    upper = coarse[np.where(hit.any(axis=1), hit.argmax(axis=1), len(coarse) - 1)]
    lower = np.where(upper > coarse[0], upper - LADDER_STRIDE + 1, 0)
    inside = np.minimum(lower[:, None] + np.arange(LADDER_STRIDE - 1), upper[:, None])
    if inside.shape[1] == 0:                       # stride 1: the coarse pass was all
        return ladder[upper]
    hit = _rotation_scores(projector, poses, axes, ladder[inside], here, weight,
                           ky, kx) > THRESHOLD
    hit &= inside < upper[:, None]
    first = np.where(hit.any(axis=1), inside[np.arange(n), hit.argmax(axis=1)], upper)
    return ladder[first]


def _random_unit_vectors(rng, n, dim):
    v = rng.normal(size=(n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _first_beyond(score, ladder):
    """Per row of ``score`` (trials, ladder): the first ladder value whose score
    exceeds the threshold (the last value if none does)."""
    hit = score > THRESHOLD
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), len(ladder) - 1)
    return ladder[first]


def expected_errors(projector, ctf, inv_sigma2, ky, kx, box, rng):
    """The class's expected angular (deg) and translational (px) errors: the means over
    the trials (rows of ``ctf`` / ``inv_sigma2``, (n_trials, n_pixels) at the pixels
    ``ky, kx`` of the current image) of the smallest errors that the E-step tells
    apart (see the module notes)."""
    xp = projector.xp
    n = ctf.shape[0]
    weight = 0.5 * to_numpy(ctf).astype(np.float64) ** 2 * to_numpy(inv_sigma2)
    shifts = error_ladder(SHIFT_LIMIT_PX)
    poses = _random_rotations(rng, n)
    axes = _random_unit_vectors(rng, n, 3)
    here = to_numpy(projector.project(xp.asarray(poses.astype(np.float32)), ky, kx))
    acc_rot = _first_angle_beyond(projector, poses, axes, here, weight, ky, kx)
    directions = _random_unit_vectors(rng, n, 2)
    k_along = (directions[:, 0:1] * to_numpy(kx)[None] + directions[:, 1:2] * to_numpy(ky)[None])
    power = np.abs(here) ** 2 * weight
    shift_score = np.empty((n, len(shifts)))
    for t0 in range(0, n, TRIALS_PER_CHUNK):
        t1 = min(t0 + TRIALS_PER_CHUNK, n)
        phase = 2 * np.pi * shifts[None, :, None] * k_along[t0:t1, None, :] / box
        shift_score[t0:t1] = (2.0 * (1.0 - np.cos(phase)) * power[t0:t1, None, :]).sum(axis=2)
    return float(acc_rot.mean()), float(_first_beyond(shift_score, shifts).mean())


def _random_rotations(rng, n):
    """(n, 3, 3) rotations uniform on SO(3)."""
    return Rotation.random(n, random_state=rng).as_matrix()


def fine_step_deg(order, oversampling):
    """The fine angular step (deg) of a HEALPix order after ``oversampling``."""
    return 360.0 / (6 * round(2.0 ** (order + oversampling)))


def coarser_order(order, oversampling, target_deg):
    """The coarsest HEALPix order in ``0..order`` whose fine step is below
    ``SAFETY * target_deg``; ``order`` itself when none is."""
    coarsest = order
    for h in range(order - 1, -1, -1):
        if fine_step_deg(h, oversampling) < SAFETY * target_deg:
            coarsest = h
        else:
            break
    return coarsest


def coarser_offset_step(step_px, range_px, oversampling, acc_trans_px):
    """The coarse offset step (px): ``SAFETY acc_trans 2^os`` at most
    ``MAX_STEP_OF_RANGE`` of the range, never below ``step_px`` (the step asked for)."""
    new = SAFETY * acc_trans_px * 2 ** oversampling
    return max(min(new, MAX_STEP_OF_RANGE * range_px), step_px)


def cross_correlation_target_deg(diameter_angst, resolution_angst):
    """The angle (deg) that moves the particle's edge by one resolution element:
    ``360 / ceil(pi D / res)``."""
    return 360.0 / math.ceil(math.pi * diameter_angst / resolution_angst)


def run_accuracy(projectors, classes, pdf_class, ctf, inv_sigma2, ky, kx, box, rng):
    """(acc_rot deg, acc_trans px, per-class list) over ``classes``: each class's
    :func:`expected_errors`; the run's, the smallest over the classes with prior
    >= :data:`MIN_CLASS_PRIOR` (all of ``classes`` when none has)."""
    per_class = {int(k): expected_errors(projectors[k], ctf, inv_sigma2, ky, kx, box, rng)
                 for k in classes}
    deciding = [k for k in per_class if pdf_class[k] >= MIN_CLASS_PRIOR] or list(per_class)
    return (min(per_class[k][0] for k in deciding), min(per_class[k][1] for k in deciding),
            per_class)


def adjust_plan(settings, plan, accuracy, diameter_angst, resolution_angst):
    """The plan with its HEALPix order and offset step made coarser as the module notes
    say; ``accuracy`` is ``(acc_rot deg, acc_trans px)``, or None in a cross-correlation
    iteration.  Returns ``(plan, line)``, the line for the run's log."""
    s = settings
    if accuracy is None:
        target, acc_trans = cross_correlation_target_deg(diameter_angst, resolution_angst), math.inf
        source = (f"cross-correlation iteration: {target:.1f} deg moves the edge by one "
                  f"{resolution_angst:.1f} A element")
    else:
        target, acc_trans = accuracy
        source = f"expected accuracy {target:.1f} deg, {acc_trans:.2f} px"
    order = coarser_order(plan.healpix_order, s.oversampling, target)
    step = coarser_offset_step(plan.offset_step_px or s.offset_step,
                               plan.offset_range_px or s.offset_range, s.oversampling,
                               acc_trans)
    line = (f"coarser sampling: {source} -> HEALPix order {order} (fine step "
            f"{fine_step_deg(order, s.oversampling):.2f} deg), offset step {step:.2f} px")
    return replace(plan, healpix_order=order, offset_step_px=step), line
