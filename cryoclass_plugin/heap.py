"""The ``cryoclass`` process's malloc policy: keep freed memory for the next iteration.

An iteration allocates and frees the same large numpy temporaries again and again
(score blocks, projected slices, fine tables; tens of MB each at box 64).  glibc's
default gives every block above its dynamic mmap threshold (at most 32 MB) its own
mapping and unmaps it when freed, and trims the heap's top above 128 kB, so the next
block of the same size faults in fresh pages that the kernel must zero first.  With
the tutorial's 300-particle Class3D job at box 64 on two cores that zeroing was about
a fifth of all CPU samples and a third of the CPU time was system time.

:func:`retain_freed_memory` keeps blocks below :data:`MMAP_THRESHOLD_BYTES` on the
heap, trims the heap's top only above 2 GiB of free space and serves every thread from
one arena, so a freed temporary's pages are reused instead of returned.  Blocks of at least
:data:`MMAP_THRESHOLD_BYTES` (the projector grids and reconstructions of large boxes)
are still mapped and returned on their own, so the large-box memory plan
(:mod:`.engine.memory`) still holds: the resident set can grow by at most the heap's
high-water mark of smaller blocks.  The policy changes no result.

:func:`..cli.main` applies it before a command module imports numpy: a thread's
first allocation gives it an arena of its own unless the limit of one is already set,
and such an arena maps and unmaps its large blocks whatever the threshold.

Measured (benchmarks/bench_vs_relion's 300-particle job, ``--j 2``, AMD EPYC, two
cores; docs/benchmarks.md, "Speed against relion_refine"): minor page faults 0.67-0.72 M
-> 0.04-0.09 M, system time 13.3-13.5 -> 5.7-7.5 s, wall time 24.7-24.8 -> 19.6-22.4 s.
"""
import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks of at least this many bytes still get a mapping of their own, returned to the
#: system when freed.
MMAP_THRESHOLD_BYTES = 256 << 20

#: Extra bytes the heap grows by whenever it must grow (fewer, larger brk calls).
TOP_PAD_BYTES = 64 << 20

#: Trim the heap's top only above this many free bytes (mallopt takes a C int: the
#: largest value it accepts, 2 GiB).
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1

_applied = None


def retain_freed_memory():
    """Apply the policy to this process (once; later calls return the first result).
    Returns True where glibc accepted every setting; False where the defaults stay:
    another C library or system, or ``CRYOCLASS_HEAP=default`` in the environment
    (inherited by the engine's MPI ranks)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply():
    if os.environ.get("CRYOCLASS_HEAP", "") == "default":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                (_M_TOP_PAD, TOP_PAD_BYTES),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return all(mallopt(param, value) == 1 for param, value in settings)
