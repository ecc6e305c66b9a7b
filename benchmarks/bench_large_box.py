"""Real-size particles: memory and time of the Fourier volumes at box 360 (EMPIAR-10028's
shape), component by component, on the cropped half grids.

    .venv/bin/python benchmarks/bench_large_box.py                    # box 360, shells 8/24/48
    .venv/bin/python benchmarks/bench_large_box.py --box 256 --K 8
    .venv/bin/python benchmarks/bench_large_box.py --full-run --n 1000 --iter 3

The set is simulated once (``simulate_dataset``; default 1000 particles of 360 px at
1.34 A/px, six classes; reused from ``--workdir``).  For each E-step radius (``--shells``:
8 = ``--ini_high 60`` at this box, 24 and 48 = 20 A and 10 A) the script measures, for one
class map, with ``--j`` FFT threads:

- projector build (``Projector(map, pad, gridding=False, max_shell)``: the cropped
  transform), its time and its peak of traced allocations (tracemalloc: numpy's arrays);
- projection of ``--rows`` rotations (one block's fine-pass slices) at the shell's pixels;
- insertion of those rows (``BackProjector.insert``);
- reconstruction (``BackProjector.reconstruct`` with a tau2 prior, back to the full box);

against the memory formula (engine/memory.py: ``estimate_memory``; the projector's and
back-projector's grids for K classes) and the same items on full padded grids
(``full_grid_bytes``: what the full-grid code allocated whatever the shell).  Per
iteration the grid work is K builds, K + 1 reconstructions and the insertions of all
particles' rows.

Measured (this 2-core machine, shared; ``--n 60 --rows 1000 --j 1``, box 360, pad 2, one
class map; "formula" = the K=6 projector + back-projector + transient items):

=====  =====  ===========  =======  ===========  ==========  ============  =============
shell  res A  grid         build s  build MB     insert s    reconstruct   K=6 grids MB
                                    (traced)     1000 rows   s / MB        (full grids)
=====  =====  ===========  =======  ===========  ==========  ============  =============
8      60.3   39x39x20     1.3      220          0.04        1.3 / 358     382 (93 973)
24     20.1   103x103x52   1.3      217          0.28        2.3 / 378     532 (93 973)
48     10.1   199x199x100  2.4      294          2.5         3.5 / 523     1431 (93 973)
=====  =====  ===========  =======  ===========  ==========  ============  =============

The build and the reconstruction are dominated by the length-720 transforms of the
360^2 rows of the x axis (O(N^2 P log P), whatever the shell); the full padded grids
they replace take 3 GB (projector) and 9 GB (sums) per class at this box.

A whole ``cryoclass refine`` at this box (60 particles, K=6, the flags below, ``--iter 2
--j 1``), with the engine's ``Projector`` / ``Accumulators`` given
``max_shell = current_grid_shell(current_shell, box)`` as in
tests/test_halfgrid.py's engine test (grid shell 19): 31-33 s per iteration (setup
15 s, M-step 14-16 s, output 6 s), peak RSS 4.7 GB; the full-grid engine's grids alone
would take 92 GiB (``full_grid_bytes``).

``--full-run`` runs the issue's job instead: ``cryoclass refine`` on the set with the
tutorial's Class3D flags (``_common.tutorial_flags``: 7.5 deg, offsets 5 / 2 px, T given
by ``--tau2_fudge``, mask 0.8 x box x pixel size) with ``--ini_high 60 --pad 2
--skip_gridding --firstiter_cc --init_classes relion``, and with ``--relion PATH`` the same
job by ``relion_refine`` (``--relion-iter`` iterations).  Per program and iteration it
prints the time, the E-step size (``rlnCurrentImageSize`` of the previous iteration's
model.star) and resolution, the peak RSS (GNU time's %M), the engine's stage seconds
and the extrapolation to 105,247 particles x 25 iterations at that iteration's costs
(``extrapolate``).  Figures: docs/benchmarks.md, "Large box".
"""
import argparse
import json
import os
import re
import shlex
import sys
import time
import tracemalloc

import numpy as np

import _common as C

from cryoclass_plugin.engine import memory
from cryoclass_plugin.engine.fourier import half_plane_pixels, set_fft_workers
from cryoclass_plugin.engine.geometry import euler_to_matrix
from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.projector import BackProjector, Projector, current_grid_shell
from cryoclass_plugin.engine.simulate import simulate_dataset

MB = 2.0 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=360, help="box (px) (360)")
    p.add_argument("--apix", type=float, default=1.34, help="pixel size (1.34 A)")
    p.add_argument("--K", type=int, default=6, help="classes (6)")
    p.add_argument("--n", type=int, default=1000, help="simulated particles (1000)")
    p.add_argument("--snr", type=float, default=0.05, help="SNR of the simulated set")
    p.add_argument("--sim-oversampling", type=int, default=1,
                   help="simulator's splatting grid, times finer than the pixels (1: about "
                        "8x faster than the simulator's default 2 at box 360)")
    p.add_argument("--shells", type=int, nargs="+", default=[8, 24, 48],
                   help="E-step radii (shells) to measure (8 24 48)")
    p.add_argument("--pad", type=int, default=2, help="padding factor (2)")
    p.add_argument("--rows", type=int, default=2000,
                   help="rotations projected and inserted per measurement (2000)")
    p.add_argument("--block_size", type=int, default=256, help="for the memory formula")
    p.add_argument("--j", type=int, default=1, help="FFT threads (1)")
    p.add_argument("--tau2_fudge", type=float, default=4.0, help="T (4)")
    p.add_argument("--workdir", default=None, help="folder for the set (kept, reused)")
    p.add_argument("--full-run", action="store_true",
                   help="run cryoclass refine on the set (the issue's job) instead of "
                        "measuring the grid components")
    p.add_argument("--components", action="store_true",
                   help="with --full-run: also measure the grid components first")
    p.add_argument("--ini_high", type=float, default=60.0, help="--ini_high of the job (60)")
    p.add_argument("--init_classes", default="relion",
                   help="cryoclass's --init_classes in the full run (relion: as RELION)")
    p.add_argument("--relion", metavar="PATH", default=None,
                   help="with --full-run: also run this relion_refine on the same job")
    p.add_argument("--relion-iter", type=int, default=2,
                   help="iterations of the relion_refine run (2)")
    p.add_argument("--relion-timeout", type=float, default=None,
                   help="kill relion_refine after S s (the iterations it finished count)")
    p.add_argument("--relion-only", action="store_true",
                   help="with --full-run --relion: run only relion_refine")
    p.add_argument("--reuse", action="store_true",
                   help="report a finished run of the same command (its stats.json) "
                        "instead of running it again")
    p.add_argument("--markdown", action="store_true",
                   help="also print the full run's table in docs/benchmarks.md's format")
    p.add_argument("--no-record", action="store_true",
                   help="do not append to scratch/benchmark_runs.md")
    p.add_argument("--iter", type=int, default=3, help="--iter of the full run (3)")
    p.add_argument("--timeout", type=float, default=None, help="kill the full run after S s")
    return p.parse_args(argv)


def measured(fn):
    """``(result, seconds, peak traced MB)`` of ``fn()``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    return out, dt, peak


def simulated_set(args):
    workdir = os.path.abspath(args.workdir or os.path.join(C.REPO, "scratch", "large_box"))
    sim_dir = os.path.join(workdir, f"sim_box{args.box}_n{args.n}_K{args.K}"
                                    f"_os{args.sim_oversampling}")
    if not os.path.exists(os.path.join(sim_dir, "truth_summary.json")):
        print(f"simulating {args.n} particles, box {args.box}, {args.apix} A/px, K={args.K} "
              f"into {sim_dir}", flush=True)
        t0 = time.perf_counter()
        simulate_dataset(sim_dir, n=args.n, box=args.box, apix=args.apix, snr=args.snr,
                         n_classes=args.K, seed=0, oversampling=args.sim_oversampling,
                         log=lambda msg: print("  " + msg, flush=True))
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return sim_dir


def measure_shell(vol, shell, args, rng):
    """One row: the components at E-step radius ``shell``."""
    box, pad = vol.shape[0], args.pad
    grid_shell = current_grid_shell(shell, box)
    ky, kx = half_plane_pixels(box, shell)
    mats = euler_to_matrix(rng.uniform(0, 360, args.rows),
                           np.rad2deg(np.arccos(rng.uniform(-1, 1, args.rows))),
                           rng.uniform(0, 360, args.rows))
    proj, t_build, m_build = measured(lambda: Projector(vol, pad, False, grid_shell))
    slices, t_proj, m_proj = measured(lambda: proj.project(mats, ky, kx))
    bp = BackProjector(box, pad, np, max_shell=grid_shell)
    weights = np.ones(slices.shape, np.float32)
    _, t_ins, m_ins = measured(lambda: bp.insert(mats, ky, kx, slices, weights))
    tau2 = np.full(box // 2 + 1, 1e3)
    _, t_rec, m_rec = measured(lambda: bp.reconstruct(tau2, args.tau2_fudge, gridding=False))
    est = memory.estimate_memory(box, shell, pad, args.K, args.block_size, ky.size, args.j)
    full = memory.full_grid_bytes(box, pad, args.K)
    grid_items = ("projectors", "back-projectors", "grid transients")
    return {
        "shell": shell, "res": box * args.apix / shell, "grid": proj.transform.shape,
        "pixels": ky.size, "t_build": t_build, "m_build": m_build, "t_proj": t_proj,
        "m_proj": m_proj, "t_ins": t_ins, "m_ins": m_ins, "t_rec": t_rec, "m_rec": m_rec,
        "proj_MB": proj.transform.nbytes / MB,
        "bp_MB": (bp.data.nbytes + bp.weight.nbytes) / MB,
        "est_grids_MB": sum(est.items[k] for k in grid_items) / MB,
        "est_total_MB": est.total / MB,
        "full_grids_MB": sum(full.values()) / MB,
        "iteration_grid_s": args.K * t_build + (args.K + 1) * t_rec,
    }


def print_components(rows, args):
    headers = ["shell", "res A", "grid (z,y,x)", "pixels", "build s", "build MB",
               f"project {args.rows} s", f"insert {args.rows} s", "insert MB",
               "reconstruct s", "reconstruct MB", "proj grid MB", "bp grid MB",
               f"K={args.K} grids formula MB", f"full-grid formula MB",
               "grid s / iteration"]
    table = [[r["shell"], f"{r['res']:.1f}", "x".join(map(str, r["grid"])), r["pixels"],
              f"{r['t_build']:.2f}", f"{r['m_build']:.0f}", f"{r['t_proj']:.2f}",
              f"{r['t_ins']:.2f}", f"{r['m_ins']:.0f}", f"{r['t_rec']:.2f}",
              f"{r['m_rec']:.0f}", f"{r['proj_MB']:.1f}", f"{r['bp_MB']:.1f}",
              f"{r['est_grids_MB']:.0f}", f"{r['full_grids_MB']:.0f}",
              f"{r['iteration_grid_s']:.1f}"] for r in rows]
    print(C.format_table(headers, table))


def job_flags(args):
    """The issue's EMPIAR-10028-shaped job: the tutorial's Class3D flags
    (``_common.tutorial_flags``: 7.5 deg, offsets 5 / 2 px, mask 0.8 x box x pixel size,
    ``--ctf --zero_mask --flatten_solvent --norm --scale --pad 2 --skip_gridding``) with
    ``--ini_high 60`` (replacing the tutorial's 50, not appended: RELION reads an option's
    first occurrence, cryoclass its last)."""
    flags = C.tutorial_flags(args.box, args.apix, args.K, args.tau2_fudge, args.iter, args.j)
    flags[flags.index("--ini_high") + 1] = args.ini_high
    flags[flags.index("--pad") + 1] = args.pad
    return [str(f) for f in flags]


def model_star_sizes(root):
    """``{iteration: (rlnCurrentImageSize px, rlnCurrentResolution A)}`` from the
    ``<root>_itNNN_model.star`` files (both programs write them; the size is the
    E-step's image diameter in pixels, RELION's current size)."""
    out = {}
    for it in C.iterations_written(root):
        try:
            with open(f"{root}_it{it:03d}_model.star") as fh:
                text = fh.read(20000)
        except OSError:
            continue
        size = re.search(r"_rlnCurrentImageSize\s+(\S+)", text)
        res = re.search(r"_rlnCurrentResolution\s+(\S+)", text)
        if size:
            out[it] = (int(float(size.group(1))), float(res.group(1)) if res else None)
    return out


def engine_log_details(log_path):
    """The engine's ``<o>.log``: the memory line and, per iteration, seconds, E-step
    resolution and the stage seconds printed after the iteration line."""
    memory_line, iters, last = None, {}, None
    try:
        with open(log_path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        text = line.strip()
        if "memory per rank" in text and memory_line is None:
            memory_line = text[text.index("memory per rank"):]
        m = C.LOG_RE.match(text)
        if m:
            res = C.ESTEP_RE.search(m.group(3))
            last = int(m.group(1))
            iters[last] = {"s": float(m.group(2)),
                           "res": float(res.group(1)) if res else None, "stages": {}}
        elif text.startswith("stage seconds:") and last is not None:
            parts = text[len("stage seconds:"):].split()
            iters[last]["stages"] = {parts[i]: float(parts[i + 1])
                                     for i in range(0, len(parts) - 1, 2)}
    return memory_line, iters


# Stages whose time grows with the number of particles (the E-step's blocks and the
# insertion of their slices); the rest (setup: projectors; M-step: reconstructions,
# solvent flattening; output) is per iteration whatever the particle count.  The fine
# tables (projections of the significant rotations) are counted per particle, an upper
# bound: their rotations saturate as particles are added.
PER_PARTICLE_STAGES = ("prepare", "fixed-pose", "coarse", "fine-tables", "fine", "insert")


def extrapolate(stages, n_measured, n_target=105247, n_iter=25):
    """Hours for ``n_target`` particles x ``n_iter`` iterations at one iteration's
    costs: (per-particle seconds x n_target + fixed seconds) x n_iter, and the two
    parts (per-particle s, fixed s)."""
    per = sum(v for k, v in stages.items() if k in PER_PARTICLE_STAGES) / n_measured
    fixed = sum(v for k, v in stages.items() if k not in PER_PARTICLE_STAGES)
    return (per * n_target + fixed) * n_iter / 3600.0, per, fixed


def data_star_gaps(root):
    """``{iteration: seconds}`` between consecutive ``<root>_itNNN_data.star`` writes: one
    whole cycle (E-step, M-step, output), measured the same way for both programs."""
    its = C.iterations_written(root)
    stamps = {it: os.path.getmtime(f"{root}_it{it:03d}_data.star") for it in its}
    return {it: stamps[it] - stamps[it - 1] for it in its if it - 1 in stamps}


def run_program(name, cmd, sim_dir, out_dir, root, timeout, reuse=False):
    """Run ``cmd`` in ``sim_dir`` (under /usr/bin/time, see ``_common.run_timed``); its
    figures are kept in ``<out_dir>/stats.json`` and, with ``reuse``, a run of the same
    command found there is reported instead of run again.  Returns ``(stats, {iteration: seconds}, {iteration: (size, res)})``."""
    os.makedirs(os.path.join(sim_dir, out_dir), exist_ok=True)
    saved = os.path.join(sim_dir, out_dir, "stats.json")
    stats = None
    if reuse and os.path.exists(saved):
        with open(saved) as fh:
            stats = C.RunStats(json.load(fh))
        if stats.cmd != shlex.join(cmd):
            stats = None
        else:
            print(f"  reusing {name}'s finished run in {os.path.dirname(saved)}")
    if stats is None:
        stats = C.run_timed(cmd, cwd=sim_dir, timeout=timeout,
                            log_path=os.path.join(sim_dir, out_dir, "stdout.txt"))
        with open(saved, "w") as fh:
            json.dump(dict(stats), fh)
    if stats.rc != 0 and not stats.timed_out:
        print(f"{name} failed (rc {stats.rc}):\n{C.tail(stats.log)}")
    full_root = os.path.join(sim_dir, root)
    return stats, data_star_gaps(full_root), model_star_sizes(full_root)


def full_run(sim_dir, args):
    """``cryoclass refine`` (unless ``--relion-only``) and, with ``--relion``,
    ``relion_refine`` on the set; returns the runs (program, stats, times, sizes, engine
    log details), the engine's memory line and the commands run."""
    flags = job_flags(args)
    runs, memory_line, commands = [], None, []
    if not args.relion_only:
        cmd = ([C.CRYOCLASS, "refine", "--i", "particles.star", "--ref", "ref.mrc", "--o",
                "run_full/run", "--firstiter_cc", "--init_classes", args.init_classes]
               + flags)
        stats, times, sizes = run_program("cryoclass refine", cmd, sim_dir, "run_full",
                                          "run_full/run", args.timeout, args.reuse)
        memory_line, details = engine_log_details(os.path.join(sim_dir, "run_full",
                                                               "run.log"))
        runs.append(("cryoclass", stats, times, sizes, details))
        commands.append(f"(cd {sim_dir} && {shlex.join(cmd)})")
    if args.relion:
        rflags = list(flags)
        rflags[rflags.index("--iter") + 1] = str(args.relion_iter)
        rcmd = ([args.relion, "--i", "particles.star", "--ref", "ref.mrc", "--o",
                 "relion_full/run", "--firstiter_cc"] + rflags
                + ["--dont_combine_weights_via_disc", "--pool", "3"])
        rstats, rtimes, rsizes = run_program("relion_refine", rcmd, sim_dir, "relion_full",
                                             "relion_full/run", args.relion_timeout,
                                             args.reuse)
        runs.append(("relion_refine", rstats, rtimes, rsizes, {}))
        commands.append(f"(cd {sim_dir} && {shlex.join(rcmd)})")
    return runs, memory_line, commands


def result_rows(runs, args):
    """One row per program and iteration: s/iteration, current size and resolution,
    peak RSS, stage seconds and the extrapolation (cryoclass)."""
    rows = []
    for name, stats, times, sizes, details in runs:
        status = "timed out" if stats.timed_out else f"rc {stats.rc}"
        for it in sorted(set(times) | set(details)):
            d = details.get(it, {})
            # model.star of iteration i holds the size the next E-step uses
            # (RELION writes 0 in iteration 0's: its first size follows from --ini_high)
            size = sizes.get(it - 1, (None, None))[0] or None
            res = args.box * args.apix / (size / 2) if size else None
            hours = per = fixed = None
            if d.get("stages"):
                hours, per, fixed = extrapolate(d["stages"], args.n)
            stages = " ".join(f"{k} {v:.1f}" for k, v in d.get("stages", {}).items())
            rows.append([name, it, C.fmt(times.get(it), ".0f"), C.fmt(d.get("s"), ".0f"),
                         C.fmt(size, "d"),
                         C.fmt(res, ".1f"), C.fmt(stats.maxrss_mb / 1024, ".2f"),
                         status, stages or "-", C.fmt(per, ".3f"), C.fmt(fixed, ".0f"),
                         C.fmt(hours, ".0f")])
        if not times:
            rows.append([name, "-", "-", "-", "-", "-", C.fmt(stats.maxrss_mb / 1024, ".2f"),
                         f"{status}, wall {stats.wall_s:.0f} s (no iteration finished)",
                         "-", "-", "-", "-"])
    return rows


RESULT_HEADERS = ["program", "iter", "s / iter (data.star gaps)",
                  "s / iter (engine log, without output)", "E-step size px", "E-step res A",
                  "peak RSS GiB", "status", "stage s", "s / particle", "fixed s / iter",
                  "h for 105,247 x 25 it"]


def report_full_run(runs, memory_line, commands, sim_dir, args):
    rows = result_rows(runs, args)
    print(f"\nbox {args.box}, {args.apix} A/px, {args.n} particles, K={args.K}, "
          f"--j {args.j}; {memory_line or 'no memory line in the log'}")
    print(C.format_table(RESULT_HEADERS, rows))
    notes = [f"Set: `simulate_dataset` ({args.n} particles, box {args.box}, {args.apix} A/px, "
             f"{args.K} classes, SNR {args.snr}, splatting oversampling "
             f"{args.sim_oversampling}); both programs with `--firstiter_cc`, cryoclass with "
             f"`--init_classes {args.init_classes}`.", "", "Commands:", "", "```"]
    notes += [c.replace(C.REPO + os.sep, "") for c in commands] + ["```", "",
              f"cryoclass's estimate: `{memory_line}`."]
    C.append_results(f"bench_large_box --full-run box {args.box} K={args.K}", commands,
                     C.format_table(RESULT_HEADERS, rows)) if not args.no_record else None
    if args.markdown:
        C.print_markdown(RESULT_HEADERS, rows, notes=notes)


def main(argv=None):
    args = parse_args(argv)
    set_fft_workers(args.j)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.j)
    except ImportError:
        pass
    print(f"machine: {C.machine_line()}")
    sim_dir = simulated_set(args)
    free = memory.available_memory_bytes()
    print(f"box {args.box}, {args.apix} A/px, pad {args.pad}, K={args.K}, --j {args.j}; "
          f"free memory {C.fmt(None if free is None else free / 2 ** 30, '.1f')} GiB")
    if args.full_run:
        if args.components:
            measure_components(sim_dir, args)
        report_full_run(*full_run(sim_dir, args), sim_dir, args)
        return 0
    measure_components(sim_dir, args)
    return 0


def measure_components(sim_dir, args):
    vol, _ = read_map(os.path.join(sim_dir, "true_class001.mrc"))
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for shell in args.shells:
        rows.append(measure_shell(vol, shell, args, rng))
        r = rows[-1]
        print(f"  shell {shell}: build {r['t_build']:.2f} s, reconstruct {r['t_rec']:.2f} s",
              flush=True)
    print_components(rows, args)


if __name__ == "__main__":
    sys.exit(main())
