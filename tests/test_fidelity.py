"""RELION fidelity of the run's inputs and flags: several references (``--ref`` as a STAR
list of one map per class), ``--ref_angpix``, the RELION 5 defaults and schedules, and the
Class3D flags cryoclass accepts or refuses."""
import cryoclass_plugin  # noqa: F401  (first: it chooses numpy's BLAS kernels)
import os

import numpy as np
import pytest

from cryoclass_plugin import cli
from cryoclass_plugin.engine.mrc_io import read_map, write_map
from cryoclass_plugin.engine.simulate import simulate_dataset
from cryoclass_plugin.engine.star_io import write_star

BOX, APIX = 40, 5.5

COMMON = ["--tau2_fudge", "4", "--ini_high", "30", "--particle_diameter", "200",
          "--zero_mask", "--flatten_solvent", "--ctf", "--healpix_order", "1",
          "--offset_range", "3", "--offset_step", "2", "--skip_gridding", "--j", "1",
          "--random_seed", "3", "--preread_images"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    simulate_dataset(str(out), n=160, box=BOX, apix=APIX, snr=0.5, n_classes=2, seed=5,
                     max_shift_px=1.0, hinge_deg=35.0)
    return out


def _ref_list(path, maps):
    import pandas as pd
    write_star(str(path), {"model_classes": pd.DataFrame(
        {"rlnReferenceImage": [str(m) for m in maps]})})
    return str(path)


def _run(argv):
    return cli.main(["refine"] + [str(a) for a in argv])


def _correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_each_class_stays_on_its_own_reference(data, tmp_path, order):
    """K=2 from a list of the two true maps (in either order): class k's final map
    correlates best with the true map it started from."""
    truths = [data / f"true_class{k:03d}.mrc" for k in order]
    refs = _ref_list(tmp_path / "refs.star", truths)
    root = tmp_path / "run"
    assert _run(["--i", data / "particles.star", "--ref", refs, "--o", root, "--K", "2",
                 "--iter", "3"] + COMMON) == 0
    true_maps = [read_map(t)[0] for t in truths]
    for k in range(2):
        final, _ = read_map(f"{root}_it003_class{k + 1:03d}.mrc")
        cc = [_correlation(final, t) for t in true_maps]
        assert cc[k] > cc[1 - k], (k, cc)


def _refused(capsys, argv, message):
    """The run stops with exit status 2 and one line that contains ``message``."""
    capsys.readouterr()
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_reference_list_errors(data, tmp_path, capsys):
    true1 = data / "true_class001.mrc"
    base = ["--i", data / "particles.star", "--o", tmp_path / "run", "--iter", "2"] + COMMON
    _refused(capsys, base + ["--K", "2", "--ref", _ref_list(tmp_path / "one.star", [true1])],
             "lists 1 maps but --K is 2")
    _refused(capsys, base + ["--K", "2", "--ref", _ref_list(
        tmp_path / "gone.star", [true1, tmp_path / "missing.mrc"])], "missing.mrc not found")
    vol, _ = read_map(true1)
    write_map(str(tmp_path / "coarse.mrc"), vol, 2 * APIX)
    _refused(capsys, base + ["--K", "2", "--ref", _ref_list(
        tmp_path / "apix.star", [true1, tmp_path / "coarse.mrc"])],
        "pixel size 11 A does not match the particles' 5.5 A; give --ref_angpix 11")
    write_map(str(tmp_path / "small.mrc"), vol[4:-4, 4:-4, 4:-4], APIX)
    _refused(capsys, base + ["--K", "2", "--ref", _ref_list(
        tmp_path / "box.star", [true1, tmp_path / "small.mrc"])], "box 32 does not match")
    _refused(capsys, base + ["--K", "2", "--init_classes", "pca", "--iter", "9", "--ref", _ref_list(
        tmp_path / "two.star", [true1, true1])], "with --init_classes pca")


# --------------------------------------------------------------------------- RELION 5 defaults
def _settings(*flags):
    import argparse
    from cryoclass_plugin.commands import refine
    parser = argparse.ArgumentParser()
    refine.add_args(parser)
    return refine.settings_from_args(parser.parse_args(
        ["--i", "p.star", "--o", "out/run", "--ref", "r.mrc"] + [str(f) for f in flags]))


def test_relion5_defaults_no_maxsig_cap_and_no_gridding():
    s = _settings()
    assert s.max_significant is None and s.gridding is False
    assert _settings("--maxsig", "-1").max_significant is None
    assert _settings("--maxsig", "500").max_significant == 500
    assert _settings("--skip_gridding").gridding is False
    assert _settings("--dont_skip_gridding").gridding is True


def test_fast_subsets_schedule_is_relion5s():
    from cryoclass_plugin.engine.iteration import fast_subset_size
    K, N = 3, 100000
    sizes = [fast_subset_size(it, N, K) for it in range(1, 21)]
    assert sizes[:5] == [4500] * 5 and sizes[5:10] == [13500] * 5
    assert sizes[10:15] == [30000] * 5 and sizes[15:] == [N] * 5
    assert fast_subset_size(12, 20000, 2) == 9000        # 4,500 K > 0.3 N
    assert fast_subset_size(1, 2000, 4) == 2000          # never more than all


def test_fast_subsets_needs_20_iterations():
    from cryoclass_plugin.engine.errors import CryoClassError
    with pytest.raises(CryoClassError, match="--fast_subsets with --iter 19: .* at least 20"):
        _settings("--fast_subsets", "--iter", "19")
    assert _settings("--fast_subsets", "--iter", "20").fast_subsets


# --------------------------------------------------------------------------- Class3D flags
ONE_CLASS = ["--K", "1", "--iter", "1"]


def test_verb_0_prints_nothing_but_writes_the_log(data, tmp_path, capsys):
    for verb in ("0", "1"):
        root = tmp_path / f"v{verb}" / "run"
        capsys.readouterr()
        assert _run(["--i", data / "particles.star", "--ref", data / "ref.mrc", "--o", root,
                     "--verb", verb] + ONE_CLASS + COMMON) == 0
        out = capsys.readouterr().out
        log = open(f"{root}.log").read()
        assert "done: 1 iterations" in log
        assert (out == "") if verb == "0" else ("done: 1 iterations" in out)


def test_scratch_copies_removed_unless_keep_scratch(data, tmp_path):
    for keep in (False, True):
        scratch = tmp_path / f"scratch_{keep}"
        argv = ["--i", data / "particles.star", "--ref", data / "ref.mrc",
                "--o", tmp_path / f"k{keep}" / "run", "--scratch_dir", scratch] + \
            ONE_CLASS + [a for a in COMMON if a != "--preread_images"]
        assert _run(argv + ["--keep_scratch"] * keep) == 0
        left = [f for f in os.listdir(scratch) if f.endswith(".mrcs")]
        assert len(left) == (1 if keep else 0), left


def test_ref_angpix_overrides_the_header_and_resamples(data, tmp_path):
    """--ref_angpix: a map whose header has a wrong pixel size is read at the given one;
    a coarser map (twice the pixel size, half the box) is resampled to the particles'
    grid and matches the original map at the resolution the coarse map carries."""
    from cryoclass_plugin.engine.fourier import low_pass
    from cryoclass_plugin.engine.options import Settings
    from cryoclass_plugin.engine.references import check_references, read_references
    from cryoclass_plugin.convert import resample_volume
    truth, _ = read_map(data / "true_class001.mrc")
    write_map(str(tmp_path / "wrong.mrc"), truth, 1.0)
    s = Settings(ref=str(tmp_path / "wrong.mrc"), n_classes=2, ref_angpix=APIX)
    check_references(s, BOX, APIX)
    maps = read_references(s, BOX, APIX)
    assert maps.shape == (2, BOX, BOX, BOX) and np.allclose(maps[0], truth, atol=1e-5)
    coarse = resample_volume(truth, APIX, 2 * APIX, BOX // 2)
    write_map(str(tmp_path / "coarse.mrc"), coarse, 2 * APIX)
    s = Settings(ref=str(tmp_path / "coarse.mrc"), n_classes=1, ref_angpix=2 * APIX)
    check_references(s, BOX, APIX)
    back = read_references(s, BOX, APIX)[0]
    assert back.shape == (BOX,) * 3
    assert _correlation(back, low_pass(truth, APIX, 4.4 * APIX)) > 0.95
    with pytest.raises(Exception, match="give --ref_angpix 11"):
        check_references(Settings(ref=str(tmp_path / "coarse.mrc"), n_classes=1), BOX, APIX)


def test_strict_lowres_exp_zeroes_the_references_low_shells():
    from cryoclass_plugin.engine.fourier import fft_centered, radial_index
    from cryoclass_plugin.engine.iteration import _without_low_shells
    refs = np.random.default_rng(0).normal(size=(2, 16, 16, 16)).astype(np.float32)
    out = _without_low_shells(refs, 16, 10.0, 40.0)          # shells < 4 go
    r = np.rint(radial_index((16, 16, 16)))
    for k in range(2):
        f_in, f_out = fft_centered(refs[k]), fft_centered(out[k])
        assert np.abs(f_out[r < 4]).max() < 1e-3 * np.abs(f_in).max()
        np.testing.assert_allclose(f_out[r >= 4], f_in[r >= 4], rtol=1e-4, atol=1e-3)


def test_strict_lowres_exp_changes_the_e_step(data, tmp_path):
    roots = []
    for extra in ([], ["--strict_lowres_exp", "60"]):
        root = tmp_path / f"low{len(extra)}" / "run"
        assert _run(["--i", data / "particles.star", "--ref", data / "ref.mrc", "--o", root,
                     "--K", "1", "--iter", "1"] + COMMON + extra) == 0
        roots.append(root)
    import starfile
    a, b = (starfile.read(f"{r}_it001_data.star")["particles"] for r in roots)
    assert not np.allclose(a["rlnAngleRot"], b["rlnAngleRot"])


# ------------------------------------------------------------------ --solvent_mask2

def test_flatten_inside_is_relions_inverted_soft_mask():
    """(1 - m) vol + m avg with avg the m-weighted mean: the region where m is 1 takes one
    level, voxels where m is 0 keep their values, a soft edge blends the two."""
    from cryoclass_plugin.engine.masks import flatten_inside
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(8, 8, 8)).astype(np.float32)
    m = np.zeros_like(vol)
    m[2:5, 2:5, 2:5] = 1.0
    m[5, 2:5, 2:5] = 0.5
    out = flatten_inside(vol, m)
    level = float((m * vol).sum() / m.sum())
    np.testing.assert_allclose(out[2:5, 2:5, 2:5], level, rtol=1e-5)
    np.testing.assert_allclose(out[m == 0], vol[m == 0])
    np.testing.assert_allclose(out[5, 2:5, 2:5], 0.5 * vol[5, 2:5, 2:5] + 0.5 * level,
                               rtol=1e-5)


def _core_mask(path, radius_px):
    c = np.arange(BOX) - BOX // 2
    r = np.sqrt(sum(g * g for g in np.meshgrid(c, c, c, indexing="ij")))
    write_map(str(path), (r <= radius_px).astype(np.float32), APIX)
    return r <= radius_px


def test_solvent_mask2_sets_its_region_to_one_level_each_iteration(data, tmp_path):
    core = _core_mask(tmp_path / "core.mrc", 4)
    for name, extra in (("plain", []), ("mask2", ["--solvent_mask2", tmp_path / "core.mrc"])):
        assert _run(["--i", data / "particles.star", "--ref", data / "ref.mrc",
                     "--o", tmp_path / name / "run", "--K", "1", "--iter", "2"]
                    + COMMON + extra) == 0
    plain, _ = read_map(tmp_path / "plain" / "run_it002_class001.mrc")
    flat, _ = read_map(tmp_path / "mask2" / "run_it002_class001.mrc")
    assert np.ptp(plain[core]) > 0.1 * np.ptp(plain)          # structure there normally
    assert np.ptp(flat[core]) <= 1e-5 * np.ptp(flat)          # one level with the mask
    import starfile
    opt = starfile.read(tmp_path / "mask2" / "run_it002_optimiser.star", always_dict=True)
    assert str(opt["optimiser_general"]["rlnSolventMask2Name"]).endswith("core.mrc")


def test_solvent_mask2_errors(data, tmp_path, capsys):
    _core_mask(tmp_path / "core.mrc", 4)
    base = ["--i", data / "particles.star", "--ref", data / "ref.mrc", "--K", "1",
            "--iter", "1", "--solvent_mask2", tmp_path / "core.mrc"]
    no_flatten = [a for a in COMMON if a != "--flatten_solvent"]
    _refused(capsys, base + ["--o", tmp_path / "a" / "run"] + no_flatten, "add --flatten_solvent")
    write_map(str(tmp_path / "small.mrc"), np.ones((20, 20, 20), np.float32), APIX)
    base[-1] = tmp_path / "small.mrc"
    _refused(capsys, base + ["--o", tmp_path / "b" / "run"] + COMMON, "mask box 20 differs")


# ------------------------------------------------------------------ --free_gpu_memory

def test_free_gpu_memory_pool_cap_and_errors(data, tmp_path, capsys):
    from cryoclass_plugin.engine.backend import pool_limit_bytes
    from cryoclass_plugin.engine.errors import CryoClassError
    assert pool_limit_bytes(16 * 2 ** 30, 1024) == 15 * 2 ** 30
    with pytest.raises(CryoClassError, match="leave less free"):
        pool_limit_bytes(2 ** 30, 2048)
    _refused(capsys, ["--i", data / "particles.star", "--ref", data / "ref.mrc",
                      "--o", tmp_path / "run", "--K", "1", "--iter", "1",
                      "--free_gpu_memory", "500"] + COMMON, "applies to GPU runs only")
