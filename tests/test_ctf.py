"""RELION's CTF against a direct scalar evaluation of the formula written out here."""
import math

import numpy as np
import pandas as pd
import pytest

from cryoclass_plugin.engine import ctf


def reference_ctf(kx, ky, du, dv, angle_deg, kv, cs_mm, q0, phase_deg=0.0, bfactor=0.0,
                  scale=1.0):
    """One value, straight from RELION's ctf.h with Python floats."""
    volts = kv * 1000.0
    lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    k2 = kx * kx + ky * ky
    ang = math.atan2(ky, kx)
    defocus = (du + dv) / 2 + (du - dv) / 2 * math.cos(2 * (ang - math.radians(angle_deg)))
    gamma = (-math.pi * lam * defocus * k2 + math.pi / 2 * cs_mm * 1e7 * lam ** 3 * k2 * k2
             - math.radians(phase_deg) - math.atan(q0 / math.sqrt(1 - q0 * q0)))
    return scale * math.exp(-bfactor * k2 / 4) * -math.sin(gamma), gamma


def test_wavelength_textbook_values():
    assert ctf.electron_wavelength(300) == pytest.approx(0.019687, abs=2e-6)
    assert ctf.electron_wavelength(200) == pytest.approx(0.025079, abs=2e-6)


def test_matches_direct_formula_with_astigmatism_at_many_angles():
    rng = np.random.default_rng(0)
    params = [
        # du, dv, angle, kV, Cs, Q0, phase, B, scale
        (15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0),
        (25000.0, 22000.0, -60.0, 200.0, 2.0, 0.07, 0.0, 50.0, 0.8),
        (8000.0, 8600.0, 135.0, 300.0, 0.01, 0.1, 90.0, 0.0, 1.0),
    ]
    for du, dv, ang, kv, cs, q0, ph, bf, sc in params:
        # frequencies at 12 directions and random radii up to 1/(2 * 1.5 A)
        theta = np.deg2rad(np.arange(0, 360, 30) + 7.0)
        radius = rng.uniform(0.0, 1 / 3.0, theta.size)
        kx, ky = radius * np.cos(theta), radius * np.sin(theta)
        got = ctf.ctf_values(kx, ky, du, dv, ang, kv, cs, q0, phase_shift_deg=ph,
                             bfactor=bf, scale=sc)
        want = [reference_ctf(x, y, du, dv, ang, kv, cs, q0, ph, bf, sc)[0]
                for x, y in zip(kx, ky)]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_astigmatism_axes():
    """Along the defocus angle the defocus is dU, perpendicular to it dV (Cs = Q0 = 0)."""
    du, dv, k = 20000.0, 12000.0, 0.05
    lam = ctf.electron_wavelength(300.0)
    for angle in (0.0, 25.0, 90.0, 140.0):
        a = np.deg2rad(angle)
        along = ctf.ctf_values(k * np.cos(a), k * np.sin(a), du, dv, angle, 300.0, 0.0, 0.0)
        perp = ctf.ctf_values(-k * np.sin(a), k * np.cos(a), du, dv, angle, 300.0, 0.0, 0.0)
        assert along == pytest.approx(np.sin(np.pi * lam * du * k * k), abs=1e-12)
        assert perp == pytest.approx(np.sin(np.pi * lam * dv * k * k), abs=1e-12)


def test_sign_at_origin_and_phase_plate():
    # Positive at low frequency: CTF(0) = Q0 (RELION's -sin(gamma) convention).
    assert ctf.ctf_values(0.0, 0.0, 20000, 20000, 0, 300, 2.7, 0.1) == pytest.approx(0.1)
    # A 90 degree phase plate gives sqrt(1 - Q0^2) at the origin.
    assert ctf.ctf_values(0.0, 0.0, 20000, 20000, 0, 300, 2.7, 0.1,
                          phase_shift_deg=90) == pytest.approx(math.sqrt(0.99))


def test_bfactor_scale_and_phase_flip():
    kx = np.linspace(-0.2, 0.2, 41)
    ky = 0.3 * kx[::-1]
    base = ctf.ctf_values(kx, ky, 18000, 17000, 10, 300, 2.7, 0.1)
    damped = ctf.ctf_values(kx, ky, 18000, 17000, 10, 300, 2.7, 0.1, bfactor=100.0, scale=0.5)
    np.testing.assert_allclose(damped, 0.5 * base * np.exp(-100.0 * (kx ** 2 + ky ** 2) / 4))
    flipped = ctf.ctf_values(kx, ky, 18000, 17000, 10, 300, 2.7, 0.1, phase_flipped=True)
    np.testing.assert_allclose(flipped, np.abs(base))
    assert (base < 0).any()  # the test would be empty otherwise


def test_intact_first_peak():
    k = np.linspace(0.0, 0.15, 301)
    args = (15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1)
    got = ctf.ctf_values(k, 0 * k, *args, bfactor=40.0, intact_first_peak=True)
    for value, kk in zip(got, k):
        want, gamma = reference_ctf(kk, 0.0, *args, bfactor=40.0)
        if abs(gamma) < math.pi / 2:
            want = math.exp(-40.0 * kk * kk / 4)  # 1 below the first peak, envelope kept
        assert value == pytest.approx(want, abs=1e-12)
    # below the first peak it is flat at the envelope, after it oscillates as before
    first_peak = np.sqrt(1 / (2 * ctf.electron_wavelength(300.0) * 15000.0))  # ~0.048 1/A
    assert np.allclose(got[k < 0.9 * first_peak], np.exp(-10.0 * k[k < 0.9 * first_peak] ** 2))
    plain = ctf.ctf_values(k, 0 * k, *args, bfactor=40.0)
    np.testing.assert_allclose(got[k > 1.1 * first_peak], plain[k > 1.1 * first_peak])


def test_broadcast_per_particle_and_dtype():
    kx = np.linspace(0, 0.1, 5, dtype=np.float32)[None]
    ky = np.zeros_like(kx)
    du = np.array([10000.0, 20000.0, 30000.0])[:, None]
    out = ctf.ctf_values(kx, ky, du, du, 0.0, 300.0, 2.7, 0.1)
    assert out.shape == (3, 5) and out.dtype == np.float32
    for i in range(3):
        want = [reference_ctf(float(x), 0.0, du[i, 0], du[i, 0], 0, 300, 2.7, 0.1)[0]
                for x in kx[0]]
        np.testing.assert_allclose(out[i], want, rtol=2e-4, atol=2e-5)


def test_ctf_params_and_images():
    df = pd.DataFrame({"rlnDefocusU": [15000.0, 21000.0], "rlnDefocusAngle": [5.0, -20.0],
                       "rlnVoltage": [300.0, 300.0], "rlnSphericalAberration": [2.7, 2.7],
                       "rlnAmplitudeContrast": [0.1, 0.1], "rlnCtfScalefactor": [1.0, 0.9]})
    p = ctf.ctf_params(df)
    assert set(p) == {"defocus_u", "defocus_v", "defocus_angle_deg", "voltage_kv", "cs_mm",
                      "q0", "phase_shift_deg", "bfactor", "scale"}
    np.testing.assert_array_equal(p["defocus_v"], p["defocus_u"])  # no rlnDefocusV: dV = dU
    np.testing.assert_array_equal(p["phase_shift_deg"], 0.0)
    np.testing.assert_array_equal(p["scale"], [1.0, 0.9])
    box, apix = 32, 2.0
    imgs = ctf.ctf_images(p, box, apix)
    assert imgs.shape == (2, box, box) and imgs.dtype == np.float32
    assert imgs[1, box // 2, box // 2] == pytest.approx(0.9 * 0.1, rel=1e-5)
    # pixel (iy, ix) is frequency ((ix - N/2), (iy - N/2)) / (N apix)
    iy, ix = 20, 7
    want = reference_ctf((ix - 16) / 64.0, (iy - 16) / 64.0, 21000, 21000, -20, 300, 2.7, 0.1,
                         scale=0.9)[0]
    assert imgs[1, iy, ix] == pytest.approx(want, abs=1e-5)
    # Friedel symmetric
    np.testing.assert_allclose(imgs[:, 1:, 1:], imgs[:, 1:, 1:][:, ::-1, ::-1], atol=1e-6)
    sub = ctf.ctf_images(p, box, apix, indices=[1])
    np.testing.assert_array_equal(sub[0], imgs[1])


def test_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    kx = np.linspace(-0.2, 0.2, 101)[None]
    ky = 0.5 * kx
    du = np.array([12000.0, 25000.0])[:, None]
    want = ctf.ctf_values(kx, ky, du, du - 500, 30.0, 300, 2.7, 0.1, bfactor=20,
                          intact_first_peak=True)
    got = ctf.ctf_values(cupy.asarray(kx), cupy.asarray(ky), cupy.asarray(du),
                         cupy.asarray(du - 500), 30.0, 300, 2.7, 0.1, bfactor=20,
                         intact_first_peak=True)
    assert type(got).__module__.startswith("cupy")
    np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-9, atol=1e-12)
