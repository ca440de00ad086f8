"""DetDiffusion's two contributions (docs/paper.md sections 2 and 3), the two ways the perceptive
model and the generator are coupled:

  1. the perception-aware attribute: `assign_attributes` (section 2: a prediction with confidence >
     gamma and IoU > beta makes an object [easy], else it is [hard]); `load_attributes` reads the
     sidecar a run trains with
  2. the perception-aware loss: `MaskHead` (an FPN-like head on the UNet's decoder features, one
     query per layout object), `mask_bce` (L_m), `mask_dice` (L_d), `perception_loss` (L_p =
     sqrt(alpha_bar_t) (L_m + L_d), section 3)

Which detector labels the objects (held-out folds of detdiff's own, or the user's) and the sidecar
it writes are the attribute stage's, in perceptive/attributes.py; the detector itself is
perceptive/detector.py.

    python -m perceptive attributes --data shapes --out runs/shapes   # attributes.json + summary + png
    python -m pytest tests/test_perception.py       # the rule, L_m, L_d and L_p against hand-computed values
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from config import DataError, read_json


# ----------------------------------------------------------------------------------------------
# 1. Perception-aware attribute (docs/paper.md section 2).

def assign_attributes(gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels, gamma=0.4,
                      beta=0.5,
                      class_aware=False):
    """docs/paper.md section 2: keep predictions with confidence > gamma (step 1); a ground-truth
    object is 'easy' if some kept prediction has IoU > beta with it (and, class-aware, the same
    class), else 'hard' (step 2). Boxes xyxy in any one frame. Returns a list of 'easy' / 'hard',
    one per ground-truth object."""
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4)
    pred_boxes = torch.as_tensor(pred_boxes, dtype=torch.float64).reshape(-1, 4)
    keep = torch.as_tensor(pred_scores, dtype=torch.float64).reshape(-1) > gamma           # step 1
    iou = torchvision.ops.box_iou(gt_boxes, pred_boxes[keep])                               # (N, P)
    if class_aware:
        same = (
            torch.as_tensor(gt_labels).reshape(-1, 1)
            == torch.as_tensor(pred_labels).reshape(1, -1)[:, keep]
        )
        iou = torch.where(same, iou, torch.zeros_like(iou))
    easy = (iou > beta).any(1)                                                              # step 2
    return ["easy" if e else "hard" for e in easy.tolist()]


def load_attributes(path, split="train"):
    """{ann_id: 'easy' | 'hard'} of one split from a sidecar, for
    data.CocoLayoutDataset(attributes=...)."""
    side = read_json(path)
    if not isinstance(side, dict) or not isinstance(side.get("attributes"), dict):
        raise DataError(f"{path}: not an attribute sidecar (no 'attributes' object)")
    if split not in side["attributes"]:
        raise DataError(f"{path}: no attributes for split {split!r} (it has "
                        f"{sorted(side['attributes'])})")
    return {int(k): v for k, v in side["attributes"][split].items()}


def attributes_path(cfg, out):
    """The attribute sidecar a generator run (TrainConfig) reads: None for "none"; for "auto" the
    run folder's attributes.json when the attributes stage wrote one; otherwise the given path,
    which must exist."""
    if cfg.attributes == "none":
        return None
    if cfg.attributes == "auto":
        p = Path(out) / "attributes.json"
        return p.resolve() if p.is_file() else None
    if not Path(cfg.attributes).is_file():
        raise DataError(f"{cfg.attributes}: attribute sidecar not found (--attributes "
                        f"auto|none|PATH)")
    return Path(cfg.attributes).resolve()


# ---------------------------------------------------------------------------------------------- 2.
# The perception-aware loss (docs/paper.md section 3): an FPN-like mask head on the UNet's decoder
# features and L_p = sqrt(alpha_bar_t) * (L_m + L_d), added to L_simple with weight lambda.

class MaskHead(nn.Module):
    """FPN-like segmentation head over the UNet's decoder features (DatasetDM-style fusion).

    features (coarse to fine) -> 1x1 lateral convs to `dim` channels -> top-down: upsample x2 and
    add -> 3x3 conv -> per-pixel embeddings P (B, dim, H, W) at the finest resolution. Each layout
    object brings its own query q_i = MLP(object embedding from the layout encoder), so object i's
    mask logits are <q_i, P(x, y)> / sqrt(dim): no Hungarian matching is needed (docs/paper.md
    section 5). """

    def __init__(self, feature_channels, obj_dim, dim=32):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in feature_channels])
        self.smooth = nn.Sequential(nn.GroupNorm(8 if dim % 8 == 0 else 1, dim), nn.SiLU(),
                                    nn.Conv2d(dim, dim, 3, padding=1))
        self.query = nn.Sequential(nn.Linear(obj_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, features, objects):
        """features: list of (B, C_l, H_l, W_l), coarse to fine; objects (B, M, D) -> mask logits
        (B, M, H, W)."""
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
    """L_d: Dice loss per object, 1 - (2 sum(p t) + s) / (sum p + sum t + s), p = sigmoid(logits).
    -> (B, M)."""
    p = logits.sigmoid()
    inter = (p * target).sum((-2, -1))
    return 1 - (2 * inter + smooth) / (p.sum((-2, -1)) + target.sum((-2, -1)) + smooth)


def perception_loss(logits, masks, valid, alpha_bar_t):
    """L_p = sqrt(alpha_bar_t) * (L_m + L_d) per sample (DetDiffusion, docs/paper.md section 3).

    logits (B, M, h, w); masks (B, M, S, S) instance masks in {0, 1} (filled boxes where a data set
    has none), area-resized to the head's h x w as soft targets; valid (B, M) marks real objects
    (padding contributes nothing); alpha_bar_t (B,). Returns (B,): the mean over each sample's real
    objects (0 with none). """
    target = (
        F.adaptive_avg_pool2d(masks, logits.shape[-2:])
        if masks.shape[-2:] != logits.shape[-2:]
        else masks
    )
    logits = logits.float()
    per_obj = mask_bce(logits, target) + mask_dice(logits, target)               # L_m + L_d, (B, M)
    v = valid.float()
    per_sample = (per_obj * v).sum(1) / v.sum(1).clamp(min=1)               # mean over real objects
    return alpha_bar_t.float().sqrt() * per_sample               # timestep weight sqrt(alpha_bar_t)
