"""The array-module switch: one code path for numpy (CPU) and CuPy (GPU).

Every numerical function in the engine takes or derives ``xp`` (``numpy`` or ``cupy``)
and uses ``xp.fft``; nothing else in the engine imports cupy.
"""
import numpy as np

from .errors import CryoClassError


def get_xp(arr):
    """The array module that owns ``arr`` (cupy for device arrays, else numpy)."""
    mod = type(arr).__module__
    if mod.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_numpy(arr):
    """A host (numpy) copy of ``arr``, which may be a cupy array."""
    if type(arr).__module__.startswith("cupy"):
        return arr.get()
    return np.asarray(arr)


def parse_gpu_ids(spec):
    """RELION's ``--gpu`` syntax: '' or '0' or '0:1:2:3' (ranks separated by ':'; commas
    separate devices of one rank's threads, of which we use the first)."""
    spec = (spec or "").strip()
    if not spec:
        return []
    ids = []
    for part in spec.split(":"):
        first = part.split(",")[0].strip()
        if not first.isdigit():
            raise CryoClassError(f"--gpu '{spec}': '{part}' is not a device number; "
                                 "use RELION's syntax, e.g. --gpu 0:1")
        ids.append(int(first))
    return ids


def select_backend(use_gpu, gpu_spec="", rank=0):
    """Return ``(xp, device_id)``; with ``use_gpu`` the rank's CuPy device is made current.

    Raises a one-line :class:`CryoClassError` when a GPU is asked for but CuPy or a device
    is missing.
    """
    if not use_gpu:
        return np, None
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise CryoClassError("--gpu given but CuPy is not usable here "
                             f"({type(exc).__name__}); install the [gpu] extra "
                             "(pip install 'scipion-em-cryoclass[gpu]') or drop --gpu") from None
    try:
        n_dev = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        n_dev = 0
    if n_dev == 0:
        raise CryoClassError("--gpu given but no CUDA device is visible; drop --gpu "
                             "or check CUDA_VISIBLE_DEVICES")
    ids = parse_gpu_ids(gpu_spec) or list(range(n_dev))
    dev = ids[rank % len(ids)]
    if dev >= n_dev:
        raise CryoClassError(f"--gpu '{gpu_spec}': device {dev} does not exist "
                             f"(this machine has {n_dev}); use numbers 0..{n_dev - 1}")
    cupy.cuda.Device(dev).use()
    return cupy, dev


def pool_limit_bytes(total_bytes, free_mb):
    """The memory pool's cap (bytes) that leaves ``free_mb`` MB (2**20 bytes) of a
    device of ``total_bytes`` free; a one-line error when nothing would be left."""
    limit = int(total_bytes - free_mb * 2 ** 20)
    if limit <= 0:
        raise CryoClassError(f"--free_gpu_memory {free_mb:g}: the device has only "
                             f"{total_bytes / 2 ** 20:.0f} MB; leave less free")
    return limit


def reserve_gpu_memory(xp, free_mb):
    """``--free_gpu_memory``: cap the current device's CuPy memory pool so that
    ``free_mb`` MB stay free for other programs (RELION's reserve); returns the cap."""
    total = xp.cuda.Device().mem_info[1]
    limit = pool_limit_bytes(total, free_mb)
    xp.get_default_memory_pool().set_limit(size=limit)
    return limit
