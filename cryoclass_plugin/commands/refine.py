"""``cryoclass refine``: 3D classification with RELION Class3D's flags and defaults.

Example (the RELION tutorial's Class3D job)::

    cryoclass refine --i particles.star --o Class3D/run --ref ref.mrc --K 4 \\
        --tau2_fudge 4 --iter 25 --ini_high 50 --firstiter_cc --particle_diameter 200 \\
        --zero_mask --flatten_solvent --ctf --sym C1 --healpix_order 2 --oversampling 1 \\
        --offset_range 5 --offset_step 2 --pad 2 --skip_gridding --preread_images --j 2

Under ``mpirun -np N`` the particles are split over the ranks.
"""
import argparse
import json
import os
import signal
import time

from ..engine.errors import CryoClassError, NotImplementedOption, RunInterrupted
from ..engine.mpi import SharedError
from ..engine.run_guard import (OutputLock, check_existing_run, check_output_folder,
                                interrupted_line, os_error_line, remove_temporaries,
                                tell_launcher_terminal, termination_signals)
from ..engine.options import (GROUPS, OPTIONS, OPTIONS_BY_FIELD, OPTIONS_BY_FLAG, Settings,
                              flag_of, resolve_automatic, settings_from_state)

HELIX_FLAGS = ("helix", "helical_outer_diameter", "helical_nr_asu", "helical_twist_initial",
               "helical_rise_initial", "helical_z_percentage")

#: Attribute of the parsed flags that lists the destinations given on the command line.
GIVEN = "given_dests"

#: relion_refine flags that Class3D users set and cryoclass refuses, each with its
#: argument (None: a switch) and why; giving one stops the run with one line.
REFUSED = {
    "pool": (int, "particles are processed in blocks of --block_size (default 256), the "
                  "engine's counterpart of RELION's pool; give --block_size instead"),
    "no_parallel_disc_io": (None, "every MPI rank reads its own particles "
                                  "(memory-mapped stacks); a leader that reads for all "
                                  "ranks is not implemented"),
}

#: relion_refine flags accepted because they select what the engine always does.
ALWAYS_DOES = {
    "dont_combine_weights_via_disc": "the ranks' sums are always combined over MPI, never "
                                     "through files",
    "reuse_scratch": "stack copies already in --scratch_dir (same size as the stack) are "
                     "always reused",
}


def _recording(base):
    """An argparse action class like ``base`` that also notes its destination in
    ``args.given_dests`` (what ``--continue`` compares with the run's settings)."""
    class Recording(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, set(getattr(namespace, GIVEN, ())) | {self.dest})
    return Recording


_STORE = _recording(argparse._StoreAction)
_TRUE = _recording(argparse._StoreTrueAction)
_FALSE = _recording(argparse._StoreFalseAction)


def _add_option(group, opt):
    """One :class:`~cryoclass_plugin.engine.options.Option` as a flag (or two: a pair)."""
    flag = "--" + opt.flag
    if opt.kind == "switch":
        group.add_argument(flag, dest=opt.field, action=_TRUE, help=opt.help)
    elif opt.kind == "negated":
        group.add_argument(flag, dest=opt.field, action=_FALSE, help=opt.help)
    elif opt.kind == "pair":
        pair = group.add_mutually_exclusive_group()
        pair.add_argument(flag, dest=opt.field, action=_TRUE, default=opt.default,
                          help=opt.help + " (default)" * bool(opt.default))
        pair.add_argument("--" + opt.off_flag, dest=opt.field, action=_FALSE,
                          help="the opposite of " + flag + " (default)" * (not opt.default))
    elif opt.kind == "optional":
        group.add_argument(flag, dest=opt.field, action=_STORE, nargs="?", const="",
                           default=opt.default, metavar=opt.flag.upper(), help=opt.help)
    else:
        group.add_argument(flag, dest=opt.field, action=_STORE, type=opt.type,
                           default=opt.default, choices=opt.choices,
                           metavar=None if opt.choices else opt.flag.upper(),
                           help=f"{opt.help} (default: {opt.default!r})")


def add_args(parser):
    """The flags of :data:`~cryoclass_plugin.engine.options.OPTIONS`, grouped by RELION
    tab, plus RELION's flags that cryoclass refuses (Blush, helices) or that change
    nothing here (RELION's disc and MPI exchange choices)."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for opt in OPTIONS:
        if opt.flag:
            _add_option(groups[opt.group], opt)
    if "blush" not in OPTIONS_BY_FLAG:   # refused until the registry has the option
        groups["Optimisation"].add_argument("--blush", action="store_true",
                                            help="Blush regularisation (3D CNN prior)")
    helix = parser.add_argument_group("Helix")
    helix.add_argument("--helix", action="store_true", help="helical reconstruction")
    for name in HELIX_FLAGS[1:]:
        helix.add_argument(f"--{name}", type=float, default=None)
    refused = parser.add_argument_group("Refused (relion_refine flags not in cryoclass)")
    for name, (typ, why) in REFUSED.items():
        if typ is None:
            refused.add_argument(f"--{name}", action="store_true", help=f"refused: {why}")
        else:
            refused.add_argument(f"--{name}", type=typ, default=None, help=f"refused: {why}")
    for name, what in ALWAYS_DOES.items():
        groups["Compute"].add_argument(f"--{name}", action="store_true",
                                       help=f"accepted (RELION): {what}")
    groups["I/O"].add_argument(
        "--overwrite", action="store_true",
        help="replace the run already in --o (its files are removed first); without it "
             "a new run into an --o that holds another run's iterations is refused")
    groups["Running"].add_argument(
        "--dry_run", action="store_true",
        help="print the run's iteration plan (one line per iteration: phase, search, "
             "references, resolution limits) after checking the inputs, and exit "
             "without computing or writing anything")


def settings_from_args(args):
    """The run's :class:`Settings` (automatic defaults resolved) from the parsed flags."""
    if "blush" not in OPTIONS_BY_FLAG and args.blush:
        raise NotImplementedOption("--blush: Blush regularisation is not implemented yet in "
                                   "cryoclass; run without --blush")
    if args.helix or any(getattr(args, n) is not None for n in HELIX_FLAGS[1:]):
        raise NotImplementedOption("--helix: helical processing is not implemented in "
                                   "cryoclass; run without the helical options")
    for name, (typ, why) in REFUSED.items():
        if getattr(args, name) not in (None, False):
            raise NotImplementedOption(f"--{name}: not implemented in cryoclass: {why}; "
                                       "run without it")
    if args.max_significant == -1:
        args.max_significant = None     # RELION's -1: no cap
    if args.continue_from:
        return _settings_for_continue(args)
    for opt in OPTIONS:
        if opt.required and not getattr(args, opt.field):
            raise CryoClassError(f"--{opt.flag} is required (or give --continue "
                                 "<root>_itNNN_optimiser.star)")
    _check(args)
    from ..engine.symmetry import parse_symmetry
    parse_symmetry(args.sym)
    return resolve_automatic(Settings(**_settings_fields(args)))


def _check(a):
    """One-line errors for values no run can use."""
    problems = (
        (a.init_classes in ("consensus", "pca") and a.consensus_iter >= a.n_iter,
         f"--consensus_iter {a.consensus_iter} leaves no iteration for classification "
         f"with --iter {a.n_iter}; give more --iter"),
        (a.classify_fixed_iter < 0, f"--classify_fixed_iter {a.classify_fixed_iter}: give 0 "
                                    "or more"),
        (a.classify_fixed_highres <= 0,
         f"--classify_fixed_highres {a.classify_fixed_highres:g}: give a resolution in "
         "Angstrom > 0 (e.g. 40)"),
        (a.n_classes < 1, f"--K {a.n_classes}: the number of classes must be >= 1"),
        (a.sigma_ang > 0 and a.skip_align,
         f"--sigma_ang {a.sigma_ang:g} with --skip_align: local angular searches need "
         "alignment; drop one of the two"),
        (a.consensus_extra_iter < 0,
         f"--consensus_extra_iter {a.consensus_extra_iter}: give 0 or more"),
        (a.merge_threshold < 0, f"--merge_threshold {a.merge_threshold:g}: give 0 (off) or "
                                "a share > 0 (default 0.3)"),
        (a.merge_fixed_iter < 0, f"--merge_fixed_iter {a.merge_fixed_iter}: give 0 or more"),
        (a.merge_retest_iter < 0, f"--merge_retest_iter {a.merge_retest_iter}: give 0 or more"),
        (not 0.5 <= a.merge_max_agreement <= 1.0,
         f"--merge_max_agreement {a.merge_max_agreement}: give a share from 0.5 to 1"),
        (not 0.5 <= a.merge_min_agreement <= a.merge_max_agreement,
         f"--merge_min_agreement {a.merge_min_agreement}: give a share from 0.5 to "
         f"--merge_max_agreement ({a.merge_max_agreement:g})"),
        (a.consensus_local_iter < 0,
         f"--consensus_local_iter {a.consensus_local_iter}: give 0 or more"),
        (a.consensus_local_sigma <= 0,
         f"--consensus_local_sigma {a.consensus_local_sigma:g}: give a prior width in "
         "degrees > 0 (--consensus_local_iter 0 turns the consensus's local searches off)"),
        (a.classify_local_sigma < 0,
         f"--classify_local_sigma {a.classify_local_sigma:g}: give 0 (global searches) or "
         "a prior width in degrees"),
        (a.classify_local_order > 13 or 0 <= a.classify_local_order < a.healpix_order,
         f"--classify_local_order {a.classify_local_order}: give a HEALPix order from "
         f"--healpix_order ({a.healpix_order}) to 13"),
        (a.classify_final_iter < 0,
         f"--classify_final_iter {a.classify_final_iter}: give 0 or more"),
        (a.classify_final_sigma <= 0,
         f"--classify_final_sigma {a.classify_final_sigma:g}: give a prior width in "
         "degrees > 0 (--classify_final_iter 0 turns the finer final searches off)"),
        (a.class_difference_highres < 0 and a.class_difference_highres != -1,
         f"--class_difference_highres {a.class_difference_highres:g}: give 0 (plain class "
         "maps), -1 (automatic) or a resolution in Angstrom (e.g. 18)"),
        (a.sigma_ang == 0, "--sigma_ang 0: give a prior width in degrees > 0 for local "
                           "searches, or leave the flag out for global searches"),
        (a.n_iter < 1, f"--iter {a.n_iter}: give at least 1 iteration"),
        (a.init_classes in ("consensus", "pca") and a.ref.lower().endswith(".star"),
         f"--ref {a.ref}: one map per class with --init_classes {a.init_classes}, which "
         "starts from one consensus map; give --init_classes relion (or input), or one "
         "map"),
        (a.fast_subsets and a.n_iter < 20,
         f"--fast_subsets with --iter {a.n_iter}: RELION's subset schedule needs at least "
         "20 iterations (subsets in 1-15, then all particles); give --iter 20 or more"),
        (a.tau2_fudge <= 0, f"--tau2_fudge {a.tau2_fudge:g}: T must be > 0 (RELION: 2-4 "
                            "for 3D classification)"),
    ) + _range_problems(a)
    for bad, message in problems:
        if bad:
            raise CryoClassError(message)


def _unset_or_positive(a, field, what):
    """A value that is either the 'not set' -1 or a positive number."""
    value = getattr(a, field)
    return (value != -1 and value <= 0,
            f"{flag_of(field)} {value:g}: give {what} > 0, or leave the flag out")


def _range_problems(a):
    """Numeric flags outside the range any run can use (each a silent wrong answer
    otherwise: e.g. a negative diameter or resolution would switch the mask or the
    low-pass off)."""
    return (
        _unset_or_positive(a, "particle_diameter", "a mask diameter in Angstrom"),
        _unset_or_positive(a, "ini_high", "a resolution in Angstrom"),
        _unset_or_positive(a, "ref_angpix", "a pixel size in Angstrom"),
        _unset_or_positive(a, "strict_highres_exp", "a resolution in Angstrom"),
        (not 0 <= a.healpix_order <= 7,
         f"--healpix_order {a.healpix_order}: give 0 (60 deg) to 7 (0.5 deg); 3D "
         "classification uses 2 (15 deg, 7.5 after oversampling)"),
        (not 0 <= a.oversampling <= 2,
         f"--oversampling {a.oversampling}: give 0, 1 (RELION's default) or 2"),
        (a.offset_range < 0, f"--offset_range {a.offset_range:g}: give 0 or more pixels"),
        (a.offset_step <= 0, f"--offset_step {a.offset_step:g}: give a step > 0 pixels"),
        (a.threads < 1, f"--j {a.threads}: give at least 1 thread"),
        (a.block_size < 1, f"--block_size {a.block_size}: give at least 1 particle"),
        (a.incr_size < 0, f"--incr_size {a.incr_size}: give 0 or more shells"),
        (not 0 < a.adaptive_fraction <= 1,
         f"--adaptive_fraction {a.adaptive_fraction:g}: give a fraction in (0, 1] "
         "(RELION: 0.999)"),
        (a.max_significant is not None and a.max_significant < 1,
         f"--maxsig {a.max_significant}: give at least 1 sample, or -1 (or no flag) for "
         "no cap"),
    )


def _settings_fields(args):
    """The :class:`Settings` fields that the parsed flags ``args`` give (unresolved)."""
    return {opt.field: getattr(args, opt.field) for opt in OPTIONS if opt.flag}


def continue_changeable():
    """The fields a continued run takes from the command line (``on_continue`` of
    :data:`~cryoclass_plugin.engine.options.OPTIONS`)."""
    return {opt.field for opt in OPTIONS if opt.on_continue == "change"}


def _given_fields(args):
    """The fields whose flags the command line gave (the registry's destinations)."""
    given = getattr(args, GIVEN, None)
    if given is None:   # flags parsed elsewhere: those that differ from the default
        return {opt.field for opt in OPTIONS
                if opt.flag and getattr(args, opt.field) != opt.default}
    return {dest for dest in given if dest in OPTIONS_BY_FIELD}


def _apply_continue_flags(args, settings):
    """The flags given with ``--continue`` onto the run's ``settings``: the options that
    a continued run may change (``on_continue="change"``: ``--iter``, ``--o``, T, the
    E-step limit, sampling and how to compute) take effect; the run's own input paths
    may be given again (spelled any way) but not changed; any other flag given with a value unlike the run's is a one-line
    error (a continued run keeps it)."""
    for field in _given_fields(args):
        opt, value = OPTIONS_BY_FIELD[field], getattr(args, field)
        if opt.on_continue == "change":
            setattr(settings, field, value)
        elif opt.on_continue == "run" and field != "continue_from" and \
                not _same_path(value, getattr(settings, field)):
            name = flag_of(field)
            raise CryoClassError(
                f"--continue {args.continue_from}: {name} {value} is not the run's "
                f"{getattr(settings, field) or '(none)'}; a continued run reads its own "
                f"inputs (drop {name}, or start a new run with the new input)")
        elif opt.on_continue == "keep" and value != getattr(settings, field):
            name = flag_of(field)
            raise CryoClassError(
                f"--continue {args.continue_from}: {name} {value} differs from the run's "
                f"{getattr(settings, field)}; a continued run keeps this setting (drop "
                f"{name}, or start a new run to change it)")


def _same_path(given, saved):
    """Whether two spellings of a path name the same file (or both name none)."""
    if not given or not saved:
        return not given and not saved
    try:
        return os.path.samefile(given, saved)
    except OSError:
        return os.path.abspath(given) == os.path.abspath(saved)


def _settings_for_continue(args):
    """``--continue <root>_itNNN_optimiser.star``: the run's own settings (as RELION
    takes them from the optimiser file), with the changes :func:`_apply_continue_flags`
    allows (``--iter`` extends the run)."""
    from ..engine.model import read_state_file
    from ..engine.refine import continue_state_path
    path = args.continue_from
    state = continue_state_path(path)
    contents = read_state_file(state)
    saved = json.loads(str(contents["__settings__"])) if "__settings__" in contents else None
    if saved is None:
        raise CryoClassError(f"--continue {path}: the state file has no settings; it was "
                             "not written by cryoclass refine")
    settings = settings_from_state(saved)
    settings.continue_from = path
    _apply_continue_flags(args, settings)
    return resolve_automatic(settings)


def main(args):
    from ..engine.mpi import get_comm
    comm = get_comm()
    try:
        # Every rank reads the same flags and inputs, so every rank meets the same
        # error: rank 0 reports it, the others end quietly with the same status.
        settings = settings_from_args(args)
        from ..engine.refine import Refinement
        if args.dry_run:
            print(Refinement(settings, log=lambda line: None).describe_plan())
            return 0
        ref = Refinement(settings, log=lambda line: None)   # reads and checks the inputs
        lock = _claim_output(ref.comm, settings, args.overwrite)
    except CryoClassError:
        _quiet_on_other_ranks(comm, 2)
        raise
    return _run(ref, settings, lock)


def _run(ref, settings, lock):
    """The iterations, with every way they can end turned into one line (rank 0's for
    an interrupt or an error all ranks share; the failing rank's otherwise)."""
    log_path = f"{settings.output_root}.log"

    def log(line):
        if settings.verb > 0:
            print(line, flush=True)
        with open(log_path, "a") as fh:
            fh.write(line + "\n")

    t0 = time.time()
    ref.log = log
    try:
        with termination_signals():
            if ref.comm.rank == 0:
                log(f"cryoclass refine: {len(ref.table)} particles, box {ref.box}, "
                    f"{ref.apix:g} A/px, K={settings.n_classes}, {ref.comm.size} rank(s), "
                    f"{'GPU ' + str(ref.device) if ref.device is not None else 'CPU'}")
            model = ref.run()
            _remove_scratch_copies(ref, settings)
            if ref.comm.rank == 0:
                log(f"done: {model.iteration} iterations in {time.time() - t0:.1f} s; "
                    f"outputs {settings.output_root}_it{model.iteration:03d}_*")
    except KeyboardInterrupt as stop:
        # The launcher may signal again (mpirun forwards SIGTERM, then ends the job once a
        # rank has exited): nothing more may cut the one message short.
        _ignore_interrupts()
        what = "terminated (SIGTERM)" if str(stop) == "SIGTERM" else "interrupted"
        if ref.comm.size > 1 and os.path.exists(_failure_marker(settings.output_root)):
            raise SystemExit(2)     # mpirun ending the job after another rank's error
        if ref.comm.size > 1 and not _claim_interrupt_report(ref.comm, settings.output_root):
            raise SystemExit(RunInterrupted.exit_code)
        line = interrupted_line(settings.output_root, what)
        _log_quietly(log_path, line)    # first: under mpirun the job may be killed soon
        told = ref.comm.size > 1 and tell_launcher_terminal(f"cryoclass refine: {line}")
        if ref.comm.size > 1 and lock is None:
            # Rank 0 holds the lock but may never see its signal (it waits in a
            # collective until mpirun kills it), so the reporting rank frees it: the
            # job is ending.
            _remove_quietly(f"{settings.output_root}.lock")
        # The claim stays (the next start clears it): a rank that sees its signal later
        # must still find the report taken.
        _remove_temporaries_quietly(settings.output_root,
                                    keep=[_interrupt_marker(settings.output_root)])
        if told:
            raise SystemExit(RunInterrupted.exit_code)
        raise RunInterrupted(line) from None
    except SharedError:
        _quiet_on_other_ranks(ref.comm, 2)
        raise
    except (CryoClassError, OSError, MemoryError) as err:
        if lock is not None:
            lock.release()      # before an MPI abort, which skips the finally below
        _fail_one_rank(ref.comm, _one_line(err, settings), settings.output_root)
    finally:
        if lock is not None:
            lock.release()
    return 0


def _one_line(err, settings):
    """The user's line for an error met while running."""
    if isinstance(err, MemoryError):
        return ("out of memory while running; give a smaller --block_size, --pad 1, or "
                "--strict_highres_exp (a lower E-step resolution), or run with fewer "
                "ranks per node")
    if isinstance(err, OSError):
        path = err.filename or settings.output_root
        return os_error_line(err, path, "write")
    return str(err)


def _failure_marker(output_root):
    """The file by which the first failing rank claims the report of a job's error (a
    temporary of the run: :func:`..engine.run_guard.remove_temporaries` clears it)."""
    folder, base = os.path.split(os.path.abspath(output_root))
    return os.path.join(folder, f".{base}.failed.tmp0")


def _fail_one_rank(comm, line, output_root):
    """Raise ``line`` as the run's error.  In a job of several ranks the first rank to
    fail (the one that creates :func:`_failure_marker`) prints and logs it, and every
    failing rank ends the job with MPI abort (the others may be waiting in a
    collective); mpirun then stops them with SIGTERM, and rank 0, finding the marker,
    does not report that as an interrupt."""
    if comm.size == 1:
        raise CryoClassError(line) from None
    import sys
    try:
        os.close(os.open(_failure_marker(output_root), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        first = True
    except FileExistsError:
        first = False
    except OSError:
        first = True        # the folder cannot take the marker: report anyway
    if first:
        _log_quietly(f"{output_root}.log", f"error (rank {comm.rank}): {line}")
        # Straight to the launcher's terminal where there is one: the abort that follows
        # can end the job before mpirun has forwarded a rank's own standard error.
        if not tell_launcher_terminal(f"cryoclass refine: error: {line}"):
            print(f"cryoclass refine: error: {line}", file=sys.stderr, flush=True)
    comm.abort(2)


def _ignore_interrupts():
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):
            pass        # not the main thread: nothing to change


def _interrupt_marker(output_root):
    """The file by which one rank claims the report of an interrupted job (a temporary
    of the run, cleared with the others)."""
    folder, base = os.path.split(os.path.abspath(output_root))
    return os.path.join(folder, f".{base}.interrupted.tmp0")


def _claim_interrupt_report(comm, output_root):
    """Whether this rank reports an interrupt of a job of several ranks: the first rank
    to create :func:`_interrupt_marker` does, so that the message is written once.  No
    rank waits for another: mpirun signals every rank, but a rank blocked in a
    collective never sees its signal, and mpirun kills the job soon after the first
    rank ends, so the rank that sees the signal first must write at once."""
    try:
        os.close(os.open(_interrupt_marker(output_root), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return comm.rank == 0       # the folder cannot take the marker: rank 0 reports


def _quiet_on_other_ranks(comm, code):
    """Ranks other than 0 end with ``code`` and print nothing (rank 0 reports)."""
    if comm.rank != 0:
        raise SystemExit(code)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _remove_temporaries_quietly(output_root, keep=()):
    try:
        remove_temporaries(output_root, keep)
    except OSError:
        pass


def _remove_scratch_copies(ref, settings):
    """After a finished run, without ``--keep_scratch``: every rank (each node has its
    own scratch disc) removes the stack copies it read from ``--scratch_dir``, once all
    ranks are done with them."""
    if not settings.scratch_dir or settings.keep_scratch:
        return
    scratch = os.path.abspath(settings.scratch_dir)
    ref.comm.barrier()
    for path in ref.data.images.stack_paths:
        if os.path.dirname(os.path.abspath(path)) == scratch:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass        # another rank on this node removed it


def _claim_output(comm, settings, overwrite):
    """Rank 0 checks ``--o`` and takes its lock (:mod:`..engine.run_guard`); every rank
    raises the same one-line error if that fails.  Returns rank 0's lock."""
    problem, lock = None, None
    if comm.rank == 0:
        try:
            check_output_folder(settings.output_root)
            # The lock first: a run still writing into --o refuses this one before
            # --overwrite removes any of its files.
            lock = OutputLock(settings.output_root).acquire()
            check_existing_run(settings.output_root,
                               inputs=(settings.input_star, settings.ref, settings.solvent_mask,
                                       settings.solvent_mask2),
                               continuing=bool(settings.continue_from), overwrite=overwrite)
            remove_temporaries(settings.output_root)
        except CryoClassError as err:
            problem = str(err)
            if lock is not None:
                lock.release()
                lock = None
    problem = comm.bcast(problem)
    if problem:
        raise SharedError(problem)
    return lock


def _log_quietly(path, line):
    try:
        with open(path, "a") as fh:
            fh.write(line + "\n")
    except OSError:
        pass
