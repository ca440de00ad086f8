"""experiments/trainability.py: the generated training layouts are the training set's, drawn at random and
mirrored half the time."""
import torch

import sample
from experiments import trainability


def test_training_layouts_are_drawn_and_mirrored(ckpt):
    ck = torch.load(ckpt, weights_only=False)
    pool = sample.split_layouts(ck, 100, split="train")
    lays = trainability.training_layouts(ck, 40, seed=3)
    assert len(lays) == 40 and lays[0]["boxes"].equal(trainability.training_layouts(ck, 40, seed=3)[0]["boxes"])
    mirrored = 0
    for lay in lays:
        b = lay["boxes"]
        flip = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)
        as_drawn = any(p["labels"].equal(lay["labels"]) and p["boxes"].allclose(b) for p in pool)
        as_mirror = any(p["labels"].equal(lay["labels"]) and p["boxes"].allclose(flip) for p in pool)
        assert as_drawn or as_mirror
        mirrored += as_mirror and not as_drawn
    assert 5 < mirrored < 35
