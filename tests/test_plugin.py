"""The Scipion side of cryoclass: plugin discovery, headless configuration, a real
pwem protocol run in a headless project.  Fast (a few seconds); no engine run."""
import os
import subprocess
import sys

import numpy as np
import pytest

# Must run before anything imports pyworkflow/pwem (pyworkflow reads its config at import).
from cryoclass_plugin.scipion_env import (ProtocolFailed, create_project, launch,
                                          setup_for_tests)

ENV = setup_for_tests()

import pwem  # noqa: E402
from pyworkflow.plugin import Domain  # noqa: E402

import cryoclass_plugin  # noqa: E402
from cryoclass_plugin.constants import CRYOCLASS_ENGINE, CRYOCLASS_MPIRUN  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROTOCOLS = ("ProtCryoClassClassify3D", "ProtCryoClassSelectClasses",
             "ProtCryoClassImportParticles")


def _write_mrc(path, data, apix):
    import mrcfile
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        m.voxel_size = apix
    return path


@pytest.fixture(scope="module")
def project():
    return create_project("TestPlugin")


def test_engine_and_helpers_import_without_pyworkflow():
    code = ("import sys, cryoclass_plugin, cryoclass_plugin.engine, cryoclass_plugin.cli, "
            "cryoclass_plugin.constants, cryoclass_plugin.scipion_env\n"
            "bad = [m for m in ('pyworkflow', 'pwem') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "try:\n    cryoclass_plugin.Plugin\nexcept AttributeError:\n    pass\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_headless_config_files():
    assert os.path.isfile(ENV.config) and os.path.isfile(ENV.hosts)
    hosts = open(ENV.hosts).read()
    assert "PARALLEL_COMMAND" in hosts and "%_(JOB_NODES)d" in hosts
    assert "--oversubscribe" in hosts
    if os.geteuid() == 0:
        assert "--allow-run-as-root" in hosts
    assert os.environ["SCIPION_DOMAIN"] == "pwem"
    assert os.environ["SCIPION_PYTHON"] == sys.executable
    import pyworkflow as pw
    assert os.path.abspath(pw.Config.SCIPION_HOME) == ENV.root
    assert pw.Config.SCIPION_USER_DATA == ENV.user_data
    assert os.path.isfile(ENV.env_sh)


def test_plugin_is_discovered():
    plugins = Domain.getPlugins()
    assert "cryoclass_plugin" in plugins
    assert "cryoclass_plugin" in pwem.Domain.getPlugins()
    module = plugins["cryoclass_plugin"]
    assert isinstance(module._pluginInstance, cryoclass_plugin.Plugin)
    assert issubclass(cryoclass_plugin.Plugin, pwem.Plugin)
    engine = cryoclass_plugin.Plugin.getVar(CRYOCLASS_ENGINE)
    assert engine.split()[-1] == "refine" and "cryoclass" in engine
    program, lead = cryoclass_plugin.Plugin.getProgram()
    assert os.path.isabs(program) and os.access(program, os.X_OK), program
    assert lead == "refine"
    assert os.path.basename(cryoclass_plugin.Plugin.getVar(CRYOCLASS_MPIRUN)) == "mpirun"
    assert cryoclass_plugin.Plugin.validateInstallation() == []
    bib = module._bibtex
    for key in ("Scheres2010", "Scheres2012a", "Scheres2012b", "Kimanius2016",
                "Kimanius2024"):
        assert key in bib, key
        assert bib[key]["doi"]


def test_protocols_are_registered():
    protocols = pwem.Domain.getProtocols()
    for name in PROTOCOLS:
        assert name in protocols, name
        cls = pwem.Domain.findClass(name)
        assert cls.getClassPackage() is Domain.getPlugins()["cryoclass_plugin"]
    from pwem.protocols import ProtClassify3D
    classify = protocols["ProtCryoClassClassify3D"]
    assert issubclass(classify, ProtClassify3D)
    assert classify._label == "cryoclass - 3D classification"
    assert protocols["ProtCryoClassSelectClasses"]._label == "cryoclass - select 3D classes"
    # citations of the protocol resolve in the plugin's bibtex
    bib = Domain.getPlugins()["cryoclass_plugin"]._bibtex
    prot = classify()
    prot.doGpu.set(True)
    prot.doBlush.set(True)
    assert all(key in bib for key in prot._citations())


def test_viewers_are_found():
    from pyworkflow.viewer import DESKTOP_TKINTER
    viewers = [v for v in Domain.getViewers().values()
               if v.__module__.startswith("cryoclass_plugin")]
    if not viewers:
        pytest.skip("the plugin has no viewers (yet)")
    classify = pwem.Domain.findClass("ProtCryoClassClassify3D")
    found = Domain.findViewers(classify.getClassName(), DESKTOP_TKINTER)
    assert any(v in viewers for v in found), (found, viewers)


def test_hosts_parallel_command_runs_mpi():
    from pyworkflow.protocol.hosts import HostConfig
    from pyworkflow.utils.process import buildRunCommand
    host = HostConfig.load(ENV.hosts)["localhost"]
    env = cryoclass_plugin.Plugin.getEnviron()
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print('rank', c.rank, 'of', c.size)"
    cmd = buildRunCommand(sys.executable, ["-c", code], 2, host, env=env)
    assert "mpirun" in cmd
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("rank")) == \
        ["rank 0 of 2", "rank 1 of 2"]


@pytest.mark.slow
def test_import_volumes_protocol_runs(project, tmp_path):
    from pwem.protocols import ProtImportVolumes
    vol = np.random.default_rng(0).normal(size=(16, 16, 16))
    fn = _write_mrc(str(tmp_path / "vol.mrc"), vol, 2.5)
    prot = project.newProtocol(ProtImportVolumes, filesPath=fn, samplingRate=2.5)
    prot = launch(project, prot)
    out = prot.outputVolume
    assert out.getDim() == (16, 16, 16)
    assert out.getSamplingRate() == pytest.approx(2.5)
    assert os.path.exists(out.getFileName())


@pytest.mark.slow
def test_launch_reports_failures(project, tmp_path):
    from pwem.protocols import ProtImportVolumes
    prot = project.newProtocol(ProtImportVolumes, filesPath=str(tmp_path / "missing.mrc"),
                               samplingRate=1.0)
    with pytest.raises(ProtocolFailed) as err:
        launch(project, prot)
    assert prot.getRunName() in str(err.value)
    assert err.value.protocol.isFailed()
