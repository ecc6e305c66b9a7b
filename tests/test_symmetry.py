"""Point groups with RELION's axes, asymmetric units and map symmetrisation."""
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from cryoclass_plugin.engine import healpix
from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.sampling import OrientationGrid
from cryoclass_plugin.engine.symmetry import (asymmetric_unit_mask, direction_vectors,
                                              is_in_asymmetric_unit, parse_symmetry,
                                              rotation_about_axis, symmetrize,
                                              symmetry_matrices, symmetry_order)

PHI = (1 + 5 ** 0.5) / 2

ORDERS = {"C1": 1, "C2": 2, "C5": 5, "C11": 11, "Ci": 2, "Cs": 2, "C3v": 6, "C4h": 8,
          "S4": 4, "D1": 2, "D2": 4, "D7": 14, "D3v": 12, "D4h": 16, "T": 12, "Td": 24,
          "Th": 24, "O": 24, "Oh": 48, "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60,
          "Ih": 120, "I1h": 120, "I3h": 120, "I4h": 120}


def _contains(mats, R, tol=1e-9):
    return np.abs(mats - R).max(axis=(1, 2)).min() < tol


@pytest.mark.parametrize("name,order", sorted(ORDERS.items()))
def test_group_order_and_closure(name, order):
    m = symmetry_matrices(name)
    assert m.shape == (order, 3, 3) == (symmetry_order(name), 3, 3)
    np.testing.assert_allclose(m[0], np.eye(3))
    np.testing.assert_allclose(np.einsum("gij,gkj->gik", m, m), np.broadcast_to(np.eye(3), m.shape),
                               atol=1e-12)                             # orthogonal
    det = np.linalg.det(m)
    assert np.all(np.isclose(np.abs(det), 1.0))
    assert np.all(det > 0) == parse_symmetry(name).is_proper
    prod = np.einsum("aij,bjk->abik", m, m).reshape(-1, 3, 3)
    # every product is an element and the elements are distinct
    assert max(np.abs(m - p).max(axis=(1, 2)).min() for p in prod) < 1e-9
    dist = np.abs(m[:, None] - m[None]).max(axis=(2, 3)) + np.eye(order) * 9
    assert dist.min() > 0.1
    assert symmetry_order(parse_symmetry(name).proper_subgroup()) == (
        order if parse_symmetry(name).is_proper else order // 2)


def test_relion_axis_conventions():
    rz = lambda a: rotation_about_axis((0, 0, 1), a)
    assert _contains(symmetry_matrices("C7"), rz(360 / 7))
    assert not _contains(symmetry_matrices("C7"), rotation_about_axis((1, 0, 0), 360 / 7))
    d5 = symmetry_matrices("D5")
    assert _contains(d5, rz(72)) and _contains(d5, rotation_about_axis((1, 0, 0), 180))
    assert not _contains(d5, rotation_about_axis((0, 1, 0), 180))     # n odd: no 2-fold on y
    t = symmetry_matrices("T")
    assert _contains(t, rz(120)) and _contains(t, rotation_about_axis((0, 2 ** .5, 1), 180))
    o = symmetry_matrices("O")
    for ax in np.eye(3):
        assert _contains(o, rotation_about_axis(ax, 90))
    assert _contains(o, rotation_about_axis((1, 1, 1), 120))
    i2 = symmetry_matrices("I")
    np.testing.assert_allclose(i2, symmetry_matrices("I2"))
    for ax in np.eye(3):                                   # Crowther: 2-folds on x, y, z
        assert _contains(i2, rotation_about_axis(ax, 180))
    assert _contains(i2, rotation_about_axis((0.525731114, 0, 0.850650807), 72), 1e-7)
    assert _contains(i2, rotation_about_axis((0, 0.356822076, 0.934172364), 120), 1e-7)
    assert not _contains(i2, rotation_about_axis((0, 0.525731114, 0.850650807), 72))
    i1 = symmetry_matrices("I1")
    assert _contains(i1, rotation_about_axis((0.85065080702670, 0, -0.5257311142635), 72), 1e-7)
    assert _contains(i1, rotation_about_axis((0.9341723640, 0.3568220765, 0), 120), 1e-7)
    i3 = symmetry_matrices("I3")
    assert _contains(i3, rz(72))
    assert _contains(i3, rotation_about_axis((-0.5257311143, 0, 0.8506508070), 180), 1e-7)
    assert _contains(i3, rotation_about_axis(
        (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 120), 1e-7)
    i4 = symmetry_matrices("I4")
    assert _contains(i4, rotation_about_axis((0.8944271932547096, 0, 0.4472135909903704), 72), 1e-7)
    assert _contains(i4, rotation_about_axis((0.5257311143, 0, 0.8506508070), 180), 1e-7)
    assert _contains(symmetry_matrices("Ci"), -np.eye(3))
    assert _contains(symmetry_matrices("Cs"), np.diag([1.0, 1.0, -1.0]))


@pytest.mark.parametrize("text,name", [("c1", "C1"), (" C4 ", "C4"), ("d7", "D7"),
                                       ("i", "I2"), ("I1", "I1"), ("i3", "I3"), ("o", "O"),
                                       ("t", "T"), ("c12", "C12"), ("D3H", "D3h"),
                                       ("ih", "I2h"), ("ci", "Ci"), ("CS", "Cs")])
def test_parse_symmetry_names(text, name):
    g = parse_symmetry(text)
    assert g.name == name and str(g) == name
    assert parse_symmetry(g) is g


@pytest.mark.parametrize("bad", ["", "C", "C0", "D0", "X2", "I5", "S3", "Q", "C2x", "1",
                                 "D2q", "I6", "icos", None])
def test_parse_symmetry_errors(bad):
    with pytest.raises(CryoClassError) as err:
        parse_symmetry(bad)
    msg = str(err.value)
    assert "\n" not in msg and "Cn" in msg and "Dn" in msg and "I1..I4" in msg


# ---------------------------------------------------------------------- asymmetric unit
def _kept_directions(order, sym):
    pix = np.arange(healpix.npix(order))
    rot, tilt = healpix.pixel_angles_deg(pix, order)
    mask = asymmetric_unit_mask(rot, tilt, sym,
                                seam_deg=0.5 * np.degrees(healpix.max_pixrad(order)))
    return rot[mask], tilt[mask]


@pytest.mark.parametrize("order,sym", [(3, "C2"), (3, "C5"), (3, "D1"), (3, "D2"),
                                       (3, "D7"), (3, "T"), (3, "O"), (4, "I"), (4, "I1"),
                                       (4, "I3"), (4, "I4"), (3, "D4h"), (3, "Ci")])
def test_asymmetric_unit_count_and_coverage(order, sym):
    rot, tilt = _kept_directions(order, sym)
    G = symmetry_matrices(parse_symmetry(sym).proper_subgroup())
    expected = healpix.npix(order) / len(G)
    assert abs(len(rot) - expected) <= 0.06 * expected + 2
    d = direction_vectors(rot, tilt)
    images = np.einsum("gij,kj->gki", G, d).reshape(-1, 3)
    u = np.random.default_rng(7).normal(size=(3000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cover = np.degrees(np.arccos(np.clip((u @ images.T).max(axis=1), -1, 1))).max()
    assert cover < 2.0 * np.degrees(healpix.max_pixrad(order))
    # no kept direction is (within the seam tolerance) a symmetry mate of another one
    dots = np.einsum("gki,li->gkl", np.einsum("gij,kj->gki", G, d), d)
    k = len(d)
    dots[:, np.arange(k), np.arange(k)] = -1.0
    assert dots.max() < np.cos(np.radians(0.5 * np.degrees(healpix.max_pixrad(order))))


def test_asymmetric_unit_matches_relion_wedges():
    rot, tilt = _kept_directions(3, "C4")
    assert np.all(np.abs(rot) <= 45 + 1e-6)
    rot, tilt = _kept_directions(3, "D3")
    assert np.all(tilt <= 90 + 1e-6) and np.all(np.abs(rot - 90) <= 60 + 1e-6)
    rot, tilt = _kept_directions(2, "C1")
    assert len(rot) == 192
    assert is_in_asymmetric_unit(10.0, 50.0, "C4") and not is_in_asymmetric_unit(50.0, 50.0, "C4")
    assert is_in_asymmetric_unit(-179.0 + 360.0, 10.0, "C1")
    # the C2 seam at rot = +-90 is kept once (both are on the closed wedge before clean-up)
    g = OrientationGrid(2, "C2")
    assert g.n_directions == 96
    assert np.sum(np.isclose(np.abs(g.rot), 90.0)) == np.sum(np.isclose(np.abs(g.rot), 90.0)
                                                             & (g.rot > 0))


def test_orientation_grid_counts_with_symmetry():
    c1 = OrientationGrid(3).n_directions
    for sym in ("C2", "C3", "D2", "D3", "T", "O", "I"):
        g = OrientationGrid(3, sym)
        G = symmetry_order(sym)
        assert abs(g.n_directions - c1 / G) <= 0.06 * c1 / G + 2, sym
        assert g.n_psi == 48 and g.sym == parse_symmetry(sym).name


# ------------------------------------------------------------------------ symmetrize
def _blob_map(n=32, seed=0):
    rng = np.random.default_rng(seed)
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(6):
        p = rng.uniform(-7, 7, size=3)
        v += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2
                                               + (z - p[2]) ** 2) / (2 * 2.0 ** 2))
    return v.astype(np.float32)


def _rotate(vol, g):
    """vol(g x) by trilinear interpolation, origin at N // 2, (x, y, z) coordinates."""
    n = vol.shape[0]
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) - c,) * 3, indexing="ij")
    p = np.einsum("ij,jn->in", g, np.stack([x.ravel(), y.ravel(), z.ravel()]))
    return map_coordinates(vol, [p[2] + c, p[1] + c, p[0] + c], order=1,
                           mode="constant").reshape(vol.shape)


@pytest.mark.parametrize("sym", ["C3", "D2", "T", "O", "I"])
def test_symmetrized_map_is_invariant(sym):
    v = _blob_map()
    s = symmetrize(v, sym)
    assert s.dtype == v.dtype and s.shape == v.shape
    inner = np.linalg.norm(np.stack(np.meshgrid(*(np.arange(32) - 16,) * 3, indexing="ij")),
                           axis=0) < 12
    scale = np.abs(s[inner]).max()
    for g in symmetry_matrices(sym)[1:]:
        err = np.abs(_rotate(s, g) - s)[inner].max() / scale
        assert err < 0.08, (sym, err)
    # the input itself was not symmetric, so the check above can fail
    worst = max(np.abs(_rotate(v, g) - v)[inner].max() / np.abs(v[inner]).max()
                for g in symmetry_matrices(sym)[1:])
    assert worst > 0.3


def test_symmetrize_c4_exact_about_z_through_box_centre():
    rng = np.random.default_rng(3)
    n, c = 24, 12
    v = np.zeros((n, n, n), np.float32)
    v[4:20, 4:20, 4:20] = rng.normal(size=(16, 16, 16))
    s = symmetrize(v, "C4")
    # a 90 degree turn about z maps voxel (x, y) -> (-y, x) around index 12 exactly
    iz, iy, ix = np.meshgrid(*(np.arange(2, 23),) * 3, indexing="ij")
    xs, ys = ix - c, iy - c
    np.testing.assert_allclose(s[iz, ys + c, xs + c], s[iz, xs + c, -ys + c], atol=1e-5)
    # ... but not about x
    assert np.abs(s[iz, iy, ix] - s[-(iy - c) + c, iz, ix]).max() > 0.1
    # mean is preserved inside the support, C1 is a copy
    np.testing.assert_allclose(s.sum(), v.sum(), rtol=1e-4)
    c1 = symmetrize(v, "C1")
    assert c1 is not v and np.array_equal(c1, v)


def test_symmetric_map_projects_identically_for_equivalent_orientations():
    """For a map with V(g x) = V(x), orientations A and A g give the same projection,
    which is why the direction grid only needs one asymmetric unit."""
    v = symmetrize(_blob_map(seed=5), "D2")
    A = euler_to_matrix(37.0, 64.0, 21.0)

    def project(R):
        # image(x, y) = sum_z V(R^T (x, y, z))
        return _rotate(v, R.T).sum(axis=0)
    ref = project(A)
    for g in symmetry_matrices("D2")[1:]:
        assert np.abs(project(A @ g) - ref).max() < 0.05 * np.abs(ref).max()
    assert np.abs(project(A @ rotation_about_axis((1, 1, 0), 90)) - ref).max() > 0.2 * np.abs(ref).max()


def test_symmetrize_rejects_2d():
    with pytest.raises(CryoClassError):
        symmetrize(np.zeros((8, 8), np.float32), "C2")
