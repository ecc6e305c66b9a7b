"""Scipion viewer of a cryoclass 3D classification (``ProtCryoClassClassify3D``).

A form in the spirit of RELION's viewer in scipion-em-relion (``RelionViewer``): pick an
iteration (default the last) and classes (default all), then one eye button per display:

* the classification in Scipion (``outputClasses`` in showj) and the particles of the
  selected classes;
* class maps as slices, central slices of all classes sorted by size, the classes in
  ChimeraX (fitted into the largest class and tiled);
* SSNR per class;
* class distribution, estimated resolution and convergence over iterations, angular
  distribution per class.

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
from pwem.viewers import Classes3DView, EmProtocolViewer, ObjectView
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
        form.addParam("viewIter", params.EnumParam, choices=["last", "selection"],
                      default=ITER_LAST, display=params.EnumParam.DISPLAY_HLIST,
                      label="Iteration to visualize",
                      help="*last*: the last iteration written.\n"
                           "*selection*: the iteration given below.")
        form.addParam("iterSelection", params.IntParam, default=self._defaultIteration(),
                      condition="viewIter==%d" % ITER_SELECTION,
                      label="Iteration",
                      help="Iteration number (0 is the starting model).")
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
                            "against resolution, with the SSNR = 1 line.")

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
                      choices=["Mollweide", "rot/tilt histogram"],
                      default=ANGDIST_MOLLWEIDE, display=params.EnumParam.DISPLAY_HLIST,
                      label="Angular distribution",
                      help="Projection directions of the particles of each selected "
                           "class at the chosen iteration.")

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

    def getIteration(self):
        """The iteration chosen in the form (``last`` -> last written)."""
        run = self.runResults()
        if self.viewIter.get() == ITER_SELECTION and self.iterSelection.get() is not None:
            return run.resolve_iteration(self.iterSelection.get())
        return run.resolve_iteration(None)

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
        """PNG per selected class: slices of its map along the chosen axis."""
        from ..commands import report as R
        run, it = self.runResults(), self.getIteration()
        axis = AXES[self.sliceAxis.get() or 0]
        paths = []
        for k in R._classes_of(run, it, self.getClasses()):
            fig = R.figure_map_slices(run, it, k, axis)
            paths.append(self._save(fig, "slices_it%03d_class%03d_%s.png" % (it, k, axis)))
        return paths

    def makeCentralSlices(self):
        from ..commands import report as R
        run, it = self.runResults(), self.getIteration()
        fig = R.figure_central_slices(run, it, self.getClasses())
        return self._save(fig, "central_slices_it%03d.png" % it)

    def makeChimeraXScript(self):
        from ..commands import report as R
        run, it = self.runResults(), self.getIteration()
        return R.chimerax_script(run, it, self.viewerDir("classes_it%03d.cxc" % it),
                                 self.getClasses())

    def makeSSNR(self):
        from ..commands import report as R
        run, it = self.runResults(), self.getIteration()
        return self._save(R.figure_ssnr(run, it, self.getClasses()), "ssnr_it%03d.png" % it)

    def makeClassDistribution(self):
        from ..commands import report as R
        return self._save(R.figure_class_distribution(self.runResults(), self.getClasses()),
                          "class_distribution.png")

    def makeClassResolution(self):
        from ..commands import report as R
        return self._save(R.figure_class_resolution(self.runResults(), self.getClasses()),
                          "class_resolution.png")

    def makeConvergence(self):
        from ..commands import report as R
        return self._save(R.figure_convergence(self.runResults()), "convergence.png")

    def makeAngularDistribution(self):
        from ..commands import report as R
        run, it = self.runResults(), self.getIteration()
        proj = "rect" if self.displayAngDist.get() == ANGDIST_RECT else "mollweide"
        fig = R.figure_angular_distribution(run, it, self.getClasses(), projection=proj)
        return self._save(fig, "angular_distribution_it%03d_%s.png" % (it, proj))

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
        return self._guard(lambda: self._figureViews(self.makeAngularDistribution(),
                                                     "Angular distribution"))
