"""Principal directions of structural heterogeneity, from aligned particles, to start
the classes (``--init_classes pca``).

With poses known, each particle's whitened residual against the consensus map,
``r_i = (X_i - C_i P_i V) / sigma``, holds its deviation from the consensus plus white
noise.  The 3D covariance of the deviations is the operator
``M v = sum_i A_i^H (r_i <r_i, A_i v> - A_i v)`` (``A_i``: projection at particle i's
pose, times its CTF, whitened; the ``- A_i v`` term removes the noise's contribution),
whose top eigenvolumes are found by block power iteration: one projection and one
back-projection of all particles per step, as in a fixed-pose E/M step.  Each particle's
coordinates along the eigenvolumes (a q x q least-squares fit) are then clustered with
k-means into K groups, which start the classes.  Everything is limited to the low
frequencies (``--restart_highres``), where the classes differ and the noise is small.

Pose errors: a consensus leaves each pose a few degrees and about an Angstrom off, and
to first order that adds to the residual the derivative of the particle's projection by
the pose (and a greyscale error adds the projection itself).  Summed over thousands of
particles these terms outweigh a ligand-sized difference (measured on 5,000 particles
with a 3 % density in 20 % of them: the split's ARI 0.00 at the run's poses, 0.59 at
the true ones).  With ``--pca_remove_pose_errors`` (default) every residual and every
projected eigenvolume is replaced by its part orthogonal to those six directions
(``Q_i r_i``, ``Q_i A_i v``; :func:`_pose_nuisance_basis`), which brings that split to
0.42 at the run's poses.
"""
import numpy as np

from .backend import to_numpy
from .geometry import euler_to_matrix
from .masks import soft_sphere_mask
from .mpi import split_range
from .particles import Pixels, mask_diameter_angst, prepare_block
from .plan import class_shell
from .projector import BackProjector, Projector, current_grid_shell


def _adjoint_volume(bp):
    """Real-space volume of a back-projector's raw data sums (the adjoint of projection)."""
    return bp.real_space(bp.symmetrised_data())


def principal_coordinates(settings, data, model, comm, xp, n_components, highres_angst,
                          n_power=8, seed=0, log=None, pose_nuisance=True, members=None,
                          mean_map=None, start=None, separately=False):
    """Per-particle coordinates (n, q) along the top ``q`` heterogeneity eigenvolumes,
    from ``data`` (a :class:`.particles.ParticleData`) at the model's poses, with this
    rank's share of the particles (``comm``; all ranks must call it); ``xp``: numpy or
    cupy.  ``members`` (indices) limits the analysis to those particles (the rows of
    the result follow it) and ``mean_map`` ((N, N, N)) replaces the class-prior-weighted
    mean of the class maps as the map the residuals are taken against: the directions
    of variability within one class (:mod:`.subsplit`).  ``start`` (q volumes) replaces
    the random start of the power iteration; with ``n_power=0`` the coordinates are
    those along ``start`` itself (orthonormalised), or with ``separately`` along each
    of its volumes on its own (normalised; column j as with ``start=[start[j]]``), the
    particles' residuals prepared once for all of them."""
    s = settings
    box, apix = data.box, data.apix
    members = np.arange(data.n) if members is None else np.asarray(members)
    n = len(members)
    shell = min(model.current_shell, class_shell(box, apix, highres_angst))
    pixels = Pixels.within(box, shell, xp)
    ky, kx = pixels.ky, pixels.kx
    consensus = (np.asarray(mean_map) if mean_map is not None
                 else (model.pdf_class[:, None, None, None] * model.refs).sum(axis=0))
    grid_shell = current_grid_shell(shell, box)     # every grid only as large as its pixels
    blocks = _residual_blocks(s, data, model, comm, xp, members, consensus, pixels,
                              grid_shell, pose_nuisance)
    mask = xp.asarray(soft_sphere_mask(box, mask_diameter_angst(s, box, apix) / (2 * apix), 5.0))
    rng = np.random.default_rng(seed)
    q = n_components
    if start is None:
        vols = [xp.asarray(rng.standard_normal((box,) * 3).astype(np.float32)) * mask
                for _ in range(q)]
    else:
        vols = [xp.asarray(np.asarray(v, dtype=np.float32)) * mask for v in start]
    vols = ([_orthonormalise([v], xp)[0] for v in vols] if separately
            else _orthonormalise(vols, xp))
    for it in range(n_power):
        bps = [BackProjector(box, s.pad, xp, max_shell=grid_shell) for _ in range(q)]
        projs = [Projector(v, pad=s.pad, gridding=False, max_shell=grid_shell) for v in vols]
        for _, mats, white, resid, basis in blocks:
            for j in range(q):
                av = white * projs[j].project(mats, ky, kx)                          # A_i v_j
                if basis is not None:
                    av = _remove(basis, av, xp)                                       # Q_i A_i v_j
                c = 2.0 * (xp.conj(resid) * av).real.sum(axis=1)                      # <r_i, A_i v>
                term = (c[:, None] * resid - av) * white                              # A_i^H (...)
                bps[j].insert(mats, ky, kx, term.astype(xp.complex64),
                              xp.zeros(term.shape, dtype=xp.float32))
        new = []
        for bp in bps:
            bp.data = comm.allreduce_sum(bp.data)
            new.append(_adjoint_volume(bp).astype(xp.float32) * mask)
        vols = _orthonormalise(new, xp)
    # Coordinates: least squares of r_i on A_i v_j (q x q per particle).
    projs = [Projector(v, pad=s.pad, gridding=False, max_shell=grid_shell) for v in vols]
    coords = np.zeros((n, q))
    for rows, mats, white, resid, basis in blocks:
        av = xp.stack([white * p.project(mats, ky, kx) if basis is None
                       else _remove(basis, white * p.project(mats, ky, kx), xp)
                       for p in projs], axis=1)                                      # (B, q, n)
        rhs = 2.0 * xp.einsum("bjp,bp->bj", xp.conj(av), resid).real
        if separately:             # q one-dimensional fits, the same ridge as q = 1
            norm2 = 2.0 * (xp.abs(av) ** 2).sum(axis=2)
            coords[rows] = to_numpy(rhs / (norm2 * (1.0 + 1e-6)))
            continue
        gram = 2.0 * xp.einsum("bjp,bkp->bjk", xp.conj(av), av).real
        gram = gram + 1e-6 * xp.eye(q)[None] * xp.trace(gram, axis1=1, axis2=2)[:, None, None] / q
        coords[rows] = to_numpy(xp.linalg.solve(gram, rhs[..., None])[..., 0])
    coords = to_numpy(comm.allreduce_sum(coords))
    if log is not None and comm.rank == 0:
        log(f"heterogeneity: {q} eigenvolumes at {box * apix / max(shell, 1):.1f} A, "
            f"coordinate spread {np.std(coords, axis=0).round(3).tolist()}")
    return coords


def _residual_blocks(s, data, model, comm, xp, members, mean_map, pixels, grid_shell,
                     pose_nuisance):
    """This rank's share of ``members`` in blocks ``(rows, mats, white, resid, basis)``:
    rows (positions in ``members``), rotation matrices, whitened CTFs ``sqrt(1/sigma2)
    C`` (A's weights), whitened residuals against ``mean_map`` at the pixels (small at
    low resolution), and the pose-nuisance basis (:func:`_pose_nuisance_basis`, or
    None) already taken out of the residuals."""
    ky, kx = pixels.ky, pixels.kx
    proj = Projector(xp.asarray(mean_map.astype(np.float32)), pad=s.pad,
                     gridding=s.gridding, max_shell=grid_shell)
    lo, hi = split_range(len(members), comm.rank, comm.size)
    blocks = []
    for b0 in range(lo, hi, s.block_size):
        rows = np.arange(b0, min(hi, b0 + s.block_size))
        idx = members[rows]
        block, _, _ = prepare_block(s, model, data, idx, pixels, xp)
        mats = xp.asarray(euler_to_matrix(*model.part_eulers[idx].T))
        white = xp.sqrt(block.inv_sigma2) * block.ctf
        slices = proj.project(mats, ky, kx)
        resid = xp.sqrt(block.inv_sigma2) * block.images_f - white * slices
        basis = (_pose_nuisance_basis(proj, mats, slices, white, ky, kx, data.box, xp)
                 if pose_nuisance else None)
        if basis is not None:
            resid = _remove(basis, resid, xp)
        blocks.append((rows, mats, white, resid, basis))
    return blocks


#: Finite-difference step (degrees) of the rotation derivatives of a projection.
_ROTATION_STEP_DEG = 1.0


def _pose_nuisance_basis(projector, mats, slices, white, ky, kx, box, xp):
    """Per particle, an orthonormal basis (B, 6, n) of the directions in which an error of
    its pose or greyscale moves its whitened consensus projection ``white * slices``: the
    derivatives by three small rotations (central differences of +-1 degree about the
    particle frame's x, y and z), by an in-plane shift along x and y (``-2 pi i k / N``
    times the slice) and by a change of scale (the slice itself).

    A residual against the consensus holds, besides the particle's deviation from it,
    these first-order terms of its pose error; at median errors of a few degrees they
    carry more variance than a ligand-sized density or a domain's small swing, so the top
    eigenvolumes would describe pose errors.  Projecting them out of every particle's
    residual (and of the operator, :func:`_remove`) leaves the deviations that no pose
    change explains.  Orthonormal under the real inner product ``2 Re sum conj(a) b`` of
    the half-plane pixels."""
    step = np.radians(_ROTATION_STEP_DEG)
    dirs = []
    for axis in range(3):
        gen = np.zeros((3, 3))
        a, b = [(1, 2), (2, 0), (0, 1)][axis]
        gen[a, b], gen[b, a] = -step, step
        plus = xp.asarray(_expm_small(gen), dtype=mats.dtype)
        minus = xp.asarray(_expm_small(-gen), dtype=mats.dtype)
        dirs.append(white * (projector.project(mats @ plus, ky, kx)
                             - projector.project(mats @ minus, ky, kx)))
    two_pi_i = xp.asarray(-2j * np.pi / box, dtype=xp.complex64)
    dirs.append(white * slices * (two_pi_i * kx.astype(xp.float32))[None])
    dirs.append(white * slices * (two_pi_i * ky.astype(xp.float32))[None])
    dirs.append(white * slices)
    basis = xp.stack(dirs, axis=1).astype(xp.complex64)                          # (B, 6, n)
    # Gram-Schmidt by Cholesky of the (real) Gram matrix of the unit-length directions,
    # with a small ridge for a direction that is (nearly) a combination of the others.
    length = xp.sqrt(2.0 * (xp.abs(basis) ** 2).sum(axis=2, keepdims=True))
    basis = basis / xp.maximum(length, 1e-30).astype(xp.float32)
    gram = 2.0 * xp.einsum("bjp,bkp->bjk", xp.conj(basis), basis).real.astype(xp.float64)
    gram = gram + 1e-6 * xp.eye(gram.shape[1])[None]
    chol = xp.linalg.cholesky(gram)                                                 # G = L L^T
    inv = xp.linalg.inv(chol).astype(xp.complex64)                                  # L^-1
    return xp.einsum("bjk,bkp->bjp", inv, basis)


def _expm_small(gen):
    """Rotation matrix exp(gen) of a skew-symmetric (3, 3) generator (Rodrigues)."""
    theta = np.sqrt(0.5 * (gen ** 2).sum())
    if theta == 0:
        return np.eye(3)
    k = gen / theta
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)


def _remove(basis, x, xp):
    """``x`` (B, n) minus its projection on each particle's ``basis`` (B, m, n)."""
    coef = 2.0 * xp.einsum("bjp,bp->bj", xp.conj(basis), x).real
    return x - xp.einsum("bj,bjp->bp", coef.astype(xp.float32), basis)


def _orthonormalise(vols, xp):
    flat = xp.stack([v.ravel() for v in vols], axis=1).astype(xp.float64)
    qmat, _ = xp.linalg.qr(flat)
    return [qmat[:, j].reshape(vols[0].shape).astype(xp.float32) for j in range(len(vols))]


def kmeans(points, k, seed=0, n_init=10, n_iter=100):
    """Plain k-means (k-means++ starts, best of ``n_init``); returns labels (n,)."""
    rng = np.random.default_rng(seed)
    pts = (points - points.mean(axis=0)) / np.maximum(points.std(axis=0), 1e-12)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = [pts[rng.integers(len(pts))]]
        for _ in range(1, k):
            d2 = np.min(((pts[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            centres.append(pts[rng.choice(len(pts), p=d2 / d2.sum())])
        centres = np.array(centres)
        for _ in range(n_iter):
            labels = ((pts[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
            new = np.array([pts[labels == j].mean(axis=0) if (labels == j).any() else centres[j]
                            for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((pts - centres[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best
