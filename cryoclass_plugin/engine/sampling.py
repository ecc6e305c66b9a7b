"""RELION's orientation and translation grids, with adaptive-oversampling children.

Orientations (:class:`OrientationGrid`)
    Coarse rotations are HEALPix (NESTED) directions of ``healpix_order`` restricted to
    the symmetry group's asymmetric unit (:func:`.symmetry.asymmetric_unit_mask`, as
    RELION's ``HealpixSampling::setOrientations``), times in-plane angles
    ``psi = j * psi_step`` for ``j = 0 .. n_psi - 1``.  The default ``psi_step`` is the
    angular step of the order, ``360 / (6 * 2**order)`` degrees (order 2: 15, order 3:
    7.5); a given ``psi_step_deg`` is rounded so that ``n_psi = ceil(360 / step)``
    angles divide 360 exactly.  Coarse rotation ``r`` is direction ``r // n_psi`` and
    psi ``r % n_psi`` (RELION's order, direction-major).

    With oversampling ``os`` a coarse rotation has ``8**os`` children: the ``4**os``
    NESTED child pixels at order ``order + os`` (in NESTED index order, ``p * 4**os + c``)
    times ``2**os`` psi values ``psi_j - step/2 + (k + 0.5) * step / 2**os`` (for ``os = 1``
    ``psi_j -/+ step/4``), psi fastest: child ``c = c_dir * 2**os + k``.  Children of a
    direction near the edge of the asymmetric unit may lie slightly outside it, as in
    RELION.

Translations (:class:`TranslationGrid`)
    Coarse offsets ``(x, y) = (i, j) * step`` (pixels) with ``x**2 + y**2 <= range**2``
    (RELION's ``setTranslations``: ``i`` outer, ``j`` inner, a 0.001 tolerance); with
    oversampling each has ``(2**os)**2`` children ``x - step/2 + (kx + 0.5) * step/2**os``
    and likewise in y, ``ky`` fastest (``os = 1``: ``+- step/4``).

Perturbation
    RELION shifts the whole sampling every iteration by a random fraction of the step
    (``--perturb``, default 0.5).  Both grids take ``perturbation`` (that fraction, a
    number in [-1, 1]): rotations ``A`` become ``A @ R(p, p, p)`` with
    ``p = perturbation * angular_step_deg`` (coarse and children alike), offsets gain
    ``perturbation * offset_step_px`` in x and y.  :func:`next_perturbation` draws the
    next value as RELION does.

All angles are degrees (rot, tilt, psi; :mod:`.geometry`), offsets pixels (x, y).
"""
import math

import numpy as np

from . import healpix
from .errors import CryoClassError
from .geometry import euler_to_matrix, matrix_to_euler
from .symmetry import (asymmetric_unit_mask, direction_vectors, parse_symmetry,
                       symmetry_matrices)

#: RELION skips the seam clean-up of the asymmetric unit above this many directions.
SEAM_CLEANUP_MAX_DIRECTIONS = 4000


def _as_ids(ids, n, what):
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise CryoClassError(f"{what} index out of range 0..{n - 1}")
    return ids


def _check_os(oversampling):
    if int(oversampling) != oversampling or oversampling < 0:
        raise CryoClassError(f"oversampling {oversampling!r} must be an integer >= 0")
    return int(oversampling)


def _perturb_eulers(eulers, perturb_deg):
    """RELION's random perturbation of rotations: ``A -> A @ R(p, p, p)``."""
    if perturb_deg == 0.0:
        return eulers
    A = euler_to_matrix(eulers[:, 0], eulers[:, 1], eulers[:, 2])
    A = A @ euler_to_matrix(perturb_deg, perturb_deg, perturb_deg)
    return np.stack(matrix_to_euler(A), axis=-1)


def next_perturbation(previous, factor=0.5, rng=None):
    """RELION's ``resetRandomlyPerturbedSampling``: add a uniform draw from
    ``[factor/2, factor)`` to the previous value and wrap into ``[-factor, factor)``.
    ``factor`` 0 gives 0 (no perturbation)."""
    if factor <= 0:
        return 0.0
    if not factor <= 1:
        raise CryoClassError(f"perturbation factor {factor} must be between 0 and 1")
    rng = np.random.default_rng() if rng is None else rng
    value = previous + rng.uniform(0.5 * factor, factor)
    return float((value + factor) % (2 * factor) - factor)


class OrientationGrid:
    """Coarse rotations of RELION's 3D sampling and their oversampled children.

    Parameters: ``healpix_order`` (int, 0..13), ``sym`` (RELION name, see
    :mod:`.symmetry`), ``psi_step_deg`` (None: the angular step), ``perturbation``
    (fraction of the angular step, see the module notes).

    Attributes
    ----------
    healpix_order, sym (canonical name), angular_step_deg (``360 / (6 * 2**order)``),
    psi_step_deg, n_directions, n_psi, n_rotations (``n_directions * n_psi``),
    pixels (n_directions,) NESTED pixel of each kept direction,
    rot, tilt (n_directions,) degrees, directions (n_directions, 3) unit vectors,
    psi (n_psi,) degrees, eulers (n_rotations, 3), matrices (n_rotations, 3, 3),
    perturbation, perturb_deg.
    """

    def __init__(self, healpix_order, sym="C1", psi_step_deg=None, perturbation=0.0):
        order = int(healpix_order)
        if order != healpix_order or not 0 <= order <= healpix.MAX_ORDER:
            raise CryoClassError(f"healpix_order {healpix_order!r} must be an integer in "
                                 f"0..{healpix.MAX_ORDER}")
        group = parse_symmetry(sym)
        self.healpix_order = order
        self.sym = group.name
        self.symmetry = group
        self.angular_step_deg = healpix.angular_step_deg(order)
        if psi_step_deg is None:
            psi_step_deg = self.angular_step_deg
        if not psi_step_deg > 0:
            raise CryoClassError(f"psi step {psi_step_deg!r} must be > 0 degrees")
        self.n_psi = int(math.ceil(360.0 / psi_step_deg - 1e-9))
        self.psi_step_deg = 360.0 / self.n_psi
        self.psi = np.arange(self.n_psi) * self.psi_step_deg

        pix = np.arange(healpix.npix(order), dtype=np.int64)
        rot, tilt = healpix.pixel_angles_deg(pix, order)
        keep = asymmetric_unit_mask(rot, tilt, group, seam_deg=0.0)
        if 0 < keep.sum() < SEAM_CLEANUP_MAX_DIRECTIONS:
            keep = asymmetric_unit_mask(rot, tilt, group,
                                        seam_deg=0.5 * np.degrees(healpix.max_pixrad(order)))
        self.pixels = pix[keep]
        self.rot, self.tilt = rot[keep], tilt[keep]
        self.directions = direction_vectors(self.rot, self.tilt)
        self.n_directions = len(self.pixels)
        self.n_rotations = self.n_directions * self.n_psi

        self.perturbation = float(perturbation)
        self.perturb_deg = self.perturbation * self.angular_step_deg
        e = np.empty((self.n_directions, self.n_psi, 3))
        e[..., 0] = self.rot[:, None]
        e[..., 1] = self.tilt[:, None]
        e[..., 2] = self.psi[None, :]
        self.eulers = _perturb_eulers(e.reshape(-1, 3), self.perturb_deg)
        self._matrices = None

    @property
    def matrices(self):
        """``(n_rotations, 3, 3)`` rotation matrices of :attr:`eulers` (computed on first
        use and cached)."""
        if self._matrices is None:
            e = self.eulers
            self._matrices = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
        return self._matrices

    # ------------------------------------------------------------------ indices
    def split_ids(self, ids):
        """Coarse rotation ids -> ``(direction index, psi index)``."""
        ids = _as_ids(ids, self.n_rotations, "rotation")
        return ids // self.n_psi, ids % self.n_psi

    def fine_angular_step_deg(self, oversampling=1):
        """Angular step after ``oversampling`` (``360 / (6 * 2**(order + os))``)."""
        return healpix.angular_step_deg(self.healpix_order + _check_os(oversampling))

    def fine_psi_step_deg(self, oversampling=1):
        """In-plane step after ``oversampling``: ``psi_step / 2**os``."""
        return self.psi_step_deg / (1 << _check_os(oversampling))

    def n_children(self, oversampling=1):
        """Children per coarse rotation: ``8**os``."""
        return 1 << (3 * _check_os(oversampling))

    # ----------------------------------------------------------------- children
    def children(self, ids, oversampling=1):
        """Oversampled children of coarse rotations ``ids`` (global indices into
        :attr:`eulers`).

        Returns ``(child_eulers, parent_positions)``: ``child_eulers`` is
        ``(len(ids) * 8**os, 3)`` degrees; row ``i * 8**os + c`` is child ``c`` of
        ``ids[i]`` and ``parent_positions[row] = i`` (a position in ``ids``, not the
        global id: the global parent is ``ids[parent_positions]``).  ``c = c_dir * 2**os
        + k`` with ``c_dir`` the NESTED child direction and ``k`` the psi child.
        ``oversampling=0`` returns the coarse rotations themselves.
        """
        os_ = _check_os(oversampling)
        idir, ipsi = self.split_ids(ids)
        n = len(idir)
        n_dir_over, n_psi_over = 1 << (2 * os_), 1 << os_
        cpix = healpix.children(self.pixels[idir], os_)                 # (n, 4**os)
        rot, tilt = healpix.pixel_angles_deg(cpix, self.healpix_order + os_)
        psi = (self.psi[ipsi][:, None] - 0.5 * self.psi_step_deg * (os_ > 0)
               + (np.arange(n_psi_over) + 0.5 * (os_ > 0)) * self.psi_step_deg / n_psi_over)
        e = np.empty((n, n_dir_over, n_psi_over, 3))
        e[..., 0] = rot[:, :, None]
        e[..., 1] = tilt[:, :, None]
        e[..., 2] = psi[:, None, :]
        e = _perturb_eulers(e.reshape(-1, 3), self.perturb_deg)
        parents = np.repeat(np.arange(n, dtype=np.int64), n_dir_over * n_psi_over)
        return e, parents

    def fine_matrices(self, ids, oversampling=1):
        """Like :meth:`children` but returns ``(matrices (len(ids) * 8**os, 3, 3),
        parent_positions)``."""
        e, parents = self.children(ids, oversampling)
        return euler_to_matrix(e[:, 0], e[:, 1], e[:, 2]), parents

    # ------------------------------------------------------------- local search
    def local_rotations(self, prior_euler, sigma_deg, sigma_cutoff=3.0):
        """Coarse rotations near a prior, with Gaussian prior weights (RELION's
        ``selectOrientationsWithNonZeroPriorProbability`` with
        ``sigma_rot = sigma_tilt = sigma_psi = sigma_deg``, no helical options).

        Directions are kept when the angle between the prior direction and the nearest
        symmetry image of the grid direction is below ``sigma_cutoff * sigma_deg``, psi
        when ``|psi - psi_prior|`` (wrapped to [0, 180]) is; each factor gets weight
        ``exp(-d**2 / (2 sigma**2))`` normalised to sum 1 over the kept set (the nearest
        one alone when none passes).  Returns ``(ids, prior)``: global rotation ids
        (direction-major) and their prior probabilities (product of the two factors,
        summing to 1).
        """
        if not sigma_deg > 0:
            raise CryoClassError(f"local search sigma {sigma_deg!r} must be > 0 degrees")
        rot0, tilt0, psi0 = (float(v) for v in np.asarray(prior_euler, dtype=float).ravel()[:3])
        d0 = direction_vectors(rot0, tilt0)
        mats = symmetry_matrices(self.symmetry.proper_subgroup())
        # best over g of the angle between the prior and g d (the group is closed under
        # inverses, so this is the distance between symmetry-equivalence classes)
        cos = np.einsum("gij,nj,i->gn", mats, self.directions, d0).max(axis=0)
        ddir = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
        dpsi = np.abs(self.psi - psi0) % 360.0
        dpsi = np.where(dpsi > 180.0, 360.0 - dpsi, dpsi)
        limit = sigma_cutoff * sigma_deg

        def select(dist):
            sel = np.flatnonzero(dist < limit)
            if sel.size == 0:
                sel = np.array([int(np.argmin(dist))])
            w = np.exp(-0.5 * (dist[sel] / sigma_deg) ** 2)
            return sel, w / w.sum()
        sdir, wdir = select(ddir)
        spsi, wpsi = select(dpsi)
        ids = (sdir[:, None] * self.n_psi + spsi[None, :]).ravel()
        prior = (wdir[:, None] * wpsi[None, :]).ravel()
        return ids, prior

    # ------------------------------------------------------------------ summary
    def summary(self, oversampling=1):
        """Values for logs and ``sampling.star`` (rlnHealpixOrder, rlnSymmetryGroup,
        rlnPsiStep, ...): a dict with ``healpix_order, sym, angular_step_deg,
        psi_step_deg, n_directions, n_psi, n_rotations, oversampling,
        fine_healpix_order, fine_angular_step_deg, fine_psi_step_deg,
        n_fine_rotations, perturbation``."""
        os_ = _check_os(oversampling)
        return dict(healpix_order=self.healpix_order, sym=self.sym,
                    angular_step_deg=self.angular_step_deg, psi_step_deg=self.psi_step_deg,
                    n_directions=self.n_directions, n_psi=self.n_psi,
                    n_rotations=self.n_rotations, oversampling=os_,
                    fine_healpix_order=self.healpix_order + os_,
                    fine_angular_step_deg=self.fine_angular_step_deg(os_),
                    fine_psi_step_deg=self.fine_psi_step_deg(os_),
                    n_fine_rotations=self.n_rotations * self.n_children(os_),
                    perturbation=self.perturbation)

    def __len__(self):
        return self.n_rotations

    def __repr__(self):
        return (f"OrientationGrid(order={self.healpix_order}, sym={self.sym}, "
                f"{self.n_directions} directions x {self.n_psi} psi = {self.n_rotations})")


class TranslationGrid:
    """RELION's coarse 2D translations (pixels) and their oversampled children.

    ``offset_range_px`` >= 0 and ``offset_step_px`` > 0 (pixels at the current image
    scale), ``perturbation`` a fraction of the step (see the module notes).
    Attributes: ``offset_range_px``, ``offset_step_px``, ``offsets (T, 2)`` (x, y)
    pixels, ``n_offsets``, ``perturbation``.
    Range 5 step 2 gives 21 offsets, range 5 step 1 gives 81.
    """

    def __init__(self, offset_range_px, offset_step_px, perturbation=0.0):
        rng_, step = float(offset_range_px), float(offset_step_px)
        if not step > 0:
            raise CryoClassError(f"offset step {offset_step_px!r} must be > 0 pixels")
        if not rng_ >= 0:
            raise CryoClassError(f"offset range {offset_range_px!r} must be >= 0 pixels")
        self.offset_range_px, self.offset_step_px = rng_, step
        self.perturbation = float(perturbation)
        maxp = int(math.ceil(rng_ / step - 1e-9))
        i, j = np.meshgrid(np.arange(-maxp, maxp + 1), np.arange(-maxp, maxp + 1),
                           indexing="ij")                       # i (x) outer, j (y) inner
        xy = np.stack([i.ravel(), j.ravel()], axis=-1) * step
        xy = xy[(xy ** 2).sum(axis=1) < rng_ ** 2 + 0.001]
        self.offsets = xy + self.perturbation * step
        self.n_offsets = len(self.offsets)

    def fine_step_px(self, oversampling=1):
        """Translation step after ``oversampling``: ``step / 2**os``."""
        return self.offset_step_px / (1 << _check_os(oversampling))

    def n_children(self, oversampling=1):
        """Children per coarse offset: ``4**os``."""
        return 1 << (2 * _check_os(oversampling))

    def children(self, ids, oversampling=1):
        """Oversampled children of coarse offsets ``ids``: ``(child_offsets
        (len(ids) * 4**os, 2), parent_positions)``; row ``i * 4**os + kx * 2**os + ky``
        is ``offsets[ids[i]] + ((kx + 0.5) / 2**os - 0.5) * step`` in x (``ky`` in y),
        ``parent_positions[row] = i``.  ``oversampling=0`` returns the coarse offsets."""
        os_ = _check_os(oversampling)
        ids = _as_ids(ids, self.n_offsets, "translation")
        n_over = 1 << os_
        delta = ((np.arange(n_over) + 0.5) / n_over - 0.5) * self.offset_step_px
        dx, dy = np.meshgrid(delta, delta, indexing="ij")
        d = np.stack([dx.ravel(), dy.ravel()], axis=-1)              # (4**os, 2)
        out = (self.offsets[ids][:, None, :] + d[None]).reshape(-1, 2)
        return out, np.repeat(np.arange(len(ids), dtype=np.int64), n_over * n_over)

    def summary(self, oversampling=1):
        """Dict ``offset_range_px, offset_step_px, n_offsets, oversampling,
        fine_step_px, n_fine_offsets, perturbation``."""
        os_ = _check_os(oversampling)
        return dict(offset_range_px=self.offset_range_px, offset_step_px=self.offset_step_px,
                    n_offsets=self.n_offsets, oversampling=os_,
                    fine_step_px=self.fine_step_px(os_),
                    n_fine_offsets=self.n_offsets * self.n_children(os_),
                    perturbation=self.perturbation)

    def __len__(self):
        return self.n_offsets

    def __repr__(self):
        return (f"TranslationGrid(range={self.offset_range_px} px, step={self.offset_step_px}"
                f" px, {self.n_offsets} offsets)")


def rotation_count_summary(orientation_grid, translation_grid=None, oversampling=1):
    """One-line human summary for logs, e.g. ``"HEALPix order 2 (15 deg), C1: 192
    directions x 24 psi = 4608 rotations; 21 translations; oversampling 1 -> 7.5 deg,
    8 x 4 children"``."""
    g = orientation_grid
    s = (f"HEALPix order {g.healpix_order} ({g.angular_step_deg:g} deg), {g.sym}: "
         f"{g.n_directions} directions x {g.n_psi} psi = {g.n_rotations} rotations")
    if translation_grid is not None:
        s += f"; {translation_grid.n_offsets} translations"
    os_ = _check_os(oversampling)
    s += (f"; oversampling {os_} -> {g.fine_angular_step_deg(os_):g} deg, "
          f"{g.n_children(os_)}")
    if translation_grid is not None:
        s += f" x {translation_grid.n_children(os_)}"
    return s + " children"
