"""Coarse-to-fine search of one block of particles (RELION's adaptive oversampling).

Pass 1 (coarse): every particle against every class x coarse rotation x coarse
translation, on the Fourier pixels inside the coarse radius, as the GEMMs of
:mod:`.estep`.  The samples that carry ``adaptive_fraction`` (0.999) of each particle's
posterior are significant.  Pass 2 (fine): the oversampled children of the significant
rotations (8 per rotation for one oversampling step) times the children of the
significant translations (4 per translation), on all pixels inside the current radius.
Projections of the children are computed once per iteration (or per chunk of particles
when memory is short) for the union of the rotations that any particle needs
(:class:`FineTables`), and each particle's scores are one GEMM.

The fine posterior then feeds the M-step sums (:class:`.mstep.Accumulators`): per
significant rotation, the posterior-weighted, re-centred, CTF- and noise-weighted image
``sum_t w_t X s_t`` (one GEMM ``w^T @ X s``) is added to that rotation's 2D slice, and
all slices of a group are inserted into the 3D accumulators once.
"""
from dataclasses import dataclass

import numpy as np

from . import estep
from .backend import to_numpy
from .geometry import euler_to_matrix, angular_distance_deg



@dataclass
class BlockData:
    """One block of particles on the device.

    images_f : (B, n) complex64 -- half-plane pixels inside the current radius, already
        re-centred by each particle's current origin
    ctf : (B, n) float32;  inv_sigma2 : (B, n) float32 (1 / sigma2 of the particle's
    group and the pixel's shell);  group : (B,) int;  origin_px : (B, 2) current origins
    allowed_class : (B,) int or None -- restrict a particle to one class (RELION's random
        seeding in the first iteration)
    """
    images_f: object
    ctf: object
    inv_sigma2: object
    group: np.ndarray
    origin_px: np.ndarray
    allowed_class: object = None


@dataclass
class SearchSetup:
    """Everything fixed for one iteration."""
    box: int
    n_coarse: int                 # pixels of the coarse pass (a prefix of the list)
    ky: object                    # (n,) pixel list, sorted by radius
    kx: object
    pixel_shell: object           # (n,) int shell of each pixel
    n_classes: int
    orientations: object          # sampling.OrientationGrid (coarse)
    translations: object          # sampling.TranslationGrid (coarse)
    oversampling: int
    coarse_pair: object           # (K*R, 2 n_coarse) real  [Re P | Im P]
    coarse_power: object          # (K*R, n_coarse) real |P|^2
    projectors: list              # per class Projector
    log_class_prior: object       # (K,)
    sigma_offset_px: float
    adaptive_fraction: float = 0.999
    max_significant: int = None
    use_cc: bool = False          # --firstiter_cc in iteration 1
    block_log_budget: int = 64 * 2 ** 20   # floats of coarse scores per sub-block


def coarse_pass(setup, block, xp):
    """Significant coarse samples per particle: list of (t_idx, kr_idx) arrays."""
    B = block.images_f.shape[0]
    nc = setup.n_coarse
    R = setup.orientations.matrices.shape[0]
    T = setup.translations.offsets.shape[0]
    KR = setup.n_classes * R
    shifts = estep.phase_shifts(setup.translations.offsets, setup.ky[:nc], setup.kx[:nc], setup.box)
    total_offsets = xp.asarray(block.origin_px, dtype=xp.float32)[:, None, :] + \
        xp.asarray(setup.translations.offsets, dtype=xp.float32)[None, :, :]
    prior_t = estep.log_offset_prior(total_offsets, setup.sigma_offset_px)        # (B, T)
    class_of_col = xp.repeat(xp.arange(setup.n_classes), R)
    col_prior = setup.log_class_prior[class_of_col]                               # (KR,)
    step = max(1, int(setup.block_log_budget // max(1, T * KR)))
    sig_t, sig_kr, n_sig = [], [], []
    for s in range(0, B, step):
        e = min(B, s + step)
        x = block.images_f[s:e, :nc]
        c = block.ctf[s:e, :nc]
        if setup.use_cc:
            scores = estep.cross_correlations(x, c, shifts, setup.coarse_pair, setup.coarse_power)
            # Hard maximum: only the best sample is significant.
        else:
            w, pw, _ = estep.image_terms(x, c, block.inv_sigma2[s:e, :nc])
            zero = xp.zeros(e - s, dtype=xp.float32)
            scores = estep.log_likelihoods(w, pw, zero, shifts, setup.coarse_pair, setup.coarse_power)
            scores += prior_t[s:e, :, None] + col_prior[None, None, :]
        if block.allowed_class is not None:
            allowed = xp.asarray(block.allowed_class[s:e])
            scores = xp.where((class_of_col[None, None, :] == allowed[:, None, None]),
                              scores, -xp.inf)
        flat = scores.reshape(e - s, T * KR)
        if setup.use_cc:
            chosen = [xp.asarray([int(i)]) for i in to_numpy(flat.argmax(axis=1))]
        else:
            chosen, _ = estep.significant_samples(flat, setup.adaptive_fraction,
                                                  setup.max_significant)
        for idx in chosen:
            idx = to_numpy(idx)
            sig_t.append(idx // KR)
            sig_kr.append(idx % KR)
            n_sig.append(idx.shape[0])
    return sig_t, sig_kr, np.asarray(n_sig)


ROW_POSTERIOR_FLOOR = 1e-4


class FineTables:
    """Projections and M-step slice sums of the oversampled rotations that some particle
    of a chunk needs, for one iteration.

    Global fine-row id: ``(k * R + r) * C + c`` for class ``k``, coarse rotation ``r`` and
    child ``c`` (``C = 8**oversampling``).  ``rows`` (sorted) are the ids held; row ``i``
    of ``slices`` / ``data`` / ``weight`` belongs to ``rows[i]``.  Each rotation is
    projected once per chunk, and its summed slice is inserted into the 3D accumulators
    once (:meth:`insert_into`), whatever the number of particles that used it.
    """

    def __init__(self, setup, coarse_kr, xp):
        self.xp = xp
        self.setup = setup
        R = setup.orientations.matrices.shape[0]
        C = 8 ** setup.oversampling
        self.n_child = C
        coarse_kr = np.unique(coarse_kr)
        self.coarse_kr = coarse_kr
        self.rows = (coarse_kr[:, None] * C + np.arange(C)[None, :]).ravel()
        eulers, _ = setup.orientations.children(coarse_kr % R, setup.oversampling)
        self.eulers = np.asarray(eulers, dtype=np.float64)
        self.row_class = np.repeat(coarse_kr // R, C)
        self.matrices_host = euler_to_matrix(self.eulers[:, 0], self.eulers[:, 1], self.eulers[:, 2])
        self.matrices = xp.asarray(self.matrices_host)
        n_pix = setup.ky.shape[0]
        self.slices = xp.empty((self.rows.shape[0], n_pix), dtype=xp.complex64)
        for k in np.unique(self.row_class):
            sel = xp.asarray(np.nonzero(self.row_class == k)[0])
            self.slices[sel] = setup.projectors[k].project(self.matrices[sel], setup.ky, setup.kx)
        self.power = self.slices.real ** 2 + self.slices.imag ** 2
        self.data = xp.zeros_like(self.slices)
        self.weight = xp.zeros(self.slices.shape, dtype=xp.float32)
        self.row_posterior = xp.zeros(self.rows.shape[0], dtype=xp.float64)
        self.log_prior = setup.log_class_prior[xp.asarray(self.row_class)]

    def positions(self, coarse_kr):
        """Table rows (positions) of all children of coarse (class, rotation) ids."""
        pos = np.searchsorted(self.coarse_kr, coarse_kr)
        return (pos[:, None] * self.n_child + np.arange(self.n_child)[None, :]).ravel()

    def insert_into(self, backprojectors):
        xp = self.xp
        # Rotations that carry less than 1e-4 of one particle's posterior in total change
        # the maps by far less than the noise; skipping them saves most of the insertion.
        used = to_numpy(self.row_posterior) > ROW_POSTERIOR_FLOOR
        for k in np.unique(self.row_class):
            sel = np.nonzero((self.row_class == k) & used)[0]
            if sel.size:
                sel_d = xp.asarray(sel)
                backprojectors[k].insert(self.matrices[sel_d], self.setup.ky, self.setup.kx,
                                         self.data[sel_d], self.weight[sel_d])


def fine_pass(setup, block, sig_t, sig_kr, tables, acc, xp, results, first_index):
    """Evaluate the oversampled children of each particle's significant samples, take
    the posterior over them, and add the particle to the M-step sums."""
    for b in range(block.images_f.shape[0]):
        _fine_particle(setup, block, b, sig_t[b], sig_kr[b], tables, acc, xp, results,
                       first_index + b)


def _fine_particle(setup, block, b, sig_t, sig_kr, tables, acc, xp, results, i):
    rows = tables.positions(np.unique(sig_kr))
    rows_d = xp.asarray(rows)
    t_children, _ = setup.translations.children(np.unique(sig_t), setup.oversampling)
    t_children = np.asarray(t_children, dtype=np.float32)
    shifts = estep.phase_shifts(t_children, setup.ky, setup.kx, setup.box)
    x = block.images_f[b:b + 1]
    c = block.ctf[b:b + 1]
    isg = block.inv_sigma2[b:b + 1]
    total_off = block.origin_px[b][None, :] + t_children                           # (Tf, 2) px
    p_rows = tables.slices[rows_d]
    pow_rows = tables.power[rows_d]
    if setup.use_cc:
        scores = estep.cross_correlations(x, c, shifts, estep.as_real_pair(p_rows), pow_rows)[0]
        best = int(to_numpy(scores.argmax()))
        prob = xp.zeros(scores.shape, dtype=xp.float32)
        prob.ravel()[best] = 1.0
        loglik = float(to_numpy(scores.max()))
    else:
        w, pw, const = estep.image_terms(x, c, isg)
        scores = estep.log_likelihoods(w, pw, const, shifts, estep.as_real_pair(p_rows), pow_rows)[0]
        scores += xp.asarray(estep.log_offset_prior(total_off, setup.sigma_offset_px))[:, None]
        scores += tables.log_prior[rows_d][None, :]
        prob, lse = estep.normalise_log(scores.reshape(1, -1))
        prob = prob.reshape(scores.shape)
        loglik = float(to_numpy(lse[0]))
    # M-step sums: sum_t w X s_t per rotation is one GEMM.
    shifted = x * shifts                                                           # (Tf, n)
    w_rot = prob.sum(axis=0)                                                       # (nrf,)
    w_trans = prob.sum(axis=1)                                                     # (Tf,)
    summed = prob.T.astype(xp.complex64) @ shifted                                 # (nrf, n)
    ctf_w = c[0] * isg[0]
    tables.data[rows_d] += summed * ctf_w[None, :]
    tables.weight[rows_d] += w_rot[:, None] * (c[0] * ctf_w)[None, :]
    tables.row_posterior[rows_d] += w_rot
    residual = ((x[0].real ** 2 + x[0].imag ** 2) * w_rot.sum()
                - 2.0 * c[0] * (summed * xp.conj(p_rows)).real.sum(axis=0)
                + c[0] ** 2 * (w_rot @ pow_rows))
    acc.add_noise(block.group[b], setup.pixel_shell, residual)
    acc.add_offsets(float(to_numpy((w_trans * (xp.asarray(total_off) ** 2).sum(axis=1)).sum())),
                    float(to_numpy(w_trans.sum())))
    acc.add_class_weights(xp.asarray(tables.row_class[rows]), w_rot)
    # Best sample and accuracies.
    t_best, r_best = divmod(int(to_numpy(prob.argmax())), len(rows))
    row_best = rows[r_best]
    w_rot_h = to_numpy(w_rot).astype(np.float64)
    ang = angular_distance_deg(tables.matrices_host[rows], tables.matrices_host[row_best][None])
    w_trans_h = to_numpy(w_trans).astype(np.float64)
    dt = np.sqrt(((t_children - t_children[t_best]) ** 2).sum(axis=1))
    results["class"][i] = int(tables.row_class[row_best])
    results["eulers"][i] = tables.eulers[row_best]
    results["origin_px"][i] = total_off[t_best]
    results["pmax"][i] = float(to_numpy(prob.max()))
    results["loglik"][i] = loglik
    results["acc_rot"][i] = float((w_rot_h * ang).sum())
    results["acc_trans_px"][i] = float((w_trans_h * dt).sum())


def fixed_pose_pass(setup, block, eulers, acc, xp, results, first_index, n_class_pixels=None,
                    hard=False):
    """Classification without alignment (RELION's ``--skip_align``): each particle keeps
    its rotation (``eulers`` (B, 3), degrees) and origin; only its class posterior is
    computed, from the pixels of the first ``n_class_pixels`` of the list (a resolution
    limit for the class assignment), and the particle is added to every class's sums in
    proportion to it.  ``hard`` gives each particle wholly to its best class (the
    classification-EM variant used for restarts).
    """
    B = block.images_f.shape[0]
    K = setup.n_classes
    mats_h = euler_to_matrix(eulers[:, 0], eulers[:, 1], eulers[:, 2])
    mats = xp.asarray(mats_h)
    slices = xp.stack([p.project(mats, setup.ky, setup.kx) for p in setup.projectors])  # (K,B,n)
    x, c, isg = block.images_f, block.ctf, block.inv_sigma2
    m = x.shape[1] if n_class_pixels is None else int(n_class_pixels)
    w, pw, const = estep.image_terms(x[:, :m], c[:, :m], isg[:, :m])
    cross = xp.einsum("bp,kbp->bk", w.real, slices[:, :, :m].real) + \
        xp.einsum("bp,kbp->bk", w.imag, slices[:, :, :m].imag)
    power = xp.einsum("bp,kbp->bk", pw, slices[:, :, :m].real ** 2 + slices[:, :, :m].imag ** 2)
    scores = cross - power - const[:, None] + setup.log_class_prior[None, :]
    if block.allowed_class is not None:
        allowed = xp.asarray(block.allowed_class)
        scores = xp.where(xp.arange(K)[None, :] == allowed[:, None], scores, -xp.inf)
    prob, lse = estep.normalise_log(scores)
    if hard:
        best = prob.argmax(axis=1)
        prob = (xp.arange(K)[None, :] == best[:, None]).astype(prob.dtype)
    ctf_w = c * isg
    total = xp.zeros(x.shape[1], dtype=xp.float64)
    for k in range(K):
        keep = to_numpy(prob[:, k] > 1e-6)
        if keep.any():
            sel = xp.asarray(np.nonzero(keep)[0])
            pk = prob[sel, k][:, None]
            acc.backprojectors[k].insert(mats[sel], setup.ky, setup.kx,
                                         (pk * x[sel] * ctf_w[sel]).astype(xp.complex64),
                                         (pk * c[sel] * ctf_w[sel]).astype(xp.float32))
    for b in range(B):
        diff = x[b][None, :] - c[b][None, :] * slices[:, b, :]
        residual = (prob[b][:, None] * (diff.real ** 2 + diff.imag ** 2)).sum(axis=0)
        acc.add_noise(block.group[b], setup.pixel_shell, residual)
    acc.add_class_weights(xp.repeat(xp.arange(K), B), prob.T.ravel())
    origins = block.origin_px.astype(np.float64)
    acc.add_offsets(float((origins ** 2).sum()), float(B))
    prob_h = to_numpy(prob)
    idx = slice(first_index, first_index + B)
    results["class"][idx] = prob_h.argmax(axis=1)
    results["eulers"][idx] = eulers
    results["origin_px"][idx] = origins
    results["pmax"][idx] = prob_h.max(axis=1)
    results["loglik"][idx] = to_numpy(lse)
    results["acc_rot"][idx] = 0.0
    results["acc_trans_px"][idx] = 0.0
    results["nsig"][idx] = (prob_h > 1e-3).sum(axis=1)
