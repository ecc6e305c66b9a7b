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
