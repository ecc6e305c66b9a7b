"""Constants of the cryoclass Scipion plugin: variable names, protocol enums, defaults.

Importable without pyworkflow or pwem (the engine and the command line use it too).
"""

# ---- Plugin variables (scipion.conf [PLUGINS] section or the environment) ----
#: Command that runs the engine; the protocol appends RELION-style flags to it.
CRYOCLASS_ENGINE = "CRYOCLASS_ENGINE"
#: ``mpirun`` used for the engine's MPI runs (PATH of the jobs and headless hosts.conf).
CRYOCLASS_MPIRUN = "CRYOCLASS_MPIRUN"

#: Engine sub-command name (``cryoclass refine``), the equivalent of ``relion_refine``.
ENGINE_PROGRAM = "cryoclass"
ENGINE_SUBCOMMAND = "refine"

#: Root name of the engine outputs inside a protocol's extra/ folder (``--o``).
OUTPUT_ROOT = "cryoclass"

# ---- Angular sampling (RELION's "Initial angular sampling" menu) ----
#: Labels of the menu, in the order of RELION's GUI.
ANGULAR_SAMPLING_LIST = ["30", "15", "7.5", "3.7", "1.8", "0.9", "0.5", "0.2", "0.1"]
#: Default entry (7.5 degrees).
ANGULAR_SAMPLING_DEFAULT = 2


def healpix_order_for_sampling(index):
    """``--healpix_order`` for entry ``index`` of :data:`ANGULAR_SAMPLING_LIST`.

    RELION's GUI passes ``order = index + 1 - oversampling`` together with
    ``--oversampling 1``, i.e. ``order = index``: the menu shows the step reached after
    one oversampling step, so "7.5" (index 2) is ``--healpix_order 2`` (HEALPix order 2
    is about 15 degrees; one oversampling step halves it to 7.5) and "30" is order 0.
    """
    return int(index)


# ---- "Mask individual particles with zeros?" ----
MASK_FILL_ZERO = 0
MASK_FILL_NOISE = 1

# ---- Class selection protocol ----
SELECT_BY_NUMBER = 0
SELECT_AUTO = 1

#: Symmetry string accepted when the engine's parser is missing (fallback check only).
DEFAULT_SYMMETRY = "C1"
