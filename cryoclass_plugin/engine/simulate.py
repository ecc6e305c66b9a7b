"""Simulated heterogeneous cryo-EM data sets with ground truth and an oracle accuracy.

Phantoms
    A "ribosome-like" asymmetric particle built inside the package from pseudo-residues
    (60 % as C-alpha traces of short alpha helices, 3.8 A apart, the rest placed at random
    at protein density, ~130 A^3 per residue) filling named ellipsoidal domains: a large subunit with a protuberance and a stalk, and a small
    subunit made of a body and a head.  Each pseudo-residue is a 3D Gaussian of width
    ``sigma`` (default ``max(2 A, 0.6 apix)``), so the maps look like a protein at about
    twice the pixel size.  The body spans ~0.65 of the box.  Class variants (see
    :func:`class_variants`): 1 = everything, 2 = the small-subunit head absent, 3 = the
    whole small subunit rotated by 20 degrees about a hinge at the subunit interface
    ("ratcheted"), further classes combine and extend these.
Maps
    ``true_classKKK.mrc`` are the band-limited phantoms sampled on the voxel grid (values
    on the greyscale of the images: the sum over z of a map is the noise-free,
    CTF-free image of that class at the identity pose, exactly).  ``ref.mrc`` is the
    class-size-weighted average of the true maps low-passed to 30 A.
Projection (independent of the engine's Fourier projector)
    Real space: every pseudo-residue at map position ``r`` (pixels, (x, y, z) about the box
    centre ``N // 2``) lands at image position ``(A r)_xy`` -- the convention
    ``image(x, y) = sum_z V(A^T (x, y, z))`` -- and is splatted bilinearly on a grid
    ``oversampling`` times finer than the pixels.  The splat's transform is divided by the
    splat kernel's (sinc^2) and multiplied by the Gaussian's, cropped to the image's
    frequencies and softly cut at Nyquist; maps are made the same way in 3D, so
    ``sum_z map == projection`` holds to rounding at the identity pose (and at any pose a
    map's central section is the projection's transform, up to the splat's small
    aliasing near Nyquist).
Images
    ``image = IFFT( CTF * exp(+2 pi i k.o / N) * P(k) ) + noise`` with ``P`` the projection's
    centred transform, ``o`` the particle's origin in pixels (``rlnOriginX/YAngst /
    apix``, RELION's sign: the image is the projection shifted by MINUS the origin) and
    the CTF of :mod:`.ctf` (defocus uniform in ``defocus_range``, astigmatism uniform in
    [0, ``astigmatism_max``] A at a random angle).  Noise is white Gaussian with
    standard deviation 1 (so particles look like RELION-normalised ones) and the signal is
    scaled so that

        snr = mean over particles of var(noise-free CTF-affected image over the whole box)
              / noise variance.

    ``snr=inf`` gives noise-free images (signal variance 1).
Intensity variation (for RELION's ``--norm`` / ``--scale``; off by default, and then the
    output is unchanged)
    ``norm_spread > 0``: each particle's whole image (signal and noise) is multiplied by
    ``f_i = exp(norm_spread z_i)`` (z standard normal), divided by the mean of the f_i;
    ``f_i`` is the image's noise standard deviation relative to the average, RELION's
    meaning of ``rlnNormCorrection``, written as that column of ``truth.star``.
    ``scale_spread > 0``: the signal (not the noise) of micrograph m is multiplied by
    ``g_m = exp(scale_spread z_m)``, divided by their particle-weighted mean (RELION
    normalises its group scales so); ``truth.star`` gets a ``data_groups`` block
    (rlnMicrographName, rlnGroupScaleCorrection, rlnGroupNrParticles) and
    ``truth_summary.json`` ``group_scales``.  The SNR definition above is before these
    factors; the true maps stay on the average greyscale.
Poses
    Uniform on SO(3): rot ~ U(-180, 180), tilt = arccos(U(-1, 1)), psi ~ U(-180, 180)
    (degrees); origins uniform in [-max_shift_px, max_shift_px] pixels per axis.
Oracle accuracy
    Each particle is assigned to the true map whose noise-free CTF-affected projection at
    the particle's true pose and origin is closest to the image in least squares (the
    maximum-likelihood class under white noise); ``oracle_accuracy`` is the fraction
    assigned to their true class, ``oracle_accuracy_25A`` the same using only the
    frequencies below 25 A (|k| < N apix / 25).  It is the best any classifier can do
    given the true poses, so a classification run is judged against it.

Everything is deterministic for a seed (noise is drawn per fixed batch of particles).
"""
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .ctf import ctf_values
from .errors import CryoClassError
from .fourier import fft_centered, ifft_centered, low_pass
from .geometry import euler_to_matrix

RESIDUE_VOLUME_A3 = 130.0    # protein volume per residue (1.21 A^3/Da * ~110 Da)
HELIX_RISE_A = 1.5           # alpha helix: rise per residue
HELIX_RADIUS_A = 2.3         # alpha helix: C-alpha radius
HELIX_TURN_DEG = 100.0       # alpha helix: twist per residue
HELIX_FRACTION = 0.6         # residues in helices, the rest random coil
MAX_PSEUDO_RESIDUES = 60000  # cap for big boxes (then each point carries more mass)
BATCH = 128                  # particles per batch (fixed: the noise stream depends on it)
LOWRES_ORACLE_A = 25.0
REF_LOWPASS_A = 30.0


# ----------------------------------------------------------------------------- phantom

# Domains in units of the particle radius R (about a third of the box), (x, y, z) order.
# "kind" ellipsoid: centre, semi-axes; "rod": start, end, radius.  "density" scales the
# number of pseudo-residues per volume (RNA-rich subunits are denser).
DOMAINS = {
    "lsu_core": dict(kind="ellipsoid", centre=(-0.05, 0.25, 0.0), axes=(0.62, 0.42, 0.55),
                     density=1.2),
    "lsu_protuberance": dict(kind="ellipsoid", centre=(0.12, 0.70, 0.12),
                             axes=(0.20, 0.22, 0.18), density=1.2),
    "lsu_stalk": dict(kind="rod", start=(-0.50, 0.40, -0.05), end=(-0.98, 0.62, 0.15),
                      radius=0.13, density=1.0),
    "ssu_body": dict(kind="ellipsoid", centre=(0.0, -0.35, 0.08), axes=(0.50, 0.22, 0.40),
                     density=1.0),
    "ssu_head": dict(kind="ellipsoid", centre=(0.62, -0.40, 0.25), axes=(0.42, 0.34, 0.36),
                     density=1.0),
}
# The small subunit ratchets about an axis through the subunit interface.
SSU_HINGE = (0.0, -0.18, 0.05)
SSU_AXIS = (0.0, 1.0, 0.25)
STALK_HINGE = (-0.50, 0.40, -0.05)
STALK_AXIS = (0.0, 0.0, 1.0)


# A second, differently shaped particle for the many-state benchmarks: a compact core
# with four lobes of different sizes, one detachable subunit, and a peripheral arm (a
# rod and a head) on a hinge; and, for each shape, a ligand-sized density (~3 % of the
# mass) in a cleft.  Same units and kinds as DOMAINS.
COMPLEX_DOMAINS = {
    "core": dict(kind="ellipsoid", centre=(0.0, 0.0, 0.0), axes=(0.45, 0.40, 0.50),
                 density=1.0),
    "lobe_a": dict(kind="ellipsoid", centre=(0.55, 0.25, -0.15), axes=(0.28, 0.25, 0.30),
                   density=1.0),
    "lobe_b": dict(kind="ellipsoid", centre=(-0.45, 0.40, 0.10), axes=(0.30, 0.22, 0.26),
                   density=1.0),
    "lobe_c": dict(kind="ellipsoid", centre=(0.05, -0.55, 0.30), axes=(0.32, 0.24, 0.22),
                   density=1.0),
    "subunit": dict(kind="ellipsoid", centre=(-0.40, -0.40, -0.35), axes=(0.30, 0.28, 0.26),
                    density=1.0),
    "arm": dict(kind="rod", start=(0.40, -0.20, -0.30), end=(0.78, -0.42, -0.45),
                radius=0.11, density=1.0),
    "arm_head": dict(kind="ellipsoid", centre=(0.84, -0.50, -0.52), axes=(0.22, 0.20, 0.20),
                     density=1.0),
}
LIGANDS = {
    "ribosome": {"ligand": dict(kind="ellipsoid", centre=(0.35, -0.05, 0.40),
                                axes=(0.22, 0.20, 0.20), density=1.0)},
    "complex": {"ligand": dict(kind="ellipsoid", centre=(0.15, 0.42, 0.45),
                               axes=(0.20, 0.18, 0.18), density=1.0)},
}
SHAPES = {"ribosome": DOMAINS, "complex": COMPLEX_DOMAINS}
# The independent changes the many-state sets combine, per shape: a subunit absent, a
# peripheral domain swung about its hinge (by the set's swing angle), the ligand present.
CHANGES = {
    "ribosome": {"subunit": ("lsu_protuberance", "lsu_stalk"),
                 "swing": (("ssu_head",), (0.25, -0.38, 0.15), (0.0, 0.3, 1.0))},
    "complex": {"subunit": ("subunit",),
                "swing": (("arm", "arm_head"), (0.40, -0.20, -0.30), (0.0, 0.4, 1.0))},
}


def state_variants(shape, states, swing_deg=12.0):
    """Class variants (as :func:`class_variants` gives them) of ``shape`` ("ribosome" or
    "complex") for ``states``: each a set of change names from ``CHANGES`` plus
    ``"ligand"`` (the ligand present; absent otherwise), e.g. ``[(), ("ligand",),
    ("swing",), ("subunit", "ligand")]``; the swing turns the peripheral domain by
    ``swing_deg`` degrees."""
    if shape not in SHAPES:
        raise CryoClassError(f"phantom shape {shape!r}: use one of {sorted(SHAPES)}")
    out = []
    for state in states:
        unknown = set(state) - set(CHANGES[shape]) - {"ligand"}
        if unknown:
            raise CryoClassError(f"state {sorted(state)}: unknown change(s) "
                                 f"{sorted(unknown)}; use subunit, swing, ligand")
        absent = (() if "ligand" in state else ("ligand",))
        if "subunit" in state:
            absent = absent + tuple(CHANGES[shape]["subunit"])
        moves = []
        if "swing" in state:
            names, hinge, axis = CHANGES[shape]["swing"]
            moves.append((names, hinge, axis, float(swing_deg)))
        out.append((absent, moves))
    return out


def class_variants(n_classes, hinge_deg=20.0):
    """Per class: ``(absent domain names, [(domain names, hinge, axis, degrees), ...])``.

    1 = full particle, 2 = small-subunit head absent, 3 = small subunit rotated by
    ``hinge_deg`` about the interface hinge; 4 = both head absent and ratcheted, 5 = stalk
    swung by 2 * hinge_deg and protuberance absent, 6 = ratcheted the other way; beyond
    six, ratchet angles alternate in sign and grow by ``hinge_deg``.
    """
    ssu = ("ssu_body", "ssu_head")
    base = [
        ((), []),
        (("ssu_head",), []),
        ((), [(ssu, SSU_HINGE, SSU_AXIS, hinge_deg)]),
        (("ssu_head",), [(ssu, SSU_HINGE, SSU_AXIS, hinge_deg)]),
        (("lsu_protuberance",), [(("lsu_stalk",), STALK_HINGE, STALK_AXIS, 2 * hinge_deg)]),
        ((), [(ssu, SSU_HINGE, SSU_AXIS, -hinge_deg)]),
    ]
    out = []
    for k in range(n_classes):
        if k < len(base):
            out.append(base[k])
        else:
            step = (k - len(base)) // 2 + 2
            sign = 1.0 if (k - len(base)) % 2 == 0 else -1.0
            out.append(((), [(ssu, SSU_HINGE, SSU_AXIS, sign * step * hinge_deg)]))
    return out


def _rotation_about(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _inside(points, dom, R):
    if dom["kind"] == "ellipsoid":
        c = np.asarray(dom["centre"]) * R
        a = np.asarray(dom["axes"]) * R
        return (((points - c) / a) ** 2).sum(axis=1) <= 1.0
    p0, p1 = np.asarray(dom["start"]) * R, np.asarray(dom["end"]) * R
    d = p1 - p0
    t = np.clip(((points - p0) @ d) / (d @ d), 0.0, 1.0)
    closest = p0 + t[:, None] * d
    return np.linalg.norm(points - closest, axis=1) <= dom["radius"] * R


def _bounding_box(dom, R):
    if dom["kind"] == "ellipsoid":
        c = np.asarray(dom["centre"]) * R
        a = np.asarray(dom["axes"]) * R
        return c - a, c + a
    p0, p1 = np.asarray(dom["start"]) * R, np.asarray(dom["end"]) * R
    r = dom["radius"] * R
    return np.minimum(p0, p1) - r, np.maximum(p0, p1) + r


def _domain_volume(dom, R):
    if dom["kind"] == "ellipsoid":
        return 4.0 / 3.0 * np.pi * np.prod(np.asarray(dom["axes"]) * R)
    length = np.linalg.norm(np.subtract(dom["end"], dom["start"])) * R
    r = dom["radius"] * R
    return np.pi * r * r * length + 4.0 / 3.0 * np.pi * r ** 3


def _uniform_in(dom, R, n, rng):
    lo, hi = _bounding_box(dom, R)
    out = np.empty((0, 3))
    while len(out) < n:
        pts = rng.uniform(lo, hi, size=(max(2 * (n - len(out)), 64), 3))
        out = np.concatenate([out, pts[_inside(pts, dom, R)]])
    return out[:n]


def _fill_domain(dom, R, n_residues, rng):
    """Pseudo-residue positions (A) filling one domain: helices plus coil."""
    n_helix_target = int(round(HELIX_FRACTION * n_residues))
    helix_pts = []
    count = 0
    while count < n_helix_target:
        length = int(rng.integers(8, 21))
        centre = _uniform_in(dom, R, 1, rng)[0]
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        u = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        u /= np.linalg.norm(u)
        v = np.cross(axis, u)
        t = np.arange(length) - (length - 1) / 2.0
        phase = np.deg2rad(HELIX_TURN_DEG) * t + rng.uniform(0, 2 * np.pi)
        pts = (centre + np.outer(t * HELIX_RISE_A, axis)
               + HELIX_RADIUS_A * (np.outer(np.cos(phase), u) + np.outer(np.sin(phase), v)))
        pts = pts[_inside(pts, dom, R)]
        helix_pts.append(pts)
        count += len(pts)
    helix = np.concatenate(helix_pts)[:n_helix_target] if helix_pts else np.empty((0, 3))
    coil = _uniform_in(dom, R, n_residues - len(helix), rng)
    return np.concatenate([helix, coil])


def phantom_domains(box, apix, seed=0, diameter_fraction=0.65, shape="ribosome",
                    ligand=False):
    """Pseudo-residues of every domain: ``{name: (points (K, 3) in A, weight per point)}``.

    Points are (x, y, z) Angstrom about the box centre; the particle's largest extent is
    about ``diameter_fraction * box * apix``.  ``shape``: a key of ``SHAPES``;
    ``ligand``: also the shape's ligand (``LIGANDS``), filled from its own random stream
    so that the other domains are the same with or without it.
    """
    if shape not in SHAPES:
        raise CryoClassError(f"phantom shape {shape!r}: use one of {sorted(SHAPES)}")
    domains = SHAPES[shape]
    rng = np.random.default_rng([int(seed), 101] if shape == "ribosome"
                                else [int(seed), 101, 2])
    R = 0.5 * diameter_fraction * box * apix / 1.05  # domains reach ~1.05 R from the centre
    volumes = {name: _domain_volume(d, R) * d["density"] for name, d in domains.items()}
    n_total = sum(volumes.values()) / RESIDUE_VOLUME_A3
    thin = max(1.0, n_total / MAX_PSEUDO_RESIDUES)  # > 1: fewer points, heavier each
    out = {}
    for name, dom in domains.items():
        n_res = max(8, int(round(volumes[name] / RESIDUE_VOLUME_A3 / thin)))
        out[name] = (_fill_domain(dom, R, n_res, rng), float(thin))
    if ligand:
        rng = np.random.default_rng([int(seed), 103])
        for name, dom in LIGANDS[shape].items():
            n_res = max(8, int(round(_domain_volume(dom, R) * dom["density"]
                                     / RESIDUE_VOLUME_A3 / thin)))
            out[name] = (_fill_domain(dom, R, n_res, rng), float(thin))
    return out, R


def _moved_domains(domains, R, variant):
    """``{name: points}`` of the domains present in a class variant, after its moves."""
    absent, moves = variant
    moved = {name: pts for name, (pts, _) in domains.items()}
    tags = {name: () for name in domains}
    for names, hinge, axis, degrees in moves:
        rot = _rotation_about(axis, degrees)
        h = np.asarray(hinge) * R
        for name in names:
            moved[name] = (moved[name] - h) @ rot.T + h
            tags[name] = tags[name] + ((tuple(hinge), tuple(axis), float(degrees)),)
    return {name: (moved[name], tags[name]) for name in domains if name not in absent}


def class_atoms(domains, R, variant):
    """Points (A) and weights of one class variant (see :func:`class_variants`)."""
    present = _moved_domains(domains, R, variant)
    points = [present[name][0] for name in present]
    weights = [np.full(len(present[name][0]), domains[name][1]) for name in present]
    return np.concatenate(points), np.concatenate(weights)


def class_pieces(domains, R, variants):
    """Split the classes into pieces shared between them, to project each point once.

    Returns ``(pieces, membership)``: ``pieces`` a list of ``(points, weights)``, and
    ``membership (n_classes, n_pieces)`` 0/1 with class ``c`` = the sum of its pieces.
    Domains placed identically in the same set of classes go into one piece.
    """
    placements = {}  # (domain, placement tag) -> set of classes
    for c, variant in enumerate(variants):
        for name, (_, tag) in _moved_domains(domains, R, variant).items():
            placements.setdefault((name, tag), set()).add(c)
    groups = {}
    for (name, tag), members in placements.items():
        groups.setdefault(frozenset(members), []).append((name, tag))
    pieces, membership = [], np.zeros((len(variants), len(groups)), dtype=np.float64)
    for j, (members, items) in enumerate(groups.items()):
        pts, wts = [], []
        for name, tag in items:
            c = min(members)
            p = _moved_domains(domains, R, variants[c])[name][0]
            pts.append(p)
            wts.append(np.full(len(p), domains[name][1]))
        pieces.append((np.concatenate(pts), np.concatenate(wts)))
        membership[sorted(members), j] = 1.0
    return pieces, membership


# ----------------------------------------------------------------------------- projection

def _splat_kernel_ft(box, oversampling, ndim):
    """Transform of the (multi)linear splat kernel at the image's frequencies (sinc^2 per
    axis, frequency in cycles per fine pixel)."""
    k = (np.arange(box) - box // 2) / float(box * oversampling)
    t = np.sinc(k) ** 2
    grids = np.meshgrid(*([t] * ndim), indexing="ij")
    out = np.ones_like(grids[0])
    for g in grids:
        out = out * g
    return out


def _band_filter(box, sigma_px, ndim):
    """Gaussian pseudo-residue transform times a soft cut at Nyquist (radial, so the 3D
    filter's central slice is the 2D filter)."""
    grids = np.meshgrid(*([np.arange(box) - box // 2] * ndim), indexing="ij")
    k = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    gauss = np.exp(-2.0 * np.pi ** 2 * sigma_px ** 2 * (k / box) ** 2)
    half = box / 2.0
    edge = np.clip((k - 0.85 * half) / (0.15 * half), 0.0, 1.0)
    return gauss * (0.5 + 0.5 * np.cos(np.pi * edge))


def _splat(coords, weights, size, ndim):
    """Multilinear splat of points onto ``G`` flattened grids (one bincount).

    ``coords (G, K, ndim)`` are fine-grid index coordinates (last axis (x, y[, z])), all
    within ``[0, size - 1)``; returns ``(G,) + (size,) * ndim`` in C order (z, y, x).
    """
    G, K, _ = coords.shape
    if coords.size and (coords.min() < 0 or coords.max() >= size - 1):
        raise CryoClassError("the phantom does not fit in the box; use a larger --box")
    base = np.floor(coords)
    frac = coords - base
    cells = size ** ndim
    strides = np.array([size ** axis for axis in range(ndim)], dtype=np.int64)
    first = (base.astype(np.int64) @ strides) + (np.arange(G, dtype=np.int64) * cells)[:, None]
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), (G, K))
    idx = np.empty((2 ** ndim, G, K), dtype=np.int64)
    wts = np.empty((2 ** ndim, G, K), dtype=np.float64)
    for corner in range(2 ** ndim):
        w = weights
        step = 0
        for axis in range(ndim):
            bit = (corner >> axis) & 1
            w = w * (frac[..., axis] if bit else 1.0 - frac[..., axis])
            step += bit * int(strides[axis])
        idx[corner] = first + step
        wts[corner] = w
    out = np.bincount(idx.ravel(), weights=wts.ravel(), minlength=G * cells)
    return out.reshape((G,) + (size,) * ndim)


def _centred_spectrum(grids, box, ndim):
    """Centred transform, cropped to the ``box`` frequencies, of fine grids centred at
    index ``fine // 2``: ``(G, fine...) -> (G, box...)`` complex.

    A real FFT gives kx >= 0; the negative kx follow from Hermitian symmetry
    ``X(-k) = conj(X(k))``, and the centring is a sign ``(-1)^(kx+ky[+kz])`` (even box).
    """
    import scipy.fft
    fine = grids.shape[-1]
    half_box = box // 2
    half = scipy.fft.rfftn(grids, axes=tuple(range(-ndim, 0)), workers=-1)
    half = half[..., :half_box + 1]                          # kx = 0 .. N/2
    for axis in range(1, ndim):                              # other axes: -N/2 .. N/2-1
        half = np.concatenate([np.take(half, np.arange(fine - half_box, fine), axis=axis),
                               np.take(half, np.arange(0, half_box), axis=axis)], axis=axis)
    out = np.empty(half.shape[:-1] + (box,), dtype=half.dtype)
    out[..., half_box:] = half[..., :half_box]               # kx = 0 .. N/2-1
    # kx = -N/2 .. -1: conj of (-k_other, -kx); index i of a centred axis maps to N - i.
    neg = np.conj(half[..., 1:half_box + 1][..., ::-1])      # columns kx = N/2 .. 1
    for axis in range(1, ndim):
        neg = np.take(neg, np.mod(box - np.arange(box), box), axis=axis)
    out[..., :half_box] = neg
    sign = np.where((np.arange(box) - half_box) % 2 == 0, 1.0, -1.0)
    for axis in range(1, ndim + 1):
        shape = [1] * (ndim + 1)
        shape[axis] = box
        out *= sign.reshape(shape)
    return out


def atoms_to_map(points_a, weights, box, apix, sigma_a, oversampling=2):
    """Band-limited map ``(z, y, x)`` float32 of Gaussian pseudo-residues at ``points_a``
    (A, (x, y, z) about the centre), on the image greyscale (sum over z = projection)."""
    fine = box * oversampling
    coords = points_a / apix * oversampling + fine // 2
    grid = _splat(coords[None], weights, fine, 3)
    f = _centred_spectrum(grid, box, 3)[0]
    f = f * (_band_filter(box, sigma_a / apix, 3) / _splat_kernel_ft(box, oversampling, 3))
    return ifft_centered(f).real.astype(np.float32)


def project_atoms_ft(points_a, weights, matrices, box, apix, sigma_a, oversampling=2,
                     membership=None):
    """Centred transforms ``(n, box, box)`` of the projections of a pseudo-residue model
    at rotations ``matrices (n, 3, 3)`` (image position of point ``r`` is ``(A r)_xy``).

    With ``membership (C, P)``, ``points_a``/``weights`` are lists of ``P`` pieces and the
    result is ``(n, C, box, box)``: class ``c`` projects the sum of its pieces.
    """
    fine = box * oversampling
    single = membership is None
    if single:
        points_a, weights, membership = [points_a], [weights], np.ones((1, 1))
    n, C = len(matrices), membership.shape[0]
    grids = np.zeros((n, C, fine, fine))
    for j, (pts, wts) in enumerate(zip(points_a, weights)):
        xy = np.matmul(pts[None], np.transpose(matrices[:, :2, :], (0, 2, 1)))
        piece = _splat(xy * (oversampling / apix) + fine // 2, wts, fine, 2)
        for c in np.flatnonzero(membership[:, j]):
            grids[:, c] += piece
    f = _centred_spectrum(grids.reshape(n * C, fine, fine), box, 2).reshape(n, C, box, box)
    f = f * (_band_filter(box, sigma_a / apix, 2) / _splat_kernel_ft(box, oversampling, 2))
    return f[:, 0] if single else f


def shift_phase(box, origin_px):
    """``exp(+2 pi i (kx ox + ky oy) / N)`` ``(n, N, N)``: multiplying a centred transform
    by it shifts the image by MINUS the origin ``origin_px (n, 2)`` (x, y) pixels."""
    k = np.arange(box) - box // 2
    origin_px = np.asarray(origin_px, dtype=np.float64)
    phase_x = np.exp(2j * np.pi * origin_px[:, 0, None] * k[None] / box)   # (n, N) over kx
    phase_y = np.exp(2j * np.pi * origin_px[:, 1, None] * k[None] / box)   # (n, N) over ky
    return phase_y[:, :, None] * phase_x[:, None, :]


def random_poses(n, rng):
    """Uniform rotations on SO(3) as RELION Euler angles (degrees), ``(n, 3)``."""
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=1)


# ----------------------------------------------------------------------------- data set

def _class_sizes(n, n_classes, fractions):
    if fractions is None:
        fractions = np.full(n_classes, 1.0 / n_classes)
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) != n_classes or np.any(fractions < 0) or fractions.sum() <= 0:
        raise CryoClassError(f"class fractions {list(fractions)}: give {n_classes} "
                             "non-negative numbers (they are normalised to sum to 1)")
    fractions = fractions / fractions.sum()
    sizes = np.floor(fractions * n).astype(np.int64)
    # Hand the remainder to the largest fractional parts (deterministic).
    rest = n - sizes.sum()
    order = np.argsort(-(fractions * n - sizes), kind="stable")
    sizes[order[:rest]] += 1
    return sizes


def _micrograph_name(m):
    """``rlnMicrographName`` of micrograph ``m`` (0-based): one group per micrograph."""
    return f"Micrographs/mic{m + 1:03d}.mrc"


def simulate_dataset(out_dir, n=2000, box=64, apix=4.0, snr=0.05, n_classes=3, seed=0,
                     class_fractions=None, n_micrographs=10, max_shift_px=3.0,
                     defocus_range=(10000.0, 30000.0), astigmatism_max=600.0,
                     voltage=300.0, cs=2.7, q0=0.1, apply_ctf=True, hinge_deg=20.0,
                     sigma_a=None, oversampling=2, poses=None, origins_px=None, log=None,
                     norm_spread=0.0, scale_spread=0.0, shape="ribosome", states=None,
                     swing_deg=12.0):
    """Simulate a data set in ``out_dir`` (see the module docstring for the model).

    Writes ``particles.star`` (RELION 3.1: optics + particles, no angles/origins),
    ``particles.mrcs``, ``ref.mrc``, ``true_classKKK.mrc``, ``truth.star`` (the particle
    table plus rlnClassNumber, rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst) and
    ``truth_summary.json``.  Returns a dict with the paths, ``oracle_accuracy``,
    ``oracle_accuracy_25A``, ``class_sizes``, ``signal_scale`` and ``seconds``.

    ``poses`` (n, 3) Euler angles (degrees) and ``origins_px`` (n, 2) pixels replace the
    random ones (tests, benchmarks at chosen views).  ``norm_spread`` / ``scale_spread``
    (log-normal spreads, default 0 = none) vary each particle's image intensity / each
    micrograph's signal scale (module docstring).  ``states`` (a list of change sets,
    :func:`state_variants`) replaces the classes of :func:`class_variants` by states of
    ``shape`` built from independent changes (``n_classes`` must be their number), the
    swing by ``swing_deg`` degrees; ``shape`` picks the phantom (``SHAPES``).
    """
    t_start = time.time()
    box, n, n_classes = int(box), int(n), int(n_classes)
    apix, snr = float(apix), float(snr)
    _check_arguments(box, n, n_classes, snr, norm_spread, scale_spread)
    sigma_a = max(2.0, 0.6 * apix) if sigma_a is None else float(sigma_a)
    log = log or (lambda msg: None)
    os.makedirs(out_dir, exist_ok=True)
    if states is not None and len(states) != n_classes:
        raise CryoClassError(f"{len(states)} states for {n_classes} classes: give one "
                             "state per class")
    phantom = dict(shape=shape, states=states, swing_deg=float(swing_deg))
    t = _draw_truth(n, box, apix, n_classes, seed, class_fractions, n_micrographs,
                    max_shift_px, defocus_range, astigmatism_max, hinge_deg, poses,
                    origins_px, float(norm_spread), float(scale_spread), phantom)
    optics = dict(voltage=voltage, cs=cs, q0=q0)
    stack_path = os.path.join(out_dir, "particles.mrcs")
    images = _write_images(stack_path, t, box, apix, snr, seed, apply_ctf, optics, sigma_a,
                           oversampling)
    accuracy, accuracy_25, confusion = _oracle_accuracy(t, images)
    map_paths, ref_path = _write_maps(out_dir, t, box, apix, sigma_a, oversampling,
                                      images.scale)
    star_path, truth_path = _write_tables(out_dir, t, box, apix, apply_ctf, optics)
    seconds = time.time() - t_start
    summary = {
        "oracle_accuracy": accuracy, "oracle_accuracy_25A": accuracy_25,
        "snr": snr if images.noisy else "inf", "n": n, "classes": n_classes,
        "seed": int(seed), "class_sizes": [int(s) for s in t.sizes], "box": box,
        "apix": apix, "oracle_confusion": confusion.tolist(),
        "signal_scale": images.scale, "noise_sigma": 1.0 if images.noisy else 0.0,
        "ctf": bool(apply_ctf), "hinge_deg": float(hinge_deg), "sigma_A": sigma_a,
        "seconds": round(seconds, 2),
    }
    if states is not None or shape != "ribosome":
        summary.update(shape=shape, swing_deg=float(swing_deg),
                       states=None if states is None else [sorted(x) for x in states])
    summary_path = _write_summary(out_dir, summary, t, norm_spread, scale_spread)
    log(f"simulated {n} particles ({box} px, {apix:g} A/px, SNR {snr:g}, {n_classes} "
        f"classes) in {seconds:.1f} s; oracle accuracy {accuracy:.4f} "
        f"(<= {LOWRES_ORACLE_A:g} A: {accuracy_25:.4f})")
    return {
        "particles_star": star_path, "particles_mrcs": stack_path, "ref": ref_path,
        "true_maps": map_paths, "truth_star": truth_path, "summary": summary_path,
        "oracle_accuracy": accuracy, "oracle_accuracy_25A": accuracy_25,
        "class_sizes": [int(s) for s in t.sizes], "signal_scale": images.scale,
        "seconds": seconds,
    }


def _check_arguments(box, n, n_classes, snr, norm_spread, scale_spread):
    if box % 2 or box < 16:
        raise CryoClassError(f"--box {box}: use an even box of at least 16 pixels")
    if n < 1 or n_classes < 1:
        raise CryoClassError(f"--n {n} --classes {n_classes}: both must be >= 1")
    if not snr > 0:
        raise CryoClassError(f"--snr {snr:g}: must be > 0 (use inf for noise-free images)")
    if float(norm_spread) < 0 or float(scale_spread) < 0:
        raise CryoClassError(f"--norm_spread {float(norm_spread):g} --scale_spread "
                             f"{float(scale_spread):g}: give spreads >= 0")


@dataclass
class _Truth:
    """The drawn ground truth of a data set (one row per particle where indexed)."""
    atoms: list             # per class: (positions, weights) of its pseudo-residues
    pieces: list            # shared pieces of the classes and which class holds each
    membership: np.ndarray
    sizes: np.ndarray       # particles per class
    classes: np.ndarray     # (n,) true class, 0-based
    eulers: np.ndarray      # (n, 3) degrees
    origin_px: np.ndarray   # (n, 2) pixels, RELION's sign
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    micrograph: np.ndarray  # (n,) micrograph index
    n_micrographs: int
    norm_factor: object     # (n,) or None
    group_scale: object     # (n_micrographs,) or None


def _draw_truth(n, box, apix, n_classes, seed, class_fractions, n_micrographs, max_shift_px,
                defocus_range, astigmatism_max, hinge_deg, poses, origins_px, norm_spread,
                scale_spread, phantom=None):
    """Classes, poses, CTFs and intensity factors, from fixed random streams."""
    rng = np.random.default_rng([int(seed), 0])
    phantom = phantom or dict(shape="ribosome", states=None)
    states = phantom["states"]
    domains, R = phantom_domains(box, apix, seed, shape=phantom["shape"],
                                 ligand=states is not None)
    variants = (class_variants(n_classes, hinge_deg) if states is None
                else state_variants(phantom["shape"], states, phantom["swing_deg"]))
    atoms = [class_atoms(domains, R, v) for v in variants]
    pieces, membership = class_pieces(domains, R, variants)
    sizes = _class_sizes(n, n_classes, class_fractions)
    classes = rng.permutation(np.repeat(np.arange(n_classes), sizes))
    eulers = random_poses(n, rng)
    origin_px = rng.uniform(-max_shift_px, max_shift_px, size=(n, 2))
    if poses is not None:
        eulers = np.asarray(poses, dtype=np.float64).reshape(n, 3)
    if origins_px is not None:
        origin_px = np.asarray(origins_px, dtype=np.float64).reshape(n, 2)
    defocus = rng.uniform(defocus_range[0], defocus_range[1], n)
    astig = rng.uniform(0.0, astigmatism_max, n)
    defocus_angle = rng.uniform(-180.0, 180.0, n)
    micrograph = (np.arange(n) * n_micrographs) // n
    # Intensity variation, each from its own stream (the default output is unchanged).
    norm_factor = group_scale = None
    if norm_spread > 0:
        z = np.random.default_rng([int(seed), 11]).standard_normal(n)
        norm_factor = np.exp(norm_spread * z)
        norm_factor /= norm_factor.mean()
    if scale_spread > 0:
        group_scale = np.exp(scale_spread * np.random.default_rng(
            [int(seed), 13]).standard_normal(int(n_micrographs)))
        group_scale /= group_scale[micrograph].mean()
    return _Truth(atoms=atoms, pieces=pieces, membership=membership, sizes=sizes,
                  classes=classes, eulers=eulers, origin_px=origin_px,
                  defocus_u=defocus + astig / 2, defocus_v=defocus - astig / 2,
                  defocus_angle=defocus_angle, micrograph=micrograph,
                  n_micrographs=int(n_micrographs), norm_factor=norm_factor,
                  group_scale=group_scale)


@dataclass
class _ImageStatistics:
    """The oracle's sufficient statistics (pass 1 of :func:`_write_images`) and the
    signal scale: with image = s P_t + noise, the squared residual against class c
    exceeds the one against the true class t by s^2 D + 2 s E, with D = |P_t - P_c|^2
    and E = <noise, P_t - P_c> (``D25``, ``E25``: the same below
    ``LOWRES_ORACLE_A``)."""
    D: np.ndarray
    E: np.ndarray
    D25: np.ndarray
    E25: np.ndarray
    scale: float
    noisy: bool


def _write_images(stack_path, t, box, apix, snr, seed, apply_ctf, optics, sigma_a,
                  oversampling):
    """Pass 1 writes the noise-free images (unit scale) and scores them for the oracle;
    pass 2 scales the signal to ``snr`` and adds the same noise."""
    from .mrc_io import StackWriter
    n, n_classes = len(t.classes), len(t.atoms)
    k = (np.arange(box) - box // 2) / (box * apix)
    ky_a, kx_a = np.meshgrid(k, k, indexing="ij")
    kr = np.sqrt(kx_a ** 2 + ky_a ** 2) * box * apix
    lowres_idx = np.flatnonzero(kr.ravel() < box * apix / LOWRES_ORACLE_A)
    matrices = euler_to_matrix(t.eulers[:, 0], t.eulers[:, 1], t.eulers[:, 2])
    stats = _ImageStatistics(D=np.zeros((n, n_classes)), E=np.zeros((n, n_classes)),
                             D25=np.zeros((n, n_classes)), E25=np.zeros((n, n_classes)),
                             scale=1.0, noisy=bool(np.isfinite(snr)))
    signal_var = np.zeros(n)
    with StackWriter(stack_path, n, box, apix) as stack:
        for b0 in range(0, n, BATCH):
            sel = np.arange(b0, min(n, b0 + BATCH))
            mod = shift_phase(box, t.origin_px[sel])
            if apply_ctf:
                mod = mod * ctf_values(kx_a[None], ky_a[None], t.defocus_u[sel, None, None],
                                       t.defocus_v[sel, None, None],
                                       t.defocus_angle[sel, None, None], optics["voltage"],
                                       optics["cs"], optics["q0"])
            spectra = project_atoms_ft([p for p, _ in t.pieces], [w for _, w in t.pieces],
                                       matrices[sel], box, apix, sigma_a, oversampling,
                                       t.membership)
            spectra *= mod[:, None]                               # (B, C, N, N)
            f_true = spectra[np.arange(len(sel)), t.classes[sel]]
            p_true = ifft_centered(f_true, axes=(1, 2)).real
            stack.data[sel[0]:sel[-1] + 1] = p_true
            signal_var[sel] = p_true.reshape(len(sel), -1).var(axis=1)
            _score_batch(stats, sel, f_true, spectra, lowres_idx, seed, b0, box)
        mean_var = float(signal_var.mean())
        if not mean_var > 0:
            raise CryoClassError("simulated images have no signal; increase --box or --apix")
        stats.scale = float(np.sqrt((snr if stats.noisy else 1.0) / mean_var))
        _scale_and_add_noise(stack, t, stats, seed, box)
    return stats


def _score_batch(stats, sel, f_true, spectra, lowres_idx, seed, b0, box):
    """The oracle's D and E of one batch (Parseval with unnormalised transforms:
    sum_x |p|^2 = sum_k |P|^2 / N^2)."""
    n_classes = spectra.shape[1]
    fdiff = (f_true[:, None] - spectra).reshape(len(sel), n_classes, -1)
    power = fdiff.real ** 2 + fdiff.imag ** 2
    stats.D[sel] = power.sum(axis=2) / box ** 2
    stats.D25[sel] = power[:, :, lowres_idx].sum(axis=2) / box ** 2
    if stats.noisy:
        fnoise = np.conj(fft_centered(_batch_noise(seed, b0, len(sel), box),
                                      axes=(1, 2))).reshape(len(sel), 1, -1)
        cross = (fnoise * fdiff).real / box ** 2
        stats.E[sel] = cross.sum(axis=2)
        stats.E25[sel] = cross[:, :, lowres_idx].sum(axis=2)


def _scale_and_add_noise(stack, t, stats, seed, box):
    """Pass 2: the signal times the scale (and the micrograph's factor), plus the noise
    pass 1 scored, all times the particle's norm factor."""
    n = len(t.classes)
    for b0 in range(0, n, BATCH):
        b1 = min(n, b0 + BATCH)
        block = np.asarray(stack.data[b0:b1], dtype=np.float64) * stats.scale
        if t.group_scale is not None:
            block *= t.group_scale[t.micrograph[b0:b1]][:, None, None]
        if stats.noisy:
            block += _batch_noise(seed, b0, b1 - b0, box)
        if t.norm_factor is not None:
            block *= t.norm_factor[b0:b1][:, None, None]
        stack.data[b0:b1] = block.astype(np.float32)


def _oracle_accuracy(t, stats):
    """Accuracy of the least-residual class (all frequencies, and below 25 A) and the
    confusion matrix (true class x oracle class)."""
    n, n_classes = stats.D.shape

    def labels(dd, ee):
        if t.group_scale is None:
            margin = stats.scale * stats.scale * dd + 2.0 * stats.scale * ee
        else:
            # Each particle's signal scale; a norm factor scales signal and noise alike
            # and cancels from the comparison.
            s_i = (stats.scale * t.group_scale[t.micrograph])[:, None]
            margin = s_i * s_i * dd + 2.0 * s_i * ee
        margin[np.arange(n), t.classes] = 0.0
        return np.argmin(margin, axis=1)

    oracle_labels, oracle_labels_25 = labels(stats.D, stats.E), labels(stats.D25, stats.E25)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (t.classes, oracle_labels), 1)
    return (float(np.mean(oracle_labels == t.classes)),
            float(np.mean(oracle_labels_25 == t.classes)), confusion)


def _write_maps(out_dir, t, box, apix, sigma_a, oversampling, scale):
    """``true_classKKK.mrc`` (on the images' greyscale) and ``ref.mrc`` (their
    class-size-weighted mean low-passed to ``REF_LOWPASS_A``)."""
    from .mrc_io import write_map
    n = len(t.classes)
    true_maps = [atoms_to_map(p, w, box, apix, sigma_a, oversampling) * scale
                 for p, w in t.atoms]
    map_paths = []
    for c, vol in enumerate(true_maps):
        path = os.path.join(out_dir, f"true_class{c + 1:03d}.mrc")
        write_map(path, vol, apix)
        map_paths.append(path)
    consensus = sum(vol * (size / n) for vol, size in zip(true_maps, t.sizes))
    ref = low_pass(consensus.astype(np.float32), apix, REF_LOWPASS_A)
    ref_path = os.path.join(out_dir, "ref.mrc")
    write_map(ref_path, ref, apix)
    return map_paths, ref_path


def _write_tables(out_dir, t, box, apix, apply_ctf, optics):
    """``particles.star`` (what a user gets) and ``truth.star`` (plus the truth)."""
    from .star_io import optics_group_table, write_particles, write_star
    n = len(t.classes)
    optics_df = optics_group_table(apix, box, voltage=optics["voltage"], cs=optics["cs"],
                                   q0=optics["q0"])
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnMicrographName": [_micrograph_name(m) for m in t.micrograph],
        "rlnDefocusU": t.defocus_u if apply_ctf else np.zeros(n),
        "rlnDefocusV": t.defocus_v if apply_ctf else np.zeros(n),
        "rlnDefocusAngle": t.defocus_angle if apply_ctf else np.zeros(n),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    if not apply_ctf:
        particles = particles.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    star_path = os.path.join(out_dir, "particles.star")
    write_particles(star_path, optics_df, particles)
    truth = particles.copy()
    truth["rlnClassNumber"] = t.classes + 1
    truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"] = t.eulers.T
    truth["rlnOriginXAngst"] = t.origin_px[:, 0] * apix
    truth["rlnOriginYAngst"] = t.origin_px[:, 1] * apix
    truth_blocks = {"optics": optics_df, "particles": truth}
    if t.norm_factor is not None:
        truth["rlnNormCorrection"] = t.norm_factor
    if t.group_scale is not None:
        truth_blocks["groups"] = pd.DataFrame({
            "rlnMicrographName": [_micrograph_name(m) for m in range(t.n_micrographs)],
            "rlnGroupScaleCorrection": t.group_scale,
            "rlnGroupNrParticles": np.bincount(t.micrograph, minlength=t.n_micrographs),
        })
    truth_path = os.path.join(out_dir, "truth.star")
    write_star(truth_path, truth_blocks)
    return star_path, truth_path


def _write_summary(out_dir, summary, t, norm_spread, scale_spread):
    """``truth_summary.json`` (atomically)."""
    if t.norm_factor is not None:
        summary["norm_spread"] = float(norm_spread)
    if t.group_scale is not None:
        summary["scale_spread"] = float(scale_spread)
        summary["group_scales"] = {_micrograph_name(m): float(v)
                                   for m, v in enumerate(t.group_scale)}
    summary_path = os.path.join(out_dir, "truth_summary.json")
    tmp = summary_path + f".tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, summary_path)
    return summary_path


def _batch_noise(seed, start, count, box):
    """White unit Gaussian noise for particles ``start .. start+count-1`` (fixed batches,
    so pass 2 can regenerate exactly what pass 1 scored)."""
    rng = np.random.default_rng([int(seed), 7, int(start)])
    return rng.standard_normal((count, box, box))
