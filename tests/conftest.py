"""One headless Scipion configuration for the whole test session.

pyworkflow reads its configuration from the environment when it is first imported, so
this runs before any test module (or plugin) imports pyworkflow/pwem.  The root is
``$CRYOCLASS_TEST_SCIPION_HOME`` when set (kept, for inspection), else a temporary folder
removed at exit.  Test modules may still call ``setup_for_tests()``: it returns this one.
"""
from cryoclass_plugin.scipion_env import setup_for_tests

SCIPION_ENV = setup_for_tests()


def aligned_particles(folder, name, seed, angles):
    """A 40-particle one-class set (box 32, 7 A/px, SNR 2, no shifts) in ``folder`` whose
    input STAR ``<name>.star`` carries the true origins and the Euler angles
    ``angles(truth_table) -> (rot, tilt, psi)`` (e.g. the true ones, perturbed).
    Returns the truth table."""
    import starfile
    from cryoclass_plugin.engine.simulate import simulate_dataset
    simulate_dataset(str(folder), n=40, box=32, apix=7.0, snr=2.0, n_classes=1, seed=seed,
                     max_shift_px=0.0)
    truth = starfile.read(folder / "truth.star")
    truth = truth["particles"] if isinstance(truth, dict) else truth
    star = starfile.read(folder / "particles.star", always_dict=True)
    parts = star["particles"]
    parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"] = angles(truth)
    for axis in ("X", "Y"):
        parts[f"rlnOrigin{axis}Angst"] = truth[f"rlnOrigin{axis}Angst"].to_numpy()
    starfile.write(star, folder / f"{name}.star", overwrite=True)
    return truth


def refinement_at_true_poses(data, n_classes, diameter_angst):
    """A ``--init_classes pca`` Refinement (K = ``n_classes``, CTF, T=4, solvent
    flattened) of the simulated set in ``data`` (outputs beside it), started, with the
    model's poses set to the true ones.  Returns ``(refinement, model, truth)``,
    ``truth`` the truth table in the run's particle order."""
    import argparse
    import starfile
    from cryoclass_plugin.commands import refine as refine_cmd
    from cryoclass_plugin.engine.refine import Refinement
    parser = argparse.ArgumentParser()
    refine_cmd.add_args(parser)
    args = parser.parse_args(["--i", str(data / "particles.star"), "--ref", str(data / "ref.mrc"),
                              "--o", str(data.parent / "out" / "run"),
                              "--K", str(n_classes), "--ctf",
                              "--tau2_fudge", "4", "--particle_diameter", str(diameter_angst),
                              "--flatten_solvent", "--zero_mask", "--init_classes", "pca",
                              "--iter", "25"])
    r = Refinement(refine_cmd.settings_from_args(args), log=lambda line: None)
    model = r.start()
    truth = starfile.read(data / "truth.star")["particles"]
    truth = truth.set_index("rlnImageName").loc[r.table.df["rlnImageName"].to_numpy()]
    model.part_eulers = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    model.part_origin_angst = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    return r, model, truth
