"""optim.py: the EMA formula, warm-up then cosine decay, and batches that cover each epoch and split
across ranks."""
import pytest
import torch

import optim
import train


def test_ema_update_formula():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ref = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    optim.ema_update(a, b, 0.9)
    assert all(torch.allclose(p, r) for p, r in zip(a.parameters(), ref))


def test_lr_warmup_then_cosine():
    cfg = train.TrainConfig(lr=1.0, warmup=10, min_lr_frac=0.1)
    assert optim.lr_at(cfg, 0, 0.0) == pytest.approx(0.1) and optim.lr_at(
        cfg, 9, 0.0
    ) == pytest.approx(1.0)
    assert optim.lr_at(cfg, 50, 0.5) == pytest.approx(0.55) and optim.lr_at(
        cfg, 99, 1.0
    ) == pytest.approx(0.1)


def test_warmup_cosine_by_hand():
    """lr 2, warm-up 4: 0.5, 1, 1.5, 2 over the warm-up; then 2 * (1 + cos(pi p)) / 2: 1 at p = 0.5,
    0 at p = 1 (the floor min_frac lifts the end to lr * min_frac)."""
    assert [optim.warmup_cosine(2.0, s, 4, 0.0) for s in range(4)] == pytest.approx(
        [0.5, 1.0, 1.5, 2.0]
    )
    assert optim.warmup_cosine(2.0, 10, 4, 0.5) == pytest.approx(1.0)
    assert optim.warmup_cosine(2.0, 10, 4, 1.0) == pytest.approx(0.0)
    # past the end: the floor
    assert optim.warmup_cosine(2.0, 10, 4, 2.0, min_frac=0.25) == pytest.approx(0.5)


def test_batches_cover_each_epoch_and_split_across_ranks():
    n, B = 10, 5
    seen = [i for s in range(2) for i in optim.batch_indices(n, B, s, seed=3)]
    assert sorted(seen) == list(range(n))
    both = optim.batch_indices(n, B, 0, 3, rank=0, world=2) + optim.batch_indices(
        n, B, 0, 3, rank=1, world=2
    )
    assert sorted(both) == list(range(n))
