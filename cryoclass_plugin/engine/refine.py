"""The classification run: set-up, start or continue, and the loop over iterations.

Each iteration follows its :class:`.plan.IterationPlan` (:func:`.plan.plan_iteration`):
the decisions taken before it (a longer consensus, the split into classes, the held-out
merge test) and then the EM iteration itself (:func:`.iteration.run_iteration`).
"""
import copy
import dataclasses
import functools
import os
import time

import numpy as np

from . import iteration as iteration_mod
from . import memory
from .backend import reserve_gpu_memory, select_backend, to_numpy
from .blush_step import BlushStep
from .ctf import ctf_params, optics_terms
from .errors import CryoClassError
from .fourier import fft_centered, half_plane_pixels, low_pass, set_fft_workers
from .masks import flatten_solvent, soft_sphere_mask
from .model import ModelState
from .mpi import SharedError, get_comm, split_range
from .run_guard import available_memory, dropped_particles_path
from .mrc_io import ImageSource, read_map
from .mstep import power_spectrum_half
from .workers import set_workers
from .options import Settings, resolve_automatic  # noqa: F401  (Settings re-exported)
from .outputs import write_iteration
from .particles import ParticleData, Pixels, group_index, image_mask, mask_diameter_angst
from .merge import SCORE_CAP
from .references import check_references, read_references, several_references
from .plan import (ScheduleState, after_fixed_check, after_merge, after_retest, class_shell,
                   describe_schedule, extend_consensus, local_sigma, plan_iteration)
from .sampling import OrientationGrid, TranslationGrid
from .search import FineTables
from .star_io import read_particles, write_star
from .validation import (bad_image_rows, check_class_count, check_mask_values,
                         duplicate_warning)


# ----------------------------------------------------------------------------- set-up

def _initial_noise(settings, data, df, comm):
    """Noise spectra (G, n_shells): mean image power per shell and group (a slight
    over-estimate: it includes the signal), from up to 1000 particles of this rank's
    share, and the particles' starting norm corrections."""
    box, n = data.box, data.n
    n_shells, n_groups = box // 2 + 1, len(data.group_names)
    lo, hi = split_range(n, comm.rank, comm.size)
    sample = np.arange(lo, hi)[: max(1, 1000 // comm.size)]
    ky, kx = half_plane_pixels(box, box // 2)
    shells = np.rint(np.sqrt(kx ** 2 + ky ** 2)).astype(int)
    power_sum = np.zeros((n_groups, n_shells))
    count = np.zeros((n_groups, n_shells))
    mask2d = image_mask(settings, box, data.apix, np)
    part_norm, avg_norm = _initial_norm(settings, df)
    for s in range(0, len(sample), 256):
        idx = sample[s:s + 256]
        imgs = data.images.get(idx) * mask2d if mask2d is not None else data.images.get(idx)
        if settings.norm:
            imgs = imgs * (avg_norm / part_norm[idx])[:, None, None]
        f = fft_centered(imgs.astype(np.float64), axes=(1, 2))[:, ky + box // 2, kx + box // 2]
        p = f.real ** 2 + f.imag ** 2
        for j, i in enumerate(idx):
            g = data.groups[i]
            power_sum[g] += np.bincount(shells, weights=p[j], minlength=n_shells)[:n_shells]
            count[g] += np.bincount(shells, minlength=n_shells)[:n_shells]
    power_sum = to_numpy(comm.allreduce_sum(power_sum))
    count = to_numpy(comm.allreduce_sum(count))
    overall = power_sum.sum(0) / np.maximum(count.sum(0), 1)
    sigma2 = np.where(count > 0, power_sum / np.maximum(count, 1), overall[None]) / 2.0
    return np.maximum(sigma2, 1e-30), part_norm, avg_norm


def _initial_model(settings, table, data, refs, comm):
    """The state before iteration 1: the K (low-passed) starting maps ``refs`` (K, box,
    box, box; one map repeated, or one per class from a ``--ref`` list), each class's
    signal spectrum from its own unfiltered map, the noise spectra, the input poses."""
    box, apix, n, K = data.box, data.apix, data.n, settings.n_classes
    n_shells = box // 2 + 1
    sigma2, part_norm, avg_norm = _initial_noise(settings, data, table.df, comm)
    # Signal prior from the unfiltered references; the E-step references are low-passed.
    tau2 = np.stack([power_spectrum_half(ref) for ref in refs])
    mask = _solvent_mask(settings, box, apix) if settings.flatten_solvent else None
    start = []
    for ref in refs:
        vol = low_pass(ref, apix, settings.ini_high) if settings.ini_high > 0 else ref.copy()
        start.append(flatten_solvent(vol, mask, settings.solvent_mask2) if mask is not None
                     else vol)
    refs = np.stack(start).astype(np.float32)
    shell = int(round(box * apix / settings.ini_high)) if settings.ini_high > 0 else box // 2 - 1
    current = min(shell + settings.incr_size, box // 2 - 1)
    if settings.strict_highres_exp > 0:
        current = min(current, int(np.ceil(box * apix / settings.strict_highres_exp)))
    sigma_off = settings.offset_range * apix / 3.0
    model = ModelState(box=box, apix=apix, n_classes=K, n_groups=len(data.group_names),
                       refs=refs, pdf_class=np.full(K, 1.0 / K), sigma2=sigma2,
                       tau2=tau2,
                       ssnr=np.zeros((K, n_shells)), class_resolution_shell=np.zeros(K, int),
                       sigma_offset_angst=max(sigma_off, 1.0), current_shell=int(current),
                       schedule=ScheduleState.initial(settings))
    df = table.df
    model.part_class = np.zeros(n, dtype=np.int64)
    if "rlnClassNumber" in df.columns and settings.skip_align:
        model.part_class = np.clip(df["rlnClassNumber"].to_numpy(int) - 1, 0, K - 1)
    model.part_eulers = np.stack([df[c].to_numpy(np.float64) if c in df.columns else np.zeros(n)
                                  for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)
    model.part_origin_angst = np.stack([df["rlnOriginXAngst"].to_numpy(np.float64),
                                        df["rlnOriginYAngst"].to_numpy(np.float64)], axis=1)
    for name in ("part_pmax", "part_loglik", "part_acc_rot", "part_acc_trans_px"):
        setattr(model, name, np.zeros(n))
    model.part_nsig = np.zeros(n, dtype=np.int64)
    model.part_norm = part_norm
    model.avg_norm = avg_norm
    model.scale_correction = np.ones(len(data.group_names))
    return model


def _initial_norm(settings, df):
    """Per-particle norm corrections and their mean at the start: with ``--norm`` the
    input's ``rlnNormCorrection`` where present (missing, non-positive or non-finite
    values: 1), else 1."""
    n = len(df)
    part_norm = np.ones(n)
    if settings.norm and "rlnNormCorrection" in df.columns:
        import pandas as pd
        given = pd.to_numeric(df["rlnNormCorrection"], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(given) & (given > 0)
        part_norm[ok] = given[ok]
    return part_norm, float(part_norm.mean()) if n else 1.0


def _solvent_mask(settings, box, apix):
    if settings.solvent_mask:
        mask, _ = read_map(settings.solvent_mask)
        check_mask_values(mask, settings.solvent_mask)
        if mask.shape != (box, box, box):
            raise CryoClassError(f"{settings.solvent_mask}: mask box {mask.shape[0]} differs "
                                 f"from the particles' {box}; resample the mask (--solvent_mask)")
        return np.clip(mask, 0, 1).astype(np.float32)
    diameter = mask_diameter_angst(settings, box, apix)
    return soft_sphere_mask(box, diameter / (2 * apix), 5.0).astype(np.float32)


def _ranks_per_node(comm):
    """Ranks of this job on this machine (Open MPI / MPICH / Slurm), else all of them."""
    for key in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return comm.size


def continue_state_path(optimiser_path):
    """The exact-state file of a ``--continue <root>_itNNN_optimiser.star`` (checked)."""
    path = optimiser_path
    if not os.path.exists(path):
        raise CryoClassError(f"--continue {path}: file not found; give an existing "
                             "<root>_itNNN_optimiser.star")
    if not path.endswith("_optimiser.star"):
        raise CryoClassError(f"--continue {path}: expected a <root>_itNNN_optimiser.star "
                             "file written by cryoclass refine")
    state = path[: -len("_optimiser.star")] + "_state.npz"
    if not os.path.exists(state):
        raise CryoClassError(f"--continue {path}: its state file {os.path.basename(state)} "
                             "is missing; continue from an earlier complete iteration")
    return state


class Refinement:
    """A classification run: ``Refinement(settings).run()``."""

    def __init__(self, settings, log=print):
        """Reads the STAR table and checks the settings against it; the images are
        opened (their stacks checked, read or copied with ``--preread_images`` /
        ``--scratch_dir``) when the run first needs them (:attr:`ctx`), so that
        :meth:`describe_plan` reads nothing more."""
        settings = resolve_automatic(settings)
        self.s = settings
        self.log = log
        self.comm = get_comm()
        self.xp, self.device = select_backend(settings.gpu is not None, settings.gpu or "",
                                              self.comm.rank)
        if settings.free_gpu_memory > 0:
            if self.device is None:
                raise CryoClassError(f"--free_gpu_memory {settings.free_gpu_memory:g}: "
                                     "applies to GPU runs only; add --gpu or drop it")
            reserve_gpu_memory(self.xp, settings.free_gpu_memory)
        self._limit_threads()
        set_fft_workers(settings.threads)
        set_workers(settings.threads)
        self.table = read_particles(settings.input_star, require_ctf=settings.ctf)
        self._dropped = None
        if settings.drop_bad_particles:
            self.table = self._drop_bad_particles(self.table)
        self.box, self.apix = self.table.box, self.table.apix
        self._validate()
        self._grids = {}
        # (state's iteration, merge.pair_table) of the last fixed-pose check.
        self._pair_table = None

    @functools.cached_property
    def ctx(self):
        """The run's fixed inputs (:class:`.iteration.RunContext`), built on first use."""
        s = self.s
        groups, group_names = group_index(self.table.df)
        data = ParticleData(
            images=ImageSource(self.table, preread=s.preread_images,
                               scratch_dir=s.scratch_dir or None),
            groups=groups, group_names=group_names,
            # Without --ctf RELION still removes the antisymmetric aberration (beam
            # tilt, odd Zernike terms) and refuses what it cannot apply.
            ctfp=(ctf_params(self.table.df) if s.ctf
                  else optics_terms(self.table.df, ctf=False) or None),
            mask2d=image_mask(s, self.box, self.apix, self.xp), box=self.box, apix=self.apix)
        from .symmetry import search_views, symmetrize, symmetry_order
        symmetrise = None if symmetry_order(s.sym) == 1 else \
            (lambda v: self.xp.asarray(symmetrize(to_numpy(v), s.sym)))
        return iteration_mod.RunContext(
            settings=s, data=data, table=self.table, comm=self.comm, xp=self.xp,
            grid=self.grid, translations=TranslationGrid(s.offset_range, s.offset_step),
            solvent_mask=(_solvent_mask(s, self.box, self.apix) if s.flatten_solvent
                          else None),
            symmetrise=symmetrise, sym_mats=search_views(s.sym, s.relax_sym), log=self._log,
            blush=BlushStep(s, self.xp, log=self._log) if s.blush else None)

    @property
    def data(self):
        """The particles' images, CTFs and groups (:class:`.particles.ParticleData`)."""
        return self.ctx.data

    def _limit_threads(self):
        try:
            from threadpoolctl import threadpool_limits
            self._threads = threadpool_limits(limits=max(1, int(self.s.threads)))
        except Exception:
            self._threads = None

    def _validate(self):
        s = self.s
        if s.n_classes < 1:
            raise CryoClassError(f"--K {s.n_classes}: the number of classes must be >= 1")
        if s.particle_diameter > self.box * self.apix:
            raise CryoClassError(
                f"--particle_diameter {s.particle_diameter:g} A is larger than the box "
                f"({self.box} px x {self.apix:g} A = {self.box * self.apix:g} A); give a "
                "smaller mask diameter")
        if not s.continue_from:
            if several_references(s) and s.init_classes in ("consensus", "pca"):
                raise CryoClassError(f"--ref {s.ref}: one map per class with --init_classes "
                                     f"{s.init_classes}, which starts from one consensus "
                                     "map; give --init_classes relion (or input), or one map")
            check_references(s, self.box, self.apix)
        if s.skip_align and not self.table.has_angles:
            raise CryoClassError(f"{s.input_star}: --skip_align needs rlnAngleRot/Tilt/Psi "
                                 "(poses from a refinement); align first or drop --skip_align")
        per_angle = max(s.sigma_rot, s.sigma_tilt, s.sigma_psi) > 0
        if s.sigma_ang > 0 and per_angle:
            raise CryoClassError("--sigma_ang and --sigma_rot/--sigma_tilt/--sigma_psi both "
                                 "set the local searches' prior; give one or the other")
        flag = "--sigma_ang" if s.sigma_ang > 0 else "--sigma_rot/--sigma_tilt/--sigma_psi"
        if local_sigma(s) > 0 and s.init_classes in ("relion", "input") and \
                not self.table.has_angles:
            raise CryoClassError(f"{s.input_star}: {flag} (local angular searches) needs "
                                 "rlnAngleRot/Tilt/Psi from an earlier refinement; give "
                                 f"aligned particles or drop {flag}")
        if s.offset_step <= 0:
            raise CryoClassError(f"--offset_step {s.offset_step:g}: must be > 0 pixels")
        if s.allow_coarser_sampling and (s.n_classes < 2 or s.skip_align):
            raise CryoClassError("--allow_coarser_sampling: changes the sampling of "
                                 "classifications that align (--K 2 or more, without "
                                 "--skip_align), as RELION's; drop it")
        check_class_count(len(self.table), s.n_classes, s.input_star)
        if s.solvent_mask2:
            self._check_solvent_mask2()
        if s.relax_sym:
            self._check_relax_sym()
        if s.solvent_mask and not s.flatten_solvent:
            # Read only with --flatten_solvent (RELION), but a broken mask is refused
            # either way, so that adding the flag later cannot fail then.
            check_mask_values(read_map(s.solvent_mask)[0], s.solvent_mask)

    def _drop_bad_particles(self, table):
        """``--drop_bad_particles``: the table without the particles whose image has a
        non-finite pixel or is constant (rank 0 reads them all once; every rank drops
        the same rows); the dropped rows go to ``<o>_dropped_particles.star``."""
        bad = None
        if self.comm.rank == 0:
            bad = bad_image_rows(ImageSource(table))
        bad = self.comm.bcast(bad)
        self._dropped = (len(table), table.df.iloc[bad])
        keep = np.setdiff1d(np.arange(len(table)), bad)
        return dataclasses.replace(table, df=table.df.iloc[keep].reset_index(drop=True))

    def _report_dropped(self):
        """Log (and list in a STAR file) what :meth:`_drop_bad_particles` left out; at the
        start of the run, once the output folder is checked."""
        if self._dropped is None:
            return
        n_all, dropped = self._dropped
        if not len(dropped):
            self._log("drop_bad_particles: every image is finite and not constant")
            return
        path = dropped_particles_path(self.s.output_root)
        if self.comm.rank == 0:
            write_star(path, {"particles": dropped})
        names = dropped["rlnImageName"].to_numpy()
        self._log(f"drop_bad_particles: {len(dropped)} of {n_all} particles left out "
                  f"(a non-finite pixel or a constant image), listed in {path}: "
                  f"{', '.join(map(str, names[:3]))}{' ...' if len(names) > 3 else ''}")

    def _check_relax_sym(self):
        s = self.s
        from .symmetry import parse_symmetry
        try:
            parse_symmetry(s.relax_sym)
        except (CryoClassError, ValueError) as err:
            raise CryoClassError(f"--relax_sym {s.relax_sym}: {err}") from None
        staged = s.init_classes in ("consensus", "pca") and s.n_classes > 1
        local = local_sigma(s) > 0 or (staged and s.classify_local_sigma > 0)
        if not local or s.skip_align:
            raise CryoClassError(f"--relax_sym {s.relax_sym}: relaxes the symmetry in local "
                                 "angular searches only, and this run has none; add "
                                 "--sigma_ang or drop --relax_sym")

    def _check_solvent_mask2(self):
        s = self.s
        if not s.flatten_solvent:
            raise CryoClassError(f"--solvent_mask2 {s.solvent_mask2}: applied only when the "
                                 "maps are flattened; add --flatten_solvent or drop "
                                 "--solvent_mask2")
        mask = read_map(s.solvent_mask2)[0]
        check_mask_values(mask, s.solvent_mask2)
        box = self.box
        if mask.shape != (box, box, box):
            raise CryoClassError(f"{s.solvent_mask2}: mask box {mask.shape[0]} differs from "
                                 f"the particles' {box}; resample the mask (--solvent_mask2)")
        if float(mask.sum()) <= 0:
            raise CryoClassError(f"{s.solvent_mask2}: the mask is 0 everywhere; give a mask "
                                 "that is 1 in the region to flatten (--solvent_mask2)")

    def _log(self, line):
        """Log on rank 0 only."""
        if self.comm.rank == 0:
            self.log(line)

    def grid(self, order):
        """The orientation grid of a HEALPix order (the run's symmetry), cached."""
        if order not in self._grids:
            self._grids[order] = OrientationGrid(order, sym=self.s.sym)
        return self._grids[order]

    def describe_plan(self):
        """The whole run's schedule, one line per iteration (:func:`.plan.describe_schedule`)."""
        return describe_schedule(self.s)

    # ------------------------------------------------------------------ start / continue
    def start(self):
        s = self.s
        if s.continue_from:
            return self._load_continue()
        refs = read_references(s, self.box, self.apix)
        warning = duplicate_warning(self.table.df["rlnImageName"].to_numpy(), s.input_star)
        if warning:
            self._log(warning)
        model = _initial_model(s, self.table, self.data, refs, self.comm)
        if self.comm.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(s.output_root)), exist_ok=True)
            write_iteration(s.output_root, 0, model, self.table, s, self.grid(s.healpix_order),
                            self.ctx.translations, self.data.group_names,
                            self.data.group_counts)
        return model

    def _load_continue(self):
        path = self.s.continue_from
        try:
            model = ModelState.load(continue_state_path(path))
        except CryoClassError as err:      # every rank reads the same file
            raise SharedError(str(err)) from None
        if model.box != self.box or model.n_classes != self.s.n_classes:
            raise SharedError(f"--continue {path}: the run had box {model.box} and "
                              f"{model.n_classes} classes; use the same --i and --K")
        if model.schedule.consensus_end <= 0:
            model.schedule = ScheduleState(consensus_end=self.s.consensus_iter,
                                           merge_tested=model.schedule.merge_tested,
                                           merge_extra=model.schedule.merge_extra)
        return model

    # ------------------------------------------------------------------ iterations
    def plan(self, model, iteration):
        """The plan of ``iteration`` under the model's schedule."""
        return plan_iteration(self.s, model.schedule, iteration)

    def iterate(self, model, plan, allowed=None):
        """One EM iteration of ``plan``; ``allowed`` (n,) restricts each particle to one
        class (default: as the plan's assignments say)."""
        if allowed is None:
            allowed = self._allowed(model, plan)
        return iteration_mod.run_iteration(self.ctx, model, plan, allowed)

    def run(self):
        """All iterations from the start (or the continued one) to ``--iter``, each as
        its plan says (:mod:`.plan`)."""
        self._report_dropped()
        model = self.start()
        first = model.iteration + 1
        for it in range(first, self.s.n_iter + 1):
            model, plan = self._decide_before(model, it)
            self._log(f"plan {plan.describe()}")
            self._check_memory(model, plan, first=it == first)
            model = self.iterate(model, plan)
        return model

    def _check_memory(self, model, plan, first=False):
        """Before each iteration: the memory its grids and budgets take at its E-step
        radius (:func:`.memory.estimate_memory`) against the free memory (rank 0's
        reading, for every rank on this node); a job that cannot fit stops here in one
        line naming the options that would make it fit.  Logged before the first."""
        s, box = self.s, self.box
        pixels = Pixels.within(box, model.current_shell, np)
        grid = self.grid(plan.healpix_order)
        lo, hi = split_range(len(self.table), self.comm.rank, self.comm.size)
        # The two budgets are caps: count what this iteration can use of them (every
        # fine rotation of every class; the prepared images only if all of them fit).
        fine_rows = s.n_classes * len(grid.matrices) * 8 ** s.oversampling
        cache = (hi - lo) * pixels.n_cur * 16
        est = memory.estimate_memory(
            box, model.current_shell, s.pad, s.n_classes, s.block_size, pixels.n_cur,
            s.threads, n_coarse_rotations=len(grid.matrices) if plan.search == "global" else 0,
            n_coarse_pixels=pixels.n_cur, n_translations=self.ctx.translations.n_offsets,
            fine_table_bytes=min(s.fine_table_bytes,
                                 float(FineTables.BYTES_PER_VALUE) * fine_rows * pixels.n_cur),
            cache_bytes=cache if cache <= s.cache_bytes else 0.0,
            preread_bytes=4.0 * len(self.table) * box * box if s.preread_images else 0.0,
            consensus=plan.joint_consensus)
        free = self.comm.bcast(available_memory() if self.comm.rank == 0 else None)
        if first:
            self._log(memory.startup_report(est, free))
        # Rank 0 holds the largest share (split_range), so its estimate decides for all.
        problem = None
        if self.comm.rank == 0:
            try:
                memory.check_fits(est, free, ranks_per_node=_ranks_per_node(self.comm))
            except CryoClassError as err:
                problem = str(err)
        problem = self.comm.bcast(problem)
        if problem:
            raise SharedError(problem)

    def _decide_before(self, model, iteration):
        """The decisions taken before ``iteration`` (a longer consensus, the split, the
        merge test); returns the model and the iteration's final plan."""
        plan = self.plan(model, iteration)
        if plan.extension_check:
            step = self.grid(self.s.healpix_order).angular_step_deg
            change = model.changes["orientations"]
            model.schedule, extended = extend_consensus(self.s, model.schedule, iteration,
                                                        change, step)
            if extended:
                self._log(f"consensus: the poses moved {change:.1f} deg on average in "
                          f"iteration {iteration - 1} (sampling {step:.1f} deg): one more "
                          "global iteration; the split comes after iteration "
                          f"{model.schedule.consensus_end}")
                plan = self.plan(model, iteration)
        if plan.split == "pca":
            model = self._split_by_pca(model, plan)
        elif plan.split == "restarts":
            model = self._split_by_restarts(model, plan)
        if plan.fixed_check:
            self._check_fixed_phase(model, iteration)
            plan = self.plan(model, iteration)
        if plan.merge_test or plan.merge_retest:
            self._merge_duplicates(model, retest=plan.merge_retest)
            plan = self.plan(model, iteration)
        return model, plan

    def _check_fixed_phase(self, model, iteration):
        """Before a fixed-pose iteration (``--classify_fixed_until_best``): the held-out
        evidence that the classes differ (:func:`.merge.split_score`, at the fixed-pose
        resolution) after the last iteration; the phase ends there when it is no higher
        than the best so far (:func:`.plan.after_fixed_check`).  Reads only the saved
        state, so ``--continue`` repeats it."""
        from .merge import pair_table, split_score
        s = self.s
        results = pair_table(self.ctx, model, s.classify_fixed_highres, seed=s.random_seed)
        # The merge test that follows an ending reading scores the same state the same
        # way (same resolution, seed and classes): it takes these figures.
        self._pair_table = (model.iteration, results)
        score, weakest = split_score(results)
        best = max(model.schedule.fixed_scores) if model.schedule.fixed_scores else None
        model.schedule, ended = after_fixed_check(model.schedule, iteration, score)
        if weakest is None:
            detail = "no pair of classes alive"
        else:
            a, b, ev = weakest
            detail = (f"weakest pair: classes {a + 1} and {b + 1}, recovers "
                      f"{ev['ratio']:.2f} of a random split's cost, assignments reproduced "
                      f"{100 * ev['agree']:.0f} %")
        verdict = ("first reading" if best is None else
                   f"best before {best:.2f}: " + ("the fixed-pose phase ends here" if ended
                                                  else "one more fixed-pose iteration"))
        self._log(f"fixed-pose check after iteration {iteration - 1}: split evidence "
                  f"{score:.2f} (each pair's share of a random split's cost recovered, "
                  f"capped at {SCORE_CAP:g}, summed; {detail}); {verdict}")

    def _allowed(self, model, plan):
        """The class each particle may take under ``plan.assignments`` (None: any;
        RELION's random seeds are drawn by the iteration)."""
        if plan.assignments == "input":
            return self._input_classes()
        if plan.assignments == "one-class":
            return np.zeros(self.data.n, dtype=np.int64)
        if plan.assignments == "current":
            return model.part_class.copy()
        return None

    def _merge_duplicates(self, model, retest=False):
        """The held-out merge test (:mod:`.merge`): merge the pairs of classes it calls
        one structure (``--merge_threshold``, ``--merge_min_agreement``,
        ``--merge_max_agreement``); the dropped
        class is left empty (its map kept, prior 0).  The schedule records the test
        and, after a merge, ``--merge_fixed_iter`` more fixed-pose iterations (while
        two full-EM iterations remain), the first with the merged hard assignments.
        ``retest``: the second test, after full EM (:func:`.plan.merge_retest_iteration`),
        on ``--merge_min_agreement`` alone; its merge only makes the next iteration start
        from the merged classes.
        Returns whether anything was merged.

        Why: with K above the number of structures, EM can cut one structure into two
        classes that both live on, each fed by its own particles (K=4 on three true
        classes at SNR 0.2: ARI 0.86, docs/benchmarks.md, "merge test").  The decision
        reads only the saved state, so ``--continue`` repeats it."""
        from .merge import RETEST_THRESHOLD, SIDE_MAJORITY, duplicate_pairs, moved_side
        s = self.s
        done = model.schedule.retested if retest else model.schedule.merge_tested
        if s.merge_threshold <= 0 or done or s.n_classes < 2:
            return False
        log = self.log if self.comm.rank == 0 else None
        if retest and log is not None:
            log("merge test again, after full EM:")
        # After full EM the likelihood has had its chance to separate subtle states and
        # calls some of them one structure (ribo4 seed 1, K=6: a swung-rich class, ratio
        # 0.08 with 76 % of its assignments reproduced); the second test undoes splits
        # that do not reproduce, and those that recover nothing (ratio < 0).
        threshold = RETEST_THRESHOLD if retest else s.merge_threshold
        # The first test comes before full EM, whose classes may still be mixtures that
        # full EM sorts out: K=2 on a set with a 5 % state starts from two halves of
        # the main state (65 % reproduced, ratio 0.52), which full EM turns into the
        # main and the rare state.  So the minimum agreement waits for the second test.
        min_agreement = s.merge_min_agreement if retest else 0.0
        cached = self._pair_table
        pairs = duplicate_pairs(self.ctx, model, s.classify_fixed_highres, threshold,
                                seed=s.random_seed, log=log, min_agreement=min_agreement,
                                max_agreement=s.merge_max_agreement,
                                side_majority=SIDE_MAJORITY if retest else 0.0,
                                results=(cached[1] if cached and not retest
                                         and cached[0] == model.iteration else None))
        for keep, drop, ev in pairs:
            moved = model.part_class == drop
            model.part_origin_angst[moved] = ev["aligned_origins"]
            model.part_class[moved] = keep
            model.pdf_class[keep] += model.pdf_class[drop]
            model.pdf_class[drop] = 0.0
            own = ev["agree_sides"][moved_side(ev)]
            self._log(f"merge: class {drop + 1} joins class {keep + 1} (one structure by "
                      f"the held-out test: recovers {ev['ratio']:.2f} of a random split's "
                      f"cost, assignments reproduced {100 * ev['agree']:.0f} %, class "
                      f"{drop + 1}'s own {100 * own:.0f} %); class {drop + 1} stays empty")
        # The cuts need the poses and maps of full EM: before it (the first test) the
        # combined state of complex5 (seed 0) sat 1.3 standard deviations from its
        # parent along the right direction, after it 3.3 (docs/benchmarks.md,
        # "Splitting within a class").
        if retest:
            split = s.split_into_empty and self._split_into_empty(model)
            model.schedule = after_retest(model.schedule, merged=bool(pairs) or split)
            return bool(pairs) or split
        model.schedule = after_merge(s, model.schedule, merged=bool(pairs))
        return bool(pairs)

    def _split_into_empty(self, model):
        """After the second merge test, fill each empty class (merged, or under 1 % of
        the particles) with a cut of a live class (along one of its own top three
        heterogeneity eigenvolumes or the difference of two other classes) that the
        held-out test calls two structures (:mod:`.subsplit`);
        the new class starts from the parent's map and signal spectrum, and the
        iterations that follow (``--merge_retest_iter``, the first from these hard
        assignments) reconstruct it.  Returns whether a class was filled.  Reads
        only the saved state, so ``--continue`` repeats it."""
        from .subsplit import candidate_splits, choose_splits, empty_classes
        empty = empty_classes(model)
        if not empty:
            return False
        log = self.log if self.comm.rank == 0 else None
        if log is not None:
            log(f"split within classes: {len(empty)} empty class"
                f"{'es' if len(empty) > 1 else ''} ({', '.join(str(k + 1) for k in empty)})")
        start = time.time()
        chosen = choose_splits(candidate_splits(self.ctx, model, log=log), empty)
        for parent, new, moved, ev in chosen:
            share = model.pdf_class[parent] * len(moved) / np.sum(model.part_class == parent)
            model.part_class[moved] = new
            model.pdf_class[new] = share
            model.pdf_class[parent] -= share
            model.refs[new] = model.refs[parent]
            model.tau2[new] = model.tau2[parent]
            self._log(f"split: {len(moved)} particles of class {parent + 1} start class "
                      f"{new + 1} (two structures by the held-out test: recovers "
                      f"{ev['ratio']:.2f} of a random split's cost, assignments reproduced "
                      f"{100 * ev['agree']:.0f} %)")
        self._log(f"split within classes: {len(chosen)} of {len(empty)} filled "
                  f"({time.time() - start:.0f} s)")
        return bool(chosen)

    def _input_classes(self):
        df = self.table.df
        if "rlnClassNumber" not in df.columns:
            raise CryoClassError(f"{self.s.input_star}: --init_classes input needs "
                                 "rlnClassNumber; use --init_classes relion or consensus")
        cls = df["rlnClassNumber"].to_numpy(int) - 1
        if cls.min() < 0 or cls.max() >= self.s.n_classes:
            raise CryoClassError(f"{self.s.input_star}: rlnClassNumber runs from "
                                 f"{cls.min() + 1} to {cls.max() + 1}, not 1..--K "
                                 f"{self.s.n_classes}; give the matching --K")
        return cls

    def _split_by_pca(self, model, plan):
        """K-means of the particles' coordinates along the top K-1 heterogeneity
        eigenvolumes (:mod:`.heterogeneity`) gives each particle its starting class."""
        from .heterogeneity import kmeans, principal_coordinates
        s = self.s
        coords = principal_coordinates(s, self.data, model, self.comm, self.xp,
                                       max(1, s.n_classes - 1), s.restart_highres,
                                       seed=s.random_seed, log=self.log,
                                       pose_nuisance=s.pca_pose_nuisance)
        labels = kmeans(coords, s.n_classes, seed=s.random_seed)
        best = copy.deepcopy(model)
        best.part_class = labels.astype(np.int64)
        best.pdf_class = np.maximum(np.bincount(labels, minlength=s.n_classes), 1) / len(labels)
        best.tau2[:] = model.tau2[0]
        best.iteration = plan.iteration - 1
        self._log(f"pca start: class sizes {np.bincount(labels, minlength=s.n_classes).tolist()}")
        return best

    def _split_by_restarts(self, model, plan):
        """Best of ``--restarts`` fixed-pose classifications from random partitions.

        The restarts run RELION's soft EM on the aligned particles, with the E-step
        limited to ``--restart_highres``: the classes differ most at low resolution, and
        high frequencies mostly add each particle's own noise to its class.  Random
        partitions of aligned particles break the symmetry between classes far better
        than random partitions of unaligned ones, and the restarts keep an unlucky start
        from deciding the result."""
        from dataclasses import replace
        s = self.s
        iteration = plan.iteration
        best, best_ll = None, -np.inf
        seed_shell = min(model.current_shell, class_shell(self.box, self.apix, s.restart_highres))
        # The restarts' iterations: no search, all frequencies decide the classes, not
        # written; the first from the random partition, the others free.
        first = replace(plan, search="none", class_highres_angst=0.0, write=False)
        later = replace(first, assignments="random" if iteration == 1 else "free")
        for r in range(max(1, s.restarts)):
            trial = copy.deepcopy(model)
            trial.pdf_class = np.full(s.n_classes, 1.0 / s.n_classes)
            trial.tau2[:] = model.tau2[0]      # the consensus map's signal spectrum
            rng = np.random.default_rng([s.random_seed, iteration, r, 7])
            allowed = rng.integers(0, s.n_classes, size=self.data.n)
            for j in range(max(1, s.restart_iter)):
                trial.current_shell = seed_shell
                trial = iteration_mod.run_iteration(self.ctx, trial, first if j == 0 else later,
                                                    allowed if j == 0 else None)
            ll = trial.log_likelihood
            self._log(f"restart {r + 1}/{s.restarts}: log-likelihood {ll:.6g}, class sizes "
                      f"{np.bincount(trial.part_class, minlength=s.n_classes).tolist()}")
            if ll > best_ll:
                best, best_ll = trial, ll
        best.iteration = iteration - 1
        best.current_shell = model.current_shell
        best.tau2 = model.tau2.copy()
        best.tau2[:] = model.tau2[0]
        return best
