"""Checks of input values that would otherwise give a silently wrong answer.

A single NaN or Inf pixel in one particle spreads through the reconstruction into every
class map, and a mask outside [0, 1] rescales the density it should only cut; neither
stops a run by itself.  These checks read the values they judge (maps once at start-up,
images block by block as the E-step reads them, so no extra pass over the stacks) and
raise :class:`.errors.CryoClassError` with one line naming the file, the item and the fix.
"""
import numpy as np

from .errors import CryoClassError

#: Tolerance on a mask's range: masks written as float16 or after resampling overshoot
#: [0, 1] by rounding.
MASK_RANGE_TOLERANCE = 1e-3


def check_map_values(vol, path, what="reference map"):
    """A map must be finite and not constant."""
    finite = np.isfinite(vol)
    if not finite.all():
        bad = np.argwhere(~finite)
        z, y, x = (int(v) for v in bad[0])
        raise CryoClassError(f"{path}: the {what} has {len(bad)} non-finite voxel(s) (NaN or "
                             f"Inf; the first at x={x} y={y} z={z}); repair or replace the map")
    if float(np.ptp(vol)) == 0.0:
        raise CryoClassError(f"{path}: the {what} is constant ({float(vol.flat[0]):g} "
                             "everywhere); give a map with density")


def check_mask_values(mask, path, what="solvent mask"):
    """A mask must be finite with values in [0, 1] and not all zero."""
    if not np.isfinite(mask).all():
        check_map_values(mask, path, what)
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -MASK_RANGE_TOLERANCE or hi > 1.0 + MASK_RANGE_TOLERANCE:
        raise CryoClassError(f"{path}: the {what}'s values run from {lo:g} to {hi:g}, not "
                             "0..1; give a mask with values between 0 (solvent) and 1 "
                             "(particle), e.g. from relion_mask_create")
    if hi <= 0.0:
        raise CryoClassError(f"{path}: the {what} is zero everywhere; give a mask that is 1 "
                             "on the particle")


def check_image_block(images, rows, image_names):
    """Images ``(n, N, N)`` of the particles at table ``rows`` (0-based) must be finite
    and not constant; ``image_names`` are the table's ``rlnImageName`` values (all rows)."""
    flat = images.reshape(len(images), -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise CryoClassError(
            f"{image_names[rows[i]]}: particle {rows[i] + 1} of the STAR file has "
            f"{int((~np.isfinite(flat[i])).sum())} non-finite pixel(s) (NaN or Inf) "
            f"({int((~finite).sum())} such particle(s) in this block); remove it from the "
            "STAR file, re-extract it or give --drop_bad_particles")
    constant = np.ptp(flat, axis=1) == 0
    if constant.any():
        i = int(np.flatnonzero(constant)[0])
        raise CryoClassError(
            f"{image_names[rows[i]]}: particle {rows[i] + 1} of the STAR file is constant "
            f"({float(flat[i, 0]):g} everywhere; {int(constant.sum())} such particle(s) in "
            "this block); remove it from the STAR file, re-extract it or give "
            "--drop_bad_particles")


def bad_image_rows(source, block=512):
    """Rows (0-based, sorted) of an :class:`.mrc_io.ImageSource` whose image has a
    non-finite pixel or is constant: one pass over the stacks, ``block`` images at a
    time (``--drop_bad_particles``)."""
    bad = []
    for start in range(0, len(source), block):
        rows = np.arange(start, min(start + block, len(source)))
        flat = source.get(rows).reshape(len(rows), -1)
        finite = np.isfinite(flat).all(axis=1)
        constant = np.zeros(len(rows), bool)
        constant[finite] = np.ptp(flat[finite], axis=1) == 0
        bad.extend(rows[~finite | constant].tolist())
    return np.asarray(bad, dtype=np.int64)


def duplicate_rows(image_names):
    """Groups of 0-based rows that name the same image (``rlnImageName``), as lists."""
    names = np.asarray(image_names, dtype=str)
    _, inverse, counts = np.unique(names, return_inverse=True, return_counts=True)
    groups = [np.flatnonzero(inverse == u).tolist() for u in np.flatnonzero(counts > 1)]
    return sorted(groups)


def duplicate_warning(image_names, path, shown=5):
    """A one-line warning about duplicated particles, or None."""
    groups = duplicate_rows(image_names)
    if not groups:
        return None
    extra = sum(len(g) - 1 for g in groups)
    listed = "; ".join(f"{image_names[g[0]]} at rows {', '.join(str(r + 1) for r in g)}"
                       for g in groups[:shown])
    more = f"; and {len(groups) - shown} more" if len(groups) > shown else ""
    return (f"warning: {path}: {extra} duplicated particle row(s) ({listed}{more}); each "
            "copy counts as a particle of its own: remove duplicates to weigh every "
            "particle once")


def check_class_count(n_particles, n_classes, path):
    """More classes than particles cannot all hold a particle."""
    if n_classes > n_particles:
        raise CryoClassError(f"--K {n_classes}: {path} has only {n_particles} particle(s); "
                             "give at most that many classes")
