"""Golden runs: two small fixed-seed classifications whose outputs must not change unless
a change of results is intended (then regenerate, and say why in the commit).

* ``recommended``: the consensus / PCA start with K=4 on three true classes, so that the
  run passes through every phase of the recommended path: consensus (global, then
  local), the PCA split, fixed-pose classification (with the held-out checks of the
  split before its third and fourth iterations), the held-out merge test (which
  merges the extra class), the extra fixed-pose iterations after a merge and full EM
  with local searches against shared-consensus, automatically masked references.
* ``relion``: RELION's start (random class seeds in iteration 1, ``--firstiter_cc``,
  ``--norm --scale``), global searches.

Compared: every written iteration's class assignments, poses and origins (data.star),
class distributions, and the class maps of every third and the last iteration (absolute tolerance 1e-6 of
the map's largest value), plus the orientation grid of each iteration (the schedule).
Each run is made in a child process with one thread and with the same compute kernels on
every x86-64 machine: OpenBLAS's generic ``Nehalem`` kernels (``OPENBLAS_CORETYPE``) and
numpy's SSE code paths (``NPY_DISABLE_CPU_FEATURES`` turns off its AVX/AVX2/AVX-512
dispatch). Kernels chosen from the CPU (AVX2 on one machine, AVX-512 on another) sum in
other orders and move the maps by ~1e-5 after a few iterations, which would make the
1e-6 comparison depend on the machine rather than on the code.

Regenerate with ``python tests/test_golden_run.py --regenerate`` (about a minute).
"""
import cryoclass_plugin  # noqa: F401  (first: it chooses numpy's BLAS kernels, as in pytest)
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine.mrc_io import read_map
from cryoclass_plugin.engine.simulate import simulate_dataset

GOLDEN_DIR = Path(__file__).parent / "golden"

COMMON = ["--tau2_fudge", "4", "--ini_high", "40", "--particle_diameter", "200",
          "--zero_mask", "--flatten_solvent", "--ctf", "--healpix_order", "1",
          "--offset_range", "3", "--offset_step", "2", "--pad", "2", "--skip_gridding",
          "--j", "1", "--random_seed", "3", "--preread_images"]

RUNS = {
    "recommended": ["--K", "4", "--iter", "10", "--init_classes", "pca",
                    "--consensus_iter", "3", "--consensus_local_iter", "1",
                    "--classify_fixed_iter", "4", "--merge_fixed_iter", "1"],
    "relion": ["--K", "3", "--iter", "4", "--firstiter_cc", "--norm", "--scale"],
}

DATA_COLUMNS = ["rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                "rlnOriginXAngst", "rlnOriginYAngst"]


def _simulate(out_dir):
    return simulate_dataset(str(out_dir), n=240, box=40, apix=5.5, snr=0.5, n_classes=3,
                            seed=11, max_shift_px=1.5, norm_spread=0.1, scale_spread=0.1)


def _run_outputs(data_dir, work_dir, name):
    """Run ``name`` and collect its outputs as a dict of arrays."""
    root = Path(work_dir) / name / "run"
    argv = ["refine", "--i", str(Path(data_dir) / "particles.star"),
            "--ref", str(Path(data_dir) / "ref.mrc"), "--o", str(root)] + COMMON + RUNS[name]
    assert cli.main(argv) == 0
    n_iter = int(RUNS[name][RUNS[name].index("--iter") + 1])
    out = {}
    for it in range(1, n_iter + 1):
        data = starfile.read(f"{root}_it{it:03d}_data.star")["particles"]
        data = data.sort_values("rlnImageName")
        for col in DATA_COLUMNS:
            out[f"it{it:03d}/{col}"] = data[col].to_numpy(np.float64)
        model = starfile.read(f"{root}_it{it:03d}_model.star")
        out[f"it{it:03d}/rlnClassDistribution"] = \
            model["model_classes"]["rlnClassDistribution"].to_numpy(np.float64)
        sampling = starfile.read(f"{root}_it{it:03d}_sampling.star", always_dict=True)
        order = sampling["sampling_general"]["rlnHealpixOrder"]
        out[f"it{it:03d}/rlnHealpixOrder"] = np.asarray([int(order)])
        k = 1
        while (it % 3 == 0 or it == n_iter) and os.path.exists(f"{root}_it{it:03d}_class{k:03d}.mrc"):
            vol, _ = read_map(f"{root}_it{it:03d}_class{k:03d}.mrc")
            out[f"it{it:03d}/class{k:03d}"] = vol.astype(np.float32)
            k += 1
    return out


# Kernels that every x86-64 CPU runs, so that the sums happen in one order everywhere.
PINNED_ENV = {
    "OPENBLAS_CORETYPE": "Nehalem",
    "NPY_DISABLE_CPU_FEATURES": "AVX AVX2 FMA3 F16C AVX512F AVX512CD AVX512_KNL AVX512_KNM "
                                "AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR",
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


def _collect(name, npz_path):
    """Simulate the data, run ``name`` and save its outputs (runs in the pinned child)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _simulate(data)
        out = _run_outputs(data, tmp, name)
    np.savez_compressed(npz_path, **out)


def _pinned_outputs(name, npz_path):
    """Run ``name`` in a child process with the pinned kernels; its outputs as a dict."""
    env = dict(os.environ, **PINNED_ENV)
    proc = subprocess.run([sys.executable, __file__, "--collect", name, str(npz_path)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"golden run {name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    with np.load(npz_path) as got:
        return {key: got[key] for key in got.files}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the golden outputs were made with x86-64 kernels")
@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_is_unchanged(tmp_path, name):
    expected = np.load(GOLDEN_DIR / f"{name}.npz")
    got = _pinned_outputs(name, tmp_path / f"{name}.npz")
    assert sorted(got) == sorted(expected.files), "the run wrote other iterations or classes"
    for key in sorted(expected.files):
        want, have = expected[key], got[key]
        assert want.shape == have.shape, key
        if want.ndim == 3:
            tol = 1e-6 * max(float(np.abs(want).max()), 1e-30)
            err = float(np.abs(want - have).max())
            assert err <= tol, f"{key}: maps differ by {err:.3g} (tolerance {tol:.3g})"
        elif key.endswith("rlnClassNumber") or key.endswith("rlnHealpixOrder"):
            assert np.array_equal(want, have), f"{key}: {np.flatnonzero(want != have)[:10]}"
        else:
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-5, err_msg=key)


def _regenerate():
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name in sorted(RUNS):
        out = _pinned_outputs(name, GOLDEN_DIR / f"{name}.npz")
        print(f"wrote {GOLDEN_DIR / (name + '.npz')} ({len(out)} arrays)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--collect"] and len(sys.argv) == 4:
        _collect(sys.argv[2], sys.argv[3])
    elif sys.argv[1:] == ["--regenerate"]:
        _regenerate()
    else:
        sys.exit("usage: python tests/test_golden_run.py --regenerate")
