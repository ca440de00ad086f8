"""perception.py: attribute assignment on hand-made boxes, COCO mAP against hand-computed values and pycocotools
(live when installed, and numbers it printed, hard-coded), the detector's targets and decoding, a few training
steps beating chance, detection sources, bad input, and where the attribute sidecar goes."""
import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import perception as P

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- attributes

GT = [[0, 0, 10, 10]]


@pytest.mark.parametrize("score, box, want", [
    (0.9, [0, 0, 6, 10], "easy"),     # score > gamma, IoU 0.6 > beta
    (0.4, [0, 0, 6, 10], "hard"),     # score == gamma: not kept (strict >)
    (0.3, [0, 0, 6, 10], "hard"),     # score < gamma
    (0.9, [0, 0, 5, 10], "hard"),     # IoU exactly 0.5 == beta: not a match (strict >)
    (0.9, [0, 0, 4, 10], "hard"),     # IoU 0.4 < beta
    (0.41, [0, 0, 10, 10], "easy"),   # just above gamma, perfect box
])
def test_attribute_thresholds(score, box, want):
    assert P.assign_attributes(GT, [0], [box], [score], [0], gamma=0.4, beta=0.5) == [want]


def test_attribute_needs_one_prediction_passing_both_thresholds():
    # a good box with a low score and a confident bad box: neither passes both tests
    preds, scores = [[0, 0, 10, 10], [0, 0, 3, 10]], [0.2, 0.99]
    assert P.assign_attributes(GT, [0], preds, scores, [0, 0], gamma=0.4, beta=0.5) == ["hard"]
    assert P.assign_attributes(GT, [0], preds, scores, [0, 0], gamma=0.1, beta=0.5) == ["easy"]


def test_attribute_per_object_and_empty_cases():
    gts = [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]
    preds = [[0, 0, 10, 9], [21, 21, 31, 31], [0, 0, 1, 1]]        # IoU 0.9, 81/119 = 0.68, ~0
    assert P.assign_attributes(gts, [0, 1, 2], preds, [0.9, 0.9, 0.9], [0, 1, 2]) == ["easy", "easy", "hard"]
    assert P.assign_attributes(gts, [0, 1, 2], [], [], []) == ["hard"] * 3
    assert P.assign_attributes([], [], preds, [0.9] * 3, [0] * 3) == []


def test_attribute_class_aware_variant():
    box = [[0, 0, 10, 10]]
    # right place, wrong class: easy when class-agnostic (the paper's rule), hard when class-aware
    assert P.assign_attributes(GT, [1], box, [0.9], [2], class_aware=False) == ["easy"]
    assert P.assign_attributes(GT, [1], box, [0.9], [2], class_aware=True) == ["hard"]
    # a second, right-class prediction makes it easy again; a right-class one below gamma does not
    two = [[0, 0, 10, 10], [0, 0, 9, 10]]
    assert P.assign_attributes(GT, [1], two, [0.9, 0.8], [2, 1], class_aware=True) == ["easy"]
    assert P.assign_attributes(GT, [1], two, [0.9, 0.3], [2, 1], gamma=0.4, class_aware=True) == ["hard"]


def test_folds_partition_the_images():
    folds = P.make_folds(11, 3, seed=1)
    assert sorted(sum(folds, [])) == list(range(11)) and [len(f) for f in folds] in ([4, 4, 3], [4, 3, 4], [3, 4, 4])
    assert folds == P.make_folds(11, 3, seed=1)


# ---------------------------------------------------------------------------------------------- COCO mAP

def coco_fixture(seed, n_images=12, categories=(1, 2, 3, 7)):
    """A random COCO ground truth + results pair: several categories (7 has no ground truth), crowd regions,
    images without objects (every 4th), detections near objects (jittered, sometimes the wrong class), false
    positives everywhere, and coarse scores (ties). Python's `random` stream is stable across versions."""
    r = random.Random(seed)
    images = [dict(id=10 + 3 * i, width=100, height=80) for i in range(n_images)]
    anns, results = [], []
    for k, im in enumerate(images):
        for _ in range(0 if k % 4 == 0 else r.randint(1, 6)):
            c = r.choice(categories[:-1])
            x, y, w, h = r.uniform(0, 70), r.uniform(0, 50), r.uniform(4, 30), r.uniform(4, 30)
            anns.append(dict(id=len(anns) + 1, image_id=im["id"], category_id=c, iscrowd=int(r.random() < 0.15),
                             bbox=[round(v, 2) for v in (x, y, w, h)], area=round(w * h * 0.7, 2)))
            for _ in range(r.randint(0, 3)):
                box = [x + r.gauss(0, 0.08 * w), y + r.gauss(0, 0.08 * h), w * r.uniform(0.85, 1.15),
                       h * r.uniform(0.85, 1.15)]
                results.append(dict(image_id=im["id"], category_id=c if r.random() < 0.8 else r.choice(categories),
                                    bbox=[round(v, 2) for v in box], score=round(r.random(), 1)))
        for _ in range(r.randint(0, 3)):
            box = [r.uniform(0, 70), r.uniform(0, 50), r.uniform(3, 25), r.uniform(3, 25)]
            results.append(dict(image_id=im["id"], category_id=r.choice(categories),
                                bbox=[round(v, 2) for v in box], score=round(r.random(), 1)))
    return dict(images=images, annotations=anns, categories=[dict(id=c, name=f"c{c}") for c in categories]), results


def gt_of(images, anns, cats=(1,)):
    return dict(images=[dict(id=i) for i in images], categories=[dict(id=c) for c in cats],
                annotations=[dict(dict(iscrowd=0, area=a["bbox"][2] * a["bbox"][3]), id=k + 1, **a)
                             for k, a in enumerate(anns)])


def test_map_by_hand_one_miss_one_false_positive():
    # 2 objects; a perfect box first (precision 1 at recall 0.5), then a false positive; the second object is
    # never found. Interpolated precision is 1 on the 51 recall points 0.00..0.50 and 0 after: AP = 51/101
    # at every IoU threshold.
    gt = gt_of([1], [dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10]),
                     dict(image_id=1, category_id=1, bbox=[50, 50, 10, 10])])
    res = [dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=0.9),
           dict(image_id=1, category_id=1, bbox=[30, 0, 10, 10], score=0.8)]
    r = P.coco_map(gt, res)
    assert r["mAP"] == pytest.approx(51 / 101) and r["AP50"] == pytest.approx(51 / 101)


def test_map_by_hand_crowd_region_is_ignored():
    # the most confident detection lies inside a crowd region: ignored, not a false positive -> AP 1.
    # Were the crowd an ordinary object, the box (IoU 0.01 with it) would be a false positive and that object
    # a miss: precision 1/2 up to recall 1/2 -> AP50 = 0.5 * 51/101.
    obj = dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10])
    crowd = dict(image_id=1, category_id=1, bbox=[40, 40, 50, 50], iscrowd=1)
    res = [dict(image_id=1, category_id=1, bbox=[50, 50, 5, 5], score=0.95),
           dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=0.5)]
    assert P.coco_map(gt_of([1], [obj, crowd]), res)["mAP"] == pytest.approx(1.0)
    assert P.coco_map(gt_of([1], [obj, dict(crowd, iscrowd=0)]), res)["AP50"] == pytest.approx(0.5 * 51 / 101)


def test_map_by_hand_empty_image_and_category_without_objects():
    # image 2 has no objects: the confident box there is a false positive ranked first -> precision 1/2 at
    # recall 1 -> AP 0.5. Category 2 has no ground truth: it is left out of the mean, not counted as 0.
    gt = gt_of([1, 2], [dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10])], cats=(1, 2))
    res = [dict(image_id=2, category_id=1, bbox=[0, 0, 10, 10], score=0.99),
           dict(image_id=1, category_id=1, bbox=[0, 0, 10, 10], score=0.5),
           dict(image_id=1, category_id=2, bbox=[0, 0, 10, 10], score=0.7)]
    r = P.coco_map(gt, res)
    assert r["mAP"] == pytest.approx(0.5) and r["per_category"][2] == -1
    assert P.coco_map(gt, [])["mAP"] == 0.0


# (mAP, AP50, AP75) printed by pycocotools 2.0 COCOeval(iouType="bbox").stats[:3] on coco_fixture(seed)
PYCOCOTOOLS_STATS = {
    0: (0.2579173503430929, 0.5062680077531563, 0.2377100164228877),
    1: (0.31170752732110313, 0.5544513097926335, 0.3904513129812298),
    2: (0.25972344990909346, 0.49088601167809087, 0.3183460974302558),
}


@pytest.mark.parametrize("seed", sorted(PYCOCOTOOLS_STATS))
def test_map_equals_pycocotools_hardcoded(seed):
    gt, res = coco_fixture(seed)
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0            # the fixture has crowd regions
    r = P.coco_map(gt, res)
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
        r = P.coco_map(gt, res)
        assert (r["mAP"], r["AP50"], r["AP75"]) == pytest.approx(tuple(ev.stats[:3]), abs=1e-12)
        for m, max_dets in enumerate((1, 2, 100)):   # the whole precision array (area "all"), each maxDets
            np.testing.assert_allclose(P.coco_map(gt, res, max_dets=max_dets)["precision"],
                                       ev.eval["precision"][:, :, :, 0, m], atol=1e-12)


# ---------------------------------------------------------------------------------------------- detector

@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    """32 training + 8 validation shapes images at 32 px."""
    return data.make_shapes(tmp_path_factory.mktemp("p") / "shapes", n_train=32, n_val=8, image_size=32,
                            progress=False)


TINY = dict(width=16, dilations=(1, 2))


def test_targets_decode_back_to_the_boxes():
    # perfect network outputs built from the targets decode to the ground-truth boxes (to float precision)
    boxes = torch.tensor([[[0.10, 0.20, 0.45, 0.60], [0.55, 0.05, 0.95, 0.30]]])
    labels, valid = torch.tensor([[3, 1]]), torch.tensor([[True, True]])
    G = 8
    heat, b, cell, wh, off = P.centernet_targets(boxes, labels, valid, 4, G)
    assert heat.shape == (1, 4, G, G) and heat[0, 3, cell[0, 1], cell[0, 0]] == 1 and heat.max() == 1
    size, offset = torch.zeros(1, 2, G, G), torch.zeros(1, 2, G, G)
    size[b, :, cell[:, 1], cell[:, 0]], offset[b, :, cell[:, 1], cell[:, 0]] = wh, off
    logits = torch.where(heat == 1, torch.tensor(5.0), torch.tensor(-9.0))
    model = P.Detector(P.DetectorConfig(num_classes=4, image_size=4 * G, **TINY))
    model.forward = lambda x: (logits, size, offset)
    out = P.predict(model, torch.zeros(1, 3, 4 * G, 4 * G), score_threshold=0.5)[0]
    assert out["labels"].tolist() == [3, 1] or out["labels"].tolist() == [1, 3]
    got = out["boxes"][out["labels"].argsort(descending=True)]
    torch.testing.assert_close(got, boxes[0], atol=1e-6, rtol=0)


class RandomBoxes:
    """Chance: 10 boxes per image at random places and sizes, random classes and scores."""
    description = "chance"

    def __init__(self, num_classes, seed=0):
        self.g, self.C = torch.Generator().manual_seed(seed), num_classes

    def predict(self, images, score_threshold=0.0, max_dets=100):
        out = []
        for _ in images:
            c, s = torch.rand(10, 2, generator=self.g), torch.rand(10, 2, generator=self.g) * 0.5 + 0.1
            out.append(dict(boxes=torch.cat([c - s / 2, c + s / 2], 1).clamp(0, 1), scores=torch.rand(10, generator=self.g),
                            labels=torch.randint(self.C, (10,), generator=self.g)))
        return out


def test_detector_trained_a_few_steps_beats_chance(shapes32):
    # chance = RandomBoxes; 60 steps of 16 images: it fits its 32 training images and finds objects on 8
    # images it never saw (AP50 0.23-0.28 for seeds 0-2 when written)
    train, val = (data.CocoLayoutDataset(shapes32, s, size=32) for s in ("train", "val"))
    cfg = P.DetTrainConfig(steps=60, batch_size=16, lr=5e-3, warmup=5, log_every=0)
    model = P.train(train, P.DetectorConfig(num_classes=5, class_names=tuple(train.class_names), image_size=32,
                                            **TINY), cfg)
    for ds, margin in ((train, 0.5), (val, 0.1)):
        trained, chance = P.evaluate(model, ds), P.evaluate(RandomBoxes(5), ds)
        assert chance["AP50"] < 0.05                 # random boxes hardly ever overlap an object by IoU 0.5
        assert trained["AP50"] > chance["AP50"] + margin, (trained, chance)


def test_detector_save_load_roundtrip(tmp_path):
    model = P.Detector(P.DetectorConfig(num_classes=3, class_names=("a", "b", "c"), image_size=32, **TINY)).eval()
    P.save_detector(model, tmp_path / "det.pt")
    back = P.load_detector(tmp_path / "det.pt")
    assert back.cfg == model.cfg
    x = torch.rand(2, 3, 40, 40) * 2 - 1                          # another size: resized to 32 inside
    a, b = P.predict(model, x), P.predict(back, x)
    for da, db in zip(a, b):
        torch.testing.assert_close(da["boxes"], db["boxes"])
        assert ((da["boxes"] >= 0) & (da["boxes"] <= 1)).all()


def test_results_json_of_the_ground_truth_scores_map_one(shapes32, tmp_path):
    ds = data.CocoLayoutDataset(shapes32, "val", size=32)
    gt = json.loads((Path(shapes32) / "annotations" / "instances_val.json").read_text())
    res = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
           for a in gt["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    r = P.evaluate(P.ResultsFile(tmp_path / "res.json"), ds)
    assert r["mAP"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- bad input

def one_line_naming(err, path):
    msg = str(err.value)
    return str(path) in msg and "\n" not in msg


def test_missing_results_json(tmp_path):
    with pytest.raises(data.DataError) as e:
        P.ResultsFile(tmp_path / "nope.json")
    assert one_line_naming(e, tmp_path / "nope.json")


def test_results_json_with_unknown_image_id(shapes32, tmp_path):
    path = tmp_path / "res.json"
    path.write_text(json.dumps([dict(image_id=424242, category_id=1, bbox=[1, 1, 5, 5], score=0.5)]))
    ds = data.CocoLayoutDataset(shapes32, "val", size=32)
    with pytest.raises(data.DataError) as e:
        P.evaluate(P.ResultsFile(path), ds)
    assert one_line_naming(e, path) and "424242" in str(e.value)


def test_missing_weights_file_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError) as e:
        P.TorchvisionDetector("fasterrcnn_resnet50_fpn", ["person"], weights=tmp_path / "w.pth")
    assert one_line_naming(e, tmp_path / "w.pth") and "fasterrcnn_resnet50_fpn_coco" in str(e.value)


def test_missing_detector_checkpoint(tmp_path):
    with pytest.raises(data.DataError) as e:
        P.load_detector(tmp_path / "det.pt")
    assert one_line_naming(e, tmp_path / "det.pt")


def test_cli_prints_one_error_line(tmp_path, shapes32):
    p = subprocess.run([sys.executable, str(REPO / "perception.py"), "eval", "--data", str(shapes32),
                        "--results", str(tmp_path / "missing.json")], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(tmp_path / "missing.json") in p.stderr


def test_torchvision_detector_from_a_local_weights_file(tmp_path):
    # a randomly initialised COCO-shaped model stands in for the real weights: loading and the output format
    from torchvision.models import detection
    net = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    det = P.TorchvisionDetector("ssdlite320_mobilenet_v3_large", ["cat", "dog"], tmp_path / "w.pth")
    assert set(det.label_map.values()) == {0, 1}
    out = P.predict(det, torch.rand(2, 3, 64, 64) * 2 - 1, score_threshold=0.0)
    assert len(out) == 2 and all(((o["boxes"] >= 0) & (o["boxes"] <= 1)).all() for o in out)
    assert all(set(o["labels"].tolist()) <= {0, 1} for o in out)


# ---------------------------------------------------------------------------------------------- sidecar

def test_sidecar_goes_to_the_run_folder_never_the_data_folder(shapes32, tmp_path):
    before = sorted(p.relative_to(shapes32) for p in Path(shapes32).rglob("*"))
    cfg = P.AttributeConfig(folds=2, steps=2, batch_size=8, image_size=32)
    with pytest.raises(data.DataError) as e:
        P.make_attributes(shapes32, Path(shapes32) / "runs", cfg)
    assert "data folder" in str(e.value)
    summary = P.make_attributes(shapes32, tmp_path / "run", cfg, log=lambda m: None)
    assert sorted(p.relative_to(shapes32) for p in Path(shapes32).rglob("*")) == before
    side = json.loads((tmp_path / "run" / "attributes.json").read_text())
    for split in ("train", "val"):
        ds = data.CocoLayoutDataset(shapes32, split, size=32)
        kept = {int(a) for i in range(len(ds)) for a in ds.load(i)["ann_ids"]}
        assert {int(k) for k in side["attributes"][split]} == kept
        assert set(side["attributes"][split].values()) <= {"easy", "hard"}
        assert 0 <= summary[split]["hard_fraction"] <= 1
    assert (side["gamma"], side["beta"], side["folds"]) == (cfg.gamma, cfg.beta, 2) and side["detector"]
    assert set(summary["train"]["per_nuisance"]) <= {"none", *data.NUISANCES}
    assert (tmp_path / "run" / "attributes.png").exists()
    # the data set reads the sidecar back
    attrs = P.load_attributes(tmp_path / "run" / "attributes.json")
    assert (data.CocoLayoutDataset(shapes32, "train", size=32, attributes=attrs)[0]["difficulty"] > 0).all()


def test_attributes_from_a_results_json_of_both_splits(shapes32, tmp_path):
    # the ground truth as detections: every object is easy; an unknown image id is an error naming the file
    res = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
           for split in ("train", "val")
           for a in json.loads((Path(shapes32) / "annotations" / f"instances_{split}.json").read_text())["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    summary = P.make_attributes(shapes32, tmp_path / "run", P.AttributeConfig(image_size=32),
                                source=P.ResultsFile(tmp_path / "res.json"), log=lambda m: None)
    assert summary["train"]["hard"] == 0 and summary["val"]["hard"] == 0 and summary["train"]["n"] > 0
    (tmp_path / "bad.json").write_text(json.dumps(res + [dict(res[0], image_id=999)]))
    with pytest.raises(data.DataError) as e:
        P.make_attributes(shapes32, tmp_path / "run2", P.AttributeConfig(image_size=32),
                          source=P.ResultsFile(tmp_path / "bad.json"), log=lambda m: None)
    assert one_line_naming(e, tmp_path / "bad.json") and "999" in str(e.value)


# ---------------------------------------------------------------------------------------------- a detector the user brings (issue 15)

def test_class_mapping_by_name_and_through_a_map():
    det = ["person", "bicycle", "car", "couch", "dog"]
    assert P.class_mapping(det, ["dog", "car"]) == {4: 0, 2: 1}              # detector index -> data-set index
    assert P.class_mapping(det, ["sofa", "dog"], "sofa=couch") == {3: 0, 4: 1}
    assert P.parse_class_map(" sofa = couch , tv=car") == {"sofa": "couch", "tv": "car"}


@pytest.mark.parametrize("names, cmap, words", [
    (["sofa", "dog"], "", ["'sofa'", "data set's sofa", "--detector-classes sofa=<its class>"]),
    (["dog"], "cat=dog", ["maps cat, which the data set does not have"]),
    (["dog"], "dog", ["expected data-set class=detector class"]),
])
def test_class_mapping_errors_name_the_class_and_the_fix(names, cmap, words):
    with pytest.raises(data.DataError) as e:
        P.class_mapping(["person", "car", "dog"], names, cmap, "det.pt")
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_detector_of_other_classes_is_relabelled(tmp_path):
    # a detdiff detector saved with classes (b, a, z) serves a data set whose classes are (a, b): labels swap,
    # predictions of z are dropped
    torch.manual_seed(0)
    model = P.Detector(P.DetectorConfig(num_classes=3, class_names=("b", "a", "z"), image_size=32, **TINY)).eval()
    P.save_detector(model, tmp_path / "det.pt")
    src = P.open_source(str(tmp_path / "det.pt"), ["a", "b"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for own, mapped in zip(P.predict(model, x, 0.0), P.predict(src, x, 0.0)):
        keep = own["labels"] != 2
        assert keep.any() and not keep.all()                   # the untrained detector predicts all three classes
        assert torch.equal(mapped["labels"], 1 - own["labels"][keep])
        assert torch.equal(mapped["boxes"], own["boxes"][keep])
    same = P.open_source(str(tmp_path / "det.pt"), ["b", "a", "z"])               # same classes: the model itself
    assert isinstance(same, P.Detector) and isinstance(src, P.Relabelled)
    with pytest.raises(data.DataError, match="no class 'c'"):
        P.open_source(str(tmp_path / "det.pt"), ["a", "c"])


def test_torchvision_detector_class_map_and_a_class_it_lacks(tmp_path):
    from torchvision.models import detection
    net = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    det = P.open_source("torchvision:ssdlite320_mobilenet_v3_large", ["sofa", "dog"], str(tmp_path / "w.pth"),
                        "sofa=couch")
    cats = detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    assert det.label_map == {cats.index("couch"): 0, cats.index("dog"): 1}
    with pytest.raises(data.DataError, match="no class 'sofa'.*--detector-classes sofa="):
        P.open_source("torchvision:ssdlite320_mobilenet_v3_large", ["sofa", "dog"], str(tmp_path / "w.pth"))


def test_results_json_with_category_ids_the_data_set_lacks(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([dict(image_id=1, category_id=91, bbox=[0, 0, 4, 4], score=0.9)]))
    with pytest.raises(data.DataError) as e:
        P.open_source(str(tmp_path / "r.json"), ["a", "b"], category_ids=[1, 3])
    assert one_line_naming(e, tmp_path / "r.json") and "category_id 91" in str(e.value)


def test_degenerate_attribute_warning():
    assert P.attribute_warning(0.5, "d") is None and P.attribute_warning(0.9, "d") is None
    assert P.attribute_warning(0.05, "d") is None
    high, low = P.attribute_warning(0.992, "from-scratch"), P.attribute_warning(0.01, "d")
    assert high.startswith("warning: 99.2% of the training objects are hard") and "from-scratch" in high
    assert "--detector torchvision:NAME --detector-weights FILE" in high and "--attr-steps" in high
    assert low.startswith("warning: only 1.0% of the training objects are hard") and "--gamma" in low


def test_attribute_stage_warns_when_the_detector_finds_nothing(shapes32, tmp_path):
    # detections for the val images only: every training object is hard, and the summary and the log say why
    res = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
           for a in json.loads((Path(shapes32) / "annotations" / "instances_val.json").read_text())["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    logged = []
    summary = P.make_attributes(shapes32, tmp_path / "run", P.AttributeConfig(image_size=32),
                                source=P.ResultsFile(tmp_path / "res.json"), log=logged.append)
    assert summary["train"]["hard_fraction"] == 1.0 and summary["val"]["hard_fraction"] == 0.0
    assert summary["train"]["warning"].startswith("warning: 100.0% of the training objects are hard")
    assert logged[-1] == summary["train"]["warning"]
    side = json.loads((tmp_path / "run" / "attributes.json").read_text())
    assert side["summary"]["train"]["warning"] == summary["train"]["warning"]
