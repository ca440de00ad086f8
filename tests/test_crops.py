"""experiments/crops.py (class consistency): object crops against numpy slicing, the crop classifier on a tiny
synthetic problem, per-difficulty accuracy and the acceptance filter against hand counts with stub
classifiers, and checkpoint errors."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import config
from experiments import crops


def to_range(a):  # the reference's own [-1, 1] mapping: (H, W, 3) uint8 -> (3, H, W) float
    return torch.from_numpy(a.astype(np.float64) / 127.5 - 1).permute(2, 0, 1).float()


def layout(boxes_px, labels, S, difficulty=None):
    lay = dict(boxes=torch.tensor(boxes_px, dtype=torch.float32).reshape(-1, 4) / S,
               labels=torch.tensor(labels, dtype=torch.long))
    if difficulty is not None:
        lay["difficulty"] = torch.tensor(difficulty, dtype=torch.long)
    return lay


# ----------------------------------------------------------------------------------------------
# object_crops. roi_align(aligned=True) shifts the box by -0.5 px, so pixel i's centre sits at
# coordinate i. With bins of one pixel, sampling_ratio=-1 takes ceil(1) = 1 sample per bin, at x0 -
# 0.5 + j + 0.5 = x0 + j: an integer, so bilinear interpolation puts weight 1 on pixel x0 + j and
# the crop is exactly the slice. With bins of two pixels it takes 2 x 2 samples at x0 + 2j and x0 +
# 2j + 1: the crop is the 2 x 2 block mean.

@pytest.mark.parametrize("box, context, size, y, x", [
    ((2, 3, 7, 8), 0.0, 5, slice(3, 8), slice(2, 7)),      # a 5 x 5 box on the grid, cropped at its
                                                           # size
    ((3, 3, 7, 7), 0.25, 6, slice(2, 8), slice(2, 8)),     # context 0.25 of a 4 px side = 1 px on
                                                           # each side
])
def test_crop_equals_numpy_slice(box, context, size, y, x):
    img = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    got, *_ = crops.object_crops([img], [layout([box], [0], 12)], size=size, context=context)
    torch.testing.assert_close(got[0], to_range(img[y, x]), atol=1e-5, rtol=0)


def test_crop_downsampled_is_block_mean():
    img = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    got, *_ = crops.object_crops([img], [layout([(2, 2, 10, 10)], [0], 12)], size=4, context=0.0)
    ref = to_range(img[2:10, 2:10]).reshape(3, 4, 2, 4, 2).mean((2, 4))
    torch.testing.assert_close(got[0], ref, atol=1e-5, rtol=0)


def test_crop_bookkeeping_several_layouts():
    S = 16
    # image k has a flat value: crops tell it
    images = [np.full((S, S, 3), 40 * k, np.uint8) for k in range(3)]
    layouts = [layout([(0, 0, 8, 8), (4, 4, 12, 12)], [3, 1], S, [1, 2]),
               layout(np.zeros((0, 4)), [], S, []),
               # no difficulty -> none
               layout([(1, 1, 5, 5), (8, 2, 16, 10), (2, 8, 10, 16)], [0, 2, 4], S)]
    got, labels, diff, index = crops.object_crops(images, layouts, size=8, context=0.0)
    assert got.shape == (5, 3, 8, 8)
    assert labels.tolist() == [3, 1, 0, 2, 4]
    assert diff.tolist() == [1, 2, 0, 0, 0]
    assert index.tolist() == [0, 0, 2, 2, 2]
    torch.testing.assert_close(got.mean((1, 2, 3)),
                               torch.tensor([-1.0, -1.0] + [80 / 127.5 - 1] * 3))
    empty = crops.object_crops(images[:1], layouts[1:2], size=8)
    assert empty[0].shape == (0, 3, 8, 8) and empty[1].shape == empty[3].shape == (0,)


# ----------------------------------------------------------------------------------------------
# Training on a tiny synthetic problem: squares with horizontal stripes, vertical stripes or a
# checkerboard (all three keep their label under a horizontal flip), random colours, on noise.

class StripesDataset:
    class_names = ("horizontal", "vertical", "checker")

    def __init__(self, n, seed, S=24):
        rng, self.items = np.random.default_rng(seed), []
        for _ in range(n):
            img = rng.integers(0, 256, (S, S, 3)).astype(np.float64) * 0.3 + 90
            boxes, labels = [], []
            for x0 in (1, 13):
                c, side = int(rng.integers(3)), int(rng.integers(8, 11))
                y0 = int(rng.integers(0, S - side))
                yy, xx = np.mgrid[0:side, 0:side]
                on = [yy % 2 == 0, xx % 2 == 0, (yy + xx) % 2 == 0][c]
                light, dark = rng.uniform(180, 255, 3), rng.uniform(0, 60, 3)
                img[y0:y0 + side, x0:x0 + side] = np.where(on[..., None], light, dark)
                boxes.append([x0 / S, y0 / S, (x0 + side) / S, (y0 + side) / S])
                labels.append(c)
            self.items.append(dict(image=np.uint8(img), boxes=np.float32(boxes),
                                   labels=np.int64(labels)))

    def __len__(self):
        return len(self.items)

    def load(self, i):
        return self.items[i]


def test_train_reaches_high_accuracy():
    clf = crops.train_crop_classifier(StripesDataset(32, seed=0), steps=60, batch=32,
                                      log=lambda s: None)
    test = StripesDataset(20, seed=1)
    images = [it["image"] for it in test.items]
    layouts = [dict(boxes=torch.from_numpy(it["boxes"]),
                    labels=torch.from_numpy(it["labels"])) for it in test.items]
    acc = crops.crop_accuracy(clf, images, layouts)
    assert acc["overall"]["count"] == 40 and acc["overall"]["accuracy"] >= 0.9
    assert clf.class_names == StripesDataset.class_names


def test_train_is_deterministic():
    ds = StripesDataset(8, seed=0)
    a, b = (crops.train_crop_classifier(ds, steps=3, batch=8, seed=5,
                                        log=lambda s: None) for _ in range(2))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


# ----------------------------------------------------------------------------------------------
# crop_accuracy and accept_objects with stub classifiers whose output is fixed by the crop's
# dominant colour.

class Stub(nn.Module):
    """Crop whose channel c dominates -> logits table[c]."""
    size, context, class_names = 4, 0.0, ("r", "g", "b")

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, x):
        return self.table[x.mean((2, 3)).argmax(1)]


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def painted(S, objects):
    """Grey image with each (box_px, colour) painted; -> image, boxes in px."""
    img = np.full((S, S, 3), 128, np.uint8)
    for (x0, y0, x1, y1), col in objects:
        img[y0:y1, x0:x1] = col
    return img, [b for b, _ in objects]


def test_crop_accuracy_per_difficulty_by_hand():
    stub = Stub((10 * np.eye(3)).tolist())  # predicts the dominant colour: red 0, green 1, blue 2
    im0, b0 = painted(16, [((0, 0, 4, 4), RED), ((6, 0, 10, 4), GREEN), ((0, 8, 4, 12), BLUE)])
    im1, b1 = painted(16, [((0, 0, 4, 4), RED), ((8, 8, 12, 12), GREEN)])
    im2, _ = painted(16, [])
    layouts = [layout(b0, [0, 1, 0], 16, [1, 2, 2]),       # easy right, hard right, hard wrong
               layout(b1, [2, 1], 16, [1, 0]),             # easy wrong, none right
               layout(np.zeros((0, 4)), [], 16, [])]
    acc = crops.crop_accuracy(stub, [im0, im1, im2], layouts)
    assert acc["overall"] == dict(accuracy=pytest.approx(3 / 5), count=5)
    assert acc["easy"] == dict(accuracy=pytest.approx(1 / 2), count=2)
    assert acc["hard"] == dict(accuracy=pytest.approx(1 / 2), count=2)
    assert acc["none"] == dict(accuracy=pytest.approx(1.0), count=1)
    assert crops.crop_accuracy(stub, [im2], layouts[2:])["hard"] == dict(accuracy=None, count=0)


def test_accept_objects_threshold():
    # red -> probabilities (0.7, 0.2, 0.1); green -> (0.5, 0.5, 0) exactly (two equal logits, one of
    # -1e4)
    stub = Stub([np.log([0.7, 0.2, 0.1]).tolist(), [0.0, 0.0, -1e4], [0.0, 0.0, 0.0]])
    im0, b0 = painted(16, [((0, 0, 4, 4), RED), ((8, 0, 12, 4), RED), ((0, 8, 4, 12), GREEN)])
    im1, _ = painted(16, [])
    # p of the layout class: .7, .2, .5
    layouts = [layout(b0, [0, 1, 1], 16), layout(np.zeros((0, 4)), [], 16)]
    for min_prob, want in ((0.5, [True, False, True]), (0.6, [True, False, False]),
                           (0.1, [True, True, True])):
        keep = crops.accept_objects(stub, [im0, im1], layouts, min_prob=min_prob)
        assert (
            len(keep) == 2
            and keep[0].tolist() == want
            and keep[1].shape == (0,)
            and keep[0].dtype == torch.bool
        )


# ----------------------------------------------------------------------------------------------
# Files.

def test_save_load_round_trip(tmp_path):
    clf = crops.CropClassifier(3, ("a", "b", "c"), width=4, size=8, context=0.2).eval()
    crops.save_crop_classifier(clf, tmp_path / "clf.pt")
    back = crops.load_crop_classifier(tmp_path / "clf.pt")
    x = torch.randn(2, 3, 8, 8)
    assert back.class_names == ("a", "b", "c") and (back.size, back.context) == (8, 0.2)
    torch.testing.assert_close(back(x), clf(x))


@pytest.mark.parametrize("content", ["text", "other dict", "missing"])
def test_load_bad_file_names_it(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "other dict":
        torch.save(dict(kind="detdiff-centernet", state_dict={}), path)
    with pytest.raises(config.DataError, match="bad.pt"):
        crops.load_crop_classifier(path)
