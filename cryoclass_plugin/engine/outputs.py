"""Writing an iteration's outputs with RELION's names and STAR layout.

For rootname ``<o>`` and iteration ``NNN``: ``<o>_itNNN_classKKK.mrc``,
``<o>_itNNN_model.star``, ``<o>_itNNN_data.star``, ``<o>_itNNN_sampling.star``, the
exact state ``<o>_itNNN_state.npz`` (for ``--continue``; it names the class maps, written
first, with their checksums) and, last, ``<o>_itNNN_optimiser.star``.
Every file is written to a temporary name and renamed, and the optimiser file is the
marker of a complete iteration: ``--continue`` only accepts an iteration whose optimiser
file exists, so a run killed while writing never leaves a half iteration behind.
"""
import os

import numpy as np
import pandas as pd

from .mrc_io import write_map
from .star_io import output_image_names, write_particles, write_star


def iteration_root(root, iteration):
    return f"{root}_it{iteration:03d}"


def class_map_path(root, iteration, k):
    """Path of class ``k`` (0-based) of an iteration: ``<o>_itNNN_classKKK.mrc``."""
    return f"{iteration_root(root, iteration)}_class{k + 1:03d}.mrc"


def _model_blocks(model, root, iteration, settings, group_names, group_counts):
    n_shells = model.n_shells
    res_A = model.shell_resolution()
    inv_res = np.arange(n_shells) / (model.box * model.apix)
    class_res = model.class_resolution_angst()
    acc_rot = np.zeros(model.n_classes)
    acc_trans = np.zeros(model.n_classes)
    if model.part_acc_rot is not None and model.part_class is not None:
        for k in range(model.n_classes):
            sel = model.part_class == k
            if sel.any():
                acc_rot[k] = float(np.mean(model.part_acc_rot[sel]))
                acc_trans[k] = float(np.mean(model.part_acc_trans_px[sel])) * model.apix
    completeness = np.ones(n_shells)
    general = {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": model.box,
        "rlnCurrentResolution": model.current_resolution_angst(),
        "rlnCurrentImageSize": min(model.box, 2 * model.current_shell),
        "rlnPaddingFactor": settings.pad,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": model.apix,
        "rlnNrClasses": model.n_classes,
        "rlnNrBodies": 1,
        "rlnNrGroups": model.n_groups,
        "rlnTau2FudgeFactor": settings.tau2_fudge,
        "rlnNormCorrectionAverage": float(model.avg_norm),
        "rlnSigmaOffsetsAngst": model.sigma_offset_angst,
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": model.log_likelihood,
        "rlnAveragePmax": float(np.mean(model.part_pmax)) if model.part_pmax is not None else 0.0,
    }
    blocks = {"model_general": general}
    blocks["model_classes"] = pd.DataFrame({
        "rlnReferenceImage": [os.path.basename(class_map_path(root, iteration, k))
                              for k in range(model.n_classes)],
        "rlnClassDistribution": model.pdf_class.astype(float),
        "rlnAccuracyRotations": acc_rot,
        "rlnAccuracyTranslationsAngst": acc_trans,
        "rlnEstimatedResolution": class_res,
        "rlnOverallFourierCompleteness": np.ones(model.n_classes),
    })
    for k in range(model.n_classes):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": np.arange(n_shells),
            "rlnResolution": inv_res,
            "rlnAngstromResolution": res_A,
            "rlnSsnrMap": model.ssnr[k],
            "rlnGoldStandardFsc": np.zeros(n_shells),
            "rlnFourierCompleteness": completeness,
            "rlnReferenceSigma2": model.tau2[k],   # RELION reports tau2 here too
            "rlnReferenceTau2": model.tau2[k],
        })
    blocks["model_groups"] = pd.DataFrame({
        "rlnGroupNumber": np.arange(1, model.n_groups + 1),
        "rlnGroupName": list(group_names),
        "rlnGroupNrParticles": np.asarray(group_counts, dtype=int),
        "rlnGroupScaleCorrection": (np.ones(model.n_groups) if model.scale_correction is None
                                    else np.asarray(model.scale_correction, dtype=float)),
    })
    for g in range(model.n_groups):
        blocks[f"model_group_{g + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": np.arange(n_shells),
            "rlnResolution": inv_res,
            "rlnSigma2Noise": model.sigma2[g],
        })
    return blocks


def _data_table(model, table):
    df = table.particles_table().copy()
    for col in ("rlnOriginX", "rlnOriginY"):
        if col in df.columns:
            df = df.drop(columns=col)
    # Names that resolve from the folder the job runs in (RELION's convention), so
    # that every data.star is a valid input to the next job run from there.
    df["rlnImageName"] = output_image_names(table)
    df["rlnAngleRot"] = model.part_eulers[:, 0]
    df["rlnAngleTilt"] = model.part_eulers[:, 1]
    df["rlnAnglePsi"] = model.part_eulers[:, 2]
    df["rlnOriginXAngst"] = model.part_origin_angst[:, 0]
    df["rlnOriginYAngst"] = model.part_origin_angst[:, 1]
    df["rlnClassNumber"] = model.part_class.astype(int) + 1
    df["rlnNormCorrection"] = 1.0 if model.part_norm is None else model.part_norm
    df["rlnLogLikeliContribution"] = model.part_loglik
    df["rlnMaxValueProbDistribution"] = model.part_pmax
    df["rlnNrOfSignificantSamples"] = model.part_nsig.astype(int)
    return df


def _optimiser_block(model, root, iteration, settings):
    s = settings
    return {
        "rlnOutputRootName": root,
        "rlnModelStarFile": f"{iteration_root(root, iteration)}_model.star",
        "rlnExperimentalDataStarFile": f"{iteration_root(root, iteration)}_data.star",
        "rlnOrientSamplingStarFile": f"{iteration_root(root, iteration)}_sampling.star",
        "rlnCurrentIteration": iteration,
        "rlnNumberOfIterations": s.n_iter,
        "rlnDoSplitRandomHalves": 0,
        "rlnJoinHalvesUntilThisResolution": -1,
        "rlnAdaptiveOversampleOrder": s.oversampling,
        "rlnAdaptiveOversampleFraction": s.adaptive_fraction,
        "rlnRandomSeed": s.random_seed,
        "rlnParticleDiameter": s.particle_diameter,
        "rlnWidthMaskEdge": 5,
        "rlnDoZeroMask": int(s.zero_mask),
        "rlnDoSolventFlattening": int(s.flatten_solvent),
        "rlnSolventMaskName": s.solvent_mask or "None",
        "rlnSolventMask2Name": s.solvent_mask2 or "None",
        "rlnInitialLowPassFilter": s.ini_high,
        "rlnTau2FudgeFactor": s.tau2_fudge,
        "rlnIncrementImageSize": s.incr_size,
        "rlnHighresLimitExpectation": s.strict_highres_exp,
        "rlnDoFastSubsetOptimisation": int(s.fast_subsets),
        "rlnDoSkipAlign": int(s.skip_align),
        "rlnChangesOptimalOrientations": model.changes["orientations"],
        "rlnChangesOptimalOffsets": model.changes["offsets"],
        "rlnChangesOptimalClasses": model.changes["classes"],
        "rlnDoCorrectCtf": int(s.ctf),
        "rlnDoIgnoreCtfUntilFirstPeak": int(s.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": int(s.ctf_phase_flipped),
        "rlnDoCorrectNorm": int(s.norm),
        "rlnDoCorrectScale": int(s.scale),
        "rlnSymmetryGroup": s.sym,
        "rlnHealpixOrder": s.healpix_order,
        "rlnOffsetRange": s.offset_range,
        "rlnOffsetStep": s.offset_step,
        "rlnPaddingFactor": s.pad,
        "rlnDoGriddingCorrection": int(s.gridding),
        "rlnRefinementInitialClasses": s.init_classes,
        "rlnExperimentalDataStarFileInput": s.input_star,
        "rlnReferenceImageInput": s.ref,
        "rlnCryoclassStateFile": os.path.basename(f"{iteration_root(root, iteration)}_state.npz"),
    }


def _sampling_block(settings, orientations, translations):
    return {
        "rlnSymmetryGroup": settings.sym,
        # The grid this iteration searched (a local search may use a finer one).
        "rlnHealpixOrder": int(orientations.healpix_order),
        "rlnPsiStep": float(orientations.psi_step_deg),
        "rlnTiltAngleLimit": -91,
        # The offsets this iteration searched (finer in a local search on a finer grid,
        # around each particle's offset; --allow_coarser_sampling may coarsen them).
        "rlnOffsetRange": float(translations.offset_range_px),
        "rlnOffsetStep": float(translations.offset_step_px),
        "rlnHelicalOffsetStep": -1,
        "rlnSamplingPerturbInstance": 0.0,
        "rlnSamplingPerturbFactor": 0.0,
        "rlnAdaptiveOversampleOrder": settings.oversampling,
        "rlnNrOfOrientations": int(orientations.matrices.shape[0]),
        "rlnNrOfTranslations": int(translations.offsets.shape[0]),
    }


def write_iteration(root, iteration, model, table, settings, orientations, translations,
                    group_names, group_counts):
    """Write all outputs of one iteration (rank 0 only)."""
    it_root = iteration_root(root, iteration)
    for k in range(model.n_classes):
        write_map(class_map_path(root, iteration, k), model.refs[k], model.apix)
    write_star(f"{it_root}_model.star",
               _model_blocks(model, root, iteration, settings, group_names, group_counts))
    write_particles(f"{it_root}_data.star", table.optics_table(), _data_table(model, table))
    write_star(f"{it_root}_sampling.star",
               {"sampling_general": _sampling_block(settings, orientations, translations)})
    import dataclasses
    model.save(f"{it_root}_state.npz", settings=dataclasses.asdict(settings),
               map_paths=[class_map_path(root, iteration, k) for k in range(model.n_classes)])
    write_star(f"{it_root}_optimiser.star",
               {"optimiser_general": _optimiser_block(model, root, iteration, settings)})
