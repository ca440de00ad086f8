"""The embedded default data set `shapes`: procedural, deterministic by seed, written once in COCO
format.

Five silhouettes on varied backgrounds; about 45% of the objects carry one nuisance (small, low
contrast, occluded by an unlabelled bar, blurred, noisy) so that detection difficulty varies while
every label stays right: the perception-aware attribute (docs/paper.md section 2) has something to
find. Masks and boxes are the whole (amodal) silhouette, also where a bar hides part of it. The
nuisance is kept in each annotation ("nuisance") so that later stages can check what [hard] objects
are.

    python -m data_sets shapes                    # writes data/shapes (a few seconds); `build_if_missing`
                                                  # makes it on first use for the commands that need it
"""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import data
from config import DataError
from data_sets.coco import private_tmp, publish


SHAPES = ("circle", "square", "triangle", "cross", "star")


NUISANCES = ("small", "low_contrast", "occlusion", "blur", "noise")


def shape_polygon(name, rng):
    """Unit-radius outline (K, 2) of a silhouette, randomly rotated (circles need no rotation)."""
    if name == "circle":
        a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "square":
        p = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8
    elif name == "triangle":
        a = np.deg2rad([90, 210, 330])
        p = np.stack([np.cos(a), np.sin(a)], 1)
    elif name == "cross":
        u, v = 1.0, 0.33
        p = np.array([[-v, -u], [v, -u], [v, -v], [u, -v], [u, v], [v, v], [v, u], [-v, u], [-v, v],
                      [-u, v],
                      [-u, -v], [-v, -v]])
    elif name == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:
        raise ValueError(name)
    t = rng.uniform(0, 2 * np.pi)
    return p @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def _background(rng, S):
    kind = rng.integers(3)
    if kind == 0:  # solid
        bg = np.ones((S, S, 3)) * rng.uniform(0, 255, 3)
    elif kind == 1:  # linear gradient in a random direction
        t = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:S, 0:S] / (S - 1)
        w = ((xs - 0.5) * np.cos(t) + (ys - 0.5) * np.sin(t) + 0.71) / 1.42
        bg = (1 - w)[..., None] * rng.uniform(0, 255, 3) + w[..., None] * rng.uniform(0, 255, 3)
    else:  # smooth texture: a 4x4 colour field upsampled
        small = Image.fromarray(np.uint8(rng.uniform(0, 255, (4, 4, 3))))
        bg = np.asarray(small.resize((S, S), Image.BICUBIC), np.float64)
    return bg


def _luma(c):
    return float(np.dot(c, [0.299, 0.587, 0.114]))


def render_shapes_image(rng, S=64, max_objects=5, nuisance_p=0.45, ss=4):
    """One image (uint8 (S, S, 3)) and its objects: category, polygon (pixels), nuisance."""
    img = _background(rng, S)
    objects, boxes = [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = SHAPES[rng.integers(len(SHAPES))]
        nuisance = NUISANCES[rng.integers(len(NUISANCES))] if rng.random() < nuisance_p else "none"
        unit = shape_polygon(cls, rng)
        r = rng.uniform(5.5, 7.0) if nuisance == "small" else rng.uniform(7.5, 15.0)
        span = unit.max(0) - unit.min(0)
        while np.prod(span * r) < 0.022 * S * S:  # keep every object above the 2% filter
            r *= 1.1
        for _try in range(50):  # place so that at most 10% of the smaller box overlaps an earlier
                                # one
            lo = -unit.min(0) * r + 1
            hi = S - 1 - unit.max(0) * r
            poly = unit * r + rng.uniform(lo, np.maximum(lo, hi))
            box = np.concatenate([poly.min(0), poly.max(0)])
            if all(_overlap(box, b) < 0.1 for b in boxes):
                break
        else:
            continue
        x0, y0, x1, y1 = (int(v) for v in (box[0], box[1], math.ceil(box[2]), math.ceil(box[3])))
        bg_l = _luma(img[y0:y1, x0:x1].reshape(-1, 3).mean(0))
        if nuisance == "low_contrast":  # a colour a few grey levels off the local background
            colour = img[y0:y1, x0:x1].reshape(-1, 3).mean(0) + rng.choice([-1, 1]) * rng.uniform(
                14, 24
            )
        else:
            for _c in range(100):
                colour = rng.uniform(0, 255, 3)
                if abs(_luma(colour) - bg_l) > 70:
                    break
        # supersampled coverage of the box's pixels = antialiased edges
        cx0, cy0, cx1, cy1 = max(0, x0 - 1), max(0, y0 - 1), min(S, x1 + 1), min(S, y1 + 1)
        alpha = Image.new("L", ((cx1 - cx0) * ss, (cy1 - cy0) * ss))
        ImageDraw.Draw(alpha).polygon([tuple(p) for p in (poly - [cx0, cy0]) * ss - 0.5], fill=255)
        a = np.asarray(alpha.resize((cx1 - cx0, cy1 - cy0), Image.BOX), np.float64)[..., None] / 255
        img[cy0:cy1, cx0:cx1] = img[cy0:cy1, cx0:cx1] * (1 - a) + np.clip(colour, 0, 255) * a
        if nuisance == "occlusion":  # an unlabelled bar over 35-50% of the object
            horizontal = rng.random() < 0.5
            lo_, hi_ = (y0, y1) if horizontal else (x0, x1)
            th = max(2, int(round(rng.uniform(0.35, 0.5) * (hi_ - lo_))))
            start = int(rng.integers(lo_, max(lo_ + 1, hi_ - th + 1)))
            bar = (slice(start, start + th), slice(max(0, x0 - 2), x1 + 2)) if horizontal else \
                  (slice(max(0, y0 - 2), y1 + 2), slice(start, start + th))
            img[bar] = rng.uniform(0, 255, 3)
        elif nuisance in ("blur", "noise"):
            m = 3
            ya, yb, xa, xb = max(0, y0 - m), min(S, y1 + m), max(0, x0 - m), min(S, x1 + m)
            patch = img[ya:yb, xa:xb]
            if nuisance == "blur":
                pim = Image.fromarray(np.uint8(np.clip(patch, 0, 255)))
                patch = np.asarray(pim.filter(ImageFilter.GaussianBlur(rng.uniform(1.3, 2.0))),
                                   np.float64)
            else:
                patch = patch + rng.normal(0, rng.uniform(30, 50), patch.shape)
            img[ya:yb, xa:xb] = patch
        boxes.append(box)
        objects.append(dict(category=cls, polygon=poly, nuisance=nuisance))
    img = img + rng.normal(0, 3, img.shape)  # mild sensor noise everywhere
    return np.uint8(np.clip(np.round(img), 0, 255)), objects


def _overlap(a, b):
    """Intersection over the smaller box's area (catches a small box inside a big one, which IoU
    misses)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def make_shapes(out, seed=0, n_train=2000, n_val=300, image_size=64, progress=True):
    """Write the `shapes` data set in COCO format (PNG images, instances json with polygons) to
    `out`."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out")
    tmp = private_tmp(out)
    categories = [dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPES)]
    ann_id = 1
    for code, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (tmp / split).mkdir(parents=True)
        images, anns = [], []
        for i in tqdm(range(n), desc=f"shapes/{split}", disable=not progress, leave=False):
            image_id = code * 1_000_000 + i + 1
            rng = np.random.default_rng([seed, code, i])  # per-image stream: order-independent,
                                                          # reproducible
            img, objects = render_shapes_image(rng, image_size)
            name = f"{image_id:07d}.png"
            Image.fromarray(img).save(tmp / split / name)
            images.append(dict(id=image_id, file_name=name, width=image_size, height=image_size))
            for o in objects:
                p = np.round(o["polygon"], 2)
                x0, y0 = p.min(0)
                x1, y1 = p.max(0)
                area = 0.5 * abs(
                    np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))
                )
                anns.append(dict(id=ann_id, image_id=image_id,
                                 category_id=SHAPES.index(o["category"]) + 1,
                                 bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                                 area=round(float(area), 2), segmentation=[p.reshape(-1).tolist()],
                                 iscrowd=0, nuisance=o["nuisance"]))
                ann_id += 1
        (tmp / "annotations").mkdir(exist_ok=True)
        with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(dict(images=images, annotations=anns, categories=categories,
                           info=dict(description="detdiff shapes", seed=seed,
                                     image_size=image_size)), f)
    return publish(tmp, out)


def build_if_missing(name_or_path):
    """data.resolve_data, with the embedded `shapes` set written to data/shapes first when it is not
    there yet: what the commands (the main job, sample.py, evaluate, the notebooks) call before they
    read a data set by name."""
    root = data.DATA_DIR / "shapes"
    if name_or_path == "shapes" and not (root / "annotations").is_dir():
        data.log.info("building the default data set in %s (once)", root)
        try:
            make_shapes(root)
        except DataError:
            # not a concurrent build: real
            if not (root / "annotations" / "instances_val.json").exists():
                raise
    return data.resolve_data(name_or_path)
