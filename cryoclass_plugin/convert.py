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

from .engine import star_io

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
# STAR files are read and written by the one STAR module (RELION 3.0/3.1/5 layouts);
# ``read_star``/``write_star`` are its functions, named here for the protocols.
read_star = star_io.read_star
write_star = star_io.write_star


def read_particle_table(path, check_stacks=False):
    """``(particles DataFrame with optics merged on, optics DataFrame or None)`` of a
    RELION 3.0/3.1+ particle STAR file (:func:`star_io.read_particles`; the stacks need
    not exist unless ``check_stacks``)."""
    table = star_io.read_particles(path, check_stacks=check_stacks)
    return table.df, table.optics


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
        for label, default in PARTICLE_CTF_LABELS.items():
            row[label] = _attribute(part, label, default, float)
    if write_align:
        t = part.getTransform()
        if t is not None:
            row.update(alignment_to_row(t.getMatrix(), pixel_size))
    return row


def write_set_of_particles(part_set, star_file, out_dir=None, align_type=None,
                           write_ctf=True, iterator=None):
    """Write ``part_set`` (or the particles yielded by ``iterator``) as a RELION 3.1
    particles STAR file the engine reads.

    * optics groups as the relion plugin keeps them: the set's acquisition holds the
      ``data_optics`` table as STAR text (``opticsGroupInfo``; all its columns, the
      aberrations too, are written back with the set's pixel size and box), each
      particle its group number (``_rlnOpticsGroup``, default 1); without a table, one
      group from the acquisition;
    * per-particle ``rlnCtfBfactor`` / ``rlnCtfScalefactor`` from the particles'
      ``_rlnCtfBfactor`` / ``_rlnCtfScalefactor`` (RELION's 0 and 1 when absent);
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

    optics_df = optics_of_set(part_set, pixel_size, box)
    known = set(optics_df["rlnOpticsGroup"].astype(int))
    rows = []
    items = iterator if iterator is not None else part_set.iterItems(orderBy="id")
    for part in items:
        row = {"rlnImageName": resolver.name_for(part)}
        row.update(particle_to_row(part, pixel_size, write_ctf, write_align))
        row["rlnOpticsGroup"] = _attribute(part, "rlnOpticsGroup", 1, int)
        if row["rlnOpticsGroup"] not in known:
            raise ValueError("particle %d has optics group %d, which the set's optics "
                             "groups (acquisition opticsGroupInfo: %s) lack; re-import the "
                             "particles with their optics table"
                             % (part.getObjId(), row["rlnOpticsGroup"], sorted(known)))
        rows.append(row)
    if not rows:
        raise ValueError("no particles to write to %s" % star_file)
    parts_df = pd.DataFrame(rows)
    parts_df = parts_df.fillna(0)
    star_io.write_particles(star_file, optics_df, parts_df)
    return len(rows)


# Per-particle CTF labels kept on Scipion particles as ``_<label>`` attributes (as the
# relion plugin keeps its extra labels), with RELION's value when absent.
PARTICLE_CTF_LABELS = {"rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0}


def _attribute(obj, label, default, kind):
    """``obj._<label>`` as ``kind``, or ``default`` when the object lacks it."""
    value = getattr(obj, "_" + label, None)
    value = value.get() if value is not None and hasattr(value, "get") else value
    return kind(default if value is None else value)


def optics_to_text(optics_df):
    """A RELION ``data_optics`` table as STAR text: what Scipion keeps in an acquisition's
    ``opticsGroupInfo`` (the relion plugin's ``OpticsGroups.toImages`` convention)."""
    return star_io.star_text({"optics": optics_df})


def optics_from_text(text):
    """The ``data_optics`` table of STAR text (``opticsGroupInfo``), or None when the
    text holds none."""
    import tempfile
    if not text or "data_optics" not in str(text):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optics.star")
        with open(path, "w") as fh:
            fh.write(str(text))
        try:
            blocks = star_io.read_star(path)
        except star_io.CryoClassError as exc:
            raise ValueError("the acquisition's opticsGroupInfo is not a readable "
                             "data_optics STAR table (%s); re-import the particles with "
                             "their optics table" % str(exc).split(": ", 1)[-1]) from None
    optics = blocks.get("optics")
    if optics is None or len(optics) == 0:
        return None
    return star_io._numeric_columns(optics.copy(), "opticsGroupInfo", "optics")


def optics_of_set(part_set, pixel_size, box):
    """The optics table to write ``part_set`` with: the groups kept in its acquisition's
    ``opticsGroupInfo`` (every column, aberrations included), with the set's pixel size
    and box (as the relion plugin's ``OpticsGroups.fromImages``); else one group from the
    acquisition's voltage, Cs and amplitude contrast."""
    import pandas as pd
    acq = part_set.getAcquisition()
    info = getattr(acq, "opticsGroupInfo", None)
    optics = optics_from_text(info.get() if info is not None else None)
    if optics is None:
        optics = pd.DataFrame([{
            "rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
            "rlnMicrographOriginalPixelSize": pixel_size,
            "rlnVoltage": float(acq.getVoltage() or 300.0),
            "rlnSphericalAberration": float(acq.getSphericalAberration() or 2.7),
            "rlnAmplitudeContrast": float(acq.getAmplitudeContrast() or 0.1)}])
    optics["rlnOpticsGroup"] = optics["rlnOpticsGroup"].astype(int)
    if "rlnOpticsGroupName" not in optics.columns:
        optics.insert(0, "rlnOpticsGroupName",
                      ["opticsGroup%d" % g for g in optics["rlnOpticsGroup"]])
    if "rlnMicrographOriginalPixelSize" not in optics.columns:
        optics["rlnMicrographOriginalPixelSize"] = pixel_size
    optics["rlnImagePixelSize"] = float(pixel_size)
    optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    if "rlnCtfDataAreCtfPremultiplied" not in optics.columns:
        optics["rlnCtfDataAreCtfPremultiplied"] = 0
    return optics


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
def _link_stacks(paths, folder):
    """Symlink each stack into ``folder`` as ``NNN_<name>``; returns the link paths
    (relative to the working directory when ``folder`` is)."""
    os.makedirs(folder, exist_ok=True)
    links = []
    for i, path in enumerate(paths, start=1):
        link = os.path.join(folder, "%03d_%s" % (i, os.path.basename(path)))
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(path), link)
        links.append(os.path.relpath(link) if not os.path.isabs(folder) else link)
    return links


def _acquisition(row, optics_text):
    """The Scipion acquisition of one optics group (its voltage, Cs, Q0), carrying the
    whole optics table in ``opticsGroupInfo``."""
    import pwem.objects as emobj
    acq = emobj.Acquisition()
    acq.setVoltage(float(row["rlnVoltage"]))
    acq.setSphericalAberration(float(row["rlnSphericalAberration"]))
    acq.setAmplitudeContrast(float(row["rlnAmplitudeContrast"]))
    acq.setMagnification(10000.0)
    acq.opticsGroupInfo.set(optics_text)
    return acq


def _row_to_particle(row, location, apix, acq, has_ctf, has_align, has_class):
    import pwem.objects as emobj
    part = emobj.Particle()
    part.setLocation(*location)
    part.setSamplingRate(apix)
    part.setAcquisition(acq)
    if has_ctf:
        ctf = emobj.CTFModel()
        ctf.setDefocusU(float(row["rlnDefocusU"]))
        ctf.setDefocusV(float(row["rlnDefocusV"]))
        ctf.setDefocusAngle(float(row["rlnDefocusAngle"]))
        ctf.setPhaseShift(float(row["rlnPhaseShift"]))
        ctf.standardize()
        part.setCTF(ctf)
        for label in PARTICLE_CTF_LABELS:
            setattr(part, "_" + label, _pwFloat(row[label]))
    if has_align:
        part.setTransform(emobj.Transform(row_to_alignment_matrix(
            row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"],
            row["rlnOriginXAngst"], row["rlnOriginYAngst"], apix)))
    if has_class:
        part.setClassId(int(row["rlnClassNumber"]))
    part._rlnMicrographName = _pwString(row["rlnMicrographName"])
    from pyworkflow.object import Integer
    part._rlnOpticsGroup = Integer(int(row["rlnOpticsGroup"]))
    return part


def read_set_of_particles(star_file, part_set, copy_binaries_to=None, read_align=True,
                          read_class=True):
    """Fill ``part_set`` (an empty SetOfParticles) from a RELION particles STAR file
    (3.0, 3.1 or 5.0 layout, read by :func:`star_io.read_particles`): locations, CTF,
    acquisition, sampling rate and, when the file has them, 3D alignment (ALIGN_PROJ)
    and class numbers (``setClassId``).  Optics groups are kept as the relion plugin
    keeps them: the whole ``data_optics`` table (every column, aberrations included) as
    STAR text in the acquisitions' ``opticsGroupInfo``, each particle's group in
    ``_rlnOpticsGroup`` and its acquisition with the group's voltage, Cs and Q0;
    ``rlnCtfBfactor`` / ``rlnCtfScalefactor`` as ``_rlnCtfBfactor`` /
    ``_rlnCtfScalefactor``.

    Image names are resolved as :func:`star_io.resolve_stack_paths` does (the working
    directory first, then the STAR file's folder).  With ``copy_binaries_to`` the
    stacks are symlinked into that folder and the particles point at the links.
    Returns the set.
    """
    from pwem.constants import ALIGN_PROJ, ALIGN_NONE
    table = star_io.read_particles(star_file)
    df = table.df
    frames, stack_ids, paths = table.stack_locations()
    paths = _link_stacks(paths, copy_binaries_to) if copy_binaries_to else \
        [os.path.abspath(p) for p in paths]
    has_align = read_align and table.has_angles
    has_class = read_class and "rlnClassNumber" in df.columns
    part_set.setSamplingRate(table.apix)
    part_set.setHasCTF(table.has_ctf)
    part_set.setAlignment(ALIGN_PROJ if has_align else ALIGN_NONE)
    part_set.setIsPhaseFlipped("rlnCtfDataArePhaseFlipped" in df.columns and
                               int(df["rlnCtfDataArePhaseFlipped"].iloc[0]) == 1)
    optics_text = optics_to_text(table.optics_table())
    acq_by_group = {}
    for i, row in enumerate(df.to_dict("records")):
        group = int(row["rlnOpticsGroup"])
        if group not in acq_by_group:
            acq_by_group[group] = _acquisition(row, optics_text)
        part = _row_to_particle(row, (int(frames[i]), paths[stack_ids[i]]), table.apix,
                                acq_by_group[group], table.has_ctf, has_align, has_class)
        part.setObjId(int(row[IMAGE_ID]) if IMAGE_ID in row else i + 1)
        part_set.append(part)
    part_set.setAcquisition(next(iter(acq_by_group.values())))
    return part_set


def _pwString(value):
    from pyworkflow.object import String
    return String(str(value))


def _pwFloat(value):
    from pyworkflow.object import Float
    return Float(float(value))


class ResultReader:
    """Reads one iteration of an engine run and updates Scipion particles and classes.

    ``data_star`` rows are matched to Scipion particles by ``rlnImageId`` (written by
    :func:`write_set_of_particles`; RELION and the engine keep extra input columns), or,
    when the engine dropped it, by ``rlnImageName`` through ``input_star``.
    """

    def __init__(self, data_star, model_star, input_star=None, pixel_size=None):
        from .runresults import ModelStar
        self.data_star = data_star
        self.model_star = model_star
        table = star_io.read_particles(data_star, check_stacks=False)
        df, self.optics = table.df, table.optics
        if IMAGE_ID not in df.columns:
            df[IMAGE_ID] = self._ids_from_input(table, input_star)
        self.rows = {int(r[IMAGE_ID]): r for r in df.to_dict("records")}
        self.pixel_size = float(pixel_size) if pixel_size is not None else table.apix
        self.model = ModelStar(model_star)

    def _ids_from_input(self, table, input_star):
        """Scipion ids of ``table``'s rows, matched to ``input_star``'s rows by image
        (frame and stack file, wherever each STAR file names the stack from)."""
        if input_star is None:
            raise ValueError("%s has no rlnImageId column and no input STAR was "
                             "given to map rows to particles" % self.data_star)
        inp = star_io.read_particles(input_star, check_stacks=False)
        ids = dict(zip(star_io.output_image_names(inp, "/"),
                       inp.df[IMAGE_ID].astype(int)))
        return [ids.get(name, 0) for name in star_io.output_image_names(table, "/")]

    # ----- classes
    def class_info(self):
        """``{class number: dict}`` with map path, distribution, resolution, accuracies,
        from ``data_model_classes`` (:class:`runresults.ModelStar`)."""
        info = {}
        for k in self.model.class_numbers():
            row = self.model.class_row(k)
            info[k] = {
                "map": self.model.class_map_path(k) or row.get("rlnReferenceImage", ""),
                "distribution": float(row.get("rlnClassDistribution", 0.0)),
                "resolution": float(row.get("rlnEstimatedResolution", 999.0)),
                "accuracy_rot": float(row.get("rlnAccuracyRotations", 999.0)),
                "accuracy_trans": float(row.get("rlnAccuracyTranslationsAngst",
                                                row.get("rlnAccuracyTranslations", 999.0))),
            }
        return info

    def ssnr_curve(self, k):
        """``(resolution 1/A array, SSNR array)`` of class ``k`` (empty when missing)."""
        return self.model.ssnr_curve(k)

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
