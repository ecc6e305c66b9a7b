"""Scipion objects <-> RELION STAR tables, for the cryoclass protocols.

Particles are written in RELION 3.1 layout (``data_optics`` + ``data_particles``), the
layout ``cryoclass refine --i`` reads, and results are read back from the engine's
``<o>_itNNN_data.star`` / ``_model.star`` (RELION's names).

Geometry (checked by tests/test_protocols.py against the engine's own matrices):

* Angles: RELION's ZYZ Euler angles (rot, tilt, psi) in degrees; ``A`` = RELION's
  matrix (:func:`cryoclass_plugin.engine.geometry.euler_to_matrix`).
* Origins: ``rlnOriginXAngst``/``YAngst`` in Angstrom, RELION's sign (the image is the
  projection shifted by *minus* the origin; shifting the image by ``+origin`` centres it).
* Scipion ``ALIGN_PROJ`` transform: a 4x4 matrix ``M`` built exactly as
  scipion-em-relion does, so that particles move freely between relion and cryoclass
  protocols::

      E = euler_matrix(-rot, -tilt, -psi, 'szyz')   # pwem.convert.transformations
      E[:3, 3] = -origin / pixel_size                # shift in pixels, negated
      M = inv(E)

  ``E[:3, :3]`` equals RELION's ``A``, so ``M[:3, :3] = A^T`` and
  ``M[:3, 3] = A^T origin_px``.  The inverse (:func:`alignment_to_row`) is relion's
  writer: ``E = inv(M)``, ``origin = -E[:3, 3] * pixel_size``, ``angles = -euler_from_matrix(E)``.

This module imports pwem / pyworkflow at call time only where Scipion objects are built.
"""
import os
import re

import numpy as np

#: Labels of the particle rows that come from Scipion (and go back to it).
IMAGE_ID = "rlnImageId"

_LOC_RE = re.compile(r"^\s*(\d+)@(.+)$")


# --------------------------------------------------------------------------- locations
def location_to_relion(index, filename):
    """Scipion location ``(index, fn)`` -> RELION ``'000012@fn'`` (or ``fn`` for index 0)."""
    filename = strip_format(filename)
    if index and int(index) > 0:
        return "%06d@%s" % (int(index), filename)
    return filename


def relion_to_location(name):
    """RELION ``'12@stack.mrcs'`` -> ``(12, 'stack.mrcs')``; a plain file -> ``(1, fn)``.

    Single-image MRC files are addressed as image 1 (RELION reads them as such)."""
    m = _LOC_RE.match(str(name))
    if m:
        return int(m.group(1)), m.group(2).strip()
    return 1, str(name).strip()


def strip_format(filename):
    """Drop Scipion's ``:mrc`` / ``:mrcs`` format suffix."""
    filename = str(filename)
    for suffix in (":mrcs", ":mrc"):
        if filename.endswith(suffix):
            return filename[:-len(suffix)]
    return filename


def is_mrc(filename):
    fn = strip_format(filename).lower()
    return fn.endswith(".mrc") or fn.endswith(".mrcs") or fn.endswith(".st")


# --------------------------------------------------------------------------- geometry
def row_to_alignment_matrix(rot, tilt, psi, origin_x_angst, origin_y_angst, pixel_size,
                            origin_z_angst=0.0):
    """RELION angles (deg) and origins (A) -> Scipion ``ALIGN_PROJ`` 4x4 matrix."""
    import pwem.convert.transformations as tfs
    ips = 1.0 / float(pixel_size)
    shifts = np.array([origin_x_angst, origin_y_angst, origin_z_angst], dtype=float) * ips
    angles = -np.deg2rad(np.array([rot, tilt, psi], dtype=float))
    E = tfs.euler_matrix(angles[0], angles[1], angles[2], "szyz")
    E[:3, 3] = -shifts
    return np.linalg.inv(E)


def alignment_to_row(matrix, pixel_size):
    """Scipion ``ALIGN_PROJ`` matrix -> dict of RELION angles (deg) and origins (A)."""
    import pwem.convert.transformations as tfs
    E = np.linalg.inv(np.asarray(matrix, dtype=float))
    shifts = -tfs.translation_from_matrix(E) * float(pixel_size)
    angles = -np.rad2deg(tfs.euler_from_matrix(E, axes="szyz"))
    return {"rlnAngleRot": float(angles[0]), "rlnAngleTilt": float(angles[1]),
            "rlnAnglePsi": float(angles[2]),
            "rlnOriginXAngst": float(shifts[0]), "rlnOriginYAngst": float(shifts[1])}


# --------------------------------------------------------------------------- STAR I/O
def read_star(path):
    """``{block name without 'data_': DataFrame or dict}`` (starfile, any version)."""
    import starfile
    import pandas as pd
    data = starfile.read(path, always_dict=True)
    out = {}
    for name, block in data.items():
        key = name[5:] if str(name).startswith("data_") else str(name)
        if isinstance(block, pd.DataFrame) and len(block) == 1 and key in (
                "model_general", "optimiser_general", "sampling_general"):
            block = block.iloc[0].to_dict()
        out[key] = block
    return out


def write_star(path, blocks):
    """Write ``{block: DataFrame | dict}`` atomically (tmp file then rename)."""
    import starfile
    tmp = "%s.tmp%d.star" % (path, os.getpid())
    starfile.write(blocks, tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def read_particle_table(path):
    """Particles of a RELION 3.0/3.1+ STAR file as one DataFrame (optics merged on)."""
    blocks = read_star(path)
    parts = blocks.get("particles")
    if parts is None:  # RELION 3.0: a single unnamed/images block
        candidates = [b for b in blocks.values() if hasattr(b, "columns")
                      and "rlnImageName" in b.columns]
        if not candidates:
            raise ValueError("%s: no particle table (data_particles) found" % path)
        return candidates[0].copy(), None
    optics = blocks.get("optics")
    df = parts.copy()
    if optics is not None and "rlnOpticsGroup" in df.columns:
        extra = [c for c in optics.columns if c not in df.columns or c == "rlnOpticsGroup"]
        df = df.merge(optics[extra], on="rlnOpticsGroup", how="left")
    return df, optics


# --------------------------------------------------------------------------- writing
class _StackResolver:
    """Maps Scipion image files to files the engine can read from ``out_dir``.

    MRC stacks are linked (``out_dir/NNN_<name>.mrcs`` -> original, absolute); other
    formats are converted into an MRC stack with pwem's ImageHandler."""

    def __init__(self, out_dir, star_dir):
        self.out_dir = out_dir
        self.star_dir = star_dir
        self.links = {}
        self.converted = None
        self._count = 0
        self._ih = None

    def name_for(self, part):
        index, fn = part.getLocation()
        fn = strip_format(fn)
        if is_mrc(fn) and index:
            if fn not in self.links:
                self._count += 1
                base = os.path.basename(fn)
                if not base.endswith(".mrcs"):
                    base = os.path.splitext(base)[0] + ".mrcs"
                link = os.path.join(self.out_dir, "%03d_%s" % (self._count, base))
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(os.path.abspath(fn), link)
                self.links[fn] = os.path.relpath(link, self.star_dir)
            return location_to_relion(index, self.links[fn])
        return self._convert(part)

    def _convert(self, part):
        if self._ih is None:
            from pwem.emlib.image import ImageHandler
            self._ih = ImageHandler()
            self.converted = os.path.join(self.out_dir, "converted_particles.mrcs")
            self._n = 0
        self._n += 1
        self._ih.convert(part, (self._n, self.converted))
        return location_to_relion(self._n, os.path.relpath(self.converted, self.star_dir))


def particle_to_row(part, pixel_size, write_ctf=True, write_align=False):
    """One particle -> dict of RELION particle labels (without rlnImageName/optics)."""
    row = {IMAGE_ID: int(part.getObjId())}
    mic = None
    coord = part.getCoordinate() if hasattr(part, "getCoordinate") else None
    if coord is not None:
        x, y = coord.getPosition()
        if x is not None and y is not None:
            row["rlnCoordinateX"] = float(x)
            row["rlnCoordinateY"] = float(y)
        mic = coord.getMicName() or (str(coord.getMicId()) if coord.getMicId() else None)
    if mic is None and getattr(part, "_micId", None) is not None and part._micId.get():
        mic = "mic%06d" % part._micId.get()
    row["rlnMicrographName"] = str(mic or "mic000001").replace(" ", "")
    if write_ctf and part.hasCTF():
        ctf = part.getCTF()
        row["rlnDefocusU"] = float(ctf.getDefocusU())
        row["rlnDefocusV"] = float(ctf.getDefocusV())
        row["rlnDefocusAngle"] = float(ctf.getDefocusAngle())
        ps = ctf.getPhaseShift()
        row["rlnPhaseShift"] = float(ps) if ps is not None else 0.0
        row["rlnCtfBfactor"] = 0.0
        row["rlnCtfScalefactor"] = 1.0
    if write_align:
        t = part.getTransform()
        if t is not None:
            row.update(alignment_to_row(t.getMatrix(), pixel_size))
    return row


def write_set_of_particles(part_set, star_file, out_dir=None, align_type=None,
                           write_ctf=True, iterator=None):
    """Write ``part_set`` (or the particles yielded by ``iterator``) as a RELION 3.1
    particles STAR file the engine reads.

    * one optics group per Scipion ``opticsGroupName`` of the acquisition (else one);
    * ``rlnImageId`` = Scipion particle id (used to map results back);
    * stacks: MRC stacks are symlinked into ``out_dir`` (default: the STAR's folder)
      and referenced as ``NNNNNN@link.mrcs`` relative to the STAR file; other formats
      are converted to ``converted_particles.mrcs``;
    * ``align_type`` ``ALIGN_PROJ`` writes angles and origins from the transforms
      (needed with ``--skip_align``); ``None``/``ALIGN_NONE`` writes none.

    Returns the number of particles written.
    """
    import pandas as pd
    from pwem.constants import ALIGN_PROJ
    star_dir = os.path.dirname(os.path.abspath(star_file))
    out_dir = os.path.abspath(out_dir or star_dir)
    os.makedirs(out_dir, exist_ok=True)
    resolver = _StackResolver(out_dir, star_dir)
    pixel_size = float(part_set.getSamplingRate())
    box = int(part_set.getXDim() or part_set.getFirstItem().getXDim())
    write_align = align_type == ALIGN_PROJ
    write_ctf = bool(write_ctf and part_set.hasCTF())

    optics = {}
    rows = []
    items = iterator if iterator is not None else part_set.iterItems(orderBy="id")
    for part in items:
        acq = part.getAcquisition() if part.hasAcquisition() else part_set.getAcquisition()
        og_name = _optics_group_name(acq)
        if og_name not in optics:
            optics[og_name] = {
                "rlnOpticsGroupName": og_name,
                "rlnOpticsGroup": len(optics) + 1,
                "rlnMicrographOriginalPixelSize": pixel_size,
                "rlnVoltage": float(acq.getVoltage() or 300.0),
                "rlnSphericalAberration": float(acq.getSphericalAberration() or 2.7),
                "rlnAmplitudeContrast": float(acq.getAmplitudeContrast() or 0.1),
                "rlnImagePixelSize": pixel_size,
                "rlnImageSize": box,
                "rlnImageDimensionality": 2,
                "rlnCtfDataAreCtfPremultiplied": 0,
            }
        row = {"rlnImageName": resolver.name_for(part)}
        row.update(particle_to_row(part, pixel_size, write_ctf, write_align))
        row["rlnOpticsGroup"] = optics[og_name]["rlnOpticsGroup"]
        rows.append(row)
    if not rows:
        raise ValueError("no particles to write to %s" % star_file)
    parts_df = pd.DataFrame(rows)
    parts_df = parts_df.fillna(0)
    optics_df = pd.DataFrame(list(optics.values()))
    write_star(star_file, {"optics": optics_df, "particles": parts_df})
    return len(rows)


def _optics_group_name(acq):
    info = getattr(acq, "opticsGroupInfo", None)
    name = getattr(acq, "opticsGroupName", None)
    for obj in (name, info):
        try:
            value = obj.get() if obj is not None else None
        except AttributeError:
            value = None
        if value and re.match(r"^[\w.\-]+$", str(value)):
            return str(value)
    return "opticsGroup1"


def write_volume_mrc(volume, out_fn, box=None, pixel_size=None):
    """Write a Scipion Volume/VolumeMask as an MRC map at ``out_fn``, resampled to
    ``box`` voxels of ``pixel_size`` A when given (Fourier crop/pad, then real-space
    crop/pad).  Returns ``out_fn``."""
    import mrcfile
    index, fn = volume.getLocation()
    fn = strip_format(fn)
    data = _read_volume(fn, index)
    src_apix = float(volume.getSamplingRate())
    dst_apix = float(pixel_size or src_apix)
    data = resample_volume(data, src_apix, dst_apix, box)
    tmp = out_fn + ".tmp.mrc"
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(data.astype(np.float32))
        m.voxel_size = dst_apix
    os.replace(tmp, out_fn)
    return out_fn


def _read_volume(fn, index=None):
    if is_mrc(fn):
        import mrcfile
        with mrcfile.open(fn, permissive=True) as m:
            data = np.asarray(m.data, dtype=np.float32)
        if data.ndim == 4:
            data = data[max(1, int(index or 1)) - 1]
        return data
    from pwem.emlib.image import ImageHandler
    img = ImageHandler().read((index or 1, fn) if index else fn)
    return np.asarray(img.getData(), dtype=np.float32)


def resample_volume(data, src_apix, dst_apix, box=None):
    """Change the voxel size of a cubic map by Fourier cropping/padding, then crop/pad
    the real-space box to ``box`` (centre voxel ``N // 2`` kept at the centre)."""
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[0]
    if abs(src_apix - dst_apix) > 1e-4 * dst_apix:
        m = int(round(n * src_apix / dst_apix))
        m += m % 2
        F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(data)))
        G = np.zeros((m, m, m), dtype=complex)
        c_in, c_out, h = n // 2, m // 2, min(n, m) // 2
        G[c_out - h:c_out + h, c_out - h:c_out + h, c_out - h:c_out + h] = \
            F[c_in - h:c_in + h, c_in - h:c_in + h, c_in - h:c_in + h]
        data = np.real(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(G)))) * (m / n) ** 3
        data = data.astype(np.float32)
        n = m
    if box is not None and int(box) != n:
        box = int(box)
        out = np.zeros((box, box, box), dtype=np.float32)
        h = min(n, box) // 2
        ci, co = n // 2, box // 2
        out[co - h:co + h, co - h:co + h, co - h:co + h] = \
            data[ci - h:ci + h, ci - h:ci + h, ci - h:ci + h]
        data = out
    return data


# --------------------------------------------------------------------------- reading
def read_set_of_particles(star_file, part_set, copy_binaries_to=None, read_align=True,
                          read_class=True):
    """Fill ``part_set`` (an empty SetOfParticles) from a RELION particles STAR file
    (3.0 or 3.1 layout): locations, CTF, acquisition, sampling rate and, when the file
    has them, 3D alignment (ALIGN_PROJ) and class numbers (``setClassId``).

    Image paths in the STAR file are relative to the STAR file's folder (RELION resolves
    them against the working directory; both are tried).  With ``copy_binaries_to`` the
    stacks are symlinked into that folder and the particles point at the links.
    Returns the set.
    """
    import pwem.objects as emobj
    from pwem.constants import ALIGN_PROJ, ALIGN_NONE
    df, optics = read_particle_table(star_file)
    star_dir = os.path.dirname(os.path.abspath(star_file))
    apix_col = "rlnImagePixelSize" if "rlnImagePixelSize" in df.columns else (
        "rlnDetectorPixelSize" if "rlnDetectorPixelSize" in df.columns else None)
    if apix_col is None:
        raise ValueError("%s: no rlnImagePixelSize (optics) column" % star_file)
    apix = float(df[apix_col].iloc[0])
    has_ctf = "rlnDefocusU" in df.columns
    has_align = read_align and all(c in df.columns for c in
                                   ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    has_class = read_class and "rlnClassNumber" in df.columns

    acq_by_group = {}
    stack_map = {}

    def _stack(fn):
        if fn in stack_map:
            return stack_map[fn]
        cand = fn if os.path.isabs(fn) else os.path.join(star_dir, fn)
        if not os.path.exists(cand) and os.path.exists(fn):
            cand = fn
        cand = os.path.abspath(cand)
        if copy_binaries_to:
            os.makedirs(copy_binaries_to, exist_ok=True)
            link = os.path.join(copy_binaries_to, "%03d_%s" % (len(stack_map) + 1,
                                                               os.path.basename(cand)))
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(cand, link)
            cand = os.path.relpath(link) if not os.path.isabs(copy_binaries_to) else link
        stack_map[fn] = cand
        return cand

    part_set.setSamplingRate(apix)
    part_set.setHasCTF(has_ctf)
    part_set.setAlignment(ALIGN_PROJ if has_align else ALIGN_NONE)
    flipped = "rlnCtfDataArePhaseFlipped" in df.columns and \
        int(df["rlnCtfDataArePhaseFlipped"].iloc[0]) == 1
    part_set.setIsPhaseFlipped(flipped)

    first_acq = None
    for i, row in enumerate(df.to_dict("records")):
        group = int(row.get("rlnOpticsGroup", 1) or 1)
        if group not in acq_by_group:
            acq = emobj.Acquisition()
            acq.setVoltage(float(row.get("rlnVoltage", 300.0)))
            acq.setSphericalAberration(float(row.get("rlnSphericalAberration", 2.7)))
            acq.setAmplitudeContrast(float(row.get("rlnAmplitudeContrast", 0.1)))
            acq.setMagnification(10000.0)
            acq_by_group[group] = acq
            first_acq = first_acq or acq
        part = emobj.Particle()
        idx, fn = relion_to_location(row["rlnImageName"])
        part.setLocation(idx, _stack(fn))
        part.setSamplingRate(apix)
        part.setAcquisition(acq_by_group[group])
        part.setObjId(int(row[IMAGE_ID]) if IMAGE_ID in row else i + 1)
        if has_ctf:
            ctf = emobj.CTFModel()
            ctf.setDefocusU(float(row["rlnDefocusU"]))
            ctf.setDefocusV(float(row.get("rlnDefocusV", row["rlnDefocusU"])))
            ctf.setDefocusAngle(float(row.get("rlnDefocusAngle", 0.0)))
            if "rlnPhaseShift" in row:
                ctf.setPhaseShift(float(row["rlnPhaseShift"]))
            ctf.standardize()
            part.setCTF(ctf)
        if has_align:
            part.setTransform(emobj.Transform(row_to_alignment_matrix(
                row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"],
                row.get("rlnOriginXAngst", 0.0), row.get("rlnOriginYAngst", 0.0), apix)))
        if has_class:
            part.setClassId(int(row["rlnClassNumber"]))
        if "rlnMicrographName" in row:
            part._rlnMicrographName = _pwString(row["rlnMicrographName"])
        part_set.append(part)
    if first_acq is not None:
        part_set.setAcquisition(first_acq)
    return part_set


def _pwString(value):
    from pyworkflow.object import String
    return String(str(value))


class ResultReader:
    """Reads one iteration of an engine run and updates Scipion particles and classes.

    ``data_star`` rows are matched to Scipion particles by ``rlnImageId`` (written by
    :func:`write_set_of_particles`; RELION and the engine keep extra input columns), or,
    when the engine dropped it, by ``rlnImageName`` through ``input_star``.
    """

    def __init__(self, data_star, model_star, input_star=None, pixel_size=None):
        import pandas as pd  # noqa: F401
        self.data_star = data_star
        self.model_star = model_star
        df, self.optics = read_particle_table(data_star)
        if IMAGE_ID not in df.columns:
            if input_star is None:
                raise ValueError("%s has no rlnImageId column and no input STAR was "
                                 "given to map rows to particles" % data_star)
            inp, _ = read_particle_table(input_star)
            names = dict(zip(inp["rlnImageName"].astype(str), inp[IMAGE_ID].astype(int)))
            df[IMAGE_ID] = [names.get(str(n), 0) for n in df["rlnImageName"]]
        self.rows = {int(r[IMAGE_ID]): r for r in df.to_dict("records")}
        if pixel_size is None:
            col = "rlnImagePixelSize" if "rlnImagePixelSize" in df.columns else None
            pixel_size = float(df[col].iloc[0]) if col else None
        self.pixel_size = pixel_size
        blocks = read_star(model_star)
        self.model_general = blocks.get("model_general", {})
        if not isinstance(self.model_general, dict):
            self.model_general = self.model_general.iloc[0].to_dict()
        self.model_classes = blocks.get("model_classes")
        self.class_curves = {int(k.rsplit("_", 1)[1]): v for k, v in blocks.items()
                             if re.match(r"^model_class_\d+$", k)}
        self.model_dir = os.path.dirname(os.path.abspath(model_star))

    # ----- classes
    def class_info(self):
        """``{class number: dict}`` with map path (absolute), distribution, resolution,
        accuracies, from ``data_model_classes``."""
        info = {}
        if self.model_classes is None:
            return info
        for k, row in enumerate(self.model_classes.to_dict("records"), start=1):
            idx, fn = relion_to_location(row.get("rlnReferenceImage", ""))
            if fn and not os.path.isabs(fn):
                # RELION writes paths relative to the working dir; try the model's folder
                cand = os.path.join(self.model_dir, os.path.basename(fn))
                fn = fn if os.path.exists(fn) else cand
            info[k] = {
                "map": fn,
                "distribution": float(row.get("rlnClassDistribution", 0.0)),
                "resolution": float(row.get("rlnEstimatedResolution", 999.0)),
                "accuracy_rot": float(row.get("rlnAccuracyRotations", 999.0)),
                "accuracy_trans": float(row.get("rlnAccuracyTranslationsAngst",
                                                row.get("rlnAccuracyTranslations", 999.0))),
            }
        return info

    def ssnr_curve(self, k):
        """``(resolution 1/A array, SSNR array)`` of class ``k`` (empty when missing)."""
        tab = self.class_curves.get(int(k))
        if tab is None or "rlnSsnrMap" not in tab.columns:
            return np.zeros(0), np.zeros(0)
        res = tab["rlnResolution"].to_numpy(dtype=float) if "rlnResolution" in tab.columns \
            else np.arange(len(tab), dtype=float)
        return res, tab["rlnSsnrMap"].to_numpy(dtype=float)

    # ----- particles
    def update_particle(self, item, row=None):
        """``classifyItems`` callback: class id, ALIGN_PROJ transform, RELION scores.
        Particles not in the data STAR (e.g. of disabled 2D classes) are left out."""
        import pwem.objects as emobj
        from pyworkflow.object import Float, Integer
        row = self.rows.get(int(item.getObjId()))
        if row is None:
            item._appendItem = False
            return
        item._appendItem = True
        item.setClassId(int(row.get("rlnClassNumber", 1)))
        apix = self.pixel_size or item.getSamplingRate()
        item.setTransform(emobj.Transform(row_to_alignment_matrix(
            row.get("rlnAngleRot", 0.0), row.get("rlnAngleTilt", 0.0),
            row.get("rlnAnglePsi", 0.0), row.get("rlnOriginXAngst", 0.0),
            row.get("rlnOriginYAngst", 0.0), apix)))
        for label in ("rlnMaxValueProbDistribution", "rlnLogLikeliContribution",
                      "rlnNormCorrection"):
            if label in row:
                setattr(item, "_" + label, Float(float(row[label])))
        if "rlnNrOfSignificantSamples" in row:
            item._rlnNrOfSignificantSamples = Integer(int(row["rlnNrOfSignificantSamples"]))
