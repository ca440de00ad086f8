"""The optimisation pieces the generator's loop (train.py) and the autoencoder's (autoencoder.py)
share: AdamW with weight decay on weight matrices only, linear warm-up then cosine decay (also the
detector's and the crop classifier's), batches as a pure function of (seed, step) so that a resumed
run sees exactly the batches the killed one would have, the EMA of the weights, and the RNG state a
checkpoint carries.

    python detdiff.py --stage generator --steps 200 --out runs/quick   # the loop these serve
"""
import functools
import math
import random

import numpy as np
import torch


def make_optimizer(raw, cfg):
    """AdamW, weight decay on weight matrices and kernels only (not on biases and norm gains)."""
    decay, no_decay = [p for p in raw.parameters() if p.dim() >= 2], [
        p for p in raw.parameters() if p.dim() < 2
    ]
    return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                              dict(params=no_decay, weight_decay=0)], lr=cfg.lr, betas=(0.9, 0.99))


def warmup_cosine(lr, step, warmup, progress, min_frac=0.0):
    """The project's one learning-rate schedule: linear warm-up for `warmup` steps, then cosine
    decay from lr to lr * min_frac as progress goes 0 -> 1 (the generator, the autoencoder, the
    detector, the crop classifier)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    c = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_frac + (1 - min_frac) * c)


def lr_at(cfg, step, progress):
    """warmup_cosine with a config's lr, warmup and min_lr_frac (TrainConfig; progress is the run's
    fraction of its steps or of its time budget)."""
    return warmup_cosine(cfg.lr, step, cfg.warmup, progress, cfg.min_lr_frac)


def batch_indices(n, batch, step, seed, rank=0, world=1):
    """The dataset indices of `step`'s batch on `rank`: a pure function of (seed, step), so a
    resumed run sees exactly the batches the killed run would have seen. Epochs are seeded
    permutations of 0..n-1."""
    G = batch * world
    first = step * G
    out = []
    for i in range(first + rank * batch, first + (rank + 1) * batch):
        epoch, k = divmod(i, n)
        out.append(epoch_permutation(n, seed, epoch)[k])
    return out


@functools.lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    """The order of epoch `epoch`: a permutation of 0..n-1 from its own seeded generator, as a list
    (kept for the few epochs a run is in, so a step does not draw it again for every sample)."""
    return torch.randperm(n,
                          generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def ema_update(ema, model, decay):
    """EMA of the weights: theta_ema <- decay * theta_ema + (1 - decay) * theta; buffers are
    copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
