"""data_sets/shapes.py: the embedded data set is the same for the same seed, and every label is inside its
image and loads."""
import json

import pytest

import config
import data
from data_sets import shapes


def test_shapes_is_deterministic_by_seed(tmp_path):
    a = shapes.make_shapes(tmp_path / "a", seed=0, n_train=6, n_val=3, progress=False)
    b = shapes.make_shapes(tmp_path / "b", seed=0, n_train=6, n_val=3, progress=False)
    c = shapes.make_shapes(tmp_path / "c", seed=1, n_train=6, n_val=3, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6 + 3 + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    with pytest.raises(config.DataError, match="already exists"):
        shapes.make_shapes(tmp_path / "a", n_train=1, n_val=1, progress=False)


def test_shapes_labels_are_inside_and_loadable(tmp_path):
    root = shapes.make_shapes(tmp_path / "s", seed=3, n_train=40, n_val=2, progress=False)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(shapes.SHAPES)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w * h >= 0.02 * 64 * 64
        assert a["nuisance"] in ("none",) + shapes.NUISANCES
    ds = data.CocoLayoutDataset(root, "train", size=32)
    assert ds.stats["dropped_small"] == 0 and len(ds) == 40
    it = ds[0]
    assert (it["masks"].sum((1, 2)) > 0).all()
