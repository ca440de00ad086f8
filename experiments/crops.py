"""Class consistency (beyond the paper): a crop classifier trained on real object crops judges
generated objects.

Readers of the paper ask whether a generated [hard] object still belongs to its class (a hard object
of the wrong class is a wrong label). A small CNN trained on real object crops at the generator's
resolution judges the generated objects: `crop_accuracy` per [none]/[easy]/[hard], `accept_objects`
for the class filter (evaluate.py's trainability part and `sample.py --classifier`).

    python -m experiments.evaluate --run runs/shapes --parts crops      # writes RUN/eval/crop_classifier.pt
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm import tqdm

import config
import data
import optim
from perceptive import detector

KIND = "detdiff-crop-classifier"       # config.save_module's kind of crop_classifier.pt


# --------------------------------------------------------------------------------------------------
# Crops. roi_align(aligned=True) puts pixel i over [i, i+1) (its centre at i + 0.5), as data.py's
# boxes do, so a box on the pixel grid cropped at its own size samples exactly the pixel centres.
# Samples more than one pixel outside the image read 0 (mid grey in [-1, 1]); within one pixel they
# repeat the border.


def _rois(boxes, index, hw, context):
    """Normalised xyxy boxes (N, 4) of images `index` (N,) -> roi_align rows (N, 5) in pixels, each
    side grown."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * torch.tensor(
        [-1.0, -1.0, 1.0, 1.0], device=boxes.device
    )
    scale = torch.tensor([hw[1], hw[0], hw[1], hw[0]], dtype=torch.float32, device=boxes.device)
    return torch.cat([index[:, None].float(), (boxes + context * wh) * scale], 1)


def _crop(x, rois, size):
    # (N, 3, s, s)
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _objects(layouts):
    """Layouts dict(boxes, labels[, difficulty]) (tensors or arrays) -> all objects' boxes, labels,
    difficulty (0 = none where a layout has none) and image index, concatenated."""
    n = torch.tensor([len(lay["labels"]) for lay in layouts], dtype=torch.long)
    boxes = torch.cat([torch.as_tensor(lay["boxes"], dtype=torch.float32).reshape(-1, 4) for lay in layouts])
    labels = torch.cat([torch.as_tensor(lay["labels"]).long().reshape(-1) for lay in layouts])
    difficulty = torch.cat([torch.as_tensor(lay.get("difficulty", [0] * k)).long().reshape(-1)
                      for lay, k in zip(layouts, n.tolist())])
    return boxes, labels, difficulty, torch.repeat_interleave(torch.arange(len(layouts)), n)


def object_crops(images, layouts, size=16, context=0.1):
    """uint8 (S, S, 3) images + their layouts -> crops (N, 3, size, size) in [-1, 1], labels (N,),
    difficulty (N,), image_index (N,)."""
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images but {len(layouts)} layouts")
    boxes, labels, difficulty, index = _objects(layouts)
    x = torch.stack([data.to_model_range(im) for im in images])  # (B, 3, S, S)
    return _crop(x, _rois(boxes, index, x.shape[-2:], context), size), labels, difficulty, index


# --------------------------------------------------------------------------------------------------
# The classifier and its training loop


class CropClassifier(nn.Module):
    """crops (N, 3, size, size) in [-1, 1] -> class logits (N, C). Keeps the crop settings it was
    trained with."""

    def __init__(self, num_classes, class_names=(), width=16, size=16, context=0.1):
        super().__init__()
        self.class_names, self.size, self.context = tuple(class_names), size, context
        self.config = dict(num_classes=num_classes, class_names=self.class_names, width=width,
                           size=size,
                           context=context)
        w = width
        self.features = nn.Sequential(detector.conv_bn(3, w), detector.conv_bn(w, 2 * w, 2),
                                      detector.conv_bn(2 * w, 2 * w),
                                      # 16 -> 8 -> 4 px for 16 px crops
                                      detector.conv_bn(2 * w, 4 * w, 2))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, crops):
        return self.head(self.features(crops).mean((2, 3)))  # global average pool -> (N, 4w) -> (N,
                                                             # C)


def train_crop_classifier(dataset, steps=1000, batch=128, seed=0, size=16, context=0.1, width=16,
                          lr=3e-3,
                          jitter=0.1, log=None, device="cpu"):
    """Train a CropClassifier on every object of `dataset` (anything with class_names, len and
    load(i) giving uint8 image + normalised boxes + labels, e.g. data.CocoLayoutDataset at the
    generator's resolution). Each step draws `batch` objects, moves each box edge by up to `jitter`
    of the box side and flips half the crops. Deterministic given seed: the draws come from a CPU
    generator whatever the `device` it trains on. Returns the model in eval mode, on `device`."""
    log, t0 = log or tqdm.write, time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    items = [dataset.load(i) for i in range(len(dataset))]
    x = torch.stack([data.to_model_range(it["image"]) for it in items]).to(device)  # (B, 3, S, S)
    boxes, labels, _, index = _objects(items)                             # on the CPU, as the draws
    clf = CropClassifier(len(dataset.class_names), dataset.class_names, width, size,
                         context).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    clf.train()
    for step in range(steps):
        # learning rate: short linear warmup, then cosine decay to 0
        for group in opt.param_groups:
            group["lr"] = optim.warmup_cosine(lr, step, 20, step / steps)
        # augmentation: box jitter (each edge up to `jitter` of the side), horizontal flip
        k = torch.randint(len(labels), (batch,), generator=g)
        wh = (boxes[k, 2:] - boxes[k, :2]).repeat(1, 2)
        b = boxes[k] + jitter * wh * (2 * torch.rand(batch, 4, generator=g) - 1)
        crops = _crop(x, _rois(b, index[k], x.shape[-2:], context).to(device), size)
        flip = (torch.rand(batch, generator=g) < 0.5).to(device)
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        # forward, backward, step
        loss = F.cross_entropy(clf(crops), labels[k].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(steps // 4, 1) == 0:
            log(f"crop classifier step {step + 1}/{steps} loss {loss.item():.3f} "
                f"{time.time() - t0:.0f}s")
    return clf.eval()


# --------------------------------------------------------------------------------------------------
# Measures on (generated) images


@torch.no_grad()
def classify(clf, crops, labels=None, batch=1024):
    """-> predicted labels (N,), probability of the prediction (N,), probability of `labels` (N,) or
    None, on the CPU; the classifier runs on its own device."""
    was_training, dev = clf.training, detector.device_of(clf)
    probs = torch.cat([clf.eval()(c.to(dev)).float().softmax(-1).cpu()
                       for c in crops.split(batch)])             # (N, C); no crops: one empty chunk
    clf.train(was_training)
    p, pred = probs.max(1)
    p_label = (
        None
        if labels is None
        else probs.gather(1, torch.as_tensor(labels).long().view(-1, 1)).squeeze(1)
    )
    return pred, p, p_label


def crop_accuracy(clf, images, layouts):
    """dict(overall=..., none=..., easy=..., hard=...), each dict(accuracy, count); accuracy None
    when count 0."""
    crops, labels, difficulty, _ = object_crops(images, layouts, clf.size, clf.context)
    correct = classify(clf, crops)[0] == labels

    def acc(m):
        n = int(m.sum())
        return dict(accuracy=correct[m].float().mean().item() if n else None, count=n)
    return dict(overall=acc(torch.ones_like(correct)),
                **{name: acc(difficulty == code) for code, name in enumerate(data.DIFFICULTY)})


def accept_objects(clf, images, layouts, min_prob=0.5):
    """One bool tensor per layout: True where the classifier gives the object's layout class prob >=
    min_prob."""
    crops, labels, _, _ = object_crops(images, layouts, clf.size, clf.context)
    ok = classify(clf, crops, labels)[2] >= min_prob
    return list(ok.split([len(lay["labels"]) for lay in layouts]))


# --------------------------------------------------------------------------------------------------
# One file per classifier


def save_crop_classifier(clf, path):
    """One file: the classifier's config (classes, crop size and context) and its weights."""
    config.save_module(path, KIND, clf, clf.config)


def load_crop_classifier(path):
    """A CropClassifier (eval mode) from a `save_crop_classifier` file, or a DataError naming the
    file."""
    return config.load_module(path, KIND, lambda c: CropClassifier(**c),
                              "crop classifier checkpoint")[0]
