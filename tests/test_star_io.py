"""STAR and MRC I/O: RELION 3.0 / 3.1 / 5.0 particle tables, stack resolution, image
access (mmap, preread, scratch), writers, and the one-line error messages."""
import os
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryoclass_plugin.engine import mrc_io, star_io
from cryoclass_plugin.engine.errors import CryoClassError

BOX = 16
APIX = 2.5


def make_stack(path, n, box=BOX, apix=APIX, seed=0):
    images = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    images += np.arange(n, dtype=np.float32)[:, None, None] * 100  # image i has mean ~100 i
    mrc_io.write_stack(path, images, apix)
    return images


def particles_31(n, stack="Extract/stack.mrcs", group=1):
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
        "rlnMicrographName": [f"mic{i % 2}.mrc" for i in range(n)],
        "rlnDefocusU": np.linspace(10000, 20000, n),
        "rlnDefocusV": np.linspace(9800, 19800, n),
        "rlnDefocusAngle": np.linspace(-30, 30, n),
        "rlnOriginXAngst": np.linspace(-2.5, 2.5, n),
        "rlnOriginYAngst": np.linspace(1.25, -1.25, n),
        "rlnAngleRot": np.linspace(0, 90, n),
        "rlnOpticsGroup": np.full(n, group),
    })


def assert_one_line_naming(err, *needles):
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


@pytest.fixture
def set31(tmp_path):
    images = make_stack(tmp_path / "Extract" / "stack.mrcs", 6)
    star = tmp_path / "particles.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), particles_31(6))
    return star, images


# --------------------------------------------------------------------------- reading

def test_roundtrip_31(set31):
    star, images = set31
    table = star_io.read_particles(star)
    assert table.version == "3.1" and table.box == BOX and table.apix == pytest.approx(APIX)
    assert table.has_ctf and len(table) == 6
    df = table.df
    ref = particles_31(6)
    np.testing.assert_allclose(df["rlnDefocusU"], ref["rlnDefocusU"], rtol=1e-9)
    np.testing.assert_allclose(df["rlnOriginXAngst"], ref["rlnOriginXAngst"], atol=1e-6)
    assert list(df["rlnImageName"]) == list(ref["rlnImageName"])
    # optics merged on, defaults filled
    assert (df["rlnVoltage"] == 300).all() and (df["rlnImageSize"] == BOX).all()
    assert (df["rlnCtfScalefactor"] == 1).all() and (df["rlnPhaseShift"] == 0).all()
    assert (df["rlnCtfBfactor"] == 0).all() and (df["rlnAnglePsi"] == 0).all()
    for col in ("rlnImageName", "rlnOriginXAngst", "rlnOriginYAngst", "rlnImagePixelSize",
                "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
                "rlnAmplitudeContrast", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                "rlnOpticsGroup", "rlnMicrographName"):
        assert col in df.columns
    # written files are RELION 3.1 style
    text = star.read_text()
    assert text.startswith("# version 30001") and "data_optics" in text
    assert "_rlnImageName #1" in text


def test_write_back_roundtrip_and_small_values(set31, tmp_path):
    star, _ = set31
    table = star_io.read_particles(star)
    parts = table.particles_table()
    parts["rlnSigma2Test"] = 1.234567e-9  # must survive (RELION's %.6f would print 0)
    out = tmp_path / "again.star"
    star_io.write_particles(out, table.optics_table(), parts)
    again = star_io.read_particles(out)
    np.testing.assert_allclose(again.df["rlnSigma2Test"], 1.234567e-9, rtol=1e-6)
    pd.testing.assert_series_equal(again.df["rlnDefocusAngle"], table.df["rlnDefocusAngle"],
                                   check_exact=False, rtol=1e-6)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic: no leftovers


def test_write_star_key_value_blocks(tmp_path):
    path = tmp_path / "model.star"
    loop = pd.DataFrame({"rlnSpectralIndex": [0, 1], "rlnSsnrMap": [1.5, 1e-7]})
    star_io.write_star(path, {"model_general": {"rlnNrClasses": 3, "rlnPixelSize": 2.5,
                                                "rlnDoFlag": True, "rlnName": "a b"},
                              "model_class_1": loop})
    blocks = star_io.read_star(path)
    gen = blocks["model_general"]
    assert gen["rlnNrClasses"] == 3 and gen["rlnPixelSize"] == 2.5
    assert gen["rlnDoFlag"] == 1 and gen["rlnName"] == "a b"
    np.testing.assert_allclose(blocks["model_class_1"]["rlnSsnrMap"], [1.5, 1e-7])


def test_relion30_table(tmp_path):
    images = make_stack(tmp_path / "stacks" / "s.mrcs", 4)
    df = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stacks/s.mrcs" for i in range(4)],
        "rlnMicrographName": ["m.mrc"] * 4,
        "rlnDefocusU": [15000.0] * 4, "rlnDefocusV": [14000.0] * 4,
        "rlnDefocusAngle": [10.0] * 4, "rlnVoltage": [200.0] * 4,
        "rlnSphericalAberration": [2.0] * 4, "rlnAmplitudeContrast": [0.07] * 4,
        "rlnDetectorPixelSize": [5.0] * 4, "rlnMagnification": [20000.0] * 4,
        "rlnOriginX": [1.0, -2.0, 0.5, 0.0], "rlnOriginY": [0.0, 1.0, -1.5, 2.0],
    })
    star = tmp_path / "old.star"
    star_io.write_star(star, {"": df})  # RELION 3.0: one 'data_' loop, no optics
    table = star_io.read_particles(star)
    assert table.version == "3.0" and table.optics is None
    assert table.apix == pytest.approx(5.0 * 1e4 / 20000.0)  # 2.5 A
    assert table.box == BOX  # from the stack header
    np.testing.assert_allclose(table.df["rlnOriginXAngst"], [2.5, -5.0, 1.25, 0.0])
    np.testing.assert_allclose(table.df["rlnOriginYAngst"], [0.0, 2.5, -3.75, 5.0])
    assert (table.df["rlnVoltage"] == 200).all() and (table.df["rlnOpticsGroup"] == 1).all()
    # explicit pixel size overrides
    assert star_io.read_particles(star, apix=3.0).apix == 3.0
    # converting to 3.1 keeps origins in Angstrom and moves microscope columns to optics
    out = tmp_path / "new.star"
    star_io.write_particles(out, table.optics_table(), table.particles_table())
    new = star_io.read_particles(out)
    assert new.version == "3.1" and new.apix == pytest.approx(2.5)
    np.testing.assert_allclose(new.df["rlnOriginXAngst"], table.df["rlnOriginXAngst"])
    assert (new.df["rlnVoltage"] == 200).all()
    with mrc_io.ImageSource(new) as src:
        np.testing.assert_allclose(src.get([2, 0]), images[[2, 0]])


def test_relion30_without_pixel_size_needs_apix(tmp_path):
    make_stack(tmp_path / "s.mrcs", 2)
    star = tmp_path / "p.star"
    star_io.write_star(star, {"images": pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"]})})
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "rlnDetectorPixelSize", "rlnMagnification",
                           "rlnImagePixelSize")
    assert "--angpix" not in str(err.value)  # refine has no such flag
    table = star_io.read_particles(star, apix=1.5)
    assert table.apix == 1.5 and not table.has_ctf and table.box == BOX


def test_relion50_with_general_block(tmp_path):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 5)
    optics = star_io.optics_group_table(APIX, BOX, n_groups=2)
    optics["rlnCtfDataArePhaseFlipped"] = 0
    parts = particles_31(5)
    parts["rlnOpticsGroup"] = [1, 2, 1, 2, 2]
    parts["rlnTomoParticleName"] = [f"t/{i}" for i in range(5)]  # unknown 5.0 columns
    parts["rlnCoordinateZ"] = 0.0
    star = tmp_path / "p5.star"
    text = star_io.star_text({"general": {"rlnTomoSubTomosAre2DStacks": 1},
                              "optics": optics, "particles": parts})
    star.write_text(text.replace("# version 30001", "# version 50001"))
    table = star_io.read_particles(star)
    assert table.version == "3.1" and len(table) == 5 and table.box == BOX
    assert list(table.df["rlnOpticsGroup"]) == [1, 2, 1, 2, 2]
    assert list(table.df["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup2",
                                                    "opticsGroup1", "opticsGroup2",
                                                    "opticsGroup2"]
    assert "rlnTomoParticleName" in table.df.columns


def test_optics_merge_by_group_number(tmp_path):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 4)
    optics = star_io.optics_group_table(APIX, BOX, n_groups=2)
    optics["rlnVoltage"] = [300.0, 200.0]
    optics = optics.iloc[::-1].reset_index(drop=True)  # order must not matter
    parts = particles_31(4)
    parts["rlnOpticsGroup"] = [2, 1, 2, 1]
    star = tmp_path / "p.star"
    star_io.write_particles(star, optics, parts)
    table = star_io.read_particles(star)
    assert list(table.df["rlnVoltage"]) == [200.0, 300.0, 200.0, 300.0]
    assert list(table.df["rlnImageName"]) == list(parts["rlnImageName"])  # order kept


# --------------------------------------------------------------------------- images

def test_stack_names_resolved_from_star_folder(set31, tmp_path, monkeypatch):
    star, images = set31
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current folder must not matter
    table = star_io.read_particles(star)
    with mrc_io.ImageSource(table) as src:
        assert len(src) == 6
        got = src.get([5, 0, 3])
        assert got.dtype == np.float32 and got.shape == (3, BOX, BOX)
        np.testing.assert_array_equal(got, images[[5, 0, 3]])


def test_stack_names_resolved_from_working_directory(tmp_path, monkeypatch):
    # RELION job layout: Class3D/job001/particles.star names Extract/... relative to the
    # project folder, the working directory of every job.
    images = make_stack(tmp_path / "Extract" / "stack.mrcs", 3)
    star = tmp_path / "Class3D" / "job001" / "particles.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), particles_31(3))
    monkeypatch.chdir(tmp_path)
    with mrc_io.ImageSource(star_io.read_particles(star)) as src:
        np.testing.assert_array_equal(src.get([1]), images[[1]])
    # from another folder neither place holds the stack: both are named
    monkeypatch.chdir(tmp_path / "Class3D")
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "'Extract/stack.mrcs'",
                           str(tmp_path / "Class3D" / "Extract" / "stack.mrcs"),
                           str(tmp_path / "Class3D" / "job001" / "Extract" / "stack.mrcs"))


def test_working_directory_wins_over_star_folder(tmp_path, monkeypatch):
    # the same name exists in both places: RELION's working-directory reading is used
    make_stack(tmp_path / "job" / "s.mrcs", 2, seed=1)
    in_cwd = make_stack(tmp_path / "s.mrcs", 2, seed=2)
    star = tmp_path / "job" / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX),
                            pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"]}))
    monkeypatch.chdir(tmp_path)
    with mrc_io.ImageSource(star_io.read_particles(star)) as src:
        np.testing.assert_array_equal(src.get([0, 1]), in_cwd)


def test_output_image_names_chain_from_working_directory(tmp_path, monkeypatch):
    # input names are relative to the input STAR's folder; an output STAR elsewhere gets
    # names relative to the working directory and reads back the same images
    images = make_stack(tmp_path / "in" / "Extract" / "stack.mrcs", 4)
    star = tmp_path / "in" / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), particles_31(4))
    monkeypatch.chdir(tmp_path)
    table = star_io.read_particles(star)
    names = star_io.output_image_names(table)
    assert list(names) == [f"{i + 1:06d}@in/Extract/stack.mrcs" for i in range(4)]
    parts = table.particles_table()
    parts["rlnImageName"] = names
    out = tmp_path / "out" / "run_it001_data.star"
    star_io.write_particles(out, table.optics_table(), parts)
    with mrc_io.ImageSource(star_io.read_particles(out)) as src:
        np.testing.assert_array_equal(src.get([3, 0]), images[[3, 0]])
    # relative to a given folder; single-image names stay without '@'
    assert star_io.output_image_names(table, tmp_path / "out")[0] == \
        "000001@../in/Extract/stack.mrcs"
    single = star_io.ParticleTable(df=pd.DataFrame({"rlnImageName": ["in/Extract/stack.mrcs"]}),
                                   optics=None, path=str(star), version="3.1", box=BOX,
                                   apix=APIX, has_ctf=False)
    assert list(star_io.output_image_names(single, tmp_path / "in")) == ["Extract/stack.mrcs"]


def test_image_source_preread_and_scratch(set31, tmp_path):
    star, images = set31
    table = star_io.read_particles(star)
    scratch = tmp_path / "scratch"
    src = mrc_io.ImageSource(table, preread=True, scratch_dir=str(scratch))
    assert all(p.startswith(str(scratch)) for p in src.stack_paths)
    np.testing.assert_array_equal(src.get(np.arange(6)[::-1]), images[::-1])
    assert len(os.listdir(scratch)) == 1
    # a second source reuses the scratch copy
    src2 = mrc_io.ImageSource(table, scratch_dir=str(scratch))
    np.testing.assert_array_equal(src2.get([4]), images[[4]])
    src2.close()


def test_image_source_several_stacks_and_int16(tmp_path):
    a = make_stack(tmp_path / "a.mrcs", 3, seed=1)
    with mrcfile.new(tmp_path / "b.mrcs") as mrc:  # int16 stack, as some exporters write
        b = (np.random.default_rng(2).normal(size=(2, BOX, BOX)) * 100).astype(np.int16)
        mrc.set_data(b)
        mrc.set_image_stack()
    parts = pd.DataFrame({"rlnImageName": ["2@b.mrcs", "3@a.mrcs", "1@a.mrcs", "1@b.mrcs"],
                          "rlnOpticsGroup": 1})
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), parts)
    with mrc_io.ImageSource(star_io.read_particles(star)) as src:
        got = src.get([0, 1, 2, 3])
    np.testing.assert_array_equal(got, np.stack([b[1], a[2], a[0], b[0]]).astype(np.float32))


def test_map_roundtrip_and_check(tmp_path):
    vol = np.random.default_rng(0).normal(size=(BOX, BOX, BOX)).astype(np.float32)
    path = tmp_path / "ref.mrc"
    mrc_io.write_map(path, vol, APIX)
    got, apix = mrc_io.read_map(path)
    np.testing.assert_array_equal(got, vol)
    assert apix == pytest.approx(APIX)
    with mrcfile.open(path) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(APIX)
    assert mrc_io.check_map_matches(path, BOX, APIX)
    with pytest.raises(CryoClassError) as err:
        mrc_io.check_map_matches(path, 2 * BOX, APIX)
    assert_one_line_naming(err, str(path), f"box {BOX}", str(2 * BOX), "relion_image_handler")
    with pytest.raises(CryoClassError) as err:
        mrc_io.check_map_matches(path, BOX, 2 * APIX)
    assert_one_line_naming(err, str(path), "pixel size", "rescale")
    with pytest.raises(CryoClassError) as err:
        mrc_io.check_map_matches(tmp_path / "none.mrc", BOX, APIX)
    assert_one_line_naming(err, "none.mrc", "not found")


# --------------------------------------------------------------------------- errors

def test_error_missing_star_file(tmp_path):
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(tmp_path / "nope.star")
    assert_one_line_naming(err, "nope.star", "not found")


def test_error_missing_particle_block(tmp_path):
    star = tmp_path / "model.star"
    star_io.write_star(star, {"model_general": {"rlnNrClasses": 2}})
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "data_particles", "data_model_general")


def test_error_missing_image_name_column(tmp_path):
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX),
                            pd.DataFrame({"rlnDefocusU": [1.0], "rlnOpticsGroup": [1]}))
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "rlnImageName")


def test_error_ctf_required(tmp_path):
    make_stack(tmp_path / "s.mrcs", 1)
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX),
                            pd.DataFrame({"rlnImageName": ["1@s.mrcs"], "rlnOpticsGroup": [1]}))
    assert not star_io.read_particles(star).has_ctf  # fine when CTF is not needed
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star, require_ctf=True)
    assert_one_line_naming(err, str(star), "rlnDefocusU", "CTF")


def test_error_missing_stack(tmp_path):
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), particles_31(2))
    # 3.1 tables know their box: without the stack check the table reads
    table = star_io.read_particles(star, check_stacks=False)
    with pytest.raises(CryoClassError) as err:
        mrc_io.ImageSource(table)
    assert_one_line_naming(err, str(star), "rlnImageName", "Extract/stack.mrcs", "not found")
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "rlnImageName", "Extract/stack.mrcs", "not found")


def test_error_stack_index_out_of_range(tmp_path):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 3)
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), particles_31(5))
    with pytest.raises(CryoClassError) as err:
        mrc_io.ImageSource(star_io.read_particles(star))
    assert_one_line_naming(err, str(star), "rlnImageName", "index 5", "out of range",
                           "3 images")


def test_error_box_mismatch_stack(tmp_path):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 2, box=BOX * 2)
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), particles_31(2))
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), f"rlnImageSize {BOX}", "stack.mrcs",
                           f"{2 * BOX}x{2 * BOX}", f"set rlnImageSize to {2 * BOX}")
    with pytest.raises(CryoClassError) as err:  # every stack is checked when opened
        mrc_io.ImageSource(star_io.read_particles(star, check_stacks=False))
    assert_one_line_naming(err, "stack.mrcs", f"box {2 * BOX}", f"rlnImageSize {BOX}")


@pytest.mark.parametrize("block,column", [("particles", "rlnDefocusU"),
                                          ("particles", "rlnAngleRot"),
                                          ("optics", "rlnVoltage")])
def test_error_non_numeric_value(tmp_path, block, column):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 3)
    optics = star_io.optics_group_table(APIX, BOX).astype({column: object}
                                                          if block == "optics" else {})
    parts = particles_31(3)
    table = optics if block == "optics" else parts
    table[column] = table[column].astype(object)
    table.loc[len(table) - 1, column] = "abc"
    star = tmp_path / "p.star"
    star_io.write_particles(star, optics, parts)
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), f"data_{block}", f"row {len(table)}", column,
                           "'abc'", "not a number")


def test_nan_text_is_a_number(tmp_path):
    # 'nan' / 'inf' parse as numbers here; finite-ness is checked where values are used
    make_stack(tmp_path / "Extract" / "stack.mrcs", 2)
    parts = particles_31(2)
    parts["rlnAngleRot"] = ["nan", "10"]
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), parts)
    rot = star_io.read_particles(star).df["rlnAngleRot"].to_numpy()
    assert np.isnan(rot[0]) and rot[1] == 10.0


def test_error_non_square_images(tmp_path):
    with mrcfile.new(tmp_path / "rect.mrcs") as mrc:
        mrc.set_data(np.zeros((2, BOX, BOX + 2), np.float32))
        mrc.set_image_stack()
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX),
                            pd.DataFrame({"rlnImageName": ["1@rect.mrcs"], "rlnOpticsGroup": [1]}))
    with pytest.raises(CryoClassError) as err:
        mrc_io.ImageSource(star_io.read_particles(star))
    assert_one_line_naming(err, "rect.mrcs", "not square", f"{BOX + 2}x{BOX}")


@pytest.mark.parametrize("column,value,needle", [("rlnImageSize", 2 * BOX, "optics groups 1 and 2"),
                                                  ("rlnImagePixelSize", 1.1 * APIX, "optics groups")])
def test_error_optics_groups_differ(tmp_path, column, value, needle):
    optics = star_io.optics_group_table(APIX, BOX, n_groups=2)
    optics.loc[1, column] = value
    parts = particles_31(4)
    parts["rlnOpticsGroup"] = [1, 2, 1, 2]
    star = tmp_path / "p.star"
    star_io.write_particles(star, optics, parts)
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), column, needle)


def test_error_unknown_optics_group(tmp_path):
    parts = particles_31(2, group=3)
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), parts)
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "rlnOpticsGroup 3", "data_optics")


def test_error_stack_pixel_sizes_differ(tmp_path):
    make_stack(tmp_path / "a.mrcs", 1, apix=2.0)
    make_stack(tmp_path / "b.mrcs", 1, apix=3.0)
    parts = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "1@b.mrcs"], "rlnOpticsGroup": 1})
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), parts)
    with pytest.raises(CryoClassError) as err:
        mrc_io.ImageSource(star_io.read_particles(star))
    assert_one_line_naming(err, "b.mrcs", "a.mrcs", "pixel size")


@pytest.mark.skipif(shutil.which("relion_star_printtable") is None,
                    reason="RELION not installed")
def test_relion_reads_our_star(set31):
    star, _ = set31
    out = subprocess.run(["relion_star_printtable", str(star), "data_particles",
                          "rlnDefocusU"], capture_output=True, text=True, check=True)
    values = [float(v) for v in out.stdout.split()]
    np.testing.assert_allclose(values, particles_31(6)["rlnDefocusU"], rtol=1e-6)


def test_image_source_keeps_few_stacks_open(tmp_path, monkeypatch):
    monkeypatch.setattr(mrc_io, "MAX_OPEN_STACKS", 2)
    stacks = [make_stack(tmp_path / f"mic{i}.mrcs", 3, seed=i) for i in range(5)]
    names = [f"{f + 1}@mic{s}.mrcs" for s in range(5) for f in range(3)]
    order = np.random.default_rng(0).permutation(len(names))
    parts = pd.DataFrame({"rlnImageName": [names[i] for i in order], "rlnOpticsGroup": 1})
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX), parts)
    want = np.stack([stacks[i // 3][i % 3] for i in order])
    src = mrc_io.ImageSource(star_io.read_particles(star))
    for batch in np.array_split(np.arange(len(names))[::-1], 4):
        np.testing.assert_array_equal(src.get(batch), want[batch])
        assert len(src._handles) <= 2
    src.close()
    pre = mrc_io.ImageSource(star_io.read_particles(star), preread=True)
    np.testing.assert_array_equal(pre.get(np.arange(len(names))), want)
    assert len(pre._handles) == 0


# --------------------------------------------------------------------------- Scipion side

def test_result_reader_maps_rows_by_image_across_folders(tmp_path, monkeypatch):
    # The Scipion result reader reads data.star and model.star through star_io and
    # runresults.ModelStar; without rlnImageId it matches rows to the input by image
    # (frame and stack file), although each STAR file names the stack from elsewhere.
    from cryoclass_plugin import convert
    make_stack(tmp_path / "in" / "Extract" / "stack.mrcs", 4)
    inp = tmp_path / "in" / "p.star"
    parts = particles_31(4)
    parts["rlnImageId"] = [11, 12, 13, 14]
    star_io.write_particles(inp, star_io.optics_group_table(APIX, BOX), parts)
    monkeypatch.chdir(tmp_path)
    table = star_io.read_particles(inp)
    out = table.particles_table().drop(columns="rlnImageId")
    out["rlnImageName"] = star_io.output_image_names(table)
    out["rlnClassNumber"] = [2, 1, 2, 1]
    out = out.iloc[::-1].reset_index(drop=True)
    data = tmp_path / "out" / "run_it001_data.star"
    star_io.write_particles(data, table.optics_table(), out)
    mrc_io.write_map(tmp_path / "out" / "run_it001_class002.mrc",
                     np.zeros((BOX, BOX, BOX), np.float32), APIX)
    model = tmp_path / "out" / "run_it001_model.star"
    star_io.write_star(model, {
        "model_general": {"rlnNrClasses": 2, "rlnPixelSize": APIX},
        "model_classes": pd.DataFrame({
            "rlnReferenceImage": ["out/run_it001_class001.mrc", "elsewhere/run_it001_class002.mrc"],
            "rlnClassDistribution": [0.5, 0.5], "rlnEstimatedResolution": [10.0, 12.0]}),
        "model_class_2": pd.DataFrame({"rlnResolution": [0.0, 0.05, 0.1],
                                       "rlnSsnrMap": [9.0, 4.0, 1.0]})})
    reader = convert.ResultReader(str(data), str(model), input_star=str(inp))
    assert {k: int(r["rlnClassNumber"]) for k, r in reader.rows.items()} == \
        {11: 2, 12: 1, 13: 2, 14: 1}
    assert reader.pixel_size == pytest.approx(APIX)
    info = reader.class_info()
    assert info[2]["map"] == str(tmp_path / "out" / "run_it001_class002.mrc")  # by folder
    assert info[1]["resolution"] == 10.0 and info[2]["distribution"] == 0.5
    res, ssnr = reader.ssnr_curve(2)
    np.testing.assert_allclose(ssnr, [9.0, 4.0, 1.0])
    assert reader.ssnr_curve(1)[1].size == 0
    df, optics = convert.read_particle_table(str(data))
    assert len(df) == 4 and optics is not None and convert.read_star is star_io.read_star


def test_error_optics_without_pixel_size_names_the_column(tmp_path):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 2)
    star = tmp_path / "p.star"
    star_io.write_particles(star, star_io.optics_group_table(APIX, BOX).drop(
        columns="rlnImagePixelSize"), particles_31(2))
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star)
    assert_one_line_naming(err, str(star), "data_optics", "rlnImagePixelSize")
    assert "--angpix" not in str(err.value)


def test_mrc_io_does_not_import_star_io():
    # star_io reads stack headers through mrc_io; the reverse import would be a cycle
    import ast
    tree = ast.parse(open(mrc_io.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names} | {node.module or "" for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    assert not any("star_io" in name for name in imported), imported


@pytest.mark.parametrize("column,value", [("rlnCtfDataAreCtfPremultiplied", 1),
                                          ("rlnMagMat11", 0.98)])
def test_optics_terms_not_applied_are_refused_with_ctf(tmp_path, column, value):
    make_stack(tmp_path / "Extract" / "stack.mrcs", 4)
    optics = star_io.optics_group_table(APIX, BOX, n_groups=2).astype({"rlnImageSize": int})
    optics[column] = [type(value)(0) if not isinstance(value, str) else "[]", value]
    if column == "rlnMagMat11":
        optics[column] = [1.0, value]
    parts = particles_31(4)
    parts["rlnOpticsGroup"] = [1, 2, 1, 2]
    star = tmp_path / "p.star"
    star_io.write_particles(star, optics, parts)
    with pytest.raises(CryoClassError) as err:
        star_io.read_particles(star, require_ctf=True)
    assert_one_line_naming(err, str(star), "optics group 2 (opticsGroup2)", column,
                           "not", "cryoclass")
    # read as it is without CTF correction, the optics table kept verbatim
    table = star_io.read_particles(star)
    assert list(table.optics[column]) == list(optics[column])
    out = tmp_path / "out.star"
    star_io.write_particles(out, table.optics_table(), table.particles_table())
    assert list(star_io.read_particles(out).optics[column]) == list(optics[column])


RELION_CTFREFINE_OPTICS = """
# version 30001

data_optics

loop_ 
_rlnOpticsGroup #1 
_rlnOpticsGroupName #2 
_rlnAmplitudeContrast #3 
_rlnSphericalAberration #4 
_rlnVoltage #5 
_rlnImagePixelSize #6 
_rlnMicrographOriginalPixelSize #7 
_rlnImageSize #8 
_rlnImageDimensionality #9 
_rlnBeamTiltX #10 
_rlnBeamTiltY #11 
_rlnOddZernike #12 
_rlnEvenZernike #13 
_rlnMagMat00 #14 
_rlnMagMat01 #15 
_rlnMagMat10 #16 
_rlnMagMat11 #17 
           1 opticsGroup0     0.100000     2.700000   300.000000     {apix:f}     1.100000          {box}            2     0.000000     0.000000 [0.470415004546,0.416253693925,34.3861477546,0,0,10.7852815872] [46.1065172703,61.3089368588,71.6548502793,-58.8506376394,-20.448174654,21.1543486046,25.6263445943,-20.249181823,-16.9851856858]     {m00}     {m01}     {m10}     {m11} 
 

# version 30001

data_particles

loop_ 
_rlnImageName #1 
_rlnDefocusU #2 
_rlnDefocusV #3 
_rlnDefocusAngle #4 
_rlnOpticsGroup #5 
000001@Extract/stack.mrcs 30876.811323 28722.607179   161.590835            1 
000002@Extract/stack.mrcs 20876.811323 19722.607179    61.590835            1 
"""


@pytest.mark.parametrize("mag", [(1.007178, 0.007680, 0.007699, 0.993671), (1, 0, 0, 1)])
def test_relion_ctfrefine_optics_layout(tmp_path, mag):
    """The layout CtfRefine writes (vector columns among space-separated numbers, the
    headers' trailing spaces): read, kept verbatim, applied or refused with --ctf."""
    from cryoclass_plugin.engine import ctf
    make_stack(tmp_path / "Extract" / "stack.mrcs", 2)
    star = tmp_path / "ctfrefine.star"
    star.write_text(RELION_CTFREFINE_OPTICS.format(apix=APIX, box=BOX, m00=mag[0],
                                                   m01=mag[1], m10=mag[2], m11=mag[3]))
    table = star_io.read_particles(star)
    assert table.df["rlnOddZernike"].iloc[0] == \
        "[0.470415004546,0.416253693925,34.3861477546,0,0,10.7852815872]"
    assert table.df["rlnMagMat01"].iloc[1] == pytest.approx(mag[1])
    out = tmp_path / "out.star"
    star_io.write_particles(out, table.optics_table(), table.particles_table())
    again = star_io.read_particles(out).optics
    for col in table.optics.columns:
        assert list(again[col]) == list(table.optics[col]), col
    if mag[0] != 1:
        with pytest.raises(CryoClassError) as err:
            star_io.read_particles(star, require_ctf=True)
        assert_one_line_naming(err, "optics group 1 (opticsGroup0): rlnMagMat00")
    else:
        terms = ctf.ctf_params(star_io.read_particles(star, require_ctf=True).df)
        assert terms["odd_zernike"].shape == (2, 6) and terms["even_zernike"].shape == (2, 9)
        assert terms["even_zernike"][1, 8] == pytest.approx(-16.9851856858)
