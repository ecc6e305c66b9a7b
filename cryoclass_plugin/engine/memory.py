"""Memory per rank: the formula, the free memory, and the start-up check.

Every Fourier volume lives on the iteration's cropped Hermitian half grid
(:mod:`.projector`): ``V = (2h+1)^2 (h+1)`` voxels with ``h = ceil(pad * r) + 1`` (capped
at ``pad * box / 2``), ``r = current_grid_shell(current_shell, box)``.  Per rank, in bytes
(K classes, N the box, B particles per block, n E-step pixels, T translations):

====================  =====================================================================
projectors            ``8 V K`` (complex64)
back-projectors       ``24 V (K + 1)`` (complex128 data + float64 weight; + the consensus)
grid transients       the larger of a projector build (``16 N (2h+1)(h+1) + 8 V``) and a
                      reconstruction (``36 V + 16 N (2h+1)(h+1) + 4 N^3``), plus three
                      64 MiB slabs (one volume at a time)
maps                  ``4 N^3 (2 K + 3)`` (class maps of this and the last iteration, the
                      consensus, the solvent mask and one reconstruction in flight)
coarse slices         ``20 K R_c n_c`` (complex64 slices, their float32 pair and power;
                      ``R_c`` coarse rotations, ``n_c`` coarse pixels)
block arrays          ``B n (12 + 8 T)`` (images, CTFs, shifted images) + the coarse
                      score budget (256 MiB, ``search.SearchSetup.block_log_budget``)
thread scratch        ``32 n 32`` per thread (the interpolation's per-chunk temporaries),
                      plus the fine pass's sub-batches in flight (``threads + 1`` with
                      several threads, else one), each ``5 x 16 MiB`` (their arrays
                      take about five budgets of ``search.FINE_BATCH_BYTES_CPU``)
fine tables           ``fine_table_bytes`` (the fine pass's budget)
image cache           ``cache_bytes`` (+ the whole stack with ``--preread_images``)
====================  =====================================================================

At box 360, pad 2, K=6 and current shell 47 (8.9 A at 1.34 A/px) the three grid items
come to 1.3 GiB, against 92 GiB for the same items on full padded grids
(:func:`full_grid_bytes`).
"""
import math
from dataclasses import dataclass, field

from .errors import CryoClassError
from .projector import _SLAB_BYTES, current_grid_shell, grid_half_extent
from .search import FINE_BATCH_BYTES_CPU

GiB = float(2 ** 30)
SCORE_BUDGET_BYTES = 4 * 64 * 2 ** 20       # search.SearchSetup.block_log_budget floats


def grid_voxels(box, pad, shell):
    """Voxels of one half grid for pixels up to ``shell`` (None: Nyquist)."""
    h = grid_half_extent(box, pad, shell)
    return (2 * h + 1) ** 2 * (h + 1), h


@dataclass
class MemoryEstimate:
    """Bytes per item (ordered) of one rank's peak working set."""
    items: dict = field(default_factory=dict)

    @property
    def total(self):
        return sum(self.items.values())

    def largest(self, n=3):
        return sorted(self.items.items(), key=lambda kv: -kv[1])[:n]

    def summary(self):
        """One line: the total and the items, in GiB."""
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.items.items() if v > 0)
        return f"memory per rank ~{self.total / GiB:.2f} GiB ({parts})"


def estimate_memory(box, current_shell, pad, n_classes, block_size, n_pixels, threads=1,
                    n_coarse_rotations=0, n_coarse_pixels=0, n_translations=1,
                    fine_table_bytes=0.0, cache_bytes=0.0, preread_bytes=0.0,
                    consensus=True):
    """The per-rank memory formula (module docstring) for an iteration whose E-step
    radius is ``current_shell`` (the grids are sized by :func:`current_grid_shell`)."""
    N, K = int(box), int(n_classes)
    V, h = grid_voxels(N, pad, current_grid_shell(current_shell, N))
    column = 16 * N * (2 * h + 1) * (h + 1)
    slabs = 3 * _SLAB_BYTES
    items = {
        "projectors": 8 * V * K,
        "back-projectors": 24 * V * (K + int(bool(consensus))),
        "grid transients": max(column + 8 * V, 36 * V + column + 4 * N ** 3) + slabs,
        "maps": 4 * N ** 3 * (2 * K + 3),
        "coarse slices": 20 * K * int(n_coarse_rotations) * int(n_coarse_pixels),
        "block arrays": int(block_size) * int(n_pixels) * (12 + 8 * int(n_translations))
        + SCORE_BUDGET_BYTES,
        "thread scratch": int(threads) * 32 * int(n_pixels) * 32
        + (int(threads) + 1 if int(threads) > 1 else 1) * 5 * FINE_BATCH_BYTES_CPU,
        "fine tables": int(fine_table_bytes),
        "image cache": int(cache_bytes) + int(preread_bytes),
    }
    return MemoryEstimate(items)


def max_current_shell(box, apix, strict_highres_exp):
    """The largest E-step radius a run can reach (the engine's image-size update):
    Nyquist - 1, or the shell of ``--strict_highres_exp`` (A; <= 0: none) if lower.
    The start-up check sizes the grids for it: a run that fits then fits to the end."""
    top = int(box) // 2 - 1
    if strict_highres_exp > 0:
        top = min(top, int(math.ceil(int(box) * float(apix) / float(strict_highres_exp))))
    return top


def full_grid_bytes(box, pad, n_classes, consensus=True):
    """The same grid items for full padded grids ``(pad N)^3`` (complex64 projector,
    complex128 + float64 sums, and a reconstruction's symmetrised copies, inverse and
    shell index): the memory the cropped half grids replace."""
    P3 = (int(pad) * int(box)) ** 3
    K = int(n_classes)
    return {"projectors": 8 * P3 * K,
            "back-projectors": 24 * P3 * (K + int(bool(consensus))),
            "grid transients": 48 * P3}


def available_memory_bytes():
    """Memory this process may still take: ``MemAvailable`` of /proc/meminfo, or the
    cgroup's limit minus its usage where that is lower (v2 ``memory.max`` /
    ``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``);
    None where neither can be read."""
    free = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2 ** 60:
            free.append(max(0, limit - usage))
            break
    return min(free) if free else None


def _read_int(path):
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# What shrinks each item (the options named in the error).
_REMEDY = {
    "projectors": "--pad 1 or a lower --strict_highres_exp",
    "back-projectors": "--pad 1 or a lower --strict_highres_exp",
    "grid transients": "--pad 1 or a lower --strict_highres_exp",
    "maps": "fewer classes (--K)",
    "coarse slices": "fewer classes (--K) or a lower --strict_highres_exp",
    "block arrays": "fewer particles per block (--block_size)",
    "thread scratch": "fewer threads (--j)",
    "fine tables": "fewer particles per block (--block_size)",
    "image cache": "no --preread_images",
}


def check_fits(estimate, available_bytes, ranks_per_node=1):
    """Raise a one-line :class:`CryoClassError` if ``ranks_per_node`` ranks of
    ``estimate`` do not fit ``available_bytes`` (None: unknown, not checked), naming the
    largest items and the options that shrink them."""
    if available_bytes is None:
        return
    need = estimate.total * int(ranks_per_node)
    if need <= available_bytes:
        return
    top = estimate.largest(3)
    what = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in top)
    remedies = []
    for k, _ in top:
        if _REMEDY[k] not in remedies:
            remedies.append(_REMEDY[k])
    raise CryoClassError(
        f"this job needs ~{need / GiB:.1f} GiB of memory per node ({what}) but "
        f"{available_bytes / GiB:.1f} GiB is free; to fit it use {'; or '.join(remedies)}")


def startup_report(estimate, available_bytes=None):
    """The start-up log line: the estimate and the free memory."""
    free = "unknown" if available_bytes is None else f"{available_bytes / GiB:.2f} GiB"
    return f"{estimate.summary()}; free memory {free}"

