"""perceptive/detections.py: the perceptive model a user brings (a detdiff checkpoint of other classes, a
torchvision detector from a local weights file, a COCO results json), its classes mapped onto the
data set's, and bad input as one line."""
import json

import pytest
import torch

import config
import data
from perceptive import coco_map, detections, detector
from conftest import TINY_DETECTOR, one_line_naming


def test_missing_results_json(tmp_path):
    with pytest.raises(config.DataError) as e:
        detections.ResultsFile(tmp_path / "nope.json")
    assert one_line_naming(e, tmp_path / "nope.json")


def test_results_json_with_unknown_image_id(shapes32, tmp_path):
    path = tmp_path / "res.json"
    path.write_text(json.dumps([dict(image_id=424242, category_id=1, bbox=[1, 1, 5, 5],
                                     score=0.5)]))
    ds = data.CocoLayoutDataset(shapes32, "val", size=32)
    with pytest.raises(config.DataError) as e:
        coco_map.evaluate(detections.ResultsFile(path), ds)
    assert one_line_naming(e, path) and "424242" in str(e.value)


def test_missing_weights_file_says_where_to_put_it(tmp_path):
    with pytest.raises(config.DataError) as e:
        detections.TorchvisionDetector("fasterrcnn_resnet50_fpn", ["person"],
                                       weights=tmp_path / "w.pth")
    assert one_line_naming(e, tmp_path / "w.pth") and "fasterrcnn_resnet50_fpn_coco" in str(e.value)


def test_torchvision_detector_from_a_local_weights_file(tmp_path):
    # a randomly initialised COCO-shaped model stands in for the real weights: loading and the
    # output format
    from torchvision.models import detection
    net = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                  num_classes=91)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    det = detections.TorchvisionDetector("ssdlite320_mobilenet_v3_large", ["cat", "dog"],
                                         tmp_path / "w.pth")
    assert set(det.label_map.values()) == {0, 1}
    out = detector.predict(det, torch.rand(2, 3, 64, 64) * 2 - 1, score_threshold=0.0)
    assert len(out) == 2 and all(((o["boxes"] >= 0) & (o["boxes"] <= 1)).all() for o in out)
    assert all(set(o["labels"].tolist()) <= {0, 1} for o in out)


def test_class_mapping_by_name_and_through_a_map():
    det = ["person", "bicycle", "car", "couch", "dog"]
    # detector index -> data-set index
    assert detections.class_mapping(det, ["dog", "car"]) == {4: 0, 2: 1}
    assert detections.class_mapping(det, ["sofa", "dog"], "sofa=couch") == {3: 0, 4: 1}
    assert detections.parse_class_map(" sofa = couch , tv=car") == {"sofa": "couch", "tv": "car"}


@pytest.mark.parametrize("names, cmap, words", [
    (["sofa", "dog"], "", ["'sofa'", "data set's sofa", "--detector-classes sofa=<its class>"]),
    (["dog"], "cat=dog", ["maps cat, which the data set does not have"]),
    (["dog"], "dog", ["expected data-set class=detector class"]),
])
def test_class_mapping_errors_name_the_class_and_the_fix(names, cmap, words):
    with pytest.raises(config.DataError) as e:
        detections.class_mapping(["person", "car", "dog"], names, cmap, "det.pt")
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_detector_of_other_classes_is_relabelled(tmp_path):
    # a detdiff detector saved with classes (b, a, z) serves a data set whose classes are (a, b):
    # labels swap, predictions of z are dropped
    torch.manual_seed(0)
    model = detector.Detector(detector.DetectorConfig(num_classes=3, class_names=("b", "a", "z"),
                                                      image_size=32, **TINY_DETECTOR)).eval()
    detector.save_detector(model, tmp_path / "det.pt")
    src = detections.open_source(str(tmp_path / "det.pt"), ["a", "b"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for own, mapped in zip(detector.predict(model, x, 0.0), detector.predict(src, x, 0.0)):
        keep = own["labels"] != 2
        assert keep.any() and not keep.all()     # the untrained detector predicts all three classes
        assert torch.equal(mapped["labels"], 1 - own["labels"][keep])
        assert torch.equal(mapped["boxes"], own["boxes"][keep])
    # same classes: the model itself
    same = detections.open_source(str(tmp_path / "det.pt"), ["b", "a", "z"])
    assert isinstance(same, detector.Detector) and isinstance(src, detections.Relabelled)
    with pytest.raises(config.DataError, match="no class 'c'"):
        detections.open_source(str(tmp_path / "det.pt"), ["a", "c"])


def test_torchvision_detector_class_map_and_a_class_it_lacks(tmp_path):
    from torchvision.models import detection
    net = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                  num_classes=91)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    det = detections.open_source("torchvision:ssdlite320_mobilenet_v3_large", ["sofa", "dog"],
                                 str(tmp_path / "w.pth"),
                                 "sofa=couch")
    cats = detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    assert det.label_map == {cats.index("couch"): 0, cats.index("dog"): 1}
    with pytest.raises(config.DataError, match="no class 'sofa'.*--detector-classes sofa="):
        detections.open_source("torchvision:ssdlite320_mobilenet_v3_large", ["sofa", "dog"],
                               str(tmp_path / "w.pth"))


def test_a_torchvision_detector_sees_the_data_at_its_own_side_and_ours_at_det_size():
    tv = dict(detector="torchvision:fasterrcnn_resnet50_fpn", det_size=64)
    assert detections.input_side(tv, 128) == 128 and detections.input_side(tv, 32) == 64
    assert detections.input_side(dict(detector="", det_size=64), 128) == 64
    assert detections.input_side(dict(detector="/runs/x/detector.pt", det_size=64), 128) == 64


def test_results_json_with_category_ids_the_data_set_lacks(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([dict(image_id=1, category_id=91, bbox=[0, 0, 4, 4],
                                                      score=0.9)]))
    with pytest.raises(config.DataError) as e:
        detections.open_source(str(tmp_path / "r.json"), ["a", "b"], category_ids=[1, 3])
    assert one_line_naming(e, tmp_path / "r.json") and "category_id 91" in str(e.value)
