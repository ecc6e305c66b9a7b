"""``cryoclass demo``: the whole user path on built-in data, in a real headless Scipion
project.

1. simulate a heterogeneous data set with ground truth (``cryoclass simulate``: 3 classes
   of a ribosome-like phantom, 64 px at 4 A/px, SNR 0.1, CTF; nothing is downloaded);
2. create a Scipion project and import the particles (*cryoclass - import particles*)
   and the reference map (pwem's *import volumes*);
3. 3D classification with *cryoclass - 3D classification* (RELION tutorial settings,
   scaled down: K=3, T=4, 7.5 degree sampling, offsets 5/1 px, zero mask, initial
   low-pass 40 A), streaming the engine's per-iteration log while it runs;
4. automatic class selection with *cryoclass - select 3D classes* (best estimated
   resolution among classes holding at least 5 % of the particles);
5. ``cryoclass report`` figures of the run;
6. a table of the classes against the simulator's ground truth: size, distribution,
   estimated resolution, the best-matching true class and the fraction of the class's
   particles that truly belong to it, the adjusted Rand index and the best-matching
   accuracy against the truth next to the simulator's oracle accuracy (what a
   classifier given the true poses and maps achieves).

Everything goes under ``--out`` (default ``./cryoclass_demo``)::

    data/          simulated particles.star/.mrcs, ref.mrc, true_classKKK.mrc, truth.star
    scipion/       the headless Scipion (config/, ScipionUserData/projects/cryoclass_demo)
    report/        index.html and the figures
    classes.tsv    the class table;  summary.json  all numbers and timings

The numbers are reported as they come: the demo does not tune anything to look good.
"""
import json
import os
import sys
import time

from ..engine.errors import CryoClassError

PROJECT_NAME = "cryoclass_demo"
DEFAULTS = dict(particles=1000, box=64, apix=4.0, snr=0.1, classes=3, iter=16, mpi=1,
                threads=2, seed=0, keep=1)


def add_args(parser):
    d = DEFAULTS
    parser.add_argument("--out", default="cryoclass_demo", metavar="DIR",
                        help="output folder (default ./cryoclass_demo); a previous demo "
                             "there is replaced")
    parser.add_argument("--particles", type=int, default=d["particles"], metavar="N",
                        help="number of simulated particles (%(default)s)")
    parser.add_argument("--box", type=int, default=d["box"], metavar="PX",
                        help="box size in pixels, even, >= 16 (%(default)s)")
    parser.add_argument("--apix", type=float, default=d["apix"], metavar="A",
                        help="pixel size in A (%(default)s)")
    parser.add_argument("--snr", type=float, default=d["snr"],
                        help="signal-to-noise ratio of the images (%(default)s)")
    parser.add_argument("--classes", type=int, default=d["classes"], metavar="K",
                        help="number of simulated and of 3D classes (%(default)s)")
    parser.add_argument("--iter", type=int, default=d["iter"], metavar="N",
                        help="classification iterations (%(default)s)")
    parser.add_argument("--mpi", type=int, default=d["mpi"], metavar="N",
                        help="MPI processes of the classification (%(default)s)")
    parser.add_argument("--threads", type=int, default=d["threads"], metavar="N",
                        help="threads per MPI process (%(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="random seed of the simulation and the classification "
                             "(%(default)s)")
    parser.add_argument("--keep", type=int, default=d["keep"], metavar="N",
                        help="classes the automatic selection keeps (%(default)s; 0 = "
                             "all that hold >= 5%% of the particles)")


# ---------------------------------------------------------------------------- printing
def _say(msg=""):
    print(msg, flush=True)


def _fmt_time(seconds):
    seconds = int(round(seconds))
    return "%dm%02ds" % divmod(seconds, 60) if seconds >= 60 else "%ds" % seconds


class _Steps:
    def __init__(self, total):
        self.total, self.n, self.t0, self.times = total, 0, time.time(), {}
        self._name, self._start = None, None

    def start(self, name, text):
        self._finish()
        self.n += 1
        self._name, self._start = name, time.time()
        _say("\n[%d/%d] %s" % (self.n, self.total, text))

    def _finish(self):
        if self._name is not None:
            self.times[self._name] = round(time.time() - self._start, 1)
            _say("      done in %s" % _fmt_time(self.times[self._name]))
            self._name = None

    def finish(self):
        self._finish()
        self.times["total"] = round(time.time() - self.t0, 1)


# ---------------------------------------------------------------------------- checks
def _check_args(args):
    if args.box < 16 or args.box % 2:
        raise CryoClassError("--box %d: use an even box of at least 16 pixels" % args.box)
    if not args.apix > 0:
        raise CryoClassError("--apix %g: must be > 0" % args.apix)
    if not args.snr > 0:
        raise CryoClassError("--snr %g: must be > 0" % args.snr)
    if args.classes < 1:
        raise CryoClassError("--classes %d: must be at least 1" % args.classes)
    if args.particles < 10 * args.classes:
        raise CryoClassError("--particles %d: use at least 10 per class (%d for %d "
                             "classes)" % (args.particles, 10 * args.classes, args.classes))
    if args.iter < 1:
        raise CryoClassError("--iter %d: must be at least 1" % args.iter)
    if args.mpi < 1 or args.threads < 1:
        raise CryoClassError("--mpi %d --threads %d: both must be at least 1"
                             % (args.mpi, args.threads))
    if args.keep < 0:
        raise CryoClassError("--keep %d: must be 0 (all) or more" % args.keep)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CryoClassError("--out %s: exists and is not a folder" % out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise CryoClassError("--out %s: cannot create it (%s)" % (out, exc.strerror))
    if not os.access(out, os.W_OK):
        raise CryoClassError("--out %s: not writable" % out)
    return out


def demo_settings(args):
    """The classification protocol's parameters (RELION tutorial, scaled down)."""
    from ..constants import ANGULAR_SAMPLING_LIST
    return dict(
        numberOfClasses=args.classes,
        regularisationParamT=4.0,
        numberOfIterations=args.iter,
        initialLowPassFilterA=40.0,
        isMapAbsoluteGreyScale=False,     # the tutorial's choice: --firstiter_cc
        symmetryGroup="C1",
        doCTF=True,
        maskDiameterA=float(round(0.8 * args.box * args.apix)),
        maskZero=True,
        angularSamplingDeg=ANGULAR_SAMPLING_LIST.index("7.5"),
        offsetSearchRangePix=5.0,
        offsetSearchStepPix=1.0,
        randomSeed=args.seed + 1,
        # Our recommended start (consensus alignment + heterogeneity PCA) needs the 5
        # consensus iterations plus a few; short smoke runs keep RELION's start.
        initialClasses=2 if args.iter > 8 else 0,
        # Then up to 6 fixed-pose iterations (cheap), leaving at least 5 of full EM.
        fixedPoseIterations=max(0, min(6, args.iter - 10)),
        numberOfMpi=args.mpi,
        numberOfThreads=args.threads,
    )


# ---------------------------------------------------------------------------- protocols
def _new(project, cls, label, **params):
    prot = project.newProtocol(cls, **params)
    prot.setObjLabel(label)
    return prot


def _run_protocol(project, prot, what):
    """Launch and wait (short protocols); a failure becomes a CryoClassError."""
    from ..scipion_env import ProtocolFailed, launch
    errors = prot.validate()
    if errors:
        raise CryoClassError("%s: the protocol's form is not valid: %s"
                             % (what, " ".join(errors)))
    try:
        return launch(project, prot)
    except ProtocolFailed as exc:
        print(str(exc), file=sys.stderr, flush=True)
        logs = os.path.dirname(os.path.join(project.path, prot.getStdoutLog()))
        raise CryoClassError("%s failed (run %s); its logs: %s"
                             % (what, prot.getRunName(), logs)) from None


class _LogFollower:
    """Prints the lines appended to a file since the last call."""

    def __init__(self, path, prefix="      "):
        self.path, self.prefix, self.pos, self.partial = path, prefix, 0, ""
        self.lines = 0

    def poll(self):
        try:
            with open(self.path, errors="replace") as fh:
                fh.seek(self.pos)
                text = fh.read()
                self.pos = fh.tell()
        except OSError:
            return 0
        text = self.partial + text
        lines = text.split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                _say(self.prefix + line.rstrip())
                self.lines += 1
        return len(lines)


def _run_classification(project, prot, poll=1.0, heartbeat=60.0):
    """Launch the classification in the background and stream the engine's log
    (``extra/cryoclass.log``, one line per iteration) until the run ends."""
    from ..constants import OUTPUT_ROOT
    from ..scipion_env import ProtocolFailed, check_finished, refresh
    errors = prot.validate()
    if errors:
        raise CryoClassError("3D classification: the protocol's form is not valid: %s"
                             % " ".join(errors))
    project.launchProtocol(prot, wait=False)
    run_dir = os.path.join(project.path, prot.getWorkingDir())
    engine_log = os.path.join(run_dir, "extra", OUTPUT_ROOT + ".log")
    _say("      run %s (%s)" % (prot.getRunName(), run_dir))
    _say("      engine log: %s" % engine_log)
    follower = _LogFollower(engine_log, prefix="      engine | ")
    start = last_output = time.time()
    total = prot.numberOfIterations.get()
    try:
        while True:
            time.sleep(poll)
            if follower.poll():
                last_output = time.time()
            refresh(project, prot)
            if not prot.isActive():
                break
            if time.time() - last_output >= heartbeat:
                done = prot._lastIter()
                _say("      ... running for %s; %s of %d iterations written"
                     % (_fmt_time(time.time() - start),
                        "none" if done is None else done, total))
                last_output = time.time()
    except KeyboardInterrupt:
        _say("      interrupted: stopping the classification run")
        try:
            project.stopProtocol(prot)
        except Exception:
            pass
        raise
    time.sleep(0.2)
    follower.poll()
    refresh(project, prot)
    try:
        check_finished(prot)
    except ProtocolFailed as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise CryoClassError("3D classification failed (run %s); engine log %s, protocol "
                             "logs %s" % (prot.getRunName(), engine_log,
                                          os.path.join(run_dir, "logs"))) from None
    return prot


# ---------------------------------------------------------------------------- truth
def class_table(classes, volumes, truth_star, selected=()):
    """Compare the output classes with the simulator's truth.

    ``classes``: ``{class number: [stack index (1-based) of each particle]}``;
    ``volumes``: ``{class number: (distribution 0-1, estimated resolution A)}`` for every
    class the run has (empty ones included).  Returns ``(rows, metrics)``: one dict per
    class, largest first, and ``{'ari', 'matched_accuracy', 'n'}``."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from .. import convert
    from ..engine.metrics import adjusted_rand_index

    truth = convert.read_star(truth_star)["particles"]
    index = [convert.relion_to_location(n)[0] for n in truth["rlnImageName"]]
    true_of = dict(zip(index, truth["rlnClassNumber"].astype(int)))
    true_ids = sorted(set(true_of.values()))
    pred, true = [], []
    for k, members in classes.items():
        for i in members:
            if i in true_of:
                pred.append(int(k))
                true.append(true_of[i])
    pred, true = np.asarray(pred), np.asarray(true)
    ks = sorted(set(volumes) | set(classes))
    table = np.zeros((len(ks), len(true_ids)), dtype=int)
    for r, k in enumerate(ks):
        for c, t in enumerate(true_ids):
            table[r, c] = int(np.sum((pred == k) & (true == t)))
    rows = []
    for r, k in enumerate(ks):
        size = int(table[r].sum())
        dist, res = volumes.get(k, (float("nan"), float("nan")))
        best = int(np.argmax(table[r])) if size else None
        rows.append({
            "class": int(k), "particles": size, "distribution": dist,
            "resolution_A": res,
            "true_class": true_ids[best] if best is not None else None,
            "purity": table[r, best] / size if size else float("nan"),
            "recall": (table[r, best] / max(1, int(np.sum(true == true_ids[best])))
                       if size else float("nan")),
            "selected": int(k) in set(selected),
        })
    rows.sort(key=lambda row: (-row["particles"], row["class"]))
    n = len(pred)
    ari = float(adjusted_rand_index(true, pred)) if n else float("nan")
    ri, ci = linear_sum_assignment(-table)
    matched = float(table[ri, ci].sum()) / n if n else float("nan")
    return rows, {"ari": ari, "matched_accuracy": matched, "n": n,
                  "contingency": table.tolist(), "classes": ks, "true_classes": true_ids}


def _fmt(v, fmt, missing="-"):
    if v is None or v != v:
        return missing
    return fmt % v


def format_table(rows):
    head = ("class", "particles", "distrib.", "est. res.", "true class", "purity",
            "of true", "selected")
    lines = ["  %-5s %9s %9s %10s %10s %7s %8s %8s" % head]
    for r in rows:
        res = r["resolution_A"]
        lines.append("  %-5d %9d %9s %10s %10s %7s %8s %8s" % (
            r["class"], r["particles"], _fmt(100 * r["distribution"], "%.1f%%"),
            "-" if res != res or res <= 0 or res >= 999 else "%.1f A" % res,
            _fmt(r["true_class"], "%d"), _fmt(100 * r["purity"], "%.0f%%"),
            _fmt(100 * r["recall"], "%.0f%%"), "yes" if r["selected"] else ""))
    return "\n".join(lines)


def _write_tsv(path, rows):
    cols = ["class", "particles", "distribution", "resolution_A", "true_class", "purity",
            "recall", "selected"]
    with open(path, "w") as fh:
        fh.write("\t".join(cols) + "\n")
        for r in rows:
            fh.write("\t".join("" if r[c] is None else str(r[c]) for c in cols) + "\n")


def _verdict(metrics, oracle, n_classes):
    """One honest line: matched accuracy against the oracle and chance."""
    acc, ari = metrics["matched_accuracy"], metrics["ari"]
    chance = 1.0 / n_classes
    if acc != acc:
        return "no particles were classified"
    if oracle > chance and acc >= 0.9 * oracle:
        word = "the classes were recovered"
    elif acc >= chance + 0.25 * (oracle - chance):
        word = "the classes were partly recovered"
    else:
        word = "the classes were NOT recovered"
    return ("%s: %.1f%% of the particles are in their true class under the best "
            "class-to-truth matching (ARI %.3f); the oracle gets %.1f%%, chance %.1f%%"
            % (word, 100 * acc, ari, 100 * oracle, 100 * chance))


# ---------------------------------------------------------------------------- main
def main(args):
    out = _check_args(args)
    cwd = os.getcwd()
    try:
        return _demo(args, out)
    finally:
        os.chdir(cwd)


def _demo(args, out):
    steps = _Steps(6)
    data_dir = os.path.join(out, "data")
    scipion_root = os.path.join(out, "scipion")
    report_dir = os.path.join(out, "report")
    _say("cryoclass demo: %d particles, %d px at %g A/px, SNR %g, %d classes; %d "
         "iterations with %d MPI x %d threads; output in %s"
         % (args.particles, args.box, args.apix, args.snr, args.classes, args.iter,
            args.mpi, args.threads, out))

    # 1. data --------------------------------------------------------------------------
    steps.start("simulate", "Simulating the data set (ground truth kept aside) in %s"
                % data_dir)
    from ..engine.simulate import simulate_dataset
    sim = simulate_dataset(data_dir, n=args.particles, box=args.box, apix=args.apix,
                           snr=args.snr, n_classes=args.classes, seed=args.seed,
                           log=lambda m: _say("      " + m))

    # 2. Scipion project and imports ------------------------------------------------------
    steps.start("import", "Creating the Scipion project and importing particles and "
                          "reference")
    from ..scipion_env import setup_headless_scipion
    env = setup_headless_scipion(scipion_root)
    if os.path.abspath(env.root) != scipion_root:
        _say("      note: this process already had a headless Scipion at %s; using it"
             % env.root)
    import logging
    logging.getLogger("pyworkflow").setLevel(logging.WARNING)
    import cryoclass_plugin
    from ..scipion_env import create_project
    problems = cryoclass_plugin.Plugin.validateInstallation()
    if problems:
        raise CryoClassError(" ".join(problems))
    from pwem.protocols import ProtImportVolumes
    from ..protocols import (ProtCryoClassClassify3D, ProtCryoClassImportParticles,
                             ProtCryoClassSelectClasses)
    project = create_project(PROJECT_NAME)
    _say("      project: %s" % project.path)
    imp = _run_protocol(project, _new(
        project, ProtCryoClassImportParticles, "import particles",
        starFile=sim["particles_star"]), "import particles")
    parts = imp.outputParticles
    _say("      imported %d particles (%d px, %g A/px, CTF: %s)"
         % (parts.getSize(), parts.getXDim(), parts.getSamplingRate(),
            "yes" if parts.hasCTF() else "no"))
    ref = _run_protocol(project, _new(
        project, ProtImportVolumes, "import reference", filesPath=sim["ref"],
        samplingRate=args.apix), "import reference")
    _say("      imported the reference %s" % sim["ref"])

    # 3. classification -------------------------------------------------------------------
    settings = demo_settings(args)
    steps.start("classify", "3D classification: K=%d, T=%g, %d iterations, initial "
                "low-pass %g A, 7.5 deg sampling, offsets %g/%g px, mask %g A, %d MPI x "
                "%d threads" % (args.classes, settings["regularisationParamT"], args.iter,
                                settings["initialLowPassFilterA"],
                                settings["offsetSearchRangePix"],
                                settings["offsetSearchStepPix"], settings["maskDiameterA"],
                                args.mpi, args.threads))
    cls3d = _new(project, ProtCryoClassClassify3D, "3D classification", **settings)
    cls3d.inputParticles.set(imp)
    cls3d.inputParticles.setExtended("outputParticles")
    cls3d.referenceVolume.set(ref)
    cls3d.referenceVolume.setExtended("outputVolume")
    _run_classification(project, cls3d)
    classes = cls3d.outputClasses
    _say("      %d classes with particles, %d maps" % (classes.getSize(),
                                                       cls3d.outputVolumes.getSize()))

    # 4. selection ------------------------------------------------------------------------
    from ..constants import SELECT_AUTO
    from ..protocols.protocol_select_classes import RANK_RESOLUTION
    steps.start("select", "Automatic class selection: best estimated resolution, keep %s, "
                          "classes with >= 5%% of the particles"
                % (args.keep or "all"))
    sel = _new(project, ProtCryoClassSelectClasses, "select classes",
               selectionMode=SELECT_AUTO, rankBy=RANK_RESOLUTION,
               numberToKeep=args.keep, minDistribution=5.0)
    sel.inputClasses.set(cls3d)
    sel.inputClasses.setExtended("outputClasses")
    sel = _run_protocol(project, sel, "class selection")
    selected = [int(t) for t in (sel.selectedClasses.get() or "").split()]
    _say("      kept class(es) %s: %d particles" % (
        ", ".join(map(str, selected)), sel.outputParticles.getSize()))

    # 5. report ---------------------------------------------------------------------------
    steps.start("report", "Writing the report (cryoclass report) to %s" % report_dir)
    from ..constants import OUTPUT_ROOT
    from .report import write_report
    run_root = os.path.join(project.path, cls3d._getExtraPath(OUTPUT_ROOT))
    rep = write_report(run_root, report_dir)
    for note in rep["notes"]:
        _say("      note: %s" % note)
    _say("      %d figures for iteration %d" % (len(rep["figures"]), rep["iteration"]))

    # 6. comparison with the truth -----------------------------------------------------
    steps.start("compare", "Comparing the classes with the simulator's ground truth")
    members = {int(c.getObjId()): [int(p.getIndex()) for p in c.iterItems()]
               for c in classes.iterItems()}
    vols = {}
    for v in cls3d.outputVolumes.iterItems():
        dist = getattr(v, "_rlnClassDistribution", None)
        res = getattr(v, "_rlnEstimatedResolution", None)
        vols[int(v.getObjId())] = (float(dist.get()) if dist is not None else float("nan"),
                                   float(res.get()) if res is not None else float("nan"))
    rows, metrics = class_table(members, vols, sim["truth_star"], selected)
    tsv = os.path.join(out, "classes.tsv")
    _write_tsv(tsv, rows)
    steps.finish()

    oracle = sim["oracle_accuracy"]
    run_dir = os.path.join(project.path, cls3d.getWorkingDir())
    summary = {
        "settings": {k: v for k, v in vars(args).items()},
        "classification": {k: v for k, v in settings.items()},
        "engine_command": cls3d._getEngineArgs(),
        "oracle_accuracy": oracle, "oracle_accuracy_25A": sim["oracle_accuracy_25A"],
        "true_class_sizes": sim["class_sizes"],
        "ari": metrics["ari"], "matched_accuracy": metrics["matched_accuracy"],
        "classified_particles": metrics["n"], "contingency": metrics["contingency"],
        "classes": rows, "selected_classes": selected,
        "seconds": steps.times,
        "paths": {"data": data_dir, "project": project.path, "classification_run": run_dir,
                  "engine_outputs": os.path.dirname(run_root),
                  "selection_run": os.path.join(project.path, sel.getWorkingDir()),
                  "report": rep["index"], "classes_tsv": tsv},
    }
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)

    _say("\n" + "=" * 78)
    _say("Where everything is")
    for label, path in (
            ("simulated data", data_dir + "  (particles.star, ref.mrc, truth.star)"),
            ("Scipion project", project.path),
            ("classification run", run_dir),
            ("engine outputs", os.path.dirname(run_root) + "  (%s_itNNN_*)" % OUTPUT_ROOT),
            ("selection run", os.path.join(project.path, sel.getWorkingDir())),
            ("report", rep["index"]),
            ("class table", tsv),
            ("all numbers", os.path.join(out, "summary.json"))):
        _say("  %-19s %s" % (label, path))
    _say("  open the project in Scipion's GUI (needs a display and Tk): source %s && "
         "%s -O -m pyworkflow.apps.pw_project %s"
         % (env.env_sh, sys.executable, PROJECT_NAME))
    _say("\nClasses at iteration %d (largest first; 'true class' = the simulated class "
         "most of its particles come from, 'purity' = their share of the class, 'of "
         "true' = the share of that true class it holds)" % rep["iteration"])
    _say(format_table(rows))
    _say("\nAgainst the truth (%d particles): ARI %.3f, best-matching accuracy %.1f%%; "
         "oracle accuracy %.1f%% (%.1f%% below 25 A)"
         % (metrics["n"], metrics["ari"], 100 * metrics["matched_accuracy"], 100 * oracle,
            100 * sim["oracle_accuracy_25A"]))
    _say("Verdict: " + _verdict(metrics, oracle, args.classes))
    _say("Wall time %s (%s)" % (_fmt_time(steps.times["total"]), ", ".join(
        "%s %s" % (k, _fmt_time(v)) for k, v in steps.times.items() if k != "total")))
    return 0


if __name__ == "__main__":
    from ..cli import main as _cli
    sys.exit(_cli(["demo"] + sys.argv[1:]))
