"""The attribute stage: which detector labels every training object [easy] or [hard] (held-out folds
of detdiff's own detector, or the user's perceptive model), the sidecar json it writes into the run
folder, a summary per category and per nuisance, and a picture. The rule itself, confidence > gamma
and IoU > beta, is perception.assign_attributes (docs/paper.md section 2).

    python -m perceptive attributes --data shapes --out runs/shapes   # attributes.json + summary + png
"""
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
from config import DataError, read_json
from perception import assign_attributes
from perceptive import detections, detector

logger = logging.getLogger(__name__)


def attribute_warning(hard_fraction, source):
    """None, or the warning for a degenerate attribute: with almost every object hard (or easy) the
    [easy]/[hard] token carries no signal (a from-scratch detector trained on a few dozen real COCO
    images calls nearly every object hard; docs/own_data.md)."""
    if hard_fraction > 0.9:
        return (f"warning: {100 * hard_fraction:.1f}% of the training objects are hard: the "
                f"detector ({source}) finds almost none of them, so [easy]/[hard] carries no "
                f"signal. Give a stronger detector (--detector torchvision:NAME --detector-weights "
                f"FILE, or a checkpoint / results json), more --attr-steps, or a lower --gamma / "
                f"--beta")
    if hard_fraction < 0.05:
        return (f"warning: only {100 * hard_fraction:.1f}% of the training objects are hard: the "
                f"detector ({source}) finds nearly all of them, so [hard] has too few examples to "
                f"learn. Use held-out folds (not a detector trained on these images), or a higher "
                f"--gamma / --beta")
    return None


@dataclass
class AttributeConfig:
    gamma: float = 0.4   # confidence threshold (strict >): our choice, the paper's value is unknown
    beta: float = 0.5             # IoU threshold (strict >): our choice, 0.5 is the natural one
    class_aware: bool = False  # the prediction must also have the object's class (stricter variant)
    folds: int = 2       # held-out folds: each fold is labelled by a detector trained on the others
    label_val: bool = True     # also label the val split (by fold 1's detector, which never saw it)
    image_size: int = 64          # detector resolution
    min_area: float = 0.02        # layout filtering as the generator's data set (objects it drops
                                  # get no label)
    max_objects: int = 8
    steps: int = 400              # detector optimizer steps per fold
    batch_size: int = 32
    seed: int = 0


def make_folds(n, k, seed=0):
    """Image indices 0..n-1 split into k folds of (almost) equal size by a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(perm[f::k]) for f in range(k)]


def _check_out(out, root):
    out, root = Path(out).resolve(), Path(root).resolve()
    if out == root or root in out.parents:
        raise DataError(f"{out}: the attribute sidecar goes to a run folder, not into the data "
                        f"folder {root}")
    return out


def make_attributes(root, out, cfg=AttributeConfig(), source=None, log=None, device="cpu",
                    dtype="fp32"):
    """Label every layout object of the train split (and val, cfg.label_val) of the COCO-format
    folder `root`.

    source=None (default): held-out folds. The training images are split into cfg.folds folds; for
    each fold a Detector (detector.py) is trained on the other folds and labels this one, so no
    object is judged by a detector that saw it (run on its own training images a detector finds
    nearly everything and the attribute carries no signal). Val is labelled by fold 1's detector. A
    given source (a Detector, TorchvisionDetector or ResultsFile: detections.py) labels all images
    instead. Writes OUT/attributes.json (the sidecar: per split {ann_id: easy|hard}, the settings,
    the detector, the summary) and OUT/attributes.png (training images, easy green, hard red);
    returns the summary. The fold detectors train on `device` with the forward under the autocast
    `dtype` (resolved: fp32 | bf16 | fp16) and label there; a given source labels on its own device.
    """
    log = log or logger.info
    out = _check_out(out, root)
    t0 = time.time()

    def dataset(split):
        return data.CocoLayoutDataset(root, split, size=cfg.image_size, min_area=cfg.min_area,
                                      max_objects=cfg.max_objects)

    def label(det, ds, indices):
        if isinstance(det, detections.ResultsFile):  # one file may hold both splits: each split
                                                     # reads its own images
            det = det.subset({r["image_id"] for r in ds.records})
        dets, attrs = detections.detect_dataset(det, ds, indices=indices), {}
        for i in indices:
            item, d = ds.load(i), dets[ds.records[i]["image_id"]]
            attrs.update(zip(item["ann_ids"].tolist(), assign_attributes(
                item["boxes"], item["labels"], d["boxes"], d["scores"], d["labels"], cfg.gamma,
                cfg.beta,
                cfg.class_aware)))
        return attrs

    ds = dataset("train")
    val = dataset("val") if cfg.label_val else None
    if isinstance(source, detections.ResultsFile):
        ids = {r["image_id"] for d in (ds, val) if d is not None for r in d.records}
        bad = [r["image_id"] for r in source.results if r["image_id"] not in ids]
        if bad:
            raise DataError(f"{source.path}: detections for image_id {bad[0]}, which the data set "
                            f"does not have")
    attrs, first = {"train": {}}, source
    folds = make_folds(len(ds), cfg.folds, cfg.seed) if source is None else [list(range(len(ds)))]
    for f, fold in enumerate(folds):
        det = source
        if source is None:
            rest = sorted(set(range(len(ds))) - set(fold))
            log(f"attributes: fold {f + 1}/{len(folds)}: training a detector on {len(rest)} "
                f"images, labelling {len(fold)}")
            det = detector.train(
                ds,
                cfg=detector.DetTrainConfig(
                    steps=cfg.steps,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed + f,
                    log_every=max(cfg.steps // 4, 1),
                ),
                indices=rest,
                log=log,
                device=device,
                dtype=dtype,
            )
            first = first or det
        attrs["train"].update(label(det, ds, fold))
    summary = {"train": summarise(attrs["train"], ds, root, "train")}
    warning = attribute_warning(summary["train"]["hard_fraction"], detections.describe(first))
    if warning:
        summary["train"]["warning"] = warning
    if val is not None:
        attrs["val"] = label(first, val, range(len(val)))
        summary["val"] = summarise(attrs["val"], val, root, "val")
    folds_used = cfg.folds if source is None else 0
    sidecar = dict(gamma=cfg.gamma, beta=cfg.beta, class_aware=cfg.class_aware, folds=folds_used,
                   detector=detections.describe(first) if source is not None
                   else f"{cfg.folds} folds x {detections.describe(first)}",
                   data=str(Path(root).resolve()), config=asdict(cfg),
                   seconds=round(time.time() - t0, 1),
                   summary=summary,
                   attributes={split: {str(k): v for k, v in sorted(a.items())} for split,
                               a in attrs.items()})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "attributes.json", "w") as fh:
        json.dump(sidecar, fh, indent=1)
    draw_attributes(ds, attrs["train"], range(min(24, len(ds)))).save(out / "attributes.png")
    how = f"{folds_used} folds" if folds_used else "the given detector, no folds"
    log(f"attributes: {len(attrs['train'])} training objects, "
        f"{100 * summary['train']['hard_fraction']:.1f}% hard (gamma {cfg.gamma}, beta {cfg.beta}, "
        f"{'class-aware, ' if cfg.class_aware else ''}{how}) in {time.time() - t0:.0f}s -> "
        f"{out / 'attributes.json'}")
    if summary["train"].get("warning"):
        log(summary["train"]["warning"])
    return summary


def summarise(attrs, dataset, root, split):
    """Hard fraction overall, per category, and per `nuisance` field when the annotations have one
    (shapes)."""
    ann = {a["id"]: a for a in read_json(data.split_paths(root, split)[0])["annotations"]}
    cats = dict(zip(dataset.category_ids, dataset.class_names))

    def frac(keys):
        keys = list(keys)
        return dict(n=len(keys), hard=sum(attrs[k] == "hard" for k in keys),
                    hard_fraction=round(sum(attrs[k] == "hard" for k in keys) / max(len(keys), 1),
                                        4))
    by_cat, by_nuisance = defaultdict(list), defaultdict(list)
    for k in attrs:
        by_cat[cats[ann[k]["category_id"]]].append(k)
        if "nuisance" in ann[k]:
            by_nuisance[ann[k]["nuisance"]].append(k)
    s = frac(attrs)
    s["per_category"] = {c: frac(by_cat[c]) for c in dataset.class_names if by_cat[c]}
    if by_nuisance:
        s["per_nuisance"] = {n: frac(v) for n, v in sorted(by_nuisance.items())}
        hard = [k for k in attrs if attrs[k] == "hard"]
        s["hard_with_nuisance"] = round(sum(ann[k].get("nuisance", "none") != "none" for k in hard)
                                        / max(len(hard), 1), 4)
    return s


def draw_attributes(dataset, attrs, indices, scale=4, ncol=6):
    """A grid of images with easy objects outlined green and hard ones red."""
    tiles = []
    for i in indices:
        it = dataset.load(i)
        difficulty = data.difficulty_codes(attrs, it["ann_ids"])
        tiles.append(data.draw_layout(it["image"], it["boxes"], it["labels"], dataset.class_names,
                                      difficulty, scale))
    return data.image_grid(tiles, ncol=ncol)
