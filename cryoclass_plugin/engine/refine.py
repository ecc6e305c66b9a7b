"""The classification run: set-up, the EM iteration loop, continue.

One iteration = for each block of this rank's particles: read images, mask, FFT, CTF,
noise weights (:func:`prepare_block`), coarse and fine search with M-step sums
(:mod:`.search`); then the MPI reduction, the M-step (:mod:`.mstep`), the image size of
the next iteration, and rank 0 writes the outputs (:mod:`.outputs`).
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import estep, local_search, search
from .backend import select_backend, to_numpy
from .ctf import ctf_params, ctf_values
from .errors import CryoClassError
from .fourier import fft_centered, half_plane_pixels, low_pass
from .geometry import angular_distance_deg, euler_to_matrix
from .masks import soft_circle_mask, soft_sphere_mask
from .model import ModelState
from .mpi import get_comm, split_range
from .mrc_io import ImageSource, check_map_matches, read_map
from .mstep import (Accumulators, correction_pixels, maximise, norm_power_beyond,
                    power_spectrum_half, update_norm_corrections, update_scale_corrections)
from .outputs import iteration_root, write_iteration
from .projector import Projector
from .sampling import OrientationGrid, TranslationGrid
from .options import Settings  # noqa: F401  (re-exported: engine.refine.Settings)
from .star_io import read_particles, read_star


#: Default threshold of the automatic reference mask (robust standard deviations of the
#: 15 A low-passed mean map above its solvent median; :func:`.masks.auto_solvent_mask`).
AUTO_MASK_SIGMA = 3.0


# ----------------------------------------------------------------------------- set-up

def _group_index(df):
    """One noise group per micrograph (RELION 3.1), else per optics group."""
    for col in ("rlnGroupName", "rlnMicrographName"):
        if col in df.columns:
            names, idx = np.unique(df[col].astype(str).to_numpy(), return_inverse=True)
            return idx, list(names)
    names, idx = np.unique(df["rlnOpticsGroup"].astype(str).to_numpy(), return_inverse=True)
    return idx, [f"group{n}" for n in names]


def mask_diameter_angst(settings, box, apix):
    """The particle mask's diameter (A): ``--particle_diameter``, or the box."""
    return settings.particle_diameter if settings.particle_diameter > 0 else box * apix


def _coarse_shell(settings, box, apix, angular_step_deg):
    """RELION's coarse size: the resolution at which the coarse angular step moves a
    point at the particle's edge by about one resolution element (safety factor 1.2)."""
    diameter = mask_diameter_angst(settings, box, apix)
    rotated_distance = np.deg2rad(angular_step_deg) * diameter / 2.0
    coarse_res = rotated_distance / 1.2
    return int(np.ceil(box * apix / max(coarse_res, 2 * apix)))


def _initial_model(settings, table, images, ref, apix, groups, n_groups, comm):
    box = table.box
    n = len(table)
    n_shells = box // 2 + 1
    K = settings.n_classes
    # Noise: mean image power per shell and group (a slight over-estimate: it includes
    # the signal), from up to 1000 particles of this rank's share.
    lo, hi = split_range(n, comm.rank, comm.size)
    sample = np.arange(lo, hi)[: max(1, 1000 // comm.size)]
    ky, kx = half_plane_pixels(box, box // 2)
    shells = np.rint(np.sqrt(kx ** 2 + ky ** 2)).astype(int)
    power_sum = np.zeros((n_groups, n_shells))
    count = np.zeros((n_groups, n_shells))
    mask2d = _image_mask(settings, box, apix, np)
    part_norm, avg_norm = _initial_norm(settings, table.df)
    for s in range(0, len(sample), 256):
        idx = sample[s:s + 256]
        imgs = images.get(idx) * mask2d if mask2d is not None else images.get(idx)
        if settings.norm:
            imgs = imgs * (avg_norm / part_norm[idx])[:, None, None]
        f = fft_centered(imgs.astype(np.float64), axes=(1, 2))[:, ky + box // 2, kx + box // 2]
        p = f.real ** 2 + f.imag ** 2
        for j, i in enumerate(idx):
            g = groups[i]
            power_sum[g] += np.bincount(shells, weights=p[j], minlength=n_shells)[:n_shells]
            count[g] += np.bincount(shells, minlength=n_shells)[:n_shells]
    power_sum = to_numpy(comm.allreduce_sum(power_sum))
    count = to_numpy(comm.allreduce_sum(count))
    overall = power_sum.sum(0) / np.maximum(count.sum(0), 1)
    sigma2 = np.where(count > 0, power_sum / np.maximum(count, 1), overall[None]) / 2.0
    sigma2 = np.maximum(sigma2, 1e-30)
    # Signal prior from the unfiltered reference; the E-step reference is low-passed.
    tau2_ref = power_spectrum_half(ref)
    start = low_pass(ref, apix, settings.ini_high) if settings.ini_high > 0 else ref.copy()
    if settings.flatten_solvent:
        start = start * _solvent_mask(settings, box, apix)
    refs = np.repeat(start[None].astype(np.float32), K, axis=0)
    if settings.ini_high > 0:
        shell = int(round(box * apix / settings.ini_high))
    else:
        shell = box // 2 - 1
    current = min(shell + settings.incr_size, box // 2 - 1)
    if settings.strict_highres_exp > 0:
        current = min(current, int(np.ceil(box * apix / settings.strict_highres_exp)))
    sigma_off = settings.offset_range * apix / 3.0
    model = ModelState(box=box, apix=apix, n_classes=K, n_groups=n_groups, refs=refs,
                       pdf_class=np.full(K, 1.0 / K), sigma2=sigma2,
                       tau2=np.repeat(tau2_ref[None], K, axis=0),
                       ssnr=np.zeros((K, n_shells)), class_resolution_shell=np.zeros(K, int),
                       sigma_offset_angst=max(sigma_off, 1.0), current_shell=int(current))
    df = table.df
    model.part_class = np.zeros(n, dtype=np.int64)
    if "rlnClassNumber" in df.columns and settings.skip_align:
        model.part_class = np.clip(df["rlnClassNumber"].to_numpy(int) - 1, 0, K - 1)
    model.part_eulers = np.stack([df[c].to_numpy(np.float64) if c in df.columns else np.zeros(n)
                                  for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)
    model.part_origin_angst = np.stack([df["rlnOriginXAngst"].to_numpy(np.float64),
                                        df["rlnOriginYAngst"].to_numpy(np.float64)], axis=1)
    model.part_pmax = np.zeros(n)
    model.part_nsig = np.zeros(n, dtype=np.int64)
    model.part_loglik = np.zeros(n)
    model.part_acc_rot = np.zeros(n)
    model.part_acc_trans_px = np.zeros(n)
    model.part_norm = part_norm
    model.avg_norm = avg_norm
    model.scale_correction = np.ones(n_groups)
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


def _image_mask(settings, box, apix, xp):
    if not settings.zero_mask:
        return None
    diameter = mask_diameter_angst(settings, box, apix)
    return soft_circle_mask(box, diameter / (2 * apix), 5.0, xp=xp).astype(xp.float32)


def _solvent_mask(settings, box, apix):
    if settings.solvent_mask:
        mask, _ = read_map(settings.solvent_mask)
        if mask.shape != (box, box, box):
            raise CryoClassError(f"{settings.solvent_mask}: mask box {mask.shape[0]} differs "
                                 f"from the particles' {box}; resample the mask (--solvent_mask)")
        return np.clip(mask, 0, 1).astype(np.float32)
    diameter = mask_diameter_angst(settings, box, apix)
    return soft_sphere_mask(box, diameter / (2 * apix), 5.0).astype(np.float32)


# ----------------------------------------------------------------------------- one block

def prepare_block(settings, model, images, indices, groups, ctfp, ky, kx, pixel_shell,
                  n_cur, xp, mask2d):
    """Images of ``indices`` as a :class:`.search.BlockData` (plus shell power beyond
    the current radius, for the noise estimate)."""
    box = model.box
    imgs = xp.asarray(images.get(indices), dtype=xp.float32)
    if mask2d is not None:
        imgs = imgs * mask2d
    f = fft_centered(imgs, axes=(1, 2)).astype(xp.complex64)
    f = f[:, ky + box // 2, kx + box // 2]                                  # (B, n_all)
    origin_px = model.part_origin_angst[indices] / model.apix
    # Re-centre by the current origin (RELION sign: shift the image by +origin).
    phase = xp.exp(xp.asarray(-2j * np.pi / box, dtype=xp.complex64)
                   * (xp.asarray(origin_px[:, 0:1], dtype=xp.float32) * kx[None].astype(xp.float32)
                      + xp.asarray(origin_px[:, 1:2], dtype=xp.float32) * ky[None].astype(xp.float32)))
    f = f * phase.astype(xp.complex64)
    if settings.norm:
        # RELION's norm correction: the image (all pixels, also those beyond the current
        # radius, which feed the noise estimate) times avg_norm / n_i.
        factor = (model.avg_norm / model.part_norm[indices]).astype(np.float32)
        f = f * xp.asarray(factor)[:, None]
    n_shells = model.n_shells
    beyond = f[:, n_cur:]
    power_beyond = xp.zeros((len(indices), n_shells), dtype=xp.float64)
    sh_beyond = pixel_shell[n_cur:]
    if beyond.shape[1]:
        # One bincount for the whole block (row j's shells offset by j * n_shells): a
        # per-particle loop would synchronise a GPU once per particle.
        p = (beyond.real ** 2 + beyond.imag ** 2).astype(xp.float64)
        rows = xp.arange(len(indices), dtype=xp.int64)[:, None] * n_shells
        power_beyond = xp.bincount((rows + sh_beyond[None, :]).ravel(), weights=p.ravel(),
                                   minlength=len(indices) * n_shells).reshape(len(indices), n_shells)
    count_beyond = to_numpy(xp.bincount(sh_beyond, minlength=n_shells)[:n_shells]) if beyond.shape[1] \
        else np.zeros(n_shells)
    kx_c = kx[:n_cur].astype(xp.float32)[None] / (box * model.apix)
    ky_c = ky[:n_cur].astype(xp.float32)[None] / (box * model.apix)
    if settings.ctf:
        params = {k: v[indices][:, None] for k, v in ctfp.items()}
        ctf = ctf_values(kx_c, ky_c, **params, phase_flipped=settings.ctf_phase_flipped,
                         intact_first_peak=settings.ctf_intact_first_peak).astype(xp.float32)
    else:
        ctf = xp.ones((len(indices), n_cur), dtype=xp.float32)
    g = groups[indices]
    if settings.scale:
        # RELION's scale correction: the group's intensity scale multiplies the CTF, so
        # the references are compared (and the images inserted) at the group's scale.
        ctf = ctf * xp.asarray(model.scale_correction[g].astype(np.float32))[:, None]
    sigma2 = xp.asarray(model.sigma2[g][:, to_numpy(pixel_shell[:n_cur])], dtype=xp.float32)
    block = search.BlockData(images_f=f[:, :n_cur], ctf=ctf, inv_sigma2=1.0 / sigma2,
                             group=g, origin_px=origin_px.astype(np.float32))
    return block, to_numpy(power_beyond), count_beyond


# ----------------------------------------------------------------------------- iterations

def fast_subset_size(iteration, n_particles, n_classes):
    """Particles used in an early iteration with ``--fast_subsets`` (all from 16 on)."""
    if iteration <= 5:
        size = 100 * n_classes
    elif iteration <= 10:
        size = 300 * n_classes
    elif iteration <= 15:
        size = 1000 * n_classes
    else:
        size = n_particles
    return min(n_particles, size)


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
    def __init__(self, settings, log=print):
        self.s = settings
        self.log = log
        self.comm = get_comm()
        # The last consensus iteration (consensus / PCA starts); see _extend_consensus.
        self.consensus_end = settings.consensus_iter
        self.xp, self.device = select_backend(settings.gpu is not None, settings.gpu or "",
                                              self.comm.rank)
        self._limit_threads()
        self.table = read_particles(settings.input_star, require_ctf=settings.ctf)
        self.box, self.apix = self.table.box, self.table.apix
        self._validate()
        self.images = ImageSource(self.table, preread=settings.preread_images,
                                  scratch_dir=settings.scratch_dir or None)
        self.groups, self.group_names = _group_index(self.table.df)
        self.group_counts = np.bincount(self.groups, minlength=len(self.group_names))
        self.ctfp = ctf_params(self.table.df) if settings.ctf else None
        self.orientations = OrientationGrid(settings.healpix_order, sym=settings.sym)
        self.translations = TranslationGrid(settings.offset_range, settings.offset_step)
        self.solvent_mask = (_solvent_mask(settings, self.box, self.apix)
                             if settings.flatten_solvent else None)
        self.mask2d = _image_mask(settings, self.box, self.apix, self.xp)
        from .symmetry import symmetrize, symmetry_matrices, symmetry_order
        self.sym_mats = symmetry_matrices(settings.sym)
        self.symmetrise = None if symmetry_order(settings.sym) == 1 else \
            (lambda v: self.xp.asarray(symmetrize(to_numpy(v), settings.sym)))

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
            check_map_matches(s.ref, self.box, self.apix)
        if s.skip_align and not self.table.has_angles:
            raise CryoClassError(f"{s.input_star}: --skip_align needs rlnAngleRot/Tilt/Psi "
                                 "(poses from a refinement); align first or drop --skip_align")
        if s.sigma_ang > 0 and s.init_classes in ("relion", "input") and \
                not self.table.has_angles:
            raise CryoClassError(f"{s.input_star}: --sigma_ang (local angular searches) needs "
                                 "rlnAngleRot/Tilt/Psi from an earlier refinement; give "
                                 "aligned particles or drop --sigma_ang")
        if s.offset_step <= 0:
            raise CryoClassError(f"--offset_step {s.offset_step:g}: must be > 0 pixels")

    # ------------------------------------------------------------------ start / continue
    def start(self):
        s = self.s
        if s.continue_from:
            model = self._load_continue()
            self.consensus_end = model.consensus_end or s.consensus_iter
            return model
        ref, _ = read_map(s.ref)
        model = _initial_model(s, self.table, self.images, ref.astype(np.float32), self.apix,
                               self.groups, len(self.group_names), self.comm)
        if self.comm.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(s.output_root)), exist_ok=True)
            write_iteration(s.output_root, 0, model, self.table, s, self.orientations,
                            self.translations, self.group_names, self.group_counts)
        return model

    def _load_continue(self):
        path = self.s.continue_from
        model = ModelState.load(continue_state_path(path))
        if model.box != self.box or model.n_classes != self.s.n_classes:
            raise CryoClassError(f"--continue {path}: the run had box {model.box} and "
                                 f"{model.n_classes} classes; use the same --i and --K")
        return model

    # ------------------------------------------------------------------ one iteration
    def iterate(self, model, iteration, allowed=None, write=True, fixed_poses=False,
                class_shell_limit=None, orientations=None, sigma_ang=None):
        """One EM iteration.  ``fixed_poses`` (or ``--skip_align``) keeps every particle's
        pose and estimates only its class; then ``class_shell_limit`` (shells) limits the
        frequencies that decide the class posteriors, while the maps are still
        reconstructed from all frequencies of the current image size.
        ``orientations`` (an :class:`.sampling.OrientationGrid`; default the run's) and
        ``sigma_ang`` (degrees; default ``--sigma_ang``; > 0: local searches around each
        particle's current orientation, :mod:`.local_search`) choose the search."""
        s, xp, comm = self.s, self.xp, self.comm
        skip_align = s.skip_align or fixed_poses
        grid = self.orientations if orientations is None else orientations
        sigma_ang = s.sigma_ang if sigma_ang is None else sigma_ang
        local = sigma_ang > 0 and not skip_align
        t0 = time.time()
        timer = _StageTimer(xp)
        n = len(self.table)
        rng = np.random.default_rng([s.random_seed, iteration])
        if s.fast_subsets:
            size = fast_subset_size(iteration, n, s.n_classes)
            subset = np.sort(rng.permutation(n)[:size]) if size < n else np.arange(n)
        else:
            subset = np.arange(n)
        if allowed is None and iteration == 1 and s.n_classes > 1:
            # RELION's random seeding: each particle contributes to one random class.
            allowed = rng.integers(0, s.n_classes, size=n)
        use_cc = s.firstiter_cc and iteration == 1

        box = self.box
        n_cur_shell = model.current_shell
        ky_all, kx_all = half_plane_pixels(box, box // 2, xp)
        radius2 = (kx_all.astype(xp.float64) ** 2 + ky_all.astype(xp.float64) ** 2)
        pixel_shell = xp.rint(xp.sqrt(radius2)).astype(xp.int64)
        n_cur = int(to_numpy((pixel_shell <= n_cur_shell).sum()))
        # A local search on a finer grid keeps the coarse size of the run's own grid:
        # its coarse pass only has to find where the posterior lies inside the ball, and
        # its cost (per-particle projections) grows with the pixels.
        coarse_shell = min(n_cur_shell, _coarse_shell(
            s, box, self.apix, max(grid.angular_step_deg,
                                   self.orientations.angular_step_deg if local else 0.0)))
        n_coarse = int(to_numpy((pixel_shell <= coarse_shell).sum()))
        ky, kx = ky_all[:n_cur], kx_all[:n_cur]
        n_class_pixels = None if class_shell_limit is None else \
            int(to_numpy((pixel_shell[:n_cur] <= int(class_shell_limit)).sum()))

        refs = self._estep_references(model, iteration)
        projectors = [Projector(refs[k], pad=s.pad, gridding=s.gridding)
                      for k in range(s.n_classes)]
        # Only classes some particle may take (one during a consensus phase).
        active = (np.arange(s.n_classes) if allowed is None
                  else np.unique(np.asarray(allowed)[subset]))
        if skip_align or local:
            # No search, or each particle's own rotations: no shared coarse slices.
            coarse = xp.zeros((1, 1), dtype=xp.complex64)
        else:
            coarse_mats = xp.asarray(grid.matrices)
            coarse = xp.concatenate([projectors[k].project(coarse_mats, ky[:n_coarse], kx[:n_coarse])
                                     for k in active], axis=0)
        log_prior = xp.asarray(np.log(np.maximum(model.pdf_class, 1e-30)), dtype=xp.float32)
        # --norm / --scale sums (not in a --firstiter_cc iteration, whose scores are
        # cross-correlations: RELION does not update the corrections there either).
        do_norm, do_scale = s.norm and not use_cc, s.scale and not use_cc
        norm_pixels, scale_pixels = correction_pixels(
            model, to_numpy(pixel_shell[:n_cur]), n_cur_shell, do_norm, do_scale)
        setup = search.SearchSetup(
            box=box, n_coarse=n_coarse, ky=ky, kx=kx, pixel_shell=pixel_shell[:n_cur],
            n_classes=s.n_classes, orientations=grid,
            translations=self.translations, oversampling=s.oversampling,
            coarse_pair=estep.as_real_pair(coarse),
            coarse_power=(coarse.real ** 2 + coarse.imag ** 2),
            projectors=projectors, log_class_prior=log_prior,
            sigma_offset_px=model.sigma_offset_angst / self.apix,
            adaptive_fraction=s.adaptive_fraction, max_significant=s.max_significant,
            use_cc=use_cc, coarse_classes=None if skip_align else active,
            sigma_ang=sigma_ang if local else 0.0,
            norm_pixels=None if norm_pixels is None else xp.asarray(norm_pixels),
            scale_pixels=None if scale_pixels is None else xp.asarray(scale_pixels))
        timer.lap("setup")
        acc = Accumulators(s.n_classes, len(self.group_names), box, s.pad, xp)
        m = len(subset)
        res = {"class": np.zeros(m), "eulers": np.zeros((m, 3)), "origin_px": np.zeros((m, 2)),
               "pmax": np.zeros(m), "loglik": np.zeros(m), "acc_rot": np.zeros(m),
               "acc_trans_px": np.zeros(m), "nsig": np.zeros(m)}
        if do_norm:
            res["norm_resid"] = np.zeros(m)
        if do_scale:
            res["scale_xa"], res["scale_aa"] = np.zeros(m), np.zeros(m)
        lo, hi = split_range(m, comm.rank, comm.size)
        if os.environ.get("CRYOCLASS_TEST_FAIL_RANK") == str(comm.rank) and comm.size > 1:
            raise RuntimeError("failure injected by CRYOCLASS_TEST_FAIL_RANK (tests only)")
        blocks = [(b0, min(hi, b0 + s.block_size)) for b0 in range(lo, hi, s.block_size)]
        progress = _Progress(2 * (hi - lo), iteration, s.n_iter, enabled=comm.rank == 0)
        if skip_align:
            for b0, b1 in blocks:
                idx = subset[b0:b1]
                block, pw_beyond, cnt_beyond = self._block(model, idx, allowed, xp, ky_all,
                                                           kx_all, pixel_shell, n_cur)
                acc.add_power_beyond(self.groups[idx], pw_beyond, cnt_beyond)
                if do_norm:
                    res["norm_resid"][b0:b1] += norm_power_beyond(pw_beyond)
                timer.lap("prepare")
                search.fixed_pose_pass(setup, block, model.part_eulers[idx], acc, xp, res, b0,
                                       n_class_pixels=n_class_pixels)
                timer.lap("fixed-pose")
                progress.update(2 * (b1 - b0))
            blocks = []
        # Pass 1: coarse search of every block; the significant samples are kept (small).
        cache, significant = {}, {}
        n_pix = int(ky.shape[0])
        cache_ok = (hi - lo) * n_pix * 16 <= s.cache_bytes
        for b0, b1 in blocks:
            block, pw_beyond, cnt_beyond = self._block(model, subset[b0:b1], allowed, xp,
                                                       ky_all, kx_all, pixel_shell, n_cur,
                                                       local=local)
            acc.add_power_beyond(self.groups[subset[b0:b1]], pw_beyond, cnt_beyond)
            if do_norm:
                res["norm_resid"][b0:b1] += norm_power_beyond(pw_beyond)
            timer.lap("prepare")
            if local:
                cand_ids, cand_logp = local_search.candidate_rotations(grid, block.prior_views,
                                                                       sigma_ang)
                sig_t, sig_kr, n_sig = local_search.local_coarse_pass(
                    setup, block, cand_ids, cand_logp, xp, search.fine_batch_bytes(xp))
            else:
                sig_t, sig_kr, n_sig = search.coarse_pass(setup, block, xp)
            res["nsig"][b0:b1] = n_sig
            significant[b0] = (sig_t, sig_kr)
            if cache_ok:
                cache[b0] = block
            progress.update(b1 - b0)
            timer.lap("coarse")
        # Pass 2: fine search, in chunks of blocks whose rotations fit the table budget.
        rows_budget = max(1, int(s.fine_table_bytes // (n_pix * 20)))
        n_child = 8 ** s.oversampling
        chunk, chunk_kr = [], set()
        for b0, b1 in blocks + [(None, None)]:
            if b0 is not None:
                new_kr = set(np.unique(np.concatenate(significant[b0][1])).tolist())
                merged = chunk_kr | new_kr
            if chunk and (b0 is None or len(merged) * n_child > rows_budget):
                tables = search.FineTables(setup, np.fromiter(chunk_kr, dtype=np.int64), xp)
                timer.lap("fine-tables")
                for c0, c1 in chunk:
                    block = cache.pop(c0, None)
                    if block is None:
                        block, _, _ = self._block(model, subset[c0:c1], allowed, xp,
                                                  ky_all, kx_all, pixel_shell, n_cur,
                                                  local=local)
                        timer.lap("prepare")
                    sig_t, sig_kr = significant.pop(c0)
                    search.fine_pass(setup, block, sig_t, sig_kr, tables, acc, xp, res, c0)
                    progress.update(c1 - c0)
                    timer.lap("fine")
                tables.insert_into(acc.backprojectors)
                timer.lap("insert")
                del tables
                chunk, chunk_kr = [], set()
                merged = new_kr if b0 is not None else set()
            if b0 is not None:
                chunk.append((b0, b1))
                chunk_kr = merged
        progress.close()
        timer.lap("fine")
        acc.reduce(comm)
        if comm.size > 1:
            for key in res:
                res[key] = to_numpy(comm.allreduce_sum(res[key]))
        maximise(acc, model, _MStepSettings(s, self._in_consensus(iteration)),
                 solvent_mask=None if self.solvent_mask is None
                 else xp.asarray(self.solvent_mask), symmetrise=self.symmetrise,
                 unregularised=use_cc, consensus=self._shares_consensus(iteration))
        self._update_particles(model, subset, res)
        if do_norm:
            update_norm_corrections(model, subset, res["norm_resid"])
        if do_scale:
            update_scale_corrections(model, self.groups[subset], res["scale_xa"],
                                     res["scale_aa"], self.group_counts)
        self._update_image_size(model)
        timer.lap("M-step")
        model.iteration = iteration
        model.log_likelihood = float(model.part_loglik.sum())
        elapsed = time.time() - t0
        model.history.append({"iteration": iteration, "seconds": elapsed,
                              "stage_seconds": dict(timer.seconds)})
        if comm.rank == 0 and write:
            write_iteration(s.output_root, iteration, model, self.table, s, grid,
                            self.translations, self.group_names, self.group_counts)
            timer.lap("output")
            self.log(_log_line(model, iteration, elapsed, m))
            self.log(f"          stage seconds: {timer.summary()}")
        return model

    def _estep_references(self, model, iteration):
        """The class references of an iteration's E-step (on the device): the class maps,
        or after a consensus / PCA split with ``--class_difference_highres`` the maps
        that share the consensus where the classes do not differ (:mod:`.focus`); from
        iteration 2 on with the automatic mask (:meth:`_auto_mask_sigma`) multiplied by
        a mask around the density of their class-prior-weighted mean
        (:func:`.masks.auto_solvent_mask`)."""
        s, xp = self.s, self.xp
        refs = xp.asarray(model.refs)
        radius = mask_diameter_angst(s, self.box, self.apix) / (2.0 * self.apix)
        inside = soft_sphere_mask(self.box, radius, 3.0, xp)
        if self._shares_references(iteration):
            from .focus import shared_consensus_references
            consensus = (None if model.consensus_ref is None or not s.joint_consensus
                         else xp.asarray(model.consensus_ref))
            refs, _ = shared_consensus_references(refs, xp.asarray(model.pdf_class), self.apix,
                                                  s.class_difference_highres, inside,
                                                  consensus=consensus)
        sigma = self._auto_mask_sigma()
        if sigma > 0 and iteration > 1:
            # Why: the density fills ~5 % of the box, a particle mask ~35 %; the rest of
            # the references is reconstruction noise that the projections add to every
            # score.  Measured (benchmarks/RESULTS.md, "automatic mask"; with the joint
            # consensus): 600 particles at SNR 0.05, ARI 0.779 -> 0.839 and 0.846 -> 0.921
            # (two seeds).  Only the E-step's references: masking the PCA split's
            # eigenvolumes too kept a spurious split of one class alive with K=4.
            from .masks import auto_solvent_mask
            w = np.maximum(model.pdf_class, 0.0)
            w = xp.asarray(w / max(float(w.sum()), 1e-300))
            mean = xp.tensordot(w, refs.astype(xp.float64), axes=1)
            mask = auto_solvent_mask(mean, self.apix, inside, sigma)
            refs = (refs * mask[None]).astype(refs.dtype)
        return refs

    def _auto_mask_sigma(self):
        """``--auto_mask_sigma``; by default (< 0) ``AUTO_MASK_SIGMA`` with a consensus /
        PCA start, off with RELION's (whose results compare with RELION's) or with a
        user's ``--solvent_mask`` (the user chose the mask)."""
        s = self.s
        if s.auto_mask_sigma >= 0:
            return s.auto_mask_sigma
        if s.solvent_mask or s.init_classes not in ("consensus", "pca"):
            return 0.0
        return AUTO_MASK_SIGMA

    def _shares_references(self, iteration):
        """Whether the E-step references of an iteration share the consensus
        (``--class_difference_highres`` after a consensus / PCA split)."""
        s = self.s
        return (s.init_classes in ("consensus", "pca") and s.n_classes > 1
                and s.class_difference_highres > 0 and iteration > self.consensus_end + 1)

    def _shares_consensus(self, iteration):
        """Whether this iteration's M-step reconstructs the joint consensus: with
        ``--joint_consensus`` when the next iteration's references share it."""
        return self.s.joint_consensus and self._shares_references(iteration + 1)

    def _block(self, model, idx, allowed, xp, ky_all, kx_all, pixel_shell, n_cur,
               local=False):
        block, pw_beyond, cnt_beyond = prepare_block(
            self.s, model, self.images, idx, self.groups, self.ctfp, ky_all, kx_all,
            pixel_shell, n_cur, xp, self.mask2d)
        if allowed is not None:
            block.allowed_class = allowed[idx]
        if local:
            block.prior_views = local_search.prior_views(model.part_eulers[idx], self.sym_mats)
        return block, pw_beyond, cnt_beyond

    def _update_particles(self, model, subset, res):
        old_mats = euler_to_matrix(*model.part_eulers[subset].T)
        new_mats = euler_to_matrix(*res["eulers"].T)
        new_class = res["class"].astype(np.int64)
        new_origin = res["origin_px"] * self.apix
        model.changes = {
            "orientations": float(np.mean(angular_distance_deg(old_mats, new_mats))),
            "offsets": float(np.mean(np.linalg.norm(new_origin - model.part_origin_angst[subset], axis=1))),
            "classes": float(np.mean(new_class != model.part_class[subset])),
        }
        model.part_class[subset] = new_class
        model.part_eulers[subset] = res["eulers"]
        model.part_origin_angst[subset] = new_origin
        model.part_pmax[subset] = res["pmax"]
        model.part_nsig[subset] = res["nsig"].astype(np.int64)
        model.part_loglik[subset] = res["loglik"]
        model.part_acc_rot[subset] = res["acc_rot"]
        model.part_acc_trans_px[subset] = res["acc_trans_px"]

    def _update_image_size(self, model):
        """Next E-step radius: best class resolution + ``incr_size`` shells (RELION),
        never shrinking, capped by ``--strict_highres_exp`` and Nyquist."""
        s = self.s
        alive = model.pdf_class > 0.001
        best = int(model.class_resolution_shell[alive].max()) if alive.any() else 1
        new = min(max(model.current_shell, best + s.incr_size), self.box // 2 - 1)
        if s.strict_highres_exp > 0:
            new = min(new, int(np.ceil(self.box * self.apix / s.strict_highres_exp)))
        model.current_shell = int(new)

    def run(self):
        """All iterations from the start (or the continued one) to ``--iter``.

        ``--init_classes`` chooses how K > 1 classes start:

        ``relion``
            RELION's way: in iteration 1 each particle goes to one random class, so the
            K maps start as reconstructions of random subsets.
        ``input``
            iteration 1 takes each particle's class from the input ``rlnClassNumber``.
        ``consensus``
            ours: ``--consensus_iter`` iterations align all particles to one map (a
            consensus refinement inside the job); then ``--restarts`` classifications
            without alignment, each from a different random partition, with soft
            assignments, run ``--restart_iter`` iterations; the one with the best
            log-likelihood gives the K starting maps for the remaining iterations of
            full EM.  Random partitions of aligned particles break the symmetry between
            classes far better than random partitions of unaligned ones, and the
            restarts keep an unlucky start from deciding the result.
        ``pca``
            ours: the consensus iterations as above; then k-means of the particles'
            coordinates along the top K-1 heterogeneity eigenvolumes gives the classes.

        With ``consensus`` and ``pca`` the ``--classify_fixed_iter`` iterations after the
        split keep the consensus poses and classify at ``--classify_fixed_highres``
        (:meth:`_iterate_fixed_poses`); the iterations after them are full EM.
        """
        s = self.s
        model = self.start()
        for it in range(model.iteration + 1, s.n_iter + 1):
            allowed = None
            fixed_poses = False
            if it == 1 and s.n_classes > 1 and s.init_classes == "input":
                allowed = self._input_classes()
            if s.init_classes in ("consensus", "pca") and s.n_classes > 1:
                self._extend_consensus(model, it)
                end = self.consensus_end
                if it <= end:
                    allowed = np.zeros(len(self.table), dtype=np.int64)
                elif it == end + 1:
                    model = (self._split_by_restarts(model, it) if s.init_classes == "consensus"
                             else self._split_by_pca(model, it))
                    allowed = model.part_class.copy()
                if it == end + s.classify_fixed_iter + 1 and self._merge_duplicates(model, it):
                    allowed = model.part_class.copy()
                fixed_poses = end < it <= end + s.classify_fixed_iter + model.merge_extra
            if fixed_poses and not s.skip_align:
                model = self._iterate_fixed_poses(model, it, allowed)
            else:
                model = self.iterate(model, it, allowed=allowed, **self._search_for(it))
        return model

    def _search_for(self, iteration):
        """The orientation search of an iteration (keywords of :meth:`iterate`).

        RELION's start: ``--sigma_ang`` (local searches) or global, at ``--healpix_order``.
        Consensus / pca starts: the consensus iterations are global at ``--healpix_order``
        (they find the poses), except the last ``--consensus_local_iter``; those and the
        iterations after the split search locally around each particle's pose on the
        grid of ``--classify_local_order`` (default one order finer) with sigma
        ``--classify_local_sigma`` (0: global at ``--healpix_order`` throughout).  With
        ``--sigma_ang`` the consensus iterations are global and the later ones local at
        ``--healpix_order``, as RELION's local searches.  Why: with 7.5 deg sampling
        the poses' errors (~6-7 deg) hide differences between classes that a finer grid
        separates; measured in benchmarks/RESULTS.md ("local searches").
        """
        s = self.s
        if s.init_classes not in ("consensus", "pca") or s.n_classes == 1:
            return {}
        if s.sigma_ang > 0:
            return {"sigma_ang": -1.0} if iteration <= self.consensus_end else {}
        local = {"orientations": self._grid(self._classify_local_order()),
                 "sigma_ang": s.classify_local_sigma}
        if iteration <= self.consensus_end:
            if s.classify_local_sigma > 0 and iteration > self._last_global_consensus():
                return local
            return {"sigma_ang": -1.0}
        return local if s.classify_local_sigma > 0 else {}

    def _in_consensus(self, iteration):
        """Whether ``iteration`` belongs to the consensus phase of a consensus/PCA start."""
        s = self.s
        return (s.init_classes in ("consensus", "pca") and s.n_classes > 1
                and iteration <= self.consensus_end)

    def _last_global_consensus(self):
        """The last consensus iteration that searches globally (the local ones follow)."""
        s = self.s
        if s.sigma_ang > 0 or s.classify_local_sigma <= 0:
            return self.consensus_end
        return self.consensus_end - min(s.consensus_local_iter, self.consensus_end - 1)

    def _extend_consensus(self, model, iteration):
        """Before ``iteration``: if it would be the first local consensus iteration (or the
        split) but the last global one still moved the poses by more than the coarse
        angular step of ``--healpix_order`` on average (the mean of
        ``model.changes["orientations"]``), search globally once more (the rest of the
        consensus phase moves one iteration later), up to ``--consensus_extra_iter`` times
        and while at least two full-EM iterations stay after the fixed-pose phase.  Why:
        on a 600-particle SNR 0.05 set with a 30-degree domain swing the consensus poses
        were still moving at iteration 4 (median error 15 deg, 10 % of the particles
        flipped at the split); the split then failed (ARI 0.29); with three more global
        iterations: 10 deg, no flips, ARI 0.89 (benchmarks/RESULTS.md, "adaptive
        consensus").
        The decision reads only the saved state, so ``--continue`` repeats it."""
        s = self.s
        if iteration - 1 != self._last_global_consensus() or iteration <= 2:
            return
        room = s.n_iter - s.classify_fixed_iter - 2
        if (model.changes["orientations"] > self.orientations.angular_step_deg
                and self.consensus_end < s.consensus_iter + s.consensus_extra_iter
                and self.consensus_end < room):
            self.consensus_end += 1
            model.consensus_end = self.consensus_end
            if self.comm.rank == 0:
                self.log(f"consensus: the poses moved {model.changes['orientations']:.1f} deg "
                         f"on average in iteration {iteration - 1} (sampling "
                         f"{self.orientations.angular_step_deg:.1f} deg): one more global "
                         f"iteration; the split comes after iteration {self.consensus_end}")

    def _merge_duplicates(self, model, iteration):
        """Before the first full-EM iteration after a consensus / PCA start (once): merge
        the pairs of classes that the held-out test of :mod:`.merge` calls one structure
        (``--merge_threshold``); the dropped class is left empty (its map kept, prior
        0).  If any merge happened, ``--merge_fixed_iter`` more fixed-pose iterations
        follow (while two full-EM iterations remain), the first with the merged hard
        assignments.  Returns whether anything was merged.

        Why: with K above the number of structures, EM can cut one structure into two
        classes that both live on, each fed by its own particles (K=4 on three true
        classes at SNR 0.2: ARI 0.86, benchmarks/RESULTS.md, "merge test").  The
        decision reads only the saved state, so ``--continue`` repeats it."""
        from . import merge
        s = self.s
        if s.merge_threshold <= 0 or model.merge_tested or s.n_classes < 2:
            return False
        log = self.log if self.comm.rank == 0 else None
        pairs = merge.duplicate_pairs(self, model, s.classify_fixed_highres, s.merge_threshold,
                                      seed=s.random_seed, log=log)
        model.merge_tested = True
        for keep, drop, ev in pairs:
            moved = model.part_class == drop
            model.part_origin_angst[moved] = ev["aligned_origins"]
            model.part_class[moved] = keep
            model.pdf_class[keep] += model.pdf_class[drop]
            model.pdf_class[drop] = 0.0
            if log is not None:
                log(f"merge: class {drop + 1} joins class {keep + 1} (one structure by the "
                    f"held-out test); class {drop + 1} stays empty")
        if pairs:
            room = s.n_iter - 2 - (self.consensus_end + s.classify_fixed_iter)
            model.merge_extra = max(0, min(s.merge_fixed_iter, room))
        return bool(pairs)

    def _classify_local_order(self):
        s = self.s
        return s.classify_local_order if s.classify_local_order >= 0 else s.healpix_order + 1

    def _grid(self, order):
        """The orientation grid of a HEALPix order (the run's symmetry), cached."""
        if order == self.orientations.healpix_order:
            return self.orientations
        grids = self.__dict__.setdefault("_grids", {})
        if order not in grids:
            grids[order] = OrientationGrid(order, sym=self.s.sym)
        return grids[order]

    def _iterate_fixed_poses(self, model, iteration, allowed):
        """One iteration of classification without alignment at ``--classify_fixed_highres``
        (the phase after a consensus start, ``--classify_fixed_iter`` iterations).

        Why: right after the split the K maps are noisy and alike; a full search against
        them re-aligns the particles by noise (orientations jump by 30-40 deg) and the
        class that happens to be sharpest takes the particles.  Keeping the consensus
        poses and comparing only low frequencies (25 A by default), which the poses'
        errors (~5-7 deg at SNR 0.1) spoil least, lets the classes separate first (measured in
        benchmarks/RESULTS.md, "fixed-pose phase"); full EM then refines poses and
        classes together.
        """
        shell = int(np.ceil(self.box * self.apix / self.s.classify_fixed_highres))
        return self.iterate(model, iteration, allowed=allowed, fixed_poses=True,
                            class_shell_limit=shell)

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

    def _split_by_pca(self, model, iteration):
        """K-means of the particles' coordinates along the top K-1 heterogeneity
        eigenvolumes (:mod:`.heterogeneity`) gives each particle its starting class."""
        import copy
        from .heterogeneity import kmeans, principal_coordinates
        s = self.s
        coords = principal_coordinates(self, model, max(1, s.n_classes - 1), s.restart_highres,
                                       seed=s.random_seed, log=self.log)
        labels = kmeans(coords, s.n_classes, seed=s.random_seed)
        best = copy.deepcopy(model)
        best.part_class = labels.astype(np.int64)
        best.pdf_class = np.maximum(np.bincount(labels, minlength=s.n_classes), 1) / len(labels)
        best.tau2[:] = model.tau2[0]
        best.iteration = iteration - 1
        if self.comm.rank == 0:
            self.log(f"pca start: class sizes {np.bincount(labels, minlength=s.n_classes).tolist()}")
        return best

    def _split_by_restarts(self, model, iteration):
        """Best of ``--restarts`` fixed-pose classifications from random partitions."""
        import copy
        s = self.s
        best, best_ll = None, -np.inf
        # The restarts run RELION's soft EM on the aligned particles, with the E-step
        # limited to --restart_highres: the classes differ most at low resolution, and
        # high frequencies mostly add each particle's own noise to its class.
        seed_shell = min(model.current_shell,
                         int(np.ceil(self.box * self.apix / s.restart_highres)))
        for r in range(max(1, s.restarts)):
            trial = copy.deepcopy(model)
            trial.pdf_class = np.full(s.n_classes, 1.0 / s.n_classes)
            trial.tau2[:] = model.tau2[0]      # the consensus map's signal spectrum
            rng = np.random.default_rng([s.random_seed, iteration, r, 7])
            allowed = rng.integers(0, s.n_classes, size=len(self.table))
            for j in range(max(1, s.restart_iter)):
                trial.current_shell = seed_shell
                trial = self.iterate(trial, iteration, allowed=allowed if j == 0 else None,
                                     write=False, fixed_poses=True)
            ll = trial.log_likelihood
            if self.comm.rank == 0:
                self.log(f"restart {r + 1}/{s.restarts}: log-likelihood {ll:.6g}, "
                         f"class sizes {np.bincount(trial.part_class, minlength=s.n_classes).tolist()}")
            if ll > best_ll:
                best, best_ll = trial, ll
        best.iteration = iteration - 1
        best.current_shell = model.current_shell
        best.tau2 = model.tau2.copy()
        best.tau2[:] = model.tau2[0]
        return best


@dataclass
class _MStepSettings:
    tau2_fudge: float
    gridding: bool

    def __init__(self, s, consensus_phase=False):
        self.tau2_fudge = s.tau2_fudge
        self.gridding = s.gridding
        self.consensus_tau2_estimate = s.consensus_tau2_estimate or s.tau2_estimate
        # In the consensus iterations the one class map is the consensus.
        self.tau2_estimate = self.consensus_tau2_estimate if consensus_phase else s.tau2_estimate


def _log_line(model, iteration, seconds, n_used):
    dist = " ".join(f"{p:.3f}" for p in model.pdf_class)
    res = " ".join(f"{r:.1f}" for r in model.class_resolution_angst())
    return (f"iter {iteration:3d}  {seconds:7.1f} s  particles {n_used}  "
            f"E-step res {model.current_resolution_angst():.1f} A  class res [{res}] A  "
            f"dist [{dist}]  changes: classes {model.changes['classes']:.3f} "
            f"orient {model.changes['orientations']:.2f} deg "
            f"offsets {model.changes['offsets']:.2f} A  pmax {np.mean(model.part_pmax):.3f}")


class _StageTimer:
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
        return " ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())


class _Progress:
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
