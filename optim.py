"""The optimisation pieces the generator's loop (train.py) and the autoencoder's (autoencoder.py)
share: AdamW with weight decay on weight matrices only, or Muon (orthogonalised momentum) for the
hidden weight matrices with AdamW for the rest, linear warm-up then cosine decay (also the
detector's and the crop classifier's), batches as a pure function of (seed, step) so that a resumed
run sees exactly the batches the killed one would have, and the RNG state a checkpoint carries.

    python detdiff.py --stage generator --steps 200 --out runs/quick   # the loop these serve
"""
import functools
import math
import random

import numpy as np
import torch


def make_optimizer(raw, cfg, kind=None, dtype="fp32"):
    """The optimiser `kind` (default cfg.optimizer; the autoencoder always takes AdamW) over the
    module `raw`. adamw: AdamW, weight decay on weight matrices and kernels only (not on biases and
    norm gains). muon: `Muon` for the hidden weight matrices and conv kernels (`muon_params`), AdamW
    as above for the rest; the Muon group's learning rate is cfg.lr times cfg.muon_lr_scale, its
    Newton-Schulz iteration runs in `dtype` (the run's resolved training dtype: bf16 where the run
    trains in bf16)."""
    kind = kind or getattr(cfg, "optimizer", "adamw")
    if kind == "adamw":
        decay, no_decay = [p for p in raw.parameters() if p.dim() >= 2], [
            p for p in raw.parameters() if p.dim() < 2
        ]
        return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                  dict(params=no_decay, weight_decay=0)], lr=cfg.lr,
                                 betas=(0.9, 0.99))
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r} (adamw or muon)")
    hidden = muon_params(raw)
    ids = {id(p) for p in hidden}
    rest = [p for p in raw.parameters() if id(p) not in ids]
    return Muon([dict(params=hidden, muon=True, lr_scale=cfg.muon_lr_scale,
                      weight_decay=cfg.weight_decay),
                 dict(params=[p for p in rest if p.dim() >= 2], weight_decay=cfg.weight_decay),
                 dict(params=[p for p in rest if p.dim() < 2], weight_decay=0)],
                lr=cfg.lr, ns_dtype=dtype)


# Parameters AdamW keeps under Muon: the token and role embeddings (a lookup table is no linear
# map), the first convolution (3 input channels) and the output convolution (it maps to noise
# space); Keller Jordan's recipe keeps the first and last layers on AdamW too.
ADAMW_ONLY = ("encoder.tok_emb.", "encoder.role_emb.", "conv_in.", "out.")


def muon_params(raw):
    """The parameters Muon updates: every weight with 2 or more dimensions (a matrix, or a conv
    kernel read as (out, in k k)) except those ADAMW_ONLY names."""
    return [p for n, p in raw.named_parameters() if p.dim() >= 2 and not n.startswith(ADAMW_ONLY)]


NS_COEFFS = (3.4445, -4.7750, 2.0315)   # Keller Jordan's quintic: fast to approach 1, not exactly 1


def newton_schulz(G, steps=5, dtype=torch.float32):
    """An approximate polar factor U V^T of each matrix G = U S V^T (batched over leading
    dimensions): the Newton-Schulz iteration X <- a X + (b X X^T + c (X X^T)^2) X (Muon, Keller
    Jordan 2024), started from G scaled to spectral norm <= 1. With these coefficients the singular
    values end near 1 (roughly 0.7 to 1.2), not at 1: speed over precision, as Muon wants. Computed
    in `dtype` (bf16 on hardware that has it), returned in it."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)       # Frobenius norm >= spectral norm
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT                                  # iterate on the wide side: X X^T is the small one
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for the groups marked muon=True, AdamW for the others, in one
    optimiser that the training loop, the checkpoint and DDP treat like torch's AdamW (param_groups
    with "lr", state_dict).

    Muon, per weight W with gradient g (momentum beta 0.95, Nesterov):
        m <- beta m + (1 - beta) g;   u = (1 - beta) g + beta m;   O = newton_schulz(u as (out, in k k))
        W <- (1 - lr' wd) W - lr' 0.2 sqrt(max(out, in k k)) O,   lr' = lr * lr_scale
    The factor 0.2 sqrt(max(rows, cols)) gives the update the RMS of an AdamW update (Moonshot AI,
    "Muon is scalable for LLM training", arXiv 2502.16982), so one learning rate serves both groups
    (times lr_scale). Matrices of one shape are orthogonalised together in one batched iteration."""

    def __init__(self, groups, lr, betas=(0.9, 0.99), eps=1e-8, momentum=0.95, ns_steps=5,
                 ns_dtype="fp32"):
        super().__init__(groups,
                         dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False,
                              lr_scale=1.0,
                                      momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                         "fp16": torch.float32}[ns_dtype]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self.muon_step(group, params)
            else:
                self.adamw_step(group, params)

    def muon_step(self, group, params):
        beta, lr = group["momentum"], group["lr"] * group["lr_scale"]
        by_shape = {}
        for p in params:
            st = self.state[p]
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p)
            st["momentum"].lerp_(p.grad, 1 - beta)                    # m <- beta m + (1 - beta) g
            u = p.grad.lerp(st["momentum"], beta)                  # Nesterov: (1 - beta) g + beta m
            by_shape.setdefault(tuple(p.shape), []).append((p, u.reshape(p.shape[0], -1)))
        for shape, items in by_shape.items():
            O = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"], self.ns_dtype)
            rows, cols = items[0][1].shape
            scale = 0.2 * math.sqrt(max(rows, cols))                  # the RMS of an AdamW update
            for (p, _), o in zip(items, O):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(o.reshape(shape).to(p.dtype), alpha=-lr * scale)

    def adamw_step(self, group, params):
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
            st["step"] += 1
            p.mul_(1 - lr * group["weight_decay"])                     # decoupled weight decay
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
            denom = (st["exp_avg_sq"] / bc2).sqrt_().add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)


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


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
