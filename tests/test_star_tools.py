"""cryoclass star-printtable / star-plottable on a fake run (and against RELION's
relion_star_printtable when it is installed)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_run import make_fake_run  # noqa: E402

from cryoclass_plugin import cli  # noqa: E402
from cryoclass_plugin.commands import star_plottable  # noqa: E402


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_run(str(tmp_path_factory.mktemp("fake_run")))


def printtable(capsys, *args):
    rc = cli.main(["star-printtable", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_printtable_loop_values(fake, capsys):
    model = fake["root"] + "_it003_model.star"
    rc, out, err = printtable(capsys, model, "data_model_class_2", "rlnResolution",
                              "rlnSsnrMap")
    assert rc == 0 and err == ""
    rows = [ln.split() for ln in out.splitlines()]
    assert len(rows) == 17 and all(len(r) == 2 for r in rows)
    res = np.array([float(r[0]) for r in rows])
    ssnr = np.array([float(r[1]) for r in rows])
    np.testing.assert_allclose(res, np.arange(17) / (32 * 4.0), atol=1e-6)
    np.testing.assert_allclose(ssnr, fake["ssnr"][(3, 2)], rtol=1e-6)


def test_printtable_particles_and_raw_text(fake, capsys):
    data = fake["root"] + "_it002_data.star"
    rc, out, _ = printtable(capsys, data, "data_particles", "rlnImageName",
                            "_rlnClassNumber")
    assert rc == 0
    rows = [ln.split() for ln in out.splitlines()]
    assert len(rows) == 300
    assert rows[0][0] == "000001@Extract/job007/particles.mrcs"
    np.testing.assert_array_equal([int(r[1]) for r in rows], fake["class_number"][2])
    # values are printed exactly as written in the file
    text = open(fake["root"] + "_it003_model.star").read()
    rc, out, _ = printtable(capsys, fake["root"] + "_it003_model.star",
                            "data_model_classes", "rlnClassDistribution")
    for v in out.split():
        assert v in text


def test_printtable_keyvalue_block(fake, capsys):
    rc, out, _ = printtable(capsys, fake["root"] + "_it001_optimiser.star",
                            "data_optimiser_general", "rlnCurrentIteration",
                            "rlnNumberOfIterations")
    assert rc == 0 and out.split() == ["1", "3"]
    rc, out, _ = printtable(capsys, fake["root"] + "_it003_model.star", "model_general",
                            "rlnPixelSize")
    assert rc == 0 and float(out) == 4.0


def test_printtable_all_columns_with_header(fake, capsys):
    rc, out, _ = printtable(capsys, fake["root"] + "_it003_model.star",
                            "data_model_groups", "--header")
    lines = out.splitlines()
    assert lines[0].split()[1:] == ["rlnGroupNumber", "rlnGroupName",
                                    "rlnGroupNrParticles", "rlnGroupScaleCorrection"]
    assert len(lines) == 3


@pytest.mark.parametrize("args, must", [
    (("nope.star", "data_particles", "rlnClassNumber"), ["nope.star", "no such"]),
    (("{model}", "data_model_class_9", "rlnResolution"),
     ["no table data_model_class_9", "tables: data_model_general", "data_model_class_3"]),
    (("{model}", "data_model_class_1", "rlnFoo", "rlnResolution"),
     ["no column rlnFoo", "columns: rlnSpectralIndex", "rlnSsnrMap"]),
])
def test_printtable_errors_one_line(fake, capsys, tmp_path, args, must):
    args = [a.format(model=fake["root"] + "_it003_model.star") for a in args]
    if args[0] == "nope.star":
        args[0] = str(tmp_path / "nope.star")
    rc, out, err = printtable(capsys, *args)
    assert rc == 2 and out == ""
    err = err.strip()
    assert "\n" not in err and err.startswith("cryoclass star-printtable: error:")
    for m in must:
        assert m in err


def test_printtable_bad_star_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.star"
    bad.write_text("this is not a star file\n")
    rc, out, err = printtable(capsys, bad, "data_particles", "rlnX")
    assert rc == 2 and "\n" not in err.strip() and str(bad) in err


@pytest.mark.skipif(not shutil.which("relion_star_printtable"),
                    reason="relion_star_printtable not installed")
def test_printtable_matches_relion(fake, capsys):
    model = fake["root"] + "_it003_model.star"
    for table, cols in (("data_model_class_1", ["rlnResolution", "rlnSsnrMap"]),
                        ("data_model_classes", ["rlnClassDistribution"])):
        ref = subprocess.run(["relion_star_printtable", model, table, *cols],
                             capture_output=True, text=True, check=True).stdout
        rc, out, _ = printtable(capsys, model, table, *cols)
        a = np.array([[float(v) for v in ln.split()] for ln in ref.splitlines() if ln])
        b = np.array([[float(v) for v in ln.split()] for ln in out.splitlines()])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_plottable_writes_png(fake, tmp_path, capsys):
    from test_figures import assert_not_blank

    out = tmp_path / "ssnr.png"
    files = [f"{fake['root']}_it{i:03d}_model.star" for i in range(4)]
    rc = cli.main(["star-plottable", *files, "data_model_class_1", "rlnResolution",
                   "rlnSsnrMap", "--logy", "-o", str(out)])
    assert rc == 0
    assert_not_blank(str(out))
    # a quoted glob, row number on X, two Y columns
    out2 = tmp_path / "pmax.png"
    rc = cli.main(["star-plottable", f"{fake['root']}_it*_data.star", "data_particles",
                   "-", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples",
                   "-o", str(out2)])
    assert rc == 0
    assert_not_blank(str(out2))


def test_plottable_one_line_per_file(fake):
    files = [f"{fake['root']}_it{i:03d}_model.star" for i in (1, 2, 3)]
    fig = star_plottable.build_figure(files, "data_model_class_1", "rlnResolution",
                                      ["rlnSsnrMap"], logy=True)
    ax = fig.axes[0]
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels == ["run_it001_model", "run_it002_model", "run_it003_model"]
    assert ax.get_yscale() == "log"


def test_plottable_glob_is_natural_order(fake):
    files, table, x, ys = star_plottable.split_items(
        [f"{fake['root']}_it*_model.star", "data_model_classes", "-",
         "rlnClassDistribution"])
    assert [os.path.basename(f) for f in files] == [f"run_it{i:03d}_model.star"
                                                     for i in range(4)]
    assert (table, x, ys) == ("data_model_classes", "-", ["rlnClassDistribution"])


@pytest.mark.parametrize("items, must", [
    (["{data}", "data_particles", "rlnAngleRot"], "give an X column"),
    (["{data}", "data_particles", "rlnAngleRot", "rlnFoo"], "no column rlnFoo"),
    (["{data}", "data_particles", "-", "rlnImageName"], "not numeric"),
    (["{root}_it*_nothing.star", "data_x", "a", "b"], "no files match"),
    (["data_particles", "a", "b"], "at least one STAR file"),
    (["{data}", "data_model_classes", "a", "b"], "no table data_model_classes"),
])
def test_plottable_errors_one_line(fake, capsys, tmp_path, items, must):
    items = [a.format(data=fake["root"] + "_it003_data.star", root=fake["root"])
             for a in items]
    rc = cli.main(["star-plottable", *items, "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and must in err
    assert not (tmp_path / "p.png").exists()
