"""Splitting a class within itself into an empty class (``--split_into_empty``,
:mod:`cryoclass_plugin.engine.subsplit`): the pieces on given numbers, and on a small
simulated set a state that the classes at hand lumped with another one (a subunit absent
*and* an arm swung, inside the subunit-absent class) is found, while classes that each
hold one state are left alone."""
import copy
from dataclasses import replace

import numpy as np
import pytest

from cryoclass_plugin.engine import subsplit
from cryoclass_plugin.engine.simulate import simulate_dataset


def test_two_gaussians_cut_a_small_group_where_two_means_cut_halfway():
    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.15
    x = rng.standard_normal(2000) + 2.5 * truth
    labels = subsplit.two_gaussians(x)
    small = labels == np.argmin(np.bincount(labels))
    accuracy = np.mean(small == truth)
    kmeans = subsplit.kmeans(x[:, None], 2)
    kmeans_small = kmeans == np.argmin(np.bincount(kmeans))
    assert accuracy > 0.9, accuracy
    assert accuracy > np.mean(kmeans_small == truth) + 0.02


def test_directions_are_the_own_eigenvolumes_and_the_other_pairs():
    differences = {(0, 1): ("d01", "f01"), (0, 3): ("d03", "f03"), (1, 3): ("d13", "f13")}
    directions = subsplit.class_directions(1, [0, 1, 3], differences)
    own = [(f"own eigenvolume {j}", None) for j in range(1, subsplit.OWN_EIGENVOLUMES + 1)]
    assert directions == own + [("class 1 - class 4", "d03"),
                                ("class 1 - class 4, focused", "f03")]


def test_a_pair_difference_is_kept_where_it_stands_out_of_its_noise():
    from cryoclass_plugin.engine.masks import soft_sphere_mask
    box, apix = 40, 4.0
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")

    def blob(cz):
        return np.exp(-((z - cz) ** 2 + y ** 2 + x ** 2) / (2 * 2.0 ** 2))
    inside = soft_sphere_mask(box, 16)
    noise = 0.05 * np.random.default_rng(0).standard_normal((box,) * 3) * inside
    difference = blob(8) - blob(-8) + noise           # density gained here, lost there
    focused = subsplit.focused_difference(difference, apix, inside)
    for centre in ((28, 20, 20), (12, 20, 20)):       # both lobes kept as they are
        assert abs(focused[centre] - difference[centre]) < 1e-5
    away = (z ** 2 + y ** 2 + x ** 2 < 15 ** 2) & (np.abs(y) > 11)  # > 44 A from both
    assert np.abs(focused[away]).max() < 1e-3, np.abs(focused[away]).max()
    assert np.abs(noise[away]).max() > 0.1


def test_a_new_class_needs_a_cut_that_pays_and_reproduces():
    def ev(ratio, agree, smaller_side):
        return {"ratio": ratio, "agree": agree, "agree_sides": (smaller_side, 0.95)}
    assert subsplit.is_two_structures(ev(0.35, 0.86, 0.7), 0.3, 0.7)
    # Reproduced by a lopsided cut along noise, recovering nothing: not a class.
    assert not subsplit.is_two_structures(ev(-0.16, 0.97, 0.6), 0.3, 0.7)
    assert not subsplit.is_two_structures(ev(0.5, 0.6, 0.6), 0.3, 0.7)
    # The smaller side's own share does not decide: a cut that held a 5 % state had
    # 9 % of its smaller side's held-out particles choose its map.
    assert subsplit.is_two_structures(ev(0.35, 0.87, 0.09), 0.3, 0.7)


def test_the_best_cuts_fill_the_empty_classes_one_per_class_cut():
    members = np.arange(10)
    cut = np.array([True] * 3 + [False] * 7)
    candidates = [(0, members, cut, {"ratio": 0.4}), (2, members + 10, cut, {"ratio": 0.9}),
                  (3, members + 20, cut, {"ratio": 0.5})]
    chosen = subsplit.choose_splits(candidates, [5, 1])
    assert [(parent, new) for parent, new, _, _ in chosen] == [(2, 1), (3, 5)]
    assert chosen[0][2].tolist() == [10, 11, 12]
    assert subsplit.choose_splits(candidates, []) == []


SNR, SWING, N = 0.3, 20.0, 800
STATES = [((), 0.40), (("swing",), 0.25), (("subunit",), 0.20), (("swing", "subunit"), 0.15)]


@pytest.fixture(scope="module")
def lumped_run(tmp_path_factory):
    """A K=5 Refinement on 800 particles of the complex phantom (48 px, 5 A/px, SNR
    0.3, the arm swung by 20 degrees) at the true poses, with the true classes except
    that the fourth state (arm swung and subunit absent, 15 %) sits in the
    subunit-absent class: classes 4 and 5 empty; two fixed-pose iterations give the
    maps and spectra of a run's state.  Measured: the cut along the whole-minus-swung
    difference recovers 2.04 of a random split's cost (95 % reproduced; the state's
    recall 0.97, purity 0.97); the cuts of the one-state classes -0.00 to 0.04."""
    data = tmp_path_factory.mktemp("subsplit") / "data"
    info = simulate_dataset(str(data), n=N, box=48, apix=5.0, snr=SNR, n_classes=4,
                            seed=1, shape="complex", states=[s for s, _ in STATES],
                            class_fractions=[f for _, f in STATES], swing_deg=SWING)
    assert info["oracle_accuracy"] >= 0.95, info
    from conftest import refinement_at_true_poses
    r, model, truth = refinement_at_true_poses(data, 5, 220)
    states = truth["rlnClassNumber"].to_numpy() - 1
    lumped = np.where(states == 3, 2, states)
    model.current_shell = 16
    for it in (1, 2):
        plan = replace(r.plan(model, it), search="none", write=False)
        model = r.iterate(model, plan, allowed=lumped)
    assert np.bincount(model.part_class, minlength=5)[3:].sum() == 0
    return r, model, states


def test_a_state_inside_another_states_class_gets_an_empty_class(lumped_run):
    r, model, states = lumped_run
    model = copy.deepcopy(model)
    lines = []
    r.log = lines.append
    assert r._split_into_empty(model) is True, "\n".join(lines)
    new = model.part_class == 3
    recall = np.mean(new[states == 3])
    purity = np.mean(states[new] == 3)
    print("\n".join(lines), f"\nrecall {recall:.2f} purity {purity:.2f}")
    assert recall >= 0.8 and purity >= 0.8, (recall, purity)
    assert abs(model.pdf_class.sum() - 1.0) < 1e-9 and model.pdf_class[3] > 0.1
    # One state to find, so the other empty class stays empty.
    assert (model.part_class == 4).sum() == 0 and model.pdf_class[4] == 0.0
    assert sum(line.startswith("split: ") for line in lines) == 1


def test_classes_of_one_state_each_are_not_cut(lumped_run):
    r, model, states = lumped_run
    model = copy.deepcopy(model)
    for it in (3, 4):          # the true classes, class 5 empty
        plan = replace(r.plan(model, it), search="none", write=False)
        model = r.iterate(model, plan, allowed=states)
    lines = []
    r.log = lines.append
    assert r._split_into_empty(model) is False, "\n".join(lines)
    assert (model.part_class == states).all()


def test_the_option_help_states_the_thresholds_in_use():
    from cryoclass_plugin.engine.options import OPTIONS_BY_FIELD
    text = OPTIONS_BY_FIELD["split_into_empty"].help % ()
    assert f"recovers {subsplit.SPLIT_THRESHOLD:g} of a random split's cost" in text
    assert f"{100 * subsplit.MIN_SIDE_FRACTION:g} % of the particles" in text
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    assert f"its own top {words[subsplit.OWN_EIGENVOLUMES]} heterogeneity" in text


def test_the_focused_difference_cuts_the_lumped_state_at_least_as_cleanly(lumped_run):
    r, model, states = lumped_run
    from cryoclass_plugin.engine.masks import soft_sphere_mask
    apix = r.ctx.data.apix
    inside = soft_sphere_mask(model.box, 220 / (2 * apix))
    differences = subsplit.pair_differences(model, [0, 1, 2], apix, inside)
    whole, focused = differences[(0, 1)]
    assert np.count_nonzero(focused) < 0.5 * np.count_nonzero(whole)
    members = np.nonzero(model.part_class == 2)[0]
    coords = subsplit.class_coordinates(r.ctx, model, 2, members,
                                        [("whole", whole), ("focused", focused)])
    errors = [np.sum(subsplit.smaller_side(coords[:, j]) != (states[members] == 3))
              for j in range(2)]
    print("misplaced (whole, focused):", errors)
    assert errors[1] <= errors[0] and errors[1] <= 0.05 * len(members), errors


def test_a_change_that_is_not_the_top_eigenvolume_is_cut_along_a_lower_one(lumped_run):
    """All four states (two independent changes) in one class: the top eigenvolume
    follows one change, and only a lower one of the class's own eigenvolumes cuts
    along the other, the way the swing of swing3 (seed 1) hid in its class's third.
    Measured: the cut along the top eigenvolume agrees with the swing for 82 % of the
    particles and with the subunit for 63 %; along the second, with the subunit for 90 %."""
    r, model, states = lumped_run
    model = copy.deepcopy(model)
    one = np.zeros_like(states)
    for it in (3, 4):
        plan = replace(r.plan(model, it), search="none", write=False)
        model = r.iterate(model, plan, allowed=one)
    members = np.arange(len(states))
    directions = [(f"own {j}", None) for j in range(subsplit.OWN_EIGENVOLUMES)]
    coords = subsplit.class_coordinates(r.ctx, model, 0, members, directions)
    changes = {"swing": np.isin(states, [1, 3]), "subunit": np.isin(states, [2, 3])}

    def accuracy(j, change):      # the cut along eigenvolume j against one change
        side = subsplit.two_gaussians(coords[:, j]) == 1
        return max(np.mean(side == change), np.mean(side != change))
    table = {name: [accuracy(j, c) for j in range(coords.shape[1])]
             for name, c in changes.items()}
    print(table)
    first = max(changes, key=lambda name: table[name][0])
    other = "swing" if first == "subunit" else "subunit"
    assert table[first][0] >= 0.8, table
    assert table[other][0] < 0.75, table             # the top one misses the other change
    assert max(table[other][1:]) >= 0.85, table      # a lower one cuts along it
