"""Point-group symmetry with RELION's names and axis conventions.

Names (case-insensitive, as ``relion_refine --sym``): ``C1``, ``Cn``, ``Ci``, ``Cs``,
``Cnv``, ``Cnh``, ``Sn`` (n even), ``Dn``, ``Dnv``, ``Dnh``, ``T``, ``Td``, ``Th``,
``O``, ``Oh``, ``I`` (= ``I2``), ``I1`` .. ``I4``, ``Ih`` (= ``I2h``), ``I1h`` .. ``I4h``.
``I5`` is refused, as in RELION.

Axes (from RELION's ``SymList::fill_symmetry_class``, vectors (x, y, z)):

- ``Cn``: n-fold about z.  ``Dn``: n-fold about z and a 2-fold about x.
- ``T``: 3-fold about z, 2-fold about (0, sqrt(2/3), sqrt(1/3)).
- ``O``: 3-fold about (1, 1, 1)/sqrt(3), 4-fold about z (so 4-folds on x, y, z).
- ``I2`` (= ``I``, RELION's default; Crowther's 222 setting, 2-folds on x, y, z):
  2-fold about z, 5-fold about (1, 0, phi)/|.|, 3-fold about (0, 1/phi, phi)/sqrt(3)
  with phi the golden ratio, i.e. the 5-fold axes lie in the xz-plane.
- ``I1`` (Crowther 222 rotated 90 degrees about y): 2-fold about x,
  5-fold about (phi, 0, -1)/|.|, 3-fold about (phi, 1/phi, 0)/sqrt(3).
- ``I3`` (5-fold on z, 2-fold in the xz-plane at x < 0) and ``I4`` (5-fold at
  (2, 0, 1)/sqrt(5)), with RELION's numbers.
- ``Ci``: inversion; ``Cs``: mirror z -> -z; the ``v``/``h``/``d`` groups add RELION's
  mirror planes (improper matrices, determinant -1).

Matrices act on (x, y, z) coordinates of the map: a map ``V`` has the symmetry when
``V(g x) = V(x)`` for every ``g`` in the group.  For a particle orientation ``A``
(:mod:`.geometry`), ``A`` and ``A g`` give the same projection of a symmetric map, so
the projection directions ``d = A[2]`` and ``g^T d`` are equivalent; the group acting
on directions is therefore the same set of matrices.

Asymmetric unit: :func:`asymmetric_unit_mask` reproduces RELION's
``HealpixSampling::removeSymmetryEquivalentPoints``: a geometric cut (a wedge in rot and
tilt for Cn/Dn, three great-circle planes for T/O/I) followed by the greedy removal of
seam points that lie within ``seam_deg`` of a symmetry image of a direction kept
earlier.  Projections of improper groups (mirrors, inversion) are not equivalent under
a rotation, so for directions we use the group's proper (rotational) subgroup, e.g.
``D7h`` samples like ``D7`` and ``Ci``/``Cs`` like ``C1``.  (RELION also uses the
mirror planes there; particles are chiral, so that is never wanted in practice.)
"""
import re
from dataclasses import dataclass

import numpy as np

from .errors import CryoClassError
from .geometry import euler_to_matrix
from .backend import get_xp

VALID_FORMS = ("C1, Cn, Ci, Cs, Cnv, Cnh, Sn (n even), Dn, Dnv, Dnh, T, Td, Th, O, Oh, "
               "I (=I2), I1..I4, Ih, I1h..I4h")


@dataclass(frozen=True)
class SymmetryGroup:
    """A parsed symmetry name.

    ``name``: canonical spelling (upper case, suffix letters lower case: ``C7``,
    ``D2h``, ``I2``; ``I`` becomes ``I2`` and ``Ih`` ``I2h``).  ``family``: one of
    ``C, CI, CS, CV, CH, S, D, DV, DH, T, TD, TH, O, OH, I, IH``.  ``n``: the axial
    order for the C/S/D families (else 0).  ``variant``: 1..4 for icosahedral
    settings (else 0).
    """
    name: str
    family: str
    n: int = 0
    variant: int = 0

    @property
    def order(self):
        """Number of group elements."""
        return len(symmetry_matrices(self))

    @property
    def is_proper(self):
        """True when every element is a rotation (no mirror or inversion)."""
        return self.family in ("C", "D", "T", "O", "I")

    def proper_subgroup(self):
        """The rotational subgroup (the group used for projection directions)."""
        f = self.family
        if f in ("C", "D", "T", "O", "I"):
            return self
        if f in ("CI", "CS"):
            return SymmetryGroup("C1", "C", 1)
        if f in ("CV", "CH"):
            return SymmetryGroup(f"C{self.n}", "C", self.n)
        if f == "S":
            return SymmetryGroup(f"C{self.n // 2}", "C", self.n // 2)
        if f in ("DV", "DH"):
            return SymmetryGroup(f"D{self.n}", "D", self.n)
        if f in ("TD", "TH"):
            return SymmetryGroup("T", "T")
        if f == "OH":
            return SymmetryGroup("O", "O")
        return SymmetryGroup(f"I{self.variant}", "I", 0, self.variant)  # IH

    def __str__(self):
        return self.name


_AXIAL = re.compile(r"^([CSD])(\d+)([VH]?)$")


def parse_symmetry(sym):
    """Parse a RELION symmetry name (case-insensitive) into a :class:`SymmetryGroup`.

    Accepts a :class:`SymmetryGroup` unchanged.  Raises :class:`CryoClassError` with a
    one-line message listing the valid forms for anything else.
    """
    if isinstance(sym, SymmetryGroup):
        return sym
    text = str(sym).strip()
    s = text.upper()

    def bad(why=""):
        return CryoClassError(f"symmetry '{text}' is not valid{why}; use one of: "
                              f"{VALID_FORMS}")

    m = _AXIAL.match(s)
    if m:
        letter, n, suffix = m.group(1), int(m.group(2)), m.group(3)
        if n < 1:
            raise bad(" (the order must be at least 1)")
        if letter == "S":
            if suffix:
                raise bad()
            if n % 2:
                raise bad(" (Sn needs an even n)")
            return SymmetryGroup(f"S{n}", "S", n)
        family = letter + {"": "", "V": "V", "H": "H"}[suffix]
        return SymmetryGroup(f"{letter}{n}{suffix.lower()}", family, n)
    if s in ("CI", "CS"):
        return SymmetryGroup(s[0] + s[1].lower(), s)
    if s in ("T", "TD", "TH", "O", "OH"):
        return SymmetryGroup(s[0] + s[1:].lower(), s)
    m = re.match(r"^I([1-5]?)(H?)$", s)
    if m:
        variant = int(m.group(1) or 2)
        if variant == 5:
            raise bad(" (RELION does not implement I5)")
        h = m.group(2)
        return SymmetryGroup(f"I{variant}{h.lower()}", "I" + h, 0, variant)
    raise bad()


# ---------------------------------------------------------------------------- matrices
_PHI = (1.0 + 5.0 ** 0.5) / 2.0


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def rotation_about_axis(axis, angle_deg):
    """Right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues), (3, 3)."""
    u = _unit(axis)
    a = np.deg2rad(angle_deg)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * (K @ K)


def _mirror(normal):
    n = _unit(normal)
    return np.eye(3) - 2.0 * np.outer(n, n)


_THETA5 = float(np.degrees(np.arctan(1.0 / _PHI)))   # 31.7175 deg: z to an I2 5-fold
_I2_AXES = [(2, (0.0, 0.0, 1.0)), (5, (1.0, 0.0, _PHI)), (3, (0.0, 1.0 / _PHI, _PHI))]


def _icosa_axes(variant):
    """RELION's icosahedral settings.  I1 is I2 turned 90 deg about y (2-fold on x, 5-fold
    at (phi, 0, -1)); I3 and I4 are I2 turned by -/+ 31.7175 deg about y (5-fold on z,
    resp. 2-fold at (0.5257, 0, 0.8507)); this reproduces RELION's axis numbers for
    I1, I3 and I4 to their printed precision, exactly."""
    turn = {1: 90.0, 2: 0.0, 3: -_THETA5, 4: _THETA5}[variant]
    R = rotation_about_axis((0, 1, 0), turn)
    return [(fold, R @ _unit(axis)) for fold, axis in _I2_AXES]


# Mirror-plane normals of the Ih settings (RELION: I1h (0,0,-1), I2h (1,0,0),
# I3h (0.850650807, 0, 0.525731114), I4h (0.850650807, 0, -0.525731114)).
_ICOSA_MIRROR = {1: (0, 0, -1), 2: (1, 0, 0), 3: (_PHI, 0, 1), 4: (_PHI, 0, -1)}


def _generators(g):
    f, n = g.family, g.n
    z = (0, 0, 1)
    gens = []
    if f in ("C", "CV", "CH", "D", "DV", "DH"):
        gens.append(rotation_about_axis(z, 360.0 / n))
    if f in ("D", "DV", "DH"):
        gens.append(rotation_about_axis((1, 0, 0), 180.0))
    if f == "S":
        gens += [rotation_about_axis(z, 360.0 / (n // 2)), -np.eye(3)]
    if f == "CI":
        gens.append(-np.eye(3))
    if f in ("CS", "CH", "DH"):
        gens.append(_mirror(z))
    if f == "CV":
        gens.append(_mirror((0, 1, 0)))
    if f == "DV":
        gens.append(_mirror((1, 0, 0)))
    if f in ("T", "TD", "TH"):
        gens += [rotation_about_axis(z, 120.0),
                 rotation_about_axis((0, np.sqrt(2 / 3), np.sqrt(1 / 3)), 180.0)]
    if f == "TD":
        gens.append(_mirror((1.0, np.sqrt(3.0), 0.0)))   # RELION: (1.4142136, 2.4494897, 0)
    if f == "TH":
        gens.append(-np.eye(3))
    if f in ("O", "OH"):
        gens += [rotation_about_axis((1, 1, 1), 120.0), rotation_about_axis(z, 90.0)]
    if f == "OH":
        gens.append(_mirror((0, 1, 1)))
    if f in ("I", "IH"):
        gens += [rotation_about_axis(axis, 360.0 / fold) for fold, axis in _icosa_axes(g.variant)]
    if f == "IH":
        gens.append(_mirror(_ICOSA_MIRROR[g.variant]))
    return gens


def _polish(M):
    """Nearest orthogonal matrix (keeps the determinant's sign); zeroes tiny entries."""
    U, _, Vt = np.linalg.svd(M)
    R = U @ Vt
    R[np.abs(R) < 1e-13] = 0.0
    return R


_CACHE = {}


def symmetry_matrices(sym):
    """All ``G`` elements of the group as ``(G, 3, 3)`` float64, identity first.

    Generated by closing RELION's generators under multiplication.  Orders: Cn n,
    Ci/Cs 2, Cnv/Cnh 2n, Sn n, Dn 2n, Dnv/Dnh 4n, T 12, Td/Th 24, O 24, Oh 48, I 60,
    Ih 120.
    """
    g = parse_symmetry(sym)
    if g.name in _CACHE:
        return _CACHE[g.name].copy()
    elems = [np.eye(3)]
    gens = _generators(g)
    frontier = list(elems)
    while frontier:
        new = []
        for a in frontier:
            for b in gens:
                c = _polish(b @ a)
                if not any(np.abs(c - e).max() < 1e-6 for e in elems):
                    elems.append(c)
                    new.append(c)
        frontier = new
        if len(elems) > 240:  # cannot happen for valid groups; guards against bad axes
            raise CryoClassError(f"symmetry '{g.name}': generators do not close to a group")
    mats = np.stack(elems)
    _CACHE[g.name] = mats
    return mats.copy()


def symmetry_order(sym):
    """Number of elements of the group."""
    return len(symmetry_matrices(sym))


# -------------------------------------------------------------------- asymmetric unit
def direction_vectors(rot_deg, tilt_deg):
    """Unit projection directions ``(sin t cos r, sin t sin r, cos t)``, shape (..., 3);
    equal to the third row of :func:`.geometry.euler_to_matrix`."""
    r = np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    t = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    r, t = np.broadcast_arrays(r, t)
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)


def _planes_all_nonneg(d, normals, sign=1.0, tol=1e-9):
    ok = np.ones(d.shape[:-1], dtype=bool)
    for nvec in normals:
        ok &= sign * (d @ _unit(nvec)) >= -tol
    return ok


_I_NORMALS = [(0.0, 1.0, 0.0),
              (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
              (0.4999999839058737, -0.8090170074556163, 0.3090169861701543)]
_I4_NORMALS = [(0.0, 0.0, 1.0),
               (0.187592467856686, -0.303530987314591, -0.491123477863004),
               (0.187592467856686, 0.303530987314591, -0.491123477863004)]


def is_in_asymmetric_unit(rot_deg, tilt_deg, sym, tol_deg=1e-6):
    """RELION's geometric asymmetric-unit test (``removeSymmetryEquivalentPointsGeometric``)
    for directions given by ``rot`` in [-180, 180] and ``tilt`` in [0, 180] (degrees).

    Vectorised; boundaries are inclusive (within ``tol_deg``), so points exactly on a
    seam may be kept twice -- :func:`asymmetric_unit_mask` removes such duplicates.
    Uses the proper subgroup of ``sym``:

    - ``C1``: everything.  ``Cn``: ``-180/n <= rot <= 180/n``.
    - ``D1``: ``tilt <= 90``.  ``Dn``: ``90 - 180/n <= rot <= 90 + 180/n`` and
      ``tilt <= 90``.
    - ``T``, ``O``, ``I1..I4``: a spherical triangle bounded by three great circles
      (RELION's normals), with RELION's extra rot/tilt conditions for T and O.
    """
    g = parse_symmetry(sym).proper_subgroup()
    rot = np.asarray(rot_deg, dtype=np.float64)
    tilt = np.asarray(tilt_deg, dtype=np.float64)
    rot, tilt = np.broadcast_arrays(rot, tilt)
    rot = (rot + 180.0) % 360.0 - 180.0          # wrap into [-180, 180)
    rot = np.where(np.isclose(rot, -180.0, atol=tol_deg), 180.0, rot)  # and use (-180, 180]
    t = tol_deg
    f, n = g.family, g.n
    if f == "C":
        if n == 1:
            return np.ones(rot.shape, dtype=bool)
        return (rot >= -180.0 / n - t) & (rot <= 180.0 / n + t)
    if f == "D":
        upper = tilt <= 90.0 + t
        if n == 1:
            return upper
        return upper & (rot >= 90.0 - 180.0 / n - t) & (rot <= 90.0 + 180.0 / n + t)
    d = direction_vectors(rot, tilt)
    tol = np.deg2rad(t)
    if f == "T":
        wedge = ((rot >= 90.0 - t) & (rot <= 150.0 + t)) | (np.abs(rot) <= t)
        return wedge & _planes_all_nonneg(
            d, [(-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698),
                (0.471404, 0.816497, 0.0)], tol=tol)
    if f == "O":
        wedge = ((rot >= 45.0 - t) & (rot <= 135.0 + t) & (tilt <= 90.0 + t)) | (np.abs(rot) <= t)
        return wedge & _planes_all_nonneg(d, [(0, -1, 1), (1, 1, 0), (-1, 1, 0)], tol=tol)
    if f == "I":
        v = g.variant
        if v == 2:
            return _planes_all_nonneg(d, _I_NORMALS, tol=tol)
        if v in (1, 3):
            A = euler_to_matrix(0.0, 90.0 if v == 1 else 31.7174745559, 0.0)
            return _planes_all_nonneg(d, [A @ np.array(x) for x in _I_NORMALS], tol=tol)
        A = euler_to_matrix(0.0, -31.7174745559, 0.0)       # I4: RELION tests "<= 0"
        return _planes_all_nonneg(d, [A @ np.array(x) for x in _I4_NORMALS], sign=-1.0, tol=tol)
    raise CryoClassError(f"symmetry '{g.name}': no asymmetric unit defined")  # unreachable


def remove_seam_duplicates(directions, sym, seam_deg):
    """Greedy pass of RELION's ``removeSymmetryEquivalentPoints``: walk ``directions``
    (N, 3) in order and drop any that lies closer than ``seam_deg`` to a symmetry image
    (proper subgroup) of a direction kept before it.  Returns a boolean keep-mask (N,)."""
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    mats = symmetry_matrices(parse_symmetry(sym).proper_subgroup())
    cos_max = np.cos(np.deg2rad(seam_deg))
    keep = np.zeros(len(d), dtype=bool)
    images = np.empty((0, 3))
    for i in range(len(d)):
        if images.shape[0] == 0 or not np.any(images @ d[i] > cos_max):
            keep[i] = True
            images = np.concatenate([images, mats @ d[i]])   # (G, 3): all images g d_i
    return keep


def asymmetric_unit_mask(rot_deg, tilt_deg, sym, seam_deg=0.0):
    """Which of the directions (rot, tilt) (degrees, 1-D) form RELION's asymmetric unit:
    :func:`is_in_asymmetric_unit`, then (when ``seam_deg > 0``)
    :func:`remove_seam_duplicates` among the survivors, in the given order.

    :class:`.sampling.OrientationGrid` passes ``seam_deg = 0.5 * max_pixrad`` and, like
    RELION, skips the seam pass when 4000 or more directions survive the cut.
    """
    rot = np.asarray(rot_deg, dtype=np.float64).ravel()
    tilt = np.asarray(tilt_deg, dtype=np.float64).ravel()
    mask = is_in_asymmetric_unit(rot, tilt, sym)
    if seam_deg > 0 and parse_symmetry(sym).proper_subgroup().name != "C1":
        idx = np.flatnonzero(mask)
        keep = remove_seam_duplicates(direction_vectors(rot[idx], tilt[idx]), sym, seam_deg)
        mask[idx[~keep]] = False
    return mask


# ---------------------------------------------------------------------- symmetrisation
def symmetrize(vol, sym):
    """Average a map over the group: ``out(x) = mean_g vol(g x)`` (real space).

    ``vol`` is ``(z, y, x)`` with the origin at voxel ``N // 2`` on each axis (see the
    engine conventions); values are trilinearly interpolated (``map_coordinates``
    order 1) and points that fall outside the box count as 0, like RELION's
    ``symmetriseMap`` without wrapping.  Works on numpy or cupy arrays (cupyx.scipy)
    and returns the same kind and dtype.  ``C1`` returns a copy.
    """
    xp = get_xp(vol)
    if xp is np:
        from scipy.ndimage import map_coordinates
    else:  # pragma: no cover - GPU only
        from cupyx.scipy.ndimage import map_coordinates
    vol = xp.asarray(vol)
    if vol.ndim != 3:
        raise CryoClassError(f"symmetrize needs a 3D map, got shape {tuple(vol.shape)}")
    mats = symmetry_matrices(sym)
    if len(mats) == 1:
        return vol.copy()
    nz, ny, nx = vol.shape
    cz, cy, cx = nz // 2, ny // 2, nx // 2
    z, y, x = xp.meshgrid(xp.arange(nz, dtype=xp.float32) - cz,
                          xp.arange(ny, dtype=xp.float32) - cy,
                          xp.arange(nx, dtype=xp.float32) - cx, indexing="ij")
    pts = xp.stack([x.ravel(), y.ravel(), z.ravel()])            # (3, M) as (x, y, z)
    src = vol.astype(xp.float32, copy=False)
    acc = src.astype(xp.float64)
    for g in mats[1:]:
        gx = xp.asarray(g, dtype=xp.float32) @ pts                # g (x, y, z)
        coords = xp.stack([gx[2] + cz, gx[1] + cy, gx[0] + cx])   # array index order
        acc += map_coordinates(src, coords, order=1, mode="constant",
                               cval=0.0).reshape(vol.shape)
    return (acc / len(mats)).astype(vol.dtype)


def search_views(sym, relax_sym=""):
    """The rotations ``R`` such that a pose ``A0`` and ``A0 R`` are searched as the same
    view in local searches, ``(G, 3, 3)``, identity first: the elements of ``sym``, and
    with ``relax_sym`` (RELION's ``--relax_sym``) also every product with the relaxed
    group's elements (pseudo-symmetric particles whose maps keep ``sym``)."""
    mats = symmetry_matrices(sym)
    if not relax_sym:
        return mats
    products = (mats[:, None] @ symmetry_matrices(relax_sym)[None]).reshape(-1, 3, 3)
    unique = [products[0]]
    for m in products[1:]:
        if all(np.abs(m - u).max() > 1e-6 for u in unique):
            unique.append(m)
    return np.stack(unique)
