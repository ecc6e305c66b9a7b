"""The batched fine pass (:func:`search.fine_pass`) against the particle-by-particle
reference (``reference=True``) on the inputs of real iterations of ``cryoclass refine``.

Every call of the fine pass during a short run is shadowed: the reference runs on copies
of the fine tables, the M-step accumulators and the results, the batched code on the
originals, and the two are compared (same best samples; sums within float32 round-off).
A second test runs two whole iterations each way and compares the outputs.
"""
import copy

import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import search
from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.simulate import simulate_dataset

# Tolerances, relative to the largest value compared.  Both codes run in float32 and sum
# in different orders; the per-particle code itself differs from a float64 evaluation of
# the same inputs by up to ~1e-4 in pmax and ~5e-5 in the slice sums (measured on this
# data set), so probabilities and sums get 5e-4.  Log-likelihoods (~400 here) agree to
# ~1e-6 relative.
RTOL = 1e-4
PROB_TOL = 5e-4
COMMON = ["--K", "2", "--tau2_fudge", "4", "--ini_high", "40", "--particle_diameter", "200",
          "--zero_mask", "--flatten_solvent", "--ctf", "--healpix_order", "1",
          "--offset_range", "3", "--offset_step", "2", "--pad", "2", "--skip_gridding",
          "--j", "1", "--random_seed", "1", "--block_size", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fine_batch")
    simulate_dataset(str(out), n=80, box=32, apix=7.0, snr=1.0, n_classes=2, seed=2)
    return out


def _refine(data_dir, root, *extra):
    argv = ["refine", "--i", str(data_dir / "particles.star"), "--ref",
            str(data_dir / "ref.mrc"), "--o", str(root)] + COMMON + list(extra)
    return cli.main(argv)


def _close(a, b, what, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), 1e-30)
    err = float(np.abs(a - b).max()) / scale if a.size else 0.0
    assert err <= rtol, f"{what}: max |batched - reference| / max |reference| = {err:.2e}"


def _compare(got, ref, label):
    (tables, acc, results), (t_ref, a_ref, r_ref) = got, ref
    res, r_ref = results.arrays(), r_ref.arrays()
    for key in ("class_index", "eulers", "origin_px"):
        np.testing.assert_array_equal(res[key], r_ref[key], err_msg=f"{label}: {key}")
    _close(res["loglik"], r_ref["loglik"], f"{label}: loglik")
    for key in ("pmax", "acc_rot", "acc_trans_px"):
        _close(res[key], r_ref[key], f"{label}: {key}", PROB_TOL)
    _close(tables.data, t_ref.data, f"{label}: slice sums", PROB_TOL)
    _close(tables.weight, t_ref.weight, f"{label}: slice weights", PROB_TOL)
    _close(tables.row_posterior, t_ref.row_posterior, f"{label}: row posteriors", PROB_TOL)
    _close(acc.noise_sum, a_ref.noise_sum, f"{label}: noise sums", PROB_TOL)
    np.testing.assert_array_equal(acc.noise_count, a_ref.noise_count)
    _close(acc.class_weight, a_ref.class_weight, f"{label}: class weights", PROB_TOL)
    _close(acc.offset_sq, a_ref.offset_sq, f"{label}: offsets", PROB_TOL)
    _close(acc.offset_weight, a_ref.offset_weight, f"{label}: offset weights", PROB_TOL)
    # --norm / --scale per-particle sums (present only with the flags).
    assert set(res) == set(r_ref)
    for key in ("norm_resid", "scale_xa", "scale_aa"):
        if key in r_ref:
            _close(res[key], r_ref[key], f"{label}: {key}", PROB_TOL)


@pytest.mark.parametrize("batch", ["default", "small", "alone"])
@pytest.mark.parametrize("cc", [False, True], ids=["ml", "firstiter_cc"])
def test_batched_fine_pass_matches_reference_on_each_block(data_dir, tmp_path, monkeypatch,
                                                           batch, cc):
    _shadowed_run(data_dir, tmp_path, monkeypatch, batch, cc)


@pytest.mark.parametrize("batch", ["default", pytest.param("small", marks=pytest.mark.slow)])
def test_batched_fine_pass_matches_reference_with_norm_and_scale(data_dir, tmp_path,
                                                                 monkeypatch, batch):
    """--norm / --scale: the per-particle residual, cross and power sums of both codes
    agree and are filled (3 iterations: the last two run with corrections != 1)."""
    calls = _shadowed_run(data_dir, tmp_path, monkeypatch, batch, False,
                          "--norm", "--scale", iterations=3)
    assert all(c[2] for c in calls)


def _shadowed_run(data_dir, tmp_path, monkeypatch, batch, cc, *flags, iterations=2):
    original = search.fine_pass
    calls = []

    def shadowed(setup, block, sig_t, sig_kr, tables, acc, xp, results, first_index):
        n_pix = int(setup.ky.shape[0])
        # small: a few particles per sub-batch (several sub-batches, mixed sizes);
        # alone: one particle per sub-batch.
        batch_bytes = {"default": None, "small": 8 * n_pix * 300, "alone": 1}[batch]
        # Shared, not copied: the array module and the iteration's setup.
        ref = copy.deepcopy((tables, acc, results), memo={id(xp): xp, id(setup): setup})
        # Reference first on the copies: FineTables holds no state other than its arrays.
        original(setup, block, sig_t, sig_kr, ref[0], ref[1], xp, ref[2], first_index,
                 reference=True)
        original(setup, block, sig_t, sig_kr, tables, acc, xp, results, first_index,
                 batch_bytes=batch_bytes)
        _compare((tables, acc, results), ref, f"iteration block at {first_index}")
        part = slice(first_index, first_index + len(sig_kr))
        has_sums = all(k in results.arrays() for k in ("norm_resid", "scale_xa", "scale_aa")) \
            and (results.norm_resid[part] > 0).all() and (results.scale_aa[part] > 0).all() \
            and results.scale_xa[part].sum() > 0
        calls.append((setup.use_cc, max(len(np.unique(k)) for k in sig_kr), has_sums))

    monkeypatch.setattr(search, "fine_pass", shadowed)
    extra = ["--iter", str(iterations)] + (["--firstiter_cc"] if cc else []) + list(flags)
    assert _refine(data_dir, tmp_path / "run", *extra) == 0
    assert len(calls) >= iterations * 3            # 80 particles / 32: 3 blocks per iteration
    assert any(c[0] for c in calls) == cc
    assert max(c[1] for c in calls) > 1            # some particle had several rotations
    return calls


@pytest.mark.slow
def test_two_iterations_batched_equal_reference(data_dir, tmp_path, monkeypatch):
    assert _refine(data_dir, tmp_path / "batched" / "run", "--iter", "2") == 0
    original = search.fine_pass
    monkeypatch.setattr(search, "fine_pass",
                        lambda *a, **k: original(*a, reference=True, **k))
    assert _refine(data_dir, tmp_path / "reference" / "run", "--iter", "2") == 0
    for it in (1, 2):
        a = starfile.read(tmp_path / "batched" / f"run_it{it:03d}_data.star")["particles"]
        b = starfile.read(tmp_path / "reference" / f"run_it{it:03d}_data.star")["particles"]
        for col in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                    "rlnOriginXAngst", "rlnOriginYAngst"):
            np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
        _close(a["rlnLogLikeliContribution"].to_numpy(), b["rlnLogLikeliContribution"].to_numpy(),
               f"iteration {it}: loglik")
        _close(a["rlnMaxValueProbDistribution"].to_numpy(),
               b["rlnMaxValueProbDistribution"].to_numpy(), f"iteration {it}: pmax", PROB_TOL)
        for k in (1, 2):
            ma, _ = read_map(tmp_path / "batched" / f"run_it{it:03d}_class{k:03d}.mrc")
            mb, _ = read_map(tmp_path / "reference" / f"run_it{it:03d}_class{k:03d}.mrc")
            _close(ma, mb, f"iteration {it}: class {k} map", PROB_TOL)


def test_fine_sub_batches_on_threads_equal_one_thread_bit_for_bit(data_dir, tmp_path,
                                                                  monkeypatch):
    """With --j threads the sub-batches are computed side by side and added in their
    order (:func:`workers.map_in_order`): tables, M-step sums and results equal the
    one-thread run exactly."""
    from cryoclass_plugin.engine import workers
    original = search.fine_pass
    calls = []

    def shadowed(setup, block, sig_t, sig_kr, tables, acc, xp, results, first_index):
        batch_bytes = 8 * int(setup.ky.shape[0]) * 300        # several sub-batches
        ref = copy.deepcopy((tables, acc, results), memo={id(xp): xp, id(setup): setup})
        workers.set_workers(1)
        original(setup, block, sig_t, sig_kr, ref[0], ref[1], xp, ref[2], first_index,
                 batch_bytes=batch_bytes)
        workers.set_workers(3)
        try:
            original(setup, block, sig_t, sig_kr, tables, acc, xp, results, first_index,
                     batch_bytes=batch_bytes)
        finally:
            workers.set_workers(1)
        for name in ("data", "weight", "row_posterior"):
            assert np.array_equal(getattr(tables, name), getattr(ref[0], name)), name
        for name in ("noise_sum", "noise_count", "class_weight"):
            assert np.array_equal(getattr(acc, name), getattr(ref[1], name)), name
        assert acc.offset_sq == ref[1].offset_sq and acc.offset_weight == ref[1].offset_weight
        got, want = results.arrays(), ref[2].arrays()
        for key in want:
            assert np.array_equal(got[key], want[key]), key
        calls.append(len(sig_kr))

    monkeypatch.setattr(search, "fine_pass", shadowed)
    assert _refine(data_dir, tmp_path / "run", "--iter", "2", "--norm", "--scale") == 0
    assert len(calls) >= 6


def test_fine_tables_take_the_bytes_the_budget_counts(data_dir, tmp_path, monkeypatch):
    """``--fine_table_bytes`` bounds rows x pixels x ``FineTables.BYTES_PER_VALUE``:
    that constant must be what the tables' arrays hold."""
    made = []

    class Recorded(search.FineTables):
        def __init__(self, setup, coarse_kr, xp):
            super().__init__(setup, coarse_kr, xp)
            held = sum(a.nbytes for a in (self.slices, self.power, self.data, self.weight))
            made.append((held, self.rows.shape[0] * int(setup.ky.shape[0])))

    monkeypatch.setattr(search, "FineTables", Recorded)
    assert _refine(data_dir, tmp_path / "run", "--iter", "1") == 0
    assert made
    assert all(held == values * search.FineTables.BYTES_PER_VALUE for held, values in made)
