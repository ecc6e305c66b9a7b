"""RELION's contrast transfer function (``ctf.h`` of RELION 3.1).

Units: spatial frequencies in 1/Angstrom, defocus in Angstrom (positive = underfocus),
defocus angle and phase shift in degrees, voltage in kV, Cs in mm, B-factor in A^2.

    lambda  = 12.2643247 / sqrt(V * (1 + V * 0.978466e-6))           (V in volts, A)
    defocus = (dU + dV)/2 + (dU - dV)/2 * cos(2 * (atan2(ky, kx) - angle))
    gamma   = -pi * lambda * defocus * k^2 + pi/2 * Cs * 1e7 * lambda^3 * k^4
              - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF     = scale * exp(-B k^2 / 4) * (-sin(gamma))

so the CTF is positive at low frequency.  RELION 3.1+'s optics-group terms, as in its
``CTF::getCTF`` and ``ObservationModel::getGammaOffset``:

* anisotropic magnification ``M = [[rlnMagMat00, rlnMagMat01], [rlnMagMat10,
  rlnMagMat11]]``: the frequency is replaced by ``M (kx, ky)`` before everything above
  (defocus, Cs, B-factor and the aberrations all see the transformed frequency, as in
  RELION 5).  Only :func:`ctf_values` has it: RELION also projects the references
  through ``M`` (``applyAnisoMag``), which the engine's projector does not, so
  :func:`optics_terms` refuses groups with a non-identity matrix;
* symmetric aberration (``rlnEvenZernike``, radians): ``gamma += sum_i c_i Z_i(kx, ky)``
  with RELION's even Zernike order (index i -> (m, n): k = floor(sqrt(i)),
  m = 2 (i - k^2 - k), n = 2k) of the frequency in 1/A (not normalised to a pupil);
* antisymmetric aberration (``rlnOddZernike``, radians, and the beam tilt
  ``rlnBeamTiltX/Y`` in mrad, turned into odd Zernike terms as RELION's
  ``TiltHelper::insertTilt`` does): not a CTF factor but a phase
  ``exp(i sum_i c_i Z_odd_i(k))`` on the reference projection; like RELION's
  ``ObservationModel::demodulatePhase`` the engine multiplies the image by its conjugate
  instead (the same likelihood, since the factor has unit modulus, and the same
  reconstruction): :func:`antisymmetric_phase`.

CTF-premultiplied images (``rlnCtfDataAreCtfPremultiplied = 1``) are refused with CTF
correction: RELION then compares with CTF^2 in the E-step but reconstructs from the
images as they are with CTF^2 weights, which the engine's M-step does not do.

``intact_first_peak`` (RELION's
``--ctf_intact_first_peak``) sets the oscillating part to 1 wherever ``|gamma| < pi/2``
(below the first peak; the envelope still applies), ``phase_flipped``
(``--ctf_phase_flipped``) takes the absolute value, exactly in RELION's order.
"""
import numpy as np

from .errors import CryoClassError

ELECTRON_WAVELENGTH_CONSTANT = 12.2643247  # A * sqrt(V)
RELATIVISTIC_CORRECTION = 0.978466e-6      # 1/V


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength (A) for an acceleration voltage in kV."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return ELECTRON_WAVELENGTH_CONSTANT / np.sqrt(volts * (1.0 + volts * RELATIVISTIC_CORRECTION))


def ctf_values(kx, ky, defocus_u, defocus_v, defocus_angle_deg, voltage_kv, cs_mm, q0,
               phase_shift_deg=0.0, bfactor=0.0, scale=1.0, phase_flipped=False,
               intact_first_peak=False, mag_matrix=None, even_zernike=None):
    """RELION's CTF at spatial frequencies ``(kx, ky)`` in 1/A.

    All arguments broadcast: typically ``kx, ky`` have shape ``(1, npix)`` and the
    per-particle parameters ``(n, 1)``, giving ``(n, npix)``.  ``kx``/``ky`` may be numpy
    or cupy arrays; the result lives on the same device, in ``kx``'s float type (float64
    for non-float ``kx``); per-particle parameters may be numpy arrays or scalars.
    ``mag_matrix`` (``(..., 4)``: M00, M01, M10, M11) and ``even_zernike`` (``(..., L)``
    coefficients in radians) carry their terms on the last axis, the leading axes
    broadcasting like the other parameters; None leaves the term out.
    """
    from .backend import get_xp
    xp = get_xp(kx)
    kx = xp.asarray(kx)
    ky = xp.asarray(ky)
    fdtype = kx.dtype if kx.dtype.kind == "f" else xp.float64

    def param(value):
        return xp.asarray(value, dtype=fdtype)

    lam = param(electron_wavelength(_host(voltage_kv)))
    if mag_matrix is not None:
        m = param(_host(mag_matrix))
        kx, ky = m[..., 0] * kx + m[..., 1] * ky, m[..., 2] * kx + m[..., 3] * ky
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
    if even_zernike is not None:
        gamma = gamma + symmetric_aberration(kx, ky, param(_host(even_zernike)), xp)
    ctf = -xp.sin(gamma)
    if intact_first_peak:
        ctf = xp.where(xp.abs(gamma) < 0.5 * np.pi, xp.ones_like(ctf), ctf)
    bfactor_host = np.asarray(_host(bfactor), dtype=np.float64)
    if np.any(bfactor_host != 0):
        ctf = ctf * xp.exp(-param(bfactor_host) * k2 / 4.0)
    if phase_flipped:
        ctf = xp.abs(ctf)
    return ctf * param(_host(scale))


def even_index_to_mn(i):
    """RELION's ``Zernike::evenIndexToMN``: the i-th even Zernike term's ``(m, n)``."""
    k = int(np.sqrt(i))
    return 2 * (i - k * k - k), 2 * k


def odd_index_to_mn(i):
    """RELION's ``Zernike::oddIndexToMN``: the i-th odd Zernike term's ``(m, n)``."""
    k = int((np.sqrt(1 + 4 * i) - 1.0) / 2.0)
    n = 2 * k + 1
    return 2 * (i - (k * k + k)) - n, n


def zernike_cart(m, n, x, y, xp=np):
    """RELION's ``Zernike::Z_cart``: ``R_n^|m|(rho) cos(m phi)`` for m >= 0, else
    ``R_n^|m|(rho) sin(|m| phi)``, with ``rho = |(x, y)|``, ``phi = atan2(y, x)`` (not
    normalised: the radial polynomial's coefficients are the textbook ones)."""
    from math import factorial
    am = abs(m)
    rho = xp.sqrt(x * x + y * y)
    radial = xp.zeros_like(rho)
    if (n - am) % 2 == 0:
        for k in range((n - am) // 2 + 1):
            c = ((-1) ** k * factorial(n - k)
                 / (factorial(k) * factorial((n + am) // 2 - k) * factorial((n - am) // 2 - k)))
            radial = radial + c * rho ** (n - 2 * k)
    phi = xp.arctan2(y, x)
    return radial * (xp.cos(am * phi) if m >= 0 else xp.sin(am * phi))


def symmetric_aberration(kx, ky, coeffs, xp=np):
    """``sum_i coeffs[..., i] Z_even_i(kx, ky)`` (radians; added to gamma)."""
    total = 0.0
    for i in range(coeffs.shape[-1]):
        m, n = even_index_to_mn(i)
        total = total + coeffs[..., i] * zernike_cart(m, n, kx, ky, xp)
    return total


def antisymmetric_phase(kx, ky, coeffs, xp=np):
    """``sum_i coeffs[..., i] Z_odd_i(kx, ky)`` (radians): the phase RELION's
    ``getPhaseCorrection`` puts on the projection at frequency ``(kx, ky)`` (1/A)."""
    total = 0.0
    for i in range(coeffs.shape[-1]):
        m, n = odd_index_to_mn(i)
        total = total + coeffs[..., i] * zernike_cart(m, n, kx, ky, xp)
    return total


def insert_beam_tilt(odd, tilt_x_mrad, tilt_y_mrad, cs_mm, voltage_kv):
    """Odd Zernike coefficients with a beam tilt added (RELION's
    ``TiltHelper::insertTilt``): with ``s = Cs[mm] * 20000 * lambda^2 * pi`` and
    ``Z3 = -s * tilt / 3``, terms 1 and 0 get ``2 Z3x`` / ``2 Z3y`` and terms 4 and 3
    get ``Z3x`` / ``Z3y``.  Returns a new array of at least 6 terms."""
    out = np.zeros(max(6, np.asarray(odd).size))
    out[:np.asarray(odd).size] = odd
    scale = cs_mm * 20000.0 * float(electron_wavelength(voltage_kv)) ** 2 * 3.141592654
    z3x, z3y = -scale * tilt_x_mrad / 3.0, -scale * tilt_y_mrad / 3.0
    out[1] += 2.0 * z3x
    out[0] += 2.0 * z3y
    out[4] += z3x
    out[3] += z3y
    return out


def ctf_arguments(params):
    """The :func:`ctf_values` arguments of a :func:`ctf_params` dict (all but the
    antisymmetric aberration, which is a phase on the image, not a CTF factor)."""
    return {k: v for k, v in params.items() if k != "odd_zernike"}


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
        **optics_terms(df),
    }


MAG_COLUMNS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def zernike_vector(text, where, label):
    """RELION's vector text ``[c0,c1,...]`` (or a number, or empty) -> float64 array;
    ``where`` names the optics group in the one-line error."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return np.zeros(0)
    body = str(text).strip().strip('"').strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    try:
        return np.array([float(v) for v in body.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        raise CryoClassError(f"{where}: {label} = '{text}' is not a list of numbers "
                             "[c0,c1,...]; fix the value") from None


def _group_rows(df):
    """``[(where, first row of the group)]`` per optics group in use, ``where`` =
    'optics group N (name)'."""
    if "rlnOpticsGroup" not in df.columns:
        return [("optics group 1", df.iloc[0])]
    out = []
    for g, rows in df.groupby("rlnOpticsGroup", sort=True):
        row = rows.iloc[0]
        name = row.get("rlnOpticsGroupName", f"opticsGroup{int(g)}")
        out.append((f"optics group {int(g)} ({name})", row))
    return out


def _refusals(where, row, ctf=True):
    """One-line reasons why the engine cannot apply this group's optics (empty: fine);
    premultiplied images matter only with CTF correction (``ctf``), as in RELION."""
    out = []
    if ctf and float(row.get("rlnCtfDataAreCtfPremultiplied", 0) or 0) == 1:
        out.append(f"{where}: rlnCtfDataAreCtfPremultiplied = 1 (CTF-premultiplied images) "
                   "is not supported by cryoclass; extract the particles without CTF "
                   "premultiplication")
    for label, identity in zip(MAG_COLUMNS, (1.0, 0.0, 0.0, 1.0)):
        if abs(float(row.get(label, identity)) - identity) > 1e-9:
            out.append(f"{where}: {label} (anisotropic magnification, which RELION also "
                       "applies to the reference projections) is not applied by cryoclass; "
                       "correct the magnification in RELION first")
            break
    return out


def _odd_terms(where, row):
    """A group's odd Zernike coefficients with its beam tilt inserted (RELION's
    ObservationModel)."""
    odd = zernike_vector(row.get("rlnOddZernike"), where, "rlnOddZernike")
    tilt = [float(row.get(c, 0.0) or 0.0) for c in ("rlnBeamTiltX", "rlnBeamTiltY")]
    if any(tilt):
        odd = insert_beam_tilt(odd, tilt[0], tilt[1], float(row["rlnSphericalAberration"]),
                               float(row["rlnVoltage"]))
    return odd


def _per_particle(df, groups, vectors):
    """``(n, L)`` coefficients: each particle gets its optics group's vector (zero
    padded), or None when every vector is zero."""
    if not any(np.any(v != 0) for v in vectors):
        return None
    coeffs = np.zeros((len(df), max(v.size for v in vectors)))
    keys = (df["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in df.columns
            else np.ones(len(df), dtype=np.int64))
    for (_, row), v in zip(groups, vectors):
        coeffs[keys == int(row.get("rlnOpticsGroup", 1)), :v.size] = v
    return coeffs


def optics_terms(df, ctf=True):
    """The optics-group terms the engine applies, per particle: ``'even_zernike'``
    ``(n, L)`` (symmetric aberration, a :func:`ctf_values` argument) and
    ``'odd_zernike'`` ``(n, L)`` (antisymmetric aberration and beam tilt, a phase:
    :func:`antisymmetric_phase`), each only when some group's is nonzero.  Terms the
    engine cannot apply (CTF-premultiplied images with ``ctf``, anisotropic
    magnification) raise a one-line :class:`CryoClassError` naming the optics group and
    the field.  ``ctf=False`` is for runs without CTF correction, where RELION still
    demodulates the antisymmetric aberration and applies the magnification."""
    groups = _group_rows(df)
    problems = [p for where, row in groups for p in _refusals(where, row, ctf)]
    if problems:
        raise CryoClassError(problems[0] + (f" (and {len(problems) - 1} more optics-group "
                                            "terms)" if len(problems) > 1 else ""))
    out = {}
    even = _per_particle(df, groups, [zernike_vector(row.get("rlnEvenZernike"), where,
                                                     "rlnEvenZernike")
                                      for where, row in groups])
    if even is not None:
        out["even_zernike"] = even
    odd = _per_particle(df, groups, [_odd_terms(where, row) for where, row in groups])
    if odd is not None:
        out["odd_zernike"] = odd
    return out


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
    per = {name: np.asarray(values)[sel][:, None]
           for name, values in ctf_arguments(params).items()}
    ctf = ctf_values(kx.reshape(1, -1), ky.reshape(1, -1), **per, **options)
    return ctf.reshape(-1, box, box).astype(xp.float32)
