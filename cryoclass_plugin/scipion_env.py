"""A headless Scipion for tests, scripts and the ``cryoclass demo`` command.

pyworkflow reads its configuration (``SCIPION_HOME``, ``SCIPION_USER_DATA``, the hosts
file, the domain...) from environment variables *when it is first imported*, and every
protocol runs in a child process (``pw_protocol_run.py``) that inherits the environment.
So the environment has to be prepared before anything imports pyworkflow or pwem::

    from cryoclass_plugin.scipion_env import setup_headless_scipion
    env = setup_headless_scipion("scipion_home")       # first thing, before pyworkflow

    from cryoclass_plugin.scipion_env import create_project, launch
    project = create_project("demo")
    prot = project.newProtocol(SomeProtocol, ...)       # pwem / cryoclass protocols
    launch(project, prot)                                # waits; raises ProtocolFailed

:func:`setup_headless_scipion` writes ``<root>/config/scipion.conf`` and
``<root>/config/hosts.conf`` (a ``localhost`` host whose ``PARALLEL_COMMAND`` is the
``mpirun`` of this Python environment, allowed to run as root and to oversubscribe the
cores) and ``<root>/config/env.sh`` (the same variables as shell exports, for
``scipion``-less use: ``source env.sh; python -O -m pyworkflow.apps.pw_project demo``;
``-O`` opens the project window in this process rather than through the ``scipion``
launcher, which is not installed here).
Nothing here needs a display.

This module imports neither pyworkflow nor pwem at import time.
"""
import os
import re
import shlex
import sys
import time

from .constants import CRYOCLASS_ENGINE, CRYOCLASS_MPIRUN

#: Environment variable recording the root this process was configured with.
HEADLESS_ROOT_VAR = "CRYOCLASS_HEADLESS_SCIPION"


class ProtocolFailed(RuntimeError):
    """A protocol launched by :func:`launch` failed or did not finish.

    ``str(err)`` holds the protocol's error message and the tail of its logs;
    ``err.protocol`` is the (reloaded) protocol object.
    """

    def __init__(self, message, protocol=None):
        super().__init__(message)
        self.protocol = protocol


class HeadlessScipion:
    """Paths of a prepared headless Scipion configuration (see :func:`setup_headless_scipion`)."""

    def __init__(self, root, user_data, config, hosts, env_sh, env):
        self.root = root
        self.user_data = user_data
        self.config = config
        self.hosts = hosts
        self.env_sh = env_sh
        self.env = env  # the variables that were exported

    def __repr__(self):
        return "HeadlessScipion(root=%r, user_data=%r)" % (self.root, self.user_data)


def _bin_dir():
    return os.path.dirname(os.path.abspath(sys.executable))


def _default_mpirun():
    from . import default_mpirun
    return default_mpirun()


def _default_engine():
    from . import default_engine_command
    return default_engine_command()


def _is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


def parallel_command(mpirun=None):
    """The ``PARALLEL_COMMAND`` line for hosts.conf (pyworkflow's ``%_(...)`` syntax).

    ``--oversubscribe`` lets a job ask for more MPI processes than cores (tests on small
    machines); ``--allow-run-as-root`` is added when running as root (containers).
    """
    mpirun = mpirun or _default_mpirun()
    flags = ["--oversubscribe"]
    if _is_root():
        flags.insert(0, "--allow-run-as-root")
    return "%s %s -np %%_(JOB_NODES)d %%_(COMMAND)s" % (shlex.quote(mpirun), " ".join(flags))


def write_hosts_conf(path, mpirun=None):
    """Write a one-host (``localhost``, no queue) hosts.conf to ``path``."""
    text = ("[localhost]\n"
            "PARALLEL_COMMAND = %s\n"
            "NAME =\n"
            "MANDATORY = 0\n"
            "SUBMIT_COMMAND =\n"
            "CANCEL_COMMAND =\n"
            "CHECK_COMMAND =\n"
            "SUBMIT_TEMPLATE =\n" % parallel_command(mpirun))
    _write(path, text)
    return path


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def headless_environment(root_dir, user_data=None, mpirun=None):
    """The variables a headless Scipion rooted at ``root_dir`` needs (a dict; nothing set)."""
    root = os.path.abspath(root_dir)
    user_data = os.path.abspath(user_data or os.path.join(root, "ScipionUserData"))
    mpirun = mpirun or os.environ.get(CRYOCLASS_MPIRUN) or _default_mpirun()
    env = {
        "SCIPION_HOME": root,
        "SCIPION_USER_DATA": user_data,
        "SCIPION_LOGS": os.path.join(user_data, "logs"),
        "SCIPION_TESTS_OUTPUT": os.path.join(user_data, "Tests"),
        "SCIPION_CONFIG": os.path.join(root, "config", "scipion.conf"),
        "SCIPION_LOCAL_CONFIG": os.path.join(root, "config", "scipion.conf"),
        "SCIPION_HOSTS": os.path.join(root, "config", "hosts.conf"),
        "SCIPION_PROTOCOLS": os.path.join(root, "config", "protocols.conf"),
        "SCIPION_DOMAIN": "pwem",
        # protocols run as `$SCIPION_PYTHON pw_protocol_run.py ...`: this interpreter
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_NOTIFY": "False",          # no usage statistics sent (offline machines)
        "SCIPION_TEST_NOSYNC": "True",      # never download test data sets
        "SCIPION_USE_QUEUE": "False",
        "SCIPION_GUI_CANCEL_AUTO_REFRESH": "True",
        "MPLBACKEND": "Agg",
        CRYOCLASS_MPIRUN: mpirun,
        CRYOCLASS_ENGINE: os.environ.get(CRYOCLASS_ENGINE) or _default_engine(),
    }
    if _is_root():
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def setup_headless_scipion(root_dir=None, user_data=None, mpirun=None):
    """Prepare and activate a headless Scipion configuration; call before pyworkflow.

    Creates ``root_dir`` (default: ``$SCIPION_HOME`` if set, else ``./scipion_home``)
    with ``config/scipion.conf``, ``config/hosts.conf`` and ``config/env.sh``, and the
    user-data folder (default ``<root>/ScipionUserData``, where projects go), then sets
    the variables in ``os.environ`` (the protocol processes inherit them) and puts this
    Python environment's ``bin`` first on the PATH.

    Calling it again in the same process returns the first configuration (pyworkflow
    is configured once per process).  If pyworkflow was already imported before the
    first call, its ``Config`` is patched in place (best effort; protocol processes
    are unaffected since they read the environment); calling it first is cleaner.
    Returns a :class:`HeadlessScipion`.
    """
    done = os.environ.get(HEADLESS_ROOT_VAR)
    if done and "pyworkflow" in sys.modules:
        return _describe(done)

    if root_dir is None:
        root_dir = os.environ.get("SCIPION_HOME") or os.path.join(os.getcwd(), "scipion_home")
    env = headless_environment(root_dir, user_data, mpirun)
    root = env["SCIPION_HOME"]

    late = "pyworkflow" in sys.modules

    for sub in (env["SCIPION_USER_DATA"], env["SCIPION_LOGS"],
                os.path.join(env["SCIPION_USER_DATA"], "projects"),
                os.path.join(root, "software", "em")):
        os.makedirs(sub, exist_ok=True)

    write_hosts_conf(env["SCIPION_HOSTS"], env[CRYOCLASS_MPIRUN])
    conf_lines = ["[PYWORKFLOW]"]
    conf_lines += ["%s = %s" % (k, env[k]) for k in
                   ("SCIPION_USER_DATA", "SCIPION_LOGS", "SCIPION_TESTS_OUTPUT",
                    "SCIPION_HOSTS", "SCIPION_DOMAIN", "SCIPION_NOTIFY")]
    conf_lines += ["", "[PLUGINS]",
                   "%s = %s" % (CRYOCLASS_ENGINE, env[CRYOCLASS_ENGINE]),
                   "%s = %s" % (CRYOCLASS_MPIRUN, env[CRYOCLASS_MPIRUN]), ""]
    _write(env["SCIPION_CONFIG"], "\n".join(conf_lines))
    if not os.path.exists(env["SCIPION_PROTOCOLS"]):
        _write(env["SCIPION_PROTOCOLS"], "")

    path = os.environ.get("PATH", "")
    bindir = _bin_dir()
    if bindir not in path.split(os.pathsep):
        path = bindir + (os.pathsep + path if path else "")
    env_sh = os.path.join(root, "config", "env.sh")
    _write(env_sh, "# generated by cryoclass_plugin.scipion_env; source it before "
                   "using pyworkflow\n" +
           "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in sorted(env.items())) +
           "export PATH=%s:\"$PATH\"\n" % shlex.quote(bindir))

    os.environ.update(env)
    os.environ["PATH"] = path
    os.environ[HEADLESS_ROOT_VAR] = root
    if late:
        _patch_loaded_pyworkflow(env)
    return _describe(root)


# pyworkflow.Config attributes derived from the variables we set (patched when late)
_DERIVED = {
    "SCIPION_LOG": lambda e: os.path.join(e["SCIPION_LOGS"], "scipion.log"),
    "SCIPION_SOFTWARE": lambda e: os.path.join(e["SCIPION_HOME"], "software"),
    "SCIPION_TESTS": lambda e: os.path.join(e["SCIPION_HOME"], "data", "tests"),
}


def _patch_loaded_pyworkflow(env):
    """Best effort when pyworkflow was imported before the set-up (e.g. another test
    module imported it first): update ``pyworkflow.Config`` in place.  The protocol
    processes read the environment afresh, so only this process needs patching."""
    import logging
    import pyworkflow as pw
    import pyworkflow.config as pwconfig
    if pw.Config.SCIPION_HOME_DEFINED and \
            os.path.abspath(pw.Config.SCIPION_HOME) != env["SCIPION_HOME"]:
        logging.getLogger(__name__).warning(
            "pyworkflow was imported with SCIPION_HOME=%s; switching this process to %s",
            pw.Config.SCIPION_HOME, env["SCIPION_HOME"])
    values = dict(env)
    values.update({k: f(env) for k, f in _DERIVED.items()})
    for key, value in values.items():
        if key in ("SCIPION_NOTIFY", "SCIPION_TEST_NOSYNC", "SCIPION_USE_QUEUE",
                   "SCIPION_GUI_CANCEL_AUTO_REFRESH"):
            value = False if key != "SCIPION_TEST_NOSYNC" else True
        if hasattr(pw.Config, key):
            setattr(pw.Config, key, value)
    pw.Config.SCIPION_HOME_DEFINED = True
    pw.Config._root = pw.Config.Root(env["SCIPION_HOME"])
    pw.Config._join = pw.Config._root.join
    pw.PYTHON = pwconfig.PYTHON = env["SCIPION_PYTHON"]


def setup_for_tests(env_var="CRYOCLASS_TEST_SCIPION_HOME"):
    """:func:`setup_headless_scipion` for test suites: the root is ``$env_var`` when set
    (kept afterwards, for inspection), else a fresh temporary folder removed at exit.
    Every test module may call it at import time; the first call wins."""
    done = os.environ.get(HEADLESS_ROOT_VAR)
    if done:
        return setup_headless_scipion(done)
    root = os.environ.get(env_var)
    if not root:
        import atexit
        import shutil
        import tempfile
        root = tempfile.mkdtemp(prefix="cryoclass-scipion-")
        atexit.register(shutil.rmtree, root, True)
    return setup_headless_scipion(root)


def _describe(root):
    keys = headless_environment(root).keys()
    env = {k: os.environ.get(k, "") for k in keys}
    return HeadlessScipion(root=root, user_data=os.environ.get("SCIPION_USER_DATA"),
                           config=os.environ.get("SCIPION_CONFIG"),
                           hosts=os.environ.get("SCIPION_HOSTS"),
                           env_sh=os.path.join(root, "config", "env.sh"), env=env)


def _require_setup():
    if not os.environ.get(HEADLESS_ROOT_VAR) and not os.environ.get("SCIPION_HOME"):
        raise RuntimeError("call cryoclass_plugin.scipion_env.setup_headless_scipion() "
                           "before creating projects")


# ---------------------------------------------------------------- projects and runs
def create_project(name, location=None, overwrite=True):
    """Create (or, with ``overwrite``, re-create) project ``name`` in SCIPION_USER_DATA
    (or at ``location``) and return the ``pyworkflow.project.Project``.

    Like Scipion's own test set-up, this changes the working directory to the project
    folder: pyworkflow keeps project-relative paths (``Runs/...``, ``project.sqlite``).
    """
    _require_setup()
    from pyworkflow.project import Manager
    manager = Manager()
    if manager.hasProject(name):
        if not overwrite:
            return load_project(name)
        manager.deleteProject(name)
    project = manager.createProject(name, location=location)
    os.chdir(project.path)
    return project


def load_project(name):
    """Load an existing project by name (and change to its folder)."""
    _require_setup()
    from pyworkflow.project import Manager
    project = Manager().loadProject(name)
    os.chdir(project.path)
    return project


def log_tail(prot, n=40):
    """The last ``n`` lines of a protocol's stdout and stderr logs (one string)."""
    out = []
    for label, fn in (("stdout", prot.getStdoutLog()), ("stderr", prot.getStderrLog())):
        try:
            with open(fn, errors="replace") as fh:
                lines = fh.read().splitlines()[-n:]
        except OSError:
            continue
        if lines:
            out.append("---- %s (%s) ----" % (label, fn))
            out.extend(re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines)
    return "\n".join(out)


def launch(project, prot, wait=True, timeout=None, poll=2.0, check=True):
    """Launch ``prot`` in ``project`` and wait until it ends (synchronous).

    With ``wait=True`` (default) the call blocks until the run's process exits and
    ``prot`` is refreshed from the run database (outputs become attributes, e.g.
    ``prot.outputClasses``).  With ``wait=False`` the run is started in the background
    and polled every ``poll`` seconds until it is no longer active (or ``timeout``).
    With ``check`` a failed or unfinished run raises :class:`ProtocolFailed` carrying
    the protocol's error message and the tail of its logs.  Returns ``prot``.
    """
    if os.path.abspath(os.getcwd()) != os.path.abspath(project.path):
        os.chdir(project.path)  # pyworkflow uses project-relative paths
    project.launchProtocol(prot, wait=wait)
    start = time.time()
    while check and not wait and prot.isActive():
        if timeout is not None and time.time() - start > timeout:
            raise ProtocolFailed("protocol %s still running after %ss" %
                                 (prot.getRunName(), timeout), prot)
        time.sleep(poll)
        refresh(project, prot)
    if check:
        if not wait:
            refresh(project, prot)
        check_finished(prot)
    return prot


def refresh(project, prot):
    """Re-read ``prot`` from its run database, whatever its time stamp says.

    pyworkflow's ``Project._updateProtocol`` skips the read when the protocol's stored
    time stamp is not older than the run database's, and takes that stamp *after* the
    read: a run that writes "finished" in between stays "running" in memory, and once
    its process has exited the alive check marks it failed ("Process ... not found
    running on the machine"; seen under load).  Clearing the stamp forces the read, so
    the run database's own status wins."""
    prot.lastUpdateTimeStamp.set(None)
    project._updateProtocol(prot)


def check_finished(prot):
    """Raise :class:`ProtocolFailed` unless ``prot`` finished."""
    if prot.isFinished():
        return prot
    msg = re.sub(r"\x1b\[[0-9;]*m", "", prot.getErrorMessage() or "")
    raise ProtocolFailed("protocol %s (%s) ended with status %s: %s\n%s"
                         % (prot.getRunName(), prot.getClassName(), prot.getStatus(),
                            msg, log_tail(prot)), prot)


def main(argv=None):
    """``python -m cryoclass_plugin.scipion_env ROOT``: prepare ROOT, print env.sh path."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", help="folder for SCIPION_HOME (created)")
    parser.add_argument("--user_data", default=None, help="projects folder")
    args = parser.parse_args(argv)
    info = setup_headless_scipion(args.root, user_data=args.user_data)
    print("headless Scipion ready; to use it in a shell: source %s" % info.env_sh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
