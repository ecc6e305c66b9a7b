"""Worker threads of the CPU interpolation (projection) and insertion loops, the coarse
pass's score blocks and the fine pass's sub-batches.

The engine's gathers and scatter-adds (:mod:`.projector`) are numpy loops over chunks
of rotations; BLAS and the FFTs have threads of their own, these loops do not.  numpy
releases the GIL inside ``take``, its element-wise loops and ``bincount``'s counting, so
chunks of rotations run side by side in Python threads.  The engine sets the number of
threads from ``--j`` (:func:`set_workers`); CuPy arrays never use them.

Every chunk writes its own rows of the output (projection) or its own partial sums
(insertion, added in chunk order afterwards; fine sub-batches, added in their order by
:func:`map_in_order`), so results do not depend on the number of threads or on their
timing.
"""
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

_WORKERS = 1
_POOL = None
_THREAD_PREFIX = "cryoclass-worker"


def _serial(threaded):
    """Whether a map runs in the calling thread: unthreaded work, one worker, or a call
    from a worker thread itself (a nested map, e.g. a projection inside a local search's
    sub-batch, waiting for the same pool's threads could wait forever)."""
    return (not threaded or _WORKERS == 1
            or threading.current_thread().name.startswith(_THREAD_PREFIX))


def set_workers(n):
    """Use ``n`` (>= 1) threads in :func:`map_ranges`."""
    global _WORKERS, _POOL
    n = max(1, int(n))
    if n != _WORKERS and _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None
    _WORKERS = n


def workers():
    return _WORKERS


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=_THREAD_PREFIX)
    return _POOL


def split(n_items, chunk):
    """``(start, stop)`` ranges of at most ``chunk`` items covering ``range(n_items)``."""
    return [(s, min(s + chunk, n_items)) for s in range(0, n_items, max(1, int(chunk)))]


def map_ranges(fn, ranges, threaded=True):
    """``[fn(start, stop) for start, stop in ranges]``, the calls spread over the worker
    threads when there are more than one (and more than one range, and ``threaded``:
    callers pass ``xp is np``, as CuPy work stays on the calling thread); results in the
    order of ``ranges``."""
    if _serial(threaded) or len(ranges) < 2:
        return [fn(a, b) for a, b in ranges]
    return list(_pool().map(lambda r: fn(*r), ranges))


def map_in_order(compute, apply, items, threaded=True):
    """``apply(compute(item))`` for every item, applied in the items' order.

    The ``compute`` calls run on the worker threads, at most one per thread ahead of the
    ``apply`` calls (which run in the calling thread), so that only a few results are
    held at a time, and BLAS uses one thread meanwhile (the items already run side by
    side).  When ``compute`` reads shared state and only ``apply`` writes it, the outcome
    is that of the serial loop, whatever the number of threads.  With ``threaded`` false
    (CuPy work) the loop is serial."""
    if _serial(threaded):
        for item in items:
            apply(compute(item))
        return
    pending = deque()
    with single_threaded_blas():
        for item in items:
            pending.append(_pool().submit(compute, item))
            if len(pending) > _WORKERS:
                apply(pending.popleft().result())
        while pending:
            apply(pending.popleft().result())


@contextmanager
def single_threaded_blas(enabled=True):
    """Within the block, BLAS uses one thread when ``enabled``: for loops whose chunks
    already run side by side on the worker threads (BLAS threads on top of them would
    only compete for the same cores).  Without threadpoolctl nothing changes."""
    limiter = nullcontext()
    if enabled:
        try:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(limits=1, user_api="blas")
        except ImportError:
            pass
    with limiter:
        yield
