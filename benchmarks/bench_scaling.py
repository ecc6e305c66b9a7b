"""How cryoclass refine's time per iteration grows with particles, classes, box and ranks.

    .venv/bin/python benchmarks/bench_scaling.py            # 1k/4k/16k ptcl, K 2/4/8, box 64/128, 1/2 ranks
    .venv/bin/python benchmarks/bench_scaling.py --quick    # small grid (minutes)

One factor at a time around a base case (default: 1000 particles, K=4, box 64, 1 rank;
--quick: 300 particles, K=2, box 48, 1 rank), each a short run (--iter, default 3) of
``cryoclass refine`` with the RELION tutorial's Class3D flags (``_common.tutorial_flags``:
7.5 deg, offsets 5 / 1 px, --ini_high 50, --firstiter_cc, ...) on a simulated
three-class set (SNR 0.05, 4 A/px at every box, so the particle spans 0.65 of the box:
at 128 px it is twice as large in A, and every resolution shell holds 4x the pixels).
MPI runs use ``.venv/bin/mpirun --allow-run-as-root --oversubscribe -np R`` with
``--j nproc/R`` threads per rank (so 1 x 2 threads against 2 x 1 on a 2-core machine).

Time per iteration is read from the engine's ``<o>.log`` lines ``iter N  X s ...``
(file timestamps if there is no log); the table reports the mean over iterations >= 2
(iteration 1 scores by cross-correlation and is not typical; ``--from-iter M`` for later
ones), the E-step resolution of
those iterations (iteration time depends on it), and for each factor the time ratio
against its smallest value with the exponent ``log(time ratio) / log(factor ratio)``
(1 = linear in particles and classes; for the box, 2 = proportional to the pixels of a 2D
image).  ``--markdown`` also prints the tables in the format of docs/benchmarks.md; the raw
output goes to the run log (``scratch/benchmark_runs.md``; ``--no-record`` skips it).
"""
import argparse
import math
import os
import shlex
import shutil
import sys
import tempfile

import _common as C

FULL = {"base": dict(n=1000, K=4, box=64, ranks=1),
        "n": [1000, 4000, 16000], "K": [2, 4, 8], "box": [64, 128], "ranks": [1, 2]}
QUICK = {"base": dict(n=300, K=2, box=48, ranks=1),
         "n": [300, 600, 1200], "K": [2, 4], "box": [48, 64], "ranks": [1, 2]}
FACTOR_NAMES = {"n": "particles", "K": "classes", "box": "box (px)", "ranks": "MPI ranks"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid")
    p.add_argument("--n", type=int, nargs="+", help="particle counts")
    p.add_argument("--K", type=int, nargs="+", help="class counts")
    p.add_argument("--box", type=int, nargs="+", help="box sizes (px)")
    p.add_argument("--ranks", type=int, nargs="+", help="MPI rank counts")
    p.add_argument("--base", nargs=4, type=int, metavar=("N", "K", "BOX", "RANKS"),
                   help="the base case the factors vary around")
    p.add_argument("--only", nargs="+", choices=list(FACTOR_NAMES),
                   help="vary only these factors")
    p.add_argument("--iter", type=int, default=3, help="iterations per run (3; >= 2)")
    p.add_argument("--from-iter", type=int, default=2, metavar="M",
                   help="average the time per iteration over iterations >= M (2); with "
                        "--cryoclass-args '--strict_highres_exp R' and enough --iter, M "
                        "can be an iteration by which every box has reached R, so that "
                        "boxes compare at the same E-step resolution")
    p.add_argument("--apix", type=float, default=4.0, help="pixel size (4.0)")
    p.add_argument("--same-particle", action="store_true",
                   help="scale the pixel size with the box (apix x base box / box), so "
                        "that every box holds the same particle and, with "
                        "--strict_highres_exp, the same E-step size in pixels")
    p.add_argument("--snr", type=float, default=0.05, help="SNR of the simulated sets")
    p.add_argument("--threads", type=int, default=None,
                   help="--j per rank (default: nproc / ranks, at least 1)")
    p.add_argument("--cryoclass-args", default="", help="extra flags for cryoclass refine")
    p.add_argument("--timeout", type=float, default=None, help="kill a run after this many s")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each run wait up to S seconds for other processes to leave "
                        "the CPUs (< 0.5 cores busy)")
    p.add_argument("--workdir", default=None,
                   help="folder for data sets and outputs (kept, sets reused)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--no-record", action="store_true",
                   help="do not append to the run log (scratch/benchmark_runs.md)")
    p.add_argument("--markdown", action="store_true",
                   help="also print the tables in the format of docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.iter < 2:
        p.error("--iter must be >= 2 (iteration 1 is not typical)")
    grid = QUICK if args.quick else FULL
    args.grid = {
        "base": dict(zip(["n", "K", "box", "ranks"], args.base)) if args.base
        else dict(grid["base"]),
        "n": args.n or grid["n"], "K": args.K or grid["K"], "box": args.box or grid["box"],
        "ranks": args.ranks or grid["ranks"]}
    return args


def cases(grid, only=None):
    """Distinct (n, K, box, ranks) runs: the base plus one factor varied at a time."""
    out = []
    base = grid["base"]
    for factor in FACTOR_NAMES:
        if only and factor not in only:
            continue
        for v in grid[factor]:
            c = dict(base, **{factor: v})
            key = (c["n"], c["K"], c["box"], c["ranks"])
            if key not in out:
                out.append(key)
    if not out:
        out.append((base["n"], base["K"], base["box"], base["ranks"]))
    return out


def _print_markdown(results, rrows, args, info):
    """The two tables of docs/benchmarks.md: runs, then time ratios per factor."""
    base = args.grid["base"]
    headers = ["particles", "K", "box", "ranks x threads", "s / iteration",
               "E-step resolution (A)", "peak RSS (MB)"]
    rows = [[n, K, box, f"{ranks} x {r['j']}", C.fmt(r["t_iter"], ".1f"),
             C.fmt(r["estep_res"], ".1f"),
             C.fmt(r["rss"], ".0f") + ("" if ranks == 1 else
                                       f" (largest rank; all {C.fmt(r['tree_rss'], '.0f')})")
             + ("" if r["ok"] else " FAILED")]
            for (n, K, box, ranks), r in results.items()]
    notes = [f"Settings: {args.iter} iterations per run, mean over iterations >= "
             f"{args.from_iter}; base {base['n']} particles, K={base['K']}, box {base['box']}, "
             f"{base['ranks']} rank; {args.apix:g} A/px"
             + (f" at box {base['box']}, scaled with the box (the same particle)"
                if args.same_particle else "")
             + f", SNR {args.snr:g}; RELION's start, "
             "the tutorial's flags with --firstiter_cc"
             + (f"; cryoclass flags: `{args.cryoclass_args}`" if args.cryoclass_args else "")
             + "."]
    ratios = C.markdown_table(["factor", "change", "time x", "exponent (ideal)"],
                              [[r[0], r[1], r[3], f"{r[4]} ({r[5].split(' ')[0]})"]
                               for r in rrows]) if rrows else ""
    C.print_markdown(headers, rows, info, notes, after=ratios)


def main(argv=None):
    args = parse_args(argv)
    info = C.machine_info()
    nproc = info["nproc"] or 1
    print(f"machine: {C.machine_line(info)}")
    tmp = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_scaling_"))
    os.makedirs(workdir, exist_ok=True)
    print(f"work folder: {workdir}")
    runs = cases(args.grid, args.only)
    print(f"{len(runs)} runs of {args.iter} iterations: " +
          ", ".join(f"n={n} K={k} box={b} ranks={r}" for n, k, b, r in runs), flush=True)
    commands, results = [], {}
    try:
        for n, K, box, ranks in runs:
            print(f"\n=== n={n} K={K} box={box} ranks={ranks}", flush=True)
            base_box = args.grid["base"]["box"]
            apix = (args.apix * base_box / box) if args.same_particle else args.apix
            sim = C.simulate(os.path.join(workdir, f"sim_n{n}_box{box}"), n, box, apix,
                             args.snr, 3, 0, commands=commands)
            j = args.threads or max(1, nproc // ranks)
            root = f"run_n{n}_K{K}_box{box}_r{ranks}/run"
            out_dir = os.path.join(sim["dir"], os.path.dirname(root))
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)
            os.makedirs(out_dir)
            cmd = C.cryoclass_refine_cmd(root, box, apix, K, 4.0, args.iter, j, ranks,
                                         extra=shlex.split(args.cryoclass_args))
            if args.wait_idle:
                C.wait_for_idle(args.wait_idle)
            stats = C.run_timed(cmd, cwd=sim["dir"], env=C.cmd_env_for(ranks),
                                log_path=os.path.join(out_dir, "stdout.txt"),
                                timeout=args.timeout)
            commands.append(f"(cd {sim['dir']} && {stats.cmd})")
            full_root = os.path.join(sim["dir"], root)
            log_its = C.engine_log_iterations(full_root + ".log")
            times = C.iteration_times(full_root)
            if stats.rc != 0 or stats.timed_out:
                print(f"  run {'timed out' if stats.timed_out else 'failed'}; last lines:\n"
                      f"{C.tail(stats.log)}")
            later = [it for it in times if it >= args.from_iter]
            res = [log_its[it][1] for it in later if it in log_its and log_its[it][1]]
            results[(n, K, box, ranks)] = {
                "t_iter": (C.mean_iteration_time(times, args.from_iter) if later
                           else float("nan")),
                "t_first": times.get(1, float("nan")), "n_iter": len(times),
                "estep_res": sum(res) / len(res) if res else None, "j": j,
                "wall": stats.wall_s, "cpu": stats.cpu_s, "rss": stats.maxrss_mb,
                "tree_rss": stats.tree_rss_mb, "other": stats.get("other_load"),
                "ok": stats.rc == 0 and not stats.timed_out}
            r = results[(n, K, box, ranks)]
            print(f"  s/iteration (it >= {args.from_iter}): {C.fmt(r['t_iter'], '.1f')}, "
                  f"iteration 1: "
                  f"{C.fmt(r['t_first'], '.1f')}", flush=True)

        headers = ["n", "K", "box", "ranks x j", f"s/it (it>={args.from_iter})", "s it 1",
                   "E-step res A",
                   "wall s", "CPU s", "max RSS MB", "tree RSS MB", "others' load", "status"]
        rows = []
        for (n, K, box, ranks), r in results.items():
            rows.append([n, K, box, f"{ranks} x {r['j']}", C.fmt(r["t_iter"], ".1f"),
                         C.fmt(r["t_first"], ".1f"), C.fmt(r["estep_res"], ".1f"),
                         C.fmt(r["wall"], ".0f"), C.fmt(r["cpu"], ".0f"),
                         C.fmt(r["rss"], ".0f"), C.fmt(r["tree_rss"], ".0f"),
                         C.fmt(r["other"], ".2f"), "ok" if r["ok"] else "FAILED"])
        # Ratios per factor against its smallest value (others at the base).
        base = args.grid["base"]
        rrows = []
        for factor, label in FACTOR_NAMES.items():
            if args.only and factor not in args.only:
                continue
            values = sorted(args.grid[factor])
            key0 = tuple(dict(base, **{factor: values[0]})[k] for k in ("n", "K", "box",
                                                                           "ranks"))
            t0 = results.get(key0, {}).get("t_iter", float("nan"))
            for v in values[1:]:
                key = tuple(dict(base, **{factor: v})[k] for k in ("n", "K", "box", "ranks"))
                t = results.get(key, {}).get("t_iter", float("nan"))
                ratio = t / t0 if t0 and t0 == t0 else float("nan")
                fr = v / values[0]
                expo = math.log(ratio) / math.log(fr) if ratio == ratio and ratio > 0 \
                    else float("nan")
                ideal = {"n": "1 (linear)", "K": "1 (linear)", "box": "2 (pixels)",
                         "ranks": "-1 (perfect speed-up)"}[factor]
                rrows.append([label, f"{values[0]} -> {v}", f"{fr:g}x", C.fmt(ratio, ".2f"),
                              C.fmt(expo, ".2f"), ideal])
        text = "\n".join([
            f"bench_scaling: {args.iter} iterations per run, base n={base['n']} "
            f"K={base['K']} box={base['box']} ranks={base['ranks']}, {args.apix:g} A/px, "
            f"SNR {args.snr:g}" + (f"; extra: {args.cryoclass_args}"
                                   if args.cryoclass_args else ""), "",
            C.format_table(headers, rows), "",
            C.format_table(["factor", "change", "factor x", "time x", "exponent", "ideal"],
                           rrows), "",
            f"s/it = mean seconds per iteration over iterations >= {args.from_iter} (engine "
            "log), E-step res A = their mean E-step resolution; "
            "others' load = cores other processes kept busy during the run"])
        print("\n" + text)
        if args.markdown:
            _print_markdown(results, rrows, args, info)
        if not args.no_record:
            C.append_results("bench_scaling", commands, text, info,
                             [f"work folder {workdir}" + (" (temporary)" if tmp and
                                                          not args.keep else "")])
        return 0
    finally:
        if tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
