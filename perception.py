"""DetDiffusion's perceptive model: a small detector, COCO mAP, and the perception-aware attribute.

PAPER.md section 2 (P.A. Attr: a detector decides which ground-truth objects are [easy] and which [hard]) and
section 4 (the "YOLO score": a detector trained on real images measures generated ones with mAP / AP50 / AP75).

  1. detector:   `Detector`, a CenterNet-style one-stage detector (Zhou et al. 2019, "Objects as Points"):
                 per-class centre heatmap + box size + centre offset at stride 4, trained from scratch
                 (`train`), decoded without NMS (`predict`), saved with its config (`save_detector`/`load_detector`)
  2. sources:    the same `predict` interface for torchvision's COCO detectors (weights read from a local file,
                 never downloaded) and for a COCO results json made by any other detector (`ResultsFile`)
  3. mAP:        `coco_map`, COCO's box mAP written here (checked against pycocotools in the tests), and
                 `evaluate(source, dataset)` -> mAP, AP50, AP75
  4. attributes: `assign_attributes` (PAPER.md section 2 steps 1-2), `make_attributes` (held-out folds, a
                 sidecar json in the run folder, a summary and a picture), `load_attributes`
  5. perception loss: `MaskHead` (FPN-like head on the UNet's decoder features, one query per layout object),
                 `mask_bce` (L_m), `mask_dice` (L_d), `perception_loss` (L_p = sqrt(alpha_bar_t) (L_m + L_d))

Boxes: `predict` returns boxes as normalised xyxy in [0, 1] (fractions of the image side, as data.py's layouts);
labels are the data set's contiguous class indices 0..C-1. COCO files (results json, `coco_map`) use pixels xywh.

Commands (`python perception.py --help`):
  python perception.py train --data shapes --out runs/detector      # ~2-3 min on 2 cores, prints val mAP
  python perception.py eval --detector runs/detector/detector.pt --data shapes
  python perception.py eval --results my_dets.json --data DIR       # any detector's COCO results json
  python perception.py eval --torchvision fasterrcnn_resnet50_fpn --weights FILE --data coco_subset
  python perception.py attributes --data shapes --out runs/shapes   # attributes.json + summary + png
"""
import argparse
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data

logger = logging.getLogger("detdiff.perception")


# ----------------------------------------------------------------------------------------------
# 1. The detector: CenterNet-style, one stride-4 feature map, three heads.
#    heatmap Y_hat (B, C, S/4, S/4) of object centres per class, size (w, h) and centre offset at the peak.

@dataclass
class DetectorConfig:
    num_classes: int = 5
    class_names: tuple = ()
    image_size: int = 64          # inputs are resized to this side (train and predict)
    width: int = 32               # channels of the stride-4 trunk
    dilations: tuple = (1, 2, 4, 1)  # one residual block per entry (dilation widens the receptive field)


@dataclass
class DetTrainConfig:
    steps: int = 1000             # optimizer steps
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    hflip: bool = True            # random horizontal flip (labels stay valid for any data set)
    size_weight: float = 0.1      # lambda_size of CenterNet Eq. (3)
    offset_weight: float = 1.0    # lambda_off of CenterNet Eq. (3)
    seed: int = 0
    log_every: int = 100


def conv_bn(cin, cout, stride=1, dilation=1, relu=True):
    layers = [nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, c, dilation):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, 1, dilation), conv_bn(c, c, 1, dilation, relu=False))

    def forward(self, x):
        return F.relu(x + self.body(x))


class Detector(nn.Module):
    stride = 4

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg, w = cfg, cfg.width
        self.stem = nn.Sequential(conv_bn(3, w // 4, 2), conv_bn(w // 4, w // 2), conv_bn(w // 2, w, 2))
        self.trunk = nn.Sequential(*[ResBlock(w, d) for d in cfg.dilations])

        def head(cout):
            return nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(w, cout, 1))
        self.heatmap, self.size, self.offset = head(cfg.num_classes), head(2), head(2)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))  # prior 0.1 (CenterNet's -2.19)

    def forward(self, x):
        """x (B, 3, S, S) in [-1, 1] -> heatmap logits (B, C, S/4, S/4), size (B, 2, ..), offset (B, 2, ..)."""
        f = self.trunk(self.stem(x))
        return self.heatmap(f), self.size(f), self.offset(f)

    @torch.no_grad()
    def predict(self, images, score_threshold=0.01, max_dets=100):
        """images (B, 3, H, W) in [-1, 1] -> list of dict(boxes (n, 4) normalised xyxy, scores (n,), labels (n,))."""
        was_training = self.training
        self.eval()
        S = self.cfg.image_size
        x = images.float()
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        logits, size, offset = self(x)
        self.train(was_training)
        B, C, G, _ = logits.shape
        heat = logits.sigmoid()
        heat = heat * (heat == F.max_pool2d(heat, 3, 1, 1))       # peaks: a 3x3 max-pool replaces NMS
        scores, idx = heat.view(B, -1).topk(min(max_dets, C * G * G))
        labels, cell = idx // (G * G), idx % (G * G)
        cy, cx = (cell // G).float(), (cell % G).float()
        b = torch.arange(B)[:, None]
        off = offset.view(B, 2, -1)[b, :, cell]                   # (B, K, 2)
        wh = size.view(B, 2, -1)[b, :, cell].clamp(min=0)          # (B, K, 2) in grid cells
        px, py = cx + off[..., 0], cy + off[..., 1]                # centre in grid cells
        boxes = torch.stack([px - wh[..., 0] / 2, py - wh[..., 1] / 2, px + wh[..., 0] / 2, py + wh[..., 1] / 2], -1)
        boxes = (boxes / G).clamp(0, 1)                            # (B, K, 4) normalised xyxy
        out = []
        for i in range(B):
            k = scores[i] > score_threshold
            out.append(dict(boxes=boxes[i][k], scores=scores[i][k], labels=labels[i][k]))
        return out


def centernet_targets(boxes, labels, valid, num_classes, G):
    """Ground truth of CenterNet at grid G: heatmap Y (B, C, G, G) and, per object, (b, cx, cy, wh, offset).

    Centre p = box centre in grid cells, p~ = floor(p); Y = exp(-(x - p~x)^2 / 2 sx^2 - (y - p~y)^2 / 2 sy^2),
    max over the objects of a class (CenterNet Sec. 3). The Gaussian is elliptical, s = 0.54 w / 6, as TTFNet
    (Liu et al. 2020) does, so thin boxes get thin peaks; floored at 0.3 cells.
    """
    B = boxes.shape[0]
    b, m = valid.nonzero(as_tuple=True)
    bx = boxes[b, m] * G                                           # (N, 4) in grid cells
    c = labels[b, m]
    wh = bx[:, 2:] - bx[:, :2]
    p = (bx[:, :2] + bx[:, 2:]) / 2
    p_int = p.floor().clamp(0, G - 1)
    sigma = (0.54 * wh / 6).clamp(min=0.3)
    ar = torch.arange(G, dtype=torch.float32)
    gx = torch.exp(-(ar[None] - p_int[:, :1]) ** 2 / (2 * sigma[:, :1] ** 2))   # (N, G)
    gy = torch.exp(-(ar[None] - p_int[:, 1:]) ** 2 / (2 * sigma[:, 1:] ** 2))   # (N, G)
    gauss = gy[:, :, None] * gx[:, None, :]                                     # (N, G, G)
    heat = torch.zeros(B * num_classes, G * G)
    index = (b * num_classes + c)[:, None].expand(-1, G * G)
    heat.scatter_reduce_(0, index, gauss.view(-1, G * G), "amax")           # overlapping peaks: the max
    return heat.view(B, num_classes, G, G), b, p_int.long(), wh, p - p_int


def focal_loss(logits, target):
    """CenterNet Eq. (1): penalty-reduced pixel-wise focal loss, alpha = 2, beta = 4, divided by N objects."""
    pos = target.eq(1).float()
    p = logits.sigmoid()
    pos_loss = -F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = -F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def detector_loss(model, batch, cfg: DetTrainConfig):
    """L_det = L_k + lambda_size L_size + lambda_off L_off (CenterNet Eq. (3)); L1 at the centre cells."""
    logits, size, offset = model(batch["image"])
    G = logits.shape[-1]
    heat, b, cell, wh, off = centernet_targets(batch["boxes"], batch["labels"], batch["valid"], logits.shape[1], G)
    l_k = focal_loss(logits, heat)
    n = max(len(b), 1)
    l_size = F.l1_loss(size[b, :, cell[:, 1], cell[:, 0]], wh, reduction="sum") / n      # Eq. (2)-style L1
    l_off = F.l1_loss(offset[b, :, cell[:, 1], cell[:, 0]], off, reduction="sum") / n    # CenterNet Eq. (2)
    return l_k + cfg.size_weight * l_size + cfg.offset_weight * l_off, dict(heat=l_k.item(), size=l_size.item(),
                                                                           offset=l_off.item())


def _batches(dataset, batch_size, indices=None, shuffle=True, seed=0, drop_last=True):
    """data.collate batches of `dataset` (or of its images `indices`); works for any data.py-style dataset."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.SubsetRandomSampler(indices, generator=g) if shuffle else indices
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=data.collate,
                                       drop_last=drop_last and len(indices) >= batch_size)


def train(dataset, model_cfg=None, cfg=DetTrainConfig(), indices=None, log=None):
    """Train a Detector from scratch on `dataset` (data.py items; optionally only the images `indices`).

    model_cfg defaults to DetectorConfig with the data set's classes at the data set's resolution.
    Returns the model (in eval mode). Batches are resized to model_cfg.image_size when they differ.
    """
    log = log or logger.info
    torch.manual_seed(cfg.seed)
    if model_cfg is None:
        names = tuple(dataset.class_names)
        model_cfg = DetectorConfig(num_classes=len(names), class_names=names, image_size=dataset.size)
    model = Detector(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = _batches(dataset, cfg.batch_size, indices, seed=cfg.seed)
    S, step, t0 = model_cfg.image_size, 0, time.time()
    model.train()
    while step < cfg.steps:
        for batch in loader:
            if step >= cfg.steps:
                break
            # learning rate: linear warmup, then cosine decay to 0
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            # augmentation: resize to the model's side, random horizontal flip (boxes flip with the image)
            x, boxes = batch["image"], batch["boxes"]
            if x.shape[-1] != S:
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            if cfg.hflip:
                flip = torch.rand(x.shape[0]) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                flipped = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)
                boxes = torch.where(flip[:, None, None], flipped, boxes)
            # forward, backward, step
            loss, parts = detector_loss(model, dict(batch, image=x, boxes=boxes), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                log(f"detector step {step}/{cfg.steps} loss {loss.item():.3f} (heat {parts['heat']:.3f} "
                    f"size {parts['size']:.2f} offset {parts['offset']:.3f}) lr {lr:.1e} {time.time() - t0:.0f}s")
    model.eval()
    model.train_config = cfg
    return model


def predict(model, images, score_threshold=0.01, max_dets=100):
    """Detections for a batch of images (B, 3, H, W) in [-1, 1] from any source with a `predict` method
    (Detector, TorchvisionDetector): list of dict(boxes (n, 4) normalised xyxy, scores (n,), labels (n,))."""
    return model.predict(images, score_threshold=score_threshold, max_dets=max_dets)


def save_detector(model, path):
    """One file: the model config (so `load_detector` rebuilds it alone) and the state_dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = asdict(model.train_config) if hasattr(model, "train_config") else {}
    torch.save(dict(kind="detdiff-centernet", config=asdict(model.cfg), train_config=extra,
                    state_dict=model.state_dict()), path)


def load_detector(path):
    """A Detector from a `save_detector` file (eval mode), or a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: detector checkpoint not found (train one with `python perception.py train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = ckpt["config"]
        model = Detector(DetectorConfig(**dict(cfg, class_names=tuple(cfg["class_names"]),
                                               dilations=tuple(cfg["dilations"]))))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise data.DataError(f"{path}: not a detdiff detector checkpoint ({type(e).__name__}: {e})"[:300]) from None
    if ckpt.get("train_config"):
        model.train_config = DetTrainConfig(**ckpt["train_config"])
    return model.eval()


def describe(source):
    """One line naming a detection source (kept in the attribute sidecar)."""
    if isinstance(source, Detector):
        n = sum(p.numel() for p in source.parameters())
        steps = getattr(getattr(source, "train_config", None), "steps", "?")
        return (f"detdiff CenterNet-style detector, {n / 1e6:.2f}M parameters, {source.cfg.image_size} px, "
                f"width {source.cfg.width}, {steps} steps")
    return getattr(source, "description", type(source).__name__)


# ----------------------------------------------------------------------------------------------
# 2. Two more detection sources for real data.

class TorchvisionDetector(nn.Module):
    """A torchvision COCO detector (e.g. fasterrcnn_resnet50_fpn) with weights read from a local file only.

    The network is built with weights=None and loaded from `weights` (default: torch hub's checkpoint folder
    under the official file name); nothing is downloaded. COCO labels are mapped to the data set's classes by
    name; predictions of other COCO classes are dropped.
    """

    def __init__(self, name, class_names, weights=None, min_size=None, class_map=None):
        super().__init__()
        from torchvision.models import detection
        if name not in torchvision.models.list_models(module=detection):
            raise data.DataError(f"{name}: not a torchvision detection model (e.g. fasterrcnn_resnet50_fpn, "
                                 f"retinanet_resnet50_fpn, fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large)")
        meta = torchvision.models.get_model_weights(name).DEFAULT   # an enum: url and categories, no download
        fname = meta.url.rsplit("/", 1)[-1]
        path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / fname
        if not path.is_file():
            raise data.DataError(f"{path}: weights file not found; put {fname} (from {meta.url}) there "
                                 f"or pass its path with --weights")
        categories = meta.meta["categories"]
        kw = dict(min_size=min_size) if min_size else {}
        self.model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=len(categories), **kw)
        try:
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise data.DataError(f"{path}: does not load into {name} ({type(e).__name__})") from None
        self.model.eval()
        self.label_map = class_mapping(categories, class_names, class_map, path)
        self.description = f"torchvision {name} (COCO weights {path})"

    @torch.no_grad()
    def predict(self, images, score_threshold=0.01, max_dets=100):
        H, W = images.shape[-2:]
        out = []
        for r in self.model([(im + 1) / 2 for im in images.float()]):   # torchvision wants [0, 1] images
            keep = torch.tensor([int(l) in self.label_map for l in r["labels"]], dtype=torch.bool)
            keep &= r["scores"] > score_threshold
            order = r["scores"][keep].argsort(descending=True)[:max_dets]
            labels = torch.tensor([self.label_map[int(l)] for l in r["labels"][keep]], dtype=torch.long)[order]
            boxes = (r["boxes"][keep][order] / torch.tensor([W, H, W, H])).clamp(0, 1)
            out.append(dict(boxes=boxes, scores=r["scores"][keep][order], labels=labels))
        return out


class ResultsFile:
    """Detections a user made with any detector: a COCO results json, a list of
    {"image_id", "category_id", "bbox": [x, y, w, h] in the image's pixels, "score"}."""

    def __init__(self, path):
        self.path = Path(path)
        self.results = data.read_json(self.path)          # missing or malformed: DataError naming the file
        if not isinstance(self.results, list):
            raise data.DataError(f"{self.path}: a COCO results json is a list of detections")
        for i, r in enumerate(self.results):
            if not (isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys()
                    and len(r["bbox"]) == 4):
                raise data.DataError(f"{self.path}: result {i} lacks image_id, category_id, bbox [x, y, w, h] or score")
        self.description = f"COCO results json {self.path}"

    def subset(self, image_ids):
        """The same file restricted to the detections of these images (e.g. one split of a two-split file)."""
        sub, keep = ResultsFile.__new__(ResultsFile), set(image_ids)
        sub.path, sub.description = self.path, self.description
        sub.results = [r for r in self.results if r["image_id"] in keep]
        return sub

    def detections(self, dataset):
        """{image_id: dict(boxes normalised xyxy, scores, labels)} for every image of `dataset`."""
        rec = {r["image_id"]: r for r in dataset.records}
        cat = {c: i for i, c in enumerate(dataset.category_ids)}
        per = defaultdict(list)
        for i, r in enumerate(self.results):
            if r["image_id"] not in rec:
                raise data.DataError(f"{self.path}: result {i} refers to image_id {r['image_id']}, "
                                     f"which the data set does not have")
            if r["category_id"] not in cat:
                raise data.DataError(f"{self.path}: result {i} has category_id {r['category_id']}, "
                                     f"which the data set does not have")
            W, H = rec[r["image_id"]]["width"], rec[r["image_id"]]["height"]
            x, y, w, h = (float(v) for v in r["bbox"])
            per[r["image_id"]].append(([x / W, y / H, (x + w) / W, (y + h) / H], float(r["score"]), cat[r["category_id"]]))
        out = {}
        for image_id in rec:
            d = per.get(image_id, [])
            out[image_id] = dict(boxes=torch.tensor([b for b, _, _ in d], dtype=torch.float64).reshape(-1, 4),
                                 scores=torch.tensor([s for _, s, _ in d], dtype=torch.float64),
                                 labels=torch.tensor([c for _, _, c in d], dtype=torch.long))
        return out


def parse_class_map(spec):
    """'sofa=couch,tv=tvmonitor' -> {'sofa': 'couch', 'tv': 'tvmonitor'} (data-set class = detector class)."""
    if isinstance(spec, dict):
        return spec
    pairs = [p.split("=") for p in (spec or "").split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise data.DataError(f"--detector-classes {spec!r}: expected data-set class=detector class, comma-separated")
    return {a.strip(): b.strip() for a, b in pairs}


def class_mapping(detector_names, data_names, class_map=None, where="detector"):
    """{detector label index: data-set class index}: every class of the data set must be one of the detector's,
    by name or through `class_map` {data-set class: detector class}. A detector that lacks one of the data set's
    classes never finds its objects, so the attribute would call all of them hard: that is an error naming the
    missing classes and the fix. Detector classes without a data-set class are dropped."""
    cmap, det = parse_class_map(class_map), list(detector_names)
    bad = sorted(set(cmap) - set(data_names))
    if bad:
        raise data.DataError(f"{where}: --detector-classes maps {', '.join(bad)}, which the data set does not have "
                             f"(its classes: {', '.join(data_names)})")
    want = {c: cmap.get(c, c) for c in data_names}
    missing = [c for c, d in want.items() if d not in det]
    if missing:
        shown = ", ".join(det[:12]) + (f", ... ({len(det)} in all)" if len(det) > 12 else "")
        raise data.DataError(f"{where}: the detector has no class {', '.join(repr(want[c]) for c in missing)} for the "
                             f"data set's {', '.join(missing)} (its classes: {shown}); map them with "
                             f"--detector-classes {missing[0]}=<its class>,... or use a detector trained on these "
                             f"classes")
    return {det.index(want[c]): k for k, c in enumerate(data_names)}


class Relabelled(nn.Module):
    """A detdiff Detector trained on other classes (or another order), its labels mapped to the data set's."""

    def __init__(self, detector, label_map):
        super().__init__()
        self.detector, self.label_map = detector, label_map
        self.description = describe(detector) + f", classes mapped {label_map}"

    def predict(self, images, score_threshold=0.01, max_dets=100):
        out = []
        for d in self.detector.predict(images, score_threshold, max_dets):
            dev = d["labels"].device
            keep = torch.tensor([int(k) in self.label_map for k in d["labels"]], dtype=torch.bool, device=dev)
            labels = torch.tensor([self.label_map[int(k)] for k in d["labels"][keep]], dtype=torch.long, device=dev)
            out.append(dict(boxes=d["boxes"][keep], scores=d["scores"][keep], labels=labels))
        return out


def open_source(spec, class_names, weights="", class_map="", category_ids=None):
    """A perceptive model a user brings, checked against the data set's classes: `spec` is a detdiff detector
    checkpoint (.pt), a COCO results json (.json) made on the data set's own images, or torchvision:NAME (with
    `weights` the local weights file). Nothing is downloaded."""
    if spec.startswith("torchvision:"):
        return TorchvisionDetector(spec.split(":", 1)[1], class_names, weights or None, class_map=class_map)
    if spec.endswith(".json"):
        res = ResultsFile(spec)
        if category_ids is not None:
            bad = sorted({r["category_id"] for r in res.results} - set(category_ids))
            if bad:
                raise data.DataError(f"{spec}: category_id {', '.join(map(str, bad[:8]))} of the results are not the "
                                     f"data set's (its ids: {', '.join(map(str, category_ids))}); a results json "
                                     f"uses the ids of the data set's instances json")
        return res
    det = load_detector(spec)
    m = class_mapping(det.cfg.class_names, class_names, class_map, spec)
    return det if tuple(det.cfg.class_names) == tuple(class_names) else Relabelled(det, m)


def run_detector(run, train_cfg, class_names, category_ids):
    """The perceptive model of a `python detdiff.py` run folder: the user's (--detector, kept in the run's
    settings) or the one its detector stage trained (RUN/detector.pt)."""
    if train_cfg.get("detector"):
        return open_source(train_cfg["detector"], class_names, train_cfg.get("detector_weights", ""),
                           train_cfg.get("detector_classes", ""), category_ids)
    return load_detector(Path(run) / "detector.pt")


def attribute_warning(hard_fraction, detector):
    """None, or the warning for a degenerate attribute: with almost every object hard (or easy) the [easy]/[hard]
    token carries no signal (issue 15: a from-scratch detector on 61 real COCO images called 99.2% hard)."""
    if hard_fraction > 0.9:
        return (f"warning: {100 * hard_fraction:.1f}% of the training objects are hard: the detector ({detector}) "
                f"finds almost none of them, so [easy]/[hard] carries no signal. Give a stronger detector "
                f"(--detector torchvision:NAME --detector-weights FILE, or a checkpoint / results json), more "
                f"--attr-steps, or a lower --gamma / --beta")
    if hard_fraction < 0.05:
        return (f"warning: only {100 * hard_fraction:.1f}% of the training objects are hard: the detector "
                f"({detector}) finds nearly all of them, so [hard] has too few examples to learn. Use held-out folds "
                f"(not a detector trained on these images), or a higher --gamma / --beta")
    return None


def detect_dataset(source, dataset, indices=None, batch_size=64, score_threshold=0.01, max_dets=100):
    """{image_id: dict(boxes (n, 4) normalised xyxy, scores, labels)} for the images of `dataset` (or `indices`),
    from a Detector, a TorchvisionDetector or a ResultsFile."""
    if isinstance(source, ResultsFile):
        dets = source.detections(dataset)
        ids = {dataset.records[i]["image_id"] for i in (range(len(dataset)) if indices is None else indices)}
        return {k: v for k, v in dets.items() if k in ids}
    out = {}
    for batch in _batches(dataset, batch_size, indices, shuffle=False, drop_last=False):
        for image_id, det in zip(batch["image_id"].tolist(), predict(source, batch["image"], score_threshold, max_dets)):
            out[image_id] = det
    return out


# ----------------------------------------------------------------------------------------------
# 3. COCO box mAP (Lin et al. 2014; pycocotools' COCOeval for iouType="bbox", written out here).
#    AP at one IoU threshold = mean over 101 recall points r of the interpolated precision max_{r' >= r} p(r');
#    mAP = mean over IoU thresholds 0.50:0.05:0.95 and categories with ground truth; up to 100 detections
#    per image and category; crowd regions and objects outside the area range are "ignore" regions.

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou_xywh(d, g, crowd):
    """IoU of detections d (D, 4) and ground truth g (G, 4), both xywh; against a crowd box the union is the
    detection's own area (COCO: a detection inside a crowd region is not a false positive)."""
    d, g = np.asarray(d, np.float64).reshape(-1, 4), np.asarray(g, np.float64).reshape(-1, 4)
    iw = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - np.maximum(d[:, None, 0], g[None, :, 0])
    ih = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_d, area_g = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(np.asarray(crowd, bool)[None, :], area_d[:, None], area_d[:, None] + area_g[None, :] - inter)
    return np.where(inter > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_image(gts, dts, max_dets, area_range):
    """Greedy matching of one image and category (COCOeval.evaluateImg).
    Returns dt scores (D,), matched (T, D), dt ignored (T, D), gt ignored (G,)."""
    lo, hi = area_range
    g_ignore = np.array([bool(g.get("iscrowd", 0)) or not lo <= g.get("area", g["bbox"][2] * g["bbox"][3]) <= hi
                         for g in gts], bool)
    g_order = np.argsort(g_ignore, kind="mergesort")          # ignored ground truth last
    gts, g_ignore = [gts[i] for i in g_order], g_ignore[g_order]
    d_order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:max_dets]
    dts = [dts[i] for i in d_order]
    crowd = [bool(g.get("iscrowd", 0)) for g in gts]
    ious = box_iou_xywh([d["bbox"] for d in dts], [g["bbox"] for g in gts], crowd)
    T, D, G = len(IOU_THRESHOLDS), len(dts), len(gts)
    matched, d_ignore = np.zeros((T, D), bool), np.zeros((T, D), bool)
    for t, thr in enumerate(IOU_THRESHOLDS):
        g_taken = np.zeros(G, bool)
        for di in range(D):
            best, m = min(thr, 1 - 1e-10), -1
            for gi in range(G):
                if g_taken[gi] and not crowd[gi]:
                    continue                                    # already matched (crowds match many)
                if m > -1 and not g_ignore[m] and g_ignore[gi]:
                    break                                       # a real match beats any ignore region
                if ious[di, gi] < best:
                    continue
                best, m = ious[di, gi], gi
            if m == -1:
                continue
            matched[t, di], d_ignore[t, di], g_taken[m] = True, g_ignore[m], True
    # unmatched detections outside the area range are ignored too
    d_area = np.array([d["bbox"][2] * d["bbox"][3] for d in dts], np.float64)
    d_ignore |= ~matched & ((d_area < lo) | (d_area > hi))[None, :]
    return np.array([d["score"] for d in dts], np.float64), matched, d_ignore, g_ignore


def coco_map(gt, results, max_dets=100, area_range=(0.0, 1e5 ** 2)):
    """COCO box AP of `results` (a COCO results list: image_id, category_id, bbox xywh, score) against `gt`
    (a COCO instances dict: images, annotations with bbox xywh and iscrowd, categories).

    Every image of gt counts (an image without objects turns its detections into false positives); categories
    without ground truth are left out of the mean. Returns dict(mAP, AP50, AP75, per_category {cat_id: AP},
    precision (T, R, K)); a value is -1 when no category has ground truth, as pycocotools prints.
    """
    image_ids = sorted({im["id"] for im in gt["images"]})
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    known = set(image_ids)
    gts, dts = defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        gts[a["image_id"], a["category_id"]].append(a)
    for d in results:
        if d["image_id"] not in known:
            raise ValueError(f"detection for image_id {d['image_id']}, which the ground truth does not have")
        dts[d["image_id"], d["category_id"]].append(d)
    T, R, K = len(IOU_THRESHOLDS), len(RECALL_POINTS), len(cat_ids)
    precision = -np.ones((T, R, K))
    for k, c in enumerate(cat_ids):
        per_image = [match_image(gts[i, c], dts[i, c], max_dets, area_range)
                     for i in image_ids if gts.get((i, c)) or dts.get((i, c))]
        if not per_image:
            continue
        n_pos = sum(int((~g_ig).sum()) for _, _, _, g_ig in per_image)
        if n_pos == 0:
            continue
        scores = np.concatenate([s for s, _, _, _ in per_image])
        order = np.argsort(-scores, kind="mergesort")           # all detections of the category, best first
        matched = np.concatenate([m for _, m, _, _ in per_image], 1)[:, order]
        ignored = np.concatenate([ig for _, _, ig, _ in per_image], 1)[:, order]
        tp = np.cumsum(matched & ~ignored, 1).astype(np.float64)
        fp = np.cumsum(~matched & ~ignored, 1).astype(np.float64)
        for t in range(T):
            recall = tp[t] / n_pos
            prec = tp[t] / (fp[t] + tp[t] + np.spacing(1))
            prec = np.maximum.accumulate(prec[::-1])[::-1]      # interpolated: max precision at recall >= r
            idx = np.searchsorted(recall, RECALL_POINTS, side="left")
            q = np.zeros(R)
            ok = idx < len(prec)
            q[ok] = prec[idx[ok]]                               # recall never reached: precision 0
            precision[t, :, k] = q

    def mean(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0
    return dict(mAP=mean(precision), AP50=mean(precision[0]), AP75=mean(precision[5]),
                per_category={c: mean(precision[:, :, k]) for k, c in enumerate(cat_ids)}, precision=precision)


def crowd_regions(json_path):
    """{image_id: [crowd boxes xywh]} of an instances json (data.py leaves crowds out of layouts)."""
    out = defaultdict(list)
    for a in data.read_json(json_path).get("annotations", []):
        if a.get("iscrowd", 0):
            out[a["image_id"]].append((a["category_id"], a["bbox"]))
    return out


def evaluate(source, dataset, crowd_json=None, batch_size=64, max_dets=100):
    """COCO mAP / AP50 / AP75 of a detection source on `dataset` (its layouts are the ground truth, in each
    image's own pixel frame). Pass the split's instances json as `crowd_json` to count its crowd regions as
    ignore regions (data.py drops crowds from layouts, so the dataset alone does not have them)."""
    dets = detect_dataset(source, dataset, batch_size=batch_size, max_dets=max_dets)
    crowds = crowd_regions(crowd_json) if crowd_json else {}
    images, anns, results = [], [], []
    for i, rec in enumerate(dataset.records):
        W, H, image_id = rec["width"], rec["height"], rec["image_id"]
        images.append(dict(id=image_id))
        item = dataset.load(i)
        for box, label in zip(item["boxes"].tolist(), item["labels"].tolist()):
            x0, y0, x1, y1 = box[0] * W, box[1] * H, box[2] * W, box[3] * H
            anns.append(dict(image_id=image_id, category_id=label, bbox=[x0, y0, x1 - x0, y1 - y0],
                             area=(x1 - x0) * (y1 - y0), iscrowd=0))
        for cat_id, bbox in crowds.get(image_id, []):
            if cat_id in dataset.category_ids:
                anns.append(dict(image_id=image_id, category_id=dataset.category_ids.index(cat_id),
                                 bbox=list(bbox), area=bbox[2] * bbox[3], iscrowd=1))
        d = dets[image_id]
        for box, s, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            x0, y0, x1, y1 = box[0] * W, box[1] * H, box[2] * W, box[3] * H
            results.append(dict(image_id=image_id, category_id=label, bbox=[x0, y0, x1 - x0, y1 - y0], score=s))
    gt = dict(images=images, annotations=anns, categories=[dict(id=k) for k in range(len(dataset.class_names))])
    r = coco_map(gt, results, max_dets=max_dets)
    names = dataset.class_names
    return dict(mAP=r["mAP"], AP50=r["AP50"], AP75=r["AP75"],
                per_category={names[k]: v for k, v in r["per_category"].items()})


# ----------------------------------------------------------------------------------------------
# 4. Perception-aware attribute (PAPER.md section 2).

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
        raise data.DataError(f"{out}: the attribute sidecar goes to a run folder, not into the data folder {root}")
    return out


def make_attributes(root, out, cfg=AttributeConfig(), source=None, log=None):
    """Label every layout object of the train split (and val, cfg.label_val) of the COCO-format folder `root`.

    source=None (default): held-out folds. The training images are split into cfg.folds folds; for each fold a
    Detector is trained on the other folds and labels this one, so no object is judged by a detector that saw
    it (run on its own training images a detector finds nearly everything and the attribute carries no signal).
    Val is labelled by fold 1's detector. A given source (Detector, TorchvisionDetector, ResultsFile) labels
    all images instead. Writes OUT/attributes.json (the sidecar: per split {ann_id: easy|hard}, the settings,
    the detector, the summary) and OUT/attributes.png (training images, easy green, hard red); returns the summary.
    """
    log = log or logger.info
    out = _check_out(out, root)
    t0 = time.time()

    def dataset(split):
        return data.CocoLayoutDataset(root, split, size=cfg.image_size, min_area=cfg.min_area,
                                      max_objects=cfg.max_objects)

    def label(det, ds, indices):
        if isinstance(det, ResultsFile):  # one file may hold both splits: each split reads its own images
            det = det.subset({r["image_id"] for r in ds.records})
        dets, attrs = detect_dataset(det, ds, indices=indices), {}
        for i in indices:
            item, d = ds.load(i), dets[ds.records[i]["image_id"]]
            attrs.update(zip(item["ann_ids"].tolist(), assign_attributes(
                item["boxes"], item["labels"], d["boxes"], d["scores"], d["labels"], cfg.gamma, cfg.beta,
                cfg.class_aware)))
        return attrs

    ds = dataset("train")
    val = dataset("val") if cfg.label_val else None
    if isinstance(source, ResultsFile):
        ids = {r["image_id"] for d in (ds, val) if d is not None for r in d.records}
        bad = [r["image_id"] for r in source.results if r["image_id"] not in ids]
        if bad:
            raise data.DataError(f"{source.path}: detections for image_id {bad[0]}, which the data set does not have")
    attrs, first = {"train": {}}, source
    folds = make_folds(len(ds), cfg.folds, cfg.seed) if source is None else [list(range(len(ds)))]
    for f, fold in enumerate(folds):
        det = source
        if source is None:
            rest = sorted(set(range(len(ds))) - set(fold))
            log(f"attributes: fold {f + 1}/{len(folds)}: training a detector on {len(rest)} images, "
                f"labelling {len(fold)}")
            det = train(ds, cfg=DetTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed + f,
                                               log_every=max(cfg.steps // 4, 1)), indices=rest, log=log)
            first = first or det
        attrs["train"].update(label(det, ds, fold))
    summary = {"train": summarise(attrs["train"], ds, root, "train")}
    warning = attribute_warning(summary["train"]["hard_fraction"], describe(first))
    if warning:
        summary["train"]["warning"] = warning
    if val is not None:
        attrs["val"] = label(first, val, range(len(val)))
        summary["val"] = summarise(attrs["val"], val, root, "val")
    folds_used = cfg.folds if source is None else 0
    sidecar = dict(gamma=cfg.gamma, beta=cfg.beta, class_aware=cfg.class_aware, folds=folds_used,
                   detector=describe(first) if source is not None else f"{cfg.folds} folds x {describe(first)}",
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
    ann = {a["id"]: a for a in data.read_json(data.split_paths(root, split)[0])["annotations"]}
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
    side = data.read_json(path)
    if not isinstance(side, dict) or not isinstance(side.get("attributes"), dict):
        raise data.DataError(f"{path}: not an attribute sidecar (no 'attributes' object)")
    if split not in side["attributes"]:
        raise data.DataError(f"{path}: no attributes for split {split!r} (it has {sorted(side['attributes'])})")
    return {int(k): v for k, v in side["attributes"][split].items()}


def draw_attributes(dataset, attrs, indices, scale=4, ncol=6):
    """A grid of images with easy objects outlined green and hard ones red."""
    tiles = []
    for i in indices:
        it = dataset.load(i)
        diff = [data.DIFFICULTY.index(attrs.get(int(a), "none")) for a in it["ann_ids"]]
        tiles.append(data.draw_layout(it["image"], it["boxes"], it["labels"], dataset.class_names, diff, scale))
    return data.image_grid(tiles, ncol=ncol)


# ----------------------------------------------------------------------------------------------
# 5. The perception-aware loss (PAPER.md section 3): an FPN-like mask head on the UNet's decoder
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

def _add_fields(p, cls, skip=()):
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.type in (tuple, "tuple"):
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default)


def _pick(ns, cls, **kw):
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}, **kw)


def _source(a, dataset):
    spec = a.results or (f"torchvision:{a.torchvision}" if a.torchvision else a.detector)
    return open_source(spec, dataset.class_names, a.weights, a.detector_classes, dataset.category_ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description="detdiff's perceptive model: detector, COCO mAP, P.A. attributes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the detector from scratch and report val mAP")
    t.add_argument("--data", default="shapes")
    t.add_argument("--out", default="runs/detector", help="run folder (detector.pt is written there)")
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--width", type=int, default=32)
    _add_fields(t, DetTrainConfig)
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
    at = sub.add_parser("attributes", help="perception-aware attributes of a split (held-out folds by default)")
    at.add_argument("--data", default="shapes")
    at.add_argument("--out", default="runs/shapes", help="run folder for attributes.json / .png (not the data)")
    at.add_argument("--detector", help="label with this detector checkpoint instead of held-out folds")
    at.add_argument("--results", help="label with a COCO results json instead of held-out folds")
    at.add_argument("--torchvision", help="label with a torchvision COCO detector instead of held-out folds")
    at.add_argument("--weights", help="local weights file for --torchvision")
    at.add_argument("--detector-classes", default="", help="data-set class=detector class,... where names differ")
    _add_fields(at, AttributeConfig)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root = data.resolve_data(a.data)
        if a.cmd == "train":
            tr = data.CocoLayoutDataset(root, "train", size=a.image_size)
            va = data.CocoLayoutDataset(root, "val", size=a.image_size)
            cfg = _pick(a, DetTrainConfig)
            t0 = time.time()
            model = train(tr, DetectorConfig(len(tr.class_names), tuple(tr.class_names), a.image_size, a.width), cfg)
            secs = time.time() - t0
            save_detector(model, Path(a.out) / "detector.pt")
            r = evaluate(model, va, crowd_json=data.split_paths(root, "val")[0])
            print(f"trained in {secs:.0f}s; val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 {r['AP75']:.3f} "
                  f"-> {Path(a.out) / 'detector.pt'}")
        elif a.cmd == "eval":
            ds = data.CocoLayoutDataset(root, a.split, size=a.image_size)
            r = evaluate(_source(a, ds), ds, crowd_json=data.split_paths(root, a.split)[0])
            print(f"{a.data}/{a.split}: mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 {r['AP75']:.3f}; per category "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["per_category"].items()))
        else:
            cfg = _pick(a, AttributeConfig)
            source = None
            if a.detector or a.results or a.torchvision:
                probe = data.CocoLayoutDataset(root, "train", size=cfg.image_size, check_files=False)
                source = _source(a, probe)
            s = make_attributes(root, a.out, cfg, source)
            print(json.dumps(s, indent=1))
    except data.DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
