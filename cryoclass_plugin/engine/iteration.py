"""One EM iteration: ``prepare -> expectation(plan) -> reduce -> maximisation -> finish``.

:func:`prepare` picks the particles, the Fourier pixels of the current image size, the
E-step references (:func:`estep_references`) and the search set-up of the
:class:`.plan.IterationPlan`; :func:`expectation` runs this rank's E-step, by one of
two paths (fixed poses; coarse then fine search, global or local), adding the M-step
sums to the accumulators and returning the per-particle results (a
:class:`.particles.ParticleResults`); :func:`reduce` adds both over the MPI ranks;
:func:`maximisation` makes the new maps, spectra and particle states (:mod:`.mstep`);
:func:`finish` records, writes and logs the iteration.
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import coarser_sampling, estep, local_search, search
from .backend import get_xp, to_numpy
from .errors import CryoClassError
from .fourier import fft_centered, ifft_centered, radial_index
from .geometry import angular_distance_deg, euler_to_matrix
from .masks import auto_solvent_mask, soft_sphere_mask
from .mpi import split_range
from .mstep import (Accumulators, correction_pixels, maximise, norm_power_beyond,
                    update_norm_corrections, update_scale_corrections)
from .outputs import write_iteration
from .particles import (ParticleResults, Pixels, ctf_and_inverse_noise, mask_diameter_angst,
                        prepare_block)
from .plan import class_shell
from .projector import Projector, current_grid_shell
from .sampling import TranslationGrid


@dataclass
class RunContext:
    """What stays fixed over a run's iterations.

    settings : the run's :class:`.options.Settings`;  data : :class:`.particles.ParticleData`
    table : the particles' STAR table (for the outputs);  comm : the MPI communicator
    xp : numpy or cupy;  grid : ``grid(order)`` -> the :class:`.sampling.OrientationGrid`
    of a HEALPix order;  translations : the :class:`.sampling.TranslationGrid`
    solvent_mask : (N, N, N) host array or None (``--flatten_solvent``)
    symmetrise : device map -> symmetrised map, or None (C1)
    sym_mats : (G, 3, 3) symmetry matrices;  log : ``log(line)``
    blush : a :class:`.blush_step.BlushStep` (``--blush``) or None
    """
    settings: object
    data: object
    table: object
    comm: object
    xp: object
    grid: object
    translations: object
    solvent_mask: object
    symmetrise: object
    sym_mats: object
    log: object
    blush: object = None


@dataclass
class MStepSettings:
    """The settings :func:`.mstep.maximise` reads, with the plan's tau2 estimate."""
    tau2_fudge: float
    gridding: bool
    tau2_estimate: str
    consensus_tau2_estimate: str
    solvent_mask2: str = ""     # --solvent_mask2 (path), flattened after the solvent mask
    # RELION's weight floor in the unregularised reconstruction after a --firstiter_cc
    # iteration: in RELION's start, not in the consensus of the recommended start,
    # whose splits came out worse with it (docs/benchmarks.md, "Reconstruction weight
    # floor").
    cc_weight_floor: bool = True

    @classmethod
    def of(cls, settings, plan):
        return cls(settings.tau2_fudge, settings.gridding, plan.tau2_estimate,
                   settings.consensus_tau2_estimate or settings.tau2_estimate,
                   settings.solvent_mask2,
                   cc_weight_floor=plan.phase not in ("consensus", "consensus-local"))


@dataclass
class IterationWork:
    """What :func:`prepare` sets up for one iteration (see the module docstring)."""
    plan: object
    subset: np.ndarray          # the particles of this iteration (indices into the table)
    allowed: object             # (n,) class each particle may take, or None
    pixels: Pixels
    setup: search.SearchSetup
    acc: Accumulators
    n_class_pixels: object      # pixels deciding the class posteriors (None: all)
    timer: object
    prune_radius_deg: float = 0.0   # > 0: a pruned global search (:func:`prune_radius`)


# Pruned global searches.  Once the poses have settled (the last iteration moved them
# by at most PRUNE_SETTLED_STEPS coarse angular steps on average), an iteration of a
# global search scores the rotations of a particle whose posterior was concentrated
# only within PRUNE_RADIUS_STEPS steps of its current pose (all classes, all
# translations, no prior inside the ball), and every PRUNE_CHECK_EVERY-th iteration
# searches the whole grid for all particles again.  Such a particle's coarse posterior
# lies far inside the ball (one or two significant samples out of the grid's ~10^5), so
# its significant set, and with it the fine pass and the M-step, is the global
# search's.
PRUNE_RADIUS_STEPS = 3.0
PRUNE_SETTLED_STEPS = 1.0
PRUNE_CHECK_EVERY = 3
# Only particles whose last posterior was concentrated are pruned (:func:`concentrated`);
# the others (a few %: several modes, or a broad posterior) search the whole grid.
PRUNE_MIN_PMAX = 0.5
PRUNE_SPREAD_STEPS = 0.25


def prune_radius(settings, model, plan, step_deg):
    """The ball radius (deg) of a pruned global search in this iteration, or 0 for the
    whole grid: only in full-EM global searches on the run's own grid (not the first,
    cross-correlation iterations, not the consensus phase, whose pose changes decide
    its length, not while ``--fast_subsets`` takes new particles), from the third
    iteration on, never in the global check iterations (multiples of
    ``PRUNE_CHECK_EVERY``) and not until the last iteration's mean change of the
    orientations (``model.changes``, saved with the state) is within
    ``PRUNE_SETTLED_STEPS`` coarse steps."""
    if (plan.search != "global" or plan.phase != "em" or plan.use_cc
            or plan.healpix_order != settings.healpix_order or plan.iteration < 3
            or plan.iteration % PRUNE_CHECK_EVERY == 0
            or (settings.fast_subsets and plan.iteration <= 15)
            or model.changes["orientations"] > PRUNE_SETTLED_STEPS * step_deg):
        return 0.0
    return PRUNE_RADIUS_STEPS * step_deg


def searched_classes(model, allowed, subset, n_classes):
    """The classes the coarse and fine passes score: those some particle may take (one
    during a consensus phase, each particle's seed in RELION's first iteration), and
    without such restrictions all classes whose prior (the class distribution) is not 0.
    A class with prior 0 has posterior 0 for every particle (prior times likelihood);
    RELION skips it too."""
    if allowed is not None:
        return np.unique(np.asarray(allowed)[subset])
    alive = np.nonzero(np.asarray(model.pdf_class) > 0.0)[0]
    return alive if alive.size else np.arange(n_classes)


def fast_subset_size(iteration, n_particles, n_classes):
    """Particles used in an iteration with ``--fast_subsets`` (RELION 5's 3D schedule):
    1,500 K in iterations 1-5, 4,500 K in 6-10, max(4,500 K, 30 % of the particles) in
    11-15, all from 16 on (never more than all)."""
    if iteration <= 5:
        size = 1500 * n_classes
    elif iteration <= 10:
        size = 4500 * n_classes
    elif iteration <= 15:
        size = max(4500 * n_classes, int(np.ceil(0.3 * n_particles)))
    else:
        size = n_particles
    return min(n_particles, size)


def coarse_shell(settings, box, apix, angular_step_deg):
    """RELION's coarse size: the resolution at which the coarse angular step moves a
    point at the particle's edge by about one resolution element (safety factor 1.2)."""
    diameter = mask_diameter_angst(settings, box, apix)
    rotated_distance = np.deg2rad(angular_step_deg) * diameter / 2.0
    coarse_res = rotated_distance / 1.2
    return int(np.ceil(box * apix / max(coarse_res, 2 * apix)))


# ----------------------------------------------------------------------------- prepare

def _particles_and_seeds(ctx, plan, allowed):
    """The iteration's particles (all, or a ``--fast_subsets`` sample) and, for RELION's
    seeding, one random class per particle (both from the seed and iteration).  A
    ``--ref`` list of one map per class has no seeds (RELION: ``do_generate_seeds``
    off): the classes differ from the start."""
    s, n = ctx.settings, ctx.data.n
    rng = np.random.default_rng([s.random_seed, plan.iteration])
    subset = np.arange(n)
    if s.fast_subsets:
        size = fast_subset_size(plan.iteration, n, s.n_classes)
        if size < n:
            subset = np.sort(rng.permutation(n)[:size])
    if allowed is None and plan.assignments == "random":
        allowed = rng.integers(0, s.n_classes, size=n)
    return subset, allowed


def estep_references(ctx, model, plan):
    """The class references of an iteration's E-step (on the device): the class maps,
    or with ``plan.references == "shared-consensus"`` the maps that share the consensus
    where the classes do not differ (:mod:`.focus`); with ``plan.auto_mask_sigma``
    multiplied by a mask around the density of their class-prior-weighted mean
    (:func:`.masks.auto_solvent_mask`).

    Why the mask: the density fills ~5 % of the box, a particle mask ~35 %; the rest of
    the references is reconstruction noise that the projections add to every score.
    Measured (docs/benchmarks.md, "automatic mask"; with the joint consensus): 600
    particles at SNR 0.05, ARI 0.779 -> 0.839 and 0.846 -> 0.921 (two seeds).  Only the
    E-step's references: masking the PCA split's eigenvolumes too kept a spurious split
    of one class alive with K=4."""
    s, xp, box, apix = ctx.settings, ctx.xp, ctx.data.box, ctx.data.apix
    refs = xp.asarray(model.refs)
    inside = soft_sphere_mask(box, mask_diameter_angst(s, box, apix) / (2.0 * apix), 3.0, xp)
    if plan.references == "shared-consensus":
        from .focus import shared_consensus_references
        consensus = (None if model.consensus_ref is None or not s.joint_consensus
                     else xp.asarray(model.consensus_ref))
        refs, _ = shared_consensus_references(refs, xp.asarray(model.pdf_class), apix,
                                              s.class_difference_highres, inside,
                                              consensus=consensus)
    if plan.auto_mask_sigma > 0:
        w = np.maximum(model.pdf_class, 0.0)
        w = xp.asarray(w / max(float(w.sum()), 1e-300))
        mean = xp.tensordot(w, refs.astype(xp.float64), axes=1)
        mask = auto_solvent_mask(mean, apix, inside, plan.auto_mask_sigma)
        refs = (refs * mask[None]).astype(refs.dtype)
    if s.strict_lowres_exp > 0:
        refs = _without_low_shells(refs, box, apix, s.strict_lowres_exp)
    return refs


def _without_low_shells(refs, box, apix, lowres_angst):
    """``--strict_lowres_exp``: the references' Fourier shells below ``lowres_angst``
    set to zero (RELION's ``min_ires``), so those frequencies of the images score the
    same against every pose and class and drop out of the posteriors."""
    xp = get_xp(refs)
    low = xp.rint(radial_index(refs.shape[1:], xp)) < int(round(box * apix / lowres_angst))
    out = xp.empty_like(refs)
    for k in range(refs.shape[0]):
        f = fft_centered(refs[k])
        f[low] = 0
        out[k] = ifft_centered(f).real.astype(refs.dtype)
    return out


def _projectors(ctx, model, plan, active):
    """Each class's :class:`.projector.Projector` of its E-step reference at the current
    size, for the classes the iteration projects (the fixed-pose pass all of them, a
    search those it scores); None for the others."""
    s = ctx.settings
    refs = estep_references(ctx, model, plan)
    grid_shell = current_grid_shell(model.current_shell, ctx.data.box)
    projected = set(range(s.n_classes)) if plan.fixed_poses else set(np.asarray(active).tolist())
    return [Projector(refs[k], pad=s.pad, gridding=s.gridding, max_shell=grid_shell)
            if k in projected else None for k in range(s.n_classes)]


def translation_grid(ctx, plan):
    """The plan's coarse offsets: the run's grid, or the range and step the plan sets
    (finer in local searches on a finer grid, :func:`.plan.local_offsets`; coarser where
    ``--allow_coarser_sampling`` chose)."""
    run_grid = ctx.translations
    offset_range = plan.offset_range_px or run_grid.offset_range_px
    offset_step = plan.offset_step_px or run_grid.offset_step_px
    if (offset_range, offset_step) == (run_grid.offset_range_px, run_grid.offset_step_px):
        return run_grid
    return TranslationGrid(offset_range, offset_step)


def _coarser_plan(ctx, model, plan, projectors, subset, active, pixels):
    """``--allow_coarser_sampling``: the plan on the sampling its expected accuracy
    allows (:mod:`.coarser_sampling`), from up to ``N_TRIALS`` of the iteration's
    particles (the same on every rank: rank 0's decision is broadcast)."""
    s, data = ctx.settings, ctx.data
    decision = None
    if ctx.comm.rank == 0:
        accuracy = None
        if not plan.use_cc:
            rng = np.random.default_rng([s.random_seed, plan.iteration, 17])
            trials = np.sort(rng.choice(subset, size=min(coarser_sampling.N_TRIALS,
                                                          len(subset)), replace=False))
            ctf, inv_sigma2 = ctf_and_inverse_noise(s, model, data, trials, pixels, ctx.xp)
            acc_rot, acc_trans, _ = coarser_sampling.run_accuracy(
                projectors, active, model.pdf_class, ctf, inv_sigma2, pixels.ky, pixels.kx,
                data.box, rng)
            accuracy = (acc_rot, acc_trans)
        decision = coarser_sampling.adjust_plan(
            s, plan, accuracy, mask_diameter_angst(s, data.box, data.apix),
            model.current_resolution_angst())
        ctx.log(decision[1])
    plan, _ = ctx.comm.bcast(decision)
    return plan


def _search_setup(ctx, model, plan, pixels, active, projectors):
    """The :class:`.search.SearchSetup` of the iteration (coarse slices of the
    ``projectors``, priors, correction pixels)."""
    s, xp, box, apix = ctx.settings, ctx.xp, ctx.data.box, ctx.data.apix
    grid = ctx.grid(plan.healpix_order)
    # A local search on a finer grid keeps the coarse size of the run's own grid: its
    # coarse pass only has to find where the posterior lies inside the ball, and its
    # cost (per-particle projections) grows with the pixels.
    step = max(grid.angular_step_deg,
               ctx.grid(s.healpix_order).angular_step_deg if plan.local else 0.0)
    n_coarse = pixels.count(min(model.current_shell, coarse_shell(s, box, apix, step)))
    ky, kx = pixels.ky, pixels.kx
    if plan.search == "global":
        mats = xp.asarray(grid.matrices)
        coarse = xp.concatenate([projectors[k].project(mats, ky[:n_coarse], kx[:n_coarse])
                                 for k in active], axis=0)
    else:       # no search, or each particle's own rotations: no shared coarse slices
        coarse = xp.zeros((1, 1), dtype=xp.complex64)
    norm_pixels, scale_pixels = correction_pixels(
        model, to_numpy(pixels.pixel_shell[:pixels.n_cur]), model.current_shell,
        _does_norm(s, plan), _does_scale(s, plan))
    return search.SearchSetup(
        box=box, n_coarse=n_coarse, ky=ky, kx=kx, pixel_shell=pixels.pixel_shell[:pixels.n_cur],
        n_classes=s.n_classes, orientations=grid, translations=translation_grid(ctx, plan),
        oversampling=s.oversampling, coarse_pair=estep.as_real_pair(coarse),
        coarse_power=(coarse.real ** 2 + coarse.imag ** 2), projectors=projectors,
        log_class_prior=xp.asarray(np.log(np.maximum(model.pdf_class, 1e-30)),
                                   dtype=xp.float32),
        sigma_offset_px=model.sigma_offset_angst / apix,
        adaptive_fraction=s.adaptive_fraction, max_significant=s.max_significant,
        use_cc=plan.use_cc, coarse_classes=None if plan.fixed_poses else active,
        sigma_ang=local_search.angle_prior(s, plan.sigma_ang) if plan.local else 0.0,
        norm_pixels=None if norm_pixels is None else xp.asarray(norm_pixels),
        scale_pixels=None if scale_pixels is None else xp.asarray(scale_pixels))


def _does_norm(settings, plan):
    """``--norm`` sums (not in a ``--firstiter_cc`` iteration, whose scores are
    cross-correlations: RELION does not update the corrections there either)."""
    return settings.norm and not plan.use_cc


def _does_scale(settings, plan):
    return settings.scale and not plan.use_cc


def prepare(ctx, model, plan, allowed, timer):
    """Set up one iteration (an :class:`IterationWork`)."""
    s, data = ctx.settings, ctx.data
    subset, allowed = _particles_and_seeds(ctx, plan, allowed)
    pixels = Pixels.within(data.box, model.current_shell, ctx.xp)
    n_class_pixels = None
    if plan.class_highres_angst > 0:
        n_class_pixels = int(to_numpy((pixels.pixel_shell[:pixels.n_cur] <= class_shell(
            data.box, data.apix, plan.class_highres_angst)).sum()))
    active = searched_classes(model, allowed, subset, s.n_classes)
    projectors = _projectors(ctx, model, plan, active)
    if s.allow_coarser_sampling and s.n_classes > 1 and not plan.fixed_poses:
        plan = _coarser_plan(ctx, model, plan, projectors, subset, active, pixels)
    radius = prune_radius(s, model, plan, ctx.grid(plan.healpix_order).angular_step_deg)
    setup = _search_setup(ctx, model, plan, pixels, active, projectors)
    timer.lap("setup")
    return IterationWork(
        plan=plan, subset=subset, allowed=allowed, pixels=pixels, setup=setup,
        acc=Accumulators(s.n_classes, len(data.group_names), data.box, s.pad, ctx.xp,
                         max_shell=current_grid_shell(model.current_shell, data.box)),
        n_class_pixels=n_class_pixels, timer=timer, prune_radius_deg=radius)


# ----------------------------------------------------------------------------- E-step

def _block(ctx, model, work, b0, b1):
    """Rows ``b0:b1`` of the subset as a :class:`.search.BlockData`; the power beyond
    the current radius goes into the noise (and ``--norm``) sums unless it was added
    when the block was first prepared (``power=False``)."""
    idx = work.subset[b0:b1]
    block, pw_beyond, cnt_beyond = prepare_block(ctx.settings, model, ctx.data, idx,
                                                 work.pixels, ctx.xp)
    if work.allowed is not None:
        block.allowed_class = work.allowed[idx]
    if work.plan.local:
        block.prior_views = local_search.prior_views(model.part_eulers[idx], ctx.sym_mats)
    return block, pw_beyond, cnt_beyond


def _first_read(ctx, model, work, results, b0, b1):
    """A block's first preparation in an iteration: it also adds the power beyond the
    current radius to the noise sums (and the ``--norm`` sums)."""
    block, pw_beyond, cnt_beyond = _block(ctx, model, work, b0, b1)
    work.acc.add_power_beyond(ctx.data.groups[work.subset[b0:b1]], pw_beyond, cnt_beyond)
    if results.norm_resid is not None:
        results.norm_resid[b0:b1] += norm_power_beyond(pw_beyond)
    work.timer.lap("prepare")
    return block


def _fixed_pose_expectation(ctx, model, work, results, blocks, progress):
    """Classification at the particles' current poses (no search); returns
    ``results`` with this rank's rows filled."""
    for b0, b1 in blocks:
        block = _first_read(ctx, model, work, results, b0, b1)
        search.fixed_pose_pass(work.setup, block, model.part_eulers[work.subset[b0:b1]],
                               work.acc, ctx.xp, results, b0,
                               n_class_pixels=work.n_class_pixels)
        work.timer.lap("fixed-pose")
        progress.update(2 * (b1 - b0))
    return results


def _coarse_expectation(ctx, model, work, results, blocks, progress, cache_ok):
    """Pass 1: the coarse search of every block (global, or local around each
    particle's pose); returns the significant samples per block (small) and the
    prepared blocks kept for pass 2 (when ``cache_ok``)."""
    plan, setup, xp = work.plan, work.setup, ctx.xp
    significant, cache = {}, {}
    for b0, b1 in blocks:
        block = _first_read(ctx, model, work, results, b0, b1)
        if plan.local:
            cand_ids, cand_logp = local_search.candidate_rotations(
                setup.orientations, block.prior_views, setup.sigma_ang)
            sig_t, sig_kr, n_sig = local_search.local_coarse_pass(
                setup, block, cand_ids, cand_logp, xp, search.fine_batch_bytes(xp))
        elif work.prune_radius_deg > 0:
            sig_t, sig_kr, n_sig = _pruned_coarse_pass(ctx, model, work, block, b0, b1)
        else:
            sig_t, sig_kr, n_sig = search.coarse_pass(setup, block, xp)
        results.nsig[b0:b1] = n_sig
        significant[b0] = (sig_t, sig_kr)
        if cache_ok:
            cache[b0] = block
        progress.update(b1 - b0)
        work.timer.lap("coarse")
    return significant, cache


def _pruned_coarse_pass(ctx, model, work, block, b0, b1):
    """The coarse pass of a pruned global search: the particles whose posterior was
    concentrated in the last iteration (:func:`concentrated`) score the rotations within
    ``work.prune_radius_deg`` of their pose, the others the whole grid.  Returns
    ``(sig_t, sig_kr, n_sig)`` in the block's order, as :func:`.search.coarse_pass`."""
    setup, xp = work.setup, ctx.xp
    idx = work.subset[b0:b1]
    near = concentrated(model, idx, setup.orientations.angular_step_deg)
    sig_t, sig_kr = [None] * len(idx), [None] * len(idx)
    n_sig = np.zeros(len(idx), dtype=np.int64)
    for sel, pruned in ((np.nonzero(near)[0], True), (np.nonzero(~near)[0], False)):
        if not sel.size:
            continue
        part = search.sub_block(block, sel)
        if pruned:
            cand = local_search.rotations_within(setup.orientations, model.part_eulers[idx[sel]],
                                                 ctx.sym_mats, work.prune_radius_deg)
            out = local_search.local_coarse_pass(setup, part, cand,
                                                 [np.zeros(c.shape[0]) for c in cand], xp,
                                                 search.fine_batch_bytes(xp))
        else:
            out = search.coarse_pass(setup, part, xp)
        for j, b in enumerate(sel):
            sig_t[b], sig_kr[b] = out[0][j], out[1][j]
        n_sig[sel] = out[2]
    setup.counts.pruned_particles += int(near.sum())
    return sig_t, sig_kr, n_sig


def concentrated(model, idx, step_deg):
    """Particles ``idx`` whose last posterior was concentrated: its maximum at least
    PRUNE_MIN_PMAX and its posterior-weighted angular distance from the best rotation
    (rlnAccuracyRotations' per-particle term) within PRUNE_SPREAD_STEPS coarse steps."""
    return ((model.part_pmax[idx] >= PRUNE_MIN_PMAX)
            & (model.part_acc_rot[idx] <= PRUNE_SPREAD_STEPS * step_deg))


def fine_chunks(blocks, significant, rows_budget, n_child):
    """Consecutive blocks grouped so that the fine projections of the union of their
    significant coarse rotations (``n_child`` each) fit ``rows_budget`` rows (a block
    that alone exceeds it forms its own chunk).  Yields ``(blocks, rotation set)``."""
    chunk, chunk_kr = [], set()
    for b0, b1 in blocks:
        new_kr = set(np.unique(np.concatenate(significant[b0][1])).tolist())
        merged = chunk_kr | new_kr
        if chunk and len(merged) * n_child > rows_budget:
            yield chunk, chunk_kr
            chunk, merged = [], new_kr
        chunk.append((b0, b1))
        chunk_kr = merged
    if chunk:
        yield chunk, chunk_kr


def _fine_expectation(ctx, model, work, results, blocks, significant, cache, progress):
    """Pass 2: the fine search, in chunks of blocks whose rotations fit
    ``--fine_table_bytes`` (:class:`.search.FineTables` per chunk)."""
    s, setup, xp, timer = ctx.settings, work.setup, ctx.xp, work.timer
    rows_budget = max(1, int(s.fine_table_bytes
                             // (int(setup.ky.shape[0]) * search.FineTables.BYTES_PER_VALUE)))
    for chunk, chunk_kr in fine_chunks(blocks, significant, rows_budget, 8 ** s.oversampling):
        tables = search.FineTables(setup, np.fromiter(chunk_kr, dtype=np.int64), xp)
        timer.lap("fine-tables")
        for c0, c1 in chunk:
            block = cache.pop(c0, None)
            if block is None:
                block, _, _ = _block(ctx, model, work, c0, c1)
                timer.lap("prepare")
            sig_t, sig_kr = significant.pop(c0)
            search.fine_pass(setup, block, sig_t, sig_kr, tables, work.acc, xp, results, c0)
            progress.update(c1 - c0)
            timer.lap("fine")
        tables.insert_into(work.acc.backprojectors)
        timer.lap("insert")
        del tables


def _search_expectation(ctx, model, work, results, blocks, progress):
    """The coarse then fine search (global, or local around each particle's pose);
    returns ``results`` with this rank's rows filled."""
    n_mine = sum(b1 - b0 for b0, b1 in blocks)
    cache_ok = n_mine * int(work.setup.ky.shape[0]) * 16 <= ctx.settings.cache_bytes
    significant, cache = _coarse_expectation(ctx, model, work, results, blocks, progress,
                                             cache_ok)
    _fine_expectation(ctx, model, work, results, blocks, significant, cache, progress)
    return results


def expectation(ctx, model, work):
    """This rank's E-step: fixed poses, or the coarse then fine search.  The M-step sums
    go to ``work.acc``; returns the per-particle :class:`.particles.ParticleResults`
    (this rank's rows filled, zeros elsewhere)."""
    s, comm, plan = ctx.settings, ctx.comm, work.plan
    lo, hi = split_range(len(work.subset), comm.rank, comm.size)
    blocks = [(b0, min(hi, b0 + s.block_size)) for b0 in range(lo, hi, s.block_size)]
    progress = Progress(2 * (hi - lo), plan.iteration, s.n_iter,
                        enabled=comm.rank == 0 and s.verb > 0)
    results = ParticleResults.zeros(len(work.subset), _does_norm(s, plan), _does_scale(s, plan))
    path = _fixed_pose_expectation if plan.fixed_poses else _search_expectation
    results = path(ctx, model, work, results, blocks, progress)
    progress.close()
    work.timer.lap("fine")
    return results


# ----------------------------------------------------------------------------- M-step

def reduce(ctx, work, results):
    """The M-step sums and the particle results of all ranks."""
    work.acc.reduce(ctx.comm)
    work.setup.counts = work.setup.counts.summed_over_ranks(ctx.comm)
    return results.summed_over_ranks(ctx.comm)


def maximisation(ctx, model, work, results):
    """New maps and spectra (:func:`.mstep.maximise`), particle states, corrections and
    the next image size."""
    s, xp, plan = ctx.settings, ctx.xp, work.plan
    maximise(work.acc, model, MStepSettings.of(s, plan),
             solvent_mask=None if ctx.solvent_mask is None else xp.asarray(ctx.solvent_mask),
             symmetrise=ctx.symmetrise, unregularised=plan.use_cc,
             consensus=plan.joint_consensus, blush=ctx.blush)
    update_particles(model, work.subset, results)
    if results.norm_resid is not None:
        update_norm_corrections(model, work.subset, results.norm_resid)
    if results.scale_xa is not None:
        groups = ctx.data.groups[work.subset]
        update_scale_corrections(model, groups, results.scale_xa, results.scale_aa,
                                 ctx.data.group_counts)
    update_image_size(s, model)
    work.timer.lap("M-step")


def update_particles(model, subset, results):
    """The particles' new classes, poses and accuracies, and the mean changes."""
    old_mats = euler_to_matrix(*model.part_eulers[subset].T)
    new_mats = euler_to_matrix(*results.eulers.T)
    new_class = results.class_index.astype(np.int64)
    new_origin = results.origin_px * model.apix
    model.changes = {
        "orientations": float(np.mean(angular_distance_deg(old_mats, new_mats))),
        "offsets": float(np.mean(np.linalg.norm(new_origin - model.part_origin_angst[subset],
                                                axis=1))),
        "classes": float(np.mean(new_class != model.part_class[subset])),
    }
    model.part_class[subset] = new_class
    model.part_eulers[subset] = results.eulers
    model.part_origin_angst[subset] = new_origin
    model.part_pmax[subset] = results.pmax
    model.part_nsig[subset] = results.nsig.astype(np.int64)
    model.part_loglik[subset] = results.loglik
    model.part_acc_rot[subset] = results.acc_rot
    model.part_acc_trans_px[subset] = results.acc_trans_px


def update_image_size(settings, model):
    """Next E-step radius: best class resolution + ``incr_size`` shells (RELION), never
    shrinking, capped by ``--strict_highres_exp`` and Nyquist."""
    s = settings
    alive = model.pdf_class > 0.001
    best = int(model.class_resolution_shell[alive].max()) if alive.any() else 1
    new = min(max(model.current_shell, best + s.incr_size), model.box // 2 - 1)
    if s.strict_highres_exp > 0:
        new = min(new, int(np.ceil(model.box * model.apix / s.strict_highres_exp)))
    model.current_shell = int(new)


# ----------------------------------------------------------------------------- the whole

def finish(ctx, model, work, started):
    """Record the iteration in the state; rank 0 writes its outputs (``plan.write``) and
    logs it."""
    plan, timer, s = work.plan, work.timer, ctx.settings
    model.iteration = plan.iteration
    model.log_likelihood = float(model.part_loglik.sum())
    elapsed = time.time() - started
    model.history.append({"iteration": plan.iteration, "seconds": elapsed,
                          "stage_seconds": dict(timer.seconds),
                          "scores": work.setup.counts.as_dict()})
    _check_finite_maps(model, plan.iteration)
    if ctx.comm.rank == 0 and plan.write:
        write_iteration(s.output_root, plan.iteration, model, ctx.table, s,
                        ctx.grid(plan.healpix_order), translation_grid(ctx, plan),
                        ctx.data.group_names, ctx.data.group_counts)
        timer.lap("output")
        ctx.log(log_line(model, plan.iteration, elapsed, len(work.subset)))
        ctx.log(f"          stage seconds: {timer.summary()}")
        pruned = (f"  (pruned: {work.setup.counts.pruned_particles} particles searched "
                  f"within {work.prune_radius_deg:.1f} deg of their pose)"
                  if work.prune_radius_deg > 0 else "")
        ctx.log(f"          scores: {work.setup.counts.summary()}{pruned}")
        ctx.log(eta_line(model.history, plan.iteration, s.n_iter))


def _check_finite_maps(model, iteration):
    """A non-finite class map is never written: the inputs were checked, so it means a
    numerical failure, which must stop the run rather than give NaN maps with exit 0."""
    bad = [k + 1 for k in range(model.n_classes) if not np.isfinite(model.refs[k]).all()]
    if bad:
        raise CryoClassError(
            f"iteration {iteration}: the map of class(es) {bad} became non-finite (NaN/Inf); "
            "nothing of this iteration was written: continue from the previous iteration "
            "with a larger --tau2_fudge or a lower --strict_highres_exp, and report it")


def run_iteration(ctx, model, plan, allowed=None):
    """One EM iteration of ``plan`` (an :class:`.plan.IterationPlan`); ``allowed`` (n,)
    restricts each particle to one class.  Returns the updated ``model``."""
    started = time.time()
    work = prepare(ctx, model, plan, allowed, StageTimer(ctx.xp))
    results = reduce(ctx, work, expectation(ctx, model, work))
    maximisation(ctx, model, work, results)
    finish(ctx, model, work, started)
    return model


def log_line(model, iteration, seconds, n_used):
    dist = " ".join(f"{p:.3f}" for p in model.pdf_class)
    res = " ".join(f"{r:.1f}" for r in model.class_resolution_angst())
    return (f"iter {iteration:3d}  {seconds:7.1f} s  particles {n_used}  "
            f"E-step res {model.current_resolution_angst():.1f} A  class res [{res}] A  "
            f"dist [{dist}]  changes: classes {model.changes['classes']:.3f} "
            f"orient {model.changes['orientations']:.2f} deg "
            f"offsets {model.changes['offsets']:.2f} A  pmax {np.mean(model.part_pmax):.3f}")


def eta_line(history, iteration, n_iter, now=None):
    """Progress with an estimated end: wall seconds of this process's iterations so far
    (``history``), their mean, the iterations left to ``n_iter`` and the local time at
    which they end at that mean."""
    now = time.time() if now is None else now
    spent = sum(h["seconds"] for h in history)
    mean = spent / max(len(history), 1)
    left = max(int(n_iter) - int(iteration), 0)
    end = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now + left * mean))
    return (f"eta       iteration {iteration}/{n_iter}  elapsed {_hms(spent)}  "
            f"{mean:.1f} s/iteration (mean of {len(history)})  {left} left  "
            f"end {end} (in {_hms(left * mean)})")


def _hms(seconds):
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StageTimer:
    """Wall seconds per stage of one iteration (prepare, coarse, fine, M-step, output).

    On a GPU the device is synchronised at each stage boundary (a few times per block,
    negligible) so that asynchronous kernels are charged to the stage that launched them.
    """

    def __init__(self, xp):
        self.xp = xp
        self.seconds = {}
        self._t = time.perf_counter()

    def lap(self, stage):
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now

    def summary(self):
        return " ".join(f"{k} {v:.2f}" for k, v in self.seconds.items())


class Progress:
    """A progress bar with ETA on stderr (rank 0), quiet when not a terminal."""

    def __init__(self, total, iteration, n_iter, enabled=True):
        self.bar = None
        if enabled and total > 0:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=f"iter {iteration}/{n_iter}", unit="ptcl",
                                leave=False, file=sys.stderr, disable=not sys.stderr.isatty()
                                and not os.environ.get("CRYOCLASS_PROGRESS"))
            except ImportError:
                self.bar = None

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
