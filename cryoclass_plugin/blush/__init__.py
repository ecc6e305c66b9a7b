"""Blush regularisation: a trained 3D denoising prior for the class maps of 3D
classification (RELION 5's idea, on our own small network and training code).

- :mod:`.network`: the residual 3D U-Net (map + local standard deviation in, map minus
  predicted noise out);
- :mod:`.resample`: Fourier crop / pad resampling to the network's 3 A voxels and the
  soft spherical mask;
- :mod:`.denoise`: :class:`.denoise.BlushRegulariser`, one ``regularise`` call per class
  map and iteration (denoise, blend with the regularised reconstruction in Fourier
  space);
- :mod:`.training_data` and :mod:`.train`: synthetic clean maps, reconstruction-like
  degradations, and the deterministic training run behind ``cryoclass train-blush``;
- ``weights/``: the shipped weights and their model card.

torch is imported by these modules only (not by the engine), so the engine without
``--blush`` does not pay its import time.
"""
