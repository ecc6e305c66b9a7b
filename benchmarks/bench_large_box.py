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

``--full-run`` also runs ``cryoclass refine`` on the set with the tutorial's Class3D flags
(``_common.tutorial_flags``: 7.5 deg, offsets 5 / 2 px, T given by ``--tau2_fudge``) plus
``--ini_high 60 --pad 2 --skip_gridding``, and prints per-iteration time and peak RSS:
the grids are cropped there only where the engine passes its current shell to
``Projector`` / ``Accumulators`` (``current_grid_shell``).
"""
import argparse
import os
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
    p.add_argument("--shells", type=int, nargs="+", default=[8, 24, 48],
                   help="E-step radii (shells) to measure (8 24 48)")
    p.add_argument("--pad", type=int, default=2, help="padding factor (2)")
    p.add_argument("--rows", type=int, default=2000,
                   help="rotations projected and inserted per measurement (2000)")
    p.add_argument("--block_size", type=int, default=256, help="for the memory formula")
    p.add_argument("--j", type=int, default=1, help="FFT threads (1)")
    p.add_argument("--tau2_fudge", type=float, default=4.0, help="T (4)")
    p.add_argument("--workdir", default=None, help="folder for the set (kept, reused)")
    p.add_argument("--full-run", action="store_true", help="also run cryoclass refine")
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
    sim_dir = os.path.join(workdir, f"sim_box{args.box}_n{args.n}_K{args.K}")
    if not os.path.exists(os.path.join(sim_dir, "truth_summary.json")):
        print(f"simulating {args.n} particles, box {args.box}, {args.apix} A/px, K={args.K} "
              f"into {sim_dir}", flush=True)
        t0 = time.perf_counter()
        simulate_dataset(sim_dir, n=args.n, box=args.box, apix=args.apix, snr=args.snr,
                         n_classes=args.K, seed=0)
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


def full_run(sim_dir, args):
    out = os.path.join(sim_dir, "run_full")
    os.makedirs(out, exist_ok=True)
    cmd = C.cryoclass_refine_cmd("run_full/run", args.box, args.apix, args.K, args.tau2_fudge,
                                 args.iter, args.j,
                                 extra=["--ini_high", 60, "--pad", args.pad, "--skip_gridding"])
    stats = C.run_timed(cmd, cwd=sim_dir, log_path=os.path.join(out, "stdout.txt"),
                        timeout=args.timeout)
    times = C.iteration_times(os.path.join(sim_dir, "run_full", "run"))
    print(f"cryoclass refine: rc {stats.rc}{' (timed out)' if stats.timed_out else ''}, "
          f"wall {stats.wall_s:.0f} s, peak RSS {C.fmt(stats.maxrss_mb, '.0f')} MB")
    for it, t in sorted(times.items()):
        print(f"  iteration {it}: {t:.1f} s")
    if stats.rc != 0:
        print(C.tail(stats.log))


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
    vol, _ = read_map(os.path.join(sim_dir, "true_class001.mrc"))
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    free = memory.available_memory_bytes()
    print(f"box {args.box}, {args.apix} A/px, pad {args.pad}, K={args.K}, --j {args.j}; "
          f"free memory {C.fmt(None if free is None else free / 2 ** 30, '.1f')} GiB")
    rng = np.random.default_rng(0)
    rows = []
    for shell in args.shells:
        rows.append(measure_shell(vol, shell, args, rng))
        r = rows[-1]
        print(f"  shell {shell}: build {r['t_build']:.2f} s, reconstruct {r['t_rec']:.2f} s",
              flush=True)
    print_components(rows, args)
    if args.full_run:
        full_run(sim_dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
