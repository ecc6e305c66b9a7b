"""Cropped Hermitian half grids (engine/projector.py) against an independent full-grid
reference written here: the padded centred transform on the whole ``(pad N)^3`` grid,
trilinear interpolation by scipy's ``map_coordinates`` (order 1), insertion by
``np.add.at`` of the same eight trilinear weights, Hermitian symmetrisation
``D(q) + D(-q)*``, and the regularised reconstruction back through the full inverse FFT.
Also the memory formula and its check (engine/memory.py)."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from cryoclass_plugin.engine import memory
from cryoclass_plugin.engine import projector as pj
from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine.fourier import (fft_centered, half_plane_pixels, ifft_centered,
                                             shell_index)
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.mstep import Accumulators


def phantom(n, seed=0, blobs=60):
    rng = np.random.default_rng(seed)
    v = np.zeros((n, n, n), np.float32)
    for _ in range(blobs):
        v[tuple(rng.integers(n // 4, 3 * n // 4, 3))] += 1
    return gaussian_filter(v, n / 32).astype(np.float32)


def rotations(n, seed):
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(0, 360, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(0, 360, n))


# ----------------------------------------------------------------------------- reference

def ref_transform(vol, pad, gridding):
    n = vol.shape[0]
    big = pad * n
    v = vol.astype(np.float64)
    if gridding:
        v = v / pj.gridding_correction(n, pad)
    padded = np.zeros((big,) * 3)
    lo = big // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = v
    return fft_centered(padded)


def ref_points(mats, ky, kx, pad, big):
    """(R, 3, n) padded index points (x, y, z) of the pixels, float32 as the engine."""
    A = (pad * mats[:, :2, :]).astype(np.float32)
    kxy = np.stack([kx, ky]).astype(np.float32)
    return np.matmul(A.transpose(0, 2, 1), kxy) + np.float32(big // 2)


def ref_project(F, mats, ky, kx, pad):
    pts = ref_points(mats, ky, kx, pad, F.shape[0]).astype(np.float64)
    idx = np.stack([pts[:, 2], pts[:, 1], pts[:, 0]]).reshape(3, -1)      # (z, y, x)
    out = map_coordinates(F.real, idx, order=1) + 1j * map_coordinates(F.imag, idx, order=1)
    return out.reshape(mats.shape[0], -1)


def ref_insert(big, mats, ky, kx, slices, weights, pad):
    """Full-grid sums ``(D, W)``, symmetrised ``D(q) + D(-q)*``."""
    D = np.zeros((big,) * 3, np.complex128)
    W = np.zeros((big,) * 3)
    pts = ref_points(mats, ky, kx, pad, big).astype(np.float64)
    base = np.floor(pts).astype(np.int64)
    f = pts - base
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = ((f[:, 2] if dz else 1 - f[:, 2]) * (f[:, 1] if dy else 1 - f[:, 1])
                     * (f[:, 0] if dx else 1 - f[:, 0]))
                at = (base[:, 2] + dz, base[:, 1] + dy, base[:, 0] + dx)
                np.add.at(D, at, w * slices)
                np.add.at(W, at, w * weights)

    def mate(a):
        return np.roll(a[::-1, ::-1, ::-1], 1, axis=(0, 1, 2))
    return D + np.conj(mate(D)), W + mate(W)


def padded_shells(big, pad):
    """``round(|q| / pad)`` over the full padded grid."""
    q = (np.arange(big) - big // 2).astype(float) ** 2
    return np.rint(np.sqrt(q[:, None, None] + q[None, :, None] + q[None, None, :]) / pad
                   ).astype(int)


def ref_reconstruct(D, W, box, pad, tau2, fudge, max_shell=None):
    big = D.shape[0]
    sh = padded_shells(big, pad)
    prior = np.where(tau2 > 0, 1.0 / (pad ** 3 * fudge * np.maximum(tau2, 1e-300)), 0.0)
    prior = np.concatenate([prior, np.zeros(sh.max() + 1 - prior.shape[0])])[sh]
    V = np.where(W > 1e-12 * W.max(), D / np.maximum(W + prior, 1e-300), 0.0)
    if max_shell is not None:
        V[sh > max_shell] = 0
    real = ifft_centered(V).real
    lo = big // 2 - box // 2
    return real[lo:lo + box, lo:lo + box, lo:lo + box]


def low_shells(vol, max_shell):
    """``vol`` with every Fourier shell > max_shell removed (the comparison is below it)."""
    F = fft_centered(vol.astype(np.float64))
    F[shell_index(vol.shape) > max_shell] = 0
    return ifft_centered(F).real


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("pad,max_shell,gridding", [(2, 5, False), (2, 9.5, True),
                                                      (1, 7, False), (2, None, False)])
def test_cropped_projector_equals_full_grid(pad, max_shell, gridding):
    """Every pixel inside the grid's shell: the value of the full padded grid (1e-5)."""
    n = 32
    vol = phantom(n)
    radius = n // 2 - 1 if max_shell is None else max_shell
    ky, kx = half_plane_pixels(n, radius)
    R = rotations(60, 1)
    want = ref_project(ref_transform(vol, pad, gridding), R, ky, kx, pad)
    proj = pj.Projector(vol, pad=pad, gridding=gridding, max_shell=max_shell)
    got = proj.project(R, ky, kx)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    h = pj.grid_half_extent(n, pad, max_shell)
    assert proj.transform.shape == (2 * h + 1, 2 * h + 1, h + 1)
    if max_shell is not None:
        assert h == int(np.ceil(pad * max_shell)) + 1
        with pytest.raises(ValueError, match="max_shell"):
            proj.project(R, *half_plane_pixels(n, max_shell + 2))


@pytest.mark.parametrize("pad,max_shell", [(2, 6), (1, 8), (2, None)])
def test_cropped_backprojector_and_reconstruction_equal_full_grid(pad, max_shell):
    """Sums on the half grid = the full grid's symmetrised sums there; reconstruction and
    per-shell means equal below max_shell (noisy, non-Hermitian-consistent slices)."""
    n = 24
    big = pad * n
    rng = np.random.default_rng(2)
    radius = n // 2 - 1 if max_shell is None else max_shell
    ky, kx = half_plane_pixels(n, radius)
    R = rotations(80, 3)
    s = (rng.standard_normal((80, ky.size)) + 1j * rng.standard_normal((80, ky.size))).astype(np.complex64)
    w = rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    D, W = ref_insert(big, R, ky, kx, s, w, pad)
    bp = pj.BackProjector(n, pad=pad, max_shell=max_shell)
    bp.insert(R, ky, kx, s, w)
    h, c = bp.grid.h, big // 2
    hh = min(h, c - 1)          # rows inside both grids
    sub = (slice(h - hh, h + hh + 1), slice(h - hh, h + hh + 1), slice(0, hh + 1))
    full = (slice(c - hh, c + hh + 1), slice(c - hh, c + hh + 1), slice(c, c + hh + 1))
    got_D, got_W = bp.data.reshape(bp.grid.shape), bp.weight.reshape(bp.grid.shape)
    assert np.abs(got_D[sub] - D[full]).max() <= 1e-6 * np.abs(D).max()
    assert np.abs(got_W[sub] - W[full]).max() <= 1e-6 * W.max()
    tau2 = np.full(n // 2 + 1, 3.0)
    want = ref_reconstruct(D, W, n, pad, tau2, 4.0)
    got = bp.reconstruct(tau2=tau2, tau2_fudge=4.0, gridding=False)
    assert got.shape == (n, n, n)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # Per-shell means over the whole padded grid (voxels beyond the crop: W = 0); 1e-6:
    # the engine forms the weight x value products in float32, the reference in float64.
    sh = padded_shells(big, pad)
    n_sh = n // 2 + 1
    cnt = np.bincount(sh.ravel(), minlength=n_sh)[:n_sh]
    mean_w = np.bincount(sh.ravel(), W.ravel(), minlength=n_sh)[:n_sh] / cnt * pad ** 3
    np.testing.assert_allclose(bp.mean_weight_per_shell(n_sh), mean_w, rtol=1e-6,
                               atol=1e-12 * mean_w.max())
    var = 1.0 / (W * pad ** 3 + 1.0 / tau2[0])
    mean_var = np.bincount(sh.ravel(), var.ravel(), minlength=n_sh)[:n_sh] / cnt
    np.testing.assert_allclose(bp.mean_posterior_variance_per_shell(tau2, n_sh), mean_var,
                               rtol=1e-6)


@pytest.mark.slow
def test_noiseless_reconstruction_at_box_128_matches_full_grid():
    """Box 128, pad 2, grid for shell 20 (a 128^3 map at ~19 A for 3 A/px): the
    reconstruction from noiseless projections at known poses equals the full-grid one
    below the shell, and both recover the phantom there."""
    n, pad, shell = 128, 2, 20
    vol = phantom(n, seed=5, blobs=200)
    ky, kx = half_plane_pixels(n, shell)
    R = rotations(250, 6)
    proj = pj.Projector(vol, pad=pad, gridding=False, max_shell=shell)
    slices = proj.project(R, ky, kx)
    ones = np.ones(slices.shape, np.float32)
    bp = pj.BackProjector(n, pad=pad, max_shell=shell)
    bp.insert(R, ky, kx, slices, ones)
    got = bp.reconstruct(gridding=False, max_shell=shell - 1)
    # The full-grid reference, on the same samples.
    D, W = ref_insert(pad * n, R, ky, kx, slices.astype(np.complex128), ones, pad)
    want = ref_reconstruct(D, W, n, pad, np.zeros(1), 1.0, max_shell=shell - 1)
    del D, W
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    truth = low_shells(vol, shell - 1)
    assert np.corrcoef(truth.ravel(), low_shells(got, shell - 1).ravel())[0, 1] > 0.99


def test_growing_max_shell_from_call_to_call():
    """Iterations whose grids grow (shells 5, 9, 14): each projector reads, and each
    reconstruction gives, what the full (Nyquist) grid gives below its shell; the
    accumulators of one iteration add only to those of the same size."""
    n = 32
    vol = phantom(n, seed=7)
    R = rotations(150, 8)
    ref_proj = pj.Projector(vol, pad=2, gridding=False)       # full grid: max_shell None
    for current in (4, 8, 13):
        shell = pj.current_grid_shell(current, n)
        assert shell == current + 1
        ky, kx = half_plane_pixels(n, current)
        proj = pj.Projector(vol, pad=2, gridding=False, max_shell=shell)
        slices = proj.project(R, ky, kx)
        np.testing.assert_array_equal(slices, ref_proj.project(R, ky, kx))
        acc = Accumulators(2, 1, n, 2, np, max_shell=shell)
        full = pj.BackProjector(n, pad=2)
        for bp in (acc.backprojectors[0], full):
            bp.insert(R, ky, kx, slices, np.ones(slices.shape, np.float32))
        acc.backprojectors[1].add(acc.backprojectors[0].data, acc.backprojectors[0].weight)
        tau2 = np.full(n // 2 + 1, 10.0)
        got = acc.backprojectors[1].reconstruct(tau2=tau2, tau2_fudge=2.0, gridding=False)
        want = full.reconstruct(tau2=tau2, tau2_fudge=2.0, gridding=False)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
        with pytest.raises(ValueError, match="same max_shell"):
            pj.BackProjector(n, pad=2, max_shell=shell - 2).add(full.data, full.weight)
    assert pj.current_grid_shell(40, 64) == 32            # capped at Nyquist


def test_memory_formula_and_check():
    """The grid items follow (2h+1)^2 (h+1); the check names the options that shrink the
    largest items, in one line."""
    est = memory.estimate_memory(360, 47, 2, 6, 256, 7000, threads=2,
                                 n_coarse_rotations=4608, n_coarse_pixels=700)
    V = (2 * 97 + 1) ** 2 * 98                  # shell 48, pad 2: h = 97
    assert est.items["projectors"] == 8 * V * 6
    assert est.items["back-projectors"] == 24 * V * 7
    full = sum(memory.full_grid_bytes(360, 2, 6).values())
    grids = sum(est.items[k] for k in ("projectors", "back-projectors", "grid transients"))
    assert grids < full / 50
    memory.check_fits(est, est.total + 1)
    with pytest.raises(CryoClassError) as err:
        memory.check_fits(est, est.total / 2)
    msg = str(err.value)
    assert "\n" not in msg and "GiB is free" in msg and "--K" in msg
    small = memory.estimate_memory(360, 47, 2, 1, 100000, 7000, n_translations=25)
    with pytest.raises(CryoClassError, match="--block_size"):
        memory.check_fits(small, 1e9)
    assert memory.check_fits(est, None) is None            # unknown free memory: no check
    assert memory.max_current_shell(360, 1.34, -1) == 179
    assert memory.max_current_shell(360, 1.34, 10.0) == 49      # ceil(48.24)
    free = memory.available_memory_bytes()
    assert free is None or free > 0


@pytest.mark.slow
def test_engine_run_on_growing_cropped_grids_equals_full_grids(tmp_path, monkeypatch):
    """A whole run (RELION's start, K=3, 4 iterations, box 40) with every projector and
    accumulator sized by the iteration's current shell (``current_grid_shell``; the
    grids grow from h = 35 to the full 40 as the E-step radius grows) writes the same
    class maps and assignments, bit for bit, as the run on full padded grids."""
    import starfile
    from cryoclass_plugin import cli
    from cryoclass_plugin.engine import iteration, particles
    from cryoclass_plugin.engine.mrc_io import read_map
    from cryoclass_plugin.engine.simulate import simulate_dataset

    data = tmp_path / "data"
    simulate_dataset(str(data), n=240, box=40, apix=5.5, snr=0.5, n_classes=3, seed=11,
                     max_shift_px=1.5)
    flags = ["--tau2_fudge", "4", "--ini_high", "40", "--particle_diameter", "200",
             "--zero_mask", "--flatten_solvent", "--ctf", "--healpix_order", "1",
             "--offset_range", "3", "--offset_step", "2", "--pad", "2", "--skip_gridding",
             "--j", "1", "--random_seed", "3", "--K", "3", "--iter", "4", "--firstiter_cc"]

    shells, grids, sized = [], [], {"on": False}
    within = particles.Pixels.within.__func__

    def sized_within(cls, box, shell, xp):
        shells.append(pj.current_grid_shell(shell, box) if sized["on"] else None)
        return within(cls, box, shell, xp)

    def projector(vol, pad=2, gridding=True, **kw):
        p = pj.Projector(vol, pad=pad, gridding=gridding, max_shell=shells[-1])
        grids.append(p.grid.h)
        return p

    # Both runs set the grids' size themselves (full: None; cropped: the current shell).
    monkeypatch.setattr(particles.Pixels, "within", classmethod(sized_within))
    monkeypatch.setattr(iteration, "Projector", projector)
    monkeypatch.setattr(iteration, "Accumulators", lambda *a, **kw: Accumulators(
        *a, **dict(kw, max_shell=shells[-1])))

    def run(name):
        root = tmp_path / name / "run"
        assert cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                         str(data / "ref.mrc"), "--o", str(root)] + flags) == 0
        return root

    full = run("full")
    assert set(grids) == {40}
    grids.clear()
    sized["on"] = True
    cropped = run("cropped")
    assert min(grids) < 40 and max(grids) == 40          # the grids did grow
    for it in range(1, 5):
        for k in range(1, 4):
            a, _ = read_map(f"{full}_it{it:03d}_class{k:03d}.mrc")
            b, _ = read_map(f"{cropped}_it{it:03d}_class{k:03d}.mrc")
            assert np.array_equal(a, b), (it, k)
        da = starfile.read(f"{full}_it{it:03d}_data.star")["particles"]
        db = starfile.read(f"{cropped}_it{it:03d}_data.star")["particles"]
        for col in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnOriginXAngst"):
            np.testing.assert_array_equal(da[col].to_numpy(), db[col].to_numpy())


def test_unregularised_reconstruction_floors_the_weight_at_a_thousandth_of_its_shell_mean():
    """RELION's floor on the divisor (1/1000 of the shell's mean weight): a voxel that
    slices barely touched (small trilinear weights) cannot blow the map up, as plain
    D / W does after a --firstiter_cc iteration on few particles."""
    n, pad = 24, 2
    rng = np.random.default_rng(5)
    ky, kx = half_plane_pixels(n, n // 2 - 1)
    # Noisy images x times CTFs c: data sums c x, weights c^2, so where c is near 0 in
    # every slice through a voxel, D / W ~ x / c.
    R = rotations(20, 7)
    x = (rng.standard_normal((20, ky.size)) + 1j * rng.standard_normal((20, ky.size)))
    c = rng.uniform(-1.0, 1.0, x.shape) ** 3
    bp = pj.BackProjector(n, pad=pad)
    bp.insert(R, ky, kx, (c * x).astype(np.complex64), (c * c).astype(np.float32))
    D, W = bp.data, bp.weight
    n_shells = int(bp.shells().max()) + 1
    floor = bp._mean_per_shell(W, n_shells)[bp.shells()] / 1000.0
    reached = W > 1e-12 * W.max()
    assert (reached & (W < floor)).any()          # the floor decides somewhere
    plain = np.where(reached, D / np.maximum(W, 1e-300), 0)
    floored = np.where(reached, D / np.maximum(W, floor), 0)
    want = pj.half_grid_to_real(floored, bp.grid).astype(np.float32)
    got = bp.reconstruct(tau2=None, gridding=False)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert got.std() < 0.5 * pj.half_grid_to_real(plain, bp.grid).std()
