"""The one STAR module: RELION 3.0, 3.1 and 5.0 in, RELION 3.1 layout out.

Used by the engine, the Scipion conversion (``convert.py``) and the run reader
(``runresults.py``).  :func:`read_star` reads any STAR file into
``{block name without 'data_': DataFrame (loop) | dict (key/value block)}``.

Particle tables (:func:`read_particles`) are accepted in these layouts:

RELION 3.0
    one loop (``data_`` or ``data_images``/``data_particles``) with every column per
    particle; origins ``rlnOriginX/Y`` in pixels; pixel size from ``rlnImagePixelSize``,
    else ``rlnDetectorPixelSize * 1e4 / rlnMagnification`` (um, magnification).  The box
    comes from the first stack's header.
RELION 3.1+
    ``data_optics`` and ``data_particles``; the optics columns are merged onto the
    particles by ``rlnOpticsGroup``; ``rlnImageSize`` is checked against the first stack.
    The optics table is kept as read (:attr:`ParticleTable.optics`) and written back
    unchanged, CtfRefine's columns included (``rlnBeamTiltX/Y`` in mrad,
    ``rlnMagMat00..11``, the vectors ``rlnOddZernike`` / ``rlnEvenZernike`` as their
    text ``[c0,c1,...]``).  With ``require_ctf`` the terms the engine's CTF cannot apply
    are refused (:func:`.ctf.optics_terms`).
RELION 5.0
    the 3.1 layout with more columns; other blocks (``data_general``...) are ignored.

The returned :class:`ParticleTable` always has the columns of ``OPTIONAL_DEFAULTS`` and
``NO_CTF_DEFAULTS`` (missing ones filled with RELION's defaults), origins in Angstrom
(``rlnOriginXAngst``/``rlnOriginYAngst``, RELION's sign: the image is the projection
shifted by minus the origin), defoci in Angstrom, angles in degrees.

Image names (``NNNNNN@stack.mrcs``): relative stack paths are resolved from the current
working directory first (RELION's convention), then from the STAR file's folder (the
convention of files written next to their stacks).  Output STAR files get names that
resolve from the working directory (:func:`output_image_names`), as RELION writes them.

Writing (:func:`write_particles`, :func:`write_star`) produces RELION 3.1 files
(``# version 30001`` before each block, ``_rlnLabel #i`` headers), atomically.  Numbers
are written with 10 significant digits so that small values (noise spectra) survive.

Every problem with the input raises a one-line :class:`CryoClassError` naming the file,
the field and the fix.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from .atomic import replacing
from .errors import CryoClassError
from .mrc_io import read_stack_header

STAR_VERSION_LINE = "# version 30001"

# Columns read as text even if they look numeric.
STRING_COLUMNS = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName", "rlnGroupName",
                  "rlnImageOriginalName", "rlnCtfImage", "rlnReferenceImage",
                  "rlnMtfFileName",
                  # RELION's vector columns ([c0,c1,...], radians), kept as written
                  "rlnOddZernike", "rlnEvenZernike"]

# Columns the engine and the Scipion conversion read as numbers: a value that is not a
# number in one of them is an error naming its row.
NUMERIC_COLUMNS = [
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
    "rlnCtfScalefactor", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
    "rlnOriginXAngst", "rlnOriginYAngst", "rlnImagePixelSize", "rlnDetectorPixelSize",
    "rlnMagnification", "rlnImageSize", "rlnImageDimensionality", "rlnOpticsGroup",
    "rlnMicrographOriginalPixelSize", "rlnClassNumber", "rlnCoordinateX", "rlnCoordinateY",
    "rlnCtfDataArePhaseFlipped", "rlnCtfDataAreCtfPremultiplied", "rlnNormCorrection",
    "rlnRandomSubset", "rlnImageId",
    # optics-group aberrations (CtfRefine): beam tilt (mrad), magnification matrix
    "rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10",
    "rlnMagMat11",
]
# Optional per-particle columns and the value RELION assumes when they are absent.
OPTIONAL_DEFAULTS = {
    "rlnOriginXAngst": 0.0,
    "rlnOriginYAngst": 0.0,
    "rlnAngleRot": 0.0,
    "rlnAngleTilt": 0.0,
    "rlnAnglePsi": 0.0,
    "rlnPhaseShift": 0.0,
    "rlnCtfBfactor": 0.0,
    "rlnCtfScalefactor": 1.0,
    "rlnDefocusAngle": 0.0,
}
# Microscope defaults used only when the table has no CTF at all (the values never matter
# then, but downstream code may read the columns).
NO_CTF_DEFAULTS = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
                   "rlnAmplitudeContrast": 0.1, "rlnDefocusU": 0.0, "rlnDefocusV": 0.0}
CTF_MICROSCOPE_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# Columns the engine's optics groups carry when we write a 3.1 file.
OPTICS_COLUMNS = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize",
                  "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]


@dataclass
class ParticleTable:
    """A particle STAR table with optics merged on.

    df       one row per particle (pandas); see the module docstring for the columns.
    optics   the ``data_optics`` table (None for RELION 3.0 input).
    path     the STAR file (``NNNNNN@stack`` names are resolved from the working
             directory, then from its folder: :func:`resolve_stack_paths`).
    version  '3.0' or '3.1' (3.1 also for RELION 4/5 files).
    box      image size in pixels (square).
    apix     pixel size of the images in Angstrom.
    has_ctf  whether the table has CTF parameters (``rlnDefocusU``).
    has_angles  whether the file gave orientations (``rlnAngleRot/Tilt/Psi``); without
             them ``df`` holds RELION's defaults (0), not poses.
    """
    df: pd.DataFrame
    optics: Optional[pd.DataFrame]
    path: Optional[str]
    version: str
    box: int
    apix: float
    has_ctf: bool
    has_angles: bool = True
    _resolved: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self):
        return len(self.df)

    def stack_locations(self):
        """Where each row's image is: ``(frames int64 (n,) 1-based, stack ids int64 (n,),
        stack paths (list, one per id, as found by :func:`resolve_stack_paths`))``.
        Stacks are looked up once per table (the answers are kept)."""
        frames, names = parse_image_names(self.df["rlnImageName"], self.path)
        unique, ids = np.unique(np.asarray(names, dtype=object).astype(str),
                                return_inverse=True)
        todo = [n for n in unique if n not in self._resolved]
        self._resolved.update(zip(todo, resolve_stack_paths(todo, self.path)))
        return frames, ids.astype(np.int64), [self._resolved[n] for n in unique]

    def optics_table(self):
        """The optics table to write this set in RELION 3.1 layout (built from the merged
        columns for 3.0 input)."""
        if self.optics is not None:
            optics = self.optics.copy()
        else:
            optics = optics_group_table(self.apix, self.box,
                                        voltage=float(self.df["rlnVoltage"].iloc[0]),
                                        cs=float(self.df["rlnSphericalAberration"].iloc[0]),
                                        q0=float(self.df["rlnAmplitudeContrast"].iloc[0]))
        return optics

    def particles_table(self):
        """Particle columns only (optics columns dropped), for :func:`write_particles`."""
        optics = self.optics_table()
        drop = [c for c in optics.columns if c != "rlnOpticsGroup" and c in self.df.columns]
        drop += [c for c in ("rlnOriginX", "rlnOriginY", "rlnDetectorPixelSize",
                             "rlnMagnification") if c in self.df.columns]
        return self.df.drop(columns=drop)


def optics_group_table(apix, box, voltage=300.0, cs=2.7, q0=0.1, n_groups=1):
    """A RELION 3.1 ``data_optics`` table with ``n_groups`` identical groups."""
    return pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(n_groups)],
        "rlnOpticsGroup": np.arange(1, n_groups + 1),
        "rlnMicrographOriginalPixelSize": [float(apix)] * n_groups,
        "rlnVoltage": [float(voltage)] * n_groups,
        "rlnSphericalAberration": [float(cs)] * n_groups,
        "rlnAmplitudeContrast": [float(q0)] * n_groups,
        "rlnImagePixelSize": [float(apix)] * n_groups,
        "rlnImageSize": [int(box)] * n_groups,
        "rlnImageDimensionality": [2] * n_groups,
    })


# ----------------------------------------------------------------------------- reading

def read_star(star_path, raw_columns=None):
    """All blocks of a STAR file: ``{name without 'data_': DataFrame (loop) | dict
    (key/value block)}``; a lone ``data_`` block is named ``''``.

    The columns in ``STRING_COLUMNS`` and ``raw_columns`` (labels without ``_``) are kept
    as the exact text of the file.  Raises a one-line :class:`CryoClassError` for a
    missing or unparsable file."""
    import starfile
    path = os.fspath(star_path)
    if not os.path.isfile(path):
        raise CryoClassError(f"{path}: STAR file not found (no such file); check the path")
    try:
        blocks = starfile.read(path, always_dict=True,
                               parse_as_string=STRING_COLUMNS + list(raw_columns or []))
    except Exception as exc:  # starfile raises many kinds on bad input
        raise CryoClassError(f"{path}: cannot parse as a STAR file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); check that "
                             "it is a RELION STAR file") from None
    if not isinstance(blocks, dict):
        blocks = {"": blocks}
    return {block_key(name): block for name, block in blocks.items()}


def block_key(name):
    """``'data_model_class_1'`` / ``'model_class_1'`` -> ``'model_class_1'``."""
    name = str(name).strip()
    return name[5:] if name.startswith("data_") else name


def particle_block(blocks, path):
    """``(name, DataFrame)`` of the particle loop: ``data_particles`` (RELION 3.1+), else
    the first loop with ``rlnImageName`` (RELION 3.0's ``data_``/``data_images``)."""
    if isinstance(blocks.get("particles"), pd.DataFrame):
        return "particles", blocks["particles"]
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and "rlnImageName" in block.columns:
            return name, block
    names = ", ".join(f"data_{n}" for n in blocks) or "none"
    raise CryoClassError(f"{path}: no data_particles block (nor any loop with rlnImageName); "
                         f"blocks found: {names}; give a RELION particle STAR file")


def _require_columns(df, columns, path, block, fix):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CryoClassError(f"{path}: data_{block} lacks column {', '.join(missing)}; {fix}")


def _numeric_columns(df, path, block):
    """Convert the ``NUMERIC_COLUMNS`` of a loop to numbers; the first value that is not
    a number raises a one-line error naming the file, block, row (1-based) and column."""
    for col in [c for c in NUMERIC_COLUMNS if c in df.columns]:
        if pd.api.types.is_numeric_dtype(df[col]):
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        text = df[col].astype(str).str.strip().str.lower()
        bad = values.isna().to_numpy() & ~text.isin(["nan", "inf", "-inf"]).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CryoClassError(f"{path}: data_{block} row {row + 1} has {col} = "
                                 f"'{df[col].iloc[row]}', not a number; fix that value")
        df[col] = values
    return df


def _pixel_size_from_columns(df):
    """Per-row pixel size from rlnImagePixelSize or detector pixel size / magnification."""
    if "rlnImagePixelSize" in df.columns:
        return df["rlnImagePixelSize"].to_numpy(np.float64)
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        return (df["rlnDetectorPixelSize"].to_numpy(np.float64) * 1e4
                / df["rlnMagnification"].to_numpy(np.float64))
    return None


def _same_across_groups(df, values, path, field, fix):
    """The one value of ``field`` shared by all optics groups in use, else an error."""
    per_group = pd.Series(np.asarray(values, dtype=np.float64)).groupby(
        df["rlnOpticsGroup"].to_numpy()).first()
    lo, hi = per_group.idxmin(), per_group.idxmax()
    if per_group[hi] - per_group[lo] > 1e-3 * max(abs(per_group[lo]), 1e-12):
        raise CryoClassError(f"{path}: optics groups {lo} and {hi} have different {field} "
                             f"({per_group[lo]:g} vs {per_group[hi]:g}); {fix}")
    return float(per_group.iloc[0])


def _single_value(values, path, block, field, fix):
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo > 1e-3 * max(abs(lo), 1e-12):
        raise CryoClassError(f"{path}: {field} differs between rows of data_{block} "
                             f"({lo:g} to {hi:g}); {fix}")
    return float(values[0])


def _layout_31(particles, optics, path, apix):
    """RELION 3.1+: merged table, pixel size (A; ``apix`` when given) and box (pixels,
    None if the table has no rlnImageSize)."""
    df = _merge_optics(particles, optics, path)
    apix_rows = _pixel_size_from_columns(df)
    if apix is not None:
        apix = float(apix)
    elif apix_rows is None:
        raise CryoClassError(f"{path}: data_optics lacks column rlnImagePixelSize; add it "
                             "(the particle images' pixel size in A) to data_optics")
    else:
        apix = _same_across_groups(df, apix_rows, path, "rlnImagePixelSize",
                                   "classify each pixel size separately or rescale the "
                                   "particles to one pixel size")
    box = None
    if "rlnImageSize" in df.columns:
        box = int(round(_same_across_groups(df, df["rlnImageSize"], path, "rlnImageSize",
                                            "re-extract all optics groups with one box "
                                            "size")))
    return df, apix, box


def _layout_30(df, path, block_name, apix):
    """RELION 3.0: one loop; pixel size (A; ``apix`` when given, else from the columns);
    box from the table if it has rlnImageSize (else None)."""
    if "rlnOpticsGroup" not in df.columns:
        df["rlnOpticsGroup"] = 1
    apix_rows = _pixel_size_from_columns(df)
    if apix is not None:
        apix = float(apix)
    elif apix_rows is None:
        raise CryoClassError(f"{path}: RELION 3.0 table data_{block_name} has no pixel size; "
                             "add the columns rlnDetectorPixelSize (um) and rlnMagnification, "
                             "or a data_optics table with rlnImagePixelSize (A)")
    else:
        apix = _single_value(apix_rows, path, block_name,
                             "rlnDetectorPixelSize*1e4/rlnMagnification",
                             "classify each pixel size separately")
    box = int(df["rlnImageSize"].iloc[0]) if "rlnImageSize" in df.columns else None
    return df, apix, box


def _box_from_first_stack(df, path, table_box):
    """The box of the first stack's images; checks it against the table's rlnImageSize."""
    _, names = parse_image_names(df["rlnImageName"].iloc[:1], path)
    first = resolve_stack_paths([names[0]], path)[0]
    nx, ny, _, _ = read_stack_header(first)
    if nx != ny:
        raise CryoClassError(f"{first}: images are not square ({nx}x{ny} pixels); "
                             "re-extract the particles with a square box")
    if table_box is not None and table_box != nx:
        raise CryoClassError(f"{path}: rlnImageSize {table_box} does not match the images "
                             f"of {first} ({nx}x{ny} pixels); set rlnImageSize to {nx}")
    return nx


def _fill_defaults(df, path, block_name, version, require_ctf):
    """CTF checks and RELION's defaults for absent optional columns; returns has_ctf,
    has_angles."""
    has_ctf = "rlnDefocusU" in df.columns
    if require_ctf and not has_ctf:
        raise CryoClassError(f"{path}: data_{block_name} lacks column rlnDefocusU but CTF "
                             "correction is on; run CTF estimation first or drop --ctf "
                             "(no CTF correction)")
    if has_ctf:
        if "rlnDefocusV" not in df.columns:
            df["rlnDefocusV"] = df["rlnDefocusU"]
        missing = [c for c in CTF_MICROSCOPE_COLUMNS if c not in df.columns]
        if missing:
            where = "data_optics" if version == "3.1" else f"data_{block_name}"
            raise CryoClassError(f"{path}: {where} lacks column {', '.join(missing)} needed "
                                 "for the CTF; add the microscope settings (voltage kV, Cs "
                                 "mm, amplitude contrast)")
    for col, value in NO_CTF_DEFAULTS.items():
        if col not in df.columns:
            df[col] = value
    has_angles = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(df.columns)
    for col, value in OPTIONAL_DEFAULTS.items():
        if col not in df.columns:
            df[col] = value
    if "rlnMicrographName" not in df.columns:
        # RELION groups noise spectra by micrograph; the stack is the best proxy we have.
        _, names = parse_image_names(df["rlnImageName"], path)
        df["rlnMicrographName"] = names
    return has_ctf, has_angles


def read_particles(star_path, apix=None, require_ctf=False, check_stacks=True):
    """Read a particle STAR file (RELION 3.0, 3.1 or 5.0) into a :class:`ParticleTable`.

    apix
        pixel size (A) to use instead of the table's (Python API only; the table must
        still be readable: 3.0 files without a pixel size need it).
    require_ctf
        raise unless the table has CTF parameters (``rlnDefocusU``, and for 3.0 the
        microscope columns).
    check_stacks
        read the first stack's header: the box of 3.0 files, and a check of
        ``rlnImageSize`` against the images (False: the stacks need not exist, e.g. to
        read a run's data.star elsewhere; 3.0 files without rlnImageSize still need it).
    """
    path = os.fspath(star_path)
    blocks = read_star(path)
    block_name, particles = particle_block(blocks, path)
    particles = particles.copy()
    _require_columns(particles, ["rlnImageName"], path, block_name,
                     "every particle needs its image as NNNNNN@stack.mrcs")
    if len(particles) == 0:
        raise CryoClassError(f"{path}: data_{block_name} has no particles; give a "
                             "non-empty particle STAR file")
    particles = _numeric_columns(particles, path, block_name)
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame):
        version = "3.1"
        optics = _numeric_columns(optics.copy(), path, "optics")
        df, table_apix, box = _layout_31(particles, optics, path, apix)
    else:
        version, optics = "3.0", None
        df, table_apix, box = _layout_30(particles, path, block_name, apix)
    if not table_apix > 0:
        raise CryoClassError(f"{path}: pixel size {table_apix:g} A is not positive; fix "
                             "rlnImagePixelSize (or rlnDetectorPixelSize/rlnMagnification)")
    if box is None or check_stacks:
        box = _box_from_first_stack(df, path, box)
    # Origins: Angstrom (3.1) or pixels (3.0).
    for axis in ("X", "Y"):
        ang, px = f"rlnOrigin{axis}Angst", f"rlnOrigin{axis}"
        if ang not in df.columns and px in df.columns:
            df[ang] = df[px].to_numpy(np.float64) * table_apix
    has_ctf, has_angles = _fill_defaults(df, path, block_name, version, require_ctf)
    if require_ctf:
        _check_optics_terms(df, path)
    df["rlnImagePixelSize"] = table_apix
    df["rlnImageSize"] = int(box)
    df["rlnOpticsGroup"] = df["rlnOpticsGroup"].astype(np.int64)
    df = df.reset_index(drop=True)
    return ParticleTable(df=df, optics=optics, path=path, version=version, box=int(box),
                         apix=float(table_apix), has_ctf=bool(has_ctf),
                         has_angles=has_angles)


def _check_optics_terms(df, path):
    """Refuse, in one line naming the file, optics group and field, the optics-group
    terms the engine's CTF cannot apply (:func:`.ctf.optics_terms`)."""
    from .ctf import optics_terms
    try:
        optics_terms(df)
    except CryoClassError as exc:
        raise CryoClassError(f"{path}: {exc}") from None


def _merge_optics(particles, optics, path):
    _require_columns(optics, ["rlnOpticsGroup"], path, "optics",
                     "every optics group needs its number")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) == 1:
            particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        else:
            raise CryoClassError(f"{path}: data_particles lacks column rlnOpticsGroup with "
                                 f"{len(optics)} optics groups; add rlnOpticsGroup")
    known = set(optics["rlnOpticsGroup"].astype(np.int64))
    groups = particles["rlnOpticsGroup"].astype(np.int64)
    unknown = sorted(set(groups) - known)
    if unknown:
        raise CryoClassError(f"{path}: rlnOpticsGroup {unknown[0]} of data_particles is not "
                             "in data_optics; add the group to data_optics or fix the "
                             "particles' rlnOpticsGroup")
    # Particle columns win over optics columns of the same name (RELION allows either).
    extra = [c for c in optics.columns if c == "rlnOpticsGroup" or c not in particles.columns]
    opt = optics[extra].copy()
    opt["rlnOpticsGroup"] = opt["rlnOpticsGroup"].astype(np.int64)
    particles["rlnOpticsGroup"] = groups.to_numpy()
    merged = particles.merge(opt, on="rlnOpticsGroup", how="left", sort=False)
    return merged


# ----------------------------------------------------------------------------- image names

def parse_image_names(image_names, star_path=None):
    """Split ``NNNNNN@stack.mrcs`` names: returns ``(frames int64 (n,) 1-based,
    stack names (n,) as written)``; a name without '@' is image 1 of that file."""
    s = pd.Series(np.asarray(image_names, dtype=object)).astype(str)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna().to_numpy()
    stacks = np.where(has_at, parts[1].fillna("").to_numpy(dtype=object),
                      parts[0].to_numpy(dtype=object))
    frames = np.ones(len(s), dtype=np.int64)
    if has_at.any():
        idx = pd.to_numeric(parts[0][has_at], errors="coerce")
        if idx.isna().any():
            bad = s[has_at][idx.isna()].iloc[0]
            raise CryoClassError(f"{star_path}: rlnImageName '{bad}' is not "
                                 "NNNNNN@stack.mrcs; fix rlnImageName")
        frames[has_at] = idx.to_numpy().astype(np.int64)
    return frames, stacks


def resolve_stack_paths(names, star_path=None):
    """Find each stack named in a STAR file; returns normalised paths.

    A relative name is looked up from the current working directory first (RELION's
    convention: names are relative to the folder the job runs in), then from the STAR
    file's folder (names written relative to the STAR file, as Scipion's conversion
    does).  Raises a one-line error naming the STAR file, the first missing stack and
    both places looked."""
    star_dir = os.path.dirname(os.path.abspath(star_path)) if star_path else os.getcwd()
    out = []
    for name in names:
        name = str(name)
        if os.path.isabs(name):
            candidates = [name]
        else:
            candidates = [os.path.join(os.getcwd(), name), os.path.join(star_dir, name)]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            looked = " nor ".join(dict.fromkeys(os.path.normpath(c) for c in candidates))
            raise CryoClassError(f"{star_path}: rlnImageName stack '{name}' not found (looked "
                                 f"for {looked}); fix the path or run from the folder the "
                                 "names are relative to")
        out.append(os.path.normpath(found))
    return out


def output_image_names(table, folder=None):
    """``table``'s ``rlnImageName`` values rewritten so that they resolve from ``folder``
    (default: the current working directory, where RELION writes names relative to):
    ``NNNNNN@<stack path relative to folder>``, or the plain path for single images.

    Use it for the image names of any output STAR file, so that the file is a valid
    input to the next job run from the same folder."""
    folder = os.path.abspath(folder or os.getcwd())
    frames, stacks, paths = table.stack_locations()
    rel = np.array([os.path.relpath(p, folder) for p in paths], dtype=object)[stacks]
    has_at = table.df["rlnImageName"].astype(str).str.contains("@").to_numpy()
    return np.where(has_at, [f"{f:06d}@{r}" for f, r in zip(frames, rel)], rel)


# ----------------------------------------------------------------------------- writing

def _format_value(value):
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _float_strings(np.array([value], dtype=np.float64))[0]
    text = str(value)
    return f'"{text}"' if (not text or any(ch.isspace() for ch in text)) else text


def _float_strings(values):
    """Format a float column: RELION's fixed '%.6f' when that keeps at least 5
    significant digits for every value, else '%.10g' (noise spectra, likelihoods)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    fixed = finite.size == 0 or (finite.min() >= 0.01 and finite.max() < 1e12)
    fmt = "%.6f" if fixed else "%.10g"
    return [fmt % v for v in values.tolist()]


def _column_strings(series):
    if pd.api.types.is_bool_dtype(series):
        return series.astype(np.int64).astype(str).tolist()
    if pd.api.types.is_integer_dtype(series):
        return series.astype(np.int64).astype(str).tolist()
    if pd.api.types.is_float_dtype(series):
        return _float_strings(series.to_numpy(np.float64))
    out = []
    for value in series.tolist():
        if isinstance(value, (float, np.floating, bool, np.bool_)):
            out.append(_format_value(value))
            continue
        text = str(value).replace("\n", " ")
        out.append(f'"{text}"' if (not text or any(ch.isspace() for ch in text)) else text)
    return out


def _loop_text(name, df):
    lines = [STAR_VERSION_LINE, "", f"data_{name}", "", "loop_"]
    lines += [f"_{col} #{i}" for i, col in enumerate(df.columns, 1)]
    columns = [_column_strings(df[col]) for col in df.columns]
    rows = [" ".join(fields) for fields in zip(*columns)] if columns else []
    return "\n".join(lines + rows) + "\n\n"


def _pairs_text(name, pairs):
    lines = [STAR_VERSION_LINE, "", f"data_{name}", ""]
    width = max((len(k) for k in pairs), default=0) + 2
    lines += [f"_{k:<{width}}{_format_value(v)}" for k, v in pairs.items()]
    return "\n".join(lines) + "\n\n"


def star_text(blocks):
    """The STAR text of ``blocks`` (``{name: DataFrame | dict}``), RELION 3.1 style."""
    parts = []
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            parts.append(_loop_text(name, block))
        elif isinstance(block, dict):
            parts.append(_pairs_text(name, block))
        else:
            raise TypeError(f"STAR block '{name}' must be a DataFrame or a dict, "
                            f"not {type(block).__name__}")
    return "\n".join(parts)


def _atomic_write_text(path, text):
    with replacing(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def write_star(path, blocks):
    """Write ``blocks`` (``{name: DataFrame (loop) | dict (key/value block)}``) to
    ``path`` atomically (tmp file + ``os.replace``)."""
    _atomic_write_text(path, star_text(blocks))


def write_particles(path, optics_df, particles_df):
    """Write a RELION 3.1 particle file (``data_optics`` + ``data_particles``) atomically.

    ``optics_df`` may be None for a table without optics groups (written as one 3.0-style
    ``data_particles`` loop -- only for intermediate files; RELION 3.1 wants optics).
    """
    blocks = {}
    if optics_df is not None:
        blocks["optics"] = optics_df
    blocks["particles"] = particles_df
    write_star(path, blocks)
