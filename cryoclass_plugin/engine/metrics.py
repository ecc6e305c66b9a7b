"""Validation metrics: clustering agreement, Fourier shell correlation, angular errors.

FSC shells follow :mod:`.fourier`: shell ``s`` holds frequencies with ``round(|k|) == s``
(``k`` in cycles per box), shells ``0 .. N//2``, resolution of shell ``s`` is
``N * apix / s`` Angstrom.  Angles are RELION ZYZ Euler angles in degrees.
"""
import numpy as np

from .fourier import fft_centered, shell_index
from .geometry import angular_distance_deg, euler_to_matrix


def _pairs(x):
    """Number of unordered pairs ``x (x - 1) / 2`` (float, elementwise)."""
    x = np.asarray(x, dtype=np.float64)
    return x * (x - 1.0) / 2.0


def contingency_table(labels_a, labels_b):
    """Counts ``C[i, j]`` of items in cluster ``i`` of ``a`` and ``j`` of ``b`` (labels
    may be any hashable values; rows/columns follow ``np.unique`` order)."""
    a = np.asarray(labels_a).ravel()
    b = np.asarray(labels_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length ({a.size} vs {b.size})")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    n_a, n_b = (ia.max() + 1 if ia.size else 0), (ib.max() + 1 if ib.size else 0)
    table = np.bincount(ia * n_b + ib, minlength=n_a * n_b).reshape(n_a, n_b)
    return table


def adjusted_rand_index(labels_a, labels_b):
    """Hubert & Arabie's adjusted Rand index of two partitions of the same items.

    1 for identical partitions (up to renaming), about 0 for independent ones, can be
    negative.  When the index is undefined (both partitions trivial in the same way: all
    in one cluster, or all singletons) it returns 1.0, as scikit-learn does.
    """
    table = contingency_table(labels_a, labels_b)
    n = table.sum()
    if n < 2:
        return 1.0
    sum_cells = _pairs(table).sum()
    sum_a = _pairs(table.sum(axis=1)).sum()
    sum_b = _pairs(table.sum(axis=0)).sum()
    expected = sum_a * sum_b / _pairs(n)
    maximum = 0.5 * (sum_a + sum_b)
    if maximum == expected:
        return 1.0
    return float((sum_cells - expected) / (maximum - expected))


def best_match_accuracy(true_labels, pred_labels):
    """Fraction of items whose predicted class maps to their true class under the
    one-to-one class relabelling that maximises agreement (Hungarian matching)."""
    from scipy.optimize import linear_sum_assignment
    table = contingency_table(true_labels, pred_labels)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / max(table.sum(), 1))


def state_recall(true_cls, pred_cls):
    """Per true state (sorted labels): the share of its particles in the class matched
    to it one-to-one (Hungarian matching of the contingency table, as best-match
    accuracy), so two states lumped in one class cannot both score; 0 for a state left
    without a class."""
    from scipy.optimize import linear_sum_assignment
    states, classes = sorted(set(true_cls)), sorted(set(pred_cls))
    table = np.array([[np.sum((true_cls == t) & (pred_cls == c)) for c in classes]
                      for t in states], dtype=np.float64)
    rows, cols = linear_sum_assignment(-table)
    recall = np.zeros(len(states))
    recall[rows] = table[rows, cols] / table[rows].sum(axis=1)
    return recall.tolist()


def fsc(vol1, vol2):
    """Fourier shell correlation of two maps of the same cubic shape, per shell
    ``0 .. N//2`` (float64 array of length ``N//2 + 1``; empty shells give 0)."""
    from .backend import to_numpy
    v1 = np.asarray(to_numpy(vol1), dtype=np.float64)
    v2 = np.asarray(to_numpy(vol2), dtype=np.float64)
    if v1.shape != v2.shape:
        raise ValueError(f"fsc needs maps of one shape, got {v1.shape} and {v2.shape}")
    f1, f2 = fft_centered(v1), fft_centered(v2)
    n_shells = v1.shape[0] // 2 + 1
    shells = shell_index(v1.shape).ravel()
    keep = shells < n_shells
    sh = shells[keep]
    cross = np.bincount(sh, weights=(f1 * np.conj(f2)).real.ravel()[keep], minlength=n_shells)
    p1 = np.bincount(sh, weights=(np.abs(f1) ** 2).ravel()[keep], minlength=n_shells)
    p2 = np.bincount(sh, weights=(np.abs(f2) ** 2).ravel()[keep], minlength=n_shells)
    denom = np.sqrt(p1 * p2)
    # Shells without power (only rounding noise left) report 0, not a random ratio.
    valid = denom > 1e-24 * max(float(denom.max()), 1e-300)
    return np.where(valid, cross / np.maximum(denom, 1e-300), 0.0)


def fsc_resolution(curve, box, apix, threshold=0.5):
    """Resolution (A) where the FSC first drops below ``threshold``.

    The crossing shell is interpolated linearly between the last shell at or above the
    threshold and the first below it (shell 0 is skipped); a curve that never drops
    gives Nyquist (``2 apix``).
    """
    curve = np.asarray(curve, dtype=np.float64)
    below = np.flatnonzero(curve[1:] < threshold)
    if below.size == 0:
        return 2.0 * float(apix)
    s = int(below[0]) + 1
    hi, lo = curve[s - 1], curve[s]
    frac = (hi - threshold) / (hi - lo) if hi != lo else 0.0
    shell = (s - 1) + frac
    if shell <= 0:
        return float("inf")
    return float(box) * float(apix) / shell


def angular_errors_deg(eulers_a, eulers_b, sym="C1"):
    """Angle (degrees) between the rotations of paired Euler angles ``(n, 3)``.

    ``sym`` is a point-group name ('C1', 'C4', 'D7', 'O', ... via :mod:`.symmetry`) or an
    array of symmetry matrices ``(G, 3, 3)``; the error is the minimum over the views
    equivalent under the group, ``A_b R_g`` (a map with symmetry R_g projects identically
    at A and A R_g).
    """
    a = np.atleast_2d(np.asarray(eulers_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(eulers_b, dtype=np.float64))
    A = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    B = euler_to_matrix(b[:, 0], b[:, 1], b[:, 2])
    if isinstance(sym, str):
        if sym.strip().upper() == "C1":
            return angular_distance_deg(A, B)
        from .symmetry import symmetry_matrices
        group = np.asarray(symmetry_matrices(sym), dtype=np.float64)
    else:
        group = np.asarray(sym, dtype=np.float64).reshape(-1, 3, 3)
    errors = [angular_distance_deg(A, B @ g) for g in group]
    return np.min(np.stack(errors), axis=0)


def image_keys(names):
    """Keys of ``rlnImageName`` values that do not depend on how the stack's path is
    spelled: ``"<frame>@<stack file name>"`` (output data.star files name the stacks
    relative to the job's folder, the simulator's truth.star relative to its own)."""
    out = []
    for name in names:
        frame, _, stack = str(name).rpartition("@")
        out.append(f"{int(frame) if frame else 0}@{stack.replace(chr(92), '/').rsplit('/', 1)[-1]}")
    return out


def rows_like(truth, got):
    """``got`` (a particles table) reordered to ``truth``'s rows, matched by
    :func:`image_keys`; raises ``KeyError`` if a particle of ``truth`` is missing."""
    keyed = got.set_index(np.asarray(image_keys(got["rlnImageName"])))
    return keyed.loc[image_keys(truth["rlnImageName"])]
