"""The adaptive length of the consensus phase (``--consensus_extra_iter``): the decision
rule of :meth:`Refinement._extend_consensus` on its own (the whole path is measured in
benchmarks/RESULTS.md, "adaptive consensus")."""
from types import SimpleNamespace

from cryoclass_plugin.engine.model import ModelState
from cryoclass_plugin.engine.refine import Refinement, Settings


def _refinement(**settings):
    """A Refinement with only what the schedule reads (no data)."""
    r = Refinement.__new__(Refinement)
    r.s = Settings(input_star="p.star", output_root="run", ref="ref.mrc", init_classes="pca", n_classes=3, n_iter=25, consensus_iter=6,
                   consensus_local_iter=2, **settings)
    r.orientations = SimpleNamespace(angular_step_deg=15.0, healpix_order=2)
    r._grids = {3: "order-3 grid"}
    r.comm = SimpleNamespace(rank=0)
    r.log = lambda line: None
    r.consensus_end = r.s.consensus_iter
    return r


def _model(orient_change):
    m = ModelState.__new__(ModelState)
    m.changes = {"orientations": orient_change, "offsets": 1.0, "classes": 0.0}
    m.consensus_end = 0
    return m


def _schedule(r, changes):
    """Run the decision through iterations 2..25 with the given mean orientation change
    after each iteration (a dict; 1 deg where not given); return the local/global plan."""
    for it in range(2, 26):
        r._extend_consensus(_model(changes.get(it - 1, 1.0)), it)
    return r.consensus_end, r._last_global_consensus()


def test_converged_consensus_keeps_the_set_length():
    r = _refinement()
    assert _schedule(r, {4: 14.9}) == (6, 4)        # below the 15-degree step
    assert r._search_for(4) == {"sigma_ang": -1.0}   # global
    assert r._search_for(5)["sigma_ang"] == 5.0      # local
    assert r._search_for(7)["sigma_ang"] == 5.0


def test_moving_poses_extend_the_global_consensus_and_shift_the_split():
    r = _refinement()
    assert _schedule(r, {4: 35.0, 5: 29.0, 6: 15.5, 7: 7.7}) == (9, 7)
    assert r._search_for(7) == {"sigma_ang": -1.0}
    assert r._search_for(8)["sigma_ang"] == 5.0
    assert r._shares_references(10) is False and r._shares_references(11) is True


def test_extension_is_capped():
    r = _refinement(consensus_extra_iter=2)
    assert _schedule(r, {k: 40.0 for k in range(1, 26)}) == (8, 6)
    r = _refinement(consensus_extra_iter=0)
    assert _schedule(r, {k: 40.0 for k in range(1, 26)}) == (6, 4)
    # At least two full-EM iterations stay after the 8 fixed-pose ones: 25 - 8 - 2 = 15.
    r = _refinement(consensus_extra_iter=50)
    assert _schedule(r, {k: 40.0 for k in range(1, 26)}) == (15, 13)


def test_the_decision_is_saved_for_continue():
    r = _refinement()
    m = _model(35.0)
    r._extend_consensus(m, 5)
    assert r.consensus_end == 7 and m.consensus_end == 7
