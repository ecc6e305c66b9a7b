"""Soft masks: RELION's raised-cosine edge, centring at N//2, background fill."""
import numpy as np
import pytest

from cryoclass_plugin.engine import masks


def test_sphere_profile_and_centre():
    box, radius, edge = 32, 8.0, 4.0
    m = masks.soft_sphere_mask(box, radius, edge)
    assert m.shape == (box, box, box) and m.dtype == np.float32
    c = box // 2
    assert m[c, c, c] == 1.0
    line = m[c, c, :]  # along x from the centre voxel
    for ix, value in enumerate(line):
        r = abs(ix - c)
        if r <= radius:
            want = 1.0
        elif r >= radius + edge:
            want = 0.0
        else:
            want = 0.5 + 0.5 * np.cos(np.pi * (r - radius) / edge)
        assert value == pytest.approx(want, abs=1e-6)
    assert line[c + 10] == pytest.approx(0.5)  # half-way through the edge
    # off-axis voxel uses the Euclidean radius
    r = np.sqrt(4 ** 2 + 5 ** 2 + 6 ** 2)  # 8.77: inside the edge
    want = 0.5 + 0.5 * np.cos(np.pi * (r - radius) / edge)
    assert 0.05 < want < 0.95
    assert m[c + 6, c - 5, c + 4] == pytest.approx(want, abs=1e-6)
    # symmetric about index N//2 (not about (N-1)/2)
    np.testing.assert_array_equal(m[1:, 1:, 1:], m[1:, 1:, 1:][::-1, ::-1, ::-1])


def test_circle_matches_sphere_slice_and_hard_edge():
    box = 24
    sphere = masks.soft_sphere_mask(box, 6.5, 3.0)
    circle = masks.soft_circle_mask(box, 6.5, 3.0)
    np.testing.assert_array_equal(circle, sphere[box // 2])
    hard = masks.soft_circle_mask(box, 5.0, 0.0)
    assert set(np.unique(hard)) == {0.0, 1.0}
    assert hard.sum() == sum(1 for y in range(box) for x in range(box)
                             if (x - 12) ** 2 + (y - 12) ** 2 <= 25)


def test_particle_diameter_to_radius():
    assert masks.particle_diameter_to_radius_px(200.0, 4.0) == pytest.approx(25.0)
    assert masks.particle_diameter_to_radius_px(150, 1.5) == pytest.approx(50.0)


def test_apply_soft_mask_zero_and_background():
    rng = np.random.default_rng(0)
    imgs = rng.normal(loc=3.0, size=(4, 32, 32)).astype(np.float32)
    zero = masks.apply_soft_mask(imgs, 8, 4, fill="zero")
    np.testing.assert_allclose(zero, imgs * masks.soft_circle_mask(32, 8, 4))
    bg = masks.apply_soft_mask(imgs, 8, 4, fill="background")
    # far outside: the solvent mean of each image (about 3), inside: untouched
    for i in range(4):
        m = masks.soft_circle_mask(32, 8, 4).astype(np.float64)
        w = 1 - m
        mean_bg = (imgs[i] * w).sum() / w.sum()
        assert bg[i, 0, 0] == pytest.approx(mean_bg, rel=1e-5)
        assert bg[i, 16, 16] == imgs[i, 16, 16]
        assert mean_bg == pytest.approx(3.0, abs=0.1)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(masks.apply_soft_mask(vol, 4, 2),
                               vol * masks.soft_sphere_mask(16, 4, 2))
    with pytest.raises(ValueError):
        masks.apply_soft_mask(vol, 4, 2, fill="noise")


def test_resolution_helpers():
    assert masks.resolution_to_radius_px(10.0, 64, 2.5) == pytest.approx(16.0)
    assert masks.nyquist_angstrom(2.5) == 5.0


def _blob_map(box=48, apix=4.0, seed=0, noise=0.02):
    """Two Gaussian blobs (sigma 6 A) off-centre plus white noise: a map whose density
    fills a few per cent of a particle mask, like a reconstruction."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.zeros((box, box, box))
    for cz, cy, cx in [(3, -4, 2), (-3, 5, -4)]:
        d2 = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2
        vol += np.exp(-d2 * apix ** 2 / (2 * 6.0 ** 2))
    return vol + noise * rng.standard_normal(vol.shape), vol


def test_auto_solvent_mask_covers_density_and_excludes_solvent():
    box, apix = 48, 4.0
    noisy, clean = _blob_map(box, apix)
    inside = masks.soft_sphere_mask(box, 20.0, 3.0)
    m = masks.auto_solvent_mask(noisy, apix, inside, threshold_sigma=3.0,
                                extend_angst=8.0, edge_angst=12.0)
    assert m.shape == (box, box, box) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert np.all(m <= inside + 1e-6)           # never beyond the particle mask
    # all of the density's power is kept ...
    kept = ((clean * m) ** 2).sum() / (clean ** 2).sum()
    assert kept > 0.999, kept
    # ... in a fraction of the particle mask's volume ...
    assert m.sum() < 0.25 * inside.sum(), (m.sum(), inside.sum())
    # ... and voxels farther than extend + edge (20 A = 5 px) from it are solvent (0)
    from scipy.ndimage import distance_transform_edt
    far = distance_transform_edt(clean < 0.05 * clean.max()) * apix > 40.0
    assert far.any() and np.all(m[far] == 0.0)
    # the mask is 1 on the density itself
    assert np.all(m[clean > 0.5 * clean.max()] == 1.0)


def test_auto_solvent_mask_threshold_follows_the_noise():
    """A higher threshold in noise units gives a smaller mask; a flat map (no spread)
    gives the particle mask itself."""
    box, apix = 48, 4.0
    noisy, _ = _blob_map(box, apix, noise=0.05)
    inside = masks.soft_sphere_mask(box, 20.0, 3.0)
    loose = masks.auto_solvent_mask(noisy, apix, inside, threshold_sigma=2.0)
    tight = masks.auto_solvent_mask(noisy, apix, inside, threshold_sigma=6.0)
    assert tight.sum() < loose.sum()
    assert np.all(tight <= loose + 1e-6)
    flat = masks.auto_solvent_mask(np.ones((box, box, box)), apix, inside)
    np.testing.assert_allclose(flat, inside)
