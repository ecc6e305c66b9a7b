"""The run's options: one registry (:data:`OPTIONS`) and the :class:`Settings` record.

Each :class:`Option` says, for one setting of a run: its :class:`Settings` field, its
``cryoclass refine`` flag (RELION's ``relion_refine`` name where RELION has one), type,
default, help text, the RELION GUI tab it belongs to (the CLI's ``--help`` group),
what ``--continue`` does with it, and the Scipion protocol's form parameter it comes
from.  The command line (:mod:`cryoclass_plugin.commands.refine`) builds its parser from
the registry; ``Settings``, the continue rules and the protocol's argument builder are
checked against it by ``tests/test_options.py``.

Four defaults are *automatic* (the default value stands for "choose from the other
settings"): ``tau2_estimate``, ``consensus_tau2_estimate``, ``class_difference_highres``
and ``auto_mask_sigma``.  :func:`resolve_automatic` (also :meth:`Settings.resolved`) is
the one place that turns them into values; the command line calls it, and so must every
caller of the Python API before a run (``Refinement`` does).
"""
import dataclasses
from dataclasses import dataclass

#: Default threshold of the automatic reference mask (robust standard deviations of the
#: 15 A low-passed mean map above its solvent median; :func:`.masks.auto_solvent_mask`).
AUTO_MASK_SIGMA = 3.0

#: The CLI's help groups, in order: RELION's GUI tabs (Running: what RELION's Running
#: tab and the engine's own compute knobs set).
GROUPS = ("I/O", "Reference", "CTF", "Optimisation", "Sampling", "Compute", "Running")

#: What ``--continue`` does with an option given again: ``keep`` (must equal the run's
#: value, else a one-line error), ``change`` (takes effect: how to compute and what
#: relion_refine lets a continued run change) or ``run`` (the run's own input paths,
#: may be given again, in any spelling of the same file, but not changed).
CONTINUE_RULES = ("keep", "change", "run")

#: Flag kinds: ``value`` (``--flag VALUE``), ``switch`` (``--flag`` sets True),
#: ``negated`` (``--flag`` sets the field False, e.g. ``--skip_gridding`` -> gridding),
#: ``pair`` (``--flag`` / ``--off_flag`` set True / False), ``optional`` (``--flag`` or
#: ``--flag VALUE``: ``--gpu`` alone is "" = all visible devices).
KINDS = ("value", "switch", "negated", "pair", "optional")


#: ``Option.form_default`` when the protocol's default form passes the engine default.
SAME = "same as the engine default"


@dataclass(frozen=True)
class Option:
    field: str                 # Settings field
    flag: object               # CLI flag without dashes; None: Python API only
    type: type
    default: object
    help: str
    group: str = "Optimisation"
    on_continue: str = "keep"
    param: object = None       # the protocol's form parameter it comes from, or None
    kind: str = "value"
    choices: tuple = None
    off_flag: str = None       # kind "pair": the flag that sets False
    required: bool = False     # needed unless --continue
    form_default: object = SAME   # what the protocol's default form passes, where
                                  # RELION's GUI default differs from relion_refine's


def _o(field, flag, typ, default, help, **kw):
    return Option(field, flag, typ, default, help, **kw)


_CONSENSUS = "with --init_classes consensus|pca: "

OPTIONS = (
    # ---- I/O
    _o("input_star", "i", str, "", "input particles STAR file (RELION 3.0/3.1+)",
       group="I/O", on_continue="run", required=True, param="inputParticles"),
    _o("output_root", "o", str, "", "output rootname, e.g. Class3D/job001/run",
       group="I/O", on_continue="change", required=True),
    _o("ref", "ref", str, "",
       "reference map (MRC) for all classes, same box and pixel size as the particles; or "
       "a STAR file listing one map per class (column rlnReferenceImage, K rows: class k "
       "starts from row k's map; RELION's format)",
       group="Reference", on_continue="run", required=True, param="referenceVolume"),
    _o("continue_from", "continue", str, "",
       "continue from <root>_itNNN_optimiser.star", group="I/O", on_continue="run",
       param="doContinue"),
    # ---- Reference
    _o("firstiter_cc", "firstiter_cc", bool, False,
       "reference not on absolute greyscale: score iteration 1 by cross-correlation",
       group="Reference", kind="switch", param="isMapAbsoluteGreyScale", form_default=True),
    _o("ref_angpix", "ref_angpix", float, -1.0,
       "pixel size (A) of the reference map(s), overriding the header's (RELION); a map "
       "whose pixel size or box differs from the particles' is then resampled to them "
       "(Fourier crop/pad, box crop/pad); <= 0: the header's, which must match",
       group="Reference"),
    _o("ini_high", "ini_high", float, -1.0,
       "low-pass the reference to this resolution (A) first; <= 0: no filter",
       group="Reference", param="initialLowPassFilterA", form_default=60.0),
    _o("sym", "sym", str, "C1", "point group (C1, Cn, Dn, T, O, I)", group="Reference",
       param="symmetryGroup"),
    _o("solvent_mask", "solvent_mask", str, "", "reference mask (MRC, 0..1)",
       group="Reference", on_continue="run", param="referenceMask"),
    _o("solvent_mask2", "solvent_mask2", str, "",
       "second mask (MRC, 0..1, the particles' box): with --flatten_solvent, each "
       "iteration's maps take, where it is 1, the average density of that region (e.g. "
       "a virus's interior), as relion_refine's --solvent_mask2", group="Reference",
       on_continue="run"),
    # ---- CTF
    _o("ctf", "ctf", bool, False, "do CTF correction", group="CTF", kind="switch",
       param="doCTF", form_default=True),
    _o("ctf_intact_first_peak", "ctf_intact_first_peak", bool, False,
       "ignore CTFs until their first peak", group="CTF", kind="switch",
       param="ignoreCTFUntilFirstPeak"),
    _o("ctf_phase_flipped", "ctf_phase_flipped", bool, False,
       "the images were phase-flipped", group="CTF", kind="switch"),
    # ---- Optimisation
    _o("n_classes", "K", int, 1, "number of classes", param="numberOfClasses"),
    _o("tau2_fudge", "tau2_fudge", float, 1.0,
       "regularisation parameter T (RELION: 2-4 for 3D classification)",
       on_continue="change", param="regularisationParamT", form_default=4.0),
    _o("n_iter", "iter", int, 50,
       "number of iterations (with --continue: the last iteration of the continued run)",
       on_continue="change", param="numberOfIterations", form_default=25),
    _o("fast_subsets", "fast_subsets", bool, False,
       "random subsets in the first 15 iterations (RELION 5): 1,500 K particles in "
       "iterations 1-5, 4,500 K in 6-10, max(4,500 K, 0.3 N) in 11-15, then all; needs "
       "--iter 20 or more", kind="switch", param="useFastSubsets"),
    _o("particle_diameter", "particle_diameter", float, -1.0,
       "mask diameter (A); <= 0: the box", param="maskDiameterA", form_default=200.0),
    _o("zero_mask", "zero_mask", bool, False,
       "mask the particles' background with zeros", kind="switch", param="maskZero",
       form_default=True),
    _o("flatten_solvent", "flatten_solvent", bool, False,
       "mask the references with a soft sphere (or --solvent_mask)", kind="switch",
       form_default=True),
    _o("strict_highres_exp", "strict_highres_exp", float, -1.0,
       "limit the E-step to this resolution (A); <= 0: no limit", on_continue="change",
       param="limitResolEStep"),
    _o("blush", "blush", bool, False,
       "Blush regularisation (RELION 5): each class map of the M-step is denoised by "
       "cryoclass's own trained 3D network (cryoclass_plugin/blush, weights and model "
       "card shipped) below --blush_crossover", kind="switch", param="doBlush"),
    _o("blush_crossover", "blush_crossover", float, -1.0,
       "with --blush: the resolution (A) from which the plain reconstruction is kept; "
       "<= 0: the network's Nyquist (6 A)"),
    _o("blush_lowres", "blush_lowres", float, 25.0,
       "with --blush: the resolution (A) below which the plain reconstruction is kept, so "
       "that the classes are told apart at low resolution by their data alone "
       "(docs/benchmarks.md, 'Blush in classification'); <= 0: the denoised map from the "
       "lowest frequency on (RELION's)"),
    _o("blush_mode", "blush_mode", str, "replace",
       "with --blush: 'replace' (RELION's: the denoised map replaces the reconstruction "
       "below the crossover) or 'prior-mean' (the denoised map is the mean of the "
       "Gaussian prior: (sum X + D / (T tau2)) / (W + 1 / (T tau2)))",
       choices=("replace", "prior-mean")),
    _o("blush_weights", "blush_weights", str, "",
       "with --blush: a weights file from 'cryoclass train-blush' ('': the shipped "
       "weights)", on_continue="change"),
    _o("strict_lowres_exp", "strict_lowres_exp", float, -1.0,
       "the E-step ignores frequencies below this resolution (A): the references' "
       "Fourier shells below it are zero, as RELION's; <= 0: none", on_continue="change"),
    _o("norm", "norm", bool, False,
       "normalisation correction (RELION): estimate each particle's rlnNormCorrection "
       "n_i from its residual power (shells > 3) and multiply its image by mean(n) / "
       "n_i; starts from the input's rlnNormCorrection if present", kind="switch",
       form_default=True),
    _o("scale", "scale", bool, False,
       "intensity-scale correction (RELION): estimate each group's "
       "rlnGroupScaleCorrection (one group per micrograph) from the well-determined "
       "shells (SSNR > 3) and scale its references by it", kind="switch", form_default=True),
    _o("init_classes", "init_classes", str, "relion",
       "how K>1 classes start: 'relion' = random particle subsets in iteration 1 "
       "(RELION); 'input' = the input rlnClassNumber; 'consensus' = align to one map "
       "first, then the best of --restarts fixed-pose classifications; 'pca' = align to "
       "one map first, then k-means along the main directions of 3D variability "
       "(consensus and pca separate classes that RELION's start leaves mixed)",
       choices=("relion", "input", "consensus", "pca"), param="initialClasses",
       form_default="pca"),
    _o("consensus_iter", "consensus_iter", int, 5,
       _CONSENSUS + "iterations of one-map alignment"),
    _o("consensus_extra_iter", "consensus_extra_iter", int, 6,
       _CONSENSUS + "up to this many more global consensus iterations while the last "
       "one still moved the poses on average by more than the coarse angular step of "
       "--healpix_order (15 deg at order 2; 0: exactly --consensus_iter)",
       param="consensusExtraIterations"),
    _o("restarts", "restarts", int, 3, "with --init_classes consensus: random partitions "
       "tried"),
    _o("restart_iter", "restart_iter", int, 6,
       "with --init_classes consensus: iterations per restart"),
    _o("restart_highres", "restart_highres", float, 25.0,
       _CONSENSUS + "resolution (A) of the restarts and of the heterogeneity analysis"),
    _o("pca_pose_nuisance", "pca_remove_pose_errors", bool, True,
       "with --init_classes pca: take out of each particle's residual the directions in "
       "which an error of its pose (three rotations, two shifts) or greyscale moves its "
       "consensus projection, before the heterogeneity analysis (pose errors of a few "
       "degrees otherwise outweigh small differences); --pca_keep_pose_errors: analyse "
       "the plain residuals", kind="pair", off_flag="pca_keep_pose_errors"),
    _o("classify_fixed_iter", "classify_fixed_iter", int, 8,
       _CONSENSUS + "at most this many iterations after the split keep the consensus "
       "poses and only classify (at --classify_fixed_highres) before full EM (fewer with "
       "--classify_fixed_until_best); 0 goes to full EM at once",
       param="fixedPoseIterations"),
    _o("classify_fixed_until_best", "classify_fixed_until_best", bool, True,
       _CONSENSUS + "end the fixed-pose iterations as soon as the held-out evidence "
       "that the classes differ (the merge test's, summed over the pairs of classes; "
       "read after each fixed-pose iteration from the second on) stops rising: at the "
       "consensus poses the classes can drift from the states towards the poses' errors; "
       "--classify_fixed_all: always --classify_fixed_iter",
       kind="pair", off_flag="classify_fixed_all"),
    _o("classify_fixed_highres", "classify_fixed_highres", float, 25.0,
       "with --classify_fixed_iter: E-step resolution limit (A) of the fixed-pose "
       "iterations"),
    _o("classify_local_sigma", "classify_local_sigma", float, 3.0,
       _CONSENSUS + "after the fixed-pose iterations, search orientations locally around "
       "the consensus poses with this prior sigma (deg; to 3 sigma) on the finer grid of "
       "--classify_local_order; 0 = global searches at --healpix_order throughout, the "
       "consensus's local iterations too (--sigma_ang, if given, takes precedence)",
       param="localRangeAfterSplit"),
    _o("consensus_local_iter", "consensus_local_iter", int, 2,
       _CONSENSUS + "the last this many of the --consensus_iter iterations search "
       "locally, one HEALPix order finer than --healpix_order, to sharpen the consensus "
       "poses before the split"),
    _o("consensus_local_sigma", "consensus_local_sigma", float, 5.0,
       _CONSENSUS + "prior sigma (deg; to 3 sigma) of the --consensus_local_iter "
       "iterations' local searches"),
    _o("class_difference_highres", "class_difference_highres", float, -1.0,
       _CONSENSUS + "after the split the E-step's class references share the consensus "
       "map beyond this resolution (A) and outside the region where the classes differ "
       "(the written class maps stay plain reconstructions); 0 = plain class maps; -1 "
       "(automatic) = 18 A with the em tau2 update (600 particles, SNR 0.05: ARI "
       "0.885 / 0.931 at K=3 / 4 against 0.848 / 0.926 at 25 A), 25 A with RELION's "
       "(where 20 A gave 0.663 against 0.763)", param="sharedConsensusBeyond", form_default=18.0),
    _o("joint_consensus", "joint_consensus", bool, True,
       "with --class_difference_highres: the shared consensus is reconstructed from all "
       "particles together (sharper than the mean of the class maps, each regularised "
       "with 1/K of the particles); --mean_consensus: the class-prior-weighted mean of "
       "the class maps instead", kind="pair", off_flag="mean_consensus",
       param="jointConsensus"),
    _o("auto_mask_sigma", "auto_mask_sigma", float, -1.0,
       "mask the E-step references around their density: where the 15 A low-passed mean "
       "of the class maps exceeds its median inside the particle mask by this many "
       "robust standard deviations, extended 8 A with a 12 A soft edge (the written maps "
       "are not masked); 0: off; -1 (automatic): %g with --init_classes consensus|pca "
       "and no --solvent_mask, else off" % AUTO_MASK_SIGMA, param="autoMaskSigma",
       form_default=3.0),
    _o("tau2_estimate", "tau2_estimate", str, "",
       "how each class's signal spectrum tau2 (the prior of its next reconstruction) is "
       "updated: 'power' (RELION) = the power spectrum of the solvent-flattened map, "
       "which shrinks iteration after iteration in shells of low SSNR; 'em' = that plus "
       "the reconstruction's posterior variance (the exact EM update of a Gaussian "
       "prior's variance): class maps 2-5 A sharper, but with one class too many it can "
       "keep a true class split in two.  '' (automatic): em with --init_classes "
       "consensus|pca, K > 1 and the merge test on (--merge_threshold, which removes "
       "such splits), power otherwise", choices=("", "power", "em"), param="tau2Estimate"),
    _o("consensus_tau2_estimate", "consensus_tau2_estimate", str, "",
       _CONSENSUS + "the --tau2_estimate choice for the consensus map alone (the one map "
       "of the consensus iterations, then the shared consensus of the E-step "
       "references); '' (automatic): as --tau2_estimate", choices=("", "power", "em")),
    _o("merge_threshold", "merge_threshold", float, 0.3,
       _CONSENSUS + "at the end of the fixed-pose iterations, merge two classes when, on "
       "held-out particles, their split pays back less than this share of what a random "
       "split of the same particles costs (and the one merged map predicts them "
       "better); the freed class stays empty.  0: off", param="mergeThreshold"),
    _o("merge_max_agreement", "merge_max_agreement", float, 0.9,
       "with --merge_threshold: keep two classes apart, whatever the likelihood says, "
       "when held-out particles choose their own class's map at least this often (a "
       "small class against another state: too few particles for the likelihood, a "
       "clear difference for the particles; pieces of one state reproduce up to 86 %%); "
       "1: the likelihood alone decides"),
    _o("merge_min_agreement", "merge_min_agreement", float, 0.7,
       "with --merge_retest_iter: the second merge test, after full EM, merges two classes "
       "when held-out particles choose their own class's map less often than this (a "
       "split that does not classify reproducibly; classes of different states reproduce "
       "75 %% and more); the first test, whose classes full EM may still sort out, does "
       "not use it"),
    _o("merge_fixed_iter", "merge_fixed_iter", int, 3,
       "fixed-pose iterations added after a merge"),
    _o("split_into_empty", "split_into_empty", bool, True,
       "with --merge_retest_iter: after the second merge test, fill each empty class "
       "with the smaller side of a live class cut in two (along each of its own top "
       "three heterogeneity eigenvolumes, or along the difference of two other classes' "
       "maps, "
       "whole or masked to where it stands out of its noise), "
       "when the held-out test says the cut recovers 0.2 of a random split's cost "
       "and reproduces --merge_min_agreement, with 3 %% of the particles or more on "
       "its smaller side (a small state that the split left inside another state's "
       "class); "
       "--leave_empty_classes: empty classes stay empty", on_continue="change",
       kind="pair", off_flag="leave_empty_classes"),
    _o("merge_retest_iter", "merge_retest_iter", int, 4,
       "with --merge_threshold: run the merge test again after full EM, before the last "
       "this many iterations (which then start from the merged classes), so that two "
       "halves of one structure that the first test left apart are joined (on "
       "--merge_min_agreement; or a smaller class whose own held-out particles choose "
       "its map less than half the time against the class they prefer most, which it "
       "then joins, unless that split recovers a random split's cost; or a split that "
       "recovers none of a random split's cost and reproduces less than "
       "--merge_max_agreement); 0: once"),
    _o("classify_local_order", "classify_local_order", int, -1,
       "HEALPix order of the local searches after the split (-1: --healpix_order + 2, "
       "i.e. a quarter of the angular step)"),
    _o("classify_final_iter", "classify_final_iter", int, 2,
       _CONSENSUS + "with local searches after the split (--classify_local_sigma), the "
       "last this many iterations search one HEALPix order finer than "
       "--classify_local_order, with prior sigma --classify_final_sigma, around each "
       "particle's pose (0: the whole of full EM on the grid of --classify_local_order)"),
    _o("classify_final_sigma", "classify_final_sigma", float, 2.0,
       _CONSENSUS + "prior sigma (deg; to 3 sigma) of the --classify_final_iter "
       "iterations' local searches"),
    _o("local_offsets_finer", "local_offsets_finer", bool, True,
       _CONSENSUS + "the local searches after the split, on a HEALPix grid d orders "
       "finer than --healpix_order (--classify_local_order), halve the offset range "
       "and step d times, around each particle's offset (as many translations, finer "
       "steps); --local_offsets_coarse: "
       "--offset_range / --offset_step in every search", on_continue="change",
       kind="pair", off_flag="local_offsets_coarse"),
    # ---- Sampling
    _o("healpix_order", "healpix_order", int, 2,
       "coarse angular sampling: 2 = 15 deg (7.5 deg after oversampling)",
       group="Sampling", on_continue="change", param="angularSamplingDeg"),
    _o("oversampling", "oversampling", int, 1, "adaptive oversampling order",
       group="Sampling"),
    _o("offset_range", "offset_range", float, 6.0, "offset search range (px)",
       group="Sampling", on_continue="change", param="offsetSearchRangePix", form_default=5.0),
    _o("offset_step", "offset_step", float, 2.0, "coarse offset step (px)",
       group="Sampling", on_continue="change", param="offsetSearchStepPix"),
    _o("skip_align", "skip_align", bool, False,
       "classify without alignment: keep the input poses", group="Sampling",
       on_continue="change", kind="switch", param="doImageAlignment"),
    _o("sigma_ang", "sigma_ang", float, -1.0,
       "local angular searches: Gaussian prior (deg) around each particle's current "
       "orientation, searched to 3 sigma (RELION's 'local angular search range' / 3); "
       "needs input angles; -1: global searches", group="Sampling",
       on_continue="change", param="localAngularSearchRange"),
    _o("sigma_rot", "sigma_rot", float, -1.0,
       "local angular searches with a Gaussian prior on the first Euler angle (deg; "
       "RELION's per-angle prior, searched to 3 sigma, instead of --sigma_ang); with "
       "--sigma_tilt the two make one prior on the projection direction", group="Sampling",
       on_continue="change"),
    _o("sigma_tilt", "sigma_tilt", float, -1.0,
       "local angular searches with a Gaussian prior on the tilt angle (deg; see "
       "--sigma_rot)", group="Sampling", on_continue="change"),
    _o("sigma_psi", "sigma_psi", float, -1.0,
       "local angular searches with a Gaussian prior on the in-plane angle psi (deg; see "
       "--sigma_rot)", group="Sampling", on_continue="change"),
    _o("relax_sym", "relax_sym", str, "",
       "symmetry to relax (RELION's --relax_sym, pseudo-symmetry): local searches also "
       "look around the poses this point group relates to each particle's current one, "
       "the maps keep --sym; needs local searches", group="Sampling",
       on_continue="change", param="relaxSymmetry"),
    _o("allow_coarser_sampling", "allow_coarser_sampling", bool, False,
       "with K > 1, a coarser HEALPix order and offset step while the expected accuracy "
       "of the poses is worse than the sampling asked for (RELION's rule, recomputed "
       "every iteration; never finer than --healpix_order / --offset_step)",
       group="Sampling", kind="switch", on_continue="change", param="allowCoarserSampling"),
    # ---- Compute
    _o("pad", "pad", int, 2, "padding factor of the references' Fourier transforms",
       group="Compute", on_continue="change", choices=(1, 2), param="skipPadding"),
    _o("gridding", "dont_skip_gridding", bool, False,
       "apply the gridding correction to the reconstructions (RELION 5: off by default); "
       "--skip_gridding: skip it (the default, accepted as in older RELIONs)",
       group="Compute", on_continue="change", kind="pair", off_flag="skip_gridding",
       param="skipGridding"),
    _o("drop_bad_particles", "drop_bad_particles", bool, False,
       "read every image once before iteration 1 and leave out the particles with a "
       "non-finite (NaN/Inf) pixel or a constant image, listed in "
       "<o>_dropped_particles.star (without it such a particle stops the run)",
       group="I/O", kind="switch"),
    _o("preread_images", "preread_images", bool, False, "read all images into RAM",
       group="Compute", on_continue="change", kind="switch", param="allParticlesRam"),
    _o("scratch_dir", "scratch_dir", str, "", "copy the stacks here first",
       group="Compute", on_continue="change", param="scratchDir"),
    _o("keep_scratch", "keep_scratch", bool, False,
       "keep the copies in --scratch_dir after the run (RELION); without it they are "
       "removed when the run ends (a run that fails keeps them for the next one)",
       group="Compute", on_continue="change", kind="switch"),
    _o("gpu", "gpu", str, None, "use GPUs (CuPy); optional ids '0:1' one per rank",
       group="Compute", on_continue="change", kind="optional", param="gpusToUse"),
    _o("free_gpu_memory", "free_gpu_memory", float, 0.0,
       "GPU memory (MB) to leave free for other programs: each rank's CuPy memory pool "
       "is capped at the device's memory minus this (needs --gpu)", group="Compute",
       on_continue="change"),
    # ---- Running (and the engine's own compute knobs)
    _o("threads", "j", int, 1,
       "threads per rank (BLAS, FFTs, projection, insertion, the coarse score blocks and "
       "the fine sub-batches)", group="Running",
       on_continue="change", param="numberOfThreads"),
    _o("verb", "verb", int, 1,
       "verbosity (RELION): 1 = the run's progress on the standard output; 0 = silent "
       "there, only errors (the <--o>.log file is written either way)", group="Running",
       on_continue="change", choices=(0, 1)),
    _o("random_seed", "random_seed", int, 0, "random seed", group="Running",
       on_continue="change", param="randomSeed"),
    _o("block_size", "block_size", int, 256, "particles per E-step block (memory bound)",
       group="Running", on_continue="change"),
    _o("incr_size", "incr_size", int, 10,
       "shells beyond the resolution used in the next E-step", group="Running"),
    _o("adaptive_fraction", "adaptive_fraction", float, 0.999,
       "posterior mass kept for the fine pass", group="Running", on_continue="change"),
    _o("max_significant", "maxsig", int, None,
       "at most this many significant coarse samples per particle go to the fine pass; "
       "default (or -1): no cap, as RELION", group="Running", on_continue="change"),
    _o("fine_table_bytes", None, float, 4e9,
       "memory (bytes) for the fine pass's projections and slice sums", group="Running",
       on_continue="change"),
    _o("cache_bytes", None, float, 1e9,
       "memory (bytes) that keeps prepared images between the two passes",
       group="Running", on_continue="change"),
)

OPTIONS_BY_FIELD = {opt.field: opt for opt in OPTIONS}
OPTIONS_BY_FLAG = {opt.flag: opt for opt in OPTIONS if opt.flag}


def flag_of(field):
    """``--flag`` of a :class:`Settings` field (for messages)."""
    return "--" + (OPTIONS_BY_FIELD[field].flag or field)


def _settings_class():
    fields = [(opt.field, opt.type, dataclasses.field(default=opt.default))
              for opt in OPTIONS]
    return dataclasses.make_dataclass(
        "Settings", fields, namespace={"resolved": lambda self: resolve_automatic(self),
                                       "__module__": __name__})


#: The run's options, one field per :data:`OPTIONS` entry with its default.  Automatic
#: values stay unresolved in a ``Settings``; :meth:`Settings.resolved` resolves them.
Settings = _settings_class()
Settings.__doc__ = ("The run's options (:data:`OPTIONS`: fields, defaults, help), named "
                    "as RELION's command-line flags; ``resolved()`` returns a copy with "
                    "the automatic defaults resolved (:func:`resolve_automatic`).")


#: Fields a state file may lack: the value that keeps the feature off, as the run that
#: wrote the file ran.
ABSENT_FROM_STATE = {"classify_local_sigma": 0.0, "consensus_local_iter": 0,
                     "classify_final_iter": 0, "consensus_local_sigma": 5.0,
                     "class_difference_highres": 0.0, "joint_consensus": False,
                     "auto_mask_sigma": 0.0, "tau2_estimate": "power",
                     "consensus_tau2_estimate": "", "consensus_extra_iter": 0,
                     "merge_threshold": 0.0, "classify_fixed_until_best": False,
                     "local_offsets_finer": False, "split_into_empty": False}


def settings_from_state(saved):
    """The :class:`Settings` of a run from the dict its state file saved: a field the
    file lacks takes its :data:`ABSENT_FROM_STATE` value (else the default), and a
    field this version does not know is left out."""
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{**ABSENT_FROM_STATE,
                       **{k: v for k, v in saved.items() if k in names}})


def consensus_start(s):
    """Whether K > 1 classes start from a consensus alignment (``consensus`` / ``pca``)."""
    return s.init_classes in ("consensus", "pca") and s.n_classes > 1


def auto_tau2_estimate(s):
    """``--tau2_estimate ''``: the EM update with a consensus / PCA start of K > 1 classes
    and the merge test on (the merge test removes the true classes split in two that
    the EM update's sharper small classes keep), RELION's ``power`` otherwise."""
    return "em" if consensus_start(s) and s.merge_threshold > 0 else "power"


def auto_class_difference_highres(tau2_estimate):
    """``--class_difference_highres -1``: 18 A with the EM tau2 update, whose sharper
    class maps carry class differences beyond 25 A; 25 A with RELION's update."""
    return 18.0 if tau2_estimate == "em" else 25.0


def auto_mask_sigma(s):
    """``--auto_mask_sigma -1``: :data:`AUTO_MASK_SIGMA` with a consensus / PCA start and
    no ``--solvent_mask`` (the user's mask wins); off with RELION's start, whose results
    compare with RELION's."""
    if s.solvent_mask or s.init_classes not in ("consensus", "pca"):
        return 0.0
    return AUTO_MASK_SIGMA


def resolve_automatic(settings):
    """A copy of ``settings`` with the automatic defaults given values (idempotent)."""
    s = settings
    tau2 = s.tau2_estimate or auto_tau2_estimate(s)
    cdh = s.class_difference_highres
    return dataclasses.replace(
        s, tau2_estimate=tau2,
        consensus_tau2_estimate=s.consensus_tau2_estimate or tau2,
        class_difference_highres=auto_class_difference_highres(tau2) if cdh == -1 else cdh,
        auto_mask_sigma=auto_mask_sigma(s) if s.auto_mask_sigma < 0 else s.auto_mask_sigma)
