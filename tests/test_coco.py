"""data_sets/coco.py: instance masks (polygons, RLE) against hand-computed and pycocotools values, and a data
set folder built aside and published all or nothing."""
import numpy as np
import pytest

import config
import data
from data_sets import coco, shapes


def test_polygon_rectangle_by_hand():
    # pixel (x, y) is in when its centre (x + .5, y + .5) is inside: x in 1..3, y in 1..2
    m = data.polygon_to_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6)
    want = np.zeros((5, 6), bool)
    want[1:3, 1:4] = True
    assert (m == want).all()


def test_polygon_triangle_by_hand_and_union():
    # right triangle (0,0) (4,0) (0,4): centre inside iff (x + .5) + (y + .5) < 4, i.e. x + y <= 2
    tri = [0, 0, 4, 0, 0, 4]
    ys, xs = np.mgrid[0:4, 0:4]
    assert (data.polygon_to_mask([tri], 4, 4) == (xs + ys <= 2)).all()
    two = data.polygon_to_mask([tri, [3, 3, 4, 3, 4, 4, 3, 4]], 4, 4)
    assert two[3, 3] and two.sum() == 7  # union of both polygons


def test_polygon_matches_pycocotools_value():
    # reference printed by pycocotools 2.0.11 (mask.decode(mask.merge(mask.frPyObjects(poly, 7,
    # 9))))
    want = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0],
                     [0, 0, 1, 1, 1, 1, 1, 0, 0],
                     [0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0],
                     [0, 0, 0, 0, 1, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    assert (data.polygon_to_mask([[1.5, 0.5, 7.2, 2.0, 4.0, 6.3]], 7, 9) == want).all()


def test_uncompressed_rle_by_hand():
    # 3 x 2 image, column-major runs: 1 zero, 3 ones, 2 zeros -> column 0 = [0,1,1], column 1 =
    # [1,0,0]
    m = data.rle_to_mask({"size": [3, 2], "counts": [1, 3, 2]})
    assert (m == np.array([[0, 1], [1, 0], [1, 0]], bool)).all()


def _fixture_mask():
    m = np.zeros((7, 9), bool)
    m[1:5, 2:7] = True
    m[6, 0] = m[0, 8] = True
    return m


def test_compressed_rle_matches_pycocotools_string():
    # the string pycocotools 2.0.11 mask.encode gives for _fixture_mask()
    ref = "6183K00000006MM"
    assert (data.rle_to_mask({"size": [7, 9], "counts": ref}) == _fixture_mask()).all()
    assert coco.mask_to_rle(_fixture_mask())["counts"] == ref


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (5, 3), (17, 31), (64, 64)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            m = rng.random((h, w)) < p
            assert (data.rle_to_mask(coco.mask_to_rle(m)) == m).all()


def test_masks_against_pycocotools_if_installed():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(5):  # RLE: identical strings
        m = rng.random((23, 17)) < 0.3
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert coco.mask_to_rle(m)["counts"] == ref["counts"].decode()
    differ = total = 0
    for i in range(100):  # polygons: pycocotools rasterises on a 5x finer grid, so only boundary
        # pixels differ
        poly = (
            shapes.shape_polygon(shapes.SHAPES[i % 5], rng) * rng.uniform(3, 10)
            + rng.uniform(10, 20, 2)
        ).ravel()
        want = mask_util.decode(
            mask_util.merge(mask_util.frPyObjects([poly.tolist()], 30, 30))
        ).astype(bool)
        got = data.polygon_to_mask([poly], 30, 30)
        assert (got & want).sum() / (got | want).sum() > 0.8
        differ, total = differ + (got != want).sum(), total + want.sum()
    assert differ / total < 0.03


def test_concurrent_builds_do_not_share_a_temp_folder_and_the_second_is_refused(tmp_path):
    out = tmp_path / "shapes"
    a, b = coco.private_tmp(out), coco.private_tmp(out)
    assert a != b and a.parent == b.parent == tmp_path       # each build writes only its own folder
    (a / "x.txt").write_text("first")
    (b / "x.txt").write_text("second")
    assert coco.publish(a, out) == out
    with pytest.raises(config.DataError, match="shapes: was written by another process"):
        coco.publish(b, out)
    assert (out / "x.txt").read_text() == "first" and not b.exists()
