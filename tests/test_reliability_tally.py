"""The tally of bad inputs and faults (benchmarks/reliability_tally.py): every case
through ``cryoclass refine`` in a subprocess gives one line naming the file / flag and the
fix (or the warning, or the interrupt message naming the iteration to continue from)."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "reliability_tally.py")


def _tally():
    spec = importlib.util.spec_from_file_location("reliability_tally", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(rows):
    print("\n" + "\n".join(_tally().format_row(r) for r in rows))
    failed = [f"{r['case']}: {r['why']}" for r in rows if r["result"] == "FAIL"]
    assert not failed, failed


@pytest.mark.slow
def test_a_few_cases_quickly(tmp_path):
    """A bad pixel, a damaged state file, a disk that fills up, a concurrent run."""
    rows = _tally().run_tally(str(tmp_path), only=["NaN pixel", "truncated state",
                                                   "disk full (2 MB", "concurrent"], echo=None)
    assert len(rows) == 4
    _check(rows)


@pytest.mark.slow
def test_the_whole_list(tmp_path):
    """About a minute: every case of the list, mpirun and tmpfs ones where allowed."""
    module = _tally()
    rows = module.run_tally(str(tmp_path), echo=None)
    assert len(rows) == len(module.CASES) >= 30
    _check(rows)
