"""The cryoclass protocols in real (headless) pyworkflow projects.

Fast tests (conversions, command line, validation) need no engine run.  Tests marked
``needs_engine`` run ``cryoclass refine`` through the protocol (2 MPI processes on tiny
simulated data) and are skipped when the engine command is not available.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

# Must run before anything imports pyworkflow/pwem.
from cryoclass_plugin.scipion_env import (ProtocolFailed, create_project, launch,
                                          setup_for_tests)

ENV = setup_for_tests()

from pwem.protocols import ProtImportMask, ProtImportParticles, ProtImportVolumes  # noqa: E402
from pwem.protocols import ProtUserSubSet  # noqa: E402
from pyworkflow.protocol.params import BooleanParam, FloatParam, IntParam  # noqa: E402

from cryoclass_plugin import convert  # noqa: E402
from cryoclass_plugin.protocols import (ProtCryoClassClassify3D,  # noqa: E402
                                        ProtCryoClassImportParticles,
                                        ProtCryoClassSelectClasses)
from cryoclass_plugin.protocols.protocol_select_classes import (mean_ssnr,  # noqa: E402
                                                                parse_class_numbers)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Tiny data: 150 particles of 32 px at 6 A/px (a 192 A box), two classes.  SNR 0.5 (was
# 2.0): at SNR 2 the --norm correction that the protocol passes (as RELION's GUI does)
# absorbs much of the class difference into per-particle scales (PCA split ARI 0.27 ->
# 0.03 on this set), a regime real particles (SNR < 0.5) never reach.
N_PARTS, BOX, APIX, N_CLASSES, SNR, SEED = 150, 32, 6.0, 2, 0.5, 5
MASK_DIAMETER = 180
ITERATIONS = 8


def _engine_ready():
    bindir = os.path.dirname(sys.executable)
    exe = shutil.which("cryoclass", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    if not exe:
        return False
    try:
        out = subprocess.run([exe, "refine", "--help"], capture_output=True, text=True,
                             timeout=120)
    except Exception:
        return False
    return out.returncode == 0 and "--K" in out.stdout and "--continue" in out.stdout


ENGINE_READY = _engine_ready()
needs_engine = pytest.mark.skipif(not ENGINE_READY,
                                  reason="'cryoclass refine' is not available yet")


def _ids(obj):
    return sorted(int(p.getObjId()) for p in obj.iterItems())


def _write_mrc(path, data, apix):
    import mrcfile
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        m.voxel_size = apix
    return str(path)


def _sphere(box, radius_px):
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    return (np.sqrt(x * x + y * y + z * z) <= radius_px).astype(np.float32)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulate = pytest.importorskip("cryoclass_plugin.engine.simulate")
    out = tmp_path_factory.mktemp("sim")
    res = simulate.simulate_dataset(str(out), n=N_PARTS, box=BOX, apix=APIX, snr=SNR,
                                    n_classes=N_CLASSES, seed=SEED)
    # a copy of the particles with made-up 2D classes (1, 2, 3 in turn), for the
    # SetOfClasses2D upstream test
    star = convert.read_star(res["particles_star"])
    parts = star["particles"].copy()
    parts["rlnClassNumber"] = (np.arange(len(parts)) % 3) + 1
    convert.write_star(str(out / "particles_2d.star"),
                       {"optics": star["optics"], "particles": parts})
    res["particles_2d_star"] = str(out / "particles_2d.star")
    res["dir"] = str(out)
    return res


@pytest.fixture(scope="module")
def project():
    return create_project("TestCryoClassProtocols")


@pytest.fixture(scope="module")
def inputs(project, sim):
    """Imported particles (with CTF), reference, mask, and odd inputs for validation."""
    d = sim["dir"]
    parts = launch(project, project.newProtocol(
        ProtCryoClassImportParticles, starFile=sim["particles_star"]))
    ref = launch(project, project.newProtocol(
        ProtImportVolumes, filesPath=sim["ref"], samplingRate=APIX))
    mask_fn = _write_mrc(os.path.join(d, "mask.mrc"), _sphere(BOX, BOX // 2 - 2), APIX)
    mask = launch(project, project.newProtocol(
        ProtImportMask, maskPath=mask_fn, samplingRate=APIX))
    # a reference with another box and pixel size (40 px at 4.8 A/px = 192 A)
    big_fn = _write_mrc(os.path.join(d, "ref40.mrc"),
                        convert.resample_volume(_read_map(sim["ref"]), APIX, 4.8, 40), 4.8)
    big = launch(project, project.newProtocol(
        ProtImportVolumes, filesPath=big_fn, samplingRate=4.8))
    # particles without CTF (plain stack import)
    noctf = launch(project, project.newProtocol(
        ProtImportParticles, filesPath=sim["particles_mrcs"], samplingRate=APIX))
    classes2d = launch(project, project.newProtocol(
        ProtCryoClassImportParticles, starFile=sim["particles_2d_star"],
        importClasses2D=True))
    return {"particles": parts.outputParticles, "ref": ref.outputVolume,
            "mask": mask.outputMask, "ref40": big.outputVolume,
            "noctf": noctf.outputParticles, "classes2d_prot": classes2d}


def _read_map(fn):
    import mrcfile
    with mrcfile.open(fn, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


def _classifier(project, inputs, **kwargs):
    # RELION's start unless a test asks otherwise: the default consensus + PCA start needs
    # more iterations than these short runs have.
    params = dict(numberOfClasses=N_CLASSES, numberOfIterations=ITERATIONS, initialClasses=0,
                  maskDiameterA=MASK_DIAMETER, initialLowPassFilterA=30,
                  angularSamplingDeg=2, offsetSearchRangePix=3, randomSeed=11)
    params.update(kwargs)
    prot = project.newProtocol(ProtCryoClassClassify3D, **params)
    prot.inputParticles.set(inputs["particles"])
    prot.referenceVolume.set(inputs["ref"])
    return prot


# --------------------------------------------------------------------------- conversions
def test_alignment_matrix_follows_relion_and_engine_conventions():
    from cryoclass_plugin.engine.geometry import euler_to_matrix
    rng = np.random.default_rng(1)
    for _ in range(20):
        rot, psi = rng.uniform(-180, 180, 2)
        tilt = rng.uniform(1, 179)
        ox, oy = rng.uniform(-10, 10, 2)
        M = convert.row_to_alignment_matrix(rot, tilt, psi, ox, oy, APIX)
        A = euler_to_matrix(rot, tilt, psi)
        # M = inv([[A, -o], [0, 1]]) (scipion-em-relion's ALIGN_PROJ): rotation A^T,
        # translation A^T o with o the origin in pixels
        assert np.allclose(M[:3, :3], A.T, atol=1e-9)
        assert np.allclose(M[:3, 3], A.T @ np.array([ox, oy, 0.0]) / APIX, atol=1e-9)
        back = convert.alignment_to_row(M, APIX)
        assert np.allclose(euler_to_matrix(back["rlnAngleRot"], back["rlnAngleTilt"],
                                           back["rlnAnglePsi"]), A, atol=1e-9)
        assert back["rlnOriginXAngst"] == pytest.approx(ox)
        assert back["rlnOriginYAngst"] == pytest.approx(oy)


def test_locations():
    assert convert.location_to_relion(3, "a/b.mrcs:mrcs") == "000003@a/b.mrcs"
    assert convert.relion_to_location("000012@x/y.mrcs") == (12, "x/y.mrcs")
    assert convert.relion_to_location("x/y.mrc") == (1, "x/y.mrc")


def test_resample_volume_keeps_centre_and_greyscale():
    box = 48
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    blob = np.exp(-(x ** 2 + (y - 3) ** 2 + z ** 2) / (2 * 4.0 ** 2)).astype(np.float32)
    out = convert.resample_volume(blob, 2.0, 4.0, 32)
    assert out.shape == (32, 32, 32)
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert peak == (16, 16 + 1, 16) or peak == (16, 16 + 2, 16)  # y = +3 px at 2 A -> 1.5
    # the integral over the object scales with the voxel volume
    assert out.sum() * 4.0 ** 3 == pytest.approx(blob.sum() * 2.0 ** 3, rel=1e-3)


def test_star_written_for_the_engine(project, inputs, tmp_path):
    from cryoclass_plugin.engine import star_io
    from cryoclass_plugin.engine.mrc_io import ImageSource
    parts = inputs["particles"]
    star = str(tmp_path / "in.star")
    n = convert.write_set_of_particles(parts, star, out_dir=str(tmp_path / "stacks"))
    assert n == parts.getSize() == N_PARTS
    table = star_io.read_particles(star)
    assert table.box == BOX and table.apix == pytest.approx(APIX) and table.has_ctf
    assert list(table.df["rlnImageId"]) == _ids(parts)
    first = parts.getFirstItem()
    row = table.df.iloc[0]
    assert row["rlnDefocusU"] == pytest.approx(first.getCTF().getDefocusU())
    assert row["rlnDefocusAngle"] == pytest.approx(first.getCTF().getDefocusAngle())
    assert row["rlnVoltage"] == pytest.approx(first.getAcquisition().getVoltage())
    img = ImageSource(table).get([0, 5])
    stack = _read_map(convert.strip_format(first.getFileName()))
    assert np.allclose(img[0], stack[0]) and np.allclose(img[1], stack[5])


def test_import_protocol_reads_ctf_and_classes(inputs):
    parts = inputs["particles"]
    assert parts.getSize() == N_PARTS and parts.hasCTF()
    assert parts.getSamplingRate() == pytest.approx(APIX) and parts.getXDim() == BOX
    assert parts.getAcquisition().getVoltage() == pytest.approx(300.0)
    classes = inputs["classes2d_prot"].outputClasses2D
    assert classes.getSize() == 3
    assert sum(c.getSize() for c in classes) == N_PARTS


# --------------------------------------------------------------------------- command line
def test_engine_command_line_maps_relion_gui(project, inputs):
    prot = _classifier(project, inputs)
    args = prot._getEngineArgs().split()

    def value(flag):
        return args[args.index(flag) + 1]

    for flag in ("--firstiter_cc", "--ctf", "--zero_mask", "--flatten_solvent", "--norm",
                 "--scale", "--skip_gridding"):
        assert flag in args, flag
    assert value("--K") == "2" and value("--iter") == str(ITERATIONS)
    assert value("--tau2_fudge") == "4" and value("--particle_diameter") == "180"
    assert value("--ini_high") == "30" and value("--sym") == "C1"
    assert value("--healpix_order") == "2" and value("--oversampling") == "1"
    assert value("--offset_range") == "3" and value("--offset_step") == "2"
    assert value("--pad") == "2" and value("--j") == "1"
    assert "--pool" not in args and "--no_parallel_disc_io" not in args
    assert value("--random_seed") == "11"
    assert value("--i").endswith("extra/input_particles.star")
    assert value("--o").endswith("extra/cryoclass")
    for flag in ("--skip_align", "--solvent_mask", "--strict_highres_exp", "--gpu",
                 "--blush", "--fast_subsets", "--preread_images", "--ctf_intact_first_peak",
                 "--sigma_ang"):
        assert flag not in args, flag

    prot = _classifier(project, inputs, isMapAbsoluteGreyScale=True, angularSamplingDeg=3,
                       offsetSearchStepPix=1.5, skipPadding=True, limitResolEStep=10,
                       doBlush=True, useFastSubsets=True, allParticlesRam=True,
                       ignoreCTFUntilFirstPeak=True, doGpu=True, gpusToUse="0:1",
                       numberOfThreads=3, skipGridding=False)
    prot.referenceMask.set(inputs["mask"])
    args = prot._getEngineArgs().split()
    assert "--firstiter_cc" not in args and "--skip_gridding" not in args
    assert "--dont_skip_gridding" in args
    assert value("--healpix_order") == "3" and value("--offset_step") == "3"
    assert value("--pad") == "1" and value("--strict_highres_exp") == "10"
    assert value("--gpu") == "0:1" and value("--j") == "3"
    assert value("--solvent_mask").endswith("extra/mask.mrc")
    for flag in ("--blush", "--fast_subsets", "--preread_images", "--ctf_intact_first_peak"):
        assert flag in args, flag

    prot = _classifier(project, inputs, localAngularSearch=True, localAngularSearchRange=9.0)
    args = prot._getEngineArgs().split()
    assert value("--sigma_ang") == "3"

    prot = _classifier(project, inputs, doImageAlignment=False, scratchDir="/tmp/scratch",
                       localAngularSearch=True)
    args = prot._getEngineArgs().split()
    assert "--skip_align" in args and "--healpix_order" not in args
    assert "--sigma_ang" not in args
    assert value("--scratch_dir") == "/tmp/scratch"


def test_default_form_passes_the_registry_values(project, inputs):
    """The protocol's default form (with K = 3, so that the consensus start applies)
    gives every engine option the registry's value: the engine default, or the
    ``form_default`` where RELION's GUI default differs from relion_refine's.  Every
    flag it passes is an engine flag, and every ``param`` of the registry is a form
    parameter."""
    import argparse
    import shlex
    from cryoclass_plugin.commands import refine as refine_cmd
    from cryoclass_plugin.engine.options import OPTIONS, SAME
    prot = project.newProtocol(ProtCryoClassClassify3D, numberOfClasses=3)
    prot.inputParticles.set(inputs["particles"])
    prot.referenceVolume.set(inputs["ref"])
    parser = argparse.ArgumentParser()
    refine_cmd.add_args(parser)
    args = parser.parse_args(shlex.split(prot._getEngineArgs()))   # unknown flags fail
    paths = {"input_star", "output_root", "ref"}
    for opt in OPTIONS:
        if opt.param:
            assert prot.getParam(opt.param) is not None, opt.param
        if not opt.flag or opt.field in paths:
            continue
        want = 3 if opt.field == "n_classes" else (
            opt.default if opt.form_default is SAME else opt.form_default)
        assert getattr(args, opt.field) == want, (opt.flag, getattr(args, opt.field), want)


#: Form fields that act outside the engine's command line, and where that is tested.
OUTSIDE_ARGS = {
    "runName": "Scipion's run label", "runMode": "Scipion's resume / restart of steps",
    "hostName": "the host that runs the job", "numberOfMpi": "runJob's MPI processes "
    "(test_classification_with_mpi)",
    "inputParticles": "converted to --i (test_star_written_for_the_engine)",
    "referenceVolume": "converted to --ref (test_reference_set_each_class_starts...)",
    "referenceMask": "converted to --solvent_mask (test_engine_command_line_maps...)",
    "doContinue": "continue mode (test_continue_from_a_previous_run)",
    "continueRun": "continue mode", "continueIter": "continue mode",
    "resampleReference": "the conversion step resamples the maps "
    "(test_validation_reference_mismatch_offers_resampling)",
    "continueMsg": "a label", "phaseFlipNote": "a label",
}
#: What makes a field active in the walked form (its condition), where the default is not.
ENABLERS = {"localAngularSearchRange": {"localAngularSearch": True},
            "relaxSymmetry": {"localAngularSearch": True},
            "gpusToUse": {"doGpu": True}}
#: A changed value where the generic one would not be valid.
CHANGED = {"symmetryGroup": "C2", "gpusToUse": "0", "extraParams": "--block_size 128",
           "scratchDir": "/tmp/cryoclass_scratch", "randomSeed": 5,
           "numberOfClasses": 4, "relaxSymmetry": "C2"}


def _changed_value(param, default):
    from pyworkflow.protocol.params import EnumParam as Enum, StringParam as String
    if isinstance(param, BooleanParam):
        return not default
    if isinstance(param, Enum):
        return (int(default) + 1) % len(param.choices)
    if isinstance(param, IntParam):
        return int(default) + 1
    if isinstance(param, FloatParam):
        return float(default) * 2 if float(default) > 0 else 10.0
    assert not isinstance(param, String), param
    raise AssertionError(type(param))


def test_every_form_field_changes_the_run(project, inputs):
    """Walk every field of the form (K = 3, so that the consensus fields are active):
    changing it from its default changes the engine's command line or the form's
    validation, unless it is one of the documented fields that act elsewhere."""
    def state(prot):
        return prot._getEngineArgs(), "\n".join(prot.validate())

    base = {"numberOfClasses": 3, "initialClasses": 2}
    walked = set()
    for name, param in ProtCryoClassClassify3D()._definition.iterAllParams():
        walked.add(name)
        if name in OUTSIDE_ARGS:
            continue
        kwargs = dict(base, **ENABLERS.get(name, {}))
        before = _classifier(project, inputs, **kwargs)
        value = CHANGED[name] if name in CHANGED else \
            _changed_value(param, getattr(before, name).get())
        after = _classifier(project, inputs, **dict(kwargs, **{name: value}))
        assert after.evalParamCondition(name), name
        assert state(before) != state(after), name
    assert set(OUTSIDE_ARGS) <= walked


def test_methods_state_what_ran_for_both_starts():
    from cryoclass_plugin.engine.options import Settings
    from cryoclass_plugin.protocols.protocol_classify3d import methods_text
    relion = methods_text(Settings(ref="r.mrc", n_classes=3, firstiter_cc=True, ini_high=30,
                                   particle_diameter=180, flatten_solvent=True).resolved(),
                          150, [50, 60, 40])
    assert "a re-implementation of RELION's" in relion
    assert "random class assignments in the first iteration (RELION's start)" in relion
    assert "global orientation searches at 7.5 degrees" in relion
    assert "cross-correlation in the first iteration" in relion
    assert "as in RELION (power spectra" in relion and "soft sphere" in relion
    for ours in ("Unlike RELION", "held-out", "consensus map", "expectation-maximisation "
                 "update", "around their density"):
        assert ours not in relion, ours
    pca = methods_text(Settings(ref="r.mrc", n_classes=4, init_classes="pca").resolved(),
                       150, [50, 60, 40, 0], merges=["class 4 joins class 2",
                                                     "40 particles of class 2 start class 4"])
    for ours in ("Unlike RELION, all particles were first aligned to one consensus map for "
                 "5 iterations", "k-means clustering of the particles along the top 3 "
                 "principal directions", "up to 8 fixed-pose iterations classified them "
                 "at 25 A (ending as soon as the held-out evidence", "locally around the "
                 "consensus poses (prior sigma 3 deg, HEALPix order 4, translations within "
                 "1.5 pixels of each particle's offset in 0.5-pixel steps), the last 2 of "
                 "them one HEALPix order finer (order 5, prior sigma 2 deg, translations "
                 "within 0.75 pixels in 0.25-pixel steps)",
                 "held-out test merged",
                 "(class 4 joins class 2; 40 particles of class 2 start class 4)",
                 "less than 0.3 of a random split's cost; before the last 4 iterations it "
                 "ran again and merged two classes when held-out particles chose their own "
                 "class's map less than 70 % of the time, or those of the smaller class "
                 "alone less than half the time against the class they preferred most "
                 "(unless that split recovered a random split's cost), and a class left "
                 "empty took the "
                 "smaller side of a class cut in two along a direction of variability "
                 "within it", "recovered at least 0.2 of a random split's cost",
                 "shared the consensus map (reconstructed from all particles) beyond 18 A",
                 "around their density (3 robust", "exact expectation-maximisation update",
                 "class 4, 0 particles"):
        assert ours in pca, ours
    relaxed = methods_text(Settings(ref="r.mrc", n_classes=2, sigma_ang=2, relax_sym="C2")
                           .resolved(), 150, [70, 80])
    assert "related by C2 symmetry, relaxed: the maps kept C1" in relaxed
    assert "coarser angular and offset samplings" not in relaxed
    coarser = methods_text(Settings(ref="r.mrc", n_classes=2, allow_coarser_sampling=True)
                           .resolved(), 150, [70, 80])
    assert "coarser angular and offset samplings in the iterations whose expected" in coarser
    several = methods_text(Settings(ref="refs.star", n_classes=2).resolved(), 150, [70, 80])
    assert "2 reference maps, one per class" in several and "no random seeds" in several


# --------------------------------------------------------------------------- validation
def _errors(prot):
    return "\n".join(prot.validate())


def test_valid_setup_has_no_errors(project, inputs):
    assert _errors(_classifier(project, inputs)) == ""


def test_validation_no_ctf(project, inputs):
    prot = _classifier(project, inputs)
    prot.inputParticles.set(inputs["noctf"])
    assert "have no CTF information" in _errors(prot)
    prot.doCTF.set(False)
    assert "CTF" not in _errors(prot)


def test_validation_reference_mismatch_offers_resampling(project, inputs):
    prot = _classifier(project, inputs)
    prot.referenceVolume.set(inputs["ref40"])
    err = _errors(prot)
    assert "Reference map is 40 px at 4.800 A/px" in err and "Resample" in err
    prot.resampleReference.set(True)
    assert _errors(prot) == ""


@pytest.fixture(scope="module")
def true_volumes(project, sim):
    """The simulated classes' true maps as a SetOfVolumes (class order)."""
    imp = launch(project, project.newProtocol(
        ProtImportVolumes, filesPath=sim["dir"], filesPattern="true_class*.mrc",
        samplingRate=APIX))
    return imp.outputVolumes


def test_validation_fast_subsets_needs_20_iterations(project, inputs):
    prot = _classifier(project, inputs, useFastSubsets=True, numberOfIterations=19)
    assert "'Use fast subsets' needs at least 20 iterations" in _errors(prot)
    prot.numberOfIterations.set(20)
    assert _errors(prot) == ""


def test_validation_reference_set_needs_k_volumes_and_relion_start(project, inputs,
                                                                   true_volumes):
    prot = _classifier(project, inputs)
    prot.referenceVolume.set(true_volumes)
    assert _errors(prot) == ""
    assert "--ref %s" % prot._getFileName("reference_list") in prot._getEngineArgs()
    prot.numberOfClasses.set(3)
    assert "has 2 volumes but 'Number of classes' is 3" in _errors(prot)
    prot.numberOfClasses.set(2)
    prot.initialClasses.set(2)
    assert "needs 'How classes start' = RELION" in _errors(prot)


@pytest.mark.slow
@needs_engine
def test_reference_set_each_class_starts_from_its_volume(project, inputs, true_volumes, sim):
    """A SetOfVolumes as reference: the list and maps are written, and each class ends
    closest to the true map it started from."""
    prot = _classifier(project, inputs, numberOfIterations=3)
    prot.referenceVolume.set(true_volumes)
    prot = launch(project, prot)
    listed = convert.read_star(prot._getFileName("reference_list"))["model_classes"]
    assert list(listed["rlnReferenceImage"]) == [prot._getFileName("reference_k", ref=k)
                                                 for k in (1, 2)]
    truths = [_read_map(os.path.join(sim["dir"], "true_class%03d.mrc" % k)) for k in (1, 2)]
    for vol in prot.outputVolumes.iterItems(orderBy="id"):
        final = _read_map(convert.strip_format(vol.getFileName()))
        cc = [np.corrcoef(final.ravel(), t.ravel())[0, 1] for t in truths]
        assert int(np.argmax(cc)) == vol.getObjId() - 1, cc


def test_validation_mask_diameter_larger_than_box(project, inputs):
    prot = _classifier(project, inputs, maskDiameterA=250)
    assert "Mask diameter 250.0 A is larger than the particle box" in _errors(prot)


def test_validation_number_of_classes(project, inputs):
    prot = _classifier(project, inputs, numberOfClasses=0)
    assert "Number of classes must be at least 1" in _errors(prot)


def test_gpu_list_is_checked_without_a_gpu(project, inputs):
    """The form checks RELION's GPU list syntax only (a head node need not see a GPU:
    the engine checks CuPy and the devices where the job runs); usesGpu / getGpuList
    give Scipion the devices, as scipion-em-relion does."""
    prot = _classifier(project, inputs, doGpu=True, gpusToUse="0,1:2")
    assert prot.usesGpu() and prot.getGpuList() == [0, 1, 2]
    assert "GPU" not in _errors(prot)
    prot = _classifier(project, inputs, doGpu=True, gpusToUse="")
    assert prot.getGpuList() == [] and _errors(prot) == ""
    prot = _classifier(project, inputs, doGpu=True, gpusToUse="gpu0")
    assert "Which GPUs to use: 'gpu0' is not a device list" in _errors(prot)
    prot = _classifier(project, inputs, gpusToUse="0:1")
    assert not prot.usesGpu() and prot.getGpuList() == []


def test_blush_validates_and_is_cited_only_when_used(project, inputs):
    """'Use Blush regularisation? Yes' passes validation, gives --blush, and the methods
    text and citations mention Blush only then."""
    import dataclasses
    from cryoclass_plugin.engine.options import Settings
    from cryoclass_plugin.protocols.protocol_classify3d import methods_text
    prot = _classifier(project, inputs, doBlush=True)
    assert _errors(prot) == ""
    assert "--blush" in prot._getEngineArgs().split()
    assert "Kimanius2024" in prot._citations()
    assert "Kimanius2024" not in _classifier(project, inputs)._citations()
    base = Settings(input_star="p.star", output_root="run", ref="r.mrc", n_classes=2).resolved()
    on = methods_text(dataclasses.replace(base, blush=True), 100, [50, 50])
    off = methods_text(base, 100, [50, 50])
    assert "Blush [Kimanius2024]" in on and "Blush" not in off
    assert "from 25 A to the network's Nyquist (6 A)" in on
    relions = methods_text(dataclasses.replace(base, blush=True, blush_lowres=0.0), 100, [50, 50])
    assert "below the network's Nyquist (6 A)" in relions


def test_default_start_is_consensus_pca_with_fixed_pose_phase(project, inputs):
    prot = project.newProtocol(ProtCryoClassClassify3D, numberOfClasses=3)
    assert prot.initialClasses.get() == 2 and prot.fixedPoseIterations.get() == 8
    prot = _classifier(project, inputs, initialClasses=2, fixedPoseIterations=4,
                       numberOfIterations=12)
    text = prot._getEngineArgs()
    assert "--init_classes pca" in text and "--classify_fixed_iter 4" in text
    assert "--classify_local_sigma 3" in text          # the default range, 9 deg, / 3
    assert "--consensus_extra_iter 6" in text
    assert "--merge_threshold 0.3" in text
    assert "--class_difference_highres 18" in text
    assert "--joint_consensus" in text and "--mean_consensus" not in text
    assert "--auto_mask_sigma 3" in text
    assert "--tau2_estimate" not in text               # automatic (em with this start)
    prot = _classifier(project, inputs, initialClasses=2, jointConsensus=False,
                       autoMaskSigma=0.0, tau2Estimate=2, mergeThreshold=0.0)
    assert "--tau2_estimate em" in prot._getEngineArgs()
    assert "--merge_threshold 0 " in prot._getEngineArgs() + " "
    assert "--mean_consensus" in prot._getEngineArgs()
    assert "--auto_mask_sigma 0" in prot._getEngineArgs()
    prot = _classifier(project, inputs, initialClasses=2, tau2Estimate=1)
    assert "--tau2_estimate power" in prot._getEngineArgs()
    prot = _classifier(project, inputs, initialClasses=2, autoMaskSigma=-1.0)
    assert "Mask the references around their density" in "\n".join(prot.validate())
    assert "--init_classes" not in _classifier(project, inputs)._getEngineArgs()
    prot = _classifier(project, inputs, initialClasses=2, localRangeAfterSplit=0.0)
    assert "--classify_local_sigma 0" in prot._getEngineArgs()
    prot = _classifier(project, inputs, initialClasses=2, localRangeAfterSplit=-1.0)
    assert "Local search range after the split" in "\n".join(prot.validate())
    prot = _classifier(project, inputs, initialClasses=2, sharedConsensusBeyond=0.0)
    assert "--class_difference_highres 0" in prot._getEngineArgs()
    prot = _classifier(project, inputs, initialClasses=2, sharedConsensusBeyond=-5.0)
    assert "share the consensus beyond" in "\n".join(prot.validate())
    prot = _classifier(project, inputs, initialClasses=2, mergeThreshold=-0.1)
    assert "Merge duplicate classes (threshold) must be 0" in "\n".join(prot.validate())
    prot = _classifier(project, inputs, initialClasses=2, consensusExtraIterations=-1)
    assert "Extra consensus iterations must be 0 or more" in "\n".join(prot.validate())


def test_validation_consensus_start_needs_iterations(project, inputs):
    prot = _classifier(project, inputs, initialClasses=2, numberOfIterations=5)
    assert "needs more than 5 iterations" in _errors(prot)
    prot.numberOfIterations.set(8)
    assert "needs more than 5" not in _errors(prot)


def test_validation_symmetry(project, inputs):
    prot = _classifier(project, inputs, symmetryGroup="X7")
    assert "Symmetry 'X7' is not valid" in _errors(prot)
    for good in ("C1", "c4", "D2", "T", "O", "I1"):
        prot.symmetryGroup.set(good)
        assert "Symmetry" not in _errors(prot), good


def test_validation_helix_and_skip_align(project, inputs):
    prot = _classifier(project, inputs, doHelix=True)
    assert "Helical reconstruction is not implemented" in _errors(prot)
    prot = _classifier(project, inputs, doImageAlignment=False)
    assert "needs particles with 3D alignment" in _errors(prot)
    # Local searches around the input poses need them; a consensus start does not.
    prot = _classifier(project, inputs, localAngularSearch=True)
    assert "local angular searches" in _errors(prot)
    prot = _classifier(project, inputs, localAngularSearch=True, initialClasses=2)
    assert _errors(prot) == ""
    prot = _classifier(project, inputs, localAngularSearch=True, initialClasses=2,
                       localAngularSearchRange=0.0)
    assert "search range must be positive" in _errors(prot)


def test_validation_continue(project, inputs):
    prot = project.newProtocol(ProtCryoClassClassify3D, doContinue=True)
    assert "Select the run to continue" in _errors(prot)
    prev = _classifier(project, inputs)
    project.saveProtocol(prev)
    prot.continueRun.set(prev)
    assert "has no finished iteration" in _errors(prot)


def test_selection_helpers():
    assert parse_class_numbers("1, 3 5-7") == [1, 3, 5, 6, 7]
    with pytest.raises(ValueError):
        parse_class_numbers("1 x")
    res = np.array([0.0, 0.01, 0.02, 0.04, 0.08])
    ssnr = np.array([100.0, 10.0, 4.0, 1.0, 0.1])
    assert mean_ssnr(res, ssnr, 40.0) == pytest.approx(7.0)  # shells 0.01, 0.02
    assert mean_ssnr(res, ssnr, 0) == pytest.approx((10 + 4 + 1 + 0.1) / 4)


# --------------------------------------------------------------------------- engine runs
@pytest.fixture(scope="module")
def classified(project, inputs):
    # Our recommended start (consensus alignment + heterogeneity PCA, issue 7): RELION's
    # random start leaves these two classes mixed as often as not.
    prot = _classifier(project, inputs, numberOfMpi=2, initialClasses=2)
    return launch(project, prot)


def _class_of(classes):
    return {int(p.getObjId()): int(p.getClassId()) for cls in classes for p in cls}


@needs_engine
@pytest.mark.slow
def test_classification_with_mpi(classified, inputs):
    prot = classified
    classes, volumes = prot.outputClasses, prot.outputVolumes
    assert 1 <= classes.getSize() <= N_CLASSES and volumes.getSize() == N_CLASSES
    assert all(cls.hasAlignmentProj() and cls.hasCTF() for cls in classes)
    total = 0
    in_parts = {p.getObjId(): p.clone() for p in inputs["particles"]}
    for cls in classes:
        rep = cls.getRepresentative()
        assert os.path.exists(rep.getFileName())
        assert rep.getSamplingRate() == pytest.approx(APIX)
        assert 0 <= cls._rlnClassDistribution.get() <= 1
        assert cls._rlnEstimatedResolution.get() > 0
        for p in cls:
            total += 1
            assert p.getClassId() == cls.getObjId()
            assert p.hasTransform() and p.getTransform().getMatrix().shape == (4, 4)
            src = in_parts[p.getObjId()]
            assert p.hasCTF()
            assert p.getCTF().getDefocusU() == pytest.approx(src.getCTF().getDefocusU())
            assert p.getAcquisition().getVoltage() == pytest.approx(300.0)
            assert p.getFileName() == src.getFileName() and p.getIndex() == src.getIndex()
    assert total == N_PARTS
    for vol in volumes:
        assert vol.getSamplingRate() == pytest.approx(APIX)
        assert vol.getDim() == (BOX, BOX, BOX)

    # the Scipion classes and transforms are those of the engine's last data.star
    it = prot._lastIter()
    assert it == ITERATIONS
    data, _ = convert.read_particle_table(prot._getFileName("data", iter=it))
    got = _class_of(classes)
    by_name = {}
    for p in inputs["particles"]:
        by_name[p.getIndex()] = p.getObjId()
    rows = {by_name[convert.relion_to_location(r["rlnImageName"])[0]]: r
            for r in data.to_dict("records")}
    assert all(got[i] == int(rows[i]["rlnClassNumber"]) for i in got)
    some = next(iter(classes)).getFirstItem()
    back = convert.alignment_to_row(some.getTransform().getMatrix(), APIX)
    r = rows[some.getObjId()]
    from cryoclass_plugin.engine.geometry import euler_to_matrix
    assert np.allclose(euler_to_matrix(back["rlnAngleRot"], back["rlnAngleTilt"],
                                       back["rlnAnglePsi"]),
                       euler_to_matrix(r["rlnAngleRot"], r["rlnAngleTilt"], r["rlnAnglePsi"]),
                       atol=1e-6)
    assert back["rlnOriginXAngst"] == pytest.approx(r["rlnOriginXAngst"], abs=1e-6)

    assert any("Class %d" % next(iter(classes)).getObjId() in line
               for line in prot.summary())
    assert "classified %d particles into 2 3D classes" % N_PARTS in prot.methods()[0]


@pytest.mark.slow
@needs_engine
def test_methods_of_a_finished_run(classified):
    text = classified._methods()[0]
    assert "k-means clustering" in text and "Class sizes: class 1" in text
    from pyworkflow.constants import BETA
    assert classified._devStatus == BETA


@pytest.mark.slow
def test_classification_sources_are_recorded(project, classified, inputs):
    parents = {o.getObjId() for o in project.getSourceParents(classified.outputClasses)}
    assert inputs["particles"].getObjId() in parents
    assert inputs["ref"].getObjId() in parents
    parents = {o.getObjId() for o in project.getSourceParents(classified.outputVolumes)}
    assert inputs["particles"].getObjId() in parents


@needs_engine
@pytest.mark.slow
def test_classification_recovers_the_simulated_classes(classified, sim):
    from cryoclass_plugin.engine.metrics import adjusted_rand_index
    got = _class_of(classified.outputClasses)
    # particle i of truth.star is Scipion particle id i + 1 (import keeps the order)
    truth = convert.read_star(sim["truth_star"])["particles"]
    true = truth["rlnClassNumber"].to_numpy()
    pred = np.array([got[i + 1] for i in range(N_PARTS)])
    ari = adjusted_rand_index(true, pred)
    assert ari >= 0.6, "ARI %.3f vs truth (oracle accuracy %.2f)" % (
        ari, sim["oracle_accuracy"])


@needs_engine
@pytest.mark.slow
def test_copy_with_same_seed_gives_same_classes(project, classified):
    copy = project.copyProtocol(classified)
    copy = launch(project, copy)
    assert _class_of(copy.outputClasses) == _class_of(classified.outputClasses)


@needs_engine
@pytest.mark.slow
def test_continue_from_a_previous_run(project, classified):
    start = ITERATIONS - 1
    prot = project.newProtocol(ProtCryoClassClassify3D, doContinue=True,
                               continueIter=str(start), numberOfIterations=2,
                               offsetSearchRangePix=3,
                               numberOfMpi=2)
    prot.continueRun.set(classified)
    assert _errors(prot) == ""
    args = prot._getEngineArgs().split()
    assert args[args.index("--continue") + 1].endswith(
        "cryoclass_it%03d_optimiser.star" % start)
    assert args[args.index("--iter") + 1] == str(start + 2)
    assert args[args.index("--K") + 1] == str(N_CLASSES)
    assert args[args.index("--particle_diameter") + 1] == str(MASK_DIAMETER)
    assert args[args.index("--random_seed") + 1] == "11"
    assert "--ref" not in args and "--firstiter_cc" not in args
    prot = launch(project, prot)
    assert prot._lastIter() == start + 2
    assert sum(c.getSize() for c in prot.outputClasses) == N_PARTS
    assert _ids(prot.outputClasses.getImages()) == _ids(classified.outputClasses.getImages())
    bad = project.newProtocol(ProtCryoClassClassify3D, doContinue=True, continueIter="99")
    bad.continueRun.set(classified)
    assert "Iteration 99 does not exist" in _errors(bad)


@needs_engine
@pytest.mark.slow
def test_classes2d_upstream_only_enabled_classes(project, inputs):
    imp = inputs["classes2d_prot"]
    classes2d = imp.outputClasses2D
    # untick class 3 the way the class viewer does: the enabled flag in the set's sqlite
    path = classes2d.getFileName()
    from pwem.objects import SetOfClasses2D
    edit = SetOfClasses2D(filename=path)
    cls = edit[3]
    cls.setEnabled(False)
    edit.update(cls)
    edit.write()
    edit.close()
    expected = sorted(p.getObjId() for c in SetOfClasses2D(filename=path)
                      if c.isEnabled() for p in c)
    assert len(expected) == N_PARTS - N_PARTS // 3
    prot = _classifier(project, inputs, numberOfIterations=2, numberOfMpi=2)
    prot.inputParticles.set(imp)
    prot.inputParticles.setExtended("outputClasses2D")
    assert _errors(prot) == ""
    prot = launch(project, prot)
    got = sorted(p.getObjId() for c in prot.outputClasses for p in c)
    assert got == expected
    star, _ = convert.read_particle_table(prot._getFileName("input_star"))
    assert sorted(star["rlnImageId"]) == expected


@pytest.mark.slow
@needs_engine
def test_select_classes_by_number_and_with_pwem_subset(project, classified, tmp_path):
    classes = classified.outputClasses
    k = max(classes, key=lambda c: c.getSize()).getObjId()
    members = sorted(p.getObjId() for p in classes[k])

    sel = project.newProtocol(ProtCryoClassSelectClasses, classNumbers=str(k))
    sel.inputClasses.set(classified)
    sel.inputClasses.setExtended("outputClasses")
    sel = launch(project, sel)
    assert _ids(sel.outputParticles) == members
    assert sel.outputParticles.hasAlignmentProj() and sel.outputParticles.hasCTF()
    assert _ids(sel.outputVolumes) == [k] and sel.outputClasses.getSize() == 1
    assert sel.selectedClasses.get() == str(k)

    # pwem's subset machinery (what the class viewers launch): ids of the kept classes
    ids_txt = tmp_path / "selection.txt"
    ids_txt.write_text("%d\n" % k)
    sub = project.newProtocol(ProtUserSubSet, sqliteFile="%s," % ids_txt,
                              outputClassName="SetOfParticles")
    sub.inputObject.set(classified)
    sub.inputObject.setExtended("outputClasses")
    sub = launch(project, sub)
    assert _ids(sub.outputParticles) == members

    bad = project.newProtocol(ProtCryoClassSelectClasses, classNumbers="7")
    bad.inputClasses.set(classified)
    bad.inputClasses.setExtended("outputClasses")
    assert "Classes 7 are not in the input" in _errors(bad)


@needs_engine
@pytest.mark.slow
def test_select_classes_automatically(project, classified):
    classes = classified.outputClasses
    dist = {c.getObjId(): c._rlnClassDistribution.get() for c in classes}
    best = max(dist, key=dist.get)
    sel = project.newProtocol(ProtCryoClassSelectClasses, selectionMode=1, rankBy=0,
                              numberToKeep=1)
    sel.inputClasses.set(classified)
    sel.inputClasses.setExtended("outputClasses")
    sel = launch(project, sel)
    assert sel.selectedClasses.get() == str(best)
    assert _ids(sel.outputParticles) == sorted(p.getObjId() for p in classes[best])

    scores = sel._classScores()
    assert all(np.isfinite(s[3]) for s in scores), scores  # SSNR read from model.star
    ssnr = project.newProtocol(ProtCryoClassSelectClasses, selectionMode=1, rankBy=2,
                               numberToKeep=0, minSsnr=0.0)
    ssnr.inputClasses.set(classified)
    ssnr.inputClasses.setExtended("outputClasses")
    ssnr = launch(project, ssnr)
    assert ssnr.outputClasses.getSize() >= 1

    none = project.newProtocol(ProtCryoClassSelectClasses, selectionMode=1,
                               minDistribution=101.0)
    none.inputClasses.set(classified)
    none.inputClasses.setExtended("outputClasses")
    with pytest.raises(ProtocolFailed, match="No class passes the selection"):
        launch(project, none)


def test_methods_read_the_merges_and_splits_of_the_log(tmp_path):
    from cryoclass_plugin.protocols.protocol_classify3d import _merge_lines
    log = tmp_path / "run.log"
    log.write_text("merge test: classes 1 and 2 (500 particles ...)\n"
                   "merge: class 4 joins class 2 (one structure by the held-out test)\n"
                   "split within class 3 (700 particles) along own eigenvolume 1: ...\n"
                   "split: 138 particles of class 3 start class 4 (two structures ...)\n")
    assert _merge_lines(str(log)) == ["class 4 joins class 2",
                                      "138 particles of class 3 start class 4"]
    assert _merge_lines(str(tmp_path / "missing.log")) == []


def test_methods_of_a_run_whose_state_lacks_a_newer_option(tmp_path):
    """A state file written without ``classify_final_iter`` (and other options that a
    later version added) gives the settings the run ran with: those features off, so
    the methods text does not claim searches that never ran."""
    import json
    from cryoclass_plugin.engine.options import Settings
    from cryoclass_plugin.protocols.protocol_classify3d import _saved_settings, methods_text
    saved = {k: v for k, v in vars(Settings(ref="r.mrc", n_classes=4, init_classes="pca")
                                   ).items()
             if k not in ("classify_final_iter", "split_into_empty")}
    saved["a_field_this_version_lacks"] = 1
    state = tmp_path / "run_it025_state.npz"
    np.savez(state, __settings__=np.array(json.dumps(saved)))
    settings = _saved_settings(str(state))
    assert settings.classify_final_iter == 0 and settings.split_into_empty is False
    assert settings.classify_local_sigma == 3.0          # what the file says
    text = methods_text(settings, 150, [50, 60, 40, 0], merges=[])
    assert "one HEALPix order finer (order 5" not in text
    assert "HEALPix order 4" in text
