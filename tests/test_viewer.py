"""The Scipion viewer of ProtCryoClassClassify3D, headless: discovery, form, and every
display action producing its figure / file from a fake run in the protocol's folder."""
import os
import sys

import numpy as np
import pytest
import starfile

# Must run before anything imports pyworkflow/pwem.
from cryoclass_plugin.scipion_env import create_project, setup_for_tests

ENV = setup_for_tests()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_run import make_fake_run  # noqa: E402
from test_figures import assert_not_blank  # noqa: E402

from pyworkflow.plugin import Domain  # noqa: E402
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO  # noqa: E402

from cryoclass_plugin.constants import OUTPUT_ROOT  # noqa: E402
from cryoclass_plugin.protocols import ProtCryoClassClassify3D  # noqa: E402
from cryoclass_plugin.viewers import CryoClassViewer  # noqa: E402
from cryoclass_plugin.viewers import viewer_classify3d as V  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def setup():
    """A saved (not run) classification protocol whose extra/ holds a fake run."""
    cwd = os.getcwd()
    project = create_project("TestViewer")
    prot = project.newProtocol(ProtCryoClassClassify3D, numberOfClasses=3)
    project.saveProtocol(prot)
    extra = prot._getExtraPath()
    os.makedirs(extra, exist_ok=True)
    info = make_fake_run(extra, rootname=OUTPUT_ROOT)
    yield project, prot, info
    os.chdir(cwd)


def make_viewer(setup, **values):
    project, prot, _ = setup
    viewer = CryoClassViewer(project=project, protocol=prot)
    viewer.setProtocol(prot)
    for name, value in values.items():
        getattr(viewer, name).set(value)
    return viewer


def test_viewer_is_found_for_the_protocol(setup):
    _, prot, _ = setup
    for env in (DESKTOP_TKINTER, WEB_DJANGO):
        found = Domain.findViewers(prot, env)
        assert CryoClassViewer in found or any(
            v.__name__ == "CryoClassViewer" for v in found), (env, found)
    assert ProtCryoClassClassify3D in CryoClassViewer._targets


def test_form_and_defaults(setup):
    viewer = make_viewer(setup)
    assert viewer.validate() == []
    assert viewer.getIteration() == 3
    assert viewer.getClasses() is None
    assert viewer.runRoot().endswith(os.path.join("extra", OUTPUT_ROOT))
    assert viewer.iterSelection.get() == "3"      # defaults to the last iteration
    assert viewer.getIterations() == [3] and viewer.seriesIterations() is None
    for name in viewer._getVisualizeDict():
        assert hasattr(viewer, name), name


def test_selection_of_iteration_and_classes(setup):
    viewer = make_viewer(setup, displayIter=V.ITER_SELECTION, iterSelection="1",
                         showClasses3D=V.CLASSES_SEL, class3DSelection="1,3")
    assert viewer.getIteration() == 1 and viewer.getClasses() == [1, 3]
    paths = viewer.makeSlices()
    assert [os.path.basename(p) for p in paths] == ["slices_it001_class001_z.png",
                                                     "slices_it001_class003_z.png"]
    for p in paths:
        assert_not_blank(p)


@pytest.mark.parametrize("maker", ["makeCentralSlices", "makeSSNR", "makeClassDistribution",
                                   "makeClassResolution", "makeConvergence",
                                   "makeAngularDistribution"])
def test_each_figure_action_headless(setup, maker):
    viewer = make_viewer(setup)
    paths = getattr(viewer, maker)()
    paths = [paths] if isinstance(paths, str) else paths
    assert len(paths) == 1
    for path in paths:
        assert path.startswith(setup[1]._getExtraPath("viewer"))
        assert_not_blank(path)


def test_angular_rect_and_slices_axis(setup):
    viewer = make_viewer(setup, displayAngDist=V.ANGDIST_RECT, sliceAxis=2)
    assert [os.path.basename(p) for p in viewer.makeAngularDistribution()] == [
        "angular_distribution_it003_rect.png"]
    paths = viewer.makeSlices()
    assert len(paths) == 3 and all(p.endswith("_x.png") for p in paths)


@pytest.mark.slow
def test_gui_wrappers_return_views_without_showing(setup):
    viewer = make_viewer(setup)
    for name in ("displayVol", "showCentralSlices", "showSSNR", "showClassDistribution",
                 "showClassResolution", "showConvergence", "displayAngDist"):
        views = viewer._getVisualizeDict()[name](name)
        assert views and all(isinstance(v, V.FigureView) for v in views), name
        for v in views:
            assert os.path.exists(v.path) and v.figure is not None


def test_chimerax_action(setup, monkeypatch, tmp_path):
    viewer = make_viewer(setup, displayVol=V.VOLUME_CHIMERAX)
    cxc = viewer.makeChimeraXScript()
    text = open(cxc).read()
    assert text.count("\nopen ") == 3 and "fitmap #2 inMap #1" in text and "\ntile" in text
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHIMERAX_HOME", raising=False)
    monkeypatch.delenv("CHIMERA_HOME", raising=False)
    views = viewer._showVolumes("displayVol")
    assert len(views) == 1 and isinstance(views[0], V.MessageOnlyView)
    assert os.path.abspath(cxc) in views[0].message


def test_errors_become_messages(setup):
    from pyworkflow.viewer import MessageView
    viewer = make_viewer(setup, showClasses3D=V.CLASSES_SEL, class3DSelection="7")
    views = viewer._showSSNR("showSSNR")
    assert len(views) == 1 and isinstance(views[0], MessageView)
    # no outputClasses on a protocol that has not finished
    views = make_viewer(setup)._showClassesScipion("showClassesScipion")
    assert len(views) == 1 and isinstance(views[0], MessageView)


def _fake_output_classes(prot, info, tmp_path):
    """A SetOfClasses3D over a small SetOfParticles, as createOutputStep makes one."""
    from pwem.objects import Particle, SetOfClasses3D, SetOfParticles
    parts = SetOfParticles(filename=str(tmp_path / "particles.sqlite"))
    parts.setSamplingRate(4.0)
    labels = info["class_number"][3]
    for i in range(30):
        p = Particle(location=(i + 1, "particles.mrcs"))
        p.setObjId(i + 1)
        parts.append(p)
    parts.write()
    classes = SetOfClasses3D(filename=str(tmp_path / "classes.sqlite"))
    classes.setImages(parts)
    classes.classifyItems(
        updateItemCallback=lambda p, row=None: p.setClassId(int(labels[p.getObjId() - 1])))
    classes.write()
    return classes, labels[:30]


def test_classes_and_particles_views(setup, tmp_path):
    from pwem.objects import SetOfParticles
    from pwem.viewers import Classes3DView, ObjectView
    _, prot, info = setup
    classes, labels = _fake_output_classes(prot, info, tmp_path)
    prot.outputClasses = classes
    try:
        viewer = make_viewer(setup, showClasses3D=V.CLASSES_SEL, class3DSelection="1-2")
        view = viewer.makeClassesView()
        assert isinstance(view, Classes3DView)
        assert view.getPath() == classes.getFileName()
        sets = viewer.makeClassParticleSets()
        assert sorted(sets) == [1, 2]
        for k, fn in sets.items():
            s = SetOfParticles(filename=fn)
            assert s.getSize() == int(np.sum(labels == k))
            s.close()
        views = viewer._showClassParticles("showClassParticles")
        assert len(views) == 2 and all(isinstance(v, ObjectView) for v in views)
    finally:
        del prot.outputClasses


# ---------------------------------------------------------------------------------------
# iteration ranges, tables, ChimeraX markers
# ---------------------------------------------------------------------------------------
def _ssnr_lines(viewer):
    """{label prefix 'it N, class k' or 'class k': (x, y)} of the SSNR figure's curves."""
    viewer.makeSSNR()
    fig = list(viewer._figures.values())[-1]
    out = {}
    for line in fig.axes[0].get_lines():
        lab = line.get_label()
        if lab.startswith(("it ", "class ")):
            out[lab.split(" (")[0]] = (line.get_xdata(), line.get_ydata())
    return out


def test_iteration_range_overlays_ssnr(setup):
    _, _, info = setup
    viewer = make_viewer(setup, displayIter=V.ITER_SELECTION, iterSelection="1-3",
                         showClasses3D=V.CLASSES_SEL, class3DSelection="1,3")
    assert viewer.getIterations() == [1, 2, 3] and viewer.getIteration() == 3
    lines = _ssnr_lines(viewer)
    # one line per selected iteration and class, each with that iteration's values
    assert sorted(lines) == sorted(f"it {it}, class {k}" for it in (1, 2, 3) for k in (1, 3))
    for it in (1, 2, 3):
        for k in (1, 3):
            x, y = lines[f"it {it}, class {k}"]
            truth = info["ssnr"][(it, k)][1:]          # shell 0 is not drawn
            np.testing.assert_allclose(x, np.arange(1, 17) / (32 * 4.0), atol=1e-6)
            np.testing.assert_allclose(y, np.where(truth > 0, truth, np.nan), rtol=1e-6)
    assert os.path.basename(viewer.makeSSNR()) == "ssnr_it001-003_3.png"


def test_single_iteration_ssnr_and_series_up_to_it(setup):
    viewer = make_viewer(setup, displayIter=V.ITER_SELECTION, iterSelection="2")
    assert sorted(_ssnr_lines(viewer)) == ["class 1", "class 2", "class 3"]
    assert viewer.seriesIterations() == [0, 1, 2]


def test_series_plots_show_the_selected_iterations(setup):
    _, _, info = setup
    viewer = make_viewer(setup, displayIter=V.ITER_SELECTION, iterSelection="1,3")
    assert viewer.seriesIterations() == [1, 3]
    for maker in ("makeClassDistribution", "makeClassResolution", "makeConvergence"):
        path = getattr(viewer, maker)()
        assert path.endswith("_it001-003_2.png"), path
        assert_not_blank(path)
    fig = viewer._figures[viewer.makeClassDistribution()]
    curves = {ln.get_label().split(" (")[0]: ln for ln in fig.axes[0].get_lines()}
    for k in (1, 2, 3):
        ln = curves[f"class {k}"]
        assert list(ln.get_xdata()) == [1, 3]
        np.testing.assert_allclose(ln.get_ydata(), 100 * np.array(
            [info["dist"][1][k - 1], info["dist"][3][k - 1]]), atol=1e-4)


def test_bad_iteration_selection_is_a_message(setup):
    from pyworkflow.viewer import MessageView
    for text in ("9", "1-x"):
        viewer = make_viewer(setup, displayIter=V.ITER_SELECTION, iterSelection=text)
        views = viewer._showSSNR("showSSNR")
        assert len(views) == 1 and isinstance(views[0], MessageView), text


def _parse_bild(path):
    comment, color, spheres = None, None, []
    for line in open(path).read().splitlines():
        word, *vals = line.split()
        if word == ".comment":
            comment = line
        elif word == ".color":
            color = [float(v) for v in vals]
        else:
            assert word == ".sphere" and len(vals) == 4, line
            spheres.append([float(v) for v in vals])
    return comment, color, np.array(spheres)


def test_angular_distribution_bild_per_class(setup):
    import re
    from cryoclass_plugin.engine import healpix
    from cryoclass_plugin.figures import class_color
    from cryoclass_plugin.runresults import RunResults
    _, prot, info = setup
    viewer = make_viewer(setup, displayAngDist=V.ANGDIST_CHIMERAX)
    out = viewer.makeAngularDistributionBild()
    assert list(out) == [3] and sorted(out[3]) == [1, 2, 3]
    data = RunResults(viewer.runRoot()).data(3)
    box, apix, order = 32, 4.0, 2                     # the fake run's sampling.star
    centre, distance, rmax = 16 * apix, 0.75 * box * apix / 2, 0.05 * box * apix
    # nearest HEALPix pixel centre by angle (arccos), independent of the writer's code
    prot_dirs = healpix.pix2vec(np.arange(healpix.npix(order)), order)
    for k, res in out[3].items():
        sel = data["rlnClassNumber"].astype(int).to_numpy() == k
        r = np.radians(data["rlnAngleRot"].to_numpy(float)[sel])
        t = np.radians(data["rlnAngleTilt"].to_numpy(float)[sel])
        v = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1)
        ang = np.arccos(np.clip(v @ prot_dirs.T, -1, 1))
        truth = np.bincount(ang.argmin(1), minlength=len(prot_dirs))
        comment, color, sph = _parse_bild(res["bild"])
        assert res["bild"].endswith("angdist_it003_class%03d.bild" % k)
        assert res["particles"] == sel.sum() and res["order"] == order
        # one marker per sampled direction holding particles, at that direction
        assert len(sph) == res["markers"] == (truth > 0).sum()
        pos = (sph[:, :3] - centre) / distance
        np.testing.assert_allclose(np.linalg.norm(pos, axis=1), 1.0, atol=1e-3)
        nearest = (pos @ prot_dirs.T).argmax(1)
        np.testing.assert_allclose(pos, prot_dirs[nearest], atol=1e-3)
        # radius ~ count: the largest marker is rmax, radius / rmax * max = particles
        top = int(re.search(r"= (\d+) particles", comment).group(1))
        assert top == truth.max()
        np.testing.assert_allclose(sph[:, 3] / rmax * top, truth[nearest], atol=1e-2)
        np.testing.assert_allclose(color, class_color(k)[:3], atol=1e-4)
        cxc = open(res["cxc"]).read()
        assert "open " + os.path.abspath(res["bild"]) in cxc
        assert "open %s_it003_class%03d.mrc" % (os.path.abspath(viewer.runRoot()), k) in cxc


def test_angular_distribution_chimerax_without_chimerax(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHIMERAX_HOME", raising=False)
    monkeypatch.delenv("CHIMERA_HOME", raising=False)
    viewer = make_viewer(setup, displayAngDist=V.ANGDIST_CHIMERAX,
                         showClasses3D=V.CLASSES_SEL, class3DSelection="2-3")
    views = viewer._showAngularDistribution("displayAngDist")
    assert len(views) == 1 and isinstance(views[0], V.MessageOnlyView)
    assert views[0].message.count(".cxc") == 2 and "class002" in views[0].message


@pytest.mark.parametrize("which,blocks", [
    (V.MODEL_GENERAL, ["model_general"]), (V.MODEL_CLASSES, ["model_classes"]),
    (V.MODEL_CLASS_SPECTRA, ["model_class_1", "model_class_3"]),
    (V.MODEL_GROUPS, ["model_groups"])])
def test_model_star_table_views(setup, which, blocks):
    from pwem.viewers import DataView
    from pwem.viewers import showj
    viewer = make_viewer(setup, displayIter=V.ITER_SELECTION, iterSelection="1-2",
                         displayModelTable=which, showClasses3D=V.CLASSES_SEL,
                         class3DSelection="1,3")
    views = viewer._showModelTable("displayModelTable")
    root = os.path.basename(viewer.runRoot())
    expect = [(b, "%s_it%03d_model.star" % (root, it)) for it in (1, 2) for b in blocks]
    assert all(isinstance(v, DataView) for v in views)
    assert [(v.getTableName(), os.path.basename(v.getPath())) for v in views] == expect
    for v in views:
        assert os.path.isabs(v.getPath()) and os.path.exists(v.getPath())
        assert v.getViewParams()[showj.MODE] == showj.MODE_MD
        assert '-i "%s@%s"' % (v.getTableName(), v.getPath()) in v.getShowJParams()
        assert isinstance(v, V.StarTableView)
    # the Tk fallback's rows are the STAR block's values
    header, rows = views[-1].table()
    table = starfile.read(views[-1].getPath(), always_dict=True)[views[-1].getTableName()]
    if isinstance(table, dict):
        assert header == ["label", "value"] and [r[0] for r in rows] == list(table)
        assert [float(r[1]) for r in rows if r[0] == "rlnPixelSize"] == [4.0]
    else:
        assert header == list(table.columns) and len(rows) == len(table)
        np.testing.assert_array_equal(np.array(rows, dtype=object)[:, -1],
                                      table.iloc[:, -1].to_numpy(dtype=object))


def test_optimiser_table_view_and_missing_block(setup):
    from pwem.viewers import DataView
    from pyworkflow.viewer import MessageView
    views = make_viewer(setup)._showOptimiserTable("showOptimiserTable")
    assert len(views) == 1 and isinstance(views[0], DataView)
    assert views[0].getTableName() == "optimiser_general"
    assert views[0].getPath() == os.path.abspath(
        make_viewer(setup).runRoot() + "_it003_optimiser.star")
    views = make_viewer(setup, displayModelTable=V.MODEL_CLASS_SPECTRA,
                        showClasses3D=V.CLASSES_SEL, class3DSelection="5")._showModelTable()
    assert len(views) == 1 and isinstance(views[0], MessageView)


# ---------------------------------------------------------------------------------------
# progress line with an ETA in the engine's log (the protocol's log through runJob)
# ---------------------------------------------------------------------------------------
def test_eta_line_numbers():
    import time
    from cryoclass_plugin.engine.iteration import eta_line
    now = time.mktime((2026, 1, 2, 10, 0, 0, 0, 0, -1))
    hist = [{"seconds": 30.0}, {"seconds": 50.0}, {"seconds": 70.0}]
    line = eta_line(hist, 3, 10, now=now)
    # 150 s spent, 50 s per iteration, 7 left -> 350 s -> 10:05:50 local time
    assert line.startswith("eta ") and "\n" not in line
    assert "iteration 3/10" in line and "elapsed 0:02:30" in line
    assert "50.0 s/iteration (mean of 3)" in line and "7 left" in line
    assert "end 2026-01-02 10:05:50" in line and "(in 0:05:50)" in line
    assert "0 left" in eta_line(hist, 10, 10, now=now)


def test_engine_logs_an_eta_line_per_iteration(tmp_path, capsys):
    import re
    from cryoclass_plugin import cli
    from cryoclass_plugin.engine.simulate import simulate_dataset
    data = tmp_path / "data"
    simulate_dataset(str(data), n=60, box=24, apix=6.0, snr=0.5, n_classes=2, seed=3)
    root = tmp_path / "out" / "run"
    argv = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(root), "--K", "2", "--iter", "2", "--healpix_order", "1",
            "--particle_diameter", "120", "--ini_high", "40", "--offset_range", "2",
            "--offset_step", "2", "--j", "1", "--random_seed", "1"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    log = open(str(root) + ".log").read()
    for text in (stdout, log):
        etas = re.findall(r"^eta +iteration (\d+)/2 .* (\d+) left .*$", text, re.M)
        assert [(int(a), int(b)) for a, b in etas] == [(1, 1), (2, 0)], text[-2000:]
        # each follows its iteration's line
        lines = text.splitlines()
        for it in (1, 2):
            i = next(n for n, ln in enumerate(lines) if ln.startswith("iter %3d " % it))
            assert any(ln.startswith("eta       iteration %d/2" % it)
                       for ln in lines[i + 1:i + 4])
