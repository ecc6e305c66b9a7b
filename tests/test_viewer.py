"""The Scipion viewer of ProtCryoClassClassify3D, headless: discovery, form, and every
display action producing its figure / file from a fake run in the protocol's folder."""
import os
import sys

import numpy as np
import pytest

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
