"""The starting references of a run: one map for all K classes, or one map per class.

``--ref`` is either an MRC map (every class starts from it) or, as in RELION's
``relion_refine``, a STAR file that lists one map per class: a loop with the column
``rlnReferenceImage`` (RELION looks in a ``model_classes`` block first, then in any
block), row k the map of class k.  RELION then takes K from the list; here ``--K`` must
equal the number of rows (a one-line error otherwise), and, as in RELION, iteration 1
has no random class seeds: each particle is compared with every class's own map.  A map
path in the list is read relative to the working directory (as RELION does), else
relative to the list's own folder.

Each map's voxel size is its header's, or ``--ref_angpix`` (A) where given (RELION's
"pixel size of the input reference", for headers without one or with a wrong one).  A
map whose voxel size differs from the particles' is an error, unless ``--ref_angpix``
was given: then it is resampled to the particles' pixel size and box (Fourier crop/pad,
then real-space crop/pad, :func:`cryoclass_plugin.convert.resample_volume`).
"""
import os

import numpy as np

from .errors import CryoClassError
from .mrc_io import read_map, read_stack_header
from .validation import check_map_values

#: Relative tolerance of a pixel-size match (1 %, as the particles' own check).
APIX_RTOL = 0.01


def several_references(settings):
    """Whether ``--ref`` is a STAR list of one map per class."""
    return str(settings.ref or "").lower().endswith(".star")


def reference_paths(settings):
    """The map path of each class (K entries): ``--ref`` K times, or the STAR list's rows
    (checked: the column, the count against ``--K``, each file's existence)."""
    ref, K = settings.ref, settings.n_classes
    if not several_references(settings):
        return [ref] * K
    from .star_io import read_star
    blocks = read_star(ref)
    names = ["model_classes"] + [n for n in blocks if n != "model_classes"]
    table = next((blocks[n] for n in names if n in blocks and hasattr(blocks[n], "columns")
                  and "rlnReferenceImage" in blocks[n].columns), None)
    if table is None:
        raise CryoClassError(f"--ref {ref}: no loop with rlnReferenceImage; a list of "
                             "references needs one row per class with its map's path "
                             "(RELION's format)")
    paths = [str(p) for p in table["rlnReferenceImage"]]
    if len(paths) != K:
        raise CryoClassError(f"--ref {ref}: lists {len(paths)} maps but --K is {K}; give "
                             f"--K {len(paths)} or list one map per class")
    return [_locate(p, ref) for p in paths]


def _locate(path, star_path):
    """A listed map: relative to the working directory (RELION), else to the list."""
    if os.path.isfile(path):
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(star_path)), path)
    if not os.path.isabs(path) and os.path.isfile(beside):
        return beside
    raise CryoClassError(f"--ref {star_path}: listed map {path} not found (neither from "
                         "the working directory nor beside the list); fix the "
                         "rlnReferenceImage entry")


def _map_apix(settings, header_apix, particles_apix):
    """The voxel size a reference is taken to have (A): ``--ref_angpix``, else its
    header's, else (header without one) the particles'."""
    if settings.ref_angpix > 0:
        return float(settings.ref_angpix)
    return header_apix if header_apix > 0 else float(particles_apix)


def check_references(settings, box, apix):
    """Header checks of every starting map (one-line errors naming the file): cubic, and
    the particles' box and pixel size unless ``--ref_angpix`` asks for resampling."""
    for path in dict.fromkeys(reference_paths(settings)):
        nx, ny, nz, header_apix = read_stack_header(path)
        if not nx == ny == nz:
            raise CryoClassError(f"{path}: reference map is not cubic ({nx}x{ny}x{nz} "
                                 f"voxels); give a {box}^3 map")
        map_apix = _map_apix(settings, header_apix, apix)
        if settings.ref_angpix > 0:
            continue            # resampled to the particles' pixel size and box
        if abs(map_apix - apix) > APIX_RTOL * apix:
            raise CryoClassError(
                f"{path}: reference pixel size {map_apix:g} A does not match the "
                f"particles' {apix:g} A; give --ref_angpix {map_apix:g} to resample it, or "
                "rescale it with relion_image_handler --rescale_angpix")
        if nx != box:
            raise CryoClassError(f"{path}: reference box {nx} does not match the particles' "
                                 f"box {box}; resize it with relion_image_handler --new_box "
                                 f"{box}")


def read_references(settings, box, apix):
    """The K starting maps (K, box, box, box) float32, each at the particles' pixel size
    and box, checked for non-finite or constant values."""
    from ..convert import resample_volume
    maps, cache = [], {}
    for path in reference_paths(settings):
        if path not in cache:
            vol, header_apix = read_map(path)
            check_map_values(vol, path)
            if settings.ref_angpix > 0:
                vol = resample_volume(vol, _map_apix(settings, header_apix, apix), apix, box)
            if vol.shape != (box, box, box):
                raise CryoClassError(f"{path}: reference box {vol.shape[0]} does not match "
                                     f"the particles' box {box}")
            cache[path] = np.asarray(vol, dtype=np.float32)
        maps.append(cache[path])
    return np.stack(maps)
