"""perceptive/detector.py: the CenterNet targets decode back to their boxes, a few training steps beat chance,
a detector survives its file, and a missing checkpoint is one line naming it."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data
import optim
from perceptive import coco_map, detector
from conftest import TINY_DETECTOR, one_line_naming

REPO = Path(__file__).resolve().parent.parent


def test_targets_decode_back_to_the_boxes():
    # perfect network outputs built from the targets decode to the ground-truth boxes (to float
    # precision)
    boxes = torch.tensor([[[0.10, 0.20, 0.45, 0.60], [0.55, 0.05, 0.95, 0.30]]])
    labels, valid = torch.tensor([[3, 1]]), torch.tensor([[True, True]])
    G = 8
    heat, b, cell, wh, off = detector.centernet_targets(boxes, labels, valid, 4, G)
    assert heat.shape == (1, 4, G, G) and heat[0, 3, cell[0, 1],
                                               cell[0, 0]] == 1 and heat.max() == 1
    size, offset = torch.zeros(1, 2, G, G), torch.zeros(1, 2, G, G)
    size[b, :, cell[:, 1], cell[:, 0]], offset[b, :, cell[:, 1], cell[:, 0]] = wh, off
    logits = torch.where(heat == 1, torch.tensor(5.0), torch.tensor(-9.0))
    model = detector.Detector(detector.DetectorConfig(num_classes=4, image_size=4 * G,
                                                      **TINY_DETECTOR))
    model.forward = lambda x: (logits, size, offset)
    out = detector.predict(model, torch.zeros(1, 3, 4 * G, 4 * G), score_threshold=0.5)[0]
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
            c, s = (
                torch.rand(10, 2, generator=self.g),
                torch.rand(10, 2, generator=self.g) * 0.5 + 0.1,
            )
            out.append(dict(boxes=torch.cat([c - s / 2, c + s / 2], 1).clamp(0, 1),
                            scores=torch.rand(10, generator=self.g),
                            labels=torch.randint(self.C, (10,), generator=self.g)))
        return out


def test_detector_trained_a_few_steps_beats_chance(shapes32):
    # chance = RandomBoxes; 60 steps of 16 images: it fits its 32 training images and finds objects
    # on 8 images it never saw (AP50 0.23-0.28 for seeds 0-2 when written)
    train, val = (data.CocoLayoutDataset(shapes32, s, size=32) for s in ("train", "val"))
    cfg = detector.DetTrainConfig(steps=60, batch_size=16, lr=5e-3, warmup=5, log_every=0)
    model = detector.train(train,
                           detector.DetectorConfig(num_classes=5,
                                                   class_names=tuple(train.class_names),
                                                   image_size=32,
                                                          **TINY_DETECTOR), cfg)
    for ds, margin in ((train, 0.5), (val, 0.1)):
        trained, chance = coco_map.evaluate(model, ds), coco_map.evaluate(RandomBoxes(5), ds)
        assert chance["AP50"] < 0.05         # random boxes hardly ever overlap an object by IoU 0.5
        assert trained["AP50"] > chance["AP50"] + margin, (trained, chance)


def test_detector_lr_follows_the_shared_schedule(shapes32):
    """Each logged step's learning rate is optim.warmup_cosine's at that step (the schedule every
    loop uses)."""
    train = data.CocoLayoutDataset(shapes32, "train", size=32)
    cfg = detector.DetTrainConfig(steps=6, batch_size=2, lr=5e-3, warmup=3, log_every=1)
    lines = []
    detector.train(train,
                   detector.DetectorConfig(num_classes=5, class_names=tuple(train.class_names),
                                           image_size=32,
                                                  **TINY_DETECTOR), cfg, log=lines.append)
    got = [line.split(" lr ")[1].split()[0] for line in lines]
    assert got == [f"{optim.warmup_cosine(5e-3, s, 3, s / 6):.1e}" for s in range(6)]
    assert got[:3] == ["1.7e-03", "3.3e-03", "5.0e-03"]                      # the warm-up, by hand


def test_detector_save_load_roundtrip(tmp_path):
    model = detector.Detector(detector.DetectorConfig(num_classes=3, class_names=("a", "b", "c"),
                                                      image_size=32, **TINY_DETECTOR)).eval()
    detector.save_detector(model, tmp_path / "det.pt")
    back = detector.load_detector(tmp_path / "det.pt")
    assert back.cfg == model.cfg
    x = torch.rand(2, 3, 40, 40) * 2 - 1                        # another size: resized to 32 inside
    a, b = detector.predict(model, x), detector.predict(back, x)
    for da, db in zip(a, b):
        torch.testing.assert_close(da["boxes"], db["boxes"])
        assert ((da["boxes"] >= 0) & (da["boxes"] <= 1)).all()


def test_missing_detector_checkpoint(tmp_path):
    with pytest.raises(config.DataError) as e:
        detector.load_detector(tmp_path / "det.pt")
    assert one_line_naming(e, tmp_path / "det.pt")


def test_cli_prints_one_error_line(tmp_path, shapes32):
    p = subprocess.run([sys.executable, "-m", "perceptive", "eval", "--data", str(shapes32),
                        "--results", str(tmp_path / "missing.json")], capture_output=True,
                       text=True, cwd=REPO)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(tmp_path / "missing.json") in p.stderr
