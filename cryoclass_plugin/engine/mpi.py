"""MPI through mpi4py, with a serial stand-in so the engine runs without ``mpirun``.

Particles are split over ranks in contiguous ranges; every rank (rank 0 included) does
E-step and M-step sums on its share, the sums are added with Allreduce, and rank 0
writes the outputs.  Device (CuPy) arrays are reduced through host copies.

A rank that raises makes the whole job abort with a non-zero exit (``MPI.Abort``), so
that the others never hang in a collective.
"""
import os
import sys

import numpy as np

from .errors import CryoClassError

_COMM = []      # the process's communicator, made once


class SharedError(CryoClassError):
    """An error every rank meets alike (from the same inputs or a value rank 0 sent to
    all): rank 0 reports it and the others end quietly, so a job prints it once."""


class SerialComm:
    rank = 0
    size = 1

    def allreduce_sum(self, arr):
        return arr

    def allgather_concat(self, arr):
        return arr

    def bcast(self, obj):
        return obj

    def barrier(self):
        pass

    def abort(self, code=1):
        sys.exit(code)


class MPIComm:
    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allreduce_sum(self, arr):
        from mpi4py import MPI
        from .backend import get_xp, to_numpy
        xp = get_xp(arr)
        host = np.ascontiguousarray(to_numpy(arr))
        out = np.empty_like(host)
        self.comm.Allreduce(host, out, op=MPI.SUM)
        return xp.asarray(out)

    def allgather_concat(self, arr):
        """Concatenate each rank's array along axis 0 in rank order (rank 0's first)."""
        parts = self.comm.allgather(np.asarray(arr))
        return np.concatenate(parts, axis=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


def _launched_by_mpirun():
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK")
    return any(k in os.environ for k in keys)


def get_comm():
    """The world communicator when started under mpirun/mpiexec, else :class:`SerialComm`
    (one per process: later calls return the same)."""
    if _COMM:
        return _COMM[0]
    if not _launched_by_mpirun():
        return SerialComm()
    from mpi4py import MPI
    comm = MPIComm(MPI.COMM_WORLD)
    if comm.size > 1:
        _install_abort_on_error(comm)
    _COMM.append(comm)
    return comm


def _install_abort_on_error(comm):
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        sys.stderr.write(f"cryoclass: rank {comm.rank} failed ({exc_type.__name__}); "
                         "aborting all ranks\n")
        sys.stderr.flush()
        comm.abort(1)

    sys.excepthook = hook


def split_range(n, rank, size):
    """The contiguous ``[start, stop)`` share of ``n`` items for ``rank`` of ``size``."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
