"""What each iteration of a run does: :func:`plan_iteration` turns the settings, the
schedule state and the iteration number into an :class:`IterationPlan`.

``--init_classes`` chooses how K > 1 classes start:

``relion``
    RELION's way: in iteration 1 each particle goes to one random class, so the K maps
    start as reconstructions of random subsets; every iteration is full EM.
``input``
    iteration 1 takes each particle's class from the input ``rlnClassNumber``.
``consensus`` / ``pca``
    ``--consensus_iter`` iterations align all particles to one map (a consensus
    refinement inside the job), the last ``--consensus_local_iter`` of them with local
    searches; then the split: ``--restarts`` soft classifications without alignment from
    random partitions (``consensus``), or k-means along the top K-1 heterogeneity
    eigenvolumes (``pca``); then up to ``--classify_fixed_iter`` fixed-pose iterations at
    ``--classify_fixed_highres`` (fewer when the held-out evidence of the split stops
    rising, ``--classify_fixed_until_best``); then the held-out merge test
    (``--merge_threshold``; after a merge ``--merge_fixed_iter`` more fixed-pose
    iterations); then full EM.

Three decisions move this schedule while the run goes, all from the saved state only (so
``--continue`` repeats them) and all kept in :class:`ScheduleState`:
:func:`extend_consensus` (one more global consensus iteration while the poses still
move), :func:`after_fixed_check` (the fixed-pose phase ends once the held-out evidence
of the split stops rising) and the merge test (:mod:`.merge`), which may add fixed-pose
iterations.
"""
from dataclasses import dataclass, replace

import numpy as np

from .options import resolve_automatic
from .references import several_references

PHASES = ("em", "consensus", "consensus-local", "split", "fixed-pose", "merged-fixed-pose")


@dataclass(frozen=True)
class ScheduleState:
    """The schedule decisions taken while the run goes (saved with the run's state).

    consensus_end : the last consensus iteration (``--consensus_iter`` plus the
        extensions of :func:`extend_consensus`)
    merge_tested : whether the held-out merge test has run (it runs once)
    merge_extra : the fixed-pose iterations the merge test added
    merged : whether the merge test merged a pair (the next iteration then starts from
        the merged hard assignments)
    retested : whether the merge test has run again after full EM
        (``--merge_retest_iter``)
    retest_merged : whether that second test merged a pair
    fixed_scores : the split evidence (:func:`.merge.split_score`) after each
        fixed-pose iteration checked so far (``--classify_fixed_until_best``)
    fixed_end : the last fixed-pose iteration when that evidence ended the phase
        early; 0: the phase runs its ``--classify_fixed_iter`` iterations
    """
    consensus_end: int
    merge_tested: bool = False
    merge_extra: int = 0
    merged: bool = False
    retested: bool = False
    retest_merged: bool = False
    fixed_scores: tuple = ()
    fixed_end: int = 0

    def __post_init__(self):
        # State files hold the scores as a JSON list.
        object.__setattr__(self, "fixed_scores", tuple(float(x) for x in self.fixed_scores))

    @classmethod
    def initial(cls, settings):
        return cls(consensus_end=int(settings.consensus_iter))


@dataclass(frozen=True)
class IterationPlan:
    """What one iteration does.

    phase : one of :data:`PHASES`
    split : ``"restarts"`` / ``"pca"``: the classes are split before this iteration
    merge_test : the held-out merge test runs before this iteration (the plan is then
        made again from the schedule it leaves)
    merge_retest : the merge test runs again, after full EM, before this iteration
    fixed_check : before this (fixed-pose) iteration the held-out evidence of the split
        decides whether the fixed-pose phase goes on (:func:`after_fixed_check`)
    extension_check : :func:`extend_consensus` decides before this iteration
    assignments : ``"free"``; ``"random"`` (RELION's seeding: one random class per
        particle); ``"input"`` (``rlnClassNumber``); ``"one-class"`` (consensus: class 1);
        ``"current"`` (hard, the state's classes: after a split or merge)
    search : ``"none"`` (poses kept), ``"global"`` or ``"local"``
    healpix_order : the orientation grid (also written to sampling.star)
    offset_range_px, offset_step_px : the offset search's range and coarse step (px;
        offsets relative to each particle's current one in a local search); 0: the
        run's ``--offset_range`` / ``--offset_step``.  Finer in the local searches on a
        finer HEALPix grid (:func:`local_offsets`); a coarser step only with
        ``--allow_coarser_sampling`` (:mod:`.coarser_sampling`)
    sigma_ang : the local searches' rotation prior sigma (deg); 0 otherwise
    class_highres_angst : the class posteriors use the frequencies up to this
        resolution (A); 0 = all of the current image size
    references : ``"plain"`` or ``"shared-consensus"`` (``--class_difference_highres``)
    auto_mask_sigma : threshold of the E-step references' automatic mask; 0 = off
    tau2_estimate : the M-step's signal spectrum estimate
    joint_consensus : the M-step also reconstructs the consensus of all classes
    use_cc : ``--firstiter_cc`` scores (cross-correlation)
    write : write the iteration's outputs
    """
    iteration: int
    phase: str
    split: str = ""
    merge_test: bool = False
    merge_retest: bool = False
    fixed_check: bool = False
    extension_check: bool = False
    assignments: str = "free"
    search: str = "global"
    healpix_order: int = 2
    offset_range_px: float = 0.0
    offset_step_px: float = 0.0
    sigma_ang: float = 0.0
    class_highres_angst: float = 0.0
    references: str = "plain"
    auto_mask_sigma: float = 0.0
    tau2_estimate: str = "power"
    joint_consensus: bool = False
    use_cc: bool = False
    write: bool = True

    @property
    def fixed_poses(self):
        return self.search == "none"

    @property
    def local(self):
        return self.search == "local"

    def describe(self):
        """One line: ``iter   7  fixed-pose  poses kept, classes to 25 A  ...``."""
        if self.search == "none":
            search = "poses kept"
        elif self.search == "local":
            search = f"local order {self.healpix_order} sigma {self.sigma_ang:g} deg"
        else:
            search = f"global order {self.healpix_order}"
        if self.offset_range_px > 0 and self.search != "none":
            search += f" offsets to {self.offset_range_px:g} px"
        if self.offset_step_px > 0 and self.search != "none":
            search += f" offset step {self.offset_step_px:.2f} px"
        parts = [f"iter {self.iteration:3d}", f"{self.phase:<17s}", search]
        if self.class_highres_angst > 0:
            parts.append(f"classes to {self.class_highres_angst:g} A")
        before = [name for name, on in (("split " + self.split, bool(self.split)),
                                        ("fixed-pose check", self.fixed_check),
                                        ("merge test", self.merge_test),
                                        ("merge retest", self.merge_retest)) if on]
        if before:
            parts.append("after " + " and ".join(before))
        if self.assignments != "free":
            parts.append(f"assignments {self.assignments}")
        refs = self.references
        if self.auto_mask_sigma > 0:
            refs += f", auto-masked {self.auto_mask_sigma:g} sigma"
        parts.append(f"references {refs}")
        parts.append(f"tau2 {self.tau2_estimate}" + (" + joint consensus"
                                                      if self.joint_consensus else ""))
        if self.use_cc:
            parts.append("cross-correlation")
        return "  ".join(parts)


def _staged(settings):
    """Whether the run has the consensus / PCA schedule (else every iteration is EM)."""
    return settings.init_classes in ("consensus", "pca") and settings.n_classes > 1


def local_order(settings):
    """The HEALPix order of the local searches after the split (``--classify_local_order``,
    default two finer than ``--healpix_order``: a quarter of its angular step)."""
    s = settings
    return s.classify_local_order if s.classify_local_order >= 0 else min(s.healpix_order + 2, 13)


def final_order(settings):
    """The HEALPix order of the last ``--classify_final_iter`` iterations' local searches:
    one finer than :func:`local_order` (half its angular step)."""
    return min(local_order(settings) + 1, 13)


def in_final_iterations(settings, iteration):
    """Whether ``iteration`` is one of the run's last ``--classify_final_iter``."""
    return iteration > settings.n_iter - settings.classify_final_iter


def consensus_local_order(settings):
    """The HEALPix order of the consensus's local iterations: one finer than
    ``--healpix_order`` (half its angular step)."""
    return settings.healpix_order + 1


def local_sigma(settings):
    """The local searches' width (deg) the run asks for: ``--sigma_ang``, else the
    largest of ``--sigma_rot/--sigma_tilt/--sigma_psi`` (whose per-angle prior the
    searches then use, :func:`.local_search.angle_prior`), else -1 (none)."""
    s = settings
    per_angle = max(s.sigma_rot, s.sigma_tilt, s.sigma_psi)
    return s.sigma_ang if s.sigma_ang > 0 else (per_angle if per_angle > 0 else -1.0)


def last_global_consensus(settings, schedule):
    """The last consensus iteration that searches globally (the local ones follow)."""
    s, end = settings, schedule.consensus_end
    if local_sigma(s) > 0 or s.classify_local_sigma <= 0:
        return end
    return end - min(s.consensus_local_iter, end - 1)


def shares_references(settings, schedule, iteration):
    """Whether the E-step references of ``iteration`` share the consensus
    (``--class_difference_highres`` after a consensus / PCA split)."""
    s = resolve_automatic(settings)
    return (_staged(s) and s.class_difference_highres > 0
            and iteration > schedule.consensus_end + 1)


def _search(settings, schedule, iteration, phase):
    """(search, HEALPix order, sigma) of an iteration.

    RELION's start: ``--sigma_ang`` (local searches) or global, at ``--healpix_order``.
    Consensus / pca starts: the consensus iterations are global at ``--healpix_order``
    (they find the poses), except the last ``--consensus_local_iter``: those search
    locally around each particle's pose one order finer (sigma
    ``--consensus_local_sigma``), and the iterations after the split on the grid of
    ``--classify_local_order`` (default two orders finer) with sigma
    ``--classify_local_sigma`` (0: global at ``--healpix_order`` throughout), the last
    ``--classify_final_iter`` of them one order finer still (sigma
    ``--classify_final_sigma``).  With ``--sigma_ang`` the consensus iterations are
    global and the later ones local at ``--healpix_order``, as RELION's local searches.
    Why: the poses' errors on a coarse grid hide differences between classes that a
    finer grid separates (docs/benchmarks.md, "Local searches on a finer grid"); the
    consensus keeps the coarser grid because its poses decide the split, which the
    finer grid there changes for the worse on some sets; and the finest grid, whose
    iterations cost 2.7-5 times as much (the posterior spreads over many more poses),
    pays as well in the last two iterations as in all of full EM (complex5, 3,000
    particles, SNR 0.2, seeds 0 / 2: ARI 0.865 / 0.898 -> 0.891 / 0.922 in the last two,
    0.889 / 0.921 in the last four, 0.884 / 0.918 in all eleven; docs/benchmarks.md,
    "Finer searches in the last iterations").  The fixed-pose phases keep the poses (with
    ``--skip_align`` every iteration does), on the grid they would search.
    """
    s = settings
    sigma, order = local_sigma(s), s.healpix_order
    if _staged(s):
        if local_sigma(s) > 0:
            sigma = -1.0 if iteration <= schedule.consensus_end else local_sigma(s)
        elif s.classify_local_sigma > 0 and phase == "consensus-local":
            sigma, order = s.consensus_local_sigma, consensus_local_order(s)
        elif s.classify_local_sigma > 0 and iteration > schedule.consensus_end:
            sigma, order = s.classify_local_sigma, local_order(s)
            if phase == "em" and in_final_iterations(s, iteration):
                sigma, order = s.classify_final_sigma, final_order(s)
        else:
            sigma = -1.0
    fixed_phase = phase in ("split", "fixed-pose", "merged-fixed-pose")
    if fixed_phase and not s.skip_align:
        return "none", s.healpix_order, 0.0
    if s.skip_align:
        return "none", order, 0.0
    return ("local", order, float(sigma)) if sigma > 0 else ("global", order, 0.0)


def local_offsets(settings, phase, search, order):
    """(range, step) in px of the offset search of an iteration of ``phase`` that
    searches ``search`` on HEALPix ``order``; (0, 0) where it is the run's
    ``--offset_range`` / ``--offset_step``.

    With ``--local_offsets_finer``, a local search after the split (full EM) on a grid
    ``d`` orders finer than ``--healpix_order`` halves the offsets' range and step ``d``
    times: as many translations, around each particle's current offset, each a 2^d
    finer step.  Why: the classes after the split differ by less than the errors the
    run's offset grid leaves in the poses (a 2 px step: 1 px after oversampling, 4 A at
    the benchmarks' 4 A/px; ribo4, 2,000 particles, SNR 0.2: ARI 0.88-0.91 -> 0.92-0.96).
    The consensus keeps the run's offsets: its poses decide the split, which finer
    offsets there changed for the worse on a set where they helped after the split
    (docs/benchmarks.md, "Finer offsets after the split (the default)")."""
    s = settings
    d = order - s.healpix_order
    if phase != "em" or search != "local" or not s.local_offsets_finer or d <= 0:
        return 0.0, 0.0
    return s.offset_range / 2 ** d, s.offset_step / 2 ** d


def fixed_phase_end(settings, schedule):
    """The last iteration of the fixed-pose phase (before a merge adds any): the
    split's iteration plus ``--classify_fixed_iter - 1``, or earlier where the held-out
    evidence ended the phase (:func:`after_fixed_check`)."""
    return schedule.fixed_end or schedule.consensus_end + settings.classify_fixed_iter


def fixed_check_due(settings, schedule, iteration):
    """Whether the held-out evidence of the split is checked before ``iteration``: with
    ``--classify_fixed_until_best``, before each fixed-pose iteration from the third of
    the phase on (the split's iteration takes k-means' hard classes and the first EM
    iteration re-sorts them, so the evidence is first read after it), until the phase
    has ended."""
    s = settings
    end = schedule.consensus_end
    return (_staged(s) and s.classify_fixed_until_best and not schedule.fixed_end
            and end + 3 <= iteration <= end + s.classify_fixed_iter)


def _phase(settings, schedule, iteration):
    s = settings
    end = schedule.consensus_end
    if not _staged(s):
        return "em"
    if iteration <= end:
        return "consensus" if iteration <= last_global_consensus(s, schedule) \
            else "consensus-local"
    fixed_end = fixed_phase_end(s, schedule)
    if iteration == end + 1 and iteration <= fixed_end:
        return "split"
    if iteration <= fixed_end:
        return "fixed-pose"
    if iteration <= fixed_end + schedule.merge_extra:
        return "merged-fixed-pose"
    return "em"


def _assignments(settings, schedule, iteration, phase):
    s = settings
    if s.n_classes < 2:
        return "free"
    if _staged(s):
        end = schedule.consensus_end
        if iteration <= end:
            return "one-class"
        if iteration == end + 1:
            return "current"
        if iteration == fixed_phase_end(s, schedule) + 1 and schedule.merged:
            return "current"
        if iteration == merge_retest_iteration(s, schedule) and schedule.retest_merged:
            return "current"
    elif s.init_classes == "input" and iteration == 1:
        return "input"
    # One reference map per class (a STAR list): each class starts from its own map,
    # so no random seeds (RELION).
    return "random" if iteration == 1 and not several_references(s) else "free"


def merge_test_due(settings, schedule, iteration):
    """Whether the held-out merge test runs before ``iteration`` (once, before the first
    iteration after the fixed-pose phase)."""
    s = settings
    return (_staged(s) and s.merge_threshold > 0 and not schedule.merge_tested
            and iteration == fixed_phase_end(s, schedule) + 1)


def merge_retest_iteration(settings, schedule):
    """The iteration before which the merge test runs again, after full EM, so that
    ``--merge_retest_iter`` iterations follow it; 0 when there is none (the option is 0,
    the first test has not run or is off, or fewer than two full-EM iterations would
    come before it).

    Why: the first test sees the split's classes after a few fixed-pose iterations;
    it merges only pairs that share no class, and classes that hold mixtures of states
    may still sort themselves out in full EM.  What full EM leaves as two halves of
    one structure (a 95 % state cut in three by the split, K=4: one duplicate with 43 %
    of the particles) the second test merges, on the agreement of the held-out
    assignments alone (docs/benchmarks.md, "Merge test after full EM")."""
    s = settings
    if not (_staged(s) and s.merge_threshold > 0 and s.merge_retest_iter > 0
            and schedule.merge_tested):
        return 0
    first_em = fixed_phase_end(s, schedule) + schedule.merge_extra + 1
    it = s.n_iter - s.merge_retest_iter + 1
    return it if it >= first_em + 2 else 0


def plan_iteration(settings, schedule, iteration):
    """The :class:`IterationPlan` of ``iteration`` under ``schedule`` (a
    :class:`ScheduleState`), with the automatic defaults of ``settings`` resolved
    (:func:`.options.resolve_automatic`)."""
    s = resolve_automatic(settings)
    phase = _phase(s, schedule, iteration)
    search, order, sigma = _search(s, schedule, iteration, phase)
    fixed_phase = phase in ("split", "fixed-pose", "merged-fixed-pose")
    offset_range, offset_step = local_offsets(s, phase, search, order)
    mask = s.auto_mask_sigma
    in_consensus = phase in ("consensus", "consensus-local")
    return IterationPlan(
        iteration=iteration, phase=phase,
        split=(("pca" if s.init_classes == "pca" else "restarts")
               if _staged(s) and iteration == schedule.consensus_end + 1 else ""),
        merge_test=merge_test_due(s, schedule, iteration),
        merge_retest=(not schedule.retested
                      and iteration == merge_retest_iteration(s, schedule)),
        fixed_check=fixed_check_due(s, schedule, iteration),
        extension_check=(_staged(s) and iteration > 2
                         and iteration - 1 == last_global_consensus(s, schedule)),
        assignments=_assignments(s, schedule, iteration, phase),
        search=search, healpix_order=int(order), sigma_ang=sigma,
        offset_range_px=offset_range, offset_step_px=offset_step,
        class_highres_angst=(float(s.classify_fixed_highres)
                             if fixed_phase and not s.skip_align else 0.0),
        references=("shared-consensus" if shares_references(s, schedule, iteration)
                    else "plain"),
        auto_mask_sigma=float(mask) if mask > 0 and iteration > 1 else 0.0,
        tau2_estimate=((s.consensus_tau2_estimate or s.tau2_estimate) if in_consensus
                       else s.tau2_estimate),
        joint_consensus=bool(s.joint_consensus
                             and shares_references(s, schedule, iteration + 1)),
        use_cc=bool(s.firstiter_cc and iteration == 1))


def extend_consensus(settings, schedule, iteration, orientation_change_deg, step_deg):
    """The schedule before ``iteration``, with one more global consensus iteration if
    ``iteration`` would be the first local consensus iteration (or the split) but the
    last global one still moved the poses by more than the coarse angular step of
    ``--healpix_order`` (``step_deg``) on average (``orientation_change_deg``), up to
    ``--consensus_extra_iter`` times and while at least two full-EM iterations stay
    after the fixed-pose phase.  Returns ``(schedule, extended)``.

    Why: on a 600-particle SNR 0.05 set with a 30-degree domain swing the consensus poses
    were still moving at iteration 4 (median error 15 deg, 10 % of the particles flipped
    at the split); the split then failed (ARI 0.29); with three more global iterations:
    10 deg, no flips, ARI 0.89 (docs/benchmarks.md, "adaptive consensus")."""
    s = settings
    if not (_staged(s) and iteration > 2
            and iteration - 1 == last_global_consensus(s, schedule)):
        return schedule, False
    room = s.n_iter - s.classify_fixed_iter - 2
    end = schedule.consensus_end
    if (orientation_change_deg > step_deg and end < s.consensus_iter + s.consensus_extra_iter
            and end < room):
        return replace(schedule, consensus_end=end + 1), True
    return schedule, False


def after_merge(settings, schedule, merged):
    """The schedule after the merge test: tested, and after a merge
    ``--merge_fixed_iter`` more fixed-pose iterations (while two full-EM iterations
    remain)."""
    s = settings
    extra = schedule.merge_extra
    if merged:
        room = s.n_iter - 2 - fixed_phase_end(s, schedule)
        extra = max(0, min(s.merge_fixed_iter, room))
    return replace(schedule, merge_tested=True, merge_extra=extra, merged=bool(merged))


def after_fixed_check(schedule, iteration, score):
    """The schedule before ``iteration`` (a fixed-pose iteration, :func:`fixed_check_due`)
    given ``score``, the split evidence after iteration ``iteration - 1``
    (:func:`.merge.split_score`): the score is recorded, and when it is no higher than
    the best before it the phase ends with iteration ``iteration - 1``.  Returns
    ``(schedule, ended)``.

    Why: at the consensus poses the class posteriors can follow the poses' errors
    rather than the states.  On ribo4 (2,000 particles, SNR 0.2, seed 1) the true maps
    at the consensus poses classify at ARI 0.73; the split reaches 0.745 one iteration
    after it, and eight fixed-pose iterations take it to 0.476, the evidence of the
    weakest pair falling with it (recovers 1.54 -> 0.23 of a random split's cost);
    the merge test then joins the swung state to the whole one.  On swing3 (2,400,
    SNR 0.1, seed 3) the same phase builds the split up (ARI 0.53 -> 0.66, the weakest
    pair's evidence 0.06 -> 1.37) and stopping after two iterations lets the merge test
    join the swung state (docs/benchmarks.md, "The fixed-pose phase ends when the
    split's evidence stops rising")."""
    best = max(schedule.fixed_scores) if schedule.fixed_scores else None
    schedule = replace(schedule, fixed_scores=schedule.fixed_scores + (float(score),))
    if best is not None and score <= best:
        return replace(schedule, fixed_end=iteration - 1), True
    return schedule, False


def after_retest(schedule, merged):
    """The schedule after the second merge test (:func:`merge_retest_iteration`)."""
    return replace(schedule, retested=True, retest_merged=bool(merged))


def describe_schedule(settings, first=1):
    """The whole run's schedule as text, one line per iteration from ``first`` to
    ``--iter``, assuming that the consensus is not extended and that the merge test
    merges nothing (both are decided while the run goes)."""
    schedule = ScheduleState.initial(settings)
    lines = [f"schedule of {settings.n_iter} iterations (--init_classes "
             f"{settings.init_classes}, K={settings.n_classes}); assumes no consensus "
             "extension, all the fixed-pose iterations and no merge, which the run "
             "decides as it goes"]
    for it in range(first, settings.n_iter + 1):
        plan = plan_iteration(settings, schedule, it)
        if plan.merge_test:
            schedule = after_merge(settings, schedule, merged=False)
            plan = replace(plan_iteration(settings, schedule, it), merge_test=True)
        if plan.merge_retest:
            schedule = after_retest(schedule, merged=False)
            plan = replace(plan_iteration(settings, schedule, it), merge_retest=True)
        lines.append(plan.describe())
    return "\n".join(lines)


def class_shell(box, apix, highres_angst):
    """The Fourier shell (pixels) of a resolution limit (A): ``ceil(box apix / res)``."""
    return int(np.ceil(box * apix / highres_angst))
