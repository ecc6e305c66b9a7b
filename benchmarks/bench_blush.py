"""Blush regularisation: what the shipped denoiser does to class maps, and (when
``cryoclass refine`` has ``--blush``) to classifications.

    .venv/bin/python benchmarks/bench_blush.py                 # part A (a few minutes)
    .venv/bin/python benchmarks/bench_blush.py --classify      # + part B (long)
    .venv/bin/python benchmarks/bench_blush.py --skip-denoise --classify --markdown
    .venv/bin/python benchmarks/bench_blush.py --skip-denoise --inference   # part C

Part A -- denoising of held-out maps, never seen in training: the simulator's phantom
(``cryoclass_plugin.engine.simulate``: the three true class maps of seed 0, box 64 at
4 A/px, as ``cryoclass simulate`` writes them) and synthetic maps of the training
generator drawn from seeds far from training's (10000+), at the same grid.  Each is
degraded like a regularised reconstruction (``training_data.degrade`` with SSNR = 1 at
``--crossovers`` A, ln SSNR falling by ``--beta`` (600 A^2) per unit |k|^2, B 50 A^2,
T = 4 with the true tau2, no preferred orientation; the band limit is the 8 A Nyquist
of the grid) and regularised with ``BlushRegulariser.regularise`` (replace mode,
default crossover = 6 A network Nyquist, so at 4 A/px the whole band is D's).  Reported
per map and SSNR level: FSC-0.5 resolution against the truth (the clean map with the
same blur) of V_reg, of V_reg times Blush's soft mask (what masking alone gives) and of
the Blush result; the solvent noise (RMS outside the particle sphere + 10 A, over the
truth's RMS inside the particle); the real-space correlation with the truth inside the
particle; and the time per call (one thread).

Part B (``--classify``; ``--skip-denoise`` leaves part A out) -- ``cryoclass refine``
with and without ``--blush`` on simulated sets (``--sets N:SNR:CLASSES[:SEED]``; default
600 particles at SNR 0.02 and 0.05 with three true classes, simulation seeds 0 and 1,
and 600 at SNR 0.05 with one class; K = CLASSES), and with ``--blush_mode prior-mean``
on the sets named by ``--prior-mean`` (default the SNR 0.02 one of seed 0).  Flags: the
RELION tutorial's as tests/test_accuracy_recommended.py passes them, plus the
recommended start (``--init_classes pca --consensus_iter 6``), ``--iter 25 --j 2``
(``--iters``, ``--j``); one run at a time, in ``--work``/sim_.../{plain,blush,...}.  A
run that finished with the same command is evaluated again, not rerun (``--rerun``
forces it).  ``--engine-seeds`` repeats each run with other ``--random_seed`` values
(the PCA start's power iteration and k-means, the merge test's held-out halves, the
sampling-accuracy trials).  Reported per run: the simulator's oracle accuracy, ARI and
best-match accuracy, per true class the FSC-0.5 resolution and solvent noise of its
matched class map, the median angular error of the final poses against the truth, the
mean seconds per iteration and per M-step; then per set Blush against no Blush, in the
terms of issue 20's targets; then per particle number and SNR the ARI over all runs
(mean, spread, mean paired change).  ``--markdown`` prints the docs/benchmarks.md block.

Part C (``--inference``) -- the time of one Blush pass on a box-64 class map, with 1
and 2 threads, with the network's oneDNN inference path and with torch's own choice of
convolution kernel.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

from cryoclass_plugin.blush import training_data  # noqa: E402
from cryoclass_plugin.blush.denoise import BlushRegulariser  # noqa: E402
from cryoclass_plugin.engine import metrics  # noqa: E402
from cryoclass_plugin.engine import simulate as sim  # noqa: E402

BOX, APIX = 64, 4.0


def phantom_maps(seed=0, n_classes=3):
    """The simulator's true class maps (as ``simulate_dataset`` makes them, unscaled)
    and the particle diameter (A)."""
    domains, R = sim.phantom_domains(BOX, APIX, seed)
    sigma = max(2.0, 0.6 * APIX)
    maps = [sim.atoms_to_map(p, w, BOX, APIX, sigma) for p, w in
            (sim.class_atoms(domains, R, v) for v in sim.class_variants(n_classes))]
    return [(f"phantom class {i + 1}", m.astype(np.float32), 2.1 * R) for i, m in enumerate(maps)]


def held_out_maps(n, first_seed=10000):
    out = []
    for i in range(n):
        clean, radius = training_data.clean_map(np.random.default_rng(first_seed + i), BOX, APIX)
        out.append((f"synthetic seed {first_seed + i}", clean, 2.0 * radius + 10.0))
    return out


def solvent_noise(vol, truth, diameter):
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in
                    np.meshgrid(*[np.arange(BOX) - BOX // 2] * 3, indexing="ij"))) * APIX
    outside = r > diameter / 2 + 10.0
    inside = r <= diameter / 2
    return float(np.sqrt((vol[outside] ** 2).mean()) / np.sqrt((truth[inside] ** 2).mean()))


def fsc05(a, b):
    return metrics.fsc_resolution(metrics.fsc(a, b), BOX, APIX, 0.5)


def blush_mask(diameter):
    """The soft mask Blush applies (radius + 5 A, 10 A edge), on the benchmark's grid:
    V_reg times it separates what the network adds from what masking alone does."""
    from cryoclass_plugin.blush.denoise import MASK_EDGE_A, MASK_EXTRA_A
    from cryoclass_plugin.blush.resample import soft_sphere
    return soft_sphere(BOX, (diameter / 2 + MASK_EXTRA_A) / APIX, MASK_EDGE_A / APIX).numpy()


def masked_cc(a, b, diameter):
    """Real-space correlation inside the particle sphere."""
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in
                    np.meshgrid(*[np.arange(BOX) - BOX // 2] * 3, indexing="ij"))) * APIX
    inside = r <= diameter / 2
    return float(np.corrcoef(a[inside], b[inside])[0, 1])


def part_a(blush, crossovers, n_synthetic, seed, beta):
    rows, times = [], []
    maps = phantom_maps() + held_out_maps(n_synthetic)
    for name, clean, diameter in maps:
        for cross in crossovers:
            rng = np.random.default_rng([seed, int(cross * 10)])
            fixed = {"b_factor": 50.0, "crossover_a": cross, "beta": beta,
                     "preferred": 0.0, "prior_factor": 4.0, "band_limit_a": 0.0}
            v_reg, truth = training_data.degrade(clean, APIX, rng, fixed=fixed)
            t = time.perf_counter()
            out = blush.regularise(v_reg, APIX, diameter)
            times.append(time.perf_counter() - t)
            masked = v_reg * blush_mask(diameter)
            rows.append([name, f"{cross:g}", C.fmt(fsc05(v_reg, truth), ".1f"),
                         C.fmt(fsc05(masked, truth), ".1f"),
                         C.fmt(fsc05(out, truth), ".1f"),
                         C.fmt(masked_cc(v_reg, truth, diameter)),
                         C.fmt(masked_cc(out, truth, diameter)),
                         C.fmt(solvent_noise(v_reg, truth, diameter), ".3f"),
                         C.fmt(solvent_noise(out, truth, diameter), ".3f")])
    headers = ["map", "SSNR=1 at (A)", "FSC0.5 V_reg (A)", "V_reg masked", "FSC0.5 Blush (A)",
               "CC V_reg", "CC Blush", "solvent V_reg", "solvent Blush"]
    print(C.format_table(headers, rows))
    print(f"time per regularise() call, box {BOX} at {APIX:g} A/px, 1 thread: "
          f"median {np.median(times):.3f} s (min {np.min(times):.3f}, max {np.max(times):.3f}, "
          f"{len(times)} calls)")
    return headers, rows, times


# Part B: the flags of tests/test_accuracy_recommended.py (TUTORIAL: the RELION
# tutorial's Class3D job at box 64, 4 A/px) plus the recommended start; --K, --iter and
# the Blush flags are added per run.
CLASSIFY_FLAGS = ["--tau2_fudge", "4", "--ini_high", "50", "--firstiter_cc",
                  "--particle_diameter", "205", "--zero_mask", "--flatten_solvent", "--ctf",
                  "--healpix_order", "2", "--offset_range", "5", "--offset_step", "2",
                  "--pad", "2", "--skip_gridding", "--preread_images",
                  "--init_classes", "pca", "--consensus_iter", "6"]
DIAMETER_A = 205.0
RUNS = {"plain": ("no Blush", []), "blush": ("Blush", ["--blush"]),
        "blush_prior_mean": ("Blush prior-mean", ["--blush", "--blush_mode", "prior-mean"])}
STAGE_RE = re.compile(r"^stage seconds:.*\bM-step\s+([0-9.]+)")


def refine_cmd(root, classes, args, extra):
    """The ``cryoclass refine`` command (run in the simulation folder)."""
    cmd = [C.CRYOCLASS, "refine", "--i", "particles.star", "--ref", "ref.mrc", "--o", root,
            "--K", str(classes)] + CLASSIFY_FLAGS + ["--j", str(args.j), "--iter",
                                                      str(args.iters)] + list(extra)
    if "--blush" in extra and args.weights:
        cmd += ["--blush_weights", args.weights]
    return cmd


def run_name(name, engine_seed):
    """Folder of a run: ``plain``, ``blush``, ... for engine seed 0, ``plain_rs1`` etc."""
    return name if engine_seed == 0 else f"{name}_rs{engine_seed}"


def run_refine(sim_dir, name, classes, args, engine_seed=0):
    """Run (or, with the same command and all iterations written, reuse) one
    classification (``--random_seed engine_seed`` when not 0); returns (root, wall
    seconds, command text)."""
    folder = run_name(name, engine_seed)
    run_dir = os.path.join(sim_dir, folder)
    root = os.path.join(folder, "run")
    extra = RUNS[name][1] + (["--random_seed", str(engine_seed)] if engine_seed else [])
    cmd = refine_cmd(root, classes, args, extra)
    text = "cryoclass " + shlex.join(cmd[1:])
    done = os.path.join(run_dir, "result.json")
    final = os.path.join(sim_dir, f"{root}_it{args.iters:03d}_data.star")
    if not args.rerun and os.path.exists(done) and os.path.exists(final):
        with open(done) as fh:
            have = json.load(fh)
        if have.get("command") == text:
            print(f"  reusing {run_dir}", flush=True)
            return os.path.join(sim_dir, root), have["wall_s"], text
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    res = C.run_timed(cmd, sim_dir, os.path.join(run_dir, "stdout.txt"))
    if res.rc != 0:
        print(C.tail(os.path.join(run_dir, "stdout.txt"), 5))
        raise SystemExit(f"part B: {name} run in {sim_dir} failed (rc {res.rc})")
    with open(done, "w") as fh:
        json.dump({"command": text, "wall_s": res.wall_s}, fh)
    return os.path.join(sim_dir, root), res.wall_s, text


def mstep_seconds(root, first=2):
    """Mean M-step seconds per iteration (from iteration ``first``; the engine log's
    ``stage seconds`` line after each ``iter`` line): where Blush's inference runs."""
    vals, it = [], None
    with open(f"{root}.log") as fh:
        for line in fh:
            m = C.LOG_RE.match(line.strip())
            if m:
                it = int(m.group(1))
            m = STAGE_RE.match(line.strip())
            if m and it is not None and it >= first:
                vals.append(float(m.group(1)))
    return float(np.mean(vals)) if vals else float("nan")


def solvent_noise_class(vol, truth):
    """RMS of a class map over solvent voxels inside the mask sphere (``DIAMETER_A``)
    that lie more than 8 A from the molecule (true map above 2 % of its maximum), over
    its RMS on the molecule: scale-free, 0 for a map flat in the solvent."""
    from scipy.ndimage import distance_transform_edt
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in
                    np.meshgrid(*[np.arange(BOX) - BOX // 2] * 3, indexing="ij"))) * APIX
    molecule = truth > 0.02 * truth.max()
    far = distance_transform_edt(~molecule) * APIX > 8.0
    solvent = far & (r <= DIAMETER_A / 2)
    return float(np.sqrt((vol[solvent] ** 2).mean()) / np.sqrt((vol[molecule] ** 2).mean()))


def evaluate(root, sim_dir):
    """ARI / best-match (data.star rows aligned with truth.star), per true class the
    FSC-0.5 resolution (A) and solvent noise of the class map matched to it (Hungarian
    on the particle assignments), and the mean seconds per iteration and M-step."""
    from cryoclass_plugin.engine.mrc_io import read_map
    ev = C.evaluate_run(root, sim_dir)
    noise = []
    for t, k in enumerate(ev["matched_class"], start=1):
        truth, _ = read_map(os.path.join(sim_dir, f"true_class{t:03d}.mrc"))
        vol, _ = read_map(f"{root}_it{ev['iteration']:03d}_class{k:03d}.mrc")
        noise.append(solvent_noise_class(vol, truth))
    ev["solvent"] = noise
    ev["s_per_iter"] = C.mean_iteration_time(C.iteration_times(root))
    ev["mstep_s"] = mstep_seconds(root)
    return ev


def _fsc_cell(ev, t):
    """FSC-0.5 (A) of true class ``t``'s matched map; '*' where that class ended empty
    (its map is then the last one it had, kept unchanged)."""
    empty = ev["class_fractions"][ev["matched_class"][t] - 1] == 0.0
    return C.fmt(ev["fsc_res_A"][t], ".1f") + ("*" if empty else "")


def _shells(res_a):
    return BOX * APIX / np.asarray(res_a, dtype=np.float64)


def compare(base, other):
    """Targets of issue 20 for one set: mean FSC-0.5 gain (%, in A), worst per-class
    change (shells, + = better), ARI change, time per iteration added (%), and the
    M-step's added seconds over the plain run's seconds per iteration (%): Blush's own
    cost, less exposed to the shared machine's load and to the runs' different paths."""
    b, o = np.asarray(base["fsc_res_A"]), np.asarray(other["fsc_res_A"])
    gain = 100.0 * (b.mean() - o.mean()) / b.mean()
    worst = float(np.min(_shells(o) - _shells(b)))
    d_ari = other["ari"] - base["ari"]
    added = 100.0 * (other["s_per_iter"] / base["s_per_iter"] - 1.0)
    mstep = 100.0 * (other["mstep_s"] - base["mstep_s"]) / base["s_per_iter"]
    return gain, worst, d_ari, added, mstep


def part_b(args):
    """Each set with and without Blush (and prior-mean where asked); one run at a time."""
    rows, cmp_rows, commands, results, summary = [], [], [], {}, {}
    for n, snr, classes, seed in args.sets:
        seed = args.seed if seed is None else seed
        sim_dir = os.path.join(args.work, f"sim_n{n}_snr{snr:g}_k{classes}"
                               + (f"_seed{seed}" if seed else ""))
        info = C.simulate(sim_dir, n, box=BOX, apix=APIX, snr=snr, classes=classes,
                          seed=seed, commands=commands)
        prior_mean = any(p[:3] == (n, snr, classes) and (p[3] if p[3] is not None
                                                           else args.seed) == seed
                         for p in args.prior_mean)
        names = ["plain", "blush"] + (["blush_prior_mean"] if prior_mean else [])
        runs = [(name, rs) for rs in args.engine_seeds for name in names
                if rs == 0 or name != "blush_prior_mean"]
        for name, rs in runs:
            root, wall, text = run_refine(sim_dir, name, classes, args, rs)
            commands.append(f"(cd {os.path.relpath(sim_dir, C.REPO)} && {text})")
            ev = results[(sim_dir, name, rs)] = evaluate(root, sim_dir)
            single = classes == 1
            if not single:
                summary.setdefault((n, snr, name), {})[(seed, rs)] = ev["ari"]
            rows.append([n, f"{snr:g}", classes, seed, rs, C.fmt(info["oracle_accuracy"], ".3f"),
                         RUNS[name][0], "-" if single else C.fmt(ev["ari"]),
                         "-" if single else C.fmt(ev["best_match"]),
                         " / ".join(C.fmt(v, ".2f") for v in ev["class_fractions"]),
                         " / ".join(_fsc_cell(ev, t) for t in range(len(ev["fsc_res_A"]))),
                         " / ".join(C.fmt(v, ".3f") for v in ev["solvent"]),
                         C.fmt(ev.get("median_ang_err_deg", float("nan")), ".2f"),
                         C.fmt(ev["s_per_iter"], ".2f"), C.fmt(ev["mstep_s"], ".2f"),
                         C.fmt(wall, ".0f")])
            if name != "plain":
                gain, worst, d_ari, added, mstep = compare(
                    results[(sim_dir, "plain", rs)], ev)
                cmp_rows.append([n, f"{snr:g}", classes, seed, rs, RUNS[name][0], f"{gain:+.1f}",
                                 f"{worst:+.2f}", "-" if single else f"{d_ari:+.3f}",
                                 f"{added:+.0f}", f"{mstep:+.0f}"])
    headers = ["n", "SNR", "K", "seed", "engine seed", "oracle acc.", "run", "ARI", "best-match",
               "class sizes", "FSC0.5 per class (A)", "solvent noise per class",
               "median pose error (deg)", "s / iteration", "M-step s / it.", "wall (s)"]
    cmp_headers = ["n", "SNR", "K", "seed", "engine seed", "run vs no Blush",
                   "FSC0.5 gain (% of A, mean)",
                   "worst class (shells)", "ARI change", "time per iteration (%)",
                   "M-step added (% of an iteration)"]
    print(C.format_table(headers, rows))
    print()
    print(C.format_table(cmp_headers, cmp_rows))
    sum_headers, sum_rows = ari_summary(summary)
    print()
    print(C.format_table(sum_headers, sum_rows))
    print("\ncommands:\n" + "\n".join(c.replace(C.REPO + os.sep, "") for c in commands))
    if args.markdown:
        C.print_markdown(headers, rows, notes=classify_notes(args),
                         after=C.markdown_table(cmp_headers, cmp_rows) + "\n\n"
                         + C.markdown_table(sum_headers, sum_rows))


def ari_summary(summary):
    """Per particle number, SNR and kind of run: the ARI over all its runs (simulation
    seeds x engine seeds) as mean, standard deviation and range, and the mean change
    against the plain run of the same set and engine seed; where single runs sit far
    from their oracle, one run's change says little and the spread tells how much."""
    headers = ["n", "SNR", "run", "runs", "ARI mean", "ARI s.d.", "ARI range",
               "mean change vs no Blush"]
    rows = []
    for (n, snr, name), by_run in sorted(summary.items()):
        a = np.asarray(list(by_run.values()))
        base = summary.get((n, snr, "plain"), {})
        paired = [v - base[key] for key, v in by_run.items() if key in base]
        change = "-" if name == "plain" or not paired else \
            f"{np.mean(paired):+.3f} ({len(paired)} pairs)"
        rows.append([n, f"{snr:g}", RUNS[name][0], len(a), f"{a.mean():.3f}",
                     f"{a.std(ddof=1):.3f}" if len(a) > 1 else "-",
                     f"{a.min():.3f}-{a.max():.3f}", change])
    return headers, rows


def classify_notes(args):
    """Part B's notes under its markdown table (the run's own iterations and threads)."""
    return (
    "Sets: `cryoclass simulate` (the seed of the table, box 64, 4 A/px); runs: "
    "`cryoclass refine` with the flags of tests/test_accuracy_recommended.py (TUTORIAL) plus `--init_classes pca "
    f"--consensus_iter 6`, {args.iters} iterations, `--j {args.j}`, one run at a time.",
    "FSC0.5: the class map matched to each true class (Hungarian on the assignments) "
    "against the true map; solvent noise: the map's RMS over solvent inside the 205 A "
    "mask (> 8 A from the molecule) over its RMS on the molecule; s / iteration: mean "
    "of the log's iteration lines from iteration 2; M-step: the same for the M-step "
    "stage (where Blush runs). Comparison: gain > 0 and shells > 0 mean Blush better; "
    "one shell is 1 / 256 A^-1. '*': the matched class ended empty, and its map is the "
    "last one it had.",
    )


def inference_time(weights, box=BOX, apix=APIX, diameter=205.0, repeats=5):
    """Part C: seconds of one Blush pass on a class map (best and median of ``repeats``
    after a warm-up), 1 and 2 threads, with the network's oneDNN inference path and with
    torch's own choice of convolution kernel."""
    from cryoclass_plugin.blush import network
    vol = np.random.default_rng(0).normal(size=(box,) * 3).astype(np.float32)
    ours = network.Conv3d.forward
    rows = []
    try:
        for label, forward in (("torch's own choice", torch.nn.Conv3d.forward),
                               ("always oneDNN (blush.network.Conv3d)", ours)):
            network.Conv3d.forward = forward
            row = [label]
            for threads in (1, 2):
                blush = BlushRegulariser(weights=weights, threads=threads)
                blush.regularise(vol, apix, diameter)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    blush.regularise(vol, apix, diameter)
                    times.append(time.perf_counter() - start)
                row.append(f"{min(times):.3f} s (median {np.median(times):.3f})")
            rows.append(row)
    finally:
        network.Conv3d.forward = ours
    print(f"\nBlush pass per class map: box {box}, {apix:g} A/px, particle {diameter:g} A; "
          f"best of {repeats} after a warm-up")
    print(C.format_table(["convolution kernels", "1 thread", "2 threads"], rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crossovers", type=float, nargs="+", default=[30.0, 20.0, 14.0, 10.0])
    ap.add_argument("--synthetic", type=int, default=3, help="held-out synthetic maps")
    ap.add_argument("--beta", type=float, default=600.0,
                    help="fall of ln SSNR per unit |k|^2 (A^2) of the degradation")
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classify", action="store_true", help="also run part B")
    ap.add_argument("--inference", action="store_true",
                    help="also time one Blush pass per class map (part C)")
    ap.add_argument("--skip-denoise", action="store_true", help="skip part A")
    ap.add_argument("--sets", nargs="+", type=_set_spec,
                    default=[(600, 0.02, 3, None), (600, 0.05, 3, None), (600, 0.05, 1, None),
                             (600, 0.02, 3, 1), (600, 0.05, 3, 1)],
                    help="part B sets as N:SNR:CLASSES[:SEED] (K = CLASSES; the "
                    "simulation seed defaults to --seed)")
    ap.add_argument("--prior-mean", type=_set_spec, nargs="*", default=[(600, 0.02, 3, None)],
                    help="sets (N:SNR:CLASSES[:SEED], among --sets) also run with "
                    "--blush_mode prior-mean")
    ap.add_argument("--rerun", action="store_true",
                    help="rerun classifications that finished with the same command")
    ap.add_argument("--markdown", action="store_true",
                    help="print part B as docs/benchmarks.md's Blush table")
    ap.add_argument("--work", default=os.path.join(C.REPO, "scratch", "bench_blush"))
    ap.add_argument("--engine-seeds", type=int, nargs="+", default=[0],
                    help="part B: run each set with each of these --random_seed values "
                    "(the PCA start, the merge test's held-out halves; default 0 only)")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--j", type=int, default=2)
    args = ap.parse_args()
    if not args.skip_denoise:
        torch.set_num_threads(1)
        blush = BlushRegulariser(weights=args.weights, threads=1)
        print(blush.describe())
        part_a(blush, args.crossovers, args.synthetic, args.seed, args.beta)
    if args.inference:
        inference_time(args.weights)
    if args.classify:
        part_b(args)


def _set_spec(text):
    """N:SNR:CLASSES[:SEED] -> (n, snr, classes, seed or None: --seed)."""
    parts = text.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError(text)
        seed = int(parts[3]) if len(parts) == 4 else None
        return int(parts[0]), float(parts[1]), int(parts[2]), seed
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not N:SNR:CLASSES[:SEED] "
                                         "(e.g. 600:0.02:3 or 600:0.02:3:1)")


if __name__ == "__main__":
    main()
