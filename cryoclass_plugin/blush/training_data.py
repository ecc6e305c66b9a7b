"""Training pairs for the Blush denoiser: synthetic clean maps and reconstruction-like
degradations (numpy, deterministic from a ``numpy.random.Generator``).

Clean maps (all coordinates in A, about the box centre; one Gaussian blob per
pseudo-atom, rendered on a grid of ``apix`` A):
- protein domains: ellipsoids (semi-axes 12-35 A) packed with alpha helices (C-alpha
  on a 2.3 A radius helix, 1.5 A rise, 100 degrees a residue), beta sheets (strands at
  3.3 A a residue, 4.8 A apart, pleated and twisted) and coil (3.8 A random walks);
- RNA-like A-form double helices (2.8 A rise, 32.7 degrees a base pair; phosphate,
  sugar and base blobs at radii 8.7, 6.5 and 3 A, a nucleotide weighing ~2.5 residues);
- symmetric assemblies (C2-C8 and D2-D4 of one or two domains);
- composites: 2-8 domains and helices packed in a sphere of radius 30-70 A.
None of these uses :mod:`cryoclass_plugin.engine.simulate` (whose phantoms are kept
for the benchmark, unseen in training).

Degradation (:func:`degrade`), in Fourier space on the clean map's grid, the way a
regularised reconstruction ``V = sum X / (W + 1 / (T tau2))`` sees a structure:
- B-factor blur ``exp(-B |k|^2 / 4)``, B in [0, 200] A^2: the signal S; the training
  target is S (same blur: the network denoises, it does not sharpen);
- per-shell SSNR ``exp(beta (k0^2 - |k|^2))`` (capped at 1000) through 1 at
  ``1 / k0`` drawn log-uniformly in 5-30 A, beta log-uniformly in [150, 2000] A^2
  (from a shallow fall, FSC-0.5 a little beyond the SSNR-1 point, to a steep one);
- per-voxel weight ``W = SSNR / tau2`` (tau2 = the signal power per shell), times a
  defocus-averaged CTF^2 (300 kV, three defoci in 0.8-3 um, 10 % amplitude contrast:
  low weight at the lowest frequencies, residual ripples) normalised per shell, times,
  in half of the samples, a preferred-orientation factor
  ``(1 - a) + a * 2 (1 - (k.u)^2)`` (a in [0, 0.9]) around a random axis ``u``;
- data ``sum X = W S + sqrt(W) n`` (n complex Gaussian of unit variance per
  component: the CTF^2-weighted noise of the back-projected images);
- ``V = sum X / (W + 1 / (T tau2'))`` with T in [1, 4] and ``tau2'`` the true tau2
  times a smooth random per-shell factor (log-normal, sd 0.4) and an overall factor in
  [0.5, 2]: a mis-estimated prior, as in early iterations;
- in 30 % of the samples, input and target cut at the Nyquist frequency of a pixel 1-1.5x
  the map's (data at a coarser pixel size than the network's, resampled).
"""
import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

#: Residues per A^3 of protein (0.81 Da / A^3, 110 Da a residue).
RESIDUE_DENSITY = 1.0 / 135.0
#: Fraction of the degraded maps band-limited (input and target alike) at the Nyquist
#: of a coarser pixel, 1-1.5x the map's: data at a coarser pixel size than the network's.
BAND_LIMIT_FRACTION = 0.3
#: Electron wavelength (A) at 300 kV.
WAVELENGTH_300KV = 0.019687


# ----------------------------------------------------------------------------- structures

def _random_unit(rng):
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _frame(axis, rng):
    """Two unit vectors orthogonal to ``axis`` and to each other."""
    a = _random_unit(rng)
    u = np.cross(axis, a)
    u /= np.linalg.norm(u)
    return u, np.cross(axis, u)


def helix_ca(start, axis, n, rng):
    u, v = _frame(axis, rng)
    i = np.arange(n)[:, None]
    ang = np.deg2rad(100.0) * i
    return start + 1.5 * i * axis + 2.3 * (np.cos(ang) * u + np.sin(ang) * v)


def sheet_ca(start, axis, n_strands, length, rng):
    u, v = _frame(axis, rng)
    twist = np.deg2rad(rng.uniform(-20, 20))
    pts = []
    for s in range(n_strands):
        rot = Rotation.from_rotvec(u * twist * s).apply(axis)
        i = np.arange(length)[:, None]
        pleat = 0.9 * ((-1.0) ** np.arange(length))[:, None] * v
        pts.append(start + s * 4.8 * u + 3.3 * i * rot + pleat)
    return np.concatenate(pts)


def _accept(points, existing_tree, inside, min_dist=3.6):
    if not np.all(inside(points)):
        return False
    if existing_tree is None:
        return True
    d, _ = existing_tree.query(points)
    return bool(np.all(d > min_dist))


def protein_domain(rng, centre, semi_axes):
    """Pseudo-C-alpha positions (n, 3) packing an ellipsoid (rotated at random)."""
    rot = Rotation.random(random_state=rng)
    semi = np.asarray(semi_axes, dtype=np.float64)

    def inside(p):
        q = rot.inv().apply(p - centre) / semi
        return (q ** 2).sum(axis=1) <= 1.0

    target = int(RESIDUE_DENSITY * 4.0 / 3.0 * np.pi * semi.prod())
    helix_frac = rng.uniform(0.0, 1.0)
    pts = np.zeros((0, 3))
    tree = None
    for _ in range(100 + target // 2):
        if pts.shape[0] >= 0.7 * target:
            break
        start = centre + rot.apply(semi * rng.uniform(-1, 1, size=3) * 0.8)
        axis = _random_unit(rng)
        kind = rng.uniform()
        if kind < helix_frac:
            cand = helix_ca(start, axis, int(rng.integers(7, 26)), rng)
        elif kind < helix_frac + (1 - helix_frac) * 0.7:
            cand = sheet_ca(start, axis, int(rng.integers(2, 6)), int(rng.integers(4, 10)), rng)
        else:
            steps = rng.normal(size=(int(rng.integers(4, 12)), 3))
            steps = 3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
            cand = start + np.cumsum(steps, axis=0)
        if _accept(cand, tree, inside):
            pts = np.concatenate([pts, cand])
            tree = cKDTree(pts)
    return pts


def rna_helix(rng, centre, n_bp):
    """A-form double helix: blob positions (n, 3) and weights (n,)."""
    axis = _random_unit(rng)
    u, v = _frame(axis, rng)
    i = np.arange(n_bp)
    z = (i - n_bp / 2.0) * 2.81
    pts, wts = [], []
    for strand, offset in ((0, 0.0), (1, np.deg2rad(140.0))):
        ang = np.deg2rad(32.7) * i + offset
        for radius, weight, dphi in ((8.7, 1.2, 0.0), (6.5, 0.8, 0.25), (3.0, 1.0, 0.45)):
            a = ang + (dphi if strand == 0 else -dphi)
            p = (centre + z[:, None] * axis
                 + radius * (np.cos(a)[:, None] * u + np.sin(a)[:, None] * v))
            pts.append(p)
            wts.append(np.full(n_bp, weight))
    return np.concatenate(pts), np.concatenate(wts)


def _symmetry_ops(rng):
    if rng.uniform() < 0.7:
        n = int(rng.integers(2, 9))
        return [Rotation.from_rotvec([0, 0, 2 * np.pi * j / n]) for j in range(n)]
    n = int(rng.integers(2, 5))
    ops = [Rotation.from_rotvec([0, 0, 2 * np.pi * j / n]) for j in range(n)]
    flip = Rotation.from_rotvec([np.pi, 0, 0])
    return ops + [flip * o for o in ops]


def symmetric_assembly(rng):
    ops = _symmetry_ops(rng)
    n = len(ops)
    r_sub = rng.uniform(12.0, 25.0) * (1.0 if n <= 4 else 0.7)
    ring = rng.uniform(0.6, 1.2) * r_sub * max(1.0, n / np.pi)
    z = rng.uniform(4.0, 15.0) if n > 1 else 0.0
    centre = np.array([ring, 0.0, z])
    sub = protein_domain(rng, centre, r_sub * rng.uniform(0.7, 1.2, size=3))
    pts = np.concatenate([op.apply(sub) for op in ops])
    whole = Rotation.random(random_state=rng)
    return whole.apply(pts), np.ones(pts.shape[0])


def composite(rng, max_radius):
    radius = rng.uniform(30.0, max_radius)
    pts, wts = [], []
    for _ in range(int(rng.integers(2, 9))):
        c = _random_unit(rng) * rng.uniform(0, radius * 0.6)
        semi = rng.uniform(12.0, 35.0, size=3)
        semi = np.minimum(semi, max(radius - np.linalg.norm(c), 12.0))
        p = protein_domain(rng, c, semi)
        pts.append(p)
        wts.append(np.ones(p.shape[0]))
    rna_prob = rng.uniform()
    for _ in range(int(rng.integers(0, 4)) if rna_prob < 0.5 else 0):
        p, w = rna_helix(rng, _random_unit(rng) * rng.uniform(0, radius * 0.6),
                         int(rng.integers(8, 30)))
        pts.append(p)
        wts.append(w)
    return np.concatenate(pts), np.concatenate(wts)


def random_structure(rng, max_radius=70.0):
    """One random structure: (points (n, 3) A, weights (n,))."""
    kind = rng.uniform()
    if kind < 0.25:
        pts, w = symmetric_assembly(rng)
    elif kind < 0.35:
        ps, ws = [], []
        for _ in range(int(rng.integers(2, 7))):
            centre = _random_unit(rng) * rng.uniform(0, 30)
            p, wt = rna_helix(rng, centre, int(rng.integers(10, 35)))
            ps.append(p)
            ws.append(wt)
        pts, w = np.concatenate(ps), np.concatenate(ws)
    else:
        pts, w = composite(rng, max_radius)
    keep = np.linalg.norm(pts, axis=1) <= max_radius
    return pts[keep], w[keep]


# ----------------------------------------------------------------------------- rendering

def _freq(box, apix):
    """|k| in 1/A of every element of a centred ``box``^3 transform, and the grids."""
    k = (np.arange(box) - box // 2) / (box * apix)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return kz, ky, kx


def fft_c(a):
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a)))


def ifft_c(f):
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f))).real


def render(points, weights, box, apix, sigma=1.8):
    """Density of Gaussian blobs (width ``sigma`` A) on a ``box``^3 grid of ``apix`` A;
    point (0, 0, 0) is voxel ``box // 2``; trilinear splat corrected by its transfer
    function (sinc^2), then the Gaussian's transform."""
    pos = points[:, ::-1] / apix + box // 2          # (z, y, x) voxel coordinates
    base = np.floor(pos).astype(np.int64)
    frac = pos - base
    grid = np.zeros(box ** 3)
    for corner in range(8):
        off = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        w = np.prod(np.where(off, frac, 1 - frac), axis=1) * weights
        idx = base + off
        ok = np.all((idx >= 0) & (idx < box), axis=1)
        flat = np.ravel_multi_index(idx[ok].T, (box,) * 3)
        grid += np.bincount(flat, weights=w[ok], minlength=box ** 3)
    kz, ky, kx = _freq(box, apix)
    transfer = (np.sinc(kz * apix) * np.sinc(ky * apix) * np.sinc(kx * apix)) ** 2
    gauss = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (kz ** 2 + ky ** 2 + kx ** 2))
    f = fft_c(grid.reshape((box,) * 3)) * gauss / np.maximum(transfer, 0.05)
    return ifft_c(f).astype(np.float32)


def clean_map(rng, box, apix):
    """A random clean map (float32 ``box``^3) and its structure's radius (A)."""
    max_radius = min(70.0, 0.42 * box * apix)
    pts, w = random_structure(rng, max_radius)
    radius = float(np.linalg.norm(pts, axis=1).max()) if pts.shape[0] else 20.0
    return render(pts, w, box, apix, sigma=rng.uniform(1.5, 2.2)), radius


# ----------------------------------------------------------------------------- degradation

def _shell_mean(values, shells, n):
    return np.bincount(shells.ravel(), weights=values.ravel(), minlength=n)[:n] / np.maximum(
        np.bincount(shells.ravel(), minlength=n)[:n], 1)


def _ctf2_average(k2, rng):
    ctf2 = np.zeros_like(k2)
    amp = np.arctan(0.1 / np.sqrt(1 - 0.01))
    for defocus in rng.uniform(8000.0, 30000.0, size=3):
        gamma = np.pi * WAVELENGTH_300KV * defocus * k2 + amp
        ctf2 += np.sin(gamma) ** 2 / 3.0
    return ctf2


def degrade(clean, apix, rng, signal=True, fixed=None):
    """``(degraded, target)`` float32 maps: a regularised reconstruction of ``clean``
    (module docstring) and the clean map with the same B-factor blur.  With
    ``signal=False`` the data hold the noise only (``sum X = sqrt(W) n``, with the weights
    and prior ``clean`` would have) and the target is zero: a reconstruction of nothing,
    which must stay (almost) nothing.

    ``fixed`` (benchmarks) sets some of the random choices: ``b_factor`` (A^2),
    ``crossover_a`` (A, where the SSNR is 1), ``beta`` (A^2), ``preferred`` (the
    anisotropy a, 0 = none), ``prior_factor`` (the prior's T, with the true tau2: no
    per-shell error), ``band_limit_a`` (A, 0 = none).  The random
    stream is drawn as without ``fixed``, so the other choices do not change."""
    fixed = fixed or {}
    box = clean.shape[0]
    kz, ky, kx = _freq(box, apix)
    k2 = kz ** 2 + ky ** 2 + kx ** 2
    shells = np.rint(np.sqrt(k2) * box * apix).astype(np.int64)
    n_sh = int(shells.max()) + 1
    b_factor = fixed.get("b_factor", rng.uniform(0.0, 200.0))
    s = fft_c(clean) * np.exp(-b_factor * k2 / 4.0)
    tau2 = np.maximum(_shell_mean(np.abs(s) ** 2 / 2.0, shells, n_sh), 1e-30)
    k0 = 1.0 / fixed.get("crossover_a", np.exp(rng.uniform(np.log(5.0), np.log(30.0))))
    beta = fixed.get("beta", np.exp(rng.uniform(np.log(150.0), np.log(2000.0))))
    ssnr = np.minimum(np.exp(beta * (k0 ** 2 - k2)), 1000.0)
    shape = _ctf2_average(k2, rng)
    if rng.uniform() < 0.5 or fixed.get("preferred", 0.0) > 0:
        u = _random_unit(rng)
        kn = np.sqrt(np.maximum(k2, 1e-30))
        cos2 = ((kz * u[0] + ky * u[1] + kx * u[2]) / kn) ** 2
        a = fixed.get("preferred", rng.uniform(0.0, 0.9))
        shape = shape * ((1 - a) + a * 2.0 * (1 - cos2))
    shape = shape / np.maximum(_shell_mean(shape, shells, n_sh)[shells], 1e-12)
    weight = ssnr * shape / tau2[shells]
    noise = fft_c(rng.normal(scale=np.sqrt(2.0 / box ** 3), size=clean.shape))
    sum_x = (weight * s if signal else 0.0) + np.sqrt(weight) * noise
    perturb = np.exp(np.convolve(rng.normal(0, 0.4, n_sh + 4), np.ones(5) / np.sqrt(5),
                                 mode="same")[2:n_sh + 2]) * np.exp(rng.uniform(np.log(0.5),
                                                                               np.log(2.0)))
    fudge = rng.uniform(1.0, 4.0)
    if "prior_factor" in fixed:
        perturb, fudge = np.ones(n_sh), fixed["prior_factor"]
    prior = 1.0 / (fudge * tau2 * perturb)
    v = sum_x / (weight + prior[shells])
    limit = (1.0 / (2.0 * rng.uniform(apix, 1.5 * apix))
             if rng.uniform() < BAND_LIMIT_FRACTION else None)
    if "band_limit_a" in fixed:
        limit = 1.0 / fixed["band_limit_a"] if fixed["band_limit_a"] > 0 else None
    if limit is not None:
        keep = np.sqrt(k2) < limit
        v, s = v * keep, s * keep
    target = ifft_c(s) if signal else np.zeros_like(clean)
    return ifft_c(v).astype(np.float32), target.astype(np.float32)
