"""How well the instance masks of generated objects fit what the image drew: the perception head's masks
that a generated data set exports (`sample.object_masks`, read off the sampling steps) against the object the
image actually drew (`drawn_masks`, `mask_fit`: the evaluation's `masks` part), and a picture of them.

Which pixels lie in a box is the project's one rule, `data.box_pixels` (a pixel whose centre is in
[x0, x1) x [y0, y1)), here as `box_pixels` on numpy arrays.

    python sample.py --ckpt runs/shapes/ckpt.pt --masks head     # RLE masks in the COCO json, masks.png
    python -m experiments.evaluate --run runs/shapes --parts masks
"""
import numpy as np
import torch

import data


def box_pixels(box, S, grow=0):
    """bool numpy (S, S): the pixels of `box` ([0, 1] xyxy) grown by `grow` pixels on every side, by
    data.box_pixels' rule."""
    return data.box_pixels(torch.as_tensor(np.asarray(box, np.float64)), S, grow).numpy()


def mask_picture(masks, S):
    """Each object's mask (bool (n, S, S)) in its own colour on black, later objects on top: uint8
    (S, S, 3)."""
    out = torch.zeros(S, S, 3, dtype=torch.uint8)
    for k, m in enumerate(masks):
        out[torch.from_numpy(m)] = torch.tensor(data.PALETTE[k % len(data.PALETTE)],
                                                dtype=torch.uint8)
    return out.numpy()


# --------------------------------------------------------------------------------------------------
# Exported masks against what the images drew


def otsu_threshold(values):
    """Otsu's threshold: the split of 1-D `values` that maximises the between-class variance w0 w1
    (m0 - m1)^2; returns the largest value of the lower class."""
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
    """The object each image actually drew, segmented without any model: inside the object's box,
    the pixels whose RGB distance to the median colour of a `ring`-pixel band just outside the box
    is above Otsu's threshold on those distances. One list per image of bool (S, S) arrays, None
    where the box leaves no band (it fills the image) or holds a single colour."""
    out = []
    for im, lay in zip(images, layouts):
        S, im = im.shape[0], np.asarray(im, np.float64)
        row = []
        for box in np.asarray(lay["boxes"], np.float64).reshape(-1, 4):
            inside = box_pixels(box, S)
            band = box_pixels(box, S, ring) & ~inside
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
    """Mean IoU of `masks` (one bool (n, S, S) array per image) with `drawn_masks`, and of the
    filled boxes with it, over the objects the segmenter could judge."""
    ious, box_ious = [], []
    for im, lay, ms, drawn in zip(images, layouts, masks, drawn_masks(images, layouts)):
        S = im.shape[0]
        for box, m, d in zip(np.asarray(lay["boxes"], np.float64).reshape(-1, 4), ms, drawn):
            if d is not None:
                ious.append(mask_iou(m, d))
                box_ious.append(mask_iou(box_pixels(box, S), d))
    return dict(iou=round(float(np.mean(ious)), 4) if ious else None,
                box_iou=round(float(np.mean(box_ious)), 4) if box_ious else None, n=len(ious),
                of=sum(len(lay["labels"]) for lay in layouts))
