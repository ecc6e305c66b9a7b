"""Bad input values through ``cryoclass refine``: one line naming the file and the fix,
exit 2, no traceback, and nothing written that looks like a result."""
import os

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine.simulate import simulate_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = tmp_path_factory.mktemp("bad")
    simulate_dataset(str(data), n=24, box=24, apix=8.0, snr=1.0, n_classes=1, seed=0)
    return data


def _copy(tiny, tmp_path):
    import shutil
    dst = tmp_path / "data"
    shutil.copytree(tiny, dst)
    return dst


def _refine(data, tmp_path, *extra, star="particles.star", ref="ref.mrc"):
    return cli.main(["refine", "--i", str(data / star), "--ref", str(data / ref),
                     "--o", str(tmp_path / "out" / "run"), "--iter", "1", "--healpix_order", "0",
                     "--offset_range", "0", "--j", "1"] + list(extra))


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_pixel_is_refused_naming_the_particle(tiny, tmp_path, capsys, value):
    data = _copy(tiny, tmp_path)
    with mrcfile.open(data / "particles.mrcs", "r+") as m:
        m.data[6, 3, 4] = value
    assert _refine(data, tmp_path) == 2
    _one_error_line(capsys, "particle 7 of the STAR file", "non-finite")
    assert not os.path.exists(tmp_path / "out" / "run_it001_class001.mrc")


def test_an_all_zero_image_is_refused(tiny, tmp_path, capsys):
    data = _copy(tiny, tmp_path)
    with mrcfile.open(data / "particles.mrcs", "r+") as m:
        m.data[2] = 0.0
    assert _refine(data, tmp_path) == 2
    _one_error_line(capsys, "particle 3 of the STAR file", "constant")


def test_drop_bad_particles_leaves_them_out_and_lists_them(tiny, tmp_path, capsys):
    """With --drop_bad_particles a NaN image and a constant one are left out (the run
    goes on with the others), listed in <o>_dropped_particles.star and in the log."""
    data = _copy(tiny, tmp_path)
    with mrcfile.open(data / "particles.mrcs", "r+") as m:
        m.data[6, 3, 4] = np.nan
        m.data[2] = 0.0
    assert _refine(data, tmp_path, "--drop_bad_particles") == 0
    root = tmp_path / "out" / "run"
    dropped = starfile.read(f"{root}_dropped_particles.star")
    names = list(dropped["rlnImageName"])
    assert [n.split("@")[0].lstrip("0") for n in names] == ["3", "7"]
    kept = starfile.read(f"{root}_it001_data.star")["particles"]
    assert len(kept) == 22 and not set(names) & set(kept["rlnImageName"])
    assert "2 of 24 particles left out" in open(f"{root}.log").read()
    # --overwrite removes the list with the rest of the old run
    assert _refine(data, tmp_path, "--overwrite") == 2     # the NaN stops a run without it
    assert not os.path.exists(f"{root}_dropped_particles.star")


def test_a_non_finite_reference_voxel_is_refused(tiny, tmp_path, capsys):
    data = _copy(tiny, tmp_path)
    with mrcfile.open(data / "ref.mrc", "r+") as m:
        m.data[5, 6, 7] = np.nan
    assert _refine(data, tmp_path) == 2
    _one_error_line(capsys, "ref.mrc", "non-finite voxel", "x=7 y=6 z=5")


def test_a_mask_outside_0_1_is_refused(tiny, tmp_path, capsys):
    data = _copy(tiny, tmp_path)
    with mrcfile.new(data / "mask.mrc") as m:
        m.set_data(np.full((24, 24, 24), 2.0, np.float32))
        m.voxel_size = 8.0
    assert _refine(data, tmp_path, "--flatten_solvent", "--solvent_mask",
                   str(data / "mask.mrc")) == 2
    _one_error_line(capsys, "mask.mrc", "not 0..1")


def test_more_classes_than_particles_is_refused(tiny, tmp_path, capsys):
    assert _refine(tiny, tmp_path, "--K", "30") == 2
    _one_error_line(capsys, "--K 30", "only 24 particle")


def test_duplicated_rows_are_warned_about(tiny, tmp_path, capsys):
    data = _copy(tiny, tmp_path)
    blocks = starfile.read(data / "particles.star", always_dict=True)
    parts = blocks["particles"]
    blocks["particles"] = pd.concat([parts, parts.iloc[:3]], ignore_index=True)
    starfile.write(blocks, data / "dups.star", overwrite=True)
    assert _refine(data, tmp_path, star="dups.star") == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "3 duplicated particle row(s)" in out


def test_a_map_that_turns_non_finite_stops_the_run_unwritten(tiny, tmp_path, capsys, monkeypatch):
    """A numerical failure in the M-step (simulated) never reaches the written maps."""
    from cryoclass_plugin.engine import iteration
    original = iteration.maximise

    def failing(acc, model, *args, **kwargs):
        original(acc, model, *args, **kwargs)
        model.refs[0][0, 0, 0] = np.nan

    monkeypatch.setattr(iteration, "maximise", failing)
    assert _refine(tiny, tmp_path) == 2
    _one_error_line(capsys, "iteration 1", "non-finite", "previous iteration")
    assert not os.path.exists(tmp_path / "out" / "run_it001_class001.mrc")
    assert os.path.exists(tmp_path / "out" / "run_it000_optimiser.star")


def test_a_job_that_cannot_fit_in_memory_stops_before_iteration_1(tiny, tmp_path, capsys,
                                                                monkeypatch):
    from cryoclass_plugin.engine import memory
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 50 * 2 ** 20)
    assert _refine(tiny, tmp_path) == 2
    line = _one_error_line(capsys, "GiB of memory per node", "0.0 GiB is free", "to fit it use")
    assert "--block_size" in line or "--pad 1" in line
    assert not os.path.exists(tmp_path / "out" / "run_it001_data.star")


def test_running_out_of_memory_is_one_line_naming_the_options(tiny, tmp_path, capsys,
                                                               monkeypatch):
    from cryoclass_plugin.engine import refine

    def no_memory(self):
        raise MemoryError()
    monkeypatch.setattr(refine.Refinement, "run", no_memory)
    assert _refine(tiny, tmp_path) == 2
    _one_error_line(capsys, "out of memory", "--block_size", "--pad 1",
                    "--strict_highres_exp")
    assert not os.path.exists(tmp_path / "out" / "run.lock")


def test_continue_reads_the_class_maps_the_state_names_and_refuses_a_changed_one(
        tiny, tmp_path, capsys):
    """The state file names the iteration's class maps with their checksums (it does not
    hold them a second time); --continue reads them back, and a map changed since then
    is refused in one line naming it."""
    assert _refine(tiny, tmp_path, "--iter", "1") == 0
    root = tmp_path / "out" / "run"
    with np.load(f"{root}_it001_state.npz") as z:
        assert "refs" not in z.files and "__ref_maps__" in z.files
    from cryoclass_plugin.engine.model import ModelState
    state = ModelState.load(f"{root}_it001_state.npz")
    np.testing.assert_array_equal(state.refs[0], mrcfile.read(f"{root}_it001_class001.mrc"))
    with mrcfile.open(f"{root}_it001_class001.mrc", mode="r+") as mrc:
        mrc.data[0, 0, 0] += 1.0
    capsys.readouterr()
    argv = ["refine", "--continue", f"{root}_it001_optimiser.star", "--o", str(root),
            "--iter", "2"]
    assert cli.main(argv) == 2
    _one_error_line(capsys, "run_it001_class001.mrc", "changed since", "continue from another")
