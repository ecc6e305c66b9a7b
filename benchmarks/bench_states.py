"""Classification of many states, rare states and subtle differences, against the oracle.

    .venv/bin/python benchmarks/bench_states.py                     # every set, K = states
    .venv/bin/python benchmarks/bench_states.py --sets ribo4 swing3 --extra-classes 0 2
    .venv/bin/python benchmarks/bench_states.py --sets complex5 --starts pca relion
    .venv/bin/python benchmarks/bench_states.py --sets ligand2 --j 2   # 5,000 particles

Sets (``simulate_dataset`` with ``states``: each state a combination of independent
changes of one phantom; 64 px, 4 A/px, CTF, SNR 0.1 unless ``--snr``):

- the changes (``simulate.CHANGES``): ``subunit`` (a subunit absent: the ribosome's
  central protuberance and stalk, 6.6 % of the mass; the complex's subunit, 12 %),
  ``swing`` (a peripheral domain turned about its hinge by ``--swing`` degrees: the
  ribosome's small-subunit head, 18 % of the mass; the complex's arm, 8 %), ``ligand``
  (a ligand-sized density present: 3.1 % / 3.6 % of the mass; absent otherwise);
- the phantoms: ``ribosome`` (the simulator's ribosome-like particle) and ``complex``
  (a core with four lobes, a detachable subunit and a hinged arm), both built from
  pseudo-residues (``simulate.SHAPES``).

Each set is refined with the RELION tutorial's Class3D settings (``_common.tutorial_flags``,
T=4, ``--iter``), K = the number of states plus each of ``--extra-classes``, once per
start of ``--starts``: ``pca`` (the recommended start, ``--init_classes pca
--consensus_iter 6``), ``relion`` (RELION's random subsets) and the diagnostic
``truth`` (the recommended start with its split replaced by the true states,
``split_from_truth.py``: what the fixed-pose EM, the merge test and full EM keep of a
perfect split).  Per run it prints the oracle accuracy (all frequencies / < 25 A: a
classifier given the true maps and poses) and the oracle's ARI (the figure to compare
the run's with), the adjusted Rand index, the best-match accuracy, each state's recall
(the share of its particles in the class matched to it one-to-one) next to the
oracle's, the class sizes (sorted, as fractions), the FSC-0.5 resolution of the class
map matched to each state against its true map, and with ``--ceiling`` the ARI of the
true maps at the run's own poses (the oracle assumes the true poses; this is what the
run's pose errors leave).
``--markdown`` prints the table for docs/benchmarks.md.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile

import numpy as np

import _common as C
from cryoclass_plugin.engine.metrics import state_recall

# name: (shape, particles, [(state changes, population), ...])
SETS = {
    "swing3": ("ribosome", 600, [((), 0.45), (("subunit",), 0.35), (("swing",), 0.20)]),
    "ribo4": ("ribosome", 1000, [((), 0.40), (("ligand",), 0.25), (("swing",), 0.20),
                                 (("subunit",), 0.15)]),
    "ribo6": ("ribosome", 1500, [((), 0.30), (("ligand",), 0.20), (("swing",), 0.20),
                                 (("subunit",), 0.15), (("swing", "ligand"), 0.10),
                                 (("subunit", "ligand"), 0.05)]),
    # Every combination of the three changes (8 states).
    "ribo8": ("ribosome", 3000, [((), 0.25), (("ligand",), 0.15), (("swing",), 0.15),
                                 (("subunit",), 0.12), (("swing", "ligand"), 0.10),
                                 (("subunit", "ligand"), 0.10), (("swing", "subunit"), 0.08),
                                 (("swing", "subunit", "ligand"), 0.05)]),
    "ligand2": ("ribosome", 5000, [((), 0.80), (("ligand",), 0.20)]),
    "rare2": ("complex", 2000, [((), 0.95), (("subunit",), 0.05)]),
    "complex5": ("complex", 1200, [((), 0.35), (("swing",), 0.25), (("subunit",), 0.20),
                                   (("ligand",), 0.15), (("swing", "subunit"), 0.05)]),
}
DEFAULT_SETS = ["swing3", "ribo4", "complex5", "ribo6"]
START_FLAGS = {"pca": ["--init_classes", "pca", "--consensus_iter", "6"], "relion": [],
               "truth": ["--init_classes", "pca", "--consensus_iter", "6"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=DEFAULT_SETS, choices=sorted(SETS),
                   help=f"sets to run (default {' '.join(DEFAULT_SETS)})")
    p.add_argument("--n", type=int, default=None, help="particles (default: the set's)")
    p.add_argument("--snr", type=float, default=0.1, help="SNR (0.1)")
    p.add_argument("--swing", type=float, default=12.0, help="domain swing, degrees (12)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (0)")
    p.add_argument("--extra-classes", type=int, nargs="+", default=[0],
                   help="K = states + each of these (default 0; the issue's grid: 0 2)")
    p.add_argument("--starts", nargs="+", default=["pca"], choices=sorted(START_FLAGS),
                   help="class starts to run (default pca)")
    p.add_argument("--box", type=int, default=64, help="box in pixels (64)")
    p.add_argument("--apix", type=float, default=4.0, help="pixel size in A (4.0)")
    p.add_argument("--tau2", type=float, default=4.0, help="--tau2_fudge (4)")
    p.add_argument("--iter", type=int, default=25, help="iterations (25)")
    p.add_argument("--j", type=int, default=1, help="threads (1)")
    p.add_argument("--cryoclass-args", default="", help="extra flags for cryoclass refine")
    p.add_argument("--label", default="", help="tag for these rows in the run log")
    p.add_argument("--workdir", default=None,
                   help="folder for sets and runs (kept; finished runs are reused unless "
                        "--rerun); default: a temporary folder, removed unless --keep")
    p.add_argument("--rerun", action="store_true", help="refine again even if finished")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--no-record", action="store_true",
                   help="do not append to the run log (scratch/benchmark_runs.md)")
    p.add_argument("--ceiling", action="store_true",
                   help="for runs with K = states: also classify with the TRUE maps at the "
                        "run's final poses (bench_true_map_ceiling.py, poses kept and a "
                        "local search at order 3, sigma 5 deg): how far the poses let any "
                        "map set go")
    p.add_argument("--markdown", action="store_true",
                   help="also print the table in the format of docs/benchmarks.md")
    return p.parse_args(argv)


def simulate_set(name, args, sim_dir):
    """Simulate set ``name`` into ``sim_dir`` (reused when its summary matches)."""
    from cryoclass_plugin.engine.simulate import simulate_dataset
    shape, n, states = SETS[name]
    n = args.n or n
    want = {"n": n, "snr": args.snr, "seed": args.seed, "box": args.box, "apix": args.apix,
            "shape": shape, "swing_deg": args.swing,
            "states": [sorted(s) for s, _ in states],
            "fractions": [f for _, f in states]}
    path = os.path.join(sim_dir, "truth_summary.json")
    if os.path.exists(path) and os.path.exists(os.path.join(sim_dir, "particles.mrcs")):
        with open(path) as fh:
            have = json.load(fh)
        if have.get("bench_states") == want:
            print(f"  reusing simulated set {sim_dir}", flush=True)
            return have
    shutil.rmtree(sim_dir, ignore_errors=True)
    simulate_dataset(sim_dir, n=n, box=args.box, apix=args.apix, snr=args.snr,
                     n_classes=len(states), seed=args.seed, shape=shape,
                     states=[s for s, _ in states], swing_deg=args.swing,
                     class_fractions=[f for _, f in states])
    with open(path) as fh:
        summary = json.load(fh)
    summary["bench_states"] = want
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def oracle_recall(summary):
    """Per state: the oracle's share of it assigned to it (its confusion matrix)."""
    conf = np.asarray(summary["oracle_confusion"], dtype=np.float64)
    return (np.diag(conf) / np.maximum(conf.sum(axis=1), 1)).tolist()


def oracle_ari(summary):
    """The ARI of the oracle's assignments (from its confusion matrix): the figure to set
    beside a run's ARI (the oracle's accuracy is a share of particles, not an ARI)."""
    from cryoclass_plugin.engine.metrics import adjusted_rand_index
    conf = np.asarray(summary["oracle_confusion"], dtype=np.int64)
    true = np.repeat(np.arange(conf.shape[0]), conf.sum(axis=1))
    pred = np.concatenate([np.repeat(np.arange(conf.shape[1]), row) for row in conf])
    return adjusted_rand_index(true, pred)


def labels_of(root, sim_dir):
    """True and assigned classes of the last iteration of ``root``, matched by image."""
    from cryoclass_plugin.engine import metrics
    it = [i for i in C.iterations_written(root) if i >= 1][-1]
    data = C._particles_block(f"{root}_it{it:03d}_data.star")
    truth = C._particles_block(os.path.join(sim_dir, "truth.star"))
    truth = truth.assign(rlnImageName=metrics.image_keys(truth["rlnImageName"]))
    data = data.assign(rlnImageName=metrics.image_keys(data["rlnImageName"]))
    merged = truth.merge(data, on="rlnImageName", suffixes=("_true", ""))
    return (merged["rlnClassNumber_true"].to_numpy(int),
            merged["rlnClassNumber"].to_numpy(int))


def run_one(name, start, K, args, sim_dir, commands):
    """Refine one set with one start and K; returns the evaluation dict."""
    root = f"{start}_K{K}/run"
    extra = START_FLAGS[start] + shlex.split(args.cryoclass_args)
    cmd = C.cryoclass_refine_cmd(root, args.box, args.apix, K, args.tau2, args.iter,
                                 args.j, extra=extra)
    if start == "truth":
        # The recommended pipeline from a perfect split (split_from_truth.py).
        cmd = [sys.executable, os.path.join(C.REPO, "benchmarks", "split_from_truth.py"),
               "truth.star", "--"] + cmd[2:]
    out_dir = os.path.join(sim_dir, os.path.dirname(root))
    done = os.path.join(sim_dir, f"{root}_it{args.iter:03d}_optimiser.star")
    cmd_file = os.path.join(out_dir, "command.txt")
    same = (os.path.exists(done) and os.path.exists(cmd_file)
            and open(cmd_file).read() == shlex.join(cmd))
    if same and not args.rerun:
        print(f"  reusing finished run {root}", flush=True)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        stats = C.run_timed(cmd, cwd=sim_dir, log_path=os.path.join(out_dir, "stdout.txt"))
        if stats.rc != 0:
            print(f"  {name} {start} K={K} rc {stats.rc}:\n{C.tail(stats.log)}")
            return None
        with open(cmd_file, "w") as fh:
            fh.write(shlex.join(cmd))
    # The engine's own total, from its stdout (the same for a fresh and a reused run).
    found = re.findall(r"^done: \d+ iterations in ([0-9.]+) s",
                       open(os.path.join(out_dir, "stdout.txt")).read(), re.M)
    wall = float(found[-1]) if found else None
    commands.append(f"(cd {os.path.relpath(sim_dir)} && {shlex.join(cmd)})")
    ev = C.evaluate_run(os.path.join(sim_dir, root), sim_dir)
    true_cls, pred_cls = labels_of(os.path.join(sim_dir, root), sim_dir)
    ev["recall"] = state_recall(true_cls, pred_cls)
    ev["wall_s"] = wall
    log = os.path.join(sim_dir, f"{root}.log")
    ev["merges"] = sum(1 for line in open(log) if line.startswith("merge: ")) \
        if os.path.exists(log) else 0
    ev["ceiling"] = (true_map_ceiling(sim_dir, root, ev["iteration"])
                     if args.ceiling and K == len(set(true_cls)) else (None, None))
    return ev


def true_map_ceiling(sim_dir, root, iteration):
    """ARI of the true maps with the run's poses kept and with a local search
    (``bench_true_map_ceiling.py``), or (None, None)."""
    import re
    import subprocess
    state = os.path.join(sim_dir, f"{root}_it{iteration:03d}_state.npz")
    out = subprocess.run([sys.executable, os.path.join(C.REPO, "benchmarks",
                                                       "bench_true_map_ceiling.py"),
                          sim_dir, state, "--no-global", "--local", "3:5"],
                         capture_output=True, text=True).stdout
    kept = re.search(r"fixed run poses:\s+ARI ([-0-9.]+)", out)
    local = re.search(r"local search, order 3, sigma 5: ARI ([-0-9.]+)", out)
    return (float(kept.group(1)) if kept else None, float(local.group(1)) if local else None)


def _cells(v, spec=".2f"):
    return " / ".join(format(x, spec) for x in v)


HEADERS = ["set", "n", "states (%)", "start", "K", "oracle", "oracle<25A", "oracle ARI", "ARI",
           "best-match", "recall per state", "oracle recall", "class sizes", "FSC A",
           "true maps at our poses (kept / local)", "merges", "wall s"]


def main(argv=None):
    args = parse_args(argv)
    info = C.machine_info()
    print(f"machine: {C.machine_line(info)}")
    tmp = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_states_"))
    os.makedirs(workdir, exist_ok=True)
    commands, rows = [], []
    try:
        for name in args.sets:
            shape, _, states = SETS[name]
            sim_dir = os.path.join(workdir, f"{name}_snr{args.snr:g}_seed{args.seed}"
                                   + (f"_n{args.n}" if args.n else "")
                                   + ("" if args.swing == 12.0 else f"_swing{args.swing:g}"))
            print(f"\n=== {name} ({shape}): {sim_dir}", flush=True)
            summary = simulate_set(name, args, sim_dir)
            pops = "/".join(f"{100 * f:.0f}" for _, f in states)
            for start in args.starts:
                for extra in args.extra_classes:
                    if start == "truth" and extra:
                        continue          # the true split leaves the extra classes empty
                    K = len(states) + extra
                    ev = run_one(name, start, K, args, sim_dir, commands)
                    if ev is None:
                        continue
                    sizes = sorted(ev["class_fractions"], reverse=True)
                    row = [name, summary["n"], pops, start, K,
                           C.fmt(summary["oracle_accuracy"]),
                           C.fmt(summary["oracle_accuracy_25A"]),
                           C.fmt(oracle_ari(summary)), C.fmt(ev["ari"]),
                           C.fmt(ev["best_match"]), _cells(ev["recall"]),
                           _cells(oracle_recall(summary)), _cells(sizes),
                           _cells(ev["fsc_res_A"], ".1f"),
                           " / ".join(C.fmt(x) for x in ev["ceiling"]),
                           ev["merges"], C.fmt(ev["wall_s"], ".0f")]
                    rows.append(row)
                    print(C.format_table(HEADERS, [row]), flush=True)
        label = f" [{args.label}]" if args.label else ""
        settings = (f"{args.box} px, {args.apix:g} A/px, SNR {args.snr:g}, seed {args.seed}, "
                    f"swing {args.swing:g} deg; T={args.tau2:g}, {args.iter} iterations, "
                    f"--j {args.j}" + (f"; cryoclass extra: {args.cryoclass_args}"
                                       if args.cryoclass_args else ""))
        text = "\n".join([f"bench_states{label}: {settings}", "",
                          C.format_table(HEADERS, rows), "",
                          "recall = per state (in the order of 'states'), the share of "
                          "its particles in the class matched to it one-to-one; oracle "
                          "recall = the same for the oracle; class sizes = fractions, "
                          "largest first; FSC = FSC 0.5 (A) of the class map matched to "
                          "each state against its true map; true maps at our poses = ARI "
                          "of one E-step with the true maps from the run's last state, "
                          "poses kept / local search (order 3, sigma 5 deg), with "
                          "--ceiling and K = states: the oracle with the run's poses; "
                          "merges = pairs the held-out merge test merged; wall s = the "
                          "engine's own total seconds"])
        print("\n" + text)
        if args.markdown:
            C.print_markdown(HEADERS, rows, info, [f"Settings: {settings}."])
        if not args.no_record:
            C.append_results(f"bench_states{label}", commands, text, info,
                             [f"work folder {workdir}"])
        return 0
    finally:
        if tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
