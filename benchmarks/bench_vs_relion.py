"""cryoclass refine against relion_refine on one simulated data set, tutorial settings.

    .venv/bin/python benchmarks/bench_vs_relion.py                  # 2000 particles, 25 it.
    .venv/bin/python benchmarks/bench_vs_relion.py --n 600 --iter 10 --relion-iter 5

Simulates a heterogeneous set (``cryoclass simulate``: default 3 classes, 64 px, 4 A/px,
SNR 0.05, 2000 particles, seed 0), then runs, one after the other on the same cores,

  cryoclass refine,  relion_refine (RELION 3.1's CPU path, if installed)  and, with
  --relion5 PATH, RELION 5's accelerated CPU path (``PATH ... --cpu``)

with the RELION tutorial's Class3D job: K=4, T=4, 25 iterations, --ini_high 50, 7.5 deg
(--healpix_order 2 --oversampling 1), offsets range 5 / step 1 (--offset_range 5
--offset_step 2, as the GUI passes them), --zero_mask --flatten_solvent --ctf --pad 2
--skip_gridding --preread_images --norm --scale, mask diameter 0.8 * box * apix, --j 2,
and --firstiter_cc for both (RELION 3.1 collapses onto one view on our simulated sets
without it).  RELION also gets --dont_combine_weights_via_disc
--pool 3.  ``--relion5 PATH`` names a relion_refine of RELION 5 built with
``-DALTCPU=ON`` (benchmarks/README.md has the recipe); it runs with the same flags plus
``--cpu`` (single precision, vectorised kernels, TBB threads).

Each RELION result is stored in benchmarks/relion_cache.json, keyed by the data set's
bytes and RELION's flags (``--cpu`` included); where a RELION is not installed (or not
given), its cached result for the same set and flags is shown instead, marked
"(cached)", with the machine it ran on.

Measured per program: wall time, CPU time (user + sys of the process tree), peak memory
(max RSS of the largest process, and the sampled peak of the tree's summed RSS), seconds
per iteration; and from the last iteration's data.star / class maps: adjusted Rand index
and best-match accuracy against truth.star, median angular error (C1, compared directly:
the reference fixes the frame), median offset error, and the FSC-0.5 resolution of the
class map matched to each true class (best-match assignment of the particles) against
true_classNNN.mrc.  Prints the RELION / cryoclass time ratios; ``--markdown`` also prints
the table in the format of docs/benchmarks.md.  The table and the exact commands go to
the run log (``scratch/benchmark_runs.md``; ``--no-record`` skips it).
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_dataset_args(p, 2000)
    r = p.add_argument_group("refinement (both programs)")
    r.add_argument("--K", type=int, default=4, help="classes to refine (4, as the tutorial)")
    r.add_argument("--tau2", type=float, default=4.0, help="--tau2_fudge (4)")
    r.add_argument("--iter", type=int, default=25, help="iterations (25)")
    r.add_argument("--relion-iter", type=int, default=None,
                   help="cap RELION's iterations (default: --iter); the per-iteration "
                        "time ratio stays comparable, the totals do not")
    r.add_argument("--j", type=int, default=2, help="threads per program (2)")
    r.add_argument("--cryoclass-args", default="",
                   help="extra flags for cryoclass refine, one string")
    r.add_argument("--relion-args", default="", help="extra flags for relion_refine")
    r.add_argument("--timeout", type=float, default=None,
                   help="kill a program after this many seconds (then evaluate the last "
                        "iteration it wrote)")
    r.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each program wait up to S seconds for other processes to "
                        "leave the CPUs (< 0.5 cores busy); their load is reported anyway")
    w = p.add_argument_group("what to run")
    r.add_argument("--relion5", default=None, metavar="PATH",
                   help="also run RELION 5's accelerated CPU path: PATH is a relion_refine "
                        "built with -DALTCPU=ON; it gets the same flags plus --cpu")
    w.add_argument("--skip-relion", action="store_true", help="run cryoclass only")
    w.add_argument("--relion-only", action="store_true", help="run RELION only")
    w.add_argument("--workdir", default=None,
                   help="folder for the data set and outputs (kept); default: a temporary "
                        "folder, removed at the end unless --keep")
    w.add_argument("--keep", action="store_true", help="keep the temporary folder")
    w.add_argument("--no-record", action="store_true",
                   help="do not append to the run log (scratch/benchmark_runs.md)")
    w.add_argument("--markdown", action="store_true",
                   help="also print the table in the format of docs/benchmarks.md")
    w.add_argument("--no-cache", action="store_true",
                   help="neither read nor write benchmarks/relion_cache.json")
    args = p.parse_args(argv)
    if args.skip_relion and args.relion_only:
        p.error("--skip-relion and --relion-only exclude each other")
    if args.relion5:
        problem = check_relion5(args.relion5)
        if problem:
            p.error(problem)
    return args


def check_relion5(path):
    """None if ``path`` is a relion_refine that takes ``--cpu``; else the one-line
    reason."""
    exe = shutil.which(path) or path
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return f"--relion5 {path}: no such executable; give the relion_refine of a RELION 5 build"
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"--relion5 {path}: cannot run it ({exc})"
    if "--cpu" not in out.stdout + out.stderr:
        return (f"--relion5 {path}: this relion_refine has no --cpu option; build RELION 5 "
                "with cmake -DALTCPU=ON (benchmarks/README.md)")
    return None


def relion_runs(args, info):
    """``[(column name, executable or None, extra flags)]``: RELION 3.1 (relion_refine on
    the PATH) and RELION 5 --cpu (``--relion5``); an executable of None means: show the
    cached result if there is one."""
    if args.skip_relion:
        return []
    exe31 = C.relion_refine_path()
    runs = [(f"RELION {info['relion']}" if exe31 else "RELION 3.1", exe31, [])]
    if args.relion5:
        exe5 = shutil.which(args.relion5) or os.path.abspath(args.relion5)
        runs.append((f"RELION {C.relion_version(exe5)} --cpu", exe5, ["--cpu"]))
    else:
        runs.append(("RELION 5 --cpu", None, ["--cpu"]))
    return runs


def cached_result(sim_dir, cmd, name, args):
    """A RELION result from benchmarks/relion_cache.json for this set and flags, in the
    form of :func:`run_program`'s, or None."""
    if args.no_cache:
        return None
    hit = C.relion_cache_get(C.relion_cache_key(sim_dir, cmd))
    if not hit or "times" not in hit:
        return None
    print(f"  {name}: cached result ({hit.get('machine', 'machine unknown')})")
    stats = C.RunStats(wall_s=hit["wall_s"], cpu_s=hit["cpu_s"], sys_s=hit.get("sys_s"),
                       other_load=hit.get("other_load"), maxrss_mb=hit.get("maxrss_mb"),
                       tree_rss_mb=hit.get("tree_rss_mb"), rc=0, timed_out=False,
                       cmd=hit.get("cmd"))
    return {"stats": stats, "ok": hit.get("status") == "ok", "eval": hit.get("eval"),
            "times": {int(k): v for k, v in hit["times"].items()}, "cached": True}


def store_result(sim_dir, cmd, result, info, args):
    """Put a finished RELION run into benchmarks/relion_cache.json."""
    if args.no_cache or not result["ok"] or not result["eval"]:
        return
    st = result["stats"]
    C.relion_cache_put(C.relion_cache_key(sim_dir, cmd), {
        "status": "ok", "wall_s": st.wall_s, "cpu_s": st.cpu_s, "sys_s": st.sys_s,
        "other_load": st.other_load, "maxrss_mb": st.maxrss_mb,
        "tree_rss_mb": st.tree_rss_mb, "cmd": st.cmd, "machine": C.machine_line(info),
        "times": {str(k): v for k, v in result["times"].items()}, "eval": result["eval"],
        "iteration": result["eval"]["iteration"], "ari": result["eval"]["ari"],
        "best_match": result["eval"]["best_match"],
        "median_ang_err_deg": result["eval"].get("median_ang_err_deg")})


def run_program(name, cmd, sim_dir, root, args, commands, env=None):
    """Run one program in the simulation folder; evaluate what it wrote."""
    out_dir = os.path.join(sim_dir, os.path.dirname(root))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    print(f"\n[{name}]", flush=True)
    if args.wait_idle:
        C.wait_for_idle(args.wait_idle)
    stats = C.run_timed(cmd, cwd=sim_dir, log_path=os.path.join(out_dir, "stdout.txt"),
                        env=env, timeout=args.timeout)
    commands.append(f"(cd <workdir>/data && {stats.cmd})")
    result = {"stats": stats, "ok": stats.rc == 0 and not stats.timed_out}
    full_root = os.path.join(sim_dir, root)
    if not result["ok"]:
        print(f"  {name} {'timed out' if stats.timed_out else 'failed'} (rc {stats.rc}); "
              f"last lines of {stats.log}:\n{C.tail(stats.log)}", flush=True)
    try:
        result["eval"] = C.evaluate_run(full_root, sim_dir)
    except Exception as exc:  # nothing written, unreadable output
        print(f"  cannot evaluate {name}: {type(exc).__name__}: {exc}")
        result["eval"] = None
    result["times"] = C.iteration_times(full_root)
    result["root"] = full_root
    return result


def table_rows(results, sim):
    """Rows (metric, value per program) of the comparison table."""
    names = list(results)
    rows = []

    def add(label, fn, timing=False):
        vals = []
        for n in names:
            if timing and results[n].get("eval_only"):
                vals.append("same run")  # the cryoclass run, evaluated at an earlier iteration
                continue
            try:
                vals.append(fn(results[n]))
            except (TypeError, KeyError, IndexError, ZeroDivisionError):
                vals.append("-")
        rows.append([label] + vals)

    add("status", lambda r: "ok" if r["ok"] else
        ("TIMED OUT" if r["stats"].timed_out else f"FAILED rc {r['stats'].rc}"))
    add("iterations evaluated", lambda r: str(r["eval"]["iteration"]))
    add("wall time (s)", lambda r: C.fmt(r["stats"].wall_s, ".1f"), timing=True)
    add("CPU time user+sys (s)", lambda r: C.fmt(r["stats"].cpu_s, ".1f"), timing=True)
    add("  of which sys (s)", lambda r: C.fmt(r["stats"].sys_s, ".1f"), timing=True)
    add("CPU use (cores)", lambda r: C.fmt(r["stats"].cpu_s / r["stats"].wall_s, ".2f"), timing=True)
    add("other processes' load (cores)", lambda r: C.fmt(r["stats"].other_load, ".2f"), timing=True)
    add("max RSS, largest process (MB)", lambda r: C.fmt(r["stats"].maxrss_mb, ".0f"), timing=True)
    add("peak RSS, process tree (MB)", lambda r: C.fmt(r["stats"].tree_rss_mb, ".0f"), timing=True)
    add("s / iteration, iteration 1", lambda r: C.fmt(r["times"][1], ".1f"), timing=True)
    add("s / iteration, mean of it >= 2", lambda r: C.fmt(C.mean_iteration_time(r["times"]),
                                                          ".1f"), timing=True)
    add("ARI vs truth", lambda r: C.fmt(r["eval"]["ari"], ".3f"))
    add("best-match accuracy", lambda r: C.fmt(r["eval"]["best_match"], ".3f"))
    add("median angular error (deg)", lambda r: C.fmt(r["eval"]["median_ang_err_deg"], ".2f"))
    add("median offset error (A)", lambda r: C.fmt(r["eval"]["median_offset_err_A"], ".2f"))
    n_true = len(sim.get("class_sizes", [])) or 3
    for t in range(n_true):
        add(f"FSC0.5 true class {t + 1} vs matched class (A)",
            lambda r, t=t: f"{C.fmt(r['eval']['fsc_res_A'][t], '.1f')} "
                           f"(class {r['eval']['matched_class'][t]})")
        add(f"  best over all class maps (A)",
            lambda r, t=t: C.fmt(r["eval"]["fsc_best_res_A"][t], ".1f"))
    add("class fractions", lambda r: " ".join(f"{x:.2f}" for x in
                                              r["eval"]["class_fractions"]))
    return rows


def ratio_lines(name, cc, rel, n_iter):
    """The time ratios of one RELION column against cryoclass."""
    s_cc, s_rel = cc["stats"], rel["stats"]
    t_cc, t_rel = (C.mean_iteration_time(cc["times"]), C.mean_iteration_time(rel["times"]))
    same = (cc["eval"] or {}).get("iteration") == (rel["eval"] or {}).get("iteration")
    tag = "" if same else "   (different iteration counts: not comparable)"
    lines = [f"time ratio {name} / cryoclass: wall {s_rel.wall_s / s_cc.wall_s:.2f}"
             f", CPU {s_rel.cpu_s / max(s_cc.cpu_s, 1e-9):.2f}{tag}",
             f"time ratio {name} / cryoclass per iteration (mean of it >= 2): "
             f"{t_rel / t_cc:.2f}"]
    if not same and rel["times"]:
        est = sum(v for k, v in rel["times"].items() if k == 1) + t_rel * (n_iter - 1)
        lines.append(f"{name} extrapolated to {n_iter} iterations (it 1 + {n_iter - 1} x "
                     f"mean of it >= 2): ~{est:.0f} s wall, ratio ~{est / s_cc.wall_s:.2f} "
                     "(estimate)")
    return lines


def run_relions(args, info, sim_dir, relion_iter, commands, notes):
    """Each RELION of :func:`relion_runs`: run where installed (and stored in the
    cache), else its cached result; ``{column: result}``."""
    out = {}
    for i, (name, exe, flags) in enumerate(relion_runs(args, info)):
        root = f"relion{i or ''}/run"
        cmd = C.relion_refine_cmd(root, args.box, args.apix, args.K, args.tau2, relion_iter,
                                  args.j, extra=flags + shlex.split(args.relion_args))
        if exe is None:
            hit = cached_result(sim_dir, cmd, name, args)
            if hit:
                out[name + " (cached)"] = hit
                notes.append(f"{name}: cached result of `{hit['stats'].cmd}`")
            else:
                notes.append(f"{name}: not installed or not given, and no cached result "
                             "for this set and flags")
                print(notes[-1])
            continue
        cmd[0] = exe
        out[name] = run_program(name, cmd, sim_dir, root, args, commands)
        store_result(sim_dir, cmd, out[name], info, args)
    return out


def main(argv=None):
    args = parse_args(argv)
    info = C.machine_info()
    print(f"machine: {C.machine_line(info)}")
    have_relion = C.relion_refine_path() is not None or args.relion5
    run_cc = not args.relion_only
    notes = []
    if args.relion_only and not have_relion:
        print("nothing to run: no relion_refine installed and no --relion5")
        return 1
    relion_iter = args.relion_iter or args.iter
    if not args.skip_relion and relion_iter != args.iter:
        notes.append(f"RELION capped at {relion_iter} iterations (cryoclass: "
                     f"{args.iter}); compare per-iteration times, not totals")

    tmp = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_vs_relion_"))
    os.makedirs(workdir, exist_ok=True)
    print(f"work folder: {workdir}")
    commands = []
    try:
        sim = C.simulate(os.path.join(workdir, "data"), args.n, args.box, args.apix,
                         args.snr, args.classes, args.seed, commands=commands)
        sim_dir = sim["dir"]
        print(f"  oracle accuracy {sim['oracle_accuracy']:.4f} "
              f"(< 25 A: {sim['oracle_accuracy_25A']:.4f}); class sizes {sim['class_sizes']}")
        results = {}
        if run_cc:
            cmd = C.cryoclass_refine_cmd("cryoclass/run", args.box, args.apix, args.K,
                                         args.tau2, args.iter, args.j,
                                         extra=shlex.split(args.cryoclass_args))
            results["cryoclass"] = run_program("cryoclass", cmd, sim_dir, "cryoclass/run",
                                               args, commands)
        relions = run_relions(args, info, sim_dir, relion_iter, commands, notes)
        results.update(relions)
        # Like-for-like accuracy when RELION stopped earlier.
        rel_its = sorted({r["eval"]["iteration"] for r in relions.values() if r["eval"]})
        if run_cc and results["cryoclass"]["eval"]:
            for r_it in rel_its:
                if 1 <= r_it < results["cryoclass"]["eval"]["iteration"]:
                    try:
                        cc = dict(results["cryoclass"], eval_only=True)
                        cc["eval"] = C.evaluate_run(cc["root"], sim_dir, iteration=r_it)
                        results[f"cryoclass at it {r_it}"] = cc
                    except Exception as exc:
                        print(f"  cannot evaluate cryoclass at iteration {r_it}: {exc}")

        title = (f"{args.n} particles, {args.box} px, {args.apix:g} A/px, SNR {args.snr:g}, "
                 f"{args.classes} true classes, seed {args.seed}; K={args.K}, T={args.tau2:g}, "
                 f"{args.iter} iterations" +
                 (f" (RELION {relion_iter})" if relions and relion_iter != args.iter
                  else "") + f", --j {args.j}")
        lines = [title,
                 f"oracle accuracy {sim['oracle_accuracy']:.4f} (< 25 A: "
                 f"{sim['oracle_accuracy_25A']:.4f})", ""]
        lines.append(C.format_table(["metric"] + list(results), table_rows(results, sim)))
        cc = results.get("cryoclass")
        for name, rel in relions.items():
            if cc and rel["ok"] and cc["ok"]:
                lines += [""] + ratio_lines(name, cc, rel, args.iter)
        if relions:
            lines.append("RELION ran with --firstiter_cc (without it "
                         "RELION 3.1 collapses on these simulated sets).")
        body = "\n".join(lines)
        print("\n" + body)
        if args.markdown:
            C.print_markdown(["metric"] + list(results), table_rows(results, sim), info,
                             [f"Settings: {title}; the tutorial's flags with --firstiter_cc"
                              + (f"; cryoclass flags: `{args.cryoclass_args}`"
                                 if args.cryoclass_args else "") + "."]
                             + [line for line in lines if line.startswith("time ratio")]
                             + [n for n in notes if "cached" in n])
        if not args.no_record:
            C.append_results("bench_vs_relion", commands, body, info, notes + [f"<workdir> = {workdir}" +
                                                  (" (temporary)" if tmp and not args.keep
                                                   else "")])
        ok = all(r["ok"] for r in results.values())
        return 0 if ok else 1
    finally:
        if tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
