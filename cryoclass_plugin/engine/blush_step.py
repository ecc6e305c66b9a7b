"""Blush regularisation in the M-step (``--blush``): our trained 3D denoiser as a prior.

After a class's regularised reconstruction ``V_reg = sum X / (W + 1 / (T tau2))``
(:meth:`.projector.BackProjector.reconstruct`), :class:`BlushStep` replaces it as
RELION 5 does (:mod:`cryoclass_plugin.blush`): the map is resampled to the network's
voxel size (3 A), masked softly (particle radius + 5 A, 10 A cosine edge), denoised,
resampled back, and

* ``--blush_mode replace`` (RELION's): the denoised map D replaces V_reg below the
  crossover (``--blush_crossover``, default the network's Nyquist, 6 A) and V_reg is
  kept from the crossover on, with a cosine blend of three shells below it;
* ``--blush_mode prior-mean``: D becomes the mean of the Gaussian prior instead of 0,
  ``(sum X + D / (T tau2)) / (W + 1 / (T tau2))`` per voxel (the posterior mean
  under that prior), blended into V_reg at the crossover in the same way.

The next iteration's tau2 comes from the power spectrum of the result after solvent
flattening, as without Blush.  The consensus map of ``--joint_consensus`` is not
denoised (it only fills the classes' shared regions).
"""
from .errors import CryoClassError

MODES = ("replace", "prior-mean")


class BlushStep:
    """One run's Blush settings and network; ``apply`` once per class and M-step."""

    def __init__(self, settings, xp, log=None):
        try:
            from ..blush.denoise import BlushRegulariser
        except ImportError as err:            # torch missing from this environment
            raise CryoClassError(f"--blush needs PyTorch ({err}); install the package's "
                                 "requirements (bash install.sh) or run without --blush")
        device = "cpu"
        if xp is not __import__("numpy"):
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if settings.blush_mode not in MODES:
            raise CryoClassError(f"--blush_mode {settings.blush_mode}: choose from "
                                 f"{', '.join(MODES)}")
        self.net = BlushRegulariser(weights=settings.blush_weights or None, device=device,
                                    threads=max(1, int(settings.threads)))
        self.mode = settings.blush_mode
        self.crossover = None if settings.blush_crossover <= 0 else settings.blush_crossover
        self.net._crossover(self.crossover)        # refuse a crossover finer than 6 A now
        self.diameter = settings.particle_diameter
        if log is not None:
            log(f"blush: {self.net.describe()}; mode {self.mode}, crossover "
                f"{self.net._crossover(self.crossover):g} A")

    def apply(self, bp, vol, tau2, tau2_fudge, gridding, apix):
        """The Blush-regularised map of back-projector ``bp``'s reconstruction ``vol``
        (device array, full box); ``tau2`` its prior's signal spectrum."""
        diameter = self.diameter if self.diameter > 0 else vol.shape[0] * apix
        if self.mode == "replace":
            return self.net.regularise(vol, apix, diameter, crossover_a=self.crossover)
        from .projector import gridding_correction, half_grid_transform
        denoised = self.net.denoise(vol, apix, diameter)
        if gridding:      # the reconstruction divides by the footprint after the FFT
            denoised = denoised * gridding_correction(vol.shape[0], bp.pad, bp.xp)
        prior_mean = half_grid_transform(denoised, bp.grid, False)
        posterior = bp.reconstruct(tau2=tau2, tau2_fudge=tau2_fudge, gridding=gridding,
                                   prior_mean=prior_mean)
        return self.net.blend(vol, posterior, apix, self.crossover)
