"""M-step: sums over particles, their MPI reduction, and the model updates.

Given the E-step sums (:class:`Accumulators`), one call to :func:`maximise` returns the
new class maps, class priors, noise spectra sigma2 (per group, per shell, per
real/imaginary component), signal spectra tau2 (per class, same units), SSNR and
resolution per class, and the new offset prior width.  Formulas (Scheres 2012):

- map, per Fourier voxel: ``V = sum w C X / sigma2 / (sum w C^2 / sigma2 + 1 / (T tau2))``
  (:meth:`.projector.BackProjector.reconstruct`);
- ``tau2`` of a class from its new map: ``mean |V|^2 / 2`` per shell, used as the prior
  of the next reconstruction (the first one uses the spectrum of the *unfiltered*
  starting reference, so the ``--ini_high`` low-pass limits the first E-step, not the
  prior);
- SSNR of a class per shell: ``T tau2 <W>`` (``<W>`` the mean accumulated weight); the
  class's resolution is the last shell, counting from the centre, with SSNR >= 1;
- ``sigma2 = sum w |X s - C P|^2 / (2 * number of pixel observations)`` per group and
  shell, and ``sigma_offset^2 = sum w |offset|^2 / (2 sum w)``;
- class priors: summed posteriors over the particles, normalised;
- ``--norm`` (RELION's ``exp_wsum_norm_correction``): each particle's norm correction
  ``n_i = (n_i_old / avg_norm_old) sqrt(2 W_i)`` with ``W_i`` its posterior-weighted
  residual power ``sum_w |X s - C P|^2`` over the pixels of shells > 3 inside the E-step
  radius plus its image power beyond it, on RELION's Fourier scale;
  ``avg_norm`` = the mean of the new ``n_i`` (:func:`update_norm_corrections`);
- ``--scale``: each group's scale ``s_g = sum_w Re(X s conj(C P)) / sum_w |C P|^2`` over
  the well-determined shells, C without the current scale, divided by the
  particle-count-weighted mean over the groups (:func:`update_scale_corrections`).
"""
import numpy as np

from .backend import get_xp, to_numpy
from .fourier import rfftn_workers
from .masks import flatten_solvent
from .projector import BackProjector


class Accumulators:
    """E-step sums of one rank; :meth:`reduce` adds all ranks' sums."""

    def __init__(self, n_classes, n_groups, box, pad, xp, max_shell=None):
        """``max_shell``: the largest pixel radius the E-step inserts (the grids' size,
        :func:`.projector.current_grid_shell`; None: Nyquist).  The noise, class and
        shell tables are at the full box (``box // 2 + 1`` shells)."""
        self.xp = xp
        self.n_shells = box // 2 + 1
        self.max_shell = max_shell
        self.backprojectors = [BackProjector(box, pad, xp, max_shell=max_shell)
                               for _ in range(n_classes)]
        self.noise_sum = xp.zeros((n_groups, self.n_shells), dtype=xp.float64)
        self.noise_count = xp.zeros((n_groups, self.n_shells), dtype=xp.float64)
        self.class_weight = xp.zeros(n_classes, dtype=xp.float64)
        self.offset_sq = 0.0
        self.offset_weight = 0.0

    def add_noise(self, group, pixel_shell, residual):
        xp = self.xp
        self.noise_sum[group] += xp.bincount(pixel_shell, weights=residual.astype(xp.float64),
                                             minlength=self.n_shells)[:self.n_shells]
        self.noise_count[group] += xp.bincount(pixel_shell, minlength=self.n_shells)[:self.n_shells]

    def add_power_beyond(self, groups, shell_power, shell_count):
        """Image power of shells the E-step did not use (no model there: residual = image)."""
        for g in np.unique(groups):
            sel = groups == g
            self.noise_sum[g] += self.xp.asarray(shell_power[sel].sum(axis=0))
            self.noise_count[g] += self.xp.asarray(shell_count * sel.sum())

    def add_offsets(self, sq, weight):
        self.offset_sq += sq
        self.offset_weight += weight

    def add_class_weights(self, classes, weights):
        self.class_weight += self.xp.bincount(classes, weights=weights.astype(self.xp.float64),
                                              minlength=self.class_weight.shape[0])

    def reduce(self, comm):
        if comm.size == 1:
            return
        for bp in self.backprojectors:
            bp.data = comm.allreduce_sum(bp.data)
            bp.weight = comm.allreduce_sum(bp.weight)
        self.noise_sum = comm.allreduce_sum(self.noise_sum)
        self.noise_count = comm.allreduce_sum(self.noise_count)
        self.class_weight = comm.allreduce_sum(self.class_weight)
        scal = comm.allreduce_sum(np.array([self.offset_sq, self.offset_weight]))
        self.offset_sq, self.offset_weight = float(scal[0]), float(scal[1])


_RFFT_SHELLS = {}


def _rfft_shells(n, xp):
    """For an ``n^3`` map's rfft layout (:func:`.fourier.rfftn_workers`), flat: the shell
    ``round(|k|)`` of each element capped at ``n // 2 + 1`` (int32; the cap collects the
    shells past Nyquist); per ``k_x`` column, how many elements of the full transform
    an element stands for (2 for ``0 < k_x < n/2``, whose mate ``-k`` is not stored; 1
    on ``k_x = 0`` and on the ``k_x = n/2`` plane, which is the full grid's ``-n/2``);
    and the full grid's element count per shell.  Cached for one size."""
    key = (n, xp.__name__)
    if key not in _RFFT_SHELLS:
        k = xp.fft.fftfreq(n, 1.0 / n) ** 2
        kx = xp.arange(n // 2 + 1, dtype=xp.float64)
        r = xp.sqrt(k[:, None, None] + k[None, :, None] + (kx ** 2)[None, None, :])
        sh = xp.minimum(xp.rint(r), n // 2 + 1).astype(xp.int32).ravel()
        del r
        single = (kx == 0) | ((n % 2 == 0) & (kx == n // 2))
        mult = xp.where(single, 1.0, 2.0)                      # per k_x column
        counts = xp.bincount(sh, weights=xp.broadcast_to(mult, (n, n, n // 2 + 1)).ravel(),
                             minlength=n // 2 + 2)
        _RFFT_SHELLS.clear()
        _RFFT_SHELLS[key] = (sh, mult, counts)
    return _RFFT_SHELLS[key]


def power_spectrum_half(vol):
    """``mean |F|^2 / 2`` per shell of a map's transform (tau2 units), over the whole
    centred transform, from its real-input half (each element weighted by the full-grid
    elements it stands for)."""
    xp = get_xp(vol)
    n = vol.shape[0]
    n_shells = n // 2 + 1
    f = rfftn_workers(vol.astype(xp.float64))
    p = f.real ** 2
    p += f.imag ** 2
    del f
    sh, mult, cnt = _rfft_shells(n, xp)
    p *= mult
    num = xp.bincount(sh, weights=p.ravel(), minlength=n_shells + 1)[:n_shells]
    cnt = cnt[:n_shells]
    return to_numpy(xp.where(cnt > 0, num / xp.maximum(cnt, 1), 0.0) / 2.0)


def resolution_shell(ssnr):
    """Last shell (>= 1) such that SSNR >= 1 in every shell from 1 up to it (0 if none)."""
    below = np.nonzero(ssnr[1:] < 1.0)[0]
    return int(below[0]) if below.size else ssnr.shape[0] - 1


def maximise(acc, model, settings, solvent_mask=None, symmetrise=None, unregularised=False,
             consensus=False, blush=None):
    """Update ``model`` (a :class:`.model.ModelState`) in place from reduced sums.

    ``unregularised`` reconstructs without the tau2 prior (first iteration after a
    ``--firstiter_cc`` pass, when the reference's greyscale, hence tau2, is unknown).
    ``consensus`` also reconstructs all classes' sums together
    (:func:`reconstruct_consensus`).  ``blush`` (a :class:`.blush_step.BlushStep`)
    regularises each regularised class map before symmetrisation and solvent flattening.
    """
    xp = acc.xp
    K = len(acc.backprojectors)
    n_shells = acc.n_shells
    total = float(to_numpy(acc.class_weight.sum()))
    class_w = to_numpy(acc.class_weight)
    if consensus and not unregularised:
        reconstruct_consensus(acc, model, settings, solvent_mask, symmetrise)
    for k, bp in enumerate(acc.backprojectors):
        if class_w[k] <= 1e-6 * max(total, 1e-300):
            # An empty class keeps its map; its prior goes to (almost) zero below.
            model.ssnr[k] = 0.0
            continue
        if unregularised:
            tau2_prior = None
            vol = bp.reconstruct(tau2=None, gridding=settings.gridding,
                                 weight_floor=getattr(settings, "cc_weight_floor", True))
        else:
            tau2_prior = np.array(model.tau2[k], dtype=np.float64)
            vol = bp.reconstruct(tau2=xp.asarray(tau2_prior), tau2_fudge=settings.tau2_fudge,
                                 gridding=settings.gridding)
            if blush is not None:
                vol = blush.apply(bp, vol, xp.asarray(tau2_prior), settings.tau2_fudge,
                                  settings.gridding, model.apix)
        if symmetrise is not None:
            vol = symmetrise(vol)
        if solvent_mask is not None:
            vol = flatten_solvent(vol, solvent_mask, settings.solvent_mask2, xp)
        model.refs[k] = to_numpy(vol).astype(np.float32)
        mean_w = to_numpy(bp.mean_weight_per_shell(n_shells))
        power = power_spectrum_half(vol)
        # The SSNR (which sets the next E-step's frequencies) is T x the new map's power
        # x the mean weight, with either tau2 estimate.
        model.ssnr[k] = settings.tau2_fudge * power * mean_w
        model.tau2[k] = power
        if settings.tau2_estimate == "em" and tau2_prior is not None:
            model.tau2[k] += _posterior_variance(bp, tau2_prior, n_shells)
        model.class_resolution_shell[k] = resolution_shell(model.ssnr[k])
    model.pdf_class = np.maximum(class_w / max(total, 1e-300), 0.0)
    cnt = to_numpy(acc.noise_count)
    ssum = to_numpy(acc.noise_sum)
    has = cnt > 0
    model.sigma2[has] = np.maximum(ssum[has] / (2.0 * cnt[has]), 1e-30)
    if acc.offset_weight > 0:
        sigma_px = np.sqrt(acc.offset_sq / (2.0 * acc.offset_weight))
        model.sigma_offset_angst = max(float(sigma_px) * model.apix, 1.0)


def _posterior_variance(bp, tau2, n_shells):
    """The exact EM update's second term for tau2 (``--tau2_estimate em``): the mean
    posterior variance per shell of the reconstruction, ``mean 1 / (W + 1 / tau2)``
    (no fudge: the model's own prior).

    Not scaled by the solvent mask's volume (though the map's power is taken after
    masking): the prior's signal lives inside the mask, so a voxel the data do not reach
    keeps its whole prior variance there.  Scaled by the mask's mean square (tried), the
    update shrinks tau2 by that fraction in every low-SNR shell, each iteration, as the
    power-only update does (RELION's): docs/benchmarks.md, "Signal spectrum (tau2) update"."""
    return to_numpy(bp.mean_posterior_variance_per_shell(tau2, n_shells))


def reconstruct_consensus(acc, model, settings, solvent_mask=None, symmetrise=None):
    """The consensus map: one reconstruction from the sums of all classes (every
    particle, each with its posterior-weighted poses over all classes), regularised by
    the power spectrum of the previous consensus map (the first time, the
    class-prior-weighted mean of the classes' tau2).  Sets ``model.consensus_ref``.

    Used with ``--joint_consensus`` (the default).  Why: each class map is
    Wiener-filtered with its own SSNR (1/K of the particles), so their prior-weighted
    mean (``--mean_consensus``) is low-passed harder than a reconstruction from all
    particles, and the E-step's alignment (the references share the consensus beyond
    ``--class_difference_highres``, :mod:`.focus`) loses frequencies the whole data set
    determines.  Measured: poses 0.1-0.3 degrees better; with the automatic reference
    mask the classes too (docs/benchmarks.md, "Automatic reference mask and joint consensus").
    Costs one reconstruction and one more grid pair (data complex128 + weight float64,
    on the classes' cropped half grid) during the M-step.  Its signal spectrum is updated as
    ``settings.consensus_tau2_estimate`` says ("em": plus the posterior variance, as
    :func:`maximise` does for the class maps with ``--tau2_estimate em``).
    """
    xp = acc.xp
    first = acc.backprojectors[0]
    joint = BackProjector(first.box, first.pad, xp, max_shell=first.max_shell)
    for bp in acc.backprojectors:
        joint.add(bp.data, bp.weight)
    if model.consensus_ref is not None:
        tau2 = power_spectrum_half(xp.asarray(model.consensus_ref))
    else:
        w = np.maximum(np.asarray(model.pdf_class, dtype=np.float64), 0.0)
        w = w / max(float(w.sum()), 1e-300)
        tau2 = (w[:, None] * model.tau2).sum(axis=0)
    if settings.consensus_tau2_estimate == "em":
        tau2 = tau2 + _posterior_variance(joint, tau2, acc.n_shells)
    vol = joint.reconstruct(tau2=xp.asarray(tau2), tau2_fudge=settings.tau2_fudge,
                            gridding=settings.gridding)
    del joint
    if symmetrise is not None:
        vol = symmetrise(vol)
    if solvent_mask is not None:
        vol = flatten_solvent(vol, solvent_mask, settings.solvent_mask2, xp)
    model.consensus_ref = to_numpy(vol).astype(np.float32)


# ----------------------------------------------------------------------------- --norm, --scale

#: The norm-correction sums leave out shells 0..3 (RELION: ``ires > 3``), where CTF and
#: model errors dominate the residual.
NORM_MIN_SHELL = 4
#: The scale-correction sums use the shells where the live classes' best SSNR (our
#: ``T tau2 <W>``, RELION's ``data_vs_prior``) exceeds this (RELION: > 3, per class) ...
SCALE_MIN_SSNR = 3.0
#: ... and always shells 1..3 (so that the first iterations, before any SSNR, have some).
SCALE_ALWAYS_SHELLS = 3


def correction_pixels(model, pixel_shell, current_shell, do_norm, do_scale):
    """0/1 float64 weights over the E-step pixels (``pixel_shell`` (n,) host ints, all
    ``<= current_shell``) of the ``--norm`` and ``--scale`` sums; None where off.

    Norm: shells > 3 (RELION).  Scale: shells 1..3 and the shells where the SSNR of the
    model (max over the classes with prior > 0.001, from the last M-step) is > 3 --
    RELION takes each class's own shells with data-vs-prior > 3; one set for all
    classes keeps the batched fine pass's sums per pixel, and the classes' SSNRs are
    close whenever they share particles.  Shell 0 (the mean, set by the background
    normalisation) is never used.
    """
    pixel_shell = np.asarray(pixel_shell)
    norm = (pixel_shell >= NORM_MIN_SHELL).astype(np.float64) if do_norm else None
    scale = None
    if do_scale:
        alive = model.pdf_class > 0.001
        ssnr = model.ssnr[alive].max(axis=0) if alive.any() else np.zeros(model.n_shells)
        good = ssnr > SCALE_MIN_SSNR
        good[1:SCALE_ALWAYS_SHELLS + 1] = True
        good[0] = False
        good[current_shell + 1:] = False
        scale = good[np.minimum(pixel_shell, model.n_shells - 1)].astype(np.float64)
    return norm, scale


def norm_power_beyond(shell_power):
    """Per particle (host (B,)): the image power of the shells beyond the E-step radius
    (``shell_power`` (B, n_shells), zero inside it) that the norm sums take (RELION
    extends ``exp_wsum_norm_correction`` with them, as the noise spectra)."""
    return np.asarray(shell_power)[:, NORM_MIN_SHELL:].sum(axis=1)


def update_norm_corrections(model, subset, wsum):
    """RELION's norm-correction update for the particles ``subset`` from ``wsum`` (their
    posterior-weighted residual power, :func:`correction_pixels` / :func:`norm_power_beyond`,
    in the engine's unnormalised FFT scale).

    ``n_new = (n_old / avg_norm_old) * sqrt(2 W)``; the factor 2 because W, like sigma2,
    is a variance per real/imaginary component.  A particle whose sum is zero or not
    finite keeps its value.  ``avg_norm`` becomes the mean of the updated particles' new
    values (RELION: of the particles of the iteration; all of them without
    ``--fast_subsets``).
    """
    # RELION's forward FFT divides by the number of pixels N = box^2; the engine's is
    # unnormalised (fourier.py), so its |.|^2 sums are N^2 times RELION's.
    n_pix = float(model.box) ** 2
    w = np.asarray(wsum, dtype=np.float64) / n_pix ** 2
    old = model.part_norm[subset]
    with np.errstate(invalid="ignore", divide="ignore"):
        new = (old / model.avg_norm) * np.sqrt(2.0 * np.maximum(w, 0.0))
    ok = np.isfinite(new) & (new > 0) & np.isfinite(w) & (w > 0)
    new = np.where(ok, new, old)
    model.part_norm[subset] = new
    if new.size and np.isfinite(new.mean()) and new.mean() > 0:
        model.avg_norm = float(new.mean())


def update_scale_corrections(model, groups, xa, aa, group_counts):
    """RELION's scale-correction update from the per-particle sums ``xa`` =
    ``sum_w Re(X s conj(C P))`` and ``aa`` = ``sum_w |C P|^2`` (``groups`` the
    particles' groups), taken with the CTF times the group's current scale.

    ``s_g = XA_g / AA_g`` with the current scale divided out of the sums (``XA / s``,
    ``AA / s^2``, as RELION); a group without sums (``AA_g == 0``) or with a
    non-positive ratio keeps its scale.  All are then divided by their mean weighted by
    the groups' particle counts, so that the average scale is 1 (RELION).
    """
    G = model.n_groups
    old = np.asarray(model.scale_correction, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    s_part = old[groups]
    XA = np.bincount(groups, weights=np.asarray(xa) / s_part, minlength=G)[:G]
    AA = np.bincount(groups, weights=np.asarray(aa) / s_part ** 2, minlength=G)[:G]
    new = old.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = XA / AA
    ok = (AA > 0) & np.isfinite(ratio) & (ratio > 0)
    new[ok] = ratio[ok]
    counts = np.asarray(group_counts, dtype=np.float64)
    mean = float((counts * new).sum() / max(counts.sum(), 1e-300))
    if np.isfinite(mean) and mean > 0:
        new /= mean
    model.scale_correction = new
