"""experiments/masks.py: the exported masks (the head's probability above the threshold, inside the box) by
hand, Otsu's threshold against brute force, and the drawn object recovered from a disc on a textured
background."""
import numpy as np
import pytest
import torch

import sample
from experiments import masks


def test_object_masks_threshold_inside_the_box_by_hand():
    p = torch.zeros(2, 4, 4)                            # two slots; the layout has one object
    p[0, 0, :] = 0.9                              # row 0: above 0.5, but only x < 0.5 is in the box
    p[0, 1, 1] = 0.6
    p[0, 2, 1] = 0.4                                    # below the threshold
    p[1] = 1.0                                          # the padding slot is not exported
    lay = dict(boxes=torch.tensor([[0.0, 0.0, 0.5, 0.75]]), labels=torch.tensor([3]))
    (m,) = sample.object_masks([p], [lay], threshold=0.5)
    want = np.zeros((1, 4, 4), bool)
    want[0, 0, :2] = want[0, 1, 1] = True       # pixel centres 0.125, 0.375 in x; 0.125..0.625 in y
    assert m.dtype == bool and np.array_equal(m, want)


def test_otsu_threshold_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = np.concatenate([rng.normal(0, 1, rng.integers(2, 30)),
                            rng.normal(4, 1, rng.integers(2, 30))]).round(1)
        best, best_t = -1.0, None
        for t in np.unique(v)[:-1]:                   # every split between distinct values, by hand
            lo, hi = v[v <= t], v[v > t]
            between = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
            if between > best:
                best, best_t = between, t
        assert masks.otsu_threshold(v) == best_t


def test_drawn_masks_recover_a_disc_on_a_textured_background():
    S = 32
    yy, xx = np.mgrid[:S, :S] + 0.5
    disc = (yy - 12) ** 2 + (xx - 20) ** 2 <= 6 ** 2             # centre (20, 12), radius 6
    rng = np.random.default_rng(0)
    # noisy blue background
    im = (np.array([40, 60, 200]) + rng.integers(-15, 16, (S, S, 3))).astype(np.uint8)
    im[disc] = (230, 200, 30)
    box = np.array([[14, 6, 26, 18]]) / S                          # the disc's tight box
    lay = dict(boxes=torch.tensor(box, dtype=torch.float32), labels=torch.tensor([0]))
    (d,) = masks.drawn_masks([im], [lay])[0]
    assert np.array_equal(d, disc)
    fit = masks.mask_fit([im], [lay], [disc[None]])
    assert fit["iou"] == 1.0 and fit["n"] == 1 and fit["box_iou"] == pytest.approx(disc.sum() / 144, abs=1e-4)
    # a box that fills the image leaves no ring to compare with: not judged
    full = dict(boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]), labels=torch.tensor([0]))
    assert masks.drawn_masks([im], [full])[0] == [None] and masks.mask_fit([im], [full], [disc[None]])["n"] == 0
