"""Input values that would give a silently wrong answer are refused in one line."""
import numpy as np
import pytest

from cryoclass_plugin.engine.errors import CryoClassError
from cryoclass_plugin.engine import validation


def test_maps_must_be_finite_and_not_constant():
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    validation.check_map_values(vol, "ref.mrc")
    bad = vol.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(CryoClassError, match=r"ref.mrc: .*1 non-finite voxel.*x=3 y=2 z=1"):
        validation.check_map_values(bad, "ref.mrc")
    with pytest.raises(CryoClassError, match="constant"):
        validation.check_map_values(np.zeros((8, 8, 8)), "ref.mrc")


@pytest.mark.parametrize("lo, hi, ok", [(0, 1, True), (-0.0005, 1.0005, True), (-0.2, 1, False),
                                        (0, 2, False)])
def test_mask_range(lo, hi, ok):
    mask = np.linspace(lo, hi, 512).reshape(8, 8, 8)
    if ok:
        validation.check_mask_values(mask, "mask.mrc")
    else:
        with pytest.raises(CryoClassError, match="mask.mrc: .*not 0..1"):
            validation.check_mask_values(mask, "mask.mrc")
    with pytest.raises(CryoClassError, match="zero everywhere|constant"):
        validation.check_mask_values(np.zeros((8, 8, 8)), "mask.mrc")


def test_image_blocks_name_the_particle():
    rng = np.random.default_rng(1)
    names = [f"{i + 1:06d}@p.mrcs" for i in range(10)]
    imgs = rng.normal(size=(3, 6, 6))
    validation.check_image_block(imgs, [4, 5, 6], names)
    imgs[1, 2, 2] = np.inf
    with pytest.raises(CryoClassError, match=r"000006@p.mrcs: particle 6 .*non-finite"):
        validation.check_image_block(imgs, [4, 5, 6], names)
    imgs[1] = 0.0
    with pytest.raises(CryoClassError, match=r"000006@p.mrcs: particle 6 .*constant"):
        validation.check_image_block(imgs, [4, 5, 6], names)


def test_duplicates_are_listed():
    names = ["1@a", "2@a", "1@a", "3@a", "2@a", "1@a"]
    assert validation.duplicate_rows(names) == [[0, 2, 5], [1, 4]]
    line = validation.duplicate_warning(names, "p.star")
    assert line.startswith("warning: p.star: 3 duplicated") and "rows 1, 3, 6" in line
    assert validation.duplicate_warning(["1@a", "2@a"], "p.star") is None


def test_more_classes_than_particles():
    with pytest.raises(CryoClassError, match="--K 5: p.star has only 3"):
        validation.check_class_count(3, 5, "p.star")
