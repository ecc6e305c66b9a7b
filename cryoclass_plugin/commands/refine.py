"""``cryoclass refine``: 3D classification with RELION Class3D's flags and defaults.

Example (the RELION tutorial's Class3D job)::

    cryoclass refine --i particles.star --o Class3D/run --ref ref.mrc --K 4 \\
        --tau2_fudge 4 --iter 25 --ini_high 50 --firstiter_cc --particle_diameter 200 \\
        --zero_mask --flatten_solvent --ctf --sym C1 --healpix_order 2 --oversampling 1 \\
        --offset_range 5 --offset_step 2 --pad 2 --skip_gridding --preread_images --j 2

Under ``mpirun -np N`` the particles are split over the ranks.
"""
import os
import time

from ..engine.errors import CryoClassError, NotImplementedOption

HELIX_FLAGS = ("helix", "helical_outer_diameter", "helical_nr_asu", "helical_twist_initial",
               "helical_rise_initial", "helical_z_percentage")


def add_args(parser):
    io = parser.add_argument_group("I/O")
    io.add_argument("--i", required=False, help="input particles STAR file (RELION 3.0/3.1+)")
    io.add_argument("--o", required=False, help="output rootname, e.g. Class3D/job001/run")
    io.add_argument("--continue", dest="continue_from", default="",
                    help="continue from <root>_itNNN_optimiser.star")
    ref = parser.add_argument_group("Reference")
    ref.add_argument("--ref", help="reference map (MRC), same box and pixel size as particles")
    ref.add_argument("--firstiter_cc", action="store_true",
                     help="reference not on absolute greyscale: score iteration 1 by "
                          "cross-correlation")
    ref.add_argument("--ini_high", type=float, default=-1,
                     help="low-pass the reference to this resolution (A) first")
    ref.add_argument("--sym", default="C1", help="point group (C1, Cn, Dn, T, O, I)")
    ref.add_argument("--solvent_mask", default="", help="reference mask (MRC, 0..1)")
    ctf = parser.add_argument_group("CTF")
    ctf.add_argument("--ctf", action="store_true", help="do CTF correction")
    ctf.add_argument("--ctf_intact_first_peak", action="store_true",
                     help="ignore CTFs until their first peak")
    ctf.add_argument("--ctf_phase_flipped", action="store_true",
                     help="the images were phase-flipped")
    opt = parser.add_argument_group("Optimisation")
    opt.add_argument("--K", type=int, default=1, help="number of classes")
    opt.add_argument("--tau2_fudge", type=float, default=1.0, help="regularisation T")
    opt.add_argument("--iter", type=int, default=None, help="number of iterations (50)")
    opt.add_argument("--fast_subsets", action="store_true",
                     help="use growing random subsets in the first 15 iterations")
    opt.add_argument("--particle_diameter", type=float, default=-1,
                     help="mask diameter (A); default: the box")
    opt.add_argument("--zero_mask", action="store_true",
                     help="mask the particles' background with zeros")
    opt.add_argument("--flatten_solvent", action="store_true",
                     help="mask the references with a soft sphere (or --solvent_mask)")
    opt.add_argument("--strict_highres_exp", type=float, default=-1,
                     help="limit the E-step to this resolution (A)")
    opt.add_argument("--norm", action="store_true",
                     help="normalisation correction (RELION): estimate each particle's "
                          "rlnNormCorrection n_i from its residual power (shells > 3) and "
                          "multiply its image by mean(n) / n_i; starts from the input's "
                          "rlnNormCorrection if present")
    opt.add_argument("--scale", action="store_true",
                     help="intensity-scale correction (RELION): estimate each group's "
                          "rlnGroupScaleCorrection (one group per micrograph) from the "
                          "well-determined shells (SSNR > 3) and scale its references by it")
    opt.add_argument("--blush", action="store_true", help="Blush regularisation (3D CNN prior)")
    opt.add_argument("--init_classes", default="relion", choices=["relion", "input", "consensus", "pca"],
                     help="how K>1 classes start: 'relion' = random particle subsets in "
                          "iteration 1 (RELION); 'input' = the input rlnClassNumber; "
                          "'consensus' = align to one map first, then the best of "
                          "--restarts fixed-pose classifications (recommended when "
                          "RELION's classes come out mixed)")
    opt.add_argument("--consensus_iter", type=int, default=5,
                     help="with --init_classes consensus: iterations of one-map alignment")
    opt.add_argument("--consensus_extra_iter", type=int, default=6,
                     help="with --init_classes consensus|pca: up to this many more global "
                          "consensus iterations while the last one still moved the poses "
                          "on average by more than the coarse angular step of "
                          "--healpix_order (15 deg at order 2; 0: exactly --consensus_iter)")
    opt.add_argument("--restarts", type=int, default=3,
                     help="with --init_classes consensus: random partitions tried")
    opt.add_argument("--restart_iter", type=int, default=6,
                     help="with --init_classes consensus: iterations per restart")
    opt.add_argument("--restart_highres", type=float, default=25.0,
                     help="with --init_classes consensus|pca: resolution (A) of the restarts, "
                          "of the heterogeneity analysis and of the fixed-pose iterations")
    opt.add_argument("--classify_fixed_iter", type=int, default=8,
                     help="with --init_classes consensus|pca: iterations after the split "
                          "that keep the consensus poses and only classify (at "
                          "--classify_fixed_highres) before full EM; 0 goes to full EM at once")
    opt.add_argument("--classify_fixed_highres", type=float, default=25.0,
                     help="with --classify_fixed_iter: E-step resolution limit (A) of the "
                          "fixed-pose iterations")
    opt.add_argument("--classify_local_sigma", type=float, default=5.0,
                     help="with --init_classes consensus|pca: after the fixed-pose "
                          "iterations, search orientations locally around the consensus "
                          "poses with this prior sigma (deg; to 3 sigma) on the finer grid "
                          "of --classify_local_order; 0 = global searches at "
                          "--healpix_order (--sigma_ang, if given, takes precedence)")
    opt.add_argument("--consensus_local_iter", type=int, default=2,
                     help="with --init_classes consensus|pca: the last this many of the "
                          "--consensus_iter iterations search locally (as after the split) "
                          "to sharpen the consensus poses before the split")
    opt.add_argument("--class_difference_highres", type=float, default=-1.0,
                     help="with --init_classes consensus|pca: after the split the E-step's "
                          "class references share the consensus map beyond this resolution "
                          "(A) and outside the region where the classes differ (the written "
                          "class maps stay plain reconstructions); 0 = plain class maps; "
                          "-1 (default) = 18 A with the em tau2 update, 25 A with RELION's "
                          "(benchmarks/RESULTS.md, 'class differences up to 18 A')")
    joint = opt.add_mutually_exclusive_group()
    joint.add_argument("--joint_consensus", dest="joint_consensus", action="store_true",
                       default=True,
                       help="with --class_difference_highres: the shared consensus is "
                            "reconstructed from all particles together (the default; "
                            "sharper than the mean of the class maps, each regularised "
                            "with 1/K of the particles)")
    joint.add_argument("--mean_consensus", dest="joint_consensus", action="store_false",
                       help="... instead the class-prior-weighted mean of the class maps "
                            "(the default before the automatic mask; benchmarks/RESULTS.md, "
                            "'automatic mask')")
    opt.add_argument("--merge_threshold", type=float, default=0.3,
                     help="with --init_classes consensus|pca: at the end of the fixed-pose "
                          "iterations, merge two classes when, on held-out particles, "
                          "their split pays back less than this share of what a random "
                          "split of the same particles costs (and the one merged map "
                          "predicts them better); the freed class stays empty.  0: off")
    opt.add_argument("--merge_fixed_iter", type=int, default=3,
                     help="fixed-pose iterations added after a merge")
    opt.add_argument("--consensus_tau2_estimate", choices=("", "power", "em"), default="",
                     help="with --init_classes consensus|pca: the same choice for the "
                          "consensus map alone (the one map of the consensus iterations, "
                          "then the shared consensus of the E-step references); default: "
                          "as --tau2_estimate (benchmarks/RESULTS.md 'consensus map')")
    opt.add_argument("--tau2_estimate", choices=("", "power", "em"), default="",
                     help="how each class's signal spectrum tau2 (the prior of its next "
                          "reconstruction) is updated: 'power' (RELION) = the power "
                          "spectrum of the solvent-flattened map, which shrinks iteration "
                          "after iteration in shells of low SSNR; 'em' = that plus the "
                          "reconstruction's posterior variance (the exact EM update of a "
                          "Gaussian prior's variance): class maps 2-5 A sharper.  Default: "
                          "em with --init_classes consensus|pca and K > 1 (whose merge "
                          "test, --merge_threshold, removes the split classes em used to "
                          "keep), power otherwise (benchmarks/RESULTS.md, 'tau2 estimate', "
                          "'merge test')")
    opt.add_argument("--auto_mask_sigma", type=float, default=-1.0,
                     help="mask the E-step references around their density: where the "
                          "15 A low-passed mean of the class maps exceeds its median inside "
                          "the particle mask by this many robust standard deviations, "
                          "extended 8 A with a 12 A soft edge (the written maps are not "
                          "masked); 0: off; default: 3 with --init_classes consensus|pca, "
                          "off with RELION's start")
    opt.add_argument("--classify_local_order", type=int, default=-1,
                     help="HEALPix order of those local searches (default: --healpix_order "
                          "+ 1, i.e. half the angular step)")
    samp = parser.add_argument_group("Sampling")
    samp.add_argument("--healpix_order", type=int, default=2,
                      help="coarse angular sampling: 2 = 15 deg (7.5 deg after oversampling)")
    samp.add_argument("--oversampling", type=int, default=1, help="adaptive oversampling order")
    samp.add_argument("--offset_range", type=float, default=6, help="offset search range (px)")
    samp.add_argument("--offset_step", type=float, default=2, help="coarse offset step (px)")
    samp.add_argument("--skip_align", action="store_true",
                      help="classify without alignment: keep the input poses")
    samp.add_argument("--sigma_ang", type=float, default=-1,
                      help="local angular searches: Gaussian prior (deg) around each "
                           "particle's current orientation, searched to 3 sigma (RELION's "
                           "'local angular search range' / 3); needs input angles")
    helix = parser.add_argument_group("Helix")
    helix.add_argument("--helix", action="store_true", help="helical reconstruction")
    for name in HELIX_FLAGS[1:]:
        helix.add_argument(f"--{name}", type=float, default=None)
    comp = parser.add_argument_group("Compute")
    comp.add_argument("--pad", type=int, default=2, choices=[1, 2], help="padding factor")
    comp.add_argument("--skip_gridding", action="store_true", help="skip gridding correction")
    comp.add_argument("--preread_images", action="store_true", help="read all images into RAM")
    comp.add_argument("--scratch_dir", default="", help="copy the stacks here first")
    comp.add_argument("--pool", type=int, default=1,
                      help="particles per read (RELION); we read in blocks of --block_size")
    comp.add_argument("--j", type=int, default=1, help="threads (BLAS/FFT) per rank")
    comp.add_argument("--gpu", nargs="?", const="", default=None,
                      help="use GPUs (CuPy); optional ids '0:1' one per rank")
    comp.add_argument("--dont_combine_weights_via_disc", action="store_true",
                      help="accepted for RELION compatibility (we always reduce over MPI)")
    comp.add_argument("--no_parallel_disc_io", action="store_true",
                      help="accepted for RELION compatibility (each rank reads its own "
                           "particles; stacks are memory-mapped)")
    comp.add_argument("--random_seed", type=int, default=0, help="random seed")
    comp.add_argument("--block_size", type=int, default=256,
                      help="particles per E-step block (memory bound)")
    comp.add_argument("--incr_size", type=int, default=10,
                      help="shells beyond the resolution used in the next E-step")
    comp.add_argument("--adaptive_fraction", type=float, default=0.999,
                      help="posterior mass kept for the fine pass")
    comp.add_argument("--maxsig", type=int, default=2000,
                      help="at most this many significant coarse samples per particle")


def settings_from_args(args):
    from ..engine.refine import Settings
    if args.blush:
        raise NotImplementedOption("--blush: Blush regularisation is not implemented yet in "
                                   "cryoclass; run without --blush")
    if args.helix or any(getattr(args, n) is not None for n in HELIX_FLAGS[1:]):
        raise NotImplementedOption("--helix: helical processing is not implemented in "
                                   "cryoclass; run without the helical options")
    if args.continue_from:
        return _settings_for_continue(args)
    for flag in ("i", "o", "ref"):
        if not getattr(args, flag):
            raise CryoClassError(f"--{flag} is required (or give --continue "
                                 "<root>_itNNN_optimiser.star)")
    if args.iter is None:
        args.iter = 50
    if args.init_classes in ("consensus", "pca") and args.consensus_iter >= args.iter:
        raise CryoClassError(f"--consensus_iter {args.consensus_iter} leaves no iteration for "
                             f"classification with --iter {args.iter}; give more --iter")
    if args.classify_fixed_iter < 0:
        raise CryoClassError(f"--classify_fixed_iter {args.classify_fixed_iter}: give 0 or more")
    if args.classify_fixed_highres <= 0:
        raise CryoClassError(f"--classify_fixed_highres {args.classify_fixed_highres:g}: give a "
                             "resolution in Angstrom > 0 (e.g. 40)")
    if args.K < 1:
        raise CryoClassError(f"--K {args.K}: the number of classes must be >= 1")
    if args.sigma_ang > 0 and args.skip_align:
        raise CryoClassError(f"--sigma_ang {args.sigma_ang:g} with --skip_align: local "
                             "angular searches need alignment; drop one of the two")
    if args.consensus_extra_iter < 0:
        raise CryoClassError(f"--consensus_extra_iter {args.consensus_extra_iter}: give 0 or more")
    if args.merge_threshold < 0:
        raise CryoClassError(f"--merge_threshold {args.merge_threshold:g}: give 0 (off) or a "
                             "share > 0 (default 0.3)")
    if args.merge_fixed_iter < 0:
        raise CryoClassError(f"--merge_fixed_iter {args.merge_fixed_iter}: give 0 or more")
    if args.consensus_local_iter < 0:
        raise CryoClassError(f"--consensus_local_iter {args.consensus_local_iter}: give 0 or more")
    if args.classify_local_sigma < 0:
        raise CryoClassError(f"--classify_local_sigma {args.classify_local_sigma:g}: give 0 "
                             "(global searches) or a prior width in degrees")
    if args.classify_local_order > 13 or (0 <= args.classify_local_order < args.healpix_order):
        raise CryoClassError(f"--classify_local_order {args.classify_local_order}: give a "
                             f"HEALPix order from --healpix_order ({args.healpix_order}) to 13")
    if args.class_difference_highres < 0 and args.class_difference_highres != -1:
        raise CryoClassError(f"--class_difference_highres {args.class_difference_highres:g}: "
                             "give 0 (plain class maps), -1 (automatic) or a resolution in "
                             "Angstrom (e.g. 18)")
    if args.sigma_ang == 0:
        raise CryoClassError("--sigma_ang 0: give a prior width in degrees > 0 for local "
                             "searches, or leave the flag out for global searches")
    if args.iter < 1:
        raise CryoClassError(f"--iter {args.iter}: give at least 1 iteration")
    if args.tau2_fudge <= 0:
        raise CryoClassError(f"--tau2_fudge {args.tau2_fudge:g}: T must be > 0 (RELION: 2-4 "
                             "for 3D classification)")
    from ..engine.symmetry import parse_symmetry
    parse_symmetry(args.sym)
    return Settings(**_settings_fields(args))


def _tau2_estimate(args):
    """``--tau2_estimate``, or its default: the EM update with a consensus / PCA start of
    K > 1 classes (its merge test undoes the split classes that the EM update's sharper
    small classes used to keep alive), RELION's otherwise."""
    if args.tau2_estimate:
        return args.tau2_estimate
    pca_start = args.init_classes in ("consensus", "pca") and args.K > 1
    return "em" if pca_start and args.merge_threshold > 0 else "power"


def _class_difference_highres(args):
    """``--class_difference_highres``, or its default (-1): 18 A with the EM tau2 update,
    whose sharper class maps carry class differences beyond 25 A (600 particles at SNR
    0.05: ARI 0.885 / 0.931 against 0.848 / 0.926 at 25 A), and 25 A with RELION's, where
    20 A had done worse (0.663 against 0.763)."""
    if args.class_difference_highres != -1:
        return args.class_difference_highres
    return 18.0 if _tau2_estimate(args) == "em" else 25.0


def _settings_fields(args):
    """The :class:`Settings` fields that the parsed flags ``args`` give."""
    return dict(
        input_star=args.i, output_root=args.o, ref=args.ref or "", n_classes=args.K,
        tau2_fudge=args.tau2_fudge, n_iter=args.iter, ini_high=args.ini_high,
        firstiter_cc=args.firstiter_cc, particle_diameter=args.particle_diameter,
        zero_mask=args.zero_mask, flatten_solvent=args.flatten_solvent,
        solvent_mask=args.solvent_mask, ctf=args.ctf,
        ctf_intact_first_peak=args.ctf_intact_first_peak,
        ctf_phase_flipped=args.ctf_phase_flipped, sym=args.sym,
        healpix_order=args.healpix_order, oversampling=args.oversampling,
        offset_range=args.offset_range, offset_step=args.offset_step,
        strict_highres_exp=args.strict_highres_exp, fast_subsets=args.fast_subsets,
        norm=args.norm, scale=args.scale, pad=args.pad, gridding=not args.skip_gridding,
        preread_images=args.preread_images, scratch_dir=args.scratch_dir, pool=args.pool,
        threads=args.j, gpu=args.gpu, random_seed=args.random_seed,
        continue_from=args.continue_from, skip_align=args.skip_align,
        incr_size=args.incr_size, adaptive_fraction=args.adaptive_fraction,
        max_significant=args.maxsig, block_size=args.block_size,
        init_classes=args.init_classes, consensus_iter=args.consensus_iter,
        consensus_extra_iter=args.consensus_extra_iter,
        restarts=args.restarts, restart_iter=args.restart_iter,
        restart_highres=args.restart_highres, classify_fixed_iter=args.classify_fixed_iter,
        classify_fixed_highres=args.classify_fixed_highres, sigma_ang=args.sigma_ang,
        classify_local_sigma=args.classify_local_sigma,
        classify_local_order=args.classify_local_order,
        consensus_local_iter=args.consensus_local_iter,
        class_difference_highres=_class_difference_highres(args),
        joint_consensus=args.joint_consensus,
        auto_mask_sigma=args.auto_mask_sigma, tau2_estimate=_tau2_estimate(args),
        consensus_tau2_estimate=args.consensus_tau2_estimate,
        merge_threshold=args.merge_threshold, merge_fixed_iter=args.merge_fixed_iter)


# What a continued run may change: how to compute, and what relion_refine's --continue
# lets change (regularisation, E-step resolution limit, sampling, padding and gridding,
# seed).  The input paths are the run's own (the Scipion protocol repeats --i, and a
# path may be spelled differently from another folder).  All other settings must match
# the run's.
CONTINUE_CHANGEABLE = {"threads", "gpu", "preread_images", "scratch_dir", "block_size",
                       "pool", "tau2_fudge", "strict_highres_exp", "healpix_order",
                       "sigma_ang", "offset_range", "offset_step", "pad", "gridding",
                       "skip_align", "max_significant", "adaptive_fraction", "random_seed"}
CONTINUE_RUN_FILES = {"input_star", "ref", "solvent_mask", "continue_from"}
FLAG_OF_FIELD = {"n_classes": "K", "max_significant": "maxsig", "threads": "j",
                 "n_iter": "iter", "output_root": "o"}


def _apply_continue_flags(args, settings):
    """The flags given with ``--continue`` onto the run's ``settings``: ``--iter``, ``--o``
    and :data:`CONTINUE_CHANGEABLE` take effect; any other flag that would change a
    setting of the run is a one-line error (it used to be ignored without a word).
    A flag counts as given when its value differs from the flag's default, so going
    back to a default value (e.g. ``--tau2_fudge 1`` after a run with 4) needs a new run."""
    import argparse
    parser = argparse.ArgumentParser()
    add_args(parser)
    default = _settings_fields(parser.parse_args([]))
    for field, value in _settings_fields(args).items():
        if value == default[field] or field in CONTINUE_RUN_FILES:
            continue
        if field in CONTINUE_CHANGEABLE or field in ("n_iter", "output_root"):
            setattr(settings, field, value)
            continue
        saved = getattr(settings, field)
        if value != saved:
            name = FLAG_OF_FIELD.get(field, field)
            raise CryoClassError(
                f"--continue {args.continue_from}: --{name} {value} differs from the run's "
                f"{saved}; a continued run keeps this setting (drop --{name}, or start a "
                "new run to change it)")


def _settings_for_continue(args):
    """``--continue <root>_itNNN_optimiser.star``: the run's own settings (as RELION
    takes them from the optimiser file), with the changes :func:`_apply_continue_flags`
    allows (``--iter`` extends the run)."""
    import dataclasses
    import json
    from ..engine.refine import Settings, continue_state_path
    path = args.continue_from
    state = continue_state_path(path)
    import numpy as np
    with np.load(state, allow_pickle=False) as z:
        saved = json.loads(str(z["__settings__"])) if "__settings__" in z.files else None
    if saved is None:
        raise CryoClassError(f"--continue {path}: the state file has no settings; it was "
                             "not written by this version of cryoclass")
    names = {f.name for f in dataclasses.fields(Settings)}
    # Runs written before the local searches existed continue as they started: global.
    saved.setdefault("classify_local_sigma", 0.0)
    saved.setdefault("consensus_local_iter", 0)
    # ... and before the shared-consensus references: plain class maps.
    saved.setdefault("class_difference_highres", 0.0)
    # ... and before the joint consensus reconstruction: the mean of the class maps.
    saved.setdefault("joint_consensus", False)
    # ... and before the automatic reference mask: none.
    saved.setdefault("auto_mask_sigma", 0.0)
    saved.setdefault("tau2_estimate", "power")
    saved.setdefault("consensus_tau2_estimate", "")
    # ... and before the adaptive consensus length: exactly --consensus_iter.
    saved.setdefault("consensus_extra_iter", 0)
    # ... and before the held-out merge test: no merges.
    saved.setdefault("merge_threshold", 0.0)
    settings = Settings(**{k: v for k, v in saved.items() if k in names})
    settings.continue_from = path
    _apply_continue_flags(args, settings)
    return settings


def main(args):
    settings = settings_from_args(args)
    from ..engine.refine import Refinement
    log_path = f"{settings.output_root}.log"

    def log(line):
        print(line, flush=True)
        with open(log_path, "a") as fh:
            fh.write(line + "\n")

    t0 = time.time()
    ref = Refinement(settings, log=log)
    if ref.comm.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(settings.output_root)) or ".", exist_ok=True)
        log(f"cryoclass refine: {len(ref.table)} particles, box {ref.box}, "
            f"{ref.apix:g} A/px, K={settings.n_classes}, {ref.comm.size} rank(s), "
            f"{'GPU ' + str(ref.device) if ref.device is not None else 'CPU'}")
    model = ref.run()
    if ref.comm.rank == 0:
        log(f"done: {model.iteration} iterations in {time.time() - t0:.1f} s; outputs "
            f"{settings.output_root}_it{model.iteration:03d}_*")
    return 0
