#!/usr/bin/env bash
# Set up cryoclass (Scipion plugin + bundled engine) in ./.venv.  Idempotent: re-running
# it only re-installs when setup.py changed or the environment is broken.
#   bash install.sh            # create/update .venv
#   PYTHON=python3.11 bash install.sh
#   CRYOCLASS_FORCE_INSTALL=1 bash install.sh   # always run pip
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.cryoclass_install_stamp"
# torch is pinned (setup.py: torch==2.13.0). No extra index is used: this machine and CI
# reach only PyPI/Debian, and pip's own configuration (pip config list) finds the CPU
# build (2.13.0+cpu, which sorts above PyPI's CUDA 2.13.0) among its local wheels.

if [ ! -x "$VENV/bin/python" ]; then
    echo "install.sh: creating virtual environment $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    echo "install.sh: using existing virtual environment $VENV ($("$VENV/bin/python" --version 2>&1))"
fi

want="$(sha256sum setup.py | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
healthy=0
if "$VENV/bin/python" -c "import cryoclass_plugin.cli, pwem, pyworkflow, mpi4py, torch, pytest" 2>/dev/null \
        && [ -x "$VENV/bin/cryoclass" ] && [ -x "$VENV/bin/mpirun" ]; then
    healthy=1
fi

if [ "$healthy" = 1 ] && [ "$want" = "$have" ] && [ -z "${CRYOCLASS_FORCE_INSTALL:-}" ]; then
    echo "install.sh: scipion-em-cryoclass already installed (editable) and up to date; nothing to do"
else
    echo "install.sh: pip install -e \".[test]\""
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    echo "$want" > "$STAMP"
    echo "install.sh: installed scipion-em-cryoclass (editable) into $VENV"
fi

echo "install.sh: engine: $("$VENV/bin/cryoclass" --help >/dev/null 2>&1 && echo "$VENV/bin/cryoclass OK" || echo "cryoclass command not working")"
echo "install.sh: Scipion plugin: $("$VENV/bin/python" -c "
from cryoclass_plugin.scipion_env import setup_headless_scipion
import atexit, shutil, tempfile; d = tempfile.mkdtemp(prefix='cryoclass-check-')
atexit.register(shutil.rmtree, d, True); setup_headless_scipion(d)
from pyworkflow.plugin import Domain
print('found by Domain.getPlugins()' if 'cryoclass_plugin' in Domain.getPlugins() else 'NOT found')" 2>/dev/null || echo "check failed")"
echo "install.sh: done. Next: $VENV/bin/cryoclass demo   |   tests: $VENV/bin/python -m pytest -q tests"
