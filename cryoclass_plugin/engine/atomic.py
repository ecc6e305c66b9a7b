"""Atomic file writes: write a temporary file beside the target, then ``os.replace``.

A reader never sees a half-written output, and a failed write (disk full, an interrupt)
removes its temporary file, so that nothing partial stays behind.  Temporary names are
``.<name>.tmp<pid>`` (hidden) or ``<name>.tmp<pid><suffix>`` (for writers such as
``numpy.savez`` that insist on a suffix); :func:`.run_guard.remove_temporaries` knows
both.
"""
import os
from contextlib import contextmanager


def temporary_name(path, hidden=True, suffix=""):
    """The temporary file name for an atomic write of ``path`` (its folder is created)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    tmp = f".{name}.tmp{os.getpid()}" if hidden else f"{name}.tmp{os.getpid()}{suffix}"
    return os.path.join(folder, tmp)


@contextmanager
def replacing(path, hidden=True, suffix=""):
    """Yield the temporary name for ``path``; on success it replaces ``path``, on any
    failure it is removed and the error goes on."""
    tmp = temporary_name(path, hidden, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
