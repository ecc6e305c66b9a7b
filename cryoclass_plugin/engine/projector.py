"""Fourier-space projection, back-projection and regularised reconstruction on cropped
Hermitian half grids.

Central-slice theorem on a zero-padded, centred, unnormalised 3D transform (see the
package docstring).  A 2D frequency ``(kx, ky)`` (integer, in cycles per box of the
*unpadded* box ``N``) of the projection along rotation ``A`` samples the 3D transform at
``A^T (kx, ky, 0) = kx * A[0] + ky * A[1]``; on the padded grid (box ``P = pad * N``)
that is the frequency point ``c = pad * A^T (kx, ky, 0)`` (x, y, z), read by trilinear
interpolation.  Zero padding does not change the values of the transform (the sum over
voxels is the same), only samples it more finely, which keeps trilinear interpolation
accurate.  Gridding correction divides the map by the real-space footprint of trilinear
interpolation, ``sinc^2(x / P)`` per axis, before padding (and the reconstruction by the
same after inverse transform).

The grid (:class:`HalfGrid`).  Only the padded frequencies ``-h <= q_y, q_z <= h`` and
``0 <= q_x <= h`` are stored, as a ``(2h+1, 2h+1, h+1)`` array ``(z, y, x)`` (RELION's
``pad_size x pad_size x (pad_size / 2 + 1)`` with ``pad_size = 2 h + 1``), where
``h = ceil(pad * max_shell) + 1`` (the padded radius of the frequencies used, plus one
voxel for the trilinear neighbours), capped at ``P / 2``; ``max_shell = None`` means
Nyquist (``h = P / 2``, every frequency of the full padded grid).  The transform of a
real map is Hermitian, ``F(-q) = F(q)*``, so the ``q_x < 0`` half is implied: a point
with ``c_x < 0`` is read (and written) at its mate ``-c`` with the conjugate value.
Memory of one complex64 grid: ``8 (2h+1)^2 (h+1)`` bytes, e.g. 30 MB at ``h = 97`` (box
360, pad 2, shell 48) against 3 GB for the full ``720^3`` grid.

Projector: the cropped transform is computed axis by axis on slabs (a length-``P``
transform of the zero-padded axis, cropped to the ``2h+1`` kept frequencies before the
next axis), so neither the padded real volume nor its full transform is ever allocated.
Back-projector: ``data``/``weight`` hold the Hermitian-symmetrised sums (every sample
and its mate) on the same half grid; the reconstruction goes back to a real map at the
full box by the same axis-by-axis transforms (zero beyond the grid).  Every transform
has the padded length ``P = pad * N``: the grid samples the frequencies ``q / P``, so
the length is not free to round up to a fast size (``next_fast_len``); scipy.fft and
cuFFT take any length (a box whose ``pad * N`` has a large prime factor transforms a
few times slower).

Precision: slices and the projector's grid are complex64; the products of the
interpolation weights with the slices are formed in float32; the back-projector's
accumulators (``data``/``weight``) are complex128/float64.  Measured: with complex64 /
float32 accumulators the golden runs' class maps change by up to 2.7e-5 of their
largest value by iteration 3 (tests/test_golden_run.py allows 1e-6): single-precision
sums of many small contributions (every particle, every rotation with posterior > 0)
lose digits, and the EM iterations carry the difference on.  Double costs 24 bytes per
grid voxel: 89 MB per class at box 360, pad 2, shell 48 (``memory.py``).

Pixels are passed as the ``(ky, kx)`` lists of :func:`.fourier.half_plane_pixels`;
slices are ``(n_rotations, n_pixels)`` complex64 arrays.
"""
import math

import numpy as np

from .backend import get_xp
from .fourier import fft_axis
from . import workers

# Rotations interpolated per chunk.  On the CPU small chunks keep the (chunk, n_pixels)
# temporaries of the eight corner passes in cache (32 rotations x 1500 pixels x 8 bytes
# ~ 0.4 MB each: twice as fast as 256); on a GPU large chunks mean fewer launches.
_ROTATION_CHUNK_CPU = 32
_ROTATION_CHUNK_GPU = 1024
# Corner entries (rotations x pixels x 8) scattered per insertion chunk on the CPU: the
# scatter-add (bincount) costs per entry, the full-volume additions per chunk, so chunks
# of ~2 M entries amortise the latter (~16 MB per (8, r, n) temporary).
_INSERT_ENTRIES_CPU = 1 << 21
# RELION's floor of a reconstruction's divisor (weight plus prior): its mean over the
# voxel's shell divided by this.
RECONSTRUCTION_FLOOR = 1000.0
# Bytes of one complex128 intermediate of the axis-by-axis transforms (slabs are sized
# to stay under it).
_SLAB_BYTES = 1 << 26


def _rotation_chunk(xp):
    return _ROTATION_CHUNK_CPU if xp is np else _ROTATION_CHUNK_GPU


def current_grid_shell(current_shell, box):
    """The shell (unpadded frequency pixels) to size the iteration's grids for: the
    E-step's ``current_shell`` plus one, capped at Nyquist ``box // 2``.

    The E-step's pixels are those of shell ``round(|k|) <= current_shell``, so their
    radius reaches ``current_shell + 0.5``; one more shell keeps them inside with
    margin.  The trilinear neighbours (one padded voxel further) are in every grid
    already (``h = ceil(pad r) + 1``, RELION's ``pad_size = 2 (pad r_max + 1) + 1``).
    RELION sizes its grids by the current image size, ``current_size / 2`` = the best
    class resolution shell + ``--incr_size`` (which the engine's ``current_shell``
    already includes)."""
    return int(min(int(current_shell) + 1, int(box) // 2))


def grid_half_extent(box, pad, max_shell):
    """``h``: the padded half-size of the grid for frequencies ``|k| <= max_shell``."""
    big = int(pad) * int(box)
    if max_shell is None:
        return big // 2
    return int(min(math.ceil(int(pad) * float(max_shell) - 1e-9) + 1, big // 2))


class HalfGrid:
    """Geometry of a cropped Hermitian half grid (see the module docstring).

    ``shape = (2h+1, 2h+1, h+1)`` (z, y, x); voxel ``(q_z, q_y, q_x)`` (padded
    frequencies) sits at ``((q_z + h) * ny + q_y + h) * nx + q_x`` of the flat array.
    ``lo``/``hi`` bound the sample points (in padded index units) as the full grid
    ``[-P/2, P/2 - 1]`` and this grid's ``[-h, h]`` allow.
    """

    def __init__(self, box, pad, max_shell=None):
        self.box, self.pad = int(box), int(pad)
        self.big = self.pad * self.box
        self.max_shell = None if max_shell is None else float(max_shell)
        h = self.h = grid_half_extent(self.box, self.pad, max_shell)
        self.ny, self.nx = 2 * h + 1, h + 1
        self.shape = (self.ny, self.ny, self.nx)
        self.size = self.ny * self.ny * self.nx
        # Bounds of the sample points in padded index units (frequency + P // 2): the
        # full grid's [0, P - 1.001], and the cropped grid's [P/2 - h, P/2 + h).
        self.lo = float(max(0, self.big // 2 - h))
        self.hi = self.big - 1.001 if h >= self.big // 2 else float(self.big // 2 + h - 0.001)
        # flat(q) + flat(-q) on the grid extended to q_x < 0.
        self.mate_sum = 2 * h * self.ny * self.nx + 2 * h * self.nx

    def key(self):
        return (self.box, self.pad, self.h)

    def check_pixels(self, ky, kx):
        """Raise ValueError if a pixel lies beyond the grid's ``max_shell``."""
        if self.max_shell is None or ky.shape[0] == 0:
            return
        xp = get_xp(ky)
        r2 = float(xp.max(kx.astype(xp.float64) ** 2 + ky.astype(xp.float64) ** 2))
        if r2 > self.max_shell ** 2 + 1e-6:
            raise ValueError(f"pixel radius {math.sqrt(r2):.2f} beyond the grid's "
                             f"max_shell {self.max_shell:g}: build the grid with a larger "
                             "max_shell (current_grid_shell)")


def gridding_correction(box, pad, xp=np, z_range=None):
    """Real-space footprint of trilinear interpolation on a ``pad * box`` grid, ``(z,y,x)``
    (only the planes ``z_range = (z0, z1)`` if given).

    Trilinear interpolation in Fourier space multiplies the real-space map by
    ``sinc^2(x / P) sinc^2(y / P) sinc^2(z / P)`` (x in pixels from the centre, P the
    padded box); dividing by this before projecting (and after reconstructing) undoes it.
    """
    x = (xp.arange(box) - box // 2) / float(pad * box)
    s = xp.sinc(x) ** 2
    sz = s if z_range is None else s[z_range[0]:z_range[1]]
    return (sz[:, None, None] * s[None, :, None] * s[None, None, :]).astype(xp.float32)


def _slab(n_per_plane):
    """Planes per slab for intermediates of ``n_per_plane`` complex128 values."""
    return max(1, _SLAB_BYTES // (16 * max(1, n_per_plane)))


def _phase(xp, q, box, big):
    """``exp(2 pi i q (N//2) / P)``: the shift from array index ``i`` to centred
    coordinate ``i - N//2`` of a length-``P`` forward transform, at frequencies ``q``."""
    return xp.exp(2j * np.pi * q.astype(xp.float64) * (box // 2) / big)


def half_grid_transform(vol, grid, gridding):
    """The cropped half-grid transform ``(2h+1, 2h+1, h+1)`` complex64 of the zero-padded
    centred map ``vol`` (N^3; divided by the gridding footprint first if ``gridding``):
    the values of the full ``P^3`` centred transform at those frequencies.

    Axis by axis on slabs: x (real transform of length P, kept ``0..h``), y (length P,
    kept ``-h..h``) per slab of z planes, then z per slab of y columns; each in float64
    (as the full-grid transform was), with the centring as a phase factor."""
    xp = get_xp(vol)
    N, P, h = grid.box, grid.big, grid.h
    qx = xp.arange(h + 1)
    q = xp.arange(-h, h + 1)
    idx = q % P
    px, pq = _phase(xp, qx, N, P), _phase(xp, q, N, P)
    acc = xp.empty((N, grid.ny, grid.nx), dtype=xp.complex128)
    step = _slab(N * (P // 2 + 1) + P * grid.nx)
    for z0 in range(0, N, step):
        z1 = min(z0 + step, N)
        v = vol[z0:z1].astype(xp.float32)
        if gridding:
            v = v / gridding_correction(N, grid.pad, xp, (z0, z1))
        a = fft_axis("rfft", v.astype(xp.float64), P, 2)[..., :h + 1]
        a *= px
        b = fft_axis("fft", a, P, 1)[:, idx, :]
        b *= pq[None, :, None]
        acc[z0:z1] = b
    out = xp.empty(grid.shape, dtype=xp.complex64)
    step = _slab(P * grid.nx)
    for y0 in range(0, grid.ny, step):
        y1 = min(y0 + step, grid.ny)
        c = fft_axis("fft", acc[:, y0:y1], P, 0)[idx]
        c *= pq[:, None, None]
        out[:, y0:y1] = c
    return out


def _embed(xp, values, grid, axis):
    """Scatter the ``-h..h`` entries of ``values`` along ``axis`` into a zero array of
    length P at ``q mod P`` (the aliased ``+P/2`` face, present when ``h = P/2``, is
    added onto ``-P/2``)."""
    P, h = grid.big, grid.h
    shape = list(values.shape)
    shape[axis] = P
    out = xp.zeros(shape, dtype=xp.complex128)
    n = min(2 * h + 1, P)
    idx = xp.arange(-h, -h + n) % P
    sl = [slice(None)] * values.ndim
    sl[axis] = idx
    src = [slice(None)] * values.ndim
    src[axis] = slice(0, n)
    out[tuple(sl)] = values[tuple(src)]
    if 2 * h + 1 > P:
        sl[axis], src[axis] = slice(P // 2, P // 2 + 1), slice(n, n + 1)
        out[tuple(sl)] += values[tuple(src)]
    return out


def half_grid_to_real(transform, grid, gridding=False, dtype=np.float64):
    """The real ``(N, N, N)`` map (centred box of the padded grid's inverse transform)
    of a Hermitian half-grid transform (flat or ``grid.shape``), zero beyond the grid;
    divided by the gridding footprint if ``gridding``.

    Axis by axis: z (inverse of length P, evaluated at the N output planes) per slab of
    y columns, then y and x (half-spectrum real inverse of length P) per slab of z
    planes."""
    xp = get_xp(transform)
    G = transform.reshape(grid.shape)
    N, P, h = grid.box, grid.big, grid.h
    x_idx = (xp.arange(N) - N // 2) % P
    Z = xp.empty((N, grid.ny, grid.nx), dtype=xp.complex128)
    step = _slab(P * grid.nx)
    for y0 in range(0, grid.ny, step):
        y1 = min(y0 + step, grid.ny)
        Z[:, y0:y1] = fft_axis("ifft", _embed(xp, G[:, y0:y1], grid, 0), P, 0)[x_idx]
    out = xp.empty((N, N, N), dtype=dtype)
    step = _slab(P * grid.nx + N * (P // 2 + 1))
    for z0 in range(0, N, step):
        z1 = min(z0 + step, N)
        Y = fft_axis("ifft", _embed(xp, Z[z0:z1], grid, 1), P, 1)[:, x_idx]
        half = xp.zeros((z1 - z0, N, P // 2 + 1), dtype=xp.complex128)
        half[..., :h + 1] = Y
        r = fft_axis("irfft", half, P, 2)[..., x_idx]
        if gridding:
            r /= gridding_correction(N, grid.pad, xp, (z0, z1))
        out[z0:z1] = r
    return out


def _pixel_pairs(ky, kx):
    """``(2, n)`` float32 rows ``kx`` and ``ky`` of the slice pixels."""
    xp = get_xp(ky)
    return xp.stack([kx, ky]).astype(xp.float32)


def _slice_points(matrices, kxy, grid):
    """Padded frequency points ``c = pad * (kx A[0] + ky A[1])`` (x, y, z) of the slice
    pixels at rotations ``matrices`` (R, 3, 3): (R, 3, n) float32."""
    xp = get_xp(matrices)
    A = (grid.pad * matrices[:, :2, :]).astype(xp.float32)              # (R, 2, 3)
    return xp.matmul(A.transpose(0, 2, 1), kxy)


def _lower_corners(coords, grid):
    """Trilinear footprint of padded frequency points ``coords`` (R, 3, n), overwritten.

    A point ``c`` sits at the padded index point ``c + P // 2``, clipped to
    ``[grid.lo, grid.hi]`` (pixels inside the grid's shell never are; the clip only
    guards against rounding).  Returns ``first`` (R, n), the flat index of the lower
    corner on the grid extended to ``q_x < 0`` (``((q_z + h) ny + q_y + h) nx + q_x``;
    int32 while the grid allows), ``bx`` (R, n) its ``q_x``, and the fractional parts
    ``fx, fy, fz`` (R, n) float32; the eight neighbours are
    ``first + _corner_steps(grid)`` with weights the products of ``f`` or ``1 - f`` per
    axis."""
    xp = get_xp(coords)
    coords += xp.float32(grid.big // 2)
    xp.clip(coords, xp.float32(grid.lo), xp.float32(grid.hi), out=coords)
    itype = xp.int32 if 2 * grid.size < 2 ** 31 else xp.int64
    base = coords.astype(itype)              # >= 0: truncation is the floor
    coords -= base
    off = grid.h - grid.big // 2             # padded index -> offset q + h
    bx = base[:, 0] - grid.big // 2
    first = (base[:, 2] + off) * (grid.ny * grid.nx)
    first += (base[:, 1] + off) * grid.nx
    first += bx
    return first, bx, coords[:, 0], coords[:, 1], coords[:, 2]


def _corners(matrices, kxy, grid):
    """:func:`_lower_corners` of the slice pixels at rotations ``matrices`` (R, 3, 3).  A
    corner with ``q_x < 0`` is stored at its mate, flat index ``grid.mate_sum - index``
    (:func:`_stored`)."""
    return _lower_corners(_slice_points(matrices, kxy, grid), grid)


def _flipped_corners(matrices, kxy, grid):
    """:func:`_lower_corners` of the slice pixels at rotations ``matrices`` (R, 3, 3),
    with every corner on the stored half grid.

    Where ``c_x < 0`` the point ``c`` is replaced by ``-c`` (the transform is Hermitian,
    and trilinear interpolation at ``-c`` reads the mates of ``c``'s corners with the
    same weights, so the value at ``c`` is the conjugate).  Returns ``first``, ``fx,
    fy, fz`` and ``sign`` (R, n) float32, -1 for the flipped points (their interpolated
    values are to be conjugated)."""
    xp = get_xp(matrices)
    coords = _slice_points(matrices, kxy, grid)
    sign = xp.where(coords[:, 0] < 0, xp.float32(-1), xp.float32(1))    # (R, n)
    coords *= sign[:, None, :]
    first, _, fx, fy, fz = _lower_corners(coords, grid)
    return first, fx, fy, fz, sign


def _corner_steps(grid):
    """Flat offsets of the eight neighbours, order (z, y, x) with x fastest."""
    s, n = grid.ny * grid.nx, grid.nx
    return (0, 1, n, n + 1, s, s + 1, s + n, s + n + 1)


def _corner_weights(fx, fy, fz):
    """The eight trilinear weights (a generator of (R, n) arrays), in
    :func:`_corner_steps` order."""
    gx, gy, gz = 1 - fx, 1 - fy, 1 - fz
    for wz in (gz, fz):
        for wy in (gy, fy):
            wzy = wz * wy
            yield wzy * gx
            yield wzy * fx


class Projector:
    """Slices of one map's padded 3D transform, kept on a cropped half grid.

    Parameters
    ----------
    vol : (N, N, N) float array (numpy or cupy; the projector lives on the same device)
    pad : padding factor (1 or 2; RELION's ``--pad``)
    gridding : divide by the trilinear footprint first (RELION's default; off with
        ``--skip_gridding``)
    max_shell : the largest pixel radius (unpadded frequency pixels) that will be
        projected (:func:`current_grid_shell`); None: Nyquist.
    """

    def __init__(self, vol, pad=2, gridding=True, max_shell=None):
        self.xp = get_xp(vol)
        self.box = vol.shape[0]
        self.pad = int(pad)
        self.big = self.pad * self.box
        self.grid = HalfGrid(self.box, self.pad, max_shell)
        self.transform = half_grid_transform(vol, self.grid, gridding)
        self._flat = self.transform.ravel()

    def project(self, matrices, ky, kx, out=None):
        """Slices ``(R, n_pixels)`` complex64 for rotation matrices ``(R, 3, 3)``,
        written into ``out`` (a C-contiguous ``(R, n_pixels)`` complex64 array, e.g.
        rows of a larger table) where given.

        Trilinear interpolation as eight gathers of (chunk, n) corner values, each
        weighted and summed in place (no (R, n, 8) temporaries).  A point with
        ``c_x < 0`` is interpolated at ``-c`` and conjugated (:func:`_flipped_corners`),
        so every corner lies on the stored half grid."""
        xp = self.xp
        self.grid.check_pixels(ky, kx)
        matrices = xp.asarray(matrices)
        R, n = matrices.shape[0], ky.shape[0]
        if out is None:
            out = xp.empty((R, n), dtype=xp.complex64)
        elif out.shape != (R, n) or out.dtype != xp.complex64 or not out.flags.c_contiguous:
            raise ValueError(f"project: out must be a C-contiguous ({R}, {n}) complex64 "
                             f"array, got {out.shape} {out.dtype}")
        kxy = _pixel_pairs(ky, kx)
        steps = _corner_steps(self.grid)

        def rows(start, stop):
            first, fx, fy, fz, sign = _flipped_corners(matrices[start:stop], kxy, self.grid)
            acc = out[start:stop]
            acc[...] = 0
            corner = xp.empty(first.shape, dtype=xp.complex64)
            index = xp.empty_like(first)
            for step, weight in zip(steps, _corner_weights(fx, fy, fz)):
                xp.add(first, first.dtype.type(step), out=index)
                xp.take(self._flat, index, out=corner)
                corner *= weight
                acc += corner
            # F(-c) = F(c)*: the flipped points' values are conjugated.
            acc.view(xp.float32).reshape(first.shape + (2,))[..., 1] *= sign

        workers.map_ranges(rows, workers.split(R, _rotation_chunk(xp)), threaded=xp is np)
        return out


_SHELL_CACHE = {}
_SHELL_CACHE_MAX_BYTES = 1 << 28
_COUNT_CACHE = {}


def padded_shell_counts(box, pad, n_shells):
    """Number of voxels of the full padded grid ``[-P/2, P/2 - 1]^3`` in each shell
    ``round(|q| / pad)`` < n_shells (float64), without building that grid: the squared
    radii ``q_y^2 + q_z^2`` of all (y, z) pairs are histogrammed once, then shifted by
    each ``q_x^2``."""
    key = (int(box), int(pad), int(n_shells))
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    big = int(pad) * int(box)
    q2 = (np.arange(big) - big // 2).astype(np.int64) ** 2
    n_max = int((pad * (n_shells + 0.5)) ** 2) + 1
    pair = np.add.outer(q2, q2).ravel()
    hist2 = np.bincount(pair[pair < n_max], minlength=n_max).astype(np.float64)
    per_n = np.zeros(n_max, dtype=np.float64)
    for x2 in q2[q2 < n_max]:
        per_n[x2:] += hist2[:n_max - x2]
    shell = np.rint(np.sqrt(np.arange(n_max, dtype=np.float64)) / pad).astype(np.int64)
    keep = shell < n_shells
    counts = np.bincount(shell[keep], weights=per_n[keep], minlength=n_shells)[:n_shells]
    if len(_COUNT_CACHE) > 8:
        _COUNT_CACHE.clear()
    _COUNT_CACHE[key] = counts
    return counts


def _insert_entries(grid, matrices, kxy, slices, weights, start, stop, xp):
    """For :meth:`BackProjector.insert`, rotations ``start:stop``: the scatter targets
    (flat half-grid indices) and their (real, imaginary, weight) terms.  The eight
    corners' entries corner by corner, each in (rotation, pixel) order, then the
    q_x = 0 corners' entries at their mates in the same order.  Products of the
    interpolation weights with the values in float32 (summed in float64)."""
    first, bx, fx, fy, fz = _corners(xp.asarray(matrices[start:stop]), kxy, grid)
    first = first.astype(xp.int64)
    m = first.size
    # A corner's q_x is bx + d, d = 0 for the lower and 1 for the upper x corner
    # (odd corners).  Where it is < 0 the corner is stored at its mate
    # mate_sum - index, conjugated: index s (first + step) + origin with s = -1
    # and origin = mate_sum there, s = 1 and origin = 0 elsewhere.
    s_int, s_float, origin, on_plane = [], [], [], []
    for d in (0, 1):
        neg = bx < -d
        s_int.append(xp.where(neg, -1, 1).astype(xp.int64))
        s_float.append(s_int[d].astype(xp.float32).ravel())
        origin.append((s_int[d] * first + neg * xp.int64(grid.mate_sum)).ravel())
        on_plane.append(xp.flatnonzero(bx == -d))
    n_plane = sum(on_plane[i % 2].size for i in range(8))
    values = (slices[start:stop].real, slices[start:stop].imag, weights[start:stop])
    flat_values = [v.ravel() for v in values]
    target = xp.empty(8 * m + n_plane, dtype=xp.int64)
    terms = [xp.empty(8 * m + n_plane, dtype=xp.result_type(fx.dtype, v.dtype))
             for v in values]
    flat_first = first.ravel()
    pos = 8 * m
    for i, (step, w) in enumerate(zip(_corner_steps(grid), _corner_weights(fx, fy, fz))):
        d = i % 2
        seg = slice(i * m, (i + 1) * m)
        xp.multiply(s_int[d], step, out=target[seg].reshape(first.shape))
        target[seg] += origin[d]
        for term, v in zip(terms, values):
            xp.multiply(w, v, out=term[seg].reshape(first.shape))
        terms[1][seg] *= s_float[d]
        # On the q_x = 0 plane the corner is stored at its mate as well.
        at = on_plane[d]
        if at.size:
            plane = slice(pos, pos + at.size)
            target[plane] = grid.mate_sum - (flat_first[at] + step)
            w_at = w.ravel()[at]
            for term, v in zip(terms, flat_values):
                xp.multiply(w_at, v[at], out=term[plane])
            terms[1][plane] *= -1
            pos += at.size
    return target, terms


class BackProjector:
    """Accumulates weighted slices into a padded 3D transform (cropped half grid) and
    reconstructs.

    ``data`` accumulates ``sum posterior * CTF * image / sigma2`` and ``weight``
    ``sum posterior * CTF^2 / sigma2`` (RELION's MAP weighting), flat on the half grid
    of :class:`HalfGrid`, by the adjoint of :meth:`Projector.project`'s interpolation
    applied to each sample and to its Hermitian mate (``-k``, conjugate value): they
    hold the Hermitian-symmetrised sums.  ``max_shell``: the largest pixel radius that
    will be inserted (None: Nyquist).
    """

    def __init__(self, box, pad=2, xp=np, max_shell=None):
        self.xp = xp
        self.box = box
        self.pad = int(pad)
        self.big = self.pad * box
        self.grid = HalfGrid(box, self.pad, max_shell)
        self.max_shell = max_shell
        self.data = xp.zeros(self.grid.size, dtype=xp.complex128)
        self.weight = xp.zeros(self.grid.size, dtype=xp.float64)

    def insert(self, matrices, ky, kx, slices, weights):
        """Add slices ``(R, n)`` complex and their weights ``(R, n)`` real at rotations.

        The adjoint of :meth:`Projector.project`'s interpolation (same corners, same
        weights), followed by the Hermitian symmetrisation ``D(q) + D(-q)*``: a corner
        contribution at ``q`` goes to ``q`` if ``q_x > 0``, to ``-q`` conjugated if
        ``q_x < 0``, and to both if ``q_x = 0``."""
        xp = self.xp
        grid = self.grid
        grid.check_pixels(ky, kx)
        kxy = _pixel_pairs(ky, kx)
        chunk = (max(1, _INSERT_ENTRIES_CPU // (8 * max(1, ky.shape[0]))) if xp is np
                 else _ROTATION_CHUNK_GPU)

        def entries(start, stop):
            return _insert_entries(grid, matrices, kxy, slices, weights, start, stop, xp)

        ranges = workers.split(matrices.shape[0], chunk)
        if xp is not np:
            for start, stop in ranges:
                self._scatter_gpu(*entries(start, stop))
            return
        pair = self.data.view(np.float64).reshape(self.grid.size, 2)
        n = self.grid.size

        def binned(start, stop):
            # bincount is numpy's fast scatter-add (np.add.at is ~10x slower).
            target, terms = entries(start, stop)
            return [np.bincount(target, weights=t, minlength=n) for t in terms]

        # Chunks run on the worker threads a round at a time (each holds three
        # grid-sized sums), added in chunk order: the same sums whatever the threads.
        per_round = workers.workers()
        for r0 in range(0, len(ranges), per_round):
            for re_sum, im_sum, w_sum in workers.map_ranges(binned, ranges[r0:r0 + per_round]):
                pair[:, 0] += re_sum
                pair[:, 1] += im_sum
                self.weight += w_sum

    def _scatter_gpu(self, flat, terms):
        """Add ``terms`` (real part, imaginary part, weight; each aligned with the flat
        indices ``flat``) into ``data`` and ``weight`` by CuPy's atomic adds (cupy.bincount
        would check its input on the host: a device synchronisation per call)."""
        import cupyx
        xp = self.xp
        pair = self.data.view(xp.float64).reshape(self.grid.size, 2)
        both = xp.stack([terms[0], terms[1]], axis=1).astype(xp.float64)
        cupyx.scatter_add(pair, flat, both)
        cupyx.scatter_add(self.weight, flat, terms[2].astype(xp.float64))

    def symmetrised(self):
        """``(data, weight)``: the sums hold every sample's Hermitian mate already
        (the arrays themselves, not copies)."""
        return self.data, self.weight

    def symmetrised_data(self):
        return self.data

    def symmetrised_weight(self):
        return self.weight

    def add(self, other_data, other_weight):
        """Add accumulators summed elsewhere (e.g. by an MPI reduction) on the same grid."""
        if other_data.shape != self.data.shape:
            raise ValueError(f"accumulators of {other_data.shape[0]} voxels added to a grid "
                             f"of {self.data.shape[0]}: build both with the same max_shell")
        self.data += other_data
        self.weight += other_weight

    def _grid_shells(self):
        """``(shell, multiplicity)`` flat over the grid: shell ``round(|q| / pad)`` (int32)
        and 2 where ``q_x > 0`` (the voxel stands for its mate too), 1 on ``q_x = 0``.
        Cached (the last two grids, up to 256 MB each)."""
        xp, g = self.xp, self.grid
        key = g.key() + (xp.__name__,)
        cached = _SHELL_CACHE.get(key)
        if cached is not None:
            return cached
        q = xp.arange(-g.h, g.h + 1, dtype=xp.float64) ** 2
        qx = xp.arange(g.nx, dtype=xp.float64)
        r = xp.sqrt(q[:, None, None] + q[None, :, None] + qx[None, None, :] ** 2) / self.pad
        sh = xp.rint(r).astype(xp.int32).ravel()
        del r
        mult = self._multiplicity(xp, g).ravel()
        if 12 * g.size <= _SHELL_CACHE_MAX_BYTES:
            while len(_SHELL_CACHE) >= 2:
                _SHELL_CACHE.pop(next(iter(_SHELL_CACHE)))
            _SHELL_CACHE[key] = (sh, mult)
        return sh, mult

    @staticmethod
    def _multiplicity(xp, g):
        """How many voxels of the full padded grid ``V = [-P/2, P/2 - 1]^3`` each half-grid
        voxel ``q`` stands for: ``[q in V]``, plus ``[-q in V]`` where ``q_x > 0`` (the
        ``q_x = 0`` plane holds both mates itself).  2 / 1 except on the ``+-P/2`` faces."""
        half = g.big // 2
        q = xp.arange(-g.h, g.h + 1)
        qx = xp.arange(g.nx)
        in_v = ((q >= -half) & (q <= half - 1)).astype(xp.float64)
        in_m = ((q >= 1 - half) & (q <= half)).astype(xp.float64)
        x_v = (qx <= half - 1).astype(xp.float64)
        x_m = ((qx >= 1) & (qx <= half)).astype(xp.float64)
        return (in_v[:, None, None] * in_v[None, :, None] * x_v[None, None, :]
                + in_m[:, None, None] * in_m[None, :, None] * x_m[None, None, :])

    def voxel_multiplicity(self):
        """Voxels of the full padded grid each stored voxel stands for (flat; 2 where
        ``q_x > 0``, 1 on ``q_x = 0``): the weights of per-shell means."""
        return self._grid_shells()[1]

    def shells(self):
        """Shell (in unpadded frequency pixels, rounded) of every grid voxel (flat)."""
        return self._grid_shells()[0]

    def reconstruct(self, tau2=None, tau2_fudge=1.0, max_shell=None, gridding=True,
                    prior_mean=None, weight_floor=True):
        """Regularised reconstruction ``V = D / (W + 1 / (pad^3 T tau2))`` per voxel.

        ``tau2`` (per shell, per real/imaginary component, of the unpadded map's
        transform) is the Gaussian prior's signal variance; ``None`` (or 0 in a shell)
        means no prior there (plain ``D / W`` where ``W`` > 0).  The ``pad^3`` factor
        keeps the prior's strength independent of padding: the accumulated weight per
        padded voxel is ``1 / pad^3`` of the unpadded one.  Voxels beyond ``max_shell``
        are zeroed (and all beyond the grid's).  Returns the ``(N, N, N)`` float32 map
        at the full box.

        ``prior_mean`` (this grid's half-grid transform of a map, e.g. Blush's denoised
        map) makes the prior's mean that map instead of 0: ``V = (D + M / (pad^3 T
        tau2)) / (W + 1 / (pad^3 T tau2))``, which is M where no slice reached.

        ``weight_floor``: RELION's floor on the divisor (below); off, a plain division.
        """
        xp = self.xp
        sh = self.shells()
        weight = self.weight
        n_grid_shells = int(sh.max()) + 1
        prior_shell = xp.zeros(n_grid_shells, dtype=xp.float64)
        if tau2 is not None:
            tau2 = xp.asarray(tau2, dtype=xp.float64)[:n_grid_shells]
            prior_shell[:tau2.shape[0]] = xp.where(
                tau2 > 0, 1.0 / (self.pad ** 3 * tau2_fudge * xp.maximum(tau2, 1e-300)), 0.0)
        inverse = prior_shell[sh]
        inverse += weight
        # RELION's floor on the divisor: 1/1000 of its mean over the shell, so that a
        # voxel few slices reached (a CTF zero, a sparse shell) cannot blow up; it
        # decides where there is no prior (the unregularised reconstruction after a
        # --firstiter_cc iteration), rarely elsewhere.
        if weight_floor:
            floor = self._mean_per_shell(inverse, n_grid_shells) / RECONSTRUCTION_FLOOR
            xp.maximum(inverse, floor[sh], out=inverse)
        xp.maximum(inverse, 1e-300, out=inverse)
        xp.divide(1.0, inverse, out=inverse)
        if prior_mean is None:
            # Voxels no slice reached (negligible weight) carry no information: 0.
            threshold = 1e-12 * float(weight.max() if weight.size else 1.0)
            inverse[weight <= threshold] = 0.0
            data = self.data
        else:
            data = self.data + prior_mean.reshape(self.data.shape) * prior_shell[sh]
        if max_shell is not None:
            inverse[sh > max_shell] = 0.0
        data = data * inverse
        del inverse
        # Hermitian by construction (symmetrised sums, shell-wise prior).
        return half_grid_to_real(data, self.grid, gridding=gridding, dtype=xp.float32)

    def real_space(self, transform):
        """The unpadded ``(N, N, N)`` float64 real-space box of a Hermitian half-grid
        transform (flat or ``grid.shape``, this back-projector's grid)."""
        return half_grid_to_real(transform, self.grid)

    def _mean_per_shell(self, values, n_shells, outside=None):
        """Average of per-voxel ``values`` (flat, grid) over each shell < n_shells of the
        whole padded grid ``[-P/2, P/2 - 1]^3``: a half-grid voxel counts for itself and
        its mate, and the voxels of the shell beyond the cropped grid (where no sample
        reached) count with the value ``outside`` (per shell; None: 0)."""
        xp = self.xp
        sh, mult = self._grid_shells()
        keep = sh < n_shells
        num = xp.bincount(sh[keep], weights=(values * mult)[keep], minlength=n_shells)
        cnt = xp.bincount(sh[keep], weights=mult[keep], minlength=n_shells)
        full = xp.asarray(padded_shell_counts(self.box, self.pad, n_shells))
        missing = xp.maximum(full - cnt, 0.0)
        if outside is not None:
            num = num + missing * outside[:n_shells]
        cnt = cnt + missing
        return xp.where(cnt > 0, num / xp.maximum(cnt, 1), 0.0)

    def mean_posterior_variance_per_shell(self, tau2, n_shells):
        """Average posterior variance per shell of the unpadded map's transform, per
        real/imaginary component (tau2 units), under the Gaussian model with prior
        variance ``tau2`` (no fudge): ``mean 1 / (pad^3 W + 1 / tau2)`` over each shell's
        voxels; 0 in shells where ``tau2`` is 0 (no prior: the variance is unbounded
        where W is 0, and RELION's update ignores it anyway).  Shells beyond the grid
        give 0."""
        xp = self.xp
        sh = self.shells()
        tau2_all = xp.asarray(tau2, dtype=xp.float64)
        inv_tau2 = xp.zeros(int(sh.max()) + 1, dtype=xp.float64)
        tau2 = tau2_all[:inv_tau2.shape[0]]
        inv_tau2[:tau2.shape[0]] = xp.where(tau2 > 0, 1.0 / xp.maximum(tau2, 1e-300), 0.0)
        prior = inv_tau2[sh]
        variance = xp.where(prior > 0, 1.0 / (self.weight * self.pad ** 3
                                              + xp.maximum(prior, 1e-300)), 0.0)
        # Beyond the grid W = 0: the prior's own variance, as a voxel there would give.
        empty = xp.zeros(n_shells, dtype=xp.float64)
        m = min(n_shells, tau2_all.shape[0])
        inv = xp.where(tau2_all[:m] > 0, 1.0 / xp.maximum(tau2_all[:m], 1e-300), 0.0)
        empty[:m] = xp.where(inv > 0, 1.0 / (0.0 + xp.maximum(inv, 1e-300)), 0.0)
        return self._mean_per_shell(variance, n_shells, outside=empty)

    def mean_weight_per_shell(self, n_shells):
        """Average accumulated weight per shell, scaled to the unpadded grid (x pad^3);
        0 beyond the grid."""
        return self._mean_per_shell(self.weight, n_shells) * self.pad ** 3
