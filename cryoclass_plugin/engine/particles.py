"""The particles as the E-step sees them: their images, CTF parameters and noise groups
(:class:`ParticleData`), the Fourier pixels inside a radius (:class:`Pixels`), one
block of them prepared on the device (:func:`prepare_block`), and the per-particle
results of an E-step (:class:`ParticleResults`).

Conventions: Fourier pixels are the half plane of :func:`.fourier.half_plane_pixels`
sorted by radius, so the pixels inside a shell are a prefix of the list; origins are in
pixels (or Angstrom where named so) with RELION's sign; angles in degrees.
"""
from dataclasses import dataclass, fields

import numpy as np

from .backend import to_numpy
from .ctf import antisymmetric_phase, ctf_arguments, ctf_values
from .fourier import fft_centered, half_plane_pixels
from .masks import soft_circle_mask
from .search import BlockData
from .validation import check_image_block


def mask_diameter_angst(settings, box, apix):
    """The particle mask's diameter (A): ``--particle_diameter``, or the box."""
    return settings.particle_diameter if settings.particle_diameter > 0 else box * apix


def image_mask(settings, box, apix, xp):
    """The soft circular mask of the images (``--zero_mask``), or None."""
    if not settings.zero_mask:
        return None
    diameter = mask_diameter_angst(settings, box, apix)
    return soft_circle_mask(box, diameter / (2 * apix), 5.0, xp=xp).astype(xp.float32)


def group_index(df):
    """One noise group per micrograph (RELION 3.1), else per optics group:
    ``(index per particle, group names)``."""
    for col in ("rlnGroupName", "rlnMicrographName"):
        if col in df.columns:
            names, idx = np.unique(df[col].astype(str).to_numpy(), return_inverse=True)
            return idx, list(names)
    names, idx = np.unique(df["rlnOpticsGroup"].astype(str).to_numpy(), return_inverse=True)
    return idx, [f"group{n}" for n in names]


@dataclass
class ParticleData:
    """What the E-step reads of the particles.

    images : an :class:`.mrc_io.ImageSource` (``get(indices)`` -> (B, N, N) float32)
    groups : (n,) noise group of each particle;  group_names : one name per group
    ctfp : per-particle CTF parameters (:func:`.ctf.ctf_params`), None without ``--ctf``
    mask2d : the ``--zero_mask`` image mask on the device, or None
    box, apix : pixels and Angstrom per pixel
    """
    images: object
    groups: np.ndarray
    group_names: list
    ctfp: object
    mask2d: object
    box: int
    apix: float

    @property
    def n(self):
        return int(self.groups.shape[0])

    @property
    def group_counts(self):
        return np.bincount(self.groups, minlength=len(self.group_names))


@dataclass
class Pixels:
    """The half-plane Fourier pixels of a box (``ky_all``, ``kx_all``, sorted by radius,
    on the device), each one's shell, and how many lie within the current radius."""
    ky_all: object
    kx_all: object
    pixel_shell: object
    n_cur: int

    @classmethod
    def within(cls, box, shell, xp):
        ky_all, kx_all = half_plane_pixels(box, box // 2, xp)
        radius2 = kx_all.astype(xp.float64) ** 2 + ky_all.astype(xp.float64) ** 2
        pixel_shell = xp.rint(xp.sqrt(radius2)).astype(xp.int64)
        return cls(ky_all, kx_all, pixel_shell, cls._count(pixel_shell, shell))

    @staticmethod
    def _count(pixel_shell, shell):
        return int(to_numpy((pixel_shell <= shell).sum()))

    def count(self, shell):
        """The pixels (a prefix of the list) within ``shell``."""
        return self._count(self.pixel_shell, shell)

    @property
    def ky(self):
        return self.ky_all[:self.n_cur]

    @property
    def kx(self):
        return self.kx_all[:self.n_cur]


def _shell_power(f, pixel_shell, n_shells, xp):
    """Power per particle and shell (B, n_shells) of the pixels ``f`` (B, n) and their
    shell counts: one bincount for the whole block (row j's shells offset by
    j * n_shells); a per-particle loop would synchronise a GPU once per particle."""
    B = f.shape[0]
    if not f.shape[1]:
        return np.zeros((B, n_shells)), np.zeros(n_shells)
    p = (f.real ** 2 + f.imag ** 2).astype(xp.float64)
    rows = xp.arange(B, dtype=xp.int64)[:, None] * n_shells
    power = xp.bincount((rows + pixel_shell[None, :]).ravel(), weights=p.ravel(),
                        minlength=B * n_shells).reshape(B, n_shells)
    count = to_numpy(xp.bincount(pixel_shell, minlength=n_shells)[:n_shells])
    return to_numpy(power), count


def prepare_block(settings, model, data, indices, pixels, xp):
    """Images of ``indices`` as a :class:`.search.BlockData` on the pixels within the
    current radius, plus each particle's shell power beyond it and the shells' pixel
    counts (for the noise estimate)."""
    box, n_cur = model.box, pixels.n_cur
    raw = data.images.get(indices)
    # A single NaN/Inf pixel would spread through the sums into every class map.
    check_image_block(raw, indices, data.images.table.df["rlnImageName"].to_numpy())
    imgs = xp.asarray(raw, dtype=xp.float32)
    if data.mask2d is not None:
        imgs = imgs * data.mask2d
    ky, kx = pixels.ky_all, pixels.kx_all
    f = fft_centered(imgs, axes=(1, 2)).astype(xp.complex64)[:, ky + box // 2, kx + box // 2]
    origin_px = model.part_origin_angst[indices] / model.apix
    # Re-centre by the current origin (RELION sign: shift the image by +origin).
    phase = xp.exp(xp.asarray(-2j * np.pi / box, dtype=xp.complex64)
                   * (xp.asarray(origin_px[:, 0:1], dtype=xp.float32) * kx[None].astype(xp.float32)
                      + xp.asarray(origin_px[:, 1:2], dtype=xp.float32) * ky[None].astype(xp.float32)))
    f = f * phase.astype(xp.complex64)
    f = _demodulate_aberration(model, data, indices, pixels, f, xp)
    if settings.norm:
        # RELION's norm correction: the image (all pixels, also those beyond the current
        # radius, which feed the noise estimate) times avg_norm / n_i.
        factor = (model.avg_norm / model.part_norm[indices]).astype(np.float32)
        f = f * xp.asarray(factor)[:, None]
    power_beyond, count_beyond = _shell_power(f[:, n_cur:], pixels.pixel_shell[n_cur:],
                                              model.n_shells, xp)
    ctf, inv_sigma2 = ctf_and_inverse_noise(settings, model, data, indices, pixels, xp)
    block = BlockData(images_f=f[:, :n_cur], ctf=ctf, inv_sigma2=inv_sigma2,
                      group=data.groups[indices], origin_px=origin_px.astype(np.float32))
    return block, power_beyond, count_beyond


def ctf_and_inverse_noise(settings, model, data, indices, pixels, xp):
    """(B, n_cur) CTFs (as :func:`prepare_block`'s, scale included) and 1 / sigma2 of
    the particles ``indices`` at the pixels within the current radius, without reading
    their images."""
    g = data.groups[indices]
    sigma2 = xp.asarray(model.sigma2[g][:, to_numpy(pixels.pixel_shell[:pixels.n_cur])],
                        dtype=xp.float32)
    return _block_ctf(settings, model, data, indices, pixels, g, xp), 1.0 / sigma2


def _block_ctf(settings, model, data, indices, pixels, groups, xp):
    """(B, n_cur) CTF of the block's particles (ones without ``--ctf``), times the
    group's scale with ``--scale``.  Each particle's CTF has its own optics group's
    microscope and symmetric aberration (``data.ctfp``: :func:`.ctf.ctf_params`) and its
    own rlnCtfBfactor / rlnCtfScalefactor."""
    n_cur = pixels.n_cur
    if settings.ctf:
        kx_c = pixels.kx.astype(xp.float32)[None] / (model.box * model.apix)
        ky_c = pixels.ky.astype(xp.float32)[None] / (model.box * model.apix)
        params = {k: v[indices][:, None] for k, v in ctf_arguments(data.ctfp).items()}
        ctf = ctf_values(kx_c, ky_c, **params, phase_flipped=settings.ctf_phase_flipped,
                         intact_first_peak=settings.ctf_intact_first_peak).astype(xp.float32)
    else:
        ctf = xp.ones((len(indices), n_cur), dtype=xp.float32)
    if settings.scale:
        # RELION's scale correction: the group's intensity scale multiplies the CTF, so
        # the references are compared (and the images inserted) at the group's scale.
        ctf = ctf * xp.asarray(model.scale_correction[groups].astype(np.float32))[:, None]
    return ctf


def _demodulate_aberration(model, data, indices, pixels, f, xp):
    """``f`` (B, all half-plane pixels) times ``exp(-i phi)``, ``phi`` each particle's
    antisymmetric aberration (its optics group's odd Zernike terms and beam tilt,
    :func:`.ctf.antisymmetric_phase`), as RELION's ``demodulatePhase`` does to the
    experimental images: the model's projection carries ``exp(i phi)``, and removing it
    from the image instead gives the same likelihood and reconstruction.  ``f`` itself
    when no group has such terms (or without ``--ctf``, where ``data.ctfp`` is None)."""
    if data.ctfp is None or "odd_zernike" not in data.ctfp:
        return f
    # one phase image per optics group in the block, not per particle
    groups, which = np.unique(data.ctfp["odd_zernike"][indices], axis=0, return_inverse=True)
    kx = pixels.kx_all.astype(xp.float64)[None] / (model.box * model.apix)
    ky = pixels.ky_all.astype(xp.float64)[None] / (model.box * model.apix)
    phi = antisymmetric_phase(kx, ky, xp.asarray(groups[:, None, :]), xp)
    factor = xp.exp(-1j * phi).astype(xp.complex64)
    return f * factor[xp.asarray(which.reshape(-1))]


@dataclass
class ParticleResults:
    """Per-particle E-step results of one iteration (host float64 arrays, one row per
    particle of the iteration's subset; a rank fills its own rows, zeros elsewhere).

    class_index : best class (0-based);  eulers : (m, 3) best rotation (deg);
    origin_px : (m, 2) best origin (px);  pmax, loglik : the posterior's maximum and the
    log-likelihood;  acc_rot (deg), acc_trans_px : posterior-weighted distances from the
    best sample;  nsig : significant samples;  norm_resid (``--norm``): posterior-weighted
    residual power;  scale_xa / scale_aa (``--scale``): the scale correction's cross and
    reference-power sums.
    """
    class_index: np.ndarray
    eulers: np.ndarray
    origin_px: np.ndarray
    pmax: np.ndarray
    loglik: np.ndarray
    acc_rot: np.ndarray
    acc_trans_px: np.ndarray
    nsig: np.ndarray
    norm_resid: np.ndarray = None
    scale_xa: np.ndarray = None
    scale_aa: np.ndarray = None

    @classmethod
    def zeros(cls, m, norm=False, scale=False):
        def z(*shape):
            return np.zeros((m,) + shape)
        return cls(class_index=z(), eulers=z(3), origin_px=z(2), pmax=z(), loglik=z(),
                   acc_rot=z(), acc_trans_px=z(), nsig=z(), norm_resid=z() if norm else None,
                   scale_xa=z() if scale else None, scale_aa=z() if scale else None)

    def arrays(self):
        """``{name: array}`` of the fields in use."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def summed_over_ranks(self, comm):
        """The results of all ranks (each rank's rows are zero on the others)."""
        if comm.size == 1:
            return self
        return ParticleResults(**{k: to_numpy(comm.allreduce_sum(v))
                                  for k, v in self.arrays().items()})
