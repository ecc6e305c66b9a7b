"""The simulator: files and columns, truth consistency (images are the CTF-weighted
projections of the true maps shifted by minus the origin), SNR definition, oracle
accuracy, determinism."""
import json
import math
import os

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from cryoclass_plugin import cli
from cryoclass_plugin.engine import simulate as sim
from cryoclass_plugin.engine import star_io
from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.mrc_io import ImageSource, read_map


def read_stack(path):
    with mrcfile.open(path) as mrc:
        return np.array(mrc.data, dtype=np.float64)


def relion_ctf(box, apix, du, dv, angle_deg, kv=300.0, cs=2.7, q0=0.1):
    """Centred CTF image written out independently of the engine (RELION's formula)."""
    k = (np.arange(box) - box // 2) / (box * apix)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    volts = kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1 + volts * 0.978466e-6))
    defocus = (du + dv) / 2 + (du - dv) / 2 * np.cos(2 * (np.arctan2(ky, kx)
                                                         - math.radians(angle_deg)))
    k2 = kx ** 2 + ky ** 2
    gamma = (-math.pi * lam * defocus * k2 + math.pi / 2 * cs * 1e7 * lam ** 3 * k2 ** 2
             - math.atan(q0 / math.sqrt(1 - q0 ** 2)))
    return -np.sin(gamma)


def shift_by_minus_origin(img, ox, oy):
    """Shift an image by (-ox, -oy) pixels with numpy's plain (uncentred) FFT."""
    n = img.shape[0]
    f = np.fft.fftfreq(n)
    phase = np.exp(2j * np.pi * (f[None, :] * ox + f[:, None] * oy))
    return np.fft.ifft2(np.fft.fft2(img) * phase).real


def apply_ctf(img, ctf_centred):
    return np.fft.ifft2(np.fft.fft2(img) * np.fft.ifftshift(ctf_centred)).real


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    rc = cli.main(["simulate", str(out), "--n", "60", "--box", "32", "--apix", "5",
                   "--snr", "0.1", "--classes", "3", "--seed", "4"])
    assert rc == 0
    return out


def test_files_and_columns(small_set):
    out = small_set
    for name in ("particles.star", "particles.mrcs", "ref.mrc", "true_class001.mrc",
                 "true_class002.mrc", "true_class003.mrc", "truth.star", "truth_summary.json"):
        assert os.path.isfile(out / name), name
    assert not (out / "true_class004.mrc").exists()
    blocks = star_io.read_star(out / "particles.star")
    optics, parts = blocks["optics"], blocks["particles"]
    for col in ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
                "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImageDimensionality"):
        assert col in optics.columns
    assert optics["rlnImageSize"].iloc[0] == 32 and optics["rlnImagePixelSize"].iloc[0] == 5
    assert optics["rlnImageDimensionality"].iloc[0] == 2
    assert set(parts.columns) == {"rlnImageName", "rlnMicrographName", "rlnDefocusU",
                                  "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup"}
    assert parts["rlnMicrographName"].nunique() == 10
    assert parts["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    assert parts["rlnDefocusU"].between(10000, 30300).all()
    assert ((parts["rlnDefocusU"] - parts["rlnDefocusV"]).between(0, 600)).all()
    truth = star_io.read_star(out / "truth.star")["particles"]
    for col in ("rlnImageName", "rlnClassNumber", "rlnAngleRot", "rlnAngleTilt",
                "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert col in truth.columns
    assert list(truth["rlnImageName"]) == list(parts["rlnImageName"])
    assert sorted(np.bincount(truth["rlnClassNumber"])[1:]) == [20, 20, 20]
    assert (truth["rlnOriginXAngst"].abs() <= 3 * 5 + 1e-6).all()
    assert truth["rlnAngleTilt"].between(0, 180).all()
    summary = json.loads((out / "truth_summary.json").read_text())
    for key in ("oracle_accuracy", "oracle_accuracy_25A", "snr", "n", "classes", "seed",
                "class_sizes"):
        assert key in summary
    assert summary["n"] == 60 and summary["classes"] == 3 and summary["seed"] == 4
    assert summary["class_sizes"] == [20, 20, 20] and summary["snr"] == 0.1
    # the engine reads the set and its images
    table = star_io.read_particles(out / "particles.star", require_ctf=True)
    assert table.box == 32 and table.apix == 5.0 and len(table) == 60
    with ImageSource(table) as src:
        imgs = src.get(np.arange(60))
    np.testing.assert_array_equal(imgs, read_stack(out / "particles.mrcs").astype(np.float32))
    # particles look RELION-normalised: noise sigma 1 dominates
    assert 0.9 < imgs.std() < 1.2 and abs(imgs.mean()) < 0.1
    ref, apix = read_map(out / "ref.mrc")
    assert ref.shape == (32, 32, 32) and apix == pytest.approx(5.0)


def test_ref_is_lowpassed_weighted_mean_on_image_greyscale(small_set):
    out = small_set
    maps = [read_map(out / f"true_class{c:03d}.mrc")[0].astype(np.float64) for c in (1, 2, 3)]
    ref = read_map(out / "ref.mrc")[0]
    # low-pass keeps the DC term: the ref's total equals the mean of the maps' totals
    assert ref.sum() == pytest.approx(np.mean([m.sum() for m in maps]), rel=1e-4)
    # and has (almost) no power beyond 30 A (shell 32 * 5 / 30 = 5.3)
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(ref)))
    k = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.arange(32) - 16] * 3, indexing="ij")))
    assert (np.abs(f[k > 8]) ** 2).sum() < 1e-6 * (np.abs(f) ** 2).sum()
    # maps differ: class 2 lacks a domain (less mass), class 3 has the same mass moved
    assert maps[1].sum() < 0.95 * maps[0].sum()
    assert maps[2].sum() == pytest.approx(maps[0].sum(), rel=1e-3)
    assert np.abs(maps[2] - maps[0]).max() > 0.2 * maps[0].max()


def test_map_sum_equals_projection_exactly():
    """sum_z map == projection at the identity pose, and a 90-degree tilt projects along
    the map's x axis with image x = -map z (image(x, y) = sum_z V(A^T (x, y, z)))."""
    box, apix = 32, 4.0
    domains, R = sim.phantom_domains(box, apix, seed=1)
    pts, w = sim.class_atoms(domains, R, sim.class_variants(1)[0])
    vol = sim.atoms_to_map(pts, w, box, apix, sigma_a=2.4).astype(np.float64)
    eulers = np.array([[0.0, 0.0, 0.0], [0.0, 90.0, 0.0]])
    A = euler_to_matrix(*eulers.T)
    f = sim.project_atoms_ft(pts, w, A, box, apix, sigma_a=2.4)
    imgs = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(f, axes=(1, 2))), axes=(1, 2)).real
    np.testing.assert_allclose(imgs[0], vol.sum(axis=0), atol=1e-5 * np.abs(imgs[0]).max())
    # A(0, 90, 0) = [[0,0,-1],[0,1,0],[1,0,0]]: A^T (x, y, z) = (z, y, -x)
    c = box // 2
    want = np.empty((box, box))
    for ix in range(box):
        want[:, ix] = vol[(2 * c - ix) % box, :, :].sum(axis=1)
    np.testing.assert_allclose(imgs[1], want, atol=1e-5 * np.abs(want).max())


def test_truth_consistency_noise_free(tmp_path):
    """Each noise-free image = CTF * (projection of its true map) shifted by -origin,
    recomputed with an independent code path (numpy FFT, CTF formula written here)."""
    box, apix, n = 32, 4.0, 9
    # lattice-aligned views (exact projections) plus three random ones (interpolated)
    exact = np.array([[0, 0, 0], [0, 90, 0], [90, 0, 0], [0, 0, 0], [0, 90, 0], [90, 0, 0]])
    rng = np.random.default_rng(5)
    random = np.stack([rng.uniform(-180, 180, 3), rng.uniform(20, 160, 3),
                       rng.uniform(-180, 180, 3)], axis=1)
    origins = rng.uniform(-3, 3, size=(n, 2))
    res = sim.simulate_dataset(tmp_path, n=n, box=box, apix=apix, snr=float("inf"),
                               n_classes=3, seed=2, poses=np.concatenate([exact, random]),
                               origins_px=origins)
    imgs = read_stack(res["particles_mrcs"])
    assert np.mean(imgs.reshape(n, -1).var(axis=1)) == pytest.approx(1.0, rel=1e-5)
    truth = star_io.read_star(tmp_path / "truth.star")["particles"]
    maps = {c: read_map(tmp_path / f"true_class{c:03d}.mrc")[0].astype(np.float64)
            for c in (1, 2, 3)}
    c = box // 2
    g = np.arange(box) - c
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    grid = np.stack([xx.ravel(), yy.ravel(), zz.ravel()])      # (x, y, z) image frame
    for i, row in truth.iterrows():
        vol = maps[int(row["rlnClassNumber"])]
        A = euler_to_matrix(row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"])
        r = A.T @ grid                                        # map coordinates (x, y, z)
        proj = map_coordinates(vol, [r[2] + c, r[1] + c, r[0] + c], order=1, mode="grid-wrap",
                               prefilter=False).reshape(box, box, box).sum(axis=0)
        ctf = relion_ctf(box, apix, row["rlnDefocusU"], row["rlnDefocusV"],
                         row["rlnDefocusAngle"])
        ox, oy = row["rlnOriginXAngst"] / apix, row["rlnOriginYAngst"] / apix
        assert np.hypot(ox, oy) > 0.3  # a shift is really tested
        want = shift_by_minus_origin(apply_ctf(proj, ctf), ox, oy)
        got = imgs[i]
        if i < len(exact):
            np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
        else:  # trilinear interpolation blurs a little
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
        wrong = shift_by_minus_origin(apply_ctf(proj, ctf), -ox, -oy)  # RELION sign matters
        assert np.abs(got - wrong).max() > 0.1 * np.abs(got).max()


def test_snr_definition_and_noise(tmp_path):
    """image = sqrt(snr) * (noise-free image at unit signal variance) + N(0, 1) noise."""
    kw = dict(n=40, box=32, apix=5.0, n_classes=2, seed=11)
    clean = read_stack(sim.simulate_dataset(tmp_path / "clean", snr=float("inf"), **kw)
                       ["particles_mrcs"])
    noisy = read_stack(sim.simulate_dataset(tmp_path / "noisy", snr=0.5, **kw)
                       ["particles_mrcs"])
    signal = math.sqrt(0.5) * clean
    noise = noisy - signal
    assert np.mean(signal.reshape(40, -1).var(axis=1)) == pytest.approx(0.5, rel=1e-4)
    assert noise.std() == pytest.approx(1.0, abs=0.02) and abs(noise.mean()) < 0.02
    assert abs(np.corrcoef(noise.ravel(), signal.ravel())[0, 1]) < 0.03
    # white: no spatial correlation between neighbouring pixels
    assert abs(np.corrcoef(noise[:, :, 1:].ravel(), noise[:, :, :-1].ravel())[0, 1]) < 0.03


def test_oracle_accuracy_and_its_bookkeeping(tmp_path):
    res = sim.simulate_dataset(tmp_path, n=300, box=48, apix=4.0, snr=0.1, n_classes=3, seed=0)
    assert res["oracle_accuracy"] >= 0.98
    assert res["oracle_accuracy_25A"] >= 0.97
    # Recompute the oracle by brute force from the written images.
    imgs = read_stack(res["particles_mrcs"])
    truth = star_io.read_star(tmp_path / "truth.star")["particles"]
    box, apix = 48, 4.0
    domains, R = sim.phantom_domains(box, apix, seed=0)
    atoms = [sim.class_atoms(domains, R, v) for v in sim.class_variants(3)]
    A = euler_to_matrix(truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"])
    origins = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / apix
    sigma = max(2.0, 0.6 * apix)
    residuals = np.zeros((300, 3))
    for c, (p, w) in enumerate(atoms):
        f = sim.project_atoms_ft(p, w, A, box, apix, sigma) * sim.shift_phase(box, origins)
        for i in range(300):
            ctf = relion_ctf(box, apix, truth["rlnDefocusU"][i], truth["rlnDefocusV"][i],
                             truth["rlnDefocusAngle"][i])
            model = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(f[i] * ctf))).real
            residuals[i, c] = ((imgs[i] - res["signal_scale"] * model) ** 2).sum()
    brute = np.mean(residuals.argmin(axis=1) == truth["rlnClassNumber"].to_numpy() - 1)
    assert abs(brute - res["oracle_accuracy"]) <= 1 / 300 + 1e-12


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(n=20, box=32, apix=5.0, snr=0.05, n_classes=2)
    a = sim.simulate_dataset(tmp_path / "a", seed=3, **kw)
    b = sim.simulate_dataset(tmp_path / "b", seed=3, **kw)
    c = sim.simulate_dataset(tmp_path / "c", seed=4, **kw)
    assert np.array_equal(read_stack(a["particles_mrcs"]), read_stack(b["particles_mrcs"]))
    assert (tmp_path / "a" / "truth.star").read_text() == (tmp_path / "b" / "truth.star").read_text()
    assert a["oracle_accuracy"] == b["oracle_accuracy"]
    assert not np.array_equal(read_stack(a["particles_mrcs"]), read_stack(c["particles_mrcs"]))


def test_class_fractions_more_classes_and_errors(tmp_path):
    res = sim.simulate_dataset(tmp_path / "f", n=50, box=32, apix=5.0, snr=1.0, n_classes=5,
                               seed=1, class_fractions=[0.5, 0.2, 0.1, 0.1, 0.1])
    assert res["class_sizes"] == [25, 10, 5, 5, 5] and len(res["true_maps"]) == 5
    maps = [read_map(p)[0] for p in res["true_maps"]]
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(maps[i] - maps[j]).max() > 0.05 * maps[0].max(), (i, j)
    variants = sim.class_variants(9)
    assert len({repr(v) for v in variants}) == 9  # every class is different
    with pytest.raises(CryoClassError):
        sim.simulate_dataset(tmp_path / "g", n=10, box=32, n_classes=2, class_fractions=[1.0])
    with pytest.raises(CryoClassError):
        sim.simulate_dataset(tmp_path / "h", n=10, box=33)


def test_phantom_shape():
    box, apix = 64, 4.0
    domains, R = sim.phantom_domains(box, apix, seed=0)
    full, _ = sim.class_atoms(domains, R, sim.class_variants(1)[0])
    extent = (full.max(axis=0) - full.min(axis=0)).max() / (box * apix)
    assert 0.6 < extent < 0.7                               # diameter ~0.6-0.7 of the box
    for variant in sim.class_variants(6):
        pts, _ = sim.class_atoms(domains, R, variant)
        extent = (pts.max(axis=0) - pts.min(axis=0)).max() / (box * apix)
        assert 0.45 < extent < 0.75
        assert np.linalg.norm(pts, axis=1).max() / apix < 0.42 * box   # room for shifts
    # asymmetric: the centre of mass is off-centre and the inertia tensor anisotropic
    inertia = np.linalg.eigvalsh(np.cov((full - full.mean(axis=0)).T))
    assert inertia.max() > 1.5 * inertia.min()
    # pseudo-residues ~3.8 A apart on average (nearest neighbour), protein-like
    from scipy.spatial import cKDTree
    d, _ = cKDTree(full).query(full, k=2)
    assert 2.0 < np.median(d[:, 1]) < 4.5


@pytest.mark.skipif(__import__("shutil").which("relion_project") is None,
                    reason="RELION not installed")
def test_images_match_relion_project(tmp_path):
    """RELION's own projector, reading our truth.star (angles, origins, CTF), reproduces
    the noise-free images: conventions and greyscale agree with RELION."""
    import subprocess
    sim.simulate_dataset(tmp_path, n=8, box=32, apix=5.0, snr=float("inf"), n_classes=1,
                         seed=6)
    subprocess.run(["relion_project", "--i", "true_class001.mrc", "--o", "rproj",
                    "--ang", "truth.star", "--ctf"], cwd=tmp_path, check=True,
                   capture_output=True)
    ours = read_stack(tmp_path / "particles.mrcs")
    relion = read_stack(tmp_path / "rproj.mrcs")
    for a, b in zip(ours, relion):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
        assert (a * b).sum() / (b * b).sum() == pytest.approx(1.0, abs=0.02)
