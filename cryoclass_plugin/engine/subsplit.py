"""Splitting one class along a direction of variability within it, into a class that
is empty after the second merge test (``--split_into_empty``).

The first split (``--init_classes pca``) cuts all the particles at once along the top
K-1 heterogeneity eigenvolumes of the whole set.  The largest state then carries most of
the variance, noise included, and k-means spends classes on it: on the benchmark's
five- and six-state sets (3,000 particles, SNR 0.2) it cut the most populated state in
two in eight runs of nine, while a state of 5-10 % that differs from another by a
second, independent change (a domain swung *and* a subunit absent) stayed inside that
other state's class.  The merge test rightly joins the two halves, and a class is left
empty (docs/benchmarks.md, "Splitting within a class").

After full EM, when the poses and maps are good enough to tell such states apart, the
second merge test (``--merge_retest_iter``) is followed by a second look at every live
class: its particles' coordinates along a direction (:func:`class_directions`: the
class's own top three heterogeneity eigenvolumes, or the difference of two other
classes' maps, whole or kept where it stands out of its noise), in their residuals against
the class's own map, are cut in two (:func:`two_gaussians`), and the held-out test of
the merge test (:func:`.merge.split_evidence`, at ``--classify_fixed_highres``) judges
the cut (:func:`is_two_structures`).  The accepted cuts that recover most of a random split's
cost fill the empty classes, one cut per class; the iterations that remain reconstruct
the new classes.  Before full EM the same cuts are too blurred to be worth a class (the
combined state of complex5, seed 0, sat 1.3 standard deviations from its parent along
the right direction at the consensus poses, 3.3 after full EM).

Conventions: classes are 0-based indices into the model's arrays; particles are
indices into the run's particle table; maps are real-space ``(N, N, N)`` arrays; every
rank must call :func:`candidate_splits` (the coordinates and the held-out test are sums
over all ranks' particles).
"""
import numpy as np

from .heterogeneity import kmeans, principal_coordinates
from .masks import auto_solvent_mask, soft_sphere_mask
from .merge import _PairData, describe_evidence, live_classes, split_evidence
from .particles import mask_diameter_angst

#: A cut's smaller side must hold at least this many particles and this share of all
#: the particles.  Why 3 %: on the benchmark sets (after full EM) the cuts that held a
#: true state and recovered 0.2 or more of a random split's cost held 91-508 particles
#: (but one, of 45, a third of its state), while cuts along noise that recovered as
#: much held 32-88 (a lopsided random split's cost, the yardstick, is itself noisy);
#: a state of 5 % of 3,000, the smallest the benchmarks look for, still gives cuts
#: above it.
MIN_SIDE_PARTICLES = 20
MIN_SIDE_FRACTION = 0.03

#: The share of a random split's cost that a cut must recover to make a class.  It
#: lies between the second merge test's (0, :data:`.merge.RETEST_THRESHOLD`), which
#: keeps two classes apart after full EM, and the first test's (``--merge_threshold``,
#: 0.3), so that no test would merge the new class back.  Measured on the states of
#: 17 runs after full EM (docs/benchmarks.md, "Splitting within a class"): the best
#: cuts holding a 5-10 % state 0.25-0.55 (one 5 % state 0.199), cuts along noise
#: with their smaller side above :data:`MIN_SIDE_FRACTION` at most 0.16.
SPLIT_THRESHOLD = 0.2

#: How many of a class's own top heterogeneity eigenvolumes it is cut along (each
#: on its own).  Why more than one: the class's largest variance is often noise or
#: pose error, and a subtle state hides further down.  On swing3 (2,400 particles,
#: SNR 0.1, seed 1), in the class holding 1,078 whole and 477 swung particles after
#: full EM, the two states sit 0.15, 0.30 and 1.09 standard deviations apart along the
#: top three; the cut along the third recovered 0.72 of a random split's cost and made
#: the swung state's class (ARI 0.637 -> 0.847).  Why three: along the fourth they sat
#: 0.17 apart, and every extra cut is one more chance for noise to pass
#: :data:`SPLIT_THRESHOLD` (docs/benchmarks.md, "More eigenvolumes for the split
#: within a class", for the runs where it changed nothing).
OWN_EIGENVOLUMES = 3


def is_two_structures(ev, threshold, min_agreement):
    """Whether the held-out evidence ``ev`` (:func:`.merge.split_evidence`) of a cut
    supports a new class: the cut recovers at least ``threshold`` of a random split's
    cost and its held-out particles choose their own side at least ``min_agreement``
    of the time.  Stricter than the merge test's keeping two classes apart
    (:func:`.merge.is_one_structure`): a new class needs evidence for it, and the
    share of held-out particles that choose their own side says little for a lopsided
    cut (the larger side's map, from more particles, wins most of them): cuts of 31-47
    particles against 1,000 along noise reproduce 95-97 % while recovering -0.16 to
    -0.18 of a random split's cost.  Nor does the smaller side's own share decide: the
    cuts that gave a 5 % state its class (106-159 particles against 600) had 9-21 % of
    their smaller side's held-out particles choose its map, whose noise, from half of
    so few particles, outweighs a subtle difference (complex5, K = 7, seed 0)."""
    return ev["ratio"] >= threshold and ev["agree"] >= min_agreement


def empty_classes(model):
    """The classes that :func:`.merge.live_classes` leaves out: to be filled."""
    live = set(live_classes(model))
    return [k for k in range(model.n_classes) if k not in live]


def focused_difference(difference, apix, inside):
    """The difference of two class maps kept only where it stands out of its noise
    (:func:`.masks.auto_solvent_mask`, two-sided: low-passed to 15 A, beyond 3 robust
    standard deviations of the values inside the particle mask ``inside``, extended by
    8 A with a 12 A soft edge); elsewhere zero.  A difference with nothing over that
    threshold (two maps alike) is kept whole inside ``inside``.

    Why: a particle's coordinate along a direction is a matched filter, and the noise of
    the two maps everywhere else in the particle only adds to the coordinate's spread.
    Measured after full EM (ribo6 and complex5, 3,000 particles, SNR 0.2; the state
    inside a class cut along the difference of the two other classes that differ by
    the same change; docs/benchmarks.md, "Focused pair directions"): the cuts held 125
    of 140 particles of the state (the whole difference) against 142 of 145 (focused),
    179 / 194 against 192 / 197, 114 / 134 against 137 / 148, and a cut that fell under
    the minimum size (83 of 85) 93 of 94; the focused cuts of classes holding one state
    recovered at most 0.12 of a random split's cost."""
    mask = auto_solvent_mask(np.asarray(difference, dtype=np.float32), apix, inside,
                             two_sided=True)
    return np.asarray(difference, dtype=np.float32) * np.asarray(mask)


def pair_differences(model, live, apix, inside):
    """``{(a, b): (refs[a] - refs[b], its focused_difference)}`` for every pair ``a < b``
    of the ``live`` classes (:func:`focused_difference`), computed once for all the
    classes cut."""
    out = {}
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            difference = model.refs[a] - model.refs[b]
            out[(a, b)] = (difference, focused_difference(difference, apix, inside))
    return out


def class_directions(cls, live, differences):
    """The directions along which class ``cls`` is cut: ``[(name, volume or None), ...]``,
    its own top :data:`OWN_EIGENVOLUMES` heterogeneity eigenvolumes (None: found by the
    power iteration) and the difference of every pair of the other ``live`` classes'
    maps, whole and focused (``differences``, from :func:`pair_differences`).

    Why the pairs: states often combine independent changes (a subunit absent *and* a
    domain swung), and a class that holds two states that differ by one change differs
    within itself the way two other classes differ from each other.  Measured after
    full EM (complex5, 3,000 particles, SNR 0.2, seed 0; the subunit class holding the
    5 % state that also has the arm swung): along the swung-minus-whole difference the
    two states sit 3.3 standard deviations apart (cut: ARI 0.71 within the class),
    along the class's own top eigenvolume 0.3 (ARI 0.01): with a few hundred particles
    that eigenvolume follows the noise.  Why both the whole and the focused difference:
    the focused one cuts purer (:func:`focused_difference`), but at 150 particles the
    held-out test scores cuts of about the same purity 0.1 apart (complex5, seed 3: the
    5 % state's cut along the whole difference, 133 of 170 particles, recovered 0.25 of
    a random split's cost, along the focused one, 143 of 161, 0.16), so each class
    keeps the cut the test scores best."""
    others = [k for k in live if k != cls]
    out = [(f"own eigenvolume {j + 1}", None) for j in range(OWN_EIGENVOLUMES)]
    for i, a in enumerate(others):
        for b in others[i + 1:]:
            whole, focused = differences[(a, b)]
            out.append((f"class {a + 1} - class {b + 1}", whole))
            out.append((f"class {a + 1} - class {b + 1}, focused", focused))
    return out


def two_gaussians(x, seed=0, n_iter=200):
    """Cut the 1D coordinates ``x`` in two by a mixture of two Gaussians of one
    variance (EM from the 2-means cut): labels (n,).  Unlike 2-means, the mixture
    weights let the cut sit between a large and a small group rather than halfway
    (complex5, seed 0, the 5 % state inside its parent's class: ARI 0.71 within the
    class against 0.65 with 2-means)."""
    x = np.asarray(x, dtype=np.float64)
    labels = kmeans(x[:, None], 2, seed=seed)
    if np.bincount(labels, minlength=2).min() == 0:
        return labels
    weights = np.array([np.mean(labels == 0), np.mean(labels == 1)])
    means = np.array([x[labels == 0].mean(), x[labels == 1].mean()])
    var = max(float(np.mean((x - means[labels]) ** 2)), 1e-12)
    for _ in range(n_iter):
        logp = np.log(np.maximum(weights, 1e-12))[None] - (x[:, None] - means[None]) ** 2 / (2 * var)
        resp = np.exp(logp - logp.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        weights = resp.mean(axis=0)
        if weights.min() < 1e-6:
            break
        means = (resp * x[:, None]).sum(axis=0) / resp.sum(axis=0)
        var = max(float((resp * (x[:, None] - means[None]) ** 2).sum() / len(x)), 1e-12)
    return np.argmax(logp, axis=1)


def class_coordinates(ctx, model, cls, members, directions, seed=0):
    """The coordinates (n_members, len(directions)) of class ``cls``'s ``members``
    along each of ``directions`` (:func:`class_directions`), in their residuals against
    the class's own map: along its own top heterogeneity eigenvolumes at
    ``--restart_highres`` (found together, each coordinate fitted on its own: along the
    first exactly as with that eigenvolume alone; fitted jointly, the first's cut moved
    and lost up to 0.25 of a random split's cost on swing3), along each given map at
    the E-step's resolution (each on its own, the residuals prepared once)."""
    s = ctx.settings
    coords = np.zeros((len(members), len(directions)))
    given = [j for j, (_, volume) in enumerate(directions) if volume is not None]
    own = sorted(set(range(len(directions))) - set(given))        # own eigenvolumes
    if own:
        coords[:, own] = principal_coordinates(
            s, ctx.data, model, ctx.comm, ctx.xp, len(own), s.restart_highres, seed=seed,
            pose_nuisance=s.pca_pose_nuisance, members=members,
            mean_map=model.refs[cls], separately=True)
    if given:
        coords[:, given] = principal_coordinates(
            s, ctx.data, model, ctx.comm, ctx.xp, len(given), 2.0 * ctx.data.apix,
            n_power=0, pose_nuisance=s.pca_pose_nuisance, members=members,
            mean_map=model.refs[cls], start=[directions[j][1] for j in given],
            separately=True)
    return coords


def smaller_side(coords, seed=0):
    """The smaller side (bool per particle) of the cut of 1D ``coords`` by
    :func:`two_gaussians`."""
    labels = two_gaussians(coords, seed=seed)
    return labels == int(np.argmin(np.bincount(labels, minlength=2)))


def candidate_splits(ctx, model, log=None):
    """Every live class large enough to cut (:data:`MIN_SIDE_PARTICLES`,
    :data:`MIN_SIDE_FRACTION`), cut along each of :func:`class_directions` and judged
    by the held-out test: ``[(cls, members, in_smaller, evidence), ...]``, per class
    its accepted cut that recovers the largest share of a random split's cost (none
    where no cut is accepted).  ``log`` gets one line per cut."""
    s = ctx.settings
    n_total = len(model.part_class)
    min_side = max(MIN_SIDE_PARTICLES, int(np.ceil(MIN_SIDE_FRACTION * n_total)))
    live = live_classes(model)
    apix = ctx.data.apix
    inside = soft_sphere_mask(model.box, mask_diameter_angst(s, model.box, apix) / (2 * apix))
    differences = pair_differences(model, live, apix, inside)
    out = []
    for cls in live:
        members = np.nonzero(model.part_class == cls)[0]
        if len(members) < 2 * min_side:
            continue
        data, best = None, None
        directions = class_directions(cls, live, differences)
        coords = class_coordinates(ctx, model, cls, members, directions, s.random_seed)
        for j, (name, _) in enumerate(directions):
            in_smaller = smaller_side(coords[:, j], seed=s.random_seed)
            n_small = int(in_smaller.sum())
            ev, accepted = None, False
            if n_small >= min_side:
                if data is None:
                    data = _PairData(ctx, model, members, s.classify_fixed_highres)
                ev = split_evidence(ctx, model, data, in_smaller, model.tau2[cls],
                                    seed=s.random_seed)
                accepted = is_two_structures(ev, SPLIT_THRESHOLD, s.merge_min_agreement)
            if log is not None:
                log(_describe(cls, name, len(members), n_small, ev, accepted, min_side))
            if accepted and (best is None or ev["ratio"] > best[3]["ratio"]):
                best = (cls, members, in_smaller, ev)
        if best is not None:
            out.append(best)
    return out


def _describe(cls, name, n, n_small, ev, accepted, min_side):
    head = f"split within class {cls + 1} ({n} particles) along {name}: {n_small} against {n - n_small}"
    if ev is None:
        return head + f"; the smaller side under {min_side} particles, not tested"
    return (head + ": " + describe_evidence(ev, ("smaller side", "larger side"))
            + (": two structures" if accepted else ": one structure"))


def choose_splits(candidates, empty):
    """The cuts of :func:`candidate_splits` that fill the ``empty`` classes: the best
    first (by the share of a random split's cost recovered), one per class cut, as
    many as there are empty classes: ``[(parent, new_class, moved_particles,
    evidence), ...]``."""
    ranked = sorted(candidates, key=lambda c: -c[3]["ratio"])
    return [(cls, new, members[in_smaller], ev)
            for (cls, members, in_smaller, ev), new in zip(ranked, sorted(empty))]
