"""cryoclass - select 3D classes: keep classes by number or by quality scores.

Works on any SetOfClasses3D whose classes carry RELION-style scores
(``_rlnClassDistribution``, ``_rlnEstimatedResolution``) -- the cryoclass and relion
3D classification protocols write them -- and reads the SSNR curves from the run's
``_model.star`` (``data_model_class_N/rlnSsnrMap``).
"""
import os
import re

import numpy as np

from pyworkflow.constants import PROD
from pyworkflow.object import String
from pyworkflow.protocol.params import EnumParam, FloatParam, IntParam, PointerParam, StringParam

from pwem.objects import SetOfClasses3D, SetOfParticles, SetOfVolumes
from pwem.protocols import EMProtocol

from .. import convert
from ..constants import SELECT_AUTO, SELECT_BY_NUMBER
from ..runresults import ModelStar

RANK_DISTRIBUTION = 0
RANK_RESOLUTION = 1
RANK_SSNR = 2
RANK_CHOICES = ["class distribution", "estimated resolution", "SSNR"]


def parse_class_numbers(text):
    """``'1, 3 5-7'`` -> ``[1, 3, 5, 6, 7]``; raises ValueError on bad tokens."""
    out = []
    for tok in re.split(r"[,\s;]+", (text or "").strip()):
        if not tok:
            continue
        m = re.match(r"^(\d+)-(\d+)$", tok)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError("range '%s' goes backwards" % tok)
            out.extend(range(a, b + 1))
        elif tok.isdigit():
            out.append(int(tok))
        else:
            raise ValueError("'%s' is not a class number or range (e.g. 1 3 5-7)" % tok)
    return sorted(set(out))


def mean_ssnr(resolution, ssnr, max_resolution_a):
    """Mean SSNR over the shells from the first non-zero frequency up to
    1/``max_resolution_a`` (all shells when ``max_resolution_a`` <= 0)."""
    resolution = np.asarray(resolution, dtype=float)
    ssnr = np.asarray(ssnr, dtype=float)
    if ssnr.size == 0:
        return float("nan")
    keep = resolution > 0
    if max_resolution_a and max_resolution_a > 0:
        keep &= resolution <= 1.0 / max_resolution_a
    if not keep.any():
        keep = np.arange(ssnr.size) > 0
    vals = ssnr[keep]
    return float(np.mean(vals)) if vals.size else float("nan")


class ProtCryoClassSelectClasses(EMProtocol):
    """Select 3D classes, by their numbers or automatically (ranked by class
    distribution, estimated resolution or SSNR, with thresholds), and output their
    particles, maps and classes."""
    _label = "cryoclass - select 3D classes"
    _devStatus = PROD
    _possibleOutputs = {"outputParticles": SetOfParticles,
                        "outputVolumes": SetOfVolumes,
                        "outputClasses": SetOfClasses3D}

    def __init__(self, **kwargs):
        EMProtocol.__init__(self, **kwargs)
        self.selectedClasses = String()

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputClasses", PointerParam, pointerClass="SetOfClasses3D",
                      important=True, label="3D classes",
                      help="Output classes of a 3D classification (cryoclass or relion).")
        form.addParam("selectionMode", EnumParam, default=SELECT_BY_NUMBER,
                      choices=["by class number", "automatic"],
                      label="Select classes",
                      help="By class number: the classes listed below. Automatic: rank "
                           "the classes and keep the best ones that pass the "
                           "thresholds.")
        form.addParam("classNumbers", StringParam, default="",
                      condition="selectionMode == %d" % SELECT_BY_NUMBER,
                      label="Class numbers",
                      help="Classes to keep, e.g. '1 3' or '2-4'.")
        auto = "selectionMode == %d" % SELECT_AUTO
        form.addParam("rankBy", EnumParam, default=RANK_DISTRIBUTION,
                      choices=RANK_CHOICES, condition=auto,
                      label="Rank classes by",
                      help="Class distribution (larger first), estimated resolution "
                           "(finer first) or mean SSNR (larger first).")
        form.addParam("numberToKeep", IntParam, default=1, condition=auto,
                      label="Number of classes to keep",
                      help="The best-ranked classes that pass the thresholds; 0 = all "
                           "that pass.")
        form.addParam("minDistribution", FloatParam, default=0.0, condition=auto,
                      label="Minimum class distribution (%)",
                      help="Classes holding a smaller share of the particles are "
                           "dropped.")
        form.addParam("maxResolution", FloatParam, default=-1.0, condition=auto,
                      label="Maximum estimated resolution (A)",
                      help="Classes whose estimated resolution is worse (larger) than "
                           "this are dropped; -1 = no limit.")
        form.addParam("minSsnr", FloatParam, default=-1.0, condition=auto,
                      label="Minimum mean SSNR",
                      help="Classes with a lower mean SSNR (see below) are dropped; "
                           "-1 = no limit.")
        form.addParam("ssnrResolution", FloatParam, default=20.0, condition=auto,
                      label="SSNR averaged up to (A)",
                      help="The mean SSNR of a class is taken over the shells up to "
                           "this resolution (from its model.star); <= 0: all shells.")

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.selectStep)
        self._insertFunctionStep(self.createOutputStep)

    def selectStep(self):
        ids = self._selectedIds()
        if not ids:
            raise ValueError("No class passes the selection: %s" % self._criteriaText())
        self.selectedClasses.set(" ".join(map(str, ids)))
        self._store(self.selectedClasses)
        self.info("Selected classes: %s" % self.selectedClasses.get())

    def createOutputStep(self):
        classes = self.inputClasses.get()
        ids = set(int(t) for t in self.selectedClasses.get().split())

        def keep(cls):
            return cls.getObjId() in ids

        images = classes.getImages()
        parts = self._createSetOfParticles()
        parts.copyInfo(images)
        parts.setAlignmentProj()
        parts.appendFromClasses(classes, filterClassFunc=keep)

        vols = self._createSetOfVolumes()
        first = None
        for cls in classes.iterItems(orderBy="id"):
            if cls.getObjId() in ids:
                vol = cls.getRepresentative().clone()
                vol.setObjId(cls.getObjId())
                first = first or vol
                vols.append(vol)
        vols.setSamplingRate(first.getSamplingRate() if first else images.getSamplingRate())

        out_classes = self._createSetOfClasses3D(images)
        out_classes.copyInfo(classes)
        out_classes.appendFromClasses(classes, filterClassFunc=keep)

        self._defineOutputs(outputParticles=parts, outputVolumes=vols,
                            outputClasses=out_classes)
        for out in (parts, vols, out_classes):
            self._defineSourceRelation(self.inputClasses, out)

    # ------------------------------------------------------------------ scores
    def _classScores(self):
        """``[(class id, distribution 0-1, resolution A, mean SSNR)]`` of the input."""
        classes = self.inputClasses.get()
        total = sum(cls.getSize() for cls in classes.iterItems()) or 1
        readers = {}
        rows = []
        for cls in classes.iterItems(orderBy="id"):
            k = cls.getObjId()
            dist = getattr(cls, "_rlnClassDistribution", None)
            dist = dist.get() if dist is not None and dist.get() is not None \
                else cls.getSize() / float(total)
            res = getattr(cls, "_rlnEstimatedResolution", None)
            res = res.get() if res is not None and res.get() is not None else 999.0
            rows.append((k, float(dist), float(res), self._ssnrOf(cls, readers)))
        return rows

    def _ssnrOf(self, cls, readers):
        model = getattr(cls, "_cryoclassModelStar", None)
        model = model.get() if model is not None else None
        if not model:
            fn = convert.strip_format(cls.getRepresentative().getFileName() or "")
            model = re.sub(r"_class\d{3,}\.mrc$", "_model.star", fn)
        if not model or not os.path.exists(model):
            return float("nan")
        if model not in readers:
            readers[model] = ModelStar(model)
        res, ssnr = readers[model].ssnr_curve(cls.getObjId())
        if not len(ssnr):
            return float("nan")
        return mean_ssnr(res, ssnr, self.ssnrResolution.get())

    def _selectedIds(self):
        if self.selectionMode.get() == SELECT_BY_NUMBER:
            return parse_class_numbers(self.classNumbers.get())
        rows = self._classScores()
        passing = []
        for k, dist, res, ssnr in rows:
            if dist * 100.0 < self.minDistribution.get():
                continue
            if self.maxResolution.get() > 0 and res > self.maxResolution.get():
                continue
            if self.minSsnr.get() >= 0 and not (ssnr >= self.minSsnr.get()):
                continue
            passing.append((k, dist, res, ssnr))
        rank = self.rankBy.get()
        if rank == RANK_DISTRIBUTION:
            passing.sort(key=lambda r: (-r[1], r[2], r[0]))
        elif rank == RANK_RESOLUTION:
            passing.sort(key=lambda r: (r[2], -r[1], r[0]))
        else:
            passing.sort(key=lambda r: (-(r[3] if np.isfinite(r[3]) else -np.inf), r[0]))
        n = self.numberToKeep.get()
        if n and n > 0:
            passing = passing[:n]
        return sorted(r[0] for r in passing)

    def _criteriaText(self):
        if self.selectionMode.get() == SELECT_BY_NUMBER:
            return "classes '%s'" % self.classNumbers.get()
        return ("rank by %s, keep %s, distribution >= %g%%, resolution <= %s A, "
                "mean SSNR (to %g A) >= %s"
                % (RANK_CHOICES[self.rankBy.get()], self.numberToKeep.get() or "all",
                   self.minDistribution.get(),
                   self.maxResolution.get() if self.maxResolution.get() > 0 else "any",
                   self.ssnrResolution.get(),
                   self.minSsnr.get() if self.minSsnr.get() >= 0 else "any"))

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        classes = self.inputClasses.get()
        if classes is None:
            return errors
        if self.selectionMode.get() == SELECT_BY_NUMBER:
            try:
                ids = parse_class_numbers(self.classNumbers.get())
            except ValueError as exc:
                return ["Class numbers: %s." % exc]
            if not ids:
                return ["Give the class numbers to keep (e.g. '1 3'), or choose "
                        "automatic selection."]
            have = set(cls.getObjId() for cls in classes.iterItems())
            missing = [k for k in ids if k not in have]
            if missing:
                errors.append("Classes %s are not in the input (it has %s)."
                              % (", ".join(map(str, missing)),
                                 ", ".join(map(str, sorted(have)))))
        elif self.numberToKeep.get() is None or self.numberToKeep.get() < 0:
            errors.append("Number of classes to keep must be 0 (all) or more.")
        return errors

    def _summary(self):
        lines = ["Selection: %s." % self._criteriaText()]
        sel = self.selectedClasses
        if sel.get():
            lines.append("Kept classes: %s." % sel.get())
        if hasattr(self, "outputParticles"):
            lines.append("%d particles in the kept classes." % self.outputParticles.getSize())
        return lines

    def _methods(self):
        sel = self.selectedClasses
        if not sel.get():
            return []
        return ["Classes %s were selected (%s)." % (sel.get(), self._criteriaText())]
