"""Trainability (docs/paper.md section 4): does generated data help a detector? Detectors trained on
real training images alone and with N generated images (new layouts drawn from the same real images:
origin, all [easy], all [hard], mixed, all [hard] through the class filter, and as many all-[hard]
images drawn at random, the filter's control), scored on the real val split over several detector
seeds: evaluate.py's `trainability` part. Two protocols (--protocol):

  paper     the paper's: the real images are the whole training split, N is its size times each of
            --gen-fractions (1 and 0.5). The generator saw the whole split too, so the generated
            images carry nothing the baseline lacks.
  low_data  a generator trained on a subset only (`python detdiff.py --train-subset 0.1`): the real
            images are exactly the ones the checkpoint recorded (train_image_ids), the layouts are
            drawn from them alone, N is the subset's size times each fraction. A generator trained on
            the whole split is refused: through it the "low-data" detectors would learn from every
            real image.

    python -m experiments.evaluate --run runs/shapes --parts trainability
    python -m experiments.evaluate --run runs/subset --parts trainability --protocol low_data
"""
import torch
from tqdm import tqdm

import config
import data
import sample
from perceptive import coco_map, detector

PROTOCOLS = ("paper", "low_data")
GEN_MODES = sample.MODES + ("mixed",)   # the generated sets (and, from hard, the class-filtered one)


def real_positions(ck, protocol, real_train, where):
    """The protocol's real training images, as positions in the run's train split `real_train` (a
    data.CocoLayoutDataset in split order): all of them for "paper"; for "low_data" the ones the
    generator trained on (ck["train_image_ids"]), or a DataError naming `where` (the checkpoint) when
    it trained on the whole split or an image it recorded is not in the split."""
    if protocol == "paper":
        return list(range(len(real_train)))
    check_protocol(ck, protocol, where)
    pos = {int(rec["image_id"]): i for i, rec in enumerate(real_train.records)}
    missing = [i for i in ck["train_image_ids"] if i not in pos]
    if missing:
        raise config.DataError(f"{where}: {len(missing)} of the images the generator trained on "
                               f"(train_image_ids) are not in the training split (was the data set "
                               f"changed?)")
    return sorted(pos[i] for i in ck["train_image_ids"])


def check_protocol(ck, protocol, where):
    """A one-line DataError naming `where` (the checkpoint) when `protocol` (checked against PROTOCOLS
    with the other settings, evaluate.check_settings) cannot be run on it: low_data with a generator
    that trained on the whole training split, recorded no ids, or decodes through an autoencoder."""
    if protocol != "low_data":
        return
    if ck["train_cfg"].get("train_subset", 1.0) >= 1:
        raise config.DataError(f"{where}: --protocol low_data needs a generator trained on a subset "
                               f"of the training split, this one saw all of it (its images would "
                               f"leak every real image into the low-data detectors); make such a "
                               f"run with `python detdiff.py --train-subset 0.1 ...`")
    if not ck.get("train_image_ids"):
        raise config.DataError(f"{where}: --protocol low_data needs the ids of the images the "
                               f"generator trained on, and this checkpoint recorded none")
    if ck.get("autoencoder"):            # latent mode: its decoder learned from the whole split
        raise config.DataError(f"{where}: --protocol low_data takes a pixel-space generator; this "
                               f"one decodes through an autoencoder trained on the whole training "
                               f"split")


def training_layouts(ck, n, seed, among=None):
    """n new layouts from the training distribution: training images' layouts (with their
    attributes), drawn at random from the images at positions `among` of the train split (default:
    all of them) and mirrored left-right half of the time."""
    pool = sample.split_layouts(ck, 10 ** 9, split="train")
    pool = pool if among is None else [pool[i] for i in among]
    g = torch.Generator().manual_seed(seed)
    pick, flip = torch.randint(len(pool), (n,), generator=g), torch.rand(n, generator=g) < 0.5
    out = []
    for i, f in zip(pick.tolist(), flip.tolist()):
        lay = dict(pool[i])
        if f:
            lay["boxes"] = data.flip_boxes(lay["boxes"])
        out.append(lay)
    return out


def random_subset(n, k, seed):
    """k of the positions 0..n-1, drawn at random without repeats (seeded) and sorted: the class
    filter's control, as many images as the filter kept but chosen without looking at them."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def mixed_difficulty(layouts, seed, p_hard=0.5):
    """The "mixed" set's attributes: each object [hard] with probability p_hard, else [easy], drawn
    in order from a generator seeded with `seed` (the same layouts and seed, the same draw)."""
    g, easy, hard = torch.Generator().manual_seed(seed), data.DIFFICULTY.index("easy"), \
        data.DIFFICULTY.index("hard")
    out = []
    for lay in layouts:
        draw = torch.rand(len(lay["labels"]), generator=g) < p_hard
        out.append(dict(lay, difficulty=torch.where(draw, hard, easy).to(lay["labels"].dtype)))
    return out


def with_mode(layouts, mode, seed):
    """The layouts with a generated set's attributes: sample.with_difficulty's modes, or mixed."""
    return mixed_difficulty(layouts, seed) if mode == "mixed" else sample.with_difficulty(layouts, mode)


def trainability(steps, det_cfg, real_train, real_val, extra, cfg, log, device="cpu", dtype="fp32"):
    """AP of detectors trained `steps` steps on the real images `real_train` alone ("real") and with
    each extra set (row name -> dataset of generated images), `cfg.seeds` seeds; the seed sets the
    detector's initialisation and batches, the images stay the protocol's. The detectors train on
    `device` with the forward under the autocast `dtype` (resolved: fp32 | bf16 | fp16).
    Returns {row: [dict(mAP, AP50, AP75) per seed]}."""
    runs = {name: [] for name in ("real",) + tuple(extra)}
    bar = tqdm(total=cfg.seeds * len(runs), desc="trainability detectors")
    for seed in range(cfg.seeds):
        for name in runs:
            ds = real_train if name == "real" else \
                torch.utils.data.ConcatDataset([real_train, extra[name]])
            det = detector.train(ds, det_cfg,
                                 detector.DetTrainConfig(steps=steps, seed=seed, log_every=0),
                                 device=device, dtype=dtype)
            r = coco_map.evaluate(det, real_val)
            runs[name].append({m: round(r[m], 4) for m in ("mAP", "AP50", "AP75")})
            log(f"[trainability] seed {seed} {name}: {len(ds)} images, val AP50 {r['AP50']:.3f}")
            bar.update(1)
    bar.close()
    return runs
