"""Held-out evidence that two classes hold different structures (``--merge_threshold``).

When K is larger than the number of structures in the data, EM can cut one structure into
two classes that both stay alive: each class map is reconstructed from its own particles,
so every particle fits the map it helped to build a little better than the other one, and
the split feeds itself (measured: K=4 on three true classes at SNR 0.2, a true class
split 50/50 for 25 iterations; docs/benchmarks.md, "K=4 on three true classes").

The test asks the particles themselves, without that self-bias.  For a pair of classes
(a, b), the particles assigned to either are split at random into two halves.  From each
half, at the particles' current poses, three maps are reconstructed: A (its class-a
particles), B (its class-b particles) and M (all of them).  Each particle of the *other*
half is then scored, at its pose, under the split model and under the merged one::

    delta_i = log(pi_a p(X_i | A) + pi_b p(X_i | B)) - log p(X_i | M)

(``pi``: the two classes' shares of the pair; ``p``: the Gaussian likelihood of the
E-step, ``-sum |X - C P V|^2 / (2 sigma2)``, over the shells up to the resolution limit).
No particle is scored against a map it went into.  When the two classes differ, the
split model predicts held-out particles better (sum of delta > 0); when they are two
halves of one structure, the merged map, built from twice the particles, predicts them
better (sum < 0).  This is a 2-fold cross-validated likelihood-ratio test of "two
structures" against "one".

How much better is enough: at low SNR and with few particles even two true classes may
predict held-out particles a little worse than one map built from twice the data, so the
sum is compared with that of a *random* split of the same particles (the cost of
splitting by noise alone, ``null``).  A pair is one structure when ``delta < 0`` and the
split pays back less than ``--merge_threshold`` (0.3) of the random split's cost,
``(delta - null) / |null|``.  Measured at the end of the fixed-pose phase on 25 runs'
states: a true class cut in two -0.08 to 0.17, true class pairs 0.53 and more
(docs/benchmarks.md, "Merge test").  After full EM the test runs again
(``--merge_retest_iter``) and merges a pair whose held-out particles choose their own
side's map less than ``--merge_min_agreement`` of the time, whatever the ratio, or
in which a smaller class's own held-out particles choose its map less than half the
time against the class they prefer most (:data:`SIDE_MAJORITY`, unless the split
recovers :data:`SIDE_MAX_RATIO` of a random split's cost), or whose split recovers
none of the random split's cost (ratio < :data:`RETEST_THRESHOLD`) and reproduces less
than ``--merge_max_agreement`` (:func:`duplicate_pairs`).  Before the test the smaller
class's particles are re-centred onto the larger class by the
maps' relative shift (:func:`pair_evidence`): two halves of one structure can sit a
fraction of a pixel apart.

Conventions: maps are real-space ``(N, N, N)`` float32 arrays, poses the model's ZYZ
Euler angles (degrees) and origins (Angstrom), as everywhere in the engine; the
likelihood is on the half-plane Fourier pixels of :func:`.fourier.half_plane_pixels`.
The functions take the run's fixed inputs as ``ctx`` (an :class:`.iteration.RunContext`:
settings, particle images and CTFs, communicator, array module, symmetry, solvent mask)
and the poses and classes from the model.
"""
import numpy as np

from .backend import to_numpy
from .geometry import euler_to_matrix
from .masks import soft_sphere_mask
from .mpi import split_range
from .particles import Pixels, mask_diameter_angst, prepare_block
from .plan import class_shell
from .projector import BackProjector, Projector, current_grid_shell


def _gaussian_loglik(images_f, ctf, inv_sigma2, slices):
    """``-sum |X - C P|^2 / (2 sigma2)`` per particle (B,) at fixed poses."""
    diff = images_f - ctf * slices
    return -0.5 * ((diff.real ** 2 + diff.imag ** 2) * inv_sigma2).sum(axis=1)


class _PairData:
    """The low-resolution images, CTFs and poses of a set of particles (this rank's
    share), prepared once (one FFT per image) for all the pairs, reconstructions and
    scores of one test; :meth:`subset` gives a pair's particles."""

    def __init__(self, ctx, model, members, highres_angst):
        s, xp, data = ctx.settings, ctx.xp, ctx.data
        box, apix = data.box, data.apix
        self.xp, self.box = xp, box
        self.shell = min(model.current_shell, class_shell(box, apix, highres_angst))
        pixels = Pixels.within(box, self.shell, xp)
        self.ky, self.kx = pixels.ky, pixels.kx
        self.members = np.asarray(members)
        # The six maps of a test live only up to ``shell``: they are reconstructed in a
        # small box whose padded Fourier grid is the centre of the full one (same
        # spacing in frequency, 1 / (pad N apix)), so the slices are the same values
        # and the FFTs cost (small / N)^3 of the full box's.  Its solvent mask is the
        # sphere of --particle_diameter at the small box's voxel size.
        self.small_box = int(min(box, 2 * (self.shell + 3)))
        small_apix = apix * box / self.small_box
        self.mask = None
        if ctx.solvent_mask is not None:
            self.mask = xp.asarray(soft_sphere_mask(
                self.small_box, mask_diameter_angst(s, box, apix) / (2 * small_apix),
                5.0 * self.small_box / box))
        lo, hi = split_range(len(self.members), ctx.comm.rank, ctx.comm.size)
        self.blocks = []
        for b0 in range(lo, hi, s.block_size):
            rows = np.arange(b0, min(hi, b0 + s.block_size))
            idx = self.members[rows]
            block, _, _ = prepare_block(s, model, data, idx, pixels, xp)
            mats = xp.asarray(euler_to_matrix(*model.part_eulers[idx].T))
            self.blocks.append((rows, (block.images_f, block.ctf, block.inv_sigma2), mats))

    def subset(self, select, shift_px=None):
        """The members ``select`` (bool per member) as a set of their own (rows
        renumbered); ``shift_px`` ((n_members, 2) or None) moves their origins by that
        many pixels, as the phase factor :func:`.particles.prepare_block` applies."""
        import copy
        xp = self.xp
        out = copy.copy(self)
        position = np.cumsum(select) - 1
        out.members = self.members[select]
        out.blocks = []
        for rows, (images_f, ctf, inv_sigma2), mats in self.blocks:
            keep = np.nonzero(select[rows])[0]
            if not keep.size:
                continue
            k = xp.asarray(keep)
            f = images_f[k]
            if shift_px is not None:
                d = xp.asarray(shift_px[rows[keep]], dtype=xp.float32)
                f = f * xp.exp(xp.asarray(-2j * np.pi / self.box, dtype=xp.complex64)
                               * (d[:, 0:1] * self.kx[None].astype(xp.float32)
                                  + d[:, 1:2] * self.ky[None].astype(xp.float32)))
            out.blocks.append((position[rows[keep]], (f, ctf[k], inv_sigma2[k]), mats[k]))
        return out


def heldout_gain(ctx, model, data, in_first, fold_seed):
    """Sum over ``data``'s particles of the held-out ``delta_i`` (module docstring) of
    splitting them into ``in_first`` (bool per member) and the rest, with the two halves
    drawn by ``fold_seed``; also, per side (``in_first``, then the rest), the number of
    held-out particles, how many of them score better under their own side's map than
    under the other's, and the sum of their margins ``log p(X | own) - log p(X |
    other)``: ``(gain, (n, own, margin) of the first side, (n, own, margin) of the
    second)``."""
    s, xp, comm = ctx.settings, ctx.xp, ctx.comm
    n = len(data.members)
    n_first = int(np.sum(in_first))
    half = np.zeros(n, dtype=np.int64)
    half[np.random.default_rng(fold_seed).permutation(n)[: n // 2]] = 1
    ky, kx = data.ky, data.kx
    # Back-projections: [half][first, second, merged].
    grid_shell = current_grid_shell(data.shell, data.small_box)
    bps = [[BackProjector(data.small_box, s.pad, xp, max_shell=grid_shell) for _ in range(3)]
           for _ in range(2)]
    for rows, (images_f, ctf, inv_sigma2), mats in data.blocks:
        values = (images_f * (ctf * inv_sigma2)).astype(xp.complex64)
        weight = (ctf * ctf * inv_sigma2).astype(xp.float32)
        for h in range(2):
            for j, side in enumerate((in_first[rows], ~in_first[rows], np.ones(len(rows), bool))):
                pick = np.nonzero((half[rows] == h) & side)[0]
                if pick.size:
                    p = xp.asarray(pick)
                    bps[h][j].insert(mats[p], ky, kx, values[p], weight[p])
    # One signal prior for all six maps, so that the comparison is between data, not
    # between priors.
    projectors = []
    for h in range(2):
        row = []
        for bp in bps[h]:
            bp.data = comm.allreduce_sum(bp.data)
            bp.weight = comm.allreduce_sum(bp.weight)
            vol = bp.reconstruct(tau2=xp.asarray(data.tau2), tau2_fudge=s.tau2_fudge,
                                 max_shell=data.shell, gridding=s.gridding)
            if ctx.symmetrise is not None:
                vol = ctx.symmetrise(vol)
            if data.mask is not None:
                vol = vol * data.mask
            row.append(Projector(vol, pad=s.pad, gridding=s.gridding, max_shell=grid_shell))
        projectors.append(row)
    del bps
    log_pi = np.log(np.array([n_first, n - n_first], dtype=np.float64) / n)
    sums = np.zeros(7)          # gain; per side: held-out particles, own side better, margin
    for rows, (images_f, ctf, inv_sigma2), mats in data.blocks:
        for h in range(2):
            pick = np.nonzero(half[rows] == 1 - h)[0]        # scored by the other half's maps
            if not pick.size:
                continue
            p = xp.asarray(pick)
            x, c, isg = images_f[p], ctf[p], inv_sigma2[p]
            ll = np.stack([to_numpy(_gaussian_loglik(x, c, isg, proj.project(mats[p], ky, kx)))
                           for proj in projectors[h]], axis=1).astype(np.float64)
            split = np.logaddexp(log_pi[0] + ll[:, 0], log_pi[1] + ll[:, 1])
            sums[0] += float((split - ll[:, 2]).sum())
            first = in_first[rows][pick]
            margin = np.where(first, ll[:, 0] - ll[:, 1], ll[:, 1] - ll[:, 0])
            for j, side in enumerate((first, ~first)):
                sums[1 + 3 * j: 4 + 3 * j] += (float(side.sum()), float((margin[side] > 0).sum()),
                                               float(margin[side].sum()))
    sums = to_numpy(comm.allreduce_sum(sums))
    return float(sums[0]), tuple(sums[1:4]), tuple(sums[4:7])


def split_evidence(ctx, model, data, in_first, tau2, seed=0, repeats=3):
    """Held-out evidence for splitting the particles of ``data`` (a :class:`_PairData`)
    into ``in_first`` and the rest.

    Returns a dict: ``delta`` (summed held-out gain of the split over one map, natural
    log units), ``null`` (the same for a random split of the same sizes: the cost of
    splitting by noise alone, < 0), ``ratio`` = (delta - null) / |null| (the share of
    that cost the split's real difference pays back), ``n`` and ``agree`` (fraction of
    held-out particles whose better split map is their own side; 0.5: the assignment
    does not generalise), ``agree_sides`` (the same for each side alone: ``in_first``,
    then the rest) and ``margin_sides`` (each side's mean held-out margin ``log p(X |
    own) - log p(X | other)``, natural log units; < 0: the side's own particles prefer
    the other map).  ``delta`` and ``null`` are means over ``repeats`` draws of
    the halves (and of the random split): the noise of the half maps is common to all
    the particles they score, so one draw's sum varies by about 2 per particle (measured
    on 134 particles at SNR 0.2: a random cut's ratio 0.31 / 0.05 / -0.31 over three
    draws).  ``tau2``: the signal prior of all the maps.  All ranks must call it."""
    in_first = np.asarray(in_first, dtype=bool)
    n, n_first = len(data.members), int(in_first.sum())
    if n_first < 2 or n - n_first < 2:
        return {"delta": 0.0, "null": 0.0, "ratio": 0.0, "n": n, "agree": 0.5,
                "agree_sides": (0.5, 0.5), "margin_sides": (0.0, 0.0)}
    data.tau2 = np.asarray(tau2, dtype=np.float64)
    delta = null = 0.0
    sides = np.zeros((2, 3))            # per side: held-out particles, own side better, margin
    for rep in range(repeats):
        d, first, second = heldout_gain(ctx, model, data, in_first, [seed, n, n_first, rep, 1327])
        shuffled = in_first[np.random.default_rng([seed, n, rep, 2718]).permutation(n)]
        z, _, _ = heldout_gain(ctx, model, data, shuffled, [seed, n, n_first, rep, 3141])
        delta, null = delta + d / repeats, null + z / repeats
        sides += (first, second)
    ratio = (delta - null) / abs(null) if null < 0 else np.inf
    scored = np.maximum(sides[:, 0], 1.0)
    return {"delta": delta, "null": null, "ratio": float(ratio), "n": n,
            "agree": float(sides[:, 1].sum() / (repeats * n)),
            "agree_sides": tuple(float(x) for x in sides[:, 1] / scored),
            "margin_sides": tuple(float(x) for x in sides[:, 2] / scored)}


def relative_shift_px(map_a, map_b, max_shell, max_px=2.0):
    """The 3D shift ``s`` (pixels, x y z order) that best puts ``map_a`` onto ``map_b``,
    ``B(r) ~ A(r - s)``, from the low frequencies (shells <= ``max_shell``): the
    maximum of ``Re sum F_B conj(F_A) exp(2 pi i k.s / N)`` on a 0.25-pixel grid within
    ``max_px``, refined on a 0.05-pixel grid around it.  The sum is separable in x, y
    and z, so each grid is three small matrix products over the (2 shell + 1)^3 cube."""
    from .fourier import fft_centered
    n = map_a.shape[0]
    shell = int(min(max_shell, n // 2 - 1))
    cube = slice(n // 2 - shell, n // 2 + shell + 1)
    cross = (fft_centered(np.asarray(map_b, dtype=np.float64))
             * np.conj(fft_centered(np.asarray(map_a, dtype=np.float64))))[cube, cube, cube]
    k = np.arange(-shell, shell + 1, dtype=np.float64)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    radius2 = kx ** 2 + ky ** 2 + kz ** 2
    cross[(radius2 > shell ** 2) | (radius2 == 0)] = 0.0                 # (z, y, x)

    def best(centre, step, half_width):
        axis = np.arange(-half_width, half_width + 1e-9, step)
        ex, ey, ez = (np.exp(2j * np.pi * np.outer(k, axis + c) / n) for c in centre)
        score = np.einsum("zij,zk->ijk", np.einsum("zyi,yj->zij",
                                                   np.einsum("zyx,xi->zyi", cross, ex), ey),
                          ez).real                                        # (sx, sy, sz)
        i = np.unravel_index(int(np.argmax(score)), score.shape)
        return np.array([axis[i[0]] + centre[0], axis[i[1]] + centre[1], axis[i[2]] + centre[2]])

    s = best(np.zeros(3), 0.25, max_px)
    return best(s, 0.05, 0.25)


def _aligned_origins(model, members, shift_px):
    """Origins (A) of ``members`` moved from the frame of a map shifted by ``shift_px``
    (x y z) into the unshifted map's frame: a slice of ``A(r - s)`` at rotation ``R`` is
    the slice of ``A`` shifted by ``(R s)_xy`` (the slice pixel k sits at ``R^T k``), and
    the E-step shifts each image by its origin, so ``o -> o - apix (R s)_xy``."""
    from .geometry import euler_to_matrix
    rot = euler_to_matrix(*model.part_eulers[members].T)
    return model.part_origin_angst[members] - model.apix * (rot @ shift_px)[:, :2]


def pair_evidence(ctx, model, a, b, highres_angst, seed=0, repeats=3, data=None):
    """:func:`split_evidence` of classes ``a`` and ``b`` (hard assignments
    ``model.part_class``, poses ``model.part_eulers`` / ``model.part_origin_angst``),
    with the smaller class's particles first moved into the larger class's frame by the
    maps' relative shift (:func:`relative_shift_px`): two classes can hold one
    structure centred a fraction of a pixel apart, each particle's origin fitted to its
    own class, and merged as they are they would blur.  The dict also holds
    ``moved`` (the smaller class), ``shift_px`` and ``aligned_origins`` (its members'
    origins in the other frame, A; what a merge must give them).  ``data``: the
    prepared particles (:class:`_PairData`) of a set that holds both classes (default:
    prepared here)."""
    if data is None:
        data = _PairData(ctx, model,
                         np.nonzero((model.part_class == a) | (model.part_class == b))[0],
                         highres_angst)
    big, small = (a, b) if model.pdf_class[a] >= model.pdf_class[b] else (b, a)
    shell = min(model.current_shell,
                class_shell(ctx.data.box, ctx.data.apix, highres_angst))
    shift = relative_shift_px(model.refs[big], model.refs[small], shell)
    moved = np.nonzero(model.part_class == small)[0]
    aligned = _aligned_origins(model, moved, shift)
    cls = model.part_class[data.members]
    shift_members = np.zeros((len(data.members), 2))
    shift_members[cls == small] = (aligned - model.part_origin_angst[moved]) / model.apix
    pair = data.subset((cls == a) | (cls == b), shift_members)
    w = np.array([model.pdf_class[a], model.pdf_class[b]], dtype=np.float64)
    w = w / max(w.sum(), 1e-300)
    tau2 = w[0] * model.tau2[a] + w[1] * model.tau2[b]
    ev = split_evidence(ctx, model, pair, model.part_class[pair.members] == a, tau2,
                        seed, repeats)
    ev.update(first=a, moved=small, shift_px=shift, aligned_origins=aligned)
    return ev


def describe_evidence(ev, sides=None):
    """One line of ``ev``; ``sides``: the names of the two sides, to give each side's
    share of held-out particles that chose its own map."""
    text = (f"held-out log-likelihood gain of the split {ev['delta'] / max(ev['n'], 1):+.2f} "
            f"per particle, of a random split {ev['null'] / max(ev['n'], 1):+.2f}: "
            f"recovers {ev['ratio']:.2f} of the random split's cost; assignments "
            f"reproduced {100 * ev['agree']:.0f} %")
    if sides is not None:
        text += " (" + ", ".join(f"{name} {100 * a:.0f} %" for name, a
                                 in zip(sides, ev["agree_sides"])) + ")"
    return text


#: The second test's ratio threshold (after full EM): a pair whose split recovers none
#: of a random split's cost is one structure unless its held-out assignments reproduce
#: ``--merge_max_agreement``.  Why 0 and not ``--merge_threshold``: after full EM true
#: pairs of subtle states recover little (ribo4, K=6: a swung-rich class, 0.08 with 76 %
#: reproduced), while halves of one structure recover nothing (-0.14 to -0.04) yet, with
#: the finer offsets of full EM, reproduce 72-80 % of their assignments, above
#: ``--merge_min_agreement`` (docs/benchmarks.md, "Finer offsets after the split").
RETEST_THRESHOLD = 0.0

#: The second test's rule on a class alone: its own held-out particles must choose its
#: map over that of the class they prefer most (:func:`non_reproducing_pairs`) at least
#: this often, else the class does not reproduce and joins that class (a coin would do
#: as well).  Why on its own: the share over both classes counts mostly the larger one,
#: whose map, from more particles, wins its own particles whatever the smaller class
#: holds.  Measured after full EM (docs/benchmarks.md, "Merge test: each class's own
#: particles"): classes of 44-120 particles of a state that has a class of its own,
#: 0-2 % against that class (87-94 % reproduced over both); two halves of one state
#: (301 and 619 particles) 40 %; the smaller class of two different states 51 % and
#: more, except a small one that differs clearly (below).
SIDE_MAJORITY = 0.5

#: ... unless the pair's split recovers at least this share of a random split's cost.
#: Why: a class of few particles has a noisy map from half of them, which loses its own
#: particles to a larger class's even where the states differ clearly: a 5 % state of
#: 48 particles (a subunit absent; 1,000 particles at SNR 0.1) had 15 % of its held-out
#: particles choose its map against the main state's, with a ratio of 1.45, while the
#: classes that did not reproduce recovered 0.02-0.56 against the class they prefer.
SIDE_MAX_RATIO = 1.0


def moved_side(ev):
    """Index (0: the pair's first class, 1: its second) of the class that a merge of the
    pair :func:`pair_evidence` scored would drop (the smaller one, ``ev["moved"]``)."""
    return 0 if ev["first"] == ev["moved"] else 1


def is_one_structure(ev, threshold, min_agreement=0.5, max_agreement=1.0):
    """Whether the evidence ``ev`` of :func:`pair_evidence` calls a pair one structure:
    held-out assignments reproduced less often than ``min_agreement``, or a split that
    does not pay (``delta`` < 0 and ``ratio`` < ``threshold``) with assignments
    reproduced less often than ``max_agreement``."""
    if ev["agree"] < min_agreement:
        return True
    return ev["delta"] < 0 and ev["ratio"] < threshold and ev["agree"] < max_agreement


def non_reproducing_pairs(results, side_majority=SIDE_MAJORITY, max_ratio=SIDE_MAX_RATIO):
    """The pairs ``(a, b)`` of :func:`pair_table`'s ``results`` in which a class does not
    reproduce: for each class, the pair with the class its own held-out particles prefer
    most (the lowest mean margin ``log p(X | own) - log p(X | other)``), where it is the
    smaller class (the one a merge drops), fewer than ``side_majority`` of those
    particles chose its own map, and the split recovers less than ``max_ratio`` of a
    random split's cost.  Which class it joins matters: a class of 96 particles, 86 %
    of them apo, had 2 % of its held-out particles choose its map against the apo class
    (mean margin -36.6) and 11 % against a class of the swung state (-24.7; the pair of
    lower ratio, 0.47 against 0.56) (complex5, 3,000 particles, SNR 0.2, K = 7,
    seed 0)."""
    preferred = {}
    for a, b, ev in results:
        for side, cls in enumerate((a, b)):
            margin = ev["margin_sides"][side]
            if cls not in preferred or margin < preferred[cls][0]:
                preferred[cls] = (margin, side, a, b, ev)
    out = set()
    for cls, (_, side, a, b, ev) in preferred.items():
        if (ev["moved"] == cls and ev["agree_sides"][side] < side_majority
                and ev["ratio"] < max_ratio):
            out.add((a, b))
    return out


def live_classes(model, min_fraction=0.01):
    """The classes the merge test compares (and :mod:`.subsplit` may cut): prior at
    least ``min_fraction`` and two particles or more; the others count as empty."""
    counts = np.bincount(model.part_class, minlength=model.n_classes)
    return [k for k in range(model.n_classes)
            if model.pdf_class[k] >= min_fraction and counts[k] >= 2]


def pair_table(ctx, model, highres_angst, seed=0, min_fraction=0.01, log=None):
    """:func:`pair_evidence` of every pair of live classes (prior >= ``min_fraction``,
    two particles or more): ``[(a, b, evidence), ...]``; ``log`` gets one line per
    pair.  All ranks must call it."""
    alive = live_classes(model, min_fraction)
    results = []
    data = _PairData(ctx, model, np.nonzero(np.isin(model.part_class, alive))[0],
                     highres_angst)
    for i, a in enumerate(alive):
        for b in alive[i + 1:]:
            results.append((a, b, pair_evidence(ctx, model, a, b, highres_angst, seed,
                                                data=data)))
    if log is not None:
        log_pair_table(results, log)
    return results


def log_pair_table(results, log):
    """One log line per pair of :func:`pair_table`'s ``results``."""
    for a, b, ev in results:
        log(f"merge test: classes {a + 1} and {b + 1} ({ev['n']} particles, class "
            f"{ev['moved'] + 1} re-centred by {np.linalg.norm(ev['shift_px']):.2f} "
            f"px): " + describe_evidence(ev, (f"class {a + 1}", f"class {b + 1}")))


#: Each pair's share of a random split's cost recovered counts up to this much in
#: :func:`split_score`: pairs that are clearly different structures (ratios of 4-20 on
#: the benchmark sets, varying by 1-2 between iterations) then add a constant, and the
#: score follows the pairs still in doubt.
SCORE_CAP = 3.0


def split_score(results):
    """The held-out evidence that a set of classes hold different structures, from
    :func:`pair_table`'s ``results``: the sum over pairs of the share of a random split's
    cost that each pair's split recovers (``ratio``), each clipped to [-1, SCORE_CAP].
    Returns ``(score, weakest)``, ``weakest`` the ``(a, b, evidence)`` of the lowest ratio
    (None without pairs).

    Why a sum over pairs rather than the ARI's kind of agreement: it needs no truth, and
    at the consensus poses it rises and falls with the ARI (ribo4, 2,000 particles, SNR
    0.2, seed 1, fixed-pose iterations 8-14: weakest pair 1.54 -> 0.23, ARI 0.745 ->
    0.476; swing3, 2,400, SNR 0.1, seed 3, iterations 8-11: 0.06 -> 1.37, ARI 0.53 ->
    0.66)."""
    if not results:
        return 0.0, None
    ratios = [float(np.clip(ev["ratio"], -1.0, SCORE_CAP)) for _, _, ev in results]
    weakest = min(results, key=lambda t: t[2]["ratio"])
    return float(np.sum(ratios)), weakest


def duplicate_pairs(ctx, model, highres_angst, threshold, seed=0,
                    min_fraction=0.01, log=None, min_agreement=0.5, max_agreement=1.0,
                    results=None, side_majority=0.0):
    """Pairs of live classes that the held-out test calls one structure
    (:func:`is_one_structure`, and with ``side_majority`` > 0, the second test, also
    :func:`non_reproducing_pairs`), most clearly first (by ratio), no class in two
    pairs: ``[(keep, drop, evidence), ...]`` (``keep`` the larger class).

    Why the agreement: a split that the likelihood favours may still not classify:
    5,000 particles of one state cut in two, kept apart by full EM, score a ratio of
    12.3 while only 63 % of the held-out particles choose their own class's map; every
    pair of classes that are each mostly (>= 60 %) one state, of two different states,
    in the runs of docs/benchmarks.md ("Merge test: agreement"), reproduces 75 % and
    more.  The other way, a pair reproducing ``max_agreement`` or more stays apart: a
    small class of 44 particles against another state scores a ratio of 0.11 (too few
    particles for the likelihood) with 91 % reproduced, while pieces of one state cut
    by EM reproduce up to 86 % (``tests/test_merge.py``).  That share counts mostly
    the larger class, so the second test also asks the smaller class alone
    (``side_majority``): on ribo8 (3,000 particles, SNR 0.2, K = 8, seed 0) a class of
    44 particles, 89 % apo, scored a ratio of 0.12 against a class of another state
    with 94 % reproduced, while 7 % of its own held-out particles chose its map.
    ``results``: the
    :func:`pair_table` of this very state, where it was already computed (default:
    computed here)."""
    if results is None:
        results = pair_table(ctx, model, highres_angst, seed, min_fraction, log=log)
    elif log is not None:
        log_pair_table(results, log)
    alone = non_reproducing_pairs(results, side_majority) if side_majority > 0 else set()
    merged, pairs = set(), []
    for a, b, ev in sorted(results, key=lambda t: t[2]["ratio"]):
        one = (a, b) in alone or is_one_structure(ev, threshold, min_agreement,
                                                  max_agreement)
        if not one or a in merged or b in merged:
            continue
        drop = ev["moved"]
        keep = a if drop == b else b
        pairs.append((keep, drop, ev))
        merged.update((a, b))
    return pairs
