"""Coarse-to-fine search of one block of particles (RELION's adaptive oversampling).

Pass 1 (coarse): every particle against every class x coarse rotation x coarse
translation, on the Fourier pixels inside the coarse radius, as the GEMMs of
:mod:`.estep`.  The samples that carry ``adaptive_fraction`` (0.999) of each particle's
posterior are significant.  Pass 2 (fine): the oversampled children of the significant
rotations (8 per rotation for one oversampling step) times the children of the
significant translations (4 per translation), on all pixels inside the current radius.
Projections of the children are computed once per group of particles (the union of
their significant rotations) and each particle's scores are one GEMM.

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

# Upper bound on fine rotation rows projected at once (bounds memory: rows x pixels).
MAX_UNION_ROWS = 16384


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


def fine_pass(setup, block, sig_t, sig_kr, acc, xp, results, first_index):
    """Evaluate the oversampled children of the significant samples and accumulate."""
    B = block.images_f.shape[0]
    R = setup.orientations.matrices.shape[0]
    n_child_rot = 8 ** setup.oversampling
    groups, current, size = [], [], 0
    for b in range(B):
        n_rows = np.unique(sig_kr[b]).shape[0] * n_child_rot
        if current and size + n_rows > MAX_UNION_ROWS:
            groups.append(current)
            current, size = [], 0
        current.append(b)
        size += n_rows
    if current:
        groups.append(current)
    for members in groups:
        _fine_group(setup, block, members, sig_t, sig_kr, acc, xp, results, first_index,
                    R, n_child_rot)


def _fine_group(setup, block, members, sig_t, sig_kr, acc, xp, results, first_index,
                R, n_child_rot):
    per_kr = [np.unique(sig_kr[b]) for b in members]
    union, inverse = np.unique(np.concatenate(per_kr), return_inverse=True)
    union_class = union // R
    union_rot = union % R
    child_eulers, _ = setup.orientations.children(union_rot, setup.oversampling)
    child_eulers = np.asarray(child_eulers, dtype=np.float64)
    child_class = np.repeat(union_class, n_child_rot)
    child_mats_host = euler_to_matrix(child_eulers[:, 0], child_eulers[:, 1], child_eulers[:, 2])
    child_mats = xp.asarray(child_mats_host)
    n_rows, n_pix = child_eulers.shape[0], setup.ky.shape[0]
    slices = xp.empty((n_rows, n_pix), dtype=xp.complex64)
    for k in np.unique(child_class):
        rows = np.nonzero(child_class == k)[0]
        slices[xp.asarray(rows)] = setup.projectors[k].project(child_mats[xp.asarray(rows)],
                                                                setup.ky, setup.kx)
    pair = estep.as_real_pair(slices)
    power = slices.real ** 2 + slices.imag ** 2
    data_acc = xp.zeros_like(slices)
    weight_acc = xp.zeros((n_rows, n_pix), dtype=xp.float32)
    log_prior_rows = setup.log_class_prior[xp.asarray(child_class)]
    offset = 0
    for j, b in enumerate(members):
        n_kr = per_kr[j].shape[0]
        pos = inverse[offset:offset + n_kr]
        offset += n_kr
        rows = (pos[:, None] * n_child_rot + np.arange(n_child_rot)[None, :]).ravel()
        rows_d = xp.asarray(rows)
        t_children, _ = setup.translations.children(np.unique(sig_t[b]), setup.oversampling)
        t_children = np.asarray(t_children, dtype=np.float32)
        shifts = estep.phase_shifts(t_children, setup.ky, setup.kx, setup.box)
        x = block.images_f[b:b + 1]
        c = block.ctf[b:b + 1]
        isg = block.inv_sigma2[b:b + 1]
        total_off = block.origin_px[b][None, :] + t_children                      # (Tf, 2) px
        if setup.use_cc:
            scores = estep.cross_correlations(x, c, shifts, pair[rows_d], power[rows_d])[0]
            best = int(to_numpy(scores.argmax()))
            prob = xp.zeros(scores.shape, dtype=xp.float32)
            prob.ravel()[best] = 1.0
            loglik = float(to_numpy(scores.max()))
        else:
            w, pw, const = estep.image_terms(x, c, isg)
            scores = estep.log_likelihoods(w, pw, const, shifts, pair[rows_d], power[rows_d])[0]
            scores += xp.asarray(estep.log_offset_prior(total_off, setup.sigma_offset_px))[:, None]
            scores += log_prior_rows[rows_d][None, :]
            prob, lse = estep.normalise_log(scores.reshape(1, -1))
            prob = prob.reshape(scores.shape)
            loglik = float(to_numpy(lse[0]))
        # M-step sums for this particle.
        shifted = x * shifts                                                       # (Tf, n)
        w_rot = prob.sum(axis=0)                                                   # (nrf,)
        w_trans = prob.sum(axis=1)                                                 # (Tf,)
        summed = prob.T.astype(xp.complex64) @ shifted                             # (nrf, n)
        ctf_w = c[0] * isg[0]
        data_acc[rows_d] += summed * ctf_w[None, :]
        weight_acc[rows_d] += w_rot[:, None] * (c[0] * ctf_w)[None, :]
        p_rows = slices[rows_d]
        residual = ((x[0].real ** 2 + x[0].imag ** 2) * w_rot.sum()
                    - 2.0 * c[0] * (summed * xp.conj(p_rows)).real.sum(axis=0)
                    + c[0] ** 2 * (w_rot @ power[rows_d]))
        acc.add_noise(block.group[b], setup.pixel_shell, residual)
        acc.add_offsets(float(to_numpy((w_trans * (xp.asarray(total_off) ** 2).sum(axis=1)).sum())),
                        float(to_numpy(w_trans.sum())))
        acc.add_class_weights(xp.asarray(child_class[rows]), w_rot)
        # Best sample and accuracies.
        flat_best = int(to_numpy(prob.argmax()))
        t_best, r_best = divmod(flat_best, len(rows))
        row_best = rows[r_best]
        mats_rows = child_mats_host[rows]
        w_rot_h = to_numpy(w_rot).astype(np.float64)
        ang = angular_distance_deg(mats_rows, child_mats_host[row_best][None])
        w_trans_h = to_numpy(w_trans).astype(np.float64)
        dt = np.sqrt(((t_children - t_children[t_best]) ** 2).sum(axis=1))
        i = first_index + b
        results["class"][i] = int(child_class[row_best])
        results["eulers"][i] = child_eulers[row_best]
        results["origin_px"][i] = total_off[t_best]
        results["pmax"][i] = float(to_numpy(prob.max()))
        results["loglik"][i] = loglik
        results["acc_rot"][i] = float((w_rot_h * ang).sum())
        results["acc_trans_px"][i] = float((w_trans_h * dt).sum())
    for k in np.unique(child_class):
        rows = xp.asarray(np.nonzero(child_class == k)[0])
        acc.backprojectors[k].insert(child_mats[rows], setup.ky, setup.kx,
                                     data_acc[rows], weight_acc[rows])
