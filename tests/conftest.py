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
