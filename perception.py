"""DetDiffusion's two contributions (PAPER.md sections 2 and 3): the perception-aware attribute and the perception
loss, the two ways the perceptive model and the generator are coupled.

  1. attributes: `assign_attributes` (PAPER.md section 2 steps 1-2: confidence > gamma, IoU > beta -> [easy], else
                 [hard]), `make_attributes` (held-out folds of detdiff's own detector, or the user's perceptive
                 model; a sidecar json in the run folder, a summary and a picture), `load_attributes`,
                 `attribute_warning` (a degenerate attribute, almost all hard or all easy)
  2. perception loss: `MaskHead` (FPN-like head on the UNet's decoder features, one query per layout object),
                 `mask_bce` (L_m), `mask_dice` (L_d), `perception_loss` (L_p = sqrt(alpha_bar_t) (L_m + L_d))

The perceptive model itself is in detector.py (detdiff's CenterNet-style detector), detections.py (any detector
behind one `predict` interface: torchvision's, a COCO results json) and coco_map.py (its mAP).

Commands (`python perception.py --help`):
  python perception.py train --data shapes --out runs/detector      # ~2-3 min on 2 cores, prints val mAP
  python perception.py eval --detector runs/detector/detector.pt --data shapes
  python perception.py eval --results my_dets.json --data DIR       # any detector's COCO results json
  python perception.py eval --torchvision fasterrcnn_resnet50_fpn --weights FILE --data coco_subset
  python perception.py attributes --data shapes --out runs/shapes   # attributes.json + summary + png
Each command takes --device (auto: CUDA, then Apple MPS, then the CPU) and prints the device it uses; train and
attributes take --dtype, the training's autocast (auto: bf16 where the hardware computes in it, else fp32).
Detections are always made in fp32, so an mAP or an attribute does not move with the training dtype.
"""
import argparse
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import coco
import coco_map
import config
import data
import detections
import detector
import figures

logger = logging.getLogger("detdiff.perception")


# ----------------------------------------------------------------------------------------------
# 1. Perception-aware attribute (PAPER.md section 2).

def attribute_warning(hard_fraction, source):
    """None, or the warning for a degenerate attribute: with almost every object hard (or easy) the [easy]/[hard]
    token carries no signal (measured: a from-scratch detector on 61 real COCO images called 99.2% hard)."""
    if hard_fraction > 0.9:
        return (f"warning: {100 * hard_fraction:.1f}% of the training objects are hard: the detector ({source}) "
                f"finds almost none of them, so [easy]/[hard] carries no signal. Give a stronger detector "
                f"(--detector torchvision:NAME --detector-weights FILE, or a checkpoint / results json), more "
                f"--attr-steps, or a lower --gamma / --beta")
    if hard_fraction < 0.05:
        return (f"warning: only {100 * hard_fraction:.1f}% of the training objects are hard: the detector "
                f"({source}) finds nearly all of them, so [hard] has too few examples to learn. Use held-out folds "
                f"(not a detector trained on these images), or a higher --gamma / --beta")
    return None


@dataclass
class AttributeConfig:
    gamma: float = 0.4            # confidence threshold (strict >): our choice, the paper's value is unknown
    beta: float = 0.5             # IoU threshold (strict >): our choice, 0.5 is the natural one
    class_aware: bool = False     # the prediction must also have the object's class (stricter variant)
    folds: int = 2                # held-out folds: each fold is labelled by a detector trained on the others
    label_val: bool = True        # also label the val split (by fold 1's detector, which never saw it)
    image_size: int = 64          # detector resolution
    min_area: float = 0.02        # layout filtering as the generator's data set (objects it drops get no label)
    max_objects: int = 8
    steps: int = 400              # detector optimizer steps per fold
    batch_size: int = 32
    seed: int = 0


def assign_attributes(gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels, gamma=0.4, beta=0.5,
                      class_aware=False):
    """PAPER.md section 2: keep predictions with confidence > gamma (step 1); a ground-truth object is 'easy'
    if some kept prediction has IoU > beta with it (and, class-aware, the same class), else 'hard' (step 2).
    Boxes xyxy in any one frame. Returns a list of 'easy' / 'hard', one per ground-truth object."""
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4)
    pred_boxes = torch.as_tensor(pred_boxes, dtype=torch.float64).reshape(-1, 4)
    keep = torch.as_tensor(pred_scores, dtype=torch.float64).reshape(-1) > gamma           # step 1
    iou = torchvision.ops.box_iou(gt_boxes, pred_boxes[keep])                               # (N, P)
    if class_aware:
        same = torch.as_tensor(gt_labels).reshape(-1, 1) == torch.as_tensor(pred_labels).reshape(1, -1)[:, keep]
        iou = torch.where(same, iou, torch.zeros_like(iou))
    easy = (iou > beta).any(1)                                                              # step 2
    return ["easy" if e else "hard" for e in easy.tolist()]


def make_folds(n, k, seed=0):
    """Image indices 0..n-1 split into k folds of (almost) equal size by a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(perm[f::k]) for f in range(k)]


def _check_out(out, root):
    out, root = Path(out).resolve(), Path(root).resolve()
    if out == root or root in out.parents:
        raise coco.DataError(f"{out}: the attribute sidecar goes to a run folder, not into the data folder {root}")
    return out


def make_attributes(root, out, cfg=AttributeConfig(), source=None, log=None, device="cpu", dtype="fp32"):
    """Label every layout object of the train split (and val, cfg.label_val) of the COCO-format folder `root`.

    source=None (default): held-out folds. The training images are split into cfg.folds folds; for each fold a
    Detector (detector.py) is trained on the other folds and labels this one, so no object is judged by a detector
    that saw it (run on its own training images a detector finds nearly everything and the attribute carries no
    signal). Val is labelled by fold 1's detector. A given source (a Detector, TorchvisionDetector or ResultsFile:
    detections.py) labels all images instead. Writes OUT/attributes.json (the sidecar: per split {ann_id:
    easy|hard}, the settings, the detector, the summary) and OUT/attributes.png (training images, easy green, hard
    red); returns the summary. The fold detectors train on `device` with the forward under the autocast `dtype`
    (resolved: fp32 | bf16 | fp16) and label there; a given source labels on its own device.
    """
    log = log or logger.info
    out = _check_out(out, root)
    t0 = time.time()

    def dataset(split):
        return data.CocoLayoutDataset(root, split, size=cfg.image_size, min_area=cfg.min_area,
                                      max_objects=cfg.max_objects)

    def label(det, ds, indices):
        if isinstance(det, detections.ResultsFile):  # one file may hold both splits: each split reads its own images
            det = det.subset({r["image_id"] for r in ds.records})
        dets, attrs = detections.detect_dataset(det, ds, indices=indices), {}
        for i in indices:
            item, d = ds.load(i), dets[ds.records[i]["image_id"]]
            attrs.update(zip(item["ann_ids"].tolist(), assign_attributes(
                item["boxes"], item["labels"], d["boxes"], d["scores"], d["labels"], cfg.gamma, cfg.beta,
                cfg.class_aware)))
        return attrs

    ds = dataset("train")
    val = dataset("val") if cfg.label_val else None
    if isinstance(source, detections.ResultsFile):
        ids = {r["image_id"] for d in (ds, val) if d is not None for r in d.records}
        bad = [r["image_id"] for r in source.results if r["image_id"] not in ids]
        if bad:
            raise coco.DataError(f"{source.path}: detections for image_id {bad[0]}, which the data set does not have")
    attrs, first = {"train": {}}, source
    folds = make_folds(len(ds), cfg.folds, cfg.seed) if source is None else [list(range(len(ds)))]
    for f, fold in enumerate(folds):
        det = source
        if source is None:
            rest = sorted(set(range(len(ds))) - set(fold))
            log(f"attributes: fold {f + 1}/{len(folds)}: training a detector on {len(rest)} images, "
                f"labelling {len(fold)}")
            det = detector.train(ds, cfg=detector.DetTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size,
                                                                 seed=cfg.seed + f, log_every=max(cfg.steps // 4, 1)),
                                 indices=rest, log=log, device=device, dtype=dtype)
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
                   data=str(Path(root).resolve()), config=asdict(cfg), seconds=round(time.time() - t0, 1),
                   summary=summary,
                   attributes={split: {str(k): v for k, v in sorted(a.items())} for split, a in attrs.items()})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "attributes.json", "w") as fh:
        json.dump(sidecar, fh, indent=1)
    draw_attributes(ds, attrs["train"], range(min(24, len(ds)))).save(out / "attributes.png")
    how = f"{folds_used} folds" if folds_used else "the given detector, no folds"
    log(f"attributes: {len(attrs['train'])} training objects, {100 * summary['train']['hard_fraction']:.1f}% hard "
        f"(gamma {cfg.gamma}, beta {cfg.beta}, {'class-aware, ' if cfg.class_aware else ''}{how}) "
        f"in {time.time() - t0:.0f}s -> {out / 'attributes.json'}")
    if summary["train"].get("warning"):
        log(summary["train"]["warning"])
    return summary


def summarise(attrs, dataset, root, split):
    """Hard fraction overall, per category, and per `nuisance` field when the annotations have one (shapes)."""
    ann = {a["id"]: a for a in coco.read_json(coco.split_paths(root, split)[0])["annotations"]}
    cats = dict(zip(dataset.category_ids, dataset.class_names))

    def frac(keys):
        keys = list(keys)
        return dict(n=len(keys), hard=sum(attrs[k] == "hard" for k in keys),
                    hard_fraction=round(sum(attrs[k] == "hard" for k in keys) / max(len(keys), 1), 4))
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


def load_attributes(path, split="train"):
    """{ann_id: 'easy' | 'hard'} of one split from a sidecar, for data.CocoLayoutDataset(attributes=...)."""
    side = coco.read_json(path)
    if not isinstance(side, dict) or not isinstance(side.get("attributes"), dict):
        raise coco.DataError(f"{path}: not an attribute sidecar (no 'attributes' object)")
    if split not in side["attributes"]:
        raise coco.DataError(f"{path}: no attributes for split {split!r} (it has {sorted(side['attributes'])})")
    return {int(k): v for k, v in side["attributes"][split].items()}


def attributes_path(cfg, out):
    """The attribute sidecar a generator run (TrainConfig) reads: None for "none"; for "auto" the run folder's
    attributes.json when the attributes stage wrote one; otherwise the given path, which must exist."""
    if cfg.attributes == "none":
        return None
    if cfg.attributes == "auto":
        p = Path(out) / "attributes.json"
        return p.resolve() if p.is_file() else None
    if not Path(cfg.attributes).is_file():
        raise config.DataError(f"{cfg.attributes}: attribute sidecar not found (--attributes auto|none|PATH)")
    return Path(cfg.attributes).resolve()


def draw_attributes(dataset, attrs, indices, scale=4, ncol=6):
    """A grid of images with easy objects outlined green and hard ones red."""
    tiles = []
    for i in indices:
        it = dataset.load(i)
        difficulty = [data.DIFFICULTY.index(attrs.get(int(a), "none")) for a in it["ann_ids"]]
        tiles.append(figures.draw_layout(it["image"], it["boxes"], it["labels"], dataset.class_names, difficulty, scale))
    return figures.image_grid(tiles, ncol=ncol)


# ----------------------------------------------------------------------------------------------
# 2. The perception-aware loss (PAPER.md section 3): an FPN-like mask head on the UNet's decoder
#    features and L_p = sqrt(alpha_bar_t) * (L_m + L_d), added to L_simple with weight lambda.

class MaskHead(nn.Module):
    """FPN-like segmentation head over the UNet's decoder features (DatasetDM-style fusion).

    features (coarse to fine) -> 1x1 lateral convs to `dim` channels -> top-down: upsample x2 and add
    -> 3x3 conv -> per-pixel embeddings P (B, dim, H, W) at the finest resolution.
    Each layout object brings its own query q_i = MLP(object embedding from the layout encoder), so object i's
    mask logits are <q_i, P(x, y)> / sqrt(dim): no Hungarian matching is needed (PAPER.md section 5).
    """

    def __init__(self, feature_channels, obj_dim, dim=32):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in feature_channels])
        self.smooth = nn.Sequential(nn.GroupNorm(8 if dim % 8 == 0 else 1, dim), nn.SiLU(),
                                    nn.Conv2d(dim, dim, 3, padding=1))
        self.query = nn.Sequential(nn.Linear(obj_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, features, objects):
        """features: list of (B, C_l, H_l, W_l), coarse to fine; objects (B, M, D) -> mask logits (B, M, H, W)."""
        p = self.lateral[0](features[0])
        for lat, f in zip(self.lateral[1:], features[1:]):
            p = F.interpolate(p, size=f.shape[-2:], mode="nearest") + lat(f)  # top-down merge
        p = self.smooth(p)                                                        # (B, E, H, W)
        q = self.query(objects)                                                   # (B, M, E)
        return torch.einsum("bme,behw->bmhw", q, p) / math.sqrt(self.dim)


def mask_bce(logits, target):
    """L_m: binary cross-entropy per object, averaged over its pixels. (B, M, H, W) -> (B, M)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-2, -1))


def mask_dice(logits, target, smooth=1.0):
    """L_d: Dice loss per object, 1 - (2 sum(p t) + s) / (sum p + sum t + s), p = sigmoid(logits). -> (B, M)."""
    p = logits.sigmoid()
    inter = (p * target).sum((-2, -1))
    return 1 - (2 * inter + smooth) / (p.sum((-2, -1)) + target.sum((-2, -1)) + smooth)


def perception_loss(logits, masks, valid, alpha_bar_t):
    """L_p = sqrt(alpha_bar_t) * (L_m + L_d) per sample (DetDiffusion, PAPER.md section 3).

    logits (B, M, h, w); masks (B, M, S, S) instance masks in {0, 1} (filled boxes where a data set has none),
    area-resized to the head's h x w as soft targets; valid (B, M) marks real objects (padding contributes
    nothing); alpha_bar_t (B,). Returns (B,): the mean over each sample's real objects (0 with none).
    """
    target = F.adaptive_avg_pool2d(masks, logits.shape[-2:]) if masks.shape[-2:] != logits.shape[-2:] else masks
    logits = logits.float()
    per_obj = mask_bce(logits, target) + mask_dice(logits, target)                # L_m + L_d, (B, M)
    v = valid.float()
    per_sample = (per_obj * v).sum(1) / v.sum(1).clamp(min=1)                     # mean over real objects
    return alpha_bar_t.float().sqrt() * per_sample                                # timestep weight sqrt(alpha_bar_t)


# ----------------------------------------------------------------------------------------------
# Commands

def _source(a, dataset, device):
    spec = a.results or (f"torchvision:{a.torchvision}" if a.torchvision else a.detector)
    return detections.open_source(spec, dataset.class_names, a.weights, a.detector_classes, dataset.category_ids,
                                  device)


def _device_flags(p, dtype=True):
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=config.DTYPES,
                       help="the training's autocast; auto: bf16 where the hardware computes in it, else fp32")


def main(argv=None):
    ap = argparse.ArgumentParser(description="detdiff's perceptive model: detector, COCO mAP, P.A. attributes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the detector from scratch and report val mAP")
    t.add_argument("--data", default="shapes")
    t.add_argument("--out", default="runs/detector", help="run folder (detector.pt is written there)")
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--width", type=int, default=32)
    config.add_flags(t, detector.DetTrainConfig)
    _device_flags(t)
    e = sub.add_parser("eval", help="COCO mAP / AP50 / AP75 of a detection source on a split")
    e.add_argument("--data", default="shapes")
    e.add_argument("--split", default="val")
    e.add_argument("--image-size", type=int, default=64)
    for p in (e,):
        p.add_argument("--detector", default="runs/detector/detector.pt", help="a detdiff detector checkpoint")
        p.add_argument("--results", help="a COCO results json from any detector (used instead of --detector)")
        p.add_argument("--torchvision", help="a torchvision COCO detector name (used instead of --detector)")
        p.add_argument("--weights", help="local weights file for --torchvision (never downloaded)")
        p.add_argument("--detector-classes", default="", help="data-set class=detector class,... where the "
                       "names differ (every data-set class must map to one of the detector's)")
    _device_flags(e, dtype=False)                 # nothing trains; detections are made in fp32
    at = sub.add_parser("attributes", help="perception-aware attributes of a split (held-out folds by default)")
    at.add_argument("--data", default="shapes")
    at.add_argument("--out", default="runs/shapes", help="run folder for attributes.json / .png (not the data)")
    at.add_argument("--detector", help="label with this detector checkpoint instead of held-out folds")
    at.add_argument("--results", help="label with a COCO results json instead of held-out folds")
    at.add_argument("--torchvision", help="label with a torchvision COCO detector instead of held-out folds")
    at.add_argument("--weights", help="local weights file for --torchvision")
    at.add_argument("--detector-classes", default="", help="data-set class=detector class,... where names differ")
    config.add_flags(at, AttributeConfig)
    _device_flags(at)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device, why = config.resolve_device(a.device)
        if a.cmd == "eval":                       # nothing trains: detections are made in fp32
            print(f"device {device} ({why})")
        else:
            dtype, dtype_why = config.resolve_dtype(a.dtype, device)
            print(f"device {device} ({why}), dtype {dtype} ({dtype_why})")
        root = data.resolve_data(a.data)
        if a.cmd == "train":
            tr = data.CocoLayoutDataset(root, "train", size=a.image_size)
            va = data.CocoLayoutDataset(root, "val", size=a.image_size)
            cfg = config.pick(a, detector.DetTrainConfig)
            t0 = time.time()
            model = detector.train(tr, detector.DetectorConfig(len(tr.class_names), tuple(tr.class_names), a.image_size,
                                                               a.width), cfg, device=device, dtype=dtype)
            secs = time.time() - t0
            detector.save_detector(model, Path(a.out) / "detector.pt")
            r = coco_map.evaluate(model, va, crowd_json=coco.split_paths(root, "val")[0])
            print(f"trained in {secs:.0f}s; val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 {r['AP75']:.3f} "
                  f"-> {Path(a.out) / 'detector.pt'}")
        elif a.cmd == "eval":
            ds = data.CocoLayoutDataset(root, a.split, size=a.image_size)
            r = coco_map.evaluate(_source(a, ds, device), ds, crowd_json=coco.split_paths(root, a.split)[0])
            print(f"{a.data}/{a.split}: mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 {r['AP75']:.3f}; per category "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["per_category"].items()))
        else:
            cfg = config.pick(a, AttributeConfig)
            source = None
            if a.detector or a.results or a.torchvision:
                probe = data.CocoLayoutDataset(root, "train", size=cfg.image_size, check_files=False)
                source = _source(a, probe, device)
            s = make_attributes(root, a.out, cfg, source, device=device, dtype=dtype)
            print(json.dumps(s, indent=1))
    except coco.DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
