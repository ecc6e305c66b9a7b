"""RELION's contrast transfer function (``ctf.h`` of RELION 3.1).

Units: spatial frequencies in 1/Angstrom, defocus in Angstrom (positive = underfocus),
defocus angle and phase shift in degrees, voltage in kV, Cs in mm, B-factor in A^2.

    lambda  = 12.2643247 / sqrt(V * (1 + V * 0.978466e-6))           (V in volts, A)
    defocus = (dU + dV)/2 + (dU - dV)/2 * cos(2 * (atan2(ky, kx) - angle))
    gamma   = -pi * lambda * defocus * k^2 + pi/2 * Cs * 1e7 * lambda^3 * k^4
              - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF     = scale * exp(-B k^2 / 4) * (-sin(gamma))

so the CTF is positive at low frequency.  ``intact_first_peak`` (RELION's
``--ctf_intact_first_peak``) sets the oscillating part to 1 wherever ``|gamma| < pi/2``
(below the first peak; the envelope still applies), ``phase_flipped``
(``--ctf_phase_flipped``) takes the absolute value, exactly in RELION's order.
"""
import numpy as np

ELECTRON_WAVELENGTH_CONSTANT = 12.2643247  # A * sqrt(V)
RELATIVISTIC_CORRECTION = 0.978466e-6      # 1/V


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength (A) for an acceleration voltage in kV."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return ELECTRON_WAVELENGTH_CONSTANT / np.sqrt(volts * (1.0 + volts * RELATIVISTIC_CORRECTION))


def ctf_values(kx, ky, defocus_u, defocus_v, defocus_angle_deg, voltage_kv, cs_mm, q0,
               phase_shift_deg=0.0, bfactor=0.0, scale=1.0, phase_flipped=False,
               intact_first_peak=False):
    """RELION's CTF at spatial frequencies ``(kx, ky)`` in 1/A.

    All arguments broadcast: typically ``kx, ky`` have shape ``(1, npix)`` and the
    per-particle parameters ``(n, 1)``, giving ``(n, npix)``.  ``kx``/``ky`` may be numpy
    or cupy arrays; the result lives on the same device, in ``kx``'s float type (float64
    for non-float ``kx``); per-particle parameters may be numpy arrays or scalars.
    """
    from .backend import get_xp
    xp = get_xp(kx)
    kx = xp.asarray(kx)
    ky = xp.asarray(ky)
    fdtype = kx.dtype if kx.dtype.kind == "f" else xp.float64

    def param(value):
        return xp.asarray(value, dtype=fdtype)

    lam = param(electron_wavelength(_host(voltage_kv)))
    k2 = kx * kx + ky * ky
    azimuth = xp.arctan2(ky, kx)
    du, dv = param(_host(defocus_u)), param(_host(defocus_v))
    angle = param(np.deg2rad(_host(defocus_angle_deg)))
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * xp.cos(2.0 * (azimuth - angle))
    cs_angstrom = param(_host(cs_mm)) * 1e7
    q0_host = np.asarray(_host(q0), dtype=np.float64)
    amplitude_phase = param(np.arctan(q0_host / np.sqrt(1.0 - q0_host * q0_host)))
    gamma = (-np.pi * lam * defocus * k2 + 0.5 * np.pi * cs_angstrom * lam ** 3 * k2 * k2
             - param(np.deg2rad(_host(phase_shift_deg))) - amplitude_phase)
    ctf = -xp.sin(gamma)
    if intact_first_peak:
        ctf = xp.where(xp.abs(gamma) < 0.5 * np.pi, xp.ones_like(ctf), ctf)
    bfactor_host = np.asarray(_host(bfactor), dtype=np.float64)
    if np.any(bfactor_host != 0):
        ctf = ctf * xp.exp(-param(bfactor_host) * k2 / 4.0)
    if phase_flipped:
        ctf = xp.abs(ctf)
    return ctf * param(_host(scale))


def _host(value):
    """Parameters are small per-particle arrays; keep them on the host to build them."""
    from .backend import to_numpy
    return to_numpy(value) if not np.isscalar(value) else value


def ctf_params(df):
    """Per-particle CTF parameters of a ``ParticleTable.df`` as float64 arrays ``(n,)``,
    keyed by the argument names of :func:`ctf_values`."""
    def col(name, default):
        if name in df.columns:
            return df[name].to_numpy(np.float64)
        return np.full(len(df), default, dtype=np.float64)
    return {
        "defocus_u": col("rlnDefocusU", 0.0),
        "defocus_v": col("rlnDefocusV", 0.0) if "rlnDefocusV" in df.columns
        else col("rlnDefocusU", 0.0),  # no astigmatism given: dV = dU
        "defocus_angle_deg": col("rlnDefocusAngle", 0.0),
        "voltage_kv": col("rlnVoltage", 300.0),
        "cs_mm": col("rlnSphericalAberration", 2.7),
        "q0": col("rlnAmplitudeContrast", 0.1),
        "phase_shift_deg": col("rlnPhaseShift", 0.0),
        "bfactor": col("rlnCtfBfactor", 0.0),
        "scale": col("rlnCtfScalefactor", 1.0),
    }


def frequency_grid_2d(box, apix, xp=np):
    """``(ky, kx)`` spatial frequencies (1/A) of a centred ``box x box`` transform."""
    k = (xp.arange(box, dtype=xp.float64) - box // 2) / (box * float(apix))
    ky, kx = xp.meshgrid(k, k, indexing="ij")
    return ky, kx


def ctf_images(params, box, apix, indices=None, xp=np, **options):
    """Full centred CTF images ``(n, box, box)`` (float32) for the particles ``indices``
    of ``params`` (a :func:`ctf_params` dict); ``options`` are ``phase_flipped`` and
    ``intact_first_peak``."""
    ky, kx = frequency_grid_2d(box, apix, xp)
    sel = slice(None) if indices is None else np.asarray(indices)
    per = {name: np.asarray(values)[sel][:, None] for name, values in params.items()}
    ctf = ctf_values(kx.reshape(1, -1), ky.reshape(1, -1), **per, **options)
    return ctf.reshape(-1, box, box).astype(xp.float32)
