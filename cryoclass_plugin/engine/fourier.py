"""Centred, unnormalised FFTs and Fourier-shell bookkeeping (see the package docstring).

Frequency ``k`` (integer cycles per box) of an ``N`` box sits at index ``k + N // 2``.
Shell ``s`` holds the frequencies with ``round(|k|) == s``; ``N // 2`` is Nyquist.
Resolution of shell ``s`` is ``N * apix / s`` Angstrom.
"""
import numpy as np

# Threads of the CPU FFTs that :func:`fft_axis` runs (scipy.fft's ``workers``); the
# engine sets it from ``--j`` (:func:`set_fft_workers`).  CuPy ignores it.
_FFT_WORKERS = 1


def set_fft_workers(n):
    """Use ``n`` (>= 1) threads in the CPU transforms of :func:`fft_axis`."""
    global _FFT_WORKERS
    _FFT_WORKERS = max(1, int(n))


def fft_axis(kind, arr, n, axis):
    """One-axis transform ``kind`` ('fft', 'ifft', 'rfft', 'irfft') of length ``n``
    (input zero-padded or truncated at its end, as numpy's ``n``): scipy.fft with
    :func:`set_fft_workers` threads on the CPU (single precision kept single), the
    array's own ``cupy.fft`` (cached cuFFT plans) on a GPU.  Unnormalised forward,
    ``1 / n`` on the inverse, as numpy."""
    xp = _xp(arr)
    if xp is np:
        import scipy.fft
        return getattr(scipy.fft, kind)(arr, n=n, axis=axis, workers=_FFT_WORKERS)
    return getattr(xp.fft, kind)(arr, n=n, axis=axis)


def rfftn_workers(arr):
    """Unnormalised real-input transform over all axes, uncentred (rfft layout: the last
    axis keeps frequencies ``0 .. n // 2``, the others are in FFT order), with
    :func:`set_fft_workers` threads on the CPU."""
    xp = _xp(arr)
    if xp is np:
        import scipy.fft
        return scipy.fft.rfftn(arr, workers=_FFT_WORKERS)
    return xp.fft.rfftn(arr)


def _xp(arr):
    from .backend import get_xp
    return get_xp(arr)


def fft_centered(arr, axes=None):
    """Centred, unnormalised forward FFT over ``axes`` (default: all axes)."""
    xp = _xp(arr)
    axes = tuple(range(arr.ndim)) if axes is None else tuple(axes)
    return xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(arr, axes=axes), axes=axes), axes=axes)


def ifft_centered(arr, axes=None):
    """Inverse of :func:`fft_centered` (returns the complex result; take ``.real``)."""
    xp = _xp(arr)
    axes = tuple(range(arr.ndim)) if axes is None else tuple(axes)
    return xp.fft.fftshift(xp.fft.ifftn(xp.fft.ifftshift(arr, axes=axes), axes=axes), axes=axes)


def ifft_centered_real(arr, crop=None):
    """Real inverse of a centred, Hermitian-symmetric transform (``F(-k) = F(k)*``):
    the same as ``ifft_centered(arr).real`` with a half-size real transform; with
    ``crop`` = M (even shapes), only the central ``M`` voxels per axis of that result.

    The shifts are folded into slicing: only the half transform that ``irfftn`` reads
    is shifted, and the output is gathered from the unshifted result
    (``fftshift(r)[n/2 - M/2 + i] = r[(i - M/2) mod n]``), so no full-size ``roll``
    of the input or the output is made."""
    xp = _xp(arr)
    n = arr.shape
    # ifftshift along the last axis, kept half: frequencies 0 .. n/2 - 1, then the
    # Nyquist plane (index 0 of the centred grid, -n/2 = +n/2).
    half = xp.concatenate([arr[..., n[-1] // 2:], arr[..., :1]], axis=-1)
    real = xp.fft.irfftn(xp.fft.ifftshift(half, axes=tuple(range(arr.ndim - 1))), s=n)
    m = n if crop is None else (crop,) * arr.ndim
    for axis, (size, keep) in enumerate(zip(n, m)):
        idx = (xp.arange(keep) - keep // 2) % size
        real = xp.take(real, idx, axis=axis)
    return real


def freq_grid(shape, xp=np):
    """Integer frequency coordinates of a centred grid, one array per axis (ij order)."""
    return xp.meshgrid(*[xp.arange(n) - n // 2 for n in shape], indexing="ij")


def radial_index(shape, xp=np):
    """Float radius |k| (in frequency pixels) of every element of a centred grid."""
    grids = freq_grid(shape, xp)
    return xp.sqrt(sum(g.astype(xp.float64) ** 2 for g in grids))


def shell_index(shape, xp=np):
    """Integer shell ``round(|k|)`` of every element of a centred grid."""
    return xp.rint(radial_index(shape, xp)).astype(xp.int64)


def shell_resolution_angstrom(n_shells, box, apix):
    """Resolution (A) of shells 0..n_shells-1 (shell 0 reported as 999 A, as RELION)."""
    s = np.arange(n_shells, dtype=np.float64)
    with np.errstate(divide="ignore"):
        res = np.where(s > 0, box * apix / np.maximum(s, 1e-12), 999.0)
    return res


def resolution_to_shell(res_angstrom, box, apix):
    """Fourier shell (may be fractional) that corresponds to a resolution in A."""
    return box * apix / float(res_angstrom)


def shell_average(values, shells, n_shells, weights=None):
    """Mean of ``values`` per integer shell (0..n_shells-1); empty shells give 0."""
    xp = _xp(values)
    shells = shells.ravel()
    keep = shells < n_shells
    v = values.ravel()[keep]
    sh = shells[keep]
    w = xp.ones_like(v, dtype=xp.float64) if weights is None else weights.ravel()[keep]
    num = xp.bincount(sh, weights=(v * w).astype(xp.float64), minlength=n_shells)
    den = xp.bincount(sh, weights=w.astype(xp.float64), minlength=n_shells)
    return xp.where(den > 0, num / xp.maximum(den, 1e-300), 0.0)


def half_plane_pixels(box, radius, xp=np):
    """The non-redundant half of a centred 2D transform within ``radius`` (pixels).

    Returns ``(ky, kx)`` integer arrays, one entry per kept pixel: ``kx > 0``, or ``kx ==
    0`` and ``ky >= 0``, with ``kx^2 + ky^2 <= radius^2`` and ``|k| < N/2`` on both axes.
    A real image's transform is Hermitian, so these pixels (with the DC term once) carry
    all its information; the E-step and M-step work on this list only.
    """
    half = box // 2
    r = min(float(radius), half - 1e-9)
    k = np.arange(-half, half)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    keep = (kx ** 2 + ky ** 2 <= r * r) & ((kx > 0) | ((kx == 0) & (ky >= 0)))
    # Order by radius so that a prefix of the list is a smaller disc (coarse pass).
    order = np.argsort((kx[keep] ** 2 + ky[keep] ** 2), kind="stable")
    return xp.asarray(ky[keep][order]), xp.asarray(kx[keep][order])


def low_pass(arr, apix, res_angstrom, edge_shells=2.0):
    """Low-pass a centred real image or volume to ``res_angstrom`` with a raised-cosine
    edge ``edge_shells`` wide (in frequency pixels), as RELION's ``--ini_high`` filter."""
    xp = _xp(arr)
    box = arr.shape[0]
    cutoff = resolution_to_shell(res_angstrom, box, apix)
    r = radial_index(arr.shape, xp)
    filt = xp.clip((cutoff + edge_shells / 2 - r) / edge_shells, 0.0, 1.0)
    filt = 0.5 - 0.5 * xp.cos(np.pi * filt)
    return ifft_centered(fft_centered(arr) * filt).real.astype(arr.dtype)
