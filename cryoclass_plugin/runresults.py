"""Read the output of a cryoclass (or RELION Class3D) run.

A run with rootname ``<o>`` (for example ``out/run``) writes, per iteration ``NNN``::

    <o>_itNNN_model.star      data_model_general, data_model_classes, data_model_class_N,
                              data_model_groups, data_model_group_N
    <o>_itNNN_optimiser.star  data_optimiser_general
    <o>_itNNN_data.star       data_optics, data_particles
    <o>_itNNN_sampling.star   data_sampling_general (+ data_sampling_directions)
    <o>_itNNN_classKKK.mrc    class maps (voxel size in the header)

:class:`RunResults` lists the iterations that exist (an iteration exists when its
``model.star`` does; the other files may be missing, e.g. while the run is still going)
and loads any of these as pandas tables or dicts.  It is read-only and needs neither
pyworkflow nor the engine's numerics, only ``starfile``, ``mrcfile`` and pandas.

STAR files are read by the one STAR module, :mod:`cryoclass_plugin.engine.star_io`
(``{block name without 'data_': table}``, loop blocks as DataFrames, key/value blocks as
dicts); :class:`ModelStar` is the one model.star reader (also used by the Scipion
conversion).
"""
import glob
import os
import re

import numpy as np
import pandas as pd

from .engine import star_io as _star_io
from .engine.star_io import block_key
from .engine.errors import CryoClassError

__all__ = [
    "RunResults", "ModelStar", "read_star", "read_star_block", "block_key",
    "as_dict", "as_frame", "find_run_root", "class_number_from_path",
    "RELION_UNSET",
]

# RELION writes 999 (or 9999999 for class changes) where a value is not defined yet,
# e.g. the changes in iteration 0 or the resolution of an empty class.
RELION_UNSET = 999.0

_ITER_RE = re.compile(r"^(?P<root>.+)_it(?P<it>\d{3,})_model\.star$")
_CLASS_RE = re.compile(r"_class(\d{3,})\.mrc(?::mrc)?$")


# ---------------------------------------------------------------------------------------
# STAR helpers
# ---------------------------------------------------------------------------------------
def as_dict(block):
    """A key/value block as a dict, whether starfile gave a dict or a 1-row frame."""
    if block is None:
        return {}
    if isinstance(block, dict):
        return dict(block)
    if isinstance(block, pd.DataFrame):
        if len(block) == 0:
            return {}
        return {k: _py(v) for k, v in block.iloc[0].items()}
    raise TypeError(f"not a STAR block: {type(block).__name__}")


def as_frame(block):
    """A loop block as a DataFrame (a dict becomes a 1-row frame)."""
    if block is None:
        return pd.DataFrame()
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):
        return pd.DataFrame([block])
    raise TypeError(f"not a STAR block: {type(block).__name__}")


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


_STAR_CACHE = {}


def read_star(path, raw_columns=None):
    """:func:`cryoclass_plugin.engine.star_io.read_star` (``{name without 'data_':
    DataFrame | dict}``), cached per path, mtime and size when ``raw_columns`` is not
    given: figures and reports read the same model.star many times.  The cached blocks
    are shared: callers must not modify them."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return _star_io.read_star(path)  # raises the one-line "not found" error
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if raw_columns or key not in _STAR_CACHE:
        blocks = _star_io.read_star(path, raw_columns=raw_columns)
        if not blocks:
            raise CryoClassError(f"{path}: no data_ blocks in this STAR file")
        if raw_columns:
            return blocks
        if len(_STAR_CACHE) > 256:
            _STAR_CACHE.clear()
        _STAR_CACHE[key] = blocks
    return _STAR_CACHE[key]


def read_star_block(path, table, raw_columns=None):
    """One block of a STAR file; a one-line error lists the blocks when it is missing."""
    blocks = read_star(path, raw_columns=raw_columns)
    name = block_key(table)
    if name not in blocks:
        avail = ", ".join("data_" + k for k in blocks) or "none"
        raise CryoClassError(f"{path}: no table data_{name}; tables: {avail}")
    return blocks[name]


def class_number_from_path(path):
    """``.../run_it025_class003.mrc`` -> 3, or None."""
    m = _CLASS_RE.search(str(path))
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------
# run root discovery
# ---------------------------------------------------------------------------------------
def _scan(root_prefix_glob):
    """{rootname: sorted iterations} for model.star files matching a glob."""
    found = {}
    for fn in glob.glob(root_prefix_glob):
        m = _ITER_RE.match(fn)
        if m:
            found.setdefault(m.group("root"), set()).add(int(m.group("it")))
    return {k: sorted(v) for k, v in found.items()}


def find_run_root(path):
    """Rootname (``out/run``) from a rootname, an output folder or any of the run's files.

    In a folder with several rootnames (``run`` and a continuation ``run_ct5``) the one
    whose latest ``model.star`` is newest wins.  Raises a one-line CryoClassError when
    no ``*_itNNN_model.star`` is found.
    """
    path = os.fspath(path).rstrip("/") or "/"
    if os.path.isfile(path):
        m = re.match(r"^(.+)_it\d{3,}_(model|optimiser|data|sampling)\.star$", path) \
            or re.match(r"^(.+)_it\d{3,}_class\d{3,}\.mrc$", path)
        if m:
            return m.group(1)
    if os.path.isdir(path):
        found = _scan(os.path.join(glob.escape(path), "*_it[0-9][0-9][0-9]*_model.star"))
        if not found:
            raise CryoClassError(
                f"{path}: no iterations found (no *_itNNN_model.star in this folder)")
        if len(found) == 1:
            return next(iter(found))

        def newest(root):
            it = found[root][-1]
            return os.path.getmtime(f"{root}_it{it:03d}_model.star")
        return max(found, key=newest)
    found = _scan(glob.escape(path) + "_it[0-9][0-9][0-9]*_model.star")
    if path in found:
        return path
    raise CryoClassError(
        f"{path}: no iterations found (expected {path}_itNNN_model.star files)")


# ---------------------------------------------------------------------------------------
# model.star
# ---------------------------------------------------------------------------------------
class ModelStar:
    """The blocks of one ``<o>_itNNN_model.star``.

    ``general`` (dict), ``classes`` (DataFrame, with an added ``class_number`` column,
    1-based), ``class_table(k)`` (data_model_class_k), ``groups`` and ``group_table(g)``.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.blocks = read_star(self.path)
        self.general = as_dict(self.blocks.get("model_general"))
        classes = as_frame(self.blocks.get("model_classes")).copy()
        if len(classes):
            numbers = None
            if "rlnReferenceImage" in classes:
                numbers = [class_number_from_path(p) for p in classes["rlnReferenceImage"]]
                if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
                    numbers = None
            classes["class_number"] = numbers or list(range(1, len(classes) + 1))
        self.classes = classes
        self.groups = as_frame(self.blocks.get("model_groups"))

    @property
    def n_classes(self):
        if "rlnNrClasses" in self.general:
            return int(self.general["rlnNrClasses"])
        return len(self.classes)

    @property
    def pixel_size(self):
        v = self.general.get("rlnPixelSize")
        return float(v) if v is not None else None

    @property
    def box(self):
        v = self.general.get("rlnOriginalImageSize")
        return int(v) if v is not None else None

    def class_numbers(self):
        if "class_number" in self.classes:
            return [int(k) for k in self.classes["class_number"]]
        return list(range(1, self.n_classes + 1))

    def class_row(self, k):
        """The data_model_classes row (dict) of class k (1-based)."""
        rows = self.classes[self.classes["class_number"] == int(k)]
        if not len(rows):
            raise CryoClassError(f"{self.path}: no class {k} in data_model_classes "
                                 f"(classes {self.class_numbers()})")
        return {c: _py(v) for c, v in rows.iloc[0].items()}

    def class_table(self, k):
        name = f"model_class_{int(k)}"
        if name not in self.blocks:
            avail = ", ".join("data_" + b for b in self.blocks)
            raise CryoClassError(f"{self.path}: no table data_{name}; tables: {avail}")
        return as_frame(self.blocks[name])

    def class_tables(self):
        """{k: data_model_class_k} for every class that has one."""
        return {k: as_frame(self.blocks[f"model_class_{k}"]) for k in self.class_numbers()
                if f"model_class_{k}" in self.blocks}

    def class_map_path(self, k):
        """The map named by class k's ``rlnReferenceImage``: as written when it exists
        from the working directory (RELION writes names relative to it), else the file of
        that name next to the model.star; None when neither exists."""
        ref = str(self.class_row(k).get("rlnReferenceImage", "") or "")
        ref = ref.split("@")[-1].replace(":mrc", "").strip()
        if not ref:
            return None
        here = os.path.join(os.path.dirname(os.path.abspath(self.path)),
                            os.path.basename(ref))
        return next((c for c in (ref, here) if os.path.exists(c)), None)

    def ssnr_curve(self, k):
        """``(resolution 1/A, SSNR)`` arrays of class k from data_model_class_k
        (``rlnResolution``, ``rlnSsnrMap``); empty arrays when the table lacks them."""
        name = f"model_class_{int(k)}"
        tab = as_frame(self.blocks.get(name))
        if "rlnSsnrMap" not in tab.columns:
            return np.zeros(0), np.zeros(0)
        res = tab["rlnResolution"].to_numpy(dtype=float) if "rlnResolution" in tab.columns \
            else np.arange(len(tab), dtype=float)
        return res, tab["rlnSsnrMap"].to_numpy(dtype=float)

    def group_table(self, g):
        name = f"model_group_{int(g)}"
        if name not in self.blocks:
            raise CryoClassError(f"{self.path}: no table data_{name}")
        return as_frame(self.blocks[name])


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
class RunResults:
    """Read-only access to a run's iterations.

    ``RunResults('out/run')``, ``RunResults('out')`` (the folder) or
    ``RunResults('out/run_it003_model.star')`` all open rootname ``out/run``.
    """

    def __init__(self, rootname_or_dir):
        self.root = find_run_root(rootname_or_dir)
        self.directory = os.path.dirname(os.path.abspath(self.root))
        self.name = os.path.basename(self.root)

    def __repr__(self):
        return f"RunResults({self.root!r}, iterations={self.iterations})"

    # ---- files ---------------------------------------------------------------------
    def path(self, it, kind):
        """``<o>_itNNN_<kind>.star`` (kind: model, optimiser, data, sampling)."""
        return f"{self.root}_it{int(it):03d}_{kind}.star"

    def class_map_path(self, it, k):
        """``<o>_itNNN_classKKK.mrc``; falls back to rlnReferenceImage of the model."""
        fn = f"{self.root}_it{int(it):03d}_class{int(k):03d}.mrc"
        if os.path.exists(fn):
            return fn
        try:
            return self.model(it).class_map_path(k) or fn
        except CryoClassError:
            return fn

    @property
    def iterations(self):
        """Sorted iterations with a model.star (re-scanned each call: runs grow)."""
        found = _scan(glob.escape(self.root) + "_it[0-9][0-9][0-9]*_model.star")
        return found.get(self.root, [])

    @property
    def last_iteration(self):
        its = self.iterations
        if not its:
            raise CryoClassError(f"{self.root}: no iterations found")
        return its[-1]

    def resolve_iteration(self, it=None):
        """``None`` or -1 -> last iteration; otherwise check that ``it`` exists."""
        its = self.iterations
        if not its:
            raise CryoClassError(f"{self.root}: no iterations found")
        if it is None or int(it) < 0:
            return its[-1]
        if int(it) not in its:
            raise CryoClassError(f"{self.root}: no iteration {int(it)}; iterations "
                                 f"{_ranges(its)}")
        return int(it)

    def has(self, it, kind):
        return os.path.exists(self.path(it, kind))

    def resolve_iterations(self, its):
        """Iterations that must all exist (sorted, unique); None or empty -> [last].
        A one-line error lists the iterations on disk when one is missing."""
        if not its:
            return [self.resolve_iteration(None)]
        have = self.iterations
        bad = sorted({int(i) for i in its if int(i) not in have})
        if bad:
            raise CryoClassError(f"{self.root}: no iteration {', '.join(map(str, bad))}; "
                                 f"iterations {_ranges(have)}")
        return sorted({int(i) for i in its})

    def star_blocks(self, it, kind):
        """``[(block name without 'data_', 'loop' | 'pairs', rows)]`` of an iteration's
        ``<kind>.star`` (model, optimiser, data, sampling), in file order."""
        fn = self._need(self.resolve_iteration(it), kind)
        out = []
        for name, block in read_star(fn).items():
            if isinstance(block, dict):
                out.append((name, "pairs", 1))
            else:
                out.append((name, "loop", len(as_frame(block))))
        return out

    # ---- tables --------------------------------------------------------------------
    def _need(self, it, kind):
        fn = self.path(self.resolve_iteration(it), kind)
        if not os.path.exists(fn):
            raise CryoClassError(f"{fn}: missing (iteration {int(it)} has no {kind}.star)")
        return fn

    def model(self, it=None):
        """:class:`ModelStar` of an iteration (default last)."""
        return ModelStar(self._need(self.resolve_iteration(it), "model"))

    def optimiser(self, it=None):
        """data_optimiser_general of an iteration as a dict."""
        fn = self._need(self.resolve_iteration(it), "optimiser")
        return as_dict(read_star_block(fn, "optimiser_general"))

    def sampling(self, it=None):
        """data_sampling_general of an iteration as a dict."""
        fn = self._need(self.resolve_iteration(it), "sampling")
        return as_dict(read_star_block(fn, "sampling_general"))

    def data(self, it=None):
        """data_particles of an iteration (DataFrame, one row per particle)."""
        fn = self._need(self.resolve_iteration(it), "data")
        return as_frame(_star_io.particle_block(read_star(fn), fn)[1])

    def optics(self, it=None):
        fn = self._need(self.resolve_iteration(it), "data")
        blocks = read_star(fn)
        return as_frame(blocks["optics"]) if "optics" in blocks else None

    def class_map(self, it, k):
        """(volume float32 (z, y, x), voxel size in A) of class k at iteration it."""
        import mrcfile

        it = self.resolve_iteration(it)
        fn = self.class_map_path(it, k)
        if not os.path.exists(fn):
            raise CryoClassError(f"{fn}: missing class map (iteration {it}, class {k})")
        try:
            with mrcfile.open(fn, permissive=True) as mrc:
                vol = np.asarray(mrc.data, dtype=np.float32).copy()
                apix = float(mrc.voxel_size.x)
        except Exception as err:
            raise CryoClassError(f"{fn}: cannot read MRC map ({err})") from None
        if not apix or apix <= 0:
            apix = self.model(it).pixel_size or 1.0
        return vol, apix

    def class_maps(self, it=None, classes=None):
        """{k: volume} and the voxel size, for the classes whose maps exist."""
        it = self.resolve_iteration(it)
        ks = list(classes) if classes else self.model(it).class_numbers()
        maps, apix = {}, None
        for k in ks:
            if os.path.exists(self.class_map_path(it, k)):
                maps[k], apix = self.class_map(it, k)
        return maps, apix

    # ---- series over iterations ----------------------------------------------------
    def classes_series(self, label, iterations=None):
        """DataFrame (index iteration, one column per class number) of a
        data_model_classes label over the iterations (e.g. rlnClassDistribution)."""
        rows = {}
        for it in iterations or self.iterations:
            try:
                classes = self.model(it).classes
            except CryoClassError:
                continue
            if label not in classes:
                continue
            rows[it] = dict(zip(classes["class_number"].astype(int),
                                classes[label].astype(float)))
        df = pd.DataFrame.from_dict(rows, orient="index").sort_index()
        df.index.name = "iteration"
        df.columns.name = "class"
        return df[sorted(df.columns)] if len(df.columns) else df

    def class_distribution_series(self, iterations=None):
        """rlnClassDistribution (fraction of particles) per class per iteration (all, or
        the given ones)."""
        return self.classes_series("rlnClassDistribution", iterations)

    def class_resolution_series(self, iterations=None):
        """rlnEstimatedResolution (A) per class per iteration; RELION's 999 -> NaN."""
        df = self.classes_series("rlnEstimatedResolution", iterations)
        return df.where(df < RELION_UNSET)

    def convergence_series(self, iterations=None):
        """DataFrame indexed by iteration (all, or the given ones):
        rlnChangesOptimalClasses (fraction), rlnChangesOptimalOrientations (deg),
        rlnChangesOptimalOffsets (A) from the optimiser, rlnLogLikelihood,
        rlnAveragePmax, rlnCurrentResolution (A) from the model.  RELION's 'not yet
        defined' sentinels (>= 999) become NaN."""
        opt_labels = ["rlnChangesOptimalClasses", "rlnChangesOptimalOrientations",
                      "rlnChangesOptimalOffsets"]
        mod_labels = ["rlnLogLikelihood", "rlnAveragePmax", "rlnCurrentResolution"]
        rows = {}
        for it in iterations or self.iterations:
            row = {}
            if self.has(it, "optimiser"):
                try:
                    opt = self.optimiser(it)
                except CryoClassError:
                    opt = {}
                for lab in opt_labels:
                    v = _float(opt.get(lab))
                    row[lab] = v if v is not None and v < RELION_UNSET else np.nan
            try:
                gen = self.model(it).general
            except CryoClassError:
                gen = {}
            for lab in mod_labels:
                v = _float(gen.get(lab))
                row[lab] = np.nan if v is None else v
            rows[it] = row
        df = pd.DataFrame.from_dict(rows, orient="index",
                                    columns=opt_labels + mod_labels).sort_index()
        df.index.name = "iteration"
        if "rlnCurrentResolution" in df:
            cr = df["rlnCurrentResolution"]
            df["rlnCurrentResolution"] = cr.where((cr > 0) & (cr < RELION_UNSET))
        return df.astype(float)

    def summary(self, it=None):
        """Per-class summary table of an iteration, largest class first: class,
        distribution (fraction), particles (from data.star when present), estimated
        resolution (A), accuracy rotations (deg) and translations (A)."""
        it = self.resolve_iteration(it)
        classes = self.model(it).classes.copy()
        counts = None
        if self.has(it, "data"):
            try:
                d = self.data(it)
                if "rlnClassNumber" in d:
                    counts = d["rlnClassNumber"].astype(int).value_counts()
            except CryoClassError:
                counts = None
        out = pd.DataFrame({"class": classes["class_number"].astype(int)})
        for lab in ("rlnClassDistribution", "rlnEstimatedResolution",
                    "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
                    "rlnOverallFourierCompleteness"):
            if lab in classes:
                out[lab] = classes[lab].astype(float).values
        if counts is not None:
            out["particles"] = [int(counts.get(k, 0)) for k in out["class"]]
        if "rlnClassDistribution" in out:
            out = out.sort_values("rlnClassDistribution", ascending=False, kind="stable")
        return out.reset_index(drop=True)


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ranges(its):
    """[0, 1, 2, 3, 5] -> '0-3, 5'."""
    out, start, prev = [], None, None
    for i in its:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(out) or "none"
