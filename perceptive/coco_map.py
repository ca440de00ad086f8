"""COCO box mAP (Lin et al. 2014): pycocotools' COCOeval for iouType="bbox", written out here
(checked against pycocotools in the tests), and `evaluate(source, dataset)` -> mAP, AP50, AP75 of
any detection source (detections.py) on a data set's layouts. docs/paper.md section 4's perception metric
("YOLO score").

AP at one IoU threshold = mean over 101 recall points r of the interpolated precision max_{r' >= r}
p(r'); mAP = mean over IoU thresholds 0.50:0.05:0.95 and categories with ground truth; up to 100
detections per image and category; crowd regions and objects outside the area range are "ignore"
regions. COCO files (results json, `coco_map`) use pixels xywh.

    python -m perceptive eval --detector runs/detector/detector.pt --data shapes
"""
from collections import defaultdict

import numpy as np

import config
from perceptive.detections import detect_dataset


IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou_xywh(d, g, crowd):
    """IoU of detections d (D, 4) and ground truth g (G, 4), both xywh; against a crowd box the
    union is the detection's own area (COCO: a detection inside a crowd region is not a false
    positive)."""
    d, g = np.asarray(d, np.float64).reshape(-1, 4), np.asarray(g, np.float64).reshape(-1, 4)
    iw = np.minimum(d[:, None, 0] + d[:, None, 2],
                    g[None, :, 0] + g[None, :, 2]) - np.maximum(d[:, None, 0], g[None, :, 0])
    ih = np.minimum(d[:, None, 1] + d[:, None, 3],
                    g[None, :, 1] + g[None, :, 3]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_d, area_g = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(np.asarray(crowd, bool)[None, :], area_d[:, None],
                     area_d[:, None] + area_g[None, :] - inter)
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
                    continue                                   # already matched (crowds match many)
                if m > -1 and not g_ignore[m] and g_ignore[gi]:
                    break                                     # a real match beats any ignore region
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
    """COCO box AP of `results` (a COCO results list: image_id, category_id, bbox xywh, score)
    against `gt` (a COCO instances dict: images, annotations with bbox xywh and iscrowd,
    categories).

    Every image of gt counts (an image without objects turns its detections into false positives);
    categories without ground truth are left out of the mean. Returns dict(mAP, AP50, AP75,
    per_category {cat_id: AP}, precision (T, R, K)); a value is -1 when no category has ground
    truth, as pycocotools prints. """
    image_ids = sorted({im["id"] for im in gt["images"]})
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    known = set(image_ids)
    gts, dts = defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        gts[a["image_id"], a["category_id"]].append(a)
    for d in results:
        if d["image_id"] not in known:
            raise ValueError(f"detection for image_id {d['image_id']}, which the ground truth does "
                             f"not have")
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
        order = np.argsort(-scores, kind="mergesort")   # all detections of the category, best first
        matched = np.concatenate([m for _, m, _, _ in per_image], 1)[:, order]
        ignored = np.concatenate([ig for _, _, ig, _ in per_image], 1)[:, order]
        tp = np.cumsum(matched & ~ignored, 1).astype(np.float64)
        fp = np.cumsum(~matched & ~ignored, 1).astype(np.float64)
        for t in range(T):
            recall = tp[t] / n_pos
            prec = tp[t] / (fp[t] + tp[t] + np.spacing(1))
            prec = np.maximum.accumulate(prec[::-1])[::-1]      # interpolated: max precision at
                                                                # recall >= r
            idx = np.searchsorted(recall, RECALL_POINTS, side="left")
            q = np.zeros(R)
            ok = idx < len(prec)
            q[ok] = prec[idx[ok]]                               # recall never reached: precision 0
            precision[t, :, k] = q

    def mean(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0
    return dict(mAP=mean(precision), AP50=mean(precision[0]), AP75=mean(precision[5]),
                per_category={c: mean(precision[:, :, k]) for k, c in enumerate(cat_ids)},
                precision=precision)


def crowd_regions(json_path):
    """{image_id: [crowd boxes xywh]} of an instances json (data.py leaves crowds out of
    layouts)."""
    out = defaultdict(list)
    for a in config.read_json(json_path).get("annotations", []):
        if a.get("iscrowd", 0):
            out[a["image_id"]].append((a["category_id"], a["bbox"]))
    return out


def evaluate(source, dataset, crowd_json=None, batch_size=64, max_dets=100):
    """COCO mAP / AP50 / AP75 of a detection source on `dataset` (its layouts are the ground truth,
    in each image's own pixel frame), on whatever device the source is (its detections come back on
    the CPU). Pass the split's instances json as `crowd_json` to count its crowd regions as ignore
    regions (data.py drops crowds from layouts, so the dataset alone does not have them)."""
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
            results.append(dict(image_id=image_id, category_id=label,
                                bbox=[x0, y0, x1 - x0, y1 - y0], score=s))
    gt = dict(images=images, annotations=anns,
              categories=[dict(id=k) for k in range(len(dataset.class_names))])
    r = coco_map(gt, results, max_dets=max_dets)
    names = dataset.class_names
    return dict(mAP=r["mAP"], AP50=r["AP50"], AP75=r["AP75"],
                per_category={names[k]: v for k, v in r["per_category"].items()})
