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

Below ``--blush_lowres`` (default 25 A) V_reg is kept too, with a cosine blend of three
shells above it: there the classes are told apart by their own data.  Why (measured,
docs/benchmarks.md, "Blush in classification"): with D from the lowest frequency on
(RELION's, ``--blush_lowres 0``), a larger class's denoised map fits every particle
better at low resolution than a smaller, noisier one, and at SNR 0.02 the largest
class drained the others (600 particles: 0.93 of them in one class, ARI 0.177 ->
0.016; 1,500: 0.268 -> 0.185); with V_reg kept below 25 A the class sizes stayed
those of the run without Blush (600: 0.73 / 0.27 against 0.69 / 0.31) and the
1,500-particle set gained (0.293), while the class maps kept Blush's gain (FSC 0.5
depends on the 10-20 A shells).

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
        crossover_a = self.net._crossover(self.crossover)  # refuses one finer than 6 A
        self.lowres = max(0.0, float(settings.blush_lowres))
        if 0 < self.lowres <= crossover_a:
            raise CryoClassError(f"--blush_lowres {self.lowres:g} A is not coarser than the "
                                 f"crossover ({crossover_a:g} A): use a larger value, or 0 "
                                 "for none")
        self.diameter = settings.particle_diameter
        if log is not None:
            band = (f"from {self.lowres:g} A " if self.lowres > 0 else "") + \
                f"to {crossover_a:g} A"
            log(f"blush: {self.net.describe()}; mode {self.mode}, denoised map {band}")

    def apply(self, bp, vol, tau2, tau2_fudge, gridding, apix):
        """The Blush-regularised map of back-projector ``bp``'s reconstruction ``vol``
        (device array, full box); ``tau2`` its prior's signal spectrum."""
        diameter = self.diameter if self.diameter > 0 else vol.shape[0] * apix
        if self.mode == "replace":
            return self.net.regularise(vol, apix, diameter, crossover_a=self.crossover,
                                       lowres_a=self.lowres)
        from .projector import gridding_correction, half_grid_transform
        denoised = self.net.denoise(vol, apix, diameter)
        if gridding:      # the reconstruction divides by the footprint after the FFT
            denoised = denoised * gridding_correction(vol.shape[0], bp.pad, bp.xp)
        prior_mean = half_grid_transform(denoised, bp.grid, False)
        posterior = bp.reconstruct(tau2=tau2, tau2_fudge=tau2_fudge, gridding=gridding,
                                   prior_mean=prior_mean)
        return self.net.blend(vol, posterior, apix, self.crossover, lowres_a=self.lowres)
