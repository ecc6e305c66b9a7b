"""Optics groups through Scipion: a RELION 3.1 STAR file with several optics groups and
aberration columns, imported with ProtCryoClassImportParticles, written back for the
engine, classified with ProtCryoClassClassify3D, and written out again, keeps each
particle's optics group (number, name, pixel size, voltage, Cs, Q0, aberrations,
magnification, premultiplied flag) and its rlnCtfBfactor / rlnCtfScalefactor, field by
field.  The engine's refusals of the terms it does not apply are checked here too.

The multi-optics file is built from ``cryoclass simulate`` output (one optics group),
split into three groups with different microscopes and CtfRefine-style columns.
"""
import os

import numpy as np
import pandas as pd
import pytest

from cryoclass_plugin.scipion_env import create_project, launch, setup_for_tests

ENV = setup_for_tests()

from cryoclass_plugin import convert  # noqa: E402
from cryoclass_plugin.engine import star_io  # noqa: E402
from cryoclass_plugin.engine.errors import CryoClassError  # noqa: E402
from cryoclass_plugin.protocols import (ProtCryoClassClassify3D,  # noqa: E402
                                        ProtCryoClassImportParticles)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, BOX, APIX = 36, 32, 6.0
OPTICS_FIELDS = ["rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration",
                 "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnMicrographOriginalPixelSize",
                 "rlnImageSize", "rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike",
                 "rlnEvenZernike", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
                 "rlnCtfDataAreCtfPremultiplied"]
PARTICLE_FIELDS = ["rlnOpticsGroup", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnDefocusU",
                   "rlnDefocusV", "rlnDefocusAngle"]


def _optics(aberrations):
    """Three groups: plain; another microscope with a symmetric aberration; a third with
    CtfRefine's beam tilt and odd Zernike terms (all applied by the engine), and, when
    ``aberrations``, an anisotropic magnification (refused by the engine)."""
    base = star_io.optics_group_table(APIX, BOX, n_groups=3)
    base["rlnOpticsGroupName"] = ["opticsGroup1", "krios200kV", "tilted_grid"]
    base["rlnMicrographOriginalPixelSize"] = [APIX / 2, APIX / 2, APIX / 3]
    base["rlnVoltage"] = [300.0, 200.0, 300.0]
    base["rlnSphericalAberration"] = [2.7, 2.0, 4.1]
    base["rlnAmplitudeContrast"] = [0.1, 0.07, 0.15]
    base["rlnBeamTiltX"] = [0.0, 0.0, 0.35]
    base["rlnBeamTiltY"] = [0.0, 0.0, -0.21]
    base["rlnOddZernike"] = ["[0,0,0,0,0,0]", "[0,0,0,0,0,0]", "[0.47,0.41,3440,0,0,1080]"]
    base["rlnEvenZernike"] = ["[0,0,0,0,0,0,0,0,0]", "[0,0,0,46.1,61.3,71.7,-58.9,-20.4,21.2]",
                              "[0,0,0,0,0,0,0,0,0]"]
    base["rlnMagMat00"] = [1.0, 1.0, 1.007178 if aberrations else 1.0]
    base["rlnMagMat01"] = [0.0, 0.0, 0.00768 if aberrations else 0.0]
    base["rlnMagMat10"] = [0.0, 0.0, 0.007699 if aberrations else 0.0]
    base["rlnMagMat11"] = [1.0, 1.0, 0.993671 if aberrations else 1.0]
    base["rlnCtfDataAreCtfPremultiplied"] = 0
    return base


def _multi_optics_star(sim, path, aberrations):
    blocks = star_io.read_star(sim["particles_star"])
    parts = blocks["particles"].copy()
    rng = np.random.default_rng(2)
    parts["rlnOpticsGroup"] = np.arange(len(parts)) % 3 + 1
    parts["rlnCtfBfactor"] = np.round(rng.uniform(0.0, 80.0, len(parts)), 3)
    parts["rlnCtfScalefactor"] = np.round(rng.uniform(0.8, 1.1, len(parts)), 4)
    parts["rlnImageName"] = [f"{i + 1:06d}@{os.path.abspath(sim['particles_mrcs'])}"
                             for i in range(len(parts))]
    parts["rlnImageId"] = np.arange(1, len(parts) + 1)
    star_io.write_particles(str(path), _optics(aberrations), parts)
    return str(path)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from cryoclass_plugin.engine import simulate
    out = tmp_path_factory.mktemp("optics_sim")
    res = simulate.simulate_dataset(str(out), n=N, box=BOX, apix=APIX, snr=0.5, n_classes=2,
                                    seed=7)
    res["dir"] = str(out)
    res["applied"] = _multi_optics_star(res, out / "optics_applied.star", False)
    res["refused"] = _multi_optics_star(res, out / "optics_refused.star", True)
    return res


@pytest.fixture(scope="module")
def project():
    return create_project("TestCryoClassOptics")


def _import(project, star):
    return launch(project, project.newProtocol(ProtCryoClassImportParticles, starFile=star,
                                               importAlignment=False)).outputParticles


def _merged(star):
    """Per-particle rows (optics merged on) keyed by rlnImageId."""
    table = star_io.read_particles(star, check_stacks=False)
    return table.df.set_index("rlnImageId").sort_index(), table.optics


def _assert_same(star_in, star_out, ids=None):
    """The optics tables and every particle's optics and CTF fields are identical."""
    df_in, optics_in = _merged(star_in)
    df_out, optics_out = _merged(star_out)
    ids = df_in.index if ids is None else ids
    assert sorted(df_out.index) == sorted(ids)
    key_in = optics_in.set_index("rlnOpticsGroupName")
    key_out = optics_out.set_index("rlnOpticsGroupName")
    assert set(key_out.index) <= set(key_in.index)
    for name in key_out.index:
        for field in OPTICS_FIELDS[1:]:
            a, b = key_in.loc[name, field], key_out.loc[name, field]
            assert (a == b) if isinstance(a, str) else a == pytest.approx(b, abs=1e-6), \
                (name, field, a, b)
    for field in PARTICLE_FIELDS + OPTICS_FIELDS:
        a, b = df_in.loc[ids, field].to_numpy(), df_out.loc[ids, field].to_numpy()
        if a.dtype == object:
            assert list(a) == list(b), field
        elif field == "rlnDefocusAngle":
            # Scipion's CTFModel.standardize() keeps the angle modulo 180 degrees (the
            # same astigmatism)
            np.testing.assert_allclose(np.mod(b - a + 90.0, 180.0) - 90.0, 0.0, atol=1e-6)
        else:
            np.testing.assert_allclose(b.astype(float), a.astype(float), atol=1e-6,
                                       err_msg=field)


def test_import_keeps_groups_on_particles_and_acquisition(project, sim):
    parts = _import(project, sim["refused"])
    df, optics = _merged(sim["refused"])
    text = parts.getAcquisition().opticsGroupInfo.get()
    back = convert.optics_from_text(text)
    assert list(back["rlnOpticsGroupName"]) == list(optics["rlnOpticsGroupName"])
    assert list(back["rlnOddZernike"]) == list(optics["rlnOddZernike"])
    for part in parts.iterItems(orderBy="id"):
        row = df.loc[int(part.getObjId())]
        assert part._rlnOpticsGroup.get() == row["rlnOpticsGroup"]
        assert part._rlnCtfBfactor.get() == pytest.approx(row["rlnCtfBfactor"])
        assert part._rlnCtfScalefactor.get() == pytest.approx(row["rlnCtfScalefactor"])
        acq = part.getAcquisition()
        assert acq.getVoltage() == pytest.approx(row["rlnVoltage"])
        assert acq.getSphericalAberration() == pytest.approx(row["rlnSphericalAberration"])
        assert acq.getAmplitudeContrast() == pytest.approx(row["rlnAmplitudeContrast"])


@pytest.mark.slow
def test_import_then_write_keeps_every_optics_field(project, sim, tmp_path):
    parts = _import(project, sim["refused"])
    out = tmp_path / "written.star"
    assert convert.write_set_of_particles(parts, str(out)) == N
    _assert_same(sim["refused"], str(out))


def test_engine_refuses_terms_it_does_not_apply_in_one_line(sim):
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(sim["refused"], require_ctf=True)
    text = str(err.value)
    assert "\n" not in text and "optics_refused.star" in text
    assert "optics group 3 (tilted_grid): rlnMagMat00" in text
    # without CTF correction the terms do not matter and the file is read
    assert len(star_io.read_particles(sim["refused"], require_ctf=False)) == N
    # the applied set (symmetric and antisymmetric aberrations) is accepted with the CTF
    assert len(star_io.read_particles(sim["applied"], require_ctf=True)) == N


@pytest.mark.slow
def test_classification_round_trip_keeps_every_optics_field(project, sim, tmp_path):
    from pwem.protocols import ProtImportVolumes
    parts = _import(project, sim["applied"])
    ref = launch(project, project.newProtocol(ProtImportVolumes, filesPath=sim["ref"],
                                              samplingRate=APIX)).outputVolume
    prot = project.newProtocol(
        ProtCryoClassClassify3D, numberOfClasses=2, numberOfIterations=2, initialClasses=0,
        maskDiameterA=180, initialLowPassFilterA=30, angularSamplingDeg=2,
        offsetSearchRangePix=3, randomSeed=3)
    prot.inputParticles.set(parts)
    prot.referenceVolume.set(ref)
    prot = launch(project, prot)
    # the engine's own data.star carries the input's optics table unchanged
    data_star = prot._getFileName("data", iter=2)
    _assert_same(sim["applied"], data_star)
    # the Scipion output particles, written back out, equal the input field by field
    ids, written = [], []
    for k, cls in enumerate(prot.outputClasses):
        fn = str(tmp_path / f"class{k}.star")
        convert.write_set_of_particles(cls, fn)
        table = star_io.read_star(fn)
        ids += list(table["particles"]["rlnImageId"].astype(int))
        written.append(table)
    assert sorted(ids) == list(range(1, N + 1))
    merged = pd.concat([t["particles"] for t in written])
    optics = written[0]["optics"]
    out = tmp_path / "all_classes.star"
    star_io.write_particles(str(out), optics, merged)
    _assert_same(sim["applied"], str(out))


def _direct_ctf(kx, ky, row, coeffs):
    """RELION's CTF with the symmetric aberration, written out term by term for one
    particle: gamma + sum_i c_i Z_i (Zernike index order i = 3..8: (m, n) = (2, 2),
    (-4, 4), (-2, 4), (0, 4), (2, 4), (4, 4))."""
    volts = row["rlnVoltage"] * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + volts * 0.978466e-6))
    k2 = kx * kx + ky * ky
    phi = np.arctan2(ky, kx)
    du, dv, ang = row["rlnDefocusU"], row["rlnDefocusV"], np.deg2rad(row["rlnDefocusAngle"])
    defocus = (du + dv) / 2 + (du - dv) / 2 * np.cos(2 * (phi - ang))
    q0 = row["rlnAmplitudeContrast"]
    gamma = (-np.pi * lam * defocus * k2 + np.pi / 2 * row["rlnSphericalAberration"] * 1e7
             * lam ** 3 * k2 * k2 - np.arctan(q0 / np.sqrt(1 - q0 * q0)))
    r2 = k2
    zernike = [r2 * np.cos(2 * phi), r2 ** 2 * np.sin(4 * phi),
               (4 * r2 ** 2 - 3 * r2) * np.sin(2 * phi), 6 * r2 ** 2 - 6 * r2 + 1,
               (4 * r2 ** 2 - 3 * r2) * np.cos(2 * phi), r2 ** 2 * np.cos(4 * phi)]
    gamma = gamma + sum(c * z for c, z in zip(coeffs[3:], zernike))
    return (row["rlnCtfScalefactor"] * np.exp(-row["rlnCtfBfactor"] * k2 / 4)
            * -np.sin(gamma))


def test_engine_block_ctf_applies_each_groups_terms(sim):
    """The E-step's CTF (particles._block_ctf) of particles of each optics group equals
    the direct formula with that group's microscope, symmetric aberration and the
    particle's B-factor and scale factor."""
    from types import SimpleNamespace
    from cryoclass_plugin.engine.ctf import ctf_params, zernike_vector
    from cryoclass_plugin.engine.particles import Pixels, _block_ctf
    table = star_io.read_particles(sim["applied"], require_ctf=True)
    data = SimpleNamespace(ctfp=ctf_params(table.df))
    assert data.ctfp["even_zernike"].shape == (N, 9)
    settings = SimpleNamespace(ctf=True, ctf_phase_flipped=False, ctf_intact_first_peak=False,
                               scale=False)
    model = SimpleNamespace(box=BOX, apix=APIX)
    pixels = Pixels.within(BOX, BOX // 2, np)
    indices = np.array([0, 1, 2, 4])  # optics groups 1, 2, 3, 2
    got = _block_ctf(settings, model, data, indices, pixels, None, np)
    kx = pixels.kx.astype(np.float64) / (BOX * APIX)
    ky = pixels.ky.astype(np.float64) / (BOX * APIX)
    for j, i in enumerate(indices):
        row = table.df.iloc[i]
        coeffs = zernike_vector(row["rlnEvenZernike"], "", "")
        np.testing.assert_allclose(got[j], _direct_ctf(kx, ky, row, coeffs), atol=2e-5)
    # the aberration matters: group 2's CTF is not the one without it
    plain = _direct_ctf(kx, ky, table.df.iloc[1], np.zeros(9))
    assert np.max(np.abs(got[1] - plain)) > 0.5


def test_engine_removes_each_groups_antisymmetric_phase_from_the_images(sim):
    """prepare_block's demodulation (particles._demodulate_aberration) multiplies each
    image's transform by exp(-i phi), phi its group's odd Zernike terms plus the beam
    tilt (-2 pi Cs lambda^2 |k|^2 k.tau), written out here term by term."""
    from types import SimpleNamespace
    from cryoclass_plugin.engine.ctf import ctf_params, electron_wavelength
    from cryoclass_plugin.engine.particles import Pixels, _demodulate_aberration
    table = star_io.read_particles(sim["applied"], require_ctf=True)
    data = SimpleNamespace(ctfp=ctf_params(table.df))
    model = SimpleNamespace(box=BOX, apix=APIX)
    pixels = Pixels.within(BOX, BOX // 2, np)
    indices = np.array([0, 1, 2, 5])  # optics groups 1, 2, 3, 3
    rng = np.random.default_rng(8)
    f = (rng.normal(size=(4, pixels.kx_all.size))
         + 1j * rng.normal(size=(4, pixels.kx_all.size))).astype(np.complex64)
    got = _demodulate_aberration(model, data, indices, pixels, f, np)
    kx = pixels.kx_all / (BOX * APIX)
    ky = pixels.ky_all / (BOX * APIX)
    r, p = np.hypot(kx, ky), np.arctan2(ky, kx)
    c = [0.47, 0.41, 3440, 0, 0, 1080]
    zernike = c[0] * r * np.sin(p) + c[1] * r * np.cos(p) + c[2] * r ** 3 * np.sin(3 * p) \
        + c[5] * r ** 3 * np.cos(3 * p)
    lam = electron_wavelength(300.0)
    tilt = -2 * np.pi * 4.1e7 * lam ** 2 * r ** 2 * (kx * 0.35 - ky * 0.21) * 1e-3
    phi = zernike + tilt
    np.testing.assert_allclose(got[:2], f[:2], atol=0)  # groups 1 and 2: no odd terms
    for j in (2, 3):
        np.testing.assert_allclose(got[j], f[j] * np.exp(-1j * phi), rtol=2e-5, atol=2e-5)
    assert np.max(np.abs(phi)) > 1.0  # the phase is not negligible


def test_import_summary_names_the_optics_groups(project, sim):
    prot = launch(project, project.newProtocol(ProtCryoClassImportParticles,
                                               starFile=sim["applied"]))
    text = " ".join(prot._summary())
    assert "3 optics group(s): opticsGroup1, krios200kV, tilted_grid" in text


def test_optics_text_round_trip_and_bad_text():
    optics = _optics(True)
    back = convert.optics_from_text(convert.optics_to_text(optics))
    for col in optics.columns:
        assert list(back[col]) == list(optics[col]), col
    assert convert.optics_from_text("") is None
    assert convert.optics_from_text("free text from another plugin") is None
    with pytest.raises(ValueError, match="opticsGroupInfo"):
        convert.optics_from_text("data_optics\nloop_\n_rlnOpticsGroup #1\n1 2 3\n\"")
