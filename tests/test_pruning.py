"""Score counts in the iteration log, and the pruned searches against the exhaustive one.

* The ``scores:`` line after each iteration's ``stage seconds:`` counts the
  (particle, class, rotation, translation) scores of the coarse and fine passes where
  they are computed; for a global search the coarse count is the product of the grids.
* Classes whose prior is 0 are not scored: the same poses, posteriors and maps as
  scoring them.
* A pruned global search (each particle's rotations within a ball around its pose,
  :func:`iteration.prune_radius`) gives the same classes, poses and posteriors as the
  whole grid once the poses have settled.
"""
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import iteration, search
from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.sampling import OrientationGrid, TranslationGrid
from cryoclass_plugin.engine.simulate import simulate_dataset

N_PARTICLES = 80
COMMON = ["--tau2_fudge", "4", "--ini_high", "40", "--particle_diameter", "200",
          "--zero_mask", "--flatten_solvent", "--ctf", "--healpix_order", "1",
          "--offset_range", "3", "--offset_step", "2", "--pad", "2", "--skip_gridding",
          "--j", "1", "--random_seed", "1", "--block_size", "32"]
SCORES_RE = re.compile(r"^\s+scores: coarse (\d+)  significant (\d+) \([^)]*\)  "
                       r"fine (\d+) \(computed (\d+)\)")
PRUNED_RE = re.compile(r"\(pruned: (\d+) particles searched within")
DATA_COLUMNS = ["rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                "rlnOriginXAngst", "rlnOriginYAngst"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruning")
    simulate_dataset(str(out), n=N_PARTICLES, box=32, apix=7.0, snr=1.0, n_classes=2,
                     seed=2)
    return out


def _refine(data_dir, root, *extra):
    argv = ["refine", "--i", str(data_dir / "particles.star"), "--ref",
            str(data_dir / "ref.mrc"), "--o", str(root)] + COMMON + list(extra)
    return cli.main(argv)


def _score_lines(log_path):
    return [tuple(int(v) for v in m.groups()) for m in
            (SCORES_RE.match(line) for line in open(log_path)) if m]


def test_score_counts_are_logged_and_consistent(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(iteration, "prune_radius", lambda *a: 0.0)
    assert _refine(data_dir, tmp_path / "run", "--K", "2", "--iter", "2") == 0
    counts = _score_lines(tmp_path / "run.log")
    assert len(counts) == 2
    R = OrientationGrid(1).n_rotations
    T = TranslationGrid(3, 2).n_offsets
    for coarse, significant, fine, fine_padded in counts:
        # A global search scores every particle against every class, rotation and
        # translation of the coarse grids.
        assert coarse == N_PARTICLES * 2 * R * T
        # Every particle keeps at least its best sample, and far fewer than all.
        assert N_PARTICLES <= significant < coarse // 100
        # The fine pass scores the oversampled children (8 per rotation, 4 per
        # translation) of each particle's significant rotations x translations.
        assert fine >= 32 * significant
        assert fine_padded >= fine


def test_score_counts_sum_over_ranks():
    class TwoRanks:
        size = 2

        def allreduce_sum(self, arr):
            return arr + np.array([1, 2, 3, 4, 5, 6])    # the other rank's counts

    total = search.ScoreCounts(10, 20, 30, 40, 50, 60).summed_over_ranks(TwoRanks())
    assert total.as_dict() == {"coarse": 11, "significant": 22, "fine": 33,
                               "fine_padded": 44, "fixed": 55, "pruned_particles": 66}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "mpirun")), reason="no mpirun")
def test_score_counts_are_the_same_on_one_and_two_ranks(data_dir, tmp_path):
    mpirun = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    counts = {}
    for n in (1, 2):
        root = tmp_path / f"np{n}" / "run"
        cmd = [mpirun, "--oversubscribe", "-np", str(n), sys.executable, "-m",
               "cryoclass_plugin.engine", "refine", "--i", str(data_dir / "particles.star"),
               "--ref", str(data_dir / "ref.mrc"), "--o", str(root), "--K", "2", "--iter",
               "2"] + COMMON
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[n] = _score_lines(f"{root}.log")
    # Each rank counts its own particles; the log has the sums.  The coarse count is
    # exact; the significant set can differ by a sample at the threshold (the ranks'
    # blocks sum in other orders), and the padded fine count with the sub-batches.
    assert len(counts[1]) == len(counts[2]) == 2
    for one, two in zip(counts[1], counts[2]):
        assert one[0] == two[0]
        assert np.allclose(one[1:3], two[1:3], rtol=0.02), (one, two)


def _kill_class(monkeypatch, dead, skip):
    """From iteration 2 on, class ``dead`` (0-based) starts each iteration with prior 0;
    ``skip=False`` makes the passes score it all the same."""
    original = iteration.prepare

    def prepare(ctx, model, plan, allowed, timer):
        if plan.iteration >= 2:
            model.pdf_class[dead] = 0.0
            model.pdf_class /= model.pdf_class.sum()
        return original(ctx, model, plan, allowed, timer)

    monkeypatch.setattr(iteration, "prepare", prepare)
    monkeypatch.setattr(iteration, "prune_radius", lambda *a: 0.0)
    if not skip:
        monkeypatch.setattr(iteration, "searched_classes",
                            lambda model, allowed, subset, n: np.arange(n))


def _compare_runs(dir_a, dir_b, iterations, classes, prob_tol=5e-4, min_same=1.0):
    for it in iterations:
        a = starfile.read(dir_a / f"run_it{it:03d}_data.star")["particles"]
        b = starfile.read(dir_b / f"run_it{it:03d}_data.star")["particles"]
        same = np.ones(len(a), dtype=bool)
        for col in DATA_COLUMNS:
            same &= np.isclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-3)
        assert same.mean() >= min_same, f"iteration {it}: {same.mean():.3f} same poses"
        pa = a["rlnMaxValueProbDistribution"].to_numpy()[same]
        pb = b["rlnMaxValueProbDistribution"].to_numpy()[same]
        assert np.abs(pa - pb).max() <= prob_tol, f"iteration {it}: pmax"
        for k in classes:
            ma, _ = read_map(dir_a / f"run_it{it:03d}_class{k:03d}.mrc")
            mb, _ = read_map(dir_b / f"run_it{it:03d}_class{k:03d}.mrc")
            err = np.abs(ma - mb).max() / np.abs(mb).max()
            assert err <= (prob_tol if min_same == 1.0 else 0.05), \
                f"iteration {it}: class {k} map differs by {err:.2e}"


@pytest.mark.slow
def test_classes_with_prior_zero_are_skipped_with_the_same_results(data_dir, tmp_path,
                                                                   monkeypatch):
    with monkeypatch.context() as m:
        _kill_class(m, 2, skip=False)
        assert _refine(data_dir, tmp_path / "all" / "run", "--K", "3", "--iter", "3") == 0
    with monkeypatch.context() as m:
        _kill_class(m, 2, skip=True)
        assert _refine(data_dir, tmp_path / "skip" / "run", "--K", "3", "--iter", "3") == 0
    full, skipped = (_score_lines(tmp_path / d / "run.log") for d in ("all", "skip"))
    # Iterations 2 and 3 score two classes of three.
    assert [s[0] * 3 for s in skipped[1:]] == [f[0] * 2 for f in full[1:]]
    assert skipped[0][0] == full[0][0]
    _compare_runs(tmp_path / "all", tmp_path / "skip", (2, 3), (1, 2))


@pytest.mark.slow
def test_pruned_search_matches_the_global_search_once_poses_settle(data_dir, tmp_path,
                                                                   monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(iteration, "prune_radius", lambda *a: 0.0)
        assert _refine(data_dir, tmp_path / "settle" / "run", "--K", "2", "--iter",
                       "4") == 0
    state = str(tmp_path / "settle" / "run_it004_optimiser.star")
    step = OrientationGrid(1).angular_step_deg
    for label, radius in (("global", 0.0), ("pruned", iteration.PRUNE_RADIUS_STEPS * step)):
        with monkeypatch.context() as m:
            m.setattr(iteration, "prune_radius", lambda *a, r=radius: r)
            assert cli.main(["refine", "--continue", state, "--iter", "6", "--o",
                             str(tmp_path / label / "run")]) == 0
    full, pruned = (_score_lines(tmp_path / d / "run.log") for d in ("global", "pruned"))
    n_pruned = [int(m.group(1)) for m in (PRUNED_RE.search(line) for line in
                                          open(tmp_path / "pruned" / "run.log")) if m]
    assert len(n_pruned) == 2 and min(n_pruned) >= 0.8 * N_PARTICLES
    # A ball of three steps holds a small part of the grid.
    assert all(p[0] * 2 < f[0] for p, f in zip(pruned, full))
    # One E-step from the same state: the same best samples and posteriors for all but
    # the rare particle whose pose jumps beyond the ball (1 of 80 here), which the
    # global check iterations search again.
    _compare_runs(tmp_path / "global", tmp_path / "pruned", (5,), (1, 2), min_same=0.97)


def _plan(**kw):
    base = dict(search="global", phase="em", use_cc=False, healpix_order=2, iteration=4)
    base.update(kw)
    return SimpleNamespace(**base)


def test_prune_radius_policy():
    settings = SimpleNamespace(healpix_order=2, fast_subsets=False)
    settled = SimpleNamespace(changes={"orientations": 5.0})
    step = 7.5
    assert iteration.prune_radius(settings, settled, _plan(), step) == \
        iteration.PRUNE_RADIUS_STEPS * step
    moving = SimpleNamespace(changes={"orientations": 9.0})
    assert iteration.prune_radius(settings, moving, _plan(), step) == 0.0
    for kw in ({"iteration": 6}, {"iteration": 2}, {"use_cc": True}, {"phase": "consensus"},
               {"search": "local"}, {"healpix_order": 3}):
        assert iteration.prune_radius(settings, settled, _plan(**kw), step) == 0.0, kw
    subsets = SimpleNamespace(healpix_order=2, fast_subsets=True)
    assert iteration.prune_radius(subsets, settled, _plan(), step) == 0.0
    assert iteration.prune_radius(subsets, settled, _plan(iteration=16), step) > 0
