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
                          n_power=8, seed=0, log=None):
    """Per-particle coordinates (n, q) along the top ``q`` heterogeneity eigenvolumes,
    from ``data`` (a :class:`.particles.ParticleData`) at the model's poses, with this
    rank's share of the particles (``comm``; all ranks must call it); ``xp``: numpy or
    cupy."""
    s = settings
    box, apix, n = data.box, data.apix, data.n
    shell = min(model.current_shell, class_shell(box, apix, highres_angst))
    pixels = Pixels.within(box, shell, xp)
    ky, kx = pixels.ky, pixels.kx
    consensus = (model.pdf_class[:, None, None, None] * model.refs).sum(axis=0)
    grid_shell = current_grid_shell(shell, box)     # every grid only as large as its pixels
    cons_proj = Projector(xp.asarray(consensus.astype(np.float32)), pad=s.pad,
                          gridding=s.gridding, max_shell=grid_shell)
    lo, hi = split_range(n, comm.rank, comm.size)
    # Whitened residuals and whitened CTFs of this rank's particles (small at low res).
    blocks = []
    for b0 in range(lo, hi, s.block_size):
        idx = np.arange(b0, min(hi, b0 + s.block_size))
        block, _, _ = prepare_block(s, model, data, idx, pixels, xp)
        mats = xp.asarray(euler_to_matrix(*model.part_eulers[idx].T))
        white = xp.sqrt(block.inv_sigma2) * block.ctf                 # (B, n) = A's weights
        resid = xp.sqrt(block.inv_sigma2) * block.images_f - white * cons_proj.project(mats, ky, kx)
        blocks.append((idx, mats, white, resid))
    mask = xp.asarray(soft_sphere_mask(box, mask_diameter_angst(s, box, apix) / (2 * apix), 5.0))
    rng = np.random.default_rng(seed)
    q = n_components
    vols = [xp.asarray(rng.standard_normal((box,) * 3).astype(np.float32)) * mask for _ in range(q)]
    vols = _orthonormalise(vols, xp)
    for it in range(n_power):
        bps = [BackProjector(box, s.pad, xp, max_shell=grid_shell) for _ in range(q)]
        projs = [Projector(v, pad=s.pad, gridding=False, max_shell=grid_shell) for v in vols]
        for idx, mats, white, resid in blocks:
            for j in range(q):
                av = white * projs[j].project(mats, ky, kx)                          # A_i v_j
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
    for idx, mats, white, resid in blocks:
        av = xp.stack([white * p.project(mats, ky, kx) for p in projs], axis=1)     # (B, q, n)
        gram = 2.0 * xp.einsum("bjp,bkp->bjk", xp.conj(av), av).real
        rhs = 2.0 * xp.einsum("bjp,bp->bj", xp.conj(av), resid).real
        gram = gram + 1e-6 * xp.eye(q)[None] * xp.trace(gram, axis1=1, axis2=2)[:, None, None] / q
        coords[idx] = to_numpy(xp.linalg.solve(gram, rhs[..., None])[..., 0])
    coords = to_numpy(comm.allreduce_sum(coords))
    if log is not None and comm.rank == 0:
        log(f"heterogeneity: {q} eigenvolumes at {box * apix / max(shell, 1):.1f} A, "
            f"coordinate spread {np.std(coords, axis=0).round(3).tolist()}")
    return coords


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
