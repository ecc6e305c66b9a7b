"""cryoclass - import particles: a RELION particles STAR file into Scipion.

pwem's own *import particles* reads RELION STAR files only through the relion plugin;
this protocol reads RELION 3.0 / 3.1+ particle STAR files (e.g. those written by
``cryoclass simulate`` or by RELION) without it: locations, CTF, acquisition, and,
when present, 3D alignment and class numbers (as a SetOfClasses2D, e.g. to bring in a
RELION 2D classification).  Optics groups are kept as the relion plugin keeps them
(:func:`cryoclass_plugin.convert.read_set_of_particles`): each particle's group and
rlnCtfBfactor / rlnCtfScalefactor, and the whole optics table (aberrations included).
"""
from pyworkflow.constants import PROD
from pyworkflow.protocol.params import BooleanParam, FileParam

from pwem.objects import SetOfClasses2D, SetOfParticles
from pwem.protocols import ProtImport

from .. import convert


class ProtCryoClassImportParticles(ProtImport):
    """Import particles (images, CTF, acquisition, optional alignment and classes) from
    a RELION particles STAR file. The image stacks are linked, not copied."""
    _label = "cryoclass - import particles (STAR)"
    _devStatus = PROD
    _possibleOutputs = {"outputParticles": SetOfParticles,
                        "outputClasses2D": SetOfClasses2D}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("starFile", FileParam, important=True,
                      label="Particles STAR file",
                      help="RELION particles STAR file (RELION 3.0 or 3.1+ layout). Image "
                           "names (NNN@stack.mrcs) are absolute, or relative to the "
                           "project folder (RELION's convention), or to the STAR "
                           "file's folder; they are looked up in that order.")
        form.addParam("importAlignment", BooleanParam, default=False,
                      label="Import 3D alignment?",
                      help="Yes: rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst become the "
                           "particles' 3D alignment (ALIGN_PROJ).")
        form.addParam("importClasses2D", BooleanParam, default=False,
                      label="Also output 2D classes (rlnClassNumber)?",
                      help="Yes: particles are also grouped by their rlnClassNumber into "
                           "a set of 2D classes (e.g. to import a RELION 2D "
                           "classification).")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep, self.starFile.get())

    def importStep(self, starFile):
        parts = self._createSetOfParticles()
        convert.read_set_of_particles(starFile, parts,
                                      copy_binaries_to=self._getExtraPath(),
                                      read_align=bool(self.importAlignment),
                                      read_class=bool(self.importClasses2D))
        self._defineOutputs(outputParticles=parts)
        if self.importClasses2D:
            first = parts.getFirstItem()
            if first.getClassId() is None:
                raise ValueError("%s has no rlnClassNumber column: set 'Also output 2D "
                                 "classes' to No" % starFile)
            classes = self._createSetOfClasses2D(parts)
            classes.classifyItems()
            self._defineOutputs(outputClasses2D=classes)
            self._defineSourceRelation(parts, classes)

    def _validate(self):
        import os
        fn = self.starFile.get()
        if not fn or not os.path.exists(fn):
            return ["STAR file not found: %s" % fn]
        return []

    def _summary(self):
        if hasattr(self, "outputParticles"):
            p = self.outputParticles
            lines = ["Imported %d particles (%d px, %.3f A/px%s) from %s"
                     % (p.getSize(), p.getXDim() or 0, p.getSamplingRate(),
                        ", with CTF" if p.hasCTF() else "", self.starFile.get())]
            optics = convert.optics_from_text(p.getAcquisition().opticsGroupInfo.get())
            if optics is not None:
                lines.append("%d optics group(s): %s (kept with the particles: "
                             "_rlnOpticsGroup, and the optics table in the acquisition)."
                             % (len(optics), ", ".join(optics["rlnOpticsGroupName"].astype(str))
                                if "rlnOpticsGroupName" in optics.columns else ""))
            if hasattr(self, "outputClasses2D"):
                lines.append("%d 2D classes from rlnClassNumber." % self.outputClasses2D.getSize())
            return lines
        return ["Not run yet."]

    def _methods(self):
        return []
