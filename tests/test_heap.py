"""The ``cryoclass`` process's malloc policy (cryoclass_plugin.heap): a freed temporary's
pages are reused, not returned to the system and faulted in again."""
import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB array ten times; print the minor page faults of the
# last nine rounds (the first round may grow the heap).
_PROBE = """
import resource, sys
if sys.argv[1] == "retain":
    from cryoclass_plugin.heap import retain_freed_memory
    assert retain_freed_memory()
import numpy as np
a = np.ones(16 << 20, dtype=np.float32); del a
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    a = np.ones(16 << 20, dtype=np.float32); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_new_page_faults():
    default, retained = _faults("default"), _faults("retain")
    # By default every round maps 64 MB afresh (16,384 4-kB pages, or 32 huge pages
    # where the kernel backs them so); with the policy the heap's pages are reused.
    assert default >= 9 * 16
    assert retained <= max(8, default // 20), (default, retained)


def test_policy_is_applied_once_and_reports_the_same():
    from cryoclass_plugin.heap import retain_freed_memory
    first = retain_freed_memory()
    assert retain_freed_memory() is first
    if sys.platform.startswith("linux"):
        assert first is True


# Records whether the policy was applied when numpy is first imported.
_ORDER_PROBE = """
import sys
import cryoclass_plugin.heap as heap
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(heap._applied)
        return None
sys.meta_path.insert(0, Watch())
from cryoclass_plugin.cli import main
assert "numpy" not in sys.modules
try:
    main(["refine", "--help"])
except SystemExit:
    pass
print(seen)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cli_applies_the_policy_before_the_command_imports_numpy():
    out = subprocess.run([sys.executable, "-c", _ORDER_PROBE], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[True]", out.stdout
