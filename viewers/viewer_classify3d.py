"""Scipion viewer of a cryoclass 3D classification (``ProtCryoClassClassify3D``).

A form in the spirit of RELION's viewer in scipion-em-relion (``RelionViewer``): pick the
iterations (``displayIter``: the last, or a selection such as ``5,10-15`` in
``iterSelection``) and classes (default all), then one eye button per display:

* the classification in Scipion (``outputClasses`` in showj) and the particles of the
  selected classes;
* class maps as slices, central slices of all classes sorted by size (one figure per
  selected iteration), the classes of the last selected iteration in ChimeraX (fitted
  into the largest class and tiled);
* SSNR per class, the curves of all selected iterations overlaid (one line per
  iteration and class);
* class distribution, estimated resolution and convergence over the selected iterations
  (one selected iteration: every iteration up to it);
* angular distribution per class, as a plot or as ChimeraX markers (a ``.bild`` file
  per class: one sphere per sampled direction, radius ~ particles);
* the tables of ``_model.star`` and ``_optimiser.star`` in Scipion's table viewer
  (showj, one view per STAR block; a Tk table where showj is not installed).

Every display has a headless method (``make*``) that writes its figure / file under the
protocol's ``extra/viewer/`` and returns the path; the ``_show*`` methods used by the
GUI only wrap those results into views.  Figures are the ones of ``cryoclass report``
(:mod:`cryoclass_plugin.commands.report`), so both always agree.
"""
import os

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pyworkflow.protocol.constants import LEVEL_ADVANCED
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, View
from pwem.viewers import Classes3DView, DataView, EmProtocolViewer, ObjectView
from pwem.viewers import showj

from ..constants import OUTPUT_ROOT
from ..engine.errors import CryoClassError
from ..protocols import ProtCryoClassClassify3D

ITER_LAST = 0
ITER_SELECTION = 1
CLASSES_ALL = 0
CLASSES_SEL = 1
VOLUME_SLICES = 0
VOLUME_CHIMERAX = 1
ANGDIST_MOLLWEIDE = 0
ANGDIST_RECT = 1
ANGDIST_CHIMERAX = 2
MODEL_GENERAL = 0
MODEL_CLASSES = 1
MODEL_CLASS_SPECTRA = 2
MODEL_GROUPS = 3
MODEL_TABLES = ["general", "classes", "class spectra", "groups"]
AXES = ["z", "y", "x"]


class FigureView(View):
    """Shows a matplotlib Figure (or a PNG) in a Tk window; headless code uses
    ``.path`` / ``.figure`` and never calls ``show``."""

    def __init__(self, path, figure=None, title="cryoclass", tkParent=None):
        View.__init__(self)
        self.path = path
        self.figure = figure
        self.title = title
        self._tkParent = tkParent

    def show(self):
        import tkinter as tk
        from matplotlib.backends.backend_tkagg import (FigureCanvasTkAgg,
                                                       NavigationToolbar2Tk)
        fig = self.figure
        if fig is None:
            from matplotlib.figure import Figure
            from matplotlib.image import imread
            img = imread(self.path)
            h, w = img.shape[:2]
            fig = Figure(figsize=(w / 100.0, h / 100.0), dpi=100)
            ax = fig.add_axes([0, 0, 1, 1])
            ax.imshow(img)
            ax.set_axis_off()
        own_root = self._tkParent is None
        win = tk.Tk() if own_root else tk.Toplevel(self._tkParent)
        win.title(self.title)
        canvas = FigureCanvasTkAgg(fig, master=win)
        NavigationToolbar2Tk(canvas, win).update()
        canvas.get_tk_widget().pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        canvas.draw()
        if own_root:
            win.mainloop()


class MessageOnlyView(View):
    """A message (e.g. 'ChimeraX not found, open this script'): printed headless."""

    def __init__(self, message, viewer=None, title="cryoclass"):
        View.__init__(self)
        self.message = message
        self._viewer = viewer
        self.title = title

    def show(self):
        if self._viewer is not None and self._viewer.getTkRoot() is not None:
            self._viewer.infoMessage(self.message, self.title).show()
        else:
            print(self.message)


class StarTableView(DataView):
    """One block of a STAR file in Scipion's table viewer (showj, ``block@file`` in
    metadata mode).  Where showj is missing (it comes with the xmipp3 plugin) the same
    rows open in pwem's Tk ``TableView``."""

    def __init__(self, path, block, env=None):
        DataView.__init__(self, "%s@%s" % (block, os.path.abspath(path)),
                          viewParams={showj.MODE: showj.MODE_MD},
                          env=env or os.environ.copy())

    def table(self):
        """(header, rows) of the block as the run reader reads it: a key/value block
        gives rows (label, value), a loop block one row per line."""
        from ..runresults import as_frame, read_star
        block = read_star(self.getPath())[self.getTableName()]
        if isinstance(block, dict):
            return ["label", "value"], [(k, v) for k, v in block.items()]
        frame = as_frame(block)
        return list(frame.columns), [tuple(r) for r in frame.itertuples(index=False)]

    def show(self):
        from pyworkflow.plugin import Domain
        if Domain.importFromPlugin("xmipp3", "Plugin") is not None:
            return DataView.show(self)
        from pwem.viewers import TableView
        header, rows = self.table()
        TableView(header, rows, title="data_%s (%s)" % (self.getTableName(),
                                                        os.path.basename(self.getPath())),
                  height=min(max(len(rows), 1), 25), width=min(180 * len(header), 1400))


class CryoClassViewer(EmProtocolViewer):
    """Visualization of cryoclass 3D classification results: classes, maps, SSNR,
    convergence and angular distribution of any iteration."""
    _label = "viewer cryoclass 3D classification"
    _targets = [ProtCryoClassClassify3D]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        self._env = os.environ.copy()
        form.addSection(label="Visualization")
        form.addParam("displayIter", params.EnumParam, choices=["last", "selection"],
                      default=ITER_LAST, display=params.EnumParam.DISPLAY_HLIST,
                      label="Iterations to visualize",
                      help="*last*: the last iteration written.\n"
                           "*selection*: the iterations listed below.")
        form.addParam("iterSelection", params.NumericRangeParam,
                      default=str(self._defaultIteration()),
                      condition="displayIter==%d" % ITER_SELECTION,
                      label="Iterations list",
                      help='e.g. "25" or "5,10-15" (0 is the starting model). SSNR '
                           "curves of all of them are overlaid; the plots over "
                           "iterations show them (one iteration: all up to it); maps, "
                           "angular distributions and tables: one per iteration; "
                           "ChimeraX: the last one.")
        form.addParam("showClasses3D", params.EnumParam, choices=["all", "selection"],
                      default=CLASSES_ALL, display=params.EnumParam.DISPLAY_HLIST,
                      label="3D classes to visualize")
        form.addParam("class3DSelection", params.NumericRangeParam, default="1",
                      condition="showClasses3D==%d" % CLASSES_SEL,
                      label="Classes list", help='e.g. "1,3-4"')

        group = form.addGroup("Particles")
        group.addParam("showClassesScipion", params.LabelParam, important=True,
                       label="Show classification in Scipion",
                       help="The output classes with their particle counts; right-click "
                            "a class and 'Open images' to see its particles.")
        group.addParam("showClassParticles", params.LabelParam,
                       label="Show particles of the selected classes",
                       help="One particle set per selected class (from outputClasses).")

        group = form.addGroup("Volumes")
        group.addParam("displayVol", params.EnumParam, choices=["slices", "ChimeraX"],
                       default=VOLUME_SLICES, display=params.EnumParam.DISPLAY_HLIST,
                       label="Display volumes with",
                       help="*slices*: a grid of slices of each selected class map.\n"
                            "*ChimeraX*: all selected classes as surfaces, each fitted "
                            "into the largest class and tiled (a .cxc script).")
        group.addParam("sliceAxis", params.EnumParam, choices=AXES, default=0,
                       display=params.EnumParam.DISPLAY_HLIST, expertLevel=LEVEL_ADVANCED,
                       label="Slices along", condition="displayVol==%d" % VOLUME_SLICES)
        group.addParam("showCentralSlices", params.LabelParam,
                       label="Central slices of the classes (largest first)",
                       help="Central xy, xz and yz slices of every selected class side "
                            "by side, with distribution and estimated resolution.")

        group = form.addGroup("Resolution")
        group.addParam("showSSNR", params.LabelParam, label="Display SSNR plots",
                       help="Spectral signal-to-noise ratio per class (rlnSsnrMap) "
                            "against resolution, with the SSNR = 1 line; the selected "
                            "iterations overlaid.")

        group = form.addGroup("Tables")
        group.addParam("displayModelTable", params.EnumParam, choices=MODEL_TABLES,
                       default=MODEL_CLASSES, display=params.EnumParam.DISPLAY_COMBO,
                       label="Show _model.star table",
                       help="*general*: data_model_general; *classes*: "
                            "data_model_classes; *class spectra*: data_model_class_N of "
                            "the selected classes (SSNR, tau2, sigma2 per shell); "
                            "*groups*: data_model_groups.")
        group.addParam("showOptimiserTable", params.LabelParam,
                       label="Show _optimiser.star table",
                       help="data_optimiser_general: the run's settings and the changes "
                            "between iterations.")

        form.addSection(label="Overall")
        form.addParam("showClassDistribution", params.LabelParam,
                      label="Class distribution over iterations")
        form.addParam("showClassResolution", params.LabelParam,
                      label="Estimated resolution per class over iterations")
        form.addParam("showConvergence", params.LabelParam,
                      label="Changes in classes, orientations and offsets",
                      help="Changes between iterations (optimiser.star), "
                           "log-likelihood, average Pmax and current resolution.")
        form.addParam("displayAngDist", params.EnumParam,
                      choices=["Mollweide", "rot/tilt histogram", "ChimeraX"],
                      default=ANGDIST_MOLLWEIDE, display=params.EnumParam.DISPLAY_HLIST,
                      label="Angular distribution",
                      help="Projection directions of the particles of each selected "
                           "class at the chosen iteration.\n*ChimeraX*: the class map "
                           "with one sphere per sampled direction, radius ~ particles "
                           "(a .bild file per class, also readable on its own).")

    def _getVisualizeDict(self):
        return {
            "showClassesScipion": self._showClassesScipion,
            "showClassParticles": self._showClassParticles,
            "displayVol": self._showVolumes,
            "showCentralSlices": self._showCentralSlices,
            "showSSNR": self._showSSNR,
            "showClassDistribution": self._showClassDistribution,
            "showClassResolution": self._showClassResolution,
            "showConvergence": self._showConvergence,
            "displayAngDist": self._showAngularDistribution,
            "displayModelTable": self._showModelTable,
            "showOptimiserTable": self._showOptimiserTable,
        }

    def _validate(self):
        try:
            self.runResults()
        except CryoClassError as err:
            return ["No iteration written yet: %s" % err]
        return []

    # ------------------------------------------------------------------ state
    def runRoot(self):
        """Rootname of the engine outputs (``<run>/extra/cryoclass``)."""
        try:
            return self.protocol._getFileName("output_root")
        except Exception:
            return self.protocol._getExtraPath(OUTPUT_ROOT)

    def runResults(self):
        from ..runresults import RunResults
        return RunResults(self.runRoot())

    def _defaultIteration(self):
        try:
            return self.runResults().last_iteration
        except Exception:
            return 0

    def getIterations(self):
        """The iterations chosen in the form, sorted (``last`` -> [last written])."""
        run = self.runResults()
        if self.displayIter.get() != ITER_SELECTION:
            return [run.resolve_iteration(None)]
        text = (self.iterSelection.get() or "").strip()
        if not text:
            return [run.resolve_iteration(None)]
        try:
            its = pwutils.getListFromRangeString(text)
        except ValueError:
            raise CryoClassError("Iterations list: cannot read '%s' (e.g. 25 or 5,10-15)"
                                 % text) from None
        return run.resolve_iterations(its)

    def getIteration(self):
        """The one iteration of single-iteration displays: the last selected."""
        return self.getIterations()[-1]

    def seriesIterations(self):
        """Iterations of the plots over iterations: None (all) for ``last``; the
        selection when it has several; every iteration up to a single selected one."""
        if self.displayIter.get() != ITER_SELECTION:
            return None
        its = self.getIterations()
        if len(its) > 1:
            return its
        return [i for i in self.runResults().iterations if i <= its[0]]

    def getClasses(self):
        """Selected class numbers, or None for all."""
        if self.showClasses3D.get() == CLASSES_SEL:
            text = (self.class3DSelection.get() or "").strip()
            if text:
                try:
                    return sorted(set(pwutils.getListFromRangeString(text)))
                except ValueError:
                    raise CryoClassError("Classes list: cannot read '%s' (e.g. 1,3-4)"
                                         % text) from None
        return None

    def viewerDir(self, *paths):
        d = self.protocol._getExtraPath("viewer")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, *paths)

    def _save(self, fig, name):
        from ..figures import save_figure
        path = save_figure(fig, self.viewerDir(name))
        self._figures = getattr(self, "_figures", {})
        self._figures[path] = fig
        return path

    # ------------------------------------------------------------------ headless makers
    def makeSlices(self):
        """PNG per selected iteration and class: slices of its map along the chosen axis."""
        from ..commands import report as R
        run = self.runResults()
        axis = AXES[self.sliceAxis.get() or 0]
        paths = []
        for it in self.getIterations():
            for k in R._classes_of(run, it, self.getClasses()):
                fig = R.figure_map_slices(run, it, k, axis)
                paths.append(self._save(fig, "slices_it%03d_class%03d_%s.png"
                                        % (it, k, axis)))
        return paths

    def makeCentralSlices(self):
        """PNG per selected iteration: central slices of the selected classes."""
        from ..commands import report as R
        run = self.runResults()
        return [self._save(R.figure_central_slices(run, it, self.getClasses()),
                           "central_slices_it%03d.png" % it)
                for it in self.getIterations()]

    def makeChimeraXScript(self):
        from ..commands import report as R
        run, it = self.runResults(), self.getIteration()
        return R.chimerax_script(run, it, self.viewerDir("classes_it%03d.cxc" % it),
                                 self.getClasses())

    def makeSSNR(self):
        """One PNG: the SSNR curves of the selected iterations and classes, overlaid."""
        from ..commands import report as R
        run, its = self.runResults(), self.getIterations()
        name = "ssnr_it%03d.png" % its[0] if len(its) == 1 else \
            "ssnr_it%03d-%03d_%d.png" % (its[0], its[-1], len(its))
        return self._save(R.figure_ssnr(run, its[-1], self.getClasses(),
                                        iterations=its), name)

    def _seriesName(self, stem):
        its = self.seriesIterations()
        return stem + (".png" if its is None else "_it%03d-%03d_%d.png"
                       % (its[0], its[-1], len(its)))

    def makeClassDistribution(self):
        from ..commands import report as R
        return self._save(R.figure_class_distribution(self.runResults(), self.getClasses(),
                                                      self.seriesIterations()),
                          self._seriesName("class_distribution"))

    def makeClassResolution(self):
        from ..commands import report as R
        return self._save(R.figure_class_resolution(self.runResults(), self.getClasses(),
                                                    self.seriesIterations()),
                          self._seriesName("class_resolution"))

    def makeConvergence(self):
        from ..commands import report as R
        return self._save(R.figure_convergence(self.runResults(), self.seriesIterations()),
                          self._seriesName("convergence"))

    def makeAngularDistribution(self):
        """PNG per selected iteration (Mollweide or rot/tilt histogram)."""
        from ..commands import report as R
        run = self.runResults()
        proj = "rect" if self.displayAngDist.get() == ANGDIST_RECT else "mollweide"
        return [self._save(R.figure_angular_distribution(run, it, self.getClasses(),
                                                         projection=proj),
                           "angular_distribution_it%03d_%s.png" % (it, proj))
                for it in self.getIterations()]

    def makeAngularDistributionBild(self):
        """{iteration: {class: {'bild', 'cxc', 'markers', 'particles', 'order'}}}: a
        ChimeraX marker file and a script opening it with the class map, per selected
        iteration and class (:func:`..commands.report.angdist_bild`)."""
        from ..commands import report as R
        run = self.runResults()
        return {it: R.angdist_bild(run, it, self.viewerDir(), self.getClasses())
                for it in self.getIterations()}

    def makeTableViews(self, kind, which=None):
        """Table views (:class:`StarTableView`, not shown) of the blocks of the
        selected iterations' ``<kind>.star``: kind ``optimiser`` (its one block) or
        ``model`` with ``which`` one of MODEL_GENERAL, MODEL_CLASSES,
        MODEL_CLASS_SPECTRA (data_model_class_N of the selected classes), MODEL_GROUPS."""
        from ..commands import report as R
        run = self.runResults()
        views = []
        for it in self.getIterations():
            names = [b[0] for b in run.star_blocks(it, kind)]
            if kind == "model":
                if which == MODEL_CLASS_SPECTRA:
                    wanted = ["model_class_%d" % k
                              for k in R._classes_of(run, it, self.getClasses())]
                else:
                    wanted = ["model_" + MODEL_TABLES[which or 0]]
                missing = [w for w in wanted if w not in names]
                if missing:
                    raise CryoClassError("%s: no table data_%s; tables: %s" % (
                        run.path(it, kind), missing[0],
                        ", ".join("data_" + n for n in names)))
                names = wanted
            views += [StarTableView(run.path(it, kind), n, env=getattr(self, "_env", None))
                      for n in names]
        return views

    def _outputClasses(self):
        classes = getattr(self.protocol, "outputClasses", None)
        if classes is None:
            raise CryoClassError("the protocol has no output classes yet (they are made "
                                 "when the run finishes); use the plots of the iterations")
        return classes

    def makeClassesView(self):
        """A Classes3DView of outputClasses (not shown)."""
        classes = self._outputClasses()
        labels = ("enabled id _size _representative._filename _rlnClassDistribution "
                  "_rlnEstimatedResolution _rlnAccuracyRotations "
                  "_rlnAccuracyTranslationsAngst")
        view_params = {showj.ORDER: labels, showj.VISIBLE: labels,
                       showj.RENDER: "_representative._filename",
                       showj.SORT_BY: "_size desc", showj.MODE: showj.MODE_MD}
        other = ""
        try:
            other = self.protocol._getImagesForClasses().strId()
        except Exception:
            pass
        return Classes3DView(self._project, classes.strId(), classes.getFileName(),
                             other=other, env=getattr(self, "_env", os.environ.copy()),
                             viewParams=view_params)

    def makeClassParticleSets(self):
        """{class number: sqlite of a SetOfParticles with its particles} for the selected
        classes of outputClasses (written under extra/viewer/)."""
        from pwem.objects import SetOfParticles
        classes = self._outputClasses()
        wanted = self.getClasses()
        out = {}
        for cls in classes.iterItems(orderBy="id"):
            k = cls.getObjId()
            if wanted and k not in wanted:
                continue
            fn = self.viewerDir("particles_class%03d.sqlite" % k)
            pwutils.cleanPath(fn)
            parts = SetOfParticles(filename=fn)
            parts.copyInfo(cls)
            for p in cls.iterItems(orderBy="id"):
                parts.append(p.clone())
            parts.write()
            parts.close()
            out[k] = fn
        if wanted:
            missing = [k for k in wanted if k not in out]
            if missing:
                raise CryoClassError("no class %s in the output classes"
                                     % ", ".join(map(str, missing)))
        return out

    # ------------------------------------------------------------------ GUI wrappers
    def _figureViews(self, paths, title):
        if isinstance(paths, str):
            paths = [paths]
        figs = getattr(self, "_figures", {})
        return [FigureView(p, figs.get(p), title=title, tkParent=self.getTkRoot())
                for p in paths]

    def _guard(self, build):
        try:
            return build()
        except CryoClassError as err:
            return [self.errorMessage(str(err), "cryoclass viewer")]

    def _showClassesScipion(self, paramName=None):
        return self._guard(lambda: [self.makeClassesView()])

    def _showClassParticles(self, paramName=None):
        def build():
            sets = self.makeClassParticleSets()
            return [ObjectView(self._project, self.protocol.strId(), fn,
                               env=getattr(self, "_env", os.environ.copy()),
                               viewParams={showj.MODE: showj.MODE_GALLERY})
                    for fn in sets.values()]
        return self._guard(build)

    def _showVolumes(self, paramName=None):
        if self.displayVol.get() == VOLUME_CHIMERAX:
            return self._guard(self._chimeraViews)
        return self._guard(lambda: self._figureViews(self.makeSlices(), "Class maps"))

    def _chimeraViews(self):
        from ..figures import launch_chimerax
        cxc = self.makeChimeraXScript()
        started, msg = launch_chimerax(cxc)
        return [] if started else [MessageOnlyView(msg, self, "ChimeraX")]

    def _showCentralSlices(self, paramName=None):
        return self._guard(lambda: self._figureViews(self.makeCentralSlices(),
                                                     "Central slices"))

    def _showSSNR(self, paramName=None):
        return self._guard(lambda: self._figureViews(self.makeSSNR(), "SSNR"))

    def _showClassDistribution(self, paramName=None):
        return self._guard(lambda: self._figureViews(self.makeClassDistribution(),
                                                     "Class distribution"))

    def _showClassResolution(self, paramName=None):
        return self._guard(lambda: self._figureViews(self.makeClassResolution(),
                                                     "Estimated resolution"))

    def _showConvergence(self, paramName=None):
        return self._guard(lambda: self._figureViews(self.makeConvergence(),
                                                     "Convergence"))

    def _showAngularDistribution(self, paramName=None):
        if self.displayAngDist.get() == ANGDIST_CHIMERAX:
            return self._guard(self._angdistChimeraViews)
        return self._guard(lambda: self._figureViews(self.makeAngularDistribution(),
                                                     "Angular distribution"))

    def _angdistChimeraViews(self):
        """ChimeraX on each class's map + markers; a message naming the scripts when
        ChimeraX is not installed."""
        from ..figures import launch_chimerax
        scripts = [c["cxc"] for per in self.makeAngularDistributionBild().values()
                   for c in per.values()]
        failed = []
        for cxc in scripts:
            started, msg = launch_chimerax(cxc)
            if not started:
                failed.append(msg)
        if not failed:
            return []
        return [MessageOnlyView(failed[0] if len(failed) == 1 else
                                "ChimeraX not found on PATH; open these scripts in "
                                "ChimeraX:\n" + "\n".join(os.path.abspath(c)
                                                           for c in scripts),
                                self, "ChimeraX")]

    def _showModelTable(self, paramName=None):
        return self._guard(lambda: self.makeTableViews("model",
                                                       self.displayModelTable.get()))

    def _showOptimiserTable(self, paramName=None):
        return self._guard(lambda: self.makeTableViews("optimiser"))
