"""``--allow_coarser_sampling`` (RELION's coarser sampling while the poses' expected
accuracy is worse than the sampling asked for): the rule, the accuracy estimate, and a
run whose early iterations search a coarser grid and whose later ones return to the
one asked for."""
import cryoclass_plugin  # noqa: F401  (first: it chooses numpy's BLAS kernels)
import mrcfile
import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import coarser_sampling as cs
from cryoclass_plugin.engine.fourier import half_plane_pixels
from cryoclass_plugin.engine.plan import IterationPlan
from cryoclass_plugin.engine.projector import Projector


def test_order_rule_examples():
    # order 2, oversampling 1: fine steps 7.5 (h=2), 15 (h=1), 30 (h=0) deg.
    assert cs.coarser_order(2, 1, 20.0) == 1        # 15 < 16 <= 30
    assert cs.coarser_order(2, 1, 10.0) == 2        # 15 >= 8: keep the order asked for
    assert cs.coarser_order(2, 1, 100.0) == 0       # never below order 0
    assert cs.coarser_order(2, 1, 2.0) == 2         # never finer than asked
    assert cs.coarser_order(3, 1, 20.0) == 1
    assert cs.fine_step_deg(2, 1) == pytest.approx(7.5)


def test_offset_rule_examples():
    # range 5, step 2 px, oversampling 1: 0.8 acc 2, capped at 4.75, at least 2.
    assert cs.coarser_offset_step(2.0, 5.0, 1, 2.0) == pytest.approx(3.2)
    assert cs.coarser_offset_step(2.0, 5.0, 1, 10.0) == pytest.approx(4.75)
    assert cs.coarser_offset_step(2.0, 5.0, 1, 0.5) == pytest.approx(2.0)
    assert cs.coarser_offset_step(2.0, 5.0, 1, np.inf) == pytest.approx(4.75)


def test_ladder_and_cross_correlation_target():
    ladder = cs.error_ladder(30.0)
    assert ladder[0] == pytest.approx(0.05) and ladder[-1] == pytest.approx(35.0)
    assert np.all(np.diff(ladder) > 0) and ladder[-2] <= 30.0
    assert cs.error_ladder(10.0)[-1] == pytest.approx(12.0)
    # a 200 A particle at 20 A: 360 / ceil(pi * 10) = 360 / 32 = 11.25 deg
    assert cs.cross_correlation_target_deg(200.0, 20.0) == pytest.approx(11.25)


@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    from cryoclass_plugin.engine.simulate import simulate_dataset
    data = tmp_path_factory.mktemp("coarser")
    simulate_dataset(str(data), n=120, box=32, apix=7.0, snr=0.1, n_classes=2, seed=3)
    return data


@pytest.fixture(scope="module")
def projector(two_states):
    vol = mrcfile.read(two_states / "true_class001.mrc").astype(np.float32)
    return Projector(vol, pad=2, gridding=False, max_shell=None)


def _errors(projector, shell, noise, seed=0):
    ky, kx = half_plane_pixels(32, shell)[:2]
    n = 40
    ctf = np.ones((n, len(ky)), dtype=np.float32)
    power = float(np.mean(np.abs(projector.project(np.eye(3)[None].astype(np.float32),
                                                   ky, kx)) ** 2))
    inv_sigma2 = np.full((n, len(ky)), 1.0 / (noise * power), dtype=np.float32)
    return cs.expected_errors(projector, ctf, inv_sigma2, ky, kx, 32,
                              np.random.default_rng(seed))


def test_expected_errors_shrink_with_signal_and_resolution(projector):
    noisy_rot, noisy_trans = _errors(projector, 6, 20.0)
    clean_rot, clean_trans = _errors(projector, 6, 0.2)
    fine_rot, fine_trans = _errors(projector, 20, 0.2)
    assert noisy_rot > 2 * clean_rot and noisy_trans > 2 * clean_trans
    assert fine_rot < clean_rot and fine_trans < clean_trans
    assert 0.05 <= fine_rot <= 35.0 and 0.05 <= fine_trans <= 12.0


def test_adjust_plan_changes_only_the_sampling():
    class S:
        oversampling, offset_step, offset_range = 1, 2.0, 5.0
    plan = IterationPlan(iteration=3, phase="em", healpix_order=2)
    coarse, line = cs.adjust_plan(S, plan, (20.0, 3.0), 200.0, 20.0)
    assert coarse.healpix_order == 1 and coarse.offset_step_px == pytest.approx(4.75)
    assert coarse.search == plan.search and coarse.iteration == 3
    assert "order 1" in line and "4.75 px" in line
    same, _ = cs.adjust_plan(S, plan, (2.0, 0.1), 200.0, 20.0)
    assert same.healpix_order == 2 and same.offset_step_px == pytest.approx(2.0)


def _refine(data, root, *extra):
    return cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(root), "--K", "2", "--iter", "4",
                     "--healpix_order", "2", "--offset_range", "3", "--offset_step", "1",
                     "--ctf", "--particle_diameter", "190", "--zero_mask", "--tau2_fudge", "4",
                     "--firstiter_cc", "--j", "1", "--random_seed", "1"] + list(extra))


@pytest.mark.slow
def test_run_searches_coarser_early_and_logs_why(two_states, tmp_path):
    root = tmp_path / "coarse" / "run"
    assert _refine(two_states, root, "--allow_coarser_sampling", "--strict_highres_exp", "60",
                   "--iter", "3") == 0
    log = (root.parent / "run.log").read_text()
    lines = [l for l in log.splitlines() if "coarser sampling:" in l]
    assert len(lines) == 3, log[-2000:]
    sampling = [starfile.read(f"{root}_it{i:03d}_sampling.star") for i in (1, 2, 3)]
    orders = [int(x["rlnHealpixOrder"]) for x in sampling]
    steps = [float(x["rlnOffsetStep"]) for x in sampling]
    # Iteration 1 (cross-correlation, E-step limited to 60 A, 190 A mask): 360 / ceil(pi 190 / 60)
    # = 36 deg, so order 1 (fine step 15 < 0.8 x 36 <= 30) and the largest offset step.
    assert "cross-correlation iteration" in lines[0] and orders[0] == 1
    assert steps[0] == pytest.approx(0.95 * 3)
    assert int(sampling[0]["rlnNrOfOrientations"]) < int(
        starfile.read(f"{root}_it000_sampling.star")["rlnNrOfOrientations"])
    # Later iterations follow the estimate, never finer than asked for; each log line
    # names the order the iteration's sampling.star records.
    assert all(o <= 2 for o in orders) and all(1.0 <= st <= 2.85 + 1e-6 for st in steps)
    for line, order in zip(lines, orders):
        assert f"HEALPix order {order} " in line


@pytest.mark.slow
def test_without_the_flag_the_sampling_is_the_one_asked_for(two_states, tmp_path):
    root = tmp_path / "plain" / "run"
    assert _refine(two_states, root, "--iter", "2") == 0
    for i in (1, 2):
        sampling = starfile.read(f"{root}_it{i:03d}_sampling.star")
        assert int(sampling["rlnHealpixOrder"]) == 2
        assert float(sampling["rlnOffsetStep"]) == pytest.approx(1.0)


def test_refused_with_one_class(two_states, tmp_path, capsys):
    argv = ["refine", "--i", str(two_states / "particles.star"), "--ref",
            str(two_states / "ref.mrc"), "--o", str(tmp_path / "run"), "--K", "1",
            "--iter", "1", "--allow_coarser_sampling"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow_coarser_sampling" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("noise", [0.2, 20.0])
def test_strided_ladder_search_finds_the_full_ladders_first_crossing(projector, noise,
                                                                     monkeypatch):
    full = []
    for stride in (1, cs.LADDER_STRIDE):
        monkeypatch.setattr(cs, "LADDER_STRIDE", stride)
        full.append(_errors(projector, 10, noise, seed=4))
    assert full[0] == full[1]
