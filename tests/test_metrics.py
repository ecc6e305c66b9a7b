"""Metrics: ARI (hand-computed examples and properties), FSC, angular errors."""
import numpy as np
import pytest

from cryoclass_plugin.engine import metrics
from cryoclass_plugin.engine.geometry import euler_to_matrix, matrix_to_euler


def test_ari_hand_computed():
    # contingency [[2, 1, 0], [0, 1, 2]]: pairs in cells 2, rows 6, columns 3, total 15
    # expected 6 * 3 / 15 = 1.2, max (6 + 3) / 2 = 4.5 -> (2 - 1.2) / (4.5 - 1.2) = 8/33
    assert metrics.adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == \
        pytest.approx(8 / 33)
    # cells 1, rows 2, columns 1, total 6: (1 - 1/3) / (1.5 - 1/3) = 4/7
    assert metrics.adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)


def test_ari_properties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 500)
    assert metrics.adjusted_rand_index(a, a) == pytest.approx(1.0)
    relabelled = np.array([7, 3, 9, 1])[a]  # renaming clusters changes nothing
    assert metrics.adjusted_rand_index(a, relabelled) == pytest.approx(1.0)
    names = np.array(["x", "y", "z", "w"])[a]  # any hashable labels
    assert metrics.adjusted_rand_index(names, a) == pytest.approx(1.0)
    b = rng.integers(0, 3, 500)
    assert metrics.adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_index(b, a))
    big_a, big_b = rng.integers(0, 3, 20000), rng.integers(0, 3, 20000)
    assert abs(metrics.adjusted_rand_index(big_a, big_b)) < 0.005  # independent -> ~0
    # 10 % of labels scrambled: clearly between 0 and 1
    noisy = a.copy()
    idx = rng.choice(500, 50, replace=False)
    noisy[idx] = rng.integers(0, 4, 50)
    assert 0.6 < metrics.adjusted_rand_index(a, noisy) < 0.95
    # degenerate partitions
    assert metrics.adjusted_rand_index([1, 1, 1], [2, 2, 2]) == 1.0
    assert metrics.adjusted_rand_index([0, 1, 2], [5, 6, 7]) == 1.0
    assert metrics.adjusted_rand_index([0, 0, 0, 0], [0, 1, 0, 1]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        metrics.adjusted_rand_index([0, 1], [0, 1, 2])


def test_best_match_accuracy():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([2, 2, 1, 0, 0, 1, 1, 1])  # 2->0, 0->1, 1->2 ; one mistake
    assert metrics.best_match_accuracy(truth, pred) == pytest.approx(7 / 8)


def test_fsc_shells():
    N = 32
    x = np.arange(N) - N // 2
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    wave5 = np.cos(2 * np.pi * 5 * xx / N)
    wave9 = np.cos(2 * np.pi * 9 * y / N)
    curve = metrics.fsc(wave5 + wave9, wave5 - wave9)
    assert curve.shape == (N // 2 + 1,)
    assert curve[5] == pytest.approx(1.0) and curve[9] == pytest.approx(-1.0)
    others = np.delete(curve, [5, 9])
    np.testing.assert_allclose(others, 0.0, atol=1e-9)


def test_fsc_identical_and_noisy():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(24, 24, 24))
    np.testing.assert_allclose(metrics.fsc(v, v), 1.0)
    np.testing.assert_allclose(metrics.fsc(v, 3 * v), 1.0)  # scale-invariant
    noisy = metrics.fsc(v, v + rng.normal(size=v.shape))  # equal signal and noise power
    assert np.all(np.abs(noisy[4:] - 1 / np.sqrt(2)) < 0.12)
    with pytest.raises(ValueError):
        metrics.fsc(v, v[:-1])


def test_fsc_resolution():
    curve = np.array([1.0, 1.0, 0.9, 0.7, 0.4, 0.2, 0.1])
    # 0.5 crossed 2/3 of the way from shell 3 to 4: 64 * 2 / (3 + 2/3) A
    assert metrics.fsc_resolution(curve, 64, 2.0) == pytest.approx(128 / (11 / 3))
    assert metrics.fsc_resolution(curve, 64, 2.0, threshold=0.143) == pytest.approx(
        128 / (5 + (0.2 - 0.143) / 0.1))
    assert metrics.fsc_resolution(np.ones(10), 18, 3.0) == 6.0  # never drops: Nyquist
    # a dip at shell 0 does not count; first crossing wins even if it recovers later
    wobbly = np.array([0.3, 0.9, 0.45, 0.8, 0.2])
    assert metrics.fsc_resolution(wobbly, 10, 1.0) == pytest.approx(10 / (1 + 0.4 / 0.45))


def _rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def test_angular_errors_known_rotations():
    rng = np.random.default_rng(2)
    eulers = np.stack([rng.uniform(-180, 180, 20), np.rad2deg(np.arccos(rng.uniform(-1, 1, 20))),
                       rng.uniform(-180, 180, 20)], axis=1)
    A = euler_to_matrix(*eulers.T)
    angles = rng.uniform(0, 170, 20)
    B = np.stack([a @ _rotation(rng.normal(size=3), t) for a, t in zip(A, angles)])
    eulers_b = np.stack(matrix_to_euler(B), axis=1)
    np.testing.assert_allclose(metrics.angular_errors_deg(eulers, eulers_b), angles, atol=1e-6)
    np.testing.assert_allclose(metrics.angular_errors_deg(eulers, eulers), 0.0, atol=1e-5)


def test_angular_errors_with_symmetry():
    eulers = np.array([[10.0, 40.0, 70.0], [-120.0, 100.0, 15.0]])
    A = euler_to_matrix(*eulers.T)
    c2 = np.stack([np.eye(3), _rotation([0, 0, 1], 180.0)])
    flipped = np.stack(matrix_to_euler(A @ c2[1]), axis=1)   # the symmetry-equivalent view
    np.testing.assert_allclose(metrics.angular_errors_deg(eulers, flipped), 180.0, atol=1e-6)
    np.testing.assert_allclose(metrics.angular_errors_deg(eulers, flipped, sym=c2), 0.0,
                               atol=1e-5)
    # with a 30 degree residual on top, the group minimum is that residual
    off = np.stack(matrix_to_euler(A @ c2[1] @ _rotation([1, 0, 0], 30.0)), axis=1)
    np.testing.assert_allclose(metrics.angular_errors_deg(eulers, off, sym=c2), 30.0, atol=1e-6)
    try:
        from cryoclass_plugin.engine.symmetry import symmetry_matrices
        symmetry_matrices("C2")
    except Exception:
        pytest.skip("symmetry module not available")
    np.testing.assert_allclose(metrics.angular_errors_deg(eulers, flipped, sym="C2"), 0.0,
                               atol=1e-5)


def test_image_keys_ignore_how_the_stack_path_is_spelled():
    import pandas as pd
    from cryoclass_plugin.engine.metrics import image_keys, rows_like
    assert image_keys(["000003@particles.mrcs", "3@../data/particles.mrcs", "a/b.mrc"]) == \
        ["3@particles.mrcs", "3@particles.mrcs", "0@b.mrc"]
    truth = pd.DataFrame({"rlnImageName": ["2@p.mrcs", "1@p.mrcs"], "c": [20, 10]})
    got = pd.DataFrame({"rlnImageName": ["000001@x/p.mrcs", "000002@x/p.mrcs"], "c": [1, 2]})
    assert rows_like(truth, got)["c"].tolist() == [2, 1]


def test_state_recall_matches_states_to_classes_one_to_one():
    from cryoclass_plugin.engine.metrics import state_recall
    true = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    # States 1 and 2 lumped in class 7: only one of them can score; state 3 split.
    got = np.array([7, 7, 7, 7, 7, 7, 8, 9])
    assert state_recall(true, got) == [1.0, 0.0, 0.5]
    assert state_recall(true, true + 10) == [1.0, 1.0, 1.0]
