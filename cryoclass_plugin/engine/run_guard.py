"""What protects a run's output folder: the lock, the run identity, leftovers, signals.

A run owns the files ``<o>_itNNN_*``, ``<o>.log`` and ``<o>.lock`` (``--o <o>``).

* :func:`check_output_root` refuses an ``--o`` that cannot hold a run (a folder path, a
  parent that is a file or cannot be written) and a new run into an ``--o`` that holds
  another run's iterations, unless ``--overwrite`` (then the old run's files are removed
  first, so no iteration or class map of the old run stays mixed in); it refuses an
  input (``--i``, ``--ref``, ``--solvent_mask``) among the files the run would write.
* :class:`OutputLock` (``<o>.lock``, created with ``O_EXCL``, holding host and pid)
  refuses a second concurrent run into the same ``--o``; a lock whose process is gone
  (same host) is taken over.
* :func:`remove_temporaries` deletes the partial files of interrupted atomic writes
  (``.<name>.tmp<pid>`` and ``<name>.tmp<pid>.npz``) of this run.
* :func:`termination_signals` turns SIGTERM (a queue's time limit) into the same
  :class:`KeyboardInterrupt` as Ctrl-C, so both end with one message naming the last
  complete iteration to ``--continue`` from (:func:`last_complete_iteration`).

All errors are :class:`.errors.CryoClassError` with one line naming the path and the fix.
"""
import errno
import glob
import os
import re
import signal
import socket
from contextlib import contextmanager

from .errors import CryoClassError

_ITERATION_FILE = re.compile(r"_it(\d{3,})_(optimiser\.star|state\.npz|data\.star|model\.star|"
                             r"sampling\.star|class\d{3}\.mrc)$")
_TEMPORARY = re.compile(r"(^\..+\.tmp\d+$)|(\.tmp\d+\.npz$)")


def os_error_line(err, path, doing):
    """One line for an :class:`OSError` met while ``doing`` something with ``path``."""
    reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "the file system is read-only",
              errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a parent is not a folder",
              errno.ENOENT: "no such file or folder"}.get(err.errno, err.strerror or str(err))
    fix = {errno.ENOSPC: "free space there or give another --o",
           errno.EDQUOT: "free space there or give another --o"}.get(
        err.errno, "give a writable --o (a path like Class3D/job001/run)")
    return f"{path}: cannot {doing}: {reason}; {fix}"


def dropped_particles_path(output_root):
    """The list of the particles ``--drop_bad_particles`` left out."""
    return f"{output_root}_dropped_particles.star"


def run_files(output_root):
    """The files of the run ``output_root`` (iterations, state, the list of dropped
    particles), sorted."""
    folder, base = os.path.split(os.path.abspath(output_root))
    out = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(base) + "_it*")):
        if _ITERATION_FILE.search(os.path.basename(path)):
            out.append(path)
    dropped = dropped_particles_path(os.path.join(folder, base))
    if os.path.exists(dropped):
        out.append(dropped)
    return sorted(out)


def last_complete_iteration(output_root):
    """The last iteration with both its optimiser.star and state file, or None."""
    done = None
    for path in run_files(output_root):
        m = _ITERATION_FILE.search(path)
        if m and m.group(2) == "optimiser.star" and os.path.exists(
                path[: -len("_optimiser.star")] + "_state.npz"):
            done = max(done or 0, int(m.group(1)))
    return done


def check_output_root(output_root, inputs=(), continuing=False, overwrite=False):
    """Refuse an ``--o`` that cannot hold this run (module docstring); with
    ``overwrite`` remove the old run's files.  ``inputs``: the paths the run reads."""
    check_output_folder(output_root)
    check_existing_run(output_root, inputs, continuing, overwrite)


def check_output_folder(output_root):
    """Refuse an ``--o`` that is a folder or whose folder cannot be created or written;
    create the folder."""
    if not output_root or output_root.endswith(("/", os.sep)) or os.path.isdir(output_root):
        raise CryoClassError(f"--o {output_root!r}: give a rootname inside a folder, e.g. "
                             f"{os.path.join(output_root or 'Class3D', 'run')}, not a folder")
    _check_folder(os.path.dirname(os.path.abspath(output_root)), output_root)


def check_existing_run(output_root, inputs=(), continuing=False, overwrite=False):
    """Refuse a run that would overwrite one of its ``inputs`` or (unless ``continuing``
    or ``overwrite``) another run's files; with ``overwrite`` remove those files.  Call
    it holding the run's :class:`OutputLock`, so that a run still writing there is
    refused by the lock before any of its files is removed."""
    written = set(run_files(output_root))
    for path in inputs:
        if path and os.path.abspath(path) in written:
            raise CryoClassError(f"--o {output_root}: the run would overwrite its own input "
                                 f"{path}; give another --o")
    if continuing or not written:
        return
    if not overwrite:
        last = last_complete_iteration(output_root)
        hint = (f"--continue {output_root}_it{last:03d}_optimiser.star to go on with it"
                if last is not None else "remove its files")
        raise CryoClassError(f"--o {output_root}: holds another run ({len(written)} files); "
                             f"give a new --o, {hint}, or --overwrite to replace it")
    for path in sorted(written) + [f"{output_root}.log"]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise CryoClassError(os_error_line(err, path, "remove the old run's file"))


def _check_folder(folder, output_root):
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise CryoClassError(f"--o {output_root}: {probe} is a file, not a folder; give a "
                             "rootname inside a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CryoClassError(f"--o {output_root}: cannot write in {probe} (permission denied "
                             "or read-only); give a writable --o")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise CryoClassError(os_error_line(err, folder, "create the output folder"))


class OutputLock:
    """``<o>.lock`` held while a run writes into ``--o`` (module docstring)."""

    def __init__(self, output_root):
        self.path = f"{output_root}.lock"
        self.held = False

    def acquire(self):
        owner = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise CryoClassError(
                        f"--o {self.path[:-5]}: another run is writing there "
                        f"({self._owner() or 'unknown process'}); wait for it, or give "
                        f"another --o (remove {self.path} if that run is gone)")
                os.remove(self.path)
                continue
            except OSError as err:
                raise CryoClassError(os_error_line(err, self.path, "create the run's lock"))
            with os.fdopen(fd, "w") as fh:
                fh.write(owner)
            self.held = True
            return self
        raise CryoClassError(f"{self.path}: could not take the run's lock; remove it if no "
                             "run is writing into this --o")

    def _owner(self):
        try:
            with open(self.path) as fh:
                return fh.read().strip()
        except OSError:
            return ""

    def _stale(self):
        parts = self._owner().split()
        if len(parts) != 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
            return False
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self):
        if self.held:
            try:
                os.remove(self.path)
            except OSError:
                pass
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_temporaries(output_root, keep=()):
    """Delete partial files of interrupted atomic writes in the run's folder that belong
    to this run (names from :func:`.atomic.temporary_name`, as :func:`.star_io.write_star`
    and :meth:`.model.ModelState.save`), except the paths in ``keep``.  Returns the
    removed paths."""
    keep = {os.path.abspath(path) for path in keep}
    folder, base = os.path.split(os.path.abspath(output_root))
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        stem = name.lstrip(".")
        if os.path.join(folder, name) in keep:
            continue
        if _TEMPORARY.search(name) and (stem.startswith(base + "_it") or stem.startswith(base + ".")):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def termination_signals():
    """SIGTERM raises :class:`KeyboardInterrupt` (as SIGINT does) inside the block."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Launchers whose standard error is the user's terminal (or the job's output file) when
#: the job runs on one node.  Open MPI's ``prterun`` stops forwarding its ranks' output as
#: soon as it is signalled, so a rank's own message would be lost on the way.
_LAUNCHERS = ("prterun", "mpirun", "mpiexec", "orterun")


def launcher_stderr_path(pid=None):
    """``/proc/<parent>/fd/2`` when this process's parent is an MPI launcher (so that a
    rank can write the one message of an interrupted job where the user reads it), else
    None."""
    parent = os.getppid() if pid is None else pid
    try:
        with open(f"/proc/{parent}/comm") as fh:
            name = fh.read().strip()
    except OSError:
        return None
    return f"/proc/{parent}/fd/2" if name in _LAUNCHERS else None


def tell_launcher_terminal(line):
    """Write ``line`` to the MPI launcher's standard error; True when it was written."""
    path = launcher_stderr_path()
    if path is None:
        return False
    try:
        with open(path, "a") as fh:
            fh.write(line + "\n")
        return True
    except OSError:
        return False


def interrupted_line(output_root, what="interrupted"):
    """The message of a run ended by a signal: what to ``--continue`` from."""
    last = last_complete_iteration(output_root)
    if last is None:
        return f"{what} before the first iteration was complete; start the run again"
    return (f"{what}; the last complete iteration is {last}: continue with --continue "
            f"{output_root}_it{last:03d}_optimiser.star")


def available_memory():
    """Bytes this process may still take: :func:`.memory.available_memory_bytes` (free
    memory, cgroup limit), lowered to what the address-space limit (``ulimit -v``, a
    queue's per-job memory cap) leaves above the process's current size; None when
    neither is known."""
    import resource
    from .memory import available_memory_bytes
    free = available_memory_bytes()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return free
    size = 0
    try:
        with open("/proc/self/statm") as fh:
            size = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    left = max(0, soft - size)
    return left if free is None else min(free, left)
