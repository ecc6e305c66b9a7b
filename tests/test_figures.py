"""Run reading (runresults), figures, ChimeraX script and the report, on a fake run."""
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_run import make_fake_run  # noqa: E402

from cryoclass_plugin import figures as F  # noqa: E402
from cryoclass_plugin.commands import report as R  # noqa: E402
from cryoclass_plugin.engine.errors import CryoClassError  # noqa: E402
from cryoclass_plugin.runresults import RunResults, as_dict, as_frame  # noqa: E402


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake_run")
    return make_fake_run(str(out))


@pytest.fixture(scope="module")
def run(fake):
    return RunResults(fake["root"])


def png_stats(path):
    """(std of grey levels, fraction of pixels that are not white) of an image."""
    from matplotlib.image import imread

    img = imread(path)
    grey = img[..., :3].mean(axis=-1) if img.ndim == 3 else img
    return float(grey.std()), float((grey < 0.97).mean())


def assert_not_blank(path):
    assert os.path.exists(path), path
    assert os.path.getsize(path) > 2000, path
    std, ink = png_stats(path)
    assert std > 0.05, f"{path}: almost uniform (std {std:.3f})"
    assert ink > 0.02, f"{path}: almost all white ({ink:.3f} non-white)"


# ---------------------------------------------------------------------------------------
# runresults
# ---------------------------------------------------------------------------------------
def test_iterations_and_tables(run, fake):
    assert run.iterations == [0, 1, 2, 3]
    assert run.last_iteration == 3
    m = run.model(3)
    assert m.n_classes == 3 and m.pixel_size == 4.0 and m.box == 32
    assert m.class_numbers() == [1, 2, 3]
    np.testing.assert_allclose(m.classes["rlnClassDistribution"], fake["dist"][3])
    t = m.class_table(2)
    np.testing.assert_allclose(t["rlnSsnrMap"], fake["ssnr"][(3, 2)], rtol=1e-6)
    assert list(m.groups["rlnGroupNumber"]) == [1, 2]
    assert "rlnSigma2Noise" in m.group_table(1)
    opt = run.optimiser(2)
    assert int(opt["rlnCurrentIteration"]) == 2 and int(opt["rlnNumberOfIterations"]) == 3
    assert int(run.sampling(1)["rlnHealpixOrder"]) == 2
    d = run.data(3)
    assert len(d) == 300
    np.testing.assert_array_equal(d["rlnClassNumber"], fake["class_number"][3])
    assert run.optics(3)["rlnImagePixelSize"].iloc[0] == 4.0
    vol, apix = run.class_map(3, 2)
    assert vol.shape == (32, 32, 32) and vol.dtype == np.float32 and apix == 4.0
    maps, apix = run.class_maps(3)
    assert sorted(maps) == [1, 2, 3]


def test_open_from_folder_file_and_rootname(run, fake):
    folder = os.path.dirname(fake["root"])
    assert RunResults(folder).root == run.root
    assert RunResults(fake["root"] + "_it002_data.star").root == run.root
    assert RunResults(fake["root"] + "_it001_class003.mrc").root == run.root


def test_series(run, fake):
    dist = run.class_distribution_series()
    assert list(dist.index) == [0, 1, 2, 3] and list(dist.columns) == [1, 2, 3]
    for it in range(4):
        np.testing.assert_allclose(dist.loc[it].to_numpy(), fake["dist"][it], atol=1e-6)
    res = run.class_resolution_series()
    np.testing.assert_allclose(res.loc[3].to_numpy(), fake["est_res"][3], atol=1e-5)
    conv = run.convergence_series()
    # RELION's sentinels at iteration 0 (999 / 9999999) are not plotted as values
    assert conv.loc[0, ["rlnChangesOptimalClasses", "rlnChangesOptimalOrientations",
                        "rlnChangesOptimalOffsets"]].isna().all()
    for it in (1, 2, 3):
        np.testing.assert_allclose(
            conv.loc[it, ["rlnChangesOptimalClasses", "rlnChangesOptimalOrientations",
                          "rlnChangesOptimalOffsets"]].to_numpy(float),
            fake["changes"][it], atol=1e-6)
    assert conv.loc[3, "rlnLogLikelihood"] == pytest.approx(fake["loglik"][3])
    summ = run.summary(3)
    assert list(summ["rlnClassDistribution"]) == sorted(summ["rlnClassDistribution"],
                                                       reverse=True)
    assert summ["particles"].sum() == 300


def test_keyvalue_block_as_dict_or_frame():
    # starfile versions differ: key/value blocks come back as dicts or 1-row frames
    assert as_dict({"rlnA": 1}) == {"rlnA": 1}
    assert as_dict(pd.DataFrame([{"rlnA": 1, "rlnB": "x"}])) == {"rlnA": 1, "rlnB": "x"}
    assert as_frame({"rlnA": 1}).shape == (1, 1)


def test_no_iterations_is_one_line_error(tmp_path):
    for target in (tmp_path, tmp_path / "run"):
        with pytest.raises(CryoClassError) as err:
            RunResults(target)
        assert "no iterations" in str(err.value) and "\n" not in str(err.value)


def test_missing_iteration_and_files(tmp_path, run):
    with pytest.raises(CryoClassError, match="no iteration 7; iterations 0-3"):
        run.model(7)
    info = make_fake_run(str(tmp_path), n_iter=2, with_it0_data=False)
    r = RunResults(info["root"])
    os.remove(info["root"] + "_it002_optimiser.star")   # a run still writing iteration 2
    with pytest.raises(CryoClassError) as err:
        r.data(0)
    assert "it000_data.star" in str(err.value) and "\n" not in str(err.value)
    conv = r.convergence_series()
    assert list(conv.index) == [0, 1, 2]
    assert np.isnan(conv.loc[2, "rlnChangesOptimalClasses"])


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
FIGURES = {
    "slices_z": lambda r: R.figure_map_slices(r, 3, 1, "z"),
    "slices_y": lambda r: R.figure_map_slices(r, 3, 2, "y"),
    "central_slices": lambda r: R.figure_central_slices(r, 3),
    "central_projections": lambda r: R.figure_central_slices(r, 3, mode="projection"),
    "ssnr": lambda r: R.figure_ssnr(r, 3),
    "class_distribution": lambda r: R.figure_class_distribution(r),
    "class_resolution": lambda r: R.figure_class_resolution(r),
    "convergence": lambda r: R.figure_convergence(r),
    "angular_mollweide": lambda r: R.figure_angular_distribution(r, 3),
    "angular_rect": lambda r: R.figure_angular_distribution(r, 3, projection="rect"),
    "iteration0_central": lambda r: R.figure_central_slices(r, 0),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_builds_and_is_not_blank(name, run, tmp_path):
    from matplotlib.figure import Figure

    fig = FIGURES[name](run)
    assert isinstance(fig, Figure)
    assert_not_blank(F.save_figure(fig, tmp_path / "sub" / f"{name}.png"))


def test_no_pyplot_state(run):
    """Figures never touch pyplot (no global figure state, safe headless and in Tk)."""
    import subprocess

    code = ("import sys; from cryoclass_plugin.runresults import RunResults; "
            "from cryoclass_plugin.commands import report as R; "
            f"r = RunResults({run.root!r}); R.figure_convergence(r); "
            "R.figure_angular_distribution(r, 3); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr


def test_central_slices_sorted_and_labelled(run):
    fig = R.figure_central_slices(run, 3)
    summ = run.summary(3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [int(re.match(r"Class (\d+)", t).group(1)) for t in titles] == list(summ["class"])
    first = summ.iloc[0]
    assert f"{100 * first['rlnClassDistribution']:.1f}%" in titles[0]
    assert f"{first['rlnEstimatedResolution']:.1f} \u00c5" in titles[0]


def test_ssnr_axes(run):
    fig = R.figure_ssnr(run, 3)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert "1/\u00c5" in ax.get_xlabel()
    top = [a for a in fig.axes if a is not ax and "\u00c5" in a.get_xlabel()]
    assert top, "no top axis in Angstrom"
    assert any(abs(line.get_ydata()[0] - 1.0) < 1e-9 for line in ax.get_lines()
               if len(line.get_ydata()) == 2)


def test_slices_contrast_is_per_map():
    vol = np.zeros((8, 8, 8), np.float32)
    vol[4, 4, 4] = 10.0
    vol[2, 2, 2] = 1.0
    fig = F.map_slices_figure(vol, 2.0)
    lims = {im.get_clim() for ax in fig.axes for im in ax.get_images()}
    assert len(lims) == 1      # one greyscale for all slices of the map


def test_chimerax_script(run, tmp_path, monkeypatch):
    cxc = R.chimerax_script(run, 3, tmp_path / "c.cxc")
    text = open(cxc).read().splitlines()
    opens = [ln for ln in text if ln.startswith("open ")]
    largest = int(run.summary(3)["class"].iloc[0])
    assert len(opens) == 3 and opens[0].endswith(f"_it003_class{largest:03d}.mrc")
    assert "fitmap #2 inMap #1" in text and "fitmap #3 inMap #1" in text
    assert "tile" in text
    assert any(re.match(r"volume #1 .*voxelSize 4 level [0-9.]+", ln) for ln in text)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHIMERAX_HOME", raising=False)
    monkeypatch.delenv("CHIMERA_HOME", raising=False)
    started, msg = F.launch_chimerax(cxc)
    assert not started and os.path.abspath(cxc) in msg and "\n" not in msg


def test_chimerax_launch_uses_path(tmp_path, monkeypatch):
    fake_exe = tmp_path / "chimerax"
    marker = tmp_path / "ran"
    fake_exe.write_text(f"#!/bin/sh\necho \"$@\" > {marker}\n")
    fake_exe.chmod(0o755)
    cxc = F.write_chimerax_script([tmp_path / "a.mrc"], tmp_path / "x.cxc", 1.0,
                                  levels=[0.1])
    monkeypatch.setenv("PATH", str(tmp_path))
    started, msg = F.launch_chimerax(cxc, wait=True)
    assert started and marker.read_text().strip() == os.path.abspath(cxc)


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_writes_index_linking_every_png(run, tmp_path):
    from cryoclass_plugin import cli

    out = tmp_path / "rep"
    assert cli.main(["report", run.root, "-o", str(out)]) == 0
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert {"central_slices.png", "ssnr.png", "class_distribution.png",
            "class_resolution.png", "convergence.png", "angular_distribution.png",
            "slices_class001.png", "slices_class002.png", "slices_class003.png"} \
        <= set(pngs)
    html = (out / "index.html").read_text()
    linked = set(re.findall(r'src="([^"]+\.png)"', html))
    assert linked == set(pngs)
    for p in pngs:
        assert_not_blank(str(out / p))
    assert 'href="classes.cxc"' in html and (out / "classes.cxc").exists()
    assert "iteration 3" in html and "(finished)" in html


@pytest.mark.slow
def test_report_running_output_and_iter(tmp_path):
    info = make_fake_run(str(tmp_path / "r"), n_iter=3)
    # a run still going: iteration 3 has only its model.star and maps so far
    for kind in ("data", "optimiser", "sampling"):
        os.remove(f"{info['root']}_it003_{kind}.star")
    res = R.write_report(os.path.dirname(info["root"]), dpi=50)
    assert res["iteration"] == 3 and os.path.exists(res["index"])
    assert "angular_distribution" not in res["figures"]
    assert any("it003_data.star" in n for n in res["notes"])
    html = open(res["index"]).read()
    assert "Not shown" in html
    res1 = R.write_report(info["root"], str(tmp_path / "it1"), iteration=1, classes=[1, 3],
                          dpi=50)
    assert res1["iteration"] == 1
    assert set(n for n in res1["figures"] if n.startswith("slices_")) == \
        {"slices_class001", "slices_class003"}


def test_report_errors_are_one_line(tmp_path, capsys, run):
    from cryoclass_plugin import cli

    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cryoclass report: error:") and "\n" not in err
    assert cli.main(["report", run.root, "--iter", "9", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no iteration 9" in err and "\n" not in err
    assert cli.main(["report", run.root, "--classes", "7", "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no class 7" in err and "\n" not in err


def test_parse_classes():
    assert R.parse_classes("1,3-4") == [1, 3, 4]
    assert R.parse_classes(None) is None and R.parse_classes("all") is None
    with pytest.raises(CryoClassError):
        R.parse_classes("a-b")


# ---------------------------------------------------------------------------------------
# iteration ranges, STAR blocks, angular distribution markers
# ---------------------------------------------------------------------------------------
def test_series_of_selected_iterations_and_blocks(run, fake):
    dist = run.class_distribution_series([1, 3])
    assert list(dist.index) == [1, 3]
    np.testing.assert_allclose(dist.loc[3].to_numpy(), fake["dist"][3], atol=1e-6)
    assert list(run.convergence_series([2, 3]).index) == [2, 3]
    assert list(run.class_resolution_series([0, 2]).index) == [0, 2]
    assert run.resolve_iterations([3, 1, 1]) == [1, 3]
    assert run.resolve_iterations(None) == [3]
    with pytest.raises(CryoClassError, match="no iteration 5, 8; iterations 0-3"):
        run.resolve_iterations([1, 5, 8])
    blocks = run.star_blocks(2, "model")
    assert blocks[0] == ("model_general", "pairs", 1)
    assert ("model_classes", "loop", 3) in blocks and ("model_class_3", "loop", 17) in blocks
    assert run.star_blocks(1, "optimiser") == [("optimiser_general", "pairs", 1)]


def test_ssnr_overlay_one_line_per_iteration_and_class(run, fake):
    fig = R.figure_ssnr(run, 3, classes=[2], iterations=[0, 2, 3])
    lines = {ln.get_label().split(" (")[0]: ln for ln in fig.axes[0].get_lines()
             if ln.get_label().startswith("it ")}
    assert sorted(lines) == ["it 0, class 2", "it 2, class 2", "it 3, class 2"]
    for it in (0, 2, 3):
        truth = fake["ssnr"][(it, 2)][1:]                 # SSNR <= 0 is not drawn (log)
        np.testing.assert_allclose(lines[f"it {it}, class 2"].get_ydata(),
                                   np.where(truth > 0, truth, np.nan), rtol=1e-6)
    # the latest iteration is drawn solid and thickest
    assert lines["it 3, class 2"].get_linestyle() == "-"
    assert lines["it 3, class 2"].get_linewidth() > lines["it 0, class 2"].get_linewidth()


def test_direction_counts_and_bild_markers(tmp_path):
    from cryoclass_plugin.engine import healpix
    order = 1
    dirs = healpix.pix2vec(np.arange(healpix.npix(order)), order)
    rot, tilt = healpix.pixel_angles_deg(np.arange(healpix.npix(order)), order)
    # 5 particles on pixel 7 (slightly off-centre), 2 on pixel 20, 1 on pixel 40
    pick = [7] * 5 + [20] * 2 + [40]
    jitter = np.array([0.5, -0.5, 1.0, 0.0, -1.0, 0.3, -0.3, 0.0])
    counts = F.direction_counts(rot[pick] + jitter, tilt[pick] + jitter, dirs)
    assert counts.sum() == 8 and counts[7] == 5 and counts[20] == 2 and counts[40] == 1
    path = tmp_path / "a.bild"
    n = F.write_angdist_bild(path, dirs, counts, centre=(10, 20, 30), distance=50,
                             max_radius=4.0, color=(1.0, 0.0, 0.5), comment="test\nlines")
    text = path.read_text().splitlines()
    assert n == 3 and text[0] == ".comment test lines" and text[1] == ".color 1.0000 0.0000 0.5000"
    sph = np.array([[float(v) for v in ln.split()[1:]] for ln in text[2:]])
    assert all(ln.startswith(".sphere ") for ln in text[2:]) and sph.shape == (3, 4)
    for row, pix, radius in zip(sph, (7, 20, 40), (4.0, 1.6, 0.8)):
        np.testing.assert_allclose(row[:3], np.array([10, 20, 30]) + 50 * dirs[pix], atol=1e-3)
        assert row[3] == pytest.approx(radius, abs=1e-4)
    with pytest.raises(ValueError, match="3 counts for 48 directions"):
        F.write_angdist_bild(path, dirs, [1, 2, 3], (0, 0, 0), 1, 1)


@pytest.mark.slow
def test_report_overlay_iterations_and_bild(run, tmp_path, capsys):
    from cryoclass_plugin import cli

    out = tmp_path / "rep"
    assert cli.main(["report", run.root, "-o", str(out), "--overlay-iters", "1-3",
                     "--classes", "1,3"]) == 0
    names = set(os.listdir(out))
    assert {"angdist_it003_class001.bild", "angdist_it003_class001.cxc",
            "angdist_it003_class003.bild", "angdist_it003_class003.cxc"} <= names
    assert "angdist_it003_class002.bild" not in names
    html = (out / "index.html").read_text()
    assert 'href="angdist_it003_class003.bild"' in html
    assert 'href="angdist_it003_class003.cxc"' in html
    for k in (1, 3):
        lines = (out / f"angdist_it003_class{k:03d}.bild").read_text().splitlines()
        assert lines[1].startswith(".color ") and lines[2].startswith(".sphere ")
    assert_not_blank(str(out / "ssnr.png"))
    assert cli.main(["report", run.root, "-o", str(tmp_path / "x"),
                     "--overlay-iters", "2,9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no iteration 9" in err and "\n" not in err
    assert cli.main(["report", run.root, "-o", str(tmp_path / "y"),
                     "--overlay-iters", "a"]) == 2
    assert "--overlay-iters: cannot read 'a'" in capsys.readouterr().err
