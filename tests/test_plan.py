"""The iteration plans (:mod:`cryoclass_plugin.engine.plan`) of whole runs, and two
checks of the engine's shape: no function longer than a page and no import cycles."""
import ast
from dataclasses import replace
from pathlib import Path

import pytest

from cryoclass_plugin.engine.options import Settings
from cryoclass_plugin.engine.plan import (ScheduleState, after_fixed_check, after_merge,
                                          after_retest, describe_schedule, plan_iteration)

ENGINE = Path(__file__).resolve().parent.parent / "cryoclass_plugin" / "engine"


def _settings(**kw):
    return Settings(input_star="p.star", output_root="run", ref="ref.mrc", **kw)


def _plans(s, schedule=None):
    schedule = schedule or ScheduleState.initial(s)
    return {it: plan_iteration(s, schedule, it) for it in range(1, s.n_iter + 1)}


def test_recommended_start_of_25_iterations():
    """--init_classes pca, K=3, 25 iterations, 6 consensus iterations (the last 2
    local, one HEALPix order finer), up to 8 fixed-pose iterations (the evidence checked
    before the third on), then the merge test and full EM with local searches two
    HEALPix orders finer and a narrower prior, the last two three orders finer."""
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6)
    plans = _plans(s)
    phases = [plans[it].phase for it in range(1, 26)]
    assert phases == (["consensus"] * 4 + ["consensus-local"] * 2 + ["split"]
                      + ["fixed-pose"] * 7 + ["em"] * 11)
    assert [(p.search, p.healpix_order, p.sigma_ang) for p in (plans[4], plans[5], plans[7],
                                                               plans[15], plans[24])] == \
        [("global", 2, 0.0), ("local", 3, 5.0), ("none", 2, 0.0), ("local", 4, 3.0),
         ("local", 5, 2.0)]
    assert plans[7].split == "pca" and not any(plans[it].split for it in plans if it != 7)
    assert [it for it in plans if plans[it].merge_test] == [15]
    assert [it for it in plans if plans[it].extension_check] == [5]
    assert [it for it in plans if plans[it].fixed_check] == list(range(9, 15))
    assert {plans[it].assignments for it in range(1, 7)} == {"one-class"}
    assert plans[7].assignments == "current" and plans[8].assignments == "free"
    assert all(plans[it].class_highres_angst == 25.0 for it in range(7, 15))
    assert plans[15].class_highres_angst == 0.0
    # References share the consensus from the second iteration after the split; the
    # M-step reconstructs the joint consensus from the iteration before.
    assert [it for it in plans if plans[it].references == "shared-consensus"][0] == 8
    assert [it for it in plans if plans[it].joint_consensus][0] == 7
    assert plans[1].auto_mask_sigma == 0.0 and plans[2].auto_mask_sigma == 3.0
    assert {p.tau2_estimate for p in plans.values()} == {"em"}   # automatic, merge test on
    assert all(p.write and not p.use_cc for p in plans.values())


def test_a_merge_adds_fixed_pose_iterations_from_the_merged_classes():
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6)
    schedule = after_merge(s, ScheduleState.initial(s), merged=True)
    assert schedule.merge_extra == 3
    plans = _plans(s, schedule)
    assert [plans[it].phase for it in (14, 15, 16, 17, 18)] == \
        ["fixed-pose"] + ["merged-fixed-pose"] * 3 + ["em"]
    assert plans[15].assignments == "current" and plans[16].assignments == "free"
    assert not plans[15].merge_test
    # Without a merge the schedule goes on to full EM.
    plans = _plans(s, after_merge(s, ScheduleState.initial(s), merged=False))
    assert plans[15].phase == "em" and plans[15].assignments == "free"


def test_the_fixed_pose_phase_ends_when_the_split_evidence_stops_rising():
    """--classify_fixed_until_best: the evidence is read after iteration 8 (the split's
    first EM iteration), goes on while it rises, and the phase ends with the first
    iteration that does not raise it; the merge test and full EM then come at once.
    The merge's extra iterations and the second test count from that end."""
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6)
    schedule = ScheduleState.initial(s)
    for it, score, ended in ((9, 5.0, False), (10, 6.5, False), (11, 6.5, True)):
        schedule, stop = after_fixed_check(schedule, it, score)
        assert stop is ended
        if not ended:
            assert plan_iteration(s, schedule, it + 1).fixed_check
    assert schedule.fixed_scores == (5.0, 6.5, 6.5) and schedule.fixed_end == 10
    plans = _plans(s, schedule)
    assert [plans[it].phase for it in (9, 10, 11)] == ["fixed-pose", "fixed-pose", "em"]
    assert [it for it in plans if plans[it].merge_test] == [11]
    assert not any(plans[it].fixed_check for it in plans)         # decided once
    assert (plans[11].search, plans[11].class_highres_angst) == ("local", 0.0)
    merged = after_merge(s, schedule, merged=True)
    plans = _plans(s, merged)
    assert [plans[it].phase for it in (11, 13, 14)] == ["merged-fixed-pose"] * 2 + ["em"]
    assert plans[11].assignments == "current" and plans[12].assignments == "free"
    assert [it for it in plans if plans[it].merge_retest] == [22]
    # A score that falls at the first comparison ends the phase after 3 iterations.
    fall, _ = after_fixed_check(after_fixed_check(ScheduleState.initial(s), 9, 2.0)[0],
                                10, 1.0)
    assert fall.fixed_end == 9 and _plans(s, fall)[10].merge_test
    # --classify_fixed_all, or too short a phase to compare two readings: no checks.
    assert not any(p.fixed_check for p in _plans(replace(s, classify_fixed_until_best=False))
                   .values())
    assert not any(p.fixed_check for p in _plans(replace(s, classify_fixed_iter=2)).values())
    assert [it for it, p in _plans(replace(s, classify_fixed_iter=3)).items()
            if p.fixed_check] == [9]


def test_the_schedule_and_its_scores_survive_a_state_file(tmp_path):
    """The scores and the phase's end are saved with the state (``--continue`` repeats
    the decision), as floats and an int."""
    import numpy as np
    from cryoclass_plugin.engine.model import ModelState
    schedule = replace(ScheduleState(consensus_end=6), fixed_scores=(1.5, 2.25),
                       fixed_end=9)
    model = ModelState(box=4, apix=1.0, n_classes=1, n_groups=1,
                       refs=np.zeros((1, 4, 4, 4), np.float32), pdf_class=np.ones(1),
                       sigma2=np.ones((1, 3)), tau2=np.ones((1, 3)), ssnr=np.zeros((1, 3)),
                       class_resolution_shell=np.zeros(1, int), sigma_offset_angst=1.0,
                       current_shell=2, iteration=9, schedule=schedule)
    model.save(str(tmp_path / "s.npz"))
    assert ModelState.load(str(tmp_path / "s.npz")).schedule == schedule
    # The scores come back from JSON as a list; the state holds a tuple.
    assert ScheduleState(consensus_end=6, fixed_scores=[1, 2]).fixed_scores == (1.0, 2.0)


def test_the_merge_test_runs_again_before_the_last_iterations():
    """--merge_retest_iter 4 of 25: the second test before iteration 22, once the first
    has run; after a merge there, iteration 22 starts from the merged classes."""
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6)
    assert not any(p.merge_retest for p in _plans(s).values())      # the first not yet run
    for merged in (False, True):
        plans = _plans(s, after_merge(s, ScheduleState.initial(s), merged=merged))
        assert [it for it in plans if plans[it].merge_retest] == [22]
        assert plans[22].phase == "em" and plans[22].assignments == "free"
    done = after_retest(after_merge(s, ScheduleState.initial(s), merged=True), merged=True)
    plans = _plans(s, done)
    assert not any(p.merge_retest for p in plans.values())
    assert plans[22].assignments == "current" and plans[23].assignments == "free"
    # Off, or no room for two full-EM iterations before it (10 iterations, 3 + 2 + 1
    # before full EM, as the golden run): no second test.
    off = replace(s, merge_retest_iter=0)
    assert not any(p.merge_retest for p in _plans(off, after_merge(off, ScheduleState.initial(off),
                                                                    merged=True)).values())
    short = _settings(init_classes="pca", n_classes=4, n_iter=10, consensus_iter=3,
                      classify_fixed_iter=2, merge_fixed_iter=1)
    assert not any(p.merge_retest for p in _plans(short, after_merge(
        short, ScheduleState.initial(short), merged=True)).values())


def test_an_extended_consensus_moves_the_split():
    s = _settings(init_classes="consensus", n_classes=3, n_iter=25, consensus_iter=6)
    plans = _plans(s, replace(ScheduleState.initial(s), consensus_end=8))
    assert [plans[it].phase for it in (6, 7, 8, 9)] == \
        ["consensus", "consensus-local", "consensus-local", "split"]
    assert plans[9].split == "restarts" and plans[17].merge_test


def test_relion_start():
    s = _settings(n_classes=3, n_iter=25, firstiter_cc=True, norm=True)
    plans = _plans(s)
    assert {p.phase for p in plans.values()} == {"em"}
    assert {(p.search, p.healpix_order) for p in plans.values()} == {("global", 2)}
    assert plans[1].assignments == "random" and plans[2].assignments == "free"
    assert plans[1].use_cc and not plans[2].use_cc
    assert {(p.references, p.auto_mask_sigma, p.tau2_estimate, p.joint_consensus)
            for p in plans.values()} == {("plain", 0.0, "power", False)}
    assert not any(p.split or p.merge_test or p.extension_check for p in plans.values())
    # RELION's local searches, and no alignment at all.
    local = _plans(_settings(n_classes=3, n_iter=5, sigma_ang=5.0))
    assert {(p.search, p.healpix_order, p.sigma_ang) for p in local.values()} == \
        {("local", 2, 5.0)}
    fixed = _plans(_settings(n_classes=3, n_iter=5, skip_align=True))
    assert {p.search for p in fixed.values()} == {"none"}
    # Input classes in iteration 1; one class is plain EM whatever the start.
    assert _plans(_settings(n_classes=3, n_iter=5, init_classes="input"))[1].assignments \
        == "input"
    assert {p.phase for p in _plans(_settings(init_classes="pca", n_iter=5)).values()} \
        == {"em"}


def test_describe_schedule_has_one_line_per_iteration():
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6)
    lines = describe_schedule(s).splitlines()
    assert len(lines) == 26
    assert "no consensus extension, all the fixed-pose iterations and no merge" in lines[0]
    assert "after fixed-pose check" in lines[9] and "after fixed-pose check" not in lines[8]
    assert lines[7].startswith("iter   7  split") and "after split pca" in lines[7]
    assert "after merge test" in lines[15] and "local order 4 sigma 3 deg" in lines[15]
    assert "local order 3 sigma 5 deg" in lines[5]


# ----------------------------------------------------------------------------- shape

MAX_FUNCTION_LINES = 80
#: Files with longer functions, owned elsewhere: the simulator's one data-set recipe and
#: the STAR particle reader.
LONG_FUNCTIONS_ALLOWED = set()


def test_no_engine_function_is_longer_than_a_page():
    long = []
    for path in sorted(ENGINE.glob("*.py")):
        if path.name in LONG_FUNCTIONS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _engine_imports(path):
    """Engine modules that ``path`` imports (at module level or inside functions)."""
    names = set()
    modules = {p.stem for p in ENGINE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("cryoclass_plugin.engine."):
            names.add(node.module.split(".")[2])
    return names & modules


#: Import cycles owned elsewhere (the MRC and STAR readers).
CYCLES_ALLOWED = {frozenset({"mrc_io", "star_io"})}


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def import_cycles(graph):
    """The sets of modules that import each other, directly or through others."""
    reach = {m: _reachable(graph, m) for m in graph}
    return {frozenset(m2 for m2 in graph if m2 in reach[m] and m in reach[m2]) | {m}
            for m in graph if m in reach[m]}


def test_engine_modules_import_no_cycle():
    graph = {p.stem: _engine_imports(p) for p in ENGINE.glob("*.py")}
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == \
        {frozenset("abc")}                                   # the check finds cycles
    cycles = import_cycles(graph) - CYCLES_ALLOWED
    assert not cycles, sorted(map(sorted, cycles))


@pytest.mark.parametrize("module", sorted(p.stem for p in ENGINE.glob("*.py")
                                          if p.stem != "__main__"))
def test_each_engine_module_imports_on_its_own(module):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", f"import cryoclass_plugin.engine.{module}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_describe_plan_reads_no_image(tmp_path):
    """``Refinement(settings).describe_plan()`` (``cryoclass refine --dry_run``) reads the
    STAR table and the stacks' headers only: it works with the image data cut off the
    stacks, which the run itself reports."""
    from cryoclass_plugin.engine.errors import CryoClassError
    from cryoclass_plugin.engine.refine import Refinement
    from cryoclass_plugin.engine.simulate import simulate_dataset
    simulate_dataset(str(tmp_path), n=12, box=16, apix=10.0, snr=1.0, n_classes=2, seed=1)
    for stack in tmp_path.glob("*.mrcs"):
        with open(stack, "r+b") as fh:      # keep the 1024-byte header, drop the images
            fh.truncate(1024 + 4 * 16 * 16)
    s = Settings(input_star=str(tmp_path / "particles.star"), ref=str(tmp_path / "ref.mrc"),
                 output_root=str(tmp_path / "run"), init_classes="pca", n_classes=2,
                 n_iter=12, consensus_iter=3, preread_images=True)
    r = Refinement(s, log=lambda line: None)
    text = r.describe_plan()
    assert text == describe_schedule(s) and len(text.splitlines()) == 13
    with pytest.raises(CryoClassError, match="mrcs"):
        r.ctx


def test_local_searches_on_a_finer_grid_search_finer_offsets():
    """--local_offsets_finer (default): the searches after the split (two HEALPix
    orders finer) halve the offsets' range and step twice; the consensus (its local
    iterations too), fixed poses, RELION's local searches at --healpix_order and
    --local_offsets_coarse keep the run's grid."""
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6,
                  offset_range=5.0, offset_step=2.0)
    plans = _plans(s)
    assert [(plans[it].offset_range_px, plans[it].offset_step_px) for it in (4, 5, 7, 15)] \
        == [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (1.25, 0.5)]
    assert "offsets to 1.25 px offset step 0.50 px" in plans[15].describe()
    coarse = _plans(replace(s, local_offsets_finer=False))
    assert {(p.offset_range_px, p.offset_step_px) for p in coarse.values()} == {(0.0, 0.0)}
    relion_local = _plans(_settings(n_classes=3, n_iter=5, sigma_ang=3.0))
    assert {p.search for p in relion_local.values()} == {"local"}
    assert {(p.offset_range_px, p.offset_step_px) for p in relion_local.values()} == {(0, 0)}
    finer = _plans(replace(s, classify_local_order=5))
    assert (finer[15].offset_range_px, finer[15].offset_step_px) == (0.625, 0.25)


def test_the_last_iterations_search_one_order_finer():
    """--classify_final_iter 2 (default): full EM's last two iterations search one
    HEALPix order finer than --classify_local_order, with --classify_final_sigma, and
    their offsets one more halving finer; 0 keeps full EM on one grid; the fixed-pose
    phase keeps its poses even where the last iterations reach into it; the option
    plays no part in RELION's start or with global searches after the split."""
    s = _settings(init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6,
                  offset_range=5.0, offset_step=2.0)
    plans = _plans(s)
    grids = [(plans[it].search, plans[it].healpix_order, plans[it].sigma_ang)
             for it in range(15, 26)]
    assert grids == [("local", 4, 3.0)] * 9 + [("local", 5, 2.0)] * 2
    assert (plans[24].offset_range_px, plans[24].offset_step_px) == (0.625, 0.25)
    assert "local order 5 sigma 2 deg" in plans[25].describe()
    off = _plans(replace(s, classify_final_iter=0))
    assert {(off[it].healpix_order, off[it].sigma_ang) for it in range(15, 26)} == {(4, 3.0)}
    wider = _plans(replace(s, classify_final_iter=15, classify_final_sigma=1.5))
    assert [wider[it].search for it in range(7, 15)] == ["none"] * 8
    assert {(wider[it].healpix_order, wider[it].sigma_ang) for it in range(15, 26)} \
        == {(5, 1.5)}
    capped = _plans(replace(s, classify_local_order=13))
    assert capped[25].healpix_order == 13
    relion = _plans(_settings(n_classes=3, n_iter=5))
    assert {(p.search, p.healpix_order) for p in relion.values()} == {("global", 2)}
    relion_local = _plans(_settings(n_classes=3, n_iter=5, sigma_ang=3.0))
    assert {(p.healpix_order, p.sigma_ang) for p in relion_local.values()} == {(2, 3.0)}
    global_after = _plans(replace(s, classify_local_sigma=0.0))
    assert {(global_after[it].search, global_after[it].healpix_order)
            for it in range(15, 26)} == {("global", 2)}
