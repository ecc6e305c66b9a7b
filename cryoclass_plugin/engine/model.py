"""The state of a classification run between iterations.

``ModelState`` holds what RELION's model.star holds (class maps, class priors, noise and
signal spectra, SSNR, resolution, offset prior) plus the per-particle state of data.star
(class, angles, origins, max posterior, ...).  All arrays are numpy (host).

RELION's ``--norm`` and ``--scale`` state: ``part_norm`` is each particle's
normalisation correction (RELION's ``rlnNormCorrection``, the image's noise standard
deviation, in RELION's Fourier scale) and ``avg_norm`` their mean
(``rlnNormCorrectionAverage``); the E-step and M-step see each image multiplied by
``avg_norm / part_norm``.  ``scale_correction`` is each group's intensity scale
(``rlnGroupScaleCorrection``), which multiplies the CTF of the group's particles.
Without the flags they stay 1.

Units: spectra are per Fourier shell of the unpadded box (``N // 2 + 1`` shells), per
real/imaginary component, in the engine's unnormalised FFT scale; angles in degrees;
origins in Angstrom with RELION's sign.
"""
import dataclasses
import json
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from .atomic import replacing
from .errors import CryoClassError
from .fourier import shell_resolution_angstrom
from .plan import ScheduleState


@dataclass
class ModelState:
    box: int
    apix: float
    n_classes: int
    n_groups: int
    refs: np.ndarray                      # (K, N, N, N) float32
    pdf_class: np.ndarray                 # (K,)
    sigma2: np.ndarray                    # (G, n_shells) noise per group
    tau2: np.ndarray                      # (K, n_shells) signal per class
    ssnr: np.ndarray                      # (K, n_shells)
    class_resolution_shell: np.ndarray    # (K,) int
    sigma_offset_angst: float
    current_shell: int                    # E-step radius (pixels) of the next iteration
    iteration: int = 0
    # Per particle (n,):
    part_class: np.ndarray = None         # 0-based class
    part_eulers: np.ndarray = None        # (n, 3) rot, tilt, psi (deg)
    part_origin_angst: np.ndarray = None  # (n, 2) x, y (A)
    part_pmax: np.ndarray = None
    part_nsig: np.ndarray = None
    part_loglik: np.ndarray = None
    part_acc_rot: np.ndarray = None
    part_acc_trans_px: np.ndarray = None
    part_norm: np.ndarray = None          # (n,) norm correction (RELION rlnNormCorrection)
    avg_norm: float = 1.0                 # mean of part_norm (rlnNormCorrectionAverage)
    scale_correction: np.ndarray = None   # (G,) per group (rlnGroupScaleCorrection)
    # --joint_consensus after a consensus / PCA split: the reconstruction of all
    # particles together (mstep.reconstruct_consensus, focus).
    consensus_ref: np.ndarray = None      # (N, N, N) float32
    # The schedule decisions taken so far (consensus extension, merge test; :mod:`.plan`).
    schedule: ScheduleState = None
    changes: dict = field(default_factory=lambda: {"orientations": 999.0, "offsets": 999.0,
                                                    "classes": 1.0})
    log_likelihood: float = 0.0
    history: list = field(default_factory=list)

    @property
    def n_shells(self):
        return self.box // 2 + 1

    def shell_resolution(self):
        return shell_resolution_angstrom(self.n_shells, self.box, self.apix)

    def class_resolution_angst(self):
        res = self.shell_resolution()
        return np.array([res[max(int(s), 1)] if s > 0 else 999.0
                         for s in self.class_resolution_shell])

    def current_resolution_angst(self):
        return float(self.box * self.apix / max(self.current_shell, 1))

    def save(self, path, settings=None, map_paths=None):
        """All state to an ``.npz`` (exact floats: ``--continue`` reproduces a run),
        with the run's settings (a dict) so that ``--continue`` needs no other flags.

        ``map_paths``: the K class maps of this state, already written next to ``path``
        (:func:`.outputs.write_iteration`); the state then names them with a checksum of
        their values instead of holding the maps a second time (1.1 GB per iteration at
        box 360 with K=6), and :meth:`load` reads them back, bit for bit."""
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in self.__dict__.items()
                   if not isinstance(v, np.ndarray) and k != "schedule"}
        if self.schedule is not None:
            scalars["schedule"] = dataclasses.asdict(self.schedule)
        extra = {}
        if settings is not None:
            extra["__settings__"] = np.array(json.dumps(settings))
        if map_paths is not None:
            del arrays["refs"]
            extra["__ref_maps__"] = np.array(json.dumps(
                [[os.path.basename(p), map_checksum(r)] for p, r in zip(map_paths, self.refs)]))
        with replacing(path, hidden=False, suffix=".npz") as tmp:   # savez adds .npz
            np.savez(tmp, __scalars__=np.array(json.dumps(scalars, default=float)), **extra,
                     **arrays)

    @classmethod
    def load(cls, path):
        contents = read_state_file(path)
        scalars = json.loads(str(contents["__scalars__"]))
        arrays = {k: v for k, v in contents.items() if not k.startswith("__")}
        if "refs" not in arrays and "__ref_maps__" in contents:
            arrays["refs"] = _read_state_maps(path, json.loads(str(contents["__ref_maps__"])))
        schedule = scalars.pop("schedule", None)
        if schedule is None:
            # State files with the schedule's fields on the model (consensus_end 0:
            # --consensus_iter, filled in by Refinement.start).
            schedule = {"consensus_end": int(scalars.get("consensus_end", 0)),
                        "merge_tested": bool(scalars.get("merge_tested", False)),
                        "merge_extra": int(scalars.get("merge_extra", 0))}
        # Fields this version does not know (derivable ones) are left out.
        known = {f.name for f in dataclasses.fields(cls)} - {"schedule"}
        model = cls(**{k: v for k, v in {**scalars, **arrays}.items() if k in known})
        model.schedule = ScheduleState(**schedule)
        # State files written before --norm / --scale existed: corrections of 1.
        if model.part_norm is None and model.part_class is not None:
            model.part_norm = np.ones(len(model.part_class))
        if model.scale_correction is None:
            model.scale_correction = np.ones(model.n_groups)
        return model


def map_checksum(vol):
    """CRC-32 (hex) of a map's float32 values: what the state file keeps of each class
    map it names."""
    return format(zlib.crc32(np.ascontiguousarray(vol, dtype=np.float32).data), "08x")


def _read_state_maps(path, names_and_checksums):
    """(K, N, N, N) float32: the class maps a state file names, from its folder, each
    checked against the checksum the state kept (a one-line error when one is missing
    or was changed: the continued run would not be the run's)."""
    from .mrc_io import read_map
    folder = os.path.dirname(os.fspath(path))
    maps = []
    for name, checksum in names_and_checksums:
        map_path = os.path.join(folder, name)
        try:
            vol = read_map(map_path)[0]
        except (OSError, CryoClassError, ValueError):
            vol = None
        if vol is None or map_checksum(vol) != checksum:
            raise CryoClassError(
                f"{map_path}: {'missing or unreadable' if vol is None else 'changed'} since "
                f"{os.path.basename(os.fspath(path))} was written, which continues from it; "
                "restore it or continue from another iteration (its _optimiser.star)")
        maps.append(vol)
    return np.stack(maps).astype(np.float32, copy=False)


def read_state_file(path):
    """All arrays of a state file (``{name: array}``, ``__scalars__`` and ``__settings__``
    included), or a one-line :class:`.errors.CryoClassError` naming the file when it is
    missing, truncated or not a state file (then an earlier iteration's files are the
    way to go on)."""
    import zipfile
    try:
        with np.load(path, allow_pickle=False) as z:
            contents = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CryoClassError(f"{path}: state file not found; continue from an earlier "
                             "iteration whose _state.npz is there") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CryoClassError(f"{path}: the state file is damaged or truncated "
                             f"({type(exc).__name__}); continue from an earlier iteration "
                             "(its _optimiser.star)") from None
    if "__scalars__" not in contents:
        raise CryoClassError(f"{path}: not a cryoclass state file (no __scalars__); continue "
                             "from an earlier iteration (its _optimiser.star)")
    return contents
