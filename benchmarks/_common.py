"""Shared helpers of the benchmark scripts (not a benchmark itself).

- machine_info(): date, host, nproc, CPU model, memory, git commit, RELION version
- run_timed(cmd, cwd, log_path): run a command, return wall / CPU time / peak memory
- simulate(...): ``cryoclass simulate`` into a folder, returning its truth_summary.json
- cryoclass_refine_cmd(...), relion_refine_cmd(...): the RELION tutorial's Class3D flags
- evaluate_run(root, sim_dir): ARI, best-match accuracy, angular / offset errors and
  FSC-0.5 resolutions of the last iteration against the simulation's truth
- iteration_times(root): seconds per iteration (engine log or file timestamps)
- format_table(), append_results(): plain-text tables, and the raw log of every run
  (``scratch/benchmark_runs.md``, ignored by git)
- markdown_block(): a table in the format of docs/benchmarks.md (``--markdown``)

Everything runs from the repository's virtual environment (``.venv/bin/python``); the
engine's modules are imported from the working tree.
"""
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
VENV_BIN = os.path.join(REPO, ".venv", "bin")
CRYOCLASS = os.path.join(VENV_BIN, "cryoclass")
MPIRUN = os.path.join(VENV_BIN, "mpirun")
GNU_TIME = "/usr/bin/time"
# Raw log of benchmark runs (machine, exact commands, every column); /scratch/ is ignored
# by git: the curated tables live in docs/benchmarks.md.
RUN_LOG = os.path.join(REPO, "scratch", "benchmark_runs.md")
RELION_CACHE = os.path.join(REPO, "benchmarks", "relion_cache.json")


# ----------------------------------------------------------------------------- machine

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("nan")


def _cpu_features():
    """(family, model, has AVX-512, has AVX2) from /proc/cpuinfo (None where unknown)."""
    family = model = None
    flags = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "cpu family" and family is None:
                    family = value.strip()
                elif key == "model" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return family, model, "avx512f" in flags, "avx2" in flags


def _gpu_names():
    """Names of the NVIDIA GPUs (nvidia-smi), or [] where there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def relion_refine_path():
    return shutil.which("relion_refine")


def add_dataset_args(parser, n_default):
    """The simulated set's options (``cryoclass simulate``) as an argument group."""
    g = parser.add_argument_group("data set (cryoclass simulate)")
    g.add_argument("--n", type=int, default=n_default, help=f"particles ({n_default})")
    g.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio (0.05)")
    g.add_argument("--box", type=int, default=64, help="box in pixels (64)")
    g.add_argument("--apix", type=float, default=4.0, help="pixel size in A (4.0)")
    g.add_argument("--classes", type=int, default=3, help="true classes (3)")
    g.add_argument("--seed", type=int, default=0, help="simulation seed (0)")
    return g


def relion_version(exe=None):
    """``RELION version: X`` of ``exe`` (default: the relion_refine on PATH), 'unknown'
    when it does not say, None when there is none."""
    exe = exe or relion_refine_path()
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"RELION version:\s*(\S+)", out)
    return m.group(1) if m else "unknown"


def blas_core(engine=False):
    """The BLAS (and OpenBLAS core type) the venv's numpy gets in this environment, asked
    of a fresh interpreter (OpenBLAS picks its kernels when it is loaded: on CPUs it does
    not know it falls back to slow generic ones, see bench_gemm.py --compare-coretypes).
    ``engine=True``: the kernels the engine runs with (the interpreter imports
    cryoclass_plugin first, which sets OPENBLAS_CORETYPE from the CPU flags)."""
    code = ("import cryoclass_plugin\n" if engine else "") + ("import numpy\n"
            "from threadpoolctl import threadpool_info\n"
            "b=[i for i in threadpool_info() if i.get('user_api')=='blas']\n"
            "print(f\"{b[0].get('internal_api')} {b[0].get('version')} core "
            "{b[0].get('architecture')}\" if b else 'unknown')\n")
    py = os.path.join(VENV_BIN, "python")
    try:
        out = subprocess.run([py if os.path.exists(py) else sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60, cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    env = os.environ.get("OPENBLAS_CORETYPE")
    return (out or "unknown") + (f" (OPENBLAS_CORETYPE={env!r})" if env is not None else "")


def machine_info():
    """Facts to print next to timings."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "nproc": affinity,
        "cpu": _cpu_model(),
        "mem_gib": round(_mem_total_gib(), 1),
        "python": platform.python_version(),
        "git": _git_commit(),
        "relion": relion_version(),
        "blas": blas_core(),
        "engine_blas": blas_core(engine=True),
        "cpu_features": _cpu_features(),
        "gpus": _gpu_names(),
    }


def machine_properties(info=None):
    """The machine by its properties (no host name, no paths), for docs/benchmarks.md:
    cores, memory, CPU model and family, the BLAS kernels the engine uses, GPUs."""
    info = info or machine_info()
    family, model, avx512, avx2 = info.get("cpu_features") or (None, None, False, False)
    cpu = info["cpu"]
    if family is not None:
        cpu += f", family {family} model {model}"
    cpu += ", AVX-512" if avx512 else (", AVX2" if avx2 else "")
    gpus = info.get("gpus") or []
    return (f"{info['nproc']} cores, {info['mem_gib']} GiB memory, {cpu}; BLAS: "
            f"{info.get('engine_blas') or info.get('blas')}; "
            + (f"GPU: {'; '.join(gpus)}" if gpus else "no GPU")
            + (f"; RELION {info['relion']}" if info.get("relion") else ""))


def machine_line(info=None):
    info = info or machine_info()
    rel = f"RELION {info['relion']}" if info["relion"] else "relion_refine not installed"
    return (f"{info['date']}; host {info['host']}; nproc {info['nproc']}; {info['cpu']}; "
            f"{info['mem_gib']} GiB RAM; {info.get('blas', '')}; cryoclass git {info['git']}; {rel}")


# ----------------------------------------------------------------------------- running

class RunStats(dict):
    """wall_s, user_s, sys_s, cpu_s, maxrss_mb (largest single process), tree_rss_mb
    (peak of the summed RSS of the process tree, sampled every 0.25 s), other_load (mean
    cores busy with other processes during the run, from /proc/stat), rc, cmd, cwd,
    log, timed_out."""
    __getattr__ = dict.get


def _tree_rss_sampler(pid, stop, out):
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    peak = 0
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            break
        out["peak"] = peak
        stop.wait(0.25)


def _cpu_busy_seconds():
    """Seconds all CPUs spent busy since boot (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / float(hz)


def wait_for_idle(max_wait_s, threshold=0.5, quiet=False):
    """Wait (at most ``max_wait_s``) until the machine's other CPU use, measured over 5 s
    windows, is below ``threshold`` cores.  Returns the last measured load (cores)."""
    deadline = time.monotonic() + max_wait_s
    load = None
    while True:
        b0, t0 = _cpu_busy_seconds(), time.monotonic()
        time.sleep(5)
        b1, t1 = _cpu_busy_seconds(), time.monotonic()
        if b0 is None or b1 is None:
            return None
        load = (b1 - b0) / (t1 - t0)
        if load < threshold or time.monotonic() > deadline:
            break
        if not quiet:
            print(f"  machine busy ({load:.2f} cores in use by others); waiting", flush=True)
    return load


def run_timed(cmd, cwd, log_path, env=None, timeout=None, echo=True):
    """Run ``cmd`` (list) in ``cwd``, stdout+stderr to ``log_path``.

    Wall time from a monotonic clock; CPU time and max RSS from ``os.wait4`` on the child
    (which includes its waited-for descendants, e.g. mpirun's ranks); max RSS from
    /usr/bin/time (GNU time's %M: the largest single process of the tree) when
    installed, else wait4's ru_maxrss; ``tree_rss_mb`` is the peak sum over the process tree,
    sampled.  ``timeout`` seconds: the process group is killed and ``timed_out`` set.
    """
    cmd = [str(c) for c in cmd]
    if echo:
        print(f"  $ (cd {cwd} && {shlex.join(cmd)})", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)) or ".", exist_ok=True)
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    # ru_maxrss of a child forked from this (big) Python process counts the memory it
    # had before exec; /usr/bin/time, a small process, reports the command's own peak.
    rss_file = os.path.abspath(log_path) + ".maxrss"
    wrapped = cmd
    if os.path.exists(GNU_TIME):
        wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file] + cmd
    busy0 = _cpu_busy_seconds()
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(wrapped, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, start_new_session=True)
        stop, peak = threading.Event(), {"peak": 0}
        sampler = threading.Thread(target=_tree_rss_sampler, args=(proc.pid, stop, peak),
                                   daemon=True)
        sampler.start()
        timed_out = {"flag": False}

        def _kill():
            """Kill the command's processes; the /usr/bin/time wrapper (if any) is left to
            reap them and report their CPU time and peak memory; then the whole group."""
            timed_out["flag"] = True
            if wrapped is not cmd:
                try:
                    import psutil
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        try:
                            child.kill()
                        except psutil.Error:
                            pass
                    time.sleep(2)
                except Exception:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            _kill()
            raise
        finally:
            if timer:
                timer.cancel()
            stop.set()
        wall = time.monotonic() - t0
        busy1 = _cpu_busy_seconds()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.join(timeout=2)
    maxrss_kb = usage.ru_maxrss
    try:
        with open(rss_file) as fh:
            maxrss_kb = int(fh.read().split()[-1])
        os.remove(rss_file)
    except (OSError, ValueError, IndexError):
        pass
    stats = RunStats(
        cmd=shlex.join(cmd), cwd=str(cwd), log=str(log_path), rc=proc.returncode,
        wall_s=wall, user_s=usage.ru_utime, sys_s=usage.ru_stime,
        cpu_s=usage.ru_utime + usage.ru_stime, maxrss_mb=maxrss_kb / 1024.0,
        tree_rss_mb=peak["peak"] / 1024.0 ** 2, timed_out=timed_out["flag"])
    # CPU the rest of the machine used meanwhile (other users' jobs skew timings).
    if busy0 is not None and busy1 is not None and wall > 0:
        stats["other_load"] = max(0.0, (busy1 - busy0 - stats.cpu_s) / wall)
    if echo:
        state = "TIMED OUT" if stats.timed_out else f"rc {stats.rc}"
        other = stats.get("other_load")
        print(f"    {state}; wall {wall:.1f} s, CPU {stats.cpu_s:.1f} s, max RSS "
              f"{stats.maxrss_mb:.0f} MB" + (f"; other processes used {other:.2f} cores "
                                              "meanwhile" if other is not None else "") +
              f"; log {log_path}", flush=True)
    return stats


def tail(path, n=15):
    try:
        with open(path, errors="replace") as fh:
            lines = fh.read().replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ----------------------------------------------------------------------------- data sets

def simulate(out_dir, n, box=64, apix=4.0, snr=0.05, classes=3, seed=0, reuse=True,
             commands=None, hinge=20.0):
    """Simulate a data set with ``cryoclass simulate``; returns the truth summary dict
    (oracle_accuracy, oracle_accuracy_25A, ...) plus ``dir`` and ``cmd``.

    With ``reuse`` an existing folder whose truth_summary.json has the same parameters is
    kept (the simulator is deterministic for a seed)."""
    summary_path = os.path.join(out_dir, "truth_summary.json")
    want = {"n": int(n), "box": int(box), "apix": float(apix), "classes": int(classes),
            "seed": int(seed), "snr": float(snr), "hinge_deg": float(hinge)}
    cmd = [CRYOCLASS, "simulate", out_dir, "--n", n, "--box", box, "--apix", apix,
           "--snr", snr, "--classes", classes, "--seed", seed]
    if float(hinge) != 20.0:                   # the simulator's default domain swing
        cmd += ["--hinge", hinge]
    cmd_text = shlex.join(str(c) for c in cmd)
    if reuse and os.path.exists(summary_path):
        with open(summary_path) as fh:
            have = json.load(fh)
        have.setdefault("hinge_deg", 20.0)
        same = all(float(have.get(k, "nan")) == float(v) for k, v in want.items())
        if same and os.path.exists(os.path.join(out_dir, "particles.mrcs")):
            have.update(dir=out_dir, cmd=cmd_text + "   # (reused)")
            if commands is not None:
                commands.append(have["cmd"])
            print(f"  reusing simulated set {out_dir}", flush=True)
            return have
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    stats = run_timed(cmd, cwd=REPO, log_path=os.path.join(out_dir, "simulate.log"))
    if stats.rc != 0:
        raise RuntimeError(f"cryoclass simulate failed (rc {stats.rc}):\n"
                           f"{tail(stats.log)}")
    with open(summary_path) as fh:
        summary = json.load(fh)
    summary.update(dir=out_dir, cmd=cmd_text)
    if commands is not None:
        commands.append(cmd_text)
    return summary


# ----------------------------------------------------------------------------- commands

def tutorial_flags(box, apix, K=4, tau2=4.0, iters=25, j=2):
    """The RELION tutorial's Class3D job (7.5 deg, offsets 5 / 1 px, T=4, ini_high 50),
    common to both programs.  The mask diameter is 0.8 of the box."""
    diameter = round(0.8 * box * apix)
    return ["--K", K, "--tau2_fudge", tau2, "--iter", iters, "--ini_high", 50,
            "--particle_diameter", diameter, "--zero_mask", "--flatten_solvent", "--ctf",
            "--sym", "C1", "--healpix_order", 2, "--oversampling", 1,
            "--offset_range", 5, "--offset_step", 2, "--pad", 2, "--skip_gridding",
            "--preread_images", "--norm", "--scale", "--j", j]


def cryoclass_refine_cmd(out_root, box, apix, K=4, tau2=4.0, iters=25, j=2, ranks=1,
                         extra=()):
    """``cryoclass refine`` on ``particles.star`` / ``ref.mrc`` in the simulation folder
    (the command runs there), with --firstiter_cc like RELION."""
    cmd = [CRYOCLASS, "refine", "--i", "particles.star", "--ref", "ref.mrc",
           "--o", out_root, "--firstiter_cc"] + tutorial_flags(box, apix, K, tau2, iters, j)
    cmd += list(extra)
    if ranks > 1:
        cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", ranks] + cmd
    return [str(c) for c in cmd]


def relion_refine_cmd(out_root, box, apix, K=4, tau2=4.0, iters=25, j=2, extra=()):
    """``relion_refine`` as the RELION 3.1 GUI's Class3D job writes it, with
    --firstiter_cc (without it RELION 3.1 collapses onto one orientation on our
    simulated sets).  RELION resolves image names from the working directory, so the
    command runs in the simulation folder."""
    cmd = [relion_refine_path() or "relion_refine", "--i", "particles.star", "--ref",
           "ref.mrc", "--o", out_root, "--firstiter_cc"]
    cmd += tutorial_flags(box, apix, K, tau2, iters, j)
    cmd += ["--dont_combine_weights_via_disc", "--pool", 3] + list(extra)
    return [str(c) for c in cmd]


def cmd_env_for(ranks):
    if ranks > 1:
        return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return None


# ----------------------------------------------------------------------------- outputs

def iterations_written(root):
    """Sorted iteration numbers with a ``<root>_itNNN_data.star``."""
    its = []
    for path in glob.glob(f"{root}_it[0-9][0-9][0-9]_data.star"):
        m = re.search(r"_it(\d{3})_data\.star$", path)
        if m:
            its.append(int(m.group(1)))
    return sorted(its)


LOG_RE = re.compile(r"^iter\s+(\d+)\s+([0-9.]+)\s+s\b(.*)$")
ESTEP_RE = re.compile(r"E-step res\s+([0-9.]+)\s*A")


def engine_log_iterations(log_path):
    """``{iteration: (seconds, E-step resolution A or None)}`` from the engine's
    ``<o>.log`` lines ``iter N  X s ...`` (the last run in the file wins)."""
    out = {}
    try:
        with open(log_path) as fh:
            for line in fh:
                m = LOG_RE.match(line.strip())
                if m:
                    res = ESTEP_RE.search(m.group(3))
                    out[int(m.group(1))] = (float(m.group(2)),
                                            float(res.group(1)) if res else None)
    except OSError:
        pass
    return out


def iteration_times(root):
    """``{iteration: seconds}``: the engine's log when there is one, else the gaps between
    the ``<root>_itNNN_data.star`` timestamps (iteration 0 is written before the first
    E-step, as in RELION)."""
    from_log = engine_log_iterations(f"{root}.log")
    if from_log:
        return {it: sec for it, (sec, _) in from_log.items()}
    its = iterations_written(root)
    stamps = {it: os.path.getmtime(f"{root}_it{it:03d}_data.star") for it in its}
    return {it: stamps[it] - stamps[it - 1] for it in its if it - 1 in stamps}


def mean_iteration_time(times, first=2):
    vals = [t for it, t in times.items() if it >= first]
    return sum(vals) / len(vals) if vals else float("nan")


def _particles_block(path):
    from cryoclass_plugin.engine.star_io import read_star
    import pandas as pd
    blocks = read_star(path)
    if isinstance(blocks.get("particles"), pd.DataFrame):
        return blocks["particles"]
    for block in blocks.values():
        if isinstance(block, pd.DataFrame) and "rlnImageName" in block.columns:
            return block
    raise RuntimeError(f"{path}: no particle table")


def evaluate_run(root, sim_dir, iteration=None):
    """Compare ``<root>_itNNN`` (default: the last iteration) with the simulation's truth.

    Returns a dict: iteration, n_matched, ari, best_match, median_ang_err_deg,
    median_offset_err_A, class_fractions, fsc_res_A (per true class: FSC-0.5 resolution
    of the class map matched to it by the best-match (Hungarian) assignment of particles
    against the true map), fsc_best_res_A (per true class: the best over all class maps),
    matched_class (per true class, 1-based)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from cryoclass_plugin.engine import metrics
    from cryoclass_plugin.engine.mrc_io import read_map

    its = [i for i in iterations_written(root) if i >= 1]
    if not its:
        raise RuntimeError(f"{root}: no iteration finished (no _itNNN_data.star with "
                           "NNN >= 1)")
    it = its[-1] if iteration is None else iteration
    data = _particles_block(f"{root}_it{it:03d}_data.star")
    truth = _particles_block(os.path.join(sim_dir, "truth.star"))
    truth = truth.assign(rlnImageName=metrics.image_keys(truth["rlnImageName"]))
    data = data.assign(rlnImageName=metrics.image_keys(data["rlnImageName"]))
    merged = truth.merge(data, on="rlnImageName", suffixes=("_true", ""))
    true_cls = merged["rlnClassNumber_true"].to_numpy(int)
    pred_cls = merged["rlnClassNumber"].to_numpy(int)
    out = {"iteration": it, "n_matched": int(len(merged)), "n_truth": int(len(truth))}
    out["ari"] = metrics.adjusted_rand_index(true_cls, pred_cls)
    out["best_match"] = metrics.best_match_accuracy(true_cls, pred_cls)
    ang = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if all(c in data.columns for c in ang):
        err = metrics.angular_errors_deg(merged[[c + "_true" for c in ang]].to_numpy(float),
                                         merged[ang].to_numpy(float), sym="C1")
        out["median_ang_err_deg"] = float(np.median(err))
    if "rlnOriginXAngst" in data.columns:
        d = (merged[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
             - merged[["rlnOriginXAngst_true", "rlnOriginYAngst_true"]].to_numpy(float))
        out["median_offset_err_A"] = float(np.median(np.linalg.norm(d, axis=1)))
    # Class maps against true maps.
    class_maps = sorted(glob.glob(f"{root}_it{it:03d}_class[0-9][0-9][0-9].mrc"))
    true_maps = sorted(glob.glob(os.path.join(sim_dir, "true_class[0-9][0-9][0-9].mrc")))
    K = len(class_maps)
    out["class_fractions"] = [float(np.mean(pred_cls == k + 1)) for k in range(K)]
    labels_t, labels_p = sorted(set(true_cls)), list(range(1, K + 1))
    table = np.zeros((len(labels_t), K))
    for i, t in enumerate(labels_t):
        for j, p in enumerate(labels_p):
            table[i, j] = np.sum((true_cls == t) & (pred_cls == p))
    rows, cols = linear_sum_assignment(-table)
    match = {labels_t[r]: labels_p[c] for r, c in zip(rows, cols)}
    maps = {}
    for k, path in enumerate(class_maps):
        maps[k + 1], apix = read_map(path)
    res, best, matched = [], [], []
    for t, path in enumerate(true_maps, start=1):
        vol, apix = read_map(path)
        box = vol.shape[0]
        per_class = {k: metrics.fsc_resolution(metrics.fsc(vol, m), box, apix)
                     for k, m in maps.items()}
        k = match.get(t)
        matched.append(k)
        res.append(per_class.get(k, float("nan")) if k else float("nan"))
        best.append(min(per_class.values()) if per_class else float("nan"))
    out["fsc_res_A"], out["fsc_best_res_A"], out["matched_class"] = res, best, matched
    return out


def oracle_reconstruction(sim_dir, box, apix, tau2=4.0, iters=25, j=2, extra=(),
                          folder="oracle_reconstruction"):
    """The class maps reconstructed from the TRUE poses and classes with the tutorial's
    flags (same T, iterations, masks, --norm/--scale) plus ``extra``
    (``cryoclass_plugin.oracle_reconstruction``): the reachable resolution, as the
    oracle accuracy is the reachable ARI.  Returns ``{"fsc_res_A": [per true class],
    "seconds"}``; reuses finished runs in ``sim_dir/folder``."""
    import time
    from cryoclass_plugin.oracle_reconstruction import oracle_resolutions

    t0 = time.time()
    flags = ["--firstiter_cc"] + tutorial_flags(box, apix, 1, tau2, iters, j) + list(extra)
    res = oracle_resolutions(sim_dir, flags, iters, os.path.join(sim_dir, folder))
    return {"fsc_res_A": res, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- RELION cache

# MRC header bytes that hold the labels (nlabl and ten 80-character labels): mrcfile
# writes a creation time there, so two simulations of the same set differ only in them.
MRC_LABELS = (220, 1024)


def file_digest(paths):
    """SHA-1 (16 hex digits) of the files' bytes; for MRC files without the header's
    labels (their creation time), so that re-simulated identical sets match."""
    h = hashlib.sha1()
    for p in paths:
        with open(p, "rb") as fh:
            if p.endswith((".mrc", ".mrcs")):
                h.update(fh.read(MRC_LABELS[0]))
                fh.seek(MRC_LABELS[1])
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def relion_cache_key(sim_dir, relion_cmd):
    """Key of a RELION result: the data set's bytes and RELION's flags (output path,
    executable path and thread count left out: threads change the time, not the answer)."""
    digest = file_digest([os.path.join(sim_dir, f) for f in
                          ("particles.star", "particles.mrcs", "ref.mrc")])
    flags = list(relion_cmd[1:])
    for flag in ("--o", "--j"):
        if flag in flags:
            i = flags.index(flag)
            del flags[i:i + 2]
    return digest + " " + " ".join(flags)


def relion_cache_get(key):
    try:
        with open(RELION_CACHE) as fh:
            return json.load(fh).get(key)
    except (OSError, ValueError):
        return None


def relion_cache_put(key, value):
    try:
        with open(RELION_CACHE) as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    cache[key] = value
    tmp = RELION_CACHE + f".tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(cache, fh, indent=1, sort_keys=True)
    os.replace(tmp, RELION_CACHE)


# ----------------------------------------------------------------------------- printing

def fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    try:
        if v != v:  # nan
            return "nan"
    except TypeError:
        return str(v)
    return format(v, spec)


def format_table(headers, rows):
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def benchmark_command():
    """This benchmark's own command line, relative to the repository root."""
    return shlex.join([".venv/bin/python", os.path.relpath(os.path.abspath(sys.argv[0]),
                                                         REPO)] + sys.argv[1:])


def markdown_table(headers, rows):
    """A GitHub-flavoured Markdown table ('|' in cells escaped)."""
    def cell(c):
        return str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_block(headers, rows, info=None, notes=()):
    """One table of docs/benchmarks.md: the command that produced it, the machine by its
    properties, notes (settings), and the table."""
    parts = ["```", benchmark_command(), "```", "",
             f"Machine: {machine_properties(info)}."]
    parts += [f"{n}" for n in notes]
    parts += ["", markdown_table(headers, rows)]
    return "\n".join(parts)


def print_markdown(headers, rows, info=None, notes=(), after=""):
    """Print the docs/benchmarks.md block (and ``after``, e.g. a second table) between
    marker lines."""
    print("\n--- markdown (docs/benchmarks.md) ---\n")
    print(markdown_block(headers, rows, info, notes))
    if after:
        print("\n" + after)
    print("\n--- end markdown ---")


def append_results(title, commands, body, info=None, notes=()):
    """Append a section to the raw run log (``scratch/benchmark_runs.md``, ignored by
    git): title, date + machine, the benchmark's own command line, the exact commands it
    ran, the results (plain text) and notes."""
    info = info or machine_info()
    argv = benchmark_command()
    parts = [f"\n## {title} -- {info['date']}\n",
             f"- machine: {machine_line(info)}",
             f"- benchmark: `{argv}`"]
    parts += [f"- note: {n}" for n in notes]
    parts.append("\nResults:\n\n```\n" + body.rstrip() + "\n```\n")
    if commands:
        parts.append("Commands run:\n\n```\n" + "\n".join(commands) + "\n```\n")
    os.makedirs(os.path.dirname(RUN_LOG), exist_ok=True)
    new = not os.path.exists(RUN_LOG)
    with open(RUN_LOG, "a") as fh:
        if new:
            fh.write("# cryoclass benchmark runs (raw log, not tracked by git)\n\nAppended "
                     "by the scripts in benchmarks/; newest last.  Curated tables: "
                     "docs/benchmarks.md.\n")
        fh.write("\n".join(parts))
    print(f"\nappended to {os.path.relpath(RUN_LOG, os.getcwd())}")
