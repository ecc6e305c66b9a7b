"""RELION's ``--norm`` (per-particle normalisation correction) and ``--scale``
(per-group intensity scale) on simulated data with known factors, the unchanged path
without them, ``--continue``, and the simulator's ``--norm_spread`` / ``--scale_spread``.

Small sets (32 px, 7 A/px, 160-200 particles, K=1, HEALPix order 1) so that the whole
file runs in well under a minute on two cores.
"""
import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import iteration as iteration_mod
from cryoclass_plugin.engine.metrics import rows_like
from cryoclass_plugin.engine.model import ModelState
from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.simulate import simulate_dataset

COMMON = ["--K", "1", "--tau2_fudge", "4", "--ini_high", "40", "--particle_diameter", "200",
          "--zero_mask", "--flatten_solvent", "--ctf", "--healpix_order", "1",
          "--offset_range", "3", "--offset_step", "2", "--pad", "2", "--skip_gridding",
          "--j", "1", "--random_seed", "1"]
ITER = 4
# Measured on the norm set below, iteration 4: Pearson r of the estimated against the
# true norm factors 0.985 (spread of the truth 0.21; the ratio estimate / truth varies by
# 3.7 %, about what the noise of the ~375 Fourier pixels per particle gives,
# sqrt(1/375) / 2 ~ 2.6 %, plus pose and model errors).
MIN_NORM_R = 0.9
# Group scales, 50 particles per group at SNR 0.5: the largest relative error over the
# four groups is 1.8 / 0.7 / 1.6 % in iterations 2 / 3 / 4 on the set below (4.6 % in
# iteration 1, from shells 1-3 only), and at most 4.3 % in iterations 2-4 on another set
# (seed 5, five groups of 40).  The tolerance is about twice the worst of these; the true
# scales of seed 7 (0.934, 1.074, 0.695, 1.296) are >= 15 % apart, so errors within it
# keep the order.
SCALE_RTOL = 0.08


def _simulate(out, **kw):
    args = dict(box=32, apix=7.0, snr=0.5, n_classes=2, max_shift_px=1.5)
    args.update(kw)
    simulate_dataset(str(out), **args)
    return out


def _refine(data_dir, root, *extra):
    argv = ["refine", "--i", str(data_dir / "particles.star"), "--ref",
            str(data_dir / "ref.mrc"), "--o", str(root)] + COMMON + list(extra)
    assert cli.main(argv) == 0


def _data(root, it):
    return starfile.read(f"{root}_it{it:03d}_data.star")["particles"]


def _model(root, it):
    return starfile.read(f"{root}_it{it:03d}_model.star", always_dict=True)


def _map(root, it, k=1):
    return read_map(f"{root}_it{it:03d}_class{k:03d}.mrc")[0]


@pytest.fixture(scope="module")
def norm_data(tmp_path_factory):
    """Each particle's image (signal and noise) times a known log-normal factor."""
    return _simulate(tmp_path_factory.mktemp("norm_sim"), n=200, seed=5, norm_spread=0.2)


@pytest.fixture(scope="module")
def norm_run(norm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("norm_run") / "run"
    _refine(norm_data, root, "--iter", str(ITER), "--norm")
    return root


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("plain_sim"), n=160, seed=3)


@pytest.fixture(scope="module")
def plain_run(plain_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_run") / "run"
    _refine(plain_data, root, "--iter", "3")
    return root


def test_norm_recovers_per_particle_factors(norm_data, norm_run):
    truth = starfile.read(norm_data / "truth.star", always_dict=True)["particles"]
    got = rows_like(truth, _data(norm_run, ITER))
    est, true = got["rlnNormCorrection"].to_numpy(), truth["rlnNormCorrection"].to_numpy()
    r = float(np.corrcoef(est, true)[0, 1])
    ratio = est / true
    print(f"--norm: Pearson r {r:.4f} against the true factors (spread "
          f"{true.std() / true.mean():.3f}); estimate / truth varies by "
          f"{ratio.std() / ratio.mean():.4f}")
    assert r > MIN_NORM_R
    general = _model(norm_run, ITER)["model_general"]
    avg = float(general["rlnNormCorrectionAverage"])
    assert avg == pytest.approx(float(est.mean()), rel=1e-5)
    # RELION's scale (noise std in its Fourier units): not 1 for these images.
    assert 0.3 < avg < 3.0 and abs(avg - 1.0) > 1e-3
    state = ModelState.load(f"{norm_run}_it{ITER:03d}_state.npz")
    assert state.avg_norm == pytest.approx(float(state.part_norm.mean()))
    opt = starfile.read(f"{norm_run}_it{ITER:03d}_optimiser.star",
                        always_dict=True)["optimiser_general"]
    assert int(opt["rlnDoCorrectNorm"]) == 1


@pytest.mark.slow
def test_scale_recovers_group_scales(tmp_path):
    data = _simulate(tmp_path / "sim", n=200, seed=7, n_micrographs=4, scale_spread=0.3)
    root = tmp_path / "run" / "run"
    _refine(data, root, "--iter", str(ITER), "--scale")
    truth = starfile.read(data / "truth.star", always_dict=True)["groups"]
    groups = _model(root, ITER)["model_groups"]
    true = truth.set_index("rlnMicrographName").loc[groups["rlnGroupName"],
                                                    "rlnGroupScaleCorrection"].to_numpy()
    est = groups["rlnGroupScaleCorrection"].to_numpy()
    rel = np.abs(est / true - 1.0)
    print("--scale: estimated " + " ".join(f"{v:.3f}" for v in est) + ", true "
          + " ".join(f"{v:.3f}" for v in true) + f"; max relative error {rel.max():.3f}")
    np.testing.assert_array_equal(np.argsort(est), np.argsort(true))
    assert rel.max() < SCALE_RTOL
    # Normalised as RELION: particle-weighted mean 1.
    counts = groups["rlnGroupNrParticles"].to_numpy()
    assert float((counts * est).sum() / counts.sum()) == pytest.approx(1.0, rel=1e-5)
    # Without --norm the particles keep 1.
    assert (_data(root, ITER)["rlnNormCorrection"] == 1.0).all()


def test_without_flags_outputs_unchanged(plain_data, plain_run, tmp_path, monkeypatch):
    """Without --norm/--scale: corrections 1 everywhere.  With the flags but the updates
    disabled (corrections held at 1) the run equals it exactly: applying unit
    corrections and taking the extra sums changes nothing (bit for bit)."""
    data = _data(plain_run, 3)
    assert (data["rlnNormCorrection"] == 1.0).all()
    model = _model(plain_run, 3)
    assert float(model["model_general"]["rlnNormCorrectionAverage"]) == 1.0
    assert (model["model_groups"]["rlnGroupScaleCorrection"] == 1.0).all()
    # The updates are called from the iteration's finish step (engine/iteration.py).
    monkeypatch.setattr(iteration_mod, "update_norm_corrections", lambda *a, **k: None)
    monkeypatch.setattr(iteration_mod, "update_scale_corrections", lambda *a, **k: None)
    held = tmp_path / "held" / "run"
    _refine(plain_data, held, "--iter", "3", "--norm", "--scale")
    for it in (1, 2, 3):
        assert np.array_equal(_map(plain_run, it), _map(held, it))
        a, b = _data(plain_run, it), _data(held, it)
        for col in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                    "rlnOriginXAngst", "rlnOriginYAngst", "rlnLogLikeliContribution",
                    "rlnMaxValueProbDistribution", "rlnNormCorrection"):
            np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)


@pytest.mark.slow
def test_norm_on_data_without_variation_changes_maps_slightly(plain_data, plain_run, tmp_path):
    root = tmp_path / "norm" / "run"
    _refine(plain_data, root, "--iter", "3", "--norm")
    norms = _data(root, 3)["rlnNormCorrection"].to_numpy()
    a, b = _map(plain_run, 3), _map(root, 3)
    corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    spread = float(norms.std() / norms.mean())
    print(f"--norm without variation: norm corrections vary by {spread:.4f}; map "
          f"correlation {corr:.5f}, relative difference {rel:.4f}")
    assert spread < 0.08
    assert corr > 0.99
    assert not np.array_equal(a, b)        # the corrections were applied


def test_firstiter_cc_iteration_keeps_corrections(plain_data, tmp_path):
    root = tmp_path / "cc" / "run"
    _refine(plain_data, root, "--iter", "1", "--norm", "--scale", "--firstiter_cc")
    assert (_data(root, 1)["rlnNormCorrection"] == 1.0).all()
    model = _model(root, 1)
    assert float(model["model_general"]["rlnNormCorrectionAverage"]) == 1.0
    assert (model["model_groups"]["rlnGroupScaleCorrection"] == 1.0).all()


@pytest.mark.slow
def test_continue_keeps_norm_and_scale(norm_data, norm_run, tmp_path):
    """A run cut after iteration 2 and continued equals the uninterrupted one; the
    uninterrupted one here also estimates --scale (one group per micrograph)."""
    full = tmp_path / "full" / "run"
    _refine(norm_data, full, "--iter", str(ITER), "--norm", "--scale")
    cut = tmp_path / "cut" / "run"
    _refine(norm_data, cut, "--iter", "2", "--norm", "--scale")
    assert cli.main(["refine", "--continue", f"{cut}_it002_optimiser.star",
                     "--iter", str(ITER)]) == 0
    a = ModelState.load(f"{full}_it{ITER:03d}_state.npz")
    b = ModelState.load(f"{cut}_it{ITER:03d}_state.npz")
    assert not np.allclose(a.part_norm, 1.0) and not np.allclose(a.scale_correction, 1.0)
    assert np.array_equal(a.part_norm, b.part_norm)
    assert a.avg_norm == b.avg_norm
    assert np.array_equal(a.scale_correction, b.scale_correction)
    assert np.array_equal(_map(full, ITER), _map(cut, ITER))
    np.testing.assert_array_equal(_data(full, ITER)["rlnNormCorrection"].to_numpy(),
                                  _data(cut, ITER)["rlnNormCorrection"].to_numpy())


def test_state_files_without_corrections_load_with_ones(norm_run, tmp_path):
    """A state file without the correction fields (part_norm, scale_correction,
    avg_norm) loads with corrections of 1."""
    path = f"{norm_run}_it{ITER:03d}_state.npz"
    import json
    with np.load(path, allow_pickle=False) as z:
        items = {k: z[k] for k in z.files if k not in ("part_norm", "scale_correction")}
    scalars = json.loads(str(items["__scalars__"]))
    scalars.pop("avg_norm")
    items["__scalars__"] = np.array(json.dumps(scalars))
    old = f"{norm_run}_old_state.npz"      # beside the class maps it names
    np.savez(old, **items)
    model = ModelState.load(str(old))
    assert model.avg_norm == 1.0
    np.testing.assert_array_equal(model.part_norm, np.ones(len(model.part_class)))
    np.testing.assert_array_equal(model.scale_correction, np.ones(model.n_groups))


def test_simulator_intensity_variation(tmp_path):
    """--norm_spread multiplies whole images (signal and noise), --scale_spread the signal
    of each micrograph; both written to truth.star; spread 0 = the default output."""
    def stack(path):
        import mrcfile
        with mrcfile.open(path / "particles.mrcs") as mrc:
            return np.array(mrc.data, dtype=np.float64)

    kw = dict(n=24, box=16, apix=10.0, n_classes=1, seed=2, n_micrographs=3)
    base = _simulate(tmp_path / "base", snr=0.5, **kw)
    zero = _simulate(tmp_path / "zero", snr=0.5, norm_spread=0.0, scale_spread=0.0, **kw)
    # (The MRC header's creation-time label may differ; the images must not.)
    assert np.array_equal(stack(base), stack(zero))
    for name in ("truth.star", "particles.star"):
        assert (base / name).read_text() == (zero / name).read_text()
    normed = _simulate(tmp_path / "norm", snr=0.5, norm_spread=0.3, **kw)
    f = starfile.read(normed / "truth.star", always_dict=True)["particles"]["rlnNormCorrection"]
    f = f.to_numpy()
    assert f.mean() == pytest.approx(1.0) and f.std() > 0.1
    np.testing.assert_allclose(stack(normed), stack(base) * f[:, None, None], rtol=1e-5,
                               atol=1e-5)
    # Noise-free images: the signal alone, times the micrograph's scale.
    clean = _simulate(tmp_path / "clean", snr=float("inf"), **kw)
    scaled = _simulate(tmp_path / "scaled", snr=float("inf"), scale_spread=0.3, **kw)
    groups = starfile.read(scaled / "truth.star", always_dict=True)["groups"]
    g = groups["rlnGroupScaleCorrection"].to_numpy()
    mic = (np.arange(24) * 3) // 24
    np.testing.assert_allclose(stack(scaled), stack(clean) * g[mic][:, None, None],
                               rtol=1e-5, atol=1e-5)
    counts = groups["rlnGroupNrParticles"].to_numpy()
    assert float((counts * g).sum() / counts.sum()) == pytest.approx(1.0)
