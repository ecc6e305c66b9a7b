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
# torch is pinned to a CPU build; PyPI's default Linux wheel would pull GBs of CUDA.
TORCH_INDEX="${CRYOCLASS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

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
    extra=()
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        extra=(--extra-index-url "$TORCH_INDEX")
    fi
    echo "install.sh: pip install -e \".[test]\" ${extra[*]:-}"
    "$VENV/bin/python" -m pip install --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q "${extra[@]}" -e ".[test]"
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
