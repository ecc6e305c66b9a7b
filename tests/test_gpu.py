"""The CuPy path: the same code as on the CPU, run with cupy arrays.  Skipped where
CuPy or a CUDA device is missing (CI); run on a GPU machine with
``python -m pytest tests/test_gpu.py``."""
import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception:  # CUDA driver missing
    pytest.skip("no CUDA device", allow_module_level=True)

import starfile  # noqa: E402

from cryoclass_plugin import cli  # noqa: E402
from cryoclass_plugin.engine import estep, projector  # noqa: E402
from cryoclass_plugin.engine.fourier import half_plane_pixels  # noqa: E402
from cryoclass_plugin.engine.geometry import euler_to_matrix  # noqa: E402
from cryoclass_plugin.engine.metrics import adjusted_rand_index  # noqa: E402
from cryoclass_plugin.engine.mrc_io import read_map  # noqa: E402
from cryoclass_plugin.engine.simulate import simulate_dataset  # noqa: E402


def test_projector_and_backprojector_match_cpu():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((32, 32, 32)).astype(np.float32)
    ky, kx = half_plane_pixels(32, 15)
    R = euler_to_matrix(rng.uniform(0, 360, 50), rng.uniform(0, 180, 50), rng.uniform(0, 360, 50))
    cpu = projector.Projector(vol, pad=2).project(R, ky, kx)
    gpu = projector.Projector(cupy.asarray(vol), pad=2).project(cupy.asarray(R), cupy.asarray(ky),
                                                                cupy.asarray(kx)).get()
    assert np.abs(cpu - gpu).max() < 1e-3 * np.abs(cpu).max()
    bc, bg = projector.BackProjector(32, 2), projector.BackProjector(32, 2, cupy)
    w = np.ones(cpu.shape, np.float32)
    bc.insert(R, ky, kx, cpu, w)
    bg.insert(cupy.asarray(R), cupy.asarray(ky), cupy.asarray(kx), cupy.asarray(cpu), cupy.asarray(w))
    rc, rg = bc.reconstruct(), bg.reconstruct().get()
    assert np.abs(rc - rg).max() < 1e-3 * np.abs(rc).max()


def test_significant_samples_match_cpu():
    rng = np.random.default_rng(1)
    logp = (rng.standard_normal((4, 5000)) * 5).astype(np.float32)
    a, pa = estep.significant_samples(logp)
    b, pb = estep.significant_samples(cupy.asarray(logp))
    for x, y in zip(a, b):
        assert sorted(x.tolist()) == sorted(np.asarray(y).tolist())


def test_gpu_refine_matches_cpu(tmp_path):
    simulate_dataset(str(tmp_path), n=200, box=32, apix=7.0, snr=0.5, n_classes=2, seed=1)
    common = ["--i", str(tmp_path / "particles.star"), "--ref", str(tmp_path / "ref.mrc"),
              "--K", "2", "--iter", "3", "--tau2_fudge", "4", "--ini_high", "40",
              "--particle_diameter", "200", "--zero_mask", "--flatten_solvent", "--ctf",
              "--healpix_order", "1", "--offset_range", "3", "--offset_step", "2"]
    assert cli.main(["refine", "--o", str(tmp_path / "cpu" / "run")] + common) == 0
    assert cli.main(["refine", "--o", str(tmp_path / "gpu" / "run"), "--gpu", "0"] + common) == 0
    a = starfile.read(tmp_path / "cpu" / "run_it003_data.star")["particles"]
    b = starfile.read(tmp_path / "gpu" / "run_it003_data.star")["particles"]
    agree = adjusted_rand_index(a["rlnClassNumber"].to_numpy(), b["rlnClassNumber"].to_numpy())
    assert agree > 0.9
    for k in (1, 2):
        va, _ = read_map(tmp_path / "cpu" / f"run_it003_class{k:03d}.mrc")
        vb, _ = read_map(tmp_path / "gpu" / f"run_it003_class{k:03d}.mrc")
        assert np.corrcoef(va.ravel(), vb.ravel())[0, 1] > 0.99


def test_gpu_local_searches_match_cpu(tmp_path):
    """The recommended path (consensus + PCA, fixed poses, local searches on a finer
    grid) on the GPU against the CPU."""
    simulate_dataset(str(tmp_path), n=200, box=32, apix=7.0, snr=0.5, n_classes=2, seed=1)
    common = ["--i", str(tmp_path / "particles.star"), "--ref", str(tmp_path / "ref.mrc"),
              "--K", "2", "--iter", "9", "--tau2_fudge", "4", "--ini_high", "40",
              "--particle_diameter", "200", "--zero_mask", "--flatten_solvent", "--ctf",
              "--healpix_order", "1", "--offset_range", "3", "--offset_step", "2",
              "--firstiter_cc", "--init_classes", "pca", "--consensus_iter", "4",
              "--classify_fixed_iter", "2"]
    assert cli.main(["refine", "--o", str(tmp_path / "cpu" / "run")] + common) == 0
    assert cli.main(["refine", "--o", str(tmp_path / "gpu" / "run"), "--gpu", "0"] + common) == 0
    for it in (4, 9):           # the last consensus iteration and the last (both local)
        a = starfile.read(tmp_path / "cpu" / f"run_it{it:03d}_data.star")["particles"]
        b = starfile.read(tmp_path / "gpu" / f"run_it{it:03d}_data.star")["particles"]
        agree = adjusted_rand_index(a["rlnClassNumber"].to_numpy(), b["rlnClassNumber"].to_numpy())
        assert it == 4 or agree > 0.9
        A = euler_to_matrix(*a[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
        B = euler_to_matrix(*b[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
        cos = np.clip(((A * B).sum(axis=(1, 2)) - 1) / 2, -1, 1)
        assert np.median(np.degrees(np.arccos(cos))) < 1.0, it


def test_gpu_norm_and_scale_match_cpu(tmp_path):
    """--norm / --scale on the GPU against the CPU, on data with known per-particle and
    per-micrograph intensity factors."""
    simulate_dataset(str(tmp_path), n=200, box=32, apix=7.0, snr=0.5, n_classes=2, seed=5,
                     n_micrographs=4, norm_spread=0.2, scale_spread=0.3)
    common = ["--i", str(tmp_path / "particles.star"), "--ref", str(tmp_path / "ref.mrc"),
              "--K", "1", "--iter", "3", "--tau2_fudge", "4", "--ini_high", "40",
              "--particle_diameter", "200", "--zero_mask", "--flatten_solvent", "--ctf",
              "--healpix_order", "1", "--offset_range", "3", "--offset_step", "2",
              "--norm", "--scale"]
    assert cli.main(["refine", "--o", str(tmp_path / "cpu" / "run")] + common) == 0
    assert cli.main(["refine", "--o", str(tmp_path / "gpu" / "run"), "--gpu", "0"] + common) == 0
    a = starfile.read(tmp_path / "cpu" / "run_it003_data.star")["particles"]
    b = starfile.read(tmp_path / "gpu" / "run_it003_data.star")["particles"]
    na, nb = a["rlnNormCorrection"].to_numpy(), b["rlnNormCorrection"].to_numpy()
    assert np.corrcoef(na, nb)[0, 1] > 0.99
    assert np.median(np.abs(nb / na - 1)) < 1e-3
    ga = starfile.read(tmp_path / "cpu" / "run_it003_model.star", always_dict=True)["model_groups"]
    gb = starfile.read(tmp_path / "gpu" / "run_it003_model.star", always_dict=True)["model_groups"]
    np.testing.assert_allclose(gb["rlnGroupScaleCorrection"].to_numpy(),
                               ga["rlnGroupScaleCorrection"].to_numpy(), rtol=0.02)


def test_gpu_shared_consensus_references_match_cpu():
    from cryoclass_plugin.engine.focus import shared_consensus_references
    from cryoclass_plugin.engine.masks import soft_sphere_mask
    rng = np.random.default_rng(4)
    refs = rng.standard_normal((3, 32, 32, 32)).astype(np.float32)
    refs[0, 20:26, 10:16, 12:18] += 3.0          # a region where class 0 differs
    w = np.array([0.5, 0.3, 0.2])
    inside = soft_sphere_mask(32, 13, 3.0)
    cpu, m_cpu = shared_consensus_references(refs, w, 4.0, 25.0, inside)
    gpu, m_gpu = shared_consensus_references(cupy.asarray(refs), cupy.asarray(w), 4.0, 25.0,
                                             cupy.asarray(inside))
    assert np.abs(cpu - gpu.get()).max() < 1e-4 * np.abs(cpu).max()
    assert np.abs(m_cpu - m_gpu.get()).max() < 1e-4


def test_gpu_auto_solvent_mask_matches_cpu():
    from cryoclass_plugin.engine.masks import auto_solvent_mask, soft_sphere_mask
    rng = np.random.default_rng(2)
    z, y, x = np.mgrid[:48, :48, :48] - 24
    vol = np.exp(-((z - 3) ** 2 + y ** 2 + (x + 2) ** 2) / 8.0) + 0.02 * rng.standard_normal((48,) * 3)
    inside = soft_sphere_mask(48, 20.0, 3.0)
    cpu = auto_solvent_mask(vol, 4.0, inside, 3.0)
    gpu = auto_solvent_mask(cupy.asarray(vol), 4.0, cupy.asarray(inside), 3.0)
    assert isinstance(gpu, cupy.ndarray)
    assert np.abs(cpu - gpu.get()).max() < 1e-5


def test_free_gpu_memory_caps_the_pool(tmp_path):
    """--free_gpu_memory leaves that many MB of the device outside CuPy's pool."""
    from cryoclass_plugin.engine.backend import reserve_gpu_memory
    pool = cupy.get_default_memory_pool()
    try:
        limit = reserve_gpu_memory(cupy, 1024)
        assert pool.get_limit() == limit == cupy.cuda.Device().mem_info[1] - 1024 * 2 ** 20
    finally:
        pool.set_limit(size=0)      # no cap for the other tests
