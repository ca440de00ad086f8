"""coco_subset: a few categories of COCO 2017 (or of any instances json), filtered and resized to S
x S.

    python -m data_sets coco-subset --coco /path/coco  # writes data/coco_subset from a local COCO 2017 copy
    python -m data_sets coco-subset --json FILE --images DIR   # from any instances json (split by image id)

Boxes, polygons and RLE masks are transformed with the images; the user's COCO copy is only read.
"""
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from config import DataError
from data import load_coco, log, open_rgb, resize_mask, rle_to_mask
from data_sets.coco import mask_to_rle, private_tmp, publish


DEFAULT_COCO_CATEGORIES = ("person", "car", "bus", "dog", "cat", "horse")


def build_coco_subset(out, coco=None, json_path=None, images=None,
                      categories=DEFAULT_COCO_CATEGORIES, size=128, min_area=0.02, max_objects=8,
                      max_images=None, val_every=10):
    """Write a small COCO-format subset. From a COCO 2017 folder (`coco`) its train/val splits are
    kept; from a single `json_path` + `images` folder, images go to val when crc32(image id) %
    val_every == 0. Images are stretched to size x size; boxes, polygons and RLE masks are
    transformed with them."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out")
    if coco is not None:
        sources = {s: (Path(coco) / "annotations" / f"instances_{s}2017.json",
                       Path(coco) / f"{s}2017", None)
                   for s in ("train", "val")}
    elif json_path is not None and images is not None:
        sources = {s: (Path(json_path), Path(images), s) for s in ("train", "val")}
    else:
        raise DataError("coco-subset needs --coco DIR, or --json FILE and --images DIR")
    tmp = private_tmp(out)
    loaded = {}
    for split, (js, image_dir, pick) in sources.items():
        if js not in loaded:
            loaded[js] = load_coco(js, image_dir, check_files=False)
        names, cat_ids, records, _ = loaded[js]
        missing = [c for c in categories if c not in names]
        if missing:
            raise DataError(f"{js}: no categories named {missing}; it has {names[:10]}...")
        chosen = {names.index(c) for c in categories}
        (tmp / split).mkdir(parents=True)
        out_images, out_anns, n_dropped = [], [], 0
        for rec in tqdm(records, desc=f"coco_subset/{split}", leave=False):
            if pick is not None and (zlib.crc32(str(rec["image_id"]).encode()) % val_every == 0) != (pick == "val"):
                continue
            W, H = rec["width"], rec["height"]
            objs = [o for o in rec["objects"] if o["label"] in chosen]
            area = [(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) / (W * H) for o in objs]
            keep = [objs[i] for i in np.argsort(area,
                                                kind="stable")[::-1] if area[i] >= min_area][:max_objects]
            n_dropped += len(objs) - len(keep)
            if not keep:
                continue
            image = open_rgb(rec["file"])
            if image.size != (W, H):
                raise DataError(f"{rec['file']}: json says {W}x{H}, the file is "
                                f"{image.size[0]}x{image.size[1]}")
            name = f"{rec['image_id']:012d}.png"
            image.resize((size, size), Image.BICUBIC).save(tmp / split / name)
            out_images.append(dict(id=rec["image_id"], file_name=name, width=size, height=size))
            sx, sy = size / W, size / H
            for o in keep:
                x0, y0, x1, y1 = o["box"]
                ann = dict(id=o["ann_id"], image_id=rec["image_id"],
                           category_id=cat_ids[o["label"]], iscrowd=0,
                           bbox=[x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy])
                seg = o["segmentation"]
                if isinstance(seg, list):
                    ann["segmentation"] = [(np.asarray(p) * np.tile([sx, sy], len(p) // 2)).round(2).tolist()
                                           for p in seg]
                elif isinstance(seg, dict):
                    ann["segmentation"] = mask_to_rle(resize_mask(rle_to_mask(seg), size))
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
                out_anns.append(ann)
            if max_images and len(out_images) >= max_images:
                break
        log.info("coco_subset/%s: %d images, %d objects, %d dropped by the area filter or the cap",
                 split, len(out_images), len(out_anns), n_dropped)
        cats = [dict(id=cat_ids[i], name=names[i]) for i in sorted(chosen)]
        (tmp / "annotations").mkdir(exist_ok=True)
        with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(dict(images=out_images, annotations=out_anns, categories=cats), f)
    return publish(tmp, out)
