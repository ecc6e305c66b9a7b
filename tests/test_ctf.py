"""RELION's CTF against a direct scalar evaluation of the formula written out here."""
import math

import numpy as np
import pandas as pd
import pytest

from cryoclass_plugin.engine import ctf
from cryoclass_plugin.engine.errors import CryoClassError


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
    optics = dict(even_zernike=np.array([[[0, 0, 0, 40.0, 300.0]], [[0, 0, 0, -20.0, 0]]]),
                  mag_matrix=np.array([1.01, 0.004, -0.003, 0.995]))
    want = ctf.ctf_values(kx, ky, du, du - 500, 30.0, 300, 2.7, 0.1, bfactor=20,
                          intact_first_peak=True, **optics)
    got = ctf.ctf_values(cupy.asarray(kx), cupy.asarray(ky), cupy.asarray(du),
                         cupy.asarray(du - 500), 30.0, 300, 2.7, 0.1, bfactor=20,
                         intact_first_peak=True, **optics)
    assert type(got).__module__.startswith("cupy")
    np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- RELION 3.1+ optics terms
# RELION's even Zernike terms in its index order (Zernike::evenIndexToMN), written out as
# closed forms of rho = |k| (1/A) and phi = atan2(ky, kx).
EVEN_ZERNIKE_CLOSED = [
    lambda r, p: 1.0,                                   # (m, n) = (0, 0)
    lambda r, p: r ** 2 * math.sin(2 * p),              # (-2, 2)
    lambda r, p: 2 * r ** 2 - 1,                        # (0, 2)
    lambda r, p: r ** 2 * math.cos(2 * p),              # (2, 2)
    lambda r, p: r ** 4 * math.sin(4 * p),              # (-4, 4)
    lambda r, p: (4 * r ** 4 - 3 * r ** 2) * math.sin(2 * p),  # (-2, 4)
    lambda r, p: 6 * r ** 4 - 6 * r ** 2 + 1,           # (0, 4)
    lambda r, p: (4 * r ** 4 - 3 * r ** 2) * math.cos(2 * p),  # (2, 4)
    lambda r, p: r ** 4 * math.cos(4 * p),              # (4, 4)
]


def test_zernike_index_order_is_relions():
    assert [ctf.even_index_to_mn(i) for i in range(9)] == [
        (0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4), (-2, 4), (0, 4), (2, 4), (4, 4)]
    assert [ctf.odd_index_to_mn(i) for i in range(6)] == [
        (-1, 1), (1, 1), (-3, 3), (-1, 3), (1, 3), (3, 3)]


def test_even_zernike_adds_to_gamma():
    """CTF = -sin(gamma + sum_i c_i Z_i(kx, ky)), Z_i of the frequency in 1/A."""
    coeffs = np.array([0.3, -2.0, 5.0, 40.0, 300.0, -80.0, 120.0, 60.0, -500.0])
    rng = np.random.default_rng(3)
    theta = rng.uniform(0, 2 * np.pi, 40)
    radius = rng.uniform(0.0, 0.3, 40)
    kx, ky = radius * np.cos(theta), radius * np.sin(theta)
    args = (16000.0, 15000.0, 25.0, 300.0, 2.7, 0.1)
    got = ctf.ctf_values(kx, ky, *args, bfactor=30.0, even_zernike=coeffs)
    for x, y, value in zip(kx, ky, got):
        _, gamma = reference_ctf(x, y, *args)
        r, p = math.hypot(x, y), math.atan2(y, x)
        gamma += sum(c * z(r, p) for c, z in zip(coeffs, EVEN_ZERNIKE_CLOSED))
        want = math.exp(-30.0 * r * r / 4) * -math.sin(gamma)
        assert value == pytest.approx(want, abs=1e-9)
    # zero coefficients change nothing
    np.testing.assert_array_equal(ctf.ctf_values(kx, ky, *args, even_zernike=np.zeros(9)),
                                  ctf.ctf_values(kx, ky, *args))


def test_magnification_matrix_transforms_the_frequency_first():
    """RELION's CTF::getCTF: (kx, ky) -> M (kx, ky) before defocus, Cs and B-factor."""
    m = np.array([1.012, 0.007, -0.004, 0.991])
    rng = np.random.default_rng(4)
    kx, ky = rng.uniform(-0.25, 0.25, (2, 30))
    args = (18000.0, 16500.0, -35.0, 200.0, 2.0, 0.07)
    got = ctf.ctf_values(kx, ky, *args, bfactor=60.0, scale=0.8, mag_matrix=m)
    want = [reference_ctf(m[0] * x + m[1] * y, m[2] * x + m[3] * y, *args, bfactor=60.0,
                          scale=0.8)[0] for x, y in zip(kx, ky)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def _optics_df(**group2):
    """Two particles in optics groups 1 and 2; ``group2`` sets group 2's columns."""
    df = pd.DataFrame({"rlnDefocusU": [15000.0, 21000.0], "rlnDefocusV": [15000.0, 20000.0],
                       "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 2.0],
                       "rlnAmplitudeContrast": [0.1, 0.07], "rlnOpticsGroup": [1, 2],
                       "rlnOpticsGroupName": ["opticsGroup1", "late"]})
    for col, value in group2.items():
        first = "[]" if isinstance(value, str) else {"rlnMagMat00": 1.0,
                                                     "rlnMagMat11": 1.0}.get(col, 0.0)
        df[col] = [first, value]
    return df


@pytest.mark.parametrize("column, value", [
    ("rlnMagMat00", 1.01), ("rlnMagMat01", 0.005), ("rlnMagMat10", -0.004),
    ("rlnMagMat11", 0.99), ("rlnCtfDataAreCtfPremultiplied", 1)])
def test_terms_not_applied_are_refused_naming_group_and_field(column, value):
    with pytest.raises(CryoClassError) as err:
        ctf.ctf_params(_optics_df(**{column: value}))
    text = str(err.value)
    assert "optics group 2 (late)" in text and column in text
    assert "\n" not in text


def test_neutral_optics_terms_are_accepted_and_change_nothing():
    plain = ctf.ctf_params(_optics_df())
    neutral = ctf.ctf_params(_optics_df(
        rlnOddZernike="[0,0,0,0,0,0]", rlnEvenZernike="[0,0,0,0,0,0,0,0,0]",
        rlnBeamTiltX=0.0, rlnBeamTiltY=0.0, rlnMagMat00=1.0, rlnMagMat01=0.0,
        rlnMagMat10=0.0, rlnMagMat11=1.0, rlnCtfDataAreCtfPremultiplied=0))
    assert set(neutral) == set(plain)
    for key in plain:
        np.testing.assert_array_equal(neutral[key], plain[key])


def test_even_zernike_per_optics_group_reaches_the_ctf_images():
    df = _optics_df(rlnEvenZernike="[0,0,0,40,300]")
    p = ctf.ctf_params(df)
    np.testing.assert_array_equal(p["even_zernike"], [[0, 0, 0, 0, 0], [0, 0, 0, 40, 300]])
    box, apix = 16, 2.0
    imgs = ctf.ctf_images(p, box, apix)
    iy, ix = 3, 12
    x, y = (ix - 8) / 32.0, (iy - 8) / 32.0
    args = (21000.0, 20000.0, 0.0, 200.0, 2.0, 0.07)
    r, phi = math.hypot(x, y), math.atan2(y, x)
    gamma = reference_ctf(x, y, *args)[1] + 40 * EVEN_ZERNIKE_CLOSED[3](r, phi) \
        + 300 * EVEN_ZERNIKE_CLOSED[4](r, phi)
    assert imgs[1, iy, ix] == pytest.approx(-math.sin(gamma), abs=1e-5)
    assert imgs[0, iy, ix] == pytest.approx(
        reference_ctf(x, y, 15000, 15000, 0, 300, 2.7, 0.1)[0], abs=1e-5)


def test_bad_zernike_text_is_a_one_line_error():
    with pytest.raises(CryoClassError, match=r"optics group 2 \(late\): rlnEvenZernike"):
        ctf.ctf_params(_optics_df(rlnEvenZernike="[0,x,1]"))


# RELION's odd Zernike terms in its index order (Zernike::oddIndexToMN), closed forms.
ODD_ZERNIKE_CLOSED = [
    lambda r, p: r * math.sin(p),                        # (-1, 1)
    lambda r, p: r * math.cos(p),                        # (1, 1)
    lambda r, p: r ** 3 * math.sin(3 * p),               # (-3, 3)
    lambda r, p: (3 * r ** 3 - 2 * r) * math.sin(p),     # (-1, 3)
    lambda r, p: (3 * r ** 3 - 2 * r) * math.cos(p),     # (1, 3)
    lambda r, p: r ** 3 * math.cos(3 * p),               # (3, 3)
]


def test_antisymmetric_phase_is_the_odd_zernike_sum():
    coeffs = np.array([0.47, 0.41, 34.4, -12.0, 8.0, 10.8])
    rng = np.random.default_rng(5)
    kx, ky = rng.uniform(-0.3, 0.3, (2, 25))
    got = ctf.antisymmetric_phase(kx, ky, coeffs)
    for x, y, value in zip(kx, ky, got):
        r, p = math.hypot(x, y), math.atan2(y, x)
        assert value == pytest.approx(sum(c * z(r, p) for c, z in
                                          zip(coeffs, ODD_ZERNIKE_CLOSED)), abs=1e-12)
    # odd: phi(-k) = -phi(k), so the Hermitian half plane carries it consistently
    np.testing.assert_allclose(ctf.antisymmetric_phase(-kx, -ky, coeffs), -got, atol=1e-12)


def test_beam_tilt_is_the_textbook_phase():
    """RELION's insertTilt: the beam tilt (tx, ty) in mrad becomes the phase
    -2 pi Cs lambda^2 |k|^2 (k . tau), Cs in A, tau in rad (Glaeser's coma-free formula)."""
    tx, ty, cs, kv = 0.35, -0.21, 2.7, 300.0
    odd = ctf.insert_beam_tilt(np.zeros(6), tx, ty, cs, kv)
    lam = ctf.electron_wavelength(kv)
    rng = np.random.default_rng(6)
    kx, ky = rng.uniform(-0.3, 0.3, (2, 25))
    want = -2 * np.pi * cs * 1e7 * lam ** 2 * (kx * kx + ky * ky) * (kx * tx + ky * ty) * 1e-3
    np.testing.assert_allclose(ctf.antisymmetric_phase(kx, ky, odd), want, rtol=1e-8,
                               atol=1e-12)


def test_odd_terms_per_group_with_beam_tilt_inserted():
    df = _optics_df(rlnOddZernike="[0.1,0,0,0,0,0]", rlnBeamTiltX=0.3, rlnBeamTiltY=0.0)
    p = ctf.ctf_params(df)
    assert "even_zernike" not in p
    np.testing.assert_array_equal(p["odd_zernike"][0], 0.0)
    want = ctf.insert_beam_tilt(np.array([0.1, 0, 0, 0, 0, 0]), 0.3, 0.0, 2.0, 200.0)
    np.testing.assert_allclose(p["odd_zernike"][1], want)
    # the antisymmetric part is not a CTF factor: the CTF images are those without it
    np.testing.assert_array_equal(ctf.ctf_images(p, 16, 2.0),
                                  ctf.ctf_images(ctf.ctf_params(_optics_df()), 16, 2.0))


def test_without_ctf_correction_premultiplied_is_accepted_and_odd_terms_kept():
    """RELION squares the CTF of premultiplied data only with CTF correction, but
    demodulates the antisymmetric aberration and applies the magnification always."""
    df = _optics_df(rlnCtfDataAreCtfPremultiplied=1, rlnOddZernike="[0.1,0,0,0,0,0]")
    terms = ctf.optics_terms(df, ctf=False)
    np.testing.assert_array_equal(terms["odd_zernike"][1], [0.1, 0, 0, 0, 0, 0])
    with pytest.raises(CryoClassError, match="rlnCtfDataAreCtfPremultiplied"):
        ctf.optics_terms(df)
    with pytest.raises(CryoClassError, match="rlnMagMat00"):
        ctf.optics_terms(_optics_df(rlnMagMat00=1.02), ctf=False)
