"""Blush in the engine's M-step (engine/blush_step.py): both modes run end to end, the
prior-mean reconstruction has the denoised map as its prior mean, bad options refused."""
import numpy as np
import pytest

from cryoclass_plugin import cli
from cryoclass_plugin.engine.projector import BackProjector, half_grid_transform
from cryoclass_plugin.engine.simulate import simulate_dataset


def test_prior_mean_reconstruction_is_the_prior_mean_without_data():
    """No slice inserted: the posterior mean is the prior mean itself."""
    rng = np.random.default_rng(0)
    box = 16
    bp = BackProjector(box, pad=2)
    from cryoclass_plugin.engine.fourier import low_pass
    mean_map = low_pass(rng.normal(size=(box,) * 3).astype(np.float32), 4.0, 16.0)
    mean_ft = half_grid_transform(mean_map, bp.grid, False)
    tau2 = np.ones(2 * box)       # a prior in every shell of the padded grid, corners too
    out = bp.reconstruct(tau2=tau2, tau2_fudge=4.0, gridding=False, prior_mean=mean_ft)
    np.testing.assert_allclose(out, mean_map, atol=1e-4 * np.abs(mean_map).max())
    plain = bp.reconstruct(tau2=tau2, tau2_fudge=4.0, gridding=False)
    assert np.abs(plain).max() == 0.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("blush")
    simulate_dataset(str(out), n=60, box=32, apix=6.0, snr=0.2, n_classes=2, seed=2)
    return out


@pytest.mark.parametrize("mode", ["replace", "prior-mean"])
def test_blush_runs_in_both_modes_and_is_logged(data, tmp_path, mode):
    from cryoclass_plugin.engine.mrc_io import read_map
    root = tmp_path / mode / "run"
    argv = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(root), "--K", "2", "--iter", "2", "--tau2_fudge", "4", "--ini_high",
            "40", "--particle_diameter", "170", "--zero_mask", "--flatten_solvent", "--ctf",
            "--healpix_order", "0", "--offset_range", "2", "--j", "1", "--blush",
            "--blush_mode", mode]
    assert cli.main(argv) == 0
    log = open(f"{root}.log").read()
    assert "blush: Blush weights blush_v2.pt" in log and f"mode {mode}" in log
    assert "denoised map from 25 A to 6 A" in log
    for k in (1, 2):
        vol, _ = read_map(f"{root}_it002_class{k:03d}.mrc")
        assert np.isfinite(vol).all() and vol.std() > 0


def test_blush_crossover_finer_than_the_network_is_refused(data, tmp_path, capsys):
    argv = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(tmp_path / "run"), "--iter", "1", "--healpix_order", "0", "--blush",
            "--blush_crossover", "4"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crossover 4 A is finer than the network's Nyquist" in err[0]


def test_blush_lowres_not_coarser_than_the_crossover_is_refused(data, tmp_path, capsys):
    argv = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(tmp_path / "run"), "--iter", "1", "--healpix_order", "0", "--blush",
            "--blush_crossover", "10", "--blush_lowres", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--blush_lowres 8 A is not coarser than the crossover (10 A)" in err[0]
