"""cryoclass - 3D classification: RELION's Class3D job as a Scipion protocol.

The form carries the fields of RELION's 3D-classification job (same defaults), the
steps write the particles as a RELION 3.1 STAR file, run ``cryoclass refine`` with the
flags RELION's GUI would pass to ``relion_refine`` (through ``runJob``, so Scipion's host
configuration -- PARALLEL_COMMAND, queues -- applies to the MPI run), and read the last
iteration back into a SetOfClasses3D and a SetOfVolumes.
"""
import glob
import os
import re
import shlex

from pyworkflow.constants import BETA
from pyworkflow.object import Float, Integer, String
from pyworkflow.protocol.constants import LEVEL_ADVANCED
from pyworkflow.protocol.params import (BooleanParam, EnumParam, FloatParam, IntParam,
                                        LabelParam, PathParam, PointerParam,
                                        StringParam)

from pwem.constants import ALIGN_PROJ, ALIGN_NONE
from pwem.objects import SetOfClasses2D, SetOfClasses3D, SetOfVolumes, Volume
from pwem.protocols import ProtClassify3D

from .. import convert
from ..constants import (ANGULAR_SAMPLING_DEFAULT, ANGULAR_SAMPLING_LIST, OUTPUT_ROOT,
                         healpix_order_for_sampling)
from ..engine.options import OPTIONS_BY_FIELD, OPTIONS_BY_FLAG
from ..engine.plan import final_order, local_offsets, local_order
from ..engine.subsplit import SPLIT_THRESHOLD

#: RELION's GPU list: device numbers, ',' within and ':' between MPI processes.
_GPU_LIST_RE = re.compile(r"^(\d+(,\d+)*(:\d+(,\d+)*)*)?$")
_SYM_RE = re.compile(r"^(C\d+[VH]?|CI|CS|D\d+[VH]?|T[DH]?|O[H]?|I[1-5]?H?)$", re.I)


def check_symmetry(sym):
    """``None`` if ``sym`` is a valid RELION point group, else a one-line message.

    Uses the engine's parser (:func:`cryoclass_plugin.engine.symmetry.parse_symmetry`);
    falls back on RELION's grammar if the engine module is not available."""
    sym = (sym or "").strip()
    try:
        from ..engine.symmetry import parse_symmetry
    except ImportError:
        parse_symmetry = None
    if parse_symmetry is not None:
        try:
            parse_symmetry(sym)
            return None
        except Exception as exc:  # CryoClassError or ValueError with its own message
            return "Symmetry '%s' is not valid: %s" % (sym, exc)
    if not _SYM_RE.match(sym):
        return ("Symmetry '%s' is not valid: use RELION's point groups, e.g. C1, C4, "
                "D2, T, O, I1 (I2, I3, I4 for other icosahedral settings)" % sym)
    return None


class ProtCryoClassClassify3D(ProtClassify3D):
    """Unsupervised 3D classification of particles into K classes with the bundled
    cryoclass engine, a re-implementation of RELION's Class3D (empirical Bayesian
    expectation-maximisation over classes, orientations and translations, with CTF
    correction and the regularisation parameter T).  Needs particles with CTF, a
    reference map (strongly low-pass filtered) and, optionally, a mask.
    """
    _label = "cryoclass - 3D classification"
    _devStatus = BETA       # a new engine, until its real-size and Blush checks land
    _possibleOutputs = {"outputClasses": SetOfClasses3D, "outputVolumes": SetOfVolumes}

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        self._defineIOParams(form)
        self._defineReferenceParams(form)
        self._defineCTFParams(form)
        self._defineOptimisationParams(form)
        self._defineClassStartParams(form)
        self._defineAfterSplitParams(form)
        self._defineSamplingParams(form)
        self._defineHelixParams(form)
        self._defineComputeParams(form)
        self._defineRunningParams(form)

    def _defineIOParams(self, form):
        form.addSection(label="I/O")
        form.addParam("doContinue", BooleanParam, default=False,
                      label="Continue from a previous run?",
                      help="Yes: start from an iteration of an earlier cryoclass 3D "
                           "classification run (its particles, reference and model); "
                           "you can change the number of iterations, T, the sampling "
                           "and the compute options.")
        form.addParam("continueRun", PointerParam, pointerClass="ProtCryoClassClassify3D",
                      condition="doContinue", allowsNull=True, label="Previous run",
                      help="The cryoclass 3D classification run to continue.")
        form.addParam("continueIter", StringParam, default="last", condition="doContinue",
                      label="Continue from iteration",
                      help="'last', or the number of an iteration the previous run "
                           "wrote (its optimiser.star is the starting point).")
        form.addParam("inputParticles", PointerParam,
                      pointerClass="SetOfParticles,SetOfClasses2D",
                      condition="not doContinue", important=True, label="Input particles",
                      help="Particles with CTF and acquisition information, from any "
                           "protocol; or a set of 2D classes, in which case the "
                           "particles of its enabled classes are classified.")
        form.addParam("referenceVolume", PointerParam, pointerClass="Volume,SetOfVolumes",
                      condition="not doContinue", important=True, label="Reference map(s)",
                      help="Starting map: one volume, from which the K classes start "
                           "(Optimisation tab, 'How classes start'); or a set of K "
                           "volumes (e.g. from a K-class initial model), class k starting "
                           "from volume k (RELION's --ref list; needs RELION's start). "
                           "Each is low-pass filtered (Reference tab). They should have "
                           "the box and pixel size of the particles (or use resampling).")
        form.addParam("referenceMask", PointerParam, pointerClass="VolumeMask",
                      condition="not doContinue", allowsNull=True,
                      label="Reference mask (optional)",
                      help="Soft mask (values 0-1, 1 = protein) applied to the "
                           "references every iteration. Without it, a soft spherical "
                           "mask of the mask diameter (Optimisation tab) is used.")

    def _defineReferenceParams(self, form):
        form.addSection(label="Reference")
        form.addParam("isMapAbsoluteGreyScale", BooleanParam, default=False,
                      condition="not doContinue", label="Ref. map is on absolute greyscale?",
                      help="The likelihood compares reference projections and images "
                           "through squared differences, so their grey scales must "
                           "agree. Maps reconstructed by RELION/cryoclass from these "
                           "particles are; maps from elsewhere usually are not. With "
                           "No, the first iteration uses a scale-invariant "
                           "cross-correlation instead (--firstiter_cc); if in doubt, No.")
        form.addParam("initialLowPassFilterA", FloatParam, default=60.0,
                      condition="not doContinue", label="Initial low-pass filter (A)",
                      help="The reference is low-pass filtered to this resolution "
                           "before the first iteration, to avoid bias from high "
                           "frequencies. 0 = no filter.")
        form.addParam("symmetryGroup", StringParam, default="C1", condition="not doContinue",
                      label="Symmetry",
                      help="Point group imposed on all classes, in RELION's notation "
                           "(C1, Cn, Dn, T, O, I1...). Classifications normally use "
                           "C1 and impose symmetry later.")
        form.addParam("resampleReference", BooleanParam, default=False,
                      condition="not doContinue",
                      label="Resample reference/mask to the particles?",
                      help="Yes: a reference (and mask) with another box or pixel size "
                           "is resampled (Fourier cropping/padding, then box "
                           "cropping/padding) to the particles' pixel size and box.")

    def _defineCTFParams(self, form):
        form.addSection(label="CTF")
        form.addParam("continueMsg", LabelParam, condition="doContinue",
                      label="CTF options are taken from the run being continued.")
        form.addParam("doCTF", BooleanParam, default=True, condition="not doContinue",
                      label="Do CTF-correction?",
                      help="Yes: the CTF of every particle (from its CTF model) is "
                           "used in the likelihood and in the reconstruction, which "
                           "then acts as a Wiener filter. The particles need CTF "
                           "information.")
        form.addParam("ignoreCTFUntilFirstPeak", BooleanParam, default=False,
                      condition="not doContinue and doCTF",
                      label="Ignore CTFs until first peak?",
                      help="Yes: the CTF amplitudes are taken as 1 at frequencies below "
                           "the first CTF peak. Helps when the CTF model is poor at "
                           "low resolution (e.g. little amplitude contrast); usually No.")
        form.addParam("phaseFlipNote", LabelParam, condition="not doContinue",
                      label="Phase-flipped particles are detected from the input set "
                            "(--ctf_phase_flipped).")

    def _defineOptimisationParams(self, form):
        form.addSection(label="Optimisation")
        form.addParam("numberOfClasses", IntParam, default=1, condition="not doContinue",
                      label="Number of classes",
                      help="K, the number of 3D classes.")
        form.addParam("regularisationParamT", FloatParam, default=4.0,
                      label="Regularisation parameter T",
                      help="Weight of the data against the prior (the expected power "
                           "of the signal). Larger T gives more weight to the data: "
                           "higher resolution but risk of overfitting. 2-4 suits 3D "
                           "classification.")
        form.addParam("numberOfIterations", IntParam, default=25,
                      label="Number of iterations",
                      help="Iterations of expectation-maximisation. There is no "
                           "convergence criterion: classes are usually stable after "
                           "about 25. When continuing, this many iterations are added "
                           "to the starting iteration.")
        form.addParam("useFastSubsets", BooleanParam, default=False,
                      condition="not doContinue",
                      label="Use fast subsets (for large data sets)?",
                      help="Yes: the first iterations use random subsets, as RELION 5: "
                           "K*1500 particles in iterations 1-5, K*4500 in 6-10, the larger "
                           "of K*4500 and 30% of the particles in 11-15, then all "
                           "(--fast_subsets). Needs at least 20 iterations.")
        form.addParam("maskDiameterA", FloatParam, default=200.0, condition="not doContinue",
                      label="Mask diameter (A)",
                      help="Diameter of the soft circular mask applied to the "
                           "particles (and of the spherical reference mask when no "
                           "mask is given). It must fit in the box; leave room for "
                           "the whole particle.")
        form.addParam("maskZero", BooleanParam, default=True, condition="not doContinue",
                      label="Mask individual particles with zeros?",
                      help="Yes: outside the mask the particle images are set to zero "
                           "(less noise, better for classification). No: filled with "
                           "random noise, which avoids correlations between Fourier "
                           "components.")
        form.addParam("limitResolEStep", FloatParam, default=-1.0,
                      label="Limit resolution E-step to (A)",
                      help="If positive, alignment and classification only use "
                           "frequencies up to this resolution; 7-12 A helps small or "
                           "featureless particles and limits overfitting. -1 = no limit.")
        form.addParam("tau2Estimate", EnumParam, default=0, expertLevel=LEVEL_ADVANCED,
                      choices=["Automatic: EM with a consensus start, else RELION's",
                               "RELION: power spectrum of the map",
                               "EM: power spectrum + posterior variance"],
                      label="Signal spectrum (tau2) update",
                      help="How each class's expected signal power per resolution shell, "
                           "the prior of its next reconstruction, is updated. RELION's "
                           "takes the power spectrum of the solvent-flattened map, which "
                           "shrinks iteration after iteration where the SSNR is low: the "
                           "maps lose resolution the particles carry. EM adds the "
                           "reconstruction's posterior variance (the exact "
                           "expectation-maximisation update, --tau2_estimate em): class "
                           "maps 2-5 A sharper, with the same or better classes "
                           "(docs/benchmarks.md). With one class too many, EM can keep a "
                           "true class split in two; the merge test after the fixed-pose "
                           "iterations removes such splits, so Automatic uses EM with a "
                           "consensus start and the merge test on, RELION's update "
                           "otherwise.")
        form.addParam("doBlush", BooleanParam, default=False,
                      label="Use Blush regularisation?",
                      help="Yes: after each class's regularised reconstruction, a 3D "
                           "denoising network (cryoclass's own, trained on synthetic "
                           "density; model card in cryoclass_plugin/blush/weights) "
                           "replaces the map below 6 A, as RELION 5's Blush does with its "
                           "network. On held-out simulated maps at low SNR the blended "
                           "maps reach FSC 0.5 at 11-12 A against 15-19 A without it "
                           "(docs/benchmarks.md). Costs about 0.15 s per class and "
                           "iteration on one CPU thread at box 64. Not advised for very "
                           "noisy data (SNR ~0.02): there it drew the class maps "
                           "together in our tests.")

    def _defineClassStartParams(self, form):
        """The Optimisation tab's options of the consensus starts (not in RELION)."""
        start = "not doContinue and initialClasses > 0"
        form.addParam("initialClasses", EnumParam, default=2, condition="not doContinue",
                      choices=["RELION: random subsets", "consensus alignment + restarts",
                               "consensus alignment + heterogeneity PCA"],
                      label="How classes start",
                      help="RELION: in iteration 1 each particle goes to one random "
                           "class (RELION's Class3D). Consensus alignment + restarts: "
                           "the first iterations align all particles to one map, then "
                           "the best of several classifications of the aligned particles "
                           "from random partitions (at 25 A) starts the K classes "
                           "(--init_classes consensus). Consensus alignment + "
                           "heterogeneity PCA (the default): after the consensus "
                           "iterations the particles are clustered along the main "
                           "directions of 3D variability (--init_classes pca). On 1500 "
                           "simulated particles at SNR 0.1 with two conformations, "
                           "RELION's start reaches ARI 0.50 and the PCA start 0.96 "
                           "(docs/benchmarks.md). Choose RELION's start to reproduce "
                           "RELION's Class3D.")
        form.addParam("consensusExtraIterations", IntParam, default=6, condition=start,
                      expertLevel=LEVEL_ADVANCED,
                      label="Extra consensus iterations (at most)",
                      help="While the last global consensus iteration still moved the "
                           "poses on average by more than the coarse angular step "
                           "(twice the angular sampling interval: 15 deg for 7.5), the "
                           "job aligns globally once more before the split, up to this "
                           "many times (--consensus_extra_iter; the log says when). 0: "
                           "exactly the engine's consensus iterations.")
        form.addParam("fixedPoseIterations", IntParam, default=8, condition=start,
                      expertLevel=LEVEL_ADVANCED, label="Fixed-pose iterations",
                      help="At most this many iterations after the split keep the "
                           "consensus poses and classify only, below 25 A, before full "
                           "expectation-maximisation over classes and poses "
                           "(--classify_fixed_iter). From the third on, the phase ends as "
                           "soon as the held-out evidence that the classes differ stops "
                           "rising (at the consensus poses the classes can drift towards "
                           "the poses' errors; the log says when). 0 starts full EM at "
                           "once.")
        form.addParam("mergeThreshold", FloatParam, default=0.3, condition=start,
                      expertLevel=LEVEL_ADVANCED,
                      label="Merge duplicate classes (threshold)",
                      help="After the fixed-pose iterations two classes are merged when, "
                           "on held-out particles, their split pays back less than this "
                           "share of what a random split of the same particles costs "
                           "(they are one structure cut in two); the freed class stays "
                           "empty and a few more fixed-pose iterations follow. Before "
                           "the last 4 iterations the test runs again and merges a pair whose "
                           "held-out particles choose their own class's map less than 70 % of "
                           "the time; then a class left empty takes the smaller side of a "
                           "class cut in two along a direction of variability within it, "
                           "when the held-out test supports the cut (a small state that "
                           "shared another state's class). The log lists each pair's and "
                           "each cut's figures (--merge_threshold). 0: never merge.")

    def _defineAfterSplitParams(self, form):
        """The Optimisation tab's options of the iterations after a consensus split."""
        start = "not doContinue and initialClasses > 0"
        form.addParam("localRangeAfterSplit", FloatParam, default=9.0, condition=start,
                      expertLevel=LEVEL_ADVANCED,
                      label="Local search range after the split (deg)",
                      help="The full-EM iterations after the fixed-pose ones search each "
                           "particle's orientation within this angle of its consensus "
                           "pose (a Gaussian prior of sigma = range / 3) on a grid of a "
                           "quarter of the angular sampling interval "
                           "(--classify_local_sigma, --classify_local_order): the finer "
                           "grid separates classes that 7.5 degree sampling leaves mixed. "
                           "0: global searches at the angular sampling interval, the "
                           "consensus's last iterations too.")
        form.addParam("sharedConsensusBeyond", FloatParam, default=18.0, condition=start,
                      expertLevel=LEVEL_ADVANCED,
                      label="Classes share the consensus beyond (A)",
                      help="After the split, the references that the particles are "
                           "compared with keep each class's own density only below this "
                           "resolution and only where the classes differ; elsewhere they "
                           "share the consensus map. This stops the largest (sharpest) "
                           "class from taking particles of the others and removes the "
                           "class maps' noise where they do not differ "
                           "(--class_difference_highres). The written class maps are the "
                           "plain reconstructions. 18 A suits the EM signal-spectrum "
                           "update (600 particles, SNR 0.05: ARI 0.885 / 0.931 at K = 3 / "
                           "4, against 0.848 / 0.926 at 25 A); with RELION's update use "
                           "25 A (ARI 0.763, against 0.663 at 20 A). 0: compare with the "
                           "plain class maps.")
        form.addParam("jointConsensus", BooleanParam, default=True,
                      condition=start + " and sharedConsensusBeyond > 0",
                      expertLevel=LEVEL_ADVANCED,
                      label="Reconstruct the shared consensus from all particles?",
                      help="Yes: the consensus the class references share is one "
                           "reconstruction of all particles, sharper than the mean of "
                           "the class maps, each regularised with 1/K of the particles "
                           "(--joint_consensus). No: the class-prior-weighted mean of the "
                           "class maps (--mean_consensus).")
        form.addParam("autoMaskSigma", FloatParam, default=3.0, condition=start,
                      expertLevel=LEVEL_ADVANCED,
                      label="Mask the references around their density (sigma)",
                      help="Without a reference mask, the references the particles are "
                           "compared with are masked around their density, found where "
                           "the 15 A low-passed mean map stands this many robust "
                           "standard deviations above its median inside the particle "
                           "mask (extended 8 A, 12 A soft edge). It removes the maps' "
                           "noise in the solvent, which the projections would add to "
                           "every score. The written class maps are not masked "
                           "(--auto_mask_sigma). 0: no automatic mask.")

    def _defineSamplingParams(self, form):
        form.addSection(label="Sampling")
        form.addParam("doImageAlignment", BooleanParam, default=True,
                      label="Perform image alignment?",
                      help="No: particles keep the orientations and shifts they bring "
                           "(3D alignment needed) and only the classes are optimised "
                           "(--skip_align), e.g. for focused classification.")
        form.addParam("angularSamplingDeg", EnumParam, default=ANGULAR_SAMPLING_DEFAULT,
                      choices=ANGULAR_SAMPLING_LIST, condition="doImageAlignment",
                      label="Angular sampling interval (deg)",
                      help="Step of the orientation search (HEALPix grid on the sphere "
                           "and in-plane angle), after one oversampling step. 7.5 "
                           "degrees is usually enough for classification.")
        form.addParam("offsetSearchRangePix", FloatParam, default=5.0,
                      condition="doImageAlignment", label="Offset search range (pix)",
                      help="Translations are searched in a circle of this radius (in "
                           "pixels) around the best offset of the previous iteration.")
        form.addParam("offsetSearchStepPix", FloatParam, default=1.0,
                      condition="doImageAlignment", label="Offset search step (pix)",
                      help="Step of the translational search (pixels); the coarse "
                           "pass uses twice this step, oversampling refines it.")
        form.addParam("localAngularSearch", BooleanParam, default=False,
                      condition="doImageAlignment", label="Perform local angular searches?",
                      help="Search each particle's orientation only near the one it has "
                           "(a Gaussian prior of sigma = range / 3, searched to the "
                           "range; --sigma_ang), as RELION does. Needs particles with 3D "
                           "alignment unless the classes start from a consensus "
                           "alignment, whose iterations are then global and the later "
                           "ones local.")
        form.addParam("localAngularSearchRange", FloatParam, default=5.0,
                      condition="doImageAlignment and localAngularSearch",
                      label="Local angular search range (deg)",
                      help="Orientations within this angle of each particle's current "
                           "one are searched (3 sigma of the prior).")
        form.addParam("relaxSymmetry", StringParam, default="",
                      condition="doImageAlignment and localAngularSearch",
                      label="Relax symmetry",
                      help="Pseudo-symmetric particles: the local searches also look "
                           "around the poses this point group (e.g. C2) relates to each "
                           "particle's current one, while the maps keep the symmetry "
                           "above (--relax_sym). Empty: no relaxation.")
        form.addParam("allowCoarserSampling", BooleanParam, default=False,
                      condition="doImageAlignment", label="Allow coarser sampling?",
                      help="Yes: while the poses' expected accuracy is worse than the "
                           "sampling above (early iterations), search a coarser angular "
                           "grid and offset step, never finer than the ones above; "
                           "recomputed every iteration, so the sampling returns to "
                           "these as the maps improve (--allow_coarser_sampling). "
                           "Faster; needs more than one class.")

    def _defineHelixParams(self, form):
        """RELION's Helix tab: its switch only, which _validate refuses (the engine has
        no helical processing, so the tab's other fields would change nothing)."""
        form.addSection(label="Helix")
        form.addParam("doHelix", BooleanParam, default=False, condition="not doContinue",
                      label="Do helical reconstruction?",
                      help="Helical processing (RELION's Helix tab). The cryoclass engine "
                           "has none: the protocol refuses to run with Yes.")

    def _defineComputeParams(self, form):
        form.addSection(label="Compute")
        form.addParam("skipPadding", BooleanParam, default=False, label="Skip padding?",
                      help="Yes: references are not padded before Fourier transforms "
                           "(--pad 1): faster and lighter, slightly less accurate "
                           "interpolation. No: 2x padding (--pad 2).")
        form.addParam("skipGridding", BooleanParam, default=True, label="Skip gridding?",
                      help="Yes: skip the gridding correction of the reconstruction "
                           "(faster, normally as good; RELION 5's default). No: apply it "
                           "(--dont_skip_gridding).")
        form.addParam("allParticlesRam", BooleanParam, default=False,
                      label="Pre-read all particles into RAM?",
                      help="Yes: all particles are held in memory (N x box^2 x 4 "
                           "bytes), which helps with slow discs.")
        form.addParam("scratchDir", PathParam, default="", condition="not allParticlesRam",
                      label="Copy particles to scratch directory",
                      help="A fast local folder: the particles are copied there at the "
                           "start and read from there. Empty = no copy.")
        form.addParam("doGpu", BooleanParam, default=False, label="Use GPU acceleration?",
                      help="Yes: the engine computes on the GPU with CuPy (the "
                           "plugin's [gpu] extra). Whether CuPy and a GPU are usable is "
                           "checked where the job runs, not on the machine of the form.")
        form.addParam("gpusToUse", StringParam, default="", condition="doGpu",
                      label="Which GPUs to use",
                      help="Device numbers in RELION's syntax, MPI processes separated "
                           "by ':' (e.g. 0:1). Empty: processes share the visible "
                           "devices.")
        form.addParam("extraParams", StringParam, default="", expertLevel=LEVEL_ADVANCED,
                      label="Additional arguments",
                      help="Extra command-line flags for 'cryoclass refine', e.g. "
                           "--block_size 128.")

    def _defineRunningParams(self, form):
        """RELION's Running tab: MPI processes and threads (Scipion's parallel
        section), and the random seed."""
        form.addParallelSection(threads=1, mpi=1)
        form.addParam("randomSeed", IntParam, default=-1, expertLevel=LEVEL_ADVANCED,
                      label="Random seed",
                      help="Seed of the run's random choices (the initial split into "
                           "classes, the restarts, the held-out particles of the merge "
                           "test; --random_seed). Two runs with the same seed and inputs "
                           "give the same classes. -1: the engine's default seed, %d."
                           % OPTIONS_BY_FIELD["random_seed"].default)


    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, self._inputSignature())
        self._insertFunctionStep(self.runEngineStep, self._getEngineArgs())
        self._insertFunctionStep(self.createOutputStep)

    def convertInputStep(self, signature):
        """Write the particles STAR (and reference/mask MRC) the engine reads."""
        if self.doContinue:
            self.info("Continue mode: the particles and model come from %s"
                      % self._continueOptimiser())
            return
        parts = self._getParticlesSet()
        n = convert.write_set_of_particles(
            parts, self._getFileName("input_star"),
            out_dir=self._getExtraPath("stacks"),
            align_type=ALIGN_PROJ if self._needsAlignment() else ALIGN_NONE,
            write_ctf=bool(self.doCTF), iterator=self._iterInputParticles())
        self.info("Wrote %d particles to %s" % (n, self._getFileName("input_star")))
        box, apix = self._particleBox(), parts.getSamplingRate()
        self._writeReferences(box, apix)
        if self.referenceMask.hasValue():
            convert.write_volume_mrc(self.referenceMask.get(), self._getFileName("mask"),
                                     box=box, pixel_size=apix)

    def _referenceVolumes(self):
        """The reference volumes in class order: one Volume, or the SetOfVolumes' items."""
        ref = self._rootProtocol().referenceVolume.get()
        if isinstance(ref, SetOfVolumes):
            return [vol.clone() for vol in ref.iterItems(orderBy="id")]
        return [ref] if ref is not None else []

    def _severalReferences(self):
        return isinstance(self._rootProtocol().referenceVolume.get(), SetOfVolumes)

    def _writeReferences(self, box, apix):
        """One volume: reference.mrc; a set: reference_kkk.mrc per class and the list
        references.star (rlnReferenceImage, RELION's --ref format)."""
        if not self._severalReferences():
            convert.write_volume_mrc(self.referenceVolume.get(),
                                     self._getFileName("reference"), box=box, pixel_size=apix)
            return
        names = []
        for k, vol in enumerate(self._referenceVolumes(), start=1):
            names.append(self._getFileName("reference_k", ref=k))
            convert.write_volume_mrc(vol, names[-1], box=box, pixel_size=apix)
        import pandas as pd
        convert.write_star(self._getFileName("reference_list"), {
            "model_classes": pd.DataFrame({"rlnReferenceImage": names})})

    def runEngineStep(self, args):
        import cryoclass_plugin
        program, lead = cryoclass_plugin.Plugin.getProgram()
        params = (lead + " " + args).strip()
        env = self._getEnviron()
        self.runJob(program, params, env=env,
                    numberOfMpi=self.numberOfMpi.get(),
                    numberOfThreads=self.numberOfThreads.get())

    def createOutputStep(self):
        it = self._lastIter()
        if it is None:
            raise RuntimeError("the engine wrote no iteration in %s" % self._getExtraPath())
        reader = self._getReader(it)
        info = reader.class_info()
        parts = self._getParticlesSet()
        apix = parts.getSamplingRate()

        classes = self._createSetOfClasses3D(self._getImagesForClasses())

        def updateClass(cls):
            self._fillClass(cls, it, info, apix)

        classes.classifyItems(updateItemCallback=reader.update_particle,
                              updateClassCallback=updateClass,
                              itemDataIterator=None, doClone=True)
        volumes = self._createSetOfVolumes()
        volumes.setSamplingRate(apix)
        for k in sorted(info):
            vol = Volume()
            vol.setFileName(self._getFileName("class_map", iter=it, ref=k))
            vol.setSamplingRate(apix)
            vol.setObjId(k)
            self._setClassAttributes(vol, info[k], it)
            volumes.append(vol)

        self._defineOutputs(outputClasses=classes)
        self._defineOutputs(outputVolumes=volumes)
        source = self._getSourcePointer()
        self._defineSourceRelation(source, classes)
        self._defineSourceRelation(source, volumes)
        if not self.doContinue:
            self._defineSourceRelation(self.referenceVolume, classes)
            self._defineSourceRelation(self.referenceVolume, volumes)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        if self.doContinue:
            return self._validateContinue()
        inp = self.inputParticles.get()
        ref = self.referenceVolume.get()
        if inp is None or ref is None:
            return errors  # the form's required-pointer checks report these
        parts = self._getParticlesSet()
        box, apix = self._particleBox(), parts.getSamplingRate()
        if box % 2:
            errors.append("The particle box (%d px) is odd: the engine needs an even "
                          "box; re-extract or crop the particles." % box)
        if self.doCTF and not parts.hasCTF():
            errors.append("'Do CTF-correction?' is Yes but the input particles have no "
                          "CTF information: estimate CTFs and re-extract (or import "
                          "particles with CTF), or set 'Do CTF-correction?' to No.")
        errors += self._validateReferenceSet()
        if not self.resampleReference:
            refs = [("Reference map", vol) for vol in self._referenceVolumes()]
            for label, vol in refs + [("Reference mask", self.referenceMask.get())]:
                if vol is None:
                    continue
                vbox, vapix = vol.getXDim(), vol.getSamplingRate()
                if vbox != box or abs(vapix - apix) > 1e-3 * apix:
                    errors.append("%s is %d px at %.3f A/px but the particles are %d px "
                                  "at %.3f A/px: set 'Resample reference/mask to the "
                                  "particles?' to Yes (Reference tab) or provide a "
                                  "matching map." % (label, vbox, vapix, box, apix))
        if self.maskDiameterA.get() > box * apix:
            errors.append("Mask diameter %.1f A is larger than the particle box "
                          "(%d px x %.3f A/px = %.1f A): use at most %.1f A."
                          % (self.maskDiameterA.get(), box, apix, box * apix, box * apix))
        if self.maskDiameterA.get() <= 0:
            errors.append("Mask diameter must be positive (A).")
        if self.numberOfClasses.get() is None or self.numberOfClasses.get() < 1:
            errors.append("Number of classes must be at least 1 (got %s)."
                          % self.numberOfClasses.get())
        msg = check_symmetry(self.symmetryGroup.get())
        if msg:
            errors.append(msg)
        if self.doHelix:
            errors.append("Helical reconstruction is not implemented in the cryoclass "
                          "engine: set 'Do helical reconstruction?' to No.")
        if not self.doImageAlignment and not parts.hasAlignmentProj():
            errors.append("'Perform image alignment?' is No, which needs particles with "
                          "3D alignment (e.g. from a 3D refinement); these have none.")
        if self.allowCoarserSampling and self.doImageAlignment and \
                (self.numberOfClasses.get() or 1) < 2:
            errors.append("'Allow coarser sampling?' is Yes with one class: it changes "
                          "the sampling of classifications only; set it to No or ask "
                          "for 2 or more classes.")
        if self._localFromInput() and not parts.hasAlignmentProj():
            errors.append("'Perform local angular searches?' is Yes with RELION's start, "
                          "which needs particles with 3D alignment; these have none. "
                          "Use a consensus start or global searches.")
        errors += self._validateCommon()
        return errors

    def _validateReferenceSet(self):
        """A set of reference volumes: K of them, and RELION's start (the consensus
        starts begin from one map)."""
        if not self._severalReferences():
            return []
        n, K = len(self._referenceVolumes()), self.numberOfClasses.get() or 0
        errors = []
        if n != K:
            errors.append("The reference set has %d volumes but 'Number of classes' is %d: "
                          "give one volume per class." % (n, K))
        if self.initialClasses.get() != 0:
            errors.append("A set of reference volumes (one per class) needs 'How classes "
                          "start' = RELION: the consensus starts begin from one map.")
        return errors

    def _validateCommon(self):
        errors = self._validateClassStart()
        if self.numberOfIterations.get() is None or self.numberOfIterations.get() < 1:
            errors.append("Number of iterations must be at least 1.")
        elif self._rootProtocol().useFastSubsets and self._totalIterations() < 20:
            errors.append("'Use fast subsets' needs at least 20 iterations (RELION's "
                          "schedule: subsets in iterations 1-15, then all particles); give "
                          "more iterations or set it to No.")
        if self.regularisationParamT.get() <= 0:
            errors.append("Regularisation parameter T must be positive.")
        if self.usesGpu() and not _GPU_LIST_RE.match((self.gpusToUse.get() or "").strip()):
            errors.append("Which GPUs to use: '%s' is not a device list; give device "
                          "numbers separated by ',' within and ':' between MPI processes "
                          "(e.g. 0:1 or 0,1:2,3), or leave it empty."
                          % self.gpusToUse.get())
        if self.doImageAlignment and (self.offsetSearchStepPix.get() <= 0 or
                                      self.offsetSearchRangePix.get() < 0):
            errors.append("Offset search step must be positive and the range >= 0.")
        if (self.doImageAlignment and self.localAngularSearch
                and not (self.localAngularSearchRange.get() or 0) > 0):
            errors.append("Local angular search range must be positive (degrees).")
        return errors

    def _validateClassStart(self):
        """The consensus start's fields (one line each, naming the field)."""
        if self.doContinue or self.initialClasses.get() == 0:
            return []
        consensus = OPTIONS_BY_FIELD["consensus_iter"].default
        checks = (
            ((self.numberOfIterations.get() or 0) <= consensus,
             "'How classes start' = consensus alignment needs more than %d iterations "
             "(the first %d align to one map); give more iterations or choose RELION's "
             "start." % (consensus, consensus)),
            ((self.consensusExtraIterations.get() or 0) < 0,
             "Extra consensus iterations must be 0 or more."),
            ((self.fixedPoseIterations.get() or 0) < 0,
             "Fixed-pose iterations must be 0 or more."),
            ((self.mergeThreshold.get() or 0) < 0,
             "Merge duplicate classes (threshold) must be 0 (never merge) or a share > 0 "
             "(e.g. 0.3)."),
            ((self.localRangeAfterSplit.get() or 0) < 0,
             "Local search range after the split must be 0 (global) or more."),
            ((self.sharedConsensusBeyond.get() or 0) < 0,
             "'Classes share the consensus beyond' must be 0 (off) or a resolution in "
             "Angstrom."),
            ((self.autoMaskSigma.get() or 0) < 0,
             "'Mask the references around their density' must be 0 (off) or a threshold "
             "in standard deviations (e.g. 3)."))
        return [message for bad, message in checks if bad]

    def _validateContinue(self):
        errors = []
        prev = self.continueRun.get()
        if prev is None:
            return ["Select the run to continue ('Previous run')."]
        if prev.getObjId() == self.getObjId():
            return ["A run cannot continue itself: select another run."]
        its = prev._iterations()
        if not its:
            return ["The run to continue (%s) has no finished iteration." % prev.getRunName()]
        want = self.continueIter.get().strip().lower()
        if want != "last":
            try:
                itn = int(want)
            except ValueError:
                return ["Continue from iteration: 'last' or a number, not '%s'." % want]
            if itn not in its:
                errors.append("Iteration %d does not exist in %s (available: %s)."
                              % (itn, prev.getRunName(), ", ".join(map(str, its))))
        errors += self._validateCommon()
        return errors

    def _summary(self):
        summary = []
        its = self._iterations()
        total = self._totalIterations()
        if its:
            summary.append("Iteration %d/%d done." % (its[-1], total))
        else:
            summary.append("No iteration finished yet (%d planned)." % total)
        if self.doContinue and self.continueRun.get() is not None:
            summary.append("Continued from %s, iteration %d."
                           % (self.continueRun.get().getRunName(), self._continueIter()))
        parts = self._getParticlesSet(quiet=True)
        if parts is not None:
            summary.append("Input: %d particles, %d classes requested."
                           % (self._countInput(), self._getK()))
        if hasattr(self, "outputClasses"):
            for cls in self.outputClasses.iterItems(orderBy="id"):
                dist = getattr(cls, "_rlnClassDistribution", None)
                res = getattr(cls, "_rlnEstimatedResolution", None)
                summary.append("Class %d: %d particles (%.1f%%), resolution %.1f A"
                               % (cls.getObjId(), cls.getSize(),
                                  100.0 * (dist.get() if dist else 0.0),
                                  res.get() if res else 999.0))
        return summary

    def _methods(self):
        """What ran, from the settings the engine saved with the last iteration (its
        automatic choices resolved) and the merges its log records."""
        if not hasattr(self, "outputClasses"):
            return []
        it = self._lastIter()
        settings = _saved_settings(self._getFileName("output_root") + "_it%03d_state.npz"
                                   % it)
        sizes = [c.getSize() for c in self.outputClasses.iterItems(orderBy="id")]
        merges = _merge_lines(self._getFileName("output_root") + ".log")
        return [methods_text(settings, self._countInput(), sizes, merges)]

    def _citations(self):
        cites = ["Scheres2010", "Scheres2012a", "Scheres2012b"]
        if self.doGpu:
            cites.append("Kimanius2016")
        if self.doBlush:
            cites.append("Kimanius2024")
        return cites

    # ------------------------------------------------------------------ utils
    def _fileTemplates(self):
        root = self._getExtraPath(OUTPUT_ROOT)
        return {
            "input_star": self._getExtraPath("input_particles.star"),
            "reference": self._getExtraPath("reference.mrc"),
            "reference_k": self._getExtraPath("reference_%(ref)03d.mrc"),
            "reference_list": self._getExtraPath("references.star"),
            "mask": self._getExtraPath("mask.mrc"),
            "output_root": root,
            "data": root + "_it%(iter)03d_data.star",
            "model": root + "_it%(iter)03d_model.star",
            "optimiser": root + "_it%(iter)03d_optimiser.star",
            "class_map": root + "_it%(iter)03d_class%(ref)03d.mrc",
        }

    def _getFileName(self, key, **kwargs):
        """File names of this run (built from the current working dir every time, so
        they are right before and after the run is saved)."""
        return self._fileTemplates()[key] % kwargs

    def _iterations(self):
        """Iteration numbers with both data.star and model.star written."""
        root = self._getExtraPath(OUTPUT_ROOT)
        its = []
        for fn in glob.glob(root + "_it*_model.star"):
            m = re.search(r"_it(\d{3,})_model\.star$", fn)
            if m and os.path.exists(fn.replace("_model.star", "_data.star")):
                its.append(int(m.group(1)))
        return sorted(its)

    def _lastIter(self):
        its = self._iterations()
        return its[-1] if its else None

    def _continueIter(self):
        prev = self.continueRun.get()
        want = (self.continueIter.get() or "last").strip().lower()
        if want == "last":
            return prev._lastIter() or 0
        return int(want)

    def _continueOptimiser(self):
        return self.continueRun.get()._getFileName("optimiser", iter=self._continueIter())

    def _totalIterations(self):
        n = self.numberOfIterations.get() or 0
        if self.doContinue and self.continueRun.get() is not None:
            try:
                return self._continueIter() + n
            except Exception:
                return n
        return n

    def _getK(self):
        if self.doContinue and self.continueRun.get() is not None:
            return self.continueRun.get()._getK()
        return int(self.numberOfClasses.get() or 0)

    def _rootProtocol(self):
        """The run that holds the original inputs (follows continue chains)."""
        prot = self
        seen = set()
        while prot.doContinue and prot.continueRun.get() is not None and id(prot) not in seen:
            seen.add(id(prot))
            prot = prot.continueRun.get()
        return prot

    def _getInputObject(self):
        return self._rootProtocol().inputParticles.get()

    def _getSourcePointer(self):
        return self._rootProtocol().inputParticles

    def _getParticlesSet(self, quiet=False):
        """The particle set the input stands for: the input SetOfParticles, or the
        images of an input SetOfClasses2D."""
        inp = self._getInputObject()
        if inp is None:
            if quiet:
                return None
            raise RuntimeError("no input particles")
        if isinstance(inp, SetOfClasses2D):
            return inp.getImages()
        return inp

    def _getImagesForClasses(self):
        """The registered particle set the output classes point to (for 2D classes:
        their images; particles of disabled classes are left out of the classes)."""
        return self._getParticlesSet()

    def _iterInputParticles(self):
        """The particles to classify, in id order: all enabled particles of a set, or
        the enabled particles of the enabled classes of a SetOfClasses2D."""
        inp = self._getInputObject()
        if isinstance(inp, SetOfClasses2D):
            items = []
            for cls in inp.iterItems(orderBy="id"):
                if not cls.isEnabled():
                    continue
                for part in cls.iterItems(orderBy="id"):
                    if part.isEnabled():
                        items.append(part.clone())
            items.sort(key=lambda p: p.getObjId())
            return iter(items)
        return (p for p in inp.iterItems(orderBy="id") if p.isEnabled())

    def _countInput(self):
        inp = self._getInputObject()
        if inp is None:
            return 0
        if isinstance(inp, SetOfClasses2D):
            return sum(cls.getSize() for cls in inp.iterItems() if cls.isEnabled())
        return inp.getSize()

    def _particleBox(self):
        parts = self._getParticlesSet()
        dim = parts.getXDim()
        if not dim:
            dim = parts.getFirstItem().getXDim()
        return int(dim)

    def _needsAlignment(self):
        return not self.doImageAlignment or self._localFromInput()

    def _localFromInput(self):
        """Local angular searches around the input poses (RELION's start; a consensus
        start finds its own poses first)."""
        return bool(self.doImageAlignment and self.localAngularSearch
                    and not (self.initialClasses.get() > 0 and self._getK() > 1))

    def _inputSignature(self):
        """Changes when the inputs change, so that a re-run redoes the conversion."""
        if self.doContinue:
            return "continue:%s" % self.continueRun.getUniqueId()
        return "%s:%s" % (self.inputParticles.getUniqueId(),
                          self.referenceVolume.getUniqueId())

    def _getReader(self, it):
        input_star = self._getFileName("input_star")
        if self.doContinue:
            input_star = self._rootProtocol()._getFileName("input_star")
        return convert.ResultReader(self._getFileName("data", iter=it),
                                    self._getFileName("model", iter=it),
                                    input_star=input_star,
                                    pixel_size=self._getParticlesSet().getSamplingRate())

    def _setClassAttributes(self, obj, info, it):
        obj._rlnClassDistribution = Float(info["distribution"])
        obj._rlnEstimatedResolution = Float(info["resolution"])
        obj._rlnAccuracyRotations = Float(info["accuracy_rot"])
        obj._rlnAccuracyTranslationsAngst = Float(info["accuracy_trans"])
        obj._cryoclassModelStar = String(self._getFileName("model", iter=it))
        obj._cryoclassIteration = Integer(it)

    def _fillClass(self, cls, it, info, apix):
        k = cls.getObjId()
        cls.setAlignmentProj()
        rep = cls.getRepresentative()
        rep.setFileName(self._getFileName("class_map", iter=it, ref=k))
        rep.setSamplingRate(apix)
        if k in info:
            self._setClassAttributes(cls, info[k], it)

    # ----- GPUs (as scipion-em-relion: Scipion's hosts and queues ask these)
    def usesGpu(self):
        """Whether the run computes on GPUs ('Use GPU acceleration?')."""
        return bool(self.doGpu.get())

    def getGpuList(self):
        """The device numbers of 'Which GPUs to use', sorted, each once (RELION's
        syntax: ',' within and ':' between MPI processes); [] when none are named."""
        if not self.usesGpu():
            return []
        text = (self.gpusToUse.get() or "").strip().strip('"')
        return sorted({int(d) for d in re.split(r"[:,]", text) if d.strip().isdigit()})

    # ----- engine command line (RELION GUI -> relion_refine mapping)
    def _getEngineArgs(self):
        """The flags RELION's Class3D GUI passes to relion_refine, as one string (one
        builder per form tab; the flags and their defaults are those of
        :data:`cryoclass_plugin.engine.options.OPTIONS`)."""
        args = []

        def add(flag, value=None):
            assert flag[2:] in _ENGINE_FLAGS, flag
            args.append(flag if value is None else "%s %s" % (flag, _q(value)))

        # Settings fixed for a run come from the run that started the chain (itself,
        # unless continuing); the engine, like relion_refine, is also given --i/--K.
        root = self._rootProtocol()
        for builder in (self._ioArgs, self._referenceArgs, self._ctfArgs,
                        self._optimisationArgs, self._classStartArgs, self._samplingArgs,
                        self._computeArgs):
            builder(add, root)
        extra = (self.extraParams.get() or "").strip()
        if extra:
            args.append(extra)
        return " ".join(args)

    def _ioArgs(self, add, root):
        if self.doContinue:
            add("--continue", self._continueOptimiser())
        add("--i", root._getFileName("input_star"))
        add("--o", self._getFileName("output_root"))
        if root.referenceMask.hasValue():
            add("--solvent_mask", root._getFileName("mask"))

    def _referenceArgs(self, add, root):
        if not self.doContinue:
            add("--ref", self._getFileName("reference_list" if self._severalReferences()
                                           else "reference"))
            if not self.isMapAbsoluteGreyScale:
                add("--firstiter_cc")
            add("--ini_high", _num(self.initialLowPassFilterA.get()))
        add("--sym", root.symmetryGroup.get().strip())

    def _ctfArgs(self, add, root):
        if root.doCTF:
            add("--ctf")
            if root.ignoreCTFUntilFirstPeak:
                add("--ctf_intact_first_peak")
            if self._getParticlesSet().isPhaseFlipped():
                add("--ctf_phase_flipped")

    def _optimisationArgs(self, add, root):
        add("--K", int(root.numberOfClasses.get()))
        add("--iter", self._totalIterations())
        add("--tau2_fudge", _num(self.regularisationParamT.get()))
        if self.tau2Estimate.get() in (1, 2):
            add("--tau2_estimate", ["", "power", "em"][self.tau2Estimate.get()])
        add("--particle_diameter", _num(root.maskDiameterA.get()))
        if root.maskZero:
            add("--zero_mask")
        if root.useFastSubsets:
            add("--fast_subsets")
        if self.limitResolEStep.get() > 0:
            add("--strict_highres_exp", _num(self.limitResolEStep.get()))
        if self.doBlush:
            add("--blush")
        # RELION's GUI always passes these three for 3D classification.
        add("--flatten_solvent")
        add("--norm")
        add("--scale")

    def _classStartArgs(self, add, root):
        if self.doContinue or self.initialClasses.get() == 0 or self._getK() < 2:
            return
        add("--init_classes", ["relion", "consensus", "pca"][self.initialClasses.get()])
        add("--consensus_extra_iter", int(self.consensusExtraIterations.get()))
        add("--classify_fixed_iter", int(self.fixedPoseIterations.get()))
        add("--merge_threshold", _num(self.mergeThreshold.get() or 0.0))
        add("--classify_local_sigma", _num((self.localRangeAfterSplit.get() or 0.0) / 3.0))
        add("--class_difference_highres", _num(self.sharedConsensusBeyond.get() or 0.0))
        if (self.sharedConsensusBeyond.get() or 0) > 0:
            add("--joint_consensus" if self.jointConsensus else "--mean_consensus")
        if not root.referenceMask.hasValue():
            add("--auto_mask_sigma", _num(self.autoMaskSigma.get() or 0.0))

    def _samplingArgs(self, add, root):
        if not self.doImageAlignment:
            add("--skip_align")
            return
        add("--healpix_order", healpix_order_for_sampling(self.angularSamplingDeg.get()))
        add("--oversampling", 1)
        add("--offset_range", _num(self.offsetSearchRangePix.get()))
        add("--offset_step", _num(2 * self.offsetSearchStepPix.get()))
        if self.localAngularSearch:
            add("--sigma_ang", _num(self.localAngularSearchRange.get() / 3.0))
            if (self.relaxSymmetry.get() or "").strip():
                add("--relax_sym", self.relaxSymmetry.get().strip())
        if self.allowCoarserSampling:
            add("--allow_coarser_sampling")

    def _computeArgs(self, add, root):
        add("--pad", 1 if self.skipPadding else 2)
        add("--skip_gridding" if self.skipGridding else "--dont_skip_gridding")
        if self.allParticlesRam:
            add("--preread_images")
        elif (self.scratchDir.get() or "").strip():
            add("--scratch_dir", self.scratchDir.get().strip())
        if self.usesGpu():
            add("--gpu", (self.gpusToUse.get() or "").strip())
        add("--j", int(self.numberOfThreads.get() or 1))
        seed = self.randomSeed.get()
        if seed is None or seed < 0:
            seed = root.randomSeed.get()
        if seed is not None and seed >= 0:
            add("--random_seed", int(seed))


#: The engine's flags the form may pass (the option registry and the pair flags'
#: second halves).
_ENGINE_FLAGS = (set(OPTIONS_BY_FLAG)
                 | {opt.off_flag for opt in OPTIONS_BY_FLAG.values() if opt.off_flag})


def _saved_settings(state_path):
    """The resolved engine settings stored in an iteration's state file."""
    import json
    import numpy as np
    from ..engine.options import settings_from_state
    with np.load(state_path, allow_pickle=False) as z:
        saved = json.loads(str(z["__settings__"]))
    return settings_from_state(saved).resolved()


def _merge_lines(log_path):
    """The engine log's merge and split decisions ("class 4 joins class 2", "138
    particles of class 2 start class 4"), in order."""
    if not os.path.exists(log_path):
        return []
    pattern = re.compile(r"(?:merge|split): (class \d+ joins class \d+|"
                         r"\d+ particles of class \d+ start class \d+)")
    with open(log_path) as fh:
        return [m.group(1) for m in (pattern.match(line) for line in fh) if m]


def methods_text(s, n_particles, class_sizes, merges=()):
    """A methods paragraph for the run with (resolved) settings ``s``: RELION's
    algorithm where RELION's start was chosen, cryoclass's own steps (consensus start,
    merge test, local searches after the split, shared-consensus references, automatic
    mask, EM tau2 update) where they ran."""
    K = s.n_classes
    consensus = s.init_classes in ("consensus", "pca") and K > 1
    several = str(s.ref).lower().endswith(".star")
    step = 60.0 / 2 ** (s.healpix_order + s.oversampling)
    parts = ["We classified %d particles into %d 3D classes with cryoclass, %s, running "
             "%d iterations with regularisation parameter T=%g, a %g A mask diameter and "
             "symmetry %s." % (
                 n_particles, K,
                 "a re-implementation of RELION's empirical Bayesian 3D classification "
                 "[Scheres2012a, Scheres2012b]" if not consensus else
                 "which combines RELION's empirical Bayesian expectation-maximisation "
                 "[Scheres2012a, Scheres2012b] with its own start and class-separation "
                 "steps described below",
                 s.n_iter, s.tau2_fudge, s.particle_diameter, s.sym)]
    ref = ("%d reference maps, one per class," % K) if several else "one reference map"
    parts.append("The classes started from %s %s%s." % (
        ref, "low-pass filtered to %g A" % s.ini_high if s.ini_high > 0 else "(unfiltered)",
        ", scored by cross-correlation in the first iteration (reference "
        "not on absolute greyscale)" if s.firstiter_cc else ""))
    parts.append(_methods_start(s, K, consensus, several, step))
    parts.append(_methods_references(s, consensus, merges))
    if getattr(s, "blush", False):
        parts.append("Each class map was regularised in every iteration with Blush "
                     "[Kimanius2024]: a 3D denoising network (cryoclass's own weights, "
                     "trained on synthetic density) replaced the reconstruction %s "
                     "(mode %s)." % (_methods_blush_band(s), s.blush_mode))
    parts.append("Class sizes: %s." % "; ".join(
        "class %d, %d particles" % (k, n) for k, n in enumerate(class_sizes, start=1)))
    return " ".join(p for p in parts if p)


def _methods_blush_band(s):
    """The band of frequencies where Blush's denoised map replaced the reconstruction."""
    top = ("%g A" % s.blush_crossover if s.blush_crossover > 0 else
           "the network's Nyquist (6 A)")
    if s.blush_lowres > 0:
        return "from %g A to %s" % (s.blush_lowres, top)
    return "below %s" % top


def _methods_start(s, K, consensus, several, step):
    """How classes started and how orientations were searched."""
    search = ("without image alignment (input poses kept)" if s.skip_align else
              "%s orientation searches at %g degrees and translations within %g pixels"
              % ("local (prior sigma %g deg)" % s.sigma_ang if s.sigma_ang > 0 else "global",
                 step, s.offset_range))
    if s.relax_sym and not s.skip_align:
        search += (" (local searches also around the poses related by %s symmetry, "
                   "relaxed: the maps kept %s)" % (s.relax_sym, s.sym))
    if getattr(s, "allow_coarser_sampling", False) and not s.skip_align:
        search += (", on coarser angular and offset samplings in the iterations whose "
                   "expected pose accuracy was worse than these (RELION's "
                   "--allow_coarser_sampling rule)")
    if not consensus:
        how = ("each class from its own map, with no random seeds (RELION's behaviour for "
               "several references)" if several else
               "random class assignments in the first iteration (RELION's start)"
               if K > 1 and s.init_classes == "relion" else
               "the input class assignments" if K > 1 else "one class")
        return "As in RELION, the run started from %s, with %s." % (how, search)
    split = ("k-means clustering of the particles along the top %d principal directions "
             "of 3D variability" % (K - 1) if s.init_classes == "pca" else
             "the best of %d fixed-pose classifications from random partitions"
             % s.restarts)
    offset_range, offset_step = local_offsets(s, "em", "local", local_order(s))
    offsets = (", translations within %g pixels of each particle's offset in %g-pixel "
               "steps" % (offset_range, offset_step) if offset_step > 0 else "")
    final = ""
    if s.classify_final_iter > 0:
        final_range, final_step = local_offsets(s, "em", "local", final_order(s))
        final = (", the last %d of them one HEALPix order finer (order %d, prior sigma %g "
                 "deg%s)" % (
                     s.classify_final_iter, final_order(s), s.classify_final_sigma,
                     ", translations within %g pixels in %g-pixel steps"
                     % (final_range, final_step) if final_step > 0 else ""))
    local = ("searched orientations locally around the consensus poses (prior sigma %g "
             "deg, HEALPix order %d%s)%s" % (s.classify_local_sigma, local_order(s), offsets,
                                             final)
             if s.classify_local_sigma > 0 and not s.skip_align else "searched globally")
    return ("Unlike RELION, all particles were first aligned to one consensus map for %d "
            "iterations (%s, the last %d local; up to %d more global ones while the poses "
            "still moved by more than the angular step), the classes were then started by "
            "%s at %g A, %s fixed-pose iterations classified them at %g A%s, and the full "
            "expectation-maximisation iterations %s." % (
                s.consensus_iter, search, s.consensus_local_iter, s.consensus_extra_iter,
                split, s.restart_highres,
                ("up to %d" if s.classify_fixed_until_best else "%d") % s.classify_fixed_iter,
                s.classify_fixed_highres,
                (" (ending as soon as the held-out evidence that the classes differ "
                 "stopped rising)" if s.classify_fixed_until_best else ""), local))


def _methods_references(s, consensus, merges):
    """The merge test, the E-step references, the mask and the tau2 update."""
    text = []
    if consensus and s.merge_threshold > 0:
        text.append("After the fixed-pose iterations a held-out test merged two classes "
                    "when their split paid back less than %g of a random split's cost%s "
                    "(%s)."
                    % (s.merge_threshold,
                       "; before the last %d iterations it ran again and merged two "
                       "classes when held-out particles chose their own class's map less "
                       "than %g %% of the time, or those of the smaller class alone less "
                       "than half the time against the class they preferred most (unless "
                       "that split recovered a random split's cost)%s"
                       % (s.merge_retest_iter, 100 * s.merge_min_agreement,
                          ", and a class left empty took the smaller side of a class cut "
                          "in two along a direction of variability within it (one of "
                          "its own top three eigenvolumes or the difference of two other "
                          "classes' maps) "
                          "when the cut recovered at least %g of a random split's cost on "
                          "held-out particles" % SPLIT_THRESHOLD if s.split_into_empty else "")
                       if s.merge_retest_iter > 0 else "",
                       "; ".join(merges) if merges else "no merge"))
    if consensus and s.class_difference_highres > 0:
        text.append("The references of the expectation step shared the consensus map (%s) "
                    "beyond %g A and where the classes did not differ; the reported class "
                    "maps are plain reconstructions." % (
                        "reconstructed from all particles" if s.joint_consensus else
                        "the class-weighted mean of the class maps",
                        s.class_difference_highres))
    if s.solvent_mask:
        text.append("The references were masked with a user-provided solvent mask.")
    elif s.auto_mask_sigma > 0:
        text.append("The expectation-step references were masked around their density "
                    "(%g robust standard deviations above the solvent of the 15 A "
                    "low-passed mean map)." % s.auto_mask_sigma)
    elif s.flatten_solvent:
        text.append("The references were masked with a soft sphere of the mask diameter.")
    text.append("The signal spectra (tau2) were updated %s." % (
        "by the exact expectation-maximisation update (the maps' power spectra plus their "
        "posterior variance)" if s.tau2_estimate == "em" else
        "as in RELION (power spectra of the solvent-flattened maps)"))
    return " ".join(text)


def _q(value):
    return shlex.quote(str(value))


def _num(x):
    """Numbers as RELION writes them on its command lines (no trailing .0)."""
    x = float(x)
    return str(int(x)) if x == int(x) else repr(x)
