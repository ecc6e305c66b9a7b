"""``--sigma_rot/--sigma_tilt/--sigma_psi``: RELION's per-angle local-search prior (a
Gaussian on the projection direction, or on rot or tilt alone, and one on psi, each
searched to 3 sigma) in place of ``--sigma_ang``'s rotation-angle prior."""
import cryoclass_plugin  # noqa: F401  (first: it chooses numpy's BLAS kernels)
import numpy as np
import pytest
import starfile

from cryoclass_plugin import cli
from cryoclass_plugin.engine import local_search
from cryoclass_plugin.engine.geometry import euler_to_matrix, matrix_to_euler
from cryoclass_plugin.engine.local_search import EulerPrior
from cryoclass_plugin.engine.metrics import angular_errors_deg
from cryoclass_plugin.engine.sampling import OrientationGrid

PRIOR = np.array([[40.0, 80.0, 20.0]])


def _candidates(prior):
    grid = OrientationGrid(2)
    views = local_search.prior_views(PRIOR, np.eye(3)[None])
    ids, logp = local_search.candidate_rotations(grid, views, prior)
    rot, tilt, psi = matrix_to_euler(grid.matrices[ids[0]])
    direction = grid.matrices[ids[0]][:, 2, :] @ euler_to_matrix(*PRIOR.T)[0][2]
    dir_deg = np.rad2deg(np.arccos(np.clip(direction, -1, 1)))
    dpsi = np.abs((psi - PRIOR[0, 2] + 180) % 360 - 180)
    return dir_deg, dpsi, logp[0]


def test_psi_only_prior_frees_the_direction():
    dir_deg, dpsi, logp = _candidates(EulerPrior(-1, -1, 5.0))
    assert dpsi.max() <= 15.0 + 1e-6
    assert dir_deg.max() > 150                      # every direction is searched
    np.testing.assert_allclose(logp, -0.5 * (dpsi / 5.0) ** 2, atol=1e-6)


def test_direction_prior_frees_psi_and_takes_the_larger_width():
    dir_deg, dpsi, logp = _candidates(EulerPrior(2.0, 5.0, -1))
    assert dir_deg.max() <= 15.0 + 1e-6 and dpsi.max() > 150
    np.testing.assert_allclose(logp, -0.5 * (dir_deg / 5.0) ** 2, atol=1e-6)


def test_fine_pass_prior_has_no_cut():
    """Children of a significant rotation get the Gaussian terms, never -inf."""
    far = euler_to_matrix(np.array([40.0]), np.array([80.0]), np.array([80.0]))
    logp = local_search.rotation_log_prior(far[None], local_search.prior_views(
        PRIOR, np.eye(3)[None]), EulerPrior(-1, -1, 5.0))
    np.testing.assert_allclose(logp, [[-0.5 * (60 / 5) ** 2]])


@pytest.fixture(scope="module")
def psi_off(tmp_path_factory):
    """Particles whose input angles are their true poses with psi off by 20 degrees."""
    from conftest import aligned_particles
    data = tmp_path_factory.mktemp("euler")
    truth = aligned_particles(data, "psi_off", 3, lambda t: (
        t["rlnAngleRot"].to_numpy(), t["rlnAngleTilt"].to_numpy(),
        t["rlnAnglePsi"].to_numpy() + 20.0))
    return data, truth


def _median_error(data, truth, root, *flags):
    assert cli.main(["refine", "--i", str(data / "psi_off.star"), "--ref",
                     str(data / "true_class001.mrc"), "--o", str(root), "--K", "1",
                     "--iter", "1", "--healpix_order", "2", "--offset_range", "0", "--ctf",
                     "--particle_diameter", "200", "--zero_mask", "--j", "1"]
                    + list(flags)) == 0
    out = starfile.read(f"{root}_it001_data.star")["particles"]
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    return float(np.median(angular_errors_deg(out[cols].to_numpy(), truth[cols].to_numpy())))


def test_a_wide_psi_prior_reaches_the_true_psi_a_narrow_one_cannot(psi_off, tmp_path):
    data, truth = psi_off
    narrow = _median_error(data, truth, tmp_path / "narrow" / "run", "--sigma_rot", "2",
                           "--sigma_tilt", "2", "--sigma_psi", "2")
    wide = _median_error(data, truth, tmp_path / "wide" / "run", "--sigma_rot", "2",
                         "--sigma_tilt", "2", "--sigma_psi", "10")
    assert narrow > 12 and wide < 8, (narrow, wide)


def test_sigma_ang_and_per_angle_sigmas_are_exclusive(psi_off, tmp_path, capsys):
    data, _ = psi_off
    assert cli.main(["refine", "--i", str(data / "psi_off.star"), "--ref",
                     str(data / "ref.mrc"), "--o", str(tmp_path / "run"), "--iter", "1",
                     "--sigma_ang", "3", "--sigma_psi", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "give one or the other" in err and len(err.splitlines()) == 1
