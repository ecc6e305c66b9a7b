"""``--relax_sym`` (RELION's symmetry relaxation for pseudo-symmetric particles): the
local searches also look around the poses the relaxed point group relates to each
particle's current one; the maps keep ``--sym``."""
import cryoclass_plugin  # noqa: F401  (first: it chooses numpy's BLAS kernels)
import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import local_search
from cryoclass_plugin.engine.geometry import euler_to_matrix, matrix_to_euler
from cryoclass_plugin.engine.metrics import angular_errors_deg
from cryoclass_plugin.engine.sampling import OrientationGrid
from cryoclass_plugin.engine.symmetry import search_views

#: The C2 element about z: a pose A and A @ RZ180 are the same view of a C2 particle.
RZ180 = np.diag([-1.0, -1.0, 1.0])


def test_search_views_add_the_relaxed_groups_elements():
    assert np.allclose(search_views("C1"), np.eye(3)[None])
    views = search_views("C1", "C2")
    assert len(views) == 2 and np.allclose(views[0], np.eye(3)) and np.allclose(views[1], RZ180)
    assert len(search_views("C2", "D2")) == 4          # C2 is inside D2: no duplicates


def test_candidates_surround_both_related_poses():
    grid = OrientationGrid(2)
    prior = np.array([[30.0, 70.0, 10.0]])
    A0 = euler_to_matrix(*prior.T)[0]
    for relax, expect_flip in (("", False), ("C2", True)):
        views = local_search.prior_views(prior, search_views("C1", relax))
        ids, _ = local_search.candidate_rotations(grid, views, 3.0)
        mats = grid.matrices[ids[0]]
        near = lambda B: (np.einsum("lij,ij->l", mats, B) - 1) / 2 > np.cos(np.deg2rad(10))
        assert near(A0).any()
        assert near(A0 @ RZ180).any() == expect_flip


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """Particles whose input angles are their true poses times the C2 element."""
    from conftest import aligned_particles
    data = tmp_path_factory.mktemp("relax")
    truth = aligned_particles(data, "flipped", 2, lambda t: matrix_to_euler(euler_to_matrix(
        t["rlnAngleRot"], t["rlnAngleTilt"], t["rlnAnglePsi"]) @ RZ180))
    return data, truth


def _run(data, root, *extra):
    return cli.main(["refine", "--i", str(data / "flipped.star"), "--ref",
                     str(data / "true_class001.mrc"), "--o", str(root), "--K", "1",
                     "--iter", "1", "--sigma_ang", "3", "--healpix_order", "2",
                     "--offset_range", "0", "--ctf", "--particle_diameter", "200",
                     "--zero_mask", "--j", "1", "--random_seed", "1"] + list(extra))


def test_relax_sym_finds_the_related_pose_that_a_plain_local_search_cannot(flipped, tmp_path):
    data, truth = flipped
    errors = {}
    for relax in ("", "C2"):
        root = tmp_path / (relax or "plain") / "run"
        assert _run(data, root, *(["--relax_sym", relax] if relax else [])) == 0
        out = starfile.read(f"{root}_it001_data.star")["particles"]
        errors[relax] = np.median(angular_errors_deg(
            out[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
            truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
    assert errors[""] > 150 and errors["C2"] < 10, errors


def test_relax_sym_needs_local_searches(flipped, tmp_path, capsys):
    data, _ = flipped
    argv = ["refine", "--i", str(data / "flipped.star"), "--ref", str(data / "ref.mrc"),
            "--o", str(tmp_path / "run"), "--K", "1", "--iter", "1", "--relax_sym", "C2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "add --sigma_ang" in err and len(err.splitlines()) == 1
    assert cli.main(argv[:-1] + ["X7", "--sigma_ang", "3"]) == 2
    assert "is not valid" in capsys.readouterr().err
