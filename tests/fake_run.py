"""Write a small synthetic but RELION-faithful Class3D output, for tests of the readers,
figures, commands and viewer that should not wait for the engine.

``make_fake_run(out_dir)`` writes, for iterations 0..n_iter (rootname ``run``)::

    run_itNNN_model.star       data_model_general, data_model_classes,
                               data_model_class_N, data_model_groups, data_model_group_N
    run_itNNN_optimiser.star   data_optimiser_general (RELION's 999 / 9999999 sentinels
                               for the changes at iteration 0)
    run_itNNN_data.star        data_optics + data_particles
    run_itNNN_sampling.star    data_sampling_general + data_sampling_directions
    run_itNNN_classKKK.mrc     n_classes maps, box 32, voxel size in the header

and returns a dict with the rootname, the values written (for exact comparisons) and
the true class of every particle.  Run as a script to write one for looking at:
``python tests/fake_run.py OUT_DIR``.
"""
import os
import sys

import mrcfile
import numpy as np
import pandas as pd
import starfile


def _blob_map(box, centres, sigmas, weights):
    z, y, x = np.mgrid[:box, :box, :box].astype(np.float32) - box // 2
    vol = np.zeros((box, box, box), np.float32)
    for (cx, cy, cz), s, w in zip(centres, sigmas, weights):
        vol += w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return vol


# three distinguishable "complexes" (pixel coordinates x, y, z relative to the centre)
_CLASS_BLOBS = [
    # class 1: three-domain L shape
    ([(-5, -4, 0), (3, -4, 0), (3, 5, 2)], [3.0, 3.0, 2.6], [1.0, 1.0, 0.9]),
    # class 2: the same with a fourth domain
    ([(-5, -4, 0), (3, -4, 0), (3, 5, 2), (-6, 5, -3)], [3.0, 3.0, 2.6, 2.4],
     [1.0, 1.0, 0.9, 0.8]),
    # class 3: an elongated rod
    ([(0, -7, 0), (0, 0, 0), (0, 7, 0)], [2.4, 2.6, 2.4], [1.0, 1.0, 1.0]),
    # class 4: compact with a knob on z
    ([(0, 0, -2), (0, 0, 6)], [4.0, 2.0], [1.0, 0.7]),
]


def class_volume(k, box=32, it=3, n_iter=3, seed=0):
    """Class k's map at iteration it: blobs sharpen and noise drops as it grows."""
    centres, sigmas, weights = _CLASS_BLOBS[(k - 1) % len(_CLASS_BLOBS)]
    blur = 1.0 + 1.2 * (1.0 - it / max(n_iter, 1))
    vol = _blob_map(box, centres, [s * blur for s in sigmas], weights)
    rng = np.random.default_rng(seed + 100 * k + it)
    vol += rng.normal(0, 0.04 + 0.06 * (1 - it / max(n_iter, 1)), vol.shape).astype(np.float32)
    return vol.astype(np.float32)


def write_mrc(path, vol, apix):
    tmp = path + ".tmp"
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(vol, dtype=np.float32))
        mrc.voxel_size = apix
    os.replace(tmp, path)


def make_fake_run(out_dir, rootname="run", n_iter=3, n_classes=3, box=32, apix=4.0,
                  n_particles=300, n_groups=2, seed=0, with_it0_data=True):
    """Write the run; returns dict(root, iterations, classes, dist, est_res, ...)."""
    os.makedirs(out_dir, exist_ok=True)
    root = os.path.join(out_dir, rootname)
    rng = np.random.default_rng(seed)
    weights = np.linspace(1.0, 2.0, n_classes) ** 1.5   # the last class is the largest
    true_class = rng.choice(np.arange(1, n_classes + 1), n_particles, p=weights / weights.sum())
    # preferred views: tilt concentrated near 90 (side views) and near 0 (top views)
    rot_true = rng.uniform(-180, 180, n_particles)
    side = rng.random(n_particles) < 0.7
    tilt_true = np.where(side, np.clip(rng.normal(90, 20, n_particles), 0, 180),
                         np.clip(np.abs(rng.normal(0, 15, n_particles)), 0, 180))
    psi_true = rng.uniform(-180, 180, n_particles)
    micrographs = [f"MotionCorr/job002/Movies/mic{g + 1:03d}.mrc" for g in range(n_groups)]
    mic_of = rng.integers(0, n_groups, n_particles)
    defU = rng.uniform(10000, 25000, n_particles)

    nshell = box // 2 + 1
    spectral = np.arange(nshell)
    res_inv = spectral / (box * apix)
    with np.errstate(divide="ignore"):
        res_ang = np.where(spectral > 0, box * apix / np.maximum(spectral, 1), 999.0)

    written = {"root": root, "iterations": list(range(n_iter + 1)), "apix": apix,
               "box": box, "n_classes": n_classes, "true_class": true_class,
               "dist": {}, "est_res": {}, "ssnr": {}, "changes": {}, "loglik": {},
               "class_number": {}}
    prev = None
    for it in range(n_iter + 1):
        frac = it / max(n_iter, 1)
        # class assignment converges to the truth
        wrong = rng.random(n_particles) > (0.35 + 0.6 * frac)
        cls = np.where(wrong, rng.integers(1, n_classes + 1, n_particles), true_class)
        if it == 0:
            cls = np.ones(n_particles, int)
        counts = np.array([(cls == k).sum() for k in range(1, n_classes + 1)], float)
        dist = counts / counts.sum() if it > 0 else np.full(n_classes, 1.0 / n_classes)
        ang_err = 25 * (1 - frac) + 2
        rot = (rot_true + rng.normal(0, ang_err, n_particles) + 180) % 360 - 180
        tilt = np.clip(tilt_true + rng.normal(0, ang_err / 2, n_particles), 0, 180)
        psi = (psi_true + rng.normal(0, ang_err, n_particles) + 180) % 360 - 180
        ox = np.round(rng.normal(0, 2 * (1 - frac) + 0.5, n_particles) * apix, 6)
        oy = np.round(rng.normal(0, 2 * (1 - frac) + 0.5, n_particles) * apix, 6)
        pmax = np.clip(rng.normal(0.2 + 0.6 * frac, 0.1, n_particles), 0.01, 1.0)
        llc = rng.normal(1.0e4 + 500 * it, 50, n_particles)

        # ---- model.star --------------------------------------------------------
        general = {
            "rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": box, "rlnCurrentResolution": round(4 * box * apix / (
                8 + 4 * it), 6), "rlnCurrentImageSize": min(box, 16 + 4 * it),
            "rlnPaddingFactor": 2.0, "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1,
            "rlnMinRadiusNnInterpolation": 10, "rlnPixelSize": apix,
            "rlnNrClasses": n_classes, "rlnNrBodies": 1, "rlnNrGroups": n_groups,
            "rlnTau2FudgeFactor": 4.0, "rlnNormCorrectionAverage": 1.0,
            "rlnSigmaOffsetsAngst": round(10.0 - 2 * it, 6),
            "rlnOrientationalPriorMode": 0, "rlnSigmaPriorRotAngle": 0.0,
            "rlnSigmaPriorTiltAngle": 0.0, "rlnSigmaPriorPsiAngle": 0.0,
            "rlnLogLikelihood": round(-1.5e6 + 2.0e5 * np.sqrt(it), 3) if it else 0.0,
            "rlnAveragePmax": round(float(pmax.mean()), 6) if it else 0.0,
        }
        written["loglik"][it] = general["rlnLogLikelihood"]
        refs = [f"{root}_it{it:03d}_class{k:03d}.mrc" for k in range(1, n_classes + 1)]
        est_res, class_tables = [], {}
        for k in range(1, n_classes + 1):
            s0 = (0.12 + 0.05 * it) * (1.0 - 0.1 * ((k - 1) % 4)) * (nshell - 1)
            amp = 300 * (1 + it) * max(dist[k - 1], 0.05)
            ssnr = amp * np.exp(-(spectral / max(s0, 1)) ** 2)
            ssnr[0] = ssnr[1] * 1.5
            below = np.nonzero(ssnr[1:] < 1)[0]
            shell = (below[0] + 1) if len(below) else nshell - 1
            est = float(box * apix / max(shell, 1))
            est_res.append(round(est, 6))
            fsc = np.clip(ssnr / (1 + ssnr), 0, 1)
            class_tables[k] = pd.DataFrame({
                "rlnSpectralIndex": spectral,
                "rlnResolution": np.round(res_inv, 6),
                "rlnAngstromResolution": np.round(res_ang, 6),
                "rlnSsnrMap": np.round(ssnr, 6),
                "rlnGoldStandardFsc": np.zeros(nshell),
                "rlnFourierCompleteness": np.round(np.where(spectral < shell, 1.0, 0.0), 6),
                "rlnReferenceSigma2": np.round(1e-3 * np.exp(-spectral / 6.0), 8),
                "rlnReferenceTau2": np.round(1e-2 * np.exp(-spectral / 5.0), 8),
            })
            written["ssnr"][(it, k)] = class_tables[k]["rlnSsnrMap"].to_numpy()
        classes = pd.DataFrame({
            "rlnReferenceImage": refs,
            "rlnClassDistribution": np.round(dist, 6),
            "rlnAccuracyRotations": [999.0 if it == 0 else round(20.0 / (1 + it) + k, 3)
                                     for k in range(1, n_classes + 1)],
            "rlnAccuracyTranslationsAngst": [999.0 if it == 0 else round(
                8.0 / (1 + it) + 0.5 * k, 3) for k in range(1, n_classes + 1)],
            "rlnEstimatedResolution": est_res,
            "rlnOverallFourierCompleteness": [1.0] * n_classes,
        })
        written["dist"][it] = classes["rlnClassDistribution"].to_numpy()
        written["est_res"][it] = np.array(est_res)
        groups = pd.DataFrame({
            "rlnGroupNumber": np.arange(1, n_groups + 1),
            "rlnGroupName": micrographs,
            "rlnGroupNrParticles": [int((mic_of == g).sum()) for g in range(n_groups)],
            "rlnGroupScaleCorrection": [1.0] * n_groups,
        })
        blocks = {"model_general": general, "model_classes": classes}
        for k in range(1, n_classes + 1):
            blocks[f"model_class_{k}"] = class_tables[k]
        blocks["model_groups"] = groups
        for g in range(1, n_groups + 1):
            blocks[f"model_group_{g}"] = pd.DataFrame({
                "rlnSpectralIndex": spectral, "rlnResolution": np.round(res_inv, 6),
                "rlnSigma2Noise": np.round(1e-2 * np.exp(-spectral / 8.0) + 1e-4, 8)})
        starfile.write(blocks, f"{root}_it{it:03d}_model.star", overwrite=True)

        # ---- optimiser.star ----------------------------------------------------
        if prev is None:
            ch_cls, ch_ori, ch_off = 9999999.0, 999.0, 999.0
        else:
            ch_cls = round(float((cls != prev["cls"]).mean()), 6)
            ch_ori = round(float(np.mean(np.abs(((rot - prev["rot"]) + 180) % 360 - 180))), 6)
            ch_off = round(float(np.sqrt(np.mean((ox - prev["ox"]) ** 2 +
                                                 (oy - prev["oy"]) ** 2) / 2)), 6)
        written["changes"][it] = (ch_cls, ch_ori, ch_off)
        starfile.write({"optimiser_general": {
            "rlnOutputRootName": root, "rlnModelStarFile": f"{root}_it{it:03d}_model.star",
            "rlnExperimentalDataStarFile": f"{root}_it{it:03d}_data.star",
            "rlnOrientSamplingStarFile": f"{root}_it{it:03d}_sampling.star",
            "rlnCurrentIteration": it, "rlnNumberOfIterations": n_iter,
            "rlnDoSplitRandomHalves": 0, "rlnJoinHalvesUntilThisResolution": -1.0,
            "rlnAdaptiveOversampleOrder": 1, "rlnAdaptiveOversampleFraction": 0.999,
            "rlnRandomSeed": seed, "rlnParticleDiameter": 100.0,
            "rlnWidthMaskEdge": 5, "rlnDoZeroMask": 1, "rlnDoSolventFlattening": 1,
            "rlnDoSolventFscCorrection": 0, "rlnSolventMaskName": "None",
            "rlnMaxNumberOfPooledParticles": 3, "rlnDoMapEstimation": 1,
            "rlnDoAutoRefine": 0, "rlnIncrementImageSize": 10,
            "rlnChangesOptimalOffsets": ch_off, "rlnChangesOptimalOrientations": ch_ori,
            "rlnChangesOptimalClasses": ch_cls, "rlnSmallestChangesOffsets": 999.0,
            "rlnSmallestChangesOrientations": 999.0, "rlnSmallestChangesClasses": 9999999,
            "rlnHasConverged": 0, "rlnHasHighFscAtResolLimit": 0,
            "rlnNumberOfIterWithoutResolutionGain": 0,
            "rlnNumberOfIterWithoutChangingAssignments": 0,
            "rlnDoCorrectCtf": 1, "rlnDoIgnoreCtfUntilFirstPeak": 0,
            "rlnCtfDataArePhaseFlipped": 0, "rlnDoOnlyFlipCtfPhases": 0,
            "rlnRefsAreCtfCorrected": 1, "rlnFixSigmaNoiseEstimates": 0,
            "rlnFixSigmaOffsetEstimates": 0,
        }}, f"{root}_it{it:03d}_optimiser.star", overwrite=True)

        # ---- sampling.star -----------------------------------------------------
        hp = 2
        starfile.write({
            "sampling_general": {
                "rlnIs3DSampling": 1, "rlnIs3DTranslationalSampling": 0,
                "rlnHealpixOrder": hp, "rlnSymmetryGroup": "C1",
                "rlnTiltAngleLimit": -91.0, "rlnPsiStep": 15.0,
                "rlnOffsetRange": 5.0, "rlnOffsetStep": 2.0,
                "rlnHelicalOffsetStep": -1.0, "rlnSamplingPerturbInstance": 0.5,
                "rlnSamplingPerturbFactor": 0.5},
            "sampling_directions": pd.DataFrame({
                "rlnAngleRot": np.round(rng.uniform(-180, 180, 12), 6),
                "rlnAngleTilt": np.round(np.degrees(np.arccos(np.linspace(1, -1, 12))), 6)}),
        }, f"{root}_it{it:03d}_sampling.star", overwrite=True)

        # ---- data.star ---------------------------------------------------------
        if it > 0 or with_it0_data:
            optics = pd.DataFrame({
                "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                "rlnVoltage": [300.0], "rlnImagePixelSize": [apix], "rlnImageSize": [box],
                "rlnImageDimensionality": [2]})
            particles = pd.DataFrame({
                "rlnImageName": [f"{i + 1:06d}@Extract/job007/particles.mrcs"
                                 for i in range(n_particles)],
                "rlnMicrographName": [micrographs[g] for g in mic_of],
                "rlnDefocusU": np.round(defU, 6), "rlnDefocusV": np.round(defU - 200, 6),
                "rlnDefocusAngle": np.full(n_particles, 30.0),
                "rlnOpticsGroup": np.ones(n_particles, int),
                "rlnGroupNumber": mic_of + 1,
                "rlnAngleRot": np.round(rot, 6), "rlnAngleTilt": np.round(tilt, 6),
                "rlnAnglePsi": np.round(psi, 6),
                "rlnOriginXAngst": ox, "rlnOriginYAngst": oy,
                "rlnClassNumber": cls.astype(int),
                "rlnNormCorrection": np.ones(n_particles),
                "rlnLogLikeliContribution": np.round(llc, 6),   # RELION's label
                "rlnMaxValueProbDistribution": np.round(pmax, 6),
                "rlnNrOfSignificantSamples": rng.integers(1, 50, n_particles),
            })
            written["class_number"][it] = particles["rlnClassNumber"].to_numpy()
            starfile.write({"optics": optics, "particles": particles},
                           f"{root}_it{it:03d}_data.star", overwrite=True)

        # ---- maps --------------------------------------------------------------
        for k in range(1, n_classes + 1):
            write_mrc(refs[k - 1], class_volume(k, box, it, n_iter, seed), apix)
        prev = {"cls": cls, "rot": rot, "ox": ox, "oy": oy}
    return written


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "fake_run"
    info = make_fake_run(out)
    print(info["root"])
