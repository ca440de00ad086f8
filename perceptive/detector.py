"""The perceptive model detdiff trains itself: a small CenterNet-style detector (Zhou et al. 2019,
"Objects as Points"), per-class centre heatmap + box size + centre offset at stride 4, trained from
scratch.

docs/paper.md section 2 (the detector that labels every training object [easy] or [hard]) and section 4
(the "YOLO score": a detector trained on real images measures generated ones). `train` fits it on a
data.py data set, `predict` decodes it without NMS, `save_detector` / `load_detector` keep it in one
file with its config. Other detectors (torchvision's, a results json) share its `predict` interface
in detections.py; its mAP is in coco_map.py.

Boxes: `predict` returns boxes as normalised xyxy in [0, 1] (fractions of the image side, as
data.py's layouts); labels are the data set's contiguous class indices 0..C-1.

Devices: `train` fits the detector on any device (`device`, and an autocast `dtype`:
config.resolve_device / resolve_dtype); `predict` runs on the model's own device whatever the
images' and returns its detections on the CPU, where every consumer (mAP, attributes) reads them.

    python -m perceptive train --data shapes --out runs/detector      # ~2-3 min on 2 cores, prints val mAP
"""
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import data
import optim

logger = logging.getLogger("detdiff.detector")
KIND = "detdiff-centernet"       # config.save_module's kind of detector.pt


# ---------------------------------------------------------------------------------------------- The
# detector: one stride-4 feature map, three heads. heatmap Y_hat (B, C, S/4, S/4) of object centres
# per class, size (w, h) and centre offset at the peak.


@dataclass
class DetectorConfig:
    num_classes: int = 5
    class_names: tuple = ()
    image_size: int = 64          # inputs are resized to this side (train and predict)
    width: int = 32               # channels of the stride-4 trunk
    dilations: tuple = (1, 2, 4, 1)  # one residual block per entry (dilation widens the receptive
                                     # field)


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


def device_of(module):
    """The device a module computes on: that of its first parameter or buffer (the CPU for one with
    neither)."""
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def conv_bn(cin, cout, stride=1, dilation=1, relu=True):
    layers = [nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class DilatedBlock(nn.Module):
    def __init__(self, c, dilation):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, 1, dilation),
                                  conv_bn(c, c, 1, dilation, relu=False))

    def forward(self, x):
        return F.relu(x + self.body(x))


class Detector(nn.Module):
    stride = 4

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg, w = cfg, cfg.width
        self.stem = nn.Sequential(conv_bn(3, w // 4, 2), conv_bn(w // 4, w // 2),
                                  conv_bn(w // 2, w, 2))
        self.trunk = nn.Sequential(*[DilatedBlock(w, d) for d in cfg.dilations])

        def head(cout):
            return nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(w, cout, 1))
        self.heatmap, self.size, self.offset = head(cfg.num_classes), head(2), head(2)
        # prior 0.1 (CenterNet's -2.19)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x):
        """x (B, 3, S, S) in [-1, 1] -> heatmap logits (B, C, S/4, S/4), size (B, 2, ..), offset (B,
        2, ..)."""
        f = self.trunk(self.stem(x))
        return self.heatmap(f), self.size(f), self.offset(f)

    @torch.no_grad()
    def predict(self, images, score_threshold=0.01, max_dets=100):
        """images (B, 3, H, W) in [-1, 1], on any device -> list of dict(boxes (n, 4) normalised
        xyxy, scores (n,), labels (n,)), on the CPU. The network runs on its own device, in fp32."""
        was_training = self.training
        self.eval()
        S = self.cfg.image_size
        x = images.to(device_of(self), torch.float32)
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        logits, size, offset = self(x)
        self.train(was_training)
        # the top max_dets peaks are decoded on the device; only those cross to the CPU, where each
        # image keeps its own number of detections (a per-image boolean mask is a host sync per
        # image on a GPU)
        boxes, scores, labels = (t.cpu() for t in decode(logits, size, offset, max_dets))
        out = []
        for i in range(len(boxes)):
            k = scores[i] > score_threshold
            out.append(dict(boxes=boxes[i][k], scores=scores[i][k], labels=labels[i][k]))
        return out


def decode(logits, size, offset, max_dets=100):
    """CenterNet's decoding without NMS, on the outputs' device: heatmap logits (B, C, G, G), size
    and offset (B, 2, G, G) -> the max_dets highest peaks of each image: boxes (B, K, 4) normalised
    xyxy, scores (B, K), labels (B, K)."""
    # boxes in fp32 whatever the autocast
    logits, size, offset = logits.float(), size.float(), offset.float()
    B, C, G, _ = logits.shape
    heat = logits.sigmoid()
    heat = heat * (heat == F.max_pool2d(heat, 3, 1, 1))       # peaks: a 3x3 max-pool replaces NMS
    scores, idx = heat.view(B, -1).topk(min(max_dets, C * G * G))
    labels, cell = idx // (G * G), idx % (G * G)
    cy, cx = (cell // G).float(), (cell % G).float()
    b = torch.arange(B, device=logits.device)[:, None]
    off = offset.view(B, 2, -1)[b, :, cell]                   # (B, K, 2)
    wh = size.view(B, 2, -1)[b, :, cell].clamp(min=0)          # (B, K, 2) in grid cells
    px, py = cx + off[..., 0], cy + off[..., 1]                # centre in grid cells
    boxes = torch.stack([px - wh[..., 0] / 2, py - wh[..., 1] / 2, px + wh[..., 0] / 2,
                         py + wh[..., 1] / 2], -1)
    return (boxes / G).clamp(0, 1), scores, labels       # (B, K, 4) normalised xyxy, (B, K), (B, K)


# ----------------------------------------------------------------------------------------------
# Training: CenterNet's targets and loss


def centernet_targets(boxes, labels, valid, num_classes, G):
    """Ground truth of CenterNet at grid G: heatmap Y (B, C, G, G) and, per object, (b, cx, cy, wh,
    offset).

    Centre p = box centre in grid cells, p~ = floor(p); Y = exp(-(x - p~x)^2 / 2 sx^2 - (y - p~y)^2
    / 2 sy^2), max over the objects of a class (CenterNet Sec. 3). The Gaussian is elliptical, s =
    0.54 w / 6, as TTFNet (Liu et al. 2020) does, so thin boxes get thin peaks; floored at 0.3
    cells. """
    B = boxes.shape[0]
    b, m = valid.nonzero(as_tuple=True)
    bx = boxes[b, m] * G                                           # (N, 4) in grid cells
    c = labels[b, m]
    wh = bx[:, 2:] - bx[:, :2]
    p = (bx[:, :2] + bx[:, 2:]) / 2
    p_int = p.floor().clamp(0, G - 1)
    sigma = (0.54 * wh / 6).clamp(min=0.3)
    ar = torch.arange(G, dtype=torch.float32, device=boxes.device)
    gx = torch.exp(-(ar[None] - p_int[:, :1]) ** 2 / (2 * sigma[:, :1] ** 2))   # (N, G)
    gy = torch.exp(-(ar[None] - p_int[:, 1:]) ** 2 / (2 * sigma[:, 1:] ** 2))   # (N, G)
    gauss = gy[:, :, None] * gx[:, None, :]                                     # (N, G, G)
    heat = torch.zeros(B * num_classes, G * G, device=boxes.device)
    index = (b * num_classes + c)[:, None].expand(-1, G * G)
    heat.scatter_reduce_(0, index, gauss.view(-1, G * G), "amax")       # overlapping peaks: the max
    return heat.view(B, num_classes, G, G), b, p_int.long(), wh, p - p_int


def focal_loss(logits, target):
    """CenterNet Eq. (1): penalty-reduced pixel-wise focal loss, alpha = 2, beta = 4, divided by N
    objects."""
    pos = target.eq(1).float()
    p = logits.sigmoid()
    pos_loss = -F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = -F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def detector_loss(model, batch, cfg: DetTrainConfig):
    """L_det = L_k + lambda_size L_size + lambda_off L_off (CenterNet Eq. (3)); L1 at the centre
    cells. -> (loss, its three terms as detached 0-d tensors: reading them is a host sync, left to
    the log line)."""
    # the loss in fp32 under any autocast
    logits, size, offset = (t.float() for t in model(batch["image"]))
    G = logits.shape[-1]
    heat, b, cell, wh, off = centernet_targets(batch["boxes"], batch["labels"], batch["valid"],
                                               logits.shape[1], G)
    l_k = focal_loss(logits, heat)
    n = max(len(b), 1)
    # Eq. (2)-style L1
    l_size = F.l1_loss(size[b, :, cell[:, 1], cell[:, 0]], wh, reduction="sum") / n
    # CenterNet Eq. (2)
    l_off = F.l1_loss(offset[b, :, cell[:, 1], cell[:, 0]], off, reduction="sum") / n
    parts = dict(heat=l_k.detach(), size=l_size.detach(), offset=l_off.detach())
    return l_k + cfg.size_weight * l_size + cfg.offset_weight * l_off, parts


def batches(dataset, batch_size, indices=None, shuffle=True, seed=0, drop_last=True):
    """data.collate batches of `dataset` (or of its images `indices`); works for any data.py-style
    dataset."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.SubsetRandomSampler(indices, generator=g) if shuffle else indices
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       collate_fn=data.collate,
                                       drop_last=drop_last and len(indices) >= batch_size)


def train(dataset, model_cfg=None, cfg=DetTrainConfig(), indices=None, log=None, device="cpu",
          dtype="fp32"):
    """Train a Detector from scratch on `dataset` (data.py items; optionally only the images
    `indices`).

    model_cfg defaults to DetectorConfig with the data set's classes at the data set's resolution.
    Returns the model (in eval mode, on `device`). Batches are resized to model_cfg.image_size when
    they differ. device: where it trains; dtype: the forward's autocast (a resolved fp32 | bf16 |
    fp16, see config.resolve_dtype), the loss stays fp32. Every random draw (initialisation,
    batches, flips) is made on the CPU, so a seed draws the same ones on any device. """
    log = log or logger.info
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    if model_cfg is None:
        names = tuple(dataset.class_names)
        model_cfg = DetectorConfig(num_classes=len(names), class_names=names,
                                   image_size=dataset.size)
    model = Detector(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fp16 gradients underflow unscaled
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    loader = batches(dataset, cfg.batch_size, indices, seed=cfg.seed)
    S, step, t0 = model_cfg.image_size, 0, time.time()
    model.train()
    while step < cfg.steps:
        for batch in loader:
            if step >= cfg.steps:
                break
            # learning rate: linear warmup, then cosine decay to 0
            lr = optim.warmup_cosine(cfg.lr, step, cfg.warmup, step / cfg.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            # augmentation: resize to the model's side, random horizontal flip (boxes flip with the
            # image); the flips come from the CPU's random stream, so a seed flips the same images
            # on every device
            # what the loss reads
            batch = {k: batch[k].to(device) for k in ("image", "boxes", "labels", "valid")}
            x, boxes = batch["image"], batch["boxes"]
            if x.shape[-1] != S:
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False,
                                  antialias=True)
            if cfg.hflip:
                flip = (torch.rand(x.shape[0]) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                boxes = torch.where(flip[:, None, None], data.flip_boxes(boxes), boxes)
            # forward under autocast (the loss in fp32), backward, clip, step
            with config.autocast(device, dtype):
                loss, parts = detector_loss(model, dict(batch, image=x, boxes=boxes), cfg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
            step += 1
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                log(f"detector step {step}/{cfg.steps} loss {loss.item():.3f} (heat "
                    f"{parts['heat'].item():.3f} size {parts['size'].item():.2f} offset "
                    f"{parts['offset'].item():.3f}) lr {lr:.1e} {time.time() - t0:.0f}s")
    model.eval()
    model.train_config = cfg
    return model


def predict(model, images, score_threshold=0.01, max_dets=100):
    """Detections for a batch of images (B, 3, H, W) in [-1, 1] from any source with a `predict`
    method (Detector, TorchvisionDetector): list of dict(boxes (n, 4) normalised xyxy, scores (n,),
    labels (n,))."""
    return model.predict(images, score_threshold=score_threshold, max_dets=max_dets)


# ----------------------------------------------------------------------------------------------
# One file per detector

def save_detector(model, path):
    """One file: the model config (so `load_detector` rebuilds it alone), the training settings and
    the weights."""
    extra = asdict(model.train_config) if hasattr(model, "train_config") else {}
    config.save_module(path, KIND, model, asdict(model.cfg), train_config=extra)


def load_detector(path):
    """A Detector from a `save_detector` file (eval mode), or a DataError naming the file."""
    def build(c):
        return Detector(DetectorConfig(**dict(c, class_names=tuple(c["class_names"]),
                                              dilations=tuple(c["dilations"]))))
    model, f = config.load_module(path, KIND, build, "detector checkpoint",
                                  hint="train one with `python -m perceptive train`")
    if f.get("train_config"):
        model.train_config = DetTrainConfig(**f["train_config"])
    return model
