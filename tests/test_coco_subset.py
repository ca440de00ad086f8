"""data_sets/coco_subset.py: a subset of one instances json, split deterministically by image id, boxes and
masks resized with the images, and an unknown category as one line."""
import torch
from PIL import Image

import data
from data_sets import coco_subset
from test_data import ann, one_line_error, write_coco


def test_coco_subset_from_one_json(tmp_path):
    src = tmp_path / "src"
    im = Image.new("RGB", (80, 40), (9, 9, 9))
    images = [(i, f"{i}.png", im, (80, 40)) for i in range(1, 31)]
    anns = [ann(i, i, [8, 4, 40, 20], cat=7,
                segmentation=[[8, 4, 48, 4, 48, 24, 8, 24]]) for i in range(1, 31)]
    anns += [ann(100 + i, i, [50, 20, 20, 20], cat=1) for i in range(1, 31)]  # persons: not chosen
    js = write_coco(src, images, anns)
    out = coco_subset.build_coco_subset(tmp_path / "sub", json_path=js, images=src / "train",
                                        categories=["dog"], size=32)
    tr = data.CocoLayoutDataset(out, "train", size=32)
    va = data.CocoLayoutDataset(out, "val", size=32)
    assert len(tr) + len(va) == 30 and len(va) > 0 and tr.class_names == va.class_names == ["dog"]
    ids = {r["image_id"] for r in va.records}
    assert not ids & {r["image_id"] for r in tr.records}
    again = coco_subset.build_coco_subset(tmp_path / "sub2", json_path=js, images=src / "train",
                                          categories=["dog"], size=32)
    # deterministic split
    assert ids == {r["image_id"] for r in data.CocoLayoutDataset(again, "val").records}
    it = tr[0]
    assert torch.allclose(it["boxes"][0], torch.tensor([0.1, 0.1, 0.6, 0.6]), atol=1e-5)
    assert it["masks"][0].sum() == 16 * 16
    assert "no categories named ['zebra']" in one_line_error(
        coco_subset.build_coco_subset, tmp_path / "sub3", json_path=js, images=src / "train",
        categories=["zebra"])
