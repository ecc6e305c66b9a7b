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

With ``--norm`` / ``--scale`` (``SearchSetup.norm_pixels`` / ``scale_pixels``) the fine
pass (and the fixed-pose pass) also adds per-particle sums to the results: the
posterior-weighted residual power (RELION's ``exp_wsum_norm_correction``) and the
cross and reference-power terms of the scale correction (``exp_wsum_scale_correction_XA``
/ ``_AA``); the M-step turns them into the corrections (:mod:`.mstep`).
"""
from dataclasses import dataclass, field, fields

import numpy as np

from . import estep, workers
from .backend import get_xp, to_numpy
from .geometry import euler_to_matrix, angular_distance_deg
from .local_search import rotation_log_prior



@dataclass
class BlockData:
    """One block of particles on the device.

    images_f : (B, n) complex64 -- half-plane pixels inside the current radius, already
        re-centred by each particle's current origin
    ctf : (B, n) float32;  inv_sigma2 : (B, n) float32 (1 / sigma2 of the particle's
    group and the pixel's shell);  group : (B,) int;  origin_px : (B, 2) current origins
    allowed_class : (B,) int or None -- restrict a particle to one class (RELION's random
        seeding in the first iteration)
    prior_views : (B, G, 3, 3) float64 or None -- local searches: each particle's current
        orientation times the symmetry elements (:func:`.local_search.prior_views`)
    """
    images_f: object
    ctf: object
    inv_sigma2: object
    group: np.ndarray
    origin_px: np.ndarray
    allowed_class: object = None
    prior_views: object = None


def sub_block(block, idx):
    """The particles ``idx`` (host indices) of a :class:`BlockData`."""
    idx = np.asarray(idx, dtype=np.int64)
    idx_d = get_xp(block.images_f).asarray(idx)
    return BlockData(images_f=block.images_f[idx_d], ctf=block.ctf[idx_d],
                     inv_sigma2=block.inv_sigma2[idx_d], group=block.group[idx],
                     origin_px=block.origin_px[idx],
                     allowed_class=None if block.allowed_class is None
                     else np.asarray(block.allowed_class)[idx],
                     prior_views=None if block.prior_views is None
                     else block.prior_views[idx])


@dataclass
class ScoreCounts:
    """How many (particle, class, rotation, translation) scores an iteration's passes
    computed, counted where they are computed.

    coarse : the coarse pass (global: particles x active classes x rotations x
        translations; local: each particle's candidate rotations x classes x
        translations, padding left out)
    significant : the coarse samples that carry ``adaptive_fraction`` of a particle's
        posterior (:func:`.estep.significant_samples`), the ones the fine pass expands
    fine : the fine pass, each particle's oversampled rotations x translations
    fine_padded : the fine pass as computed (sub-batches padded to their largest sets)
    fixed : the fixed-pose pass, particles x classes
    pruned_particles : particles whose coarse pass of a global search scored only the
        rotations near their pose (:func:`.iteration.prune_radius`)
    """
    coarse: int = 0
    significant: int = 0
    fine: int = 0
    fine_padded: int = 0
    fixed: int = 0
    pruned_particles: int = 0

    def as_dict(self):
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    def summed_over_ranks(self, comm):
        """The counts of all ranks (``comm``: :mod:`.mpi`)."""
        if comm.size == 1:
            return self
        total = to_numpy(comm.allreduce_sum(np.array(list(self.as_dict().values()),
                                                     dtype=np.int64)))
        return ScoreCounts(*(int(v) for v in total))

    def summary(self):
        """The log's ``scores:`` text."""
        if self.fixed and not (self.coarse or self.fine):
            return f"fixed-pose {self.fixed}"
        share = self.significant / self.coarse if self.coarse else 0.0
        return (f"coarse {self.coarse}  significant {self.significant} "
                f"({100.0 * share:.3g} % of coarse)  fine {self.fine} "
                f"(computed {self.fine_padded})")


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
    projectors: list              # per class Projector (None: a class not scored)
    log_class_prior: object       # (K,)
    sigma_offset_px: float
    adaptive_fraction: float = 0.999
    max_significant: int = None
    use_cc: bool = False          # --firstiter_cc in iteration 1
    # Classes that have coarse slices (rows of coarse_pair/power, R rows each, in this
    # order); None = all K.  The consensus iterations of a consensus start use one.
    coarse_classes: object = None
    block_log_budget: int = 64 * 2 ** 20   # floats of coarse scores per sub-block
    # Local searches (--sigma_ang, degrees): the rotation prior's sigma; 0 = global.
    sigma_ang: float = 0.0
    # --norm: (n,) float64 0/1 over the pixels whose posterior-weighted residual power
    # goes into each particle's norm-correction sum (results.norm_resid); None = off.
    norm_pixels: object = None
    # --scale: (n,) float64 0/1 over the pixels of the scale-correction sums
    # (results.scale_xa = sum w Re(X s conj(C P)), results.scale_aa = sum w |C P|^2,
    # with the CTF C as used, i.e. including the group's current scale); None = off.
    scale_pixels: object = None
    # The scores computed this iteration (added to by the passes).
    counts: ScoreCounts = field(default_factory=ScoreCounts)


def coarse_pass(setup, block, xp):
    """Significant coarse samples per particle: list of (t_idx, kr_idx) arrays."""
    B = block.images_f.shape[0]
    nc = setup.n_coarse
    R = setup.orientations.matrices.shape[0]
    T = setup.translations.offsets.shape[0]
    classes = (np.arange(setup.n_classes) if setup.coarse_classes is None
               else np.asarray(setup.coarse_classes, dtype=np.int64))
    KR = classes.shape[0] * R
    shifts = estep.phase_shifts(setup.translations.offsets, setup.ky[:nc], setup.kx[:nc], setup.box)
    total_offsets = xp.asarray(block.origin_px, dtype=xp.float32)[:, None, :] + \
        xp.asarray(setup.translations.offsets, dtype=xp.float32)[None, :, :]
    prior_t = estep.log_offset_prior(total_offsets, setup.sigma_offset_px)        # (B, T)
    class_of_col = xp.repeat(xp.asarray(classes), R)
    col_prior = setup.log_class_prior[class_of_col]                               # (KR,)
    # On the CPU the particles' score blocks run side by side on the worker threads
    # (element-wise passes and the significance search are single-threaded numpy), each
    # with single-threaded BLAS; the blocks shrink so that their scores together stay
    # within the budget.
    n_threads = workers.workers() if xp is np else 1
    step = max(1, int(setup.block_log_budget // max(1, T * KR * n_threads)))

    def significant_in(s, e):
        x = block.images_f[s:e, :nc]
        c = block.ctf[s:e, :nc]
        if setup.use_cc:
            scores = estep.cross_correlations(x, c, shifts, setup.coarse_pair, setup.coarse_power)
            # Hard maximum: only the best sample is significant.
        else:
            w, pw, _ = estep.image_terms(x, c, block.inv_sigma2[s:e, :nc])
            zero = xp.zeros(e - s, dtype=xp.float32)
            scores = estep.log_likelihoods(w, pw, zero, shifts, setup.coarse_pair, setup.coarse_power)
            # Two in-place additions: their sum would be a third block-sized array.
            scores += prior_t[s:e, :, None]
            scores += col_prior[None, None, :]
        if block.allowed_class is not None:
            allowed = xp.asarray(block.allowed_class[s:e])
            scores = xp.where((class_of_col[None, None, :] == allowed[:, None, None]),
                              scores, -xp.inf)
        flat = scores.reshape(e - s, T * KR)
        if setup.use_cc:
            return [xp.asarray([int(i)]) for i in to_numpy(flat.argmax(axis=1))]
        return estep.significant_samples(flat, setup.adaptive_fraction,
                                         setup.max_significant)[0]

    with workers.single_threaded_blas(n_threads > 1):
        chosen_per_range = workers.map_ranges(significant_in, workers.split(B, step),
                                              threaded=xp is np)
    setup.counts.coarse += B * T * KR
    sig_t, sig_kr, n_sig = [], [], []
    for chosen in chosen_per_range:
        for idx in chosen:
            idx = to_numpy(idx)
            col = idx % KR
            sig_t.append(idx // KR)
            sig_kr.append(classes[col // R] * R + col % R)     # global (class, rotation) id
            n_sig.append(idx.shape[0])
    setup.counts.significant += int(np.sum(n_sig))
    return sig_t, sig_kr, np.asarray(n_sig)


ROW_POSTERIOR_FLOOR = 1e-4
# Table rows per block of the |slice|^2 pass (4096 x 1500 pixels x 4 bytes: 24 MB).
_POWER_ROWS = 4096


class FineTables:
    """Projections and M-step slice sums of the oversampled rotations that some particle
    of a chunk needs, for one iteration.

    Global fine-row id: ``(k * R + r) * C + c`` for class ``k``, coarse rotation ``r`` and
    child ``c`` (``C = 8**oversampling``).  ``rows`` (sorted) are the ids held; row ``i``
    of ``slices`` / ``data`` / ``weight`` belongs to ``rows[i]``.  Each rotation is
    projected once per chunk, and its summed slice is inserted into the 3D accumulators
    once (:meth:`insert_into`), whatever the number of particles that used it.
    """
    #: Bytes per (row, pixel): the slice (complex64), its power (float32) and the
    #: M-step sums ``data`` (complex64) and ``weight`` (float32); ``--fine_table_bytes``
    #: bounds rows x pixels x this.
    BYTES_PER_VALUE = 8 + 4 + 8 + 4

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
        shape = (self.rows.shape[0], n_pix)
        # The rows are sorted by (class, rotation): each class's rows are one block,
        # projected in place; the power is formed block by block (no table-sized
        # temporaries).  The sums are allocated zeroed rather than filled with zeros
        # (the memory is zeroed as the fine pass first writes it).
        self.slices = xp.empty(shape, dtype=xp.complex64)
        self.power = xp.empty(shape, dtype=xp.float32)
        for k in np.unique(self.row_class):
            start, stop = np.searchsorted(self.row_class, [k, k + 1])
            setup.projectors[k].project(self.matrices[start:stop], setup.ky, setup.kx,
                                        out=self.slices[start:stop])
        for start, stop in workers.split(shape[0], _POWER_ROWS):
            block = self.slices[start:stop]
            power = self.power[start:stop]
            xp.multiply(block.real, block.real, out=power)
            power += xp.square(block.imag)
        self.data = xp.zeros(shape, dtype=xp.complex64)
        self.weight = xp.zeros(shape, dtype=xp.float32)
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


# Memory of one fine sub-batch: particles x (padded) fine rotations (or translations) x
# 2 n_pix float32, the size of its largest arrays (gathered slices, M-step sums).  The CPU
# prefers smaller sub-batches (cache); the GPU larger ones (fewer launches).
FINE_BATCH_BYTES = 256 * 2 ** 20
FINE_BATCH_BYTES_GPU_MAX = 2 * 2 ** 30
FINE_BATCH_BYTES_CPU = 16 * 2 ** 20


def fine_batch_bytes(xp):
    """Sub-batch budget: 16 MiB on the CPU; on a GPU 1/32 of its memory (a sub-batch's
    arrays take about 5 budgets), between 256 MiB and 2 GiB: larger sub-batches mean
    fewer kernel launches in the early iterations, when particles have thousands of
    significant rotations."""
    if xp is np:
        return FINE_BATCH_BYTES_CPU
    total = xp.cuda.Device().mem_info[1]
    return int(min(FINE_BATCH_BYTES_GPU_MAX, max(FINE_BATCH_BYTES, total // 32)))
# Padding limit of a sub-batch: its padded work (particles x max rotations x max
# translations) may exceed its true work by this fraction plus this many samples.
FINE_BATCH_WASTE = 0.25
FINE_BATCH_SLACK = 1024


def fine_pass(setup, block, sig_t, sig_kr, tables, acc, xp, results, first_index,
              reference=False, batch_bytes=None):
    """Evaluate the oversampled children of each particle's significant samples, take
    the posterior over them, and add the particles to the M-step sums.

    The particles are taken in sub-batches of similar numbers of fine rotations and
    translations (sorted by them); each sub-batch is padded to its largest sets with
    samples of zero posterior, so that its scores, posteriors and M-step sums are a few
    batched GEMMs and a single device-to-host transfer.  ``batch_bytes`` (default
    :func:`fine_batch_bytes`) bounds
    a sub-batch's ``particles x max(rows, translations) x 2 n_pix x 4`` bytes; a particle
    with a larger set goes alone.  ``reference=True`` runs the particle-by-particle code
    instead (:func:`_fine_particle_reference`, kept to test the batched one).
    """
    B = block.images_f.shape[0]
    if reference:
        for b in range(B):
            _fine_particle_reference(setup, block, b, sig_t[b], sig_kr[b], tables, acc, xp,
                                     results, first_index + b)
        return
    if B == 0:
        return
    n_pix = int(setup.ky.shape[0])
    rows = [tables.positions(np.unique(kr)) for kr in sig_kr]
    # Children of every coarse offset once, (T, 4**os, 2); a particle takes its rows.
    n_tc = setup.translations.n_children(setup.oversampling)
    all_children = np.asarray(setup.translations.children(
        np.arange(setup.translations.n_offsets), setup.oversampling)[0],
        dtype=np.float32).reshape(-1, n_tc, 2)
    t_children = [all_children[np.unique(t)].reshape(-1, 2) for t in sig_t]
    n_r = np.array([r.shape[0] for r in rows])
    n_t = np.array([t.shape[0] for t in t_children])
    setup.counts.fine += int((n_r * n_t).sum())
    if batch_bytes is None:
        batch_bytes = fine_batch_bytes(xp)
    budget = batch_bytes // (8 * n_pix)
    order = np.lexsort((n_t, n_r))
    sums = _FineSums(B, n_pix, setup.n_classes, xp)
    # With --j threads the sub-batches run side by side on the worker threads, each with
    # single-threaded BLAS (its GEMMs are small: one sub-batch's rows x pixels).
    _fine_sub_batches(setup, block, rows, t_children, n_r, n_t, order, budget,
                      tables, xp, sums, results, first_index)
    sums.flush(setup, block, acc, xp)


def _fine_sub_batches(setup, block, rows, t_children, n_r, n_t, order, budget, tables, xp,
                      sums, results, first_index):
    """Run the fine pass over sub-batches of the particles in ``order``: each
    sub-batch's scores and sums (:func:`_fine_batch`) on the worker threads on the CPU,
    added to the tables and results in sub-batch order (:func:`_apply_fine_batch`)."""
    batches = _sub_batches(n_r, n_t, order, budget)

    def compute(sel):
        return _fine_batch(setup, block, sel, rows, t_children, tables, xp)

    def apply(out):
        _apply_fine_batch(setup, tables, xp, sums, results, first_index, out)

    workers.map_in_order(compute, apply, batches, threaded=xp is np)


def _sub_batches(n_r, n_t, order, budget):
    """The particles ``order`` (sorted by fine rotations, then translations) cut into
    sub-batches: each grows while it fits the memory budget and its padded work
    (particles x max rows x max translations) stays near its true work; a particle too
    big for the budget goes alone."""
    B = len(order)
    work = n_r * n_t
    batches, start = [], 0
    while start < B:
        b = order[start]
        end, r_max, t_max, true = start + 1, n_r[b], n_t[b], work[b]
        while end < B:
            b = order[end]
            r2, t2, true2 = max(r_max, n_r[b]), max(t_max, n_t[b]), true + work[b]
            count = end + 1 - start
            if count * max(r2, t2) > budget or \
                    count * r2 * t2 > (1.0 + FINE_BATCH_WASTE) * true2 + FINE_BATCH_SLACK:
                break
            r_max, t_max, true, end = r2, t2, true2, end + 1
        batches.append(order[start:end])
        start = end
    return batches


def _add_noise_rows(setup, groups, residual, acc, xp):
    """Add the per-pixel residual power of a block's particles (B, n) to the noise sums
    of their groups (``groups`` (B,) host ints): two small GEMMs (pixels -> shells,
    particles -> groups) instead of a loop over particles."""
    S = acc.n_shells
    shell = setup.pixel_shell
    n_pix = shell.shape[0]
    keep = shell < S
    onehot = xp.zeros((n_pix, S), dtype=xp.float64)
    onehot[xp.arange(n_pix)[keep], shell[keep]] = 1.0
    shell_res = residual.astype(xp.float64) @ onehot                          # (B, S)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    member = np.zeros((uniq.shape[0], inverse.shape[0]))
    member[inverse, np.arange(inverse.shape[0])] = 1.0
    groups_d = xp.asarray(uniq)
    acc.noise_sum[groups_d] += xp.asarray(member) @ shell_res
    acc.noise_count[groups_d] += (xp.asarray(member.sum(axis=1))[:, None]
                                  * onehot.sum(axis=0)[None, :])


class _FineSums:
    """Per-block M-step sums of the fine pass that are not per rotation: residuals (for
    the noise spectra), class weights and offsets, added to the accumulators once."""

    def __init__(self, B, n_pix, n_classes, xp):
        self.residual = xp.zeros((B, n_pix), dtype=xp.float32)
        self.class_weight = np.zeros(n_classes)
        self.offset_sq = 0.0
        self.offset_weight = 0.0

    def flush(self, setup, block, acc, xp):
        _add_noise_rows(setup, block.group, self.residual, acc, xp)
        acc.add_offsets(self.offset_sq, self.offset_weight)
        K = self.class_weight.shape[0]
        acc.add_class_weights(xp.arange(K), xp.asarray(self.class_weight))


def _pad_sub_batch(block, sel, rows, t_children):
    """The fine rotations (table rows) and translations of the particles ``sel``, padded
    to the sub-batch's largest sets (padding repeats a particle's first row /
    translation; its scores become -inf): ``rows_pad`` (Bs, Rm), ``t_pad`` (Bs, Tm, 2),
    the valid mask (Bs, Tm, Rm) on the host, each set's size, and the total offsets
    (current origin + translation, px)."""
    Bs = sel.shape[0]
    n_r = np.array([rows[b].shape[0] for b in sel])
    n_t = np.array([t_children[b].shape[0] for b in sel])
    Rm, Tm = int(n_r.max()), int(n_t.max())
    rows_pad = np.empty((Bs, Rm), dtype=np.int64)
    t_pad = np.empty((Bs, Tm, 2), dtype=np.float32)
    for j, b in enumerate(sel):
        rows_pad[j, :n_r[j]] = rows[b]
        rows_pad[j, n_r[j]:] = rows[b][0]
        t_pad[j, :n_t[j]] = t_children[b]
        t_pad[j, n_t[j]:] = t_children[b][0]
    r_valid = np.arange(Rm)[None, :] < n_r[:, None]
    t_valid = np.arange(Tm)[None, :] < n_t[:, None]
    total_off = block.origin_px[sel][:, None, :] + t_pad                    # (Bs, Tm, 2) px
    return rows_pad, t_pad, t_valid[:, :, None] & r_valid[:, None, :], n_r, total_off


def _fine_posterior(setup, block, sel, x, isg, scores, valid, rows_d, rows_pad, total_off,
                    tables, xp):
    """Posteriors (Bs, Tm * Rm), the best sample, its probability and the
    log-likelihood of a sub-batch from its scores (Bs, Tm, Rm): with ``--firstiter_cc``
    the best cross-correlation takes all the weight; else the Gaussian log-likelihood
    plus the offset, class and (local searches) rotation priors, normalised."""
    f32 = xp.float32
    Bs, Tm, Rm = scores.shape
    if setup.use_cc:
        scores = xp.where(valid, scores, -xp.inf).reshape(Bs, Tm * Rm)
        best = scores.argmax(axis=1)
        loglik = scores.max(axis=1)
        prob = xp.zeros(scores.shape, dtype=f32)
        prob[xp.arange(Bs), best] = 1.0
        return prob, best, prob.max(axis=1), loglik
    const = 0.5 * ((x.real ** 2 + x.imag ** 2) * isg).sum(axis=1)
    scores -= const[:, None, None].astype(scores.dtype)
    scores += xp.asarray(estep.log_offset_prior(total_off, setup.sigma_offset_px))[:, :, None]
    scores += tables.log_prior[rows_d][:, None, :]
    if block.prior_views is not None:
        scores += xp.asarray(rotation_log_prior(tables.matrices_host[rows_pad],
                                                block.prior_views[sel], setup.sigma_ang),
                             dtype=f32)[:, None, :]
    scores = xp.where(valid, scores, -xp.inf)
    prob, loglik = estep.normalise_log(scores.reshape(Bs, Tm * Rm))
    return prob, prob.argmax(axis=1), prob.max(axis=1), loglik


def _fine_batch(setup, block, sel, rows, t_children, tables, xp):
    """Fine pass of the block's particles ``sel`` (host indices), padded to a common
    number of fine rotations ``Rm`` and translations ``Tm``: scores, posteriors and the
    sub-batch's sums, returned as a :class:`_FineBatch` (reads ``tables``, writes
    nothing shared, so that sub-batches can run side by side)."""
    n = int(setup.ky.shape[0])
    f32 = xp.float32
    rows_pad, t_pad, valid_h, n_r, total_off = _pad_sub_batch(block, sel, rows, t_children)
    Bs, Rm, Tm = sel.shape[0], rows_pad.shape[1], t_pad.shape[1]
    sel_d = xp.asarray(sel)
    x = block.images_f[sel_d]
    c = block.ctf[sel_d]
    isg = block.inv_sigma2[sel_d]
    rows_d = xp.asarray(rows_pad)
    p_rows = tables.slices[rows_d]                                          # (Bs, Rm, n)
    pow_rows = tables.power[rows_d]                                         # (Bs, Rm, n)
    # complex64 viewed as interleaved float32 (Re, Im): a real dot product of two such
    # rows is Re(a conj(b)), so the cross terms are real batched GEMMs without copies.
    p_pair = p_rows.view(f32)                                               # (Bs, Rm, 2n)
    shifts = estep.phase_shifts(t_pad.reshape(-1, 2), setup.ky, setup.kx,
                                setup.box).reshape(Bs, Tm, n)
    ctf_w = c * isg
    # weighted = x C / sigma2 s_t, summed with the posteriors for the M-step below.
    scores, weighted = estep.own_slice_scores(x, c, isg, shifts, p_rows, pow_rows,
                                              setup.use_cc)                # (Bs, Tm, Rm)
    prob, best, pmax, loglik = _fine_posterior(setup, block, sel, x, isg, scores,
                                               xp.asarray(valid_h), rows_d, rows_pad,
                                               total_off, tables, xp)
    prob = prob.reshape(Bs, Tm, Rm)
    w_rot = prob.sum(axis=1)                                                # (Bs, Rm)
    w_trans = prob.sum(axis=2)                                              # (Bs, Tm)
    # M-step sums per rotation: sum_t w_t x C / sigma2 s_t, one batched GEMM.
    summed = xp.matmul(prob.transpose(0, 2, 1), weighted.view(f32)).view(xp.complex64)
    # Noise residual sum_{t,r} w |x s_t - C P_r|^2 per pixel.  Its cross term
    # C sum_r Re(summed_r conj(P_r)) is (sum_r Re(summed_r C / sigma2 conj(P_r))) sigma2.
    cross = (summed.view(f32) * p_pair).sum(axis=1).reshape(Bs, n, 2).sum(axis=2)
    wpow = xp.matmul(w_rot[:, None, :], pow_rows)[:, 0, :]
    residual = ((x.real ** 2 + x.imag ** 2) * w_rot.sum(axis=1)[:, None]
                - 2.0 * cross / isg + c ** 2 * wpow)
    # --norm / --scale: per-particle sums over their pixels (cross / isg is
    # sum_{t,r} w Re(x s_t C conj(P_r)), c^2 wpow is sum_r w |C P_r|^2).
    extra = _correction_sums(setup, xp, residual, cross / isg, c ** 2 * wpow)
    # One transfer per sub-batch: best sample, pmax, loglik, rotation/translation weights
    # (and the correction sums).
    host = to_numpy(xp.concatenate([best.astype(xp.float64), pmax.astype(xp.float64),
                                    loglik.astype(xp.float64)] + extra +
                                   [w_rot.astype(xp.float64).ravel(),
                                    w_trans.astype(xp.float64).ravel()]))
    return _FineBatch(sel, sel_d, rows_pad, rows_d, n_r, t_pad, total_off, residual, summed,
                      w_rot, c * ctf_w, host, len(extra))


@dataclass
class _FineBatch:
    """What :func:`_fine_batch` hands to :func:`_apply_fine_batch`: the sub-batch's
    particles, padded rows and translations, its per-pixel residuals, per-rotation sums
    (``summed``, ``w_rot``, ``ccw`` = C^2 / sigma2) and the host copy of its per-particle
    figures (``host``, laid out as the concatenation in :func:`_fine_batch`)."""
    sel: np.ndarray
    sel_d: object
    rows_pad: np.ndarray
    rows_d: object
    n_r: np.ndarray
    t_pad: np.ndarray
    total_off: np.ndarray
    residual: object
    summed: object
    w_rot: object
    ccw: object
    host: np.ndarray
    n_extra: int


def _apply_fine_batch(setup, tables, xp, sums, results, first_index, out):
    """Add a sub-batch (:class:`_FineBatch`) to the tables, the block's sums and the
    particles' results."""
    Bs, Rm = out.rows_pad.shape
    Tm = out.t_pad.shape[1]
    setup.counts.fine_padded += Bs * Rm * Tm
    sums.residual[out.sel_d] = out.residual
    _add_rows(xp, tables, out.rows_pad, out.n_r, out.rows_d, out.summed, out.w_rot, out.ccw)
    host, i = out.host, first_index + out.sel
    o = (3 + out.n_extra) * Bs
    _store_correction_sums(setup, results, i, host[3 * Bs:o])
    _store_fine_results(tables, sums, results, i, out.rows_pad, out.t_pad, out.total_off,
                        host[:Bs].astype(np.int64), host[Bs:2 * Bs], host[2 * Bs:3 * Bs],
                        host[o:o + Bs * Rm].reshape(Bs, Rm), host[o + Bs * Rm:].reshape(Bs, Tm))


def _store_fine_results(tables, sums, results, i, rows_pad, t_pad, total_off, best_h, pmax_h,
                        loglik_h, w_rot_h, w_trans_h):
    """Host side of a sub-batch: the class and offset sums, and each particle's best
    sample, posterior maximum, log-likelihood and accuracies (rows ``i`` of
    ``results``)."""
    Bs, Rm = rows_pad.shape
    t_best, r_best = np.divmod(best_h, Rm)
    ar = np.arange(Bs)
    row_best = rows_pad[ar, r_best]
    sums.class_weight += np.bincount(tables.row_class[rows_pad].ravel(), weights=w_rot_h.ravel(),
                                     minlength=sums.class_weight.shape[0])
    sums.offset_sq += float((w_trans_h * (total_off.astype(np.float64) ** 2).sum(axis=2)).sum())
    sums.offset_weight += float(w_trans_h.sum())
    ang = angular_distance_deg(tables.matrices_host[rows_pad],
                               tables.matrices_host[row_best][:, None])
    t_best_off = t_pad[ar, t_best]
    dt = np.sqrt(((t_pad - t_best_off[:, None, :]) ** 2).sum(axis=2))
    results.class_index[i] = tables.row_class[row_best]
    results.eulers[i] = tables.eulers[row_best]
    results.origin_px[i] = total_off[ar, t_best]
    results.pmax[i] = pmax_h
    results.loglik[i] = loglik_h
    results.acc_rot[i] = (w_rot_h * ang).sum(axis=1)
    results.acc_trans_px[i] = (w_trans_h * dt).sum(axis=1)


def _correction_sums(setup, xp, residual, cross, power):
    """Device (B,) float64 sums of the ``--norm`` / ``--scale`` corrections, from the
    per-pixel (B, n) posterior-weighted residual power, cross term
    ``sum w Re(X s conj(C P))`` and reference power ``sum w |C P|^2``: the residual over
    ``setup.norm_pixels``, the other two over ``setup.scale_pixels`` (only those on)."""
    out = []
    if setup.norm_pixels is not None:
        out.append(residual.astype(xp.float64) @ setup.norm_pixels)
    if setup.scale_pixels is not None:
        out.append(cross.astype(xp.float64) @ setup.scale_pixels)
        out.append(power.astype(xp.float64) @ setup.scale_pixels)
    return out


def _store_correction_sums(setup, results, index, host):
    """Add the host copy of :func:`_correction_sums` (concatenated) to ``results`` (a
    :class:`.particles.ParticleResults`)."""
    B = index.shape[0]
    names = (["norm_resid"] if setup.norm_pixels is not None else []) + \
        (["scale_xa", "scale_aa"] if setup.scale_pixels is not None else [])
    for j, name in enumerate(names):
        getattr(results, name)[index] += host[j * B:(j + 1) * B]


def _add_rows(xp, tables, rows_pad, n_r, rows_d, summed, w_rot, ccw):
    """Add a sub-batch's per-rotation sums to the tables.  Particles of a sub-batch share
    rows, so the adds must accumulate duplicates: on the CPU one fancy-indexed add per
    particle (each particle's rows are distinct; faster than ``np.add.at`` or a sparse
    product), on the GPU atomic scatter-adds (padded rows add zeros)."""
    if xp is np:
        for j in range(rows_pad.shape[0]):
            m = n_r[j]
            r = rows_pad[j, :m]
            tables.data[r] += summed[j, :m]
            tables.weight[r] += w_rot[j, :m, None] * ccw[j][None, :]
            tables.row_posterior[r] += w_rot[j, :m]
        return
    import cupyx
    Bs, Rm, n = summed.shape
    flat = rows_d.ravel()
    cupyx.scatter_add(tables.data.view(xp.float32), flat,
                      summed.view(xp.float32).reshape(Bs * Rm, 2 * n))
    cupyx.scatter_add(tables.weight, flat,
                      (w_rot[:, :, None] * ccw[:, None, :]).reshape(Bs * Rm, n))
    cupyx.scatter_add(tables.row_posterior, flat, w_rot.ravel().astype(xp.float64))


def _fine_particle_reference(setup, block, b, sig_t, sig_kr, tables, acc, xp, results, i):
    """The fine pass of one particle (the code before batching), for tests."""
    rows = tables.positions(np.unique(sig_kr))
    rows_d = xp.asarray(rows)
    t_children, _ = setup.translations.children(np.unique(sig_t), setup.oversampling)
    t_children = np.asarray(t_children, dtype=np.float32)
    setup.counts.fine += rows.shape[0] * t_children.shape[0]
    setup.counts.fine_padded += rows.shape[0] * t_children.shape[0]
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
        if block.prior_views is not None:
            scores += xp.asarray(rotation_log_prior(tables.matrices_host[rows][None],
                                                    block.prior_views[b:b + 1], setup.sigma_ang),
                                 dtype=xp.float32)
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
    cross = c[0] * (summed * xp.conj(p_rows)).real.sum(axis=0)
    power = c[0] ** 2 * (w_rot @ pow_rows)
    residual = (x[0].real ** 2 + x[0].imag ** 2) * w_rot.sum() - 2.0 * cross + power
    acc.add_noise(block.group[b], setup.pixel_shell, residual)
    extra = _correction_sums(setup, xp, residual[None], cross[None], power[None])
    if extra:
        _store_correction_sums(setup, results, np.array([i]),
                               to_numpy(xp.concatenate(extra)))
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
    results.class_index[i] = int(tables.row_class[row_best])
    results.eulers[i] = tables.eulers[row_best]
    results.origin_px[i] = total_off[t_best]
    results.pmax[i] = float(to_numpy(prob.max()))
    results.loglik[i] = loglik
    results.acc_rot[i] = float((w_rot_h * ang).sum())
    results.acc_trans_px[i] = float((w_trans_h * dt).sum())


def fixed_pose_pass(setup, block, eulers, acc, xp, results, first_index, n_class_pixels=None):
    """Classification without alignment (RELION's ``--skip_align``): each particle keeps
    its rotation (``eulers`` (B, 3), degrees) and origin; only its class posterior is
    computed, from the pixels of the first ``n_class_pixels`` of the list (a resolution
    limit for the class assignment), and the particle is added to every class's sums in
    proportion to it.
    """
    B = block.images_f.shape[0]
    K = setup.n_classes
    setup.counts.fixed += B * K
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
    ctf_w = c * isg
    for k in range(K):
        keep = to_numpy(prob[:, k] > 1e-6)
        if keep.any():
            sel = xp.asarray(np.nonzero(keep)[0])
            pk = prob[sel, k][:, None]
            acc.backprojectors[k].insert(mats[sel], setup.ky, setup.kx,
                                         (pk * x[sel] * ctf_w[sel]).astype(xp.complex64),
                                         (pk * c[sel] * ctf_w[sel]).astype(xp.float32))
    # Noise residual sum_k w_k |x - C P_k|^2 per particle and pixel.
    diff = x[None] - c[None] * slices                                       # (K, B, n)
    residuals = xp.einsum("bk,kbp->bp", prob, diff.real ** 2 + diff.imag ** 2)
    del diff
    _add_noise_rows(setup, block.group, residuals, acc, xp)
    cross = power = None
    if setup.scale_pixels is not None:
        # sum_k w_k Re(x conj(C P_k)) and sum_k w_k |C P_k|^2 per pixel.
        cross = c * (xp.einsum("bk,kbp->bp", prob, slices.real) * x.real
                     + xp.einsum("bk,kbp->bp", prob, slices.imag) * x.imag)
        power = c ** 2 * xp.einsum("bk,kbp->bp", prob, slices.real ** 2 + slices.imag ** 2)
    extra = _correction_sums(setup, xp, residuals, cross, power)
    if extra:
        _store_correction_sums(setup, results, first_index + np.arange(B),
                               to_numpy(xp.concatenate(extra)))
    acc.add_class_weights(xp.repeat(xp.arange(K), B), prob.T.ravel())
    origins = block.origin_px.astype(np.float64)
    acc.add_offsets(float((origins ** 2).sum()), float(B))
    prob_h = to_numpy(prob)
    idx = slice(first_index, first_index + B)
    results.class_index[idx] = prob_h.argmax(axis=1)
    results.eulers[idx] = eulers
    results.origin_px[idx] = origins
    results.pmax[idx] = prob_h.max(axis=1)
    results.loglik[idx] = to_numpy(lse)
    results.acc_rot[idx] = 0.0
    results.acc_trans_px[idx] = 0.0
    results.nsig[idx] = (prob_h > 1e-3).sum(axis=1)
