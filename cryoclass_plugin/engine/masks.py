"""Soft spherical / circular masks (RELION's raised-cosine edge) and resolution helpers.

Grids follow the engine convention: the centre is the element at index ``N // 2`` on every
axis and distances are in pixels.  A mask is 1 for ``r <= radius``, 0 for
``r >= radius + edge``, and ``0.5 + 0.5 cos(pi (r - radius) / edge)`` in between, as
RELION's ``softMaskOutsideMap`` (``--particle_diameter`` / 2 as the radius and
``width_mask_edge`` 5 pixels by default).
"""
from functools import lru_cache

import numpy as np

from .fourier import resolution_to_shell, shell_resolution_angstrom


def _radius_grid(box, ndim, xp):
    coords = xp.arange(box, dtype=xp.float64) - box // 2
    grids = xp.meshgrid(*([coords] * ndim), indexing="ij")
    return xp.sqrt(sum(g * g for g in grids))


def raised_cosine(r, radius_px, edge_px, xp=np):
    """The raised-cosine profile at distances ``r`` (pixels): 1 inside ``radius_px``, 0
    beyond ``radius_px + edge_px`` (a hard edge when ``edge_px <= 0``)."""
    if edge_px <= 0:
        return (r <= radius_px).astype(xp.float64)
    t = xp.clip((r - radius_px) / float(edge_px), 0.0, 1.0)
    return 0.5 + 0.5 * xp.cos(np.pi * t)


def soft_sphere_mask(box, radius_px, edge_px=5.0, xp=np):
    """3D soft spherical mask ``(box, box, box)`` float32, centred at ``box // 2``."""
    return raised_cosine(_radius_grid(box, 3, xp), radius_px, edge_px, xp).astype(xp.float32)


def soft_circle_mask(box, radius_px, edge_px=5.0, xp=np):
    """2D soft circular mask ``(box, box)`` float32, centred at ``box // 2``."""
    return raised_cosine(_radius_grid(box, 2, xp), radius_px, edge_px, xp).astype(xp.float32)


def particle_diameter_to_radius_px(diameter_angstrom, apix):
    """Mask radius in pixels for RELION's ``--particle_diameter`` (A): ``d / (2 apix)``."""
    return float(diameter_angstrom) / (2.0 * float(apix))


def apply_soft_mask(arr, radius_px, edge_px=5.0, fill="zero"):
    """Mask the last 2 (images) or 3 (volumes, if ``arr.ndim == 3`` and cubic) axes.

    ``fill='zero'`` multiplies by the mask (RELION's ``--zero_mask``); ``fill='background'``
    blends towards the mean of the solvent (weights ``1 - mask``) of each image, as
    RELION does for images when the mask is not zero-filled.  Works on numpy and cupy.
    """
    from .backend import get_xp
    xp = get_xp(arr)
    box = arr.shape[-1]
    spatial = 3 if (arr.ndim == 3 and arr.shape[0] == box == arr.shape[1]) else 2
    mask = raised_cosine(_radius_grid(box, spatial, xp), radius_px, edge_px, xp)
    mask = mask.astype(arr.dtype if arr.dtype.kind == "f" else xp.float32)
    if fill == "zero":
        return arr * mask
    if fill != "background":
        raise ValueError(f"fill must be 'zero' or 'background', not {fill!r}")
    axes = tuple(range(arr.ndim - spatial, arr.ndim))
    solvent = 1.0 - mask
    bg = (arr * solvent).sum(axis=axes, keepdims=True) / max(float(solvent.sum()), 1e-12)
    return arr * mask + bg * solvent


def resolution_to_radius_px(res_angstrom, box, apix):
    """Fourier radius in frequency pixels of a resolution (A); alias kept next to masks
    because masks and resolution limits are set together."""
    return resolution_to_shell(res_angstrom, box, apix)


def nyquist_angstrom(apix):
    """Nyquist resolution (A) for pixel size ``apix``."""
    return 2.0 * float(apix)


# ----------------------------------------------------------------------------- automatic mask

#: Connected pieces of the thresholded map smaller than this fraction of the largest are
#: dropped from an automatic mask (at a 15 A low-pass a particle is one piece; what else
#: crosses a 3-sigma threshold is noise, a few voxels a piece).
MIN_ISLAND_FRACTION = 0.05


def auto_solvent_mask(volume, apix, inside, threshold_sigma=3.0, lowpass_angst=15.0,
                      extend_angst=8.0, edge_angst=12.0, two_sided=False):
    """A soft mask around the density of ``volume`` (N, N, N), computed from the map
    itself, as a RELION user makes one with ``relion_mask_create`` (low-pass, threshold,
    extend, soft edge), with the threshold set from the map's own noise:

    1. low-pass the map to ``lowpass_angst`` (so that the mask follows domains, not
       single noisy voxels);
    2. inside the particle mask ``inside`` (> 0.5), take the median ``m`` and the robust
       spread ``s = 1.4826 * MAD`` of the values: most voxels of a particle mask are
       solvent, so they measure the noise;
    3. the density is where the low-passed map exceeds ``m + threshold_sigma * s``,
       without its islands of less than ``MIN_ISLAND_FRACTION`` of the largest
       connected piece (noise that crossed the threshold: a few voxels each);
    4. extend it by ``extend_angst`` and add a raised-cosine edge ``edge_angst`` wide
       (distances from the thresholded voxels, in A);
    5. multiply by ``inside``, so the mask never reaches beyond the particle mask.

    ``two_sided``: step 3 takes the values below ``m - threshold_sigma * s`` too (a
    difference of two maps, where density left as well as where it came).

    Returns a float32 (N, N, N) array in [0, 1] on the array module of ``volume`` (the
    distance transform runs on the host: scipy).  A map with no voxel over the threshold
    (a flat or pure-noise map) gives ``inside`` itself.
    """
    from scipy.ndimage import distance_transform_edt, label
    from .backend import get_xp, to_numpy
    from .fourier import low_pass
    xp = get_xp(volume)
    smooth = to_numpy(low_pass(xp.asarray(volume, dtype=xp.float64), apix, lowpass_angst,
                               edge_shells=2.0))
    inside_h = np.asarray(to_numpy(inside), dtype=np.float64)
    values = smooth[inside_h > 0.5]
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    excess = np.abs(smooth - median) if two_sided else smooth - median
    density = (excess > threshold_sigma * spread) & (inside_h > 0.5)
    if spread <= 0 or not density.any():
        return xp.asarray(inside_h.astype(np.float32))
    pieces, _ = label(density)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    keep = sizes >= MIN_ISLAND_FRACTION * sizes.max()
    density = keep[pieces]
    distance_angst = distance_transform_edt(~density) * float(apix)
    soft = raised_cosine(distance_angst, float(extend_angst), float(edge_angst), np)
    return xp.asarray((soft * inside_h).astype(np.float32))


def flatten_inside(vol, mask2, xp=np):
    """RELION's second solvent mask (``--solvent_mask2``): where ``mask2`` is 1 the map
    takes the ``mask2``-weighted average density of that region, with a soft blend at
    its edge: ``(1 - m) vol + m avg``, ``avg = sum(m vol) / sum(m)`` (RELION's
    ``softMaskOutsideMap`` with the mask inverted).  Used e.g. to give a virus's
    interior one constant level above the solvent's."""
    m = xp.asarray(mask2, dtype=vol.dtype)
    weight = float(m.sum())
    if weight <= 0:
        return vol
    level = float((m * vol).sum()) / weight
    return (1 - m) * vol + m * level


@lru_cache(maxsize=2)
def read_secondary_mask(path):
    """The ``--solvent_mask2`` map (read once per run and path), float32."""
    from .mrc_io import read_map
    mask, _ = read_map(path)
    return np.clip(mask, 0, 1).astype(np.float32)


def flatten_solvent(vol, solvent_mask, solvent_mask2_path="", xp=np):
    """``--flatten_solvent``: the map times the solvent mask, then, with
    ``--solvent_mask2``, the second mask's region set to its own average
    (:func:`flatten_inside`), in RELION's order."""
    vol = vol * solvent_mask
    if solvent_mask2_path:
        vol = flatten_inside(vol, read_secondary_mask(solvent_mask2_path), xp)
    return vol


__all__ = ["raised_cosine", "flatten_inside", "flatten_solvent", "read_secondary_mask", "auto_solvent_mask", "soft_sphere_mask", "soft_circle_mask",
           "particle_diameter_to_radius_px", "apply_soft_mask", "resolution_to_radius_px",
           "nyquist_angstrom", "shell_resolution_angstrom"]
