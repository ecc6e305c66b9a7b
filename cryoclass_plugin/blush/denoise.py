"""Blush regularisation of one class map: denoise with the trained network and blend
with the regularised reconstruction in Fourier space.

For a class map ``V_reg`` (the M-step's ``sum X / (W + 1 / (T tau2))``, real space,
box ``N``, ``apix`` A), :meth:`BlushRegulariser.regularise`:

1. resamples ``V_reg`` by Fourier crop / pad to the network grid (box ``M``, voxel
   ``N apix / M`` as close to the network's 3 A as an even box allows);
2. takes the centred cube that holds the soft spherical mask (radius = particle radius +
   5 A, 10 A raised-cosine edge, RELION's choice), rounded up to a multiple of 8 voxels;
3. multiplies by the mask and divides by the map's RMS inside the mask (the
   standardisation the network was trained with);
4. runs the network (:mod:`.network`) on that cube: in one pass when its side is at most
   ``max_single`` voxels (the network is fully convolutional and small; one pass costs
   less than overlapping blocks), else on ``block``^3 blocks whose central parts
   (``block - 2 margin``) tile the cube, each seeing ``margin`` voxels of context;
5. multiplies the output by the RMS and by the mask (so ``D`` is zero outside the mask)
   and resamples it back to box ``N``;
6. blends in Fourier space, with ``w(k) = 1`` below ``s_c - BLEND_SHELLS``, a raised
   cosine from 1 to 0 over the ``BLEND_SHELLS`` shells up to ``s_c`` and 0 from ``s_c`` on
   (``s_c = N apix / crossover_A``):

   - ``mode='replace'`` (RELION's): ``F = w F(D) + (1 - w) F(V_reg)``;
   - ``mode='prior-mean'``: ``F = w P + (1 - w) F(V_reg)`` with
     ``P = (sum X + F(D) / (T tau2)) / (W + 1 / (T tau2))`` (:func:`prior_mean_ft`): D
     as the mean of the Gaussian prior instead of zero, so that the data still pull the
     map where they are strong.

   With ``lowres_a`` (the engine's ``--blush_lowres``), ``w`` is also 0 up to
   ``s_l = N apix / lowres_a`` and rises to 1 over the ``BLEND_SHELLS`` shells after it.

   So the result equals ``V_reg`` exactly (in Fourier space) from the crossover on (and
   below ``s_l``).  The
   default crossover is the network grid's Nyquist (6 A at 3 A voxels): D carries no
   frequency beyond it.  With data at a coarser pixel (e.g. 4 A: Nyquist 8 A) the
   whole band of the map is D's.

Why 3 A voxels: 3D classification resolves 6-10 A (helices, RNA grooves, domain
boundaries), which a 6 A network Nyquist covers, and particles are usually binned for it
to 3-5 A/px; a finer grid would cost (2x finer = 8x the voxels) for frequencies that
classification does not reach.

The next iteration's tau2 must come from the power spectrum of the returned map (after
solvent flattening), as for any class map.

Devices: numpy input runs on the CPU (``threads`` torch threads during the call).  CuPy
input is handed to torch by DLPack (``torch.from_dlpack``, no host copy) when torch has
CUDA, and the result comes back the same way as a CuPy array; with a CPU-only torch a
CuPy map is copied to the host and back (stated by :attr:`BlushRegulariser.device_used`).
"""
import hashlib
import json
import math
import os

import numpy as np
import torch

from ..engine.errors import CryoClassError
from .network import BlushUNet, SIZE_MULTIPLE
from .resample import (centre_crop_or_pad, check_cubic_even, network_box, resample,
                       rfft_radius, soft_sphere)

#: Mask radius beyond the particle radius, and the mask's soft edge (A), as RELION.
MASK_EXTRA_A = 5.0
MASK_EDGE_A = 10.0
#: Shells (of the class map's grid) of the raised-cosine blend below the crossover.
BLEND_SHELLS = 3.0
#: The shipped weights.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "blush_v2.pt")
MODES = ("replace", "prior-mean")


def load_network(path):
    """``(model, network_apix, metadata)`` from a weights file written by
    :func:`.train.save_weights` (read with ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise CryoClassError(f"Blush weights file {path} does not exist; train one with "
                             "'cryoclass train-blush --out FILE' or reinstall the package")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = BlushUNet(tuple(ckpt["widths"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CryoClassError(f"Blush weights file {path} is not a cryoclass Blush network "
                             f"({type(exc).__name__}: {str(exc)[:120]}); train one with "
                             "'cryoclass train-blush'") from None
    meta = json.loads(ckpt.get("report_json", "{}"))
    return model.eval(), float(ckpt["network_apix"]), meta


def blend_weight(box, apix, crossover_a, width=BLEND_SHELLS, device=None, lowres_a=0.0):
    """D's weight per element of a ``box``^3 real FFT (``rfftn`` order): 1 up to
    ``s_c - width``, raised cosine to 0 at ``s_c = box apix / crossover_a``, 0 beyond
    (float64).  With ``lowres_a`` > 0 also 0 up to ``s_l = box apix / lowres_a`` and a
    raised cosine from 0 to 1 over the ``width`` shells after it."""
    s_c = box * apix / float(crossover_a)
    r = rfft_radius(box, device=device)
    t = torch.clamp((r - (s_c - width)) / width, 0.0, 1.0)
    w = 0.5 + 0.5 * torch.cos(math.pi * t)
    if lowres_a > 0:
        s_l = box * apix / float(lowres_a)
        t_low = torch.clamp((r - s_l) / width, 0.0, 1.0)
        w = w * (0.5 - 0.5 * torch.cos(math.pi * t_low))
    return w


def prior_mean_ft(sum_x, weight, prior, d_ft):
    """The prior-mean reconstruction per Fourier voxel:
    ``(sum X + D / (T tau2)) / (W + 1 / (T tau2))`` with ``prior = 1 / (T tau2)`` per
    voxel (the caller folds any padding factor into it, as the M-step's ``pad^3``);
    ``W + prior == 0`` (no data, no prior) gives ``D``."""
    den = weight + prior
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, (sum_x + d_ft * prior) / safe, d_ft)


def _half(centred):
    """A centred transform of the engine (``fftshift(fftn(ifftshift(x)))``) as the
    ``rfftn(x)`` half: unshift the frequencies, keep ``kx >= 0``, and undo the real-space
    shift by half a box (the phase ``(-1)^(kz + ky + kx)`` for an even box)."""
    n = centred.shape[-1]
    half = torch.fft.ifftshift(centred, dim=(0, 1, 2))[:, :, :n // 2 + 1]
    if not half.is_complex():
        return half
    k = torch.arange(n, device=half.device)
    sign = 1 - 2 * ((k[:, None, None] + k[None, :, None] + k[None, None, :n // 2 + 1]) % 2)
    return half * sign


def _as_tensor(arr):
    """``(tensor, kind)``: numpy -> CPU tensor sharing memory; CuPy -> CUDA tensor by
    DLPack (host copy when torch has no CUDA); tensors pass through."""
    if isinstance(arr, torch.Tensor):
        return arr, "torch"
    if type(arr).__module__.startswith("cupy"):
        if torch.cuda.is_available():
            return torch.from_dlpack(arr), "cupy"
        return torch.from_numpy(arr.get()), "cupy-host"
    return torch.from_numpy(np.ascontiguousarray(arr)), "numpy"


def _back(t, kind, dtype):
    if kind == "torch":
        return t
    if kind == "cupy":
        import cupy
        return cupy.from_dlpack(t.to(torch.float32).contiguous()).astype(dtype, copy=False)
    out = t.detach().cpu().numpy().astype(dtype, copy=False)
    if kind == "cupy-host":
        import cupy
        return cupy.asarray(out)
    return out


class BlushRegulariser:
    """The trained network and the Blush steps (module docstring); one instance per run,
    one :meth:`regularise` call per class and iteration."""

    def __init__(self, weights=None, device="cpu", threads=1, block=64, margin=16,
                 max_single=128):
        self.weights = os.path.abspath(weights or DEFAULT_WEIGHTS)
        self.model, self.network_apix, self.meta = load_network(self.weights)
        if device not in ("cpu", "cuda"):
            raise CryoClassError(f"Blush device '{device}': use 'cpu' or 'cuda'")
        if device == "cuda" and not torch.cuda.is_available():
            raise CryoClassError("Blush on the GPU needs a CUDA build of torch "
                                 "(this one is CPU-only); run Blush on the CPU")
        if block % SIZE_MULTIPLE or block <= 2 * margin:
            raise CryoClassError(f"Blush block {block}: use a multiple of {SIZE_MULTIPLE} "
                                 f"larger than twice the margin ({margin})")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.threads = max(1, int(threads))
        self.block, self.margin, self.max_single = block, margin, max_single
        self.device_used = None

    def describe(self):
        """One line for the run's log: which weights, their checksum and training."""
        with open(self.weights, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:16]
        seed = self.meta.get("seed", "?")
        return (f"Blush weights {os.path.basename(self.weights)} (sha256 {digest}..., "
                f"{sum(p.numel() for p in self.model.parameters())} parameters, "
                f"{self.network_apix:g} A voxels, trained with seed {seed})")

    def default_crossover(self):
        return 2.0 * self.network_apix

    # ------------------------------------------------------------------ network pass
    def _run_network(self, x):
        """Network output for a standardised cube ``x`` (S^3 float32, S % 8 == 0)."""
        with torch.no_grad():
            s = x.shape[0]
            if s <= self.max_single:
                return self.model(x[None, None])[0, 0]
            b, m = self.block, self.margin
            core = b - 2 * m
            n_tiles = -(-s // core)
            pad_hi = n_tiles * core - s + m
            xp = torch.nn.functional.pad(x[None, None], (m, pad_hi) * 3)[0, 0]
            out = torch.zeros_like(x)
            for iz in range(n_tiles):
                for iy in range(n_tiles):
                    for ix in range(n_tiles):
                        z, y, w = iz * core, iy * core, ix * core
                        y_blk = self.model(xp[z:z + b, y:y + b, w:w + b][None, None])[0, 0]
                        c = y_blk[m:m + core, m:m + core, m:m + core]
                        ez, ey, ew = (min(core, s - v) for v in (z, y, w))
                        out[z:z + ez, y:y + ey, w:w + ew] = c[:ez, :ey, :ew]
            return out

    def denoise_tensor(self, vol, apix, particle_diameter_a):
        """D (float64 tensor, the input's grid and device) of a real map tensor."""
        check_cubic_even(vol, "class map")
        n = vol.shape[0]
        m, net_apix = network_box(n, apix, self.network_apix)
        v_net = resample(vol, m) if m != n else vol.to(torch.float64)
        radius = (0.5 * particle_diameter_a + MASK_EXTRA_A) / net_apix
        edge = MASK_EDGE_A / net_apix
        side = int(math.ceil(2 * (radius + edge) + 2))
        side = SIZE_MULTIPLE * int(math.ceil(side / SIZE_MULTIPLE))
        cube = centre_crop_or_pad(v_net, side)
        mask = soft_sphere(side, radius, edge, device=cube.device)
        rms = torch.sqrt((mask * cube * cube).sum() / mask.sum())
        if not torch.isfinite(rms) or float(rms) <= 0:
            return torch.zeros_like(vol, dtype=torch.float64)
        x = (cube * mask / rms).to(torch.float32)
        d_cube = self._run_network(x).to(torch.float64) * rms * mask
        d_net = centre_crop_or_pad(d_cube, m)
        return resample(d_net, n) if m != n else d_net

    # ------------------------------------------------------------------ public call
    def regularise(self, v_reg, apix, particle_diameter_a, crossover_a=None, mode="replace",
                   sums=None, lowres_a=0.0):
        """The Blush-regularised class map (module docstring), same shape, dtype and
        array type (numpy / CuPy / torch) as ``v_reg``.

        ``sums``: for ``mode='prior-mean'`` only, ``(sum_x, weight, prior)`` on the
        centred (engine convention, zero frequency at ``N // 2``), unpadded transform
        grid of ``v_reg`` (complex, real, real; ``prior`` = ``1 / (T tau2)`` per voxel),
        on the scale where ``v_reg``'s centred transform is ``sum_x / (weight + prior)``.
        """
        if mode not in MODES:
            raise CryoClassError(f"Blush mode '{mode}': choose from {', '.join(MODES)}")
        if (mode == "prior-mean") != (sums is not None):
            raise CryoClassError("Blush: mode 'prior-mean' needs the reconstruction sums "
                                 "(sum X, W, 1 / (T tau2)); mode 'replace' takes none")
        crossover_a = self._crossover(crossover_a)
        vol, kind = _as_tensor(v_reg)
        self.device_used = f"{kind} on {self.device.type}"
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            vol = vol.to(self.device)
            d = self.denoise_tensor(vol, float(apix), float(particle_diameter_a))
            n = vol.shape[0]
            f_reg = torch.fft.rfftn(vol.to(torch.float64), dim=(0, 1, 2))
            f_d = torch.fft.rfftn(d, dim=(0, 1, 2))
            if mode == "prior-mean":
                sum_x, weight, prior = (_half(_as_tensor(a)[0].to(self.device)) for a in sums)
                f_d = prior_mean_ft(sum_x, weight, prior, f_d)
            w = blend_weight(n, float(apix), crossover_a, device=self.device,
                             lowres_a=lowres_a)
            out = torch.fft.irfftn(w * f_d + (1.0 - w) * f_reg, s=(n, n, n), dim=(0, 1, 2))
        finally:
            torch.set_num_threads(previous)
        return _back(out, kind, np.dtype(str(v_reg.dtype).replace("torch.", "")))

    def _crossover(self, crossover_a):
        crossover_a = self.default_crossover() if crossover_a is None else float(crossover_a)
        if crossover_a < self.default_crossover() - 1e-9:
            raise CryoClassError(f"Blush crossover {crossover_a:g} A is finer than the "
                                 f"network's Nyquist ({self.default_crossover():g} A); use "
                                 "a value >= that")
        return crossover_a

    def blend(self, v_reg, other, apix, crossover_a=None, lowres_a=0.0):
        """``other`` below the crossover (and above ``lowres_a`` when > 0), ``v_reg``
        elsewhere, the raised-cosine blends between (step 6 of the module docstring), for callers that build the map to
        blend themselves (e.g. a prior-mean reconstruction on the M-step's padded grid
        from :meth:`denoise`'s D and :func:`prior_mean_ft`).  Same array type as
        ``v_reg``."""
        crossover_a = self._crossover(crossover_a)
        vol, kind = _as_tensor(v_reg)
        oth = _as_tensor(other)[0].to(self.device)
        if tuple(oth.shape) != tuple(vol.shape):
            raise CryoClassError(f"Blush blend: maps of shapes {tuple(vol.shape)} and "
                                 f"{tuple(oth.shape)} differ")
        vol = vol.to(self.device)
        n = vol.shape[0]
        w = blend_weight(n, float(apix), crossover_a, device=self.device, lowres_a=lowres_a)
        f = (w * torch.fft.rfftn(oth.to(torch.float64), dim=(0, 1, 2))
             + (1.0 - w) * torch.fft.rfftn(vol.to(torch.float64), dim=(0, 1, 2)))
        out = torch.fft.irfftn(f, s=(n, n, n), dim=(0, 1, 2))
        return _back(out, kind, np.dtype(str(v_reg.dtype).replace("torch.", "")))

    def denoise(self, v_reg, apix, particle_diameter_a):
        """D alone (the masked network output on the input's grid; no blend)."""
        vol, kind = _as_tensor(v_reg)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            d = self.denoise_tensor(vol.to(self.device), float(apix), float(particle_diameter_a))
        finally:
            torch.set_num_threads(previous)
        return _back(d, kind, np.float32 if kind != "torch" else None)
