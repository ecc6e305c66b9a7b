"""The recommended start on sets where RELION's Class3D aligns the particles but leaves
the classes mixed.

The recommended start (``--init_classes pca``: consensus alignment, heterogeneity-PCA
split, fixed-pose classification at 25 A, the held-out merge test, then full EM against
references that share the consensus where the classes do not differ) recovers the
classes, also with one class too many.  64 px, 600 particles, SNR 0.1: the smallest set
of the accuracy benchmark's kind (benchmarks/bench_accuracy.py).  Measured on this set
with the defaults (joint consensus, automatically masked references, merge test, EM
update of the signal spectrum, class differences up to 18 A): K=3, iteration 20: ARI
0.985 (RELION's start 0.356); K=4, iteration 25 (with ``--classify_final_iter 0``):
0.995, sizes 199 / 201 / 200 / 0 (the merge test joins the extra class to its twin at
the end of the fixed-pose phase).  Also
SNR 0.05 (seed 1), K=4 at SNR 0.2, and class maps better than 2.5 x the pixel size on
1000 particles at SNR 2.

Every test here runs whole refinements of benchmark size (1 to 4 minutes each on 2
cores), so the module is marked ``slow``: the everyday subset
``pytest -m "not slow"`` leaves it out, the full suite runs it.  The class maps are
compared with the oracle reconstruction with RELION's tau2 update (what a RELION user
would get from the true poses and classes); with the EM update the oracle is sharper
still (13.3-14.7 A at SNR 0.05 against our 14.1-17.2 A; docs/benchmarks.md, "Accuracy,
K=3").
"""
import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine.metrics import adjusted_rand_index, angular_errors_deg, rows_like
from cryoclass_plugin.oracle_reconstruction import map_resolution, oracle_resolutions
from cryoclass_plugin.engine.simulate import simulate_dataset

pytestmark = pytest.mark.slow

TUTORIAL = ["--K", "3", "--tau2_fudge", "4", "--ini_high", "50", "--firstiter_cc",
            "--particle_diameter", "205", "--zero_mask", "--flatten_solvent", "--ctf",
            "--healpix_order", "2", "--offset_range", "5", "--offset_step", "2", "--pad", "2",
            "--skip_gridding", "--preread_images", "--j", "2"]

# The tests of a mechanism (the merge test, the rare-state guard, a low SNR) run without
# the finer search of the last iterations (``--classify_final_iter 0``), which is about a
# third of a 600-particle run's time and not what they check; the first test and the
# 2.5-pixel test run the defaults and check those iterations.
WITHOUT_FINAL_ITERATIONS = ["--classify_final_iter", "0"]


def _ari(data_dir, root, it):
    truth = starfile.read(data_dir / "truth.star")
    truth = truth["particles"] if isinstance(truth, dict) else truth
    got = starfile.read(f"{root}_it{it:03d}_data.star")["particles"]
    got = rows_like(truth, got)
    return adjusted_rand_index(truth["rlnClassNumber"].to_numpy(), got["rlnClassNumber"].to_numpy())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("acc") / "data"
    info = simulate_dataset(str(data), n=600, box=64, apix=4.0, snr=0.1, n_classes=3, seed=0)
    return data, info


def test_recommended_start_recovers_classes_that_relion_start_leaves_mixed(dataset, tmp_path):
    data, info = dataset
    assert info["oracle_accuracy"] >= 0.98, info
    base = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc")] + TUTORIAL
    n_iter = 20
    assert cli.main(base + ["--o", str(tmp_path / "relion" / "run"), "--iter", str(n_iter)]) == 0
    assert cli.main(base + ["--o", str(tmp_path / "pca" / "run"), "--iter", str(n_iter),
                            "--init_classes", "pca", "--consensus_iter", "6"]) == 0
    relion_ari = _ari(data, tmp_path / "relion" / "run", n_iter)
    pca_ari = _ari(data, tmp_path / "pca" / "run", n_iter)
    print(f"600 particles, SNR 0.1: oracle {info['oracle_accuracy']:.3f}; ARI RELION start "
          f"{relion_ari:.3f}, recommended start {pca_ari:.3f}")
    # The fixed-pose phase keeps the consensus poses (iterations 7-14).
    a = starfile.read(tmp_path / "pca" / "run_it008_data.star")["particles"]
    b = starfile.read(tmp_path / "pca" / "run_it012_data.star")["particles"]
    assert np.allclose(a["rlnAngleRot"], b["rlnAngleRot"])
    # Global search at --healpix_order 2 in the consensus, local on order 3 in its last
    # iterations, local on order 4 after the fixed-pose phase and on order 5 in the last
    # --classify_final_iter 2.
    order = {it: int(starfile.read(tmp_path / "pca" / f"run_it{it:03d}_sampling.star")
                     ["rlnHealpixOrder"]) for it in (3, 6, 10, 20)}
    assert order == {3: 2, 6: 3, 10: 2, 20: 5}, order      # 10: fixed poses, no search
    log = (tmp_path / "pca" / "run.log").read_text()
    assert "em                 local order 4 sigma 3 deg" in log
    assert pca_ari >= 0.9
    assert pca_ari >= relion_ari + 0.2
    # Median angular error below the 7.5-degree sampling step, and each class
    # map (the one most of a true class's particles went to) as sharp against its true
    # map as the map reconstructed from the true poses and classes, within 15 %.
    # Measured (20 iterations): 3.34 deg; 12.4-13.7 A against the oracle's 15.8-16.5 A.
    # (2.5 x the pixel size, 10 A, is out of reach on this set: the oracle stops at 16 A.)
    _assert_poses_and_maps(data, tmp_path / "pca" / "run", n_iter, tmp_path / "oracle")


def _assert_poses_and_maps(data, root, n_iter, oracle_dir, oracle_flags=(),
                           max_resolution=None):
    """The pose and map criteria for a run ``root`` on the set ``data``: median
    angular error below the 7.5-degree step; each class map within 15 % of the oracle
    reconstruction's resolution (the same flags plus ``oracle_flags``) and, if given,
    better than ``max_resolution`` (A)."""
    truth = starfile.read(data / "truth.star")["particles"]
    got = rows_like(truth, starfile.read(f"{root}_it{n_iter:03d}_data.star")["particles"])
    ang = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = float(np.median(angular_errors_deg(truth[ang].to_numpy(float), got[ang].to_numpy(float))))
    oracle = oracle_resolutions(data, TUTORIAL[2:] + list(oracle_flags), n_iter, oracle_dir)
    ours = []
    for k in (1, 2, 3):
        mine = got["rlnClassNumber"].to_numpy()[truth["rlnClassNumber"].to_numpy() == k]
        best = int(np.bincount(mine, minlength=4)[1:].argmax()) + 1
        ours.append(map_resolution(f"{root}_it{n_iter:03d}_class{best:03d}.mrc",
                                   data / f"true_class{k:03d}.mrc"))
    print(f"median angular error {err:.2f} deg; FSC 0.5 against the true maps "
          f"{np.round(ours, 1).tolist()} A, oracle reconstruction {np.round(oracle, 1).tolist()} A")
    assert err < 7.5
    assert all(r <= 1.15 * o for r, o in zip(ours, oracle)), (ours, oracle)
    if max_resolution is not None:
        assert max(ours) < max_resolution, (ours, max_resolution)


def test_recommended_start_with_one_class_too_many(dataset, tmp_path):
    """K=4 (the tutorial's K) on three true classes.  The extra class may end empty or
    small (junk); its particles count as errors in the ARI.  Measured (with
    ``--classify_final_iter 0``): the merge test joins the extra class to its twin at
    the end of the fixed-pose phase (it recovers -0.06 of a random split's cost); ARI
    0.995, sizes 199 / 201 / 200 / 0 at iteration 25 (the tutorial's and the
    benchmark's count).  Without the merge test
    (``--merge_threshold 0``) the EM update keeps half of a true class in the extra
    class (0.801; docs/benchmarks.md, "Signal spectrum (tau2) update")."""
    data, info = dataset
    n_iter = 25
    root = tmp_path / "k4" / "run"
    assert cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(root), "--iter", str(n_iter),
                     "--init_classes", "pca", "--consensus_iter", "6"]
                    + TUTORIAL[2:] + ["--K", "4"] + WITHOUT_FINAL_ITERATIONS) == 0
    ari = _ari(data, root, n_iter)
    got = starfile.read(f"{root}_it{n_iter:03d}_data.star")["particles"]
    sizes = np.bincount(got["rlnClassNumber"].to_numpy(), minlength=5)[1:]
    print(f"K=4 on 3 classes, 600 particles, SNR 0.1: ARI {ari:.3f}, class sizes {sizes.tolist()}")
    assert ari >= 0.9
    assert np.sort(sizes)[0] <= 0.1 * sizes.sum()      # the extra class empty or junk


def _recommended_run(tmp_path_factory, tmp_path, n, snr, seed, n_iter, extra=(), k=3):
    """Simulate a three-class set, run the recommended start on it with ``k`` classes
    (with --norm --scale, as the protocol), check ARI >= 0.9 against the truth; returns
    (data, root, n_iter)."""
    data = tmp_path_factory.mktemp(f"acc_n{n}_snr{snr:g}") / "data"
    info = simulate_dataset(str(data), n=n, box=64, apix=4.0, snr=snr, n_classes=3, seed=seed)
    assert info["oracle_accuracy"] >= 0.98, info
    root = tmp_path / "pca" / "run"
    assert cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(root), "--iter", str(n_iter),
                     "--init_classes", "pca", "--consensus_iter", "6", "--norm", "--scale"]
                    + list(extra) + TUTORIAL + ["--K", str(k)]) == 0
    ari = _ari(data, root, n_iter)
    print(f"{n} particles, SNR {snr:g}, K={k} {' '.join(extra)}: oracle "
          f"{info['oracle_accuracy']:.3f}; ARI {ari:.3f}")
    assert ari >= 0.9
    return data, root, n_iter


def test_recommended_start_at_snr_005(tmp_path_factory, tmp_path):
    """SNR 0.05 (K=3; 600 particles, seed 1 of the accuracy benchmark's sets): ARI >= 0.9
    against the truth, median angular error below the sampling step, class maps within
    15 % of the oracle reconstruction's resolution.  Measured (25 iterations, the
    benchmark's count, ``--classify_final_iter 0``): ARI 0.936 (oracle accuracy 1.000),
    median angular error 3.74 deg, class maps 14.4-15.3 A against the oracle
    reconstruction's 17.8-19.5 A (RELION's update); about 2 minutes on 2 cores.  With
    the simulator's TRUE maps searched around our final poses the classes come out at
    0.907 (benchmarks/bench_true_map_ceiling.py), so at this SNR the assignment is as
    good as perfect maps would make it.  On seed 0 of the same kind the defaults reach
    0.885 against that ceiling's 0.92-0.94 (docs/benchmarks.md, "True-map ceiling")."""
    data, root, n_iter = _recommended_run(tmp_path_factory, tmp_path, n=600, snr=0.05, seed=1,
                                          n_iter=25, extra=WITHOUT_FINAL_ITERATIONS)
    _assert_poses_and_maps(data, root, n_iter, tmp_path / "oracle")


def test_one_class_too_many_at_snr_02_is_merged(tmp_path_factory, tmp_path):
    """K=4 on three true classes at SNR 0.2 (600 particles, seed 0 of the accuracy
    benchmark's sets).  The PCA split cuts one true class in two halves that each keep
    their particles through full EM (ARI 0.856 with ``--merge_threshold 0``); the
    held-out test of ``engine/merge.py`` calls them one structure at the end of the
    fixed-pose phase and merges them.  Measured (``--classify_final_iter 0``): ARI
    1.000, sizes 200 / 200 / 200 / 0 (docs/benchmarks.md, "One class too many (K=4)");
    about 1 minute on 2 cores."""
    data, root, n_iter = _recommended_run(tmp_path_factory, tmp_path, n=600, snr=0.2, seed=0,
                                          n_iter=25, k=4, extra=WITHOUT_FINAL_ITERATIONS)
    got = starfile.read(f"{root}_it{n_iter:03d}_data.star")["particles"]
    sizes = np.bincount(got["rlnClassNumber"].to_numpy(), minlength=5)[1:]
    print(f"class sizes {sizes.tolist()}")
    assert np.sort(sizes)[0] <= 0.1 * sizes.sum()      # the extra class empty or junk
    model = starfile.read(f"{root}_it{n_iter:03d}_model.star")["model_classes"]
    assert np.sort(model["rlnClassDistribution"].to_numpy())[0] < 0.01


def test_class_maps_better_than_2_5_pixels_where_the_data_carry_it(tmp_path_factory, tmp_path):
    """Class maps better than 2.5 x the pixel size (FSC 0.5 against the true map, 10 A
    here) on a set whose particles carry it: 1000 particles at SNR 2.  (With 600
    particles at SNR 0.05-0.1 even the oracle reconstruction, from the true poses and
    classes, stops at 12-20 A; with 5000 at SNR 0.2 our maps reach 9.5-9.7 A:
    docs/benchmarks.md, "Map resolution against the oracle reconstruction".)  The
    recommended start with the EM update of the signal spectrum (``--tau2_estimate
    em``).  Measured (20 iterations): ARI 0.982; class maps 9.4-9.6 A against the
    oracle reconstruction's 8.8-9.1 A (with class differences to 25 A); about 3 minutes
    on 2 cores with the oracle reconstructions."""
    data, root, n_iter = _recommended_run(tmp_path_factory, tmp_path, n=1000, snr=2.0, seed=0,
                                          n_iter=20, extra=["--tau2_estimate", "em"])
    _assert_poses_and_maps(data, root, n_iter, tmp_path / "oracle",
                           oracle_flags=["--tau2_estimate", "em"], max_resolution=2.5 * 4.0)


@pytest.mark.parametrize("n,K,n_iter", [(1000, 4, 25), (2000, 2, 20)], ids=["K4", "K2"])
def test_a_rare_state_keeps_its_class(tmp_path_factory, tmp_path, n, K, n_iter):
    """A 5 % state (the synthetic complex with its subunit absent, SNR 0.1) keeps a class
    of its own.  Target: the rare state's recall >= 0.8.

    K=4 (1,000 particles, two classes more than the states): the split cuts the main
    state in three and the merge tests join pieces of it, but never the rare state to
    them.  After full EM the smaller piece left of the main state (120 particles)
    recovers 0.23 of a random split's cost against the main class and reproduces 87 %
    of the held-out assignments over both, but only 2 % of its own particles choose its
    map: the second test's rule on a class alone (``merge.SIDE_MAJORITY``) joins it to
    the main class, while the rare state's class (48 particles; 15 % of its own, its
    noisy map from 24 particles against the main state's, but a ratio of 1.45,
    ``merge.SIDE_MAX_RATIO``) stays.  Measured: recall 1.00 / 0.94 (oracle 0.999);
    sizes 952 / 0 / 48 / 0, ARI 0.953 (without the rule on a class alone the piece
    stayed apart: sizes 840 / 0 / 48 / 112, ARI 0.412).

    K=2 (2,000 particles, ``bench_states`` rare2; 20 iterations, the second test after
    iteration 16): the split cuts the main state in two halves (65 % of held-out
    assignments reproduced, ratio 0.52); full EM turns them into the main and the rare
    state (recall 1.00 / 0.97, ARI 0.982; the same at iteration 25), so the first test
    must not merge on the agreement (it would leave one class: ARI 0).  With 1,000
    particles the likelihood itself calls the halves one structure (ratio -0.07) and
    the rare state is lost.  Measured with ``--classify_final_iter 0``; 2 and 3 minutes
    on 2 cores."""
    from cryoclass_plugin.engine.metrics import state_recall
    data = tmp_path_factory.mktemp("rare") / "data"
    info = simulate_dataset(str(data), n=n, box=64, apix=4.0, snr=0.1, n_classes=2, seed=0,
                            shape="complex", states=[(), ("subunit",)],
                            class_fractions=[0.95, 0.05])
    assert info["oracle_accuracy"] >= 0.98, info
    root = tmp_path / "pca" / "run"
    assert cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(root), "--iter", str(n_iter),
                     "--init_classes", "pca", "--consensus_iter", "6", "--norm", "--scale"]
                    + TUTORIAL + ["--K", str(K)] + WITHOUT_FINAL_ITERATIONS) == 0
    truth = starfile.read(data / "truth.star")
    truth = truth["particles"] if isinstance(truth, dict) else truth
    got = rows_like(truth, starfile.read(f"{root}_it{n_iter:03d}_data.star")["particles"])
    true_cls = truth["rlnClassNumber"].to_numpy()
    got_cls = got["rlnClassNumber"].to_numpy()
    ari = adjusted_rand_index(true_cls, got_cls)
    recall = state_recall(true_cls, got_cls)
    print(f"rare state, K={K}, {n} particles: oracle {info['oracle_accuracy']:.3f}; "
          f"ARI {ari:.3f}; recall {recall}; sizes {np.bincount(got_cls).tolist()}")
    assert recall[1] >= 0.8
    assert ari >= 0.9
