"""The signal spectrum tau2 of each class: RELION's update (power spectrum of the
solvent-flattened map) and the exact EM update (``--tau2_estimate em``: plus the
reconstruction's posterior variance)."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cryoclass_plugin.engine import metrics
from cryoclass_plugin.engine.fourier import half_plane_pixels
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.masks import soft_sphere_mask
from cryoclass_plugin.engine.mstep import Accumulators, maximise, power_spectrum_half
from cryoclass_plugin.engine.projector import BackProjector, Projector

N = 32


@pytest.fixture(scope="module")
def phantom():
    rng = np.random.default_rng(3)
    v = np.zeros((N, N, N), np.float32)
    for _ in range(150):
        v[tuple(rng.integers(10, 22, 3))] += 1
    return gaussian_filter(v, 0.7).astype(np.float32)


def _rotations(n, seed):
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(0, 360, n))


def _noisy_sums(phantom, n, noise_sigma, seed=0):
    """A back-projector of ``n`` noisy central sections at known poses, weighted as the
    M-step weights them (data x / sigma2, weight 1 / sigma2; no CTF)."""
    mats = _rotations(n, seed)
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    clean = Projector(phantom, pad=2, gridding=False).project(mats, ky, kx)
    rng = np.random.default_rng(seed + 1)
    noise = noise_sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    bp = BackProjector(N, pad=2)
    s2 = noise_sigma ** 2
    bp.insert(mats, ky, kx, ((clean + noise) / s2).astype(np.complex64),
              np.full(clean.shape, 1.0 / s2, np.float32))
    return bp


def test_posterior_variance_per_shell_is_the_mean_of_one_over_precision(phantom):
    bp = _noisy_sums(phantom, 60, 5.0)
    n_shells = N // 2 + 1
    tau2 = np.linspace(1.0, 0.01, n_shells)
    tau2[-3:] = 0.0                                          # no prior there: reported 0
    got = bp.mean_posterior_variance_per_shell(tau2, n_shells)
    sh = bp.shells()
    w = bp.symmetrised_weight() * bp.pad ** 3
    mult = bp.voxel_multiplicity()      # a half-grid voxel stands for its mate too
    for s in (1, 5, 12):
        sel = sh == s
        want = np.average(1.0 / (w[sel] + 1.0 / tau2[s]), weights=mult[sel])
        assert got[s] == pytest.approx(want, rel=1e-10)
    assert np.all(got[-3:] == 0.0)
    # A shell the data do not reach keeps its prior variance; a well-measured one
    # has the variance of the data alone, far below it.
    no_data = bp.mean_posterior_variance_per_shell(np.full(n_shells, 1e-9), n_shells)
    assert no_data[1:n_shells - 3] == pytest.approx(1e-9, rel=1e-3)
    assert np.all(got[:-3] < tau2[:-3])


def _iterate(bp, mask, em, n_iter=8, fudge=4.0):
    """The M-step's tau2 loop at fixed poses: reconstruct with the current tau2, flatten
    the solvent, update tau2 from the flattened map (plus the posterior variance)."""
    n_shells = N // 2 + 1
    vol = bp.reconstruct(tau2=None, gridding=False) * mask
    tau2 = power_spectrum_half(vol)
    for _ in range(n_iter):
        prior = tau2
        vol = bp.reconstruct(tau2=prior, tau2_fudge=fudge, gridding=False) * mask
        tau2 = power_spectrum_half(vol)
        if em:
            tau2 = tau2 + bp.mean_posterior_variance_per_shell(prior, n_shells)
    return vol, tau2


def test_em_update_keeps_the_signal_that_the_power_update_shrinks_away(phantom):
    """With the true poses, RELION's update lets tau2 shrink in each low-SNR shell
    iteration after iteration (the masked map's power is its own, ever more regularised,
    estimate), so the map loses frequencies the data determine.  The EM update settles
    (8 and 25 iterations agree) and its map matches the truth as well as a Wiener
    reconstruction with the TRUE signal spectrum.  (With T = 4 it overestimates tau2
    where the SNR is low: the fudge's extra noise counts as signal there.)
    Measured on the simulator's 64 px sets (fixed true poses, 200 particles a class,
    SNR 0.05): FSC 0.5 against the truth 13.3-14.2 A instead of 16.4-17.0 A."""
    mask = soft_sphere_mask(N, 12.0, 3.0)
    bp = _noisy_sums(phantom, 150, 30.0)
    truth_tau2 = power_spectrum_half(phantom)
    oracle = bp.reconstruct(tau2=truth_tau2, tau2_fudge=1.0, gridding=False) * mask
    res_oracle = metrics.fsc_resolution(metrics.fsc(oracle, phantom), N, 1.0)
    vol_power, tau2_power = _iterate(bp, mask, em=False)
    vol_em, tau2_em = _iterate(bp, mask, em=True)
    _, tau2_em_25 = _iterate(bp, mask, em=True, n_iter=25)
    res_power = metrics.fsc_resolution(metrics.fsc(vol_power, phantom), N, 1.0)
    res_em = metrics.fsc_resolution(metrics.fsc(vol_em, phantom), N, 1.0)
    print(f"FSC 0.5 (px): power {res_power:.2f}, em {res_em:.2f}, true-spectrum Wiener "
          f"{res_oracle:.2f}; tau2 / truth at shells 8-12: power "
          f"{np.round(tau2_power[8:13] / truth_tau2[8:13], 3)}, "
          f"em {np.round(tau2_em[8:13] / truth_tau2[8:13], 3)}")
    assert res_em < res_oracle + 0.3
    assert res_power > res_em + 1.0
    # RELION's update has shrunk tau2 far below the signal in the middle shells; the
    # EM update has not, and has settled.
    assert np.median(tau2_power[8:13] / truth_tau2[8:13]) < 0.1
    assert np.all(tau2_em[8:13] / truth_tau2[8:13] > 0.3)
    np.testing.assert_allclose(tau2_em_25[1:13], tau2_em[1:13], rtol=0.1)


def test_maximise_adds_the_posterior_variance_only_with_em(phantom):
    bp = _noisy_sums(phantom, 80, 10.0)
    n_shells = N // 2 + 1
    tau2_prior = power_spectrum_half(phantom)

    def run(estimate):
        acc = Accumulators(1, 1, N, 2, np)
        acc.backprojectors[0].add(bp.data, bp.weight)
        acc.class_weight[:] = 80.0
        acc.noise_count[:] = 1.0
        acc.noise_sum[:] = 2.0
        model = SimpleNamespace(refs=[None], ssnr=np.zeros((1, n_shells)),
                                tau2=tau2_prior[None].copy(), consensus_ref=None,
                                class_resolution_shell=np.zeros(1, int),
                                pdf_class=np.ones(1), sigma2=np.ones((1, n_shells)),
                                sigma_offset_angst=1.0, apix=1.0)
        settings = SimpleNamespace(tau2_fudge=4.0, gridding=False, tau2_estimate=estimate)
        maximise(acc, model, settings)
        return model

    power, em = run("power"), run("em")
    np.testing.assert_array_equal(power.refs[0], em.refs[0])
    expected = power.tau2[0] + bp.mean_posterior_variance_per_shell(tau2_prior, n_shells)
    np.testing.assert_allclose(em.tau2[0], expected, rtol=1e-10)
    assert np.all(em.tau2[0][1:] > power.tau2[0][1:])


def test_default_tau2_estimate_follows_the_start():
    """``--tau2_estimate`` unset: the EM update with a consensus / PCA start of K > 1
    classes and the merge test on; RELION's update otherwise; a given value wins."""
    import argparse
    from cryoclass_plugin.commands import refine as refine_cmd

    def resolved(*flags):
        parser = argparse.ArgumentParser()
        refine_cmd.add_args(parser)
        args = parser.parse_args(["--i", "p.star", "--o", "run", "--ref", "r.mrc"] + list(flags))
        return refine_cmd.settings_from_args(args).tau2_estimate

    assert resolved("--K", "3") == "power"                                   # RELION's start
    assert resolved("--K", "3", "--init_classes", "pca") == "em"
    assert resolved("--K", "4", "--init_classes", "consensus") == "em"
    assert resolved("--K", "1", "--init_classes", "pca") == "power"
    assert resolved("--K", "3", "--init_classes", "pca", "--merge_threshold", "0") == "power"
    assert resolved("--K", "3", "--init_classes", "pca", "--tau2_estimate", "power") == "power"
    assert resolved("--K", "3", "--tau2_estimate", "em") == "em"


def test_default_class_difference_limit_follows_the_tau2_update():
    """``--class_difference_highres`` unset (-1): 18 A with the EM update, 25 A with
    RELION's; a given value wins; other negative values are refused."""
    import argparse
    import pytest
    from cryoclass_plugin.commands import refine as refine_cmd
    from cryoclass_plugin.engine.errors import CryoClassError

    def resolved(*flags):
        parser = argparse.ArgumentParser()
        refine_cmd.add_args(parser)
        args = parser.parse_args(["--i", "p.star", "--o", "run", "--ref", "r.mrc", "--K", "3",
                                  "--init_classes", "pca"] + list(flags))
        return refine_cmd.settings_from_args(args).class_difference_highres

    assert resolved() == 18.0
    assert resolved("--tau2_estimate", "power") == 25.0
    assert resolved("--class_difference_highres", "30") == 30.0
    assert resolved("--class_difference_highres", "0") == 0.0
    with pytest.raises(CryoClassError):
        resolved("--class_difference_highres", "-2")
