"""Fourier-space projection, back-projection and regularised reconstruction.

Central-slice theorem on a zero-padded, centred, unnormalised 3D transform (see the
package docstring).  A 2D frequency ``(kx, ky)`` (integer, in cycles per box of the
*unpadded* box ``N``) of the projection along rotation ``A`` samples the 3D transform at
``A^T (kx, ky, 0) = kx * A[0] + ky * A[1]``; on the padded grid (box ``P = pad * N``)
that is the point ``pad * A^T (kx, ky, 0) + P // 2`` in index units (x, y, z), read by
trilinear interpolation.  Zero padding does not change the values of the transform
(the sum over voxels is the same), only samples it more finely, which keeps trilinear
interpolation accurate.  Gridding correction divides the map by the real-space footprint
of trilinear interpolation, ``sinc^2(x / P)`` per axis, before padding (and the
reconstruction by the same after inverse transform).

Pixels are passed as the ``(ky, kx)`` lists of :func:`.fourier.half_plane_pixels`;
slices are ``(n_rotations, n_pixels)`` complex64 arrays.
"""
import numpy as np

from .backend import get_xp
from .fourier import fft_centered, ifft_centered_real, radial_index

# Rotations interpolated per chunk.  On the CPU small chunks keep the (chunk, n_pixels)
# temporaries of the eight corner passes in cache (32 rotations x 1500 pixels x 8 bytes
# ~ 0.4 MB each: twice as fast as 256); on a GPU large chunks mean fewer launches.
_ROTATION_CHUNK_CPU = 32
_ROTATION_CHUNK_GPU = 1024
# Corner entries (rotations x pixels x 8) scattered per insertion chunk on the CPU: the
# scatter-add (bincount) costs per entry, the full-volume additions per chunk, so chunks
# of ~4 M entries amortise the latter (~90 MB of temporaries).
_INSERT_ENTRIES_CPU = 1 << 22


def _rotation_chunk(xp):
    return _ROTATION_CHUNK_CPU if xp is np else _ROTATION_CHUNK_GPU


def gridding_correction(box, pad, xp=np):
    """Real-space footprint of trilinear interpolation on a ``pad * box`` grid, ``(z,y,x)``.

    Trilinear interpolation in Fourier space multiplies the real-space map by
    ``sinc^2(x / P) sinc^2(y / P) sinc^2(z / P)`` (x in pixels from the centre, P the
    padded box); dividing by this before projecting (and after reconstructing) undoes it.
    """
    x = (xp.arange(box) - box // 2) / float(pad * box)
    s = xp.sinc(x) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).astype(xp.float32)


def _padded_transform(vol, pad, gridding):
    xp = get_xp(vol)
    box = vol.shape[0]
    v = vol.astype(xp.float32)
    if gridding:
        v = v / gridding_correction(box, pad, xp)
    big = pad * box
    padded = xp.zeros((big, big, big), dtype=xp.float32)
    lo = big // 2 - box // 2
    padded[lo:lo + box, lo:lo + box, lo:lo + box] = v
    return fft_centered(padded).astype(xp.complex64)


def _pixel_pairs(ky, kx):
    """``(2, n)`` float32 rows ``kx`` and ``ky`` of the slice pixels."""
    xp = get_xp(ky)
    return xp.stack([kx, ky]).astype(xp.float32)


def _corners(matrices, kxy, pad, big):
    """Trilinear footprint of the slice pixels on the padded grid.

    The pixel ``(kx, ky)`` of rotation ``A`` sits at the padded-grid index point
    ``pad * (kx A[0] + ky A[1]) + P // 2`` (x, y, z).  Returns ``first`` (R, n), the flat
    index ``(z * P + y) * P + x`` of its lower corner (int32 while the grid allows), and
    the fractional parts ``fx, fy, fz`` (R, n) float32; the eight neighbours are
    ``first + _corner_steps(P)`` with weights the products of ``f`` or ``1 - f`` per
    axis.  Points are clipped into the grid; pixels inside the unpadded Nyquist circle
    always fall inside it, so the clip only guards against rounding.
    """
    xp = get_xp(matrices)
    A = (pad * matrices[:, :2, :]).astype(xp.float32)                  # (R, 2, 3)
    coords = xp.matmul(A.transpose(0, 2, 1), kxy)                       # (R, 3, n)
    coords += xp.float32(big // 2)
    xp.clip(coords, 0, xp.float32(big - 1.001), out=coords)
    # int32 flat indices while the padded grid allows (up to 1290^3 voxels): half the
    # memory traffic of int64.  Coordinates are >= 0, so truncation is the floor.
    itype = xp.int32 if big ** 3 < 2 ** 31 else xp.int64
    base = coords.astype(itype)
    coords -= base
    first = base[:, 2] * (big * big)
    first += base[:, 1] * big
    first += base[:, 0]
    return first, coords[:, 0], coords[:, 1], coords[:, 2]


def _corner_steps(big):
    """Flat offsets of the eight neighbours, order (z, y, x) with x fastest."""
    return (0, 1, big, big + 1, big * big, big * big + 1, big * big + big, big * big + big + 1)


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
    """Slices of one map's padded 3D transform.

    Parameters
    ----------
    vol : (N, N, N) float array (numpy or cupy; the projector lives on the same device)
    pad : padding factor (1 or 2; RELION's ``--pad``)
    gridding : divide by the trilinear footprint first (RELION's default; off with
        ``--skip_gridding``)
    """

    def __init__(self, vol, pad=2, gridding=True):
        self.xp = get_xp(vol)
        self.box = vol.shape[0]
        self.pad = int(pad)
        self.big = self.pad * self.box
        self.transform = _padded_transform(vol, self.pad, gridding)
        self._flat = self.transform.ravel()

    def project(self, matrices, ky, kx):
        """Slices ``(R, n_pixels)`` complex64 for rotation matrices ``(R, 3, 3)``.

        Trilinear interpolation as eight gathers of (chunk, n) corner values, each
        weighted and summed in place (no (R, n, 8) temporaries)."""
        xp = self.xp
        matrices = xp.asarray(matrices)
        R, n = matrices.shape[0], ky.shape[0]
        out = xp.empty((R, n), dtype=xp.complex64)
        kxy = _pixel_pairs(ky, kx)
        steps = _corner_steps(self.big)
        chunk = _rotation_chunk(xp)
        for start in range(0, R, chunk):
            stop = min(start + chunk, R)
            first, fx, fy, fz = _corners(matrices[start:stop], kxy, self.pad, self.big)
            acc = out[start:stop]
            acc[...] = 0
            corner = xp.empty(first.shape, dtype=xp.complex64)
            index = xp.empty_like(first)
            for step, weight in zip(steps, _corner_weights(fx, fy, fz)):
                xp.add(first, step, out=index)
                xp.take(self._flat, index, out=corner)
                corner *= weight
                acc += corner
        return out


_SHELL_CACHE = {}
_SHELL_CACHE_MAX_BIG = 256


class BackProjector:
    """Accumulates weighted slices into a padded 3D transform and reconstructs.

    ``data`` accumulates ``sum posterior * CTF * image / sigma2`` and ``weight``
    ``sum posterior * CTF^2 / sigma2`` (RELION's MAP weighting), both on the padded grid
    by the adjoint of :meth:`Projector.project`'s interpolation.  Only half-plane pixels
    are inserted; :meth:`symmetrised` adds each voxel's Hermitian mate once at the end.
    """

    def __init__(self, box, pad=2, xp=np):
        self.xp = xp
        self.box = box
        self.pad = int(pad)
        self.big = self.pad * box
        n = self.big ** 3
        self.data = xp.zeros(n, dtype=xp.complex128)
        self.weight = xp.zeros(n, dtype=xp.float64)

    def insert(self, matrices, ky, kx, slices, weights):
        """Add slices ``(R, n)`` complex and their weights ``(R, n)`` real at rotations.

        The adjoint of :meth:`Projector.project`'s interpolation.  Only the given
        (half-plane) pixels are splatted; their Hermitian mates are added once, in
        :meth:`symmetrised`, which halves the cost of every insertion.
        """
        xp = self.xp
        n_tot = self.big ** 3
        kxy = _pixel_pairs(ky, kx)
        steps = xp.asarray(_corner_steps(self.big), dtype=xp.int64)[:, None, None]
        chunk = (max(1, _INSERT_ENTRIES_CPU // (8 * max(1, ky.shape[0]))) if xp is np
                 else _ROTATION_CHUNK_GPU)
        data_pair = self.data.view(xp.float64).reshape(n_tot, 2)
        for start in range(0, matrices.shape[0], chunk):
            stop = min(start + chunk, matrices.shape[0])
            first, fx, fy, fz = _corners(matrices[start:stop], kxy, self.pad, self.big)
            # (8, r, n) weights and int64 indices: one scatter per quantity and chunk.
            w = xp.stack(list(_corner_weights(fx, fy, fz)))
            flat = (first.astype(xp.int64)[None] + steps).ravel()
            val = slices[start:stop][None]
            if xp is np:
                # numpy: bincount is the fast scatter-add (np.add.at is ~10x slower).
                terms = np.empty(w.shape, dtype=np.float64)     # bincount's own type
                for column, part in ((0, val.real), (1, val.imag)):
                    np.multiply(w, part, out=terms)
                    data_pair[:, column] += np.bincount(flat, weights=terms.ravel(),
                                                        minlength=n_tot)
                np.multiply(w, weights[start:stop][None], out=terms)
                self.weight += np.bincount(flat, weights=terms.ravel(), minlength=n_tot)
            else:
                # CuPy: atomic adds; cupy.bincount would check its input on the host
                # (a device synchronisation per call).
                import cupyx
                wv = w.astype(xp.float64)
                pair = xp.stack([(wv * val.real).ravel(), (wv * val.imag).ravel()], axis=1)
                cupyx.scatter_add(data_pair, flat, pair)
                cupyx.scatter_add(self.weight, flat, (wv * weights[start:stop][None]).ravel())

    def _mate(self, a):
        """``a`` at every voxel's Hermitian mate: index i holds k = i - P/2, its mate -k
        sits at (P - i) mod P on each axis."""
        a = a.reshape((self.big,) * 3)[::-1, ::-1, ::-1]
        return self.xp.roll(a, 1, axis=(0, 1, 2)).ravel()

    def symmetrised(self):
        """``(data, weight)`` with every voxel's Hermitian mate added (``F(-k) = F(k)*``)."""
        return self.symmetrised_data(), self.symmetrised_weight()

    def symmetrised_data(self):
        return self.data + self.xp.conj(self._mate(self.data))

    def symmetrised_weight(self):
        return self.weight + self._mate(self.weight)

    def add(self, other_data, other_weight):
        """Add accumulators summed elsewhere (e.g. by an MPI reduction)."""
        self.data += other_data
        self.weight += other_weight

    def shells(self):
        """Shell (in unpadded frequency pixels, rounded) of every padded voxel (flat).

        Cached per grid up to 256^3 voxels (134 MB of int64): each M-step asks for it
        twice per class."""
        xp = self.xp
        key = (self.big, self.pad, xp.__name__)
        cached = _SHELL_CACHE.get(key)
        if cached is not None:
            return cached
        r = radial_index((self.big,) * 3, xp).ravel() / self.pad
        sh = xp.rint(r).astype(xp.int64)
        if self.big <= _SHELL_CACHE_MAX_BIG:
            _SHELL_CACHE.clear()            # one grid at a time
            _SHELL_CACHE[key] = sh
        return sh

    def reconstruct(self, tau2=None, tau2_fudge=1.0, max_shell=None, gridding=True):
        """Regularised reconstruction ``V = D / (W + 1 / (pad^3 T tau2))`` per voxel.

        ``tau2`` (per shell, per real/imaginary component, of the unpadded map's
        transform) is the Gaussian prior's signal variance; ``None`` (or 0 in a shell)
        means no prior there (plain ``D / W`` where ``W`` > 0).  The ``pad^3`` factor
        keeps the prior's strength independent of padding: the accumulated weight per
        padded voxel is ``1 / pad^3`` of the unpadded one.  Voxels beyond ``max_shell``
        are zeroed.  Returns the ``(N, N, N)`` float32 map.
        """
        xp = self.xp
        sh = self.shells()
        data, weight = self.symmetrised()
        # The prior per shell (0 where there is none), gathered once onto the grid; then
        # 1 / (W + prior) in place on that one float64 volume and one product with the
        # data (a box-128 reconstruction handles 256^3 voxels: each temporary costs).
        n_grid_shells = int(sh.max()) + 1
        prior_shell = xp.zeros(n_grid_shells, dtype=xp.float64)
        if tau2 is not None:
            tau2 = xp.asarray(tau2, dtype=xp.float64)[:n_grid_shells]
            prior_shell[:tau2.shape[0]] = xp.where(
                tau2 > 0, 1.0 / (self.pad ** 3 * tau2_fudge * xp.maximum(tau2, 1e-300)), 0.0)
        inverse = prior_shell[sh]
        inverse += weight
        xp.maximum(inverse, 1e-300, out=inverse)
        xp.divide(1.0, inverse, out=inverse)
        # Voxels no slice reached (negligible weight) carry no information: leave them 0.
        threshold = 1e-12 * float(weight.max() if weight.size else 1.0)
        inverse[weight <= threshold] = 0.0
        if max_shell is not None:
            inverse[sh > max_shell] = 0.0
        data *= inverse                       # data is symmetrised()'s own new array
        del inverse, weight
        # Hermitian by construction (symmetrised sums, shell-wise prior).
        vol = self.real_space(data)
        if gridding:
            vol = vol / gridding_correction(self.box, self.pad, xp)
        return vol.astype(xp.float32)

    def real_space(self, transform):
        """The unpadded ``(N, N, N)`` real-space box of a Hermitian padded transform
        (flat or ``(P, P, P)``, centred)."""
        return ifft_centered_real(transform.reshape((self.big,) * 3), crop=self.box)

    def _mean_per_shell(self, values, n_shells):
        """Average of per-voxel ``values`` (flat, padded grid) over each shell < n_shells."""
        xp = self.xp
        sh = self.shells()
        keep = sh < n_shells
        num = xp.bincount(sh[keep], weights=values[keep], minlength=n_shells)
        cnt = xp.bincount(sh[keep], minlength=n_shells)
        return xp.where(cnt > 0, num / xp.maximum(cnt, 1), 0.0)

    def mean_posterior_variance_per_shell(self, tau2, n_shells):
        """Average posterior variance per shell of the unpadded map's transform, per
        real/imaginary component (tau2 units), under the Gaussian model with prior
        variance ``tau2`` (no fudge): ``mean 1 / (pad^3 W + 1 / tau2)`` over each shell's
        voxels; 0 in shells where ``tau2`` is 0 (no prior: the variance is unbounded
        where W is 0, and RELION's update ignores it anyway)."""
        xp = self.xp
        # 1 / tau2 per shell on the whole grid (0 beyond the given shells, as where
        # tau2 is 0); the shells >= n_shells are left out of the mean anyway.
        sh = self.shells()
        inv_tau2 = xp.zeros(int(sh.max()) + 1, dtype=xp.float64)
        tau2 = xp.asarray(tau2, dtype=xp.float64)[:inv_tau2.shape[0]]
        inv_tau2[:tau2.shape[0]] = xp.where(tau2 > 0, 1.0 / xp.maximum(tau2, 1e-300), 0.0)
        prior = inv_tau2[sh]
        variance = xp.where(prior > 0, 1.0 / (self.symmetrised_weight() * self.pad ** 3
                                              + xp.maximum(prior, 1e-300)), 0.0)
        return self._mean_per_shell(variance, n_shells)

    def mean_weight_per_shell(self, n_shells):
        """Average accumulated weight per shell, scaled to the unpadded grid (x pad^3)."""
        return self._mean_per_shell(self.symmetrised_weight(), n_shells) * self.pad ** 3
