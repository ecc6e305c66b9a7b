"""Simulated sets of states built from independent changes (simulate.state_variants),
the inputs of benchmarks/bench_states.py."""
import json

import numpy as np
import pytest

from cryoclass_plugin.engine import simulate as sim
from cryoclass_plugin.engine.errors import CryoClassError

BOX, APIX = 32, 8.0


def _mass(shape, state, swing=12.0):
    domains, R = sim.phantom_domains(BOX, APIX, seed=0, shape=shape, ligand=True)
    pts, w = sim.class_atoms(domains, R, sim.state_variants(shape, [state], swing)[0])
    return pts, w


@pytest.mark.parametrize("shape", ["ribosome", "complex"])
def test_changes_move_the_mass_they_name(shape):
    base_pts, base_w = _mass(shape, ())
    # The ligand adds 2-5 % of the mass; the subunit removes a named part.
    lig_pts, lig_w = _mass(shape, ("ligand",))
    share = 1.0 - base_w.sum() / lig_w.sum()
    assert 0.02 <= share <= 0.05
    sub_pts, sub_w = _mass(shape, ("subunit",))
    assert sub_w.sum() < base_w.sum()
    # The swing keeps the mass and moves only the hinged domain's points, by at most
    # its distance from the hinge times the angle.
    sw_pts, sw_w = _mass(shape, ("swing",))
    assert sw_w.sum() == pytest.approx(base_w.sum())
    moved = np.linalg.norm(sw_pts - base_pts, axis=1)
    assert 0.02 < np.mean(moved > 1e-6) < 0.3
    # A turn by 12 deg about an axis through the hinge moves a point by at most
    # 2 sin(6 deg) times its distance from the hinge, and the farthest ones nearly so.
    _, R = sim.phantom_domains(BOX, APIX, seed=0, shape=shape)
    hinge = np.asarray(sim.CHANGES[shape]["swing"][1]) * R
    bound = 2 * np.sin(np.deg2rad(6.0)) * np.linalg.norm(base_pts - hinge, axis=1)
    assert np.all(moved <= bound + 1e-6)
    assert moved.max() > 0.5 * bound[moved > 1e-6].max()


def test_default_phantom_is_unchanged_by_the_ligand_stream():
    plain, _ = sim.phantom_domains(BOX, APIX, seed=3)
    with_ligand, _ = sim.phantom_domains(BOX, APIX, seed=3, ligand=True)
    assert set(with_ligand) == set(plain) | {"ligand"}
    for name, (pts, w) in plain.items():
        np.testing.assert_array_equal(pts, with_ligand[name][0])


def test_bad_states_are_refused(tmp_path):
    with pytest.raises(CryoClassError, match="unknown change"):
        sim.state_variants("ribosome", [("wobble",)])
    with pytest.raises(CryoClassError, match="phantom shape"):
        sim.state_variants("ring", [()])
    with pytest.raises(CryoClassError, match="one state per class"):
        sim.simulate_dataset(tmp_path, n=8, box=BOX, apix=APIX, n_classes=3,
                             states=[(), ("ligand",)])


def test_state_set_truth_and_oracle(tmp_path):
    states = [(), ("subunit",), ("swing", "ligand")]
    res = sim.simulate_dataset(tmp_path, n=60, box=BOX, apix=APIX, snr=float("inf"),
                               n_classes=3, seed=1, shape="complex", states=states,
                               class_fractions=[0.5, 0.3, 0.2])
    assert res["class_sizes"] == [30, 18, 12]
    assert res["oracle_accuracy"] == 1.0          # noise-free: every state is distinct
    summary = json.loads((tmp_path / "truth_summary.json").read_text())
    assert summary["shape"] == "complex" and summary["states"][2] == ["ligand", "swing"]


def test_split_from_truth_starts_the_classes_from_the_true_states(tmp_path):
    """benchmarks/split_from_truth.py (``bench_states --starts truth``): the iteration
    after the consensus holds exactly the true states, whatever the k-means found."""
    import os
    import subprocess
    import sys

    import starfile

    sim.simulate_dataset(tmp_path, n=60, box=BOX, apix=APIX, snr=0.5, n_classes=3, seed=2,
                         shape="complex", states=[(), ("subunit",), ("swing",)],
                         class_fractions=[0.5, 0.3, 0.2])
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                          "split_from_truth.py")
    flags = ["--i", "particles.star", "--ref", "ref.mrc", "--o", "run", "--K", "3",
             "--iter", "4", "--init_classes", "pca", "--consensus_iter", "2",
             "--particle_diameter", str(int(0.8 * BOX * APIX)), "--ctf",
             "--healpix_order", "1", "--offset_range", "2", "--offset_step", "2",
             "--merge_threshold", "0", "--j", "1"]
    out = subprocess.run([sys.executable, script, "truth.star", "--"] + flags,
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "replaced by the true states [30, 18, 12]" in out.stdout
    truth = starfile.read(tmp_path / "truth.star")["particles"]["rlnClassNumber"]
    first = starfile.read(tmp_path / "run_it003_data.star")["particles"]["rlnClassNumber"]
    assert first.tolist() == truth.tolist()
    # Without the recommended start there is no split to replace.
    relion_start = [f for f in flags if f not in ("--init_classes", "pca")]
    bad = subprocess.run([sys.executable, script, "truth.star", "--"] + relion_start,
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "--init_classes pca" in bad.stderr
