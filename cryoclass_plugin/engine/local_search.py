"""Local angular searches (RELION's ``--sigma_ang``; the Sampling tab's "Perform local
angular searches?" with "Local angular search range" = 3 x sigma).

Each particle is searched only near its current orientation ``A0`` (rotation matrix,
:mod:`.geometry` convention): the coarse rotations ``A`` of the grid whose angular
distance ``theta = min_g angle(A (A0 R_g)^T)`` is at most ``3 sigma`` (``R_g`` the
symmetry group's elements: ``A0 R_g`` are the views equivalent to ``A0``), each with the
Gaussian prior ``log p = -theta^2 / (2 sigma^2)``.  The nearest coarse rotation is always
kept, so a sigma below the grid step still searches something.  The oversampled children
of the significant local rotations get the same prior from their own distance (in the
fine pass, :func:`rotation_log_prior`).

RELION puts one Gaussian on the angle between projection directions and another on the
psi difference (their product); ``theta`` is the angle of the rotation between the two
poses, which for small angles is about ``sqrt(d_dir^2 + d_psi^2)`` (the same product
prior) and stays defined at the poles, where rot and psi are degenerate.  RELION cuts
each angle at 3 sigma (a box); here the cut is a ball of 3 sigma.

The coarse pass of a local search projects each particle's own candidate rotations (all
classes) at the coarse pixels and scores them against all coarse translations with one
batched GEMM per sub-batch of particles (``(B, T, 2n) @ (B, 2n, K L)``), so its cost is
``particles x classes x local rotations`` instead of ``x all rotations``.  The
significant samples then go through the ordinary fine pass (:func:`.search.fine_pass`).
"""
from dataclasses import dataclass

import numpy as np

from . import estep, workers
from .backend import to_numpy
from .geometry import euler_to_matrix, matrix_to_euler

#: Ball radius of the search in units of sigma (RELION's ``sigma_cutoff``).
SIGMA_CUTOFF = 3.0
#: Rotations whose distance to the prior is computed at once (~80 bytes each per
#: symmetry element).
CANDIDATE_CHUNK = 1 << 20


@dataclass(frozen=True)
class EulerPrior:
    """RELION's per-angle local-search prior (``--sigma_rot``, ``--sigma_tilt``,
    ``--sigma_psi``; degrees, <= 0: that angle is free), in place of the rotation-angle
    prior of ``--sigma_ang``.  As RELION's sampling: with both rot and tilt sigmas a
    Gaussian on the angle between the projection directions (third rows) of width the
    larger of the two, with one of them a Gaussian on that Euler angle's difference
    alone; a Gaussian on the psi difference; each searched to 3 sigma (a box, not a
    ball), at the nearest of the particle's equivalent views."""
    rot: float
    tilt: float
    psi: float

    @property
    def direction_sigma(self):
        """Width (deg) of the direction prior when both rot and tilt have one, else 0."""
        return max(self.rot, self.tilt) if self.rot > 0 and self.tilt > 0 else 0.0


def angle_prior(settings, sigma_ang):
    """The local searches' prior: an :class:`EulerPrior` when the run gives
    ``--sigma_rot/--sigma_tilt/--sigma_psi``, else the plan's ``sigma_ang`` (deg)."""
    s = settings
    if max(s.sigma_rot, s.sigma_tilt, s.sigma_psi) > 0:
        return EulerPrior(s.sigma_rot, s.sigma_tilt, s.sigma_psi)
    return sigma_ang


def _wrap_deg(d):
    return (d + 180.0) % 360.0 - 180.0


def euler_log_prior(mats, views, prior):
    """``(log prior (B, L), inside (B, L))`` of rotations ``mats`` (B, L, 3, 3) under an
    :class:`EulerPrior` about each particle's views (B, G, 3, 3): the best view's
    Gaussian terms (no cut) and whether some view has every constrained difference
    within ``3 sigma``."""
    B, L = mats.shape[:2]
    G = views.shape[1]
    rot_m, tilt_m, psi_m = (a.reshape(B, L, 1) for a in matrix_to_euler(mats))
    rot_v, tilt_v, psi_v = (a.reshape(B, 1, G) for a in matrix_to_euler(views))
    logp = np.zeros((B, L, G))
    inside = np.ones((B, L, G), dtype=bool)

    def term(delta, sigma):
        nonlocal logp, inside
        logp = logp - 0.5 * (delta / sigma) ** 2
        inside = inside & (np.abs(delta) <= SIGMA_CUTOFF * sigma)

    if prior.direction_sigma > 0:
        cos = np.einsum("blk,bgk->blg", mats[:, :, 2, :], views[:, :, 2, :])
        term(np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0))), prior.direction_sigma)
    elif prior.rot > 0:
        term(_wrap_deg(rot_m - rot_v), prior.rot)
    elif prior.tilt > 0:
        term(tilt_m - tilt_v, prior.tilt)
    if prior.psi > 0:
        term(_wrap_deg(psi_m - psi_v), prior.psi)
    best = np.where(inside, logp, logp - 1e6).argmax(axis=2)[..., None]
    return (np.take_along_axis(logp, best, 2)[..., 0],
            np.take_along_axis(inside, best, 2)[..., 0])


def prior_views(prior_eulers, sym_mats):
    """``(B, G, 3, 3)``: each particle's orientation ``A0`` times the symmetry elements
    (``A0 R_g``), the views equivalent to it.  ``prior_eulers`` (B, 3) degrees."""
    A0 = euler_to_matrix(prior_eulers[:, 0], prior_eulers[:, 1], prior_eulers[:, 2])
    return A0[:, None] @ np.asarray(sym_mats, dtype=np.float64)[None]


def rotation_distance_deg(mats, views):
    """Angle (degrees) from rotations ``mats`` (B, L, 3, 3) to the nearest of each
    particle's equivalent views ``views`` (B, G, 3, 3): (B, L)."""
    trace = np.einsum("blij,bgij->blg", mats, views).max(axis=2)
    return np.rad2deg(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def rotation_log_prior(mats, views, sigma_deg):
    """Gaussian log prior ``-theta^2 / (2 sigma^2)`` of rotations (B, L, 3, 3); with an
    :class:`EulerPrior` for ``sigma_deg``, its per-angle terms (:func:`euler_log_prior`)."""
    if isinstance(sigma_deg, EulerPrior):
        return euler_log_prior(mats, views, sigma_deg)[0]
    theta = rotation_distance_deg(mats, views)
    return -0.5 * (theta / sigma_deg) ** 2


def _inside(mats, views, prior):
    """(log prior, inside the cut) of rotations (N, 1, 3, 3) about views (N, G, 3, 3)."""
    if isinstance(prior, EulerPrior):
        logp, inside = euler_log_prior(mats, views, prior)
        return logp[:, 0], inside[:, 0]
    theta = rotation_distance_deg(mats, views)[:, 0]
    return -0.5 * (theta / prior) ** 2, theta <= SIGMA_CUTOFF * prior


def _direction_cut_deg(prior):
    """How far (deg) a candidate's projection direction may be from a view's."""
    if isinstance(prior, EulerPrior):
        # A free rot or tilt lets the direction go anywhere.
        return SIGMA_CUTOFF * prior.direction_sigma if prior.direction_sigma > 0 else 180.0
    return SIGMA_CUTOFF * prior


def candidate_rotations(orientations, views, sigma_deg):
    """Per particle, the coarse rotation ids within ``3 sigma`` of its views and their
    log prior (``sigma_deg`` a width in degrees, or an :class:`EulerPrior`).

    ``orientations`` is the :class:`.sampling.OrientationGrid` in use, ``views`` the
    (B, G, 3, 3) array of :func:`prior_views`.  Returns two lists of length B: int64 ids
    (direction-major, as the grid's) and float64 log priors.
    """
    cut = _direction_cut_deg(sigma_deg)
    # The angle between two rotations bounds the angle between their projection
    # directions (third rows), so directions further than the cut from every view's
    # direction cannot hold a candidate.  The perturbation moves grid rotations off
    # their nominal directions by up to ~sqrt(3) x perturb_deg.
    margin = 2.0 * abs(orientations.perturb_deg) + 1e-6
    cos_dir = np.cos(np.deg2rad(min(180.0, cut + margin)))
    dirs = orientations.directions                                       # (D, 3)
    n_psi = orientations.n_psi
    mats = orientations.matrices
    near = (views[:, :, 2, :] @ dirs.T).max(axis=1) >= cos_dir            # (B, D)
    # Many particles at once: (particle, direction) pairs times every psi, in chunks of
    # about CANDIDATE_CHUNK rotations (a wide ball holds most of the grid).
    per_particle = near.sum(axis=1) * n_psi
    B = near.shape[0]
    limit = max(1, CANDIDATE_CHUNK // views.shape[1])      # views[rb] is G matrices a row
    rb_all, ids_all, logp_all = [], [], []
    start = 0
    while start < B:
        stop = start + 1
        total = per_particle[start]
        while stop < B and total + per_particle[stop] <= limit:
            total += per_particle[stop]
            stop += 1
        pb, pd = np.nonzero(near[start:stop])
        rb = np.repeat(pb + start, n_psi)
        ids = (pd[:, None] * n_psi + np.arange(n_psi)[None, :]).ravel()
        logp, keep = _inside(mats[ids][:, None], views[rb], sigma_deg)
        rb_all.append(rb[keep])
        ids_all.append(ids[keep])
        logp_all.append(logp[keep])
        start = stop
    rb, ids, logp = (np.concatenate(a) for a in (rb_all, ids_all, logp_all))
    bounds = np.searchsorted(rb, np.arange(B + 1))
    ids_out, logp_out = [], []
    for b in range(B):
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            ids_out.append(ids[lo:hi])
            logp_out.append(logp[lo:hi])
            continue
        # Nothing inside the ball (sigma far below the grid step): the nearest
        # rotations of the direction nearest to any view.
        d = int(np.argmax((views[b, :, 2, :] @ dirs.T).max(axis=0)))
        cand = d * n_psi + np.arange(n_psi)
        th = rotation_distance_deg(mats[cand][None], views[b:b + 1])[0]
        sel = th == th.min()
        ids_out.append(cand[sel])
        logp_out.append(rotation_log_prior(mats[cand[sel]][None], views[b:b + 1],
                                           sigma_deg)[0])
    return ids_out, logp_out


def _candidate_slices(setup, classes, ids_pad, xp):
    """(Bs, K Lm, nc) coarse slices of the candidates ``ids_pad`` (Bs, Lm) of every
    class (class-major columns, column ``k * Lm + l``) and their power: rows of the
    iteration's coarse slices of the whole grid where it has them (a pruned global
    search), else projected."""
    Bs, Lm = ids_pad.shape
    nc = setup.n_coarse
    K = classes.shape[0]
    R = setup.orientations.n_rotations
    if setup.coarse_power.shape[0] == K * R:
        rows = xp.asarray((np.arange(K)[None, :, None] * R + ids_pad[:, None, :]).ravel())
        pair = setup.coarse_pair[rows]
        slices = xp.empty((rows.shape[0], nc), dtype=xp.complex64)
        slices.real, slices.imag = pair[:, :nc], pair[:, nc:]     # float32 halves, exact
        return slices.reshape(Bs, K * Lm, nc), setup.coarse_power[rows].reshape(Bs, K * Lm, nc)
    mats = xp.asarray(setup.orientations.matrices[ids_pad.ravel()])
    ky, kx = setup.ky[:nc], setup.kx[:nc]
    slices = xp.stack([setup.projectors[k].project(mats, ky, kx).reshape(Bs, Lm, nc)
                       for k in classes], axis=1).reshape(Bs, K * Lm, nc)
    return slices, slices.real ** 2 + slices.imag ** 2


def rotations_within(orientations, eulers, sym_mats, radius_deg):
    """Per particle, the coarse rotation ids within ``radius_deg`` of its pose
    (``eulers`` (B, 3) degrees, or a symmetry mate of it): the candidates of a pruned
    global search (:func:`.iteration.prune_radius`), with no prior inside the ball."""
    ids, _ = candidate_rotations(orientations, prior_views(eulers, sym_mats),
                                 radius_deg / SIGMA_CUTOFF)
    return ids


def local_coarse_pass(setup, block, cand_ids, cand_logp, xp, batch_bytes):
    """Coarse pass over each particle's candidate rotations (all classes, all coarse
    translations, the coarse pixels).

    Returns ``(sig_t, sig_kr, n_sig)`` as :func:`.search.coarse_pass`: per particle the
    significant coarse translation indices and global (class, rotation) ids
    ``k * R + r``.
    """
    B = block.images_f.shape[0]
    nc = setup.n_coarse
    # Only the classes some particle may take (one during consensus iterations).
    classes = (np.arange(setup.n_classes) if setup.coarse_classes is None
               else np.asarray(setup.coarse_classes, dtype=np.int64))
    K = classes.shape[0]
    T = setup.translations.offsets.shape[0]
    f32 = xp.float32
    shifts = estep.phase_shifts(setup.translations.offsets, setup.ky[:nc], setup.kx[:nc],
                                setup.box)                                      # (T, nc)
    total_offsets = xp.asarray(block.origin_px, dtype=f32)[:, None, :] + \
        xp.asarray(setup.translations.offsets, dtype=f32)[None, :, :]
    prior_t = estep.log_offset_prior(total_offsets, setup.sigma_offset_px)     # (B, T)
    n_l = np.array([ids.shape[0] for ids in cand_ids])
    # Sub-batch: particles x K x (padded) candidates x 2 nc floats within the budget.
    per_particle = max(1, int(n_l.max()) * K * max(2 * nc, T) * 4)
    step = max(1, int(batch_bytes // per_particle))
    sig_t, sig_kr, n_sig = [], [], []

    def compute(span):
        return _local_sub_batch(setup, block, cand_ids, cand_logp, classes, shifts,
                                prior_t, n_l, xp, *span)

    def apply(out):
        n_scores, t, kr = out
        setup.counts.coarse += n_scores
        sig_t.extend(t)
        sig_kr.extend(kr)
        n_sig.extend(x.shape[0] for x in t)

    # With --j threads the sub-batches run side by side on the worker threads; their
    # significant samples are kept in sub-batch order.
    workers.map_in_order(compute, apply, workers.split(B, step), threaded=xp is np)
    setup.counts.significant += int(np.sum(n_sig))
    return sig_t, sig_kr, np.asarray(n_sig, dtype=np.int64)


def _local_sub_batch(setup, block, cand_ids, cand_logp, classes, shifts, prior_t, n_l, xp,
                     s, e):
    """:func:`local_coarse_pass` for the block's particles ``s:e`` (reads, never writes,
    shared state): ``(number of scores, sig_t, sig_kr)``, the last two per particle."""
    nc, K = setup.n_coarse, classes.shape[0]
    R = setup.orientations.n_rotations
    T = shifts.shape[0]
    f32 = xp.float32
    Bs = e - s
    Lm = int(n_l[s:e].max())
    # Pad each particle's candidates to Lm with its first one (prior -inf).
    filled = np.arange(Lm)[None, :] < n_l[s:e, None]
    ids_pad = np.zeros((Bs, Lm), dtype=np.int64)
    logp_pad = np.full((Bs, Lm), -np.inf)
    ids_pad[filled] = np.concatenate(cand_ids[s:e])
    logp_pad[filled] = np.concatenate(cand_logp[s:e])
    ids_pad = np.where(filled, ids_pad, ids_pad[:, :1])
    slices, power = _candidate_slices(setup, classes, ids_pad, xp)
    x, c = block.images_f[s:e, :nc], block.ctf[s:e, :nc]
    col_logp = xp.asarray(np.tile(logp_pad, (1, K)), dtype=f32)          # (Bs, K Lm)
    scores, _ = estep.own_slice_scores(x, c, block.inv_sigma2[s:e, :nc],
                                       shifts[None], slices, power, setup.use_cc)
    if setup.use_cc:
        # Hard maximum inside the search ball.
        scores = xp.where(xp.isfinite(col_logp)[:, None, :], scores, -xp.inf)
    else:
        scores += prior_t[s:e, :, None]
        class_prior = xp.repeat(setup.log_class_prior[xp.asarray(classes)], Lm)  # (K Lm,)
        scores += (col_logp + class_prior[None, :])[:, None, :]
    if block.allowed_class is not None:
        allowed = xp.asarray(block.allowed_class[s:e])
        col_class = xp.repeat(xp.asarray(classes), Lm)
        scores = xp.where(col_class[None, None, :] == allowed[:, None, None], scores, -xp.inf)
    flat = scores.reshape(Bs, T * K * Lm)
    if setup.use_cc:
        chosen = [np.asarray([i]) for i in to_numpy(flat.argmax(axis=1))]
    else:
        chosen, _ = estep.significant_samples(flat, setup.adaptive_fraction,
                                              setup.max_significant)
    sig_t, sig_kr = [], []
    for j, idx in enumerate(chosen):
        idx = to_numpy(idx)
        col = idx % (K * Lm)
        sig_t.append(idx // (K * Lm))
        sig_kr.append(classes[col // Lm] * R + ids_pad[j, col % Lm])
    return int(n_l[s:e].sum()) * K * T, sig_t, sig_kr
