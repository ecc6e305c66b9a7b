"""The adaptive length of the consensus phase (``--consensus_extra_iter``): the decision
rule of :func:`.plan.extend_consensus` on its own (the whole path is measured in
docs/benchmarks.md, "adaptive consensus")."""
from cryoclass_plugin.engine.options import Settings
from cryoclass_plugin.engine.plan import (ScheduleState, extend_consensus,
                                          last_global_consensus, plan_iteration,
                                          shares_references)

STEP = 15.0     # the coarse angular step of --healpix_order (deg)


def _settings(**settings):
    return Settings(input_star="p.star", output_root="run", ref="ref.mrc", init_classes="pca",
                    n_classes=3, n_iter=25, consensus_iter=6, consensus_local_iter=2,
                    **settings)


def _schedule(s, changes):
    """Run the decision through iterations 2..25 with the given mean orientation change
    after each iteration (a dict; 1 deg where not given); return the last consensus
    iteration, the last global one and the final schedule."""
    schedule = ScheduleState.initial(s)
    for it in range(2, 26):
        schedule, _ = extend_consensus(s, schedule, it, changes.get(it - 1, 1.0), STEP)
    return schedule.consensus_end, last_global_consensus(s, schedule), schedule


def _search(s, schedule, it):
    plan = plan_iteration(s, schedule, it)
    return plan.search, plan.healpix_order, plan.sigma_ang


def test_converged_consensus_keeps_the_set_length():
    s = _settings()
    end, last_global, schedule = _schedule(s, {4: 14.9})     # below the 15-degree step
    assert (end, last_global) == (6, 4)
    assert _search(s, schedule, 4) == ("global", 2, 0.0)
    assert _search(s, schedule, 5) == ("local", 3, 5.0)
    assert _search(s, schedule, 7) == ("none", 2, 0.0)        # fixed poses after the split
    assert _search(s, schedule, 15) == ("local", 4, 3.0)      # full EM, two orders finer


def test_moving_poses_extend_the_global_consensus_and_shift_the_split():
    s = _settings()
    end, last_global, schedule = _schedule(s, {4: 35.0, 5: 29.0, 6: 15.5, 7: 7.7})
    assert (end, last_global) == (9, 7)
    assert _search(s, schedule, 7) == ("global", 2, 0.0)
    assert _search(s, schedule, 8)[0] == "local"
    assert plan_iteration(s, schedule, 10).split == "pca"
    assert shares_references(s, schedule, 10) is False
    assert shares_references(s, schedule, 11) is True


def test_extension_is_capped():
    s = _settings(consensus_extra_iter=2)
    assert _schedule(s, {k: 40.0 for k in range(1, 26)})[:2] == (8, 6)
    s = _settings(consensus_extra_iter=0)
    assert _schedule(s, {k: 40.0 for k in range(1, 26)})[:2] == (6, 4)
    # At least two full-EM iterations stay after the 8 fixed-pose ones: 25 - 8 - 2 = 15.
    s = _settings(consensus_extra_iter=50)
    assert _schedule(s, {k: 40.0 for k in range(1, 26)})[:2] == (15, 13)


def test_the_decision_is_saved_for_continue(tmp_path):
    import numpy as np
    from cryoclass_plugin.engine.model import ModelState
    s = _settings()
    schedule, extended = extend_consensus(s, ScheduleState.initial(s), 5, 35.0, STEP)
    assert extended and schedule.consensus_end == 7
    model = ModelState(box=4, apix=1.0, n_classes=1, n_groups=1, refs=np.zeros((1, 4, 4, 4)),
                       pdf_class=np.ones(1), sigma2=np.ones((1, 3)), tau2=np.ones((1, 3)),
                       ssnr=np.zeros((1, 3)), class_resolution_shell=np.zeros(1, int),
                       sigma_offset_angst=1.0, current_shell=2, schedule=schedule)
    model.save(str(tmp_path / "s.npz"))
    assert ModelState.load(str(tmp_path / "s.npz")).schedule == schedule


def test_state_files_with_the_schedule_on_the_model_are_read(tmp_path):
    """State files that keep consensus_end / merge_tested / merge_extra as the model's
    own fields (consensus_end 0: --consensus_iter) load into a ScheduleState."""
    import json
    import numpy as np
    from cryoclass_plugin.engine.model import ModelState
    scalars = {"box": 4, "apix": 1.0, "n_classes": 1, "n_groups": 1,
               "sigma_offset_angst": 1.0, "current_shell": 2, "iteration": 9,
               "consensus_end": 8, "merge_tested": True, "merge_extra": 3}
    arrays = {"refs": np.zeros((1, 4, 4, 4)), "pdf_class": np.ones(1),
              "sigma2": np.ones((1, 3)), "tau2": np.ones((1, 3)), "ssnr": np.zeros((1, 3)),
              "class_resolution_shell": np.zeros(1, int)}
    np.savez(tmp_path / "old.npz", __scalars__=np.array(json.dumps(scalars)), **arrays)
    model = ModelState.load(str(tmp_path / "old.npz"))
    assert model.schedule == ScheduleState(consensus_end=8, merge_tested=True, merge_extra=3)
