"""perceptive/coco_map.py: COCO box mAP against hand-computed values and pycocotools (live when installed, and
numbers it printed, hard-coded), and a results json of the ground truth scoring 1."""
import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest

import data
from perceptive import coco_map, detections


def coco_fixture(seed, n_images=12, categories=(1, 2, 3, 7)):
    """A random COCO ground truth + results pair: several categories (7 has no ground truth), crowd
    regions, images without objects (every 4th), detections near objects (jittered, sometimes the
    wrong class), false positives everywhere, and coarse scores (ties). Python's `random` stream is
    stable across versions."""
    r = random.Random(seed)
    images = [dict(id=10 + 3 * i, width=100, height=80) for i in range(n_images)]
    anns, results = [], []
    for k, im in enumerate(images):
        for _ in range(0 if k % 4 == 0 else r.randint(1, 6)):
            c = r.choice(categories[:-1])
            x, y, w, h = r.uniform(0, 70), r.uniform(0, 50), r.uniform(4, 30), r.uniform(4, 30)
            anns.append(dict(id=len(anns) + 1, image_id=im["id"], category_id=c,
                             iscrowd=int(r.random() < 0.15),
                             bbox=[round(v, 2) for v in (x, y, w, h)], area=round(w * h * 0.7, 2)))
            for _ in range(r.randint(0, 3)):
                box = [x + r.gauss(0, 0.08 * w), y + r.gauss(0, 0.08 * h),
                       w * r.uniform(0.85, 1.15),
                       h * r.uniform(0.85, 1.15)]
                results.append(dict(image_id=im["id"],
                                    category_id=c if r.random() < 0.8 else r.choice(categories),
                                    bbox=[round(v, 2) for v in box], score=round(r.random(), 1)))
        for _ in range(r.randint(0, 3)):
            box = [r.uniform(0, 70), r.uniform(0, 50), r.uniform(3, 25), r.uniform(3, 25)]
            results.append(dict(image_id=im["id"], category_id=r.choice(categories),
                                bbox=[round(v, 2) for v in box], score=round(r.random(), 1)))
    return dict(images=images, annotations=anns,
                categories=[dict(id=c, name=f"c{c}") for c in categories]), results


def gt_of(images, anns, cats=(1,)):
    return dict(images=[dict(id=i) for i in images], categories=[dict(id=c) for c in cats],
                annotations=[dict(dict(iscrowd=0, area=a["bbox"][2] * a["bbox"][3]), id=k + 1, **a)
                             for k, a in enumerate(anns)])


def test_map_by_hand_one_miss_one_false_positive():
    # 2 objects; a perfect box first (precision 1 at recall 0.5), then a false positive; the second
    # object is never found. Interpolated precision is 1 on the 51 recall points 0.00..0.50 and 0
    # after: AP = 51/101 at every IoU threshold.
    gt = gt_of([1], [dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10]),
                     dict(image_id=1, category_id=1, bbox=[50, 50, 10, 10])])
    res = [dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=0.9),
           dict(image_id=1, category_id=1, bbox=[30, 0, 10, 10], score=0.8)]
    r = coco_map.coco_map(gt, res)
    assert r["mAP"] == pytest.approx(51 / 101) and r["AP50"] == pytest.approx(51 / 101)


def test_map_by_hand_crowd_region_is_ignored():
    # the most confident detection lies inside a crowd region: ignored, not a false positive -> AP
    # 1. Were the crowd an ordinary object, the box (IoU 0.01 with it) would be a false positive and
    # that object a miss: precision 1/2 up to recall 1/2 -> AP50 = 0.5 * 51/101.
    obj = dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10])
    crowd = dict(image_id=1, category_id=1, bbox=[40, 40, 50, 50], iscrowd=1)
    res = [dict(image_id=1, category_id=1, bbox=[50, 50, 5, 5], score=0.95),
           dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=0.5)]
    assert coco_map.coco_map(gt_of([1], [obj, crowd]), res)["mAP"] == pytest.approx(1.0)
    assert coco_map.coco_map(gt_of([1], [obj, dict(crowd, iscrowd=0)]),
                             res)["AP50"] == pytest.approx(0.5 * 51 / 101)


def test_map_by_hand_empty_image_and_category_without_objects():
    # image 2 has no objects: the confident box there is a false positive ranked first -> precision
    # 1/2 at recall 1 -> AP 0.5. Category 2 has no ground truth: it is left out of the mean, not
    # counted as 0.
    gt = gt_of([1, 2], [dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10])], cats=(1, 2))
    res = [dict(image_id=2, category_id=1, bbox=[0, 0, 10, 10], score=0.99),
           dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=0.5),
           dict(image_id=1, category_id=2, bbox=[0, 0, 10, 10], score=0.7)]
    r = coco_map.coco_map(gt, res)
    assert r["mAP"] == pytest.approx(0.5) and r["per_category"][2] == -1
    assert coco_map.coco_map(gt, [])["mAP"] == 0.0


# (mAP, AP50, AP75) printed by pycocotools 2.0 COCOeval(iouType="bbox").stats[:3] on
# coco_fixture(seed)
PYCOCOTOOLS_STATS = {
    0: (0.2579173503430929, 0.5062680077531563, 0.2377100164228877),
    1: (0.31170752732110313, 0.5544513097926335, 0.3904513129812298),
    2: (0.25972344990909346, 0.49088601167809087, 0.3183460974302558),
}


@pytest.mark.parametrize("seed", sorted(PYCOCOTOOLS_STATS))
def test_map_equals_pycocotools_hardcoded(seed):
    gt, res = coco_fixture(seed)
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0          # the fixture has crowd regions
    r = coco_map.coco_map(gt, res)
    assert (r["mAP"], r["AP50"], r["AP75"]) == pytest.approx(PYCOCOTOOLS_STATS[seed], abs=1e-12)


def test_map_equals_pycocotools_live():
    pytest.importorskip("pycocotools")
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    for seed in range(8):
        gt, res = coco_fixture(seed)
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = copy.deepcopy(gt)
            coco.createIndex()
            ev = COCOeval(coco, coco.loadRes(copy.deepcopy(res)), "bbox")
            ev.params.maxDets = [1, 2, 100]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        r = coco_map.coco_map(gt, res)
        assert (r["mAP"], r["AP50"], r["AP75"]) == pytest.approx(tuple(ev.stats[:3]), abs=1e-12)
        for m, max_dets in enumerate((1, 2, 100)):   # the whole precision array (area "all"), each
                                                     # maxDets
            np.testing.assert_allclose(coco_map.coco_map(gt, res, max_dets=max_dets)["precision"],
                                       ev.eval["precision"][:, :, :, 0, m], atol=1e-12)


def test_results_json_of_the_ground_truth_scores_map_one(shapes32, tmp_path):
    ds = data.CocoLayoutDataset(shapes32, "val", size=32)
    gt = json.loads((Path(shapes32) / "annotations" / "instances_val.json").read_text())
    res = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
           for a in gt["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    r = coco_map.evaluate(detections.ResultsFile(tmp_path / "res.json"), ds)
    assert r["mAP"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
