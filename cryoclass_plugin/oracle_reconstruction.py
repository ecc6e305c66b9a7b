"""The reachable resolution of a simulated set: each true class reconstructed from its
own particles at their TRUE poses with a run's flags.

The simulator reports the oracle accuracy (the reachable ARI); this gives the same for
the class maps: ``cryoclass refine --K 1 --skip_align`` on each true class's rows of
``truth.star``, and the FSC 0.5 resolution (A) of the result against
``true_classKKK.mrc``.  A classification run's class maps are judged against it
(``benchmarks/bench_accuracy.py``, ``tests/test_accuracy_recommended.py``).
"""
import contextlib
import os

import starfile

from .engine.metrics import fsc, fsc_resolution
from .engine.mrc_io import read_map


def map_resolution(map_path, true_map_path):
    """FSC 0.5 resolution (A) of a map against a true map (same box)."""
    vol, apix = read_map(str(map_path))
    true_map, _ = read_map(str(true_map_path))
    return fsc_resolution(fsc(true_map, vol), true_map.shape[0], apix)


def oracle_resolutions(sim_dir, refine_flags, n_iter, work_dir):
    """Per true class (in class order): the FSC 0.5 resolution (A) of its oracle
    reconstruction.  ``refine_flags``: the run's ``cryoclass refine`` flags without
    ``--i --ref --o --iter --K`` (``--skip_align`` and ``--K 1`` are added).  Runs go to
    ``work_dir/classKKK`` (engine output in its ``stdout.txt``); finished ones are
    reused."""
    from .cli import main as cli_main
    sim_dir, work_dir = os.path.abspath(str(sim_dir)), os.path.abspath(str(work_dir))
    truth = starfile.read(os.path.join(sim_dir, "truth.star"), always_dict=True)
    parts = truth["particles"]
    res = []
    for k in sorted(int(c) for c in parts["rlnClassNumber"].unique()):
        work = os.path.join(work_dir, f"class{k:03d}")
        final = os.path.join(work, f"run_it{n_iter:03d}_class001.mrc")
        if not os.path.exists(final):
            os.makedirs(work, exist_ok=True)
            blocks = dict(truth)
            blocks["particles"] = parts[parts["rlnClassNumber"] == k].reset_index(drop=True)
            starfile.write(blocks, os.path.join(work, "particles.star"), overwrite=True)
            link = os.path.join(work, "particles.mrcs")
            if not os.path.lexists(link):
                os.symlink(os.path.join(sim_dir, "particles.mrcs"), link)
            argv = ["refine", "--i", os.path.join(work, "particles.star"),
                    "--ref", os.path.join(sim_dir, "ref.mrc"), "--o", os.path.join(work, "run"),
                    "--iter", str(n_iter)] + [str(f) for f in refine_flags] + \
                ["--skip_align", "--K", "1"]
            with open(os.path.join(work, "stdout.txt"), "w") as log, \
                    contextlib.redirect_stdout(log):
                rc = cli_main(argv)
            if rc != 0:
                raise RuntimeError(f"oracle reconstruction of class {k} failed (rc {rc}); "
                                   f"see {os.path.join(work, 'stdout.txt')}")
        res.append(map_resolution(final, os.path.join(sim_dir, f"true_class{k:03d}.mrc")))
    return res
