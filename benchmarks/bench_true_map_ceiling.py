"""How well can the classes be told apart when the maps are perfect?  One E-step with
the simulator's TRUE class maps (rescaled to the run's greyscale), from the state of a
finished run, with different searches.

    .venv/bin/python benchmarks/bench_true_map_ceiling.py SET SET/cryoclass/run_it025_state.npz

The data folder is a ``cryoclass simulate`` set (``true_classNNN.mrc``, ``truth.star``);
the state is a ``run_itNNN_state.npz`` of a ``cryoclass refine`` run on it (its noise
spectra and poses are used).  Prints the ARI against the truth and the median angular
error for: fixed true poses, fixed run poses, a global search on the run's grid, and
local searches on finer grids (HEALPix order, sigma).  The gap between "fixed true
poses" (the simulator's oracle) and the searches is what pose uncertainty costs even
with perfect maps; it chose the local searches of the recommended path.  ``--markdown``
also prints the figures as a table in the format of docs/benchmarks.md.
"""
import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import starfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from cryoclass_plugin.commands import refine as refine_cmd  # noqa: E402
from cryoclass_plugin.engine.geometry import angular_distance_deg, euler_to_matrix  # noqa: E402
from cryoclass_plugin.engine.metrics import adjusted_rand_index  # noqa: E402
from cryoclass_plugin.engine.model import ModelState  # noqa: E402
from cryoclass_plugin.engine.mrc_io import read_map  # noqa: E402
from cryoclass_plugin.engine.refine import Refinement  # noqa: E402

FLAGS = ("--firstiter_cc --tau2_fudge 4 --ini_high 50 --particle_diameter 205 --zero_mask "
         "--flatten_solvent --ctf --healpix_order 2 --offset_range 5 --offset_step 2 --pad 2 "
         "--skip_gridding --preread_images --j 2")


def start_on_set(data, state, prefix):
    """``(model, refinement, truth)`` for diagnostics on a simulated set: the state
    ``run_itNNN_state.npz`` of a run on it, a started :class:`Refinement` with the
    benchmarks' flags over its particles (output in a temporary folder named ``prefix``),
    and ``truth.star``'s particles table.  Changes the working folder to ``data``."""
    model = ModelState.load(os.path.abspath(state))
    os.chdir(data)
    parser = argparse.ArgumentParser()
    refine_cmd.add_args(parser)
    args = parser.parse_args(["--i", "particles.star", "--ref", "ref.mrc", "--o",
                              os.path.join(tempfile.mkdtemp(prefix=prefix), "run"),
                              "--K", str(model.n_classes)] + FLAGS.split())
    r = Refinement(refine_cmd.settings_from_args(args), log=lambda m: None)
    r.start()
    return model, r, starfile.read("truth.star")["particles"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("state")
    p.add_argument("--local", default="2:5,3:3,3:5,4:3",
                   help="order:sigma pairs of the local searches (default %(default)s)")
    p.add_argument("--no-global", action="store_true", help="skip the global search")
    p.add_argument("--markdown", action="store_true",
                   help="also print the figures as a table in the format of docs/benchmarks.md")
    a = p.parse_args(argv)
    data = os.path.abspath(a.data)
    model, r, truth = start_on_set(data, a.state, "true_map_ceiling_")
    labels = truth["rlnClassNumber"].to_numpy() - 1
    true_e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    true_o = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    true_m = euler_to_matrix(*true_e.T)
    maps = np.stack([read_map(f"true_class{k + 1:03d}.mrc")[0].astype(np.float32)
                     for k in range(model.n_classes)])
    mean = maps.mean(axis=0)
    scale = float((model.refs.mean(axis=0) * mean).sum() / (mean ** 2).sum())
    run_ari = adjusted_rand_index(labels, model.part_class)
    model.refs = (maps * scale).astype(np.float32)
    model.pdf_class = np.full(model.n_classes, 1.0 / model.n_classes)

    def step(state, search="global", order=None, sigma=0.0):
        """One E-step + M-step of ``state`` (not written) with the given search:
        "none" (poses kept), "global" on the run's grid, or "local" at ``order`` /
        ``sigma``; plain references, free assignments."""
        plan = dataclasses.replace(
            r.plan(state, state.iteration + 1), search=search,
            healpix_order=int(order if order is not None else r.s.healpix_order),
            sigma_ang=float(sigma), assignments="free", split="", merge_test=False,
            extension_check=False, use_cc=False, references="plain", auto_mask_sigma=0.0,
            class_highres_angst=0.0, write=False)
        return r.iterate(state, plan)

    def err(m):
        return float(np.median(angular_distance_deg(euler_to_matrix(*m.part_eulers.T), true_m)))

    print(f"run: ARI {run_ari:.3f}, median angular error {err(model):.2f} deg "
          f"(state of iteration {model.iteration}); true maps x {scale:.3g}")
    rows = [["the run's own maps and poses", f"{run_ari:.3f}", f"{err(model):.2f}"]]
    m = copy.deepcopy(model)
    m.part_eulers, m.part_origin_angst = true_e.copy(), true_o.copy()
    m = step(m, "none")
    print(f"fixed true poses:             ARI {adjusted_rand_index(labels, m.part_class):.3f}")
    rows.append(["true maps, fixed true poses", f"{adjusted_rand_index(labels, m.part_class):.3f}",
                 "0"])
    m = step(copy.deepcopy(model), "none")
    print(f"fixed run poses:              ARI {adjusted_rand_index(labels, m.part_class):.3f}")
    rows.append(["true maps, fixed run poses", f"{adjusted_rand_index(labels, m.part_class):.3f}",
                 f"{err(model):.2f}"])
    if not a.no_global:
        t = time.time()
        m = step(copy.deepcopy(model), "global")
        print(f"global search, order {r.s.healpix_order}:      ARI "
              f"{adjusted_rand_index(labels, m.part_class):.3f}, error {err(m):.2f} deg "
              f"({time.time() - t:.0f} s)")
        rows.append([f"true maps, global search, order {r.s.healpix_order}",
                     f"{adjusted_rand_index(labels, m.part_class):.3f}", f"{err(m):.2f}"])
    for pair in a.local.split(","):
        order, sigma = int(pair.split(":")[0]), float(pair.split(":")[1])
        t = time.time()
        m = step(copy.deepcopy(model), "local", order, sigma)
        print(f"local search, order {order}, sigma {sigma:g}: ARI "
              f"{adjusted_rand_index(labels, m.part_class):.3f}, error {err(m):.2f} deg "
              f"({time.time() - t:.0f} s)")
        rows.append([f"true maps, local search, order {order}, sigma {sigma:g} deg",
                     f"{adjusted_rand_index(labels, m.part_class):.3f}", f"{err(m):.2f}"])
    if a.markdown:
        C.print_markdown(["search", "ARI", "median angular error (deg)"], rows, notes=[
            f"Set: {os.path.basename(data)}; state of iteration {model.iteration} "
            f"({model.n_classes} classes)."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
