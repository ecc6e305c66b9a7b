"""The fixed-pose phase ends when the held-out evidence of the split stops rising
(``--classify_fixed_until_best``; :func:`cryoclass_plugin.engine.plan.after_fixed_check`),
in a whole run: the decision is logged, the merge test and full EM follow at once, the
state records it, and ``--continue`` takes the same decision again.  The evidence itself
(:func:`cryoclass_plugin.engine.merge.split_score`) is given here, so that the test
checks the engine's use of it; what it measures is checked on ground truth below."""
import os
import re
import sys

import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import merge
from cryoclass_plugin.engine.model import ModelState

sys.path.insert(0, os.path.dirname(__file__))
from test_golden_run import COMMON, _simulate  # noqa: E402  (the golden runs' small set)

ARGS = COMMON + ["--K", "3", "--iter", "9", "--init_classes", "pca", "--consensus_iter", "2",
                 "--consensus_local_iter", "1", "--consensus_extra_iter", "0",
                 "--classify_fixed_iter", "6"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixed_phase") / "data"
    _simulate(out)
    return out


def _given_scores(monkeypatch, scores):
    scores = iter(scores)
    monkeypatch.setattr(merge, "split_score",
                        lambda results: (next(scores), results[0] if results else None))


def _log_lines(root, start):
    with open(f"{root}.log") as fh:
        return [line.rstrip() for line in fh if line.startswith(start)]


def test_a_falling_split_evidence_ends_the_phase_and_continue_repeats_it(data, tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "run" / "run"
    # Readings after iterations 4, 5 and 6 (the split is iteration 3): up, then down.
    _given_scores(monkeypatch, [2.0, 3.0, 2.5])
    argv = ["refine", "--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(root)] + ARGS
    assert cli.main(argv) == 0
    checks = _log_lines(root, "fixed-pose check")
    assert [re.search(r"after iteration (\d+)", c).group(1) for c in checks] == ["4", "5", "6"]
    assert checks[0].endswith("first reading")
    assert checks[1].endswith("best before 2.00: one more fixed-pose iteration")
    assert checks[2].endswith("best before 3.00: the fixed-pose phase ends here")
    # Then the merge test, and iteration 7 is full EM (or the merge's fixed-pose one).
    events = _log_lines(root, ("plan iter", "fixed-pose check", "merge test:"))
    after = events[events.index(checks[2]) + 1:]
    assert after[0].startswith("merge test:"), after
    plans = [line for line in after if line.startswith("plan iter")]
    assert re.match(r"plan iter   7  (em|merged-fixed-pose) ", plans[0]), plans
    assert all(re.match(r"plan iter   \d  em ", p) for p in plans[1:]), plans
    schedule = ModelState.load(f"{root}_it007_state.npz").schedule
    assert schedule.fixed_scores == (2.0, 3.0, 2.5) and schedule.fixed_end == 6
    assert schedule.merge_tested
    # The same run's searches (--offset_range 3 --offset_step 2, --healpix_order 1): the
    # consensus on the run's offsets (its local iteration, order 2, too), full EM's last
    # --classify_final_iter 2 iterations (order 4) on an eighth of them: what
    # sampling.star records.
    sampling = [starfile.read(f"{root}_it{it:03d}_sampling.star", always_dict=True)
                ["sampling_general"] for it in (1, 2, 9)]
    assert [(b["rlnHealpixOrder"], b["rlnOffsetRange"], b["rlnOffsetStep"])
            for b in sampling] == [(1, 3.0, 2.0), (2, 3.0, 2.0), (4, 0.375, 0.25)]

    # The merge test takes the ending reading's figures: the same as its own on that state.
    from cryoclass_plugin.engine.refine import Refinement
    check = Refinement._check_fixed_phase

    def check_without_reuse(self, model, iteration):
        check(self, model, iteration)
        self._pair_table = None
    monkeypatch.setattr(Refinement, "_check_fixed_phase", check_without_reuse)
    _given_scores(monkeypatch, [2.0, 3.0, 2.5])
    fresh = tmp_path / "fresh" / "run"
    assert cli.main(["refine", "--i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(fresh)] + ARGS) == 0
    assert _log_lines(fresh, "merge") == _log_lines(root, "merge")
    monkeypatch.setattr(Refinement, "_check_fixed_phase", check)

    # Continued from iteration 6 (its state holds the first two readings), the same
    # reading after iteration 6 ends the phase the same way, and the run ends as before.
    _given_scores(monkeypatch, [2.5])
    again = tmp_path / "again" / "run"
    assert cli.main(["refine", "--continue", f"{root}_it006_optimiser.star",
                     "--o", str(again)]) == 0
    assert _log_lines(again, "fixed-pose check") == checks[2:]
    resumed = ModelState.load(f"{again}_it009_state.npz")
    first = ModelState.load(f"{root}_it009_state.npz")
    assert resumed.schedule == first.schedule
    assert np.array_equal(resumed.part_class, first.part_class)


def test_split_score_sums_the_pairs_ratios_capped(monkeypatch):
    """Each pair counts with its ratio clipped to [-1, 3]; the weakest is the lowest."""
    evidence = [(0, 1, {"ratio": 12.0}), (0, 2, {"ratio": 0.4}), (1, 2, {"ratio": -5.0}),
                (1, 3, {"ratio": np.inf})]
    score, weakest = merge.split_score(evidence)
    assert score == pytest.approx(3.0 + 0.4 - 1.0 + 3.0)
    assert weakest[:2] == (1, 2)
    assert merge.split_score([]) == (0.0, None)
