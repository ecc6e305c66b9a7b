"""Bad inputs and faults through ``cryoclass refine``, each in a subprocess, with a tally.

Every case runs the command line a user would type on a tiny simulated set (24 particles,
box 24, 8 A/px; ``--iter 1 --healpix_order 0``) and judges what came back:

* ``error``: exit status non-zero, exactly one line on stderr, no ``Traceback``, and the
  line names the file / field / flag given in the case (its ``words``);
* ``warning``: exit status 0 and the warning's words in the run's output;
* ``interrupt``: SIGTERM / SIGINT mid-run gives exit 130 and one line naming the
  iteration to ``--continue`` from; the ``--continue`` then finishes (exit 0).

A case may add checks of its own (no temporary file left, the earlier run's files kept).
Cases that need what the machine does not allow (mounting a tmpfs, ``mpirun``) are
SKIPped with the reason.

    python benchmarks/reliability_tally.py [--work DIR] [--only NAME ...]

prints one row per case (case, exit code, the stderr line, PASS / FAIL / SKIP) and exits
non-zero when any case FAILs.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

COMMON = ["--iter", "1", "--healpix_order", "0", "--offset_range", "0", "--j", "1"]
TIMEOUT_S = 60


class Skip(Exception):
    """The case cannot run on this machine (the message says why)."""


@dataclass
class Outcome:
    kind: str                       # "error" | "warning" | "interrupt"
    rc: int
    stdout: str
    stderr: str
    words: tuple = ()
    problems: list = field(default_factory=list)   # failed extra checks
    mpi: bool = False               # judge only cryoclass's lines (mpirun adds its own)

    def stderr_lines(self):
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return [line for line in lines if line.startswith("cryoclass")] if self.mpi else lines

    def verdict(self):
        """``(passed, reasons)``."""
        lines, reasons = self.stderr_lines(), list(self.problems)
        if "Traceback" in self.stderr:
            reasons.append("traceback on stderr")
        if self.kind == "warning":
            if self.rc != 0:
                reasons.append(f"exit {self.rc}, expected 0")
            text = self.stdout + self.stderr
            reasons += [f"no {w!r} in the output" for w in self.words if w not in text]
        else:
            if self.kind == "interrupt" and self.rc != 130:
                reasons.append(f"exit {self.rc}, expected 130")
            if self.rc == 0:
                reasons.append("exit 0")
            if len(lines) != 1:
                reasons.append(f"{len(lines)} stderr lines")
            line = lines[0] if lines else ""
            reasons += [f"no {w!r} in the stderr line" for w in self.words if w not in line]
        return not reasons, reasons

    def line(self):
        lines = self.stderr_lines()
        if self.kind == "warning":
            found = [x for x in (self.stdout + self.stderr).splitlines() if "warning" in x]
            return found[0] if found else ""
        return lines[0] if len(lines) == 1 else " | ".join(lines[-3:])


class Workspace:
    """A fresh folder per case holding a copy of the simulated data set (``data/``)."""

    def __init__(self, root, base):
        self.root = root
        self.data = os.path.join(root, "data")
        shutil.copytree(base, self.data)
        self.out = os.path.join(root, "out", "run")

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def args(self, *extra, star="particles.star", ref="ref.mrc", out=None):
        return (["--i", os.path.join(self.data, star), "--ref", os.path.join(self.data, ref),
                 "--o", out or self.out] + COMMON + list(extra))

    def popen(self, args, mpi=0, memory_limit=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "cryoclass_plugin.cli", "refine"] + list(args)
        if mpi:
            cmd = [mpirun(), "-np", str(mpi), "--oversubscribe", "--allow-run-as-root"] + cmd

        def prepare():
            # Ctrl-C as in a terminal: a shell's background job (nohup ... &, some CI
            # runners) passes SIGINT on ignored, and Python then never raises
            # KeyboardInterrupt for it.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if memory_limit:              # ulimit -v: the address space the run may take
                import resource
                resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        return subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=prepare)

    def run(self, args, kind="error", words=(), mpi=0, memory_limit=None):
        proc = self.popen(args, mpi=mpi, memory_limit=memory_limit)
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n(killed after {TIMEOUT_S} s)"
        return Outcome(kind, proc.returncode, out, err, tuple(words), mpi=bool(mpi))

    def ok_run(self, *extra, out=None):
        """A normal run (its outcome must be exit 0)."""
        res = self.run(self.args(*extra, out=out))
        if res.rc != 0:
            raise RuntimeError(f"the preparing run failed: {res.stderr.strip()[-300:]}")
        return res


def mpirun():
    path = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return path if os.path.exists(path) else shutil.which("mpirun")


def leftovers(folder):
    """Temporary files of atomic writes left in ``folder``."""
    return sorted(n for n in os.listdir(folder) if ".tmp" in n) if os.path.isdir(folder) else []


# ---------------------------------------------------------------- editing the inputs
def edit_stack(w, fn):
    import mrcfile
    with mrcfile.open(os.path.join(w.data, "particles.mrcs"), "r+") as m:
        fn(m.data)


def write_map(path, vol, apix=8.0):
    import warnings
    import mrcfile
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as m:
        warnings.simplefilter("ignore", RuntimeWarning)     # the NaN voxel is meant
        m.set_data(np.asarray(vol, dtype=np.float32))
        m.voxel_size = apix


def read_map(path):
    import mrcfile
    with mrcfile.open(path) as m:
        return np.array(m.data)


def edit_star(w, fn, name="particles.star", new=None):
    """Rewrite the particle STAR's text through ``fn(lines) -> lines``."""
    with open(os.path.join(w.data, name)) as fh:
        lines = fh.read().splitlines()
    with open(os.path.join(w.data, new or name), "w") as fh:
        fh.write("\n".join(fn(lines)) + "\n")
    return new or name


def particle_rows(lines):
    return [i for i, line in enumerate(lines) if "@" in line and not line.startswith("_")]


def mount_tmpfs(folder, options):
    """Mount a tmpfs at ``folder`` (root only); raises :class:`Skip` if not allowed."""
    os.makedirs(folder, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", folder],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise Skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not permitted'})")
    return folder


def umount(folder):
    subprocess.run(["umount", "-l", folder], capture_output=True)


def unwritable_folder(w, name):
    """A folder this process cannot write in: a read-only tmpfs as root, mode 555 else."""
    folder = w.path(name)
    if os.geteuid() == 0:
        mount_tmpfs(folder, "ro,size=1m")
        w.mounts.append(folder)
    else:
        os.makedirs(folder)
        os.chmod(folder, 0o555)
    return folder


# ---------------------------------------------------------------- the cases
CASES = []


def case(name):
    def register(fn):
        CASES.append((name, fn))
        return fn
    return register


@case("NaN pixel in one particle")
def _(w):
    edit_stack(w, lambda d: d.__setitem__((6, 3, 4), np.nan))
    return w.run(w.args(), words=("particles.mrcs", "particle 7", "non-finite"))


@case("Inf pixel in one particle")
def _(w):
    edit_stack(w, lambda d: d.__setitem__((11, 0, 0), np.inf))
    return w.run(w.args(), words=("particles.mrcs", "particle 12", "non-finite"))


@case("NaN voxel in the reference")
def _(w):
    vol = read_map(os.path.join(w.data, "ref.mrc"))
    vol[5, 6, 7] = np.nan
    write_map(os.path.join(w.data, "ref.mrc"), vol)
    return w.run(w.args(), words=("ref.mrc", "non-finite"))


@case("all-zero image")
def _(w):
    edit_stack(w, lambda d: d.__setitem__(2, 0.0))
    return w.run(w.args(), words=("particles.mrcs", "particle 3", "constant"))


@case("mask values outside [0, 1]")
def _(w):
    mask = np.zeros((24, 24, 24), np.float32)
    mask[6:18, 6:18, 6:18] = 2.0
    write_map(os.path.join(w.data, "mask.mrc"), mask)
    return w.run(w.args("--solvent_mask", os.path.join(w.data, "mask.mrc")),
                 words=("mask.mrc", "0..1"))


@case("--particle_diameter -50")
def _(w):
    return w.run(w.args("--particle_diameter", "-50"), words=("--particle_diameter",))


@case("--ini_high -10")
def _(w):
    return w.run(w.args("--ini_high", "-10"), words=("--ini_high",))


@case("K larger than the particles")
def _(w):
    return w.run(w.args("--K", "30"), words=("--K 30", "particles.star"))


@case("50 duplicated rows (warning)")
def _(w):
    def dup(lines):
        rows = particle_rows(lines)
        return lines + [lines[rows[i % len(rows)]] for i in range(50)]
    edit_star(w, dup)
    return w.run(w.args(), kind="warning", words=("warning", "50 duplicated particle row"))


def _continue_with(w, flag):
    w.ok_run()
    other = os.path.join(w.data, "other" + (".star" if flag == "--i" else ".mrc"))
    shutil.copy(os.path.join(w.data, "particles.star" if flag == "--i" else "ref.mrc"), other)
    if flag == "--i":
        # The same particles under another name, so only the changed path is at issue.
        shutil.copy(os.path.join(w.data, "particles.mrcs"), os.path.join(w.data, "other.mrcs"))
    res = w.run(["--continue", w.out + "_it001_optimiser.star", flag, other,
                 "--o", w.path("out", "cont"), "--iter", "2"], words=(flag,))
    return res


@case("--continue with another --i")
def _(w):
    return _continue_with(w, "--i")


@case("--continue with another --ref")
def _(w):
    return _continue_with(w, "--ref")


@case("--o holding another run")
def _(w):
    w.ok_run()
    before = sorted(os.listdir(w.path("out")))
    res = w.run(w.args("--K", "2"), words=("--o", "another run", "--overwrite"))
    if sorted(os.listdir(w.path("out"))) != before:
        res.problems.append("the earlier run's files changed")
    return res


@case("--i inside the run's own outputs")
def _(w):
    w.ok_run()
    data = w.out + "_it001_data.star"
    res = w.run(["--i", data, "--ref", os.path.join(w.data, "ref.mrc"), "--o", w.out,
                 "--overwrite"] + COMMON, words=("--o", "own input"))
    if not os.path.exists(data):
        res.problems.append("the input was removed")
    return res


@case("two concurrent runs into one --o")
def _(w):
    first = w.popen(w.args("--iter", "12"))
    lock = w.out + ".lock"
    t0 = time.time()
    while not os.path.exists(lock) and first.poll() is None and time.time() - t0 < 60:
        time.sleep(0.01)
    took_lock = os.path.exists(lock) and first.poll() is None
    # The first run is held still while the second starts: a tiny run can finish its 12
    # iterations before a second interpreter has imported the engine, and then the
    # second run rightly finds no one writing.
    if took_lock:
        first.send_signal(signal.SIGSTOP)
    try:
        res = w.run(w.args("--overwrite"), words=("--o", "another run is writing"))
    finally:
        if took_lock:
            first.send_signal(signal.SIGCONT)
    if not took_lock:
        res.problems.append("the first run never held the lock (it ended or took > 60 s)")
    out, err = first.communicate(timeout=TIMEOUT_S)
    if first.returncode != 0:
        res.problems.append(f"the first run failed (exit {first.returncode}): "
                            f"{err.strip()[-200:]}")
    elif not os.path.exists(w.out + "_it012_optimiser.star"):
        res.problems.append("the first run's outputs are missing")
    return res


@case("--o in an unwritable folder")
def _(w):
    folder = unwritable_folder(w, "ro")
    return w.run(w.args(out=os.path.join(folder, "run")), words=("--o", folder))


@case("--o /proc/x/run")
def _(w):
    return w.run(w.args(out="/proc/x/run"), words=("--o", "/proc"))


@case("--o file/run (parent is a file)")
def _(w):
    open(w.path("file"), "w").close()
    return w.run(w.args(out=w.path("file", "run")), words=("--o", "file"))


@case("--o out/ (a folder)")
def _(w):
    return w.run(w.args(out=w.path("out") + "/"), words=("--o", "folder"))


@case("--scratch_dir is a file")
def _(w):
    open(w.path("scratch"), "w").close()
    return w.run(w.args("--scratch_dir", w.path("scratch")),
                 words=("--scratch_dir", "scratch"))


@case("--scratch_dir unwritable")
def _(w):
    folder = unwritable_folder(w, "roscratch")
    return w.run(w.args("--scratch_dir", folder), words=("--scratch_dir", folder))


@case("--continue from a truncated state file")
def _(w):
    w.ok_run()
    state = w.out + "_it001_state.npz"
    with open(state, "rb") as fh:
        head = fh.read(300)
    with open(state, "wb") as fh:
        fh.write(head)
    return w.run(["--continue", w.out + "_it001_optimiser.star", "--iter", "2"],
                 words=("run_it001_state.npz", "earlier iteration"))


@case("--continue with the state file missing")
def _(w):
    w.ok_run()
    os.remove(w.out + "_it001_state.npz")
    return w.run(["--continue", w.out + "_it001_optimiser.star", "--iter", "2"],
                 words=("run_it001_state.npz",))


@case("non-numeric defocus")
def _(w):
    def bad(lines):
        i = particle_rows(lines)[4]
        parts = lines[i].split()
        parts[2] = "abc"
        lines[i] = " ".join(parts)
        return lines
    edit_star(w, bad)
    return w.run(w.args(), words=("particles.star", "rlnDefocusU"))


@case("--healpix_order 5 under ulimit -v 4 GiB")
def _(w):
    # About 2.4 million rotations: the coarse pass alone needs ~9 GiB at the first
    # E-step radius (engine/memory.py), more than the limit leaves: refused up front.
    args = w.args()
    args[args.index("--healpix_order") + 1] = "5"
    return w.run(args, words=("memory", "GiB"), memory_limit=4 * 1024 ** 3)


@case("wrong rlnImageSize")
def _(w):
    def bad(lines):
        i = next(k for k, line in enumerate(lines) if line.startswith("opticsGroup1"))
        parts = lines[i].split()
        parts[7] = "32"
        lines[i] = " ".join(parts)
        return lines
    edit_star(w, bad)
    return w.run(w.args(), words=("particles.star", "rlnImageSize"))


@case("RELION 3.0 STAR without pixel size")
def _(w):
    def v30(lines):
        start = lines.index("data_particles")
        body = lines[start:]
        return ["# version 30001", ""] + body
    edit_star(w, v30)
    res = w.run(w.args(), words=("particles.star",))
    if "--angpix" in res.stderr:
        res.problems.append("recommends --angpix, which refine does not take")
    return res


def _signal_mid_run(w, signum):
    proc = w.popen(w.args("--iter", "12"))
    marker = w.out + "_it001_optimiser.star"
    t0 = time.time()
    while not os.path.exists(marker) and proc.poll() is None and time.time() - t0 < 30:
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    res = Outcome("interrupt", proc.returncode, out, err, ("--continue", "iteration"))
    line = res.stderr_lines()[0] if res.stderr_lines() else ""
    if "--continue " not in line:
        return res
    opt = line.split("--continue ")[1].split()[0]
    if not os.path.exists(w.path(opt) if not os.path.isabs(opt) else opt):
        res.problems.append(f"{opt} named for --continue does not exist")
        return res
    with open(w.out + ".log") as fh:
        if line.split(": ", 1)[-1] not in fh.read():
            res.problems.append("the message is not in run.log")
    done = w.run(["--continue", opt])
    if done.rc != 0 or not os.path.exists(w.out + "_it012_optimiser.star"):
        res.problems.append(f"--continue failed (exit {done.rc}): {done.stderr.strip()[-200:]}")
    if leftovers(w.path("out")):
        res.problems.append(f"temporaries left: {leftovers(w.path('out'))}")
    return res


@case("SIGTERM mid-run, then --continue")
def _(w):
    return _signal_mid_run(w, signal.SIGTERM)


@case("SIGINT mid-run, then --continue")
def _(w):
    return _signal_mid_run(w, signal.SIGINT)


@case("disk full (2 MB tmpfs)")
def _(w):
    folder = mount_tmpfs(w.path("full"), "size=2m")
    w.mounts.append(folder)
    # Leave about 100 kB: the start-up outputs (iteration 0) no longer fit.
    with open(os.path.join(folder, "filler"), "wb") as fh:
        fh.write(b"\0" * (2 * 1024 * 1024 - 100 * 1024))
    out = os.path.join(folder, "run")
    res = w.run(w.args(out=out), words=(folder, "no space left"))
    if leftovers(folder):
        res.problems.append(f"temporaries left: {leftovers(folder)}")
    return res


@case("disk full in --scratch_dir")
def _(w):
    folder = mount_tmpfs(w.path("fullscratch"), "size=16k")
    w.mounts.append(folder)
    res = w.run(w.args("--scratch_dir", folder), words=("--scratch_dir", "space left"))
    if leftovers(folder):
        res.problems.append(f"temporaries left: {leftovers(folder)}")
    return res


@case("mpirun -np 2: bad input, one line")
def _(w):
    if not mpirun():
        raise Skip("no mpirun")
    edit_stack(w, lambda d: d.__setitem__((20, 3, 4), np.nan))
    return w.run(w.args(), words=("particle 21", "non-finite"), mpi=2)


@case("mpirun -np 2: NaN reference (all ranks fail)")
def _(w):
    if not mpirun():
        raise Skip("no mpirun")
    vol = read_map(os.path.join(w.data, "ref.mrc"))
    vol[3, 3, 3] = np.nan
    write_map(os.path.join(w.data, "ref.mrc"), vol)
    res = w.run(w.args(), words=("ref.mrc", "non-finite"), mpi=2)
    if os.path.exists(w.out + ".lock"):
        res.problems.append("run.lock left behind")
    return res


@case("mpirun -np 2: SIGTERM, message once")
def _(w):
    if not mpirun():
        raise Skip("no mpirun")
    # Far more iterations than the signal leaves it: on a loaded machine the signal must
    # still find the run in its iterations, not done (when a signal ends a process as usual).
    proc = w.popen(w.args("--iter", "400"), mpi=2)
    marker = w.out + "_it001_optimiser.star"
    t0 = time.time()
    while not os.path.exists(marker) and proc.poll() is None and time.time() - t0 < TIMEOUT_S:
        time.sleep(0.01)
    if not os.path.exists(marker):
        proc.kill()
        out, err = proc.communicate(timeout=TIMEOUT_S)
        res = Outcome("interrupt", proc.returncode, out, err, ("--continue", "iteration"))
        res.problems.append(f"iteration 1 was not written within {TIMEOUT_S} s; not signalled")
        return res
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    # mpirun forwards SIGTERM to the ranks and stops forwarding their output as it
    # ends, so the message is judged in run.log: once, naming the iteration.
    with open(w.out + ".log") as fh:
        text = fh.read()
    logged = [line for line in text.splitlines() if line.startswith("terminated")]
    res = Outcome("interrupt", 130 if logged else proc.returncode, out, "\n".join(logged),
                  ("--continue", "iteration"))
    if not logged:
        res.problems.append("run.log ends: " + " | ".join(text.splitlines()[-2:])[-300:]
                            + f"; mpirun stderr: {err.strip()[-300:]}")
    return res


# ---------------------------------------------------------------- running the tally
def simulate(folder):
    from cryoclass_plugin.engine.simulate import simulate_dataset
    simulate_dataset(folder, n=24, box=24, apix=8.0, snr=1.0, n_classes=1, seed=0)
    return folder


def run_case(name, fn, base, work):
    w = Workspace(tempfile.mkdtemp(dir=work), base)
    w.mounts = []
    try:
        res = fn(w)
        passed, reasons = res.verdict()
        return dict(case=name, rc=res.rc, line=res.line(),
                    result="PASS" if passed else "FAIL", why="; ".join(reasons))
    except Skip as why:
        return dict(case=name, rc=None, line="", result="SKIP", why=str(why))
    except Exception as exc:      # a broken case is a FAIL with its reason
        return dict(case=name, rc=None, line="", result="FAIL",
                    why=f"{type(exc).__name__}: {exc}")
    finally:
        for folder in w.mounts:
            umount(folder)


def run_tally(work, only=None, echo=print):
    """Run every case (or those whose name contains one of ``only``); returns the rows."""
    base = simulate(os.path.join(work, "base"))
    rows = []
    for name, fn in CASES:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        t0 = time.time()
        row = run_case(name, fn, base, work)
        row["seconds"] = time.time() - t0
        rows.append(row)
        if echo:
            echo(format_row(row))
    return rows


def format_row(row):
    rc = "-" if row["rc"] is None else str(row["rc"])
    text = f"{row['result']:4s}  {row['case']:40s} exit {rc:>4s}  {row['line']}"
    if row["why"]:
        text += f"\n      ({row['why']})"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--only", nargs="*", help="run the cases whose name contains these")
    a = parser.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix="cryoclass_tally_")
    os.makedirs(work, exist_ok=True)
    rows = run_tally(work, a.only)
    counts = {k: sum(r["result"] == k for r in rows) for k in ("PASS", "FAIL", "SKIP")}
    print(f"{len(rows)} cases: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
          f"{counts['SKIP']} SKIP; {sum(r['seconds'] for r in rows):.0f} s")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
