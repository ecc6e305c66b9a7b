"""HEALPix pixel centres, RELION orientation / translation grids and their children."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoclass_plugin.engine import healpix
from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine.geometry import angular_distance_deg, euler_to_matrix
from cryoclass_plugin.engine.sampling import (OrientationGrid, TranslationGrid,
                                              next_perturbation, rotation_count_summary)
from cryoclass_plugin.engine.symmetry import direction_vectors, symmetry_matrices


def _angle_deg(u, v):
    return np.degrees(np.arccos(np.clip(np.sum(u * v, axis=-1), -1.0, 1.0)))


def _random_unit(n, seed):
    u = np.random.default_rng(seed).normal(size=(n, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- HEALPix
# Reference values computed with healpy 1.20.1: hp.pix2ang(2**order, pix, nest=True).
HEALPY_REF = {
    1: ([0, 5, 17, 30, 47],
        [1.2309594173407747, 0.8410686705679303, 1.5707963267948966,
         1.5707963267948966, 1.9106332362490186],
        [0.7853981633974483, 2.748893571891069, 0.39269908169872414,
         4.319689898685965, 5.497787143782138]),
    3: ([0, 1, 77, 300, 500, 767],
        [1.4873662401842815, 1.4033482475752073, 1.0471975511965979,
         1.4873662401842815, 1.318116071652818, 1.6542264134055116],
        [0.7853981633974483, 0.8835729338221292, 2.4543692606170255,
         5.890486225480862, 4.908738521234051, 5.497787143782138]),
}
HEALPY_MAX_PIXRAD_DEG = {1: 27.585653017957394, 2: 14.5722306700779,
                         3: 7.47282699728271, 4: 3.7823672156460226}


@pytest.mark.parametrize("order", [1, 3])
def test_healpix_matches_healpy(order):
    pix, theta, phi = HEALPY_REF[order]
    z, p = healpix.pix2zphi(np.array(pix), order)
    np.testing.assert_allclose(np.arccos(z), theta, atol=1e-12)
    np.testing.assert_allclose(p, phi, atol=1e-12)
    rot, tilt = healpix.pixel_angles_deg(np.array(pix), order)
    np.testing.assert_allclose(tilt, np.degrees(theta), atol=1e-10)
    np.testing.assert_allclose(np.mod(rot, 360.0), np.degrees(phi), atol=1e-10)
    assert np.all((rot > -180.0) & (rot <= 180.0))


def test_healpix_max_pixrad_and_steps():
    for order, ref in HEALPY_MAX_PIXRAD_DEG.items():
        assert np.degrees(healpix.max_pixrad(order)) == pytest.approx(ref, abs=1e-9)
    assert healpix.angular_step_deg(2) == 15.0
    assert healpix.angular_step_deg(3) == 7.5
    assert [healpix.npix(o) for o in range(4)] == [12, 48, 192, 768]


@pytest.mark.parametrize("order", [0, 2, 3])
def test_healpix_equal_area_distinct_and_covering(order):
    v = healpix.pix2vec(np.arange(healpix.npix(order)), order)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-12)
    # equal-area pixels: the centroid of the centres is the origin, z values balanced
    assert np.abs(v.mean(axis=0)).max() < 1e-12
    # distinct centres
    d = v @ v.T
    np.fill_diagonal(d, -1)
    assert d.max() < np.cos(np.radians(0.5 * healpix.angular_step_deg(order)))
    # every point of the sphere is within max_pixrad of some centre
    u = _random_unit(3000, order)
    dist = np.degrees(np.arccos(np.clip((u @ v.T).max(axis=1), -1, 1)))
    assert dist.max() <= np.degrees(healpix.max_pixrad(order)) + 1e-9


def test_healpix_nested_children_lie_in_parent_and_partition():
    order = 2
    parents = np.arange(healpix.npix(order))
    kids = healpix.children(parents, 1)
    assert kids.shape == (healpix.npix(order), 4)
    np.testing.assert_array_equal(kids[5], [20, 21, 22, 23])
    np.testing.assert_array_equal(np.sort(kids.ravel()), np.arange(healpix.npix(order + 1)))
    vp = healpix.pix2vec(parents, order)
    vc = healpix.pix2vec(kids, order + 1)
    # each child centre lies inside its parent pixel, hence within max_pixrad of its centre
    assert _angle_deg(vc, vp[:, None, :]).max() <= np.degrees(healpix.max_pixrad(order))
    # and the nearest parent centre of a child is never further than that
    assert np.all(healpix.children(np.array([3]), 2) == 3 * 16 + np.arange(16))


def test_healpix_direction_is_third_row_of_relion_matrix():
    rot, tilt = healpix.pixel_angles_deg(np.arange(healpix.npix(2)), 2)
    psi = np.random.default_rng(0).uniform(-180, 180, size=rot.shape)
    A = euler_to_matrix(rot, tilt, psi)
    np.testing.assert_allclose(A[:, 2, :], healpix.pix2vec(np.arange(healpix.npix(2)), 2),
                               atol=1e-12)


def test_healpix_bad_order():
    with pytest.raises(CryoClassError):
        healpix.npix(-1)
    with pytest.raises(CryoClassError):
        healpix.pix2zphi([48], 1)


# ------------------------------------------------------------------ OrientationGrid
@pytest.mark.parametrize("order,ndir,npsi", [(2, 192, 24), (3, 768, 48)])
def test_orientation_counts_c1(order, ndir, npsi):
    g = OrientationGrid(order)
    assert (g.n_directions, g.n_psi, g.n_rotations) == (ndir, npsi, ndir * npsi)
    assert g.eulers.shape == (ndir * npsi, 3)
    assert g.matrices.shape == (ndir * npsi, 3, 3)
    assert g.angular_step_deg == g.psi_step_deg == 60.0 / 2 ** order
    np.testing.assert_allclose(g.psi, np.arange(npsi) * g.psi_step_deg)
    # direction-major ordering
    np.testing.assert_allclose(g.eulers[npsi + 3], [g.rot[1], g.tilt[1], 3 * g.psi_step_deg])
    # the third row of every matrix is the projection direction (RELION convention)
    np.testing.assert_allclose(g.matrices[::npsi, 2, :], g.directions, atol=1e-12)
    assert len(g) == g.n_rotations


def test_psi_step_option_rounds_to_divide_360():
    g = OrientationGrid(2, psi_step_deg=7.0)
    assert g.n_psi == 52 and g.psi_step_deg == pytest.approx(360 / 52)
    assert OrientationGrid(2, psi_step_deg=10).n_psi == 36


def _so3_coverage_deg(grid, n=300, seed=1):
    Q = Rotation.random(n, random_state=seed).as_matrix()
    G = symmetry_matrices(grid.symmetry.proper_subgroup())
    MG = np.einsum("rij,gjk->grik", grid.matrices, G).reshape(-1, 3, 3)   # A g ~ A
    tr = np.einsum("qij,rij->qr", Q, MG).max(axis=1)
    return np.degrees(np.arccos(np.clip((tr - 1) / 2, -1, 1))).max()


@pytest.mark.parametrize("order,sym,factor", [(2, "C1", 0.8), (3, "C1", 0.8),
                                              (2, "D2", 0.8), (2, "O", 1.0),
                                              (3, "I", 1.3), (3, "D7", 1.5)])
def test_rotation_coverage(order, sym, factor):
    """Every rotation is within ~ one angular step of a grid rotation (modulo symmetry)."""
    g = OrientationGrid(order, sym)
    assert _so3_coverage_deg(g) < factor * g.angular_step_deg


def test_children_ordering_and_geometry():
    g = OrientationGrid(2)
    ids = np.array([0, 777, g.n_rotations - 1])
    e, parents = g.children(ids, 1)
    assert e.shape == (3 * 8, 3)
    np.testing.assert_array_equal(parents, np.repeat([0, 1, 2], 8))
    idir, ipsi = g.split_ids(ids)
    for i in range(3):
        block = e[i * 8:(i + 1) * 8]
        # direction-major, psi fastest: 4 NESTED child pixels x (psi - step/4, psi + step/4)
        kid_pix = healpix.children(g.pixels[idir[i]], 1)
        r, t = healpix.pixel_angles_deg(kid_pix, 3)
        np.testing.assert_allclose(block[:, 0], np.repeat(r, 2))
        np.testing.assert_allclose(block[:, 1], np.repeat(t, 2))
        np.testing.assert_allclose(block[:, 2], g.psi[ipsi[i]] + np.tile([-3.75, 3.75], 4))
    # children lie within the parent's cell: direction within max_pixrad, psi within step/4
    e_all, par = g.children(np.arange(0, g.n_rotations, g.n_psi), 1)
    dpar = g.directions[par]
    dkid = direction_vectors(e_all[:, 0], e_all[:, 1])
    assert _angle_deg(dkid, dpar).max() <= np.degrees(healpix.max_pixrad(2)) + 1e-9
    # as full rotations too, away from the poles (near a pole a child's rot differs a lot
    # from the parent's while psi is inherited, as in RELION)
    Ap = g.matrices[np.arange(0, g.n_rotations, g.n_psi)][par]
    Ak = euler_to_matrix(e_all[:, 0], e_all[:, 1], e_all[:, 2])
    side = (g.tilt[par] > 30) & (g.tilt[par] < 150)
    assert angular_distance_deg(Ap, Ak)[side].max() < g.angular_step_deg


def test_children_cover_the_parent_cells():
    """Union of the children of all coarse directions = the whole fine grid, once each,
    so the fine grid's coverage bound (max_pixrad of the finer order) holds."""
    g = OrientationGrid(2)
    e, _ = g.children(np.arange(g.n_rotations), 1)
    assert len(e) == 8 * g.n_rotations
    kids, _ = g.children(np.arange(0, g.n_rotations, g.n_psi), 1)   # psi index 0 only
    d = direction_vectors(kids[::2, 0], kids[::2, 1])
    np.testing.assert_allclose(d, healpix.pix2vec(np.arange(healpix.npix(3)), 3), atol=1e-12)
    fine_psi = np.unique(np.round(np.mod(e[:, 2], 360), 9))
    np.testing.assert_allclose(fine_psi, np.arange(48) * 7.5 + 3.75)
    # rotation coverage improves to ~ the fine step
    fine = OrientationGrid(3)
    Q = Rotation.random(200, random_state=3).as_matrix()
    A = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    tr = np.einsum("qij,rij->qr", Q, A).max(axis=1)
    cov = np.degrees(np.arccos(np.clip((tr - 1) / 2, -1, 1))).max()
    assert cov < 0.8 * fine.angular_step_deg


def test_children_oversampling_two_and_zero():
    g = OrientationGrid(2)
    e, parents = g.children([5], 2)
    assert e.shape == (64, 3) and np.all(parents == 0)
    psi0 = g.psi[5 % g.n_psi]
    np.testing.assert_allclose(e[:4, 2], psi0 + np.array([-3, -1, 1, 3]) * 15 / 8)
    kid = healpix.children(g.pixels[0], 2)
    np.testing.assert_array_equal(kid, g.pixels[0] * 16 + np.arange(16))
    e0, p0 = g.children([3, 4], 0)
    np.testing.assert_allclose(e0, g.eulers[[3, 4]])
    np.testing.assert_array_equal(p0, [0, 1])
    M, p = g.fine_matrices([3], 1)
    assert M.shape == (8, 3, 3) and np.all(p == 0)
    assert g.fine_angular_step_deg(1) == 7.5 and g.fine_psi_step_deg(2) == 3.75
    with pytest.raises(CryoClassError):
        g.children([g.n_rotations], 1)
    with pytest.raises(CryoClassError):
        g.children([0], -1)


def test_perturbation_rotates_all_samples():
    g0, g1 = OrientationGrid(2), OrientationGrid(2, perturbation=0.3)
    p = 0.3 * 15.0
    np.testing.assert_allclose(g1.matrices, g0.matrices @ euler_to_matrix(p, p, p), atol=1e-9)
    e0, _ = g0.children([10], 1)
    e1, _ = g1.children([10], 1)
    np.testing.assert_allclose(euler_to_matrix(*e1.T), euler_to_matrix(*e0.T) @ euler_to_matrix(p, p, p),
                               atol=1e-9)
    rng = np.random.default_rng(0)
    vals = [0.0]
    for _ in range(50):
        vals.append(next_perturbation(vals[-1], 0.5, rng))
    assert all(-0.5 <= v < 0.5 for v in vals) and len(set(vals)) > 40
    assert next_perturbation(0.2, 0.0) == 0.0


def test_local_rotations():
    g = OrientationGrid(3)
    r0 = 1234
    ids, prior = g.local_rotations(g.eulers[r0], sigma_deg=5.0)
    assert prior.sum() == pytest.approx(1.0)
    assert ids[np.argmax(prior)] == r0
    kept = g.matrices[ids]
    # all kept directions within 3 sigma of the prior direction
    assert _angle_deg(kept[:, 2], g.matrices[r0, 2]).max() < 15.0
    assert 1 < len(ids) < g.n_rotations // 20
    # with symmetry the prior is matched to the nearest symmetry mate of each direction
    gd = OrientationGrid(2, "C2")
    ids2, _ = gd.local_rotations([180.0 + gd.rot[0], gd.tilt[0], 0.0], sigma_deg=3.0)
    assert 0 in ids2


def test_summary_values():
    g = OrientationGrid(2, "d2")
    s = g.summary(1)
    assert s["sym"] == "D2" and s["healpix_order"] == 2 and s["psi_step_deg"] == 15.0
    assert s["n_fine_rotations"] == 8 * g.n_rotations
    t = TranslationGrid(5, 2)
    assert t.summary(1)["n_fine_offsets"] == 84
    line = rotation_count_summary(OrientationGrid(2), t, 1)
    assert "192 directions x 24 psi = 4608 rotations" in line and "21 translations" in line


def test_bad_orientation_options():
    for bad in (-1, 2.5, 20):
        with pytest.raises(CryoClassError):
            OrientationGrid(bad)
    with pytest.raises(CryoClassError):
        OrientationGrid(2, psi_step_deg=0)
    with pytest.raises(CryoClassError):
        OrientationGrid(2, sym="X7")


# ------------------------------------------------------------------ TranslationGrid
@pytest.mark.parametrize("rng_px,step,count", [(5, 2, 21), (5, 1, 81), (0, 1, 1),
                                               (6, 2, 29), (3, 3, 5)])
def test_translation_counts(rng_px, step, count):
    t = TranslationGrid(rng_px, step)
    assert t.n_offsets == count == len(t.offsets)
    assert np.all(np.hypot(*t.offsets.T) <= rng_px + 1e-9)
    np.testing.assert_allclose(np.mod(t.offsets, step), 0.0, atol=1e-12)
    assert [0.0, 0.0] in t.offsets.tolist()


def test_translation_order_and_children():
    t = TranslationGrid(5, 2)
    # x outer, y inner (RELION's setTranslations)
    np.testing.assert_allclose(t.offsets[:3], [[-4, -2], [-4, 0], [-4, 2]])
    c, p = t.children([0, 10], 1)
    np.testing.assert_allclose(c[:4], [[-4.5, -2.5], [-4.5, -1.5], [-3.5, -2.5], [-3.5, -1.5]])
    np.testing.assert_array_equal(p, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(c[4:].mean(axis=0), t.offsets[10])
    c2, p2 = t.children([3], 2)
    assert c2.shape == (16, 2)
    np.testing.assert_allclose(np.unique(c2[:, 0] - t.offsets[3, 0]), [-0.75, -0.25, 0.25, 0.75])
    c0, _ = t.children([3], 0)
    np.testing.assert_allclose(c0, t.offsets[[3]])
    # children tile each coarse cell: any point within the range is within half a fine
    # diagonal of some child
    fine, _ = t.children(np.arange(t.n_offsets), 1)
    pts = np.random.default_rng(0).uniform(-4, 4, size=(2000, 2))
    pts = pts[np.hypot(*pts.T) < 4]
    dmin = np.sqrt(((pts[:, None, :] - fine[None]) ** 2).sum(-1)).min(axis=1)
    assert dmin.max() <= np.sqrt(2) * 0.5 + 1e-9
    tp = TranslationGrid(5, 2, perturbation=0.25)
    np.testing.assert_allclose(tp.offsets, t.offsets + 0.5)


def test_bad_translation_options():
    with pytest.raises(CryoClassError):
        TranslationGrid(5, 0)
    with pytest.raises(CryoClassError):
        TranslationGrid(-1, 1)
    with pytest.raises(CryoClassError):
        TranslationGrid(5, 1).children([81])
