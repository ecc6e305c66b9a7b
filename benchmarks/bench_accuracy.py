"""Classification accuracy on a grid of simulated three-class sets, against the oracle.

    .venv/bin/python benchmarks/bench_accuracy.py                  # small default grid
    .venv/bin/python benchmarks/bench_accuracy.py --full           # 600/1500/5000 x 3 SNR x 2 seeds
    .venv/bin/python benchmarks/bench_accuracy.py --label recommended \\
        --cryoclass-args "--incr_size 5"                          # compare engine options
    .venv/bin/python benchmarks/bench_accuracy.py --relion         # also run RELION

Sets: ``cryoclass simulate`` with three classes (full particle / head absent / ratcheted),
64 px, 4 A/px, CTF; particles x SNR x seeds from the options.  Each set is refined with
the RELION tutorial's Class3D settings (K=3 here, T=4, 25 iterations, --ini_high 50,
7.5 deg, offsets 5 / 1 px, --firstiter_cc, --j 2; see ``_common.tutorial_flags``) plus
``--cryoclass-args``.  Per set it prints the oracle accuracy (all frequencies and < 25 A:
the best any classifier can do given the true poses), cryoclass's adjusted Rand index,
best-match accuracy and median angular error against truth.star, the FSC 0.5 resolution
of its class maps against the true maps next to that of the oracle reconstruction (the
same flags with the true poses and classes: what these settings can reach), its wall
time, and RELION's ARI / best-match accuracy / time.

RELION (run with --firstiter_cc, the same flags, K=3) takes far longer than the default
grid's budget on 2 cores, and its answer does not change when cryoclass does, so its
results are cached in ``benchmarks/relion_cache.json`` keyed by the data set's bytes and
RELION's flags.  Without ``--relion`` the table shows cached RELION results where there
are any; with ``--relion`` the missing ones are computed (``--relion-iter`` caps RELION's
iterations, part of the cache key).  ``--markdown`` also prints the table in the format of
docs/benchmarks.md; the raw output goes to the run log (``scratch/benchmark_runs.md``,
tagged ``--label``; ``--no-record`` skips it).
"""
import argparse
import os
import shlex
import shutil
import sys
import tempfile

import _common as C

DEFAULT_N = [600]
DEFAULT_SNR = [0.05, 0.1, 0.2]
DEFAULT_SEEDS = [0]
FULL_N = [600, 1500, 5000]
FULL_SNR = [0.05, 0.1, 0.2]
FULL_SEEDS = [0, 1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help=f"particle counts (default {DEFAULT_N}; --full {FULL_N})")
    p.add_argument("--snr", type=float, nargs="+", default=None,
                   help=f"SNRs (default {DEFAULT_SNR}; --full {FULL_SNR})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"simulation seeds (default {DEFAULT_SEEDS}; --full {FULL_SEEDS})")
    p.add_argument("--full", action="store_true", help="the whole grid (hours)")
    p.add_argument("--box", type=int, default=64, help="box in pixels (64)")
    p.add_argument("--apix", type=float, default=4.0, help="pixel size in A (4.0)")
    p.add_argument("--hinge", type=float, default=20.0,
                   help="the simulator's domain swing of class 3 in degrees (20)")
    p.add_argument("--classes", type=int, default=3, help="true classes (3)")
    p.add_argument("--K", type=int, default=3, help="classes to refine (3)")
    p.add_argument("--tau2", type=float, default=4.0, help="--tau2_fudge (4)")
    p.add_argument("--iter", type=int, default=25, help="iterations (25)")
    p.add_argument("--j", type=int, default=2, help="threads (2)")
    p.add_argument("--cryoclass-args", default="",
                   help="extra flags for cryoclass refine, one string, e.g. "
                        "\"--adaptive_fraction 0.99\"")
    p.add_argument("--label", default="", help="tag for these rows in the run log")
    p.add_argument("--relion", action="store_true",
                   help="run relion_refine where no cached result exists")
    p.add_argument("--relion-only", action="store_true",
                   help="run only RELION (fills the cache; e.g. at low priority beside "
                        "other work); implies --relion")
    p.add_argument("--relion-j", type=int, default=None,
                   help="RELION's threads (default: --j)")
    p.add_argument("--relion-iter", type=int, default=None,
                   help="RELION's iterations (default: --iter)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write benchmarks/relion_cache.json")
    p.add_argument("--timeout", type=float, default=None,
                   help="kill a run after this many seconds (then the last iteration it "
                        "wrote is evaluated)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each run wait up to S seconds for other processes to leave "
                        "the CPUs (< 0.5 cores busy)")
    p.add_argument("--workdir", default=None,
                   help="folder for data sets and outputs (kept; simulated sets in it are "
                        "reused); default: a temporary folder, removed unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--no-oracle-fsc", action="store_true",
                   help="skip the oracle reconstructions (true poses and classes)")
    p.add_argument("--no-record", action="store_true",
                   help="do not append to the run log (scratch/benchmark_runs.md)")
    p.add_argument("--markdown", action="store_true",
                   help="also print the table in the format of docs/benchmarks.md")
    args = p.parse_args(argv)
    args.n = args.n or (FULL_N if args.full else DEFAULT_N)
    args.snr = args.snr or (FULL_SNR if args.full else DEFAULT_SNR)
    args.seeds = args.seeds or (FULL_SEEDS if args.full else DEFAULT_SEEDS)
    args.relion = args.relion or args.relion_only
    return args


def _resolutions(values):
    """``worst / best`` of per-class resolutions (A), or '-'."""
    if not values:
        return "-"
    return f"{max(values):.1f} / {min(values):.1f}"


def _oracle_flags(cryoclass_args):
    """The run's extra flags that also apply to a fixed-pose K=1 reconstruction (the
    reconstruction and noise settings; not the classification start or searches)."""
    keep = {"--tau2_estimate": 1, "--solvent_mask": 1, "--pad": 1}
    words, out = shlex.split(cryoclass_args), []
    for i, w in enumerate(words):
        if w in keep:
            out += words[i:i + 1 + keep[w]]
    return out


MD_HEADERS = ["particles", "SNR", "seed", "oracle accuracy", "ARI", "best-match",
              "angular error (deg)", "class maps (A)", "oracle reconstruction (A)", "wall (s)"]
MD_RELION = ["RELION ARI", "RELION best-match", "RELION angular error (deg)",
             "RELION wall (s)"]


def _markdown_row(n, snr, seed, sim, ev, status, oracle_fsc, cc, rel):
    """One row of the docs/benchmarks.md table (RELION's four cells last, or None)."""
    row = [n, f"{snr:g}", seed, C.fmt(sim["oracle_accuracy"]), C.fmt(ev.get("ari")) + status,
           C.fmt(ev.get("best_match")), C.fmt(ev.get("median_ang_err_deg"), ".1f"),
           _resolutions(ev.get("fsc_res_A")), _resolutions(oracle_fsc),
           C.fmt(cc["wall_s"], ".0f")]
    relion = None
    if rel:
        relion = [C.fmt(rel.get("ari")), C.fmt(rel.get("best_match")),
                  C.fmt(rel.get("median_ang_err_deg"), ".1f"), C.fmt(rel.get("wall_s"), ".0f")]
    return row, relion


def _print_markdown(md_rows, args, info):
    """The table as docs/benchmarks.md shows it; RELION columns only where there are any."""
    with_relion = any(r is not None for _, r in md_rows)
    headers = MD_HEADERS + (MD_RELION if with_relion else [])
    rows = [row + ((rel or ["-"] * 4) if with_relion else []) for row, rel in md_rows]
    hinge = "" if args.hinge == 20.0 else f", class 3 swinging its domain by {args.hinge:g} deg"
    notes = [f"Settings: {args.classes} true classes{hinge}, {args.box} px at {args.apix:g} "
             f"A/px; K={args.K}, T={args.tau2:g}, {args.iter} iterations, --j {args.j}, the "
             "tutorial's flags with --firstiter_cc"
             + (f"; cryoclass flags: `{args.cryoclass_args}`" if args.cryoclass_args else "")
             + (f"; RELION: {args.relion_iter or args.iter} iterations, --j "
                f"{args.relion_j or args.j}" if with_relion else "") + "."]
    C.print_markdown(headers, rows, info, notes)


def refine(name, cmd, sim_dir, root, args, commands):
    out_dir = os.path.join(sim_dir, os.path.dirname(root))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    if args.wait_idle:
        C.wait_for_idle(args.wait_idle)
    stats = C.run_timed(cmd, cwd=sim_dir, log_path=os.path.join(out_dir, "stdout.txt"),
                        timeout=args.timeout)
    commands.append(f"(cd {sim_dir} && {stats.cmd})")
    status = "ok" if stats.rc == 0 and not stats.timed_out else \
        ("timeout" if stats.timed_out else f"rc{stats.rc}")
    if status != "ok":
        print(f"  {name} {status}; last lines of {stats.log}:\n{C.tail(stats.log)}")
    ev = None
    try:
        ev = C.evaluate_run(os.path.join(sim_dir, root), sim_dir)
    except Exception as exc:
        print(f"  cannot evaluate {name}: {type(exc).__name__}: {exc}")
    return {"status": status, "wall_s": stats.wall_s, "cpu_s": stats.cpu_s,
            "eval": ev, "cmd": stats.cmd, "other_load": stats.other_load}


def main(argv=None):
    args = parse_args(argv)
    info = C.machine_info()
    print(f"machine: {C.machine_line(info)}")
    have_relion = C.relion_refine_path() is not None
    relion_iter = args.relion_iter or args.iter
    notes = []
    if args.relion and not have_relion:
        notes.append("relion_refine is not installed (apt-get install -y relion): RELION "
                     "columns only from the cache")
        print(notes[-1])
    notes.append("RELION columns: relion_refine with --firstiter_cc"
                 f", same flags, K={args.K}; 'cached' = from benchmarks/relion_cache.json")
    if args.cryoclass_args:
        notes.append(f"cryoclass extra flags: {args.cryoclass_args}")
    tmp = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_accuracy_"))
    os.makedirs(workdir, exist_ok=True)
    print(f"work folder: {workdir}")
    grid = [(n, snr, seed) for n in args.n for snr in args.snr for seed in args.seeds]
    print(f"{len(grid)} sets: " + ", ".join(f"n={n} snr={s:g} seed={d}" for n, s, d in grid))
    commands, rows, md_rows = [], [], []
    headers = ["n", "SNR", "seed", "oracle", "oracle<25A", "ARI", "best-match", "ang.err",
               "FSC A", "oracle FSC A", "time s", "others", "RELION ARI", "RELION b-m",
               "RELION it", "RELION s"]
    try:
        for n, snr, seed in grid:
            print(f"\n=== n={n} SNR={snr:g} seed={seed}", flush=True)
            hinge = "" if args.hinge == 20.0 else f"_hinge{args.hinge:g}"
            sim_dir = os.path.join(workdir, f"n{n}_snr{snr:g}_seed{seed}{hinge}")
            sim = C.simulate(sim_dir, n, args.box, args.apix, snr, args.classes, seed,
                             commands=commands, hinge=args.hinge)
            cmd = C.cryoclass_refine_cmd("cryoclass/run", args.box, args.apix, args.K,
                                         args.tau2, args.iter, args.j,
                                         extra=shlex.split(args.cryoclass_args))
            if args.relion_only:
                cc = {"status": "skipped", "wall_s": None, "cpu_s": None, "eval": None,
                      "cmd": "", "other_load": None}
            else:
                cc = refine("cryoclass", cmd, sim_dir, "cryoclass/run", args, commands)
            ev = cc["eval"] or {}
            oracle_fsc = None
            if not args.relion_only and not args.no_oracle_fsc:
                try:
                    oracle_fsc = C.oracle_reconstruction(
                        sim_dir, args.box, args.apix, args.tau2, args.iter, args.j,
                        extra=_oracle_flags(args.cryoclass_args))["fsc_res_A"]
                except Exception as exc:
                    print(f"  oracle reconstruction: {type(exc).__name__}: {exc}")
            rel = None
            rcmd = C.relion_refine_cmd("relion/run", args.box, args.apix, args.K, args.tau2,
                                       relion_iter, args.relion_j or args.j)
            key = C.relion_cache_key(sim_dir, rcmd)
            if not args.no_cache:
                rel = C.relion_cache_get(key)
                if rel:
                    rel = dict(rel, source="cached")
            if rel is None and args.relion and have_relion:
                print("  [RELION]")
                r = refine("RELION", rcmd, sim_dir, "relion/run", args, commands)
                rel = {"status": r["status"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                       "ari": (r["eval"] or {}).get("ari"),
                       "best_match": (r["eval"] or {}).get("best_match"),
                       "median_ang_err_deg": (r["eval"] or {}).get("median_ang_err_deg"),
                       "iteration": (r["eval"] or {}).get("iteration"),
                       "other_load": r["other_load"],
                       "machine": C.machine_line(info), "cmd": r["cmd"], "source": "run"}
                if not args.no_cache and r["status"] == "ok":
                    C.relion_cache_put(key, {k: v for k, v in rel.items() if k != "source"})
            status = "" if cc["status"] == "ok" else f" [{cc['status']}]"
            row = [n, f"{snr:g}", seed, C.fmt(sim["oracle_accuracy"]),
                   C.fmt(sim["oracle_accuracy_25A"]), C.fmt(ev.get("ari")) + status,
                   C.fmt(ev.get("best_match")), C.fmt(ev.get("median_ang_err_deg"), ".1f"),
                   _resolutions(ev.get("fsc_res_A")), _resolutions(oracle_fsc),
                   C.fmt(cc["wall_s"], ".0f"), C.fmt(cc["other_load"], ".1f")]
            if rel:
                tag = "*" if rel["source"] == "cached" else ""
                row += [C.fmt(rel.get("ari")) + tag, C.fmt(rel.get("best_match")),
                        str(rel.get("iteration")), C.fmt(rel.get("wall_s"), ".0f")]
            else:
                row += ["-", "-", "-", "-"]
            rows.append(row)
            md_rows.append(_markdown_row(n, snr, seed, sim, ev, status, oracle_fsc, cc, rel))
            print(C.format_table(headers, [row]), flush=True)
        label = f" [{args.label}]" if args.label else ""
        hinge = "" if args.hinge == 20.0 else f" (domain swing {args.hinge:g} deg)"
        body = [f"bench_accuracy{label}: {args.classes} true classes{hinge}, {args.box} px, "
                f"{args.apix:g} A/px; K={args.K}, T={args.tau2:g}, {args.iter} iterations, "
                f"--j {args.j}" + (f"; cryoclass extra: {args.cryoclass_args}"
                                   if args.cryoclass_args else ""), "",
                C.format_table(headers, rows), "",
                "ang.err = median angular error (deg, C1); FSC = FSC 0.5 of the class map "
                "matched to each true class against its true map (A; worst / best); "
                "oracle FSC = the same for maps reconstructed from the true poses and "
                "classes with the same flags (cryoclass --K 1 --skip_align per class): "
                "the reachable resolution; time = wall seconds; others = cores "
                "other processes kept busy meanwhile; "
                "* = RELION result from benchmarks/relion_cache.json (--firstiter_cc)"]
        if not have_relion:
            body.append("relion_refine not installed: RELION columns from the cache only")
        elif not args.relion:
            body.append("RELION not run (pass --relion); '-' = no cached result")
        text = "\n".join(body)
        print("\n" + text)
        if args.markdown:
            _print_markdown(md_rows, args, info)
        if not args.no_record:
            C.append_results(f"bench_accuracy{label}", commands, text, info,
                             notes + [f"work folder {workdir}" +
                                      (" (temporary)" if tmp and not args.keep else "")])
        return 0
    finally:
        if tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
