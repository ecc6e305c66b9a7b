"""MRC maps and particle stacks (on :mod:`mrcfile`).

Arrays are float32 with axis order ``(z, y, x)`` for volumes and ``(n, y, x)`` for image
stacks, exactly as :mod:`mrcfile` stores them (the MRC fast axis is x).  Pixel sizes are in
Angstrom and are taken from ``voxel_size.x`` of the header.  Writers are atomic: they write
``<name>.tmp<pid>`` in the destination folder and ``os.replace`` it, so a reader never sees
a half-written file.

:class:`ImageSource` reads the particle images of a
:class:`~cryoclass_plugin.engine.star_io.ParticleTable`: each stack is opened once
(memory-mapped with :func:`mrcfile.mmap`, handle cached), or everything is read into RAM
with ``preread=True``; ``scratch_dir`` copies the stacks to a local disk first (RELION's
``--scratch_dir``).
"""
import hashlib
import os
import shutil
import warnings
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

from .atomic import replacing, temporary_name
from .errors import CryoClassError

# Relative tolerance when comparing pixel sizes (headers often carry 3-4 digits only).
APIX_RTOL = 0.01
# Stacks kept open (memory-mapped) at once by an ImageSource.
MAX_OPEN_STACKS = 128


_atomic_tmp = temporary_name
_replacing = replacing


def _open_mrc(path, mode="mmap"):
    """Open an MRC file read-only, tolerating the small header defects common in EM data
    (mrcfile's permissive mode), and turning unreadable files into a one-line error."""
    import mrcfile
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CryoClassError(f"{path}: file not found; check the path")
    opener = mrcfile.mmap if mode == "mmap" else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            handle = opener(path, mode="r", permissive=True,
                            **({"header_only": True} if mode == "header" else {}))
    except Exception as exc:  # ValueError for a bad header, OSError for a short file
        raise CryoClassError(f"{path}: not a readable MRC file ({exc}); re-export it as "
                             "MRC (e.g. relion_image_handler --i in --o out.mrcs)") from None
    if mode != "header" and handle.data is None:
        handle.close()
        raise CryoClassError(f"{path}: MRC header could not be parsed; re-export the file "
                             "as MRC")
    return handle


def _header_apix(handle):
    try:
        return float(handle.voxel_size.x)
    except Exception:
        return 0.0


def read_map(path):
    """Read a 3D map: returns ``(vol, apix)``, ``vol`` float32 ``(z, y, x)``, ``apix`` the
    header voxel size in Angstrom (0.0 when the header has none)."""
    with _open_mrc(path, mode="open") as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        apix = _header_apix(mrc)
    if data.ndim != 3:
        raise CryoClassError(f"{os.fspath(path)}: expected a 3D map, found an array of shape "
                             f"{data.shape}; give a volume (not an image or a stack)")
    return np.ascontiguousarray(data), apix


def read_stack_header(path):
    """``(nx, ny, n_images, apix)`` of an image stack (or single image) from its header."""
    with _open_mrc(path, mode="header") as mrc:
        h = mrc.header
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        apix = _header_apix(mrc)
    return nx, ny, nz, apix


def write_map(path, vol, apix):
    """Write a 3D map (float32, ``(z, y, x)``) with voxel size ``apix`` (A) in the header,
    atomically."""
    import mrcfile
    vol = np.ascontiguousarray(np.asarray(vol, dtype=np.float32))
    if vol.ndim != 3:
        raise ValueError(f"write_map expects a 3D array, got shape {vol.shape}")
    with _replacing(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(vol)
        mrc.voxel_size = float(apix)
        mrc.update_header_stats()


def write_stack(path, images, apix):
    """Write an image stack ``(n, y, x)`` as an MRC stack (ispg 0) with pixel size
    ``apix`` (A), atomically."""
    import mrcfile
    images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    if images.ndim == 2:
        images = images[None]
    with _replacing(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = float(apix)
        mrc.update_header_stats()


class StackWriter:
    """Write a large stack incrementally without holding it in memory.

    ``with StackWriter(path, n, box, apix) as w: w.data[i0:i1] = images`` -- ``data`` is a
    writable memory map ``(n, box, box)`` float32; the file appears at ``path`` (atomically)
    when the block exits without an exception.
    """

    def __init__(self, path, n, box, apix):
        self.path = os.fspath(path)
        self.tmp = _atomic_tmp(self.path)
        self.shape = (int(n), int(box), int(box))
        self.apix = float(apix)
        self._mrc = None

    def __enter__(self):
        import mrcfile
        self._mrc = mrcfile.new_mmap(self.tmp, shape=self.shape, mrc_mode=2, overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.apix
        return self

    @property
    def data(self):
        return self._mrc.data

    def __exit__(self, exc_type, exc, tb):
        done = False
        try:
            if exc_type is None:
                self._mrc.update_header_stats()
            self._mrc.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                done = True
        finally:
            if not done:         # failed or interrupted: no partial file stays behind
                try:
                    os.remove(self.tmp)
                except OSError:
                    pass
        return False


def check_map_matches(map_path, box, apix, what="reference map"):
    """Raise a one-line :class:`CryoClassError` unless ``map_path`` is a cubic ``box``^3
    map with voxel size ``apix`` (within 1 %; a header voxel size of 0 means unknown and
    is accepted)."""
    path = os.fspath(map_path)
    with _open_mrc(path, mode="header") as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        map_apix = _header_apix(mrc)
    if len(set(shape)) != 1:
        raise CryoClassError(f"{path}: {what} is not cubic ({shape[2]}x{shape[1]}x{shape[0]} "
                             f"voxels); the particles need a {box}^3 map, resize it with "
                             f"relion_image_handler --new_box {box}")
    if shape[0] != int(box):
        raise CryoClassError(f"{path}: {what} box {shape[0]} does not match the particles' "
                             f"box {box}; rescale/resize it with relion_image_handler "
                             f"--rescale_angpix {apix:g} --new_box {box}")
    if map_apix > 0 and abs(map_apix - float(apix)) > APIX_RTOL * float(apix):
        raise CryoClassError(f"{path}: {what} pixel size {map_apix:g} A does not match the "
                             f"particles' {float(apix):g} A (rlnImagePixelSize); rescale it "
                             f"with relion_image_handler --rescale_angpix {float(apix):g} "
                             f"--new_box {box}")
    return True


def _scratch_name(path):
    """A collision-free file name in the scratch folder for the stack at ``path``."""
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    return f"{digest}_{os.path.basename(path)}"


def copy_to_scratch(paths, scratch_dir):
    """Copy stacks into ``scratch_dir`` (skipping copies already there with the right
    size, so that several ranks can share one scratch folder); returns new paths."""
    if os.path.exists(scratch_dir) and not os.path.isdir(scratch_dir):
        raise CryoClassError(f"--scratch_dir {scratch_dir}: is a file, not a folder; give a "
                             "folder on a local disk, or drop --scratch_dir")
    try:
        os.makedirs(scratch_dir, exist_ok=True)
    except OSError as exc:
        raise CryoClassError(f"--scratch_dir {scratch_dir}: cannot create the folder "
                             f"({exc.strerror}); give a writable folder on a local disk, or "
                             "drop --scratch_dir") from None
    out = []
    for src in paths:
        dst = os.path.join(scratch_dir, _scratch_name(src))
        if not (os.path.isfile(dst) and os.path.getsize(dst) == os.path.getsize(src)):
            try:
                with _replacing(dst) as tmp:
                    shutil.copyfile(src, tmp)
            except OSError as exc:
                raise CryoClassError(f"--scratch_dir {scratch_dir}: cannot copy {src} there "
                                     f"({exc.strerror}); free space there, give another "
                                     "--scratch_dir, or drop it") from None
        out.append(dst)
    return out


def _group_by(keys, values):
    """Yield ``(key, values with that key)`` for each distinct key, in key order."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    for a, b in zip(starts, ends):
        yield sorted_keys[a], np.asarray(values)[order[a:b]]


class ImageSource:
    """Particle images of a :class:`~cryoclass_plugin.engine.star_io.ParticleTable`.

    ``len(src)`` is the number of particles; ``src.get(indices)`` returns float32
    ``(n, N, N)`` images (``(y, x)`` axes) in the order of ``indices`` (row positions in
    ``table.df``).  Every stack's header is checked at construction: square images of the
    table's box, the same pixel size in every stack header that has one, and all the
    table's ``NNNNNN@stack`` indices within the stack.

    preread
        read all images into RAM once (fast random access, ``n * N * N * 4`` bytes).
    scratch_dir
        copy the stacks there first and read the copies.
    """

    def __init__(self, table, preread=False, scratch_dir=None):
        self.table = table
        self.box = int(table.box)
        frames, stack_ids, self.stack_paths = table.stack_locations()
        self.frames = frames.astype(np.int64) - 1  # 0-based frame within its stack
        self.stack_ids = stack_ids.astype(np.int64)
        self._check_stacks()
        if scratch_dir:
            self.stack_paths = copy_to_scratch(self.stack_paths, scratch_dir)
        self._handles = OrderedDict()  # stack id -> open mmap, least recently used first
        self._cache = None
        if preread:
            self._cache = self._read_all()
            self.close()

    def __len__(self):
        return len(self.frames)

    def _check_stacks(self):
        n_frames_needed = np.zeros(len(self.stack_paths), dtype=np.int64)
        np.maximum.at(n_frames_needed, self.stack_ids, self.frames + 1)
        if len(self.frames) and self.frames.min() < 0:
            bad = int(np.argmin(self.frames))
            raise CryoClassError(f"{self.table.path}: rlnImageName "
                                 f"'{self.table.df['rlnImageName'].iloc[bad]}' has index "
                                 "< 1; stack indices are 1-based (000001@stack.mrcs)")
        header_apix = {}
        for sid, path in enumerate(self.stack_paths):
            nx, ny, nz, apix = read_stack_header(path)
            if nx != ny:
                raise CryoClassError(f"{path}: images are not square ({nx}x{ny} pixels); "
                                     "re-extract the particles with a square box")
            if nx != self.box:
                raise CryoClassError(f"{path}: box {nx} differs from rlnImageSize {self.box} "
                                     f"in {self.table.path}; re-extract all particles with "
                                     "one box size or fix rlnImageSize")
            if n_frames_needed[sid] > nz:
                raise CryoClassError(f"{self.table.path}: rlnImageName index "
                                     f"{n_frames_needed[sid]} is out of range for {path} "
                                     f"({nz} images); fix rlnImageName or the stack")
            if apix > 0 and abs(apix - 1.0) > 1e-6:  # 0 and 1 mean "not set" in practice
                header_apix[path] = apix
        if header_apix:
            values = np.array(list(header_apix.values()))
            if values.max() - values.min() > APIX_RTOL * values.min():
                lo = min(header_apix, key=header_apix.get)
                hi = max(header_apix, key=header_apix.get)
                raise CryoClassError(f"{hi}: pixel size {header_apix[hi]:g} A differs from "
                                     f"{lo} ({header_apix[lo]:g} A); stacks of one data set "
                                     "must share a pixel size, rescale or split the set")

    def _handle(self, sid):
        h = self._handles.get(sid)
        if h is None:
            # RELION sets have one stack per micrograph (thousands): keep only the most
            # recently used ones open, below the usual limit of 1024 file descriptors.
            while len(self._handles) >= MAX_OPEN_STACKS:
                _, oldest = self._handles.popitem(last=False)
                oldest.close()
            h = _open_mrc(self.stack_paths[sid], mode="mmap")
            self._handles[sid] = h
        else:
            self._handles.move_to_end(sid)
        return h

    def _stack_data(self, sid):
        data = self._handle(sid).data
        return data if data.ndim == 3 else data[None]

    def _read_all(self):
        out = np.empty((len(self), self.box, self.box), dtype=np.float32)
        for sid, rows in _group_by(self.stack_ids, np.arange(len(self))):
            data = self._stack_data(sid)
            order = np.argsort(self.frames[rows], kind="stable")
            out[rows[order]] = data[self.frames[rows[order]]]
            self._close_one(sid)
        return out

    def get(self, indices):
        """Images of particles ``indices`` (row positions), float32 ``(n, N, N)``."""
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if self._cache is not None:
            return self._cache[indices]
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        for sid, pos in _group_by(self.stack_ids[indices], np.arange(len(indices))):
            frames = self.frames[indices[pos]]
            order = np.argsort(frames, kind="stable")  # sequential reads on the mmap
            out[pos[order]] = self._stack_data(sid)[frames[order]]
        return out

    def _close_one(self, sid):
        h = self._handles.pop(sid, None)
        if h is not None:
            h.close()

    def close(self):
        while self._handles:
            _, h = self._handles.popitem()
            h.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
