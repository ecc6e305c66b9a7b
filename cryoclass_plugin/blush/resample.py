"""Fourier crop / pad resampling and the soft spherical mask, on torch tensors (CPU or
CUDA), in the engine's conventions (:mod:`cryoclass_plugin.engine.fourier`): centred,
unnormalised transforms with the zero frequency and the map's centre at index ``N // 2``
of every axis.

Resampling a cubic map of box ``N`` to box ``M`` keeps its physical size (``N apix``) and
changes the voxel size to ``N apix / M``: the transform is cropped (``M < N``, a
perfect low-pass at the new Nyquist) or zero-padded (``M > N``), and multiplied by
``(M / N)^3`` so that voxel values (densities) stay on the same greyscale.  Both boxes
must be even.  The Nyquist planes (index 0 of a centred axis, a frequency that has no
Hermitian mate inside the box) are zeroed, so the result is the real map band-limited to
``|k| < min(N, M) / 2`` on every axis and a crop then a pad (or a pad then a crop) of a
map band-limited so returns it exactly.
"""
import functools
import math

import torch

from ..engine.errors import CryoClassError


def fft_c(x):
    """Centred, unnormalised forward FFT of a real or complex 3D tensor."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims),
                              dim=dims)


def ifft_c(f):
    """Inverse of :func:`fft_c` (complex result)."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f, dim=dims), dim=dims),
                              dim=dims)


@functools.lru_cache(maxsize=8)
def _rfft_radius(box, device):
    fz = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=device)
    fx = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64, device=device)
    return torch.sqrt(fz[:, None, None] ** 2 + fz[None, :, None] ** 2 + fx[None, None, :] ** 2)


def rfft_radius(box, device=None):
    """|k| (frequency pixels) of every element of a ``box``^3 real FFT (``rfftn`` order,
    shape ``(box, box, box // 2 + 1)``); cached per box and device."""
    return _rfft_radius(int(box), torch.device(device or "cpu"))


def radius_grid(box, device=None, dtype=torch.float64):
    """|k| (or |r|, pixels) of every element of a centred ``box``^3 grid."""
    c = torch.arange(box, device=device, dtype=dtype) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.sqrt(z * z + y * y + x * x)


def check_cubic_even(vol, what="map"):
    if vol.dim() != 3 or len(set(vol.shape)) != 1 or vol.shape[0] % 2:
        raise CryoClassError(f"Blush: the {what} must be a cubic 3D map with an even box, "
                             f"got shape {tuple(vol.shape)}")


def _axis_index(n, keep, device):
    """Indices, in an ``n``-point FFT's own order, of the frequencies |k| < keep / 2."""
    half = keep // 2
    return torch.cat([torch.arange(0, half, device=device),
                      torch.arange(n - half + 1, n, device=device)])


def resample(vol, box):
    """Real map ``vol`` (N^3, even N) resampled to ``box``^3 (even) by Fourier crop or
    pad; float64 result on ``vol``'s device.

    Works on the real FFT's own frequency order (no shifts): the frequencies kept are
    ``|k| < min(N, box) / 2`` on every axis (Nyquist planes zeroed), at the same
    positions of both grids.  Voxel 0 stays at physical position 0, so the voxel
    ``N // 2`` (physical ``N apix / 2``) lands on ``box // 2`` (the same point)."""
    check_cubic_even(vol)
    if box % 2:
        raise CryoClassError(f"Blush: resampling target box must be even, got {box}")
    n = vol.shape[0]
    keep = min(n, box)
    f = torch.fft.rfftn(vol.to(torch.float64), dim=(0, 1, 2))
    idx_src = _axis_index(n, keep, vol.device)
    idx_dst = _axis_index(box, keep, vol.device)
    half = keep // 2
    out = torch.zeros((box, box, box // 2 + 1), dtype=f.dtype, device=vol.device)
    part = f[idx_src][:, idx_src][:, :, :half]
    out[idx_dst[:, None, None], idx_dst[None, :, None],
        torch.arange(half, device=vol.device)[None, None, :]] = part
    return torch.fft.irfftn(out, s=(box, box, box), dim=(0, 1, 2)) * (box / n) ** 3


def _smooth(n):
    """True when ``n`` has no prime factor above 7 (a fast FFT size)."""
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def network_box(box, apix, network_apix):
    """Even box of the network grid spanning the same ``box * apix`` A; its voxel size
    is the one closest to ``network_apix`` among even, 7-smooth boxes (fast FFT sizes),
    the input's own box when that is as close; returns ``(box, voxel size)``."""
    ideal = box * apix / network_apix
    cands = [m for m in range(2, 2 * int(ideal) + 8, 2) if _smooth(m) or m == box]
    m = min(cands, key=lambda c: (abs(c - ideal), c != box))
    return m, box * apix / m


def soft_sphere(box, radius_px, edge_px, device=None):
    """Soft spherical mask (float64, centred at ``box // 2``): 1 inside ``radius_px``,
    raised-cosine edge ``edge_px`` wide, 0 beyond (RELION's ``softMaskOutsideMap``)."""
    r = radius_grid(box, device=device)
    if edge_px <= 0:
        return (r <= radius_px).to(torch.float64)
    t = torch.clamp((r - radius_px) / float(edge_px), 0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def centre_crop_or_pad(vol, box):
    """The centred ``box``^3 region of a real map (zero-padded where it is larger);
    the voxel at ``N // 2`` goes to ``box // 2``."""
    n = vol.shape[-1]
    if box == n:
        return vol
    if box < n:
        lo = n // 2 - box // 2
        return vol[lo:lo + box, lo:lo + box, lo:lo + box]
    out = torch.zeros((box,) * 3, dtype=vol.dtype, device=vol.device)
    lo = box // 2 - n // 2
    out[lo:lo + n, lo:lo + n, lo:lo + n] = vol
    return out
