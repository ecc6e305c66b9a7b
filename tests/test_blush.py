"""Blush regularisation (cryoclass_plugin/blush): resampling, the Fourier blend, the mask,
the shipped network's behaviour on noise and under rotation, and the training code."""
import numpy as np
import pytest
import torch

from cryoclass_plugin.blush import training_data
from cryoclass_plugin.blush.denoise import (BlushRegulariser, DEFAULT_WEIGHTS, blend_weight,
                                            prior_mean_ft, MASK_EXTRA_A, MASK_EDGE_A)
from cryoclass_plugin.blush.network import BlushUNet, Conv3d, n_parameters, NETWORK_APIX
from cryoclass_plugin.blush.resample import (fft_c, ifft_c, network_box, radius_grid,
                                             resample, rfft_radius)
from cryoclass_plugin.blush.train import TrainConfig, make_pool, save_weights, train
from cryoclass_plugin.engine.errors import CryoClassError

torch.set_num_threads(1)


def _bandlimited(box, shell, seed=0):
    rng = np.random.default_rng(seed)
    f = fft_c(torch.from_numpy(rng.normal(size=(box,) * 3)))
    f = f * (radius_grid(box) < shell)
    return ifft_c(f).real


def _rot90(vol):
    """Rotate a centred map by 90 degrees about the z axis through voxel N // 2 (a swap
    of y and x and the mirror i -> N - i, which keeps N // 2 fixed)."""
    out = np.swapaxes(vol, 1, 2)
    return np.roll(np.flip(out, axis=2), 1, axis=2)


def _corr(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def blush():
    return BlushRegulariser(threads=1)


@pytest.fixture(scope="module")
def phantom():
    """A held-out clean map (seed far from training's) and a degraded version of it."""
    rng = np.random.default_rng(12345)
    clean, radius = training_data.clean_map(rng, 64, NETWORK_APIX)
    degraded, target = training_data.degrade(clean, NETWORK_APIX, rng)
    return degraded, target, radius


def test_resample_round_trip():
    vol = _bandlimited(64, 20)                       # below the Nyquist of box 48 (24)
    down = resample(vol, 48)
    assert down.shape == (48,) * 3
    back = resample(down, 64)
    assert torch.allclose(back, vol, atol=1e-10 * float(vol.abs().max()))
    up = resample(vol, 86)                           # pad then crop: exact for any map
    assert torch.allclose(resample(up, 64), vol, atol=1e-10 * float(vol.abs().max()))
    # Densities keep their greyscale: the mean value is unchanged.
    assert abs(float(down.mean()) - float(vol.mean())) < 1e-10


def test_resample_is_a_low_pass():
    vol = _bandlimited(64, 32, seed=1)
    f_back = fft_c(resample(resample(vol, 32), 64))
    k = torch.arange(64) - 32
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    beyond = torch.maximum(torch.maximum(kz.abs(), ky.abs()), kx.abs()) >= 16
    assert float(f_back[beyond].abs().max()) < 1e-8 * float(f_back.abs().max())
    assert float(f_back[~beyond].abs().min()) > 0


def test_network_box():
    assert network_box(64, 4.0, 3.0) == (84, 64 * 4.0 / 84)     # 86 = 2 x 43: slow FFT
    assert network_box(64, 3.0, 3.0) == (64, 3.0)


def test_network_is_small_and_loads_weights_only():
    ckpt = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    model = BlushUNet(tuple(ckpt["widths"]))
    model.load_state_dict(ckpt["state_dict"])
    assert n_parameters(model) < 500_000
    x = torch.zeros(1, 1, 24, 24, 24)
    assert model(x).shape == x.shape


def test_inference_convolution_matches_torchs():
    """The oneDNN inference path gives torch's own convolution, on a shape torch would
    send to its native kernel (one map, 32 channels of 12^3) and on a 1x1 one."""
    torch.manual_seed(0)
    for c_in, c_out, k in ((32, 32, 3), (16, 8, 1)):
        conv = Conv3d(c_in, c_out, k, padding=k // 2)
        x = torch.randn(1, c_in, 12, 12, 12)
        with torch.no_grad():
            fast = conv(x)
            reference = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=k // 2)
        assert fast.shape == reference.shape
        assert float((fast - reference).abs().max()) < 1e-4 * float(reference.abs().max())


def test_output_equals_vreg_above_crossover(blush):
    apix, crossover = 2.0, 8.0                       # shells >= 16 are V_reg's
    vol = (_bandlimited(64, 31, seed=2)).numpy().astype(np.float32)
    out = blush.regularise(vol, apix, 100.0, crossover_a=crossover)
    assert out.shape == vol.shape and out.dtype == np.float32
    f_in = fft_c(torch.from_numpy(vol.astype(np.float64)))
    f_out = fft_c(torch.from_numpy(out.astype(np.float64)))
    r = radius_grid(64)
    above = r >= 64 * apix / crossover
    scale = float(f_in.abs().max())
    assert float((f_out - f_in)[above].abs().max()) < 1e-5 * scale
    below = r < 64 * apix / crossover - 3
    assert float((f_out - f_in)[below].abs().max()) > 1e-2 * scale   # D was used there


def test_output_equals_vreg_below_lowres(blush):
    apix, crossover, lowres = 2.0, 8.0, 16.0         # shells < 8 and >= 16 are V_reg's
    vol = (_bandlimited(64, 31, seed=2)).numpy().astype(np.float32)
    out = blush.regularise(vol, apix, 100.0, crossover_a=crossover, lowres_a=lowres)
    f_in = fft_c(torch.from_numpy(vol.astype(np.float64)))
    f_out = fft_c(torch.from_numpy(out.astype(np.float64)))
    r = radius_grid(64)
    scale = float(f_in.abs().max())
    kept = (r <= 64 * apix / lowres) | (r >= 64 * apix / crossover)
    assert float((f_out - f_in)[kept].abs().max()) < 1e-5 * scale
    band = (r > 64 * apix / lowres + 3) & (r < 64 * apix / crossover - 3)
    assert float((f_out - f_in)[band].abs().max()) > 1e-2 * scale   # D was used there


def test_blend_method_matches_regularise(blush, phantom):
    degraded, _, radius = phantom
    vol = resample(torch.from_numpy(degraded), 96).numpy().astype(np.float32)   # 2 A/px
    d = blush.denoise(vol, 2.0, 2 * radius)
    out = blush.blend(vol, d, 2.0)
    assert np.allclose(out, blush.regularise(vol, 2.0, 2 * radius), atol=1e-6)
    with pytest.raises(CryoClassError, match="shapes"):
        blush.blend(vol, d[:-2, :-2, :-2], 2.0)


def test_blend_weight_profile():
    w = blend_weight(64, 2.0, 8.0)
    r = rfft_radius(64)
    assert torch.all(w[r <= 13.0] == 1.0) and torch.all(w[r >= 16.0] == 0.0)
    mid = w[(r > 13.2) & (r < 15.8)]
    assert float(mid.min()) > 0 and float(mid.max()) < 1
    band = blend_weight(64, 2.0, 8.0, lowres_a=32.0)     # s_l = 4: 0 up to 4, 1 from 7
    assert torch.all(band[r <= 4.0] == 0.0) and torch.all(band[(r >= 7.0) & (r <= 13.0)] == 1.0)
    assert torch.all(band[r >= 16.0] == 0.0)


def test_denoised_part_is_zero_outside_mask(blush, phantom):
    degraded, _, _ = phantom
    diameter = 120.0
    d = blush.denoise(degraded, NETWORK_APIX, diameter)       # no resampling at 3 A
    outside = radius_grid(64).numpy() >= (diameter / 2 + MASK_EXTRA_A + MASK_EDGE_A) / NETWORK_APIX
    assert np.abs(d[outside]).max() == 0.0
    assert np.abs(d[~outside]).max() > 0.0
    # After resampling (4 A/px data), only the band-limit's ringing remains outside.
    d4 = blush.denoise(resample(torch.from_numpy(degraded), 48).numpy(), 4.0, diameter)
    outside4 = radius_grid(48).numpy() >= (diameter / 2 + MASK_EXTRA_A + MASK_EDGE_A + 8) / 4.0
    assert np.abs(d4[outside4]).max() < 0.05 * np.abs(d4).max()


@pytest.mark.slow
def test_pure_noise_gives_low_variance_and_no_training_map(blush, phantom):
    rng = np.random.default_rng(7)
    clean, _ = training_data.clean_map(rng, 64, NETWORK_APIX)
    noise, _ = training_data.degrade(clean, NETWORK_APIX, rng, signal=False)
    diameter = 150.0
    d = blush.denoise(noise, NETWORK_APIX, diameter)
    inside = radius_grid(64).numpy() <= diameter / 2 / NETWORK_APIX
    ratio = float(d[inside].var() / noise[inside].var())
    assert ratio < 0.4, ratio                       # measured 0.24 (shipped weights)
    pool = make_pool(12, 0)                          # the first training maps (seed 0)
    best = max(abs(_corr(d, c)) for c, _ in pool)
    assert best < 0.15, best
    # The same network keeps most of a real map's variance.
    degraded, _, radius = phantom
    dm = blush.denoise(degraded, NETWORK_APIX, 2 * radius)
    assert float(dm[inside].var() / degraded[inside].var()) > 2 * ratio


def test_denoising_improves_a_held_out_map(blush, phantom):
    degraded, target, radius = phantom
    d = blush.denoise(degraded, NETWORK_APIX, 2 * radius)
    assert _corr(d, target) > _corr(degraded, target) + 0.02


def test_rotation_equivariance(blush, phantom):
    degraded, _, radius = phantom
    d = blush.denoise(degraded, NETWORK_APIX, 2 * radius)
    d_rot = blush.denoise(np.ascontiguousarray(_rot90(degraded)), NETWORK_APIX, 2 * radius)
    c = _corr(_rot90(d), d_rot)
    assert c > 0.95, c


def test_prior_mean_formula():
    sum_x = torch.tensor([2.0 + 1j, 0.0, 3.0])
    weight = torch.tensor([1.0, 0.0, 0.0])
    prior = torch.tensor([1.0, 2.0, 0.0])
    d_ft = torch.tensor([4.0 + 0j, 5.0, 6.0])
    out = prior_mean_ft(sum_x, weight, prior, d_ft)
    assert torch.allclose(out, torch.tensor([3.0 + 0.5j, 5.0, 6.0]))


def test_prior_mean_mode_uses_the_sums(blush, phantom):
    degraded, _, radius = phantom
    f = fft_c(torch.from_numpy(degraded.astype(np.float64)))
    weight = torch.full(f.shape, 1e12, dtype=torch.float64)  # data overwhelm any prior
    prior = torch.ones(f.shape, dtype=torch.float64)
    out = blush.regularise(degraded, NETWORK_APIX, 2 * radius, mode="prior-mean",
                           sums=(f * weight, weight, prior))
    assert np.allclose(out, degraded, atol=1e-4 * np.abs(degraded).max())


def test_bad_inputs_are_refused(blush, tmp_path):
    with pytest.raises(CryoClassError, match="cubic"):
        blush.regularise(np.zeros((64, 64, 32), np.float32), 3.0, 100.0)
    with pytest.raises(CryoClassError, match="crossover"):
        blush.regularise(np.zeros((64,) * 3, np.float32), 1.0, 100.0, crossover_a=4.0)
    with pytest.raises(CryoClassError, match="prior-mean"):
        blush.regularise(np.zeros((64,) * 3, np.float32), 3.0, 100.0, mode="prior-mean")
    with pytest.raises(CryoClassError, match="mode"):
        blush.regularise(np.zeros((64,) * 3, np.float32), 3.0, 100.0, mode="sharpen")
    with pytest.raises(CryoClassError, match="does not exist"):
        BlushRegulariser(weights=str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(3)}, bad)
    with pytest.raises(CryoClassError, match="not a cryoclass Blush network"):
        BlushRegulariser(weights=str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_without_cuda_torch_is_refused():
    with pytest.raises(CryoClassError, match="CUDA build of torch"):
        BlushRegulariser(device="cuda")


def test_zero_map_gives_zero(blush):
    out = blush.regularise(np.zeros((32,) * 3, np.float32), 4.0, 80.0)
    assert np.all(out == 0)


def test_tiled_pass_matches_single_pass(phantom):
    degraded, _, radius = phantom
    single = BlushRegulariser(max_single=128).denoise(degraded, NETWORK_APIX, 2 * radius)
    tiled = BlushRegulariser(max_single=0, block=48, margin=12).denoise(
        degraded, NETWORK_APIX, 2 * radius)
    assert _corr(single, tiled) > 0.99


@pytest.mark.slow
def test_training_runs_lowers_the_loss_and_is_deterministic(tmp_path):
    cfg = TrainConfig(seed=3, steps=40, pool=6, n_validation=4, crop=32)
    model, report = train(cfg, log=lambda m: None)
    assert report["validation_ratio_before"] == pytest.approx(1.0)   # untrained: identity
    assert report["validation_ratio_after"] < report["validation_ratio_before"]
    path = tmp_path / "w.pt"
    save_weights(model, report, str(path))
    reg = BlushRegulariser(weights=str(path))
    assert "seed 3" in reg.describe()
    tiny = TrainConfig(seed=5, steps=2, pool=2, n_validation=1, crop=16)
    a, _ = train(tiny, log=lambda m: None)
    b, _ = train(tiny, log=lambda m: None)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
