"""Trainability (docs/paper.md section 4): does generated data help a detector? Detectors trained on a
small real subset, alone and with generated images (new layouts from the training distribution,
origin / all easy / all hard), scored on the real val split over several seeds: evaluate.py's
`trainability` part.

    python -m experiments.evaluate --run runs/shapes --parts trainability
"""
import torch
from tqdm import tqdm

import data
import sample
from perceptive import coco_map, detector


def training_layouts(ck, n, seed):
    """n new layouts from the training distribution: training images' layouts (with their
    attributes), drawn at random and mirrored left-right half of the time."""
    pool = sample.split_layouts(ck, 10 ** 9, split="train")
    g = torch.Generator().manual_seed(seed)
    pick, flip = torch.randint(len(pool), (n,), generator=g), torch.rand(n, generator=g) < 0.5
    out = []
    for i, f in zip(pick.tolist(), flip.tolist()):
        lay = dict(pool[i])
        if f:
            lay["boxes"] = data.flip_boxes(lay["boxes"])
        out.append(lay)
    return out


def trainability(steps, det_cfg, real_train, real_val, extra, cfg, log, device="cpu", dtype="fp32"):
    """AP of detectors trained `steps` steps on a real subset alone and with each extra set (name ->
    dataset), `cfg.seeds` seeds; the subset and the initialisation follow the seed. The detectors
    train on `device` with the forward under the autocast `dtype` (resolved: fp32 | bf16 | fp16).
    Returns {name: [dict(mAP, AP50, AP75) per seed]}."""
    k = max(1, round(cfg.real_fraction * len(real_train)))
    runs = {name: [] for name in ("real",) + tuple(extra)}
    bar = tqdm(total=cfg.seeds * len(runs), desc="trainability detectors")
    for seed in range(cfg.seeds):
        subset = torch.utils.data.Subset(
            real_train,
            torch.randperm(len(real_train), generator=torch.Generator().manual_seed(seed))[:k],
        )
        for name in runs:
            ds = subset if name == "real" else torch.utils.data.ConcatDataset([subset, extra[name]])
            det = detector.train(ds, det_cfg,
                                 detector.DetTrainConfig(steps=steps, seed=seed, log_every=0),
                                 device=device, dtype=dtype)
            r = coco_map.evaluate(det, real_val)
            runs[name].append({m: round(r[m], 4) for m in ("mAP", "AP50", "AP75")})
            log(f"[trainability] seed {seed} {name}: {len(ds)} images, val AP50 {r['AP50']:.3f}")
            bar.update(1)
    bar.close()
    return runs
