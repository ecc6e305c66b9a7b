"""Class references that share the consensus where the classes do not differ
(``--class_difference_highres``; used after a consensus / PCA start).

The E-step compares each particle with K references.  With maps reconstructed from
1/K of the particles each, two things in them carry no information about the class:

- above the resolution at which the classes differ, a class reconstructed from more
  particles is sharper, so it fits *every* particle better, whatever its class: the
  largest class grows and the others drain (measured: a 600-particle SNR 0.05 set went
  from class sizes 25/30/45 % to 17/32/51 % in the full-EM iterations);
- outside the region where the structures differ, each class map's deviation from the
  consensus is reconstruction noise, which adds noise to every class log-likelihood.

So the E-step references are::

    M      = sum_k pi_k V_k                       (class-prior-weighted mean)
    C      = the reconstruction of all particles (--joint_consensus, the default),
             or M (--mean_consensus)
    D_k    = lowpass(V_k - M, highres)            (the classes' low-resolution deviations)
    v(x)   = smooth(sum_k pi_k D_k(x)^2)          (their variance, smoothed over ~8 A)
    m(x)   = clip((v(x) - nu) / v(x), 0, 1)       (Wiener fraction; nu = the median of v
                                                   inside the particle mask: the noise)
    R_k    = C + m * D_k

By default (``--joint_consensus``) ``C`` is reconstructed in the M-step from the sums of
all classes together (:func:`.mstep.reconstruct_consensus`): each ``V_k`` is
Wiener-filtered with the SSNR of 1/K of the particles, so ``M`` is low-passed harder
than the data allow.  Measured (docs/benchmarks.md, "joint consensus" and
"automatic mask"): the poses improve by 0.1-0.3 degrees everywhere; with plain
references the classes did not (ARI 0.003 lower on average over nine sets), with the
automatically masked references (:func:`.masks.auto_solvent_mask`) they do (six
600-particle sets: mean 0.942 against 0.933 with ``M``, worst set 0.839 against 0.825).

``m`` is near 1 where the classes differ (the variance stands well above the noise
level) and 0 elsewhere; the median works as the noise level as long as the classes
differ in less than half of the particle.  Beyond ``highres`` the references are the
consensus but for what the smooth ``m(x)`` spreads there from the deviations (a few
per cent of the maps' own differences at those frequencies).  The written class maps
stay the plain reconstructions ``V_k``; ``R_k`` is computed afresh in each iteration
from them and the saved ``C`` (so ``--continue`` reproduces a run).  Measured in
docs/benchmarks.md ("classes that share the consensus").

Volumes are (K, N, N, N) real arrays, axis order z, y, x, centred at N // 2; resolutions
in Angstrom; numpy or cupy (the array module of ``refs``).
"""
import numpy as np

from .backend import get_xp
from .fourier import fft_centered, ifft_centered, low_pass, radial_index

# Smoothing of the deviations' variance before the noise cut (Angstrom, Gaussian sigma):
# about the size of a secondary-structure element, so that the cut follows domains,
# not single noisy voxels.
VARIANCE_SMOOTHING_ANGST = 8.0
# Quantile of the smoothed deviation variance inside the particle mask taken as the
# noise level (0.5: the median).
NOISE_QUANTILE = 0.5


def _gaussian_filter(shape, sigma_px, xp):
    """Transform of a unit-sum Gaussian of ``sigma_px`` pixels on a centred transform."""
    r = radial_index(shape, xp) / shape[0]               # cycles per pixel
    return xp.exp(-2.0 * (np.pi * sigma_px * r) ** 2)


def difference_weights(deviations, class_weights, inside, apix):
    """Wiener fraction ``m(x)`` (N, N, N) of the classes' deviations ``(K, N, N, N)``;
    ``inside`` is the particle mask (> 0.5 counts for the noise level)."""
    xp = get_xp(deviations)
    var = xp.tensordot(class_weights, deviations ** 2, axes=1)
    smooth = _gaussian_filter(var.shape, VARIANCE_SMOOTHING_ANGST / apix, xp)
    var = ifft_centered(fft_centered(var) * smooth).real
    noise = float(xp.quantile(var[inside > 0.5], NOISE_QUANTILE))
    return xp.clip((var - noise) / xp.maximum(var, 1e-30), 0.0, 1.0)


def shared_consensus_references(refs, class_weights, apix, highres_angst, inside,
                                consensus=None):
    """E-step references ``R_k`` (K, N, N, N) from class maps ``refs`` and class priors
    ``class_weights`` (K,), as the module docstring defines them.  ``consensus`` (N, N, N)
    replaces ``C`` in ``R_k = C + m D_k`` (the deviations stay relative to the mean of
    the class maps): the reconstruction of all particles together, sharper than the mean
    of the class maps (:func:`.mstep.reconstruct_consensus`)."""
    xp = get_xp(refs)
    w = xp.asarray(class_weights, dtype=xp.float64)
    w = w / max(float(w.sum()), 1e-300)
    vols = refs.astype(xp.float64)
    mean = xp.tensordot(w, vols, axes=1)
    # One class at a time: the transforms are complex128 volumes (box 256: 270 MB each).
    # A 4-shell raised-cosine edge: a sharp cut would ring across the particle.
    dev = xp.stack([low_pass(v - mean, apix, highres_angst, edge_shells=4.0)
                    for v in vols])
    m = difference_weights(dev, w, inside, apix)
    base = mean if consensus is None else xp.asarray(consensus, dtype=xp.float64)
    return (base[None] + m[None] * dev).astype(refs.dtype), m
