"""Projector / back-projector: adjointness, agreement with a real-space projection,
reconstruction of a phantom from noiseless projections at known poses."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from cryoclass_plugin.engine import projector as pj
from cryoclass_plugin.engine.fourier import fft_centered, half_plane_pixels, shell_index
from cryoclass_plugin.engine.geometry import euler_to_matrix

N = 32


@pytest.fixture(scope="module")
def phantom():
    rng = np.random.default_rng(0)
    v = np.zeros((N, N, N), np.float32)
    for _ in range(60):
        v[tuple(rng.integers(9, 23, 3))] += 1
    return gaussian_filter(v, 1.0).astype(np.float32)


def random_rotations(n, seed):
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(0, 360, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(0, 360, n))


def real_space_projection(vol, A):
    """image(x, y) = sum_z V(A^T (x, y, z)), cubic interpolation, coordinates from N//2."""
    c = np.arange(N) - N // 2
    Y, X, Z = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([X, Y, Z], -1) @ A          # rows: (A^T p)^T
    idx = pts[..., ::-1] + N // 2              # (z, y, x) array index order
    val = map_coordinates(vol, idx.reshape(-1, 3).T, order=3).reshape(N, N, N)
    return val.sum(-1)


@pytest.mark.parametrize("angles", [(0, 0, 0), (30, 60, 90), (-120, 100, 10)])
def test_projection_matches_real_space(phantom, angles):
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    A = euler_to_matrix(*angles)
    ref = fft_centered(real_space_projection(phantom, A))[ky + N // 2, kx + N // 2]
    got = pj.Projector(phantom, pad=2, gridding=True).project(A[None], ky, kx)[0]
    corr = np.corrcoef(np.r_[ref.real, ref.imag], np.r_[got.real, got.imag])[0, 1]
    assert corr > 0.999
    assert 0.95 < np.abs(got).sum() / np.abs(ref).sum() < 1.05


def test_projection_into_rows_of_a_table_is_the_same(phantom):
    """``project(out=)`` writes the same slices into rows of a larger table (how the
    fine pass fills its tables), and refuses an array it cannot write into."""
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    proj = pj.Projector(phantom, pad=2, gridding=True)
    mats = random_rotations(40, 3)
    table = np.full((60, ky.shape[0]), np.nan, dtype=np.complex64)
    proj.project(mats, ky, kx, out=table[10:50])
    assert np.array_equal(table[10:50], proj.project(mats, ky, kx))
    assert np.isnan(table[:10]).all() and np.isnan(table[50:]).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        proj.project(mats, ky, kx, out=table[10:50, :-1])
    with pytest.raises(ValueError, match="complex64"):
        proj.project(mats, ky, kx, out=np.empty((40, ky.shape[0]), np.complex128))


@pytest.mark.parametrize("pad", [1, 2])
def test_backprojection_is_adjoint_of_projection(phantom, pad):
    rng = np.random.default_rng(1)
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    R = random_rotations(5, 2)
    proj = pj.Projector(phantom, pad=pad, gridding=False)
    s = (rng.standard_normal((5, len(ky))) + 1j * rng.standard_normal((5, len(ky)))).astype(np.complex64)
    lhs = np.vdot(s, proj.project(R, ky, kx))
    # BackProjector.insert is the adjoint of the interpolation followed by the Hermitian
    # symmetrisation D + D(-q)*: summed over the whole padded grid (each half-grid voxel
    # with q_x > 0 stands for its mate too), <D_sym, F> = 2 Re <s, P F>; its weight
    # volume is the same applied to the weights (twice their sum).
    bp = pj.BackProjector(N, pad=pad)
    weights = rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    bp.insert(R, ky, kx, s, weights)
    mult = bp.voxel_multiplicity()
    rhs = np.sum(mult * (np.conj(bp.data) * proj._flat).real)
    assert abs(2 * lhs.real - rhs) < 1e-4 * abs(lhs)
    ones = pj.Projector(np.zeros((N,) * 3, np.float32), pad=pad, gridding=False)
    ones._flat = np.ones_like(ones._flat)       # every voxel 1: P 1 = 1 (weights sum to 1)
    assert np.allclose(ones.project(R, ky, kx), 1.0, atol=1e-5)
    assert np.isclose((mult * bp.weight).sum(), 2 * weights.astype(np.float64).sum(), rtol=1e-5)


def fsc_curve(a, b):
    fa, fb = fft_centered(a), fft_centered(b)
    sh = shell_index(a.shape).ravel()
    num = np.bincount(sh, (fa * np.conj(fb)).real.ravel())
    den = np.sqrt(np.bincount(sh, (abs(fa) ** 2).ravel()) * np.bincount(sh, (abs(fb) ** 2).ravel()))
    return num / den


@pytest.mark.parametrize("gridding", [True, False])
def test_reconstruction_from_noiseless_projections(phantom, gridding):
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    R = random_rotations(2000, 3)
    slices = pj.Projector(phantom, pad=2, gridding=gridding).project(R, ky, kx)
    bp = pj.BackProjector(N, pad=2)
    bp.insert(R, ky, kx, slices, np.ones(slices.shape, np.float32))
    rec = bp.reconstruct(gridding=gridding)
    fsc = fsc_curve(phantom, rec)
    assert fsc[1: int(0.8 * N // 2) + 1].min() >= 0.9
    assert np.corrcoef(phantom.ravel(), rec.ravel())[0, 1] > 0.99


def test_regularised_reconstruction_shrinks_towards_zero(phantom):
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    R = random_rotations(200, 4)
    slices = pj.Projector(phantom, pad=2).project(R, ky, kx)
    bp = pj.BackProjector(N, pad=2)
    bp.insert(R, ky, kx, slices, np.full(slices.shape, 1.0, np.float32))
    plain = bp.reconstruct()
    tau2 = np.full(N // 2 + 1, 1e-3)
    strong = bp.reconstruct(tau2=tau2, tau2_fudge=1.0)
    assert np.isfinite(strong).all()
    assert np.abs(strong).sum() < 0.5 * np.abs(plain).sum()


def test_tiny_prior_in_high_shells_keeps_low_shells(phantom):
    """A prior that all but zeroes the high shells (tau2 ~ 0 there, as after a low-pass)
    must not wipe the well-determined low shells (regression: a global threshold on the
    regularised denominator once zeroed the whole map)."""
    ky, kx = half_plane_pixels(N, N // 2 - 1)
    R = random_rotations(300, 5)
    slices = pj.Projector(phantom, pad=2).project(R, ky, kx)
    bp = pj.BackProjector(N, pad=2)
    bp.insert(R, ky, kx, slices, np.ones(slices.shape, np.float32))
    tau2 = np.full(N // 2 + 1, 1e6)
    tau2[6:] = 1e-14
    rec = bp.reconstruct(tau2=tau2, tau2_fudge=4.0)
    fsc = fsc_curve(phantom, rec)
    assert fsc[1:5].min() > 0.95
    assert np.abs(fft_centered(rec))[N // 2, N // 2, N // 2 + 10] < 1e-3 * np.abs(fft_centered(phantom)).max()


@pytest.mark.parametrize("max_shell", [None, 3])
def test_real_space_is_the_centred_inverse_transform_cropped(max_shell):
    """``BackProjector.real_space`` of a half grid equals the plain centred inverse FFT
    of the Hermitian padded transform it is the half of (zero beyond the grid), cropped
    to the box."""
    from cryoclass_plugin.engine.fourier import fft_centered, ifft_centered
    from cryoclass_plugin.engine.projector import BackProjector
    rng = np.random.default_rng(4)
    box, pad = 12, 2
    bp = BackProjector(box, pad, max_shell=max_shell)
    big, h = bp.big, bp.grid.h
    transform = fft_centered(rng.standard_normal((big,) * 3))     # Hermitian
    q = np.arange(big) - big // 2
    Z, Y, X = np.meshgrid(q, q, q, indexing="ij")
    outside = (np.abs(Z) > h) | (np.abs(Y) > h) | (np.abs(X) > h)
    transform[outside] = 0                                         # still Hermitian
    want = ifft_centered(transform).real
    lo = big // 2 - box // 2
    want = want[lo:lo + box, lo:lo + box, lo:lo + box]
    c = big // 2
    if h < c:
        half = transform[c - h:c + h + 1, c - h:c + h + 1, c:c + h + 1]
    else:       # rows -P/2..P/2-1 (+P/2 left 0: it adds onto -P/2); q_x = P/2 is -P/2
        half = np.zeros(bp.grid.shape, np.complex128)
        half[:big, :big, :c] = transform[:, :, c:]
        half[:big, :big, c] = transform[:, :, 0]
    np.testing.assert_allclose(bp.real_space(half.ravel()), want, atol=1e-10)


def test_ifft_centered_real_matches_the_complex_inverse():
    """Without a crop, on 2D and 3D Hermitian transforms: the complex inverse's real part."""
    from cryoclass_plugin.engine.fourier import fft_centered, ifft_centered, ifft_centered_real
    rng = np.random.default_rng(5)
    for shape in ((16, 16), (8, 12, 10)):
        transform = fft_centered(rng.standard_normal(shape))
        np.testing.assert_allclose(ifft_centered_real(transform), ifft_centered(transform).real,
                                   atol=1e-10)
