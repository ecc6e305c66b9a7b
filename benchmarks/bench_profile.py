"""Where a tutorial-sized iteration spends its time, and how many poses it scores.

    .venv/bin/python benchmarks/bench_profile.py                      # 300 particles, 8 it.
    .venv/bin/python benchmarks/bench_profile.py --j 1 --markdown
    .venv/bin/python benchmarks/bench_profile.py --iter 25 \
        --cryoclass-args "--init_classes pca --consensus_iter 6"

Simulates a set (``cryoclass simulate``: default 300 particles of 64 px, 4 A/px, SNR
0.05, 3 classes, seed 0) and runs ``cryoclass refine`` once with the RELION tutorial's
Class3D flags (K=4, T=4, 7.5 deg, offsets 5 / 1 px, pad 2, --skip_gridding, --norm
--scale, --firstiter_cc; ``_common.tutorial_flags``), then prints per iteration:

* the wall seconds and the engine's seconds per stage (the log's ``stage seconds:``
  line: setup, prepare, coarse, fine-tables, fine, insert, M-step, output);
* the (particle, class, rotation, translation) scores of the coarse pass, how many of
  them were significant (carried ``--adaptive_fraction`` of a particle's posterior and
  went on to the fine pass), and the fine pass's scores (each particle's set, and as
  computed in padded sub-batches) -- the log's ``scores:`` line; a fixed-pose
  iteration (recommended start) shows its (particle, class) scores as coarse;

and the accuracy of the last iteration against the truth (adjusted Rand index,
best-match accuracy, median angular and offset errors, FSC-0.5 of the matched class
maps).  ``--markdown`` also prints both tables in the format of docs/benchmarks.md.
The simulated set is kept under ``--workdir`` (default ``scratch/bench_profile``) and
reused by later runs with the same data options.
"""
import argparse
import os
import re
import shlex
import sys

import _common as C

STAGES = ["setup", "prepare", "coarse", "fine-tables", "fine", "insert", "fixed-pose",
          "M-step", "output"]
SCORE_RE = re.compile(r"^scores:\s+coarse (\d+)\s+significant (\d+) \([^)]*\)\s+"
                      r"fine (\d+) \(computed (\d+)\)")
FIXED_RE = re.compile(r"^scores:\s+fixed-pose (\d+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_dataset_args(p, 300)
    r = p.add_argument_group("refinement")
    r.add_argument("--K", type=int, default=4, help="classes to refine (4)")
    r.add_argument("--tau2", type=float, default=4.0, help="--tau2_fudge (4)")
    r.add_argument("--iter", type=int, default=8, help="iterations (8)")
    r.add_argument("--j", type=int, default=2, help="threads (2)")
    r.add_argument("--cryoclass-args", default="",
                   help="extra flags for cryoclass refine, one string")
    r.add_argument("--label", default="run", help="name of the run's folder (run)")
    w = p.add_argument_group("output")
    w.add_argument("--workdir", default=os.path.join(C.REPO, "scratch", "bench_profile"),
                   help="folder for the data set and the run (kept; default "
                        "scratch/bench_profile)")
    w.add_argument("--no-record", action="store_true",
                   help="do not append to the run log (scratch/benchmark_runs.md)")
    w.add_argument("--markdown", action="store_true",
                   help="also print the tables in the format of docs/benchmarks.md")
    return p.parse_args(argv)


def parse_log(path):
    """``{iteration: {"seconds", "stages": {stage: s}, "scores": {...}}}`` from the
    engine's log (the ``iter`` line, then its ``stage seconds:`` and ``scores:`` lines;
    the last run in the file wins)."""
    out, last = {}, None
    with open(path) as fh:
        for raw in fh:
            text = raw.strip()
            m = C.LOG_RE.match(text)
            if m:
                last = int(m.group(1))
                out[last] = {"seconds": float(m.group(2)), "stages": {}, "scores": {}}
                res = C.ESTEP_RE.search(m.group(3))
                out[last]["estep_res"] = float(res.group(1)) if res else None
            elif last is None:
                continue
            elif text.startswith("stage seconds:"):
                parts = text[len("stage seconds:"):].split()
                out[last]["stages"] = {k: float(v) for k, v in zip(parts[::2], parts[1::2])}
            elif (s := SCORE_RE.match(text)):
                out[last]["scores"] = dict(zip(("coarse", "significant", "fine",
                                                "fine_padded"), map(int, s.groups())))
            elif (s := FIXED_RE.match(text)):
                out[last]["scores"] = {"fixed": int(s.group(1))}
    return out


def _count(v):
    """A score count in millions (3 significant digits), '-' if absent."""
    return "-" if v is None else (f"{v / 1e6:.4g}M" if v >= 1e5 else str(v))


def score_total(its, key):
    """The sum of a score count over iterations, None if the log has no counts."""
    if not any(key in it["scores"] for it in its):
        return None
    return sum(it["scores"].get(key, 0) for it in its)


def iteration_rows(its):
    stages = [s for s in STAGES if any(s in it["stages"] for it in its.values())]
    headers = (["it", "s", "E-step A"] + stages +
               ["coarse scores", "significant", "sig. %", "fine scores", "fine computed"])
    rows = []
    for n in sorted(its):
        it, sc = its[n], its[n]["scores"]
        share = (100.0 * sc["significant"] / sc["coarse"]
                 if sc.get("coarse") else None)
        rows.append([str(n), f"{it['seconds']:.1f}", C.fmt(it["estep_res"], ".1f")]
                    + [C.fmt(it["stages"].get(s), ".2f") for s in stages]
                    + [_count(sc.get("coarse", sc.get("fixed"))), _count(sc.get("significant")),
                       C.fmt(share, ".3g"), _count(sc.get("fine")),
                       _count(sc.get("fine_padded"))])
    # Totals over iterations >= 2 (iteration 1 scores cross-correlations).
    later = [its[n] for n in sorted(its) if n >= 2]
    if later:
        tot = lambda f: sum(f(it) for it in later)  # noqa: E731
        rows.append(["sum it>=2", f"{tot(lambda i: i['seconds']):.1f}", ""]
                    + [f"{tot(lambda i, s=s: i['stages'].get(s, 0.0)):.2f}" for s in stages]
                    + [_count(score_total(later, k)) for k in ("coarse", "significant")]
                    + [""] + [_count(score_total(later, k)) for k in ("fine", "fine_padded")])
    return headers, rows


def accuracy_rows(ev, stats, its):
    later = [its[n]["seconds"] for n in its if n >= 2]
    rows = [["wall time (s)", C.fmt(stats.wall_s, ".1f")],
            ["CPU time user+sys (s)", C.fmt(stats.cpu_s, ".1f")],
            ["other processes' load (cores)", C.fmt(stats.other_load, ".2f")],
            ["s / iteration, mean of it >= 2",
             C.fmt(sum(later) / len(later) if later else None, ".2f")]]
    if ev:
        rows += [["iteration evaluated", str(ev["iteration"])],
                 ["ARI vs truth", C.fmt(ev["ari"], ".3f")],
                 ["best-match accuracy", C.fmt(ev["best_match"], ".3f")],
                 ["median angular error (deg)", C.fmt(ev.get("median_ang_err_deg"), ".2f")],
                 ["median offset error (A)", C.fmt(ev.get("median_offset_err_A"), ".2f")],
                 ["FSC0.5 of the matched class maps (A)",
                  " ".join(C.fmt(v, ".1f") for v in ev["fsc_res_A"])],
                 ["class fractions", " ".join(f"{x:.2f}" for x in ev["class_fractions"])]]
    return rows


def main(argv=None):
    args = parse_args(argv)
    info = C.machine_info()
    print(f"machine: {C.machine_line(info)}")
    workdir = os.path.abspath(args.workdir)
    commands = []
    tag = f"n{args.n}_b{args.box}_snr{args.snr:g}_c{args.classes}_s{args.seed}"
    sim = C.simulate(os.path.join(workdir, tag), args.n, args.box, args.apix, args.snr,
                     args.classes, args.seed, commands=commands)
    sim_dir = sim["dir"]
    root = f"{args.label}/run"
    out_dir = os.path.join(sim_dir, args.label)
    os.makedirs(out_dir, exist_ok=True)
    cmd = C.cryoclass_refine_cmd(root, args.box, args.apix, args.K, args.tau2, args.iter,
                                 args.j, extra=shlex.split(args.cryoclass_args) +
                                 ["--overwrite"])
    stats = C.run_timed(cmd, cwd=sim_dir, log_path=os.path.join(out_dir, "stdout.txt"))
    commands.append(f"(cd <workdir>/{tag} && {stats.cmd})")
    if stats.rc != 0:
        print(f"cryoclass refine failed (rc {stats.rc}):\n{C.tail(stats.log)}")
        return 1
    its = parse_log(os.path.join(sim_dir, root + ".log"))
    ev = C.evaluate_run(os.path.join(sim_dir, root), sim_dir)
    title = (f"{args.n} particles, {args.box} px, {args.apix:g} A/px, SNR {args.snr:g}, "
             f"{args.classes} true classes, seed {args.seed}; K={args.K}, T={args.tau2:g}, "
             f"{args.iter} iterations, --j {args.j}"
             + (f"; cryoclass flags: {args.cryoclass_args}" if args.cryoclass_args else ""))
    h_it, r_it = iteration_rows(its)
    h_acc, r_acc = ["metric", "value"], accuracy_rows(ev, stats, its)
    body = "\n".join([title, "", C.format_table(h_it, r_it), "",
                      C.format_table(h_acc, r_acc)])
    print("\n" + body)
    if args.markdown:
        C.print_markdown(h_it, r_it, info,
                         [f"Settings: {title}; the tutorial's flags with --firstiter_cc. "
                          "Stage seconds from the engine's log; scores are (particle, "
                          "class, rotation, translation) samples; M = millions."],
                         after=C.markdown_table(h_acc, r_acc))
    if not args.no_record:
        C.append_results("bench_profile", commands, body, info,
                         [f"<workdir> = {os.path.relpath(workdir, C.REPO)}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
