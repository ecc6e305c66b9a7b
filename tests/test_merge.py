"""The held-out merge test (:mod:`cryoclass_plugin.engine.merge`) on ground truth: a
simulated three-class set with the true poses and classes, where one true class is
also cut at random into two classes (a duplicate).  The test must keep the true
classes apart and merge the duplicate.  (On whole runs: docs/benchmarks.md, "merge
test", and tests/test_accuracy_recommended.py, K=4 at SNR 0.2.)"""
from dataclasses import replace

import numpy as np
import pytest

from cryoclass_plugin.engine import merge
from cryoclass_plugin.engine.plan import ScheduleState
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.simulate import simulate_dataset

SHIFT_PX = np.array([0.6, -0.5, 0.4])


def _truth_run(tmp_path_factory, n_pieces):
    """A K=2+n_pieces Refinement on 400 particles (48 px, 5 A/px, SNR 0.2) whose state
    holds the true poses and classes, true class 1 cut at random into ``n_pieces``
    classes (1, 4, 5, ...), each added piece centred SHIFT_PX away."""
    data = tmp_path_factory.mktemp("merge") / "data"
    info = simulate_dataset(str(data), n=400, box=48, apix=5.0, snr=0.2, n_classes=3,
                            seed=0)
    assert info["oracle_accuracy"] >= 0.98, info
    from conftest import refinement_at_true_poses
    r, model, truth = refinement_at_true_poses(data, 2 + n_pieces, 200)
    labels = truth["rlnClassNumber"].to_numpy() - 1
    piece = np.floor(np.random.default_rng(5).random(len(labels)) * n_pieces).astype(int)
    labels[(labels == 0) & (piece > 0)] = 2 + piece[(labels == 0) & (piece > 0)]
    # The cut-off pieces are also centred differently, as EM leaves such duplicates:
    # their particles' origins fit the map shifted by SHIFT_PX (x y z), i.e.
    # o + apix (R s)_xy.
    rot = euler_to_matrix(*model.part_eulers.T)
    moved = labels >= 3
    model.part_origin_angst[moved] += model.apix * (rot[moved] @ SHIFT_PX)[:, :2]
    r.true_origins = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    # Two fixed-pose iterations with these classes give the noise and signal spectra of
    # a run's state (the starting ones, from the images and the reference, are not).
    model.current_shell = 20
    for it in (1, 2):
        plan = replace(r.plan(model, it), search="none", write=False)
        model = r.iterate(model, plan, allowed=labels)
    assert (model.part_class == labels).all()
    return r, model


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory):
    """True class 1 cut in two (classes 1 and 4), K=4.
    Measured (three draws of the halves): true pairs pay back 0.80-2.00 of a random
    split's cost, the cut -0.03."""
    return _truth_run(tmp_path_factory, 2)


def test_true_classes_pay_back_far_more_than_a_random_split(truth_run):
    r, model = truth_run
    ev = merge.pair_evidence(r.ctx, model, 1, 2, 25.0)
    print("true classes 2 and 3:", merge.describe_evidence(ev))
    assert ev["delta"] > 0 and ev["null"] < 0
    assert ev["ratio"] > 1.0
    assert ev["agree"] > 0.9
    # Each class's own held-out particles choose its map: neither would be emptied by
    # the second test's rule on the smaller class (SIDE_MAJORITY).
    print("own shares:", ev["agree_sides"], "margins:", ev["margin_sides"])
    assert min(ev["agree_sides"]) > 0.8
    assert min(ev["margin_sides"]) > 0
    assert not merge.is_one_structure(ev, merge.RETEST_THRESHOLD, 0.7, 0.9)
    assert not merge.non_reproducing_pairs([(1, 2, ev)])
    # The share over both classes is the two classes' own shares weighted by size.
    sizes = np.array([np.sum(model.part_class == k) for k in (1, 2)])
    assert np.isclose(ev["agree"], sizes @ np.array(ev["agree_sides"]) / sizes.sum())


def test_a_random_cut_of_one_class_is_called_one_structure(truth_run):
    r, model = truth_run
    ev = merge.pair_evidence(r.ctx, model, 0, 3, 25.0)
    print("true class 1 cut in two:", merge.describe_evidence(ev), "shift", ev["shift_px"])
    assert ev["delta"] < 0
    assert abs(ev["ratio"]) < 0.3
    assert ev["agree"] < 0.65
    # The re-centring found the offset and puts the particles back on the true centre.
    assert ev["moved"] in (0, 3)
    sign = 1.0 if ev["moved"] == 3 else -1.0
    assert np.allclose(ev["shift_px"], sign * SHIFT_PX, atol=0.15), ev["shift_px"]
    moved = model.part_class == ev["moved"]
    if ev["moved"] == 3:
        err = np.abs(ev["aligned_origins"] - r.true_origins[moved])
        assert np.median(err) < 0.5, np.median(err)


def test_relative_shift_is_found_to_a_twentieth_of_a_pixel(truth_run):
    from cryoclass_plugin.engine.fourier import fft_centered, ifft_centered
    r, model = truth_run
    a = model.refs[1].astype(np.float64)
    n = a.shape[0]
    kz, ky, kx = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    s = np.array([1.3, -0.45, 0.7])
    b = ifft_centered(fft_centered(a) * np.exp(-2j * np.pi * (kx * s[0] + ky * s[1] + kz * s[2]) / n)).real
    assert np.allclose(merge.relative_shift_px(a, b, 10), s, atol=0.051)


@pytest.mark.slow
def test_only_the_duplicate_pair_is_merged_and_the_class_freed(truth_run):
    import copy
    r, model = truth_run
    model = copy.deepcopy(model)
    lines = []
    r.log = lines.append
    model.schedule = ScheduleState(consensus_end=6)
    assert r._merge_duplicates(model) is True
    assert model.schedule.merge_tested and model.schedule.merge_extra == 3
    assert model.schedule.merged
    sizes = np.bincount(model.part_class, minlength=4)
    true_sizes = np.bincount(truth_run[1].part_class, minlength=4)
    true_sizes = [true_sizes[0] + true_sizes[3], true_sizes[1], true_sizes[2], 0]
    assert sorted(sizes.tolist()) == sorted(true_sizes)
    assert model.pdf_class.min() == 0.0 and abs(model.pdf_class.sum() - 1.0) < 1e-9
    merged = [line for line in lines if line.startswith("merge:")]
    assert len(merged) == 1 and ("class 4 joins class 1" in merged[0]
                                 or "class 1 joins class 4" in merged[0]), lines
    # Once only: the state remembers the test ran (--continue repeats nothing).
    assert r._merge_duplicates(model) is False


@pytest.mark.slow
def test_a_structure_cut_in_three_is_joined_by_the_second_test(tmp_path_factory):
    """Classes 1, 4 and 5 hold one true class: the first test merges one pair of them
    (no class in two pairs), the second (after full EM, here on the same state) joins
    the third piece; the true classes 2 and 3 stay apart."""
    r, model = _truth_run(tmp_path_factory, 3)
    truth = model.part_class.copy()
    lines = []
    r.log = lines.append
    model.schedule = ScheduleState(consensus_end=6)
    assert r._merge_duplicates(model) is True
    assert len([line for line in lines if line.startswith("merge:")]) == 1, lines
    assert r._merge_duplicates(model, retest=True) is True
    assert model.schedule.retested and model.schedule.retest_merged
    assert len([line for line in lines if line.startswith("merge:")]) == 2, lines
    sizes = np.bincount(model.part_class, minlength=5)
    true_sizes = np.bincount(truth, minlength=5)
    expected = [true_sizes[0] + true_sizes[3] + true_sizes[4], true_sizes[1], true_sizes[2],
                0, 0]
    assert sorted(sizes.tolist()) == sorted(expected)
    # Each test runs once (--continue repeats neither).
    assert r._merge_duplicates(model, retest=True) is False


def test_a_split_that_does_not_reproduce_is_merged(monkeypatch):
    """The decision rule alone, on given evidence: the likelihood merges a pair whose
    split does not pay (delta < 0, ratio below the threshold); a pair that the
    likelihood calls two structures merges only when its held-out particles choose
    their own side's map less often than min_agreement; pairs are taken by ratio, no
    class in two."""
    from types import SimpleNamespace
    evidence = {(0, 1): {"delta": 3.0, "ratio": 12.3, "agree": 0.63, "moved": 1},
                (0, 2): {"delta": 3.0, "ratio": 1.50, "agree": 0.95, "moved": 2},
                (1, 2): {"delta": -5.0, "ratio": 0.05, "agree": 0.80, "moved": 2}}
    monkeypatch.setattr(merge, "_PairData", lambda *args: None)
    monkeypatch.setattr(merge, "pair_evidence",
                        lambda ctx, model, a, b, *args, **kw: dict(evidence[(a, b)], n=100))
    model = SimpleNamespace(n_classes=3, pdf_class=np.array([0.5, 0.3, 0.2]),
                            part_class=np.repeat([0, 1, 2], [50, 30, 20]))

    def merged(**kw):
        return [(keep, drop) for keep, drop, _ in
                merge.duplicate_pairs(None, model, 25.0, 0.3, **kw)]
    assert merged() == [(1, 2)]                          # the likelihood alone
    assert merged(min_agreement=0.65) == [(1, 2)]        # lower ratio first; 1 is taken
    evidence[(1, 2)].update(ratio=0.5)
    assert merged() == []
    assert merged(min_agreement=0.65) == [(0, 1)]        # 63 % reproduced
    assert merged(min_agreement=0.6) == []
    # A pair that reproduces at least max_agreement stays apart whatever its ratio.
    evidence[(1, 2)].update(ratio=0.05, agree=0.91)
    assert merged(min_agreement=0.6) == [(1, 2)]
    assert merged(min_agreement=0.6, max_agreement=0.9) == []


def test_the_second_test_merges_a_split_that_recovers_nothing(monkeypatch):
    """After full EM (threshold RETEST_THRESHOLD = 0): halves of one structure that
    reproduce 72 % of their assignments (above min_agreement) but recover none of a
    random split's cost merge; a subtle true pair that recovers a little (0.08, 76 %)
    and a pair that reproduces max_agreement stay apart."""
    from types import SimpleNamespace
    evidence = {(0, 1): {"delta": 3.0, "ratio": 12.3, "agree": 0.99, "moved": 1},
                (0, 2): {"delta": -4.0, "ratio": 0.08, "agree": 0.76, "moved": 2},
                (1, 2): {"delta": -5.0, "ratio": -0.04, "agree": 0.72, "moved": 2}}
    monkeypatch.setattr(merge, "_PairData", lambda *args: None)
    monkeypatch.setattr(merge, "pair_evidence",
                        lambda ctx, model, a, b, *args, **kw: dict(evidence[(a, b)], n=100))
    model = SimpleNamespace(n_classes=3, pdf_class=np.array([0.5, 0.3, 0.2]),
                            part_class=np.repeat([0, 1, 2], [50, 30, 20]))

    def merged():
        return [(keep, drop) for keep, drop, _ in
                merge.duplicate_pairs(None, model, 25.0, merge.RETEST_THRESHOLD,
                                      min_agreement=0.7, max_agreement=0.9)]
    assert merged() == [(1, 2)]
    evidence[(1, 2)].update(agree=0.91)
    assert merged() == []
    # The first test's threshold (0.3) would take the subtle true pair.
    assert [(k, d) for k, d, _ in merge.duplicate_pairs(
        None, model, 25.0, 0.3, min_agreement=0.7, max_agreement=0.9)] == [(0, 2)]


def test_the_second_test_merges_a_class_whose_own_particles_prefer_another_map(monkeypatch):
    """After full EM, a smaller class whose own held-out particles choose the map of the
    class they prefer most (lowest margin) more often than not (SIDE_MAJORITY) joins
    that class, whatever the agreement over both classes (which the larger class's
    particles make), unless the split recovers SIDE_MAX_RATIO of a random split's cost
    there.  It joins the class it prefers, not the pair of lowest ratio; a small class
    of another state, whose own particles choose it more often than not, stays."""
    from types import SimpleNamespace
    high = {"delta": 9.0, "ratio": 7.0, "agree": 0.99, "agree_sides": (0.99, 0.99),
            "margin_sides": (20.0, 20.0)}

    def small(ratio, own, margin):     # class 3 (96 particles), second of each pair
        return {"delta": -1.0, "ratio": ratio, "agree": 0.9, "agree_sides": (1.0, own),
                "margin_sides": (15.0, margin), "moved": 3}
    evidence = {(0, 1): dict(high, moved=1), (0, 2): dict(high, moved=2),
                (1, 2): dict(high, moved=2),
                (0, 3): small(0.56, 0.02, -36.6),      # the state its particles are of
                (1, 3): small(0.47, 0.11, -24.7),      # another state, lower ratio
                (2, 3): small(0.76, 0.35, -9.0)}
    monkeypatch.setattr(merge, "_PairData", lambda *args: None)
    monkeypatch.setattr(merge, "pair_evidence",
                        lambda ctx, model, a, b, *args, **kw: dict(evidence[(a, b)], n=100,
                                                                   first=a))
    model = SimpleNamespace(n_classes=4, pdf_class=np.array([0.4, 0.3, 0.26, 0.04]),
                            part_class=np.repeat([0, 1, 2, 3], [900, 700, 450, 96]))

    def merged(side_majority=merge.SIDE_MAJORITY):
        return [(keep, drop) for keep, drop, _ in
                merge.duplicate_pairs(None, model, 25.0, merge.RETEST_THRESHOLD,
                                      min_agreement=0.7, max_agreement=0.9,
                                      side_majority=side_majority)]
    assert merged(0.0) == []                            # 90 % reproduced over both
    assert merged() == [(0, 3)]
    # A small class that differs clearly from the class it prefers stays, even if its
    # noisy map loses its own particles to that class's map (a 5 % state of 48
    # particles: ratio 1.45, 15 % of its own particles).
    evidence[(0, 3)].update(ratio=1.45, agree_sides=(1.0, 0.15))
    assert merged() == []
    # So does a small class of another state whose own particles choose it more often
    # than not.
    evidence[(0, 3)].update(ratio=0.56, agree_sides=(1.0, 0.55))
    assert merged() == []
    # The class that counts is the smaller one, which a merge drops.
    for key in ((1, 3), (2, 3)):
        evidence[key].update(agree_sides=(1.0, 0.9))
    evidence[(0, 3)].update(agree_sides=(0.3, 0.9), margin_sides=(-40.0, 15.0))
    assert merged() == []
